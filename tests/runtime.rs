//! The runtime and its handles, end to end: two runtimes joined by a memory pair (no root
//! needed), each with its own prefix, talking through `TcpListener`/`TcpStream`/`UdpSocket`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subnetstack::demux::{HashKey, PortSpec, Protocol};
use subnetstack::ifaces::mem::{pair, LinkConfig};
use subnetstack::ifaces::SystemClock;
use subnetstack::{Runtime, TcpListener, TcpStream, UdpSocket};

/// A server runtime owning 198.18.1.0/24 and a client runtime owning 198.18.2.0/24, on one link.
fn two() -> (Runtime, Runtime) {
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

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_stream_echoes_a_mebibyte_with_half_close_and_knows_both_addresses() {
    let (srv, cli) = two();
    let l = TcpListener::bind(
        &srv,
        "198.18.1.0/24".parse().unwrap(),
        PortSpec::exact(7).unwrap(),
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, local, peer) = l.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
        s.flush().unwrap();
        (local, peer)
    });
    let mut c = TcpStream::connect_from(&cli, addr("198.18.2.5:0"), addr("198.18.1.77:7")).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut w = c.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        w
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    drop(writer.join().unwrap());
    assert!(back == data, "{} bytes back", back.len());
    let (local, peer) = server.join().unwrap();
    assert_eq!(
        local,
        addr("198.18.1.77:7"),
        "the address the client targeted"
    );
    assert_eq!(peer.ip(), addr("198.18.2.5:0").ip());
    assert_eq!(c.local_addr().unwrap().port(), peer.port());
}

#[test]
fn udp_answers_from_the_address_the_datagram_was_sent_to() {
    let (srv, cli) = two();
    let s = UdpSocket::bind(
        &srv,
        "198.18.1.0/24".parse().unwrap(),
        PortSpec::exact(53).unwrap(),
        false,
    )
    .unwrap();
    let c = UdpSocket::bind(
        &cli,
        "198.18.2.0/24".parse().unwrap(),
        PortSpec::exact(5353).unwrap(),
        false,
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let (n, src, dst) = s.recv_from(&mut buf).unwrap();
        s.send_from(&buf[..n], dst, src).unwrap();
        dst
    });
    c.send_from(b"query", addr("198.18.2.9:5353"), addr("198.18.1.42:53"))
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, src, dst) = c.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"query");
    assert_eq!(src, addr("198.18.1.42:53"), "answered from the address hit");
    assert_eq!(dst, addr("198.18.2.9:5353"));
    assert_eq!(server.join().unwrap(), addr("198.18.1.42:53"));
}

#[test]
fn errors_are_typed() {
    let (srv, cli) = two();
    let net = "198.18.1.0/24".parse().unwrap();
    let _l = TcpListener::bind(&srv, net, PortSpec::exact(80).unwrap()).unwrap();
    let e = TcpListener::bind(&srv, net, PortSpec::exact(80).unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse);
    assert!(
        e.to_string().contains("198.18.1.0/24"),
        "names the conflicting binding: {e}"
    );
    let e = TcpStream::connect_from(&cli, addr("198.18.9.1:0"), addr("198.18.1.1:80")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrNotAvailable, "{e}");
    let e = TcpStream::connect_from(&cli, addr("198.18.2.1:0"), addr("198.18.1.1:81")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let mut c = TcpStream::connect_from(&cli, addr("198.18.2.1:0"), addr("198.18.1.1:80")).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
    let why = srv
        .explain(
            Protocol::Tcp,
            addr("198.18.2.1:4000"),
            addr("198.18.1.1:80"),
        )
        .unwrap();
    assert!(why.contains("198.18.1.0/24"), "{why}");
}

#[test]
fn an_idle_runtime_sleeps_and_shutdown_ends_its_handles() {
    let (srv, cli) = two();
    let l = TcpListener::bind(&srv, "198.18.1.0/24".parse().unwrap(), PortSpec::Any).unwrap();
    let mut c = TcpStream::connect_from(&cli, addr("198.18.2.1:0"), addr("198.18.1.1:9")).unwrap();
    let (_s, _, _) = l.accept().unwrap();
    // Idle with a connection open: the poll threads sleep.
    let cpu = || {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        Duration::new(u.ru_utime.tv_sec as u64, u.ru_utime.tv_usec as u32 * 1000)
            + Duration::new(u.ru_stime.tv_sec as u64, u.ru_stime.tv_usec as u32 * 1000)
    };
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - c0;
    println!("CPU while idle: {used:?} in {:?}", t0.elapsed());
    assert!(
        used < Duration::from_millis(100),
        "{used:?} of CPU in a second of idling"
    );
    let stack = cli.shutdown();
    assert!(stack.tcp_connections() <= 1);
    let mut b = [0u8; 4];
    assert!(c.read(&mut b).is_err(), "the runtime is gone");
}
