//! A spoofed SYN flood against the stack while legitimate kernel clients connect. Its own test
//! binary (so its own process): the resident set size it prints is the stack's, not that of
//! other tests running beside it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{addresses, servers, Running};
use subnetstack_ifaces::netns::{self, TapEnvConfig};

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Sends spoofed SYNs through a raw socket from this namespace: sources drawn only from
/// 198.19.128.0/17, destinations from `dst` (a /16 of the stack's), port 80. Stops after
/// `max` SYNs or `secs` seconds, paced to `pps`; returns how many went out.
fn syn_flood(dst: std::net::Ipv4Addr, max: u64, secs: f64, pps: f64) -> u64 {
    use smoltcp::wire::TcpControl;
    use std::net::Ipv4Addr;
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let t0 = std::time::Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0;
    let base = u32::from(dst) & 0xffff_0000;
    while sent < max && t0.elapsed().as_secs_f64() < secs {
        if sent as f64 > t0.elapsed().as_secs_f64() * pps {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let src = Ipv4Addr::from(0xc613_8000 | (x as u32 & 0x7fff)); // 198.19.128.0/17
        let to = Ipv4Addr::from(base | ((x >> 16) as u32 & 0xffff));
        let syn = subnetstack_testkit::tcp_repr(
            1024 + (x >> 40) as u16 % 60000,
            80,
            TcpControl::Syn,
            (x >> 8) as i32,
            None,
            64240,
            &[],
        );
        let frame = subnetstack_testkit::tcp4_frame([0; 6], [0; 6], src, to, &syn);
        let ip = &frame[14..];
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n > 0 {
            sent += 1;
        }
    }
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    sent
}

#[test]
fn a_spoofed_syn_flood_does_not_keep_legitimate_clients_out() {
    if !netns::live("a_spoofed_syn_flood_does_not_keep_legitimate_clients_out") {
        return;
    }
    // Routed via the stack's address in the kernel's subnet: one neighbour entry for the
    // kernel however many destinations the flood uses. SYN-ACKs to the spoofed sources go to
    // the kernel as gateway, which does not forward: they die in the namespace.
    let mut cfg = TapEnvConfig::new("sst-flood", &["198.18.0.0/16"]);
    cfg.via_gateway = true;
    let env = netns::tap_env(&cfg).unwrap();
    let tap = env.queues.into_iter().next().unwrap();
    let run = Running::start_cfg(
        Box::new(tap),
        &["198.18.0.0/16", "198.19.255.2/32"],
        |c| c.gateway_v4 = Some(netns::KERNEL_V4),
        servers,
    );
    let rss_before = rss_kib();
    let flood =
        std::thread::spawn(|| syn_flood("198.18.0.0".parse().unwrap(), 400_000, 5.0, 80_000.0));
    std::thread::sleep(Duration::from_millis(300));
    // 100 legitimate clients, ten at a time, while the flood runs.
    let targets = addresses("198.18.0.0/16", 100, 99);
    let clients: Vec<_> = targets
        .chunks(10)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            std::thread::spawn(move || {
                let mut ok = 0;
                for ip in chunk {
                    let to = SocketAddr::new(ip, 80);
                    let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(20)) else {
                        continue;
                    };
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                    let mut resp = String::new();
                    if c.read_to_string(&mut resp).is_ok() && resp.ends_with(&format!("wide {ip}"))
                    {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let ok: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let sent = flood.join().unwrap();
    let rss_after = rss_kib();
    let stack = run.stop();
    let c = stack.counters();
    println!(
        "SYN flood: {sent} spoofed SYNs; legitimate clients ok {ok}/100; cookies sent {} valid {}; \
         RSS {rss_before} KiB before, {rss_after} KiB after; connections left {}; {c}",
        c.tcp_syncookies_sent,
        c.tcp_syncookies_valid,
        stack.tcp_connections()
    );
    assert_eq!(ok, 100, "every legitimate client served");
    assert!(sent > 10_000, "the flood ran ({sent} SYNs)");
    assert!(
        c.tcp_syncookies_sent > 0,
        "the SYN queue filled and cookies answered"
    );
    // Embryos are bounded by the backlogs (128 each for the /16 and the nested /24 on port
    // 80), the legitimate connections linger in TIME-WAIT; the rest of the flood left no state.
    assert!(
        stack.tcp_connections() <= 2 * 128 + 100,
        "{}",
        stack.tcp_connections()
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory bounded: {rss_before} -> {rss_after} KiB"
    );
}
