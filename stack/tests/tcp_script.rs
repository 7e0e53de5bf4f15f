//! Scripted TCP: a segment in, the exact segment (or counted drop) out, rule by rule
//! (RFC 9293 §3.10, RFC 5961, RFC 7323).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use smoltcp::wire::{TcpControl, TcpRepr, TcpTimestampRepr};
use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::{Batch, FrameMeta, Mac};
use subnetstack_stack::{Config, DropReason, IoError, Stack, TcpConfig, TcpHandle, TcpState};
use subnetstack_testkit::*;

const S_MAC: Mac = [0x02, 0x53, 0, 0, 0, 1];
const P_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 7);
const T0: Duration = Duration::from_secs(10);

struct Rig {
    s: Stack,
    now: Duration,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_tcp(TcpConfig::default())
    }

    fn with_tcp(tcp: TcpConfig) -> Rig {
        let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
        cfg.hash_key = Some(HashKey([4; 16]));
        cfg.tcp = tcp;
        let mut s = Stack::new(cfg).unwrap();
        // The peer's MAC is known (it asked for ours).
        s.handle_frame(T0, &arp_request(P_MAC, PEER, LOCAL), FrameMeta::default());
        let mut r = Rig { s, now: T0 };
        r.out();
        r
    }

    /// Listens on 198.18.1.0/24:80 with `backlog`.
    fn listen(&mut self, backlog: usize) -> subnetstack_stack::TcpListenerHandle {
        let net = "198.18.1.0/24".parse().unwrap();
        self.s
            .tcp_listen(net, PortSpec::exact(80).unwrap(), false, backlog)
            .unwrap()
    }

    fn out(&mut self) -> Vec<Seg> {
        let mut b = Batch::new(64, 2048);
        self.s.poll_transmit(&mut b);
        b.frames().iter().filter_map(|f| tcp4(f.data())).collect()
    }

    /// Sends one segment from the peer (port 40000) to LOCAL:80; returns the stack's answers.
    fn send(&mut self, repr: &TcpRepr) -> Vec<Seg> {
        self.s.handle_frame(
            self.now,
            &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, repr),
            FrameMeta::default(),
        );
        self.out()
    }

    fn advance(&mut self, d: Duration) -> Vec<Seg> {
        self.now += d;
        self.s.handle_timeout(self.now);
        self.out()
    }
}

fn seg<'a>(control: TcpControl, seq: i32, ack: Option<i32>, payload: &'a [u8]) -> TcpRepr<'a> {
    tcp_repr(40000, 80, control, seq, ack, 65535, payload)
}

/// A listening rig after a completed handshake: returns (rig, our ISN + 1, accepted handle).
fn established() -> (Rig, i32, TcpHandle) {
    let mut r = Rig::new();
    let l = r.listen(8);
    let out = r.send(&seg(TcpControl::Syn, 1000, None, &[]));
    assert_eq!(out.len(), 1);
    let synack = &out[0];
    let iss = synack.seq;
    assert!(r
        .send(&seg(TcpControl::None, 1001, Some(iss + 1), &[]))
        .is_empty());
    let (h, local, remote) = r.s.tcp_accept(l).expect("accepted");
    assert_eq!(local, "198.18.1.7:80".parse().unwrap());
    assert_eq!(remote, "198.19.255.1:40000".parse().unwrap());
    (r, iss + 1, h)
}

#[test]
fn syn_to_a_listener_gets_syn_ack_with_options() {
    let mut r = Rig::new();
    r.listen(8);
    let syn = TcpRepr {
        max_seg_size: Some(1400),
        window_scale: Some(7),
        timestamp: Some(TcpTimestampRepr::new(555, 0)),
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let out = r.send(&syn);
    assert_eq!(out.len(), 1);
    let s = &out[0];
    assert!(s.syn && !s.rst && !s.fin);
    assert_eq!(s.ack, Some(1001));
    assert_eq!((s.sport, s.dport, s.src), (80, 40000, LOCAL));
    assert_eq!(s.mss, Some(1460));
    assert!(s.wscale.is_some(), "window scale answered because offered");
    assert_eq!(s.ts.map(|t| t.1), Some(555), "timestamp echoed");
    // Without the peer's options, ours are not sent back (RFC 7323).
    let mut r2 = Rig::new();
    r2.listen(8);
    let s2 = &r2.send(&seg(TcpControl::Syn, 1000, None, &[]))[0];
    assert_eq!((s2.wscale, s2.ts), (None, None));
}

#[test]
fn syn_without_listener_gets_rst_ack() {
    let mut r = Rig::new();
    let out = r.send(&seg(TcpControl::Syn, 1000, None, &[]));
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].seq, 0);
    assert_eq!(out[0].ack, Some(1001));
    assert_eq!(r.s.counters().dropped(DropReason::TcpNoBinding), 1);
}

#[test]
fn ack_for_no_connection_gets_rst_from_its_ack_number() {
    let mut r = Rig::new();
    let out = r.send(&seg(TcpControl::None, 5000, Some(777), b"stray"));
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].seq, 777);
    assert_eq!(out[0].ack, None);
    // A stray RST is only counted, never answered.
    assert!(r.send(&seg(TcpControl::Rst, 5000, None, &[])).is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpNoConnection), 2);
}

#[test]
fn syn_and_fin_together_is_a_counted_drop() {
    let mut r = Rig::new();
    r.listen(8);
    let mut f = tcp4_frame(
        P_MAC,
        S_MAC,
        PEER,
        LOCAL,
        &seg(TcpControl::Syn, 1000, None, &[]),
    );
    f[34 + 13] |= 0x01; // FIN
    let mut p = smoltcp::wire::TcpPacket::new_unchecked(&mut f[34..]);
    p.fill_checksum(&PEER.into(), &LOCAL.into());
    r.s.handle_frame(r.now, &f, FrameMeta::default());
    assert!(r.out().is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpBadFlags), 1);
    // A bad checksum, likewise.
    let mut g = tcp4_frame(
        P_MAC,
        S_MAC,
        PEER,
        LOCAL,
        &seg(TcpControl::Syn, 1000, None, &[]),
    );
    g[34 + 16] ^= 0xff;
    r.s.handle_frame(r.now, &g, FrameMeta::default());
    assert!(r.out().is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpBadChecksum), 1);
    // An option whose length runs past the header.
    let mut h = tcp4_frame(
        P_MAC,
        S_MAC,
        PEER,
        LOCAL,
        &TcpRepr {
            max_seg_size: Some(1000),
            ..seg(TcpControl::Syn, 1000, None, &[])
        },
    );
    h[34 + 21] = 40; // MSS option length 40
    let mut p = smoltcp::wire::TcpPacket::new_unchecked(&mut h[34..]);
    p.fill_checksum(&PEER.into(), &LOCAL.into());
    r.s.handle_frame(r.now, &h, FrameMeta::default());
    assert!(r.out().is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpMalformed), 1);
}

#[test]
fn data_is_acked_delayed_then_at_the_second_segment() {
    let (mut r, iss1, h) = established();
    // One segment: no immediate ACK (delayed).
    assert!(r
        .send(&seg(TcpControl::Psh, 1001, Some(iss1), b"hello"))
        .is_empty());
    // The delayed ACK fires after 40 ms.
    let out = r.advance(Duration::from_millis(40));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1006));
    // Two in a row: the second is acked at once.
    assert!(r
        .send(&seg(TcpControl::None, 1006, Some(iss1), b"aa"))
        .is_empty());
    let out = r.send(&seg(TcpControl::None, 1008, Some(iss1), b"bb"));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1010));
    let mut buf = [0u8; 32];
    let n = r.s.tcp_recv(r.now, h, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"helloaabb");
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Err(IoError::WouldBlock));
}

#[test]
fn out_of_order_data_is_acked_at_once_and_reassembled() {
    let (mut r, iss1, h) = established();
    let out = r.send(&seg(TcpControl::None, 1006, Some(iss1), b"world"));
    assert_eq!(out.len(), 1, "a duplicate ACK for the hole");
    assert_eq!(out[0].ack, Some(1001));
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1), b"hello"));
    assert_eq!(out[0].ack, Some(1011), "hole filled: cumulative ACK");
    let mut buf = [0u8; 32];
    let n = r.s.tcp_recv(r.now, h, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"helloworld");
}

#[test]
fn segments_outside_the_window_are_answered_with_an_ack_and_dropped() {
    let (mut r, iss1, h) = established();
    // Entirely old data.
    let out = r.send(&seg(TcpControl::None, 900, Some(iss1), b"old"));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1001));
    // Far beyond the window.
    let out = r.send(&seg(
        TcpControl::None,
        1001 + 10_000_000,
        Some(iss1),
        b"future",
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1001));
    let mut buf = [0u8; 8];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Err(IoError::WouldBlock));
}

#[test]
fn rst_in_window_but_not_exact_gets_a_challenge_ack() {
    let (mut r, iss1, h) = established();
    let out = r.send(&seg(TcpControl::Rst, 1500, None, &[]));
    assert_eq!(out.len(), 1, "challenge ACK (RFC 5961 3.2)");
    assert!(!out[0].rst);
    assert_eq!(out[0].ack, Some(1001));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
    // The exact sequence number resets.
    r.send(&seg(TcpControl::Rst, 1001, None, &[]));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Closed));
    let mut buf = [0u8; 8];
    assert!(matches!(
        r.s.tcp_recv(r.now, h, &mut buf),
        Err(IoError::Failed(_))
    ));
    let _ = iss1;
}

