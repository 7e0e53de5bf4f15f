//! One TCP connection: the RFC 9293 state machine with RFC 7323 window scaling, timestamps and
//! PAWS, RFC 6298 retransmission timing, SACK (RFC 2018, 2883) with RFC 6675 loss recovery,
//! NewReno (RFC 5681/6582) or CUBIC (RFC 9438), RFC 5961 challenge ACKs, path MTU changes from
//! ICMP, delayed ACKs, Nagle and zero-window probes. Sans-IO: segments in, segment descriptors
//! out, deadlines.

use std::time::Duration;

use super::buffer::{RecvBuffer, SendBuffer};
use super::cc::{Congestion, Controller};
use super::rtt::RttEstimator;
use super::scoreboard::{Scoreboard, DUP_THRESH};
use super::seq::Seq;
use crate::DropReason;

/// What became of a received segment: `None` when it was used, otherwise why it was dropped
/// (the connection may still have queued an ACK or a challenge ACK in answer).
pub type Verdict = Option<DropReason>;

/// TS.Recent older than this is not used for PAWS (RFC 7323 5.5: 24 days).
const PAWS_IDLE: Duration = Duration::from_secs(24 * 24 * 3600);

/// Connection states (RFC 9293 §3.3.2; LISTEN lives in the stack's listeners).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Our SYN is out.
    SynSent,
    /// A SYN arrived and our SYN-ACK is out.
    SynReceived,
    /// Data flows both ways.
    Established,
    /// We closed; our FIN is out.
    FinWait1,
    /// Our FIN is acknowledged; waiting for the peer's.
    FinWait2,
    /// The peer closed; we may still send.
    CloseWait,
    /// Both closed at once; waiting for the ACK of our FIN.
    Closing,
    /// The peer closed, then we did; waiting for the ACK of our FIN.
    LastAck,
    /// Both closed; lingering for 2 MSL so that stray segments die.
    TimeWait,
    /// Gone.
    Closed,
}

/// Why a connection ended abnormally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpError {
    /// The peer answered our SYN with RST.
    Refused,
    /// The peer reset an established connection.
    Reset,
    /// Retransmissions went unanswered.
    TimedOut,
    /// The application aborted.
    Aborted,
    /// An ICMP destination unreachable (other than port unreachable) answered our SYN, or
    /// arrived before the connection timed out (`EHOSTUNREACH`).
    Unreachable,
}

impl std::fmt::Display for TcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcpError::Refused => "connection refused",
            TcpError::Reset => "connection reset by peer",
            TcpError::TimedOut => "connection timed out",
            TcpError::Aborted => "connection aborted",
            TcpError::Unreachable => "destination unreachable",
        })
    }
}

impl std::error::Error for TcpError {}

/// Tunables of a connection.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Send buffer limit.
    pub send_buffer: usize,
    /// Receive buffer limit (the largest window we advertise).
    pub recv_buffer: usize,
    /// Nagle's algorithm (RFC 896): hold small segments while data is unacknowledged.
    pub nagle: bool,
    /// Delayed ACK timeout.
    pub delayed_ack: Duration,
    /// Retransmissions before giving up an established connection.
    pub max_retries: u32,
    /// Retransmissions of a SYN before giving up.
    pub syn_retries: u32,
    /// TIME-WAIT duration (2 MSL).
    pub time_wait: Duration,
    /// Offer timestamps (RFC 7323).
    pub timestamps: bool,
    /// Keepalive probes for idle established connections (off by default, as in Linux).
    pub keepalive: Option<Keepalive>,
    /// Most connections in TIME-WAIT per stack; past it a closing connection skips TIME-WAIT.
    pub max_time_wait: usize,
    /// Offer and use selective acknowledgements (RFC 2018, RFC 6675).
    pub sack: bool,
    /// Congestion controller of new connections.
    pub congestion: Congestion,
    /// Answer SYNs with SYN cookies (RFC 4987) when a listener's SYN queue (as long as its
    /// backlog) is full, instead of dropping them.
    pub syncookies: bool,
    /// Challenge ACKs (RFC 5961) a connection sends per second at most; more are suppressed
    /// (counted). Per connection rather than per host, so that the limit leaks nothing about
    /// other connections (CVE-2016-5696).
    pub challenge_acks_per_sec: u32,
    /// Most connections per stack, TIME-WAIT not counted (it has `max_time_wait`). At the limit
    /// SYNs are dropped (counted; clients retry) and `tcp_connect` fails.
    pub max_connections: usize,
    /// Most half-open (SYN-RECEIVED) connections per stack. Past it SYNs are answered with SYN
    /// cookies (no state), or dropped when cookies are off.
    pub max_half_open: usize,
    /// Connection buffer memory per stack (send and receive storage, bytes). Past it new
    /// connections are refused like at `max_connections`, and `tcp_send` queues only into
    /// storage already allocated; buffers free their storage when they empty.
    pub max_buffer_memory: usize,
    /// Reset a connection whose peer shows no progress (no data or FIN received, no new data
    /// acknowledged) for this long: the peer that connects and never sends, or never reads.
    /// Off by default.
    pub idle_timeout: Option<Duration>,
}

/// Keepalive settings (RFC 1122 4.2.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TimedOut`).
    pub probes: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(7200),
            interval: Duration::from_secs(75),
            probes: 9,
        }
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            send_buffer: 256 * 1024,
            recv_buffer: 256 * 1024,
            nagle: true,
            delayed_ack: Duration::from_millis(40),
            max_retries: 15,
            syn_retries: 6,
            time_wait: Duration::from_secs(60),
            timestamps: true,
            keepalive: None,
            max_time_wait: 16384,
            sack: true,
            syncookies: true,
            congestion: Congestion::default(),
            challenge_acks_per_sec: 10,
            max_connections: 1 << 20,
            max_half_open: 1 << 16,
            max_buffer_memory: 1 << 30,
            idle_timeout: None,
        }
    }
}

/// A received segment, parsed.
#[derive(Clone, Debug, Default)]
pub struct SegIn<'a> {
    /// Sequence number.
    pub seq: Seq,
    /// Acknowledgement number when ACK is set.
    pub ack: Option<Seq>,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Raw window field.
    pub window: u16,
    /// MSS option.
    pub mss: Option<u16>,
    /// Window scale option.
    pub wscale: Option<u8>,
    /// Timestamps option `(tsval, tsecr)`.
    pub ts: Option<(u32, u32)>,
    /// SACK-permitted option (SYN only).
    pub sack_permitted: bool,
    /// SACK blocks `[left, right)`.
    pub sack: [Option<(Seq, Seq)>; 3],
    /// Payload.
    pub payload: &'a [u8],
}

/// A segment to send; the payload is `len` bytes of the send buffer starting `off` bytes after
/// SND.UNA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegOut {
    /// Sequence number.
    pub seq: Seq,
    /// Acknowledgement number (ACK flag) if any.
    pub ack: Option<Seq>,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// PSH flag.
    pub psh: bool,
    /// Window field (already scaled).
    pub window: u16,
    /// MSS option (SYN only).
    pub mss: Option<u16>,
    /// Window scale option (SYN only).
    pub wscale: Option<u8>,
    /// Timestamps option.
    pub ts: Option<(u32, u32)>,
    /// SACK-permitted option (SYN only).
    pub sack_permitted: bool,
    /// SACK blocks (D-SACK first when there is one).
    pub sack: [Option<(Seq, Seq)>; 3],
    /// Payload offset from SND.UNA in the send buffer.
    pub off: usize,
    /// Payload length.
    pub len: usize,
}

/// Initial window in segments (RFC 6928).
const INITIAL_WINDOW: u32 = 10;

