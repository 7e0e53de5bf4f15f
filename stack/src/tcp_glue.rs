//! TCP in the stack: listeners bound through the demux, the connection table (4-tuple -> slot),
//! SYN handling and accept queues, RST for unbound addresses, timers on the wheel, and the
//! application API.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr};
use smoltcp::wire::{IpProtocol, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
use subnetstack_demux::{BindError, Binding, BindingId, Flow, ListenerId, PortSpec, Protocol};
use subnetstack_ifaces::{Csum, FrameMeta, Gso, GsoKind};

use crate::tcp::cc::Congestion;
use crate::tcp::conn::{window_shift, Conn, Keepalive, SegIn, SegOut, State, TcpConfig, TcpError};
use crate::tcp::cookie::{CookieJar, PERIOD};
use crate::tcp::seq::Seq;
use crate::tcp::wheel::TimerWheel;
use crate::{DropReason, IpL4, Stack, TxFrame, UdpErrorKind};

/// A TCP listener of a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpListenerHandle(u32);

impl TcpListenerHandle {
    /// Its number (the `ListenerId` of its binding in the demux), for logs and metrics.
    pub fn id(self) -> u32 {
        self.0
    }
}

/// A TCP connection of a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpHandle(u32);

/// Why `tcp_connect` failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The local address is outside the local prefixes.
    NonLocalSource(IpAddr),
    /// Local and remote families differ.
    FamilyMismatch,
    /// The remote port is 0.
    PortZero,
    /// No ephemeral port is free for this remote (or the given local port is taken).
    AddrInUse,
    /// The connection or buffer memory limit is reached (`TcpConfig::max_connections`,
    /// `max_buffer_memory`).
    Limit,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::NonLocalSource(a) => {
                write!(f, "local address {a} is outside the local prefixes")
            }
            ConnectError::FamilyMismatch => f.write_str("local and remote address families differ"),
            ConnectError::PortZero => f.write_str("remote port 0"),
            ConnectError::AddrInUse => f.write_str("no free local port for this remote"),
            ConnectError::Limit => f.write_str("TCP connection or buffer memory limit reached"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Why a read or write did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// Nothing to read, or no room to write, now.
    WouldBlock,
    /// Not connected yet (SYN-SENT / SYN-RECEIVED) for reading.
    NotConnected,
    /// Writing after `tcp_close`, or after the connection ended.
    Closed,
    /// The connection ended with this error.
    Failed(TcpError),
    /// No such connection.
    Invalid,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::WouldBlock => f.write_str("would block"),
            IoError::NotConnected => f.write_str("not connected"),
            IoError::Closed => f.write_str("closed"),
            IoError::Failed(e) => write!(f, "{e}"),
            IoError::Invalid => f.write_str("no such connection"),
        }
    }
}

impl std::error::Error for IoError {}

#[derive(Debug)]
struct Listener {
    binding: BindingId,
    prefix: IpNet,
    ports: PortSpec,
    backlog: usize,
    /// Most connections (half-open and open) at once, if limited.
    max_connections: Option<usize>,
    /// Connections in SYN-RECEIVED for this listener (its SYN queue).
    pending: usize,
    accept: VecDeque<u32>,
    /// When the listener last answered with a SYN cookie (ACKs are checked for cookies only
    /// for two periods after).
    last_cookie: Option<Duration>,
    stats: ListenerStats,
}

/// Counters of one TCP listener (per binding, for observability).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// SYNs that reached the listener.
    pub syns: u64,
    /// SYN-ACKs answered with a cookie (its SYN queue was full).
    pub syncookies_sent: u64,
    /// Connections created from a valid cookie.
    pub syncookies_valid: u64,
    /// Connections that completed the handshake (joined the accept queue).
    pub accepted: u64,
    /// SYNs or cookie ACKs dropped because the accept queue was full.
    pub overflows: u64,
    /// Its connections that the peer reset.
    pub resets: u64,
    /// Its connections open now (handshake done, not yet closed).
    pub active: u64,
    /// Bytes its connections delivered to the application.
    pub bytes_in: u64,
    /// Bytes the application queued on its connections.
    pub bytes_out: u64,
}

impl ListenerStats {
    /// Adds `o`'s counts (the runtime sums a binding's listeners over its shards).
    pub fn add(&mut self, o: &ListenerStats) {
        self.syns += o.syns;
        self.syncookies_sent += o.syncookies_sent;
        self.syncookies_valid += o.syncookies_valid;
        self.accepted += o.accepted;
        self.overflows += o.overflows;
        self.resets += o.resets;
        self.active += o.active;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }
}

/// What became of an ACK that matched no connection.
enum CookieAck {
    /// It carried a valid cookie: the connection exists now.
    Created,
    /// A valid cookie, but the listener's accept queue is full.
    AcceptQueueFull,
    /// A valid cookie, but a connection limit is reached.
    Limit(DropReason),
    /// Its listener sent cookies lately, and this one is not valid.
    Bad,
    /// No listener sent cookies lately: an ordinary stray segment.
    NotCookie,
}

#[derive(Debug)]
struct Sock {
    conn: Conn,
    local: SocketAddr,
    remote: SocketAddr,
    /// Passive connections belong to their listener until accepted.
    listener: Option<u32>,
    /// The listener a passive connection came through, for its counters (kept after accept).
    origin: Option<u32>,
    /// Counted in its origin's `active`.
    active: bool,
    accepted: bool,
    app_closed: bool,
    armed: Option<Duration>,
    /// Counted in `Tcp::time_wait`.
    in_time_wait: bool,
    /// Buffer bytes counted in `Tcp::buffer_bytes`.
    mem: usize,
    /// Listed in `Tcp::ready`.
    ready: bool,
    /// Listed in `Tcp::deferred`.
    deferred: bool,
}

impl Sock {
    /// A connection that arrived through listener `l` (SYN-RECEIVED, not yet accepted).
    fn passive(conn: Conn, local: SocketAddr, remote: SocketAddr, l: u32) -> Sock {
        Sock {
            conn,
            local,
            remote,
            listener: Some(l),
            origin: Some(l),
            active: false,
            accepted: false,
            app_closed: false,
            armed: None,
            in_time_wait: false,
            mem: 0,
            ready: false,
            deferred: false,
        }
    }
}

/// TCP state of a stack.
#[derive(Debug)]
pub(crate) struct Tcp {
    cfg: TcpConfig,
    cookies: CookieJar,
    listeners: Vec<Option<Listener>>,
    /// Free slots of `listeners` (so that binding stays O(1) at a million listeners).
    free_listeners: Vec<u32>,
    socks: Vec<Option<Sock>>,
    free: Vec<u32>,
    table: HashMap<(SocketAddr, SocketAddr), u32>,
    wheel: TimerWheel,
    ephemeral: u32,
    /// Connections in TIME-WAIT.
    time_wait: usize,
    /// Passive connections in SYN-RECEIVED (all listeners).
    half_open: usize,
    /// Buffer storage of all connections, bytes.
    buffer_bytes: usize,
    /// Connections the network or a timer touched since `tcp_ready` was last called (kept
    /// only once the application asked: otherwise it would grow with every connection).
    ready: Vec<u32>,
    track_ready: bool,
    /// Connections the application wrote to, read from or closed since the last transmit,
    /// with the time of the first such call: they send at the next `poll_transmit`, so that
    /// what the application does in one round leaves together (a response and its FIN in one
    /// segment, several writes in full segments).
    deferred: Vec<(u32, Duration)>,
    out: Vec<SegOut>,
    fired: Vec<u32>,
}

