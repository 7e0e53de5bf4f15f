//! The adapter's state: one [`Stack`] on a virtual clock, the queue of packets it sent, the
//! socket table, and the rules for calls that block. See the crate docs for the model.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use libc::c_int;
use subnetstack_demux::{BindError, HashKey, PortSpec};
use subnetstack_ifaces::{Batch, FrameMeta, Mac};
use subnetstack_stack::{
    Config, ConnectError, IoError, Keepalive, Stack, TcpError, TcpHandle, TcpListenerHandle,
    TcpState,
};

use crate::addr::AppAddr;
use crate::flags::Flags;

/// An `errno` value.
pub type Errno = c_int;

/// The stack's MAC on the virtual link.
pub const STACK_MAC: Mac = [0x02, 0x53, 0x4e, 0x53, 0x00, 0x01];
/// The MAC of packetdrill's side of the virtual link.
pub const PEER_MAC: Mac = [0x02, 0x50, 0x44, 0x00, 0x00, 0x02];
/// Stack time (the `now` the stack sees) when the adapter starts.
const START: Duration = Duration::from_secs(10);
/// What `gettimeofday()` says when the adapter starts (2023-11-14T22:13:20Z).
const EPOCH: Duration = Duration::from_secs(1_700_000_000);
/// Longest real time a call waits for another thread to move the clock.
const REAL_CAP: Duration = Duration::from_secs(10);
/// Longest real time the driving thread waits for blocked calls to look at a change.
const SETTLE_CAP: Duration = Duration::from_millis(200);
/// Real time `netdev_receive` gives another thread when the stack has nothing scheduled.
const IDLE_GRACE: Duration = Duration::from_millis(50);
/// Socket descriptors are at least this.
const FIRST_FD: c_int = 1000;
/// Timer rounds one clock move may run (a guard against a deadline that does not move).
const MAX_ROUNDS: usize = 100_000;

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A real file descriptor (an anonymous memfd, duplicated to `>= 1000`) that stands for a
/// socket: packetdrill closes descriptors the script left open with the real `close(2)`, so
/// socket numbers must be real and unique in the process.
#[derive(Debug)]
struct Placeholder {
    fd: c_int,
    id: (u64, u64),
}

fn identity(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain old data; fstat writes it or fails without touching memory we
    // care about.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl Placeholder {
    fn new() -> Result<Placeholder, Errno> {
        // SAFETY: a NUL-terminated name and valid flags; returns a new descriptor or -1.
        let raw =
            unsafe { libc::memfd_create(c"subnetstack-packetdrill".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(last_errno());
        }
        // SAFETY: duplicates a descriptor we own onto the lowest free number >= FIRST_FD.
        let fd = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, FIRST_FD) };
        let e = last_errno();
        // SAFETY: `raw` is ours and known to nobody else.
        unsafe { libc::close(raw) };
        if fd < 0 {
            return Err(e);
        }
        match identity(fd) {
            Some(id) => Ok(Placeholder { fd, id }),
            None => {
                // SAFETY: `fd` was just created by us.
                unsafe { libc::close(fd) };
                Err(libc::EIO)
            }
        }
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        // Someone (packetdrill, at the end of a script) may have closed the number already and
        // it may name another file now: close it only if it is still our memfd.
        if identity(self.fd) == Some(self.id) {
            // SAFETY: the descriptor is still the memfd we created.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// Socket options the adapter keeps (and applies to the stack where it can).
#[derive(Clone, Copy, Debug)]
struct Opts {
    reuseaddr: bool,
    reuseport: bool,
    nodelay: bool,
    keepalive: bool,
    keep_idle: u32,
    keep_intvl: u32,
    keep_cnt: u32,
    /// `SO_LINGER`: `Some(seconds)` when on.
    linger: Option<u32>,
    rcvtimeo: Option<Duration>,
    sndtimeo: Option<Duration>,
    rcvbuf: Option<c_int>,
    sndbuf: Option<c_int>,
    v6only: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            reuseaddr: false,
            reuseport: false,
            nodelay: false,
            keepalive: false,
            keep_idle: 7200,
            keep_intvl: 75,
            keep_cnt: 9,
            linger: None,
            rcvtimeo: None,
            sndtimeo: None,
            rcvbuf: None,
            sndbuf: None,
            v6only: false,
        }
    }
}

#[derive(Debug)]
struct Conn {
    h: TcpHandle,
    /// A `connect()` has not reported its outcome yet (`SS_CONNECTING`).
    connecting: bool,
    /// The connection's error was reported once (like Linux's `sk_err`, read and cleared).
    err_taken: bool,
    shut_rd: bool,
    shut_wr: bool,
}

#[derive(Debug)]
enum Kind {
    Fresh {
        bound: Option<SocketAddr>,
    },
    Listening {
        local: SocketAddr,
        ls: Vec<TcpListenerHandle>,
        /// Connections taken from the stack (by `poll`) and not yet accepted.
        ready: VecDeque<(TcpHandle, SocketAddr, SocketAddr)>,
    },
    Conn(Conn),
}

#[derive(Debug)]
struct Sock {
    ph: Placeholder,
    /// `AF_INET6` socket.
    v6: bool,
    nonblock: bool,
    cloexec: bool,
    o: Opts,
    kind: Kind,
}

#[derive(Debug)]
struct Outbound {
    ip: Vec<u8>,
    at: Duration,
}

/// What a frame the stack sent means to the adapter.
enum Sent<'a> {
    /// An IP packet for packetdrill.
    Ip(&'a [u8]),
    /// The stack asks for this neighbour's MAC (ARP request or neighbour solicitation).
    Resolve(IpAddr),
    /// Nothing for packetdrill (other NDP, unknown ethertypes).
    Drop,
}

fn classify(f: &[u8]) -> Sent<'_> {
    if f.len() < 14 {
        return Sent::Drop;
    }
    let p = &f[14..];
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if p.len() >= 20 => {
            // Trim Ethernet padding: packetdrill sees exactly the IP datagram.
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            Sent::Ip(&p[..total.clamp(20, p.len())])
        }
        0x86dd if p.len() >= 40 => {
            let total = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            let ip = &p[..total.min(p.len())];
            let icmp_type = (ip[6] == 58 && ip.len() > 40).then(|| ip[40]);
            match icmp_type {
                Some(135) if ip.len() >= 64 => {
                    let t: [u8; 16] = ip[48..64].try_into().expect("16 bytes");
                    Sent::Resolve(IpAddr::V6(Ipv6Addr::from(t)))
                }
                Some(133..=137) => Sent::Drop,
                _ => Sent::Ip(ip),
            }
        }
        0x0806 if p.len() >= 28 && p[6..8] == [0, 1] => {
            Sent::Resolve(IpAddr::V4(Ipv4Addr::new(p[24], p[25], p[26], p[27])))
        }
        _ => Sent::Drop,
    }
}