#[test]
fn syn_on_an_established_connection_gets_a_challenge_ack() {
    let (mut r, _, h) = established();
    let out = r.send(&seg(TcpControl::Syn, 1001, None, &[]));
    assert_eq!(out.len(), 1);
    assert!(!out[0].rst && !out[0].syn);
    assert_eq!(out[0].ack, Some(1001));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
}

#[test]
fn passive_close_then_our_close() {
    let (mut r, iss1, h) = established();
    let out = r.send(&seg(TcpControl::Fin, 1001, Some(iss1), &[]));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1002), "FIN acked at once");
    assert_eq!(r.s.tcp_state(h), Some(TcpState::CloseWait));
    let mut buf = [0u8; 8];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Ok(0), "EOF");
    r.s.tcp_close(r.now, h);
    let out = r.out();
    assert_eq!(out.len(), 1);
    assert!(out[0].fin);
    assert_eq!(out[0].seq, iss1);
    // Its ACK frees the connection.
    r.send(&seg(TcpControl::None, 1002, Some(iss1 + 1), &[]));
    assert_eq!(r.s.tcp_connections(), 0);
}

#[test]
fn active_close_goes_through_time_wait() {
    let (mut r, iss1, h) = established();
    assert_eq!(r.s.tcp_send(r.now, h, b"bye").unwrap(), 3);
    let out = r.out();
    assert_eq!(out[0].payload, b"bye");
    r.s.tcp_close(r.now, h);
    let out = r.out();
    assert!(out.iter().any(|s| s.fin), "FIN after the data");
    let fin_seq = iss1 + 3;
    r.send(&seg(TcpControl::None, 1001, Some(fin_seq + 1), &[]));
    let out = r.send(&seg(TcpControl::Fin, 1001, Some(fin_seq + 1), &[]));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1002));
    assert_eq!(r.s.tcp_connections(), 1, "in TIME-WAIT");
    // A retransmitted FIN is acked again.
    assert_eq!(
        r.send(&seg(TcpControl::Fin, 1001, Some(fin_seq + 1), &[]))
            .len(),
        1
    );
    r.advance(Duration::from_secs(61));
    assert_eq!(r.s.tcp_connections(), 0, "TIME-WAIT over");
}

#[test]
fn unacked_data_is_retransmitted_with_backoff_then_the_connection_times_out() {
    let (mut r, iss1, h) = established();
    r.s.tcp_send(r.now, h, b"are you there").unwrap();
    let first = r.out();
    assert_eq!(first.len(), 1);
    let mut times = Vec::new();
    let start = r.now;
    // 15 retries with backoff capped at 60 s take about 15 minutes.
    for _ in 0..20_000 {
        let out = r.advance(Duration::from_millis(100));
        for s in out.iter().filter(|s| !s.payload.is_empty()) {
            assert_eq!(s.seq, iss1, "retransmission from SND.UNA");
            times.push(r.now - start);
        }
        if r.s.tcp_error(h).is_some() {
            break;
        }
    }
    assert!(times.len() >= 5);
    // Exponential backoff: each gap at least the previous one.
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
    assert_eq!(
        r.s.tcp_error(h),
        Some(subnetstack_stack::TcpError::TimedOut)
    );
}

#[test]
fn zero_window_is_probed() {
    let (mut r, iss1, h) = established();
    // The peer closes its window.
    r.send(&TcpRepr {
        window_len: 0,
        ..seg(TcpControl::None, 1001, Some(iss1), &[])
    });
    r.s.tcp_send(r.now, h, b"waiting").unwrap();
    assert!(
        r.out().iter().all(|s| s.payload.is_empty()),
        "nothing sent into a zero window"
    );
    let mut probed = false;
    for _ in 0..50 {
        if r.advance(Duration::from_millis(100))
            .iter()
            .any(|s| s.payload.len() == 1)
        {
            probed = true;
            break;
        }
    }
    assert!(probed, "a one-byte zero-window probe");
}

#[test]
fn listener_backlog_bounds_half_open_connections_without_cookies() {
    let mut r = Rig::with_tcp(TcpConfig {
        syncookies: false,
        ..TcpConfig::default()
    });
    r.listen(2);
    for port in 0..4u16 {
        let syn = tcp_repr(41000 + port, 80, TcpControl::Syn, 1000, None, 65535, &[]);
        r.s.handle_frame(
            r.now,
            &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &syn),
            FrameMeta::default(),
        );
    }
    assert_eq!(r.out().len(), 2, "two SYN-ACKs");
    assert_eq!(r.s.counters().dropped(DropReason::TcpListenOverflow), 2);
}

#[test]
fn keepalive_probes_an_idle_peer_then_gives_up() {
    let (mut r, iss1, h) = established();
    let k = subnetstack_stack::Keepalive {
        idle: Duration::from_secs(10),
        interval: Duration::from_secs(2),
        probes: 3,
    };
    r.s.tcp_set_keepalive(r.now, h, Some(k)).unwrap();
    assert!(
        r.advance(Duration::from_secs(9)).is_empty(),
        "quiet while not idle long enough"
    );
    let out = r.advance(Duration::from_secs(1));
    assert_eq!(out.len(), 1, "first probe after 10 s idle");
    assert_eq!(out[0].seq, iss1 - 1, "probe is SND.UNA - 1");
    assert!(out[0].payload.is_empty());
    // The peer answers: probing stops until the next idle period.
    r.send(&seg(TcpControl::None, 1001, Some(iss1), &[]));
    assert!(r.advance(Duration::from_secs(5)).is_empty());
    // Now it goes silent: 3 probes, then the connection is dropped.
    let mut probes = 0;
    for _ in 0..30 {
        probes += r.advance(Duration::from_secs(1)).len();
    }
    assert_eq!(probes, 3);
    assert_eq!(
        r.s.tcp_error(h),
        Some(subnetstack_stack::TcpError::TimedOut)
    );
}

#[test]
fn time_wait_is_bounded() {
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.tcp.max_time_wait = 0;
    let mut r = Rig {
        s: Stack::new(cfg).unwrap(),
        now: T0,
    };
    r.s.handle_frame(T0, &arp_request(P_MAC, PEER, LOCAL), FrameMeta::default());
    r.out();
    let l = r.listen(8);
    let iss = r.send(&seg(TcpControl::Syn, 1000, None, &[]))[0].seq;
    r.send(&seg(TcpControl::None, 1001, Some(iss + 1), &[]));
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    r.s.tcp_close(r.now, h);
    r.out();
    r.send(&seg(TcpControl::None, 1001, Some(iss + 2), &[]));
    r.send(&seg(TcpControl::Fin, 1001, Some(iss + 2), &[]));
    assert_eq!(
        r.s.tcp_connections(),
        0,
        "no TIME-WAIT slot: closed at once"
    );
    assert_eq!(r.s.counters().tcp_time_wait_skipped, 1);
}

#[test]
fn nodelay_sends_small_segments_at_once() {
    let (mut r, _, h) = established();
    r.s.tcp_send(r.now, h, b"a").unwrap();
    assert_eq!(r.out().len(), 1);
    // Nagle: a second small write waits for the ACK of the first.
    r.s.tcp_send(r.now, h, b"b").unwrap();
    assert!(r.out().is_empty());
    r.s.tcp_set_nodelay(h, true).unwrap();
    r.s.tcp_send(r.now, h, b"c").unwrap();
    let out = r.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload, b"bc");
}

#[test]
fn a_peer_without_an_mss_option_gets_536_byte_segments() {
    let (mut r, _, h) = established();
    r.s.tcp_set_nodelay(h, true).unwrap();
    assert_eq!(r.s.tcp_send(r.now, h, &[7; 2000]).unwrap(), 2000);
    let out = r.out();
    assert!(out.len() >= 3);
    assert_eq!(out[0].payload.len(), 536, "RFC 9293 3.7.1 default for IPv4");
}

