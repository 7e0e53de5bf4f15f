//! Test helpers shared by the workspace's tests: hand-built frames (with `smoltcp::wire`) that
//! stand in for a peer or for the stack, and fd polling.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};
use subnetstack_ifaces::Mac;

/// Waits until `fd` is readable or `timeout` passes.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) > 0 }
}

/// An Ethernet + IPv4 frame whose transport payload `emit` writes.
pub fn eth_ipv4(src: Mac, dst: Mac, ip: Ipv4Repr, emit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + 20 + ip.payload_len];
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut buf[14..]),
        &ChecksumCapabilities::default(),
    );
    emit(&mut buf[34..]);
    buf
}

/// The reply to an ARP request for an address `owns` accepts.
pub fn arp_reply(frame: &[u8], mac: Mac, owns: impl Fn(Ipv4Addr) -> bool) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?
    else {
        return None;
    };
    if !owns(target_protocol_addr) {
        return None;
    }
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let mut buf = vec![0u8; 14 + reply.buffer_len()];
    EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: source_hardware_addr,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    reply.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
    Some(buf)
}

/// The IPv4 header and payload of a frame, if it is IPv4.
pub fn ipv4(frame: &[u8]) -> Option<(Ipv4Repr, &[u8], Mac)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let src_mac = eth.src_addr().0;
    let payload = eth.payload();
    let p = Ipv4Packet::new_checked(payload).ok()?;
    let caps = ChecksumCapabilities::ignored();
    let r = Ipv4Repr::parse(&p, &caps).ok()?;
    let hl = p.header_len() as usize;
    let total = p.total_len() as usize;
    Some((r, &payload[hl..total.min(payload.len())], src_mac))
}

/// The echo reply to an ICMP echo request.
pub fn echo_reply(frame: &[u8], mac: Mac) -> Option<Vec<u8>> {
    let (ip, payload, peer) = ipv4(frame)?;
    if ip.next_header != IpProtocol::Icmp {
        return None;
    }
    let caps = ChecksumCapabilities::default();
    let Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = Icmpv4Repr::parse(&Icmpv4Packet::new_checked(payload).ok()?, &caps).ok()?
    else {
        return None;
    };
    let reply = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let out_ip = Ipv4Repr {
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: 64,
    };
    Some(eth_ipv4(mac, peer, out_ip, |b| {
        reply.emit(&mut Icmpv4Packet::new_unchecked(b), &caps)
    }))
}

/// What the tests need of a TCP/IPv4 segment.
#[derive(Clone, Debug)]
pub struct Seg {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: i32,
    pub ack: Option<i32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub window: u16,
    /// Options of the segment (MSS, window scale, timestamps).
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub ts: Option<(u32, u32)>,
    pub sack_permitted: bool,
    /// SACK blocks `(left, right)` in order.
    pub sack: Vec<(u32, u32)>,
    /// Raw option bytes (for layout checks).
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    pub peer_mac: Mac,
    pub ttl: u8,
}

/// Parses a TCP/IPv4 frame (checksums not verified: offloaded frames carry partial ones).
pub fn tcp4(frame: &[u8]) -> Option<Seg> {
    let (ip, payload, peer_mac) = ipv4(frame)?;
    if ip.next_header != IpProtocol::Tcp {
        return None;
    }
    let p = TcpPacket::new_checked(payload).ok()?;
    let r = TcpRepr::parse(
        &p,
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        &ChecksumCapabilities::ignored(),
    )
    .ok();
    Some(Seg {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: p.src_port(),
        dport: p.dst_port(),
        seq: p.seq_number().0,
        ack: p.ack().then(|| p.ack_number().0),
        syn: p.syn(),
        fin: p.fin(),
        rst: p.rst(),
        window: p.window_len(),
        mss: r.as_ref().and_then(|r| r.max_seg_size),
        wscale: r.as_ref().and_then(|r| r.window_scale),
        ts: r
            .as_ref()
            .and_then(|r| r.timestamp.map(|t| (t.tsval, t.tsecr))),
        sack_permitted: r.as_ref().is_some_and(|r| r.sack_permitted),
        sack: r
            .as_ref()
            .map(|r| r.sack_ranges.iter().flatten().copied().collect())
            .unwrap_or_default(),
        options: p.options().to_vec(),
        payload: p.payload().to_vec(),
        peer_mac,
        ttl: ip.hop_limit,
    })
}

/// A TCP/IPv4 frame with full checksums.
pub fn tcp4_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    repr: &TcpRepr,
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    eth_ipv4(src_mac, dst_mac, ip, |b| {
        emit_tcp(repr, IpAddress::Ipv4(src), IpAddress::Ipv4(dst), b)
    })
}

