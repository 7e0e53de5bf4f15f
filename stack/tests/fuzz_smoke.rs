//! The fuzz target's body (`fuzz/fuzz_targets/stack_frames.rs`) on pseudo-random inputs: any
//! frame sequence leaves the stack unpanicked, bounded, and with consistent counters.

use std::time::Duration;

use subnetstack_demux::PortSpec;
use subnetstack_ifaces::{Batch, FrameMeta};
use subnetstack_stack::{Config, Stack};
use subnetstack_testkit::fuzz_frames;

const MAC: [u8; 6] = [0x02, 0x53, 0, 0, 0, 1];

/// Runs one input; panics on a broken invariant.
fn run(data: &[u8]) {
    let mut cfg = Config::new(
        MAC,
        vec![
            "198.18.1.0/24".parse().unwrap(),
            "2001:db8:100::/48".parse().unwrap(),
        ],
    );
    cfg.tx_queue = 64;
    let mut s = Stack::new(cfg).unwrap();
    let h = s
        .udp_bind(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    let mut fed = 0u64;
    let mut t = Duration::ZERO;
    let mut out = Batch::new(128, 2048);
    fuzz_frames(data, MAC, |f| {
        t += Duration::from_millis(3);
        s.handle_frame(t, f, FrameMeta::default());
        fed += 1;
        if fed % 7 == 0 {
            s.handle_timeout(t + Duration::from_secs(40));
        }
        out.clear();
        s.poll_transmit(&mut out);
        let _ = s.udp_recv(h);
    });
    let c = s.counters();
    assert_eq!(c.rx_frames, fed);
    assert!(c.dropped_total() <= fed + c.udp_sent + 64, "{c}");
    assert!(s.pending_transmit() <= 64);
}

#[test]
fn random_frame_sequences_never_panic() {
    let mut x = 0x853c_49e6_748f_ea9bu64;
    for _ in 0..20_000 {
        let len = 1 + (x % 900) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Sparse mutations: mostly zero bytes (no change), sometimes a flip.
                if x % 11 == 0 {
                    (x >> 24) as u8
                } else {
                    0
                }
            })
            .collect();
        run(&data);
    }
}

#[test]
fn seed_corpus_runs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/stack_frames");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("seed corpus is checked in") {
        run(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0);
}
