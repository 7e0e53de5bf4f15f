//! Live tests against the Linux kernel over TAP, each in its own network namespace (the test's
//! thread enters it). They skip with a printed reason without root or /dev/net/tun, and fail
//! instead when SUBNETSTACK_REQUIRE_LIVE is set (CI).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smoltcp::wire::{TcpControl, TcpRepr};
use subnetstack_ifaces::netns::{self, ip, TapEnvConfig};
use subnetstack_ifaces::tap::{Tap, TapConfig};
use subnetstack_ifaces::{Batch, Csum, Device, FrameMeta, Gso, GsoKind};
use subnetstack_testkit::*;

fn in_prefix(a: Ipv4Addr, net: &str) -> bool {
    let n: ipnet::Ipv4Net = net.parse().unwrap();
    n.contains(&a)
}

#[test]
fn kernel_ping_is_answered_through_tap() {
    if !netns::live("kernel_ping_is_answered_through_tap") {
        return;
    }
    let env = netns::tap_env(&TapEnvConfig::new("sst-ping", &["198.18.1.0/24"])).unwrap();
    let mut tap = env.queues.into_iter().next().unwrap();
    let mac = tap.info().mac;
    let mut ping = Command::new("ping")
        .args(["-c3", "-i0.2", "-W2", "198.18.1.7"])
        .stdout(Stdio::null())
        .spawn()
        .expect("ping (iputils-ping) is installed");
    let mut batch = Batch::new(32, tap.info().max_frame());
    let (mut arp, mut echo) = (0, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = ping.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(15) {
            ping.kill().unwrap();
            panic!("ping did not finish; arp {arp}, echo {echo}");
        }
        wait_readable(tap.poll_fd().unwrap(), Duration::from_millis(50));
        batch.clear();
        tap.recv(&mut batch).unwrap();
        let mut out = Batch::new(32, 2048);
        for f in batch.frames() {
            if let Some(r) = arp_reply(f.data(), mac, |a| in_prefix(a, "198.18.1.0/24")) {
                arp += 1;
                out.push(&r, FrameMeta::default());
            } else if let Some(r) = echo_reply(f.data(), mac) {
                echo += 1;
                out.push(&r, FrameMeta::default());
            }
        }
        assert_eq!(tap.send(out.frames()).unwrap(), out.len());
    };
    assert!(status.success(), "ping failed: arp {arp}, echo {echo}");
    assert!(arp >= 1, "the kernel resolved the on-link address with ARP");
    assert_eq!(echo, 3);
    assert_eq!(tap.stats().rx_drop_truncated, 0);
}

