//! Scripted frame tests: a frame in, the exact frames (or the exact drop counter) out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, NdiscRepr,
};
use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::mem::{pair, LinkConfig};
use subnetstack_ifaces::{Batch, Clock, Device, FrameMeta, Mac, ManualClock};
use subnetstack_stack::poll::Driver;
use subnetstack_stack::{Config, DropReason, SendError, Stack, UdpErrorKind};
use subnetstack_testkit::*;

const S_MAC: Mac = [0x02, 0x53, 0, 0, 0, 1];
const P_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const PEER4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
const T: Duration = Duration::from_secs(1);

fn stack() -> Stack {
    let mut cfg = Config::new(
        S_MAC,
        ["198.18.1.0/24", "198.18.2.0/23", "2001:db8:100::/48"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect(),
    );
    cfg.hash_key = Some(HashKey([5; 16]));
    Stack::new(cfg).unwrap()
}

/// Feeds one frame, returns what the stack transmits.
fn feed(s: &mut Stack, frame: &[u8]) -> Vec<Vec<u8>> {
    s.handle_frame(T, frame, FrameMeta::default());
    out(s)
}

fn out(s: &mut Stack) -> Vec<Vec<u8>> {
    let mut b = Batch::new(64, 2048);
    s.poll_transmit(&mut b);
    b.frames().iter().map(|f| f.data().to_vec()).collect()
}

/// A stack that already knows the peer's MAC for both families (learned from its ARP and NS).
fn stack_knowing_peer() -> Stack {
    let mut s = stack();
    assert_eq!(
        feed(
            &mut s,
            &arp_request(P_MAC, PEER4, Ipv4Addr::new(198, 18, 1, 1))
        )
        .len(),
        1
    );
    assert_eq!(
        feed(
            &mut s,
            &neighbor_solicit(P_MAC, PEER6, "2001:db8:100::1".parse().unwrap(), 255)
        )
        .len(),
        1
    );
    s
}

/// Exactly one drop, under `r`.
fn assert_dropped(s: &Stack, r: DropReason) {
    assert_eq!(s.counters().dropped(r), 1, "{r:?}: {}", s.counters());
    assert_eq!(
        s.counters().dropped_total(),
        1,
        "only {r:?}: {}",
        s.counters()
    );
}

#[test]
fn arp_answers_every_local_address_and_nothing_else() {
    let mut s = stack();
    for last in [1u8, 77, 254] {
        let target = Ipv4Addr::new(198, 18, 3, last);
        let out = feed(&mut s, &arp_request(P_MAC, PEER4, target));
        assert_eq!(out.len(), 1);
        let r = arp_reply(&arp_request(P_MAC, PEER4, target), S_MAC, |_| true).unwrap();
        assert_eq!(out[0], r, "reply from our MAC for {target}");
    }
    assert!(feed(
        &mut s,
        &arp_request(P_MAC, PEER4, Ipv4Addr::new(198, 18, 4, 1))
    )
    .is_empty());
    assert_dropped(&s, DropReason::ArpNotLocal);
    // One neighbour learned (the asker), no state per answered address.
    assert_eq!(s.neighbor_entries(), 1);
}

#[test]
fn echo_answers_from_the_address_pinged_v4_and_v6() {
    let mut s = stack_knowing_peer();
    for dst in ["198.18.2.200", "198.18.1.9", "2001:db8:100:5::77"] {
        let dst: IpAddr = dst.parse().unwrap();
        let src: IpAddr = if dst.is_ipv4() {
            PEER4.into()
        } else {
            PEER6.into()
        };
        let out = feed(&mut s, &echo_request(P_MAC, S_MAC, src, dst, 3));
        assert_eq!(out.len(), 1, "{dst}");
        assert_eq!(out[0][..6], P_MAC);
        match dst {
            IpAddr::V4(d) => {
                let (ip, msg) = icmpv4(&out[0]).unwrap();
                assert_eq!((ip.src_addr, ip.dst_addr), (d, PEER4));
                let r = Icmpv4Repr::parse(
                    &Icmpv4Packet::new_checked(&msg[..]).unwrap(),
                    &Default::default(),
                )
                .unwrap();
                assert!(matches!(
                    r,
                    Icmpv4Repr::EchoReply {
                        ident: 7,
                        seq_no: 3,
                        ..
                    }
                ));
            }
            IpAddr::V6(d) => {
                let (src6, dst6, _, msg) = icmpv6(&out[0]).unwrap();
                assert_eq!((src6, dst6), (d, PEER6));
                let r = Icmpv6Repr::parse(
                    &src6,
                    &dst6,
                    &Icmpv6Packet::new_checked(&msg[..]).unwrap(),
                    &Default::default(),
                )
                .unwrap();
                assert!(matches!(
                    r,
                    Icmpv6Repr::EchoReply {
                        ident: 7,
                        seq_no: 3,
                        ..
                    }
                ));
            }
        }
    }
    assert!(feed(
        &mut s,
        &echo_request(P_MAC, S_MAC, PEER4.into(), "198.18.4.1".parse().unwrap(), 1)
    )
    .is_empty());
    assert_dropped(&s, DropReason::NotLocal);
    assert_eq!(s.counters().echo_replies, 3);
}

#[test]
fn neighbor_solicitations_for_local_addresses_get_advertisements() {
    let mut s = stack();
    let target: Ipv6Addr = "2001:db8:100:abcd::1234".parse().unwrap();
    let out = feed(&mut s, &neighbor_solicit(P_MAC, PEER6, target, 255));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0][..6],
        P_MAC,
        "unicast to the solicitor (learned from its option)"
    );
    let (src, dst, hop, msg) = icmpv6(&out[0]).unwrap();
    assert_eq!((src, dst, hop), (target, PEER6, 255));
    match Icmpv6Repr::parse(
        &src,
        &dst,
        &Icmpv6Packet::new_checked(&msg[..]).unwrap(),
        &Default::default(),
    )
    .unwrap()
    {
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr,
            lladdr: Some(ll),
            flags,
        }) => {
            assert_eq!(target_addr, target);
            assert_eq!(ll.as_bytes(), S_MAC);
            assert!(flags.contains(smoltcp::wire::NdiscNeighborFlags::SOLICITED));
        }
        other => panic!("{other:?}"),
    }
    // Not local: no answer. Wrong hop limit: dropped.
    assert!(feed(
        &mut s,
        &neighbor_solicit(P_MAC, PEER6, "2001:db8:200::1".parse().unwrap(), 255)
    )
    .is_empty());
    assert_eq!(s.counters().dropped(DropReason::NdpNotLocal), 1);
    assert!(feed(&mut s, &neighbor_solicit(P_MAC, PEER6, target, 64)).is_empty());
    assert_eq!(s.counters().dropped(DropReason::NdpBadHopLimit), 1);
}

