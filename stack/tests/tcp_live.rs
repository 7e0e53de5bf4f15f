//! TCP against the Linux kernel over a TAP, each test in its own network namespace.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use std::sync::Arc;

use common::{addresses, servers, Running};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subnetstack_ifaces::impair::{ImpairConfig, Impaired, Impairment};
use subnetstack_ifaces::netns::{self, Backend, TapEnvConfig};
use subnetstack_ifaces::SystemClock;
use subnetstack_stack::{IoError, Stack, TcpHandle};

const PREFIXES: [&str; 2] = ["198.18.0.0/16", "2001:db8:100::/48"];

fn env(backend: Backend, name: &str) -> netns::LinkEnv {
    let env = netns::link_env(backend, &TapEnvConfig::new(name, &PREFIXES)).unwrap();
    if let Some(x) = &env.xdp {
        println!("{}", x.describe());
    }
    env
}

backends!(
    kernel_clients_reach_the_listener_the_rules_pick,
    bulk_both_ways_with_the_kernel,
    the_stack_dials_a_kernel_listener_from_local_addresses
);

fn kernel_clients_reach_the_listener_the_rules_pick(backend: Backend) {
    let env = env(backend, "sst-tcp");
    let tap = env.queues.into_iter().next().unwrap();
    let run = Running::start_with(tap, &PREFIXES, servers);
    let nested: IpNet = "198.18.5.0/24".parse().unwrap();
    // 500 addresses, two connections each (echo and HTTP): 1,000 connections, plus IPv6.
    let mut targets = addresses("198.18.0.0/16", 400, 11);
    targets.extend(addresses("198.18.5.0/24", 100, 12));
    let mut v6 = addresses("2001:db8:100::/48", 50, 13);
    for (i, a) in targets.iter().enumerate() {
        // Echo (port 7) and HTTP (port 80) on every address.
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(*a, 7), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{a}:7: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = format!("hello {i} from the kernel");
        s.write_all(msg.as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, msg, "echo via {a}");

        let mut h =
            TcpStream::connect_timeout(&SocketAddr::new(*a, 80), Duration::from_secs(5)).unwrap();
        h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        h.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut resp = String::new();
        h.read_to_string(&mut resp).unwrap();
        let tag = if nested.contains(a) { "nested" } else { "wide" };
        assert!(resp.ends_with(&format!("{tag} {a}")), "{a}: {resp:?}");
    }
    for (i, a) in v6.drain(..).enumerate() {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(a, 7), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = format!("v6 hello {i}");
        s.write_all(msg.as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    // curl, a real HTTP client, reaches the nested listener.
    match std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "http://198.18.5.9/"])
        .output()
    {
        Ok(curl) => {
            assert!(
                curl.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&curl.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&curl.stdout), "nested 198.18.5.9");
        }
        Err(e) if std::env::var_os(netns::REQUIRE_LIVE).is_none() => {
            println!("skipped: the curl check: {e}")
        }
        Err(e) => panic!("curl is required here: {e}"),
    }
    // A port nobody listens on is refused (RST).
    let e = TcpStream::connect_timeout(&"198.18.9.9:81".parse().unwrap(), Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    let stack = run.stop();
    println!("stack: {}", stack.counters());
}

/// Echoes `size` bytes through the stack's echo listener at `dst` from a kernel client (writer and
/// reader on two threads); returns the seconds it took. On failure, prints the stack's
/// connections before panicking.
fn echo_bulk(run: Running, dst: &str, size: usize) -> f64 {
    echo_bulk_stack(run, dst, size).0
}