/// Options are laid out as Linux does (DESIGN.md wire conventions).
#[test]
fn options_are_laid_out_as_linux_does() {
    let mut r = Rig::new();
    let lh = r.listen(8);
    let syn = TcpRepr {
        max_seg_size: Some(1460),
        window_scale: Some(7),
        timestamp: Some(TcpTimestampRepr::new(1, 0)),
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let options = |f: &[u8]| f[34 + 20..34 + usize::from(f[34 + 12] >> 4) * 4].to_vec();
    r.s.handle_frame(
        r.now,
        &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &syn),
        FrameMeta::default(),
    );
    let mut b = Batch::new(4, 2048);
    r.s.poll_transmit(&mut b);
    let f = b.frames()[0].data().to_vec();
    let opts = options(&f);
    assert_eq!(opts.len(), 20);
    assert_eq!(&opts[..4], &[2, 4, 0x05, 0xb4], "mss 1460");
    assert_eq!(&opts[4..8], &[1, 1, 8, 10], "nop nop timestamps");
    assert_eq!(&opts[16..19], &[1, 3, 3], "nop wscale");
    let iss = tcp4(&f).unwrap().seq;
    // Data after the handshake: nop, nop, timestamps; PSH on the segment that empties the buffer.
    let ack = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(2, 1)),
        ..seg(TcpControl::None, 1001, Some(iss + 1), &[])
    };
    r.s.handle_frame(
        r.now,
        &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &ack),
        FrameMeta::default(),
    );
    let (h, _, _) = r.s.tcp_accept(lh).unwrap();
    r.s.tcp_send(r.now, h, b"hi").unwrap();
    b.clear();
    r.s.poll_transmit(&mut b);
    let f = b.frames()[0].data().to_vec();
    let opts = options(&f);
    assert_eq!(opts.len(), 12);
    assert_eq!(&opts[..4], &[1, 1, 8, 10]);
    assert_eq!(f[34 + 13] & 0x18, 0x18, "PSH and ACK");
}

#[test]
fn simultaneous_close_passes_through_closing() {
    let (mut r, iss1, h) = established();
    r.s.tcp_close(r.now, h);
    let out = r.out();
    assert!(out[0].fin, "our FIN");
    // The peer's FIN crosses ours (it does not acknowledge ours yet).
    let out = r.send(&seg(TcpControl::Fin, 1001, Some(iss1), &[]));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(1002));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Closing));
    r.send(&seg(TcpControl::None, 1002, Some(iss1 + 1), &[]));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::TimeWait));
}

#[test]
fn simultaneous_open_goes_through_syn_received() {
    let mut r = Rig::new();
    let h =
        r.s.tcp_connect(
            r.now,
            "198.18.1.7:5555".parse().unwrap(),
            "198.19.255.1:40000".parse().unwrap(),
        )
        .unwrap();
    let syn = r.out();
    assert!(syn[0].syn && syn[0].ack.is_none());
    let iss = syn[0].seq;
    // The peer's own SYN crosses ours.
    let crossing = tcp_repr(40000, 5555, TcpControl::Syn, 7000, None, 65535, &[]);
    r.s.handle_frame(
        r.now,
        &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &crossing),
        FrameMeta::default(),
    );
    let out = r.out();
    assert_eq!(out.len(), 1);
    assert!(out[0].syn && out[0].ack == Some(7001), "SYN-ACK");
    assert_eq!(out[0].seq, iss);
    assert_eq!(r.s.tcp_state(h), Some(TcpState::SynReceived));
    let synack = tcp_repr(
        40000,
        5555,
        TcpControl::Syn,
        7000,
        Some(iss + 1),
        65535,
        &[],
    );
    r.s.handle_frame(
        r.now,
        &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &synack),
        FrameMeta::default(),
    );
    let ack = tcp_repr(
        40000,
        5555,
        TcpControl::None,
        7001,
        Some(iss + 1),
        65535,
        &[],
    );
    r.s.handle_frame(
        r.now,
        &tcp4_frame(P_MAC, S_MAC, PEER, LOCAL, &ack),
        FrameMeta::default(),
    );
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
}

#[test]
fn time_wait_acks_a_fin_once() {
    let (mut r, iss1, h) = established();
    r.s.tcp_close(r.now, h);
    r.out();
    r.send(&seg(TcpControl::None, 1001, Some(iss1 + 1), &[]));
    assert_eq!(
        r.send(&seg(TcpControl::Fin, 1001, Some(iss1 + 1), &[]))
            .len(),
        1,
        "the FIN is acked"
    );
    // Nothing more goes out while the connection lingers.
    for _ in 0..5 {
        assert!(r.advance(Duration::from_secs(1)).is_empty());
    }
}

/// The stack dials PEER:40000 from LOCAL:5555; returns (rig, our ISN, handle) with the SYN out.
fn dial() -> (Rig, i32, TcpHandle) {
    let mut r = Rig::new();
    let h =
        r.s.tcp_connect(
            r.now,
            "198.18.1.7:5555".parse().unwrap(),
            "198.19.255.1:40000".parse().unwrap(),
        )
        .unwrap();
    let syn = r.out();
    assert_eq!(syn.len(), 1);
    assert!(syn[0].syn && syn[0].ack.is_none());
    (r, syn[0].seq, h)
}

/// A segment from the peer to the dialling connection (LOCAL:5555).
fn to_dialer(
    r: &mut Rig,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> Vec<Seg> {
    r.send(&tcp_repr(40000, 5555, control, seq, ack, 65535, payload))
}

#[test]
fn syn_sent_answers_an_unacceptable_ack_with_rst_and_stays() {
    let (mut r, iss, h) = dial();
    // RFC 9293 3.10.7.3: SEG.ACK =< ISS or > SND.NXT -> <SEQ=SEG.ACK><CTL=RST>, drop.
    let out = to_dialer(&mut r, TcpControl::Syn, 7000, Some(iss + 50), &[]);
    assert_eq!(out.len(), 1);
    assert!(out[0].rst && out[0].ack.is_none());
    assert_eq!(out[0].seq, iss + 50);
    assert_eq!(r.s.tcp_state(h), Some(TcpState::SynSent));
    // The same with RST set is dropped without an answer.
    assert!(to_dialer(&mut r, TcpControl::Rst, 0, Some(iss), &[]).is_empty());
    assert_eq!(r.s.tcp_state(h), Some(TcpState::SynSent));
    // A RST without ACK is ignored in SYN-SENT.
    assert!(to_dialer(&mut r, TcpControl::Rst, 0, None, &[]).is_empty());
    assert_eq!(r.s.tcp_state(h), Some(TcpState::SynSent));
    // A plain segment with neither SYN nor RST is dropped.
    assert!(to_dialer(&mut r, TcpControl::None, 7000, Some(iss + 1), b"x").is_empty());
    assert_eq!(r.s.tcp_state(h), Some(TcpState::SynSent));
}

#[test]
fn syn_sent_rst_with_an_acceptable_ack_is_connection_refused() {
    let (mut r, iss, h) = dial();
    assert!(to_dialer(&mut r, TcpControl::Rst, 0, Some(iss + 1), &[]).is_empty());
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Closed));
    assert_eq!(r.s.tcp_error(h), Some(subnetstack_stack::TcpError::Refused));
}

#[test]
fn syn_sent_syn_ack_completes_with_an_ack() {
    let (mut r, iss, h) = dial();
    let out = to_dialer(&mut r, TcpControl::Syn, 7000, Some(iss + 1), &[]);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].seq, out[0].ack), (iss + 1, Some(7001)));
    assert!(!out[0].syn && !out[0].rst);
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
}

#[test]
fn syn_received_rst_drops_the_embryo_and_the_listener_goes_on() {
    let mut r = Rig::new();
    let l = r.listen(1);
    let synack = r.send(&seg(TcpControl::Syn, 1000, None, &[]));
    assert_eq!(synack.len(), 1);
    // RFC 9293 3.10.7.4: RST in SYN-RECEIVED from a passive open returns to LISTEN.
    assert!(r.send(&seg(TcpControl::Rst, 1001, None, &[])).is_empty());
    assert_eq!(r.s.tcp_connections(), 0);
    assert!(r.s.tcp_accept(l).is_none());
    // The backlog slot is free again: a new SYN is answered.
    let out = r.send(&seg(TcpControl::Syn, 5000, None, &[]));
    assert!(out.len() == 1 && out[0].syn);
}

#[test]
fn syn_received_unacceptable_ack_gets_rst() {
    let mut r = Rig::new();
    let l = r.listen(8);
    let synack = r.send(&seg(TcpControl::Syn, 1000, None, &[]));
    let iss = synack[0].seq;
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss + 99), &[]));
    assert_eq!(out.len(), 1);
    assert!(out[0].rst);
    assert_eq!(out[0].seq, iss + 99);
    assert!(r.s.tcp_accept(l).is_none(), "not established");
    // The right ACK still completes the handshake.
    assert!(r
        .send(&seg(TcpControl::None, 1001, Some(iss + 1), &[]))
        .is_empty());
    assert!(r.s.tcp_accept(l).is_some());
}

#[test]
fn a_segment_without_ack_is_dropped_in_a_synchronized_state() {
    let (mut r, _, h) = established();
    assert!(r
        .send(&seg(TcpControl::Psh, 1001, None, b"noack"))
        .is_empty());
    let out = r.advance(Duration::from_millis(200));
    assert!(out.is_empty(), "no delayed ACK: nothing was taken");
    let mut buf = [0u8; 8];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Err(IoError::WouldBlock));
}

#[test]
fn an_ack_of_unsent_data_is_answered_with_an_ack_and_its_data_dropped() {
    let (mut r, iss1, h) = established();
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1 + 1000), b"data"));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].seq, out[0].ack), (iss1, Some(1001)));
    let mut buf = [0u8; 8];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Err(IoError::WouldBlock));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
}

