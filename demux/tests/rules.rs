//! One named test per precedence, conflict and validation rule, IPv4 and IPv6.

use std::net::IpAddr;

use subnetstack_demux::*;

fn key() -> HashKey {
    HashKey([7; 16])
}

fn b(proto: Protocol, net: &str, ports: PortSpec, l: u64) -> Binding {
    Binding::new(proto, net.parse().unwrap(), ports, ListenerId(l))
}

fn tcp(net: &str, ports: PortSpec, l: u64) -> Binding {
    b(Protocol::Tcp, net, ports, l)
}

fn p(port: u16) -> PortSpec {
    PortSpec::exact(port).unwrap()
}

fn r(lo: u16, hi: u16) -> PortSpec {
    PortSpec::range(lo, hi).unwrap()
}

fn flow(dst: &str, port: u16) -> Flow {
    let dst: IpAddr = dst.parse().unwrap();
    let src: IpAddr = if dst.is_ipv4() {
        "198.19.255.1".parse().unwrap()
    } else {
        "2001:db8:ffff::1".parse().unwrap()
    };
    Flow::new(src, 40000, dst, port).unwrap()
}

fn who(t: &Demux, proto: Protocol, dst: &str, port: u16) -> Option<u64> {
    t.snapshot()
        .lookup(proto, &flow(dst, port))
        .map(|h| h.listener.0)
}

fn nested() -> Demux {
    Demux::with_key(BindPolicy::Nested, key())
}

fn exclusive() -> Demux {
    Demux::with_key(BindPolicy::Exclusive, key())
}

fn conflict_kind(r: Result<BindingId, BindError>) -> ConflictKind {
    match r {
        Err(BindError::Conflict { kind, .. }) => kind,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn longest_prefix_wins_v4() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/15", p(80), 1)).unwrap();
    t.bind(tcp("198.18.5.0/24", p(80), 2)).unwrap();
    t.bind(tcp("198.18.5.128/25", p(80), 3)).unwrap();
    t.bind(tcp("198.18.5.200/32", p(80), 4)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.19.1.1", 80), Some(1));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.1", 80), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.129", 80), Some(3));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.200", 80), Some(4));
    assert_eq!(who(&t, Protocol::Tcp, "198.20.0.1", 80), None);
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.1", 81), None);
}

#[test]
fn longest_prefix_wins_v6() {
    let mut t = nested();
    t.bind(tcp("2001:db8::/32", p(443), 1)).unwrap();
    t.bind(tcp("2001:db8:100::/48", p(443), 2)).unwrap();
    t.bind(tcp("2001:db8:100:7::/64", p(443), 3)).unwrap();
    t.bind(tcp("2001:db8:100:7::9/128", p(443), 4)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:5::1", 443), Some(1));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100:1::1", 443), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100:7::1", 443), Some(3));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100:7::9", 443), Some(4));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db9::1", 443), None);
}

