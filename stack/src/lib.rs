//! The sans-IO protocol core of subnetstack.
//!
//! A [`Stack`] is one shard's protocol state. It takes `(now, frame)` with
//! [`handle_frame`](Stack::handle_frame), produces frames with
//! [`poll_transmit`](Stack::poll_transmit), and tells when it next needs the clock with
//! [`poll_timeout`](Stack::poll_timeout) / [`handle_timeout`](Stack::handle_timeout). It makes no
//! system calls and never reads a clock: `now` is a [`Duration`] from any origin the caller picks.
//! [`poll::Driver`] runs it over any [`subnetstack_ifaces::Device`].
//!
//! It answers for **every address of every local prefix** with no per-address state: ARP requests,
//! NDP neighbour solicitations (to any solicited-node multicast group), ICMP and ICMPv6 echo. UDP
//! sockets bind to `(prefix, ports)` through the subnet demux; a datagram's 4-tuple picks the
//! reuseport member, and the socket learns the local address the datagram was sent to, so a server
//! answers from it. Everything else is dropped and counted by [`DropReason`].
#![warn(missing_docs)]

pub mod counters;
pub mod frag;
pub mod neigh;
pub mod poll;
pub mod tcp;
mod tcp_glue;

pub use tcp::cc::Congestion;
pub use tcp::conn::{Keepalive, State as TcpState, TcpConfig, TcpError};
pub use tcp_glue::{ConnectError, IoError, ListenerStats, TcpHandle, TcpListenerHandle};

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr,
    Icmpv6DstUnreachable, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, UdpPacket, UdpRepr,
};
use subnetstack_demux::{
    BindError, BindPolicy, Binding, BindingId, Demux, Flow, HashKey, ListenerId, PortSpec, Protocol,
};
use subnetstack_ifaces::{Batch, Csum, FrameMeta, Mac, Offloads};

pub use counters::{Counters, DropReason};
use frag::{FragKey, Reassembler, ReassemblyConfig};
use neigh::{NeighborCache, NeighborConfig, Resolve};

/// How a stack is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The stack's MAC address.
    pub mac: Mac,
    /// Local prefixes: the stack answers for every address inside them (nesting is fine).
    pub prefixes: Vec<IpNet>,
    /// Next hop for every IPv4 destination outside the local prefixes; `None` treats every
    /// destination as on-link (ARP for the destination itself).
    pub gateway_v4: Option<Ipv4Addr>,
    /// Same for IPv6 (link-local destinations are always on-link).
    pub gateway_v6: Option<Ipv6Addr>,
    /// IP MTU of the link.
    pub mtu: usize,
    /// Neighbour cache limits.
    pub neighbors: NeighborConfig,
    /// Fragment reassembly limits.
    pub reassembly: ReassemblyConfig,
    /// ICMP errors (unreachable) per second, token bucket refill rate.
    pub icmp_errors_per_sec: u32,
    /// ICMP error burst (token bucket size).
    pub icmp_error_burst: u32,
    /// Datagrams queued per UDP socket before drops.
    pub udp_queue: usize,
    /// Frames queued for transmission before drops.
    pub tx_queue: usize,
    /// Bind conflict policy.
    pub bind_policy: BindPolicy,
    /// Flow-hash key; `None` draws a random one.
    pub hash_key: Option<HashKey>,
    /// TCP tunables (buffers, Nagle, timers).
    pub tcp: TcpConfig,
    /// What the device does for the stack on transmit (the runtime copies the device's
    /// [`DeviceInfo::offloads`](subnetstack_ifaces::DeviceInfo::offloads)). With `tx_csum`,
    /// TCP frames leave with only the pseudo-header sum for the device to complete; with
    /// `tx_tso4`/`tx_tso6`, a connection's consecutive full-sized segments leave as one
    /// super-frame of up to `max_gso_frame` bytes that the device cuts back into them. None by
    /// default: every frame complete and at most the MTU.
    pub offloads: Offloads,
}

impl Config {
    /// Defaults around a MAC and local prefixes.
    pub fn new(mac: Mac, prefixes: Vec<IpNet>) -> Self {
        Config {
            mac,
            prefixes,
            gateway_v4: None,
            gateway_v6: None,
            mtu: 1500,
            neighbors: NeighborConfig::default(),
            reassembly: ReassemblyConfig::default(),
            icmp_errors_per_sec: 100,
            icmp_error_burst: 50,
            udp_queue: 1024,
            tx_queue: 4096,
            bind_policy: BindPolicy::Nested,
            hash_key: None,
            tcp: TcpConfig::default(),
            offloads: Offloads::default(),
        }
    }
}

/// A configuration the stack cannot run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The MAC is multicast or all zeros.
    BadMac(Mac),
    /// A prefix has host bits set.
    HostBitsSet(IpNet),
    /// The MTU is below the IPv6 minimum (1280) or above 65535.
    BadMtu(usize),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadMac(m) => write!(f, "MAC {m:02x?} is multicast or zero"),
            ConfigError::HostBitsSet(p) => write!(f, "prefix {p} has host bits set"),
            ConfigError::BadMtu(m) => write!(f, "MTU {m} is outside 1280..=65535"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A UDP socket of a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpHandle(u32);

impl UdpHandle {
    /// Its number (the `ListenerId` of its binding in the demux), for logs and metrics.
    pub fn id(self) -> u32 {
        self.0
    }
}

/// A received datagram: payload, the remote address, and the local address it was sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Payload.
    pub payload: Vec<u8>,
    /// Remote (source) address and port.
    pub src: SocketAddr,
    /// Local (destination) address and port: answer from it.
    pub dst: SocketAddr,
}

/// An ICMP error about a datagram a socket sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpError {
    /// Our address and port in the datagram the error is about.
    pub local: SocketAddr,
    /// The remote address and port it went to.
    pub remote: SocketAddr,
    /// What happened.
    pub kind: UdpErrorKind,
}

/// Kind of [`UdpError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpErrorKind {
    /// Port unreachable: nobody listens there (`ECONNREFUSED`).
    PortUnreachable,
    /// Another destination-unreachable code (ICMP code, family specific).
    Unreachable(u8),
    /// Packet too big / fragmentation needed, with the reported MTU.
    PacketTooBig(u32),
}

