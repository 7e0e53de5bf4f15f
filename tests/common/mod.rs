//! Helpers of the facade's tests: two runtimes joined by a memory pair.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use subnetstack::demux::{HashKey, PortSpec};
use subnetstack::ifaces::mem::{pair, LinkConfig};
use subnetstack::ifaces::SystemClock;
use subnetstack::{Runtime, TcpListener};

/// A server runtime owning 198.18.1.0/24 and a client runtime owning 198.18.2.0/24, on one link.
pub fn two() -> (Runtime, Runtime) {
    let (a, b) = pair(LinkConfig::default(), Arc::new(SystemClock::new()));
    let start = |dev, net: &str, k| {
        Runtime::builder()
            .device(Box::new(dev))
            .prefix(net.parse().unwrap())
            .hash_key(HashKey([k; 16]))
            .shutdown_grace(Duration::from_millis(300))
            .start()
            .unwrap()
    };
    (start(a, "198.18.1.0/24", 1), start(b, "198.18.2.0/24", 2))
}

/// A socket address literal.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A listener on the server runtime's 198.18.1.0/24, port 7.
pub fn listen7(srv: &Runtime) -> TcpListener {
    TcpListener::bind(
        srv,
        "198.18.1.0/24".parse().unwrap(),
        PortSpec::exact(7).unwrap(),
    )
    .unwrap()
}
