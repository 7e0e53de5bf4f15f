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

/// Crosses the direct-pointing resize thresholds (up at 1024 and 16384 prefixes, down at a quarter) both ways and
/// checks lookups against the model on the way.
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
