//! The smoltcp peer of the side-by-side comparison (`benches/compare.sh`): an HTTP/1.1 server on
//! smoltcp 0.14 over a TAP, answering the same way as subnetstack's `http --fixed-body` example:
//! `GET /` with a fixed body, `GET /big?bytes=N` with N bytes, keep-alive or close.
//!
//! smoltcp has no accept queue and demultiplexes linearly, so the server keeps a pool of
//! listening sockets on port 80 and re-arms each one when its connection ends (a socket in
//! TIME-WAIT is re-armed at once, which smoltcp allows). `any_ip` with a route to the served
//! prefix via the interface's own address makes it answer for every address of the prefix.
//! One thread polls, as subnetstack's poll loop does.
//!
//! Run by compare.sh as
//! `smoltcp_http --tap NAME --addr 198.19.252.2/24 --gateway 198.19.252.1 --serve 198.18.0.0/16`
//! (needs the TAP to exist; it runs until killed). Without `--tap` (as under `cargo bench`) it
//! prints its usage and exits.

use std::os::fd::AsRawFd;

use smoltcp::iface::{Config, Interface, Route, SocketHandle, SocketSet};
use smoltcp::phy::{wait as phy_wait, Device, Medium, TunTapInterface};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr};

struct Args {
    tap: String,
    addr: Ipv4Cidr,
    gateway: Ipv4Address,
    serve: Ipv4Cidr,
    sockets: usize,
    body: String,
}

fn parse() -> Option<Args> {
    let mut a = std::env::args().skip(1);
    let (mut tap, mut addr, mut gateway, mut serve) = (None, None, None, None);
    let mut sockets = 512;
    let mut body = "hello, world\n".to_owned();
    while let Some(k) = a.next() {
        match k.as_str() {
            "--tap" => tap = a.next(),
            "--addr" => addr = a.next().and_then(|v| v.parse().ok()),
            "--gateway" => gateway = a.next().and_then(|v| v.parse().ok()),
            "--serve" => serve = a.next().and_then(|v| v.parse().ok()),
            "--sockets" => sockets = a.next().and_then(|v| v.parse().ok()).unwrap_or(sockets),
            "--body" => body = a.next().unwrap_or(body),
            _ => {} // `--bench` from cargo and the like
        }
    }
    Some(Args {
        tap: tap?,
        addr: addr?,
        gateway: gateway?,
        serve: serve?,
        sockets,
        body,
    })
}

/// What one socket is doing.
#[derive(Default)]
struct Conn {
    req: Vec<u8>,
    /// Response bytes still to send (headers and fixed body).
    out: Vec<u8>,
    sent: usize,
    /// Generated body bytes still to send (`/big`).
    big: u64,
    close_after: bool,
}

fn main() {
    let Some(args) = parse() else {
        println!(
            "usage: smoltcp_http --tap NAME --addr IP/LEN --gateway IP --serve PREFIX \
             [--sockets N] [--body TEXT] (run by benches/compare.sh)"
        );
        return;
    };
    let mut dev = TunTapInterface::new(&args.tap, Medium::Ethernet).expect("open the TAP");
    let fd = dev.as_raw_fd();
    let mac = EthernetAddress([0x02, 0x53, 0x6d, 0x6f, 0x6c, 0x74]);
    let mut cfg = Config::new(mac.into());
    cfg.random_seed = 0x5eed;
    let mut iface = Interface::new(cfg, &mut dev, Instant::now());
    iface.set_any_ip(true);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::Ipv4(args.addr)).expect("one address");
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(args.gateway)
        .expect("route table room");
    // any_ip: packets for the prefix are ours because it routes via our own address.
    iface.routes_mut().update(|r| {
        r.push(Route {
            cidr: IpCidr::Ipv4(args.serve),
            via_router: IpAddress::Ipv4(args.addr.address()),
            preferred_until: None,
            expires_at: None,
        })
        .expect("route table room");
    });

    let mut sockets = SocketSet::new(Vec::new());
    let mut conns: Vec<(SocketHandle, Conn)> = (0..args.sockets)
        .map(|_| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 16 * 1024]),
                tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            );
            s.set_nagle_enabled(false);
            s.listen(80).expect("listen");
            (sockets.add(s), Conn::default())
        })
        .collect();
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mtu = dev.capabilities().max_transmission_unit;
    println!(
        "smoltcp http on {}:80 ({} sockets, MTU {mtu})",
        args.serve, args.sockets
    );
    loop {
        let now = Instant::now();
        iface.poll(now, &mut dev, &mut sockets);
        for (h, c) in conns.iter_mut() {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                // Ended (closed, or TIME-WAIT): listen again.
                *c = Conn::default();
                let _ = s.listen(80);
                continue;
            }
            if s.can_recv() {
                let _ = s.recv(|b| {
                    c.req.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            // One request at a time (wrk and curl do not pipeline).
            if c.out.is_empty() && c.big == 0 {
                if let Some(end) = c.req.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&c.req[..end]).to_ascii_lowercase();
                    c.req.drain(..end + 4);
                    let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    c.close_after = head.contains("connection: close");
                    let conn = if c.close_after { "close" } else { "keep-alive" };
                    if let Some(n) = target.strip_prefix("/big?bytes=") {
                        c.big = n.parse().unwrap_or(0);
                        c.out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
                            c.big
                        )
                        .into_bytes();
                    } else {
                        c.out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{}",
                            args.body.len(),
                            args.body
                        )
                        .into_bytes();
                    }
                    c.sent = 0;
                }
            }
            while s.can_send() && c.sent < c.out.len() {
                match s.send_slice(&c.out[c.sent..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.sent += n,
                }
            }
            if c.sent == c.out.len() {
                while c.big > 0 && s.can_send() {
                    let k = c.big.min(chunk.len() as u64) as usize;
                    match s.send_slice(&chunk[..k]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => c.big -= n as u64,
                    }
                }
                if c.big == 0 && !c.out.is_empty() {
                    c.out.clear();
                    c.sent = 0;
                    if c.close_after {
                        s.close();
                    }
                }
            }
            if !s.may_recv() && c.out.is_empty() && s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
        // Transmit what the sockets queued this round before sleeping.
        iface.poll(Instant::now(), &mut dev, &mut sockets);
        let delay = iface.poll_delay(Instant::now(), &sockets);
        let _ = phy_wait(fd, delay);
    }
}