/// [`echo_bulk`], also handing back the stopped stack.
fn echo_bulk_stack(run: Running, dst: &str, size: usize) -> (f64, Stack) {
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut s = TcpStream::connect_timeout(&dst.parse().unwrap(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let t0 = std::time::Instant::now();
    let mut back = Vec::with_capacity(size);
    if let Err(e) = s.read_to_end(&mut back) {
        let stack = run.stop();
        panic!(
            "read failed after {} bytes: {e}\n{}\n{}",
            back.len(),
            stack.counters(),
            stack.tcp_debug_all().join("\n")
        );
    }
    writer.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let (sent, got) = (Sha256::digest(&data), Sha256::digest(&back));
    assert_eq!(back.len(), size, "echoed {} of {size} bytes", back.len());
    assert_eq!(sent, got, "SHA-256 of what was sent and what came back");
    println!("SHA-256 both ways: {sent:x}");
    let stack = run.stop();
    println!("stack: {}", stack.counters());
    for c in stack.tcp_debug_all() {
        println!("  {c}");
    }
    (secs, stack)
}

fn bulk_both_ways_with_the_kernel(backend: Backend) {
    let env = env(backend, "sst-bulk");
    let tap = env.queues.into_iter().next().unwrap();
    let run = Running::start_with(tap, &PREFIXES, servers);
    const SIZE: usize = 256 << 20;
    let secs = echo_bulk(run, "198.18.77.7:7", SIZE);
    println!(
        "256 MiB each way in {secs:.2} s ({:.0} Mbit/s each way)",
        SIZE as f64 * 8.0 / secs / 1e6
    );
}

/// The same 256 MiB each way over a TAP with virtio-net offloads (and 64 MiB over IPv6): the
/// stack sends TSO super-frames with partial checksums, the kernel sends it GSO super-frames,
/// and every byte arrives.
#[test]
fn bulk_both_ways_with_tap_offloads() {
    if !netns::live("bulk_both_ways_with_tap_offloads") {
        return;
    }
    for (name, dst, mib) in [
        ("sst-tso4", "198.18.77.8:7", 256),
        ("sst-tso6", "[2001:db8:100::8]:7", 64),
    ] {
        let mut cfg = TapEnvConfig::new(name, &PREFIXES);
        cfg.tap.offload = true;
        let env = netns::link_env(Backend::Tap, &cfg).unwrap();
        let tap = env.queues.into_iter().next().unwrap();
        assert!(tap.info().offloads.tx_tso4 && tap.info().offloads.rx_gso);
        let run = Running::start_with(tap, &PREFIXES, servers);
        let (secs, stack) = echo_bulk_stack(run, dst, mib << 20);
        let c = stack.counters();
        println!(
            "{mib} MiB each way to {dst} with offloads in {secs:.2} s ({:.0} Mbit/s each way); super-frames in {} out {}",
            (mib << 20) as f64 * 8.0 / secs / 1e6,
            c.rx_gso_frames,
            c.tx_gso_frames
        );
        assert!(
            c.tx_gso_frames > 100,
            "the stack sent {} super-frames",
            c.tx_gso_frames
        );
        assert!(
            c.rx_gso_frames > 100,
            "the kernel sent {} super-frames",
            c.rx_gso_frames
        );
    }
}

#[test]
fn bulk_through_an_impaired_tap() {
    if !netns::live("bulk_through_an_impaired_tap") {
        return;
    }
    // The full size (about 25 s here; LOSSY_MIB=N runs another).
    let mib: usize = std::env::var("LOSSY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let imp = Impairment {
        loss: 0.02,
        reorder: 0.02,
        duplicate: 0.01,
        ..Default::default()
    };
    impaired_bulk("sst-lossy", false, imp, mib);
}

/// With TAP offloads, through loss, reordering, duplication and corruption (after the
/// offloads, where a wire would flip bits): TSO super-frames are resent in pieces, the kernel's
/// GSO super-frames are lost whole, and every byte still arrives intact.
#[test]
fn bulk_through_an_impaired_tap_with_offloads() {
    if !netns::live("bulk_through_an_impaired_tap_with_offloads") {
        return;
    }
    let imp = Impairment {
        loss: 0.02,
        reorder: 0.02,
        duplicate: 0.01,
        corrupt: 0.005,
        ..Default::default()
    };
    impaired_bulk("sst-lossy-tso", true, imp, 32);
}

/// `mib` MiB each way through impairments on the stack's side of the TAP, both directions.
fn impaired_bulk(name: &str, offload: bool, imp: Impairment, mib: usize) {
    let mut cfg = TapEnvConfig::new(name, &PREFIXES);
    cfg.tap.offload = offload;
    let env = netns::link_env(Backend::Tap, &cfg).unwrap();
    let tap = env.queues.into_iter().next().unwrap();
    let dev = Impaired::new(
        tap,
        ImpairConfig {
            seed: 7,
            rx: imp.clone(),
            tx: imp,
        },
        Arc::new(SystemClock::new()),
    );
    let run = Running::start_dev(Box::new(dev), &PREFIXES, servers);
    let (secs, stack) = echo_bulk_stack(run, "198.18.66.6:7", mib << 20);
    let c = stack.counters();
    println!(
        "{mib} MiB each way through impairments (offloads {offload}) in {secs:.2} s; super-frames in {} out {}",
        c.rx_gso_frames, c.tx_gso_frames
    );
    if offload {
        assert!(c.tx_gso_frames > 0 && c.rx_gso_frames > 0);
    }
}

fn the_stack_dials_a_kernel_listener_from_local_addresses(backend: Backend) {
    let env = env(backend, "sst-dial");
    let tap = env.queues.into_iter().next().unwrap();
    let listener = TcpListener::bind((netns::KERNEL_V4, 9000)).unwrap();
    let server = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..20 {
            let (mut c, peer) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut msg = Vec::new();
            c.read_to_end(&mut msg).unwrap();
            c.write_all(&msg).unwrap();
            peers.push(peer);
        }
        peers
    });
    let sources: Vec<IpAddr> = addresses("198.18.3.0/24", 20, 21);
    let srcs = sources.clone();
    let run = Running::start_with(tap, &PREFIXES, move |_| {
        // One connection at a time: connect, send, half-close, read the echo, close.
        let mut i = 0;
        let mut cur: Option<(TcpHandle, Vec<u8>, bool)> = None;
        Box::new(move |s: &mut Stack, now| {
            if i == srcs.len() {
                return;
            }
            if cur.is_none() {
                let h = s
                    .tcp_connect(
                        now,
                        SocketAddr::new(srcs[i], 0),
                        SocketAddr::from((netns::KERNEL_V4, 9000)),
                    )
                    .unwrap();
                cur = Some((h, Vec::new(), false));
            }
            let (h, got, sent) = cur.as_mut().unwrap();
            let msg = format!("from {}", srcs[i]);
            if !*sent {
                if s.tcp_send(now, *h, msg.as_bytes()) == Ok(msg.len()) {
                    *sent = true;
                    // Half-close: the kernel reads to EOF before echoing.
                    s.tcp_shutdown(now, *h);
                }
                return;
            }
            let mut buf = [0u8; 256];
            loop {
                match s.tcp_recv(now, *h, &mut buf) {
                    Ok(0) => {
                        assert_eq!(got, msg.as_bytes(), "the echo came back to the stack");
                        s.tcp_close(now, *h);
                        i += 1;
                        cur = None;
                        return;
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(IoError::WouldBlock | IoError::NotConnected) => return,
                    Err(e) => panic!("{e}"),
                }
            }
        })
    });
    let peers = server.join().unwrap();
    run.stop();
    let mut seen: Vec<IpAddr> = peers.iter().map(|p| p.ip()).collect();
    seen.sort();
    let mut want = sources;
    want.sort();
    assert_eq!(
        seen, want,
        "each connection came from the chosen local address"
    );
}

#[test]
fn bulk_with_kernel_side_loss_uses_sack() {
    if !netns::live("bulk_with_kernel_side_loss_uses_sack") {
        return;
    }
    let env = env(Backend::Tap, "sst-sack");
    // 5 % loss each way. Towards the kernel, nftables drops at the TAP's ingress: a real loss
    // for the stack's data. Towards the stack, a drop at the TAP's egress would be no loss at
    // all: the kernel hands the failure back to the sending socket, which sends the segment
    // again as if it never left (RetransSegs stays 0). So that direction drops in the stack's
    // receive path instead, after the kernel has let the segment go.
    netns::nft_loss(&env.name, netns::Hook::Ingress, 5).unwrap();
    let tap = env.queues.into_iter().next().unwrap();
    let dev = Impaired::new(
        tap,
        ImpairConfig {
            seed: 5,
            rx: Impairment {
                loss: 0.05,
                ..Default::default()
            },
            tx: Impairment::default(),
        },
        Arc::new(SystemClock::new()),
    );
    let run = Running::start_dev(Box::new(dev), &PREFIXES, servers);
    // The full size (about a minute here; SACK_MIB=N runs another).
    let mib: usize = std::env::var("SACK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let secs = echo_bulk(run, "198.18.55.5:7", mib << 20);
    let ext = kernel_tcp_ext();
    let get = |k: &str| ext.get(k).copied().unwrap_or(0);
    println!(
        "{mib} MiB each way through 5 % loss each way in {secs:.2} s; kernel: TCPSackRecovery {} TCPSACKReorder {} TCPDSACKRecv {} TCPSackMerged {} TCPLossProbes {} TCPTimeouts {} TCPOFOQueue {} TCPDSACKOldSent {}",
        get("TCPSackRecovery"),
        get("TCPSACKReorder"),
        get("TCPDSACKRecv"),
        get("TCPSackMerged"),
        get("TCPLossProbes"),
        get("TCPTimeouts"),
        get("TCPOFOQueue"),
        get("TCPDSACKOldSent"),
    );
    // The kernel recovered its losses with the SACK blocks the stack sent, and reported
    // the stack's duplicates as D-SACK. (`ss -ti` would show the `sack` option, but iproute2
    // 6.1 on this 6.18 kernel prints no option flags even for kernel-to-kernel connections, so
    // the kernel's counters are read instead.)
    assert!(get("TCPSackRecovery") > 0, "{ext:?}");
}

/// The kernel's TcpExt counters in this thread's namespace (`/proc/thread-self`, since
/// `/proc/self` would be the main thread's namespace).
fn kernel_tcp_ext() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut out = HashMap::new();
    if let [names, values] = lines[..] {
        for (k, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            out.insert(k.to_owned(), v.parse().unwrap_or(0));
        }
    }
    out
}