fn emit_tcp(repr: &TcpRepr, src: IpAddress, dst: IpAddress, b: &mut [u8]) {
    repr.emit(
        &mut TcpPacket::new_unchecked(b),
        &src,
        &dst,
        &ChecksumCapabilities::default(),
    )
}

/// A TCP/IPv6 frame with full checksums.
pub fn tcp6_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    repr: &TcpRepr,
) -> Vec<u8> {
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    eth_ipv6(src_mac, dst_mac, ip, |b| {
        emit_tcp(repr, IpAddress::Ipv6(src), IpAddress::Ipv6(dst), b)
    })
}

/// A UDP/IPv6 frame whose UDP header follows a hop-by-hop options header (8 bytes: a PadN
/// option), checksums right.
pub fn udp6_hop_by_hop(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V6(s6), IpAddr::V6(d6)) = (src.ip(), dst.ip()) else {
        panic!("IPv6 addresses")
    };
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv6Repr {
        src_addr: s6,
        dst_addr: d6,
        next_header: IpProtocol::HopByHop,
        payload_len: 8 + udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    eth_ipv6(src_mac, dst_mac, ip, |b| {
        b[..8].copy_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut b[8..]),
            &IpAddress::Ipv6(s6),
            &IpAddress::Ipv6(d6),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

/// A TCP header without options.
pub fn tcp_repr(
    sport: u16,
    dport: u16,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    window: u16,
    payload: &[u8],
) -> TcpRepr<'_> {
    TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

/// An Ethernet + IPv6 frame whose payload `emit` writes (`next` is the first next header).
pub fn eth_ipv6(src: Mac, dst: Mac, ip: Ipv6Repr, emit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + 40 + ip.payload_len];
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: EthernetProtocol::Ipv6,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[14..]));
    emit(&mut buf[54..]);
    buf
}

/// An ARP request from `(mac, ip)` for `target`.
pub fn arp_request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let req = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0u8; 14 + req.buffer_len()];
    EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress([0xff; 6]),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    req.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
    buf
}

/// A UDP datagram in an Ethernet frame, IPv4 or IPv6 by the addresses, with a correct checksum.
pub fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let len = 8 + payload.len();
    let emit = |b: &mut [u8]| {
        udp.emit(
            &mut UdpPacket::new_unchecked(b),
            &src.ip().into(),
            &dst.ip().into(),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth_ipv4(
            src_mac,
            dst_mac,
            Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: len,
                hop_limit: 64,
            },
            emit,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth_ipv6(
            src_mac,
            dst_mac,
            Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: len,
                hop_limit: 64,
            },
            emit,
        ),
        _ => panic!("mixed families"),
    }
}

/// A UDP datagram parsed from a frame: `(src, dst, payload)`. Checksums are verified.
pub fn udp(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let caps = ChecksumCapabilities::default();
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let r = Ipv4Repr::parse(&p, &caps).ok()?;
            if r.next_header != IpProtocol::Udp {
                return None;
            }
            (
                r.src_addr.into(),
                r.dst_addr.into(),
                &eth.payload()[usize::from(p.header_len())..usize::from(p.total_len())],
            )
        }
        EthernetProtocol::Ipv6 => {
            let p = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if p.next_header() != IpProtocol::Udp {
                return None;
            }
            (
                p.src_addr().into(),
                p.dst_addr().into(),
                &eth.payload()[40..40 + usize::from(p.payload_len())],
            )
        }
        _ => return None,
    };
    let p = UdpPacket::new_checked(l4).ok()?;
    let r = UdpRepr::parse(&p, &src.into(), &dst.into(), &caps).ok()?;
    Some((
        SocketAddr::new(src, r.src_port),
        SocketAddr::new(dst, r.dst_port),
        p.payload().to_vec(),
    ))
}

/// An ICMP echo request, IPv4 or IPv6 by the addresses.
pub fn echo_request(src_mac: Mac, dst_mac: Mac, src: IpAddr, dst: IpAddr, seq: u16) -> Vec<u8> {
    let data = b"subnetstack ping";
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let r = Icmpv4Repr::EchoRequest {
                ident: 7,
                seq_no: seq,
                data,
            };
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmp,
                payload_len: r.buffer_len(),
                hop_limit: 64,
            };
            eth_ipv4(src_mac, dst_mac, ip, |b| {
                r.emit(
                    &mut Icmpv4Packet::new_unchecked(b),
                    &ChecksumCapabilities::default(),
                )
            })
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let r = Icmpv6Repr::EchoRequest {
                ident: 7,
                seq_no: seq,
                data,
            };
            icmpv6_frame(src_mac, dst_mac, s, d, 64, &r)
        }
        _ => panic!("mixed families"),
    }
}