/// One connection.
#[derive(Debug)]
pub struct Conn {
    cfg: TcpConfig,
    state: State,
    /// Our MSS (what we announce; from the MTU).
    local_mss: u16,
    // Send side.
    iss: Seq,
    snd_una: Seq,
    snd_nxt: Seq,
    snd_max: Seq,
    snd_wnd: u32,
    snd_wl1: Seq,
    snd_wl2: Seq,
    snd_shift: u8,
    send: SendBuffer,
    /// The application will write no more: send FIN after the data.
    close_requested: bool,
    /// Sequence number of our FIN, once sent.
    fin_seq: Option<Seq>,
    /// Where our FIN sits once first sent; unlike `fin_seq` (the FIN in flight) it stays
    /// after a rewind, so that an ACK for the FIN sent before a timeout still counts as one.
    fin_pos: Option<Seq>,
    // Receive side.
    irs: Seq,
    rcv_nxt: Seq,
    rcv_shift: u8,
    recv: RecvBuffer,
    /// The peer's FIN, if it arrived (possibly out of order).
    peer_fin: Option<Seq>,
    fin_received: bool,
    last_adv_wnd: u32,
    // Options.
    mss: u16,
    ts_ok: bool,
    ts_recent: u32,
    /// When TS.Recent was last updated (PAWS ignores an older one, RFC 7323 5.5).
    ts_recent_at: Duration,
    ts_offset: u32,
    // SACK.
    sack_ok: bool,
    /// Sender's scoreboard: segments in flight, SACKed and lost ones, RACK state.
    board: Scoreboard,
    /// RACK's reordering timer: look for losses again then.
    reo_at: Option<Duration>,
    /// Tail loss probe timer (RFC 8985 7).
    pto_at: Option<Duration>,
    /// A tail loss probe is out and not yet answered.
    tlp_out: bool,
    /// The probe timer fired: send a probe.
    send_probe: bool,
    /// Data went out or an ACK advanced: the probe timer restarts (RFC 8985 7.2). Other
    /// events (incoming data, say) leave it be, or it would never fire.
    rearm_probe: bool,
    /// Receiver: a duplicate range to report once as D-SACK (RFC 2883).
    dsack: Option<(Seq, Seq)>,
    /// Receiver: the start of the latest out-of-order segment (its block goes first).
    last_ooo: Option<Seq>,
    // RFC 5961 challenge ACK budget.
    challenge_tokens: u32,
    challenge_refill: Duration,
    /// The latest ICMP error while established (reported instead of a plain time-out).
    soft_error: Option<TcpError>,
    // Timers and estimation.
    rtt: RttEstimator,
    timed: Option<(Seq, Duration)>,
    retries: u32,
    rto_at: Option<Duration>,
    ack_at: Option<Duration>,
    persist_at: Option<Duration>,
    time_wait_at: Option<Duration>,
    /// Timestamp echoes from before this instant give no RTT sample: the retransmission timer
    /// fired then (Karn's rule with timestamps), or the connection came from a SYN cookie
    /// whose SYN-ACK timestamp carried options rather than the time.
    no_samples_before: Option<Duration>,
    // Congestion control.
    cc: Controller,
    cwnd: u32,
    ssthresh: u32,
    dupacks: u32,
    recover: Option<Seq>,
    retransmit_una: bool,
    // ACK scheduling.
    ack_now: bool,
    unacked_segs: u32,
    syn_sent_once: bool,
    keepalive_at: Option<Duration>,
    keepalive_probes: u32,
    send_keepalive: bool,
    /// When the peer counts as idle (see `TcpConfig::idle_timeout`).
    idle_at: Option<Duration>,
    /// A reset to send on the next poll (the idle timeout fired).
    pending_rst: Option<Seq>,
    /// Both sides agreed on window scaling.
    ws_ok: bool,
    /// The connection runs over IPv6 (for the default MSS).
    ipv6: bool,
    error: Option<TcpError>,
    /// Bytes retransmitted (for tests and stats).
    pub retransmitted: u64,
    /// Challenge ACKs not sent because of the rate limit.
    pub challenges_suppressed: u64,
    /// D-SACK blocks received (duplicates the peer reported; not counted as SACKed).
    pub dsacks_received: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Fast recoveries entered (duplicate ACKs or SACK).
    pub recoveries: u64,
    /// Tail loss probes sent.
    pub probes: u64,
    /// The connection was reset by the idle timeout.
    pub idle_timed_out: bool,
}

fn ms(d: Duration) -> u32 {
    d.as_millis() as u32
}

/// The window scale we announce for a receive buffer of `recv_buffer` bytes.
pub fn window_shift(recv_buffer: usize) -> u8 {
    (0..=14u8)
        .find(|s| (recv_buffer >> s) <= 65535)
        .unwrap_or(14)
}

impl Conn {
    fn new(cfg: TcpConfig, local_mss: u16, iss: Seq, state: State) -> Conn {
        let rcv_shift = window_shift(cfg.recv_buffer);
        Conn {
            recv: RecvBuffer::new(cfg.recv_buffer),
            send: SendBuffer::new(cfg.send_buffer),
            state,
            local_mss,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: 0,
            snd_wl1: Seq(0),
            snd_wl2: iss,
            snd_shift: 0,
            close_requested: false,
            fin_seq: None,
            fin_pos: None,
            irs: Seq(0),
            rcv_nxt: Seq(0),
            rcv_shift,
            peer_fin: None,
            fin_received: false,
            last_adv_wnd: 0,
            mss: local_mss,
            ts_ok: false,
            ts_recent: 0,
            ts_recent_at: Duration::ZERO,
            ts_offset: iss.0.rotate_left(13),
            sack_ok: false,
            board: Scoreboard::default(),
            reo_at: None,
            pto_at: None,
            tlp_out: false,
            send_probe: false,
            rearm_probe: false,
            dsack: None,
            last_ooo: None,
            challenge_tokens: cfg.challenge_acks_per_sec,
            challenge_refill: Duration::ZERO,
            soft_error: None,
            cc: Controller::new(cfg.congestion),
            rtt: RttEstimator::default(),
            timed: None,
            retries: 0,
            rto_at: None,
            ack_at: None,
            persist_at: None,
            time_wait_at: None,
            no_samples_before: None,
            cwnd: INITIAL_WINDOW * u32::from(local_mss),
            ssthresh: u32::MAX,
            dupacks: 0,
            recover: None,
            retransmit_una: false,
            ack_now: false,
            unacked_segs: 0,
            syn_sent_once: false,
            keepalive_at: None,
            keepalive_probes: 0,
            send_keepalive: false,
            idle_at: None,
            pending_rst: None,
            ws_ok: false,
            ipv6: false,
            error: None,
            retransmitted: 0,
            challenges_suppressed: 0,
            dsacks_received: 0,
            timeouts: 0,
            recoveries: 0,
            probes: 0,
            idle_timed_out: false,
            cfg,
        }
    }

    /// Active open: a connection in SYN-SENT.
    pub fn connect(cfg: TcpConfig, local_mss: u16, ipv6: bool, iss: Seq, now: Duration) -> Conn {
        let mut c = Conn::new(cfg, local_mss, iss, State::SynSent);
        c.ipv6 = ipv6;
        c.touch(now);
        c
    }

    /// Passive open: a SYN arrived for a listener; the connection is in SYN-RECEIVED.
    pub fn accept(
        cfg: TcpConfig,
        local_mss: u16,
        ipv6: bool,
        iss: Seq,
        syn: &SegIn,
        now: Duration,
    ) -> Conn {
        let mut c = Conn::new(cfg, local_mss, iss, State::SynReceived);
        c.ipv6 = ipv6;
        c.irs = syn.seq;
        c.rcv_nxt = syn.seq + 1;
        c.take_syn_options(syn, now);
        c.snd_wnd = u32::from(syn.window);
        c.snd_wl1 = syn.seq;
        c.touch(now);
        c
    }

