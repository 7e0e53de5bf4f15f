//! Statistical properties of reuseport member selection (rendezvous hashing over a keyed flow hash).

use std::net::Ipv4Addr;

use subnetstack_demux::*;

const FLOWS: u32 = 100_000;

fn flows() -> impl Iterator<Item = Flow> {
    (0..FLOWS).map(|i| Flow::V4 {
        src: Ipv4Addr::from(0xC613_8000 | (i >> 4)),
        sport: 1024 + (i & 0xf) as u16 * 3000,
        dst: Ipv4Addr::from(0xC612_0000 | (i.wrapping_mul(2654435761) & 0xffff)),
        dport: 80,
    })
}

/// A reuseport member on 198.18.0.0/16:80.
fn member(l: u64) -> Binding {
    let net = "198.18.0.0/16".parse().unwrap();
    Binding::new(Protocol::Tcp, net, PortSpec::Exact(80), ListenerId(l)).reuseport()
}

fn table_with_key(key: HashKey, members: &[u64]) -> (Demux, Vec<BindingId>) {
    let mut t = Demux::with_key(BindPolicy::Nested, key);
    let ids = members
        .iter()
        .map(|&l| t.bind(member(l)).unwrap())
        .collect();
    (t, ids)
}

fn table(members: &[u64]) -> (Demux, Vec<BindingId>) {
    table_with_key(HashKey(*b"subnetstack-test"), members)
}

fn assign(t: &Demux) -> Vec<ListenerId> {
    let s = t.snapshot();
    flows()
        .map(|f| s.lookup(Protocol::Tcp, &f).unwrap().listener)
        .collect()
}

#[test]
fn members_share_flows_evenly() {
    let (t, _) = table(&(1..=8).collect::<Vec<_>>());
    let a = assign(&t);
    for l in 1..=8 {
        let share = a.iter().filter(|x| x.0 == l).count() as f64 / f64::from(FLOWS);
        assert!((share - 0.125).abs() < 0.0125, "listener {l} has {share}");
    }
}

#[test]
fn removing_a_member_moves_only_its_flows() {
    let (mut t, ids) = table(&(1..=10).collect::<Vec<_>>());
    let before = assign(&t);
    t.unbind(ids[3]).unwrap(); // listener 4
    let after = assign(&t);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(b.0, 4, "a flow of a remaining member moved");
            moved += 1;
        }
        assert_ne!(a.0, 4);
    }
    let frac = f64::from(moved) / f64::from(FLOWS);
    assert!((frac - 0.1).abs() < 0.01, "moved {frac}");
}

#[test]
fn adding_a_member_takes_about_one_nth() {
    let (mut t, _) = table(&(1..=10).collect::<Vec<_>>());
    let before = assign(&t);
    t.bind(member(11)).unwrap();
    let after = assign(&t);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(a.0, 11, "a flow moved between old members");
            moved += 1;
        }
    }
    let frac = f64::from(moved) / f64::from(FLOWS);
    assert!((frac - 1.0 / 11.0).abs() < 0.01, "moved {frac}");
}

#[test]
fn same_flow_same_member_and_key_matters() {
    let (t, _) = table(&[1, 2, 3, 4]);
    assert_eq!(assign(&t), assign(&t));
    let (other, _) = table_with_key(HashKey([0x42; 16]), &[1, 2, 3, 4]);
    let same = assign(&t)
        .iter()
        .zip(assign(&other))
        .filter(|(a, b)| *a == b)
        .count();
    let frac = same as f64 / f64::from(FLOWS);
    assert!(
        (frac - 0.25).abs() < 0.02,
        "another key should decorrelate, agreement {frac}"
    );
}
