//! One poll thread per queue, on a TAP and on AF_XDP: kernel clients spread over two queues are
//! all served, both shards carry traffic, and connections the runtime opens get their answers
//! (on a TAP the kernel keeps a flow on the queue it was last written from; on a veth the answer
//! may arrive on the other queue, and the runtime passes it to the shard that owns the flow).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as KernelStream};
use std::time::Duration;

use subnetstack::demux::PortSpec;
use subnetstack::ifaces::netns::{self, Backend, TapEnvConfig};
use subnetstack::{ListenOptions, Runtime, TcpListener, TcpStream};

#[test]
fn two_queues_two_shards_serve_and_dial() {
    if netns::live_on("two_queues_two_shards_serve_and_dial", Backend::Tap) {
        two_queues(Backend::Tap);
    }
}

#[test]
fn two_queues_two_shards_serve_and_dial_over_af_xdp() {
    if netns::live_on(
        "two_queues_two_shards_serve_and_dial_over_af_xdp",
        Backend::Xdp,
    ) {
        two_queues(Backend::Xdp);
    }
}

fn two_queues(backend: Backend) {
    let mut cfg = TapEnvConfig::new("sst-mq", &["198.18.0.0/16"]);
    cfg.tap.queues = 2;
    cfg.via_gateway = true;
    let env = netns::link_env(backend, &cfg).unwrap();
    assert_eq!(env.queues.len(), 2);
    let mut b = Runtime::builder()
        .prefix("198.18.0.0/16".parse().unwrap())
        .prefix("198.19.255.2/32".parse().unwrap())
        .gateway_v4(netns::KERNEL_V4);
    for q in env.queues {
        b = b.device(q);
    }
    let rt = b.start().unwrap();
    assert_eq!(rt.shards(), 2);
    let opts = ListenOptions {
        backlog: 512,
        ..Default::default()
    };
    let l = TcpListener::bind_with(
        &rt,
        "198.18.0.0/16".parse().unwrap(),
        PortSpec::exact(80).unwrap(),
        opts,
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        while let Ok((mut s, local, _)) = l.accept() {
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                if let Ok(n) = s.read(&mut b) {
                    let _ = s.write_all(&b[..n]);
                    let _ = write!(s, " via {local}");
                }
            });
        }
    });
    // 400 kernel clients from as many source ports, to 400 addresses.
    let clients: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..100u8 {
                    let to = SocketAddr::from(([198, 18, 10 + t, i + 1], 80));
                    let mut c = KernelStream::connect_timeout(&to, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("{to}: {e}"));
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    c.write_all(b"hi").unwrap();
                    let mut got = String::new();
                    c.read_to_string(&mut got)
                        .unwrap_or_else(|e| panic!("{to}: {e}"));
                    assert_eq!(got, format!("hi via {to}"));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // The runtime dials a kernel listener 40 times, round robin over its shards.
    let kl = std::net::TcpListener::bind((netns::KERNEL_V4, 9100)).unwrap();
    let kserver = std::thread::spawn(move || {
        for _ in 0..40 {
            let (mut c, _) = kl.accept().unwrap();
            let mut b = Vec::new();
            c.read_to_end(&mut b).unwrap();
            c.write_all(&b).unwrap();
        }
    });
    for i in 0..40u8 {
        let local = SocketAddr::from(([198, 18, 99, i + 1], 0));
        let mut s = TcpStream::connect_from_timeout(
            &rt,
            local,
            SocketAddr::from((netns::KERNEL_V4, 9100)),
            Some(Duration::from_secs(5)),
        )
        .unwrap_or_else(|e| panic!("dial from {local}: {e}"));
        s.write_all(b"dial").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"dial");
    }
    kserver.join().unwrap();
    let snap = rt.snapshot().unwrap();
    assert_eq!(snap.tcp[0].stats.accepted, 400, "summed over shards");
    println!("frames passed between shards: {}", snap.shard_handoffs);
    let stacks = rt.shutdown();
    let rx: Vec<u64> = stacks.iter().map(|s| s.counters().rx_frames).collect();
    println!("frames received per shard: {rx:?}");
    assert!(
        rx.iter().all(|&n| n > 100),
        "both queues carried traffic: {rx:?}"
    );
    drop(server);
}
