//! Demux benchmarks: lookup speed against `prefix-trie` and a linear scan, update cost at 1M
//! bindings, and memory per prefix (counting allocator).
//!
//! `cargo bench --bench demux` runs everything; `cargo bench --bench demux -- demux_lookup/v4/1000000`
//! one group. Set `DEMUX_BENCH_MAX_N=100000` to skip the 1M tables on a small machine.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use subnetstack::demux::model::Model;
use subnetstack::demux::{BindPolicy, Binding, Demux, HashKey, ListenerId, PortSpec, Protocol};
use subnetstack_testkit::{live_heap_bytes, CountingAlloc};

/// Counts live heap bytes, for the bytes-per-prefix figures.
#[global_allocator]
static A: CountingAlloc = CountingAlloc;

fn live() -> isize {
    live_heap_bytes()
}

const PORT: u16 = 80;
const QUERIES: usize = 1 << 16;

fn sizes() -> Vec<usize> {
    let max: usize = std::env::var("DEMUX_BENCH_MAX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    [1_000, 10_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|&n| n <= max)
        .collect()
}

/// IPv4 prefixes with lengths /16 to /32 uniform, distinct.
fn v4_prefixes(n: usize, rng: &mut StdRng) -> Vec<IpNet> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    while seen.len() < n {
        let len = rng.random_range(16..=32u8);
        let net = Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len)
            .unwrap()
            .trunc();
        seen.insert(IpNet::V4(net));
    }
    let mut v: Vec<_> = seen.into_iter().collect();
    v.sort();
    v
}

/// IPv6 prefixes clustered under 16 /32 sites: /40 to /64 uniform, plus 2% /128.
fn v6_prefixes(n: usize, rng: &mut StdRng) -> Vec<IpNet> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    while seen.len() < n {
        let site = (0x2001_0db8u128 + rng.random_range(0..16u128)) << 96;
        let len = if rng.random_range(0..100) < 2 {
            128
        } else {
            rng.random_range(40..=64u8)
        };
        let a = site | (rng.random::<u128>() >> 32);
        let net = Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc();
        seen.insert(IpNet::V6(net));
    }
    let mut v: Vec<_> = seen.into_iter().collect();
    v.sort();
    v
}

