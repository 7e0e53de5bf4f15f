//! The examples, end to end: their `--help`, the demo's self-check, and the echo server against
//! kernel clients in a private namespace. (`cargo test` builds the examples before running
//! this.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use subnetstack::ifaces::netns::{self, Backend};

/// The examples' shared option parsing, with its unit tests.
#[path = "../examples/common/mod.rs"]
mod common;

/// The built example `name`, next to this test binary's directory.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    dir.join("examples").join(name)
}

#[test]
fn every_example_explains_itself() {
    for (name, option) in [
        ("demo", "--serve"),
        ("echo", "--tap"),
        ("http", "--bind"),
        ("proxy", "--route"),
    ] {
        let out = Command::new(example(name))
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{name}: {e} (built by cargo test?)"));
        assert!(out.status.success(), "{name} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(option),
            "{name} --help mentions {option}: {text}"
        );
    }
    // A bad --bind is refused with the reason.
    let out = Command::new(example("echo"))
        .args([
            "--tap",
            "x",
            "--prefix",
            "198.18.0.0/16",
            "--bind",
            "198.18.0.0/16:90-80",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("90-80"));
}

#[test]
fn the_demo_checks_itself() {
    if !netns::live("the_demo_checks_itself") {
        return;
    }
    let out = Command::new(example("demo"))
        .args(["--clients", "10"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo reported failures");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("stack:") && (l.contains(" tcp ") || l.contains(" udp ")))
        .collect();
    assert_eq!(rows.len(), 6, "{text}");
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        let n = cols.len();
        assert_eq!((cols[n - 4], cols[n - 3]), ("10", "0"), "{r}");
    }
}

/// Kills the child (ours, by PID) when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_echo_example_serves_kernel_clients() {
    if netns::live_on("the_echo_example_serves_kernel_clients", Backend::Tap) {
        echo_example(Backend::Tap);
    }
}

#[test]
fn the_echo_example_serves_kernel_clients_over_af_xdp() {
    if netns::live_on(
        "the_echo_example_serves_kernel_clients_over_af_xdp",
        Backend::Xdp,
    ) {
        echo_example(Backend::Xdp);
    }
}

fn echo_example(backend: Backend) {
    let _child = run_on(
        backend,
        "sst-echo",
        "echo",
        &["tcp:198.18.0.0/16:7", "udp:198.18.5.0/24:*"],
    );
    // TCP: any address of the /16 echoes.
    let mut s = connect_when_up("198.18.200.33:7".parse().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"hello subnet").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello subnet");
    // UDP on any port of the /24, answered from the address and port hit.
    let u = UdpSocket::bind("198.19.255.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let to: SocketAddr = "198.18.5.77:4242".parse().unwrap();
    u.send_to(b"ping", to).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = u.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"ping"[..], to));
}

/// A persistent TAP `tap` in a namespace of this thread, the kernel side configured and
/// 198.18.0.0/16 routed to it, and the example `name` started on it (a child process, so in
/// this namespace too) with the stack owning 198.18.0.0/16 and these `--bind`s.
fn run_in_namespace(tap: &str, name: &str, binds: &[&str]) -> Child {
    run_on(Backend::Tap, tap, name, binds)
}

