//! 100,000 idle established TCP connections held by one stack, and the heap bytes each costs
//! (nothing queued either way), counted by a counting global allocator: `cargo test --release
//! -p subnetstack-stack --test idle_memory -- --nocapture` prints the figure. Connections are made
//! by hand-built frames from five peer addresses behind a gateway, each exchanges a request and
//! a response first (so buffers were allocated once and must have been given back), and the
//! table's own growth is included.

use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{TcpControl, TcpRepr, TcpTimestampRepr};
use subnetstack_demux::{HashKey, PortSpec};
use subnetstack_ifaces::{Batch, FrameMeta, Mac};
use subnetstack_stack::{Config, Stack, TcpHandle};
use subnetstack_testkit::*;

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

const S_MAC: Mac = [0x02, 0x53, 0, 0, 0, 1];
const P_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
/// The gateway (the stack's one neighbour).
const GW: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 7);
/// The target of the issue: at most 4 KiB per idle connection.
const BUDGET: isize = 4096;

/// Opens `n` connections from `peer` (ports from `first`), each carrying a 100-byte request and
/// response; returns their handles.
fn open(
    s: &mut Stack,
    l: subnetstack_stack::TcpListenerHandle,
    peer: Ipv4Addr,
    first: u16,
    n: u16,
) -> Vec<TcpHandle> {
    let now = Duration::from_secs(10);
    let mut b = Batch::new(64, 2048);
    let mut send = |s: &mut Stack, r: &TcpRepr| -> Vec<Seg> {
        s.handle_frame(
            now,
            &tcp4_frame(P_MAC, S_MAC, peer, LOCAL, r),
            FrameMeta::default(),
        );
        b.clear();
        s.poll_transmit(&mut b);
        b.frames().iter().filter_map(|f| tcp4(f.data())).collect()
    };
    let ts = |v: u32| Some(TcpTimestampRepr::new(v, 0));
    let mut handles = Vec::new();
    for port in first..first + n {
        let syn = TcpRepr {
            max_seg_size: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamp: ts(1),
            ..tcp_repr(port, 80, TcpControl::Syn, 1000, None, 65535, &[])
        };
        let synack = send(s, &syn).remove(0);
        let iss = synack.seq;
        let req = [7u8; 100];
        let data = TcpRepr {
            timestamp: ts(2),
            ..tcp_repr(port, 80, TcpControl::Psh, 1001, Some(iss + 1), 512, &req)
        };
        send(s, &data);
        let (h, _, _) = s.tcp_accept(l).expect("established");
        let mut buf = [0u8; 128];
        assert_eq!(s.tcp_recv(now, h, &mut buf), Ok(100));
        assert_eq!(s.tcp_send(now, h, &[9u8; 100]), Ok(100));
        // The response leaves at the next transmit; the peer acknowledges it.
        let mut out = Batch::new(4, 2048);
        assert_eq!(s.poll_transmit(&mut out), 1);
        let ack = TcpRepr {
            timestamp: ts(3),
            ..tcp_repr(port, 80, TcpControl::None, 1101, Some(iss + 101), 512, &[])
        };
        // (Sending the ACK also flushes our response.)
        send(s, &ack);
        handles.push(h);
    }
    handles
}

#[test]
fn a_hundred_thousand_idle_connections_cost_at_most_4_kib_each() {
    let mut cfg = Config::new(S_MAC, vec!["198.18.1.0/24".parse().unwrap()]);
    cfg.hash_key = Some(HashKey([4; 16]));
    cfg.gateway_v4 = Some(GW);
    let mut s = Stack::new(cfg).unwrap();
    s.handle_frame(
        Duration::from_secs(10),
        &arp_request(P_MAC, GW, LOCAL),
        FrameMeta::default(),
    );
    let l = s
        .tcp_listen(
            "198.18.1.0/24".parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            false,
            1 << 16,
        )
        .unwrap();
    // Warm up the stack's own pools and scratch buffers.
    let warm = open(&mut s, l, Ipv4Addr::new(198, 19, 200, 99), 1000, 100);
    let before = live_heap_bytes();
    let mut handles = Vec::new();
    for p in 1..=5 {
        handles.extend(open(
            &mut s,
            l,
            Ipv4Addr::new(198, 19, 200, p),
            2000,
            20_000,
        ));
    }
    let after = live_heap_bytes();
    let n = handles.len();
    assert_eq!(n, 100_000);
    assert_eq!(handles.len() + warm.len(), s.tcp_connections());
    let per = (after - before) / n as isize;
    println!(
        "idle established TCP connections: {n} held, {per} heap bytes each ({} MB in all, table growth included)",
        (after - before) / 1_000_000
    );
    assert!(per <= BUDGET, "{per} bytes per idle connection");
    assert!(per > 0, "the allocator counts");
}