#[test]
fn sending_to_an_unknown_neighbor_resolves_first() {
    let mut s = stack();
    let h = s
        .udp_bind(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(53).unwrap(),
            false,
        )
        .unwrap();
    s.udp_send(
        T,
        h,
        "198.18.1.5:53".parse().unwrap(),
        "198.19.255.1:4000".parse().unwrap(),
        b"hi",
    )
    .unwrap();
    let out1 = out(&mut s);
    assert_eq!(out1.len(), 1, "an ARP request, the datagram waits");
    assert_eq!(out1[0][..6], [0xff; 6]);
    // The peer answers (a reply addressed to us): the datagram goes out.
    let reply = arp_reply(
        &arp_request(S_MAC, Ipv4Addr::new(198, 18, 1, 5), PEER4),
        P_MAC,
        |_| true,
    )
    .unwrap();
    let out2 = feed(&mut s, &reply);
    assert_eq!(out2.len(), 1);
    let (src, dst, payload) = udp(&out2[0]).unwrap();
    assert_eq!(
        (src, dst, &payload[..]),
        (
            "198.18.1.5:53".parse().unwrap(),
            "198.19.255.1:4000".parse().unwrap(),
            &b"hi"[..]
        )
    );
    // No answer at all: three tries, then a counted drop.
    s.udp_send(
        T,
        h,
        "198.18.1.5:53".parse().unwrap(),
        "198.19.255.77:4000".parse().unwrap(),
        b"lost",
    )
    .unwrap();
    let mut solicits = out(&mut s).len();
    for sec in 2..8 {
        s.handle_timeout(Duration::from_secs(sec));
        solicits += out(&mut s).len();
    }
    assert_eq!(solicits, 3);
    assert_eq!(s.counters().dropped(DropReason::NeighborUnreachable), 1);
}

