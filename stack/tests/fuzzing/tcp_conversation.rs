// The body of the `tcp_conversation` fuzz target, shared with the test suite
// (`stack/tests/fuzz_smoke.rs` runs it on pseudo-random inputs and the seed corpus;
// `fuzz/fuzz_targets/tcp_conversation.rs` includes this file).
//
// Arbitrary segment sequences, timer ticks and application calls against one listener and its
// connections, with the peer's side modelled: whatever the input, the stack must not panic,
// must never send data the application did not write, never acknowledge bytes the peer did not
// send, deliver to the application exactly the bytes the peer sent at those offsets, and keep
// connections and buffer memory within their limits.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{TcpControl, TcpSeqNumber, TcpTimestampRepr};
use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::{Batch, FrameMeta, Mac};
use subnetstack_stack::{Config, IoError, Stack, TcpConfig, TcpHandle, TcpListenerHandle};
use subnetstack_testkit::{arp_request, tcp4, tcp4_frame, tcp_repr};

const S_MAC: Mac = [0x02, 0x53, 0, 0, 0, 1];
const P_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 7);
const PEER_ISN: u32 = 1_000_000;
const PORTS: [u16; 3] = [40000, 40001, 40002];
const BUF: usize = 8 * 1024;
const MAX_CONNS: usize = 2;
const MAX_TIME_WAIT: usize = 2;

/// The byte the peer sends at stream offset `k` (so that delivered data can be checked).
fn pattern(k: u32) -> u8 {
    (k.wrapping_mul(7) ^ (k >> 8)) as u8
}

/// The byte the application writes at offset `k`.
fn app_pattern(k: usize) -> u8 {
    (k as u8).wrapping_mul(13)
}

/// What the model knows of the connection from one peer port (its latest incarnation).
#[derive(Default)]
struct Side {
    /// The stack's ISN, from its latest SYN-ACK.
    iss: Option<u32>,
    /// Highest sequence number (exclusive) the peer has sent, payload and SYN/FIN included
    /// (every incarnation starts at the same peer ISN, so this carries over).
    peer_end: u32,
    /// Bytes the application wrote to this incarnation.
    written: usize,
    /// Whether the application closed or shut down its side.
    closed: bool,
    /// The accepted handle, while the application holds it.
    handle: Option<TcpHandle>,
    /// The peer's next in-order sequence number (as far as the model can tell).
    peer_next: u32,
    /// Highest sequence number (exclusive) the stack sent in this incarnation.
    stack_end: Option<u32>,
}

/// How deep an input got (so that tests can check random inputs reach past the handshake).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reach {
    /// Connections accepted.
    pub accepted: u32,
    /// Peer bytes the application read.
    pub read: u64,
    /// Data bytes the stack sent.
    pub sent: u64,
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

/// Accepts what is queued, starting the model of each connection.
fn accept(
    s: &mut Stack,
    l: TcpListenerHandle,
    sides: &mut HashMap<u16, Side>,
    reads: &mut HashMap<TcpHandle, u32>,
    reach: &mut Reach,
) {
    while let Some((h, _, remote)) = s.tcp_accept(l) {
        reach.accepted += 1;
        let side = sides.entry(remote.port()).or_default();
        side.handle = Some(h);
        side.closed = false;
        // A new incarnation: its ISN may equal the last one's (same 4-tuple, same clock tick,
        // RFC 6528), so the SYN-ACK alone does not tell; the application writes only after
        // accepting, so counting restarts here.
        side.written = 0;
        reads.insert(h, 0);
    }
}

