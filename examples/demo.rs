//! The quick-start program. With no arguments it makes a private network namespace and a TAP,
//! owns 198.18.0.0/15 (as /24s; 198.19.255.0/24 is the kernel's side of the link) and
//! 2001:db8:100::/48, binds nested listeners, drives kernel clients to random addresses of each
//! binding, and prints which binding served them with connect latencies. It exits non-zero on
//! any failure. `--serve` keeps it running in a named namespace and prints commands to try.
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN): `sudo -E cargo run --release --example demo`.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket as KernelUdp};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ipnet::{IpNet, Ipv4Net};
use subnetstack::demux::PortSpec;
use subnetstack::ifaces::netns::{self, TapEnvConfig};
use subnetstack::{ListenOptions, Runtime, TcpListener, UdpSocket};

/// subnetstack's self-checking demo: nested subnet listeners served to kernel clients.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Clients per binding, each to a random address of it.
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Keep serving after the check, in a network namespace of this name, and print commands
    /// to try (stop with Ctrl-C; remove it with `ip netns del NAME`).
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "subnetstack-demo")]
    serve: Option<String>,
    /// Seed for the client addresses.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One binding of the demo, and how to pick addresses that it (and no more specific binding)
/// serves.
struct Binding {
    name: &'static str,
    tcp: bool,
    prefix: IpNet,
    ports: PortSpec,
    /// Addresses inside these belong to a more specific binding (or the kernel).
    exclude: &'static [&'static str],
}

fn bindings() -> Vec<Binding> {
    let p = |s: &str| s.parse::<IpNet>().expect("literal");
    vec![
        Binding {
            name: "catch-all /15",
            tcp: true,
            prefix: p("198.18.0.0/15"),
            ports: PortSpec::exact(80).expect("80"),
            exclude: &["198.18.7.0/24", "198.19.255.0/24"],
        },
        Binding {
            name: "team /24",
            tcp: true,
            prefix: p("198.18.7.0/24"),
            ports: PortSpec::exact(80).expect("80"),
            exclude: &["198.18.7.128/25"],
        },
        Binding {
            name: "canary /25",
            tcp: true,
            prefix: p("198.18.7.128/25"),
            ports: PortSpec::exact(80).expect("80"),
            exclude: &[],
        },
        Binding {
            name: "ports 8000-8099",
            tcp: true,
            prefix: p("198.18.9.0/24"),
            ports: PortSpec::range(8000, 8099).expect("range"),
            exclude: &[],
        },
        Binding {
            name: "IPv6 /48",
            tcp: true,
            prefix: p("2001:db8:100::/48"),
            ports: PortSpec::exact(80).expect("80"),
            exclude: &[],
        },
        Binding {
            name: "udp /15",
            tcp: false,
            prefix: p("198.18.0.0/15"),
            ports: PortSpec::exact(53).expect("53"),
            exclude: &["198.19.255.0/24"],
        },
    ]
}

/// A deterministic random address in `b` outside its exclusions (not a network or broadcast
/// address), and a port of its range.
fn target(b: &Binding, x: &mut u64) -> SocketAddr {
    loop {
        *x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = *x >> 11;
        let ip = match b.prefix {
            IpNet::V4(n) => {
                let host = (r as u32) & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNet::V6(n) => {
                let host = (u128::from(r) * 0x9e37_79b9) & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host | 1))
            }
        };
        let excluded = b
            .exclude
            .iter()
            .any(|e| e.parse::<IpNet>().expect("literal").contains(&ip));
        let edge = matches!(ip, IpAddr::V4(v) if matches!(v.octets()[3], 0 | 255));
        if excluded || edge {
            continue;
        }
        let port = match b.ports {
            PortSpec::Exact(p) => p,
            PortSpec::Range { lo, hi } => lo + (r >> 40) as u16 % (hi - lo + 1),
            PortSpec::Any => 80,
        };
        return SocketAddr::new(ip, port);
    }
}

/// The stack's prefixes: 198.18.0.0/15 as /24s without the kernel's 198.19.255.0/24, the
/// stack's own address on that link (the kernel routes through it), and the IPv6 /48.
fn prefixes() -> Vec<IpNet> {
    let mut v: Vec<IpNet> = "198.18.0.0/15"
        .parse::<Ipv4Net>()
        .expect("literal")
        .subnets(24)
        .expect("24 > 15")
        .filter(|n| n.network() != Ipv4Addr::new(198, 19, 255, 0))
        .map(IpNet::V4)
        .collect();
    v.push(IpNet::new(IpAddr::V4(netns::STACK_V4), 32).expect("/32"));
    v.push(IpNet::new(IpAddr::V6(netns::STACK_V6), 128).expect("/128"));
    v.push("2001:db8:100::/48".parse().expect("literal"));
    v
}