#[test]
fn three_duplicate_acks_trigger_a_fast_retransmit() {
    let (mut r, iss1, h) = established();
    r.s.tcp_set_nodelay(h, true).unwrap();
    // The peer sent no MSS option: segments of 536 bytes.
    let data = vec![7u8; 4 * 536];
    assert_eq!(r.s.tcp_send(r.now, h, &data).unwrap(), data.len());
    let out = r.out();
    assert_eq!(out.len(), 4, "four full segments within the initial window");
    assert!(out.iter().all(|s| s.payload.len() == 536));
    // The first is lost: the peer acks the SYN three more times as the others arrive.
    for _ in 0..2 {
        assert!(r
            .send(&seg(TcpControl::None, 1001, Some(iss1), &[]))
            .is_empty());
    }
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1), &[]));
    assert_eq!(
        out.len(),
        1,
        "retransmitted at the third duplicate, before any timeout"
    );
    assert_eq!((out[0].seq, out[0].payload.len()), (iss1, 536));
    assert_eq!(r.s.tcp_retransmitted(h), 536);
}

#[test]
fn half_closed_we_still_receive_until_the_peer_closes() {
    let (mut r, iss1, h) = established();
    r.s.tcp_shutdown(r.now, h);
    let fin = r.out();
    assert!(fin.len() == 1 && fin[0].fin);
    r.send(&seg(TcpControl::None, 1001, Some(iss1 + 1), &[]));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::FinWait2));
    r.send(&seg(TcpControl::Psh, 1001, Some(iss1 + 1), b"late"));
    let mut buf = [0u8; 8];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"late");
    let out = r.send(&seg(TcpControl::Fin, 1005, Some(iss1 + 1), &[]));
    assert_eq!(out.len(), 1, "one ACK, for the FIN: {out:?}");
    assert_eq!(out[0].ack, Some(1006));
    assert_eq!(r.s.tcp_state(h), Some(TcpState::TimeWait));
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Ok(0), "EOF");
}

/// Like [`established`], with the peer's SYN given (to negotiate options).
fn established_with(syn: TcpRepr) -> (Rig, i32, TcpHandle) {
    let mut r = Rig::new();
    let l = r.listen(8);
    let out = r.send(&syn);
    assert_eq!(out.len(), 1);
    let iss = out[0].seq;
    // A 5 ms round trip, so that RTT estimates are not zero.
    r.now += Duration::from_millis(5);
    let ack = TcpRepr {
        timestamp: syn
            .timestamp
            .map(|t| TcpTimestampRepr::new(t.tsval + 1, out[0].ts.map_or(0, |t| t.0))),
        ..seg(TcpControl::None, 1001, Some(iss + 1), &[])
    };
    assert!(r.send(&ack).is_empty());
    let (h, _, _) = r.s.tcp_accept(l).expect("accepted");
    (r, iss + 1, h)
}

fn sack_syn() -> TcpRepr<'static> {
    TcpRepr {
        sack_permitted: true,
        ..seg(TcpControl::Syn, 1000, None, &[])
    }
}

#[test]
fn sack_permitted_is_answered_and_laid_out_as_linux_does() {
    let mut r = Rig::new();
    r.listen(8);
    let syn = TcpRepr {
        max_seg_size: Some(1460),
        window_scale: Some(7),
        timestamp: Some(TcpTimestampRepr::new(1, 0)),
        sack_permitted: true,
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let s = &r.send(&syn)[0];
    assert!(s.sack_permitted);
    assert_eq!(
        &s.options[4..8],
        &[4, 2, 8, 10],
        "sackOK packed before timestamps"
    );
    // Without timestamps: nop, nop, sackOK.
    let mut r = Rig::new();
    r.listen(8);
    let s = &r.send(&sack_syn())[0];
    assert_eq!(&s.options[4..8], &[1, 1, 4, 2]);
    // Not offered, not answered.
    let mut r = Rig::new();
    r.listen(8);
    assert!(!r.send(&seg(TcpControl::Syn, 1000, None, &[]))[0].sack_permitted);
}

#[test]
fn out_of_order_data_is_reported_in_sack_blocks_latest_first_and_duplicates_as_dsack() {
    let (mut r, iss1, _h) = established_with(sack_syn());
    let out = r.send(&seg(TcpControl::None, 1006, Some(iss1), b"world"));
    assert_eq!(out[0].ack, Some(1001));
    assert_eq!(out[0].sack, vec![(1006, 1011)]);
    let out = r.send(&seg(TcpControl::None, 1021, Some(iss1), b"xx"));
    assert_eq!(
        out[0].sack,
        vec![(1021, 1023), (1006, 1011)],
        "latest block first"
    );
    // The hole before 1006 fills; a retransmission of it comes again: D-SACK first.
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1), b"hello"));
    assert_eq!(out[0].ack, Some(1011));
    assert_eq!(out[0].sack, vec![(1021, 1023)]);
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1), b"hello"));
    assert_eq!(out[0].ack, Some(1011));
    assert_eq!(
        out[0].sack,
        vec![(1001, 1006), (1021, 1023)],
        "D-SACK, then the block"
    );
    // Reported once.
    let out = r.send(&seg(TcpControl::None, 1011, Some(iss1), b"0123456789"));
    assert_eq!(out[0].ack, Some(1023));
    assert!(out[0].sack.is_empty());
}

#[test]
fn sack_recovery_retransmits_only_the_holes() {
    let (mut r, iss1, h) = established_with(sack_syn());
    r.s.tcp_set_nodelay(h, true).unwrap();
    // Eight segments of 536 bytes (no MSS option from the peer).
    let m = 536;
    r.s.tcp_send(r.now, h, &vec![1u8; 8 * m as usize]).unwrap();
    assert_eq!(r.out().len(), 8);
    let at = |k: i32| iss1 + k * m;
    let sacked = |blocks: [Option<(u32, u32)>; 3]| TcpRepr {
        sack_ranges: blocks,
        ..seg(TcpControl::None, 1001, Some(iss1), &[])
    };
    // Segment 1 arrives; then 3-6. Segments 0, 2 and 7 are missing. (The answers come 5 ms
    // later: with no time passing RACK would call segment 0 lost at the first SACK.)
    r.now += Duration::from_millis(5);
    let b1 = Some((at(1) as u32, at(2) as u32));
    let b2 = Some((at(3) as u32, at(7) as u32));
    let o = r.send(&sacked([b1, None, None]));
    assert!(o.is_empty(), "{o:?} {:?}", r.s.tcp_debug(h));
    // Five segments SACKed above segment 0 and four above segment 2: both are lost (RFC 6675
    // IsLost), and recovery starts before the third duplicate ACK.
    let out = r.send(&sacked([b2, b1, None]));
    let resent: Vec<(i32, usize)> = out.iter().map(|s| (s.seq, s.payload.len())).collect();
    assert_eq!(
        resent,
        vec![(at(0), 536), (at(2), 536)],
        "the holes, nothing SACKed"
    );
    assert_eq!(r.s.tcp_retransmitted(h), 2 * 536);
    // The holes are acknowledged: segment 7 is all that is left, and it is not resent at once
    // (it is not lost: nothing is SACKed above it).
    let out = r.send(&seg(TcpControl::None, 1001, Some(at(7)), &[]));
    assert!(out.iter().all(|s| s.seq != at(7)), "{out:?}");
    assert_eq!(r.s.tcp_retransmitted(h), 2 * 536);
}

#[test]
fn paws_drops_a_segment_with_an_old_timestamp() {
    let syn = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(100, 0)),
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let (mut r, iss1, h) = established_with(syn);
    let with_ts = |tsval: u32, seq: i32, data: &'static [u8]| TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(tsval, 0)),
        ..seg(TcpControl::Psh, seq, Some(iss1), data)
    };
    r.send(&with_ts(200, 1001, b"new"));
    // An old duplicate from a previous incarnation: its timestamp is older.
    let out = r.send(&with_ts(150, 1004, b"old"));
    assert_eq!(out.len(), 1, "answered with an ACK (RFC 7323 5.3)");
    assert_eq!(out[0].ack, Some(1004));
    assert_eq!(r.s.counters().dropped(DropReason::TcpPaws), 1);
    let mut buf = [0u8; 16];
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"new");
    // The same bytes with a current timestamp are taken.
    r.send(&with_ts(201, 1004, b"cur"));
    assert_eq!(r.s.tcp_recv(r.now, h, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"cur");
}

#[test]
fn challenge_acks_are_rate_limited_per_connection() {
    let (mut r, _, h) = established();
    let mut challenges = 0;
    for k in 0..25 {
        challenges += r.send(&seg(TcpControl::Rst, 1500 + k, None, &[])).len();
    }
    assert_eq!(challenges, 10, "ten a second by default");
    assert_eq!(r.s.counters().dropped(DropReason::TcpChallengeAck), 10);
    assert_eq!(
        r.s.counters().dropped(DropReason::TcpChallengeAckLimited),
        15
    );
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
    r.advance(Duration::from_secs(1));
    assert_eq!(
        r.send(&seg(TcpControl::Syn, 1001, None, &[])).len(),
        1,
        "budget refilled"
    );
}

