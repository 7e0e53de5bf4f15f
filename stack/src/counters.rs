//! Per-reason drop counters: every frame the stack does not use is counted under one reason.

use std::fmt;

macro_rules! reasons {
    ($($name:ident => $text:literal,)*) => {
        /// Why a frame (or a datagram, or a queued packet) was dropped.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum DropReason {
            $(
                #[doc = $text]
                $name,
            )*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];

            /// A stable snake_case name (for metrics).
            pub fn name(self) -> &'static str {
                match self {
                    $(DropReason::$name => stringify!($name),)*
                }
            }

            /// What it means.
            pub fn describe(self) -> &'static str {
                match self {
                    $(DropReason::$name => $text,)*
                }
            }
        }
    };
}

reasons! {
    EthTruncated => "Ethernet frame shorter than its header",
    EthNotForUs => "destination MAC is neither ours, broadcast nor a solicited-node multicast",
    EthUnknownType => "EtherType other than ARP, IPv4, IPv6",
    ArpMalformed => "ARP packet that does not parse as Ethernet/IPv4 ARP",
    ArpNotLocal => "ARP request for an address outside the local prefixes",
    Ipv4Truncated => "IPv4 packet shorter than 20 bytes",
    Ipv4BadVersion => "IPv4 version field is not 4",
    Ipv4BadHeaderLen => "IPv4 IHL below 5 or past the packet",
    Ipv4BadTotalLen => "IPv4 total length below the header or past the frame",
    Ipv4BadChecksum => "IPv4 header checksum mismatch",
    Ipv4BadSource => "IPv4 source is multicast, broadcast or unspecified",
    Ipv6Truncated => "IPv6 packet shorter than 40 bytes",
    Ipv6BadVersion => "IPv6 version field is not 6",
    Ipv6BadPayloadLen => "IPv6 payload length past the frame",
    Ipv6BadSource => "IPv6 source is multicast",
    Ipv6BadExtHeader => "IPv6 extension header truncated, misplaced or too many",
    Ipv6RoutingHeader => "IPv6 routing header with segments left (we do not forward)",
    NotLocal => "destination outside the local prefixes",
    NoProtocol => "transport protocol not served",
    FragDisabled => "fragment received while reassembly is off",
    FragMalformed => "fragment with a bad offset or length",
    FragOverlap => "fragment overlapping another of its datagram",
    FragTooBig => "reassembled datagram would pass 65535 bytes",
    FragNoMemory => "reassembly memory limit reached",
    FragTimeout => "datagram not completed before the reassembly timeout",
    IcmpMalformed => "ICMP/ICMPv6 message that does not parse or fails its checksum",
    IcmpUnhandled => "ICMP message type we do not act on",
    NdpBadHopLimit => "NDP message with hop limit other than 255",
    NdpNotLocal => "neighbour solicitation for an address outside the local prefixes",
    UdpMalformed => "UDP header truncated or length field inconsistent",
    UdpBadChecksum => "UDP checksum mismatch",
    UdpZeroChecksumV6 => "UDP over IPv6 with a zero checksum (mandatory in IPv6)",
    UdpNoBinding => "UDP datagram for a local address and port nobody bound",
    UdpQueueFull => "UDP socket receive queue full",
    IcmpRateLimited => "ICMP error not sent: rate limit",
    TcpMalformed => "TCP header truncated or options malformed",
    TcpBadChecksum => "TCP checksum mismatch",
    TcpBadFlags => "TCP segment with SYN and FIN",
    TcpNoBinding => "TCP SYN for a local address and port nobody listens on (answered with RST)",
    TcpNoConnection => "TCP segment for no connection (answered with RST unless it was one)",
    TcpListenOverflow => "TCP SYN dropped: listener accept queue full",
    TcpOutOfWindow => "TCP segment outside the receive window (answered with an ACK unless RST)",
    TcpPaws => "TCP segment with a timestamp older than TS.Recent (PAWS, RFC 7323; answered with an ACK)",
    TcpChallengeAck => "TCP RST or SYN in window but not exact: challenge ACK sent instead (RFC 5961)",
    TcpChallengeAckLimited => "TCP RST or SYN in window but not exact: challenge ACK over its rate limit",
    TcpNoAck => "TCP segment without ACK where one is required",
    TcpBadAck => "TCP handshake ACK for a sequence number we did not send (answered with RST)",
    TcpAckUnsent => "TCP ACK for data not yet sent (answered with an ACK)",
    TcpBadCookie => "TCP ACK that is no connection's and no valid SYN cookie (answered with RST)",
    TcpIcmpStale => "ICMP error about a TCP segment not in flight (RFC 5927), or an MTU not below ours",
    TcpConnLimit => "TCP SYN or cookie ACK dropped: the stack's connection limit is reached",
    TcpListenerLimit => "TCP SYN or cookie ACK dropped: the listener's connection limit is reached",
    TcpHalfOpenLimit => "TCP SYN dropped: half-open connection limit reached and SYN cookies are off",
    TcpMemoryLimit => "TCP SYN or cookie ACK dropped: connection buffer memory over its limit",
    NeighborCacheFull => "packet dropped: neighbour cache full",
    NeighborQueueFull => "packet dropped: too many packets waiting for one neighbour",
    NeighborUnreachable => "packet dropped: next hop did not answer ARP/NDP",
    TxQueueFull => "outgoing frame dropped: transmit queue full",
}

