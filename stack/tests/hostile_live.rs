//! Hostile peers with real tools (nmap, hping3), each test in its own network namespace over a
//! TAP: scans see exactly the bindings, odd segments get what Linux gives them, floods and
//! stale fragments stay within the limits, and slow or idle peers cost bounded memory.
//!
//! Bounded in count and time; spoofed sources only from 198.19.128.0/17. Needs root and
//! `nmap`, `hping3` (`.ci/run` installs them); skips with the reason otherwise.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{servers, App, Running};
use subnetstack_demux::PortSpec;
use subnetstack_ifaces::netns::{self, TapEnvConfig};
use subnetstack_stack::{Config, DropReason, IoError, Stack, TcpHandle};

const TARGET: &str = "198.18.5.9";

/// Whether the live test can run: root, a TAP, and `tools` installed.
fn ready(test: &str, tools: &[&str]) -> bool {
    if !netns::live(test) {
        return false;
    }
    for t in tools {
        if Command::new(t).arg("--version").output().is_err() {
            if std::env::var_os(netns::REQUIRE_LIVE).is_some_and(|v| v != "0") {
                panic!(
                    "{test}: `{t}` is not installed but {} is set",
                    netns::REQUIRE_LIVE
                );
            }
            println!("skipped: {test}: `{t}` is not installed");
            return false;
        }
    }
    true
}

/// A TAP environment routing 198.18.0.0/16 via the stack's own address (one neighbour entry,
/// and replies to spoofed sources go to the kernel, which does not forward them).
fn env(name: &str) -> Box<dyn subnetstack_ifaces::Device> {
    let mut cfg = TapEnvConfig::new(name, &["198.18.0.0/16"]);
    cfg.via_gateway = true;
    let env = netns::tap_env(&cfg).unwrap();
    Box::new(env.queues.into_iter().next().unwrap())
}

fn start(
    name: &str,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
    setup: impl FnOnce(&mut Stack) -> App + Send + 'static,
) -> Running {
    Running::start_cfg(
        env(name),
        &["198.18.0.0/16", "198.19.255.2/32"],
        move |c| {
            c.gateway_v4 = Some(netns::KERNEL_V4);
            tweak(c)
        },
        setup,
    )
}

/// Runs a command to completion (bounded by `timeout`), returning its stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4
}

/// Binds TCP 22, 80, 8000-8010 and UDP 53, 5000-5005 on 198.18.5.0/24; UDP echoes.
fn scan_targets(s: &mut Stack) -> App {
    let net: ipnet::IpNet = "198.18.5.0/24".parse().unwrap();
    for ports in [
        PortSpec::exact(22).unwrap(),
        PortSpec::exact(80).unwrap(),
        PortSpec::range(8000, 8010).unwrap(),
    ] {
        s.tcp_listen(net, ports, false, 64).unwrap();
    }
    let udp = vec![
        s.udp_bind(net, PortSpec::exact(53).unwrap(), false)
            .unwrap(),
        s.udp_bind(net, PortSpec::range(5000, 5005).unwrap(), false)
            .unwrap(),
    ];
    Box::new(move |s: &mut Stack, now| {
        for &h in &udp {
            while let Some(d) = s.udp_recv(h) {
                let _ = s.udp_send(now, h, d.dst, d.src, &d.payload);
            }
        }
    })
}

/// The ports nmap's grepable output reports in `state`.
fn nmap_ports(out: &str, state: &str) -> BTreeSet<u16> {
    out.lines()
        .filter_map(|l| l.split_once("Ports: "))
        .flat_map(|(_, ports)| ports.split(", "))
        .filter_map(|p| {
            let f: Vec<&str> = p.split('/').collect();
            (f.len() > 2 && f[1] == state).then(|| f[0].trim().parse().ok())?
        })
        .collect()
}