/// Like `run_in_namespace`; with [`Backend::Xdp`] a veth pair instead of the TAP, the kernel's
/// end named `dev` and the example on the other end with `--xdp`.
fn run_on(backend: Backend, dev: &str, name: &str, binds: &[&str]) -> Child {
    netns::enter_private_netns().unwrap();
    let stack_side = netns::veth_stack_side(dev);
    let mut args = vec!["--prefix", "198.18.0.0/16"];
    match backend {
        Backend::Tap => {
            netns::ip(&["tuntap", "add", "mode", "tap", "name", dev]).unwrap();
            args.extend(["--tap", dev]);
        }
        Backend::Xdp => {
            netns::ip(&[
                "link",
                "add",
                &stack_side,
                "type",
                "veth",
                "peer",
                "name",
                dev,
            ])
            .unwrap();
            netns::ethtool_off(dev).unwrap();
            netns::ip(&["link", "set", &stack_side, "up"]).unwrap();
            args.extend(["--xdp", &stack_side]);
        }
    }
    netns::add_kernel_side(dev).unwrap();
    netns::ip(&["route", "add", "198.18.0.0/16", "dev", dev]).unwrap();
    for b in binds {
        args.extend(["--bind", b]);
    }
    Child(
        Command::new(example(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Connects to `to`, retrying while the example starts.
fn connect_when_up(to: SocketAddr) -> TcpStream {
    let t0 = Instant::now();
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => return s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("never came up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl (installed by .ci/run)");
    assert!(out.status.success(), "curl {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_http_example_answers_per_binding_with_keep_alive_and_metrics() {
    if !netns::live("the_http_example_answers_per_binding_with_keep_alive_and_metrics") {
        return;
    }
    let _child = run_in_namespace(
        "sst-http",
        "http",
        &["tcp:198.18.0.0/16:80", "tcp:198.18.5.0/24:80"],
    );
    drop(connect_when_up("198.18.1.1:80".parse().unwrap()));
    let wide = curl(&["http://198.18.200.1/"]);
    assert!(wide.starts_with("binding tcp:198.18.0.0/16:80"), "{wide}");
    let nested = curl(&["http://198.18.5.5/"]);
    assert!(
        nested.starts_with("binding tcp:198.18.5.0/24:80"),
        "{nested}"
    );
    assert!(nested.contains("local 198.18.5.5:80"), "{nested}");
    let size = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "http://198.18.5.6/big?bytes=3000000",
    ]);
    assert_eq!(size, "3000000");
    // Keep-alive: two requests on one connection, both answered.
    let mut s = connect_when_up("198.18.5.7:80".parse().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut both = String::new();
    s.read_to_string(&mut both).unwrap();
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    let metrics = curl(&["http://198.18.5.8/metrics"]);
    assert!(
        metrics.contains(
            "subnetstack_listener_accepted_total{proto=\"tcp\",binding=\"198.18.5.0/24:80\""
        ),
        "{metrics}"
    );
    assert!(curl(&["http://198.18.5.9/stats"]).contains("<table"));
}

#[test]
fn the_proxy_example_relays_a_thousand_connections_to_a_kernel_upstream() {
    if !netns::live("the_proxy_example_relays_a_thousand_connections_to_a_kernel_upstream") {
        return;
    }
    netns::enter_private_netns().unwrap();
    netns::ip(&["tuntap", "add", "mode", "tap", "name", "sst-proxy"]).unwrap();
    netns::add_kernel_side("sst-proxy").unwrap();
    netns::ip(&["route", "add", "198.18.0.0/16", "dev", "sst-proxy"]).unwrap();
    // The upstream: a kernel echo server that prefixes what it returns.
    let upstream = std::net::TcpListener::bind((netns::KERNEL_V4, 9000)).unwrap();
    std::thread::spawn(move || {
        for c in upstream.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = c.read_to_end(&mut got);
                let _ = c.write_all(b"upstream:");
                let _ = c.write_all(&got);
            });
        }
    });
    let _child = Child(
        Command::new(example("proxy"))
            .args([
                "--tap",
                "sst-proxy",
                "--prefix",
                "198.18.0.0/16",
                "--route",
                "198.18.0.0/16:80=198.19.255.1:9000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    drop(connect_when_up("198.18.1.1:80".parse().unwrap()));
    // 1,000 connections from 10 threads, each to another address, each with its own payload.
    let workers: Vec<_> = (0..10u32)
        .map(|w| {
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let to = SocketAddr::from((
                        [198, 18, (w * 7 + i) as u8 % 250 + 1, (i % 250 + 2) as u8],
                        80,
                    ));
                    let payload: Vec<u8> = (0..2000 + w * 100 + i)
                        .map(|k| (k * 31 + w + i) as u8)
                        .collect();
                    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("{to}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.write_all(&payload).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut back = Vec::new();
                    s.read_to_end(&mut back)
                        .unwrap_or_else(|e| panic!("{to}: {e}"));
                    let mut want = b"upstream:".to_vec();
                    want.extend_from_slice(&payload);
                    assert!(
                        back == want,
                        "{to}: {} bytes back, {} expected",
                        back.len(),
                        want.len()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}
