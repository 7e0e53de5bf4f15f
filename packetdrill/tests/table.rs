//! Drives the exported function table the way packetdrill does: system calls through the
//! table, hand-built IPv4/TCP packets in through `netdev_send`, the stack's packets out
//! through `netdev_receive`, time through `usleep`/`gettimeofday`.

use std::ffi::{c_int, c_ulong, c_void, CString};
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use subnetstack_packetdrill::{packetdrill_interface_init, Adapter, PacketdrillInterface};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const EPOCH_US: i64 = 1_700_000_000_000_000;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A call's result as packetdrill sees it: the value, or -1 and errno.
fn res(r: i64) -> Result<i64, c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

// ---- hand-built packets ----------------------------------------------------------------

fn csum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for c in chunks {
        for pair in c.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment between packetdrill's address and the stack's.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seg {
    src: Option<SocketAddrV4>,
    dst: Option<SocketAddrV4>,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: Vec<u8>,
    payload: Vec<u8>,
}

impl Seg {
    fn new(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Seg {
        Seg {
            src: Some(SocketAddrV4::new(REMOTE, sport)),
            dst: Some(SocketAddrV4::new(LOCAL, dport)),
            seq,
            ack,
            flags,
            win: 65535,
            ..Seg::default()
        }
    }

    fn with_payload(mut self, p: &[u8]) -> Seg {
        self.payload = p.to_vec();
        self
    }

    /// IPv4 + TCP with correct checksums.
    fn build(&self) -> Vec<u8> {
        let (src, dst) = (self.src.unwrap(), self.dst.unwrap());
        let mut opts = self.opts.clone();
        while opts.len() % 4 != 0 {
            opts.push(1);
        }
        let tcp_len = 20 + opts.len() + self.payload.len();
        let mut tcp = Vec::with_capacity(tcp_len);
        tcp.extend(src.port().to_be_bytes());
        tcp.extend(dst.port().to_be_bytes());
        tcp.extend(self.seq.to_be_bytes());
        tcp.extend(self.ack.to_be_bytes());
        tcp.push((((20 + opts.len()) / 4) as u8) << 4);
        tcp.push(self.flags);
        tcp.extend(self.win.to_be_bytes());
        tcp.extend([0, 0, 0, 0]);
        tcp.extend(&opts);
        tcp.extend(&self.payload);
        let pseudo = [
            &src.ip().octets()[..],
            &dst.ip().octets()[..],
            &[0, 6],
            &(tcp_len as u16).to_be_bytes()[..],
        ]
        .concat();
        let c = csum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend(((20 + tcp_len) as u16).to_be_bytes());
        ip.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
        ip.extend(src.ip().octets());
        ip.extend(dst.ip().octets());
        let c = csum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend(tcp);
        ip
    }

    /// Parses an IPv4/TCP packet, checking both checksums.
    fn parse(ip: &[u8]) -> Seg {
        assert!(ip.len() >= 40, "short packet: {ip:02x?}");
        assert_eq!(ip[0] >> 4, 4, "IPv4");
        let hl = usize::from(ip[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, ip.len(), "IP total length is the packet's length");
        assert_eq!(csum(&[&ip[..hl]]), 0, "IP header checksum");
        assert_eq!(ip[9], 6, "TCP");
        let tcp = &ip[hl..];
        let pseudo = [&ip[12..20], &[0, 6], &(tcp.len() as u16).to_be_bytes()[..]].concat();
        assert_eq!(csum(&[&pseudo, tcp]), 0, "TCP checksum");
        let off = usize::from(tcp[12] >> 4) * 4;
        let a = |b: &[u8], p: &[u8]| {
            SocketAddrV4::new(
                Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                u16::from_be_bytes([p[0], p[1]]),
            )
        };
        Seg {
            src: Some(a(&ip[12..16], &tcp[0..2])),
            dst: Some(a(&ip[16..20], &tcp[2..4])),
            seq: u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
            ack: u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
            flags: tcp[13],
            win: u16::from_be_bytes([tcp[14], tcp[15]]),
            opts: tcp[20..off].to_vec(),
            payload: tcp[off..].to_vec(),
        }
    }

    /// The MSS option's value, if present.
    fn mss(&self) -> Option<u16> {
        let mut i = 0;
        while i < self.opts.len() {
            match self.opts[i] {
                0 => return None,
                1 => i += 1,
                k => {
                    let len = usize::from(*self.opts.get(i + 1)?);
                    if k == 2 && len == 4 {
                        return Some(u16::from_be_bytes([self.opts[i + 2], self.opts[i + 3]]));
                    }
                    i += len.max(2);
                }
            }
        }
        None
    }
}

// ---- the table ---------------------------------------------------------------------------

/// Descriptor numbers are per process: tests that check them must not interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The table packetdrill would hold, with one safe wrapper per entry.
struct Pd {
    t: PacketdrillInterface,
    _serial: std::sync::MutexGuard<'static, ()>,
}

// SAFETY: shared between threads by reference only; the adapter behind `userdata`
// synchronises every call with its own mutex, and the function pointers are plain code
// pointers (packetdrill itself calls from two threads).
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: called once, after every other call (the table is dropped with Pd).
        unsafe { (self.t.free.unwrap())(self.t.userdata) };
    }
}

fn sin(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: plain old data.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

// SAFETY (for every wrapper below): `self.t` was filled by packetdrill_interface_init and is
// freed only on drop; each call passes pointers to live buffers with their true sizes.
impl Pd {
    fn new(flags: &str) -> Pd {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let c = CString::new(flags).unwrap();
        let mut t = PacketdrillInterface::default();
        // SAFETY: a NUL-terminated string and a writable table.
        unsafe { packetdrill_interface_init(c.as_ptr(), &mut t) };
        Pd { t, _serial: serial }
    }

    fn ud(&self) -> *mut c_void {
        self.t.userdata
    }

    /// Waits (real time) until `n` calls are blocked in other threads.
    fn wait_blocked(&self, n: usize) {
        // SAFETY: the userdata is the live Adapter (init succeeded) until drop.
        let a = unsafe { &*self.ud().cast::<Adapter>() };
        let start = Instant::now();
        while a.blocked_calls() != n {
            assert!(start.elapsed() < Duration::from_secs(10), "no call blocked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn socket(&self, domain: c_int, ty: c_int) -> Result<c_int, c_int> {
        // SAFETY: see the impl.
        res(unsafe { (self.t.socket.unwrap())(self.ud(), domain, ty, libc::IPPROTO_TCP) }.into())
            .map(|v| v as c_int)
    }

    fn bind(&self, fd: c_int, a: SocketAddrV4) -> Result<i64, c_int> {
        let s = sin(a);
        // SAFETY: see the impl.
        res(unsafe {
            (self.t.bind.unwrap())(
                self.ud(),
                fd,
                (&s as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        }
        .into())
    }

    fn connect(&self, fd: c_int, a: SocketAddrV4) -> Result<i64, c_int> {
        let s = sin(a);
        // SAFETY: see the impl.
        res(unsafe {
            (self.t.connect.unwrap())(
                self.ud(),
                fd,
                (&s as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        }
        .into())
    }

    fn listen(&self, fd: c_int, backlog: c_int) -> Result<i64, c_int> {
        // SAFETY: see the impl.
        res(unsafe { (self.t.listen.unwrap())(self.ud(), fd, backlog) }.into())
    }

    /// `accept()` with an IPv4-sized address buffer: `(fd, peer)`.
    fn accept(&self, fd: c_int) -> Result<(c_int, SocketAddr), c_int> {
        // SAFETY: plain old data.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as u32;
        // SAFETY: see the impl.
        let r = res(unsafe {
            (self.t.accept.unwrap())(
                self.ud(),
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        }
        .into())?;
        let peer = match c_int::from(ss.ss_family) {
            libc::AF_INET => {
                assert_eq!(len as usize, size_of::<libc::sockaddr_in>());
                // SAFETY: the family says sockaddr_in.
                let s: libc::sockaddr_in =
                    unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
                SocketAddr::new(
                    Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)).into(),
                    u16::from_be(s.sin_port),
                )
            }
            libc::AF_INET6 => {
                assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
                // SAFETY: the family says sockaddr_in6.
                let s: libc::sockaddr_in6 =
                    unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
                SocketAddr::new(
                    std::net::Ipv6Addr::from(s.sin6_addr.s6_addr).into(),
                    u16::from_be(s.sin6_port),
                )
            }
            f => panic!("family {f}"),
        };
        Ok((r as c_int, peer))
    }

    fn read(&self, fd: c_int, n: usize) -> Result<Vec<u8>, c_int> {
        let mut buf = vec![0u8; n];
        // SAFETY: see the impl.
        let r = res(
            unsafe { (self.t.read.unwrap())(self.ud(), fd, buf.as_mut_ptr().cast(), n) } as i64,
        )?;
        buf.truncate(r as usize);
        Ok(buf)
    }

    fn write(&self, fd: c_int, data: &[u8]) -> Result<i64, c_int> {
        // SAFETY: see the impl.
        res(
            unsafe { (self.t.write.unwrap())(self.ud(), fd, data.as_ptr().cast(), data.len()) }
                as i64,
        )
    }

    fn close(&self, fd: c_int) -> Result<i64, c_int> {
        // SAFETY: see the impl.
        res(unsafe { (self.t.close.unwrap())(self.ud(), fd) }.into())
    }

    fn setsockopt_int(&self, fd: c_int, level: c_int, name: c_int, v: c_int) -> Result<i64, c_int> {
        // SAFETY: see the impl.
        res(unsafe {
            (self.t.setsockopt.unwrap())(self.ud(), fd, level, name, (&v as *const c_int).cast(), 4)
        }
        .into())
    }

    fn getsockopt_int(&self, fd: c_int, level: c_int, name: c_int) -> Result<c_int, c_int> {
        let mut v: c_int = -7;
        let mut len: libc::socklen_t = 4;
        // SAFETY: see the impl.
        res(unsafe {
            (self.t.getsockopt.unwrap())(
                self.ud(),
                fd,
                level,
                name,
                (&mut v as *mut c_int).cast(),
                &mut len,
            )
        }
        .into())?;
        assert_eq!(len, 4);
        Ok(v)
    }

    fn fcntl(&self, fd: c_int, cmd: c_int, arg: c_int) -> Result<i64, c_int> {
        // SAFETY: see the impl.
        res(unsafe { (self.t.fcntl.unwrap())(self.ud(), fd, cmd, arg as c_ulong) }.into())
    }

    fn poll(&self, fd: c_int, events: i16, timeout: c_int) -> Result<i16, c_int> {
        let mut p = libc::pollfd {
            fd,
            events,
            revents: -1,
        };
        // SAFETY: see the impl.
        res(unsafe { (self.t.poll.unwrap())(self.ud(), &mut p, 1, timeout) }.into())?;
        Ok(p.revents)
    }

    fn send(&self, s: &Seg) {
        let ip = s.build();
        // SAFETY: see the impl.
        let r = unsafe { (self.t.netdev_send.unwrap())(self.ud(), ip.as_ptr().cast(), ip.len()) };
        assert_eq!(r, 0, "netdev_send");
    }

    /// The stack's next packet and its timestamp (µs since the adapter's epoch), if any.
    fn recv(&self) -> Option<(Seg, i64)> {
        let mut buf = vec![0u8; 65536];
        let mut count = buf.len();
        let mut t: libc::c_longlong = -1;
        // SAFETY: see the impl.
        let r = unsafe {
            (self.t.netdev_receive.unwrap())(self.ud(), buf.as_mut_ptr().cast(), &mut count, &mut t)
        };
        assert_eq!(r, 0, "netdev_receive");
        (count > 0).then(|| (Seg::parse(&buf[..count]), t - EPOCH_US))
    }

    fn expect(&self) -> (Seg, i64) {
        self.recv().expect("a packet from the stack")
    }

    fn usleep(&self, us: u32) {
        // SAFETY: see the impl.
        assert_eq!(unsafe { (self.t.usleep.unwrap())(self.ud(), us) }, 0);
    }

    /// Microseconds since the adapter's epoch.
    fn now(&self) -> i64 {
        // SAFETY: plain old data.
        let mut tv: libc::timeval = unsafe { std::mem::zeroed() };
        let mut tz = [7 as c_int; 2];
        // SAFETY: see the impl.
        let r =
            unsafe { (self.t.gettimeofday.unwrap())(self.ud(), &mut tv, tz.as_mut_ptr().cast()) };
        assert_eq!(r, 0);
        assert_eq!(tz, [0, 0], "UTC");
        tv.tv_sec * 1_000_000 + tv.tv_usec - EPOCH_US
    }

    /// A listener on LOCAL:8080 (`listen(fd, 8)`).
    fn listener(&self) -> c_int {
        let l = self.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
        self.setsockopt_int(l, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
            .unwrap();
        self.bind(l, SocketAddrV4::new(LOCAL, 8080)).unwrap();
        self.listen(l, 8).unwrap();
        l
    }

    /// A handshake from REMOTE:40000 to the listener, accepted: `(fd, our ISS + 1)`.
    fn established(&self, l: c_int) -> (c_int, u32) {
        let mut syn = Seg::new(40000, 8080, SYN, 1000, 0);
        syn.opts = vec![2, 4, 0x03, 0xe8]; // MSS 1000
        self.send(&syn);
        let (sa, _) = self.expect();
        assert_eq!(sa.flags, SYN | ACK);
        self.send(&Seg::new(40000, 8080, ACK, 1001, sa.seq.wrapping_add(1)));
        let (fd, _) = self.accept(l).unwrap();
        (fd, sa.seq.wrapping_add(1))
    }
}

#[test]
fn passive_open_data_and_close() {
    let pd = Pd::new("");
    let l = pd.listener();
    assert!(l >= 1000, "socket numbers start at 1000: {l}");
    assert!(pd.recv().is_none(), "a listener sends nothing");

    // SYN -> SYN-ACK, checked field by field.
    let mut syn = Seg::new(40000, 8080, SYN, 1000, 0);
    syn.opts = vec![2, 4, 0x03, 0xe8];
    pd.send(&syn);
    let (sa, t) = pd.expect();
    assert_eq!(sa.src, Some(SocketAddrV4::new(LOCAL, 8080)));
    assert_eq!(sa.dst, Some(SocketAddrV4::new(REMOTE, 40000)));
    assert_eq!(sa.flags, SYN | ACK);
    assert_eq!(sa.ack, 1001);
    assert_eq!(sa.mss(), Some(1460), "MSS for an MTU of 1500");
    assert!(sa.payload.is_empty());
    assert!((0..1000).contains(&t), "sent now: {t} µs");
    let iss = sa.seq;

    // ACK -> accept.
    pd.send(&Seg::new(40000, 8080, ACK, 1001, iss.wrapping_add(1)));
    let r = pd.recv();
    assert!(
        r.is_none(),
        "the handshake's last ACK is not answered: {r:?}"
    );
    let (fd, peer) = pd.accept(l).unwrap();
    assert!(fd > l);
    assert_eq!(peer, "198.19.0.1:40000".parse().unwrap());

    // write -> one data segment.
    assert_eq!(pd.write(fd, b"hello"), Ok(5));
    let (d, _) = pd.expect();
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.seq, iss.wrapping_add(1));
    assert_eq!(d.ack, 1001);
    assert_eq!(d.flags, PSH | ACK);

    // The peer's data (acknowledging ours) -> read.
    pd.send(&Seg::new(40000, 8080, ACK | PSH, 1001, iss.wrapping_add(6)).with_payload(b"world"));
    assert_eq!(pd.read(fd, 100).unwrap(), b"world");

    // close -> FIN; the peer's ACK and FIN -> our ACK.
    pd.close(fd).unwrap();
    let (f, _) = pd.expect();
    assert_eq!(f.flags & (FIN | ACK | RST), FIN | ACK);
    assert_eq!(f.seq, iss.wrapping_add(6));
    assert_eq!(f.ack, 1006);
    pd.send(&Seg::new(40000, 8080, ACK | FIN, 1006, iss.wrapping_add(7)));
    let (a, _) = pd.expect();
    assert_eq!(a.flags, ACK);
    assert_eq!((a.seq, a.ack), (iss.wrapping_add(7), 1007));
    assert_eq!(pd.close(fd), Err(libc::EBADF), "closed already");
    pd.close(l).unwrap();
}

#[test]
fn rst_on_an_established_connection() {
    let pd = Pd::new("");
    let l = pd.listener();
    let (fd, _) = pd.established(l);
    pd.send(&Seg::new(40000, 8080, RST, 1001, 0));
    assert!(pd.recv().is_none(), "nothing answers a valid RST");
    let revents = pd.poll(fd, libc::POLLIN | libc::POLLOUT, 0).unwrap();
    assert_eq!(revents, libc::POLLIN | libc::POLLERR | libc::POLLHUP);
    assert_eq!(pd.read(fd, 10), Err(libc::ECONNRESET), "the error, once");
    assert_eq!(pd.read(fd, 10), Ok(vec![]), "then end of stream");
    assert_eq!(
        pd.getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(0)
    );
    assert_eq!(pd.write(fd, b"x"), Err(libc::EPIPE));
    pd.close(fd).unwrap();
    assert!(
        pd.recv().is_none(),
        "closing a reset connection sends nothing"
    );

    // The error is reported by SO_ERROR first if asked first.
    let (fd, _) = {
        let mut syn = Seg::new(40001, 8080, SYN, 5000, 0);
        syn.opts = vec![2, 4, 0x03, 0xe8];
        pd.send(&syn);
        let (sa, _) = pd.expect();
        pd.send(&Seg::new(40001, 8080, ACK, 5001, sa.seq.wrapping_add(1)));
        (pd.accept(l).unwrap().0, ())
    };
    pd.send(&Seg::new(40001, 8080, RST, 5001, 0));
    assert_eq!(
        pd.getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(libc::ECONNRESET)
    );
    assert_eq!(pd.read(fd, 10), Ok(vec![]));
}

#[test]
fn the_clock_is_virtual() {
    let pd = Pd::new("");
    let real = Instant::now();
    let t0 = pd.now();
    assert!((0..1000).contains(&t0), "starts at the epoch: {t0}");
    assert_eq!(pd.now(), t0 + 1, "each gettimeofday ticks 1 µs");
    pd.usleep(2_000_000);
    assert_eq!(pd.now(), t0 + 2 + 2_000_000);

    // An unanswered SYN-ACK is retransmitted after 1 s, stamped 1 s later.
    let _listener = pd.listener();
    let mut syn = Seg::new(40000, 8080, SYN, 1000, 0);
    syn.opts = vec![2, 4, 0x03, 0xe8];
    pd.send(&syn);
    let (sa, t1) = pd.expect();
    let (again, t2) = pd.expect();
    assert_eq!((again.flags, again.seq), (SYN | ACK, sa.seq));
    assert!(
        (1_000_000..1_002_000).contains(&(t2 - t1)),
        "retransmitted after the initial RTO: {} µs",
        t2 - t1
    );
    assert!(pd.now() >= t2, "the clock moved to the retransmission");

    // Data is acknowledged by the delayed-ACK timer, 40 ms later.
    pd.send(&Seg::new(40000, 8080, ACK, 1001, sa.seq.wrapping_add(1)));
    let t3 = pd.now();
    pd.send(
        &Seg::new(40000, 8080, ACK | PSH, 1001, sa.seq.wrapping_add(1)).with_payload(&[7; 100]),
    );
    let (a, t4) = pd.expect();
    assert_eq!((a.flags, a.ack), (ACK, 1101));
    assert!(
        (40_000..42_000).contains(&(t4 - t3)),
        "delayed ACK after {} µs",
        t4 - t3
    );
    assert!(
        real.elapsed() < Duration::from_millis(900),
        "no real waiting"
    );
}

#[test]
fn blocking_calls_give_up_on_the_virtual_clock() {
    let pd = Pd::new("block_ms=3000");
    let l = pd.listener();
    let real = Instant::now();
    let t0 = pd.now();
    assert_eq!(pd.accept(l).map(|_| ()), Err(libc::EAGAIN));
    let waited = pd.now() - t0;
    assert!(
        (3_000_000..3_001_000).contains(&waited),
        "waited {waited} µs of virtual time"
    );

    // Non-blocking: at once.
    pd.fcntl(l, libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK)
        .unwrap();
    assert_eq!(
        pd.fcntl(l, libc::F_GETFL, 0),
        Ok(i64::from(libc::O_RDWR | libc::O_NONBLOCK))
    );
    let t1 = pd.now();
    assert_eq!(pd.accept(l).map(|_| ()), Err(libc::EAGAIN));
    assert!(pd.now() - t1 < 10);

    // A blocking read with nothing coming, and SO_RCVTIMEO.
    pd.fcntl(l, libc::F_SETFL, libc::O_RDWR).unwrap();
    let (fd, _) = pd.established(l);
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 250_000,
    };
    // SAFETY: a live timeval and its size.
    let r = unsafe {
        (pd.t.setsockopt.unwrap())(
            pd.ud(),
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(r, 0);
    let t2 = pd.now();
    assert_eq!(pd.read(fd, 10), Err(libc::EAGAIN));
    assert!((250_000..251_000).contains(&(pd.now() - t2)));
    // poll with a timeout, from the driving thread: the clock moves by the timeout.
    let t3 = pd.now();
    assert_eq!(pd.poll(fd, libc::POLLIN, 100), Ok(0));
    assert!((100_000..101_000).contains(&(pd.now() - t3)));
    assert!(real.elapsed() < Duration::from_secs(2), "no real waiting");
}

#[test]
fn a_blocking_read_in_another_thread() {
    // packetdrill's model: the main thread drives the clock, a second thread makes the
    // blocking call and is let go once it sleeps.
    let pd = Pd::new("");
    pd.now(); // the main thread is the driving thread
    let l = pd.listener();
    let (fd, snd) = pd.established(l);
    let t0 = pd.now();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let data = pd.read(fd, 100);
            // The end time packetdrill takes right after the call returns, here as if this
            // thread were descheduled for a moment while the main thread moved on.
            std::thread::sleep(Duration::from_millis(20));
            (data, pd.now())
        });
        pd.wait_blocked(1);
        pd.usleep(100_000);
        pd.send(&Seg::new(40000, 8080, ACK | PSH, 1001, snd).with_payload(b"late"));
        // The main thread moves on at once (as packetdrill does after the next event).
        pd.usleep(300_000);
        let (data, end) = reader.join().unwrap();
        assert_eq!(data.unwrap(), b"late");
        let took = end - t0;
        assert!(
            (100_000..100_010).contains(&took),
            "the read ended when the data came ({took} µs), not when the main thread looked"
        );
        // The stack acknowledges at once here (a window update: the read emptied the
        // buffer before the delayed-ACK timer ran), never later than that timer.
        let (ack, at) = pd.expect();
        assert_eq!((ack.flags, ack.ack), (ACK, 1005), "the ACK of the data");
        assert!(
            (100_000..142_000).contains(&(at - t0)),
            "ACK at {}",
            at - t0
        );
    });
    // A blocking connect in the other thread, completed by the main thread.
    let c = pd.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
    std::thread::scope(|s| {
        let connecting = s.spawn(|| pd.connect(c, SocketAddrV4::new(REMOTE, 80)));
        let (syn, _) = loop {
            if let Some(p) = pd.recv() {
                break p;
            }
        };
        assert_eq!(syn.flags, SYN);
        assert_eq!(syn.src.unwrap().ip(), &LOCAL, "the default source address");
        pd.wait_blocked(1);
        let sa = Seg::new(
            80,
            syn.src.unwrap().port(),
            SYN | ACK,
            9000,
            syn.seq.wrapping_add(1),
        );
        pd.send(&sa);
        assert_eq!(connecting.join().unwrap(), Ok(0));
    });
}

#[test]
fn active_open_non_blocking() {
    let pd = Pd::new("");
    let c = pd
        .socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)
        .unwrap();
    assert_eq!(
        pd.connect(c, SocketAddrV4::new(REMOTE, 80)),
        Err(libc::EINPROGRESS)
    );
    assert_eq!(
        pd.connect(c, SocketAddrV4::new(REMOTE, 80)),
        Err(libc::EALREADY)
    );
    let (syn, _) = pd.expect();
    assert_eq!(syn.flags, SYN);
    assert_eq!(syn.dst, Some(SocketAddrV4::new(REMOTE, 80)));
    assert_eq!(
        pd.poll(c, libc::POLLOUT, 0),
        Ok(0),
        "not writable while connecting"
    );
    let local = syn.src.unwrap();
    pd.send(&Seg::new(
        80,
        local.port(),
        SYN | ACK,
        9000,
        syn.seq.wrapping_add(1),
    ));
    let (ack, _) = pd.expect();
    assert_eq!((ack.flags, ack.ack), (ACK, 9001));
    assert_eq!(pd.poll(c, libc::POLLOUT, 0), Ok(libc::POLLOUT));
    assert_eq!(
        pd.getsockopt_int(c, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(0)
    );
    assert_eq!(pd.connect(c, SocketAddrV4::new(REMOTE, 80)), Ok(0));
    assert_eq!(
        pd.connect(c, SocketAddrV4::new(REMOTE, 80)),
        Err(libc::EISCONN)
    );

    // Refused: the RST answering a SYN is reported by SO_ERROR.
    let c2 = pd
        .socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)
        .unwrap();
    assert_eq!(
        pd.connect(c2, SocketAddrV4::new(REMOTE, 81)),
        Err(libc::EINPROGRESS)
    );
    let (syn, _) = pd.expect();
    pd.send(&Seg::new(
        81,
        syn.src.unwrap().port(),
        RST | ACK,
        0,
        syn.seq.wrapping_add(1),
    ));
    assert_eq!(
        pd.getsockopt_int(c2, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(libc::ECONNREFUSED)
    );
    assert_eq!(
        pd.getsockopt_int(c2, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(0),
        "once"
    );
}

#[test]
fn options_and_unsupported_calls() {
    let pd = Pd::new("");
    let fd = pd.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
    // SAFETY: the table's entries, called with the arguments packetdrill would pass.
    unsafe {
        assert_eq!((pd.t.epoll_create.unwrap())(pd.ud(), 1), -1);
        assert_eq!(errno(), libc::ENOTSUP);
        assert_eq!(
            (pd.t.epoll_ctl.unwrap())(pd.ud(), 5, 1, fd, std::ptr::null_mut()),
            -1
        );
        assert_eq!(errno(), libc::ENOTSUP);
        assert_eq!(
            (pd.t.epoll_wait.unwrap())(pd.ud(), 5, std::ptr::null_mut(), 1, 0),
            -1
        );
        assert_eq!(errno(), libc::ENOTSUP);
        let mut fds = [0 as c_int; 2];
        assert_eq!((pd.t.pipe.unwrap())(pd.ud(), fds.as_mut_ptr()), -1);
        assert_eq!(errno(), libc::ENOTSUP);
        let nul = std::ptr::null_mut();
        assert_eq!((pd.t.splice.unwrap())(pd.ud(), fd, nul, fd, nul, 10, 0), -1);
        assert_eq!(errno(), libc::ENOTSUP);
        assert_eq!(
            (pd.t.socket.unwrap())(pd.ud(), libc::AF_INET, libc::SOCK_DGRAM, 0),
            -1
        );
        assert_eq!(errno(), libc::EPROTONOSUPPORT);
        assert_eq!(
            (pd.t.socket.unwrap())(pd.ud(), libc::AF_UNIX, libc::SOCK_STREAM, 0),
            -1
        );
        assert_eq!(errno(), libc::EAFNOSUPPORT);
        // ioctl(FIONBIO) then a read that would block.
        let on: c_int = 1;
        assert_eq!(
            (pd.t.ioctl.unwrap())(
                pd.ud(),
                fd,
                libc::FIONBIO as c_ulong,
                &on as *const c_int as c_ulong
            ),
            0
        );
        assert_eq!((pd.t.ioctl.unwrap())(pd.ud(), fd, 0x8912, 0), -1);
        assert_eq!(errno(), libc::ENOTTY);
    }
    assert_eq!(
        pd.fcntl(fd, libc::F_GETFL, 0),
        Ok(i64::from(libc::O_RDWR | libc::O_NONBLOCK))
    );
    assert_eq!(pd.read(fd, 10), Err(libc::ENOTCONN));
    assert_eq!(pd.write(fd, b"x"), Err(libc::EPIPE));
    assert_eq!(pd.fcntl(fd, libc::F_DUPFD, 0), Err(libc::EINVAL));

    for (level, name) in [
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    ] {
        assert_eq!(pd.getsockopt_int(fd, level, name), Ok(0));
        pd.setsockopt_int(fd, level, name, 1).unwrap();
        assert_eq!(pd.getsockopt_int(fd, level, name), Ok(1));
    }
    assert_eq!(
        pd.getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE),
        Ok(libc::SOCK_STREAM)
    );
    assert_eq!(
        pd.setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, 500),
        Err(libc::ENOPROTOOPT)
    );
    assert_eq!(
        pd.getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_INFO),
        Err(libc::ENOPROTOOPT)
    );
    assert_eq!(
        pd.setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 0),
        Err(libc::EINVAL)
    );
    assert_eq!(
        pd.getsockopt_int(9999, libc::SOL_SOCKET, libc::SO_ERROR),
        Err(libc::EBADF)
    );
    // An address outside the local prefixes.
    assert_eq!(
        pd.bind(fd, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80)),
        Err(libc::EADDRNOTAVAIL)
    );
    assert_eq!(pd.listen(fd, 1), Err(libc::EDESTADDRREQ));
}