#[test]
fn nmap_sees_exactly_the_bindings() {
    let test = "nmap_sees_exactly_the_bindings";
    if !ready(test, &["nmap"]) {
        return;
    }
    let run_ = start("sst-nmap", |_| {}, scan_targets);
    // TCP SYN scan: open = SYN-ACK, closed = RST, filtered = nothing.
    let tcp = run(
        "nmap",
        &[
            "-Pn",
            "-n",
            "-sS",
            "-T4",
            "--max-retries",
            "1",
            "-p",
            "1-100,7990-8020",
            "-oG",
            "-",
            TARGET,
        ],
    );
    let open = nmap_ports(&tcp, "open");
    let want: BTreeSet<u16> = [22, 80].into_iter().chain(8000..=8010).collect();
    assert_eq!(open, want, "open TCP ports\n{tcp}");
    // Every other port answered RST: nmap folds them into "Ignored State: closed (N)".
    let scanned = 100 + 31;
    assert!(
        tcp.contains(&format!("Ignored State: closed ({})", scanned - want.len())),
        "the rest are closed (RST), none filtered\n{tcp}"
    );
    // UDP: an answer = open, ICMP port unreachable = closed.
    let udp = run(
        "nmap",
        &[
            "-Pn",
            "-n",
            "-sU",
            "-T4",
            "--max-retries",
            "1",
            "-p",
            "50-56,4998-5007",
            "-oG",
            "-",
            TARGET,
        ],
    );
    let open = nmap_ports(&udp, "open");
    let want: BTreeSet<u16> = [53].into_iter().chain(5000..=5005).collect();
    assert_eq!(open, want, "open UDP ports\n{udp}");
    let closed = 17 - want.len();
    assert!(
        udp.contains(&format!("Ignored State: closed ({closed})"))
            || nmap_ports(&udp, "closed").len() == closed,
        "the rest are closed (port unreachable)\n{udp}"
    );
    let stack = run_.stop();
    println!("stack: {}", stack.counters());
}

/// What hping3 saw for one probe: the reply's flags, or "none".
fn hping(args: &[&str], dst: &str) -> String {
    let mut a = vec!["-c", "1"];
    a.extend_from_slice(args);
    a.push(dst);
    let out = run("hping3", &a);
    out.lines()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("flags="))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "none".into())
}

#[test]
fn odd_segments_get_what_linux_gives_them() {
    let test = "odd_segments_get_what_linux_gives_them";
    if !ready(test, &["hping3"]) {
        return;
    }
    let run_ = start("sst-odd", |_| {}, servers);
    // Linux, in the same namespace: a listener on an address of `lo` (hping3 listens for
    // answers on the interface its route names), port 80; 81 closed.
    netns::ip(&["addr", "add", "198.19.250.1/24", "dev", "lo"]).unwrap();
    let kernel = "198.19.250.1".to_string();
    let _l = std::net::TcpListener::bind((kernel.as_str(), 80)).unwrap();
    let probes: [(&str, &[&str]); 5] = [
        ("SYN with a bad checksum", &["-S", "-b"]),
        ("SYN+FIN", &["-S", "-F"]),
        ("FIN+PSH+URG", &["-F", "-P", "-U"]),
        ("bare ACK", &["-A"]),
        ("bare RST", &["-R"]),
    ];
    let mut table = Vec::new();
    for (name, flags) in probes {
        for port in ["80", "81"] {
            let mut args = flags.to_vec();
            args.extend(["-p", port]);
            let linux = hping(&args, &kernel);
            let ours = hping(&args, TARGET);
            table.push(format!(
                "{name} to port {port}: Linux {linux}, subnetstack {ours}"
            ));
            assert_eq!(ours, linux, "{name} to port {port}");
        }
    }
    println!("{}", table.join("\n"));
    // Port 80 listens on the stack (the wide binding), 81 does not: the answers above came
    // from both states.
    let stack = run_.stop();
    let c = stack.counters();
    println!("stack: {c}");
    assert!(c.dropped(DropReason::TcpBadChecksum) >= 2);
    assert!(c.dropped(DropReason::TcpBadFlags) >= 2);
}

