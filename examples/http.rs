//! A small HTTP/1.1 server (keep-alive) whose bindings serve different responses:
//!
//! - `GET /` says which binding and listener served it and the local address hit;
//! - `GET /big?bytes=N` streams N bytes;
//! - `GET /stats` shows live per-binding counters (HTML), `GET /metrics` Prometheus text.
//!
//! ```text
//! cargo run --release --example http -- --tap sst0 --prefix 198.18.0.0/16 \
//!     --bind tcp:198.18.0.0/16:80 --bind tcp:198.18.5.0/24:80
//! ```

mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use subnetstack::{ListenOptions, Runtime, TcpListener, TcpStream};

/// HTTP for whole subnets: each binding answers with its own name.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// Answer `GET /` with this fixed body instead of naming the binding (for side-by-side
    /// benchmarks against servers that answer a fixed body).
    #[arg(long, value_name = "TEXT")]
    fixed_body: Option<String>,
    /// Serve on the poll thread itself (the runtime's in-loop API, one queue) instead of a
    /// thread per connection over blocking handles: no context switch per request. Serves `/`,
    /// `/big?bytes=N` and `/metrics` (the stack's counters).
    #[arg(long)]
    in_loop: bool,
    /// With `--in-loop`: also bind this many random IPv4 prefixes (/24 to /32 anywhere, none
    /// touching 198.18.7.0/24; bindings are table entries, not routes) to port 80, listeners
    /// that never accept:
    /// for measuring that the binding count does not slow connections down.
    #[arg(long, value_name = "N", default_value_t = 0)]
    extra_bindings: usize,
}

/// One parsed request: method, target, whether the connection stays open after it.
struct Request {
    method: String,
    target: String,
    keep_alive: bool,
}

/// Reads one request head (the body, if any, is not used); `None` at a clean end of stream.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, target, version) = (
        first.next().unwrap_or_default().to_owned(),
        first.next().unwrap_or("/").to_owned(),
        first.next().unwrap_or("HTTP/1.0"),
    );
    let mut keep_alive = version == "HTTP/1.1";
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("connection") {
                let v = v.trim().to_ascii_lowercase();
                keep_alive = v.contains("keep-alive") || (keep_alive && !v.contains("close"));
            }
        }
    }
    Ok(Some(Request {
        method,
        target,
        keep_alive,
    }))
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
    keep: bool,
) -> io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep { "keep-alive" } else { "close" }
    )?;
    s.write_all(body)
}

fn stats_html(rt: &Runtime) -> String {
    let snap = rt.snapshot().unwrap_or_default();
    let mut h = String::from(
        "<!doctype html><title>subnetstack</title><h1>Bindings</h1><table border=1>\
         <tr><th>binding</th><th>listener</th><th>SYNs</th><th>cookies</th><th>accepted</th>\
         <th>overflows</th><th>resets</th><th>active</th><th>bytes in</th><th>bytes out</th></tr>",
    );
    for l in &snap.tcp {
        let s = &l.stats;
        h += &format!(
            "<tr><td>tcp {}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            l.binding, l.listener, s.syns, s.syncookies_valid, s.syncookies_sent, s.accepted,
            s.overflows, s.resets, s.active, s.bytes_in, s.bytes_out
        );
    }
    h += &format!(
        "</table><p>{} connections open</p><pre>{}</pre>",
        snap.tcp_connections, snap.counters
    );
    h
}