#[test]
fn packet_too_big_lowers_the_mss_and_resends_at_once() {
    use smoltcp::wire::Icmpv4DstUnreachable;
    let syn = TcpRepr {
        max_seg_size: Some(1460),
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let (mut r, iss1, h) = established_with(syn);
    r.s.tcp_set_nodelay(h, true).unwrap();
    r.s.tcp_send(r.now, h, &vec![3u8; 2920]).unwrap();
    let mut b = Batch::new(8, 2048);
    r.s.poll_transmit(&mut b);
    assert_eq!(b.len(), 2);
    let first = b.frames()[0].data().to_vec();
    r.unreachable(&first, Icmpv4DstUnreachable::FragRequired, 1000);
    let out = r.out();
    assert!(!out.is_empty());
    assert!(
        out.iter().all(|s| s.payload.len() <= 960),
        "{:?}",
        out.iter().map(|s| s.payload.len()).collect::<Vec<_>>()
    );
    assert_eq!(out[0].seq, iss1, "resent from SND.UNA at the new size");
    let resent: usize = out.iter().map(|s| s.payload.len()).sum();
    assert_eq!(resent, 2920);
    // A larger MTU, or a forged one for data not in flight, changes nothing.
    r.unreachable(&first, Icmpv4DstUnreachable::FragRequired, 1400);
    assert!(r.out().is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpIcmpStale), 1);
}

impl Rig {
    /// The next frame the stack sends, raw.
    fn next_frame(&mut self) -> Vec<u8> {
        let mut b = Batch::new(8, 2048);
        self.s.poll_transmit(&mut b);
        b.frames()[0].data().to_vec()
    }

    /// A router answers `frame` (one the stack sent) with ICMP destination unreachable.
    fn unreachable(&mut self, frame: &[u8], reason: smoltcp::wire::Icmpv4DstUnreachable, mtu: u16) {
        let router = Ipv4Addr::new(198, 19, 255, 254);
        let f = icmpv4_unreachable(P_MAC, S_MAC, router, frame, reason, mtu);
        self.s.handle_frame(self.now, &f, FrameMeta::default());
    }
}

#[test]
fn unreachable_in_syn_sent_fails_the_connect_and_later_is_reported_on_timeout() {
    use smoltcp::wire::Icmpv4DstUnreachable::{HostUnreachable, PortUnreachable};
    use subnetstack_stack::TcpError;
    let mut r = Rig::new();
    let dial = |r: &mut Rig, port: u16| {
        let local = SocketAddr::from((LOCAL, port));
        r.s.tcp_connect(r.now, local, "198.19.255.1:40000".parse().unwrap())
            .unwrap()
    };
    // Host unreachable while connecting: the connect fails, with that reason.
    let h = dial(&mut r, 5555);
    let syn = r.next_frame();
    r.unreachable(&syn, HostUnreachable, 0);
    assert_eq!(
        r.s.tcp_state(h),
        Some(TcpState::Closed),
        "{}",
        r.s.counters()
    );
    assert_eq!(r.s.tcp_error(h), Some(TcpError::Unreachable));
    // Port unreachable reads as refused.
    let h2 = dial(&mut r, 5556);
    let syn = r.next_frame();
    r.unreachable(&syn, PortUnreachable, 0);
    assert_eq!(r.s.tcp_error(h2), Some(TcpError::Refused));
    // Established: a soft error, which names the failure if the connection then times out.
    let (mut r, _, h) = established();
    r.s.tcp_send(r.now, h, b"anyone?").unwrap();
    let data = r.next_frame();
    r.unreachable(&data, HostUnreachable, 0);
    assert_eq!(r.s.tcp_state(h), Some(TcpState::Established));
    for _ in 0..20_000 {
        r.advance(Duration::from_millis(100));
        if r.s.tcp_error(h).is_some() {
            break;
        }
    }
    assert_eq!(r.s.tcp_error(h), Some(TcpError::Unreachable));
}

/// A SYN from `port` with every option.
fn full_syn(port: u16, seq: i32) -> TcpRepr<'static> {
    TcpRepr {
        max_seg_size: Some(1460),
        window_scale: Some(7),
        timestamp: Some(TcpTimestampRepr::new(5000, 0)),
        sack_permitted: true,
        ..tcp_repr(port, 80, TcpControl::Syn, seq, None, 65535, &[])
    }
}

#[test]
fn a_full_syn_queue_answers_with_cookies_that_come_back_as_connections() {
    let mut r = Rig::new();
    let l = r.listen(1);
    // The first SYN takes the one SYN-queue slot (never completed).
    assert_eq!(r.send(&full_syn(41000, 1000)).len(), 1);
    assert_eq!(r.s.counters().tcp_syncookies_sent, 0);
    // The next is answered with a cookie: same options as a normal SYN-ACK.
    let out = r.send(&full_syn(41001, 7000));
    assert_eq!(out.len(), 1);
    let synack = &out[0];
    assert!(synack.syn && synack.ack == Some(7001));
    assert_eq!(synack.mss, Some(1460));
    assert!(synack.sack_permitted && synack.wscale.is_some());
    let (tsval, tsecr) = synack.ts.expect("timestamps");
    assert_eq!(tsecr, 5000);
    assert_eq!(r.s.counters().tcp_syncookies_sent, 1);
    assert_eq!(r.s.tcp_connections(), 1, "no state kept for the cookie");
    // The client's ACK brings it back: a connection, on the listener, with its options.
    let ack = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(5001, tsval)),
        window_len: 1000,
        ..tcp_repr(
            41001,
            80,
            TcpControl::Psh,
            7001,
            Some(synack.seq + 1),
            1000,
            b"GET",
        )
    };
    let out = r.send(&ack);
    assert_eq!(r.s.counters().tcp_syncookies_valid, 1);
    let (h, local, remote) = r.s.tcp_accept(l).expect("accepted from the cookie");
    assert_eq!(local, "198.18.1.7:80".parse().unwrap());
    assert_eq!(remote, "198.19.255.1:41001".parse().unwrap());
    assert!(out.is_empty(), "data acked later (delayed ACK)");
    let mut buf = [0u8; 8];
    assert_eq!(
        r.s.tcp_recv(r.now, h, &mut buf),
        Ok(3),
        "data on the cookie ACK kept"
    );
    // MSS 1460 less timestamps; the window of 1000 is scaled by the client's 7.
    r.s.tcp_set_nodelay(h, true).unwrap();
    r.s.tcp_send(r.now, h, &vec![0u8; 3000]).unwrap();
    let out = r.out();
    // (The read opened the window past what the SYN-ACK could say: a window update leads.)
    let sizes: Vec<usize> = out
        .iter()
        .map(|s| s.payload.len())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(
        sizes,
        vec![1448, 1448, 104],
        "window 128000 and MSS 1448 in force"
    );
    assert!(out.iter().all(|s| s.ts.is_some()));
}

#[test]
fn a_bad_cookie_gets_rst_and_is_counted() {
    let mut r = Rig::new();
    let l = r.listen(1);
    r.send(&full_syn(41000, 1000));
    let synack = r.send(&full_syn(41001, 7000))[0].clone();
    // The client's ACK: sequence number `seq`, acknowledging the cookie plus `plus`.
    let ack = |synack: &Seg, seq: i32, plus: i32| {
        tcp_repr(
            41001,
            80,
            TcpControl::None,
            seq,
            Some(synack.seq + plus),
            1000,
            &[],
        )
    };
    // Wrong acknowledgement number, and the right one for another client ISN.
    let forged = ack(&synack, 7001, 9);
    let out = r.send(&forged);
    assert!(out.len() == 1 && out[0].rst);
    let other = ack(&synack, 9001, 1);
    assert!(r.send(&other)[0].rst);
    assert_eq!(r.s.counters().dropped(DropReason::TcpBadCookie), 2);
    assert!(r.s.tcp_accept(l).is_none());
    assert_eq!(r.s.counters().tcp_syncookies_valid, 0);
    // Two periods later even the right cookie has expired.
    r.advance(Duration::from_secs(130));
    // (The neighbour entry aged out meanwhile: the peer speaks up again.)
    r.s.handle_frame(
        r.now,
        &arp_request(P_MAC, PEER, LOCAL),
        FrameMeta::default(),
    );
    r.out();
    let late = ack(&synack, 7001, 1);
    assert!(r.send(&late)[0].rst);
    assert_eq!(
        r.s.counters().dropped(DropReason::TcpBadCookie),
        2,
        "no longer checked"
    );
}

#[test]
fn a_cookie_without_timestamps_carries_only_the_mss() {
    let mut r = Rig::new();
    let l = r.listen(1);
    r.send(&full_syn(41000, 1000));
    let syn = TcpRepr {
        max_seg_size: Some(1400),
        window_scale: Some(7),
        sack_permitted: true,
        ..tcp_repr(41001, 80, TcpControl::Syn, 7000, None, 65535, &[])
    };
    let synack = r.send(&syn)[0].clone();
    assert_eq!(
        (synack.wscale, synack.ts, synack.sack_permitted),
        (None, None, false)
    );
    let ack = tcp_repr(
        41001,
        80,
        TcpControl::None,
        7001,
        Some(synack.seq + 1),
        65535,
        &[],
    );
    assert!(r.send(&ack).is_empty());
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    r.s.tcp_set_nodelay(h, true).unwrap();
    r.s.tcp_send(r.now, h, &vec![0u8; 1400]).unwrap();
    let sizes: Vec<usize> = r.out().iter().map(|s| s.payload.len()).collect();
    assert_eq!(
        sizes,
        vec![1380, 20],
        "MSS 1400 rounds down to the table's 1380"
    );
}