#[test]
fn longer_prefix_beats_narrower_ports() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/16", p(80), 1)).unwrap();
    t.bind(tcp("198.18.7.0/24", PortSpec::Any, 2)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.7.7", 80), Some(2));
    t.bind(tcp("2001:db8::/32", p(80), 3)).unwrap();
    t.bind(tcp("2001:db8:1::/48", r(1, 1000), 4)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:1::7", 80), Some(4));
}

#[test]
fn exact_beats_range_beats_any_on_equal_prefix_v4() {
    let mut t = nested();
    t.bind(tcp("198.18.1.0/24", PortSpec::Any, 1)).unwrap();
    t.bind(tcp("198.18.1.0/24", r(8000, 8999), 2)).unwrap();
    t.bind(tcp("198.18.1.0/24", p(8080), 3)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.9", 8080), Some(3));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.9", 8081), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.9", 22), Some(1));
}

#[test]
fn exact_beats_range_beats_any_on_equal_prefix_v6() {
    let mut t = nested();
    t.bind(tcp("2001:db8:100::/48", PortSpec::Any, 1)).unwrap();
    t.bind(tcp("2001:db8:100::/48", r(8000, 8999), 2)).unwrap();
    t.bind(tcp("2001:db8:100::/48", p(8080), 3)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100::9", 8080), Some(3));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100::9", 8081), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8:100::9", 22), Some(1));
}

#[test]
fn narrower_range_beats_wider() {
    let mut t = nested();
    t.bind(tcp("198.18.1.0/24", r(8000, 8999), 1)).unwrap();
    t.bind(tcp("198.18.1.0/24", r(8050, 8150), 2)).unwrap();
    t.bind(tcp("198.18.1.0/24", r(8100, 9500), 3)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.1", 8060), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.1", 8140), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.1", 8200), Some(1));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.1", 9100), Some(3));
    t.bind(tcp("2001:db8::/32", r(1, 65535), 4)).unwrap();
    t.bind(tcp("2001:db8::/32", PortSpec::Any, 5)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8::1", 7), Some(4));
}

#[test]
fn protocols_are_independent() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/24", p(53), 1)).unwrap();
    t.bind(b(Protocol::Udp, "198.18.0.0/24", p(53), 2)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.0.1", 53), Some(1));
    assert_eq!(who(&t, Protocol::Udp, "198.18.0.1", 53), Some(2));
}

#[test]
fn zero_length_prefix_is_wildcard_and_full_length_is_an_address() {
    let mut t = nested();
    t.bind(tcp("0.0.0.0/0", p(80), 1)).unwrap();
    t.bind(tcp("198.18.0.1/32", p(80), 2)).unwrap();
    t.bind(tcp("::/0", p(80), 3)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.0.2", 80), Some(1));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.0.1", 80), Some(2));
    assert_eq!(who(&t, Protocol::Tcp, "2001:db8::1", 80), Some(3));
}

#[test]
fn port_zero_never_matches() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/15", PortSpec::Any, 1)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.0.1", 0), None);
    assert_eq!(who(&t, Protocol::Tcp, "198.18.0.1", 1), Some(1));
}

#[test]
fn unbind_restores_the_covering_binding() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/15", p(80), 1)).unwrap();
    let mid = t.bind(tcp("198.18.4.0/22", p(80), 2)).unwrap();
    t.bind(tcp("198.18.5.0/24", p(80), 3)).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.6.1", 80), Some(2));
    t.unbind(mid).unwrap();
    assert_eq!(who(&t, Protocol::Tcp, "198.18.6.1", 80), Some(1));
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.1", 80), Some(3));
    assert_eq!(t.unbind(mid), Err(BindError::UnknownBinding(mid)));
    assert_eq!(
        t.unbind(BindingId(999)),
        Err(BindError::UnknownBinding(BindingId(999)))
    );
}

// ---- conflicts, default (nested) policy --------------------------------------------------

#[test]
fn same_prefix_same_ports_conflicts_without_reuseport() {
    for net in ["198.18.1.0/24", "2001:db8:1::/48"] {
        let mut t = nested();
        let first = t.bind(tcp(net, p(80), 1)).unwrap();
        match t.bind(tcp(net, p(80), 2)) {
            Err(BindError::Conflict { existing, kind, .. }) => {
                assert_eq!(existing, first);
                assert_eq!(kind, ConflictKind::NotReuseport);
            }
            other => panic!("{other:?}"),
        }
        // One side opting in is not enough.
        assert_eq!(
            conflict_kind(t.bind(tcp(net, p(80), 2).reuseport())),
            ConflictKind::NotReuseport
        );
    }
}

