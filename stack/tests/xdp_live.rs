//! What only AF_XDP has to get right: the kernel keeps everything that is not the stack's, and
//! the program goes away with the process. Each test in its own namespaces and veth pair.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{servers, Running};
use ipnet::IpNet;
use subnetstack_ifaces::netns::{self, Backend};
use subnetstack_ifaces::xdp::{Xdp, XdpConfig};

/// The kernel's own addresses on the stack's interface: outside the stack's prefixes.
const HOST_V4: &str = "198.19.254.1";
const HOST_V6: &str = "2001:db8:fffe::1";
const PEER_V4: &str = "198.19.254.2";
const PEER_V6: &str = "2001:db8:fffe::2";
const PREFIXES: [&str; 2] = ["198.18.0.0/16", "2001:db8:100::/48"];

fn thread_id() -> i64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Echoes `msg` through `addr` and returns what came back.
fn echo(addr: SocketAddr, msg: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    back
}

/// A kernel echo server on `addr`, for `n` connections.
fn kernel_echo(addr: &str, n: usize) -> std::thread::JoinHandle<usize> {
    let l = TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut served = 0;
        for _ in 0..n {
            let (mut c, _) = l.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
            served += 1;
        }
        served
    })
}

#[test]
fn kernel_services_on_the_same_interface_keep_working() {
    let test = "kernel_services_on_the_same_interface_keep_working";
    if !netns::live_on(test, Backend::Xdp) {
        return;
    }
    // The peer: a thread in a namespace of its own, holding the kernel end of the veth.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        netns::enter_private_netns().unwrap();
        tid_tx.send(thread_id()).unwrap();
        go_rx.recv().unwrap();
        netns::ethtool_off("sst-pass").unwrap();
        netns::ip(&["link", "set", "sst-pass", "up"]).unwrap();
        netns::ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", "sst-pass"]).unwrap();
        netns::ip(&[
            "-6",
            "addr",
            "add",
            &format!("{PEER_V6}/64"),
            "dev",
            "sst-pass",
            "nodad",
        ])
        .unwrap();
        for p in PREFIXES {
            netns::ip(&["route", "add", p, "dev", "sst-pass"]).unwrap();
        }
        // Kernel to kernel (XDP_PASS) and kernel to stack (redirected), both families,
        // interleaved.
        let mut results = Vec::new();
        for i in 0..20 {
            for dst in [
                format!("{HOST_V4}:8080"),
                format!("[{HOST_V6}]:8080"),
                format!("198.18.{}.{}:7", i, i + 1),
                format!("[2001:db8:100::{}]:7", i + 1),
            ] {
                let msg = format!("hello {i} to {dst}");
                results.push((echo(dst.parse().unwrap(), &msg) == msg, dst));
            }
        }
        let ping = Command::new("ping")
            .args(["-c1", "-W2", "-q", HOST_V4])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        (results, ping)
    });
    let peer_tid = tid_rx.recv().unwrap();

    // The host: this thread's namespace holds the stack's end, the kernel's own addresses on
    // it, a kernel echo server on them, and the stack.
    netns::enter_private_netns().unwrap();
    netns::ip(&[
        "link",
        "add",
        "sst-passx",
        "type",
        "veth",
        "peer",
        "name",
        "sst-pass",
        "netns",
        &peer_tid.to_string(),
    ])
    .unwrap();
    netns::ip(&["link", "set", "sst-passx", "up"]).unwrap();
    netns::ip(&["addr", "add", &format!("{HOST_V4}/24"), "dev", "sst-passx"]).unwrap();
    netns::ip(&[
        "-6",
        "addr",
        "add",
        &format!("{HOST_V6}/64"),
        "dev",
        "sst-passx",
        "nodad",
    ])
    .unwrap();
    let v4 = kernel_echo(&format!("{HOST_V4}:8080"), 20);
    let v6 = kernel_echo(&format!("[{HOST_V6}]:8080"), 20);
    let prefixes: Vec<IpNet> = PREFIXES.iter().map(|p| p.parse().unwrap()).collect();
    let mut xdp = Xdp::open(&XdpConfig::new("sst-passx", prefixes)).unwrap();
    println!("{}; {}", xdp.program.describe(), xdp.queues[0].copy_mode());
    let dev = xdp.queues.remove(0);
    let run = Running::start_with(dev, &PREFIXES, servers);
    go_tx.send(()).unwrap();

    let (results, ping) = peer.join().unwrap();
    let stack = run.stop();
    println!("stack: {}", stack.counters());
    let failed: Vec<_> = results.iter().filter(|(ok, _)| !ok).collect();
    assert!(failed.is_empty(), "failed echoes: {failed:?}");
    assert!(ping, "the kernel answers ping on its own address");
    assert_eq!(v4.join().unwrap(), 20, "kernel IPv4 server served all");
    assert_eq!(v6.join().unwrap(), 20, "kernel IPv6 server served all");
    // The stack served its 40 connections and saw nothing of the kernel's: a frame for another
    // address would have been dropped and counted.
    let c = stack.counters();
    assert!(c.rx_frames >= 40 * 5, "{c}");
    assert_eq!(c.dropped_total(), 0, "{c}");
}

