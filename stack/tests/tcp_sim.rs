//! Deterministic simulation: two stacks on an impaired memory pair (seeded loss, reordering,
//! duplication, corruption, delay), a client and a server exchanging data both ways over TCP.
//! Every byte must arrive intact and in order, every connection must finish, nothing may stall.
//! `SIM_SEEDS=N` runs another number of seeds (default 1000, as CI runs); a failure prints its seed, and
//! `SIM_SEED=S` replays one. `SIM_TRACE=1` prints each retransmission of a replayed transfer
//! (`SIM_TRACE_ALL=1` the connections' state every 250 ms), `SIM_RATIO=1` the retransmitted to
//! lost ratio of each heavy-loss seed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::impair::{ImpairConfig, Impaired, Impairment};
use subnetstack_ifaces::mem::{pair, LinkConfig, LinkStats, MemDevice};
use subnetstack_ifaces::{Clock, Device, ManualClock};
use subnetstack_stack::poll::Driver;
use subnetstack_stack::{Config, IoError, Stack, TcpConfig, TcpHandle};

struct Sim {
    clock: ManualClock,
    a: Stack,
    b: Stack,
    da: Driver<Impaired<MemDevice>>,
    db: Driver<Impaired<MemDevice>>,
}

impl Sim {
    fn new(seed: u64, imp: Impairment) -> Sim {
        Sim::with(seed, imp, TcpConfig::default())
    }

    fn with(seed: u64, imp: Impairment, tcp: TcpConfig) -> Sim {
        Sim::build(seed, imp, tcp, false)
    }