/// Runs one input; panics when the stack breaks an invariant.
pub fn run(data: &[u8]) -> Reach {
    let mut reach = Reach::default();
    // Set CONV_TRACE=1 to print the conversation (for a failing input).
    let trace = std::env::var_os("CONV_TRACE").is_some();
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.hash_key = Some(HashKey([4; 16]));
    cfg.tcp = TcpConfig {
        send_buffer: BUF,
        recv_buffer: BUF,
        max_connections: MAX_CONNS,
        max_time_wait: MAX_TIME_WAIT,
        ..TcpConfig::default()
    };
    let mut s = Stack::new(cfg).unwrap();
    let mut now = Duration::from_secs(10);
    s.handle_frame(now, &arp_request(P_MAC, PEER, LOCAL), FrameMeta::default());
    let l = s
        .tcp_listen(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            false,
            // Room for every port: no SYN cookies here. A cookie connection takes its ISN from
            // the ACK that completes it (an ACK one or two below still decodes, with another
            // MSS, as in Linux), which this model cannot follow; cookies have their own tests.
            8,
        )
        .unwrap();
    let mut sides: HashMap<u16, Side> = HashMap::new();
    // Peer bytes each handle delivered to the application so far.
    let mut reads: HashMap<TcpHandle, u32> = HashMap::new();
    let mut out = Batch::new(256, 4096);
    let mut input = Bytes(data);
    let mut steps = 0;
    while !input.0.is_empty() && steps < 400 {
        steps += 1;
        let op = input.u8();
        let port = PORTS[usize::from(op >> 4) % PORTS.len()];
        match op % 8 {
            // A segment from the peer, anywhere around its sequence space.
            0..=2 => {
                let flags = input.u8();
                let side = sides.entry(port).or_default();
                let base = PEER_ISN.wrapping_add(1);
                if side.peer_next == 0 {
                    side.peer_next = base;
                }
                let seq = if flags & 0x01 != 0 {
                    PEER_ISN
                } else {
                    let r = u32::from(input.u16());
                    match r % 4 {
                        0 | 1 => side.peer_next,
                        2 => side.peer_next.wrapping_add(r % 3000),
                        _ => side.peer_next.wrapping_sub(r % 3000),
                    }
                };
                let r = u32::from(input.u16());
                let ack = side.iss.map(|i| match (side.stack_end, r % 4) {
                    (Some(e), 0 | 1) => e,
                    (Some(e), 2) => e.wrapping_sub(r % 2000),
                    _ => i.wrapping_add(1).wrapping_add(r % (2 * BUF as u32)),
                });
                let len = usize::from(input.u8()) * 8 % 1200;
                let off = seq.wrapping_sub(base);
                let payload: Vec<u8> = (0..len as u32)
                    .map(|i| pattern(off.wrapping_add(i)))
                    .collect();
                let control = match flags & 0x0e {
                    0x02 => TcpControl::Fin,
                    0x04 => TcpControl::Rst,
                    0x06 => TcpControl::Psh,
                    _ if flags & 0x01 != 0 => TcpControl::Syn,
                    _ => TcpControl::None,
                };
                let syn = control == TcpControl::Syn;
                let mut repr = tcp_repr(
                    port,
                    80,
                    control,
                    seq as i32,
                    if syn && flags & 0x10 == 0 {
                        None
                    } else {
                        ack.map(|a| a as i32)
                    },
                    input.u16(),
                    if syn || control == TcpControl::Rst {
                        &[]
                    } else {
                        &payload
                    },
                );
                repr.ack_number = repr.ack_number.map(|a| TcpSeqNumber(a.0));
                if flags & 0x20 != 0 {
                    repr.timestamp = Some(TcpTimestampRepr::new(u32::from(input.u16()), 0));
                }
                if syn {
                    repr.max_seg_size = Some(536 + input.u16() % 1000);
                    repr.window_scale = Some(input.u8() % 16);
                    repr.sack_permitted = flags & 0x40 != 0;
                }
                if flags & 0x80 != 0 {
                    if let Some(i) = side.iss {
                        let a = i.wrapping_add(1 + u32::from(input.u16()) % (2 * BUF as u32));
                        repr.sack_ranges[0] = Some((a, a.wrapping_add(u32::from(input.u8()) * 8)));
                    }
                }
                // Only in-window data can be delivered; the model records what was offered.
                let end = seq
                    .wrapping_add(repr.payload.len() as u32)
                    .wrapping_add(u32::from(syn) + u32::from(control == TcpControl::Fin));
                if side.peer_end == 0 || end.wrapping_sub(side.peer_end) as i32 > 0 {
                    side.peer_end = end;
                }
                if control != TcpControl::Rst
                    && side.peer_next.wrapping_sub(seq) as i32 >= 0
                    && end.wrapping_sub(side.peer_next) as i32 > 0
                {
                    side.peer_next = end;
                }
                if trace {
                    eprintln!("{now:?} peer {repr}");
                }
                s.handle_frame(
                    now,
                    &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &repr),
                    FrameMeta::default(),
                );
            }
            // Time passes.
            3 => {
                now += Duration::from_millis(u64::from(input.u8()) * 20);
                s.handle_timeout(now);
            }
            // The application accepts and writes.
            4 => {
                accept(&mut s, l, &mut sides, &mut reads, &mut reach);
                let n = usize::from(input.u16()) % (2 * BUF);
                if let Some(side) = sides.get_mut(&port) {
                    if let (Some(h), false) = (side.handle, side.closed) {
                        let data: Vec<u8> =
                            (side.written..side.written + n).map(app_pattern).collect();
                        if let Ok(k) = s.tcp_send(now, h, &data) {
                            assert!(k <= n);
                            side.written += k;
                        }
                    }
                }
            }
            // The application reads: exactly what the peer sent, in order.
            5 => {
                if let Some(side) = sides.get_mut(&port) {
                    if let Some(h) = side.handle {
                        let read = reads.entry(h).or_default();
                        let mut buf = vec![0u8; usize::from(input.u16()) % (2 * BUF) + 1];
                        match s.tcp_recv(now, h, &mut buf) {
                            Ok(n) => {
                                for (i, b) in buf[..n].iter().enumerate() {
                                    assert_eq!(
                                        *b,
                                        pattern(*read + i as u32),
                                        "byte {} delivered wrong",
                                        *read + i as u32
                                    );
                                }
                                *read += n as u32;
                                reach.read += n as u64;
                            }
                            Err(
                                IoError::WouldBlock
                                | IoError::NotConnected
                                | IoError::Closed
                                | IoError::Failed(_)
                                | IoError::Invalid,
                            ) => {}
                        }
                    }
                }
            }
            // The application closes, shuts down or aborts.
            6 => {
                if let Some(side) = sides.get_mut(&port) {
                    if let Some(h) = side.handle {
                        match input.u8() % 3 {
                            0 => {
                                s.tcp_close(now, h);
                                side.handle = None;
                                side.closed = true;
                            }
                            1 => {
                                s.tcp_shutdown(now, h);
                                side.closed = true;
                            }
                            _ => {
                                s.tcp_abort(now, h);
                                side.handle = None;
                                side.closed = true;
                            }
                        }
                    }
                }
            }
            // Accept only.
            _ => accept(&mut s, l, &mut sides, &mut reads, &mut reach),
        }
        // What the stack sent: check it against the model.
        out.clear();
        s.poll_transmit(&mut out);
        for f in out.frames() {
            let Some(seg) = tcp4(f.data()) else { continue };
            if trace {
                eprintln!(
                    "{now:?} stack -> {} seq {} ack {:?} syn {} fin {} rst {} len {}",
                    seg.dport,
                    seg.seq as u32,
                    seg.ack.map(|a| a as u32),
                    seg.syn,
                    seg.fin,
                    seg.rst,
                    seg.payload.len()
                );
            }
            let side = sides.entry(seg.dport).or_default();
            let seq = seg.seq as u32;
            if seg.syn && side.iss != Some(seq) {
                // A new incarnation (a SYN-ACK retransmission keeps its ISN).
                side.iss = Some(seq);
                side.written = 0;
                side.stack_end = None;
            }
            if seg.rst {
                continue;
            }
            let Some(iss) = side.iss else { continue };
            // Never data the application did not write (plus SYN and FIN).
            let end = seq
                .wrapping_add(seg.payload.len() as u32)
                .wrapping_add(u32::from(seg.fin) + u32::from(seg.syn));
            let limit = iss
                .wrapping_add(1)
                .wrapping_add(side.written as u32)
                .wrapping_add(1);
            assert!(
                limit.wrapping_sub(end) as i32 >= 0,
                "sent up to {end} past what was written (limit {limit})"
            );
            reach.sent += seg.payload.len() as u64;
            if side
                .stack_end
                .is_none_or(|e| end.wrapping_sub(e) as i32 > 0)
            {
                side.stack_end = Some(end);
            }
            for (i, b) in seg.payload.iter().enumerate() {
                let k = seq.wrapping_add(i as u32).wrapping_sub(iss.wrapping_add(1)) as usize;
                assert_eq!(
                    *b,
                    app_pattern(k),
                    "sent byte {k} is not what was written: {seg:?} iss {iss}"
                );
            }
            // Never an acknowledgement of bytes the peer did not send.
            if let (Some(a), false) = (seg.ack, seg.syn) {
                let a = a as u32;
                assert!(
                    side.peer_end.wrapping_sub(a) as i32 >= 0 || side.peer_end == 0,
                    "acknowledged {a} past the peer's end {}",
                    side.peer_end
                );
            }
        }
        assert!(
            s.tcp_connections() <= MAX_CONNS + MAX_TIME_WAIT,
            "{}",
            s.tcp_connections()
        );
        // Buffers of every connection object still alive: open ones, TIME-WAIT, and closed
        // ones whose handle the application still holds (one per port at most); 32 ranges
        // of out-of-order bookkeeping each.
        assert!(
            s.tcp_buffer_memory()
                <= (MAX_CONNS + MAX_TIME_WAIT + PORTS.len()) * (2 * BUF + 32 * 16),
            "{}",
            s.tcp_buffer_memory()
        );
        assert!(s.pending_transmit() <= 4096);
    }
    reach
}
