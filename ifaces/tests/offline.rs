//! Memory pair, impairment and capture: no privileges needed.

use std::sync::Arc;
use std::time::Duration;

use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket};
use subnetstack_ifaces::impair::{ImpairConfig, Impaired, Impairment};
use subnetstack_ifaces::mem::{pair, LinkConfig};
use subnetstack_ifaces::pcap::Capture;
use subnetstack_ifaces::{Batch, Clock, Device, FrameMeta, ManualClock};

/// Frames numbered in their first 4 bytes, padded to 64 bytes.
fn numbered(n: u32) -> Vec<u8> {
    let mut v = vec![0xab; 64];
    v[..4].copy_from_slice(&n.to_be_bytes());
    v
}

/// Sends `count` numbered frames through an impaired memory pair, 1 ms apart, and returns what
/// arrived (in order) plus the wrapper's transmit counters.
fn run(
    seed: u64,
    count: u32,
    imp: Impairment,
) -> (Vec<Vec<u8>>, subnetstack_ifaces::impair::ImpairStats) {
    let clock = ManualClock::new();
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let (a, mut b) = pair(LinkConfig::default(), c.clone());
    let mut a = Impaired::new(
        a,
        ImpairConfig {
            seed,
            tx: imp,
            ..Default::default()
        },
        c,
    );
    let mut out = Batch::new(1, 128);
    let mut rx = Batch::new(64, 128);
    let mut got = Vec::new();
    let drain =
        |b: &mut subnetstack_ifaces::mem::MemDevice, rx: &mut Batch, got: &mut Vec<Vec<u8>>| {
            rx.clear();
            b.recv(rx).unwrap();
            got.extend(rx.frames().iter().map(|f| f.data().to_vec()));
        };
    for i in 0..count {
        out.clear();
        out.push(&numbered(i), FrameMeta::default());
        a.send(out.frames()).unwrap();
        drain(&mut b, &mut rx, &mut got);
        clock.advance(Duration::from_millis(1));
    }
    // Let delayed and held frames out.
    for _ in 0..200 {
        clock.advance(Duration::from_millis(1));
        a.send(&[]).unwrap();
        drain(&mut b, &mut rx, &mut got);
    }
    (got, a.tx_stats())
}

fn heavy() -> Impairment {
    Impairment {
        loss: 0.05,
        duplicate: 0.03,
        corrupt: 0.02,
        reorder: 0.05,
        reorder_depth: 3,
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(3),
        ..Default::default()
    }
}

#[test]
fn same_seed_same_pattern_other_seed_other_pattern() {
    let (a, sa) = run(42, 2000, heavy());
    let (b, sb) = run(42, 2000, heavy());
    assert_eq!(a, b);
    assert_eq!(sa, sb);
    let (c, _) = run(43, 2000, heavy());
    assert_ne!(a, c);
}

#[test]
fn counters_add_up_and_match_what_arrived() {
    let (got, s) = run(7, 5000, heavy());
    assert_eq!(s.seen, 5000);
    assert_eq!(s.passed, s.seen - s.dropped + s.duplicated);
    assert_eq!(got.len() as u64, s.passed);
    // Each impairment happened at about its rate.
    let rate = |n: u64| n as f64 / 5000.0;
    assert!((rate(s.dropped) - 0.05).abs() < 0.015, "{s:?}");
    assert!((rate(s.duplicated) - 0.03).abs() < 0.012, "{s:?}");
    assert!((rate(s.corrupted) - 0.02 * 0.95).abs() < 0.01, "{s:?}");
    assert!(s.reordered > 0 && s.delayed > 0);
    // Corrupted frames differ from every original in exactly one bit.
    let flipped = got
        .iter()
        .filter(|f| {
            f[4..] != [0xab; 60][..] || u32::from_be_bytes([f[0], f[1], f[2], f[3]]) >= 5000
        })
        .count();
    assert!(flipped > 0);
    // Reordering and jitter really reorder.
    let order: Vec<u32> = got
        .iter()
        .filter(|f| f[4..] == [0xab; 60][..])
        .map(|f| u32::from_be_bytes([f[0], f[1], f[2], f[3]]))
        .collect();
    assert!(order.windows(2).any(|w| w[0] > w[1]));
}

#[test]
fn no_impairment_is_transparent() {
    let (got, s) = run(1, 500, Impairment::default());
    assert_eq!(got, (0..500).map(numbered).collect::<Vec<_>>());
    assert_eq!(
        (s.dropped, s.duplicated, s.corrupted, s.reordered, s.delayed),
        (0, 0, 0, 0, 0)
    );
}