    /// With `offload`, the link offers TSO and checksum offload as a TAP does: the stacks send
    /// super-frames and partial checksums, the link cuts and completes them, and the
    /// impairments hit what it delivers (what a wire would carry).
    fn build(seed: u64, imp: Impairment, tcp: TcpConfig, offload: bool) -> Sim {
        let clock = ManualClock::new();
        let c: Arc<dyn Clock> = Arc::new(clock.clone());
        let link = LinkConfig {
            latency: Duration::from_millis(5),
            bandwidth_bps: 100_000_000,
            offload,
            ..Default::default()
        };
        let (ea, eb) = pair(link, c.clone());
        let wrap = |d, s: u64| {
            let (rx, tx) = if offload {
                (imp.clone(), Impairment::default())
            } else {
                (Impairment::default(), imp.clone())
            };
            Impaired::new(d, ImpairConfig { seed: s, rx, tx }, c.clone())
        };
        let (ea, eb) = (wrap(ea, seed), wrap(eb, seed ^ 0xabcdef));
        let mk = |dev: &Impaired<MemDevice>, nets: &[&str], k: u8| {
            let nets = nets.iter().map(|p| p.parse().unwrap()).collect();
            let mut cfg = Config::new(dev.info().mac, nets);
            cfg.hash_key = Some(HashKey([k; 16]));
            cfg.tcp = tcp.clone();
            cfg.offloads = dev.info().offloads;
            Stack::new(cfg).unwrap()
        };
        let a = mk(&ea, &["198.18.10.0/24", "2001:db8:10::/48"], 1);
        let b = mk(&eb, &["198.18.20.0/24", "2001:db8:20::/48"], 2);
        Sim {
            clock,
            a,
            b,
            da: Driver::new(ea),
            db: Driver::new(eb),
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    /// One millisecond of simulated time.
    fn step(&mut self) {
        self.clock.advance(Duration::from_millis(1));
        let now = self.clock.now();
        for _ in 0..4 {
            self.da.poll(&mut self.a, now).unwrap();
            self.db.poll(&mut self.b, now).unwrap();
        }
    }
}

/// Pumps `data` out of `h` on `s`, returns bytes taken.
fn pump(s: &mut Stack, now: Duration, h: TcpHandle, data: &[u8], sent: &mut usize) {
    while *sent < data.len() {
        match s.tcp_send(now, h, &data[*sent..]) {
            Ok(n) => *sent += n,
            Err(IoError::WouldBlock) => break,
            Err(e) => panic!("send: {e}"),
        }
    }
}

fn drain(s: &mut Stack, now: Duration, h: TcpHandle, got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16384];
    loop {
        match s.tcp_recv(now, h, &mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(IoError::WouldBlock | IoError::NotConnected) => return false,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// What a transfer cost the client.
#[derive(Debug)]
struct Outcome {
    /// Bytes the client retransmitted.
    retransmitted: u64,
    /// Frames the client's link lost or corrupted.
    lost_frames: u64,
    /// The link's counters from the server (A) and the client (B).
    links: [LinkStats; 2],
}

/// Client (B) uploads `up` bytes while the server (A) sends `down` bytes; the client closes once
/// it has everything, the server once it saw EOF.
fn transfer(seed: u64, imp: Impairment, up: usize, down: usize, v6: bool) -> Result<u64, String> {
    transfer_with(seed, imp, TcpConfig::default(), up, down, v6).map(|o| o.retransmitted)
}

fn transfer_with(
    seed: u64,
    imp: Impairment,
    tcp: TcpConfig,
    up: usize,
    down: usize,
    v6: bool,
) -> Result<Outcome, String> {
    transfer_sim(Sim::with(seed, imp, tcp), seed, up, down, v6)
}

fn transfer_sim(
    mut sim: Sim,
    seed: u64,
    up: usize,
    down: usize,
    v6: bool,
) -> Result<Outcome, String> {
    let (srv_net, cli_src, srv_dst) = if v6 {
        (
            "2001:db8:10::/48",
            "[2001:db8:20::2]:0",
            "[2001:db8:10::5]:80",
        )
    } else {
        ("198.18.10.0/24", "198.18.20.2:0", "198.18.10.5:80")
    };
    let l = sim
        .a
        .tcp_listen(
            srv_net.parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            false,
            16,
        )
        .unwrap();
    let now = sim.now();
    let c = sim
        .b
        .tcp_connect(now, cli_src.parse().unwrap(), srv_dst.parse().unwrap())
        .unwrap();
    let up_data: Vec<u8> = (0..up).map(|i| (i * 7 + seed as usize) as u8).collect();
    let down_data: Vec<u8> = (0..down).map(|i| (i * 13 + 5) as u8).collect();
    let (mut up_sent, mut down_sent) = (0, 0);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    let mut srv: Option<TcpHandle> = None;
    let (mut c_closed, mut s_closed, mut s_eof) = (false, false, false);
    let mut retransmitted = 0;
    // Bound: ten simulated minutes.
    let trace = std::env::var_os("SIM_TRACE").is_some();
    let mut last_rtx = 0;
    for ms in 0..600_000u64 {
        sim.step();
        let now = sim.now();
        if trace && ms % 250 == 0 && std::env::var_os("SIM_TRACE_ALL").is_some() {
            eprintln!("{ms} client {:?}", sim.b.tcp_debug(c));
            eprintln!("{ms} server {:?}", srv.and_then(|h| sim.a.tcp_debug(h)));
        }
        if srv.is_none() {
            if let Some((h, local, _)) = sim.a.tcp_accept(l) {
                assert_eq!(
                    local,
                    srv_dst.parse::<SocketAddr>().unwrap(),
                    "the address the client targeted"
                );
                srv = Some(h);
            }
        }
        if !c_closed {
            if let Some(e) = sim.b.tcp_error(c) {
                return Err(format!("client failed at {ms} ms: {e}"));
            }
            pump(&mut sim.b, now, c, &up_data, &mut up_sent);
            drain(&mut sim.b, now, c, &mut got_down);
            if up_sent == up && got_down.len() >= down {
                sim.b.tcp_close(now, c);
                c_closed = true;
            }
        }
        // Counted until the connection is gone (the slot is freed after close).
        retransmitted = retransmitted.max(sim.b.tcp_retransmitted(c));
        if trace && sim.b.tcp_retransmitted(c) > last_rtx {
            last_rtx = sim.b.tcp_retransmitted(c);
            eprintln!("{ms} retransmit: {:?}", sim.b.tcp_debug(c));
        }
        if let (Some(h), false) = (srv, s_closed) {
            if let Some(e) = sim.a.tcp_error(h) {
                return Err(format!(
                    "server failed at {ms} ms: {e}; up {up_sent}/{up} got {}; down {down_sent}/{down} got {}; client closed {c_closed} eof {s_eof}; client {:?}; server {:?}; a: {}; b: {}",
                    got_up.len(),
                    got_down.len(),
                    sim.b.tcp_debug(c),
                    sim.a.tcp_debug(h),
                    sim.a.counters(),
                    sim.b.counters()
                ));
            }
            pump(&mut sim.a, now, h, &down_data, &mut down_sent);
            s_eof = s_eof || drain(&mut sim.a, now, h, &mut got_up);
            if s_eof && down_sent == down {
                sim.a.tcp_close(now, h);
                s_closed = true;
            }
        }
        if c_closed && s_closed {
            // Let the FIN exchange finish (retransmissions may back off for a while under loss):
            // at most one connection, in TIME-WAIT, may remain.
            for _ in 0..300_000 {
                if sim.a.tcp_connections() + sim.b.tcp_connections() <= 1 {
                    break;
                }
                sim.step();
                retransmitted = retransmitted.max(sim.b.tcp_retransmitted(c));
            }
            if got_up != up_data {
                return Err(format!(
                    "upload corrupted or short: {} of {up} bytes",
                    got_up.len()
                ));
            }
            if got_down != down_data {
                return Err(format!(
                    "download corrupted or short: {} of {down} bytes",
                    got_down.len()
                ));
            }
            let open = sim.a.tcp_connections() + sim.b.tcp_connections();
            if open > 1 {
                return Err(format!(
                    "{open} connections left (only one TIME-WAIT expected)"
                ));
            }
            let st = sim.db.device().tx_stats();
            let rx = sim.da.device().rx_stats();
            return Ok(Outcome {
                retransmitted,
                lost_frames: st.dropped + st.corrupted + rx.dropped + rx.corrupted,
                links: [
                    sim.da.device().inner().tx_stats(),
                    sim.db.device().inner().tx_stats(),
                ],
            });
        }
    }
    Err(format!(
        "stalled: up {up_sent}/{up} sent, {} received; down {down_sent}/{down} sent, {} received; client {:?}; server {:?}",
        got_up.len(),
        got_down.len(),
        sim.b.tcp_debug(c),
        srv.and_then(|h| sim.a.tcp_debug(h)),
    ) + &format!("; a: {}; b: {}", sim.a.counters(), sim.b.counters()))
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    (1..=n).collect()
}

fn lossy(seed: u64) -> Impairment {
    // Loss 0-10 %, reordering, duplication, corruption: varied by seed.
    let r = |k: u64| {
        ((seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(k as u32 * 7))
            % 1000) as f64
            / 1000.0
    };
    Impairment {
        loss: r(1) * 0.10,
        duplicate: r(2) * 0.03,
        corrupt: r(3) * 0.02,
        reorder: r(4) * 0.05,
        jitter: Duration::from_millis((r(5) * 4.0) as u64),
        ..Default::default()
    }
}

/// Heavy impairment: loss 10-20 %, long reordering (up to 20 frames overtake), duplication.
fn heavy(seed: u64) -> Impairment {
    let r = |k: u64| {
        (seed
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            .rotate_left(k as u32 * 11)
            % 1000) as f64
            / 1000.0
    };
    Impairment {
        loss: 0.10 + r(1) * 0.10,
        duplicate: r(2) * 0.03,
        reorder: r(3) * 0.10,
        reorder_depth: 2 + (r(4) * 18.0) as u32,
        reorder_timeout: Duration::from_millis(30),
        ..Default::default()
    }
}

/// Under 10-20 % loss with long reordering every byte still arrives, and SACK recovery resends
/// little more than what was lost: over all seeds, at most 1.3 times the lost frames' worth of
/// full segments; per seed, twice that plus 16 segments (reordering longer than an RTT makes
/// RACK resend some segments that were only late, as it does in Linux).
#[test]
fn heavy_loss_sack_recovery_resends_only_holes() {
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1000)
        / 10;
    let mut failed = Vec::new();
    let (mut rtx, mut lost) = (0u64, 0u64);
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => (1..=n.max(1)).collect(),
    };
    for seed in seeds {
        match transfer_with(
            seed,
            heavy(seed),
            TcpConfig::default(),
            256 * 1024,
            4096,
            seed % 2 == 0,
        ) {
            Ok(o) => {
                rtx += o.retransmitted;
                lost += o.lost_frames * 1448;
                if std::env::var_os("SIM_RATIO").is_some() {
                    eprintln!(
                        "ratio {seed} {:.2} {} {}",
                        o.retransmitted as f64 / (o.lost_frames * 1448).max(1) as f64,
                        o.retransmitted,
                        o.lost_frames
                    );
                }
                if o.retransmitted > 2 * o.lost_frames * 1448 + 16 * 1448 {
                    eprintln!(
                        "seed {seed}: retransmitted {} bytes for {} lost frames",
                        o.retransmitted, o.lost_frames
                    );
                    failed.push(seed);
                }
            }
            Err(e) => {
                eprintln!("heavy seed {seed} failed: {e}");
                failed.push(seed);
            }
        }
    }
    eprintln!("heavy loss: retransmitted {rtx} bytes for {lost} bytes of lost frames");
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    assert!(rtx * 10 <= lost * 13, "retransmitted {rtx} for {lost} lost");
}

/// SACK makes the difference: on a link that loses several segments per window, NewReno without
/// SACK resends data the receiver already holds (a hole per RTT, go-back-N after timeouts).
#[test]
fn without_sack_the_same_links_resend_more() {
    let imp = |seed: u64| Impairment {
        loss: 0.03 + (seed % 3) as f64 * 0.01,
        reorder: 0.02,
        reorder_depth: 10,
        ..Default::default()
    };
    let (mut with, mut without, mut lost_on, mut lost_off) = (0u64, 0u64, 0u64, 0u64);
    for seed in 1..=6 {
        let on =
            transfer_with(seed, imp(seed), TcpConfig::default(), 1 << 20, 4096, false).unwrap();
        let off = TcpConfig {
            sack: false,
            ..TcpConfig::default()
        };
        let off = transfer_with(seed, imp(seed), off, 1 << 20, 4096, false).unwrap();
        with += on.retransmitted;
        without += off.retransmitted;
        lost_on += on.lost_frames * 1448;
        lost_off += off.lost_frames * 1448;
    }
    eprintln!(
        "retransmitted with SACK {with} (lost {lost_on}), without {without} (lost {lost_off})"
    );
    // Measured: 1.10x the lost bytes with SACK, 1.55x without.
    assert!(
        with * 10 <= lost_on * 13,
        "with SACK {with} for {lost_on} lost"
    );
    assert!(
        without * 10 > lost_off * 13,
        "without SACK {without} for {lost_off} lost: the bound would not bite"
    );
}

#[test]
fn clean_link_moves_a_mebibyte_each_way_v4_and_v6() {
    for v6 in [false, true] {
        transfer(1, Impairment::default(), 1 << 20, 1 << 20, v6).unwrap();
    }
}

/// With a link that offers TSO and checksum offload (as a TAP with vnet headers does), both
/// ends send super-frames; cut back into segments by the link's NIC model, they carry every
/// byte, and none is malformed.
#[test]
fn offloaded_links_send_super_frames_and_deliver_every_byte() {
    for v6 in [false, true] {
        let sim = Sim::build(1, Impairment::default(), TcpConfig::default(), true);
        let o = transfer_sim(sim, 1, 4 << 20, 4 << 20, v6).unwrap();
        for (end, l) in ["server", "client"].iter().zip(o.links) {
            assert!(
                l.tso_frames > 50,
                "{end} sent {} super-frames",
                l.tso_frames
            );
            assert_eq!(l.drop_bad_offload + l.drop_too_big, 0, "{end}: {l:?}");
        }
        assert_eq!(o.retransmitted, 0);
    }
    let mut failed = Vec::new();
    for seed in seeds().into_iter().take(200) {
        let sim = Sim::build(seed, lossy(seed), TcpConfig::default(), true);
        if let Err(e) = transfer_sim(sim, seed, 256 * 1024, 256 * 1024, seed % 3 == 0) {
            eprintln!("offloaded seed {seed} failed: {e}");
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

#[test]
fn impaired_links_deliver_every_byte() {
    let mut failed = Vec::new();
    for seed in seeds() {
        let size = if seed % 10 == 0 { 1 << 20 } else { 64 * 1024 };
        if let Err(e) = transfer(seed, lossy(seed), size, size, seed % 3 == 0) {
            eprintln!("seed {seed} failed: {e} (replay: SIM_SEED={seed} cargo test -p subnetstack-stack --release --test tcp_sim)");
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// Bursts of short connections: the client opens `n` at once, each sends a request and reads a
/// response, both sides close. Every connection completes or reports an error; none stalls.
fn burst(seed: u64, imp: Impairment, n: usize) -> Result<(), String> {
    let mut sim = Sim::new(seed, imp);
    let l = sim
        .a
        .tcp_listen(
            "198.18.10.0/24".parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            false,
            256,
        )
        .unwrap();
    let now = sim.now();
    let mut clients: Vec<(TcpHandle, Vec<u8>, bool)> = (0..n)
        .map(|i| {
            let dst: SocketAddr = format!("198.18.10.{}:80", 1 + i % 200).parse().unwrap();
            (
                sim.b
                    .tcp_connect(now, "198.18.20.2:0".parse().unwrap(), dst)
                    .unwrap(),
                Vec::new(),
                false,
            )
        })
        .collect();
    let mut servers: Vec<(TcpHandle, Vec<u8>, bool)> = Vec::new();
    let mut done = 0;
    for _ in 0..600_000 {
        sim.step();
        let now = sim.now();
        while let Some((h, _, _)) = sim.a.tcp_accept(l) {
            servers.push((h, Vec::new(), false));
        }
        for (h, got, answered) in servers.iter_mut() {
            if *answered {
                continue;
            }
            let eof = drain(&mut sim.a, now, *h, got);
            if got.ends_with(b"\n") {
                let reply = format!("echo {}", got.len());
                if sim.a.tcp_send(now, *h, reply.as_bytes()).is_ok() {
                    sim.a.tcp_close(now, *h);
                    *answered = true;
                }
            } else if eof || sim.a.tcp_error(*h).is_some() {
                sim.a.tcp_close(now, *h);
                *answered = true;
            }
        }
        for (i, (h, got, finished)) in clients.iter_mut().enumerate() {
            if *finished {
                continue;
            }
            if let Some(e) = sim.b.tcp_error(*h) {
                return Err(format!(
                    "connection {i} failed at {:?}: {e}: {:?}; server: {} connections; client stack: {}; server stack: {}",
                    sim.now(),
                    sim.b.tcp_debug(*h),
                    sim.a.tcp_connections(),
                    sim.b.counters(),
                    sim.a.counters(),
                ));
            }
            let req = format!("request {i}\n");
            if got.is_empty()
                && sim.b.tcp_state(*h) == Some(subnetstack_stack::TcpState::Established)
                && sim.b.tcp_readable(*h) == 0
            {
                let _ = sim.b.tcp_send(now, *h, req.as_bytes());
                got.push(0); // marks "request sent"
            }
            let mut body = Vec::new();
            if drain(&mut sim.b, now, *h, &mut body) {
                got.extend_from_slice(&body);
                if got[1..] != *format!("echo {}", req.len()).as_bytes() {
                    return Err(format!(
                        "connection {i}: wrong reply {:?}",
                        String::from_utf8_lossy(&got[1..])
                    ));
                }
                sim.b.tcp_close(now, *h);
                *finished = true;
                done += 1;
            } else {
                got.extend_from_slice(&body);
            }
        }
        if done == n {
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!(
                    "seed {seed}: done at {:?}; a: {}; b: {}",
                    sim.now(),
                    sim.a.counters(),
                    sim.b.counters()
                );
            }
            for _ in 0..300_000 {
                if sim.a.tcp_connections() + sim.b.tcp_connections() <= n {
                    break;
                }
                sim.step();
            }
            return Ok(());
        }
    }
    Err(format!("stalled: {done} of {n} connections done"))
}

#[test]
fn bursts_of_short_connections_complete() {
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1000)
        / 10;
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => (1..=n.max(1)).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        if let Err(e) = burst(seed, lossy(seed), 50) {
            eprintln!("burst seed {seed} failed: {e}");
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}