/// A one-line description of an IP packet, for `log=1`.
pub fn summarize(ip: &[u8]) -> String {
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match ip.first().map(|b| b >> 4) {
        Some(4) if ip.len() >= 20 => {
            let hl = usize::from(ip[0] & 15) * 4;
            (
                IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                ip[9],
                ip.get(hl..).unwrap_or(&[]),
            )
        }
        Some(6) if ip.len() >= 40 => {
            let s: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let d: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            (IpAddr::V6(s.into()), IpAddr::V6(d.into()), ip[6], &ip[40..])
        }
        _ => return format!("{} bytes, not IP", ip.len()),
    };
    if proto != 6 || l4.len() < 20 {
        return format!("{src} > {dst} proto {proto}, {} bytes", ip.len());
    }
    let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    let word = |i: usize| u32::from_be_bytes([l4[i], l4[i + 1], l4[i + 2], l4[i + 3]]);
    let off = usize::from(l4[12] >> 4) * 4;
    let fl = l4[13];
    let flags: String = [(2, 'S'), (1, 'F'), (4, 'R'), (8, 'P'), (16, '.')]
        .iter()
        .filter(|(b, _)| fl & b != 0)
        .map(|(_, c)| *c)
        .collect();
    format!(
        "{src}:{} > {dst}:{} {flags} seq {} ack {} win {} len {}",
        port(0),
        port(2),
        word(4),
        word(8),
        port(14),
        l4.len().saturating_sub(off)
    )
}

fn tcp_errno(e: TcpError) -> Errno {
    match e {
        TcpError::Refused => libc::ECONNREFUSED,
        TcpError::Reset => libc::ECONNRESET,
        TcpError::TimedOut => libc::ETIMEDOUT,
        TcpError::Aborted => libc::ECONNABORTED,
        TcpError::Unreachable => libc::EHOSTUNREACH,
    }
}

fn bind_errno(e: BindError) -> Errno {
    match e {
        BindError::Conflict { .. } => libc::EADDRINUSE,
        _ => libc::EINVAL,
    }
}

/// The shared state behind the mutex.
struct Inner {
    stack: Stack,
    flags: Flags,
    /// Stack time now (virtual).
    now: Duration,
    out: VecDeque<Outbound>,
    batch: Batch,
    socks: HashMap<c_int, Sock>,
    /// The thread that drives the clock (packetdrill's main thread); others wait for it.
    driver: Option<ThreadId>,
    /// Bumped by every change the driving thread makes (packets in, timers, socket calls).
    gen: u64,
    /// Threads waiting in a blocking call: the `gen` they last looked at, and their deadline.
    waiters: HashMap<ThreadId, Waiter>,
    /// When each non-driving thread's last blocking call finished: its next `gettimeofday()`
    /// reports that instant (packetdrill takes a blocking call's end time right after it
    /// returns, while its main thread may already have moved the clock on).
    finished: HashMap<ThreadId, Duration>,
}

#[derive(Clone, Copy, Debug)]
struct Waiter {
    seen: u64,
    deadline: Duration,
}

macro_rules! trace {
    ($inner:expr, $($arg:tt)*) => {
        if $inner.flags.log {
            $inner.trace(format_args!($($arg)*));
        }
    };
}

impl Inner {
    fn trace(&self, args: fmt::Arguments<'_>) {
        eprintln!(
            "[subnetstack {:>10.6}] {args}",
            (self.now - START).as_secs_f64()
        );
    }

    fn wall(&self) -> Duration {
        EPOCH + (self.now - START)
    }

    fn self_driven(&self) -> bool {
        self.driver.is_none_or(|d| d == thread::current().id())
    }