/// Whether `dev` has an XDP program attached.
fn has_xdp(dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-d", "link", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("prog/xdp") || text.contains("xdp ")
}

fn wait_detached(dev: &str) -> Duration {
    let t0 = Instant::now();
    while has_xdp(dev) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "XDP program still attached to {dev} after 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// The helper process of `the_program_goes_with_the_process`: attaches to the interface named
/// in `SST_XDP_HOLD`, says so, and waits (at most a minute) to be killed.
#[test]
#[ignore = "helper process, run by the_program_goes_with_the_process"]
fn xdp_holder() {
    let Some(dev) = std::env::var_os("SST_XDP_HOLD") else {
        return;
    };
    let _xdp = Xdp::open(&XdpConfig::new(
        dev.to_str().unwrap(),
        vec!["198.18.0.0/16".parse().unwrap()],
    ))
    .unwrap();
    println!("attached");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn the_program_goes_with_the_process() {
    let test = "the_program_goes_with_the_process";
    if !netns::live_on(test, Backend::Xdp) {
        return;
    }
    netns::enter_private_netns().unwrap();
    netns::ip(&[
        "link", "add", "sst-goxx", "type", "veth", "peer", "name", "sst-gox",
    ])
    .unwrap();
    netns::ip(&["link", "set", "sst-goxx", "up"]).unwrap();
    netns::ip(&["link", "set", "sst-gox", "up"]).unwrap();
    assert!(!has_xdp("sst-goxx"));

    // Dropped in this process: detached at once.
    let xdp = Xdp::open(&XdpConfig::new(
        "sst-goxx",
        vec!["198.18.0.0/16".parse().unwrap()],
    ))
    .unwrap();
    assert!(has_xdp("sst-goxx"));
    drop(xdp);
    println!("after drop: detached in {:?}", wait_detached("sst-goxx"));

    // Killed with SIGKILL in another process (in this namespace: children inherit it).
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["xdp_holder", "--exact", "--ignored", "--nocapture"])
        .env("SST_XDP_HOLD", "sst-goxx")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let attached = lines.any(|l| l.is_ok_and(|l| l.contains("attached")));
    if !attached {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the helper process did not attach");
    }
    assert!(has_xdp("sst-goxx"), "attached by the helper");
    child.kill().unwrap(); // SIGKILL, to our own child, by its PID
    let status = child.wait().unwrap();
    assert!(!status.success());
    println!("after kill -9: detached in {:?}", wait_detached("sst-goxx"));

    // And the interface is usable again at once by a new program.
    let again = Xdp::open(&XdpConfig::new(
        "sst-goxx",
        vec![IpNet::from(IpAddr::from([198, 18, 0, 1]))],
    ))
    .unwrap();
    assert!(has_xdp("sst-goxx"));
    drop(again);
}

#[test]
fn generic_mode_serves_too() {
    let test = "generic_mode_serves_too";
    if !netns::live_on(test, Backend::Xdp) {
        return;
    }
    // The fallback when a driver has no native XDP: the program runs after the kernel built an
    // skb. Same veth environment as xdp_env, attached in generic mode.
    netns::enter_private_netns().unwrap();
    netns::ip(&[
        "link", "add", "sst-genx", "type", "veth", "peer", "name", "sst-gen",
    ])
    .unwrap();
    netns::ethtool_off("sst-gen").unwrap();
    netns::ip(&["link", "set", "sst-genx", "up"]).unwrap();
    netns::add_kernel_side("sst-gen").unwrap();
    for p in PREFIXES {
        netns::ip(&["route", "add", p, "dev", "sst-gen"]).unwrap();
    }
    let prefixes: Vec<IpNet> = PREFIXES.iter().map(|p| p.parse().unwrap()).collect();
    let mut cfg = XdpConfig::new("sst-genx", prefixes);
    cfg.mode = subnetstack_ifaces::xdp::XdpMode::Generic;
    let mut xdp = Xdp::open(&cfg).unwrap();
    assert!(!xdp.program.native());
    println!("{}", xdp.program.describe());
    let run = Running::start_with(xdp.queues.remove(0), &PREFIXES, servers);
    for i in 0..10 {
        for dst in [
            format!("198.18.{}.{}:7", 40 + i, i + 1),
            format!("[2001:db8:100::{}]:7", 40 + i),
        ] {
            let msg = format!("generic {i}");
            assert_eq!(echo(dst.parse().unwrap(), &msg), msg, "{dst}");
        }
    }
    let stack = run.stop();
    println!("stack: {}", stack.counters());
    assert_eq!(stack.counters().dropped_total(), 0);
}