impl Tcp {
    pub(crate) fn new(cfg: TcpConfig, cookie_secret: [u8; 16]) -> Self {
        Tcp {
            cfg,
            cookies: CookieJar::new(cookie_secret),
            listeners: Vec::new(),
            free_listeners: Vec::new(),
            socks: Vec::new(),
            free: Vec::new(),
            table: HashMap::new(),
            wheel: TimerWheel::default(),
            ephemeral: 0,
            time_wait: 0,
            half_open: 0,
            buffer_bytes: 0,
            ready: Vec::new(),
            deferred: Vec::new(),
            track_ready: false,
            out: Vec::new(),
            fired: Vec::new(),
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Duration> {
        if let Some(&(_, t)) = self.deferred.first() {
            return Some(t);
        }
        self.wheel.next_deadline()
    }

    pub(crate) fn has_flow(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.table.contains_key(&(local, remote))
    }

    /// Why a new connection may not be created now, if it may not.
    fn over_limit(&self) -> Option<DropReason> {
        if self.table.len() - self.time_wait >= self.cfg.max_connections {
            Some(DropReason::TcpConnLimit)
        } else if self.buffer_bytes >= self.cfg.max_buffer_memory {
            Some(DropReason::TcpMemoryLimit)
        } else {
            None
        }
    }
}

fn seg_in<'a>(r: &TcpRepr<'a>) -> SegIn<'a> {
    SegIn {
        seq: Seq(r.seq_number.0 as u32),
        ack: r.ack_number.map(|a| Seq(a.0 as u32)),
        syn: r.control == TcpControl::Syn,
        fin: r.control == TcpControl::Fin,
        rst: r.control == TcpControl::Rst,
        window: r.window_len,
        mss: r.max_seg_size,
        wscale: r.window_scale,
        ts: r.timestamp.map(|t| (t.tsval, t.tsecr)),
        sack_permitted: r.sack_permitted,
        sack: r.sack_ranges.map(|b| b.map(|(l, r)| (Seq(l), Seq(r)))),
        payload: r.payload,
    }
}

/// Writes a segment's options as Linux lays them out, so that captures read the same to people
/// and tools: on a SYN `mss, sackOK, timestamps, nop, wscale` (`nop, nop` in place of an absent
/// sackOK or timestamps' partner); on other segments `nop, nop, timestamps, nop, nop, sack`.
/// Returns their length (a multiple of 4, at most 40: three SACK blocks with timestamps).
fn tcp_options(seg: &SegOut, out: &mut [u8; 40]) -> usize {
    let mut n = 0;
    let mut put = |b: &[u8]| {
        out[n..n + b.len()].copy_from_slice(b);
        n += b.len();
    };
    if let Some(m) = seg.mss {
        put(&[2, 4]);
        put(&m.to_be_bytes());
    }
    match (seg.ts, seg.sack_permitted) {
        (Some((val, ecr)), sack_ok) => {
            put(if sack_ok {
                &[4, 2, 8, 10]
            } else {
                &[1, 1, 8, 10]
            });
            put(&val.to_be_bytes());
            put(&ecr.to_be_bytes());
        }
        (None, true) => put(&[1, 1, 4, 2]),
        (None, false) => {}
    }
    if let Some(w) = seg.wscale {
        put(&[1, 3, 3, w]);
    }
    let blocks = seg.sack.iter().flatten().count();
    if blocks > 0 {
        put(&[1, 1, 5, (2 + 8 * blocks) as u8]);
        for &(l, r) in seg.sack.iter().flatten() {
            put(&l.0.to_be_bytes());
            put(&r.0.to_be_bytes());
        }
    }
    n
}