#[test]
fn udp_goes_to_the_longest_binding_with_the_address_hit() {
    let mut s = stack_knowing_peer();
    let wide = s
        .udp_bind(
            "198.18.2.0/23".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    let narrow = s
        .udp_bind(
            "198.18.3.0/24".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    let v6 = s
        .udp_bind("2001:db8:100::/48".parse().unwrap(), PortSpec::Any, false)
        .unwrap();
    let cases = [
        ("198.18.2.9:7", wide),
        ("198.18.3.9:7", narrow),
        ("[2001:db8:100::9]:999", v6),
    ];
    for (dst, h) in cases {
        let dst: SocketAddr = dst.parse().unwrap();
        let src: SocketAddr = if dst.is_ipv4() {
            "198.19.255.1:5000".parse().unwrap()
        } else {
            "[2001:db8:ffff::1]:5000".parse().unwrap()
        };
        assert!(feed(&mut s, &udp_frame(P_MAC, S_MAC, src, dst, b"ping")).is_empty());
        let d = s.udp_recv(h).expect("delivered to the longest binding");
        assert_eq!((d.src, d.dst, &d.payload[..]), (src, dst, &b"ping"[..]));
        // The reply comes from the address that was hit.
        s.udp_send(T, h, d.dst, d.src, b"pong").unwrap();
        let (rs, rd, rp) = udp(&out(&mut s)[0]).unwrap();
        assert_eq!((rs, rd, &rp[..]), (dst, src, &b"pong"[..]));
    }
    assert_eq!(s.counters().udp_delivered, 3);
    // Sources must be local; families must match.
    assert_eq!(
        s.udp_send(
            T,
            wide,
            "198.19.0.1:7".parse().unwrap(),
            "198.19.255.1:5000".parse().unwrap(),
            b"x"
        ),
        Err(SendError::NonLocalSource("198.19.0.1".parse().unwrap()))
    );
    assert_eq!(
        s.udp_send(
            T,
            wide,
            "198.18.2.1:7".parse().unwrap(),
            "[2001:db8::1]:5000".parse().unwrap(),
            b"x"
        ),
        Err(SendError::FamilyMismatch)
    );
}

#[test]
fn unbound_ports_get_rate_limited_port_unreachable() {
    let mut s = stack_knowing_peer();
    let frame = udp_frame(
        P_MAC,
        S_MAC,
        "198.19.255.1:5000".parse().unwrap(),
        "198.18.1.1:9".parse().unwrap(),
        b"anyone?",
    );
    let out1 = feed(&mut s, &frame);
    assert_eq!(out1.len(), 1);
    let (ip, msg) = icmpv4(&out1[0]).unwrap();
    assert_eq!(ip.src_addr, Ipv4Addr::new(198, 18, 1, 1));
    match Icmpv4Repr::parse(
        &Icmpv4Packet::new_checked(&msg[..]).unwrap(),
        &Default::default(),
    )
    .unwrap()
    {
        Icmpv4Repr::DstUnreachable {
            reason: Icmpv4DstUnreachable::PortUnreachable,
            header,
            data,
        } => {
            assert_eq!(header.dst_addr, Ipv4Addr::new(198, 18, 1, 1));
            assert_eq!(&data[..2], &5000u16.to_be_bytes());
        }
        other => panic!("{other:?}"),
    }
    // The burst (50 by default) runs out within the same instant.
    let mut sent = 1;
    for _ in 0..99 {
        sent += feed(&mut s, &frame).len();
    }
    assert_eq!(sent, 50);
    assert_eq!(s.counters().dropped(DropReason::IcmpRateLimited), 50);
    assert_eq!(s.counters().dropped(DropReason::UdpNoBinding), 100);
    // Tokens come back with time (100 a second).
    s.handle_frame(T + Duration::from_millis(100), &frame, FrameMeta::default());
    assert_eq!(out(&mut s).len(), 1);
    // IPv6 too.
    let f6 = udp_frame(
        P_MAC,
        S_MAC,
        "[2001:db8:ffff::1]:5000".parse().unwrap(),
        "[2001:db8:100::1]:9".parse().unwrap(),
        b"?",
    );
    s.handle_frame(T + Duration::from_millis(200), &f6, FrameMeta::default());
    let o = out(&mut s);
    assert_eq!(o.len(), 1);
    let (_, _, _, msg) = icmpv6(&o[0]).unwrap();
    assert_eq!(msg[0], 1, "ICMPv6 destination unreachable");
    assert_eq!(msg[1], 4, "port unreachable");
}

#[test]
fn icmp_errors_reach_the_socket_that_sent() {
    let mut s = stack_knowing_peer();
    let h = s
        .udp_bind("198.18.1.0/24".parse().unwrap(), PortSpec::Any, false)
        .unwrap();
    s.udp_send(
        T,
        h,
        "198.18.1.5:4444".parse().unwrap(),
        "198.19.255.1:9".parse().unwrap(),
        b"hello",
    )
    .unwrap();
    let sent = out(&mut s).remove(0);
    // The peer answers port unreachable, quoting our datagram.
    let (ip, l4, _) = ipv4(&sent).unwrap();
    let err = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::PortUnreachable,
        header: ip,
        data: l4,
    };
    let frame = eth_ipv4(
        P_MAC,
        S_MAC,
        smoltcp::wire::Ipv4Repr {
            src_addr: PEER4,
            dst_addr: Ipv4Addr::new(198, 18, 1, 5),
            next_header: smoltcp::wire::IpProtocol::Icmp,
            payload_len: err.buffer_len(),
            hop_limit: 64,
        },
        |b| err.emit(&mut Icmpv4Packet::new_unchecked(b), &Default::default()),
    );
    feed(&mut s, &frame);
    let e = s.udp_take_error(h).expect("error delivered");
    assert_eq!(e.kind, UdpErrorKind::PortUnreachable);
    assert_eq!(e.local, "198.18.1.5:4444".parse().unwrap());
    assert_eq!(e.remote, "198.19.255.1:9".parse().unwrap());
}

#[test]
fn socket_queues_are_bounded() {
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.udp_queue = 3;
    let mut s = Stack::new(cfg).unwrap();
    let h = s
        .udp_bind(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    let f = udp_frame(
        P_MAC,
        S_MAC,
        "198.19.255.1:1".parse().unwrap(),
        "198.18.1.1:7".parse().unwrap(),
        b"x",
    );
    for _ in 0..5 {
        feed(&mut s, &f);
    }
    let st = s.udp_stats(h).unwrap();
    assert_eq!((st.queued, st.received, st.dropped), (3, 3, 2));
    assert_eq!(s.counters().dropped(DropReason::UdpQueueFull), 2);
}

/// Two stacks on a memory pair: large datagrams are fragmented by one and reassembled by the
/// other, both families.
#[test]
fn large_datagrams_fragment_and_reassemble_between_two_stacks() {
    let clock = ManualClock::new();
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let (a_dev, b_dev) = pair(LinkConfig::default(), c);
    let mk = |mac: Mac, nets: &[&str]| {
        let mut cfg = Config::new(mac, nets.iter().map(|p| p.parse().unwrap()).collect());
        cfg.hash_key = Some(HashKey([1; 16]));
        Stack::new(cfg).unwrap()
    };
    let mut a = mk(a_dev.info().mac, &["198.18.10.0/24", "2001:db8:10::/48"]);
    let mut b = mk(b_dev.info().mac, &["198.18.20.0/24", "2001:db8:20::/48"]);
    let (mut da, mut db) = (Driver::new(a_dev), Driver::new(b_dev));
    let ha = a
        .udp_bind("198.18.10.0/24".parse().unwrap(), PortSpec::Any, false)
        .unwrap();
    let hb = b
        .udp_bind(
            "198.18.20.0/24".parse().unwrap(),
            PortSpec::exact(9).unwrap(),
            false,
        )
        .unwrap();
    let hb6 = b
        .udp_bind(
            "2001:db8:20::/48".parse().unwrap(),
            PortSpec::exact(9).unwrap(),
            false,
        )
        .unwrap();
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    for (src, dst, h) in [
        ("198.18.10.1:1000", "198.18.20.2:9", hb),
        ("[2001:db8:10::1]:1000", "[2001:db8:20::2]:9", hb6),
    ] {
        a.udp_send(
            clock.now(),
            ha,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            &big,
        )
        .unwrap();
        let mut got = None;
        for _ in 0..50 {
            clock.advance(Duration::from_millis(1));
            da.poll(&mut a, clock.now()).unwrap();
            db.poll(&mut b, clock.now()).unwrap();
            if let Some(d) = b.udp_recv(h) {
                got = Some(d);
                break;
            }
        }
        let d = got.expect("datagram reassembled");
        assert_eq!(d.payload, big);
        assert_eq!(d.src, src.parse().unwrap());
    }
    assert_eq!(b.counters().reassembled, 2);
    assert_eq!(b.counters().dropped_total(), 0, "{}", b.counters());
}

type Mutation = (&'static str, DropReason, Box<dyn Fn(&mut Vec<u8>)>);

/// Feeds each mutation of `good` to a fresh stack with a UDP socket on `net`:7 and expects no
/// output and exactly one drop, under the mutation's reason.
fn expect_drops(net: &str, good: &[u8], cases: &[Mutation]) {
    for (name, reason, mutate) in cases {
        let mut s = stack();
        s.udp_bind(net.parse().unwrap(), PortSpec::exact(7).unwrap(), false)
            .unwrap();
        let mut f = good.to_vec();
        mutate(&mut f);
        assert!(feed(&mut s, &f).is_empty(), "{name}");
        assert_eq!(s.counters().dropped(*reason), 1, "{name}: {}", s.counters());
        assert_eq!(s.counters().dropped_total(), 1, "{name}: {}", s.counters());
    }
}

/// Every malformed input: one counted drop under its own reason, no output, no panic.
#[test]
fn malformed_input_is_a_counted_drop_per_reason() {
    let good = udp_frame(
        P_MAC,
        S_MAC,
        "198.19.255.1:5000".parse().unwrap(),
        "198.18.1.1:7".parse().unwrap(),
        b"payload!",
    );
    let good6 = udp_frame(
        P_MAC,
        S_MAC,
        "[2001:db8:ffff::1]:5000".parse().unwrap(),
        "[2001:db8:100::1]:7".parse().unwrap(),
        b"payload!",
    );
    let fix_ip_csum = |f: &mut Vec<u8>| {
        f[24] = 0;
        f[25] = 0;
        let mut sum = 0u32;
        let ihl = usize::from(f[14] & 0xf) * 4;
        for c in f[14..14 + ihl].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    };
    let cases: Vec<Mutation> = vec![
        (
            "runt",
            DropReason::EthTruncated,
            Box::new(|f| f.truncate(10)),
        ),
        (
            "other MAC",
            DropReason::EthNotForUs,
            Box::new(|f| f[..6].copy_from_slice(&[2, 9, 9, 9, 9, 9])),
        ),
        (
            "other multicast",
            DropReason::EthNotForUs,
            Box::new(|f| f[..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1])),
        ),
        (
            "ethertype",
            DropReason::EthUnknownType,
            Box::new(|f| f[12..14].copy_from_slice(&[0x88, 0xcc])),
        ),
        (
            "arp junk",
            DropReason::ArpMalformed,
            Box::new(|f| {
                f[12..14].copy_from_slice(&[0x08, 0x06]);
                f.truncate(20)
            }),
        ),
        (
            "v4 short",
            DropReason::Ipv4Truncated,
            Box::new(|f| f.truncate(14 + 19)),
        ),
        (
            "v4 version",
            DropReason::Ipv4BadVersion,
            Box::new(|f| f[14] = 0x55),
        ),
        (
            "v4 ihl",
            DropReason::Ipv4BadHeaderLen,
            Box::new(|f| f[14] = 0x44),
        ),
        (
            "v4 total",
            DropReason::Ipv4BadTotalLen,
            Box::new(move |f| {
                f[16..18].copy_from_slice(&2000u16.to_be_bytes());
                fix_ip_csum(f)
            }),
        ),
        (
            "v4 checksum",
            DropReason::Ipv4BadChecksum,
            Box::new(|f| f[24] ^= 0xff),
        ),
        (
            "v4 source",
            DropReason::Ipv4BadSource,
            Box::new(move |f| {
                f[26..30].copy_from_slice(&[224, 0, 0, 1]);
                fix_ip_csum(f)
            }),
        ),
        (
            "not local",
            DropReason::NotLocal,
            Box::new(move |f| {
                f[30..34].copy_from_slice(&[198, 18, 9, 9]);
                fix_ip_csum(f)
            }),
        ),
        (
            "protocol",
            DropReason::NoProtocol,
            Box::new(move |f| {
                f[23] = 132;
                fix_ip_csum(f)
            }),
        ),
        (
            "udp length",
            DropReason::UdpMalformed,
            Box::new(|f| f[38..40].copy_from_slice(&100u16.to_be_bytes())),
        ),
        (
            "udp checksum",
            DropReason::UdpBadChecksum,
            Box::new(|f| f[40] ^= 0xff),
        ),
        (
            "icmp checksum",
            DropReason::IcmpMalformed,
            Box::new(move |f| {
                f[23] = 1;
                fix_ip_csum(f);
                f[34] = 8
            }),
        ),
    ];
    expect_drops("198.18.1.0/24", &good, &cases);
    let cases6: Vec<Mutation> = vec![
        (
            "v6 short",
            DropReason::Ipv6Truncated,
            Box::new(|f| f.truncate(14 + 39)),
        ),
        (
            "v6 version",
            DropReason::Ipv6BadVersion,
            Box::new(|f| f[14] = 0x40),
        ),
        (
            "v6 payload len",
            DropReason::Ipv6BadPayloadLen,
            Box::new(|f| f[18..20].copy_from_slice(&3000u16.to_be_bytes())),
        ),
        (
            "v6 source",
            DropReason::Ipv6BadSource,
            Box::new(|f| f[22] = 0xff),
        ),
        (
            "v6 zero udp checksum",
            DropReason::UdpZeroChecksumV6,
            Box::new(|f| {
                f[60] = 0;
                f[61] = 0
            }),
        ),
        (
            "v6 hop-by-hop not first",
            DropReason::Ipv6BadExtHeader,
            Box::new(|f| {
                // Destination options (60) then a hop-by-hop (0) header: illegal order.
                let mut ext = vec![0u8, 0, 1, 4, 0, 0, 0, 0];
                ext.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
                let plen = u16::from_be_bytes([f[18], f[19]]) + 16;
                f[18..20].copy_from_slice(&plen.to_be_bytes());
                f[20] = 60;
                f.splice(54..54, ext);
            }),
        ),
        (
            "v6 routing header",
            DropReason::Ipv6RoutingHeader,
            Box::new(|f| {
                let ext = vec![17u8, 0, 0, 1, 0, 0, 0, 0];
                let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
                f[18..20].copy_from_slice(&plen.to_be_bytes());
                f[20] = 43;
                f.splice(54..54, ext);
            }),
        ),
    ];
    expect_drops("2001:db8:100::/48", &good6, &cases6);
    // And the unmodified frames are delivered.
    let mut s = stack();
    let h = s
        .udp_bind(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    feed(&mut s, &good);
    assert!(s.udp_recv(h).is_some());
}

#[test]
fn bad_configuration_is_refused() {
    let bad_mac = Config::new([1, 0, 0, 0, 0, 1], vec![]);
    assert!(Stack::new(bad_mac).is_err());
    let host_bits = Config::new(S_MAC, vec!["198.18.1.1/24".parse().unwrap()]);
    assert!(Stack::new(host_bits).is_err());
}

#[test]
fn full_transmit_queue_and_unhandled_icmp_are_counted() {
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.tx_queue = 2;
    let mut s = Stack::new(cfg).unwrap();
    // Three ARP requests answered without draining: the third reply does not fit.
    for last in 1..=3 {
        s.handle_frame(
            T,
            &arp_request(P_MAC, PEER4, Ipv4Addr::new(198, 18, 1, last)),
            FrameMeta::default(),
        );
    }
    assert_eq!(s.pending_transmit(), 2);
    assert_eq!(s.counters().dropped(DropReason::TxQueueFull), 1);
    // An ICMP timestamp request (type 13) is not acted on.
    let ts = Icmpv4Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: &[0; 12],
    };
    let mut f = eth_ipv4(
        P_MAC,
        S_MAC,
        smoltcp::wire::Ipv4Repr {
            src_addr: PEER4,
            dst_addr: Ipv4Addr::new(198, 18, 1, 1),
            next_header: smoltcp::wire::IpProtocol::Icmp,
            payload_len: ts.buffer_len(),
            hop_limit: 64,
        },
        |b| ts.emit(&mut Icmpv4Packet::new_unchecked(b), &Default::default()),
    );
    f[34] = 13;
    let mut p = Icmpv4Packet::new_unchecked(&mut f[34..]);
    p.fill_checksum();
    s.handle_frame(T, &f, FrameMeta::default());
    assert_eq!(
        s.counters().dropped(DropReason::IcmpUnhandled),
        1,
        "{}",
        s.counters()
    );
}