#[test]
fn descriptors_are_real_and_survive_an_outside_close() {
    let pd = Pd::new("");
    let a = pd.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
    // SAFETY: F_GETFD on a number; no memory involved.
    assert!(
        unsafe { libc::fcntl(a, libc::F_GETFD) } >= 0,
        "a real descriptor"
    );
    pd.close(a).unwrap();
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::fcntl(a, libc::F_GETFD) },
        -1,
        "closed with the socket"
    );

    // packetdrill closes leftover sockets with close(2): the number may come back.
    let l = pd.listener();
    // SAFETY: closes the placeholder behind the adapter's back, as packetdrill does.
    assert_eq!(unsafe { libc::close(l) }, 0);
    let b = pd.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
    assert_eq!(b, l, "the lowest free number >= 1000 again");
    pd.bind(b, SocketAddrV4::new(LOCAL, 8080)).unwrap();
    pd.listen(b, 1).expect("the old listener was released");
}

#[test]
fn poll_sees_pending_connections() {
    let pd = Pd::new("");
    let l = pd.listener();
    assert_eq!(pd.poll(l, libc::POLLIN, 0), Ok(0));
    let mut syn = Seg::new(40000, 8080, SYN, 1000, 0);
    syn.opts = vec![2, 4, 0x03, 0xe8];
    pd.send(&syn);
    let (sa, _) = pd.expect();
    assert_eq!(
        pd.poll(l, libc::POLLIN, 0),
        Ok(0),
        "not before the handshake completes"
    );
    pd.send(&Seg::new(40000, 8080, ACK, 1001, sa.seq.wrapping_add(1)));
    assert_eq!(
        pd.poll(l, libc::POLLIN | libc::POLLOUT, 0),
        Ok(libc::POLLIN)
    );
    let (fd, _) = pd.accept(l).unwrap();
    assert_eq!(pd.poll(l, libc::POLLIN, 0), Ok(0));
    assert_eq!(
        pd.poll(fd, libc::POLLIN | libc::POLLOUT, 0),
        Ok(libc::POLLOUT)
    );
    assert_eq!(
        pd.poll(-1, libc::POLLIN, 0),
        Ok(0),
        "negative fds are skipped"
    );
    assert_eq!(pd.poll(4321, libc::POLLIN, 0), Ok(libc::POLLNVAL));
}