#[test]
fn same_prefix_same_ports_all_reuseport_share() {
    for net in ["198.18.1.0/24", "2001:db8:1::/48"] {
        let mut t = nested();
        t.bind(tcp(net, r(80, 90), 1).reuseport()).unwrap();
        t.bind(tcp(net, r(80, 90), 2).reuseport()).unwrap();
        assert_eq!(
            conflict_kind(t.bind(tcp(net, r(80, 90), 3))),
            ConflictKind::NotReuseport
        );
        assert_eq!(
            conflict_kind(t.bind(tcp(net, r(80, 90), 2).reuseport())),
            ConflictKind::DuplicateListener
        );
        let dst = if net.contains(':') {
            "2001:db8:1::5"
        } else {
            "198.18.1.5"
        };
        assert_eq!(
            t.snapshot()
                .lookup(Protocol::Tcp, &flow(dst, 85))
                .unwrap()
                .members,
            2
        );
    }
}

#[test]
fn same_prefix_equal_width_overlapping_ranges_conflict() {
    for net in ["198.18.1.0/24", "2001:db8:1::/48"] {
        let mut t = nested();
        t.bind(tcp(net, r(80, 89), 1).reuseport()).unwrap();
        assert_eq!(
            conflict_kind(t.bind(tcp(net, r(85, 94), 2).reuseport())),
            ConflictKind::AmbiguousPorts
        );
        // Disjoint ranges of equal width coexist.
        t.bind(tcp(net, r(90, 99), 3)).unwrap();
    }
}

#[test]
fn same_prefix_different_width_selectors_coexist() {
    let mut t = nested();
    t.bind(tcp("198.18.1.0/24", p(80), 1)).unwrap();
    t.bind(tcp("198.18.1.0/24", r(1, 1023), 2)).unwrap();
    t.bind(tcp("198.18.1.0/24", r(70, 90), 3)).unwrap();
    t.bind(tcp("198.18.1.0/24", PortSpec::Any, 4)).unwrap();
}

#[test]
fn nested_prefixes_coexist_by_default() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/15", p(80), 1)).unwrap();
    t.bind(tcp("198.18.1.0/24", p(80), 2)).unwrap();
    t.bind(tcp("2001:db8::/32", p(80), 3)).unwrap();
    t.bind(tcp("2001:db8:1::/48", p(80), 4)).unwrap();
}

// ---- conflicts, exclusive (RFC) policy ---------------------------------------------------

#[test]
fn exclusive_nested_prefixes_with_overlapping_ports_conflict() {
    for (outer, inner) in [
        ("198.18.0.0/15", "198.18.1.0/24"),
        ("2001:db8::/32", "2001:db8:1::/48"),
    ] {
        let mut t = exclusive();
        let o = t.bind(tcp(outer, r(80, 90), 1)).unwrap();
        match t.bind(tcp(inner, p(85), 2)) {
            Err(BindError::Conflict { existing, kind, .. }) => {
                assert_eq!(existing, o);
                assert_eq!(kind, ConflictKind::ExclusiveOverlap);
            }
            other => panic!("{other:?}"),
        }
        // Either order.
        let mut t = exclusive();
        t.bind(tcp(inner, p(85), 2)).unwrap();
        assert_eq!(
            conflict_kind(t.bind(tcp(outer, PortSpec::Any, 1))),
            ConflictKind::ExclusiveOverlap
        );
        // Disjoint ports do not conflict.
        t.bind(tcp(outer, p(443), 3)).unwrap();
    }
}

#[test]
fn exclusive_same_prefix_different_selectors_conflict() {
    let mut t = exclusive();
    t.bind(tcp("198.18.1.0/24", p(80), 1)).unwrap();
    assert_eq!(
        conflict_kind(t.bind(tcp("198.18.1.0/24", PortSpec::Any, 2))),
        ConflictKind::ExclusiveOverlap
    );
}