/// Counters of one stack (shard).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames handed to the stack.
    pub rx_frames: u64,
    /// Frames the stack produced.
    pub tx_frames: u64,
    /// Received GSO super-frames (several segments' worth in one frame, from a device with
    /// receive offloads).
    pub rx_gso_frames: u64,
    /// TCP super-frames sent for the device to segment (TSO).
    pub tx_gso_frames: u64,
    /// ICMP/ICMPv6 echo replies sent.
    pub echo_replies: u64,
    /// ARP replies and neighbour advertisements sent.
    pub neighbor_replies: u64,
    /// Datagrams delivered to UDP sockets.
    pub udp_delivered: u64,
    /// Datagrams sent from UDP sockets.
    pub udp_sent: u64,
    /// Datagrams completed by reassembly.
    pub reassembled: u64,
    /// TCP connections that skipped TIME-WAIT because the limit was reached.
    pub tcp_time_wait_skipped: u64,
    /// TIME-WAIT connections ended early by a newer SYN for their 4-tuple (RFC 6191).
    pub tcp_time_wait_reused: u64,
    /// SYN-ACKs sent with a SYN cookie (a listener's SYN queue was full).
    pub tcp_syncookies_sent: u64,
    /// Connections created from a valid SYN cookie.
    pub tcp_syncookies_valid: u64,
    /// Queued connections handed to a reuseport sibling when their listener closed.
    pub tcp_handed_over: u64,
    /// Bytes TCP retransmitted (of connections that have ended).
    pub tcp_retransmitted_bytes: u64,
    /// TCP retransmission timeouts (of connections that have ended).
    pub tcp_timeouts: u64,
    /// TCP fast recoveries (of connections that have ended).
    pub tcp_recoveries: u64,
    /// TCP tail loss probes (of connections that have ended).
    pub tcp_probes: u64,
    /// TCP connections reset because the peer was idle past `TcpConfig::idle_timeout`.
    pub tcp_idle_timeouts: u64,
    drops: Vec<u64>,
}

impl Counters {
    /// Counts a drop.
    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        if self.drops.is_empty() {
            self.drops = vec![0; DropReason::ALL.len()];
        }
        self.drops[r as usize] += 1;
    }

    /// Adds `other`'s counts to these (the runtime sums its shards).
    pub fn add(&mut self, other: &Counters) {
        self.rx_frames += other.rx_frames;
        self.tx_frames += other.tx_frames;
        self.rx_gso_frames += other.rx_gso_frames;
        self.tx_gso_frames += other.tx_gso_frames;
        self.echo_replies += other.echo_replies;
        self.neighbor_replies += other.neighbor_replies;
        self.udp_delivered += other.udp_delivered;
        self.udp_sent += other.udp_sent;
        self.reassembled += other.reassembled;
        self.tcp_time_wait_skipped += other.tcp_time_wait_skipped;
        self.tcp_time_wait_reused += other.tcp_time_wait_reused;
        self.tcp_syncookies_sent += other.tcp_syncookies_sent;
        self.tcp_syncookies_valid += other.tcp_syncookies_valid;
        self.tcp_handed_over += other.tcp_handed_over;
        self.tcp_retransmitted_bytes += other.tcp_retransmitted_bytes;
        self.tcp_timeouts += other.tcp_timeouts;
        self.tcp_recoveries += other.tcp_recoveries;
        self.tcp_probes += other.tcp_probes;
        self.tcp_idle_timeouts += other.tcp_idle_timeouts;
        if self.drops.len() < other.drops.len() {
            self.drops.resize(other.drops.len(), 0);
        }
        for (a, b) in self.drops.iter_mut().zip(&other.drops) {
            *a += b;
        }
    }

    /// Drops counted under `r`.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops.get(r as usize).copied().unwrap_or(0)
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Non-zero drop counters.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.dropped(r)))
            .filter(|&(_, n)| n > 0)
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx {} tx {} (gso in {} out {}) echo {} neigh {} udp in {} out {} reassembled {} tcp retransmitted {} timeouts {} recoveries {} probes {}",
            self.rx_frames,
            self.tx_frames,
            self.rx_gso_frames,
            self.tx_gso_frames,
            self.echo_replies,
            self.neighbor_replies,
            self.udp_delivered,
            self.udp_sent,
            self.reassembled,
            self.tcp_retransmitted_bytes,
            self.tcp_timeouts,
            self.tcp_recoveries,
            self.tcp_probes
        )?;
        for (r, n) in self.drops() {
            write!(f, " {}={n}", r.name())?;
        }
        Ok(())
    }
}
