//! The stack against the Linux kernel over a TAP, each test in its own network namespace. The
//! stack runs on a thread of the namespace; the kernel's `ping` and sockets are the peers.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{addresses, recv_from, Running};
use ipnet::IpNet;
use subnetstack_demux::PortSpec;
use subnetstack_ifaces::netns::{self, Backend, TapEnvConfig};
use subnetstack_ifaces::Device;
use subnetstack_stack::Stack;

/// Pings each address once (25 at a time); returns which answered.
fn ping_all(addrs: &[IpAddr], wait_s: u32) -> Vec<bool> {
    let mut ok = Vec::new();
    for chunk in addrs.chunks(25) {
        let kids: Vec<_> = chunk
            .iter()
            .map(|a| {
                let fam = if a.is_ipv6() { "-6" } else { "-4" };
                Command::new("ping")
                    .args([fam, "-c1", "-q", &format!("-W{wait_s}"), &a.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("ping (iputils-ping) is installed")
            })
            .collect();
        ok.extend(kids.into_iter().map(|mut k| k.wait().unwrap().success()));
    }
    ok
}

fn env(backend: Backend, name: &str) -> netns::LinkEnv {
    // On-link routes wider than the local prefixes, so that the kernel also asks about addresses
    // the stack must not answer for (over AF_XDP, the program passes those to the kernel).
    let mut cfg = TapEnvConfig::new(name, &["198.18.0.0/16", "2001:db8::/32"]);
    cfg.local = common::LOCAL.iter().map(|p| p.parse().unwrap()).collect();
    let env = netns::link_env(backend, &cfg).unwrap();
    if let Some(x) = &env.xdp {
        println!("{}", x.describe());
    }
    println!("device: {}", env.queues[0].info().name);
    env
}

backends!(
    kernel_pings_every_local_address_and_no_other,
    udp_servers_answer_from_the_address_hit_and_unbound_ports_refuse
);

fn kernel_pings_every_local_address_and_no_other(backend: Backend) {
    let env = env(backend, "sst-ping");
    let dev = env.name.clone();
    let tap = env.queues.into_iter().next().unwrap();
    let mac = tap.info().mac;
    let run = Running::start(tap, |_| Box::new(|_, _| {}));

    let mut inside = addresses("198.18.1.0/24", 60, 1);
    inside.extend(addresses("198.18.2.0/23", 80, 2));
    inside.extend(addresses("2001:db8:100::/48", 60, 3));
    let mut outside = addresses("198.18.4.0/24", 10, 4);
    outside.extend(addresses("2001:db8:200::/48", 10, 5));
    assert_eq!(inside.len(), 200);

    let answered = ping_all(&inside, 2);
    let missing: Vec<_> = inside
        .iter()
        .zip(&answered)
        .filter(|(_, ok)| !**ok)
        .map(|(a, _)| a)
        .collect();
    assert!(missing.is_empty(), "no echo reply from {missing:?}");
    let answered = ping_all(&outside, 1);
    assert!(
        answered.iter().all(|ok| !ok),
        "an address outside the prefixes answered"
    );

    // The kernel learned the stack's MAC for every address it pinged...
    let mac_s = mac.map(|b| format!("{b:02x}")).join(":");
    let table = String::from_utf8(
        Command::new("ip")
            .args(["neigh", "show", "dev", &dev])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for a in &inside {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&a.to_string()));
        assert!(line.is_some_and(|l| l.contains(&mac_s)), "{a}: {line:?}");
    }
    // ...and no outside address resolved.
    for a in &outside {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&a.to_string()));
        assert!(line.is_none_or(|l| !l.contains("lladdr")), "{a}: {line:?}");
    }
    let stack = run.stop();
    println!(
        "stack: {} ; neighbour entries {}",
        stack.counters(),
        stack.neighbor_entries()
    );
    assert_eq!(stack.counters().echo_replies, 200);
    // Per-address state: none. The cache holds only the kernel's own addresses.
    assert!(
        stack.neighbor_entries() <= 3,
        "{}",
        stack.neighbor_entries()
    );
}

fn udp_servers_answer_from_the_address_hit_and_unbound_ports_refuse(backend: Backend) {
    let env = env(backend, "sst-udp");
    let tap = env.queues.into_iter().next().unwrap();
    let run = Running::start(tap, |s| {
        let bind = |s: &mut Stack, p: &str| {
            s.udp_bind(p.parse().unwrap(), PortSpec::exact(7).unwrap(), false)
                .unwrap()
        };
        let servers = vec![
            (bind(s, "198.18.2.0/23"), "A"),
            (bind(s, "198.18.3.0/24"), "B"),
            (bind(s, "2001:db8:100::/48"), "C"),
        ];
        Box::new(move |s: &mut Stack, now| {
            for &(h, tag) in &servers {
                while let Some(d) = s.udp_recv(h) {
                    let mut reply = format!("{tag}:").into_bytes();
                    reply.extend_from_slice(&d.payload);
                    s.udp_send(now, h, d.dst, d.src, &reply).unwrap();
                }
            }
        })
    });

    let v4 = UdpSocket::bind((netns::KERNEL_V4, 0)).unwrap();
    let v6 = UdpSocket::bind((netns::KERNEL_V6, 0)).unwrap();
    for s in [&v4, &v6] {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    }
    let narrow: IpNet = "198.18.3.0/24".parse().unwrap();
    let mut targets = addresses("198.18.2.0/23", 100, 7);
    targets.extend(addresses("2001:db8:100::/48", 50, 8));
    let mut buf = [0u8; 1500];
    for (i, a) in targets.iter().enumerate() {
        let sock = if a.is_ipv4() { &v4 } else { &v6 };
        let msg = format!("hello {i}");
        sock.send_to(msg.as_bytes(), SocketAddr::new(*a, 7))
            .unwrap();
        let (n, from) =
            recv_from(sock, &mut buf).unwrap_or_else(|e| panic!("no reply from {a}: {e}"));
        assert_eq!(
            from,
            SocketAddr::new(*a, 7),
            "the reply comes from the address targeted"
        );
        let tag = match a {
            IpAddr::V6(_) => "C",
            _ if narrow.contains(a) => "B",
            _ => "A",
        };
        assert_eq!(
            &buf[..n],
            format!("{tag}:{msg}").as_bytes(),
            "{a} is served by {tag}"
        );
    }

    // A connected socket to a port nobody bound gets ECONNREFUSED (the ICMP error arrived).
    for (local, remote) in [
        (SocketAddr::from((netns::KERNEL_V4, 0)), "198.18.2.5:9"),
        (
            SocketAddr::from((netns::KERNEL_V6, 0)),
            "[2001:db8:100::5]:9",
        ),
    ] {
        let c = UdpSocket::bind(local).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.connect(remote).unwrap();
        c.send(b"anyone?").unwrap();
        let e = recv_from(&c, &mut buf).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{remote}: {e}"
        );
    }
    let stack = run.stop();
    println!("stack: {}", stack.counters());
    assert_eq!(stack.counters().udp_delivered, 150);
    assert_eq!(
        stack
            .counters()
            .dropped(subnetstack_stack::DropReason::UdpNoBinding),
        2
    );
}