    /// Moves the stack's frames to the outbound queue (IP only, stamped `now`), answering its
    /// ARP and NDP questions on packetdrill's behalf.
    fn drain(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if self.stack.poll_transmit(&mut self.batch) == 0 {
                break;
            }
            let mut resolve = Vec::new();
            for f in self.batch.frames() {
                match classify(f.data()) {
                    Sent::Ip(ip) => {
                        if self.flags.log {
                            self.trace(format_args!("out {}", summarize(ip)));
                        }
                        self.out.push_back(Outbound {
                            ip: ip.to_vec(),
                            at: self.now,
                        });
                    }
                    Sent::Resolve(a) => resolve.push(a),
                    Sent::Drop => {}
                }
            }
            self.batch.clear();
            for a in resolve {
                trace!(self, "resolve {a} -> packetdrill");
                self.stack.teach_neighbor(self.now, a, PEER_MAC);
            }
        }
    }

    fn sock(&mut self, fd: c_int) -> Result<&mut Sock, Errno> {
        self.socks.get_mut(&fd).ok_or(libc::EBADF)
    }

    fn insert(&mut self, sock: Sock) -> c_int {
        let fd = sock.ph.fd;
        // The number was closed behind our back (packetdrill's own close(2)) and reused.
        if let Some(old) = self.socks.remove(&fd) {
            trace!(
                self,
                "fd {fd} was closed outside the adapter; dropping its old socket"
            );
            self.teardown(old);
        }
        self.socks.insert(fd, sock);
        fd
    }

    /// Releases a socket's stack state, as `close()` does.
    fn teardown(&mut self, sock: Sock) {
        let now = self.now;
        match sock.kind {
            Kind::Fresh { .. } => {}
            Kind::Listening { ls, ready, .. } => {
                for (h, _, _) in ready {
                    self.stack.tcp_abort(now, h);
                }
                for l in ls {
                    self.stack.tcp_listener_close(now, l);
                }
            }
            Kind::Conn(c) => {
                if sock.o.linger == Some(0) {
                    self.stack.tcp_abort(now, c.h);
                } else {
                    self.stack.tcp_close(now, c.h);
                }
            }
        }
        self.drain();
    }

    fn apply_opts(&mut self, h: TcpHandle, o: &Opts) {
        if o.nodelay {
            let _ = self.stack.tcp_set_nodelay(h, true);
        }
        if o.keepalive {
            let k = Keepalive {
                idle: Duration::from_secs(o.keep_idle.into()),
                interval: Duration::from_secs(o.keep_intvl.into()),
                probes: o.keep_cnt,
            };
            let _ = self.stack.tcp_set_keepalive(self.now, h, Some(k));
        }
    }

    /// The connection's error, reported once (`report`), like Linux's `sock_error()`.
    fn take_error(stack: &Stack, c: &mut Conn, report: bool) -> Option<Errno> {
        let e = stack.tcp_error(c.h).filter(|_| !c.err_taken)?;
        if report {
            c.err_taken = true;
        }
        Some(tcp_errno(e))
    }

    fn try_accept(&mut self, fd: c_int) -> Result<Option<(c_int, SocketAddr, bool)>, Errno> {
        let Inner { socks, stack, .. } = self;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let Kind::Listening { ls, ready, .. } = &mut sock.kind else {
            return Err(libc::EINVAL);
        };
        let Some((h, local, remote)) = ready
            .pop_front()
            .or_else(|| ls.iter().find_map(|l| stack.tcp_accept(*l)))
        else {
            return Ok(None);
        };
        let (v6, o) = (sock.v6, sock.o);
        let ph = match Placeholder::new() {
            Ok(ph) => ph,
            Err(e) => {
                self.stack.tcp_abort(self.now, h);
                return Err(e);
            }
        };
        self.apply_opts(h, &o);
        let nfd = self.insert(Sock {
            ph,
            v6,
            nonblock: false,
            cloexec: false,
            o,
            kind: Kind::Conn(Conn {
                h,
                connecting: false,
                err_taken: false,
                shut_rd: false,
                shut_wr: false,
            }),
        });
        trace!(self, "accept({fd}) = {nfd}: {local} <- {remote}");
        Ok(Some((nfd, remote, v6)))
    }

    /// Outcome of a pending `connect()`: `None` while the handshake runs.
    fn connect_outcome(&mut self, fd: c_int) -> Result<Option<()>, Errno> {
        let Inner { socks, stack, .. } = self;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let Kind::Conn(c) = &mut sock.kind else {
            return Err(libc::EBADF);
        };
        match stack.tcp_state(c.h) {
            Some(TcpState::SynSent | TcpState::SynReceived) => Ok(None),
            _ => {
                c.connecting = false;
                if let Some(e) = Self::take_error(stack, c, true) {
                    return Err(e);
                }
                match stack.tcp_state(c.h) {
                    Some(TcpState::Closed) | None => Err(libc::ECONNABORTED),
                    _ => Ok(Some(())),
                }
            }
        }
    }

    /// One read attempt: `Some(0)` at end of stream (or when an error is pending and
    /// `report` is off), `None` when it would block.
    fn try_read(
        &mut self,
        fd: c_int,
        buf: &mut [u8],
        report: bool,
    ) -> Result<Option<usize>, Errno> {
        let now = self.now;
        let Inner { socks, stack, .. } = self;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let Kind::Conn(c) = &mut sock.kind else {
            return Err(libc::ENOTCONN);
        };
        match stack.tcp_recv(now, c.h, buf) {
            Ok(n) => Ok(Some(n)),
            Err(IoError::WouldBlock | IoError::NotConnected) if c.shut_rd => Ok(Some(0)),
            Err(IoError::WouldBlock | IoError::NotConnected) => Ok(None),
            Err(IoError::Closed) => Ok(Some(0)),
            Err(IoError::Failed(_)) => match Self::take_error(stack, c, report) {
                Some(e) if report => Err(e),
                _ => Ok(Some(0)),
            },
            Err(IoError::Invalid) => Err(libc::EBADF),
        }
    }

    /// One write attempt: bytes taken, `None` when it would block.
    fn try_write(&mut self, fd: c_int, data: &[u8], report: bool) -> Result<Option<usize>, Errno> {
        let now = self.now;
        let Inner { socks, stack, .. } = self;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let Kind::Conn(c) = &mut sock.kind else {
            return Err(libc::EPIPE);
        };
        if let Some(e) = Self::take_error(stack, c, report) {
            return Err(if report { e } else { libc::EPIPE });
        }
        if c.shut_wr {
            return Err(libc::EPIPE);
        }
        match stack.tcp_state(c.h) {
            Some(TcpState::SynSent | TcpState::SynReceived) => return Ok(None),
            None => return Err(libc::EPIPE),
            _ => {}
        }
        if data.is_empty() {
            return Ok(Some(0));
        }
        match stack.tcp_send(now, c.h, data) {
            Ok(n) => Ok(Some(n)),
            Err(IoError::WouldBlock) => Ok(None),
            Err(IoError::Invalid) => Err(libc::EBADF),
            Err(_) => Err(libc::EPIPE),
        }
    }

    /// `poll()` readiness of one socket, before masking with the requested events.
    fn readiness(&mut self, fd: c_int) -> i16 {
        use libc::{
            POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, POLLRDHUP, POLLRDNORM, POLLWRNORM,
        };
        let Inner { socks, stack, .. } = self;
        let Some(sock) = socks.get_mut(&fd) else {
            return POLLNVAL;
        };
        match &mut sock.kind {
            Kind::Fresh { .. } => POLLOUT | POLLWRNORM | POLLHUP,
            Kind::Listening { ls, ready, .. } => {
                while let Some(c) = ls.iter().find_map(|l| stack.tcp_accept(*l)) {
                    ready.push_back(c);
                }
                if ready.is_empty() {
                    0
                } else {
                    POLLIN | POLLRDNORM
                }
            }
            Kind::Conn(c) => {
                let st = stack.tcp_state(c.h);
                let mut m = 0;
                if stack.tcp_error(c.h).is_some() && !c.err_taken {
                    m |= POLLERR;
                }
                if matches!(st, Some(TcpState::SynSent | TcpState::SynReceived)) {
                    return m;
                }
                use TcpState::*;
                let fin_in = c.shut_rd
                    || matches!(
                        st,
                        Some(CloseWait | LastAck | Closing | TimeWait | Closed) | None
                    );
                let send_shut = c.shut_wr
                    || matches!(
                        st,
                        Some(FinWait1 | FinWait2 | Closing | LastAck | TimeWait | Closed) | None
                    );
                if fin_in && send_shut {
                    m |= POLLHUP;
                }
                if fin_in {
                    m |= POLLIN | POLLRDNORM | POLLRDHUP;
                }
                if stack.tcp_readable(c.h) > 0 {
                    m |= POLLIN | POLLRDNORM;
                }
                // The stack has no "send space" query (a zero-byte send is WouldBlock): an
                // open sending side counts as writable, a full send buffer included.
                if !send_shut && matches!(st, Some(Established | CloseWait)) {
                    m |= POLLOUT | POLLWRNORM;
                }
                m
            }
        }
    }

    fn poll_once(&mut self, fds: &mut [libc::pollfd]) -> c_int {
        let mut n = 0;
        for p in fds.iter_mut() {
            p.revents = 0;
            if p.fd < 0 {
                continue;
            }
            let m = self.readiness(p.fd);
            p.revents = m & (p.events | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL);
            if p.revents != 0 {
                n += 1;
            }
        }
        self.drain();
        n
    }
}