/// Serves every binding from threads: TCP answers with the binding's name and the address hit,
/// UDP echoes with the same.
fn serve(rt: &Runtime, bs: &[Binding]) -> std::io::Result<()> {
    for b in bs {
        let name = b.name;
        if b.tcp {
            let opts = ListenOptions {
                backlog: 256,
                ..Default::default()
            };
            let l = TcpListener::bind_with(rt, b.prefix, b.ports, opts)?;
            std::thread::spawn(move || {
                while let Ok((mut s, local, _)) = l.accept() {
                    std::thread::spawn(move || {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body = format!("{name} {local}\n");
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.flush();
                    });
                }
            });
        } else {
            let u = UdpSocket::bind(rt, b.prefix, b.ports, false)?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((_, src, dst)) = u.recv_from(&mut buf) {
                    let _ = u.send_from(format!("{name} {dst}\n").as_bytes(), dst, src);
                }
            });
        }
    }
    Ok(())
}

/// One client to `to`: Ok(connect latency) if the right binding answered from `to`.
fn client(b: &Binding, to: SocketAddr) -> Result<Duration, String> {
    let want = format!("{} {to}\n", b.name);
    let t0 = Instant::now();
    if b.tcp {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("{to}: connect: {e}"))?;
        let took = t0.elapsed();
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| format!("{to}: {e}"))?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .map_err(|e| format!("{to}: read: {e}"))?;
        match resp.ends_with(&want) {
            true => Ok(took),
            false => Err(format!("{to}: wrong answer {resp:?}")),
        }
    } else {
        let local = if to.is_ipv4() {
            "198.19.255.1:0"
        } else {
            "[2001:db8:ffff::1]:0"
        };
        let s = KernelUdp::bind(local).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        s.send_to(b"?", to).map_err(|e| format!("{to}: {e}"))?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("{to}: {e}"))?;
        let took = t0.elapsed();
        match (from == to, &buf[..n] == want.as_bytes()) {
            (true, true) => Ok(took),
            _ => Err(format!(
                "{to}: answer from {from}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            )),
        }
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    common::init_logs();
    if let Some(why) = netns::unavailable() {
        eprintln!("demo needs a private network namespace and a TAP: {why}");
        eprintln!("run it as root: sudo -E cargo run --release --example demo");
        std::process::exit(2);
    }
    // A namespace of our own, a TAP in it, the kernel routing 198.18.0.0/15 and the /48 to it.
    let mut cfg = TapEnvConfig::new("sst-demo", &["198.18.0.0/15", "2001:db8:100::/48"]);
    cfg.via_gateway = true;
    let env = match netns::tap_env(&cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot set up the namespace: {e}");
            std::process::exit(2);
        }
    };
    let tap = env.queues.into_iter().next().expect("one queue");
    let mut b = Runtime::builder()
        .device(Box::new(tap))
        .gateway_v4(netns::KERNEL_V4)
        .gateway_v6(netns::KERNEL_V6);
    let prefixes = prefixes();
    let owned = prefixes.len();
    for p in prefixes {
        b = b.prefix(p);
    }
    let rt = Arc::new(b.start().expect("runtime"));
    let bs = bindings();
    serve(&rt, &bs).expect("bindings");
    println!("subnetstack demo: {owned} local prefixes on TAP sst-demo in a private namespace");
    println!();
    println!(
        "{:<18} {:<28} {:>4} {:>6} {:>10} {:>10}",
        "binding", "prefix:ports", "ok", "failed", "p50", "p99"
    );
    let mut failures = Vec::new();
    let mut x = args.seed;
    for b in &bs {
        let targets: Vec<SocketAddr> = (0..args.clients).map(|_| target(b, &mut x)).collect();
        let (mut lat, mut failed) = (Vec::new(), 0);
        for t in targets {
            match client(b, t) {
                Ok(d) => lat.push(d),
                Err(e) => {
                    failed += 1;
                    failures.push(format!("{}: {e}", b.name));
                }
            }
        }
        let ok = lat.len();
        let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
        println!(
            "{:<18} {:<28} {:>4} {:>6} {:>10.2?} {:>10.2?}",
            b.name,
            format!(
                "{}{}:{}",
                if b.tcp { "tcp " } else { "udp " },
                b.prefix,
                b.ports
            ),
            ok,
            failed,
            p50,
            p99
        );
    }
    println!();
    match rt.snapshot() {
        Ok(snap) => println!("stack: {}", snap.counters),
        Err(e) => println!("stack: {e}"),
    }
    for f in &failures {
        eprintln!("FAILED {f}");
    }
    if let Some(name) = args.serve {
        let pid = std::process::id().to_string();
        if let Err(e) = netns::ip(&["netns", "attach", &name, &pid]) {
            eprintln!("cannot name the namespace {name}: {e}");
            std::process::exit(1);
        }
        println!();
        println!("serving in network namespace {name}; try:");
        println!("  sudo ip netns exec {name} curl -s http://198.18.7.9/");
        println!("  sudo ip netns exec {name} curl -s http://198.18.7.200/");
        println!("  sudo ip netns exec {name} curl -s http://198.18.200.1/");
        println!("  sudo ip netns exec {name} curl -s http://198.18.9.4:8042/");
        println!("  sudo ip netns exec {name} curl -s 'http://[2001:db8:100::beef]/'");
        println!("stop with Ctrl-C, then: sudo ip netns del {name}");
        loop {
            std::thread::park();
        }
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