#[test]
fn rst_with_a_wrong_sequence_number_gets_a_challenge_ack_not_a_reset() {
    let test = "rst_with_a_wrong_sequence_number_gets_a_challenge_ack_not_a_reset";
    if !ready(test, &["hping3"]) {
        return;
    }
    // An echo server that tells the test its connection's next expected sequence number.
    let rcv_nxt: Arc<Mutex<Option<u32>>> = Arc::default();
    let shared = rcv_nxt.clone();
    let run_ = start(
        "sst-rst",
        |_| {},
        move |s| {
            let l = s
                .tcp_listen(
                    "198.18.0.0/16".parse().unwrap(),
                    PortSpec::exact(7).unwrap(),
                    false,
                    8,
                )
                .unwrap();
            let mut conns: Vec<TcpHandle> = Vec::new();
            Box::new(move |s: &mut Stack, now| {
                while let Some((h, _, _)) = s.tcp_accept(l) {
                    conns.push(h);
                }
                let mut buf = [0u8; 2048];
                for &h in &conns {
                    if let Ok(n) = s.tcp_recv(now, h, &mut buf) {
                        if n > 0 {
                            let _ = s.tcp_send(now, h, &buf[..n]);
                        }
                    }
                    if let Some(d) = s.tcp_debug(h) {
                        let nxt = d
                            .split_whitespace()
                            .skip_while(|w| *w != "rcv_nxt")
                            .nth(1)
                            .and_then(|v| v.parse().ok());
                        *shared.lock().unwrap() = nxt;
                    }
                }
            })
        },
    );
    let mut c = TcpStream::connect_timeout(
        &format!("{TARGET}:7").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let echo = |c: &mut TcpStream, msg: &[u8]| {
        c.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    echo(&mut c, b"before");
    let port = c.local_addr().unwrap().port().to_string();
    let nxt = rcv_nxt.lock().unwrap().expect("the stack reported RCV.NXT");
    // In the window but not exact: RFC 5961 says challenge ACK, keep the connection.
    let wrong = nxt.wrapping_add(1000).to_string();
    hping(&["-R", "-s", &port, "-k", "-p", "7", "-M", &wrong], TARGET);
    echo(&mut c, b"after a forged RST");
    // Exact: the connection is reset.
    let exact = rcv_nxt.lock().unwrap().unwrap().to_string();
    hping(&["-R", "-s", &port, "-k", "-p", "7", "-M", &exact], TARGET);
    std::thread::sleep(Duration::from_millis(100));
    let _ = c.write_all(b"x");
    let mut b = [0u8; 8];
    let r = c.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(r, Ok(0)),
        "the exact RST ended it: {r:?}"
    );
    let stack = run_.stop();
    let c = stack.counters();
    println!("stack: {c}");
    assert_eq!(c.dropped(DropReason::TcpChallengeAck), 1, "{c}");
}

#[test]
fn floods_and_stale_fragments_stay_within_the_limits() {
    let test = "floods_and_stale_fragments_stay_within_the_limits";
    if !ready(test, &["hping3"]) {
        return;
    }
    // A UDP socket on port 53 that nobody reads (its queue fills), servers on 80.
    let run_ = start(
        "sst-floods",
        |_| {},
        |s| {
            let _quiet = s
                .udp_bind(
                    "198.18.0.0/16".parse().unwrap(),
                    PortSpec::exact(53).unwrap(),
                    false,
                )
                .unwrap();
            servers(s)
        },
    );
    let rss_before = rss_kib();
    const N: &str = "20000";
    let t0 = Instant::now();
    // Spoofed sources from 198.19.128.0/17 only, one per flood; 20,000 packets each, paced.
    let floods: [(&str, Vec<&str>); 4] = [
        ("ACK flood to a listener", vec!["-A", "-p", "80"]),
        (
            "UDP flood to a bound port nobody reads",
            vec!["--udp", "-p", "53", "-d", "100"],
        ),
        (
            "UDP flood to an unbound port",
            vec!["--udp", "-p", "99", "-d", "100"],
        ),
        (
            "first fragments that never complete",
            vec!["--udp", "-p", "53", "-x", "-d", "1200"],
        ),
    ];
    let mut kids = Vec::new();
    for (i, (_, args)) in floods.iter().enumerate() {
        let src = format!("198.19.200.{}", i + 1);
        let mut a = vec!["-q", "-c", N, "-i", "u50", "-a", &src];
        a.extend(args.iter().copied());
        a.push(TARGET);
        kids.push(
            Command::new("timeout")
                .arg("60")
                .arg("hping3")
                .args(&a)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // Legitimate clients meanwhile.
    let mut ok = 0;
    for i in 0..20u8 {
        let to: SocketAddr = format!("198.18.6.{}:80", i + 1).parse().unwrap();
        if let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut resp = String::new();
            if c.read_to_string(&mut resp).is_ok() && resp.contains("wide") {
                ok += 1;
            }
        }
    }
    for mut k in kids {
        k.wait().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss_after = rss_kib();
    let stack = run_.stop();
    let c = stack.counters();
    println!(
        "floods of {N} packets each in {secs:.1} s; clients ok {ok}/20; RSS {rss_before} KiB before, {rss_after} KiB after\nstack: {c}"
    );
    assert_eq!(ok, 20, "legitimate clients served during the floods");
    // Each flood was met at its limit, counted.
    assert!(
        c.dropped(DropReason::TcpNoConnection) >= 19_000,
        "ACKs answered with RST"
    );
    assert!(
        c.dropped(DropReason::UdpQueueFull) >= 18_000,
        "the unread queue stayed full"
    );
    assert!(
        c.dropped(DropReason::IcmpRateLimited) >= 20_000 - (100.0 * secs) as u64 - 50 - 100,
        "port unreachables rate-limited"
    );
    assert!(
        c.dropped(DropReason::FragNoMemory) > 0,
        "reassembly memory capped"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory stays bounded: {rss_before} -> {rss_after} KiB"
    );
}

#[test]
fn slow_and_idle_peers_cost_bounded_memory_and_time() {
    let test = "slow_and_idle_peers_cost_bounded_memory_and_time";
    if !ready(test, &[]) {
        return;
    }
    // Port 19 writes forever (chargen), port 7 only listens; every connection is reset after
    // 1 s without progress. The app records the most buffer memory the stack ever held.
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak2 = peak.clone();
    let run_ = start(
        "sst-slow",
        |c| c.tcp.idle_timeout = Some(Duration::from_secs(1)),
        move |s| {
            let net: ipnet::IpNet = "198.18.0.0/16".parse().unwrap();
            let l = s
                .tcp_listen(net, PortSpec::exact(19).unwrap(), false, 8)
                .unwrap();
            let quiet = s
                .tcp_listen(net, PortSpec::exact(7).unwrap(), false, 8)
                .unwrap();
            let mut conns: Vec<TcpHandle> = Vec::new();
            let mut held: Vec<TcpHandle> = Vec::new();
            let chunk = vec![b'x'; 16 * 1024];
            Box::new(move |s: &mut Stack, now| {
                peak2.fetch_max(s.tcp_buffer_memory(), std::sync::atomic::Ordering::Relaxed);
                while let Some((h, _, _)) = s.tcp_accept(l) {
                    conns.push(h);
                }
                while let Some((h, _, _)) = s.tcp_accept(quiet) {
                    held.push(h);
                }
                conns.retain(|&h| loop {
                    match s.tcp_send(now, h, &chunk) {
                        Ok(_) => continue,
                        Err(IoError::WouldBlock) => break true,
                        Err(_) => {
                            s.tcp_close(now, h);
                            break false;
                        }
                    }
                });
            })
        },
    );
    // A client that never reads: the stack's send buffer fills to its limit and stays there.
    let reader = TcpStream::connect_timeout(
        &format!("{TARGET}:19").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let rss_full = rss_kib();
    // An idle client: connects, never sends (and the server never writes).
    let mut idle = TcpStream::connect_timeout(
        &format!("{TARGET}:7").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Both show no progress: each is reset about a second after it stalled.
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    let reset = loop {
        match idle.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => got += n,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let waited = t0.elapsed();
    let rss_end = rss_kib();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    drop(reader);
    let stack = run_.stop();
    let c = stack.counters();
    println!(
        "idle client reset after {waited:?} (read {got} bytes); most buffer memory held {peak} B; RSS {rss_full} KiB with a full send buffer, {rss_end} KiB later\nstack: {c}"
    );
    let cfg = subnetstack_stack::TcpConfig::default();
    assert!(
        peak <= cfg.send_buffer + 64 * 1024,
        "the never-reading peer held at most one send buffer: {peak} B"
    );
    assert!(reset, "the idle peer was reset");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    assert_eq!(
        c.tcp_idle_timeouts, 2,
        "the reader that stalled and the idle one: {c}"
    );
    assert!(
        rss_end < rss_full + 4 * 1024,
        "no growth while the peer did not read: {rss_full} -> {rss_end} KiB"
    );
}
