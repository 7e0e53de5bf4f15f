//! The examples, end to end: their `--help`, the demo's self-check, and the echo server against
//! kernel clients in a private namespace. (`cargo test` builds the examples before running
//! this.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use subnetstack::ifaces::netns;

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
    for (name, option) in [("demo", "--serve"), ("echo", "--tap")] {
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
    if !netns::live("the_echo_example_serves_kernel_clients") {
        return;
    }
    // A persistent TAP in a namespace of this thread; the example (a child process, so in this
    // namespace too) attaches to it.
    netns::enter_private_netns().unwrap();
    netns::ip(&["tuntap", "add", "mode", "tap", "name", "sst-echo"]).unwrap();
    netns::add_kernel_side("sst-echo").unwrap();
    netns::ip(&["route", "add", "198.18.0.0/16", "dev", "sst-echo"]).unwrap();
    let _child = Child(
        Command::new(example("echo"))
            .args([
                "--tap",
                "sst-echo",
                "--prefix",
                "198.18.0.0/16",
                "--bind",
                "tcp:198.18.0.0/16:7",
                "--bind",
                "udp:198.18.5.0/24:*",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // TCP: any address of the /16 echoes.
    let to: SocketAddr = "198.18.200.33:7".parse().unwrap();
    let t0 = Instant::now();
    let mut s = loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("echo never came up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
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
