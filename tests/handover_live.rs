//! A listener with connections queued (handshakes done, not accepted) closes: its reuseport
//! sibling serves them. Kernel clients in a private namespace, over a TAP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as KernelStream};
use std::time::Duration;

use subnetstack::demux::PortSpec;
use subnetstack::ifaces::netns::{self, TapEnvConfig};
use subnetstack::{ListenOptions, Runtime, TcpListener};

#[test]
fn queued_connections_of_a_closing_listener_are_served_by_its_sibling() {
    if !netns::live("queued_connections_of_a_closing_listener_are_served_by_its_sibling") {
        return;
    }
    let env = netns::tap_env(&TapEnvConfig::new("sst-hand", &["198.18.0.0/16"])).unwrap();
    let rt = Runtime::builder()
        .device(Box::new(env.queues.into_iter().next().unwrap()))
        .prefix("198.18.0.0/16".parse().unwrap())
        .start()
        .unwrap();
    let opts = ListenOptions {
        reuseport: true,
        backlog: 128,
        ..Default::default()
    };
    let bind = || {
        TcpListener::bind_with(
            &rt,
            "198.18.0.0/16".parse().unwrap(),
            PortSpec::exact(80).unwrap(),
            opts,
        )
        .unwrap()
    };
    let (first, second) = (bind(), bind());
    // 40 clients connect and send; nobody accepts yet.
    let clients: Vec<_> = (0..40u8)
        .map(|i| {
            std::thread::spawn(move || {
                let to = SocketAddr::from(([198, 18, 3, i + 1], 80));
                let mut c = KernelStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c.write_all(b"hello").unwrap();
                let mut got = String::new();
                c.read_to_string(&mut got).map(|_| got)
            })
        })
        .collect();
    // Wait until every handshake is done (the listeners' queues hold them all).
    for _ in 0..200 {
        let accepted: u64 = rt
            .snapshot()
            .unwrap()
            .tcp
            .iter()
            .map(|l| l.stats.accepted)
            .sum();
        if accepted == 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(first);
    // The sibling takes all 40.
    for _ in 0..40 {
        let (mut s, _, _) = second
            .accept_timeout(Some(Duration::from_secs(5)))
            .unwrap()
            .expect("the sibling has every queued connection");
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"served").unwrap();
    }
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), "served");
    }
    let handed = rt.snapshot().unwrap().counters.tcp_handed_over;
    assert!(
        handed > 0,
        "the first listener had connections to hand over"
    );
    println!("handed over: {handed}");
}