/// One attempt of a blocking call: finished, or try again once something changed.
enum Step<T> {
    Done(Result<T, Errno>),
    Again,
}

/// The adapter: everything packetdrill's function table reaches, behind one mutex.
pub struct Adapter {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter").finish_non_exhaustive()
    }
}

fn int_opt(val: &[u8]) -> Result<c_int, Errno> {
    let b: [u8; 4] = val
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(libc::EINVAL)?;
    Ok(c_int::from_ne_bytes(b))
}

fn timeval_opt(val: &[u8]) -> Result<Option<Duration>, Errno> {
    if val.len() < std::mem::size_of::<libc::timeval>() {
        return Err(libc::EINVAL);
    }
    // SAFETY: `val` holds at least a timeval's bytes; read_unaligned needs no alignment.
    let tv = unsafe { std::ptr::read_unaligned(val.as_ptr().cast::<libc::timeval>()) };
    if tv.tv_sec < 0 || !(0..1_000_000).contains(&tv.tv_usec) {
        return Err(libc::EDOM);
    }
    let d = Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
    Ok((!d.is_zero()).then_some(d))
}

fn timeval_bytes(d: Option<Duration>) -> Vec<u8> {
    let d = d.unwrap_or_default();
    let mut v = (d.as_secs() as libc::time_t).to_ne_bytes().to_vec();
    v.extend((d.subsec_micros() as libc::suseconds_t).to_ne_bytes());
    v
}

fn int_bytes(v: c_int) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