#[test]
fn exclusive_same_prefix_reuseport_allowed() {
    for net in ["198.18.1.0/24", "2001:db8:1::/48"] {
        let mut t = exclusive();
        t.bind(tcp(net, p(80), 1).reuseport()).unwrap();
        t.bind(tcp(net, p(80), 2).reuseport()).unwrap();
        assert_eq!(
            conflict_kind(t.bind(tcp(net, p(80), 3))),
            ConflictKind::NotReuseport
        );
    }
}

#[test]
fn exclusive_disjoint_prefixes_coexist() {
    let mut t = exclusive();
    t.bind(tcp("198.18.1.0/24", p(80), 1)).unwrap();
    t.bind(tcp("198.18.2.0/24", p(80), 2)).unwrap();
    t.bind(tcp("2001:db8:1::/48", p(80), 3)).unwrap();
    t.bind(tcp("2001:db8:2::/48", p(80), 4)).unwrap();
}

// ---- validation ---------------------------------------------------------------------------

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/24", p(80), 1)).unwrap();
    assert!(matches!(
        t.bind(tcp("198.18.0.1/24", p(80), 2)),
        Err(BindError::HostBitsSet(_))
    ));
    assert!(matches!(
        t.bind(tcp("2001:db8::1/64", p(80), 2)),
        Err(BindError::HostBitsSet(_))
    ));
    assert_eq!(PortSpec::exact(0), Err(BindError::PortZero));
    assert_eq!(PortSpec::range(0, 10), Err(BindError::PortZero));
    assert_eq!(
        PortSpec::range(90, 80),
        Err(BindError::InvertedRange { lo: 90, hi: 80 })
    );
    assert_eq!(PortSpec::range(80, 80), Ok(PortSpec::Exact(80)));
    // Hand-built selectors are validated by bind too.
    assert_eq!(
        t.bind(tcp("198.18.1.0/24", PortSpec::Exact(0), 2)),
        Err(BindError::PortZero)
    );
    assert_eq!(
        t.bind(tcp("198.18.1.0/24", PortSpec::Range { lo: 9, hi: 3 }, 2)),
        Err(BindError::InvertedRange { lo: 9, hi: 3 })
    );
    assert_eq!(
        prefix("198.18.0.0".parse().unwrap(), 33),
        Err(BindError::PrefixLenOutOfRange { len: 33, max: 32 })
    );
    assert_eq!(
        prefix("2001:db8::".parse().unwrap(), 129),
        Err(BindError::PrefixLenOutOfRange { len: 129, max: 128 })
    );
    assert!(matches!(
        prefix("198.18.0.1".parse().unwrap(), 24),
        Err(BindError::HostBitsSet(_))
    ));
    let mixed = Flow::new(
        "198.18.0.1".parse().unwrap(),
        1,
        "2001:db8::1".parse().unwrap(),
        2,
    );
    assert!(mixed.is_err());
    assert_eq!(t.len(), 1);
    assert_eq!(who(&t, Protocol::Tcp, "198.18.1.1", 80), None);
}

#[test]
fn replace_all_is_atomic_and_keeps_member_choice() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/16", p(80), 1).reuseport()).unwrap();
    t.bind(tcp("198.18.0.0/16", p(80), 2).reuseport()).unwrap();
    t.bind(tcp("198.18.0.0/16", p(80), 3).reuseport()).unwrap();
    let flows: Vec<Flow> = (0..200u16)
        .map(|i| {
            Flow::new(
                "198.19.255.1".parse().unwrap(),
                1000 + i,
                "198.18.3.3".parse().unwrap(),
                80,
            )
            .unwrap()
        })
        .collect();
    let before: Vec<_> = flows
        .iter()
        .map(|f| t.snapshot().lookup(Protocol::Tcp, f).unwrap().listener)
        .collect();
    // A failing replacement changes nothing.
    let bad = vec![
        tcp("198.18.9.0/24", p(80), 9),
        tcp("198.18.9.0/24", p(80), 10),
    ];
    assert!(matches!(
        t.replace_all(bad),
        Err((1, BindError::Conflict { .. }))
    ));
    assert_eq!(t.len(), 3);
    // Same listeners in a new table (other order, plus an unrelated binding).
    let ids = t
        .replace_all(vec![
            tcp("198.18.0.0/16", p(80), 3).reuseport(),
            tcp("198.18.0.0/16", p(80), 1).reuseport(),
            tcp("198.18.0.0/16", p(80), 2).reuseport(),
            tcp("198.18.5.0/24", p(443), 7),
        ])
        .unwrap();
    assert_eq!(ids.len(), 4);
    let after: Vec<_> = flows
        .iter()
        .map(|f| t.snapshot().lookup(Protocol::Tcp, f).unwrap().listener)
        .collect();
    assert_eq!(before, after);
    assert_eq!(who(&t, Protocol::Tcp, "198.18.5.5", 443), Some(7));
}