fn serve(
    rt: &Runtime,
    mut s: TcpStream,
    name: &str,
    fixed: Option<&str>,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut s, &mut buf)? {
        let keep = req.keep_alive;
        if req.method != "GET" {
            respond(
                &mut s,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
                keep,
            )?;
        } else if req.target == "/" {
            let body = match fixed {
                Some(f) => f.to_owned(),
                None => format!("binding {name} local {local} peer {peer}\n"),
            };
            respond(&mut s, "200 OK", "text/plain", body.as_bytes(), keep)?;
        } else if let Some(n) = req.target.strip_prefix("/big?bytes=") {
            let n: u64 = n.parse().unwrap_or(0);
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {}\r\n\r\n",
                if keep { "keep-alive" } else { "close" }
            )?;
            let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k])?;
                left -= k as u64;
            }
        } else if req.target == "/stats" {
            respond(
                &mut s,
                "200 OK",
                "text/html",
                stats_html(rt).as_bytes(),
                keep,
            )?;
        } else if req.target == "/metrics" {
            let text = rt.snapshot()?.prometheus();
            respond(
                &mut s,
                "200 OK",
                "text/plain; version=0.0.4",
                text.as_bytes(),
                keep,
            )?;
        } else {
            respond(&mut s, "404 Not Found", "text/plain", b"not found\n", keep)?;
        }
        if !keep {
            // FIN right behind the response, as nginx does: a client that sees the response
            // without the FIN closes first and keeps the TIME-WAIT (and its port) itself.
            s.shutdown(std::net::Shutdown::Write)?;
            break;
        }
    }
    s.flush()
}

/// The in-loop server: HTTP on the poll thread, straight on the stack's sans-IO calls.
mod in_loop {
    use std::collections::HashMap;
    use std::fmt::Write as _;
    use std::net::SocketAddr;
    use std::time::Duration;

    use subnetstack::demux::PortSpec;
    use subnetstack::stack::{DropReason, IoError, Stack, TcpHandle, TcpListenerHandle};

    use super::common::BindSpec;

    #[derive(Default)]
    struct Conn {
        /// Which binding accepted it.
        binding: usize,
        local: Option<SocketAddr>,
        req: Vec<u8>,
        out: Vec<u8>,
        sent: usize,
        /// Generated body bytes still to send (`/big`).
        big: u64,
        close_after: bool,
        eof: bool,
    }

    /// Serves `binds` from inside the poll loop.
    pub struct Server {
        binds: Vec<BindSpec>,
        extra: usize,
        listeners: Vec<TcpListenerHandle>,
        conns: HashMap<TcpHandle, Conn>,
        fixed: Option<String>,
        chunk: Vec<u8>,
        scratch: Vec<u8>,
        /// Connections to visit this round.
        ready: Vec<TcpHandle>,
        /// Connections accepted this round.
        fresh: Vec<TcpHandle>,
    }

    /// Whether the request head asks to close after the response (HTTP/1.0 without
    /// keep-alive, or `Connection: close`).
    fn closes(head: &[u8]) -> bool {
        let mut lines = head.split(|&b| b == b'\n');
        let http10 = lines
            .next()
            .is_some_and(|l| l.windows(8).any(|w| w == b"HTTP/1.0"));
        let mut close = http10;
        for l in lines {
            if l.len() > 11 && l[..11].eq_ignore_ascii_case(b"connection:") {
                let v = String::from_utf8_lossy(&l[11..]).to_ascii_lowercase();
                close = v.contains("close") || (http10 && !v.contains("keep-alive"));
            }
        }
        close
    }

    impl Server {
        pub fn new(binds: Vec<BindSpec>, fixed: Option<String>, extra: usize) -> Server {
            Server {
                binds,
                extra,
                listeners: Vec::new(),
                conns: HashMap::new(),
                fixed,
                chunk: (0..65536u32).map(|i| (i % 251) as u8).collect(),
                scratch: vec![0; 64 * 1024],
                ready: Vec::new(),
                fresh: Vec::new(),
            }
        }