/// A random address inside `net`.
fn inside(net: IpNet, rng: &mut StdRng) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = if n.prefix_len() == 32 {
                0
            } else {
                rng.random::<u32>() >> n.prefix_len()
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let host = if n.prefix_len() == 128 {
                0
            } else {
                rng.random::<u128>() >> n.prefix_len()
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

/// 90% hits (inside a random bound prefix), 10% misses, random order.
fn queries(
    nets: &[IpNet],
    pt4: &PrefixMap<Ipv4Net, u32>,
    pt6: &PrefixMap<Ipv6Net, u32>,
    rng: &mut StdRng,
) -> Vec<IpAddr> {
    let v6 = nets[0].addr().is_ipv6();
    let mut q = Vec::with_capacity(QUERIES);
    while q.len() < QUERIES {
        if rng.random_range(0..10) != 0 {
            q.push(inside(nets[rng.random_range(0..nets.len())], rng));
            continue;
        }
        // Misses near the bound space, so they walk the structure too (retry until one misses).
        let a = inside(nets[rng.random_range(0..nets.len())], rng);
        let mut miss = None;
        for shift in [8u32, 4, 0, 0, 0, 0, 0, 0] {
            if miss.is_some() {
                break;
            }
            miss = match a {
                IpAddr::V4(a) => {
                    let a = Ipv4Addr::from(u32::from(a) ^ rng.random::<u32>() >> shift);
                    pt4.get_lpm(&Ipv4Net::new(a, 32).unwrap())
                        .is_none()
                        .then_some(IpAddr::V4(a))
                }
                IpAddr::V6(a) => {
                    let a = Ipv6Addr::from(u128::from(a) ^ rng.random::<u128>() >> (5 * shift));
                    pt6.get_lpm(&Ipv6Net::new(a, 128).unwrap())
                        .is_none()
                        .then_some(IpAddr::V6(a))
                }
            };
        }
        if let Some(m) = miss {
            q.push(m);
        } else {
            // Nothing near misses: a random address from the whole space, tried until it misses.
            loop {
                let a = rng.random::<u128>();
                let hit = if v6 {
                    pt6.get_lpm(&Ipv6Net::new(Ipv6Addr::from(a), 128).unwrap())
                        .is_some()
                } else {
                    pt4.get_lpm(&Ipv4Net::new(Ipv4Addr::from(a as u32), 32).unwrap())
                        .is_some()
                };
                if !hit {
                    q.push(if v6 {
                        IpAddr::V6(Ipv6Addr::from(a))
                    } else {
                        IpAddr::V4(Ipv4Addr::from(a as u32))
                    });
                    break;
                }
            }
        }
    }
    assert_eq!(q[0].is_ipv6(), v6);
    q
}

fn bindings(nets: &[IpNet]) -> impl Iterator<Item = Binding> + '_ {
    nets.iter().enumerate().map(|(i, &n)| {
        Binding::new(
            Protocol::Tcp,
            n,
            PortSpec::Exact(PORT),
            ListenerId(i as u64),
        )
    })
}

fn lookup_family(c: &mut Criterion, fam: &str, gen: fn(usize, &mut StdRng) -> Vec<IpNet>) {
    for n in sizes() {
        let mut rng = StdRng::seed_from_u64(n as u64 ^ 0x5eed);
        let nets = gen(n, &mut rng);

        let before = live();
        let mut pt4 = PrefixMap::<Ipv4Net, u32>::new();
        let mut pt6 = PrefixMap::<Ipv6Net, u32>::new();
        for (i, n) in nets.iter().enumerate() {
            match n {
                IpNet::V4(x) => pt4.insert(*x, i as u32),
                IpNet::V6(x) => pt6.insert(*x, i as u32),
            };
        }
        let pt_bytes = live() - before;

        let before = live();
        let mut table = Demux::with_key(BindPolicy::Nested, HashKey([9; 16]));
        let t0 = Instant::now();
        table.replace_all(bindings(&nets)).unwrap();
        let build = t0.elapsed();
        let whole = live() - before;
        let (lpm, groups) = table.data_path_bytes();
        println!(
            "memory {fam} N={n}: LPM tries {:.1} B/prefix + group/member records {:.1} B/prefix (one copy, {} KiB); whole table incl. control plane and both copies {:.1} B/prefix; prefix_trie {:.1} B/prefix; built in {build:.2?}",
            lpm as f64 / n as f64,
            groups as f64 / n as f64,
            (lpm + groups) / 1024,
            whole as f64 / n as f64,
            pt_bytes as f64 / n as f64
        );

        let q = queries(&nets, &pt4, &pt6, &mut rng);
        let hits = q
            .iter()
            .filter(|a| table.snapshot().group(Protocol::Tcp, **a, PORT).is_some())
            .count();
        println!(
            "queries {fam} N={n}: {:.1}% hit",
            100.0 * hits as f64 / q.len() as f64
        );

        let mut g = c.benchmark_group(format!("demux_lookup/{fam}/{n}"));
        g.throughput(Throughput::Elements(q.len() as u64));
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));

        let snap = table.snapshot();
        g.bench_function("subnetstack", |b| {
            b.iter(|| {
                let mut found = 0usize;
                for &a in &q {
                    found += snap.group(Protocol::Tcp, a, PORT).is_some() as usize;
                }
                black_box(found)
            })
        });

        match fam {
            "v4" => {
                let qs: Vec<(Ipv4Addr, u16)> = q
                    .iter()
                    .map(|a| match a {
                        IpAddr::V4(a) => (*a, PORT),
                        IpAddr::V6(_) => unreachable!(),
                    })
                    .collect();
                let mut out = vec![None; qs.len()];
                g.bench_function("subnetstack_batch", |b| {
                    b.iter(|| {
                        snap.group_batch_v4(Protocol::Tcp, &qs, &mut out);
                        black_box(out.iter().filter(|g| g.is_some()).count())
                    })
                });
                let keys: Vec<Ipv4Net> = qs
                    .iter()
                    .map(|(a, _)| Ipv4Net::new(*a, 32).unwrap())
                    .collect();
                g.bench_function("prefix_trie", |b| {
                    b.iter(|| {
                        let mut found = 0usize;
                        for k in &keys {
                            found += pt4.get_lpm(k).is_some() as usize;
                        }
                        black_box(found)
                    })
                });
            }
            _ => {
                let qs: Vec<(Ipv6Addr, u16)> = q
                    .iter()
                    .map(|a| match a {
                        IpAddr::V6(a) => (*a, PORT),
                        IpAddr::V4(_) => unreachable!(),
                    })
                    .collect();
                let mut out = vec![None; qs.len()];
                g.bench_function("subnetstack_batch", |b| {
                    b.iter(|| {
                        snap.group_batch_v6(Protocol::Tcp, &qs, &mut out);
                        black_box(out.iter().filter(|g| g.is_some()).count())
                    })
                });
                let keys: Vec<Ipv6Net> = qs
                    .iter()
                    .map(|(a, _)| Ipv6Net::new(*a, 128).unwrap())
                    .collect();
                g.bench_function("prefix_trie", |b| {
                    b.iter(|| {
                        let mut found = 0usize;
                        for k in &keys {
                            found += pt6.get_lpm(k).is_some() as usize;
                        }
                        black_box(found)
                    })
                });
            }
        }

        if n <= 10_000 {
            let mut model = Model::new(BindPolicy::Nested);
            for b in bindings(&nets) {
                model.bind(b).unwrap();
            }
            // The scan is slow: measure it on a slice of the queries.
            let few = &q[..1024];
            g.throughput(Throughput::Elements(few.len() as u64));
            g.bench_function("linear", |b| {
                b.iter(|| {
                    let mut found = 0usize;
                    for &a in few {
                        found += !model.lookup(Protocol::Tcp, a, PORT).is_empty() as usize;
                    }
                    black_box(found)
                })
            });
        }
        drop(snap);
        g.finish();
    }
}

