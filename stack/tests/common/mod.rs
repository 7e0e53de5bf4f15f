//! Helpers shared by the live tests: the stack on its own thread in the test's namespace.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use std::collections::HashMap;
use subnetstack_demux::HashKey;
use subnetstack_ifaces::{Clock, Device, SystemClock};
use subnetstack_stack::poll::Driver;

use subnetstack_demux::PortSpec;
use subnetstack_stack::{Config, Stack, TcpHandle, TcpListenerHandle};

pub const LOCAL: [&str; 3] = ["198.18.1.0/24", "198.18.2.0/23", "2001:db8:100::/48"];

/// Application logic run on the stack's thread after every poll round.
pub type App = Box<dyn FnMut(&mut Stack, Duration) + Send>;

/// The stack on its own thread until `stop`; `app` runs after every poll round.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Stack>,
}

impl Running {
    pub fn start(
        tap: impl Device + 'static,
        setup: impl FnOnce(&mut Stack) -> App + Send + 'static,
    ) -> Running {
        Self::start_with(tap, &LOCAL, setup)
    }

    /// Like `start`, with other local prefixes.
    pub fn start_with(
        tap: impl Device + 'static,
        prefixes: &[&str],
        setup: impl FnOnce(&mut Stack) -> App + Send + 'static,
    ) -> Running {
        Self::start_dev(Box::new(tap), prefixes, setup)
    }

    /// Like `start_with`, over any device (an impaired TAP, say).
    pub fn start_dev(
        tap: Box<dyn Device>,
        prefixes: &[&str],
        setup: impl FnOnce(&mut Stack) -> App + Send + 'static,
    ) -> Running {
        Self::start_cfg(tap, prefixes, |_| {}, setup)
    }

    /// Like `start_dev`, with the configuration adjusted by `tweak` first.
    pub fn start_cfg(
        tap: Box<dyn Device>,
        prefixes: &[&str],
        tweak: impl FnOnce(&mut Config) + Send + 'static,
        setup: impl FnOnce(&mut Stack) -> App + Send + 'static,
    ) -> Running {
        let prefixes: Vec<IpNet> = prefixes.iter().map(|p| p.parse().unwrap()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (mac, offloads) = (tap.info().mac, tap.info().offloads);
        let thread = std::thread::spawn(move || {
            let mut cfg = Config::new(mac, prefixes);
            cfg.hash_key = Some(HashKey([8; 16]));
            cfg.offloads = offloads;
            tweak(&mut cfg);
            let mut stack = Stack::new(cfg).unwrap();
            let mut app = setup(&mut stack);
            let clock = SystemClock::new();
            let mut drv = Driver::new(tap);
            while !s.load(Ordering::Relaxed) {
                let now = clock.now();
                drv.poll(&mut stack, now).unwrap();
                app(&mut stack, now);
                drv.flush(&mut stack).unwrap();
                drv.wait(&stack, now, Duration::from_millis(5));
            }
            stack
        });
        Running { stop, thread }
    }

    pub fn stop(self) -> Stack {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `recv_from`, retrying when a signal (another test's child process exiting) interrupts it.
pub fn recv_from(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match s.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Deterministic addresses inside `net`, avoiding the network and broadcast addresses.
pub fn addresses(net: &str, n: usize, seed: u64) -> Vec<IpAddr> {
    let net: IpNet = net.parse().unwrap();
    let mut x = seed;
    let mut out = Vec::new();
    while out.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = x >> 11;
        let a = match net {
            IpNet::V4(v) => {
                let host = (r as u32) & !u32::from(v.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(v.network()) | host))
            }
            IpNet::V6(v) => {
                let host = (u128::from(r) * 0x9e37_79b9_7f4a_7c15) & !u128::from(v.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(v.network()) | host))
            }
        };
        let bad = match a {
            IpAddr::V4(v) => v.octets()[3] == 0 || v.octets()[3] == 255,
            IpAddr::V6(v) => v.segments()[7] == 0,
        };
        if !bad && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Per-connection state of the servers below.
struct Served {
    kind: &'static str,
    local: SocketAddr,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    closing: bool,
}

/// Echo on one listener and an HTTP-like responder on two (the nested one answers with its own
/// tag), all inside the stack's poll loop.
pub fn servers(s: &mut Stack) -> App {
    let listen = |s: &mut Stack, net: &str, port: u16| {
        s.tcp_listen(
            net.parse().unwrap(),
            PortSpec::exact(port).unwrap(),
            false,
            128,
        )
        .unwrap()
    };
    let listeners: Vec<(TcpListenerHandle, &'static str)> = vec![
        (listen(s, "198.18.0.0/16", 7), "echo"),
        (listen(s, "198.18.0.0/16", 80), "wide"),
        (listen(s, "198.18.5.0/24", 80), "nested"),
        (listen(s, "2001:db8:100::/48", 7), "echo"),
    ];
    let mut conns: HashMap<TcpHandle, Served> = HashMap::new();
    Box::new(move |s: &mut Stack, now| {
        for &(l, kind) in &listeners {
            while let Some((h, local, _)) = s.tcp_accept(l) {
                conns.insert(
                    h,
                    Served {
                        kind,
                        local,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        sent: 0,
                        closing: false,
                    },
                );
            }
        }
        let mut done = Vec::new();
        let mut buf = vec![0u8; 65536];
        for (&h, c) in conns.iter_mut() {
            let mut eof = false;
            loop {
                match s.tcp_recv(now, h, &mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            if c.kind == "echo" {
                c.out.append(&mut c.inbuf);
            } else if !c.closing && c.inbuf.windows(4).any(|w| w == b"\r\n\r\n") {
                c.out.extend_from_slice(
                    format!("HTTP/1.0 200 OK\r\n\r\n{} {}", c.kind, c.local.ip()).as_bytes(),
                );
                c.closing = true;
            }
            while c.sent < c.out.len() {
                match s.tcp_send(now, h, &c.out[c.sent..]) {
                    Ok(n) => c.sent += n,
                    Err(_) => break,
                }
            }
            if c.sent == c.out.len() {
                c.out.clear();
                c.sent = 0;
                if eof || c.closing {
                    s.tcp_close(now, h);
                    done.push(h);
                }
            }
            if s.tcp_error(h).is_some() {
                done.push(h);
            }
        }
        for h in done {
            conns.remove(&h);
        }
    })
}

/// Runs a live test once per backend (TAP, AF_XDP): `backends!(name)` makes `name::tap` and
/// `name::xdp`, each calling `name(backend)` when that backend can run here.
#[macro_export]
macro_rules! backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            use subnetstack_ifaces::netns::{self, Backend};
            #[test]
            fn tap() {
                if netns::live_on(concat!(stringify!($test), "::tap"), Backend::Tap) {
                    super::$test(Backend::Tap);
                }
            }
            #[test]
            fn xdp() {
                if netns::live_on(concat!(stringify!($test), "::xdp"), Backend::Xdp) {
                    super::$test(Backend::Xdp);
                }
            }
        }
    )*};
}
