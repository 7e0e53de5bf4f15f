//! The protocol core without system calls: two stacks on the memory pair (no latency, no
//! bandwidth limit, a manual clock), so regressions in the TCP path show up without root.
//!
//! - `stack/handshake`: one connection set up, one request and response, both closes (the cost
//!   of a short connection, both ends included);
//! - `stack/bulk/16MiB`: one direction, 16 MiB, throughput.
//!
//! `cargo bench --bench stack`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use subnetstack::demux::{HashKey, PortSpec};
use subnetstack::ifaces::mem::{pair, LinkConfig, MemDevice};
use subnetstack::ifaces::{Clock, Device, ManualClock};
use subnetstack::stack::poll::Driver;
use subnetstack::stack::{Config, IoError, Stack, TcpHandle, TcpListenerHandle};

struct Pair {
    clock: ManualClock,
    a: Stack,
    b: Stack,
    da: Driver<MemDevice>,
    db: Driver<MemDevice>,
    l: TcpListenerHandle,
}

impl Pair {
    fn new() -> Pair {
        let clock = ManualClock::new();
        let c: Arc<dyn Clock> = Arc::new(clock.clone());
        let (ea, eb) = pair(LinkConfig::default(), c);
        let mk = |dev: &MemDevice, net: &str, k| {
            let mut cfg = Config::new(dev.info().mac, vec![net.parse().unwrap()]);
            cfg.hash_key = Some(HashKey([k; 16]));
            cfg.tcp.max_time_wait = 0; // short connections by the million would fill it
            Stack::new(cfg).unwrap()
        };
        let mut a = mk(&ea, "198.18.10.0/24", 1);
        let b = mk(&eb, "198.18.20.0/24", 2);
        let l = a
            .tcp_listen(
                "198.18.10.0/24".parse().unwrap(),
                PortSpec::exact(80).unwrap(),
                false,
                1024,
            )
            .unwrap();
        Pair {
            clock,
            a,
            b,
            da: Driver::new(ea),
            db: Driver::new(eb),
            l,
        }
    }

    /// One round: both stacks receive and transmit; 10 µs pass.
    fn step(&mut self) -> Duration {
        self.clock.advance(Duration::from_micros(10));
        let now = self.clock.now();
        self.da.poll(&mut self.a, now).unwrap();
        self.db.poll(&mut self.b, now).unwrap();
        now
    }

    /// A short connection: connect, 64-byte request, 64-byte response, close both ways.
    fn short(&mut self, i: u32) {
        let now = self.clock.now();
        let dst = format!("198.18.10.{}:80", 1 + i % 250).parse().unwrap();
        let c = self
            .b
            .tcp_connect(now, "198.18.20.2:0".parse().unwrap(), dst)
            .unwrap();
        let mut srv: Option<TcpHandle> = None;
        let (mut sent, mut answered, mut done) = (false, false, false);
        let mut buf = [0u8; 256];
        for _ in 0..10_000 {
            let now = self.step();
            if srv.is_none() {
                srv = self.a.tcp_accept(self.l).map(|(h, _, _)| h);
            }
            if !sent && self.b.tcp_send(now, c, &[7; 64]).is_ok() {
                sent = true;
            }
            if let (Some(h), false) = (srv, answered) {
                if let Ok(64) = self.a.tcp_recv(now, h, &mut buf) {
                    self.a.tcp_send(now, h, &[9; 64]).unwrap();
                    self.a.tcp_close(now, h);
                    answered = true;
                }
            }
            if !done {
                match self.b.tcp_recv(now, c, &mut buf) {
                    Ok(64) => {}
                    Ok(0) if answered => {
                        self.b.tcp_close(now, c);
                        done = true;
                    }
                    Ok(_) | Err(IoError::WouldBlock | IoError::NotConnected) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            if done && self.a.tcp_connections() + self.b.tcp_connections() == 0 {
                return;
            }
        }
        panic!("connection {i} did not finish");
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("stack");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handshake", |bch| {
        let mut p = Pair::new();
        let mut i = 0;
        bch.iter(|| {
            p.short(i);
            i += 1;
        })
    });
    const BULK: usize = 16 << 20;
    g.throughput(Throughput::Bytes(BULK as u64));
    g.sample_size(10);
    g.bench_function("bulk/16MiB", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut p = Pair::new();
                let now = p.clock.now();
                let c =
                    p.b.tcp_connect(
                        now,
                        "198.18.20.2:0".parse().unwrap(),
                        "198.18.10.5:80".parse().unwrap(),
                    )
                    .unwrap();
                let data = vec![5u8; 64 * 1024];
                let mut buf = vec![0u8; 64 * 1024];
                let (mut sent, mut got) = (0, 0);
                let mut srv = None;
                let t0 = Instant::now();
                while got < BULK {
                    let now = p.step();
                    srv = srv.or_else(|| p.a.tcp_accept(p.l).map(|(h, _, _)| h));
                    while sent < BULK {
                        match p.b.tcp_send(now, c, &data[..(BULK - sent).min(data.len())]) {
                            Ok(n) => sent += n,
                            Err(_) => break,
                        }
                    }
                    if let Some(h) = srv {
                        while let Ok(n) = p.a.tcp_recv(now, h, &mut buf) {
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                    }
                }
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