#[test]
fn explain_names_the_rule() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/16", PortSpec::Any, 1)).unwrap();
    let id = t.bind(tcp("198.18.5.0/24", r(80, 90), 2)).unwrap();
    let e = t.snapshot().explain(Protocol::Tcp, &flow("198.18.5.9", 85));
    assert_eq!(e.candidates.len(), 2);
    assert_eq!(
        e.candidates[0].matched,
        Some("198.18.5.0/24".parse().unwrap())
    );
    assert_eq!(
        e.candidates[1].matched,
        Some("198.18.0.0/16".parse().unwrap())
    );
    assert_eq!(e.chosen.unwrap().binding, id);
    let text = e.to_string();
    assert!(text.contains("198.18.5.0/24"), "{text}");
    assert!(text.contains("binding#2"), "{text}");
    let e = t.snapshot().explain(Protocol::Tcp, &flow("198.20.0.1", 85));
    assert!(e.chosen.is_none());
    assert!(e.to_string().contains("unbound"));
}

#[test]
fn batch_lookup_agrees_with_scalar() {
    let mut t = nested();
    t.bind(tcp("198.18.0.0/15", p(80), 1)).unwrap();
    t.bind(tcp("198.18.1.0/24", p(80), 2)).unwrap();
    t.bind(tcp("198.18.1.128/25", r(80, 81), 3)).unwrap();
    t.bind(tcp("198.18.1.0/26", PortSpec::Any, 4)).unwrap();
    let snap = t.snapshot();
    let q: Vec<(std::net::Ipv4Addr, u16)> = (0..1000u32)
        .map(|i| {
            (
                std::net::Ipv4Addr::from(0xC612_0000 + i.wrapping_mul(2654435761u32) % 0x0002_0400),
                [80, 81, 0, 22][i as usize % 4],
            )
        })
        .collect();
    let mut out = vec![None; q.len()];
    snap.group_batch_v4(Protocol::Tcp, &q, &mut out);
    for (i, &(a, port)) in q.iter().enumerate() {
        let scalar = snap
            .group(Protocol::Tcp, a.into(), port)
            .map(|g| g.prefix());
        assert_eq!(out[i].map(|g| g.prefix()), scalar, "{a}:{port}");
    }
}

#[test]
fn readers_on_other_threads_see_published_updates() {
    let mut t = nested();
    let reader = t.reader();
    let h = std::thread::spawn(move || {
        // Spin until the binding shows up, then until it is gone.
        let f = flow("198.18.0.1", 80);
        let start = std::time::Instant::now();
        while reader.enter().unwrap().lookup(Protocol::Tcp, &f).is_none() {
            assert!(start.elapsed().as_secs() < 10);
        }
        while reader
            .enter()
            .is_some_and(|s| s.lookup(Protocol::Tcp, &f).is_some())
        {
            assert!(start.elapsed().as_secs() < 10);
        }
    });
    let id = t.bind(tcp("198.18.0.0/24", p(80), 1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    t.unbind(id).unwrap();
    h.join().unwrap();
}