fn demux_lookup(c: &mut Criterion) {
    lookup_family(c, "v4", v4_prefixes);
    lookup_family(c, "v6", v6_prefixes);
}

fn demux_update(c: &mut Criterion) {
    let n = *sizes().last().unwrap();
    let mut rng = StdRng::seed_from_u64(0xb1d);
    let nets = v4_prefixes(n, &mut rng);
    let mut table = Demux::with_key(BindPolicy::Nested, HashKey([9; 16]));
    table.replace_all(bindings(&nets)).unwrap();
    // Keep a reader registered, as a shard would be.
    let reader = table.reader();
    let bound: std::collections::HashSet<IpNet> = nets.iter().copied().collect();
    let mut fresh = move || loop {
        let len = rng.random_range(16..=32u8);
        let net = IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len)
                .unwrap()
                .trunc(),
        );
        if !bound.contains(&net) {
            return Binding::new(
                Protocol::Tcp,
                net,
                PortSpec::Exact(PORT),
                ListenerId(u64::MAX),
            );
        }
    };
    let mut g = c.benchmark_group(format!("demux_update/v4/{n}"));
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::from_parameter("bind"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let nb = fresh();
                let t0 = Instant::now();
                let id = table.bind(nb).unwrap();
                spent += t0.elapsed();
                table.unbind(id).unwrap();
            }
            spent
        })
    });
    g.bench_function(BenchmarkId::from_parameter("unbind"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let id = table.bind(fresh()).unwrap();
                let t0 = Instant::now();
                table.unbind(id).unwrap();
                spent += t0.elapsed();
            }
            spent
        })
    });
    g.finish();
    drop(reader);
}

criterion_group!(benches, demux_lookup, demux_update);
criterion_main!(benches);
