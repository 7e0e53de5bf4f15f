//! Property test: random bind/unbind/lookup sequences against the literal reference model.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use subnetstack_demux::model::{Differential, Model};
use subnetstack_demux::*;

#[derive(Clone, Debug)]
enum Op {
    Bind(Binding),
    Unbind(usize),
    UnbindUnknown(u64),
    Lookup(Protocol, IpAddr, u16),
}

/// Addresses from a small space, so that prefixes nest and collide often.
fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..0x400).prop_map(|x| IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (x << 6) | (x % 7)))),
        (0u16..4, 0u16..3, 0u16..6).prop_map(|(a, b, c)| IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            a << 8,
            b,
            0,
            0,
            0,
            c
        ))),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    (addr(), 0u8..=100).prop_map(|(a, pick)| {
        let len = match a {
            IpAddr::V4(_) => {
                [0, 14, 15, 16, 20, 22, 23, 24, 25, 26, 28, 30, 31, 32][pick as usize % 14]
            }
            IpAddr::V6(_) => {
                [0, 16, 32, 40, 48, 55, 56, 64, 100, 125, 126, 127, 128][pick as usize % 13]
            }
        };
        IpNet::new(a, len).unwrap().trunc()
    })
}

fn ports() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        Just(PortSpec::Exact(80)),
        Just(PortSpec::Exact(81)),
        Just(PortSpec::Range { lo: 80, hi: 81 }),
        Just(PortSpec::Range { lo: 80, hi: 90 }),
        Just(PortSpec::Range { lo: 85, hi: 95 }),
        Just(PortSpec::Range { lo: 1, hi: 1023 }),
        Just(PortSpec::Any),
    ]
}

fn proto() -> impl Strategy<Value = Protocol> {
    prop_oneof![4 => Just(Protocol::Tcp), 1 => Just(Protocol::Udp)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (proto(), net(), ports(), any::<bool>(), 0u64..4).prop_map(|(p, n, ports, reuse, l)| {
            let mut b = Binding::new(p, n, ports, ListenerId(l));
            b.reuseport = reuse;
            Op::Bind(b)
        }),
        2 => any::<usize>().prop_map(Op::Unbind),
        1 => (1000u64..1010).prop_map(Op::UnbindUnknown),
        6 => (proto(), addr(), prop_oneof![Just(80u16), Just(81), Just(85), Just(90), Just(443), Just(0)])
            .prop_map(|(p, a, port)| Op::Lookup(p, a, port)),
    ]
}

fn run(policy: BindPolicy, ops: Vec<Op>) {
    let mut d = Differential::new(policy);
    for op in ops {
        match op {
            Op::Bind(b) => d.bind(b),
            Op::Unbind(i) => d.unbind_nth(i),
            Op::UnbindUnknown(id) => d.unbind_id(BindingId(id)),
            Op::Lookup(p, a, port) => d.lookup(p, a, port),
        }
    }
    // Final sweep over the whole address space used.
    for x in 0u32..0x400 {
        for port in [80, 85] {
            d.lookup(
                Protocol::Tcp,
                IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (x << 6) | (x % 7))),
                port,
            );
        }
    }
    d.check_len();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nested_policy_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
        run(BindPolicy::Nested, ops);
    }

    #[test]
    fn exclusive_policy_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
        run(BindPolicy::Exclusive, ops);
    }
}

/// Crosses the direct-pointing resize thresholds (IPv4: up at 512 and 8192 prefixes, down at a
/// quarter) both ways and checks lookups against the model on the way.
#[test]
fn resize_thresholds_keep_lookups_right() {
    let mut t = Demux::with_key(BindPolicy::Nested, HashKey([1; 16]));
    let mut m = Model::new(BindPolicy::Nested);
    let mut ids = Vec::new();
    let mut x = 0x9e37_79b9u32;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut nets = std::collections::HashSet::new();
    while ids.len() < 17000 {
        let len = 16 + (next() % 17) as u8;
        let n = IpNet::new(
            IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (next() & 0x00ff_ffff))),
            len,
        )
        .unwrap()
        .trunc();
        if !nets.insert(n) {
            continue;
        }
        let b = Binding::new(
            Protocol::Tcp,
            n,
            PortSpec::Exact(80),
            ListenerId(ids.len() as u64),
        );
        assert_eq!(t.bind(b), m.bind(b));
        ids.push(t.len());
    }
    let probe = |t: &Demux, m: &Model, seed: u32| {
        for i in 0..500u32 {
            let a = Ipv4Addr::from(
                0xC612_0000 | (i.wrapping_mul(2654435761).wrapping_add(seed) & 0x00ff_ffff),
            );
            let want = m
                .lookup(Protocol::Tcp, a.into(), 80)
                .first()
                .map(|(id, _)| *id);
            let got = t
                .snapshot()
                .group(Protocol::Tcp, a.into(), 80)
                .map(|g| g.members()[0].binding);
            assert_eq!(got, want, "{a}");
        }
    };
    probe(&t, &m, 1);
    let all: Vec<BindingId> = m.bindings().iter().map(|(id, _)| *id).collect();
    for (i, id) in all.iter().enumerate() {
        assert_eq!(t.unbind(*id), m.unbind(*id));
        if i % 2500 == 0 || i == 16000 || i == 16900 {
            probe(&t, &m, i as u32);
        }
    }
    assert!(t.is_empty());
    assert_eq!(
        t.snapshot()
            .group(Protocol::Tcp, "198.18.0.1".parse().unwrap(), 80)
            .map(|g| g.prefix()),
        None
    );
}