/// Why a send was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No such socket.
    UnknownSocket,
    /// The source address is outside the local prefixes.
    NonLocalSource(IpAddr),
    /// Source and destination are of different families.
    FamilyMismatch,
    /// Port 0 as source or destination.
    PortZero,
    /// The payload does not fit in one datagram.
    TooLarge(usize),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::UnknownSocket => f.write_str("no such socket"),
            SendError::NonLocalSource(a) => write!(f, "source {a} is outside the local prefixes"),
            SendError::FamilyMismatch => f.write_str("source and destination families differ"),
            SendError::PortZero => f.write_str("port 0"),
            SendError::TooLarge(n) => write!(f, "payload of {n} bytes does not fit a datagram"),
        }
    }
}

impl std::error::Error for SendError {}

/// Counters of one UDP socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSocketStats {
    /// Datagrams waiting.
    pub queued: usize,
    /// Datagrams delivered to the queue.
    pub received: u64,
    /// Datagrams dropped because the queue was full.
    pub dropped: u64,
}

#[derive(Debug)]
struct UdpSock {
    binding: BindingId,
    queue: VecDeque<Datagram>,
    errors: VecDeque<UdpError>,
    stats: UdpSocketStats,
}

const CAPS: fn() -> ChecksumCapabilities = ChecksumCapabilities::default;
const BROADCAST: Mac = [0xff; 6];
/// Buffers up to this capacity go to the frame pool; larger ones (super-frames) to their own.
const SMALL_BUF: usize = 4096;
/// Errors kept per socket (older ones are dropped).
const MAX_SOCKET_ERRORS: usize = 16;

/// A frame on its way out: its bytes and the offload metadata the device gets with them.
#[derive(Clone, Debug, Default)]
pub(crate) struct TxFrame {
    pub(crate) data: Vec<u8>,
    pub(crate) meta: FrameMeta,
}

impl From<Vec<u8>> for TxFrame {
    fn from(data: Vec<u8>) -> Self {
        TxFrame {
            data,
            meta: FrameMeta::default(),
        }
    }
}

impl From<TxFrame> for Vec<u8> {
    fn from(f: TxFrame) -> Self {
        f.data
    }
}

impl std::ops::Deref for TxFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for TxFrame {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

/// One shard's protocol state. See the crate docs.
pub struct Stack {
    cfg: Config,
    local4: PrefixMap<Ipv4Net, ()>,
    local6: PrefixMap<Ipv6Net, ()>,
    demux: Demux,
    neigh: NeighborCache<TxFrame>,
    /// Neighbours learned from the wire since the last `take_learned_neighbors` (bounded).
    learned: Vec<(IpAddr, Mac)>,
    reasm: Reassembler,
    udp: Vec<Option<UdpSock>>,
    free_udp: Vec<u32>,
    tx: VecDeque<TxFrame>,
    pool: Vec<Vec<u8>>,
    /// Buffers of TSO super-frames (up to 64 KiB each), kept apart and fewer.
    pool_big: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    tcp: tcp_glue::Tcp,
    counters: Counters,
    icmp_tokens: u32,
    icmp_refill: Duration,
    ident: u32,
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("mac", &self.cfg.mac)
            .field("prefixes", &self.cfg.prefixes.len())
            .field("counters", &self.counters)
            .finish()
    }
}

fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

