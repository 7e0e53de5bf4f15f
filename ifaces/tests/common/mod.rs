//! Hand-built frames for tests that stand in for the stack (built with `smoltcp::wire`).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
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
    Some(Seg {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: p.src_port(),
        dport: p.dst_port(),
        seq: p.seq_number().0,
        ack: p.ack().then(|| p.ack_number().0),
        syn: p.syn(),
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
        repr.emit(
            &mut TcpPacket::new_unchecked(b),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
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
