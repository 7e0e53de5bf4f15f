//! Allocations per packet: none in the steady state of a connection. Alone in its test binary,
//! since the counting allocator counts per thread but the heap figures of other tests are
//! global.

use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{TcpControl, TcpRepr, TcpTimestampRepr};
use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::{Batch, FrameMeta, Mac};
use subnetstack_stack::{Config, Stack};
use subnetstack_testkit::*;

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

const S_MAC: Mac = [0x02, 0x53, 0, 0, 0, 1];
const P_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const GW: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 7);

/// The steady state of a keep-alive connection allocates nothing: a request in, the
/// application's read and response, the response out, its ACK in. (Buffers come from pools,
/// segments are built in place, frames move into the transmit batch.)
#[test]
fn a_keep_alive_exchange_allocates_nothing() {
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.hash_key = Some(HashKey([5; 16]));
    cfg.gateway_v4 = Some(GW);
    let mut s = Stack::new(cfg).unwrap();
    let now = Duration::from_secs(10);
    s.handle_frame(now, &arp_request(P_MAC, GW, LOCAL), FrameMeta::default());
    let l = s
        .tcp_listen(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            false,
            8,
        )
        .unwrap();
    let peer = Ipv4Addr::new(198, 19, 200, 7);
    let ts = |v: u32| Some(TcpTimestampRepr::new(v, 0));
    let mut out = Batch::new(8, 2048);
    let syn = TcpRepr {
        max_seg_size: Some(1460),
        window_scale: Some(7),
        sack_permitted: true,
        timestamp: ts(1),
        ..tcp_repr(5000, 80, TcpControl::Syn, 1000, None, 65535, &[])
    };
    s.handle_frame(
        now,
        &tcp4_frame(P_MAC, S_MAC, peer, LOCAL, &syn),
        FrameMeta::default(),
    );
    s.poll_transmit(&mut out);
    let iss = out
        .frames()
        .iter()
        .find_map(|f| tcp4(f.data()))
        .expect("SYN-ACK")
        .seq;
    let ack = TcpRepr {
        timestamp: ts(2),
        ..tcp_repr(5000, 80, TcpControl::None, 1001, Some(iss + 1), 512, &[])
    };
    s.handle_frame(
        now,
        &tcp4_frame(P_MAC, S_MAC, peer, LOCAL, &ack),
        FrameMeta::default(),
    );
    let (h, _, _) = s.tcp_accept(l).expect("established");
    let rounds = 400u32;
    // Frames built beforehand: building them allocates, the stack must not.
    let frames: Vec<(Vec<u8>, Vec<u8>)> = (0..rounds as i32)
        .map(|i| {
            let (peer_seq, our_seq) = (1001 + 100 * i, iss + 1 + 100 * i);
            let req = TcpRepr {
                timestamp: ts(10 + i as u32),
                ..tcp_repr(
                    5000,
                    80,
                    TcpControl::Psh,
                    peer_seq,
                    Some(our_seq),
                    512,
                    &[7u8; 100],
                )
            };
            let ack = TcpRepr {
                timestamp: ts(10 + i as u32),
                ..tcp_repr(
                    5000,
                    80,
                    TcpControl::None,
                    peer_seq + 100,
                    Some(our_seq + 100),
                    512,
                    &[],
                )
            };
            (
                tcp4_frame(P_MAC, S_MAC, peer, LOCAL, &req),
                tcp4_frame(P_MAC, S_MAC, peer, LOCAL, &ack),
            )
        })
        .collect();
    let mut buf = [0u8; 256];
    let mut allocs = Vec::new();
    for (i, (req, ack)) in frames.iter().enumerate() {
        let t = now + Duration::from_millis(i as u64);
        let before = thread_allocations();
        s.handle_frame(t, req, FrameMeta::default());
        assert_eq!(s.tcp_recv(t, h, &mut buf), Ok(100), "round {i}");
        assert_eq!(s.tcp_send(t, h, &[9u8; 100]), Ok(100));
        out.clear();
        assert_eq!(
            s.poll_transmit(&mut out),
            1,
            "one segment: the response with its ACK"
        );
        s.handle_frame(t, ack, FrameMeta::default());
        out.clear();
        s.poll_transmit(&mut out);
        if s.poll_timeout().is_some_and(|d| d <= t) {
            s.handle_timeout(t);
        }
        allocs.push(thread_allocations() - before);
    }
    let late: u64 = allocs[rounds as usize - 200..].iter().sum();
    println!(
        "allocations per exchange: first {:?}, then {late} in the last 200 rounds",
        &allocs[..5]
    );
    assert_eq!(
        late,
        0,
        "steady-state exchanges allocated: {:?}",
        &allocs[200..]
    );
}