/// The RFC 1071 ones'-complement sum (folded, not inverted) of the TCP/UDP pseudo-header
/// (RFC 9293 3.1, RFC 8200 8.1).
pub(crate) fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u16 {
    let mut sum = u64::from(proto) + len as u64;
    let mut words = |b: &[u8]| {
        for w in b.chunks_exact(2) {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            words(&s.octets());
            words(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            words(&v6(s));
            words(&v6(d));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Joins the data segments at the front of `segs` that a TSO device would cut back into exactly
/// those segments: consecutive in sequence and send buffer, every one but the last full-sized
/// (the first one's size), the same headers apart from PSH and FIN on the last, and at most
/// `room` payload bytes in all. Returns the segment to send, its GSO size (0: a plain
/// segment) and how many segments it stands for.
fn coalesce(segs: &[SegOut], room: usize) -> (SegOut, u16, usize) {
    let mut acc = segs[0];
    let step = acc.len;
    if room == 0 || step == 0 || acc.syn || acc.rst || acc.fin || acc.psh {
        return (acc, 0, 1);
    }
    let mut n = 1;
    for s in &segs[1..] {
        let joins = acc.len % step == 0
            && !acc.fin
            && !acc.psh
            && s.len > 0
            && s.len <= step
            && acc.len + s.len <= room
            && s.seq == acc.seq + acc.len as u32
            && s.off == acc.off + acc.len
            && !s.syn
            && !s.rst
            && s.mss.is_none()
            && s.wscale.is_none()
            && !s.sack_permitted
            && (s.ack, s.window, s.ts, s.sack) == (acc.ack, acc.window, acc.ts, acc.sack);
        if !joins {
            break;
        }
        acc.len += s.len;
        acc.fin = s.fin;
        acc.psh = s.psh;
        n += 1;
    }
    (acc, if n > 1 { step as u16 } else { 0 }, n)
}

impl Stack {
    fn tcp_mss(&self, v6: bool) -> u16 {
        (self.cfg.mtu - if v6 { 60 } else { 40 }).min(65535) as u16
    }

    /// The timestamp clock offset for a pair of addresses: a keyed hash of the addresses only
    /// (not the ports), so that it is the same for every connection between them.
    fn ts_offset(&self, local: SocketAddr, remote: SocketAddr) -> u32 {
        let f = Flow::new(remote.ip(), 0, local.ip(), 0).expect("one family");
        (self.demux.key().flow_hash(&f) >> 32) as u32
    }

    /// RFC 6528: a keyed hash of the 4-tuple plus a 4 µs clock.
    fn isn(&self, now: Duration, local: SocketAddr, remote: SocketAddr) -> Seq {
        let f =
            Flow::new(remote.ip(), remote.port(), local.ip(), local.port()).expect("one family");
        let h = self.demux.key().flow_hash(&f) as u32;
        Seq(h.wrapping_add((now.as_micros() / 4) as u32))
    }

    /// Payload bytes one TCP super-frame may carry when the device segments TCP for this family
    /// (TSO), counting the largest TCP header; 0 without TSO. The IP packet stays within 64 KiB.
    fn tso_room(&self, v6: bool) -> usize {
        let o = &self.cfg.offloads;
        if !(if v6 { o.tx_tso6 } else { o.tx_tso4 }) {
            return 0;
        }
        let ip = if v6 { 40 } else { 20 };
        (o.max_gso_frame.saturating_sub(14).min(65_535)).saturating_sub(ip + 60)
    }

    /// Builds and routes one segment of `idx` (or of no connection, for RSTs), straight into
    /// its frame: headers, then the payload from the send buffer. With `gso` (the payload bytes
    /// per segment) set, the frame is a TSO super-frame the device cuts up; with checksum
    /// offload the TCP checksum holds only the pseudo-header sum for the device to complete.
    fn send_seg(
        &mut self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
        seg: &SegOut,
        idx: Option<u32>,
        gso: u16,
    ) {
        let mut opts = [0u8; 40];
        let olen = tcp_options(seg, &mut opts);
        let v6 = local.is_ipv6();
        let iph = if v6 { 40 } else { 20 };
        let l4_start = 14 + iph;
        let hdr = l4_start + 20 + olen;
        let l4_len = 20 + olen + seg.len;
        let mut f = self.alloc_for(hdr, hdr + seg.len);
        if seg.len > 0 {
            match idx.and_then(|i| self.tcp.socks.get(i as usize)) {
                Some(Some(s)) => s.conn.append_payload(seg.off, seg.len, &mut f),
                _ => f.resize(hdr + seg.len, 0),
            }
        }
        match (local.ip(), remote.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv4);
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Tcp,
                    payload_len: l4_len,
                    hop_limit: 64,
                }
                // The header checksum once, after the identification and DF are set.
                .emit(&mut p, &ChecksumCapabilities::ignored());
                p.set_ident(self.next_ident() as u16);
                p.set_dont_frag(true);
                p.fill_checksum();
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                self.eth_header(&mut f, [0; 6], EthernetProtocol::Ipv6);
                Ipv6Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Tcp,
                    payload_len: l4_len,
                    hop_limit: 64,
                }
                .emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
            }
            _ => return self.recycle(f),
        }
        let mut p = TcpPacket::new_unchecked(&mut f[l4_start..]);
        p.set_src_port(local.port());
        p.set_dst_port(remote.port());
        p.set_seq_number(TcpSeqNumber(seg.seq.0 as i32));
        p.set_ack_number(TcpSeqNumber(seg.ack.map_or(0, |a| a.0) as i32));
        p.set_header_len((20 + olen) as u8);
        p.clear_flags();
        p.set_syn(seg.syn);
        p.set_fin(seg.fin);
        p.set_rst(seg.rst);
        p.set_psh(seg.psh);
        p.set_ack(seg.ack.is_some());
        p.set_window_len(seg.window);
        p.set_urgent_at(0);
        p.options_mut().copy_from_slice(&opts[..olen]);
        let (src, dst) = (local.ip().into(), remote.ip().into());
        let mut meta = FrameMeta::default();
        if self.cfg.offloads.tx_csum || gso > 0 {
            // What the device expects (virtio NEEDS_CSUM): the pseudo-header sum, not inverted,
            // over the whole TCP length (a super-frame's; the device adjusts each segment's).
            p.set_checksum(pseudo_header_sum(local.ip(), remote.ip(), 6, l4_len));
            meta.csum = Csum::Partial {
                start: l4_start as u16,
                offset: 16,
            };
        } else {
            p.fill_checksum(&src, &dst);
        }
        if gso > 0 {
            self.counters.tx_gso_frames += 1;
            meta.gso = Some(Gso {
                kind: if v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
                size: gso,
                hdr_len: hdr as u16,
            });
        }
        self.route_meta(now, local.ip(), remote.ip(), TxFrame { data: f, meta });
    }

    /// After anything happened to connection `idx`: transmit, move it along its lifecycle, rearm.
    fn tcp_after(&mut self, now: Duration, idx: u32) {
        let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) else {
            return;
        };
        let mut out = std::mem::take(&mut self.tcp.out);
        s.conn.poll_transmit(now, &mut out);
        let (local, remote) = (s.local, s.remote);
        let tso = self.tso_room(local.is_ipv6());
        let mut i = 0;
        while i < out.len() {
            let (seg, gso, n) = coalesce(&out[i..], tso);
            self.send_seg(now, local, remote, &seg, Some(idx), gso);
            i += n;
        }
        out.clear();
        self.tcp.out = out;
        let s = self.tcp.socks[idx as usize].as_mut().expect("present");
        let state = s.conn.state();
        // A passive connection that just completed its handshake joins the accept queue.
        if let (Some(l), false, State::Established | State::CloseWait) =
            (s.listener, s.accepted, state)
        {
            s.accepted = true;
            s.active = true;
            self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
            if let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) {
                lis.pending = lis.pending.saturating_sub(1);
                lis.stats.accepted += 1;
                lis.stats.active += 1;
                lis.accept.push_back(idx);
            }
        }
        self.tcp_account(idx);
        let s = self.tcp.socks[idx as usize].as_mut().expect("present");
        // TIME-WAIT is bounded: past the limit a connection closes at once (RFC 6191 would
        // allow reuse with timestamps; skipping is what Linux does at tcp_max_tw_buckets).
        let mut state = state;
        if state == State::TimeWait && !s.in_time_wait {
            if self.tcp.time_wait >= self.tcp.cfg.max_time_wait {
                s.conn.force_close();
                state = State::Closed;
                self.counters.tcp_time_wait_skipped += 1;
            } else {
                s.in_time_wait = true;
                self.tcp.time_wait += 1;
            }
        }
        if state == State::Closed && s.in_time_wait {
            s.in_time_wait = false;
            self.tcp.time_wait -= 1;
        }
        if state == State::Closed {
            if let (Some(o), true) = (s.origin, s.active) {
                s.active = false;
                if let Some(Some(lis)) = self.tcp.listeners.get_mut(o as usize) {
                    lis.stats.active = lis.stats.active.saturating_sub(1);
                    if s.conn.error() == Some(TcpError::Reset) {
                        lis.stats.resets += 1;
                    }
                }
            }
            // Only its own entry: a closed connection the application still holds runs through
            // here again on every call, and its 4-tuple may belong to a newer connection by then
            // (removing that one's entry left it sending and deaf; found by tcp_conversation).
            let key = (s.local, s.remote);
            if self.tcp.table.get(&key) == Some(&idx) {
                self.tcp.table.remove(&key);
                // Once per connection: its totals join the stack's.
                self.counters.tcp_retransmitted_bytes += s.conn.retransmitted;
                self.counters.tcp_timeouts += s.conn.timeouts;
                self.counters.tcp_recoveries += s.conn.recoveries;
                self.counters.tcp_probes += s.conn.probes;
                self.counters.tcp_idle_timeouts += u64::from(s.conn.idle_timed_out);
            }
            let orphan = s.listener.is_some() && !s.accepted;
            if orphan {
                self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
                let l = s.listener.expect("passive");
                if let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) {
                    lis.pending = lis.pending.saturating_sub(1);
                }
            }
            if orphan || s.app_closed {
                self.tcp.buffer_bytes = self.tcp.buffer_bytes.saturating_sub(s.mem);
                self.tcp.socks[idx as usize] = None;
                self.tcp.free.push(idx);
            }
            return;
        }
        if let Some(d) = s.conn.next_deadline() {
            if s.armed.is_none_or(|a| d < a) {
                s.armed = Some(d);
                self.tcp.wheel.arm(idx, d);
            }
        }
    }

    /// Brings connection `idx`'s buffer bytes into the stack's total.
    fn tcp_account(&mut self, idx: u32) {
        if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
            let mem = s.conn.buffer_bytes();
            self.tcp.buffer_bytes = (self.tcp.buffer_bytes + mem).saturating_sub(s.mem);
            s.mem = mem;
        }
    }

    /// Marks connection `idx` to transmit at the next flush (see `Tcp::deferred`); its buffer
    /// memory counts at once.
    fn tcp_defer(&mut self, now: Duration, idx: u32) {
        self.tcp_account(idx);
        if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
            if !s.deferred {
                s.deferred = true;
                self.tcp.deferred.push((idx, now));
            }
        }
    }

    /// Transmits for the connections the application touched since the last flush.
    pub(crate) fn tcp_flush(&mut self) {
        if self.tcp.deferred.is_empty() {
            return;
        }
        let mut list = std::mem::take(&mut self.tcp.deferred);
        for &(idx, now) in &list {
            if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
                if std::mem::take(&mut s.deferred) {
                    self.tcp_after(now, idx);
                }
            }
        }
        list.clear();
        if self.tcp.deferred.is_empty() {
            self.tcp.deferred = list;
        }
    }

    pub(crate) fn tcp_timers(&mut self, now: Duration) {
        let mut fired = std::mem::take(&mut self.tcp.fired);
        self.tcp.wheel.expire(now, &mut fired);
        for idx in fired.drain(..) {
            if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
                // An entry superseded by an earlier arm fires later for nothing: the
                // connection's own deadline is more than a tick away. Skipping it keeps the
                // armed entry (re-arming here would add a duplicate every time).
                if s.armed.is_none_or(|a| a > now + Duration::from_millis(1)) {
                    continue;
                }
                s.armed = None;
                s.conn.on_timer(now);
                self.tcp_mark_ready(idx);
                self.tcp_after(now, idx);
            }
        }
        self.tcp.fired = fired;
    }

    pub(crate) fn rx_tcp(&mut self, now: Duration, ip: IpL4, b: &[u8], meta: FrameMeta) {
        let Ok(pkt) = TcpPacket::new_checked(b) else {
            return self.drop(DropReason::TcpMalformed);
        };
        if meta.csum == Csum::Complete && !pkt.verify_checksum(&ip.src.into(), &ip.dst.into()) {
            return self.drop(DropReason::TcpBadChecksum);
        }
        if pkt.syn() && pkt.fin() {
            return self.tcp_syn_fin(now, ip, &pkt);
        }
        let Ok(repr) = TcpRepr::parse(
            &pkt,
            &ip.src.into(),
            &ip.dst.into(),
            &ChecksumCapabilities::ignored(),
        ) else {
            return self.drop(DropReason::TcpMalformed);
        };
        let seg = seg_in(&repr);
        let local = SocketAddr::new(ip.dst, repr.dst_port);
        let remote = SocketAddr::new(ip.src, repr.src_port);
        if let Some(&idx) = self.tcp.table.get(&(local, remote)) {
            // A new SYN for a connection in TIME-WAIT that is provably newer (RFC 6191): the
            // old incarnation ends and the SYN goes to the listeners.
            let reuse = self.tcp.socks[idx as usize]
                .as_ref()
                .is_some_and(|s| s.conn.takes_new_syn(&seg));
            if reuse {
                if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
                    s.conn.force_close();
                }
                self.counters.tcp_time_wait_reused += 1;
                self.tcp_after(now, idx);
                return self.rx_tcp_new(now, local, remote, &seg);
            }
            return self.tcp_feed(now, idx, local, remote, &seg);
        }
        self.rx_tcp_new(now, local, remote, &seg);
    }

    /// SYN and FIN together (a scan, never a real peer): dropped by a connection or a listener;
    /// for a closed port answered with RST like anything else there (as Linux does).
    fn tcp_syn_fin(&mut self, now: Duration, ip: IpL4, pkt: &TcpPacket<&[u8]>) {
        self.drop(DropReason::TcpBadFlags);
        let local = SocketAddr::new(ip.dst, pkt.dst_port());
        let remote = SocketAddr::new(ip.src, pkt.src_port());
        let flow =
            Flow::new(remote.ip(), remote.port(), local.ip(), local.port()).expect("one family");
        if pkt.rst()
            || self.tcp.table.contains_key(&(local, remote))
            || self.demux.snapshot().lookup(Protocol::Tcp, &flow).is_some()
        {
            return;
        }
        let rst = if pkt.ack() {
            SegOut {
                seq: Seq(pkt.ack_number().0 as u32),
                rst: true,
                ..Default::default()
            }
        } else {
            SegOut {
                seq: Seq(0),
                ack: Some(Seq(pkt.seq_number().0 as u32) + pkt.payload().len() as u32 + 2),
                rst: true,
                ..Default::default()
            }
        };
        self.send_seg(now, local, remote, &rst, None, 0);
    }

    /// Gives `seg` to connection `idx`, sends its immediate answers (RST), counts a drop, and
    /// moves the connection along.
    fn tcp_feed(
        &mut self,
        now: Duration,
        idx: u32,
        local: SocketAddr,
        remote: SocketAddr,
        seg: &SegIn,
    ) {
        let mut out = std::mem::take(&mut self.tcp.out);
        if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
            if let Some(r) = s.conn.on_segment(now, seg, &mut out) {
                self.counters.drop(r);
            }
        }
        for r in out.drain(..) {
            self.send_seg(now, local, remote, &r, None, 0);
        }
        self.tcp.out = out;
        self.tcp_mark_ready(idx);
        self.tcp_after(now, idx);
    }

    fn tcp_mark_ready(&mut self, idx: u32) {
        if !self.tcp.track_ready {
            return;
        }
        if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
            if !s.ready {
                s.ready = true;
                self.tcp.ready.push(idx);
            }
        }
    }

    /// A segment that matches no connection: a SYN for a listener, a cookie ACK, or a stray.
    fn rx_tcp_new(&mut self, now: Duration, local: SocketAddr, remote: SocketAddr, seg: &SegIn) {
        if seg.rst {
            return self.drop(DropReason::TcpNoConnection);
        }
        let flow =
            Flow::new(remote.ip(), remote.port(), local.ip(), local.port()).expect("one family");
        if seg.syn && seg.ack.is_none() {
            let hit = self.demux.snapshot().lookup(Protocol::Tcp, &flow);
            if let Some(hit) = hit {
                return self.tcp_syn(now, hit.listener.0 as u32, local, remote, seg);
            }
            self.drop(DropReason::TcpNoBinding);
        } else if seg.ack.is_none() && self.demux.snapshot().lookup(Protocol::Tcp, &flow).is_some()
        {
            // RFC 9293 3.10.7.2, LISTEN: any other segment must carry an ACK; without one it is
            // dropped, not answered (Linux does the same; scans like FIN+PSH+URG get nothing).
            return self.drop(DropReason::TcpNoAck);
        } else if let (Some(ack), false) = (seg.ack, seg.syn) {
            match self.tcp_cookie_ack(now, &flow, local, remote, seg, ack) {
                CookieAck::Created => return,
                // Like Linux: no RST, the client's retransmission may find room.
                CookieAck::AcceptQueueFull => return self.drop(DropReason::TcpListenOverflow),
                CookieAck::Limit(r) => return self.drop(r),
                CookieAck::Bad => self.drop(DropReason::TcpBadCookie),
                CookieAck::NotCookie => self.drop(DropReason::TcpNoConnection),
            }
        } else {
            self.drop(DropReason::TcpNoConnection);
        }
        // RFC 9293 3.10.7.1: answer what is not for a connection with RST.
        let rst = match seg.ack {
            Some(a) => SegOut {
                seq: a,
                rst: true,
                ..Default::default()
            },
            None => {
                let len = seg.payload.len() as u32 + u32::from(seg.syn) + u32::from(seg.fin);
                SegOut {
                    seq: Seq(0),
                    ack: Some(seg.seq + len),
                    rst: true,
                    ..Default::default()
                }
            }
        };
        self.send_seg(now, local, remote, &rst, None, 0);
    }

    /// An ICMP error quoting a TCP segment we sent (`data` starts at its TCP header).
    pub(crate) fn tcp_icmp(
        &mut self,
        now: Duration,
        local: IpAddr,
        remote: IpAddr,
        data: &[u8],
        kind: UdpErrorKind,
    ) {
        let lport = u16::from_be_bytes([data[0], data[1]]);
        let rport = u16::from_be_bytes([data[2], data[3]]);
        let seq = Seq(u32::from_be_bytes([data[4], data[5], data[6], data[7]]));
        let key = (
            SocketAddr::new(local, lport),
            SocketAddr::new(remote, rport),
        );
        let Some(&idx) = self.tcp.table.get(&key) else {
            return self.drop(DropReason::TcpIcmpStale);
        };
        let v6 = local.is_ipv6();
        let (mss, port) = match kind {
            UdpErrorKind::PacketTooBig(mtu) => {
                // Below the protocol minimum is a forgery or a broken router: clamp (Linux's
                // min_pmtu is 552 for IPv4; IPv6 links carry 1280).
                let floor = if v6 { 1280 } else { 552 };
                let mtu = mtu.clamp(floor, self.cfg.mtu as u32);
                (Some((mtu - if v6 { 60 } else { 40 }) as u16), false)
            }
            UdpErrorKind::PortUnreachable => (None, true),
            UdpErrorKind::Unreachable(_) => (None, false),
        };
        let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) else {
            return;
        };
        if let Some(r) = s.conn.on_icmp(now, seq, mss, port) {
            self.counters.drop(r);
        }
        self.tcp_after(now, idx);
    }

    fn tcp_syn(
        &mut self,
        now: Duration,
        l: u32,
        local: SocketAddr,
        remote: SocketAddr,
        seg: &SegIn,
    ) {
        let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) else {
            return self.drop(DropReason::TcpNoBinding);
        };
        lis.stats.syns += 1;
        // A full accept queue drops the SYN (the client retries); a full SYN queue answers
        // with a cookie and keeps no state (Linux does both the same way).
        if lis.accept.len() >= lis.backlog {
            lis.stats.overflows += 1;
            return self.drop(DropReason::TcpListenOverflow);
        }
        // Connection limits drop too: a cookie would only create the connection later.
        if lis
            .max_connections
            .is_some_and(|m| lis.pending + lis.stats.active as usize >= m)
        {
            lis.stats.overflows += 1;
            return self.drop(DropReason::TcpListenerLimit);
        }
        if let Some(r) = self.tcp.over_limit() {
            return self.drop(r);
        }
        let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) else {
            return;
        };
        if lis.pending >= lis.backlog || self.tcp.half_open >= self.tcp.cfg.max_half_open {
            if !self.tcp.cfg.syncookies && lis.pending < lis.backlog {
                lis.stats.overflows += 1;
                return self.drop(DropReason::TcpHalfOpenLimit);
            }
            if !self.tcp.cfg.syncookies {
                lis.stats.overflows += 1;
                return self.drop(DropReason::TcpListenOverflow);
            }
            lis.stats.syncookies_sent += 1;
            lis.last_cookie = Some(now);
            return self.tcp_cookie_syn_ack(now, local, remote, seg);
        }
        lis.pending += 1;
        self.tcp.half_open += 1;
        let iss = self.isn(now, local, remote);
        let v6 = local.is_ipv6();
        let mut conn = Conn::accept(self.tcp.cfg.clone(), self.tcp_mss(v6), v6, iss, seg, now);
        conn.set_ts_offset(self.ts_offset(local, remote));
        let idx = self.tcp_insert(Sock::passive(conn, local, remote, l));
        self.tcp_after(now, idx);
    }

    /// Answers `syn` with a cookie SYN-ACK (RFC 4987 3.6), keeping no state.
    fn tcp_cookie_syn_ack(
        &mut self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
        syn: &SegIn,
    ) {
        let v6 = local.is_ipv6();
        let cfg = &self.tcp.cfg;
        let peer_mss = syn.mss.unwrap_or(if v6 { 1220 } else { 536 });
        let cookie = self.tcp.cookies.make(now, local, remote, syn.seq, peer_mss);
        // Window scale and SACK survive only through the timestamp (as in Linux).
        let ts = match (cfg.timestamps, syn.ts) {
            (true, Some((tsval, _))) => Some((
                CookieJar::ts_encode(
                    Conn::tsval(self.ts_offset(local, remote), now),
                    syn.wscale,
                    cfg.sack && syn.sack_permitted,
                ),
                tsval,
            )),
            _ => None,
        };
        let with_opts = ts.is_some();
        let seg = SegOut {
            seq: cookie,
            ack: Some(syn.seq + 1),
            syn: true,
            window: cfg.recv_buffer.min(65535) as u16,
            mss: Some(self.tcp_mss(v6)),
            wscale: (with_opts && syn.wscale.is_some()).then(|| window_shift(cfg.recv_buffer)),
            ts,
            sack_permitted: with_opts && cfg.sack && syn.sack_permitted,
            ..Default::default()
        };
        self.counters.tcp_syncookies_sent += 1;
        self.send_seg(now, local, remote, &seg, None, 0);
    }

    /// An ACK for no connection: if its listener sent cookies lately and the cookie holds,
    /// the connection is created on that listener.
    fn tcp_cookie_ack(
        &mut self,
        now: Duration,
        flow: &Flow,
        local: SocketAddr,
        remote: SocketAddr,
        seg: &SegIn,
        ack: Seq,
    ) -> CookieAck {
        let Some(hit) = self.demux.snapshot().lookup(Protocol::Tcp, flow) else {
            return CookieAck::NotCookie;
        };
        let l = hit.listener.0 as u32;
        let Some(Some(lis)) = self.tcp.listeners.get(l as usize) else {
            return CookieAck::NotCookie;
        };
        let recent = lis
            .last_cookie
            .is_some_and(|t| now.saturating_sub(t) < PERIOD * 2);
        if !recent {
            return CookieAck::NotCookie;
        }
        let peer_isn = seg.seq + u32::MAX;
        let iss = ack + u32::MAX;
        let Some(mss) = self.tcp.cookies.check(now, local, remote, peer_isn, iss) else {
            return CookieAck::Bad;
        };
        if lis.accept.len() >= lis.backlog {
            if let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) {
                lis.stats.overflows += 1;
            }
            return CookieAck::AcceptQueueFull;
        }
        let listener_full = lis
            .max_connections
            .is_some_and(|m| lis.pending + lis.stats.active as usize >= m);
        if let Some(r) = listener_full
            .then_some(DropReason::TcpListenerLimit)
            .or_else(|| self.tcp.over_limit())
        {
            return CookieAck::Limit(r);
        }
        let (wscale, sack) = match seg.ts {
            Some((_, tsecr)) if self.tcp.cfg.timestamps => CookieJar::ts_decode(tsecr),
            _ => (None, false),
        };
        let syn = SegIn {
            seq: peer_isn,
            syn: true,
            window: seg.window,
            mss: Some(mss),
            wscale,
            ts: seg.ts,
            sack_permitted: sack,
            ..Default::default()
        };
        let v6 = local.is_ipv6();
        let mut conn =
            Conn::from_cookie(self.tcp.cfg.clone(), self.tcp_mss(v6), v6, iss, &syn, now);
        conn.set_ts_offset(self.ts_offset(local, remote));
        if let Some(Some(lis)) = self.tcp.listeners.get_mut(l as usize) {
            lis.pending += 1;
            lis.stats.syncookies_valid += 1;
            self.tcp.half_open += 1;
        }
        let idx = self.tcp_insert(Sock::passive(conn, local, remote, l));
        self.counters.tcp_syncookies_valid += 1;
        self.tcp_feed(now, idx, local, remote, seg);
        CookieAck::Created
    }

    fn tcp_insert(&mut self, s: Sock) -> u32 {
        let key = (s.local, s.remote);
        let idx = match self.tcp.free.pop() {
            Some(i) => {
                self.tcp.socks[i as usize] = Some(s);
                i
            }
            None => {
                self.tcp.socks.push(Some(s));
                (self.tcp.socks.len() - 1) as u32
            }
        };
        self.tcp.table.insert(key, idx);
        idx
    }

    // ---- application API ----------------------------------------------------------------

    /// Listens on `(prefix, ports)` with an accept backlog (see the demux's bind rules).
    pub fn tcp_listen(
        &mut self,
        prefix: IpNet,
        ports: PortSpec,
        reuseport: bool,
        backlog: usize,
    ) -> Result<TcpListenerHandle, BindError> {
        let idx = self
            .tcp
            .free_listeners
            .last()
            .map_or(self.tcp.listeners.len(), |&i| i as usize);
        let mut b = Binding::new(Protocol::Tcp, prefix, ports, ListenerId(idx as u64));
        b.reuseport = reuseport;
        let binding = self.demux.bind(b)?;
        if idx < self.tcp.listeners.len() {
            self.tcp.free_listeners.pop();
        }
        let lis = Listener {
            binding,
            prefix,
            ports,
            backlog: backlog.max(1),
            max_connections: None,
            pending: 0,
            accept: VecDeque::new(),
            last_cookie: None,
            stats: ListenerStats::default(),
        };
        if idx == self.tcp.listeners.len() {
            self.tcp.listeners.push(Some(lis));
        } else {
            self.tcp.listeners[idx] = Some(lis);
        }
        Ok(TcpListenerHandle(idx as u32))
    }

    /// The next established connection of a listener: `(connection, local, remote)`; the local
    /// address is the one the client targeted.
    pub fn tcp_accept(
        &mut self,
        l: TcpListenerHandle,
    ) -> Option<(TcpHandle, SocketAddr, SocketAddr)> {
        let lis = self.tcp.listeners.get_mut(l.0 as usize)?.as_mut()?;
        let idx = lis.accept.pop_front()?;
        let s = self.tcp.socks[idx as usize].as_mut()?;
        s.listener = None;
        Some((TcpHandle(idx), s.local, s.remote))
    }

    /// Stops listening. Connections not yet accepted (handshake done or under way) go to a
    /// reuseport sibling (another listener on the same prefix and ports) if there is one, in
    /// the demux's hashing, queue order kept; otherwise they are reset.
    pub fn tcp_listener_close(&mut self, now: Duration, l: TcpListenerHandle) {
        let Some(lis) = self
            .tcp
            .listeners
            .get_mut(l.0 as usize)
            .and_then(Option::take)
        else {
            return;
        };
        let _ = self.demux.unbind(lis.binding);
        self.tcp.free_listeners.push(l.0);
        // Its slot may serve another listener next: its connections stop counting for it.
        for s in self.tcp.socks.iter_mut().flatten() {
            if s.origin == Some(l.0) {
                s.origin = None;
                s.active = false;
            }
        }
        // Queued first (in order), then the embryonic ones.
        let mut orphans: Vec<u32> = lis.accept.iter().copied().collect();
        orphans.extend(self.tcp.socks.iter().enumerate().filter_map(|(i, s)| {
            s.as_ref()
                .is_some_and(|s| s.listener == Some(l.0) && !s.accepted)
                .then_some(i as u32)
        }));
        // Where each goes: the member the demux now hashes its flow to, if that is a sibling.
        let heirs: Vec<(u32, Option<u32>)> = {
            let snapshot = self.demux.snapshot();
            orphans
                .iter()
                .map(|&idx| {
                    let heir = self.tcp.socks[idx as usize].as_ref().and_then(|s| {
                        let flow =
                            Flow::new(s.remote.ip(), s.remote.port(), s.local.ip(), s.local.port())
                                .expect("one family");
                        let h = snapshot.lookup(Protocol::Tcp, &flow)?.listener.0 as u32;
                        let sib = self.tcp.listeners.get(h as usize)?.as_ref()?;
                        (sib.prefix == lis.prefix && sib.ports == lis.ports).then_some(h)
                    });
                    (idx, heir)
                })
                .collect()
        };
        for (idx, heir) in heirs {
            let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) else {
                continue;
            };
            if let Some((h, Some(sib))) =
                heir.and_then(|h| Some((h, self.tcp.listeners.get_mut(h as usize)?.as_mut())))
            {
                s.listener = Some(h);
                s.origin = Some(h);
                if s.accepted {
                    s.active = true;
                    sib.stats.active += 1;
                    sib.accept.push_back(idx);
                } else {
                    sib.pending += 1;
                }
                self.counters.tcp_handed_over += 1;
                continue;
            }
            s.app_closed = true;
            if !s.accepted {
                self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
            }
            s.listener = None;
            let mut out = std::mem::take(&mut self.tcp.out);
            s.conn.abort(&mut out);
            let (local, remote) = (s.local, s.remote);
            for seg in out.drain(..) {
                self.send_seg(now, local, remote, &seg, None, 0);
            }
            self.tcp.out = out;
            self.tcp_after(now, idx);
        }
    }

    /// Opens a connection from `local` (inside a local prefix; port 0 picks an ephemeral port,
    /// RFC 6056) to `remote`.
    pub fn tcp_connect(
        &mut self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<TcpHandle, ConnectError> {
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(ConnectError::FamilyMismatch);
        }
        if remote.port() == 0 {
            return Err(ConnectError::PortZero);
        }
        if !self.is_local(local.ip()) {
            return Err(ConnectError::NonLocalSource(local.ip()));
        }
        if self.tcp.over_limit().is_some() {
            return Err(ConnectError::Limit);
        }
        let local = if local.port() != 0 {
            if self.tcp.table.contains_key(&(local, remote)) {
                return Err(ConnectError::AddrInUse);
            }
            local
        } else {
            // RFC 6056 algorithm 3: a keyed per-destination offset plus a global counter.
            const LO: u32 = 32768;
            const N: u32 = 28232;
            let f = Flow::new(local.ip(), 0, remote.ip(), remote.port()).expect("one family");
            let offset = self.demux.key().flow_hash(&f) as u32;
            let mut found = None;
            for i in 0..N {
                let port =
                    (LO + offset.wrapping_add(self.tcp.ephemeral).wrapping_add(i) % N) as u16;
                let cand = SocketAddr::new(local.ip(), port);
                if !self.tcp.table.contains_key(&(cand, remote)) {
                    self.tcp.ephemeral = self.tcp.ephemeral.wrapping_add(i + 1);
                    found = Some(cand);
                    break;
                }
            }
            found.ok_or(ConnectError::AddrInUse)?
        };
        let iss = self.isn(now, local, remote);
        let v6 = local.is_ipv6();
        let mut conn = Conn::connect(self.tcp.cfg.clone(), self.tcp_mss(v6), v6, iss, now);
        conn.set_ts_offset(self.ts_offset(local, remote));
        let idx = self.tcp_insert(Sock {
            conn,
            local,
            remote,
            listener: None,
            origin: None,
            active: false,
            accepted: true,
            app_closed: false,
            armed: None,
            in_time_wait: false,
            mem: 0,
            ready: false,
            deferred: false,
        });
        self.tcp_after(now, idx);
        Ok(TcpHandle(idx))
    }

    fn tcp_sock(&mut self, h: TcpHandle) -> Result<&mut Sock, IoError> {
        self.tcp
            .socks
            .get_mut(h.0 as usize)
            .and_then(Option::as_mut)
            .filter(|s| !s.app_closed)
            .ok_or(IoError::Invalid)
    }

    /// Queues bytes to send; returns how many were taken.
    pub fn tcp_send(&mut self, now: Duration, h: TcpHandle, data: &[u8]) -> Result<usize, IoError> {
        let s = self.tcp_sock(h)?;
        if let Some(e) = s.conn.error() {
            return Err(IoError::Failed(e));
        }
        if s.conn.send_space() == 0 {
            return Err(
                if matches!(
                    s.conn.state(),
                    State::SynSent | State::SynReceived | State::Established | State::CloseWait
                ) {
                    IoError::WouldBlock
                } else {
                    IoError::Closed
                },
            );
        }
        // Over the memory limit, queue only into storage already allocated.
        let pressure = self.tcp.buffer_bytes >= self.tcp.cfg.max_buffer_memory;
        let s = self.tcp_sock(h)?;
        let room = if pressure {
            s.conn.send_space_in_place()
        } else {
            data.len()
        };
        if room == 0 {
            return Err(IoError::WouldBlock);
        }
        let n = s.conn.write(&data[..room.min(data.len())]);
        if let Some(o) = s.origin {
            if let Some(Some(lis)) = self.tcp.listeners.get_mut(o as usize) {
                lis.stats.bytes_out += n as u64;
            }
        }
        self.tcp_defer(now, h.0);
        Ok(n)
    }

    /// Reads received bytes. `Ok(0)` means the peer closed and everything was read.
    pub fn tcp_recv(
        &mut self,
        now: Duration,
        h: TcpHandle,
        buf: &mut [u8],
    ) -> Result<usize, IoError> {
        let s = self.tcp_sock(h)?;
        if s.conn.readable() == 0 {
            if s.conn.at_eof() {
                return Ok(0);
            }
            if let Some(e) = s.conn.error() {
                return Err(IoError::Failed(e));
            }
            return Err(match s.conn.state() {
                State::SynSent | State::SynReceived => IoError::NotConnected,
                State::Closed => IoError::Closed,
                _ => IoError::WouldBlock,
            });
        }
        let n = s.conn.read(buf);
        if let Some(o) = s.origin {
            if let Some(Some(lis)) = self.tcp.listeners.get_mut(o as usize) {
                lis.stats.bytes_in += n as u64;
            }
        }
        self.tcp_defer(now, h.0);
        Ok(n)
    }

    /// Bytes waiting to be read.
    pub fn tcp_readable(&self, h: TcpHandle) -> usize {
        self.tcp
            .socks
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.conn.readable())
    }

    /// The connection's state (`None` once closed by the application and gone).
    pub fn tcp_state(&self, h: TcpHandle) -> Option<State> {
        self.tcp
            .socks
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.conn.state())
    }

    /// The error that ended the connection, if any.
    pub fn tcp_error(&self, h: TcpHandle) -> Option<TcpError> {
        self.tcp
            .socks
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .and_then(|s| s.conn.error())
    }

    /// Switches Nagle's algorithm off (`nodelay = true`) or on.
    pub fn tcp_set_nodelay(&mut self, h: TcpHandle, nodelay: bool) -> Result<(), IoError> {
        self.tcp_sock(h)?.conn.set_nagle(!nodelay);
        Ok(())
    }

    /// Chooses a connection's congestion controller (the stack's default is
    /// [`TcpConfig::congestion`]).
    pub fn tcp_set_congestion(&mut self, h: TcpHandle, algo: Congestion) -> Result<(), IoError> {
        self.tcp_sock(h)?.conn.set_congestion(algo);
        Ok(())
    }

    /// Sets or clears keepalive probing on a connection.
    pub fn tcp_set_keepalive(
        &mut self,
        now: Duration,
        h: TcpHandle,
        k: Option<Keepalive>,
    ) -> Result<(), IoError> {
        self.tcp_sock(h)?.conn.set_keepalive(k, now);
        self.tcp_after(now, h.0);
        Ok(())
    }

    /// Half-closes: FIN after the queued data, while reading goes on until the peer's FIN. Call
    /// [`tcp_close`](Self::tcp_close) afterwards to release the handle.
    pub fn tcp_shutdown(&mut self, now: Duration, h: TcpHandle) {
        let Ok(s) = self.tcp_sock(h) else { return };
        s.conn.shutdown();
        self.tcp_defer(now, h.0);
    }

    /// Closes the application's side: FIN after the queued data; the connection finishes in the
    /// background and is freed when done. The handle is invalid afterwards.
    ///
    /// Closing with received data still unread resets the connection instead (RFC 1122
    /// 4.2.2.13, RFC 2525 2.17, as Linux does): the peer learns that its data was not taken.
    pub fn tcp_close(&mut self, now: Duration, h: TcpHandle) {
        let Ok(s) = self.tcp_sock(h) else { return };
        if s.conn.readable() > 0 {
            return self.tcp_abort(now, h);
        }
        s.app_closed = true;
        s.conn.close();
        self.tcp_defer(now, h.0);
    }

    /// Resets the connection and frees it.
    pub fn tcp_abort(&mut self, now: Duration, h: TcpHandle) {
        let mut out = std::mem::take(&mut self.tcp.out);
        let Ok(s) = self.tcp_sock(h) else {
            self.tcp.out = out;
            return;
        };
        s.app_closed = true;
        s.conn.abort(&mut out);
        let (local, remote) = (s.local, s.remote);
        for seg in out.drain(..) {
            self.send_seg(now, local, remote, &seg, None, 0);
        }
        self.tcp.out = out;
        self.tcp_after(now, h.0);
    }

    /// Limits a listener to `max` connections at once (half-open and open, until closed), or
    /// lifts the limit. Past it SYNs are dropped (counted as `TcpListenerLimit`; clients retry).
    pub fn tcp_set_listener_limit(&mut self, l: TcpListenerHandle, max: Option<usize>) {
        if let Some(Some(lis)) = self.tcp.listeners.get_mut(l.0 as usize) {
            lis.max_connections = max;
        }
    }

    /// Appends to `out` the connections the network or a timer touched since the last call
    /// (data or FIN arrived, data was acknowledged so there is room to send, the connection
    /// was established, failed or ended): an event loop then visits only those, not all its
    /// connections. Connections still in a listener's accept queue are left out (accept them
    /// first; they may already hold data). Spurious entries are possible: read and write as
    /// usual and take `WouldBlock` as "nothing".
    pub fn tcp_ready(&mut self, out: &mut Vec<TcpHandle>) {
        self.tcp.track_ready = true;
        for idx in self.tcp.ready.drain(..) {
            if let Some(Some(s)) = self.tcp.socks.get_mut(idx as usize) {
                s.ready = false;
                if s.listener.is_none() && !s.app_closed {
                    out.push(TcpHandle(idx));
                }
            }
        }
    }

    /// Half-open (SYN-RECEIVED) passive connections now.
    pub fn tcp_half_open(&self) -> usize {
        self.tcp.half_open
    }

    /// Buffer storage of all connections now, bytes.
    pub fn tcp_buffer_memory(&self) -> usize {
        self.tcp.buffer_bytes
    }

    /// Counters of a listener.
    pub fn tcp_listener_stats(&self, l: TcpListenerHandle) -> Option<ListenerStats> {
        Some(self.tcp.listeners.get(l.0 as usize)?.as_ref()?.stats)
    }

    /// A connection's local address (the one the client targeted, for accepted connections).
    pub fn tcp_local_addr(&self, h: TcpHandle) -> Option<SocketAddr> {
        self.tcp.socks.get(h.0 as usize)?.as_ref().map(|s| s.local)
    }

    /// A connection's peer address.
    pub fn tcp_peer_addr(&self, h: TcpHandle) -> Option<SocketAddr> {
        self.tcp.socks.get(h.0 as usize)?.as_ref().map(|s| s.remote)
    }

    /// A one-line summary of a connection's TCP variables (diagnostics).
    pub fn tcp_debug(&self, h: TcpHandle) -> Option<String> {
        self.tcp
            .socks
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.conn.summary())
    }

    /// Summaries of every connection: `local -> remote: variables` (diagnostics).
    pub fn tcp_debug_all(&self) -> Vec<String> {
        self.tcp
            .socks
            .iter()
            .flatten()
            .map(|s| format!("{} -> {}: {}", s.local, s.remote, s.conn.summary()))
            .collect()
    }

    /// Connections in the table (all states but closed).
    pub fn tcp_connections(&self) -> usize {
        self.tcp.table.len()
    }

    /// Bytes retransmitted by connection `h`.
    pub fn tcp_retransmitted(&self, h: TcpHandle) -> u64 {
        self.tcp
            .socks
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.conn.retransmitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u32, off: usize, len: usize) -> SegOut {
        SegOut {
            seq: Seq(seq),
            ack: Some(Seq(7)),
            window: 100,
            ts: Some((1, 2)),
            off,
            len,
            ..Default::default()
        }
    }

    fn run(segs: &[SegOut], room: usize) -> Vec<(u32, usize, u16, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < segs.len() {
            let (s, gso, n) = coalesce(&segs[i..], room);
            out.push((s.seq.0, s.len, gso, n));
            i += n;
        }
        out
    }

    #[test]
    fn coalesce_joins_only_what_a_device_cuts_back_the_same() {
        let full = |i: usize| data(1000 + 100 * i as u32, 100 * i, 100);
        // Four full segments and a short last one: one super-frame of 450 bytes.
        let mut segs: Vec<SegOut> = (0..4).map(full).collect();
        let mut last = data(1400, 400, 50);
        last.psh = true;
        last.fin = true;
        segs.push(last);
        assert_eq!(run(&segs, 65_000), [(1000, 450, 100, 5)]);
        let (s, _, _) = coalesce(&segs, 65_000);
        assert!(s.psh && s.fin, "PSH and FIN of the last segment");
        // Room for three segments' payload.
        assert_eq!(run(&segs, 300), [(1000, 300, 100, 3), (1300, 150, 100, 2)]);
        // Without TSO nothing joins.
        assert_eq!(run(&segs[..2], 0), [(1000, 100, 0, 1), (1100, 100, 0, 1)]);
        // A short segment ends a run: what follows it starts another.
        let segs = [full(0), data(1100, 100, 60), data(1160, 160, 100)];
        assert_eq!(run(&segs, 65_000), [(1000, 160, 100, 2), (1160, 100, 0, 1)]);
        // A different ACK, window, SACK or timestamp, a gap in sequence or buffer, PSH or FIN
        // before the end, a SYN or RST: no join.
        let mut b = full(1);
        b.ack = Some(Seq(8));
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        let mut b = full(1);
        b.window = 99;
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        let mut b = full(1);
        b.sack[0] = Some((Seq(1), Seq(2)));
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        let mut b = full(1);
        b.ts = Some((2, 2));
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        assert_eq!(run(&[full(0), full(2)], 65_000).len(), 2);
        let mut b = full(1);
        b.off = 150;
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        let mut a = full(0);
        a.psh = true;
        assert_eq!(run(&[a, full(1)], 65_000).len(), 2);
        let mut b = full(1);
        b.fin = true;
        assert_eq!(run(&[full(0), b, full(2)], 65_000).len(), 2);
        let mut b = full(1);
        b.rst = true;
        assert_eq!(run(&[full(0), b], 65_000).len(), 2);
        // A bare FIN after the data stays its own segment; so do a longer one and an empty one.
        let mut fin = data(1100, 100, 0);
        fin.fin = true;
        assert_eq!(run(&[full(0), fin], 65_000).len(), 2);
        assert_eq!(run(&[full(0), data(1100, 100, 200)], 65_000).len(), 2);
    }

    #[test]
    fn pseudo_header_sum_completes_to_the_full_checksum() {
        for (src, dst) in [
            ("198.18.0.1", "198.19.255.254"),
            ("2001:db8::1", "2001:db8:ffff::abcd"),
        ] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let len = 20 + 333;
            let mut l4 = vec![0u8; len];
            for (i, b) in l4.iter_mut().enumerate() {
                *b = (i * 31 + 7) as u8;
            }
            let mut p = TcpPacket::new_unchecked(&mut l4[..]);
            p.set_header_len(20);
            p.fill_checksum(&src.into(), &dst.into());
            let full = p.checksum();
            // What a device does with the partial sum: sum the segment over it, invert.
            p.set_checksum(pseudo_header_sum(src, dst, 6, len));
            let c = !subnetstack_ifaces::gso::ones_sum(&l4, 0);
            assert_eq!(c, full, "{src} -> {dst}");
        }
    }
}
