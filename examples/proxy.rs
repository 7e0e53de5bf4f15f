//! An L4 proxy: routes map `prefix:ports` bindings on the stack to upstream `host:port`s. Each
//! accepted connection is dialled upstream through a kernel socket, and bytes are copied both
//! ways with half-close and back-pressure (a slow side slows the other; nothing piles up).
//!
//! ```text
//! cargo run --release --example proxy -- --tap sst0 --prefix 198.18.0.0/16 \
//!     --route 198.18.0.0/16:80=198.19.255.1:8080 --route 198.18.5.0/24:443=198.19.255.1:8443
//! ```

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream as KernelStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use subnetstack::{ListenOptions, TcpListener, TcpStream};

/// Subnet-bound L4 proxy to kernel upstreams.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// A route, `CIDR:PORTS=HOST:PORT` (repeatable; IPv6 bindings as `[2001:db8::]/32:80=...`).
    #[arg(long = "route", value_name = "ROUTE")]
    routes: Vec<Route>,
    /// A file of routes, one per line (`#` starts a comment).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Print per-route counters this often (seconds; 0: never).
    #[arg(long, default_value_t = 0)]
    stats_every: u64,
}

/// One route: a binding and its upstream.
#[derive(Clone, Debug)]
struct Route {
    bind: common::BindSpec,
    upstream: String,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (b, u) = s
            .split_once('=')
            .ok_or_else(|| format!("{s}: expected CIDR:PORTS=HOST:PORT"))?;
        let bind: common::BindSpec = format!("tcp:{b}").parse()?;
        u.to_socket_addrs()
            .map_err(|e| format!("{s}: upstream {u}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s}: upstream {u} has no address"))?;
        Ok(Route {
            bind,
            upstream: u.to_owned(),
        })
    }
}

/// Counters of one route.
#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    upstream_failures: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Copies `from` to `to` until EOF (or an error on either side); returns the bytes copied.
fn copy(mut from: impl Read, to: &mut impl Write) -> u64 {
    let mut buf = vec![0u8; 32 * 1024];
    let mut n = 0;
    while let Ok(k) = from.read(&mut buf) {
        if k == 0 || to.write_all(&buf[..k]).is_err() {
            break;
        }
        n += k as u64;
    }
    let _ = to.flush();
    n
}

fn relay(client: TcpStream, upstream: &str, stats: &Stats) -> io::Result<()> {
    let up = match KernelStream::connect(upstream) {
        Ok(u) => u,
        Err(e) => {
            stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    up.set_nodelay(true)?;
    let (c_read, mut c_write) = (client.try_clone()?, client);
    let (u_read, mut u_write) = (up.try_clone()?, up);
    // Each direction ends with a half-close towards its receiver, so either side may finish
    // first and the other still drains.
    let down = std::thread::spawn(move || {
        let n = copy(u_read, &mut c_write);
        let _ = c_write.shutdown(Shutdown::Write);
        n
    });
    let up_bytes = copy(c_read, &mut u_write);
    let _ = u_write.shutdown(Shutdown::Write);
    let down_bytes = down.join().unwrap_or(0);
    stats.bytes_up.fetch_add(up_bytes, Ordering::Relaxed);
    stats.bytes_down.fetch_add(down_bytes, Ordering::Relaxed);
    Ok(())
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    common::init_logs();
    let mut routes = args.routes.clone();
    if let Some(path) = &args.config {
        for (i, line) in std::fs::read_to_string(path)?.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match line.parse() {
                Ok(r) => routes.push(r),
                Err(e) => {
                    eprintln!("{}:{}: {e}", path.display(), i + 1);
                    std::process::exit(2);
                }
            }
        }
    }
    if routes.is_empty() {
        eprintln!("nothing to proxy: give at least one --route");
        std::process::exit(2);
    }
    let rt = Arc::new(args.dev.start()?);
    let mut all = Vec::new();
    for r in routes {
        let l = TcpListener::bind_with(&rt, r.bind.prefix, r.bind.ports, ListenOptions::default())?;
        let stats = Arc::new(Stats::default());
        all.push((r.clone(), stats.clone()));
        println!("proxy {} -> {}", r.bind, r.upstream);
        std::thread::spawn(move || {
            while let Ok((c, local, peer)) = l.accept() {
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let _ = c.set_nodelay(true);
                let (up, stats) = (r.upstream.clone(), stats.clone());
                std::thread::spawn(move || {
                    if let Err(e) = relay(c, &up, &stats) {
                        eprintln!("{peer} -> {local} -> {up}: {e}");
                    }
                });
            }
        });
    }
    loop {
        if args.stats_every == 0 {
            std::thread::park();
            continue;
        }
        std::thread::sleep(Duration::from_secs(args.stats_every));
        for (r, s) in &all {
            println!(
                "{} -> {}: connections {} upstream failures {} bytes up {} down {}",
                r.bind,
                r.upstream,
                s.connections.load(Ordering::Relaxed),
                s.upstream_failures.load(Ordering::Relaxed),
                s.bytes_up.load(Ordering::Relaxed),
                s.bytes_down.load(Ordering::Relaxed)
            );
        }
    }
}