    /// The peer made progress: restart the idle timeout.
    fn touch(&mut self, now: Duration) {
        self.idle_at = self.cfg.idle_timeout.map(|d| now + d);
    }

    /// Passive open from a valid SYN cookie: the SYN-ACK (sequence number `iss`, the cookie) is
    /// already out and acknowledged by `ack`; `syn` holds what the cookie recorded of the SYN
    /// (sequence number, MSS, window scale, SACK-permitted, timestamps). The connection is in
    /// SYN-RECEIVED; feed it `ack` with [`on_segment`](Self::on_segment) to establish it.
    pub fn from_cookie(
        cfg: TcpConfig,
        local_mss: u16,
        ipv6: bool,
        iss: Seq,
        syn: &SegIn,
        now: Duration,
    ) -> Conn {
        let mut c = Conn::accept(cfg, local_mss, ipv6, iss, syn, now);
        c.syn_sent_once = true;
        c.snd_nxt = iss + 1;
        c.snd_max = iss + 1;
        // The cookie's SYN-ACK gave no RTT sample: the first one comes with data.
        c.timed = None;
        c.no_samples_before = Some(now);
        // What the cookie SYN-ACK advertised (unscaled, as on any SYN).
        c.last_adv_wnd = c.cfg.recv_buffer.min(65535) as u32;
        c
    }

    fn take_syn_options(&mut self, syn: &SegIn, now: Duration) {
        // Without an MSS option: 536 for IPv4, 1220 for IPv6 (RFC 9293 3.7.1, RFC 8200 5).
        let default = if self.ipv6 { 1220 } else { 536 };
        let peer_mss = syn.mss.unwrap_or(default);
        self.mss = peer_mss.min(self.local_mss).max(64);
        match syn.wscale {
            Some(s) => {
                self.snd_shift = s.min(14);
                self.ws_ok = true;
            }
            None => self.rcv_shift = 0,
        }
        if let (true, Some((tsval, _))) = (self.cfg.timestamps, syn.ts) {
            self.ts_ok = true;
            self.ts_recent = tsval;
            self.ts_recent_at = now;
        }
        self.sack_ok = self.cfg.sack && syn.sack_permitted;
        self.cwnd = INITIAL_WINDOW * u32::from(self.payload_mss());
    }

    /// Payload bytes per full segment (MSS less the timestamp option).
    fn payload_mss(&self) -> u16 {
        if self.ts_ok {
            self.mss - 12
        } else {
            self.mss
        }
    }

    /// Payload bytes a segment may carry now: the MSS less timestamps and the SACK blocks it
    /// will carry, so that no segment outgrows the MTU.
    fn seg_limit(&self) -> u32 {
        let blocks = self.sack_blocks().iter().flatten().count() as u32;
        let sack = if blocks > 0 { 4 + 8 * blocks } else { 0 };
        u32::from(self.payload_mss()) - sack
    }

    /// A one-line summary of the connection's variables, for diagnostics.
    pub fn summary(&self) -> String {
        format!(
            "{:?} una {:?} nxt {:?} max {:?} wnd {} cwnd {} ssthresh {} rcv_nxt {:?} rwnd {} rto {:?} retries {} recover {:?} dupacks {} sendbuf {} readable {} holes {:?} fin {:?} peer_fin {:?} rto_at {:?} persist_at {:?} sack {} sacked {:?} timeouts {} recoveries {} probes {} retransmitted {}",
            self.state, self.snd_una, self.snd_nxt, self.snd_max, self.snd_wnd, self.cwnd, self.ssthresh, self.rcv_nxt,
            self.recv.window(), self.rtt.rto(), self.retries, self.recover, self.dupacks, self.send.len(), self.recv.len(),
            self.recv.ranges(), self.fin_seq, self.peer_fin, self.rto_at, self.persist_at, self.sack_ok, self.board.sacked_ranges(),
            self.timeouts, self.recoveries, self.probes, self.retransmitted
        )
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The error that ended the connection, if any.
    pub fn error(&self) -> Option<TcpError> {
        self.error
    }

    /// Congestion window in bytes.
    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }

    /// Bytes readable.
    pub fn readable(&self) -> usize {
        self.recv.len()
    }

    /// True once the peer's FIN arrived and every byte before it was read.
    pub fn at_eof(&self) -> bool {
        self.fin_received && self.recv.is_empty()
    }

    /// Free space in the send buffer (0 once closed for writing).
    pub fn send_space(&self) -> usize {
        if self.close_requested || !self.can_send() {
            0
        } else {
            self.send.space()
        }
    }

    /// Like [`send_space`](Self::send_space), counting only storage already allocated.
    pub fn send_space_in_place(&self) -> usize {
        self.send_space().min(self.send.room_in_place())
    }

    fn can_send(&self) -> bool {
        matches!(
            self.state,
            State::SynSent | State::SynReceived | State::Established | State::CloseWait
        )
    }

    /// Heap bytes of the connection's buffers.
    pub fn buffer_bytes(&self) -> usize {
        self.send.capacity() + self.recv.capacity()
    }

    /// Queues data; returns how much was taken.
    pub fn write(&mut self, data: &[u8]) -> usize {
        if self.close_requested || !self.can_send() {
            return 0;
        }
        self.send.write(data)
    }

