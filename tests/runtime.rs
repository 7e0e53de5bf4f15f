//! The runtime and its handles, end to end: two runtimes joined by a memory pair (no root
//! needed), each with its own prefix, talking through `TcpListener`/`TcpStream`/`UdpSocket`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::{addr, listen7, two};
use subnetstack::demux::{PortSpec, Protocol};
use subnetstack::{TcpListener, TcpStream, UdpSocket};

#[test]
fn a_stream_echoes_a_mebibyte_with_half_close_and_knows_both_addresses() {
    let (srv, cli) = two();
    let l = listen7(&srv);
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
        (local, peer, l)
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
    let (local, peer, _listener) = server.join().unwrap();
    // Per-binding counters, and their Prometheus rendering.
    let snap = srv.snapshot().unwrap();
    let l = &snap.tcp[0];
    assert_eq!(l.binding, "198.18.1.0/24:7");
    assert_eq!((l.stats.syns, l.stats.accepted), (1, 1));
    assert_eq!((l.stats.bytes_in, l.stats.bytes_out), (1 << 20, 1 << 20));
    let text = snap.prometheus();
    let line = format!(
        "subnetstack_listener_bytes_in_total{{proto=\"tcp\",binding=\"198.18.1.0/24:7\",listener=\"{}\"}} 1048576",
        l.listener
    );
    assert!(text.contains(&line), "{text}");
    assert!(text.contains("# TYPE subnetstack_listener_active gauge"));
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
fn in_loop_logic_serves_without_leaving_the_poll_thread() {
    use std::sync::Arc;
    use subnetstack::ifaces::mem::{pair, LinkConfig};
    use subnetstack::ifaces::SystemClock;
    use subnetstack::stack::{Stack, TcpHandle, TcpListenerHandle};
    use subnetstack::Runtime;
    let (a, b) = pair(LinkConfig::default(), Arc::new(SystemClock::new()));
    // An echo written against the stack itself, running on the server's poll thread.
    let mut listener: Option<TcpListenerHandle> = None;
    let mut conns: Vec<TcpHandle> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let echo = move |s: &mut Stack, now| {
        let l = *listener.get_or_insert_with(|| {
            s.tcp_listen(
                "198.18.1.0/24".parse().unwrap(),
                PortSpec::exact(7).unwrap(),
                false,
                64,
            )
            .unwrap()
        });
        let mut work = false;
        while let Some((h, _, _)) = s.tcp_accept(l) {
            conns.push(h);
            work = true;
        }
        conns.retain(|&h| match s.tcp_recv(now, h, &mut buf) {
            Ok(0) => {
                s.tcp_close(now, h);
                false
            }
            Ok(n) => {
                work = true;
                // The peer reads everything back; the send buffer takes this much.
                assert_eq!(s.tcp_send(now, h, &buf[..n]), Ok(n));
                true
            }
            Err(_) => s.tcp_error(h).is_none(),
        });
        work
    };
    let srv = Runtime::builder()
        .device(Box::new(a))
        .prefix("198.18.1.0/24".parse().unwrap())
        .in_loop(echo)
        .start()
        .unwrap();
    let cli = Runtime::builder()
        .device(Box::new(b))
        .prefix("198.18.2.0/24".parse().unwrap())
        .start()
        .unwrap();
    let mut c = loop {
        match TcpStream::connect_from(&cli, addr("198.18.2.3:0"), addr("198.18.1.9:7")) {
            Ok(c) => break c,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    c.write_all(b"round trip on the poll thread").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    c.read_to_string(&mut back).unwrap();
    assert_eq!(back, "round trip on the poll thread");
    drop(srv);
}