#[test]
fn link_model_applies_latency_bandwidth_and_tail_drop() {
    let clock = ManualClock::new();
    let cfg = LinkConfig {
        latency: Duration::from_millis(10),
        bandwidth_bps: 8_000_000, // 1 byte per microsecond
        queue_frames: 8,
        ..Default::default()
    };
    let (mut a, mut b) = pair(cfg, Arc::new(clock.clone()));
    let mut out = Batch::new(10, 1000);
    for _ in 0..10 {
        out.push(&[0u8; 1000], FrameMeta::default());
    }
    assert_eq!(a.send(out.frames()).unwrap(), 10);
    assert_eq!(a.tx_stats().drop_queue_full, 2);
    let mut rx = Batch::new(16, 1514);
    // First frame: 1000 us to serialise + 10 ms latency.
    clock.set(Duration::from_micros(10_999));
    assert_eq!(b.recv(&mut rx).unwrap(), 0);
    assert_eq!(b.next_deadline(), Some(Duration::from_micros(11_000)));
    clock.set(Duration::from_micros(11_000));
    assert_eq!(b.recv(&mut rx).unwrap(), 1);
    clock.set(Duration::from_micros(18_000));
    assert_eq!(b.recv(&mut rx).unwrap(), 7);
    // Oversized frames are dropped and counted.
    let mut big = Batch::new(1, 2000);
    assert!(big.push(&[0u8; 1515], FrameMeta::default()));
    a.send(big.frames()).unwrap();
    assert_eq!(a.tx_stats().drop_too_big, 1);
}

#[test]
fn capture_writes_a_pcap_that_tshark_reads() {
    let dir = std::env::temp_dir().join(format!("sst-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pair.pcap");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new());
    let (a, mut b) = pair(LinkConfig::default(), clock.clone());
    let mut a = Capture::new(a, &path, clock).unwrap();
    let mut out = Batch::new(1, 128);
    // 5 frames out of A, 3 frames into A.
    for i in 0..5 {
        out.clear();
        out.push(&numbered(i), FrameMeta::default());
        a.send(out.frames()).unwrap();
    }
    for i in 0..3 {
        out.clear();
        out.push(&numbered(100 + i), FrameMeta::default());
        b.send(out.frames()).unwrap();
    }
    let mut rx = Batch::new(8, 128);
    assert_eq!(a.recv(&mut rx).unwrap(), 3);
    assert_eq!(a.written(), 8);
    a.flush().unwrap();
    drop(a);
    let Ok(out) = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&path)
        .output()
    else {
        if std::env::var_os(subnetstack_ifaces::netns::REQUIRE_LIVE).is_some() {
            panic!("tshark is required here");
        }
        println!("skipped: tshark check: tshark is not installed");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 8, "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An IPv4 TCP super-frame of `segs` × 100 payload bytes, for the device to cut into segments.
fn super_frame(segs: usize) -> (Vec<u8>, FrameMeta) {
    use subnetstack_ifaces::{Csum, Gso, GsoKind};
    use subnetstack_testkit::{tcp4_frame, tcp_repr};
    let payload: Vec<u8> = (0..100 * segs).map(|i| i as u8).collect();
    let repr = tcp_repr(80, 4000, TcpControl::None, 1, Some(1), 512, &payload);
    let f = tcp4_frame(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        [198, 18, 0, 1].into(),
        [198, 19, 0, 1].into(),
        &repr,
    );
    let meta = FrameMeta {
        gso: Some(Gso {
            kind: GsoKind::Tcp4,
            size: 100,
            hdr_len: 54,
        }),
        csum: Csum::Partial {
            start: 34,
            offset: 16,
        },
    };
    (f, meta)
}

/// Whether an Ethernet/IPv4/TCP frame's IPv4 and TCP checksums hold (smoltcp's check).
fn checksums_hold(f: &[u8]) -> bool {
    let ip = Ipv4Packet::new_unchecked(&f[14..]);
    let tcp = TcpPacket::new_unchecked(ip.payload());
    ip.verify_checksum() && tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
}

/// Corruption hits what the wire carries: a super-frame whose checksums the device would
/// compute is cut and completed first, and the flipped bit shows in one segment's checksum
/// (flipped before the device's checksum, it would go unnoticed).
#[test]
fn corruption_of_an_offloaded_super_frame_is_detectable() {
    for corrupt in [0.0, 1.0] {
        let clock = ManualClock::new();
        let c: Arc<dyn Clock> = Arc::new(clock.clone());
        let (a, mut b) = pair(LinkConfig::default(), c.clone());
        let imp = Impairment {
            corrupt,
            ..Default::default()
        };
        let cfg = ImpairConfig {
            seed: 3,
            tx: imp,
            ..Default::default()
        };
        let mut a = Impaired::new(a, cfg, c);
        let (f, meta) = super_frame(3);
        let mut out = Batch::new(1, 2048);
        assert!(out.push(&f, meta));
        a.send(out.frames()).unwrap();
        let mut rx = Batch::new(8, 2048);
        b.recv(&mut rx).unwrap();
        if corrupt == 0.0 {
            assert_eq!(rx.len(), 1, "untouched: the super-frame as it was");
            assert_eq!(rx.frames()[0].meta, meta);
            continue;
        }
        assert_eq!(rx.len(), 3, "cut into its segments");
        let mut clean = Vec::new();
        subnetstack_ifaces::gso::device_transmit(&f, &meta, |s| clean.push(s.to_vec())).unwrap();
        let mut bad = 0;
        for (got, want) in rx.frames().iter().zip(&clean) {
            assert_eq!(got.meta, FrameMeta::default());
            if got.data() != &want[..] {
                bad += 1;
                assert!(
                    !checksums_hold(got.data()),
                    "the flipped bit shows in a checksum"
                );
            } else {
                assert!(checksums_hold(got.data()));
            }
        }
        assert_eq!(bad, 1, "one segment carries the flipped bit");
    }
}