/// An ICMPv6 message in a frame.
pub fn icmpv6_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop: u8,
    r: &Icmpv6Repr,
) -> Vec<u8> {
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: r.buffer_len(),
        hop_limit: hop,
    };
    eth_ipv6(src_mac, dst_mac, ip, |b| {
        r.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(b),
            &ChecksumCapabilities::default(),
        )
    })
}

/// A neighbour solicitation from `(mac, src)` for `target`, to its solicited-node group.
pub fn neighbor_solicit(mac: Mac, src: Ipv6Addr, target: Ipv6Addr, hop: u8) -> Vec<u8> {
    let o = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(EthernetAddress(mac).into()),
    });
    icmpv6_frame(
        mac,
        [0x33, 0x33, 0xff, o[13], o[14], o[15]],
        src,
        group,
        hop,
        &ns,
    )
}

/// The ICMPv4 message of a frame.
pub fn icmpv4(frame: &[u8]) -> Option<(Ipv4Repr, Vec<u8>)> {
    let (ip, payload, _) = ipv4(frame)?;
    (ip.next_header == IpProtocol::Icmp).then(|| (ip, payload.to_vec()))
}

/// The ICMPv6 message of a frame: `(src, dst, hop limit, message bytes)`.
pub fn icmpv6(frame: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr, u8, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return None;
    }
    let p = Ipv6Packet::new_checked(eth.payload()).ok()?;
    if p.next_header() != IpProtocol::Icmpv6 {
        return None;
    }
    Some((
        p.src_addr(),
        p.dst_addr(),
        p.hop_limit(),
        eth.payload()[40..40 + usize::from(p.payload_len())].to_vec(),
    ))
}

/// Turns fuzzer bytes into frames for a stack with MAC `dst_mac` and local prefixes around
/// 198.18.1.0/24 and 2001:db8:100::/48: each chunk picks a valid template (UDP, echo, ARP, NDP,
/// fragments, TCP SYNs with every option and ACKs with SACK blocks, an IPv6 hop-by-hop header,
/// an ICMP error quoting TCP; both families) and XORs the rest of the chunk over it, so
/// mutations reach deep into the parsers. Calls `feed` with every frame.
pub fn fuzz_frames(data: &[u8], dst_mac: Mac, mut feed: impl FnMut(&[u8])) {
    let peer: Mac = [0x02, 0, 0, 0, 0, 0x99];
    let (p4, l4): (IpAddr, IpAddr) = (
        Ipv4Addr::new(198, 19, 255, 1).into(),
        Ipv4Addr::new(198, 18, 1, 7).into(),
    );
    let (p6, l6): (Ipv6Addr, Ipv6Addr) = (
        "2001:db8:ffff::1".parse().unwrap(),
        "2001:db8:100::7".parse().unwrap(),
    );
    for chunk in data.split(|&b| b == 0xfe).take(64) {
        let Some((&pick, rest)) = chunk.split_first() else {
            continue;
        };
        let syn = TcpRepr {
            max_seg_size: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamp: Some(smoltcp::wire::TcpTimestampRepr::new(1, 0)),
            ..tcp_repr(40000, 80, TcpControl::Syn, 1000, None, 65535, &[])
        };
        let (IpAddr::V4(p4v), IpAddr::V4(l4v)) = (p4, l4) else {
            unreachable!("IPv4 literals")
        };
        let mut f = match pick % 14 {
            0 => udp_frame(
                peer,
                dst_mac,
                SocketAddr::new(p4, 5000),
                SocketAddr::new(l4, 7),
                b"fuzz payload",
            ),
            1 => udp_frame(
                peer,
                dst_mac,
                SocketAddr::new(p6.into(), 5000),
                SocketAddr::new(l6.into(), 7),
                b"fuzz payload",
            ),
            2 => echo_request(peer, dst_mac, p4, l4, 1),
            3 => echo_request(peer, dst_mac, p6.into(), l6.into(), 1),
            4 => arp_request(
                peer,
                Ipv4Addr::new(198, 19, 255, 1),
                Ipv4Addr::new(198, 18, 1, 7),
            ),
            5 => neighbor_solicit(peer, p6, l6, 255),
            6 => udp_frame(
                peer,
                dst_mac,
                SocketAddr::new(p4, 5000),
                SocketAddr::new(l4, 9),
                &[7; 300],
            ),
            7 => {
                // An IPv4 fragment (more fragments set).
                let mut f = udp_frame(
                    peer,
                    dst_mac,
                    SocketAddr::new(p4, 5000),
                    SocketAddr::new(l4, 7),
                    &[1; 64],
                );
                f[20] |= 0x20;
                f
            }
            8 => tcp4_frame(peer, dst_mac, p4v, l4v, &syn),
            9 => tcp6_frame(peer, dst_mac, p6, l6, &syn),
            10 => {
                // An ACK with data and SACK blocks for no connection (cookie check, RST).
                let mut ack = tcp_repr(40001, 80, TcpControl::Psh, 1001, Some(77), 512, b"GET /");
                ack.sack_ranges[0] = Some((5, 9));
                tcp4_frame(peer, dst_mac, p4v, l4v, &ack)
            }
            11 => udp6_hop_by_hop(
                peer,
                dst_mac,
                SocketAddr::new(p6.into(), 5000),
                SocketAddr::new(l6.into(), 7),
                b"ext",
            ),
            12 => {
                // ICMP unreachable (fragmentation needed) quoting a segment the stack sent.
                let sent = tcp4_frame(
                    dst_mac,
                    peer,
                    l4v,
                    p4v,
                    &tcp_repr(80, 40000, TcpControl::None, 5, Some(1001), 512, b"x"),
                );
                icmpv4_unreachable(
                    peer,
                    dst_mac,
                    p4v,
                    &sent,
                    smoltcp::wire::Icmpv4DstUnreachable::FragRequired,
                    1000,
                )
            }
            _ => rest.to_vec(),
        };
        // Keep the destination MAC most of the time so frames get past L2.
        let start = if pick & 0x80 == 0 { 6 } else { 0 };
        let len_tweak = rest.first().copied().unwrap_or(0);
        for (i, b) in rest.iter().skip(1).enumerate() {
            if let Some(x) = f.get_mut(start + i) {
                *x ^= *b;
            }
        }
        match len_tweak % 4 {
            0 => f.truncate(f.len().saturating_sub(usize::from(len_tweak >> 2))),
            1 => f.extend(std::iter::repeat_n(0u8, usize::from(len_tweak >> 2))),
            _ => {}
        }
        feed(&f);
    }
}