        fn respond(&self, c: &mut Conn, s: &Stack, target: &[u8]) {
            let conn = if c.close_after { "close" } else { "keep-alive" };
            c.out.clear();
            c.sent = 0;
            if target == b"/" {
                let body = match &self.fixed {
                    Some(f) => f.clone(),
                    None => format!(
                        "binding {} local {}\n",
                        self.binds[c.binding],
                        c.local.map(|l| l.to_string()).unwrap_or_default()
                    ),
                };
                let _ = write!(
                    Vec8(&mut c.out),
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
                    body.len()
                );
            } else if let Some(n) = target.strip_prefix(b"/big?bytes=") {
                c.big = String::from_utf8_lossy(n).parse().unwrap_or(0);
                let _ = write!(
                    Vec8(&mut c.out),
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
                    c.big
                );
            } else if target == b"/metrics" {
                let mut body = String::new();
                let k = s.counters();
                let _ = writeln!(body, "subnetstack_rx_frames_total {}", k.rx_frames);
                let _ = writeln!(body, "subnetstack_tx_frames_total {}", k.tx_frames);
                let _ = writeln!(body, "subnetstack_tcp_connections {}", s.tcp_connections());
                for r in DropReason::ALL {
                    if k.dropped(*r) > 0 {
                        let _ = writeln!(
                            body,
                            "subnetstack_drops_total{{reason=\"{}\"}} {}",
                            r.name(),
                            k.dropped(*r)
                        );
                    }
                }
                let _ = write!(
                    Vec8(&mut c.out),
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
                    body.len()
                );
            } else {
                let _ = write!(
                    Vec8(&mut c.out),
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: {conn}\r\n\r\nnot found\n"
                );
            }
        }