#[test]
fn multi_queue_spreads_flows_over_queues() {
    if !netns::live("multi_queue_spreads_flows_over_queues") {
        return;
    }
    let mut cfg = TapEnvConfig::new("sst-mq", &["198.18.1.0/24"]);
    cfg.tap.queues = 2;
    let env = netns::tap_env(&cfg).unwrap();
    let mac = env.queues[0].info().mac;
    netns::static_neighbor(&env.name, "198.18.1.2".parse().unwrap(), mac).unwrap();
    let mut queues = env.queues;
    assert_eq!(queues.len(), 2);
    const FLOWS: u16 = 64;
    const PER_FLOW: usize = 10;
    for i in 0..FLOWS {
        let s = UdpSocket::bind(SocketAddr::from((netns::KERNEL_V4, 20000 + i))).unwrap();
        for _ in 0..PER_FLOW {
            s.send_to(b"spread", "198.18.1.2:9").unwrap();
        }
    }
    let mut per_queue = [0usize; 2];
    let mut batch = Batch::new(64, 2048);
    let start = Instant::now();
    while per_queue.iter().sum::<usize>() < usize::from(FLOWS) * PER_FLOW
        && start.elapsed() < Duration::from_secs(5)
    {
        for (q, tap) in queues.iter_mut().enumerate() {
            batch.clear();
            tap.recv(&mut batch).unwrap();
            per_queue[q] += batch
                .frames()
                .iter()
                .filter(|f| {
                    ipv4(f.data())
                        .is_some_and(|(ip, _, _)| ip.dst_addr == Ipv4Addr::new(198, 18, 1, 2))
                })
                .count();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("frames per queue: {per_queue:?}");
    // A frame of exactly MTU + 14 bytes fits a buffer of that size (and is not mistaken for a
    // truncated one); a larger one into a smaller buffer is dropped and counted.
    let s = UdpSocket::bind(SocketAddr::from((netns::KERNEL_V4, 21000))).unwrap();
    // Reads every queue until a frame arrives or 3 s pass; returns the lengths received.
    let mut read_all = |cap: usize| {
        let mut b = Batch::new(8, cap);
        let start = Instant::now();
        let mut lens = Vec::new();
        while lens.is_empty() && start.elapsed() < Duration::from_secs(3) {
            for tap in queues.iter_mut() {
                b.clear();
                tap.recv(&mut b).unwrap();
                lens.extend(b.frames().iter().map(|f| (f.len(), f.data()[42])));
            }
            if queues
                .iter()
                .map(|t| t.stats().rx_drop_truncated)
                .sum::<u64>()
                > 0
            {
                break;
            }
        }
        lens
    };
    s.send_to(&[0x42; 1472], "198.18.1.2:9").unwrap();
    assert_eq!(
        read_all(1514),
        vec![(1514, 0x42)],
        "a 1514-byte frame arrives whole in a 1514-byte buffer"
    );
    s.send_to(&[0x43; 1472], "198.18.1.2:9").unwrap();
    assert!(read_all(1000).is_empty());
    assert_eq!(
        queues
            .iter()
            .map(|t| t.stats().rx_drop_truncated)
            .sum::<u64>(),
        1,
        "a frame larger than the buffer is a counted drop"
    );
    assert_eq!(
        per_queue.iter().sum::<usize>(),
        usize::from(FLOWS) * PER_FLOW
    );
    assert!(
        per_queue[0] > 0 && per_queue[1] > 0,
        "both queues receive: {per_queue:?}"
    );
}

#[test]
fn offload_receives_kernel_tso_super_frames() {
    if !netns::live("offload_receives_kernel_tso_super_frames") {
        return;
    }
    let mut cfg = TapEnvConfig::new("sst-gro", &["198.18.1.0/24"]);
    cfg.tap.offload = true;
    let env = netns::tap_env(&cfg).unwrap();
    let mut tap = env.queues.into_iter().next().unwrap();
    let mac = tap.info().mac;
    let mtu = tap.info().mtu;
    netns::static_neighbor(&env.name, "198.18.1.9".parse().unwrap(), mac).unwrap();
    let sender = std::thread::spawn(|| {
        let mut s =
            TcpStream::connect_timeout(&"198.18.1.9:5000".parse().unwrap(), Duration::from_secs(5))
                .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&vec![7u8; 256 * 1024]);
    });
    let mut batch = Batch::new(16, tap.info().max_frame());
    let mut big = None;
    let mut peer = None;
    let start = Instant::now();
    while big.is_none() && start.elapsed() < Duration::from_secs(10) {
        wait_readable(tap.poll_fd().unwrap(), Duration::from_millis(50));
        batch.clear();
        tap.recv(&mut batch).unwrap();
        let mut out = Batch::new(4, 256);
        for f in batch.frames() {
            let Some(seg) = tcp4(f.data()) else { continue };
            if seg.dport != 5000 {
                continue;
            }
            if seg.syn {
                let synack = TcpRepr {
                    window_scale: Some(7),
                    max_seg_size: Some(1460),
                    ..tcp_repr(
                        5000,
                        seg.sport,
                        TcpControl::Syn,
                        5000,
                        Some(seg.seq + 1),
                        65535,
                        &[],
                    )
                };
                out.push(
                    &tcp4_frame(mac, seg.peer_mac, seg.dst, seg.src, &synack),
                    FrameMeta::default(),
                );
                peer = Some(seg.clone());
            } else if f.len() > mtu + 14 {
                big = Some((f.len(), f.meta));
            }
        }
        tap.send(out.frames()).unwrap();
    }
    let (len, meta) = big.expect("a TSO super-frame arrived");
    println!("super-frame of {len} bytes, {meta:?}");
    let gso = meta.gso.expect("super-frames carry GSO metadata");
    assert_eq!(gso.kind, GsoKind::Tcp4);
    assert_eq!(gso.size, 1460, "segment size is the MSS we advertised");
    assert!(
        matches!(
            meta.csum,
            Csum::Partial {
                start: 34,
                offset: 16
            }
        ),
        "{meta:?}"
    );
    // Reset the connection so that the sender thread ends now.
    let p = peer.unwrap();
    let rst = tcp_repr(5000, p.sport, TcpControl::Rst, 5001, None, 0, &[]);
    let mut out = Batch::new(1, 256);
    out.push(
        &tcp4_frame(mac, p.peer_mac, p.dst, p.src, &rst),
        FrameMeta::default(),
    );
    tap.send(out.frames()).unwrap();
    sender.join().unwrap();
}

/// Ones' complement sum of the IPv4 pseudo-header, not inverted: what a partial checksum field holds.
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u16 {
    let mut sum: u32 = 0;
    for w in [src.octets(), dst.octets()] {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    sum += u32::from(proto) + len as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn offload_transmits_tso_super_frames_that_the_kernel_segments() {
    if !netns::live("offload_transmits_tso_super_frames_that_the_kernel_segments") {
        return;
    }
    // A: the offloading TAP we write a 60 KB segment into. B: a plain TAP the kernel forwards the
    // resulting segments out of, where we read them back.
    let mut cfg = TapEnvConfig::new("sst-tso-a", &["198.18.1.0/24"]);
    cfg.tap.offload = true;
    let env = netns::tap_env(&cfg).unwrap();
    let mut a = env.queues.into_iter().next().unwrap();
    let mut b = Tap::open(&TapConfig::new("sst-tso-b")).unwrap().remove(0);
    ip(&["link", "set", "sst-tso-b", "up"]).unwrap();
    ip(&["addr", "add", "198.18.200.1/24", "dev", "sst-tso-b"]).unwrap();
    netns::static_neighbor("sst-tso-b", "198.18.200.2".parse().unwrap(), b.info().mac).unwrap();
    netns::run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();

    const MSS: usize = 1448;
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (src, dst) = (Ipv4Addr::new(198, 18, 1, 9), Ipv4Addr::new(198, 18, 200, 2));
    let repr = tcp_repr(40000, 5001, TcpControl::Psh, 1000, Some(1), 1000, &payload);
    let mut frame = tcp4_frame(a.info().mac, env.kernel_mac, src, dst, &repr);
    // Partial checksum, as a TSO sender hands it over: the pseudo-header sum only.
    let sum = pseudo_header_sum(src, dst, 6, 20 + payload.len());
    frame[34 + 16..34 + 18].copy_from_slice(&sum.to_be_bytes());
    let meta = FrameMeta {
        gso: Some(Gso {
            kind: GsoKind::Tcp4,
            size: MSS as u16,
            hdr_len: 54,
        }),
        csum: Csum::Partial {
            start: 34,
            offset: 16,
        },
    };
    let mut out = Batch::new(1, frame.len());
    assert!(out.push(&frame, meta));
    assert_eq!(a.send(out.frames()).unwrap(), 1);
    assert_eq!(a.stats().tx_errors, 0);

    let mut got: Vec<Seg> = Vec::new();
    let mut batch = Batch::new(64, b.info().max_frame());
    let start = Instant::now();
    while got.iter().map(|s| s.payload.len()).sum::<usize>() < payload.len()
        && start.elapsed() < Duration::from_secs(5)
    {
        wait_readable(b.poll_fd().unwrap(), Duration::from_millis(50));
        batch.clear();
        b.recv(&mut batch).unwrap();
        for f in batch.frames() {
            assert!(f.len() <= 1514, "segmented to the MTU");
            if let Some(s) = tcp4(f.data()).filter(|s| s.dport == 5001) {
                // Every segment's checksum is complete and right.
                let (_, l4, _) = ipv4(f.data()).unwrap();
                let p = smoltcp::wire::TcpPacket::new_checked(l4).unwrap();
                assert!(
                    p.verify_checksum(&s.src.into(), &s.dst.into()),
                    "segment checksum"
                );
                got.push(s);
            }
        }
    }
    assert_eq!(got.len(), payload.len().div_ceil(MSS));
    let mut joined = Vec::new();
    for (i, s) in got.iter().enumerate() {
        assert_eq!(s.seq, 1000 + (i * MSS) as i32);
        assert_eq!(s.ttl, 63, "forwarded once");
        joined.extend_from_slice(&s.payload);
    }
    assert!(joined == payload, "payload survives segmentation");
}

#[test]
fn nft_loss_helper_drops_kernel_tcp_only() {
    if !netns::live("nft_loss_helper_drops_kernel_tcp_only") {
        return;
    }
    let env = netns::tap_env(&TapEnvConfig::new("sst-nft", &["198.18.1.0/24"])).unwrap();
    let mut tap = env.queues.into_iter().next().unwrap();
    netns::static_neighbor(&env.name, "198.18.1.3".parse().unwrap(), tap.info().mac).unwrap();
    netns::nft_loss(&env.name, netns::Hook::Egress, 100).expect("nft (nftables) is installed");
    // Count what reaches the TAP from one TCP connect attempt and one UDP datagram.
    let probe = |tap: &mut Tap| {
        let c = std::thread::spawn(|| {
            TcpStream::connect_timeout(
                &"198.18.1.3:80".parse().unwrap(),
                Duration::from_millis(300),
            )
        });
        UdpSocket::bind("198.19.255.1:0")
            .unwrap()
            .send_to(b"x", "198.18.1.3:53")
            .unwrap();
        let _ = c.join();
        let mut batch = Batch::new(64, 2048);
        tap.recv(&mut batch).unwrap();
        let tcp = batch
            .frames()
            .iter()
            .filter(|f| tcp4(f.data()).is_some())
            .count();
        let udp = batch
            .frames()
            .iter()
            .filter(|f| {
                ipv4(f.data())
                    .is_some_and(|(ip, _, _)| ip.next_header == smoltcp::wire::IpProtocol::Udp)
            })
            .count();
        (tcp, udp)
    };
    let (tcp, udp) = probe(&mut tap);
    assert_eq!(
        (tcp, udp),
        (0, 1),
        "all TCP dropped at egress, UDP untouched"
    );
    netns::nft_loss_clear().unwrap();
    let (tcp, _) = probe(&mut tap);
    assert!(tcp >= 1, "SYNs pass once the rule is gone");
}