#[test]
fn cookie_acks_land_on_the_reuseport_member_the_syn_hashed_to() {
    let mut r = Rig::new();
    let net = "198.18.1.0/24".parse().unwrap();
    let port = PortSpec::exact(80).unwrap();
    let ls = [
        r.s.tcp_listen(net, port, true, 1).unwrap(),
        r.s.tcp_listen(net, port, true, 1).unwrap(),
    ];
    let mut cookies = Vec::new();
    for p in 0..40u16 {
        let out = r.send(&full_syn(42000 + p, 1000));
        if r.s.counters().tcp_syncookies_sent as usize > cookies.len() {
            cookies.push((42000 + p, out[0].seq, out[0].ts.unwrap().0));
        }
    }
    assert!(
        cookies.len() >= 30,
        "both SYN queues full: the rest are cookies"
    );
    for &(p, iss, tsval) in &cookies {
        let ack = TcpRepr {
            timestamp: Some(TcpTimestampRepr::new(5001, tsval)),
            ..tcp_repr(p, 80, TcpControl::None, 1001, Some(iss + 1), 1000, &[])
        };
        r.send(&ack);
        // Which member the demux picks for this flow: it must be the one that accepts it.
        let flow = subnetstack_demux::Flow::new(PEER.into(), p, LOCAL.into(), 80).unwrap();
        let member =
            r.s.demux()
                .snapshot()
                .lookup(subnetstack_demux::Protocol::Tcp, &flow)
                .unwrap();
        let l = ls[member.listener.0 as usize];
        let (_, _, remote) = r.s.tcp_accept(l).expect("on the hashed member");
        assert_eq!(remote.port(), p);
        // Accept queues hold one: keep them empty.
    }
    assert_eq!(r.s.counters().tcp_syncookies_valid as usize, cookies.len());
}

#[test]
fn a_closing_listener_hands_its_queue_to_a_reuseport_sibling_and_the_last_resets() {
    let mut r = Rig::new();
    let net = "198.18.1.0/24".parse().unwrap();
    let port = PortSpec::exact(80).unwrap();
    let ls = [
        r.s.tcp_listen(net, port, true, 64).unwrap(),
        r.s.tcp_listen(net, port, true, 64).unwrap(),
    ];
    let member = |r: &Rig, p: u16| {
        let flow = subnetstack_demux::Flow::new(PEER.into(), p, LOCAL.into(), 80).unwrap();
        let hit =
            r.s.demux()
                .snapshot()
                .lookup(subnetstack_demux::Protocol::Tcp, &flow);
        hit.unwrap().listener.0 as usize
    };
    // Twenty clients: the even ones complete their handshake, the odd ones stay half open.
    let mut isns = Vec::new();
    for k in 0..20u16 {
        let p = 43000 + k;
        let synack = r.send(&tcp_repr(p, 80, TcpControl::Syn, 1000, None, 65535, &[]));
        isns.push(synack[0].seq);
        if k % 2 == 0 {
            let ack = tcp_repr(
                p,
                80,
                TcpControl::None,
                1001,
                Some(synack[0].seq + 1),
                65535,
                &[],
            );
            assert!(r.send(&ack).is_empty());
        }
    }
    let on_first: Vec<u16> = (0..20)
        .map(|k| 43000 + k)
        .filter(|&p| member(&r, p) == 0)
        .collect();
    assert!(on_first.len() >= 4 && on_first.len() <= 16, "{on_first:?}");
    // The first listener closes: nothing is reset.
    r.s.tcp_listener_close(r.now, ls[0]);
    assert!(r.out().iter().all(|s| !s.rst));
    assert_eq!(r.s.counters().tcp_handed_over as usize, on_first.len());
    // Its completed connections are now the sibling's, in the sibling's accept queue.
    let mut accepted = Vec::new();
    while let Some((_, _, remote)) = r.s.tcp_accept(ls[1]) {
        accepted.push(remote.port());
    }
    let done: Vec<u16> = (0..20).step_by(2).map(|k| 43000 + k).collect();
    accepted.sort();
    assert_eq!(
        accepted, done,
        "every completed handshake, from both listeners"
    );
    // The half-open ones finish their handshake on the sibling.
    for k in (1..20).step_by(2) {
        let p = 43000 + k;
        let ack = tcp_repr(
            p,
            80,
            TcpControl::None,
            1001,
            Some(isns[k as usize] + 1),
            65535,
            &[],
        );
        r.send(&ack);
    }
    let mut late = 0;
    while r.s.tcp_accept(ls[1]).is_some() {
        late += 1;
    }
    assert_eq!(late, 10);
    // The last member closes with a half-open connection: it is reset.
    let synack = r.send(&tcp_repr(
        44000,
        80,
        TcpControl::Syn,
        1000,
        None,
        65535,
        &[],
    ));
    assert_eq!(synack.len(), 1);
    r.s.tcp_listener_close(r.now, ls[1]);
    let out = r.out();
    assert!(
        out.len() == 1 && out[0].rst && out[0].dport == 44000,
        "{out:?}"
    );
}

/// A connection (peer timestamps on, `ts` the peer's clock) that the stack closed first and that
/// sits in TIME-WAIT; returns the rig.
fn in_time_wait(ts: u32) -> Rig {
    let syn = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(ts, 0)),
        ..seg(TcpControl::Syn, 1000, None, &[])
    };
    let (mut r, iss1, h) = established_with(syn);
    r.s.tcp_close(r.now, h);
    r.out();
    let with_ts = |control, seq| TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(ts + 2, 0)),
        ..seg(control, seq, Some(iss1 + 1), &[])
    };
    r.send(&with_ts(TcpControl::None, 1001));
    r.send(&with_ts(TcpControl::Fin, 1001));
    assert_eq!(r.s.tcp_connections(), 1);
    r
}

#[test]
fn a_newer_syn_ends_time_wait_early_and_an_older_one_does_not() {
    // Newer timestamp: the old incarnation goes, the listener answers (RFC 6191).
    let mut r = in_time_wait(100);
    let newer = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(500, 0)),
        ..seg(TcpControl::Syn, 500, None, &[])
    };
    let out = r.send(&newer);
    assert!(
        out.len() == 1 && out[0].syn && out[0].ack == Some(501),
        "{out:?}"
    );
    assert_eq!(r.s.counters().tcp_time_wait_reused, 1);
    // The same timestamp (a reconnect within the millisecond) with a higher ISN: reused too,
    // as Linux does.
    let mut r = in_time_wait(100);
    let same_ms = TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(102, 0)),
        ..seg(TcpControl::Syn, 9000, None, &[])
    };
    let out = r.send(&same_ms);
    assert!(out.len() == 1 && out[0].syn, "{out:?}");
    assert_eq!(r.s.counters().tcp_time_wait_reused, 1);
    // An older timestamp (PAWS), or the same one with an old ISN: TIME-WAIT holds; the SYN
    // gets a challenge ACK.
    for (ts, isn) in [(101, 9000), (102, 500)] {
        let mut r = in_time_wait(100);
        let older = TcpRepr {
            timestamp: Some(TcpTimestampRepr::new(ts, 0)),
            ..seg(TcpControl::Syn, isn, None, &[])
        };
        let out = r.send(&older);
        assert!(
            out.len() == 1 && !out[0].syn && out[0].ack == Some(1002),
            "{out:?}"
        );
        assert_eq!(r.s.counters().tcp_time_wait_reused, 0);
    }
}

