//! Arbitrary frame sequences into one stack: must never panic, and its counters must stay
//! consistent. Frames come from `subnetstack_testkit::fuzz_frames` (mutated valid templates).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use subnetstack_demux::PortSpec;
use subnetstack_ifaces::{Batch, FrameMeta};
use subnetstack_stack::{Config, Stack};

const MAC: [u8; 6] = [0x02, 0x53, 0, 0, 0, 1];

fuzz_target!(|data: &[u8]| {
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
    subnetstack_testkit::fuzz_frames(data, MAC, |f| {
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
    assert_eq!(s.counters().rx_frames, fed);
    assert!(s.pending_transmit() <= 64);
});
