//! The `tokio` feature: async accept, `AsyncRead`/`AsyncWrite`, async connect and UDP, over
//! two runtimes joined by a memory pair.

mod common;

use common::{addr, listen7, two};
use subnetstack::demux::PortSpec;
use subnetstack::{TcpStream, UdpSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_streams_echo_and_half_close() {
    let (srv, cli) = two();
    let l = listen7(&srv);
    let server = tokio::spawn(async move {
        let (mut s, local, _) = l.accept_async().await.unwrap();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
        AsyncWriteExt::shutdown(&mut s).await.unwrap();
        local
    });
    let mut c = TcpStream::connect_from_async(&cli, addr("198.18.2.4:0"), addr("198.18.1.50:7"))
        .await
        .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut w = c.try_clone().unwrap();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d2).await.unwrap();
        AsyncWriteExt::shutdown(&mut w).await.unwrap();
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(back == data, "{} bytes back", back.len());
    assert_eq!(server.await.unwrap(), addr("198.18.1.50:7"));
    // Refused, asynchronously.
    let e = TcpStream::connect_from_async(&cli, addr("198.18.2.4:0"), addr("198.18.1.50:8"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_udp_answers_from_the_address_hit() {
    let (srv, cli) = two();
    let s = UdpSocket::bind(&srv, "198.18.1.0/24".parse().unwrap(), PortSpec::Any, false).unwrap();
    let c = UdpSocket::bind(
        &cli,
        "198.18.2.0/24".parse().unwrap(),
        PortSpec::exact(9).unwrap(),
        false,
    )
    .unwrap();
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let (n, src, dst) = s.recv_from_async(&mut buf).await.unwrap();
        s.send_from_async(&buf[..n], dst, src).await.unwrap();
    });
    c.send_from_async(b"hi", addr("198.18.2.1:9"), addr("198.18.1.200:5353"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, src, _) = c.recv_from_async(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], src), (&b"hi"[..], addr("198.18.1.200:5353")));
    server.await.unwrap();
    let e = c
        .send_from_async(b"x", addr("198.18.9.9:9"), addr("198.18.1.1:1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable);
}