impl Adapter {
    /// A stack configured from `flags`, at virtual time zero.
    pub fn new(flags: Flags) -> Result<Adapter, String> {
        let mut cfg = Config::new(STACK_MAC, flags.prefixes.clone());
        cfg.mtu = flags.mtu;
        // Fixed: the same script sees the same ISNs and ports on every run.
        cfg.hash_key = Some(HashKey([0x5d; 16]));
        cfg.tcp.timestamps = flags.timestamps;
        cfg.tcp.sack = flags.sack;
        cfg.tcp.syncookies = flags.syncookies;
        cfg.tcp.nagle = flags.nagle;
        if let Some(d) = flags.delayed_ack {
            cfg.tcp.delayed_ack = d;
        }
        if let Some(d) = flags.time_wait {
            cfg.tcp.time_wait = d;
        }
        if let Some(n) = flags.syn_retries {
            cfg.tcp.syn_retries = n;
        }
        if let Some(n) = flags.retries {
            cfg.tcp.max_retries = n;
        }
        if let Some(n) = flags.rcvbuf {
            cfg.tcp.recv_buffer = n;
        }
        if let Some(n) = flags.sndbuf {
            cfg.tcp.send_buffer = n;
        }
        let batch = Batch::new(64, flags.mtu + 64);
        let stack = Stack::new(cfg).map_err(|e| e.to_string())?;
        Ok(Adapter {
            inner: Mutex::new(Inner {
                stack,
                flags,
                now: START,
                out: VecDeque::new(),
                batch,
                socks: HashMap::new(),
                driver: None,
                gen: 0,
                waiters: HashMap::new(),
                finished: HashMap::new(),
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic inside a call is caught at the FFI boundary; the state is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks for a socket call; a new call from a non-driving thread forgets the end time of
    /// its previous blocking call.
    fn enter(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        if !g.self_driven() {
            g.finished.remove(&thread::current().id());
        }
        g
    }

    /// Signals a change: other threads' blocking calls look again, and the driving thread
    /// waits for them to have looked before it moves the clock (see [`settle`](Self::settle)).
    fn changed(&self, g: &mut Inner) {
        if g.self_driven() {
            g.gen += 1;
        }
        self.cv.notify_all();
    }

    /// Lets every thread blocked in a call look at the latest change, at the current time,
    /// before the driving thread moves on (up to [`SETTLE_CAP`] of real time).
    fn settle<'a>(&self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        if !g.self_driven() {
            return g;
        }
        let real = Instant::now();
        while g.waiters.values().any(|w| w.seen < g.gen) {
            if real.elapsed() >= SETTLE_CAP {
                trace!(
                    g,
                    "a blocked call did not look at the latest change in time"
                );
                break;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(5))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        g
    }

    /// Moves the clock to `target` (never back): each stack timer fires at its own instant,
    /// and blocked calls look at every change, and at their deadlines, as they happen.
    fn advance<'a>(&self, mut g: MutexGuard<'a, Inner>, target: Duration) -> MutexGuard<'a, Inner> {
        for _ in 0..MAX_ROUNDS {
            g = self.settle(g);
            let now = g.now;
            let timer = g.stack.poll_timeout().filter(|t| *t <= target);
            let wake = g
                .waiters
                .values()
                .map(|w| w.deadline)
                .filter(|d| *d > now && *d <= target)
                .min();
            let Some(t) = [timer, wake].into_iter().flatten().min() else {
                break;
            };
            g.now = now.max(t);
            if timer.is_some_and(|d| d <= g.now) {
                let now = g.now;
                g.stack.handle_timeout(now);
                g.drain();
            }
            self.changed(&mut g);
        }
        g.now = g.now.max(target);
        g
    }

    /// Runs `step` until it is done. While it is not: a non-blocking call gives up at once
    /// (`None`); the driving thread moves the virtual clock itself, timer by timer, up to
    /// `limit`; any other thread sleeps until the driving thread changes something, up to
    /// `limit` of virtual time or [`REAL_CAP`] of real time. `None` means it gave up.
    fn run<T>(
        &self,
        mut g: MutexGuard<'_, Inner>,
        nonblock: bool,
        limit: Duration,
        mut step: impl FnMut(&mut Inner) -> Step<T>,
    ) -> Option<Result<T, Errno>> {
        let me = thread::current().id();
        let deadline = g.now.saturating_add(limit);
        let real = Instant::now();
        let finish = |g: &mut Inner| {
            g.waiters.remove(&me);
            if !g.self_driven() {
                g.finished.insert(me, g.now);
            }
        };
        loop {
            let r = step(&mut g);
            g.drain();
            self.changed(&mut g);
            if let Step::Done(r) = r {
                finish(&mut g);
                self.cv.notify_all();
                return Some(r);
            }
            if nonblock || g.now >= deadline {
                finish(&mut g);
                self.cv.notify_all();
                return None;
            }
            if g.self_driven() {
                let now = g.now;
                let next = g
                    .stack
                    .poll_timeout()
                    .map_or(deadline, |t| t.min(deadline))
                    .max(now + Duration::from_millis(1))
                    .min(deadline);
                g = self.advance(g, next);
            } else {
                if real.elapsed() >= REAL_CAP {
                    trace!(g, "gave up after {REAL_CAP:?} of real time");
                    finish(&mut g);
                    self.cv.notify_all();
                    return None;
                }
                let seen = g.gen;
                g.waiters.insert(me, Waiter { seen, deadline });
                self.cv.notify_all();
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }

    // ---- clock and link ---------------------------------------------------------------

    /// `gettimeofday()`: the virtual wall clock. Calls from the driving thread move it by the
    /// `tick` flag (so that packetdrill's spin-waits end); a thread whose blocking call just
    /// ended gets that call's end time.
    pub fn gettimeofday(&self) -> Duration {
        let me = thread::current().id();
        let mut g = self.lock();
        if let Some(t) = g.finished.remove(&me) {
            return EPOCH + (t - START);
        }
        g.driver.get_or_insert(me);
        if g.self_driven() {
            let t = g.now + g.flags.tick;
            g = self.advance(g, t);
        }
        g.wall()
    }

    /// `usleep()`: moves the virtual clock, running the stack's timers on the way.
    pub fn usleep(&self, d: Duration) {
        let mut g = self.lock();
        g.driver = Some(thread::current().id());
        let t = g.now + d;
        drop(self.advance(g, t));
    }

    /// `netdev_send()`: an IP packet from packetdrill, delivered to the stack in an Ethernet
    /// frame now.
    pub fn netdev_send(&self, ip: &[u8]) -> Result<(), Errno> {
        let mut g = self.lock();
        g.driver = Some(thread::current().id());
        let (ethertype, src): (u16, IpAddr) = match ip.first().map(|b| b >> 4) {
            Some(4) if ip.len() >= 20 => (
                0x0800,
                IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
            ),
            Some(6) if ip.len() >= 40 => {
                let s: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
                (0x86dd, IpAddr::V6(s.into()))
            }
            _ => return Err(libc::EINVAL),
        };
        let mut g = self.settle(g);
        if g.flags.log {
            g.trace(format_args!("in  {}", summarize(ip)));
        }
        let mut frame = Vec::with_capacity(14 + ip.len());
        frame.extend_from_slice(&STACK_MAC);
        frame.extend_from_slice(&PEER_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(ip);
        let now = g.now;
        if !src.is_unspecified() && !src.is_multicast() {
            // packetdrill's addresses are all behind its end of the link.
            g.stack.teach_neighbor(now, src, PEER_MAC);
        }
        g.stack.handle_frame(now, &frame, FrameMeta::default());
        g.drain();
        self.changed(&mut g);
        Ok(())
    }

    /// `netdev_receive()`: the stack's next outgoing IP packet and its (virtual wall clock)
    /// send time, copied into `buf` (truncated if longer). With nothing queued the clock
    /// jumps to the stack's next timer, up to the `block_ms` flag; `None` when nothing came.
    pub fn netdev_receive(&self, buf: &mut [u8]) -> Option<(usize, Duration)> {
        let mut g = self.lock();
        g.driver = Some(thread::current().id());
        let start = g.now;
        let horizon = start.saturating_add(g.flags.block_timeout);
        let real = Instant::now();
        for _ in 0..MAX_ROUNDS {
            g = self.settle(g);
            g.drain();
            if let Some(p) = g.out.pop_front() {
                let n = p.ip.len().min(buf.len());
                buf[..n].copy_from_slice(&p.ip[..n]);
                return Some((n, EPOCH + (p.at - START)));
            }
            let now = g.now;
            let next = [
                g.stack.poll_timeout(),
                g.waiters
                    .values()
                    .map(|w| w.deadline)
                    .filter(|d| *d > now)
                    .min(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= horizon => g = self.advance(g, t.max(now)),
                _ => {
                    // Nothing will happen unless another thread acts: give it a moment.
                    if real.elapsed() >= IDLE_GRACE {
                        break;
                    }
                    g = self
                        .cv
                        .wait_timeout(g, Duration::from_millis(5))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
        }
        // packetdrill reports this as a 0-byte packet: say what it means.
        eprintln!(
            "subnetstack-packetdrill: the stack sent no packet (waited {:.3} s of virtual time; \
             nothing scheduled within block_ms)",
            (g.now - start).as_secs_f64()
        );
        None
    }

    // ---- sockets ----------------------------------------------------------------------

    /// `socket()`: TCP over `AF_INET` or `AF_INET6` only.
    pub fn socket(&self, domain: c_int, ty: c_int, proto: c_int) -> Result<c_int, Errno> {
        let v6 = match domain {
            libc::AF_INET => false,
            libc::AF_INET6 => true,
            _ => return Err(libc::EAFNOSUPPORT),
        };
        if ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != libc::SOCK_STREAM {
            return Err(libc::EPROTONOSUPPORT);
        }
        if proto != 0 && proto != libc::IPPROTO_TCP {
            return Err(libc::EPROTONOSUPPORT);
        }
        let ph = Placeholder::new()?;
        let mut g = self.enter();
        let fd = g.insert(Sock {
            ph,
            v6,
            nonblock: ty & libc::SOCK_NONBLOCK != 0,
            cloexec: ty & libc::SOCK_CLOEXEC != 0,
            o: Opts::default(),
            kind: Kind::Fresh { bound: None },
        });
        trace!(
            g,
            "socket({}) = {fd}",
            if v6 { "AF_INET6" } else { "AF_INET" }
        );
        Ok(fd)
    }

    /// `bind()`: remembers the address (an unspecified address means every local prefix of
    /// the family); conflicts show at `listen()`.
    pub fn bind(&self, fd: c_int, a: AppAddr) -> Result<(), Errno> {
        let mut g = self.enter();
        let Inner { socks, stack, .. } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        if a.v6_family != sock.v6 {
            return Err(if sock.v6 {
                libc::EINVAL
            } else {
                libc::EAFNOSUPPORT
            });
        }
        let Kind::Fresh {
            bound: bound @ None,
        } = &mut sock.kind
        else {
            return Err(libc::EINVAL);
        };
        let ip = a.addr.ip();
        if !ip.is_unspecified() && !stack.is_local(ip) {
            return Err(libc::EADDRNOTAVAIL);
        }
        *bound = Some(a.addr);
        trace!(g, "bind({fd}, {})", a.addr);
        Ok(())
    }

    /// `listen()`: one stack listener per prefix the bound address covers.
    pub fn listen(&self, fd: c_int, backlog: c_int) -> Result<(), Errno> {
        let mut g = self.enter();
        let now = g.now;
        let Inner {
            socks,
            stack,
            flags,
            ..
        } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let a = match &sock.kind {
            Kind::Fresh { bound: Some(a) } => *a,
            Kind::Fresh { bound: None } => return Err(libc::EDESTADDRREQ),
            Kind::Listening { .. } => return Ok(()),
            Kind::Conn(_) => return Err(libc::EINVAL),
        };
        let prefixes: Vec<IpNet> = if a.ip().is_unspecified() {
            let dual = sock.v6 && !sock.o.v6only;
            flags
                .prefixes
                .iter()
                .filter(|p| matches!(p, IpNet::V6(_)) == a.is_ipv6() || dual)
                .copied()
                .collect()
        } else {
            vec![IpNet::from(a.ip())]
        };
        let backlog = backlog.clamp(1, 65535) as usize;
        let ports: Vec<u16> = if a.port() == 0 {
            (32768..=60999).collect()
        } else {
            vec![a.port()]
        };
        let mut last = libc::EADDRINUSE;
        for port in ports {
            let spec = PortSpec::exact(port).map_err(bind_errno)?;
            let mut ls = Vec::new();
            let mut failed = None;
            for p in &prefixes {
                match stack.tcp_listen(*p, spec, sock.o.reuseport, backlog) {
                    Ok(l) => ls.push(l),
                    Err(e) => {
                        failed = Some(bind_errno(e));
                        break;
                    }
                }
            }
            match failed {
                None => {
                    let local = SocketAddr::new(a.ip(), port);
                    sock.kind = Kind::Listening {
                        local,
                        ls,
                        ready: VecDeque::new(),
                    };
                    trace!(g, "listen({fd}) on {local} ({} prefixes)", prefixes.len());
                    return Ok(());
                }
                Some(e) => {
                    for l in ls {
                        stack.tcp_listener_close(now, l);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// `accept()`: `(new fd, peer, peer as IPv6)`.
    pub fn accept(&self, fd: c_int) -> Result<(c_int, SocketAddr, bool), Errno> {
        let mut g = self.enter();
        let s = g.sock(fd)?;
        let (nonblock, limit) = (s.nonblock, s.o.rcvtimeo);
        let limit = limit.unwrap_or(g.flags.block_timeout);
        self.run(g, nonblock, limit, |g| match g.try_accept(fd) {
            Ok(Some(r)) => Step::Done(Ok(r)),
            Ok(None) => Step::Again,
            Err(e) => Step::Done(Err(e)),
        })
        .unwrap_or(Err(libc::EAGAIN))
    }

    /// `connect()`.
    pub fn connect(&self, fd: c_int, a: AppAddr) -> Result<(), Errno> {
        let mut g = self.enter();
        let now = g.now;
        let Inner {
            socks,
            stack,
            flags,
            ..
        } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        if a.v6_family != sock.v6 {
            return Err(libc::EAFNOSUPPORT);
        }
        let (nonblock, sndtimeo, o) = (sock.nonblock, sock.o.sndtimeo, sock.o);
        match &mut sock.kind {
            Kind::Listening { .. } => return Err(libc::EISCONN),
            Kind::Conn(c) if !c.connecting => return Err(libc::EISCONN),
            Kind::Conn(_) => {
                // A second connect() on a connecting socket.
                return match g.connect_outcome(fd) {
                    Ok(None) => Err(libc::EALREADY),
                    Ok(Some(())) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            Kind::Fresh { bound } => {
                let remote = a.addr;
                if sock.v6 && remote.is_ipv4() && o.v6only {
                    return Err(libc::ENETUNREACH);
                }
                let local = match *bound {
                    Some(b) if !b.ip().is_unspecified() => b,
                    b => SocketAddr::new(
                        flags.source(remote.is_ipv6()).ok_or(libc::EADDRNOTAVAIL)?,
                        b.map_or(0, |b| b.port()),
                    ),
                };
                let h = stack.tcp_connect(now, local, remote).map_err(|e| match e {
                    ConnectError::NonLocalSource(_) => libc::EADDRNOTAVAIL,
                    ConnectError::FamilyMismatch => libc::EAFNOSUPPORT,
                    ConnectError::PortZero => libc::EINVAL,
                    ConnectError::AddrInUse if local.port() != 0 => libc::EADDRINUSE,
                    ConnectError::AddrInUse => libc::EADDRNOTAVAIL,
                    ConnectError::Limit => libc::ENOBUFS,
                })?;
                let local = stack.tcp_local_addr(h).unwrap_or(local);
                sock.kind = Kind::Conn(Conn {
                    h,
                    connecting: true,
                    err_taken: false,
                    shut_rd: false,
                    shut_wr: false,
                });
                g.apply_opts(h, &o);
                trace!(g, "connect({fd}): {local} -> {remote}");
            }
        }
        if nonblock {
            g.drain();
            self.changed(&mut g);
            return Err(libc::EINPROGRESS);
        }
        let limit = sndtimeo.unwrap_or(g.flags.block_timeout);
        self.run(g, false, limit, |g| match g.connect_outcome(fd) {
            Ok(None) => Step::Again,
            Ok(Some(())) => Step::Done(Ok(())),
            Err(e) => Step::Done(Err(e)),
        })
        .unwrap_or(Err(if sndtimeo.is_some() {
            libc::EINPROGRESS
        } else {
            libc::ETIMEDOUT
        }))
    }

    /// `read()`/`recv()`: `flags` may hold `MSG_DONTWAIT` and `MSG_WAITALL` (others are
    /// `EOPNOTSUPP`, apart from `MSG_NOSIGNAL` and `MSG_CMSG_CLOEXEC`, which mean nothing
    /// here).
    pub fn read(&self, fd: c_int, buf: &mut [u8], flags: c_int) -> Result<usize, Errno> {
        if flags
            & !(libc::MSG_DONTWAIT
                | libc::MSG_WAITALL
                | libc::MSG_NOSIGNAL
                | libc::MSG_CMSG_CLOEXEC)
            != 0
        {
            return Err(libc::EOPNOTSUPP);
        }
        let mut g = self.enter();
        let s = g.sock(fd)?;
        let nonblock = s.nonblock || flags & libc::MSG_DONTWAIT != 0;
        let limit = s.o.rcvtimeo.unwrap_or(g.flags.block_timeout);
        let waitall = flags & libc::MSG_WAITALL != 0;
        let len = buf.len();
        let mut got = 0;
        let r = self.run(g, nonblock, limit, |g| {
            match g.try_read(fd, &mut buf[got..], got == 0) {
                Ok(Some(0)) => Step::Done(Ok(got)),
                Ok(Some(n)) => {
                    got += n;
                    if !waitall || got == len {
                        Step::Done(Ok(got))
                    } else {
                        Step::Again
                    }
                }
                Ok(None) => Step::Again,
                Err(e) => Step::Done(if got > 0 { Ok(got) } else { Err(e) }),
            }
        });
        r.unwrap_or(if got > 0 { Ok(got) } else { Err(libc::EAGAIN) })
    }

    /// `write()`/`send()`: a blocking socket waits until everything is queued; `flags` may
    /// hold `MSG_DONTWAIT` and `MSG_NOSIGNAL` (others are `EOPNOTSUPP`).
    pub fn write(&self, fd: c_int, data: &[u8], flags: c_int) -> Result<usize, Errno> {
        if flags & !(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let mut g = self.enter();
        let s = g.sock(fd)?;
        let nonblock = s.nonblock || flags & libc::MSG_DONTWAIT != 0;
        let limit = s.o.sndtimeo.unwrap_or(g.flags.block_timeout);
        let mut done = 0;
        let r = self.run(g, nonblock, limit, |g| {
            match g.try_write(fd, &data[done..], done == 0) {
                Ok(Some(n)) => {
                    done += n;
                    if done == data.len() {
                        Step::Done(Ok(done))
                    } else {
                        Step::Again
                    }
                }
                Ok(None) => Step::Again,
                Err(e) => Step::Done(if done > 0 { Ok(done) } else { Err(e) }),
            }
        });
        r.unwrap_or(if done > 0 {
            Ok(done)
        } else {
            Err(libc::EAGAIN)
        })
    }

    /// `close()`: listeners stop (connections not yet accepted are reset), connections close
    /// gracefully (reset with `SO_LINGER` of zero seconds).
    pub fn close(&self, fd: c_int) -> Result<(), Errno> {
        let mut g = self.enter();
        let sock = g.socks.remove(&fd).ok_or(libc::EBADF)?;
        trace!(g, "close({fd})");
        g.teardown(sock);
        self.changed(&mut g);
        Ok(())
    }

    /// `shutdown()`.
    pub fn shutdown(&self, fd: c_int, how: c_int) -> Result<(), Errno> {
        if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
            return Err(libc::EINVAL);
        }
        let mut g = self.enter();
        let now = g.now;
        let Inner { socks, stack, .. } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let r = match &mut sock.kind {
            Kind::Fresh { .. } => Err(libc::ENOTCONN),
            Kind::Listening { local, ls, ready } => {
                let local = *local;
                if how != libc::SHUT_WR {
                    for (h, _, _) in ready.drain(..) {
                        stack.tcp_abort(now, h);
                    }
                    for l in ls.drain(..) {
                        stack.tcp_listener_close(now, l);
                    }
                    sock.kind = Kind::Fresh { bound: Some(local) };
                }
                Ok(())
            }
            Kind::Conn(c) => {
                let closed = matches!(stack.tcp_state(c.h), Some(TcpState::Closed) | None);
                if how != libc::SHUT_RD && !c.shut_wr {
                    c.shut_wr = true;
                    stack.tcp_shutdown(now, c.h);
                }
                if how != libc::SHUT_WR {
                    c.shut_rd = true;
                }
                if closed {
                    Err(libc::ENOTCONN)
                } else {
                    Ok(())
                }
            }
        };
        trace!(g, "shutdown({fd}, {how}) = {r:?}");
        g.drain();
        self.changed(&mut g);
        r
    }

    /// `setsockopt()`: see the crate docs for the options understood.
    pub fn setsockopt(
        &self,
        fd: c_int,
        level: c_int,
        name: c_int,
        val: &[u8],
    ) -> Result<(), Errno> {
        let mut g = self.enter();
        let now = g.now;
        let Inner { socks, stack, .. } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let conn = match &sock.kind {
            Kind::Conn(c) => Some(c.h),
            _ => None,
        };
        let o = &mut sock.o;
        let mut keepalive_changed = false;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr = int_opt(val)? != 0,
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => o.reuseport = int_opt(val)? != 0,
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => {
                o.keepalive = int_opt(val)? != 0;
                keepalive_changed = true;
            }
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                if val.len() < 8 {
                    return Err(libc::EINVAL);
                }
                let on = int_opt(&val[..4])?;
                let secs = int_opt(&val[4..8])?;
                o.linger = (on != 0).then_some(secs.max(0) as u32);
            }
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => o.rcvtimeo = timeval_opt(val)?,
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => o.sndtimeo = timeval_opt(val)?,
            // Accepted and remembered; the stack's buffers are sized per stack (flags).
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rcvbuf = Some(int_opt(val)?),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sndbuf = Some(int_opt(val)?),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => {
                o.nodelay = int_opt(val)? != 0;
                if let Some(h) = conn {
                    let _ = stack.tcp_set_nodelay(h, o.nodelay);
                }
            }
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE | libc::TCP_KEEPINTVL | libc::TCP_KEEPCNT) => {
                let v = int_opt(val)?;
                if v < 1 {
                    return Err(libc::EINVAL);
                }
                match name {
                    libc::TCP_KEEPIDLE => o.keep_idle = v as u32,
                    libc::TCP_KEEPINTVL => o.keep_intvl = v as u32,
                    _ => o.keep_cnt = v as u32,
                }
                keepalive_changed = o.keepalive;
            }
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if sock.v6 => o.v6only = int_opt(val)? != 0,
            _ => return Err(libc::ENOPROTOOPT),
        }
        if let (Some(h), true) = (conn, keepalive_changed) {
            let k = o.keepalive.then(|| Keepalive {
                idle: Duration::from_secs(o.keep_idle.into()),
                interval: Duration::from_secs(o.keep_intvl.into()),
                probes: o.keep_cnt,
            });
            let _ = stack.tcp_set_keepalive(now, h, k);
        }
        trace!(g, "setsockopt({fd}, {level}, {name}) ok");
        g.drain();
        self.changed(&mut g);
        Ok(())
    }

    /// `getsockopt()`: the option's bytes (the caller truncates to its buffer).
    pub fn getsockopt(&self, fd: c_int, level: c_int, name: c_int) -> Result<Vec<u8>, Errno> {
        let mut g = self.enter();
        let Inner {
            socks,
            stack,
            flags,
            ..
        } = &mut *g;
        let sock = socks.get_mut(&fd).ok_or(libc::EBADF)?;
        let o = sock.o;
        let b = |v: bool| int_bytes(c_int::from(v));
        Ok(match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => int_bytes(match &mut sock.kind {
                Kind::Conn(c) => Inner::take_error(stack, c, true).unwrap_or(0),
                _ => 0,
            }),
            (libc::SOL_SOCKET, libc::SO_TYPE) => int_bytes(libc::SOCK_STREAM),
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => int_bytes(libc::IPPROTO_TCP),
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => int_bytes(if sock.v6 {
                libc::AF_INET6
            } else {
                libc::AF_INET
            }),
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => {
                b(matches!(sock.kind, Kind::Listening { .. }))
            }
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => b(o.reuseaddr),
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => b(o.reuseport),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => b(o.keepalive),
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let mut v = int_bytes(c_int::from(o.linger.is_some()));
                v.extend(int_bytes(o.linger.unwrap_or(0) as c_int));
                v
            }
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => timeval_bytes(o.rcvtimeo),
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => timeval_bytes(o.sndtimeo),
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => int_bytes(
                o.rcvbuf
                    .unwrap_or_else(|| flags.rcvbuf.unwrap_or(256 * 1024) as c_int),
            ),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => int_bytes(
                o.sndbuf
                    .unwrap_or_else(|| flags.sndbuf.unwrap_or(256 * 1024) as c_int),
            ),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => b(o.nodelay),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => int_bytes(o.keep_idle as c_int),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => int_bytes(o.keep_intvl as c_int),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => int_bytes(o.keep_cnt as c_int),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if sock.v6 => b(o.v6only),
            _ => return Err(libc::ENOPROTOOPT),
        })
    }

    /// `fcntl()`: `F_GETFL`/`F_SETFL` (`O_NONBLOCK`) and `F_GETFD`/`F_SETFD`; other commands
    /// are `EINVAL`.
    pub fn fcntl(&self, fd: c_int, cmd: c_int, arg: c_int) -> Result<c_int, Errno> {
        let mut g = self.enter();
        let s = g.sock(fd)?;
        match cmd {
            libc::F_GETFL => Ok(libc::O_RDWR | if s.nonblock { libc::O_NONBLOCK } else { 0 }),
            libc::F_SETFL => {
                s.nonblock = arg & libc::O_NONBLOCK != 0;
                Ok(0)
            }
            libc::F_GETFD => Ok(if s.cloexec { libc::FD_CLOEXEC } else { 0 }),
            libc::F_SETFD => {
                s.cloexec = arg & libc::FD_CLOEXEC != 0;
                Ok(0)
            }
            _ => Err(libc::EINVAL),
        }
    }

    /// `ioctl(FIONBIO)`.
    pub fn set_nonblocking(&self, fd: c_int, on: bool) -> Result<(), Errno> {
        self.enter().sock(fd)?.nonblock = on;
        Ok(())
    }

    /// `ioctl(FIONREAD)` (`SIOCINQ`): bytes waiting to be read.
    pub fn readable(&self, fd: c_int) -> Result<c_int, Errno> {
        let mut g = self.enter();
        let Inner { socks, stack, .. } = &mut *g;
        match &socks.get(&fd).ok_or(libc::EBADF)?.kind {
            Kind::Conn(c) => Ok(stack.tcp_readable(c.h).min(c_int::MAX as usize) as c_int),
            _ => Err(libc::EINVAL),
        }
    }

    /// `poll()`: a negative timeout waits up to the `block_ms` flag, then fails with `EINTR`.
    pub fn poll(&self, fds: &mut [libc::pollfd], timeout_ms: c_int) -> Result<c_int, Errno> {
        let g = self.enter();
        let limit = if timeout_ms >= 0 {
            Duration::from_millis(timeout_ms as u64)
        } else {
            g.flags.block_timeout
        };
        let r = self.run(g, timeout_ms == 0, limit, |g| match g.poll_once(fds) {
            0 => Step::Again,
            n => Step::Done(Ok(n)),
        });
        match r {
            Some(r) => r,
            None if timeout_ms < 0 => Err(libc::EINTR),
            None => Ok(0),
        }
    }

    /// How many calls are blocked in threads other than the driving one (for tests).
    pub fn blocked_calls(&self) -> usize {
        self.lock().waiters.len()
    }

    /// How many sockets are open (for tests).
    pub fn sockets(&self) -> usize {
        self.lock().socks.len()
    }

    /// Virtual time since the adapter started.
    pub fn elapsed(&self) -> Duration {
        self.lock().now - START
    }
}