        /// The `--extra-bindings`: random prefixes on port 80 that never see a connection of
        /// the benchmark (its target is 198.18.7.7).
        fn bind_extra(&mut self, s: &mut Stack) {
            let t0 = std::time::Instant::now();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut bound = 0;
            while bound < self.extra {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 24 + (x % 9) as u8;
                let addr = std::net::Ipv4Addr::from((x >> 32) as u32 & (u32::MAX << (32 - len)));
                if u32::from(addr) >> 8 == 0xc6_12_07 {
                    continue;
                }
                let net = ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, len).expect("length"));
                if s.tcp_listen(net, PortSpec::exact(80).unwrap(), false, 16)
                    .is_ok()
                {
                    bound += 1;
                }
            }
            if bound > 0 {
                println!("{bound} extra bindings in {:?}", t0.elapsed());
            }
        }

        /// One round after the stack's poll: accept, read, answer, close. Returns whether
        /// anything happened.
        pub fn poll(&mut self, s: &mut Stack, now: Duration) -> bool {
            if self.listeners.is_empty() {
                for b in self.binds.iter().filter(|b| b.tcp()) {
                    let ports: PortSpec = b.ports;
                    match s.tcp_listen(b.prefix, ports, false, 4096) {
                        Ok(l) => {
                            println!("http (in loop) on {b}");
                            self.listeners.push(l);
                        }
                        Err(e) => {
                            eprintln!("{b}: {e}");
                            std::process::exit(1);
                        }
                    }
                }
                self.bind_extra(s);
            }
            let mut busy = false;
            for (i, &l) in self.listeners.iter().enumerate() {
                while let Some((h, local, _)) = s.tcp_accept(l) {
                    busy = true;
                    let _ = s.tcp_set_nodelay(h, true);
                    self.fresh.push(h);
                    self.conns.insert(
                        h,
                        Conn {
                            binding: i,
                            local: Some(local),
                            ..Conn::default()
                        },
                    );
                }
            }
            // Only the connections just accepted or touched by the network since the last
            // round (`tcp_ready`): the loop's cost follows the traffic, not the connection count.
            s.tcp_ready(&mut self.ready);
            self.ready.append(&mut self.fresh);
            let mut ready = std::mem::take(&mut self.ready);
            for &h in &ready {
                let Some(mut c) = self.conns.remove(&h) else {
                    continue;
                };
                busy |= self.visit(s, now, h, &mut c);
                if c.eof && c.out.is_empty() && c.big == 0 {
                    // FIN right behind the response, as nginx does.
                    s.tcp_close(now, h);
                } else {
                    self.conns.insert(h, c);
                }
            }
            ready.clear();
            self.ready = ready;
            busy
        }

        /// Reads, answers and sends for one connection until it makes no more progress.
        fn visit(&mut self, s: &mut Stack, now: Duration, h: TcpHandle, c: &mut Conn) -> bool {
            let mut busy = false;
            loop {
                let mut progress = false;
                // Read what arrived.
                loop {
                    match s.tcp_recv(now, h, &mut self.scratch) {
                        Ok(0) => {
                            c.eof = true;
                            break;
                        }
                        Ok(n) => {
                            progress = true;
                            c.req.extend_from_slice(&self.scratch[..n]);
                        }
                        Err(IoError::WouldBlock | IoError::NotConnected) => break,
                        Err(_) => {
                            c.eof = true;
                            c.out.clear();
                            c.big = 0;
                            return busy;
                        }
                    }
                }
                // Answer one request at a time.
                if c.out.is_empty() && c.big == 0 {
                    if let Some(end) = c.req.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = &c.req[..end];
                        c.close_after = closes(head);
                        let target = head.split(|&b| b == b' ').nth(1).unwrap_or(b"/").to_vec();
                        c.req.drain(..end + 4);
                        self.respond(c, s, &target);
                        progress = true;
                    } else if c.req.len() > 64 * 1024 {
                        c.eof = true;
                    }
                }
                // Send what fits.
                while c.sent < c.out.len() {
                    match s.tcp_send(now, h, &c.out[c.sent..]) {
                        Ok(n) => {
                            progress = true;
                            c.sent += n;
                        }
                        Err(_) => break,
                    }
                }
                if c.sent == c.out.len() {
                    while c.big > 0 {
                        let k = c.big.min(self.chunk.len() as u64) as usize;
                        match s.tcp_send(now, h, &self.chunk[..k]) {
                            Ok(n) => {
                                progress = true;
                                c.big -= n as u64;
                            }
                            Err(_) => break,
                        }
                    }
                    if c.big == 0 && !c.out.is_empty() {
                        c.out.clear();
                        c.sent = 0;
                        if c.close_after {
                            c.eof = true;
                        }
                    }
                }
                busy |= progress;
                if !progress || c.eof {
                    return busy;
                }
            }
        }
    }

    /// `write!` into a `Vec<u8>` without the io::Write error plumbing.
    struct Vec8<'a>(&'a mut Vec<u8>);

    impl std::fmt::Write for Vec8<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    common::init_logs();
    let tcp: Vec<_> = args.dev.binds.iter().filter(|b| b.tcp()).cloned().collect();
    if tcp.is_empty() {
        eprintln!("nothing to serve: give at least one TCP --bind");
        std::process::exit(2);
    }
    if args.in_loop {
        let mut server = in_loop::Server::new(tcp, args.fixed_body.clone(), args.extra_bindings);
        let _rt = args
            .dev
            .builder()
            .in_loop(move |s, now| server.poll(s, now))
            .start()?;
        loop {
            std::thread::park();
        }
    }
    let rt = Arc::new(args.dev.start()?);
    let mut threads = Vec::new();
    for b in tcp {
        let l = TcpListener::bind_with(&rt, b.prefix, b.ports, ListenOptions::default())?;
        let name = format!(
            "tcp:{} (listener {})",
            b.to_string().trim_start_matches("tcp:"),
            l.id()
        );
        println!("http on {b}");
        let rt = rt.clone();
        let fixed = args.fixed_body.clone();
        threads.push(std::thread::spawn(move || {
            while let Ok((s, local, peer)) = l.accept() {
                let (rt, name, fixed) = (rt.clone(), name.clone(), fixed.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve(&rt, s, &name, fixed.as_deref(), local, peer) {
                        eprintln!("{peer} -> {local}: {e}");
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