#[test]
fn congestion_control_is_chosen_per_connection() {
    use subnetstack_stack::Congestion;
    // The same loss on two connections: NewReno halves the flight, CUBIC keeps 70 % of cwnd.
    let ssthresh_after_loss = |algo| {
        let (mut r, iss1, h) = established_with(sack_syn());
        r.s.tcp_set_congestion(h, algo).unwrap();
        r.s.tcp_set_nodelay(h, true).unwrap();
        r.s.tcp_send(r.now, h, &vec![1u8; 10 * 536]).unwrap();
        assert_eq!(r.out().len(), 10);
        r.now += Duration::from_millis(5);
        let at = |k: i32| (iss1 + k * 536) as u32;
        let sack = TcpRepr {
            sack_ranges: [Some((at(1), at(10))), None, None],
            ..seg(TcpControl::None, 1001, Some(iss1), &[])
        };
        r.send(&sack);
        let dbg = r.s.tcp_debug(h).unwrap();
        let v: u32 = dbg
            .split("ssthresh ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        v
    };
    assert_eq!(ssthresh_after_loss(Congestion::NewReno), 5 * 536);
    assert_eq!(ssthresh_after_loss(Congestion::Cubic), 7 * 536);
}

#[test]
fn listener_counters_follow_their_connections() {
    let mut r = Rig::new();
    let l = r.listen(1);
    // One SYN queued, one answered with a cookie; both complete.
    let a = r.send(&full_syn(41000, 1000))[0].clone();
    let b = r.send(&full_syn(41001, 7000))[0].clone();
    let ack = |p, seq, a: &Seg| TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(5001, a.ts.unwrap().0)),
        ..tcp_repr(p, 80, TcpControl::None, seq, Some(a.seq + 1), 1000, &[])
    };
    r.send(&ack(41000, 1001, &a));
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    let st = r.s.tcp_listener_stats(l).unwrap();
    assert_eq!(
        (st.syns, st.syncookies_sent, st.accepted, st.active),
        (2, 1, 1, 1)
    );
    // The cookie ACK completes the second.
    r.send(&ack(41001, 7001, &b));
    let st = r.s.tcp_listener_stats(l).unwrap();
    assert_eq!((st.syncookies_valid, st.accepted, st.active), (1, 2, 2));
    r.s.tcp_send(r.now, h, b"12345").unwrap();
    r.send(&TcpRepr {
        timestamp: Some(TcpTimestampRepr::new(5002, 0)),
        ..tcp_repr(
            41000,
            80,
            TcpControl::Psh,
            1001,
            Some(a.seq + 1),
            1000,
            b"abc",
        )
    });
    let mut buf = [0u8; 8];
    r.s.tcp_recv(r.now, h, &mut buf).unwrap();
    // The peer resets it.
    r.send(&TcpRepr {
        timestamp: None,
        ..tcp_repr(41000, 80, TcpControl::Rst, 1004, None, 0, &[])
    });
    let st = r.s.tcp_listener_stats(l).unwrap();
    assert_eq!(
        (st.bytes_out, st.bytes_in, st.resets, st.active),
        (5, 3, 1, 1)
    );
}

// ---- resource limits ------------------------------------------------------------------

/// Sends a bare SYN from `port`; returns the stack's answers.
fn syn_from(r: &mut Rig, port: u16) -> Vec<Seg> {
    r.send(&tcp_repr(port, 80, TcpControl::Syn, 1000, None, 65535, &[]))
}

#[test]
fn the_connection_limit_drops_syns_and_refuses_connects() {
    let mut r = Rig::with_tcp(TcpConfig {
        max_connections: 2,
        ..TcpConfig::default()
    });
    r.listen(8);
    assert_eq!(syn_from(&mut r, 42000).len(), 1);
    assert_eq!(syn_from(&mut r, 42001).len(), 1);
    assert!(syn_from(&mut r, 42002).is_empty(), "third SYN dropped");
    assert_eq!(r.s.counters().dropped(DropReason::TcpConnLimit), 1);
    assert_eq!(
        r.s.tcp_connect(
            r.now,
            "198.18.1.9:0".parse().unwrap(),
            "198.19.255.1:80".parse().unwrap()
        ),
        Err(subnetstack_stack::ConnectError::Limit)
    );
    // One embryo goes (the peer resets it): room for the next.
    let synack = syn_from(&mut r, 42000);
    assert!(
        synack.is_empty(),
        "a SYN retransmission for an embryo is not a new connection"
    );
    let out = r.advance(Duration::ZERO);
    assert!(out.is_empty());
    r.send(&tcp_repr(42000, 80, TcpControl::Rst, 1001, None, 0, &[]));
    assert_eq!(syn_from(&mut r, 42002).len(), 1, "admitted after one left");
}

#[test]
fn the_half_open_limit_answers_with_cookies_or_drops_without_them() {
    for cookies in [true, false] {
        let mut r = Rig::with_tcp(TcpConfig {
            max_half_open: 1,
            syncookies: cookies,
            ..TcpConfig::default()
        });
        r.listen(8);
        assert_eq!(syn_from(&mut r, 42000).len(), 1);
        assert_eq!(r.s.tcp_half_open(), 1);
        let out = syn_from(&mut r, 42001);
        if cookies {
            assert_eq!(out.len(), 1, "a cookie SYN-ACK");
            assert_eq!(r.s.counters().tcp_syncookies_sent, 1);
        } else {
            assert!(out.is_empty());
            assert_eq!(r.s.counters().dropped(DropReason::TcpHalfOpenLimit), 1);
        }
        assert_eq!(r.s.tcp_connections(), 1, "no state for the second SYN");
    }
    // Completing a handshake frees its half-open slot.
    let (r, _, _) = established();
    assert_eq!(r.s.tcp_half_open(), 0);
}

#[test]
fn a_listener_limit_bounds_its_connections() {
    let mut r = Rig::new();
    let l = r.listen(8);
    r.s.tcp_set_listener_limit(l, Some(1));
    let iss1 = syn_from(&mut r, 40000)[0].seq + 1;
    r.send(&seg(TcpControl::None, 1001, Some(iss1), &[]));
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    assert!(
        syn_from(&mut r, 42001).is_empty(),
        "over the listener's limit"
    );
    assert_eq!(r.s.counters().dropped(DropReason::TcpListenerLimit), 1);
    assert_eq!(r.s.tcp_listener_stats(l).unwrap().overflows, 1);
    // The open one ends: room again.
    r.send(&seg(TcpControl::Rst, 1001, Some(iss1), &[]));
    assert!(r.s.tcp_error(h).is_some());
    assert_eq!(syn_from(&mut r, 42001).len(), 1);
    // Lifted: no limit.
    r.s.tcp_set_listener_limit(l, None);
    assert_eq!(syn_from(&mut r, 42002).len(), 1);
}

#[test]
fn over_the_buffer_memory_limit_connections_wait_and_sends_stay_in_place() {
    let mut r = Rig::with_tcp(TcpConfig {
        max_buffer_memory: 4096,
        nagle: false,
        ..TcpConfig::default()
    });
    let l = r.listen(8);
    let synack = syn_from(&mut r, 40000);
    let iss = synack[0].seq;
    r.send(&seg(TcpControl::None, 1001, Some(iss + 1), &[]));
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    // 3,000 bytes grow the send buffer to 4 KiB: at the limit.
    assert_eq!(r.s.tcp_send(r.now, h, &[7u8; 3000]), Ok(3000));
    assert_eq!(r.s.tcp_buffer_memory(), 4096);
    r.out();
    // New connections wait...
    assert!(syn_from(&mut r, 42001).is_empty());
    assert_eq!(r.s.counters().dropped(DropReason::TcpMemoryLimit), 1);
    // ...and sends fill only the storage already there.
    assert_eq!(r.s.tcp_send(r.now, h, &[7u8; 3000]), Ok(1096));
    assert_eq!(r.s.tcp_send(r.now, h, &[7u8; 10]), Err(IoError::WouldBlock));
    assert_eq!(r.s.tcp_buffer_memory(), 4096, "no growth past the limit");
    // Everything acknowledged: the storage is freed and connections come in again.
    r.out();
    r.send(&seg(TcpControl::None, 1001, Some(iss + 1 + 4096), &[]));
    assert_eq!(r.s.tcp_buffer_memory(), 0);
    assert_eq!(syn_from(&mut r, 42001).len(), 1);
}

#[test]
fn a_peer_idle_past_the_idle_timeout_is_reset() {
    let mut r = Rig::with_tcp(TcpConfig {
        idle_timeout: Some(Duration::from_secs(10)),
        ..TcpConfig::default()
    });
    let l = r.listen(8);
    let iss = syn_from(&mut r, 40000)[0].seq;
    r.send(&seg(TcpControl::None, 1001, Some(iss + 1), &[]));
    let (h, _, _) = r.s.tcp_accept(l).unwrap();
    // (Within the neighbour entry's lifetime, so that the reset leaves without an ARP.)
    assert!(r.advance(Duration::from_secs(9)).is_empty());
    // Data from the peer restarts the clock.
    r.send(&seg(TcpControl::Psh, 1001, Some(iss + 1), b"hi"));
    let mut quiet = r.advance(Duration::from_secs(9));
    quiet.retain(|s| s.rst);
    assert!(quiet.is_empty(), "not idle for 10 s yet");
    let out = r.advance(Duration::from_secs(2));
    let rst: Vec<_> = out.iter().filter(|s| s.rst).collect();
    assert_eq!(rst.len(), 1, "{out:?}");
    assert_eq!(rst[0].seq, iss + 1, "RST at SND.NXT");
    assert_eq!(
        r.s.tcp_error(h),
        Some(subnetstack_stack::TcpError::TimedOut)
    );
    assert_eq!(r.s.counters().tcp_idle_timeouts, 1);
    assert_eq!(r.s.tcp_connections(), 0);
}