/// An ICMPv4 destination-unreachable frame from `from` (towards the source of `quoted`, a frame
/// the stack sent) quoting its IP header and the first bytes of its payload; `mtu` goes into
/// the next-hop MTU field (used with fragmentation needed).
pub fn icmpv4_unreachable(
    src_mac: Mac,
    dst_mac: Mac,
    from: Ipv4Addr,
    quoted: &[u8],
    reason: smoltcp::wire::Icmpv4DstUnreachable,
    mtu: u16,
) -> Vec<u8> {
    let (ip, l4, _) = ipv4(quoted).expect("an IPv4 frame");
    let data = &l4[..l4.len().min(8)];
    let err = Icmpv4Repr::DstUnreachable {
        reason,
        header: ip,
        data,
    };
    eth_ipv4(
        src_mac,
        dst_mac,
        Ipv4Repr {
            src_addr: from,
            dst_addr: ip.src_addr,
            next_header: IpProtocol::Icmp,
            payload_len: err.buffer_len(),
            hop_limit: 64,
        },
        |b| {
            err.emit(
                &mut Icmpv4Packet::new_unchecked(&mut *b),
                &Default::default(),
            );
            b[6..8].copy_from_slice(&mtu.to_be_bytes());
            Icmpv4Packet::new_unchecked(b).fill_checksum();
        },
    )
}

/// A global allocator that counts live heap bytes, for memory figures, and allocations per
/// thread. Install it in a test or bench binary with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
pub struct CountingAlloc;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

thread_local! {
    /// Allocations and reallocations made by this thread (no destructor: usable from the
    /// allocator).
    static THREAD_ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_alloc() {
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        count_alloc();
        LIVE_BYTES.fetch_add(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        count_alloc();
        LIVE_BYTES.fetch_add(
            n as isize - l.size() as isize,
            std::sync::atomic::Ordering::Relaxed,
        );
        std::alloc::System.realloc(p, l, n)
    }
}

/// Live heap bytes counted by [`CountingAlloc`] (0 unless it is the global allocator).
pub fn live_heap_bytes() -> isize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Allocations and reallocations the calling thread made, counted by [`CountingAlloc`] (0
/// unless it is the global allocator).
pub fn thread_allocations() -> u64 {
    THREAD_ALLOCS.with(std::cell::Cell::get)
}