/// Clustered IPv6 tables grown one bind at a time: at 1024 prefixes the trie is rebuilt with
/// an anchor (path compression over the bits the cluster shares); binds and unbinds after that
/// go inside it, outside it, and cover it, with several port selectors; every step is checked
/// against the model.
#[test]
fn clustered_ipv6_anchor_keeps_lookups_right() {
    let mut d = Differential::new(BindPolicy::Nested);
    let mut x = 0x51_7cc1_b727_220au64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let site = |i: u64| (0x2001_0db8u128 + u128::from(i % 4)) << 96;
    let mut probe_addrs: Vec<u128> = Vec::new();
    let net = |next: &mut dyn FnMut() -> u64, i: usize| -> IpNet {
        let r = u128::from(next()) << 64 | u128::from(next());
        let (a, len) = match i % 50 {
            // Outside the cluster.
            0 => (r, 16 + (next() % 49) as u8),
            // Covering it (shorter than the anchor).
            1 => (site(0), [0u8, 8, 16, 28, 29, 30][(next() % 6) as usize]),
            2 => (site(next()) | (r >> 32), 128),
            _ => (
                site(next()) | (r >> 32) & !(u128::MAX >> 72),
                33 + (next() % 40) as u8,
            ),
        };
        IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), len)
            .unwrap()
            .trunc()
    };
    let ports = [
        PortSpec::Exact(80),
        PortSpec::Exact(80),
        PortSpec::Exact(80),
        PortSpec::Any,
    ];
    for i in 0..2600 {
        let n = net(&mut next, i);
        if let IpNet::V6(v) = n {
            probe_addrs.push(u128::from(v.network()));
        }
        let mut b = Binding::new(Protocol::Tcp, n, ports[i % 4], ListenerId(i as u64 % 5));
        b.reuseport = i % 7 == 0;
        d.bind(b);
        if i % 9 == 0 {
            d.unbind_nth(next() as usize);
        }
        if i % 5 == 0 || i > 1000 && i < 1100 {
            let a = probe_addrs[next() as usize % probe_addrs.len()] | u128::from(next() as u16);
            d.lookup(Protocol::Tcp, IpAddr::V6(Ipv6Addr::from(a)), 80);
        }
    }
    for a in probe_addrs.iter().step_by(3) {
        for port in [80, 81] {
            d.lookup(Protocol::Tcp, IpAddr::V6(Ipv6Addr::from(*a)), port);
            d.lookup(
                Protocol::Tcp,
                IpAddr::V6(Ipv6Addr::from(a.wrapping_sub(1))),
                port,
            );
        }
    }
    for _ in 0..2000 {
        d.unbind_nth(next() as usize);
    }
    for a in probe_addrs.iter().step_by(3) {
        d.lookup(Protocol::Tcp, IpAddr::V6(Ipv6Addr::from(*a)), 80);
    }
    d.check_len();
}

/// The fuzz target's decoder on random bytes and on the checked-in seed corpus.
#[test]
fn fuzz_body_on_random_bytes_and_seeds() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        let data: Vec<u8> = (0..600)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Differential::run_bytes(&data);
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/demux_ops");
    let mut seeds = 0;
    for e in std::fs::read_dir(dir).expect("seed corpus is checked in") {
        Differential::run_bytes(&std::fs::read(e.unwrap().path()).unwrap());
        seeds += 1;
    }
    assert!(seeds > 0);
}
