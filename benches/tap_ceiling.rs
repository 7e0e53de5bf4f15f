//! The device ceiling: how many frames per second a device loop can move through a TAP, and
//! through AF_XDP on a veth, at all: the physical limit the stack is measured against.
//!
//! In a private network namespace (needs root), a kernel UDP sender blasts datagrams (bounded: at
//! most 1 s and 5 M datagrams a run) at an address routed to the device; one thread per queue
//! reads frames and writes them straight back with Ethernet, IP and UDP addresses swapped
//! (checksums stay valid). Reported: frames echoed per second, median of 5 runs (TAP and AF_XDP
//! runs interleaved), for 1 and 2 queues, batch sizes 1 and 32, 60-byte and 1514-byte frames.
//!
//! `cargo bench --bench tap_ceiling`

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subnetstack::ifaces::netns::{self, Backend, TapEnvConfig};
use subnetstack::ifaces::{Batch, Device};

const RUN: Duration = Duration::from_secs(1);
const MAX_DATAGRAMS: u64 = 5_000_000;
const RUNS: usize = 5;

/// Swaps source and destination at L2, L3 (v4) and L4 ports, in place.
fn swap(f: &mut [u8]) {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let (a, b) = f[..12].split_at_mut(6);
    a.swap_with_slice(b);
    let (s, d) = f[26..34].split_at_mut(4);
    s.swap_with_slice(d);
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let (sp, dp) = f[l4..l4 + 4].split_at_mut(2);
    sp.swap_with_slice(dp);
}

fn echo(mut tap: Box<dyn Device>, batch: usize, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    let mut b = Batch::new(batch, 2048);
    while !stop.load(Ordering::Relaxed) {
        b.clear();
        match tap.recv(&mut b) {
            Ok(0) => std::thread::yield_now(),
            Ok(_) => {
                for f in b.frames_mut() {
                    swap(f.data_mut());
                }
                let mut off = 0;
                while off < b.len() {
                    off += tap.send(&b.frames()[off..]).expect("tap write");
                }
                count.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            Err(e) => panic!("tap read: {e}"),
        }
    }
}

/// One run in a fresh namespace; returns frames echoed per second.
fn run(backend: Backend, queues: usize, batch: usize, payload: usize) -> f64 {
    std::thread::spawn(move || {
        let mut cfg = TapEnvConfig::new("sst-ceil", &["198.18.1.0/24"]);
        cfg.tap.queues = queues;
        let env = netns::link_env(backend, &cfg).expect("namespace and device");
        let mac = env.queues[0].info().mac;
        netns::static_neighbor(&env.name, "198.18.1.2".parse().unwrap(), mac).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let echoes: Vec<_> = env
            .queues
            .into_iter()
            .map(|t| {
                let (s, c) = (stop.clone(), count.clone());
                std::thread::spawn(move || echo(t, batch, s, c))
            })
            .collect();
        // Several flows so that a multi-queue TAP spreads them.
        let socks: Vec<UdpSocket> = (0..8)
            .map(|i| {
                let s = UdpSocket::bind(SocketAddr::from((netns::KERNEL_V4, 30000 + i))).unwrap();
                s.connect("198.18.1.2:9").unwrap();
                s
            })
            .collect();
        let data = vec![0x5au8; payload];
        let start = Instant::now();
        let mut sent = 0u64;
        let before = count.load(Ordering::Relaxed);
        while start.elapsed() < RUN && sent < MAX_DATAGRAMS {
            for s in &socks {
                // ENOBUFS and friends under overload are part of the measurement: skip them.
                let _ = s.send(&data);
                sent += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let echoed = count.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        for e in echoes {
            e.join().unwrap();
        }
        echoed as f64 / secs
    })
    .join()
    .unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    if let Some(why) = netns::unavailable() {
        println!("skipped: tap_ceiling: {why}");
        return;
    }
    let backends: Vec<Backend> = match subnetstack::ifaces::xdp::unavailable() {
        None => Backend::ALL.to_vec(),
        Some(why) => {
            println!("AF_XDP skipped: {why}");
            vec![Backend::Tap]
        }
    };
    println!(
        "| device | queues | batch | frame bytes | frames/s echoed (median of {RUNS}) | min | max |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &(payload, frame) in &[(18usize, 60usize), (1472, 1514)] {
        for queues in [1, 2] {
            for batch in [1, 32] {
                // Interleaved: run i of every backend before run i + 1 of any.
                let mut r = vec![Vec::new(); backends.len()];
                for _ in 0..RUNS {
                    for (i, &b) in backends.iter().enumerate() {
                        r[i].push(run(b, queues, batch, payload));
                    }
                }
                for (b, mut r) in backends.iter().zip(r) {
                    r.sort_by(|a, b| a.total_cmp(b));
                    println!(
                        "| {} | {queues} | {batch} | {frame} | {:.0} | {:.0} | {:.0} |",
                        match b {
                            Backend::Tap => "TAP",
                            Backend::Xdp => "AF_XDP (veth)",
                        },
                        r[RUNS / 2],
                        r[0],
                        r[RUNS - 1]
                    );
                }
            }
        }
    }
}