    /// Reads received data; schedules a window update when the window opened a lot.
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let n = self.recv.read(out);
        // Receiver-side silly window avoidance (RFC 1122 4.2.3.3): announce the opened window
        // once it grew by two segments or half the buffer, whichever is smaller.
        let wnd = (self.recv.window() as u32).min(65535 << self.rcv_shift);
        let step = (2 * u32::from(self.mss)).min(self.cfg.recv_buffer as u32 / 2);
        if n > 0 && wnd >= self.last_adv_wnd + step {
            self.ack_now = true;
        }
        n
    }

    /// Appends `len` bytes of the send buffer from `off` to `out` (a frame being built).
    pub fn append_payload(&self, off: usize, len: usize, out: &mut Vec<u8>) {
        self.send.append_at(off, len, out);
    }

    /// Switches Nagle's algorithm (`TCP_NODELAY` is `set_nagle(false)`).
    pub fn set_nagle(&mut self, on: bool) {
        self.cfg.nagle = on;
    }

    /// Sets or clears keepalive probing.
    pub fn set_keepalive(&mut self, k: Option<Keepalive>, now: Duration) {
        self.cfg.keepalive = k;
        self.keepalive_probes = 0;
        self.keepalive_at = k.map(|k| now + k.idle);
    }

    /// Whether `syn`, a new SYN for this 4-tuple, may end this connection's TIME-WAIT: its
    /// sequence number is beyond what this incarnation used (RFC 1122 4.2.2.13) or its
    /// timestamp is newer than the last one seen (RFC 6191), and its timestamp is not older
    /// (PAWS). Either suffices, as in Linux: a client reconnecting within the same millisecond
    /// sends an equal timestamp, and its ISN has moved on.
    pub fn takes_new_syn(&self, syn: &SegIn) -> bool {
        if self.state != State::TimeWait || !syn.syn || syn.ack.is_some() || syn.rst {
            return false;
        }
        let ts = syn
            .ts
            .filter(|_| self.ts_ok)
            .map(|(tsval, _)| tsval.wrapping_sub(self.ts_recent) as i32);
        if ts.is_some_and(|d| d < 0) {
            return false;
        }
        syn.seq > self.rcv_nxt || ts.is_some_and(|d| d > 0)
    }

    /// Sets the congestion controller (a new one starts from the current window).
    pub fn set_congestion(&mut self, algo: Congestion) {
        self.cc = Controller::new(algo);
    }

    /// Ends the connection at once (used to skip TIME-WAIT when too many are held).
    pub fn force_close(&mut self) {
        self.state = State::Closed;
    }

    /// The application will send no more: FIN after the queued data (after the handshake when
    /// called in SYN-SENT, as Linux's `shutdown(SHUT_WR)` does).
    pub fn shutdown(&mut self) {
        if matches!(
            self.state,
            State::SynSent | State::SynReceived | State::Established | State::CloseWait
        ) {
            self.close_requested = true;
        }
    }

    /// The application closes: like [`shutdown`](Self::shutdown), except that a connection still
    /// in SYN-SENT is simply dropped (RFC 9293 3.10.4).
    pub fn close(&mut self) {
        if self.state == State::SynSent {
            self.state = State::Closed;
        } else {
            self.shutdown();
        }
    }

    /// The application aborts: the connection resets the peer and is gone.
    pub fn abort(&mut self, out: &mut Vec<SegOut>) {
        if matches!(
            self.state,
            State::SynReceived
                | State::Established
                | State::FinWait1
                | State::FinWait2
                | State::CloseWait
        ) {
            // With ACK, as Linux and the BSDs send it (RFC 9293 allows either).
            out.push(SegOut {
                seq: self.snd_max,
                ack: Some(self.rcv_nxt),
                rst: true,
                ..Default::default()
            });
        }
        self.error = Some(TcpError::Aborted);
        self.state = State::Closed;
    }

    fn window_field(&mut self) -> u16 {
        // What the field can say: without window scaling at most 65535. Remember that, not
        // the buffer's room, or a read would announce a window the peer already has.
        let wnd = (self.recv.window() as u32).min(65535 << self.rcv_shift);
        self.last_adv_wnd = wnd;
        (wnd >> self.rcv_shift) as u16
    }

    /// Our TSval clock at `now` with the offset `offset` (see
    /// [`set_ts_offset`](Self::set_ts_offset)).
    pub fn tsval(offset: u32, now: Duration) -> u32 {
        ms(now).wrapping_add(offset)
    }

    /// Sets the offset of the connection's timestamp clock; call before it sends anything. The
    /// stack derives it from a keyed hash of the two addresses, as Linux does: timestamps reveal
    /// no uptime, and stay monotonic across incarnations of a 4-tuple, which peers rely on when
    /// they reuse a port (a fresh random offset each time makes the next SYN-ACK look older).
    pub fn set_ts_offset(&mut self, offset: u32) {
        self.ts_offset = offset;
    }

    fn ts_option(&self, now: Duration) -> Option<(u32, u32)> {
        self.ts_ok
            .then(|| (ms(now).wrapping_add(self.ts_offset), self.ts_recent))
    }

    fn in_flight(&self) -> u32 {
        self.snd_nxt - self.snd_una
    }

    fn enter_time_wait(&mut self, now: Duration) {
        self.state = State::TimeWait;
        self.time_wait_at = Some(now + self.cfg.time_wait);
        self.rto_at = None;
        self.persist_at = None;
    }

    /// Processes a segment (RFC 9293 §3.10.7). Segments to send are produced by
    /// [`poll_transmit`](Self::poll_transmit); an immediate reply (RST) goes to `out`. Returns why
    /// the segment was dropped, if it was.
    pub fn on_segment(&mut self, now: Duration, seg: &SegIn, out: &mut Vec<SegOut>) -> Verdict {
        if self.state == State::SynSent {
            return self.on_segment_syn_sent(now, seg, out);
        }
        if self.state == State::Closed {
            return Some(DropReason::TcpNoConnection);
        }
        // PAWS (RFC 7323 5.3): an older timestamp than TS.Recent marks an old duplicate. RSTs
        // are exempt (they may carry none, and RFC 5961 checks them).
        if let (true, false, Some((tsval, _))) = (self.ts_ok, seg.rst, seg.ts) {
            if (tsval.wrapping_sub(self.ts_recent) as i32) < 0
                && now.saturating_sub(self.ts_recent_at) < PAWS_IDLE
            {
                self.ack_now = true;
                return Some(DropReason::TcpPaws);
            }
        }
        let len = seg.payload.len() as u32 + u32::from(seg.syn) + u32::from(seg.fin);
        let wnd = self.recv.window() as u32;
        // 1. Acceptability.
        let acceptable = match (len, wnd) {
            (0, 0) => seg.seq == self.rcv_nxt,
            (0, _) => seg.seq.in_window(self.rcv_nxt, wnd),
            (_, 0) => false,
            (_, _) => {
                seg.seq.in_window(self.rcv_nxt, wnd)
                    || (seg.seq + (len - 1)).in_window(self.rcv_nxt, wnd)
            }
        };
        if !acceptable {
            if seg.rst {
                return Some(DropReason::TcpOutOfWindow);
            }
            self.ack_now = true;
            if self.state == State::TimeWait && seg.fin {
                self.time_wait_at = Some(now + self.cfg.time_wait);
            }
            // A retransmission of data we have: report it as a D-SACK (RFC 2883).
            if self.sack_ok && !seg.payload.is_empty() && seg.seq < self.rcv_nxt {
                let end = (seg.seq + seg.payload.len() as u32).min(self.rcv_nxt);
                self.dsack = Some((seg.seq, end));
            }
            return Some(DropReason::TcpOutOfWindow);
        }
        // Anything acceptable from the peer shows it is alive.
        self.keepalive_probes = 0;
        self.keepalive_at = self.cfg.keepalive.map(|k| now + k.idle);
        // 2. RST (RFC 5961 3.2: only an exact match resets; otherwise challenge).
        if seg.rst {
            if seg.seq != self.rcv_nxt {
                return Some(self.challenge(now));
            }
            self.error = match self.state {
                State::SynReceived => Some(TcpError::Refused),
                State::TimeWait | State::Closing | State::LastAck => None,
                _ => Some(TcpError::Reset),
            };
            self.state = State::Closed;
            return None;
        }
        // 4. SYN in a synchronized state (RFC 5961 4.2): challenge ACK.
        if seg.syn {
            return Some(self.challenge(now));
        }
        // Timestamps: remember the latest in-order TSval (RFC 7323 4.3).
        if let (true, Some((tsval, _))) = (self.ts_ok, seg.ts) {
            if seg.seq <= self.rcv_nxt && (tsval.wrapping_sub(self.ts_recent) as i32) >= 0 {
                self.ts_recent = tsval;
                self.ts_recent_at = now;
            }
        }
        // 5. ACK.
        let Some(ack) = seg.ack else {
            return Some(DropReason::TcpNoAck);
        };
        if self.state == State::SynReceived {
            if self.snd_una < ack && ack <= self.snd_nxt {
                self.state = State::Established;
                self.snd_wnd = u32::from(seg.window) << self.snd_shift;
                self.snd_wl1 = seg.seq;
                self.snd_wl2 = ack;
            } else {
                out.push(SegOut {
                    seq: ack,
                    rst: true,
                    ..Default::default()
                });
                return Some(DropReason::TcpBadAck);
            }
        }
        if ack > self.snd_max {
            self.ack_now = true;
            return Some(DropReason::TcpAckUnsent);
        }
        self.process_ack(now, seg, ack);
        if self.state == State::Closed {
            return None;
        }
        // 7. Text.
        if !seg.payload.is_empty()
            && matches!(
                self.state,
                State::Established | State::FinWait1 | State::FinWait2
            )
        {
            self.take_data(now, seg);
        }
        // 8. FIN.
        if seg.fin {
            self.peer_fin = Some(seg.seq + seg.payload.len() as u32);
        }
        if let Some(f) = self.peer_fin {
            if f == self.rcv_nxt && !self.fin_received {
                self.fin_received = true;
                self.rcv_nxt += 1;
                self.ack_now = true;
                match self.state {
                    State::SynReceived | State::Established => self.state = State::CloseWait,
                    State::FinWait1 => self.state = State::Closing,
                    State::FinWait2 => self.enter_time_wait(now),
                    _ => {}
                }
            } else if self.state == State::TimeWait && seg.fin {
                self.ack_now = true;
                self.time_wait_at = Some(now + self.cfg.time_wait);
            }
        }
        None
    }

    /// Answers an in-window RST or a SYN with a challenge ACK (RFC 5961 3.2, 4.2), within the
    /// per-connection budget (RFC 5961 7).
    fn challenge(&mut self, now: Duration) -> DropReason {
        let rate = self.cfg.challenge_acks_per_sec;
        if now >= self.challenge_refill {
            self.challenge_tokens = rate;
            self.challenge_refill = now + Duration::from_secs(1);
        }
        if self.challenge_tokens == 0 {
            self.challenges_suppressed += 1;
            return DropReason::TcpChallengeAckLimited;
        }
        self.challenge_tokens -= 1;
        self.ack_now = true;
        DropReason::TcpChallengeAck
    }

    fn on_segment_syn_sent(
        &mut self,
        now: Duration,
        seg: &SegIn,
        out: &mut Vec<SegOut>,
    ) -> Verdict {
        if let Some(ack) = seg.ack {
            if ack <= self.iss || ack > self.snd_nxt {
                if !seg.rst {
                    out.push(SegOut {
                        seq: ack,
                        rst: true,
                        ..Default::default()
                    });
                }
                return Some(DropReason::TcpBadAck);
            }
        }
        if seg.rst {
            if seg.ack.is_some() {
                self.error = Some(TcpError::Refused);
                self.state = State::Closed;
                return None;
            }
            return Some(DropReason::TcpNoAck);
        }
        if !seg.syn {
            return Some(DropReason::TcpNoAck);
        }
        self.irs = seg.seq;
        self.rcv_nxt = seg.seq + 1;
        self.take_syn_options(seg, now);
        self.snd_wnd = u32::from(seg.window);
        self.snd_wl1 = seg.seq;
        match seg.ack {
            Some(ack) => {
                self.snd_una = ack;
                self.snd_wl2 = ack;
                self.state = State::Established;
                self.keepalive_at = self.cfg.keepalive.map(|k| now + k.idle);
                self.rto_at = None;
                self.retries = 0;
                if let Some((_, sent)) = self.timed.take() {
                    self.rtt.sample(now.saturating_sub(sent));
                }
                self.ack_now = true;
            }
            None => {
                // Simultaneous open: answer with SYN-ACK.
                self.state = State::SynReceived;
                self.snd_nxt = self.iss;
                self.syn_sent_once = false;
                self.rto_at = None;
            }
        }
        None
    }

    /// An ICMP error about a segment we sent with sequence number `seq` arrived. `mss` is the
    /// MSS the reported path MTU allows (packet too big), or `None` for destination unreachable
    /// (`port`: port unreachable). Errors whose sequence number we have not sent are stale or
    /// forged (RFC 5927 4.1) and dropped.
    pub fn on_icmp(&mut self, now: Duration, seq: Seq, mss: Option<u16>, port: bool) -> Verdict {
        let in_flight = if self.state == State::SynSent {
            seq == self.iss
        } else {
            self.snd_una <= seq && seq < self.snd_max
        };
        if !in_flight || matches!(self.state, State::Closed | State::TimeWait) {
            return Some(DropReason::TcpIcmpStale);
        }
        match mss {
            Some(m) => {
                // Path MTU discovery (RFC 1191, RFC 8201): shrink and resend what is in flight
                // at the new size at once, without a congestion response (it was no congestion).
                let m = m.max(if self.ts_ok { 88 } else { 76 });
                if m >= self.mss {
                    return Some(DropReason::TcpIcmpStale);
                }
                self.mss = m;
                if !matches!(self.state, State::SynSent | State::SynReceived) {
                    self.resend_all();
                    self.rto_at = Some(now + self.rtt.rto());
                }
                None
            }
            None if matches!(self.state, State::SynSent) => {
                // Hard error while connecting (RFC 1122 4.2.3.9, as Linux does for any
                // unreachable code in SYN-SENT).
                self.error = Some(if port {
                    TcpError::Refused
                } else {
                    TcpError::Unreachable
                });
                self.state = State::Closed;
                None
            }
            None => {
                // Soft error: reported if the connection later times out.
                self.soft_error = Some(if port {
                    TcpError::Refused
                } else {
                    TcpError::Unreachable
                });
                None
            }
        }
    }

    /// Resends everything in flight not SACKed: with SACK, by marking it lost on the
    /// scoreboard (recovery then resends it as the window allows); without, by going back.
    fn resend_all(&mut self) {
        if self.sack_ok {
            self.board.on_timeout();
            self.timed = None;
        } else {
            self.rewind();
        }
    }

    /// Goes back to SND.UNA to resend what is in flight (after a timeout or an MTU drop).
    fn rewind(&mut self) {
        self.snd_nxt = self.snd_una;
        if self.fin_seq.is_some_and(|f| f >= self.snd_una) {
            self.fin_seq = None;
        }
        self.timed = None;
    }

    fn process_ack(&mut self, now: Duration, seg: &SegIn, ack: Seq) {
        let mss = u32::from(self.payload_mss());
        if self.sack_ok {
            let (blocks, n, dsack) = self.valid_sack_blocks(seg, ack);
            self.board.on_ack(now, ack, &blocks[..n], dsack);
        } else if ack > self.snd_una {
            self.board.on_ack(now, ack, &[], false);
        }
        if ack > self.snd_una {
            let acked = ack - self.snd_una;
            // FIN and SYN occupy sequence space but not the send buffer.
            let syn_acked = u32::from(self.snd_una == self.iss);
            let fin_acked = self.fin_seq.or(self.fin_pos).is_some_and(|f| ack > f);
            if fin_acked {
                // Acknowledged before the rewound FIN went out again: it is not to be resent.
                self.fin_seq = self.fin_seq.or(self.fin_pos);
            }
            let data = acked - syn_acked - u32::from(fin_acked);
            self.send.ack(data as usize);
            self.snd_una = ack;
            self.touch(now);
            if self.snd_nxt < ack {
                self.snd_nxt = ack;
            }
            self.retries = 0;
            self.tlp_out = false;
            self.rearm_probe = true;
            self.rtt_sample(now, seg, ack);
            // Congestion control.
            match self.recover {
                Some(r) if ack > r => {
                    // Full acknowledgement: leave recovery (RFC 6582 3.2 step 3, RFC 6675 5).
                    self.cwnd = self.ssthresh.min(self.in_flight().max(mss) + mss);
                    self.recover = None;
                }
                Some(_) if self.sack_ok => {
                    // RFC 6675: the scoreboard drives retransmission; cwnd stays at ssthresh.
                }
                Some(_) => {
                    // Partial acknowledgement: retransmit the next hole, deflate.
                    self.retransmit_una = true;
                    self.cwnd = self.cwnd.saturating_sub(acked).max(mss) + mss;
                }
                // Slow start grows by everything acknowledged, as Linux does (tcp_slow_start),
                // not by at most one MSS per ACK (RFC 5681's SHOULD): a peer that receives
                // GRO'd or TSO super-frames acknowledges 64 KiB at a time, and one MSS per such
                // stretch ACK would keep the window near its initial ten segments.
                None if self.cwnd < self.ssthresh => {
                    // Up to ssthresh; past it, one MSS at most as before.
                    let grown = self.cwnd.saturating_add(acked).min(self.ssthresh);
                    self.cwnd = grown.max(self.cwnd.saturating_add(acked.min(mss)));
                }
                None => {
                    let srtt = self.rtt.srtt().unwrap_or(Duration::from_millis(100));
                    self.cwnd = self.cc.on_ack(now, srtt, self.cwnd, acked, mss);
                }
            }
            self.dupacks = 0;
            self.rto_at = (self.snd_una != self.snd_max).then(|| now + self.rtt.rto());
            if fin_acked {
                match self.state {
                    State::FinWait1 => self.state = State::FinWait2,
                    State::Closing => self.enter_time_wait(now),
                    State::LastAck => {
                        self.state = State::Closed;
                        return;
                    }
                    _ => {}
                }
            }
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && !seg.fin
            && self.snd_una != self.snd_max
            && u32::from(seg.window) << self.snd_shift == self.snd_wnd
            && !self.sack_ok
        {
            // Duplicate ACK (RFC 5681 2): without SACK, the third starts NewReno recovery.
            self.dupacks += 1;
            if self.recover.is_none() && self.dupacks >= DUP_THRESH {
                self.enter_recovery();
            } else if self.dupacks > DUP_THRESH {
                self.cwnd += mss;
            }
        }
        if self.sack_ok {
            self.detect_loss(now);
        }
        // Window update (RFC 9293 3.10.7.4).
        if self.snd_wl1 < seg.seq || (self.snd_wl1 == seg.seq && self.snd_wl2 <= ack) {
            self.snd_wnd = u32::from(seg.window) << self.snd_shift;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            if self.snd_wnd > 0 {
                self.persist_at = None;
            }
        }
    }

    /// RACK and RFC 6675 loss detection on the scoreboard; the first loss starts recovery.
    fn detect_loss(&mut self, now: Duration) {
        let mss = u32::from(self.payload_mss());
        let srtt = self.rtt.srtt().unwrap_or(super::rtt::INITIAL_RTO);
        let (lost, timer) = self
            .board
            .detect_loss(now, srtt, self.recover.is_some(), mss);
        self.reo_at = timer;
        if lost && self.recover.is_none() {
            self.enter_recovery();
        }
    }

    /// Fast retransmit / fast recovery entry (RFC 5681 3.2, RFC 6582, RFC 6675 5).
    fn enter_recovery(&mut self) {
        let mss = u32::from(self.payload_mss());
        self.recoveries += 1;
        self.board.on_recovery();
        self.ssthresh = self.cc.on_loss(self.cwnd, self.in_flight(), mss);
        self.recover = Some(self.snd_max);
        if self.sack_ok {
            self.cwnd = self.ssthresh;
        } else {
            self.cwnd = self.ssthresh + 3 * mss;
            self.retransmit_una = true;
        }
    }

    /// The segment's SACK blocks that tell something new: within what we sent and above the
    /// cumulative ACK. A first block at or below the cumulative ACK, or inside the second
    /// block, is a D-SACK (RFC 2883): it reports a duplicate and is returned as the flag.
    fn valid_sack_blocks(&mut self, seg: &SegIn, ack: Seq) -> ([(Seq, Seq); 3], usize, bool) {
        let mut out = [(Seq(0), Seq(0)); 3];
        let mut n = 0;
        let mut dsack = false;
        let blocks = seg.sack;
        for (i, b) in blocks.iter().enumerate() {
            let Some((l, r)) = *b else { continue };
            if r <= l || r > self.snd_max {
                continue;
            }
            if i == 0
                && (l < ack.max(self.snd_una)
                    || blocks[1].is_some_and(|(l2, r2)| l2 <= l && r <= r2))
            {
                self.dsacks_received += 1;
                dsack = true;
                continue;
            }
            let l = l.max(ack);
            if r > l {
                out[n] = (l, r);
                n += 1;
            }
        }
        (out, n, dsack)
    }

    /// Bytes believed in the network: the scoreboard's pipe with SACK, else what was sent
    /// from SND.UNA up to SND.NXT.
    fn pipe(&self) -> u32 {
        if self.sack_ok {
            self.board.pipe()
        } else {
            self.in_flight()
        }
    }

    fn rtt_sample(&mut self, now: Duration, seg: &SegIn, ack: Seq) {
        if let (true, Some((_, tsecr))) = (self.ts_ok, seg.ts) {
            let echoed = tsecr.wrapping_sub(self.ts_offset);
            // Karn's rule for timestamps: an echo from before the last timeout names a segment
            // sent before it, and the ACK may answer the retransmission (the receiver echoes
            // its older TS.Recent for a duplicate). Such a "sample" measures our own timeout and
            // would inflate the RTO without end under loss; wait for data sent since.
            if self
                .no_samples_before
                .is_some_and(|t| (echoed.wrapping_sub(ms(t)) as i32) < 0)
            {
                return;
            }
            let r = ms(now).wrapping_sub(echoed);
            if r < 60_000 {
                self.rtt.sample(Duration::from_millis(u64::from(r)));
            }
            return;
        }
        if let Some((s, t)) = self.timed {
            if ack > s {
                self.rtt.sample(now.saturating_sub(t));
                self.timed = None;
            }
        }
    }

    fn take_data(&mut self, now: Duration, seg: &SegIn) {
        if !seg.payload.is_empty() || seg.fin {
            self.touch(now);
        }
        // Trim what we already have.
        let (mut seq, mut data) = (seg.seq, seg.payload);
        if seq < self.rcv_nxt {
            let skip = (self.rcv_nxt - seq) as usize;
            if self.sack_ok {
                let dup = skip.min(data.len()) as u32;
                self.dsack = Some((seq, seq + dup));
            }
            if skip >= data.len() {
                self.ack_now = true;
                return;
            }
            data = &data[skip..];
            seq = self.rcv_nxt;
        }
        let off = (seq - self.rcv_nxt) as usize;
        if off > 0 {
            if self.sack_ok {
                // Data we already hold out of order is a duplicate too (RFC 2883).
                let end = off + data.len();
                if self
                    .recv
                    .ranges()
                    .iter()
                    .any(|&(a, b)| a <= off && end <= b)
                {
                    self.dsack = Some((seq, seq + data.len() as u32));
                }
            }
            self.last_ooo = Some(seq);
        }
        let had_holes = !self.recv.ranges().is_empty();
        let advanced = self.recv.write(off, data);
        self.rcv_nxt += advanced as u32;
        if off > 0 || had_holes {
            // Out of order, or filling a hole: ACK at once (RFC 5681 4.2).
            self.ack_now = true;
        } else {
            // Counted in full-sized segments: a GSO super-frame from a device with receive
            // offloads stands for many, and is acknowledged at once as they would be.
            let segs = (data.len() / usize::from(self.mss.max(1))).max(1);
            self.unacked_segs = self.unacked_segs.saturating_add(segs as u32);
            if self.unacked_segs >= 2 {
                self.ack_now = true;
            } else if self.ack_at.is_none() {
                self.ack_at = Some(now + self.cfg.delayed_ack);
            }
        }
    }

    /// Runs timers due at `now`.
    pub fn on_timer(&mut self, now: Duration) {
        if self.time_wait_at.is_some_and(|t| t <= now) {
            self.state = State::Closed;
            return;
        }
        if self.idle_at.is_some_and(|t| t <= now)
            && matches!(
                self.state,
                State::SynReceived
                    | State::Established
                    | State::CloseWait
                    | State::FinWait1
                    | State::FinWait2
            )
        {
            self.idle_at = None;
            self.pending_rst = Some(self.snd_max);
            self.idle_timed_out = true;
            self.error = Some(TcpError::TimedOut);
            self.state = State::Closed;
            return;
        }
        if let (Some(t), Some(k)) = (self.keepalive_at, self.cfg.keepalive) {
            if t <= now && self.state == State::Established {
                if self.keepalive_probes >= k.probes {
                    self.error = Some(TcpError::TimedOut);
                    self.state = State::Closed;
                    return;
                }
                self.keepalive_probes += 1;
                self.send_keepalive = true;
                self.keepalive_at = Some(now + k.interval);
            }
        }
        if self.ack_at.is_some_and(|t| t <= now) {
            self.ack_now = true;
        }
        if self.reo_at.is_some_and(|t| t <= now) {
            self.reo_at = None;
            if self.sack_ok {
                self.detect_loss(now);
            }
        }
        if self.pto_at.is_some_and(|t| t <= now) {
            self.pto_at = None;
            self.send_probe = true;
            self.tlp_out = true;
        }
        if self.persist_at.is_some_and(|t| t <= now) {
            self.persist_at = None;
            self.rtt.back_off();
            // A one-byte probe beyond the zero window.
            if self.snd_nxt == self.snd_una
                && (self.snd_nxt - self.snd_una) < self.send.len() as u32
            {
                self.snd_wnd = 1;
            }
        }
        if self.rto_at.is_some_and(|t| t <= now) {
            self.retries += 1;
            let limit = if matches!(self.state, State::SynSent | State::SynReceived) {
                self.cfg.syn_retries
            } else {
                self.cfg.max_retries
            };
            if self.retries > limit {
                self.error = Some(self.soft_error.unwrap_or(TcpError::TimedOut));
                self.state = State::Closed;
                return;
            }
            self.rtt.back_off();
            self.timeouts += 1;
            self.no_samples_before = Some(now);
            let mss = u32::from(self.payload_mss());
            if !matches!(self.state, State::SynSent | State::SynReceived) {
                // RFC 5681 (4) once per loss episode: a second timeout keeps the threshold.
                if self.retries == 1 {
                    self.ssthresh = self.cc.on_timeout(self.cwnd, self.in_flight(), mss);
                }
                self.cwnd = mss;
                self.recover = None;
                self.dupacks = 0;
                self.pto_at = None;
                self.reo_at = None;
                self.tlp_out = false;
                // SACKed data is not resent after a timeout (RFC 6675 5.1); a second timeout
                // in a row may mean the receiver reneged, so SACK marks are dropped then.
                if self.retries > 1 {
                    self.board.forget_sacks();
                }
                // Everything else is lost (RFC 5681 3.1, RFC 6298 5.4, RFC 8985 6.3).
                self.resend_all();
            } else {
                self.rewind();
            }
            self.syn_sent_once = false;
            // poll_transmit re-arms with the backed-off RTO once it has resent.
            self.rto_at = None;
        }
    }

    /// The earliest deadline of the connection's timers.
    pub fn next_deadline(&self) -> Option<Duration> {
        let keepalive = self
            .keepalive_at
            .filter(|_| self.state == State::Established);
        [
            self.rto_at,
            self.ack_at,
            self.persist_at,
            self.time_wait_at,
            keepalive,
            self.idle_at.filter(|_| self.state != State::TimeWait),
            self.reo_at,
            self.pto_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Appends the segments to send now to `out`.
    pub fn poll_transmit(&mut self, now: Duration, out: &mut Vec<SegOut>) {
        if let Some(seq) = self.pending_rst.take() {
            out.push(SegOut {
                seq,
                rst: true,
                ..Default::default()
            });
            return;
        }
        let before = out.len();
        match self.state {
            State::SynSent | State::SynReceived => {
                if !self.syn_sent_once {
                    self.syn_sent_once = true;
                    let syn_ack = self.state == State::SynReceived;
                    out.push(SegOut {
                        seq: self.iss,
                        ack: syn_ack.then_some(self.rcv_nxt),
                        syn: true,
                        window: {
                            // A SYN's window is never scaled.
                            self.last_adv_wnd = self.recv.window().min(65535) as u32;
                            self.last_adv_wnd as u16
                        },
                        mss: Some(self.local_mss),
                        // A SYN-ACK carries window scale only if the SYN did (RFC 7323 1.3).
                        wscale: (!syn_ack || self.ws_ok).then_some(self.rcv_shift),
                        ts: if syn_ack {
                            self.ts_option(now)
                        } else {
                            self.cfg
                                .timestamps
                                .then(|| (ms(now).wrapping_add(self.ts_offset), 0))
                        },
                        sack_permitted: if syn_ack { self.sack_ok } else { self.cfg.sack },
                        ..Default::default()
                    });
                    self.snd_nxt = self.iss + 1;
                    self.snd_max = self.snd_max.max(self.snd_nxt);
                    self.timed = Some((self.iss, now));
                    self.rto_at = Some(now + self.rtt.rto());
                }
                return;
            }
            State::Closed | State::TimeWait => {
                // One ACK per FIN received; the flag must be cleared here too, or every later
                // poll re-sends it and a peer that has closed answers each with RST.
                if std::mem::take(&mut self.ack_now) && self.state == State::TimeWait {
                    self.push_ack(now, out);
                }
                self.ack_at = None;
                return;
            }
            _ => {}
        }
        let mss = self.seg_limit();
        if self.retransmit_una {
            self.retransmit_una = false;
            let len = (self.send.len() as u32)
                .min(self.snd_max - self.snd_una)
                .min(mss) as usize;
            if len > 0 {
                let seg = self.data_seg(now, self.snd_una, 0, len, false);
                self.retransmitted += len as u64;
                out.push(seg);
            }
        }
        if self.sack_ok {
            // RFC 6675 5 (C): while the pipe leaves room, resend what is lost.
            if self.board.has_lost() {
                let mut pipe = self.pipe();
                while pipe + mss <= self.cwnd.max(mss) {
                    let Some((seq, len)) = self.board.next_lost(mss) else {
                        break;
                    };
                    self.resend(now, seq, len, out);
                    pipe += len;
                }
            }
        }
        let sent_before = out.len();
        self.send_data(now, out);
        if std::mem::take(&mut self.send_probe) && out.len() == sent_before {
            // Tail loss probe (RFC 8985 7.3): new data if the window allows, else the last
            // segment again, so that the peer's answer (with SACK) shows what is missing. In a
            // stalled recovery, the first lost segment.
            self.probes += 1;
            let room = (self.snd_wnd as usize).saturating_sub(self.in_flight() as usize);
            let sent_data = self.in_flight() as usize
                - usize::from(self.fin_seq.is_some_and(|f| f >= self.snd_una));
            let unsent = self.send.len().saturating_sub(sent_data);
            if let Some((seq, len)) = self.board.next_lost(mss) {
                self.resend(now, seq, len, out);
            } else if unsent > 0 && room > 0 {
                let len = unsent.min(room).min(mss as usize);
                let seq = self.snd_nxt;
                let seg = self.data_seg(now, seq, sent_data, len, false);
                self.board.on_send(seq, seq + len as u32, now);
                self.snd_nxt = seq + len as u32;
                self.snd_max = self.snd_max.max(self.snd_nxt);
                out.push(seg);
            } else if let Some((seq, len)) = self.board.last() {
                self.resend(now, seq, len.min(mss), out);
            }
            self.rto_at = Some(now + self.rtt.rto());
        }
        if std::mem::take(&mut self.send_keepalive) && out.len() == before {
            // A keepalive probe: one sequence number below SND.UNA, so the peer must answer
            // with an ACK (RFC 1122 4.2.3.6).
            let window = self.window_field();
            out.push(SegOut {
                seq: self.snd_una + u32::MAX,
                ack: Some(self.rcv_nxt),
                window,
                ts: self.ts_option(now),
                ..Default::default()
            });
            return;
        }
        if out.len() == before && (self.ack_now || self.ack_at.is_some_and(|t| t <= now)) {
            self.push_ack(now, out);
        }
        if out.len() > before {
            self.ack_now = false;
            self.ack_at = None;
            self.unacked_segs = 0;
            self.dsack = None;
        }
        if self.snd_una != self.snd_max && self.rto_at.is_none() {
            self.rto_at = Some(now + self.rtt.rto());
        }
        self.arm_probe(now);
        // Zero window with data waiting and nothing in flight: probe later.
        if self.snd_wnd == 0
            && self.snd_una == self.snd_max
            && !self.send.is_empty()
            && self.persist_at.is_none()
        {
            self.persist_at = Some(now + self.rtt.rto());
        }
    }

    /// Resends `len` bytes from `seq` (a segment on the scoreboard; its FIN too if it holds
    /// ours).
    fn resend(&mut self, now: Duration, seq: Seq, len: u32, out: &mut Vec<SegOut>) {
        let off = (seq - self.snd_una) as usize;
        let data = (len as usize).min(self.send.len().saturating_sub(off));
        let fin = self
            .fin_seq
            .is_some_and(|f| f >= seq && f < seq + len && f == seq + data as u32);
        let seg = self.data_seg(now, seq, off, data, fin);
        self.board
            .on_send(seq, seq + data as u32 + u32::from(fin), now);
        self.retransmitted += data as u64;
        out.push(seg);
    }

    /// Arms the tail loss probe (RFC 8985 7.2) while data is in flight: two smoothed RTTs
    /// (plus the peer's delayed-ACK time when one segment is out), before the RTO.
    ///
    /// Unlike RFC 8985, which probes only outside recovery, a recovery that stalls is probed
    /// too, once until the next cumulative ACK: its last segments or their ACKs went missing,
    /// or the window is full of segments that will never be acknowledged while lost ones wait.
    /// With the small windows heavy loss leaves, that is the common case, and the probe (the
    /// first lost segment, else new data, else the last segment) turns a 200 ms timeout into a
    /// round trip.
    fn arm_probe(&mut self, now: Duration) {
        // Not while backing off after a retransmission timeout (RFC 8985 7.2: a probe is for a
        // connection not in loss recovery; Linux likewise): one retransmission per backoff.
        let eligible = self.sack_ok
            && matches!(self.state, State::Established | State::CloseWait)
            && !self.tlp_out
            && self.retries == 0
            && !self.board.is_empty();
        let Some(srtt) = self.rtt.srtt().filter(|_| eligible) else {
            self.pto_at = None;
            return;
        };
        if !std::mem::take(&mut self.rearm_probe) && self.pto_at.is_some() {
            return;
        }
        let mut pto = (srtt * 2).max(Duration::from_millis(10));
        if self.board.len() == 1 {
            pto += self.cfg.delayed_ack;
        }
        let at = now + pto;
        self.pto_at = Some(self.rto_at.map_or(at, |r| at.min(r)));
    }

    /// SACK blocks for an outgoing ACK: a pending D-SACK first, then the block holding the
    /// latest out-of-order segment, then the others from the highest down (RFC 2018 4).
    fn sack_blocks(&self) -> [Option<(Seq, Seq)>; 3] {
        let mut blocks = [None; 3];
        if !self.sack_ok {
            return blocks;
        }
        let mut n = 0;
        if let Some(d) = self.dsack {
            blocks[0] = Some(d);
            n = 1;
        }
        let ranges = self.recv.ranges();
        let abs = |&(a, b): &(usize, usize)| (self.rcv_nxt + a as u32, self.rcv_nxt + b as u32);
        let latest = self
            .last_ooo
            .and_then(|s| ranges.iter().map(abs).find(|&(a, b)| a <= s && s < b));
        if let Some(b) = latest {
            blocks[n] = Some(b);
            n += 1;
        }
        for r in ranges.iter().rev().map(abs) {
            if n == blocks.len() {
                break;
            }
            if Some(r) != latest {
                blocks[n] = Some(r);
                n += 1;
            }
        }
        blocks
    }

    fn push_ack(&mut self, now: Duration, out: &mut Vec<SegOut>) {
        let window = self.window_field();
        // A pure ACK carries the highest sequence number sent, not SND.NXT: after a timeout
        // SND.NXT goes back to SND.UNA, and the peer would find an older number unacceptable and
        // drop the acknowledgement unread (BSD does the same).
        out.push(SegOut {
            seq: self.snd_max,
            ack: Some(self.rcv_nxt),
            window,
            ts: self.ts_option(now),
            sack: self.sack_blocks(),
            ..Default::default()
        });
    }

    fn data_seg(&mut self, now: Duration, seq: Seq, off: usize, len: usize, fin: bool) -> SegOut {
        let window = self.window_field();
        SegOut {
            seq,
            ack: Some(self.rcv_nxt),
            fin,
            psh: len > 0 && off + len == self.send.len(),
            window,
            ts: self.ts_option(now),
            sack: self.sack_blocks(),
            off,
            len,
            ..Default::default()
        }
    }

    fn send_data(&mut self, now: Duration, out: &mut Vec<SegOut>) {
        let mss = self.seg_limit() as usize;
        // The pipe once, then what this call adds (it is a pass over the scoreboard).
        let mut pipe = self.pipe() as usize;
        loop {
            // Going back from SND.UNA, skip what the peer SACKed.
            if let Some(end) = self.board.sacked_run_end(self.snd_nxt) {
                self.snd_nxt = end;
            }
            let sent = (self.snd_nxt - self.snd_una) as usize;
            let fin_in_flight = self
                .fin_seq
                .is_some_and(|f| f >= self.snd_una && f < self.snd_nxt);
            let sent_data = sent - usize::from(fin_in_flight);
            let unsent = self.send.len().saturating_sub(sent_data);
            // The peer's window bounds sequence space; the congestion window bounds the pipe.
            let wnd_room = (self.snd_wnd as usize).saturating_sub(sent);
            let cc_room = (self.cwnd as usize).saturating_sub(pipe);
            let mut len = unsent.min(wnd_room).min(cc_room).min(mss);
            // Do not run into a SACKed range when resending.
            if let Some(l) = self.board.next_sacked_after(self.snd_nxt) {
                len = len.min((l - self.snd_nxt) as usize);
            }
            let want_fin = self.close_requested && self.fin_seq.is_none() && len == unsent;
            if len == 0 && !want_fin {
                return;
            }
            // Nagle: hold a small segment while anything is unacknowledged.
            if self.cfg.nagle && len < mss && len < unsent && sent > 0 {
                return;
            }
            if self.cfg.nagle && len < mss && len > 0 && len == unsent && sent > 0 && !want_fin {
                return;
            }
            if want_fin && unsent > len {
                len = 0;
            }
            let seq = self.snd_una + sent as u32;
            let seg = self.data_seg(now, seq, sent_data, len, want_fin);
            if self.timed.is_none() && !self.ts_ok && len > 0 && seq >= self.snd_max {
                self.timed = Some((seq + len as u32, now));
            }
            if seq < self.snd_max {
                self.retransmitted += len as u64;
            }
            self.snd_nxt = seq + len as u32 + u32::from(want_fin);
            self.board.on_send(seq, self.snd_nxt, now);
            pipe += len;
            self.rearm_probe = true;
            self.snd_max = self.snd_max.max(self.snd_nxt);
            if want_fin {
                self.fin_seq = Some(seq + len as u32);
                self.fin_pos.get_or_insert(seq + len as u32);
                match self.state {
                    State::Established | State::SynReceived => self.state = State::FinWait1,
                    State::CloseWait => self.state = State::LastAck,
                    _ => {}
                }
            }
            out.push(seg);
            if want_fin {
                return;
            }
        }
    }
}