#[test]
fn an_ack_for_a_fin_sent_before_a_timeout_ends_it_without_a_second_fin() {
    // Found by the tcp_conversation fuzz target: after a timeout rewound the sender, an ACK
    // covering the FIN sent earlier was taken for data, and a second FIN went out one sequence
    // number further on.
    let (mut r, iss1, h) = established();
    r.s.tcp_set_nodelay(h, true).unwrap();
    // Three segments (MSS 536: the SYN had no MSS option) and the FIN.
    assert_eq!(r.s.tcp_send(r.now, h, &[5u8; 1500]), Ok(1500));
    r.s.tcp_close(r.now, h);
    let out = r.out();
    let fin = out
        .iter()
        .find(|s| s.fin)
        .expect("FIN with or after the data");
    assert_eq!(
        fin.seq + fin.payload.len() as i32,
        iss1 + 1500,
        "FIN after the data"
    );
    // The retransmission timeout goes back to the first segment; one MSS fits the window, so
    // the FIN is not resent yet.
    let again = r.advance(Duration::from_millis(1100));
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(!again[0].fin && again[0].seq == iss1);
    // The peer's ACK for everything, FIN included, arrives late.
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1 + 1501), &[]));
    assert!(out.iter().all(|s| !s.fin), "no second FIN: {out:?}");
    assert_eq!(
        r.s.tcp_state(h),
        Some(TcpState::FinWait2),
        "our FIN is acknowledged"
    );
    // The peer's FIN now completes the close through TIME-WAIT (one ACK, at iss1 + 4).
    let out = r.send(&seg(TcpControl::Fin, 1001, Some(iss1 + 1501), &[]));
    assert_eq!(out.len(), 1);
    assert!(
        !out[0].fin && out[0].seq == iss1 + 1501 && out[0].ack == Some(1002),
        "{out:?}"
    );
}

#[test]
fn scans_get_what_linux_gives_them() {
    // As measured against Linux with hping3 (tests/hostile_live.rs compares the two live):
    // SYN+FIN and FIN+PSH+URG are dropped by a listener and answered with RST|ACK by a closed
    // port; a bare ACK gets RST from both.
    let mut r = Rig::new();
    r.listen(8);
    let syn_fin = |port: u16| {
        let mut f = tcp4_frame(
            P_MAC,
            S_MAC,
            PEER,
            LOCAL,
            &tcp_repr(40000, port, TcpControl::Syn, 1000, None, 512, &[]),
        );
        f[34 + 13] |= 0x01; // FIN
        let mut p = smoltcp::wire::TcpPacket::new_unchecked(&mut f[34..]);
        p.fill_checksum(&PEER.into(), &LOCAL.into());
        f
    };
    r.s.handle_frame(r.now, &syn_fin(80), FrameMeta::default());
    assert!(r.out().is_empty(), "a listener drops SYN+FIN");
    r.s.handle_frame(r.now, &syn_fin(81), FrameMeta::default());
    let out = r.out();
    assert_eq!(out.len(), 1);
    assert!(out[0].rst && out[0].ack == Some(1002), "{out:?}");
    assert_eq!(r.s.counters().dropped(DropReason::TcpBadFlags), 2);
    // FIN+PSH (+URG, which we ignore) without ACK.
    let fin = |port: u16| tcp_repr(40000, port, TcpControl::Fin, 1000, None, 512, &[]);
    assert!(r.send(&fin(80)).is_empty(), "a listener drops it");
    let out = r.send(&fin(81));
    assert!(
        out.len() == 1 && out[0].rst && out[0].ack == Some(1001),
        "{out:?}"
    );
    // A bare ACK: RST from its acknowledgement number, listener or not.
    for port in [80, 81] {
        let out = r.send(&tcp_repr(
            40000,
            port,
            TcpControl::None,
            1000,
            Some(555),
            512,
            &[],
        ));
        assert!(out.len() == 1 && out[0].rst && out[0].seq == 555, "{out:?}");
    }
}

#[test]
fn closing_with_unread_data_resets() {
    // RFC 1122 4.2.2.13 and RFC 2525 2.17, as Linux does (found with packetdrill).
    let (mut r, iss1, h) = established();
    r.send(&seg(TcpControl::Psh, 1001, Some(iss1), b"unread"));
    r.s.tcp_close(r.now, h);
    let out = r.out();
    let rst: Vec<_> = out.iter().filter(|s| s.rst).collect();
    assert_eq!(rst.len(), 1, "{out:?}");
    assert_eq!((rst[0].seq, rst[0].ack), (iss1, Some(1007)));
    assert!(out.iter().all(|s| !s.fin));
    assert_eq!(r.s.tcp_connections(), 0);
}

#[test]
fn tcp_ready_lists_the_connections_the_network_touched() {
    let (mut r, iss1, h) = established();
    let mut ready = Vec::new();
    r.s.tcp_ready(&mut ready);
    assert!(ready.is_empty(), "nothing tracked before the first call");
    r.send(&seg(TcpControl::Psh, 1001, Some(iss1), b"data"));
    r.s.tcp_ready(&mut ready);
    assert_eq!(ready, vec![h], "data arrived");
    ready.clear();
    r.s.tcp_ready(&mut ready);
    assert!(ready.is_empty(), "reported once");
    // Our own calls are not events.
    let mut buf = [0u8; 8];
    r.s.tcp_recv(r.now, h, &mut buf).unwrap();
    r.s.tcp_send(r.now, h, b"x").unwrap();
    r.s.tcp_ready(&mut ready);
    assert!(ready.is_empty());
    // An ACK, and a timer (the retransmission of unacknowledged data), are.
    r.out();
    r.advance(Duration::from_secs(2));
    r.s.tcp_ready(&mut ready);
    assert_eq!(ready, vec![h], "timer");
    ready.clear();
    r.send(&seg(TcpControl::None, 1005, Some(iss1 + 1), &[]));
    r.s.tcp_ready(&mut ready);
    assert_eq!(ready, vec![h], "ACK");
}

#[test]
fn no_tail_loss_probe_between_backed_off_retransmission_timeouts() {
    // Found with packetdrill: a probe went out between every two backed-off RTOs, doubling
    // the retransmissions during an outage (RFC 8985 7.2: probes are for a connection not in
    // loss recovery).
    let (mut r, _, h) = established_with(sack_syn());
    r.s.tcp_set_nodelay(h, true).unwrap();
    r.s.tcp_send(r.now, h, &[1u8; 100]).unwrap();
    assert_eq!(r.out().len(), 1);
    // Nothing is acknowledged for 30 s: count what goes out, and when.
    let mut sent = Vec::new();
    for ms in 1..=30_000u64 {
        for s in r.advance(Duration::from_millis(1)) {
            if !s.payload.is_empty() {
                sent.push(ms);
            }
        }
    }
    // One probe, then RTOs doubling: 1 + about log2(30 s / RTO) retransmissions, and the
    // gaps after the first RTO grow.
    assert!(sent.len() <= 8, "{sent:?}");
    let gaps: Vec<u64> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).skip(1).all(|g| g[1] >= g[0]),
        "backoff only: {sent:?}"
    );
}

#[test]
fn a_closed_connection_still_held_does_not_unhook_its_successor() {
    // Found by the tcp_conversation fuzz target: every call on a closed connection the
    // application still held removed the table entry of its 4-tuple, by then a newer
    // connection's, which went on sending but could no longer hear the peer.
    let mut r = Rig::new();
    let l = r.listen(8);
    let iss1 = syn_from(&mut r, 40000)[0].seq + 1;
    r.send(&seg(TcpControl::None, 1001, Some(iss1), &[]));
    let (old, _, _) = r.s.tcp_accept(l).unwrap();
    r.send(&seg(TcpControl::Psh, 1001, Some(iss1), b"unread"));
    r.send(&seg(TcpControl::Rst, 1007, None, &[]));
    assert!(
        r.s.tcp_error(old).is_some(),
        "the first connection was reset"
    );
    // The same peer port connects again.
    let synack = r.send(&seg(TcpControl::Syn, 5000, None, &[]));
    let iss2 = synack[0].seq + 1;
    r.send(&seg(TcpControl::None, 5001, Some(iss2), &[]));
    let (new, _, _) = r.s.tcp_accept(l).expect("second connection");
    // The application reads what the first one left, then closes it.
    let mut buf = [0u8; 16];
    let _ = r.s.tcp_recv(r.now, old, &mut buf);
    r.s.tcp_close(r.now, old);
    // The second one still hears its peer.
    r.send(&seg(TcpControl::Psh, 5001, Some(iss2), b"hello"));
    assert_eq!(r.s.tcp_recv(r.now, new, &mut buf), Ok(5));
    assert_eq!(r.s.tcp_connections(), 1);
}

/// What the application does in one round leaves together: two writes and a close become one
/// segment carrying both writes and the FIN (not three segments).
#[test]
fn writes_and_a_close_in_one_round_leave_as_one_segment() {
    let (mut r, _, h) = established();
    assert_eq!(r.s.tcp_send(r.now, h, b"HTTP/1.1 200 OK\r\n\r\n"), Ok(19));
    assert_eq!(r.s.tcp_send(r.now, h, b"hello"), Ok(5));
    r.s.tcp_close(r.now, h);
    let out = r.out();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].payload, b"HTTP/1.1 200 OK\r\n\r\nhello");
    assert!(out[0].fin);
}

/// A GSO super-frame from a device with receive offloads stands for several full-sized
/// segments: it is acknowledged at once, not after the delayed-ACK timer.
#[test]
fn a_received_super_frame_is_acknowledged_at_once() {
    let (mut r, iss1, _) = established();
    let data = vec![5u8; 4000];
    let out = r.send(&seg(TcpControl::None, 1001, Some(iss1), &data));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].ack, Some(5001));
    // One short segment still waits for the timer.
    assert!(r
        .send(&seg(TcpControl::None, 5001, Some(iss1), b"x"))
        .is_empty());
}