fn multicast_mac(a: Ipv6Addr) -> Mac {
    let o = a.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

fn is_solicited_node(a: Ipv6Addr) -> bool {
    let s = a.segments();
    s[..6] == [0xff02, 0, 0, 0, 0, 1] && s[6] >> 8 == 0xff
}

impl Stack {
    /// A stack with no sockets.
    pub fn new(cfg: Config) -> Result<Stack, ConfigError> {
        if cfg.mac[0] & 1 == 1 || cfg.mac == [0; 6] {
            return Err(ConfigError::BadMac(cfg.mac));
        }
        if !(1280..=65535).contains(&cfg.mtu) {
            return Err(ConfigError::BadMtu(cfg.mtu));
        }
        let mut local4 = PrefixMap::new();
        let mut local6 = PrefixMap::new();
        for p in &cfg.prefixes {
            if p.trunc() != *p {
                return Err(ConfigError::HostBitsSet(*p));
            }
            match p {
                IpNet::V4(n) => local4.insert(*n, ()),
                IpNet::V6(n) => local6.insert(*n, ()),
            };
        }
        let key = cfg.hash_key.unwrap_or_else(HashKey::random);
        Ok(Stack {
            demux: Demux::with_key(cfg.bind_policy, key),
            neigh: NeighborCache::new(cfg.neighbors.clone()),
            learned: Vec::new(),
            reasm: Reassembler::new(cfg.reassembly.clone()),
            icmp_tokens: cfg.icmp_error_burst,
            icmp_refill: Duration::ZERO,
            local4,
            local6,
            udp: Vec::new(),
            free_udp: Vec::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            pool_big: Vec::new(),
            scratch: Vec::new(),
            // The cookie secret is independent of the demux key (a fixed demux key, given for
            // reproducible tests, still yields a distinct cookie secret).
            tcp: tcp_glue::Tcp::new(cfg.tcp.clone(), {
                let mut k = HashKey::random().0;
                if let Some(fixed) = cfg.hash_key {
                    k = fixed.0;
                    k.reverse();
                }
                k
            }),
            counters: Counters::default(),
            ident: 1,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Learns `ip` at `mac` from the wire (creating the entry if `create`), sends what waited
    /// for it, and notes it for [`take_learned_neighbors`](Self::take_learned_neighbors).
    fn learn_neighbor(&mut self, now: Duration, ip: IpAddr, mac: Mac, create: bool) {
        for f in self.neigh.learn(ip, mac, now, create) {
            self.queue_tx(f);
        }
        if self.neigh.get(ip, now) == Some(mac) && self.learned.len() < 256 {
            self.learned.push((ip, mac));
        }
    }

    /// Neighbours learned from the wire since the last call. Shards of one device share them
    /// ([`teach_neighbor`](Self::teach_neighbor)): an ARP or NDP answer arrives on whichever
    /// queue the kernel picks, not necessarily the asking shard's.
    pub fn take_learned_neighbors(&mut self) -> Vec<(IpAddr, Mac)> {
        std::mem::take(&mut self.learned)
    }

    /// Tells the stack that `ip` is at `mac` (learned by another shard), sending what waited.
    pub fn teach_neighbor(&mut self, now: Duration, ip: IpAddr, mac: Mac) {
        for f in self.neigh.learn(ip, mac, now, true) {
            self.queue_tx(f);
        }
    }

    /// Entries in the neighbour cache (next hops the stack sends to; never local addresses).
    pub fn neighbor_entries(&self) -> usize {
        self.neigh.len()
    }

    /// The binding table (for `explain` and inspection).
    pub fn demux(&self) -> &Demux {
        &self.demux
    }

    /// Is `a` inside a local prefix?
    pub fn is_local(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.is_local4(a),
            IpAddr::V6(a) => self.is_local6(a),
        }
    }

    fn is_local4(&self, a: Ipv4Addr) -> bool {
        self.local4
            .get_lpm(&Ipv4Net::new(a, 32).expect("/32"))
            .is_some()
    }

    fn is_local6(&self, a: Ipv6Addr) -> bool {
        self.local6
            .get_lpm(&Ipv6Net::new(a, 128).expect("/128"))
            .is_some()
    }

    pub(crate) fn drop(&mut self, r: DropReason) {
        self.counters.drop(r);
    }

    // ---- input ------------------------------------------------------------------------

    /// The TCP flow of an Ethernet frame as `(local, remote)` (destination, source), if it is
    /// an unfragmented TCP segment over IPv4 or IPv6 (no extension headers). For steering
    /// frames between shards before they are handled; malformed frames give `None`.
    pub fn tcp_flow_of(frame: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let p = eth.payload();
        let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let ihl = usize::from(*p.first()? & 0x0f) * 4;
                let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff;
                if p.len() < ihl + 4 || ihl < 20 || p[9] != 6 || frag != 0 {
                    return None;
                }
                let a = |o: usize| IpAddr::V4(Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]));
                (a(12), a(16), &p[ihl..])
            }
            EthernetProtocol::Ipv6 => {
                if p.len() < 44 || p[6] != 6 {
                    return None;
                }
                let a = |o: usize| {
                    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).ok()?)).into()
                };
                let (s, d): (Option<IpAddr>, Option<IpAddr>) = (a(8), a(24));
                (s?, d?, &p[40..])
            }
            _ => return None,
        };
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        Some((SocketAddr::new(dst, dport), SocketAddr::new(src, sport)))
    }

    /// Whether the stack has a TCP connection `local <-> remote`.
    pub fn tcp_has_flow(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.tcp.has_flow(local, remote)
    }

    /// Processes one received Ethernet frame.
    pub fn handle_frame(&mut self, now: Duration, frame: &[u8], meta: FrameMeta) {
        self.counters.rx_frames += 1;
        self.counters.rx_gso_frames += u64::from(meta.gso.is_some());
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return self.drop(DropReason::EthTruncated);
        };
        let dst = eth.dst_addr().0;
        let ours = dst == self.cfg.mac || dst == BROADCAST || (dst[..3] == [0x33, 0x33, 0xff]);
        if !ours {
            return self.drop(DropReason::EthNotForUs);
        }
        let src_mac = eth.src_addr().0;
        match eth.ethertype() {
            EthernetProtocol::Arp => self.rx_arp(now, eth.payload()),
            EthernetProtocol::Ipv4 => self.rx_ipv4(now, eth.payload(), meta),
            EthernetProtocol::Ipv6 => self.rx_ipv6(now, src_mac, eth.payload(), meta),
            _ => self.drop(DropReason::EthUnknownType),
        }
    }

    fn rx_arp(&mut self, now: Duration, b: &[u8]) {
        let repr = ArpPacket::new_checked(b).and_then(|p| ArpRepr::parse(&p));
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = repr
        else {
            return self.drop(DropReason::ArpMalformed);
        };
        let for_us = self.is_local4(target_protocol_addr);
        // RFC 826: refresh a known sender; add it when the packet is for us.
        if !source_protocol_addr.is_unspecified() {
            self.learn_neighbor(
                now,
                source_protocol_addr.into(),
                source_hardware_addr.0,
                for_us,
            );
        }
        if !for_us {
            return self.drop(DropReason::ArpNotLocal);
        }
        if operation == ArpOperation::Request {
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(self.cfg.mac),
                source_protocol_addr: target_protocol_addr,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: source_protocol_addr,
            };
            self.send_arp(source_hardware_addr.0, &reply);
            self.counters.neighbor_replies += 1;
        }
    }

    fn rx_ipv4(&mut self, now: Duration, b: &[u8], meta: FrameMeta) {
        if b.len() < 20 {
            return self.drop(DropReason::Ipv4Truncated);
        }
        let p = Ipv4Packet::new_unchecked(b);
        if p.version() != 4 {
            return self.drop(DropReason::Ipv4BadVersion);
        }
        let hl = usize::from(p.header_len());
        if hl < 20 || hl > b.len() {
            return self.drop(DropReason::Ipv4BadHeaderLen);
        }
        let total = usize::from(p.total_len());
        if total < hl || total > b.len() {
            return self.drop(DropReason::Ipv4BadTotalLen);
        }
        if !p.verify_checksum() {
            return self.drop(DropReason::Ipv4BadChecksum);
        }
        let (src, dst) = (p.src_addr(), p.dst_addr());
        if !self.is_local4(dst) {
            return self.drop(DropReason::NotLocal);
        }
        if src.is_multicast() || src.is_broadcast() || src.is_unspecified() {
            return self.drop(DropReason::Ipv4BadSource);
        }
        let proto = p.next_header();
        let ttl = p.hop_limit();
        let payload = &b[hl..total];
        if p.more_frags() || p.frag_offset() != 0 {
            let key = FragKey {
                src: src.into(),
                dst: dst.into(),
                proto: u8::from(proto),
                ident: u32::from(p.ident()),
            };
            let offset = usize::from(p.frag_offset());
            match self
                .reasm
                .add(key, offset, p.more_frags(), payload, None, now)
            {
                Err(r) => self.drop(r),
                Ok(None) => {}
                Ok(Some(c)) => {
                    self.counters.reassembled += 1;
                    let l4 = IpL4 {
                        src: src.into(),
                        dst: dst.into(),
                        proto,
                        hop: ttl,
                    };
                    self.rx_l4(now, l4, &c.payload, FrameMeta::default());
                }
            }
            return;
        }
        let l4 = IpL4 {
            src: src.into(),
            dst: dst.into(),
            proto,
            hop: ttl,
        };
        self.rx_l4(now, l4, payload, meta);
    }

    fn rx_ipv6(&mut self, now: Duration, src_mac: Mac, b: &[u8], meta: FrameMeta) {
        if b.len() < 40 {
            return self.drop(DropReason::Ipv6Truncated);
        }
        let p = Ipv6Packet::new_unchecked(b);
        if p.version() != 6 {
            return self.drop(DropReason::Ipv6BadVersion);
        }
        let end = 40 + usize::from(p.payload_len());
        if end > b.len() {
            return self.drop(DropReason::Ipv6BadPayloadLen);
        }
        let (src, dst) = (p.src_addr(), p.dst_addr());
        if src.is_multicast() {
            return self.drop(DropReason::Ipv6BadSource);
        }
        let ndp_multicast = is_solicited_node(dst);
        if !ndp_multicast && !self.is_local6(dst) {
            return self.drop(DropReason::NotLocal);
        }
        let hop = p.hop_limit();
        // Walk the extension header chain (RFC 8200 §4).
        let mut next = p.next_header();
        let mut off = 40;
        let mut frag: Option<(usize, bool, u32)> = None;
        for i in 0.. {
            if i == 8 {
                return self.drop(DropReason::Ipv6BadExtHeader);
            }
            match u8::from(next) {
                0 | 43 | 60 => {
                    // Hop-by-hop (first only), routing, destination options: next, length.
                    if (u8::from(next) == 0 && i != 0) || off + 8 > end {
                        return self.drop(DropReason::Ipv6BadExtHeader);
                    }
                    let len = (usize::from(b[off + 1]) + 1) * 8;
                    if off + len > end {
                        return self.drop(DropReason::Ipv6BadExtHeader);
                    }
                    // A routing header with segments left asks us to forward: we do not.
                    if u8::from(next) == 43 && b[off + 3] != 0 {
                        return self.drop(DropReason::Ipv6RoutingHeader);
                    }
                    next = IpProtocol::from(b[off]);
                    off += len;
                }
                44 => {
                    // Fragment header: next, reserved, offset(13 bits)|res|M, identification.
                    if off + 8 > end || frag.is_some() {
                        return self.drop(DropReason::Ipv6BadExtHeader);
                    }
                    let om = u16::from_be_bytes([b[off + 2], b[off + 3]]);
                    let ident =
                        u32::from_be_bytes([b[off + 4], b[off + 5], b[off + 6], b[off + 7]]);
                    frag = Some((usize::from(om & !7), om & 1 == 1, ident));
                    next = IpProtocol::from(b[off]);
                    off += 8;
                    break;
                }
                _ => break,
            }
        }
        let src = IpAddr::V6(src);
        let dst = IpAddr::V6(dst);
        if let Some((offset, more, ident)) = frag {
            if offset == 0 && !more {
                // An atomic fragment (RFC 6946): process as is.
            } else {
                let key = FragKey {
                    src,
                    dst,
                    proto: 0,
                    ident,
                };
                let first = (offset == 0).then_some(u8::from(next));
                match self.reasm.add(key, offset, more, &b[off..end], first, now) {
                    Err(r) => self.drop(r),
                    Ok(None) => {}
                    Ok(Some(c)) => {
                        self.counters.reassembled += 1;
                        let Some(n) = c.next else {
                            return self.drop(DropReason::FragMalformed);
                        };
                        let l4 = IpL4 {
                            src,
                            dst,
                            proto: IpProtocol::from(n),
                            hop,
                        };
                        self.rx_l4(now, l4, &c.payload, FrameMeta::default());
                    }
                }
                return;
            }
        }
        if ndp_multicast && next != IpProtocol::Icmpv6 {
            return self.drop(DropReason::NotLocal);
        }
        let _ = src_mac;
        let l4 = IpL4 {
            src,
            dst,
            proto: next,
            hop,
        };
        self.rx_l4(now, l4, &b[off..end], meta);
    }

    fn rx_l4(&mut self, now: Duration, ip: IpL4, payload: &[u8], meta: FrameMeta) {
        match ip.proto {
            IpProtocol::Udp => self.rx_udp(now, ip, payload, meta),
            IpProtocol::Tcp => self.rx_tcp(now, ip, payload, meta),
            IpProtocol::Icmp if ip.src.is_ipv4() => self.rx_icmpv4(now, ip, payload),
            IpProtocol::Icmpv6 if ip.src.is_ipv6() => self.rx_icmpv6(now, ip, payload),
            _ => self.drop(DropReason::NoProtocol),
        }
    }

    fn rx_icmpv4(&mut self, now: Duration, ip: IpL4, b: &[u8]) {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
            return;
        };
        let caps = CAPS();
        let Ok(pkt) = Icmpv4Packet::new_checked(b) else {
            return self.drop(DropReason::IcmpMalformed);
        };
        if !pkt.verify_checksum() {
            return self.drop(DropReason::IcmpMalformed);
        }
        // Errors quote our packet, usually cut short (RFC 792 asks for 8 bytes past the IP
        // header; Linux fills 576): read the quote by hand, since the codec insists on the
        // whole quoted packet.
        if pkt.msg_type() == Icmpv4Message::DstUnreachable {
            let d = pkt.data();
            let ihl = usize::from(d.first().map_or(0, |b| b & 0x0f)) * 4;
            if d.len() < 20 || d[0] >> 4 != 4 || ihl < 20 || d.len() < ihl + 8 {
                return self.drop(DropReason::IcmpMalformed);
            }
            let quoted_src = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
            let quoted_dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
            let kind = match Icmpv4DstUnreachable::from(pkt.msg_code()) {
                Icmpv4DstUnreachable::PortUnreachable => UdpErrorKind::PortUnreachable,
                Icmpv4DstUnreachable::FragRequired => {
                    UdpErrorKind::PacketTooBig(u32::from(u16::from_be_bytes([b[6], b[7]])))
                }
                r => UdpErrorKind::Unreachable(u8::from(r)),
            };
            return self.icmp_error_to_socket(
                now,
                quoted_src.into(),
                quoted_dst.into(),
                IpProtocol::from(d[9]),
                &d[ihl..],
                kind,
            );
        }
        match Icmpv4Repr::parse(&pkt, &caps) {
            // Well formed (the checksum holds) but of a type or shape we do not act on.
            Err(_) => self.drop(DropReason::IcmpUnhandled),
            Ok(Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            }) => {
                let reply = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.send_icmpv4(now, dst, src, &reply);
                self.counters.echo_replies += 1;
            }
            Ok(_) => self.drop(DropReason::IcmpUnhandled),
        }
    }

    fn rx_icmpv6(&mut self, now: Duration, ip: IpL4, b: &[u8]) {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (ip.src, ip.dst) else {
            return;
        };
        let caps = CAPS();
        // Errors quote our packet, cut to fit 1280 bytes: read the quote by hand (see v4).
        if let Ok(p) = Icmpv6Packet::new_checked(b) {
            let t = p.msg_type();
            if t == Icmpv6Message::DstUnreachable || t == Icmpv6Message::PktTooBig {
                if !p.verify_checksum(&src, &dst) {
                    return self.drop(DropReason::IcmpMalformed);
                }
                let d = &b[8..];
                if d.len() < 48 || d[0] >> 4 != 6 {
                    return self.drop(DropReason::IcmpMalformed);
                }
                let addr =
                    |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&d[o..o + 16]).expect("16"));
                let kind = if t == Icmpv6Message::PktTooBig {
                    UdpErrorKind::PacketTooBig(u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
                } else if Icmpv6DstUnreachable::from(p.msg_code())
                    == Icmpv6DstUnreachable::PortUnreachable
                {
                    UdpErrorKind::PortUnreachable
                } else {
                    UdpErrorKind::Unreachable(p.msg_code())
                };
                return self.icmp_error_to_socket(
                    now,
                    addr(8).into(),
                    addr(24).into(),
                    IpProtocol::from(d[6]),
                    &d[40..],
                    kind,
                );
            }
        }
        let repr =
            Icmpv6Packet::new_checked(b).and_then(|p| Icmpv6Repr::parse(&src, &dst, &p, &caps));
        let repr = match repr {
            Err(_) => return self.drop(DropReason::IcmpMalformed),
            Ok(r) => r,
        };
        let multicast = dst.is_multicast();
        match repr {
            Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } if !multicast => {
                let reply = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.send_icmpv6(now, dst, src, 64, &reply);
                self.counters.echo_replies += 1;
            }
            Icmpv6Repr::Ndisc(n) => {
                if ip.hop != 255 {
                    return self.drop(DropReason::NdpBadHopLimit);
                }
                match n {
                    NdiscRepr::NeighborSolicit {
                        target_addr,
                        lladdr,
                    } => {
                        if !self.is_local6(target_addr) {
                            return self.drop(DropReason::NdpNotLocal);
                        }
                        if let (false, Some(ll)) = (src.is_unspecified(), lladdr) {
                            if let Ok(mac) = <[u8; 6]>::try_from(ll.as_bytes()) {
                                self.learn_neighbor(now, src.into(), mac, true);
                            }
                        }
                        // Duplicate address detection (unspecified source) gets a multicast answer.
                        let (to, flags) = if src.is_unspecified() {
                            (
                                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                                NdiscNeighborFlags::OVERRIDE,
                            )
                        } else {
                            (
                                src,
                                NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
                            )
                        };
                        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                            flags,
                            target_addr,
                            lladdr: Some(EthernetAddress(self.cfg.mac).into()),
                        });
                        self.send_icmpv6(now, target_addr, to, 255, &na);
                        self.counters.neighbor_replies += 1;
                    }
                    NdiscRepr::NeighborAdvert {
                        target_addr,
                        lladdr: Some(ll),
                        ..
                    } => {
                        if let Ok(mac) = <[u8; 6]>::try_from(ll.as_bytes()) {
                            self.learn_neighbor(now, target_addr.into(), mac, false);
                        }
                    }
                    _ => self.drop(DropReason::IcmpUnhandled),
                }
            }
            _ => self.drop(DropReason::IcmpUnhandled),
        }
    }

    /// Hands an ICMP error about a datagram we sent (`local` -> `remote`) to its socket.
    fn icmp_error_to_socket(
        &mut self,
        now: Duration,
        local: IpAddr,
        remote: IpAddr,
        proto: IpProtocol,
        data: &[u8],
        kind: UdpErrorKind,
    ) {
        if proto == IpProtocol::Tcp && data.len() >= 8 && self.is_local(local) {
            return self.tcp_icmp(now, local, remote, data, kind);
        }
        if proto != IpProtocol::Udp || data.len() < 8 || !self.is_local(local) {
            return self.drop(DropReason::IcmpUnhandled);
        }
        let lport = u16::from_be_bytes([data[0], data[1]]);
        let rport = u16::from_be_bytes([data[2], data[3]]);
        let Ok(flow) = Flow::new(remote, rport, local, lport) else {
            return self.drop(DropReason::IcmpUnhandled);
        };
        let Some(hit) = self.demux.snapshot().lookup(Protocol::Udp, &flow) else {
            return self.drop(DropReason::IcmpUnhandled);
        };
        if let Some(Some(s)) = self.udp.get_mut(hit.listener.0 as usize) {
            if s.errors.len() >= MAX_SOCKET_ERRORS {
                s.errors.pop_front();
            }
            s.errors.push_back(UdpError {
                local: SocketAddr::new(local, lport),
                remote: SocketAddr::new(remote, rport),
                kind,
            });
        }
    }

    fn rx_udp(&mut self, now: Duration, ip: IpL4, b: &[u8], meta: FrameMeta) {
        if b.len() < 8 {
            return self.drop(DropReason::UdpMalformed);
        }
        let p = UdpPacket::new_unchecked(b);
        let len = usize::from(p.len());
        if len < 8 || len > b.len() {
            return self.drop(DropReason::UdpMalformed);
        }
        let p = UdpPacket::new_unchecked(&b[..len]);
        let zero = p.checksum() == 0;
        if zero && ip.src.is_ipv6() {
            return self.drop(DropReason::UdpZeroChecksumV6);
        }
        // Frames the kernel hands over with a partial or vouched checksum need no check.
        if meta.csum == Csum::Complete
            && !zero
            && !p.verify_checksum(&ip.src.into(), &ip.dst.into())
        {
            return self.drop(DropReason::UdpBadChecksum);
        }
        let (sport, dport) = (p.src_port(), p.dst_port());
        let flow = Flow::new(ip.src, sport, ip.dst, dport).expect("one family per packet");
        let hit = self.demux.snapshot().lookup(Protocol::Udp, &flow);
        let Some(hit) = hit else {
            self.drop(DropReason::UdpNoBinding);
            return self.icmp_port_unreachable(now, ip, &b[..len]);
        };
        let Some(Some(s)) = self.udp.get_mut(hit.listener.0 as usize) else {
            return self.drop(DropReason::UdpNoBinding);
        };
        if s.queue.len() >= self.cfg.udp_queue {
            s.stats.dropped += 1;
            return self.drop(DropReason::UdpQueueFull);
        }
        let mut payload = self.pool.pop().unwrap_or_default();
        payload.clear();
        payload.extend_from_slice(p.payload());
        let s = self.udp[hit.listener.0 as usize].as_mut().expect("checked");
        s.queue.push_back(Datagram {
            payload,
            src: SocketAddr::new(ip.src, sport),
            dst: SocketAddr::new(ip.dst, dport),
        });
        s.stats.received += 1;
        self.counters.udp_delivered += 1;
    }

    /// Takes an ICMP error token; counts a drop when none is left.
    fn icmp_token(&mut self, now: Duration) -> bool {
        let rate = u64::from(self.cfg.icmp_errors_per_sec.max(1));
        let step = Duration::from_nanos(1_000_000_000 / rate);
        while self.icmp_refill + step <= now && self.icmp_tokens < self.cfg.icmp_error_burst {
            self.icmp_refill += step;
            self.icmp_tokens += 1;
        }
        if self.icmp_tokens >= self.cfg.icmp_error_burst {
            self.icmp_refill = now;
        }
        if self.icmp_tokens == 0 {
            self.drop(DropReason::IcmpRateLimited);
            return false;
        }
        self.icmp_tokens -= 1;
        true
    }

    fn icmp_port_unreachable(&mut self, now: Duration, ip: IpL4, l4: &[u8]) {
        if !self.icmp_token(now) {
            return;
        }
        match (ip.src, ip.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                // RFC 1812 4.3.2.3: as much of the original as fits in 576 bytes.
                let data = &l4[..l4.len().min(576 - 20 - 8 - 20)];
                let repr = Icmpv4Repr::DstUnreachable {
                    reason: Icmpv4DstUnreachable::PortUnreachable,
                    header: Ipv4Repr {
                        src_addr: src,
                        dst_addr: dst,
                        next_header: IpProtocol::Udp,
                        payload_len: data.len(),
                        hop_limit: ip.hop,
                    },
                    data,
                };
                self.send_icmpv4(now, dst, src, &repr);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                // RFC 4443 2.4(c): as much as fits in the minimum MTU.
                let data = &l4[..l4.len().min(1280 - 40 - 8 - 40)];
                let repr = Icmpv6Repr::DstUnreachable {
                    reason: Icmpv6DstUnreachable::PortUnreachable,
                    header: Ipv6Repr {
                        src_addr: src,
                        dst_addr: dst,
                        next_header: IpProtocol::Udp,
                        payload_len: data.len(),
                        hop_limit: ip.hop,
                    },
                    data,
                };
                self.send_icmpv6(now, dst, src, 64, &repr);
            }
            _ => {}
        }
    }

    // ---- output -----------------------------------------------------------------------

    pub(crate) fn alloc(&mut self, len: usize) -> Vec<u8> {
        self.alloc_for(len, len)
    }

    /// A buffer of `len` zero bytes with room for `cap` (a frame whose payload is appended).
    pub(crate) fn alloc_for(&mut self, len: usize, cap: usize) -> Vec<u8> {
        // Frame buffers are reserved at a full frame at least, so that a reused one never
        // grows (a pure ACK's buffer serves a data segment next).
        let (pool, cap) = if cap > SMALL_BUF {
            (&mut self.pool_big, cap)
        } else {
            let full = (self.cfg.mtu + 14).min(SMALL_BUF);
            (&mut self.pool, cap.max(full))
        };
        let mut f = pool.pop().unwrap_or_default();
        f.clear();
        f.reserve(cap);
        f.resize(len, 0);
        f
    }

    /// Keeps a buffer for reuse: up to 1,024 frame-sized ones and 16 larger ones (a burst of
    /// super-frames must not leave megabytes behind).
    pub(crate) fn recycle(&mut self, f: impl Into<Vec<u8>>) {
        let f = f.into();
        let (pool, max) = if f.capacity() > SMALL_BUF {
            (&mut self.pool_big, 16)
        } else {
            (&mut self.pool, 1024)
        };
        if pool.len() < max {
            pool.push(f);
        }
    }

    fn queue_tx(&mut self, f: impl Into<TxFrame>) {
        let f = f.into();
        if self.tx.len() >= self.cfg.tx_queue {
            self.drop(DropReason::TxQueueFull);
            return self.recycle(f);
        }
        self.tx.push_back(f);
    }

    pub(crate) fn eth_header(&self, f: &mut [u8], dst: Mac, ethertype: EthernetProtocol) {
        EthernetRepr {
            src_addr: EthernetAddress(self.cfg.mac),
            dst_addr: EthernetAddress(dst),
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(f));
    }

    fn send_arp(&mut self, dst: Mac, repr: &ArpRepr) {
        let mut f = self.alloc(14 + repr.buffer_len());
        self.eth_header(&mut f, dst, EthernetProtocol::Arp);
        repr.emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
        self.queue_tx(f);
    }

    fn send_icmpv4(&mut self, now: Duration, src: Ipv4Addr, dst: Ipv4Addr, repr: &Icmpv4Repr) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(repr.buffer_len(), 0);
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]), &CAPS());
        self.send_ip(now, src.into(), dst.into(), IpProtocol::Icmp, 64, &buf);
        self.scratch = buf;
    }

    fn send_icmpv6(
        &mut self,
        now: Duration,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop: u8,
        repr: &Icmpv6Repr,
    ) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(repr.buffer_len(), 0);
        repr.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
            &CAPS(),
        );
        self.send_ip(now, src.into(), dst.into(), IpProtocol::Icmpv6, hop, &buf);
        self.scratch = buf;
    }

    /// Sends an IP packet carrying `l4`, fragmenting it to the MTU if needed.
    fn send_ip(
        &mut self,
        now: Duration,
        src: IpAddr,
        dst: IpAddr,
        proto: IpProtocol,
        hop: u8,
        l4: &[u8],
    ) {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let max = self.cfg.mtu - 20;
                let ident = self.next_ident() as u16;
                let chunk = if l4.len() <= max { max } else { max & !7 };
                for (i, part) in l4.chunks(chunk.max(8)).enumerate() {
                    let off = i * chunk;
                    let more = off + part.len() < l4.len();
                    let mut f = self.alloc(14 + 20 + part.len());
                    self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv4);
                    let repr = Ipv4Repr {
                        src_addr: s,
                        dst_addr: d,
                        next_header: proto,
                        payload_len: part.len(),
                        hop_limit: hop,
                    };
                    let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                    repr.emit(&mut p, &CAPS());
                    p.set_ident(ident);
                    p.set_dont_frag(l4.len() <= max);
                    p.set_more_frags(more);
                    p.set_frag_offset(off as u16);
                    p.fill_checksum();
                    f[34..].copy_from_slice(part);
                    self.route(now, src, dst, f);
                }
                if l4.is_empty() {
                    let mut f = self.alloc(34);
                    self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv4);
                    let repr = Ipv4Repr {
                        src_addr: s,
                        dst_addr: d,
                        next_header: proto,
                        payload_len: 0,
                        hop_limit: hop,
                    };
                    repr.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]), &CAPS());
                    self.route(now, src, dst, f);
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let max = self.cfg.mtu - 40;
                if l4.len() <= max {
                    let mut f = self.alloc(14 + 40 + l4.len());
                    self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv6);
                    Ipv6Repr {
                        src_addr: s,
                        dst_addr: d,
                        next_header: proto,
                        payload_len: l4.len(),
                        hop_limit: hop,
                    }
                    .emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
                    f[54..].copy_from_slice(l4);
                    return self.route(now, src, dst, f);
                }
                let ident = self.next_ident();
                let chunk = (max - 8) & !7;
                for (i, part) in l4.chunks(chunk).enumerate() {
                    let off = i * chunk;
                    let more = off + part.len() < l4.len();
                    let mut f = self.alloc(14 + 40 + 8 + part.len());
                    self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv6);
                    Ipv6Repr {
                        src_addr: s,
                        dst_addr: d,
                        next_header: IpProtocol::Ipv6Frag,
                        payload_len: 8 + part.len(),
                        hop_limit: hop,
                    }
                    .emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
                    let h = &mut f[54..62];
                    h[0] = u8::from(proto);
                    h[1] = 0;
                    h[2..4].copy_from_slice(&((off as u16) | u16::from(more)).to_be_bytes());
                    h[4..8].copy_from_slice(&ident.to_be_bytes());
                    f[62..].copy_from_slice(part);
                    self.route(now, src, dst, f);
                }
            }
            _ => {}
        }
    }

    pub(crate) fn next_ident(&mut self) -> u32 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
    }

    /// Sends a frame (destination MAC to fill) towards `dst`: multicast maps directly, unicast
    /// goes through the neighbour cache.
    fn route(&mut self, now: Duration, src: IpAddr, dst: IpAddr, f: Vec<u8>) {
        self.route_meta(now, src, dst, TxFrame::from(f));
    }

    /// [`route`](Self::route) for a frame with offload metadata.
    pub(crate) fn route_meta(&mut self, now: Duration, src: IpAddr, dst: IpAddr, mut f: TxFrame) {
        if let IpAddr::V6(d) = dst {
            if d.is_multicast() {
                f[..6].copy_from_slice(&multicast_mac(d));
                return self.queue_tx(f);
            }
        }
        let hop = match dst {
            IpAddr::V4(d) => self
                .cfg
                .gateway_v4
                .filter(|_| !self.is_local4(d))
                .map_or(dst, IpAddr::V4),
            IpAddr::V6(d) if d.is_unicast_link_local() => dst,
            IpAddr::V6(d) => self
                .cfg
                .gateway_v6
                .filter(|_| !self.is_local6(d))
                .map_or(dst, IpAddr::V6),
        };
        match self.neigh.resolve(hop, src, f, now) {
            Resolve::Send(mac, mut f) => {
                f[..6].copy_from_slice(&mac);
                self.queue_tx(f);
            }
            Resolve::SendAndSolicit(mac, mut f) => {
                f[..6].copy_from_slice(&mac);
                self.queue_tx(f);
                self.solicit(now, hop, src);
            }
            Resolve::Queued { solicit } => {
                if solicit {
                    self.solicit(now, hop, src);
                }
            }
            Resolve::Dropped(f, r) => {
                self.drop(r);
                self.recycle(f);
            }
        }
    }

    /// Asks for `hop`'s MAC: ARP request or neighbour solicitation, from local address `src`.
    fn solicit(&mut self, now: Duration, hop: IpAddr, src: IpAddr) {
        match (hop, src) {
            (IpAddr::V4(h), IpAddr::V4(s)) => {
                let req = ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    source_hardware_addr: EthernetAddress(self.cfg.mac),
                    source_protocol_addr: s,
                    target_hardware_addr: EthernetAddress([0; 6]),
                    target_protocol_addr: h,
                };
                self.send_arp(BROADCAST, &req);
            }
            (IpAddr::V6(h), IpAddr::V6(s)) => {
                let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                    target_addr: h,
                    lladdr: Some(EthernetAddress(self.cfg.mac).into()),
                });
                self.send_icmpv6(now, s, solicited_node(h), 255, &ns);
            }
            _ => {}
        }
    }

    /// Moves frames to transmit into the free buffers of `out`; returns how many.
    pub fn poll_transmit(&mut self, out: &mut Batch) -> usize {
        self.tcp_flush();
        let mut n = 0;
        while !out.is_full() {
            let Some(f) = self.tx.pop_front() else { break };
            // The frame's buffer moves into the batch (no copy); the one it replaces is reused.
            match out.push_owned(f.data, f.meta) {
                Ok(old) => {
                    n += 1;
                    self.counters.tx_frames += 1;
                    self.recycle(old);
                }
                Err(data) => {
                    self.drop(DropReason::TxQueueFull);
                    self.recycle(data);
                }
            }
        }
        n
    }

    /// Frames waiting for [`poll_transmit`](Self::poll_transmit) (TCP segments for what the
    /// application wrote since the last call are built by that call, and not counted here).
    pub fn pending_transmit(&self) -> usize {
        self.tx.len()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<Duration> {
        [
            self.neigh.next_deadline(),
            self.reasm.next_deadline(),
            self.tcp.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs timers: neighbour retries and give-ups, reassembly timeouts.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.tcp_flush();
        // Each part only when due: this runs whenever anything is (a flush, a TCP timer).
        if self.neigh.next_deadline().is_some_and(|t| t <= now) {
            let (again, dead) = self.neigh.poll(now);
            for (hop, src) in again {
                self.solicit(now, hop, src);
            }
            for f in dead {
                self.drop(DropReason::NeighborUnreachable);
                self.recycle(f);
            }
        }
        if self.reasm.next_deadline().is_some_and(|t| t <= now) {
            for _ in 0..self.reasm.poll(now) {
                self.drop(DropReason::FragTimeout);
            }
        }
        self.tcp_timers(now);
    }

    // ---- UDP sockets -------------------------------------------------------------------

    /// Binds a UDP socket to `(prefix, ports)` (see the demux's bind rules).
    pub fn udp_bind(
        &mut self,
        prefix: IpNet,
        ports: PortSpec,
        reuseport: bool,
    ) -> Result<UdpHandle, BindError> {
        let idx = self.free_udp.pop().unwrap_or(self.udp.len() as u32);
        let mut b = Binding::new(Protocol::Udp, prefix, ports, ListenerId(u64::from(idx)));
        b.reuseport = reuseport;
        let binding = match self.demux.bind(b) {
            Ok(id) => id,
            Err(e) => {
                if (idx as usize) < self.udp.len() {
                    self.free_udp.push(idx);
                }
                return Err(e);
            }
        };
        let s = UdpSock {
            binding,
            queue: VecDeque::new(),
            errors: VecDeque::new(),
            stats: UdpSocketStats::default(),
        };
        if (idx as usize) == self.udp.len() {
            self.udp.push(Some(s));
        } else {
            self.udp[idx as usize] = Some(s);
        }
        Ok(UdpHandle(idx))
    }

    /// Closes a socket; queued datagrams are dropped.
    pub fn udp_close(&mut self, h: UdpHandle) {
        if let Some(s) = self.udp.get_mut(h.0 as usize).and_then(Option::take) {
            let _ = self.demux.unbind(s.binding);
            self.free_udp.push(h.0);
            for d in s.queue {
                self.recycle(d.payload);
            }
        }
    }

    fn sock(&mut self, h: UdpHandle) -> Option<&mut UdpSock> {
        self.udp.get_mut(h.0 as usize).and_then(Option::as_mut)
    }

    /// The next datagram, if any.
    pub fn udp_recv(&mut self, h: UdpHandle) -> Option<Datagram> {
        self.sock(h)?.queue.pop_front()
    }

    /// The next datagram copied into `buf` (truncated to it); returns its length, source and
    /// local destination. The stack reuses the datagram's buffer.
    pub fn udp_recv_into(
        &mut self,
        h: UdpHandle,
        buf: &mut [u8],
    ) -> Option<(usize, SocketAddr, SocketAddr)> {
        let d = self.sock(h)?.queue.pop_front()?;
        let n = d.payload.len().min(buf.len());
        buf[..n].copy_from_slice(&d.payload[..n]);
        let r = (n, d.src, d.dst);
        self.recycle(d.payload);
        Some(r)
    }

    /// The oldest ICMP error about this socket's sends.
    pub fn udp_take_error(&mut self, h: UdpHandle) -> Option<UdpError> {
        self.sock(h)?.errors.pop_front()
    }

    /// Socket counters.
    pub fn udp_stats(&mut self, h: UdpHandle) -> Option<UdpSocketStats> {
        let s = self.sock(h)?;
        Some(UdpSocketStats {
            queued: s.queue.len(),
            ..s.stats
        })
    }

    /// Sends a datagram from `src` (inside a local prefix) to `dst`.
    pub fn udp_send(
        &mut self,
        now: Duration,
        h: UdpHandle,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if self.sock(h).is_none() {
            return Err(SendError::UnknownSocket);
        }
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(SendError::FamilyMismatch);
        }
        if src.port() == 0 || dst.port() == 0 {
            return Err(SendError::PortZero);
        }
        if !self.is_local(src.ip()) {
            return Err(SendError::NonLocalSource(src.ip()));
        }
        let max = if src.is_ipv4() {
            65535 - 20 - 8
        } else {
            65535 - 8
        };
        if payload.len() > max {
            return Err(SendError::TooLarge(payload.len()));
        }
        let mut l4 = std::mem::take(&mut self.scratch);
        l4.clear();
        l4.resize(8 + payload.len(), 0);
        UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        }
        .emit(
            &mut UdpPacket::new_unchecked(&mut l4[..]),
            &src.ip().into(),
            &dst.ip().into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &CAPS(),
        );
        self.send_ip(now, src.ip(), dst.ip(), IpProtocol::Udp, 64, &l4);
        self.scratch = l4;
        self.counters.udp_sent += 1;
        Ok(())
    }
}

/// Addresses and protocol of a packet being delivered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IpL4 {
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    hop: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pools_keep_few_large_buffers() {
        let mut s = Stack::new(Config::new([2, 0, 0, 0, 0, 1], Vec::new())).unwrap();
        let big: Vec<Vec<u8>> = (0..100).map(|_| s.alloc_for(60, 65_000)).collect();
        let small: Vec<Vec<u8>> = (0..100).map(|_| s.alloc(1514)).collect();
        for f in big.into_iter().chain(small) {
            s.recycle(f);
        }
        assert_eq!((s.pool_big.len(), s.pool.len()), (16, 100));
        // A super-frame's buffer comes from the large ones, a frame's from the small ones.
        let f = s.alloc_for(60, 65_000);
        assert!(f.capacity() >= 65_000 && f.len() == 60);
        assert_eq!(s.pool_big.len(), 15);
        let f = s.alloc(100);
        assert!(f.capacity() < SMALL_BUF);
    }
}