#[test]
fn ipv4_mapped_ipv6_sockets() {
    let pd = Pd::new("");
    let l = pd.socket(libc::AF_INET6, libc::SOCK_STREAM).unwrap();
    // SAFETY: plain old data.
    let mut s6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    s6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s6.sin6_port = 8080u16.to_be();
    s6.sin6_addr.s6_addr = LOCAL.to_ipv6_mapped().octets();
    // SAFETY: a live sockaddr_in6 and its size.
    let r = unsafe {
        (pd.t.bind.unwrap())(
            pd.ud(),
            l,
            (&s6 as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as u32,
        )
    };
    assert_eq!(r, 0);
    pd.listen(l, 4).unwrap();
    let mut syn = Seg::new(40000, 8080, SYN, 1000, 0);
    syn.opts = vec![2, 4, 0x03, 0xe8];
    pd.send(&syn);
    let (sa, _) = pd.expect();
    pd.send(&Seg::new(40000, 8080, ACK, 1001, sa.seq.wrapping_add(1)));
    let (_, peer) = pd.accept(l).unwrap();
    assert_eq!(peer, "[::ffff:198.19.0.1]:40000".parse().unwrap());
}

#[test]
fn bad_flags_fail_every_call() {
    let pd = Pd::new("bogus=1");
    assert!(pd.ud().is_null());
    assert_eq!(
        pd.socket(libc::AF_INET, libc::SOCK_STREAM),
        Err(libc::EINVAL)
    );
    assert!(
        pd.recv().is_none(),
        "netdev_receive reports nothing instead of an error"
    );
    // SAFETY: a null adapter; the call must fail cleanly.
    let mut tv: libc::timeval = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(
        unsafe { (pd.t.gettimeofday.unwrap())(pd.ud(), &mut tv, std::ptr::null_mut()) },
        -1
    );
}

#[test]
fn a_wildcard_bind_listens_on_every_local_address() {
    let pd = Pd::new("prefix=198.18.0.0/16,prefix=198.20.0.0/24");
    let l = pd.socket(libc::AF_INET, libc::SOCK_STREAM).unwrap();
    pd.bind(l, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000))
        .unwrap();
    pd.listen(l, 8).unwrap();
    for (i, local) in [
        Ipv4Addr::new(198, 18, 77, 7),
        Ipv4Addr::new(198, 20, 0, 200),
    ]
    .into_iter()
    .enumerate()
    {
        let mut syn = Seg::new(41000 + i as u16, 9000, SYN, 1, 0);
        syn.dst = Some(SocketAddrV4::new(local, 9000));
        pd.send(&syn);
        let (sa, _) = pd.expect();
        assert_eq!(sa.flags, SYN | ACK);
        assert_eq!(
            sa.src,
            Some(SocketAddrV4::new(local, 9000)),
            "answers as the address asked"
        );
        let mut ack = Seg::new(41000 + i as u16, 9000, ACK, 2, sa.seq.wrapping_add(1));
        ack.dst = syn.dst;
        pd.send(&ack);
        let (_, peer) = pd.accept(l).unwrap();
        assert_eq!(
            peer,
            SocketAddr::from(SocketAddrV4::new(REMOTE, 41000 + i as u16))
        );
    }
    // Outside the prefixes: the stack does not answer for the address.
    let mut syn = Seg::new(42000, 9000, SYN, 1, 0);
    syn.dst = Some(SocketAddrV4::new(Ipv4Addr::new(198, 21, 0, 1), 9000));
    pd.send(&syn);
    assert!(pd.recv().is_none());
}
