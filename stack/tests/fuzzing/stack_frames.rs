// The body of the `stack_frames` fuzz target, shared with the test suite
// (`stack/tests/fuzz_smoke.rs` runs it on pseudo-random inputs and the seed corpus;
// `fuzz/fuzz_targets/stack_frames.rs` includes this file).
//
// Arbitrary frame sequences into one stack with UDP and TCP bound (frames from
// `subnetstack_testkit::fuzz_frames`: mutated valid templates of every protocol we parse):
// the stack must never panic, its counters must stay consistent and its queues bounded.

use std::time::Duration;

use subnetstack_demux::PortSpec;
use subnetstack_ifaces::{Batch, FrameMeta};
use subnetstack_stack::{Config, Stack};
use subnetstack_testkit::fuzz_frames;

const MAC: [u8; 6] = [0x02, 0x53, 0, 0, 0, 1];

/// Runs one input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let mut cfg = Config::new(
        MAC,
        vec![
            "198.18.1.0/24".parse().unwrap(),
            "2001:db8:100::/48".parse().unwrap(),
        ],
    );
    cfg.tx_queue = 64;
    cfg.tcp.max_connections = 16;
    let mut s = Stack::new(cfg).unwrap();
    let h = s
        .udp_bind(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(7).unwrap(),
            false,
        )
        .unwrap();
    let mut listeners = Vec::new();
    for net in ["198.18.1.0/24", "2001:db8:100::/48"] {
        listeners.push(
            s.tcp_listen(net.parse().unwrap(), PortSpec::exact(80).unwrap(), false, 2)
                .unwrap(),
        );
    }
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
        for &l in &listeners {
            while let Some((c, _, _)) = s.tcp_accept(l) {
                let _ = s.tcp_send(t, c, b"hello");
                s.tcp_close(t, c);
            }
        }
    });
    let c = s.counters();
    assert_eq!(c.rx_frames, fed);
    assert!(c.dropped_total() <= fed + c.udp_sent + 64, "{c}");
    assert!(s.pending_transmit() <= 64);
    assert!(s.tcp_connections() <= 16 + 16_384);
}
