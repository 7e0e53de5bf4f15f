//! The runtime: a [`Stack`] on a poll thread over a device, and the plumbing that lets
//! application threads use it through [`TcpListener`](crate::TcpListener),
//! [`TcpStream`](crate::TcpStream) and [`UdpSocket`](crate::UdpSocket).
//!
//! Application threads and the poll thread meet in three places: a bounded command channel
//! (`crossbeam`) for control (listen, connect, bind, send a datagram), one pair of bounded byte
//! rings per connection (the poll thread moves bytes between them and the connection, the
//! application reads and writes them), and an `eventfd` that wakes the poll thread when it
//! sleeps. Rings and queues are bounded: a full ring makes the writer wait (or time out), never
//! buffer more.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ipnet::IpNet;
use subnetstack_demux::{BindError, BindPolicy, HashKey, PortSpec};
use subnetstack_ifaces::pcap::Capture;
use subnetstack_ifaces::tap::{Tap, TapConfig};
use subnetstack_ifaces::xdp::{Xdp, XdpConfig};
use subnetstack_ifaces::{Batch, Clock, Device, FrameMeta, Mac, SystemClock};
use subnetstack_stack::poll::Driver;
use subnetstack_stack::{
    Config, ConnectError, Counters, IoError, ListenerStats, SendError, Stack, TcpConfig, TcpError,
    TcpHandle, TcpListenerHandle, TcpState, UdpHandle, UdpSocketStats,
};

/// How the poll thread waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Never sleeps: lowest latency, one core at 100 %.
    Busy,
    /// Spins for this long after the last work, then sleeps on the device and the wakeup fd.
    /// The default (50 µs): about no CPU when idle, little latency under load.
    Adaptive(Duration),
    /// Sleeps whenever there is nothing to do.
    Blocking,
}

impl Default for PollMode {
    fn default() -> Self {
        PollMode::Adaptive(Duration::from_micros(50))
    }
}

/// Application logic that runs on the poll thread itself, after every poll round, with the
/// [`Stack`] in hand: zero thread crossings and no copies beyond the stack's own buffers
/// (`tcp_accept`, `tcp_recv`, `tcp_send`, `udp_recv`... directly). Returns whether it did
/// anything (so that an adaptive poll thread keeps spinning while there is work). It must not
/// block.
pub type InLoop = Box<dyn FnMut(&mut Stack, Duration) -> bool + Send>;

/// Configures and starts a [`Runtime`].
pub struct Builder {
    in_loop: Option<InLoop>,
    prefixes: Vec<IpNet>,
    tap: Option<TapConfig>,
    xdp: Option<XdpConfig>,
    devices: Vec<Box<dyn Device>>,
    mac: Option<Mac>,
    gateway_v4: Option<Ipv4Addr>,
    gateway_v6: Option<Ipv6Addr>,
    tcp: TcpConfig,
    bind_policy: BindPolicy,
    poll: PollMode,
    pcap: Option<PathBuf>,
    hash_key: Option<HashKey>,
    ring: usize,
    grace: Duration,
    queues: usize,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("prefixes", &self.prefixes)
            .field("tap", &self.tap.as_ref().map(|t| &t.name))
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            in_loop: None,
            prefixes: Vec::new(),
            tap: None,
            xdp: None,
            devices: Vec::new(),
            mac: None,
            gateway_v4: None,
            gateway_v6: None,
            tcp: TcpConfig::default(),
            bind_policy: BindPolicy::default(),
            poll: PollMode::default(),
            pcap: None,
            hash_key: None,
            ring: 256 * 1024,
            grace: Duration::from_secs(5),
            queues: 1,
        }
    }
}

impl Builder {
    /// Adds a local prefix: the stack answers for every address in it.
    pub fn prefix(mut self, p: IpNet) -> Self {
        self.prefixes.push(p);
        self
    }

    /// Runs on the TAP interface `name` (created if absent, attached if it exists; the caller
    /// configures the kernel side), with virtio-net offloads on: the stack sends TCP
    /// super-frames for the kernel to segment (TSO) and leaves checksums to it, and takes the
    /// kernel's GSO super-frames. [`tap_config`](Self::tap_config) with
    /// [`TapConfig::offload`] off sends and takes only MTU-sized, checksummed frames.
    pub fn tap(mut self, name: &str) -> Self {
        let mut t = TapConfig::new(name);
        t.queues = self.queues;
        t.offload = true;
        self.tap = Some(t);
        self
    }

    /// Runs on a TAP opened with this configuration (queues, offloads, MAC).
    pub fn tap_config(mut self, cfg: TapConfig) -> Self {
        self.tap = Some(cfg);
        self
    }

    /// Runs on interface `name` with AF_XDP, one socket (and shard) per queue: an XDP program
    /// steers the frames for the local prefixes to the stack and leaves the rest to the kernel
    /// (see [`subnetstack_ifaces::xdp`]). The stack uses the interface's MAC.
    pub fn xdp(self, name: &str) -> Self {
        self.xdp_config(XdpConfig::new(name, Vec::new()))
    }

    /// Runs on AF_XDP with this configuration (modes, sizes); its queue count and prefixes are
    /// the builder's ([`queues`](Self::queues), [`prefix`](Self::prefix)) when it has none.
    pub fn xdp_config(mut self, cfg: XdpConfig) -> Self {
        self.xdp = Some(cfg);
        self
    }

    /// Runs on an already opened device (a TAP queue, a memory pair end, an impaired device).
    /// Call it again to add devices: each gets its own poll thread (shard).
    pub fn device(mut self, dev: Box<dyn Device>) -> Self {
        self.devices.push(dev);
        self
    }

    /// Opens the TAP with this many queues, one poll thread (shard) each. The kernel spreads
    /// flows over the queues; a connection lives in the shard its first packet reached (or, for
    /// connections the runtime opens, the shard that sent the SYN, which the kernel then keeps
    /// the flow on).
    pub fn queues(mut self, n: usize) -> Self {
        if let Some(t) = self.tap.as_mut() {
            t.queues = n.max(1);
        }
        self.queues = n.max(1);
        self
    }

    /// The stack's MAC (default: the device's).
    pub fn mac(mut self, mac: Mac) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Next hop for IPv4 destinations outside the local prefixes.
    pub fn gateway_v4(mut self, g: Ipv4Addr) -> Self {
        self.gateway_v4 = Some(g);
        self
    }

    /// Next hop for IPv6 destinations outside the local prefixes.
    pub fn gateway_v6(mut self, g: Ipv6Addr) -> Self {
        self.gateway_v6 = Some(g);
        self
    }

    /// TCP settings (buffers, congestion control, SYN cookies, timers).
    pub fn tcp(mut self, cfg: TcpConfig) -> Self {
        self.tcp = cfg;
        self
    }

    /// How overlapping bindings are judged (see the README's bind semantics).
    pub fn bind_policy(mut self, p: BindPolicy) -> Self {
        self.bind_policy = p;
        self
    }

    /// How the poll thread waits.
    pub fn poll_mode(mut self, m: PollMode) -> Self {
        self.poll = m;
        self
    }

    /// Writes every frame in and out to this pcap file.
    pub fn pcap(mut self, path: impl Into<PathBuf>) -> Self {
        self.pcap = Some(path.into());
        self
    }

    /// A fixed flow-hash key (reproducible reuseport choices in tests); random by default.
    pub fn hash_key(mut self, k: HashKey) -> Self {
        self.hash_key = Some(k);
        self
    }

    /// Bytes each direction of a [`TcpStream`](crate::TcpStream) may hold between the
    /// application and the poll thread (default 256 KiB).
    pub fn stream_ring(mut self, bytes: usize) -> Self {
        self.ring = bytes.max(1);
        self
    }

    /// Runs `f` on the poll thread after every round (see [`InLoop`]): for proxies that want
    /// their logic next to the packets. Handles from other threads keep working beside it.
    /// Needs a single queue ([`start`](Self::start) refuses more).
    pub fn in_loop(mut self, f: impl FnMut(&mut Stack, Duration) -> bool + Send + 'static) -> Self {
        self.in_loop = Some(Box::new(f));
        self
    }

    /// How long [`Runtime::shutdown`] lets open connections drain (default 5 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// Opens the device and starts the poll threads.
    pub fn start(self) -> io::Result<Runtime> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if self.prefixes.is_empty() {
            return Err(invalid("no local prefixes".into()));
        }
        let mut devs: Vec<Box<dyn Device>> = match (self.devices.is_empty(), &self.tap, &self.xdp) {
            (false, _, _) => self.devices,
            (true, Some(_), Some(_)) => {
                return Err(invalid("both tap() and xdp(): choose one device".into()))
            }
            (true, Some(cfg), None) => Tap::open(cfg)?
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Device>)
                .collect(),
            (true, None, Some(cfg)) => {
                let mut cfg = cfg.clone();
                if cfg.prefixes.is_empty() {
                    cfg.prefixes = self.prefixes.clone();
                }
                if cfg.queues <= 1 {
                    cfg.queues = self.queues as u32;
                }
                let x = Xdp::open(&cfg)?;
                tracing::info!(
                    xdp = %x.program.describe(),
                    sockets = %x.queues[0].copy_mode(),
                    "AF_XDP attached"
                );
                x.queues
                    .into_iter()
                    .map(|q| Box::new(q) as Box<dyn Device>)
                    .collect()
            }
            (true, None, None) => {
                return Err(invalid("no device: call tap(), xdp() or device()".into()))
            }
        };
        if let Some(p) = &self.pcap {
            // One capture per shard: the first keeps the name, others get `.1`, `.2`...
            let mut wrapped = Vec::new();
            for (i, d) in devs.into_iter().enumerate() {
                let path = match i {
                    0 => p.clone(),
                    i => p.with_extension(format!("{i}.pcap")),
                };
                wrapped.push(
                    Box::new(Capture::new(d, path, Arc::new(SystemClock::new()))?)
                        as Box<dyn Device>,
                );
            }
            devs = wrapped;
        }
        if self.in_loop.is_some() && devs.len() > 1 {
            // The closure holds one stack's handles; other shards would not know its bindings.
            return Err(invalid(
                "in-loop logic needs a single queue: each shard has its own stack".into(),
            ));
        }
        let mac = self.mac.unwrap_or(devs[0].info().mac);
        tracing::info!(
            device = %devs[0].info().name,
            shards = devs.len(),
            prefixes = self.prefixes.len(),
            poll = ?self.poll,
            "subnetstack runtime starting"
        );
        let mut cfg = Config::new(mac, self.prefixes.clone());
        cfg.gateway_v4 = self.gateway_v4;
        cfg.gateway_v6 = self.gateway_v6;
        cfg.tcp = self.tcp.clone();
        cfg.bind_policy = self.bind_policy;
        cfg.offloads = devs[0].info().offloads;
        // Every shard hashes flows with the same key, so reuseport picks agree across shards.
        cfg.hash_key = Some(self.hash_key.unwrap_or_else(HashKey::random));
        let mut stacks = Vec::new();
        let mut links = Vec::new();
        let mut rxs = Vec::new();
        for _ in &devs {
            stacks.push(Stack::new(cfg.clone()).map_err(|e| invalid(format!("{e:?}")))?);
            let (tx, rx) = bounded(4096);
            links.push(ShardLink {
                cmds: tx,
                waker: Waker::new()?,
                counters: Mutex::new(Counters::default()),
            });
            rxs.push(rx);
        }
        let shared = Arc::new(Shared {
            shards: links,
            flows: RwLock::new(HashMap::new()),
            handoffs: AtomicU64::new(0),
            handovers: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(true),
            next: AtomicUsize::new(0),
            ring: self.ring,
        });
        let (poll, grace) = (self.poll, self.grace);
        let mut in_loop = self.in_loop;
        let mut threads = Vec::new();
        for (i, ((stack, dev), rx)) in stacks.into_iter().zip(devs).zip(rxs).enumerate() {
            let sh = shared.clone();
            // In-loop logic runs on the only shard.
            let lp = if i == 0 { in_loop.take() } else { None };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("subnetstack-shard-{i}"))
                    .spawn(move || {
                        let mut shard = Shard::new(stack, dev, rx, sh.clone(), poll, grace, i);
                        shard.in_loop = lp;
                        shard.run();
                        sh.running.store(false, Ordering::SeqCst);
                        shard.stack
                    })?,
            );
        }
        Ok(Runtime { shared, threads })
    }
}

/// A running stack: one poll thread (shard) per device queue. Handles made from it
/// ([`TcpListener`](crate::TcpListener), [`TcpStream`](crate::TcpStream),
/// [`UdpSocket`](crate::UdpSocket)) may be used from any thread. Dropping it shuts down.
#[derive(Debug)]
pub struct Runtime {
    pub(crate) shared: Arc<Shared>,
    threads: Vec<JoinHandle<Stack>>,
}

impl Runtime {
    /// A builder.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A snapshot of the stack's counters (drops by reason, TCP totals), at most a few
    /// milliseconds old.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for l in &self.shared.shards {
            c.add(&l.lock_counters());
        }
        c
    }

    /// Everything counted, per binding too (summed over shards), taken on the poll threads
    /// now ([`Snapshot::prometheus`] renders it for `/metrics`).
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        let parts = self.shared.call_all(Cmd::Snapshot)?;
        let mut s = Snapshot::merge(parts);
        s.shard_handoffs = self.shared.handoffs.load(Ordering::Relaxed);
        s.counters.tcp_handed_over += self.shared.handovers.load(Ordering::Relaxed);
        Ok(s)
    }

    /// Poll threads (one per device queue).
    pub fn shards(&self) -> usize {
        self.shared.shards.len()
    }

    /// Stops accepting, lets open connections drain (up to the grace period), closes the
    /// device and joins the poll threads. Returns each shard's stack for inspection.
    pub fn shutdown(mut self) -> Vec<Stack> {
        self.stop()
    }

    fn stop(&mut self) -> Vec<Stack> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for l in &self.shared.shards {
            l.waker.wake_now();
        }
        self.threads
            .drain(..)
            .filter_map(|t| t.join().ok())
            .collect()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What application threads and the poll threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    shards: Vec<ShardLink>,
    /// Connections the runtime opened, by `(local, remote)`, and their shard: if the kernel
    /// delivers their segments on another queue, that shard passes them on.
    flows: RwLock<HashMap<(SocketAddr, SocketAddr), usize>>,
    /// Frames one shard passed to another.
    handoffs: AtomicU64,
    /// Accepted connections a closing listener gave to a sibling before the application took
    /// them (the stack counts those still in its own queue).
    handovers: AtomicU64,
    stop: AtomicBool,
    running: AtomicBool,
    next: AtomicUsize,
    pub(crate) ring: usize,
}

/// The way to one shard.
#[derive(Debug)]
struct ShardLink {
    cmds: Sender<Cmd>,
    waker: Waker,
    counters: Mutex<Counters>,
}

impl ShardLink {
    fn lock_counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    /// A shard for a new outgoing flow (round robin).
    pub(crate) fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }

    /// Sends a command to shard `i` and wakes it.
    pub(crate) fn command_to(&self, i: usize, c: Cmd) -> io::Result<()> {
        if !self.running.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
            return Err(stopped());
        }
        let l = &self.shards[i % self.shards.len()];
        l.cmds.send(c).map_err(|_| stopped())?;
        l.waker.wake();
        Ok(())
    }

    /// Sends a command to shard `i` and waits for its answer.
    pub(crate) fn call_to<T>(
        &self,
        i: usize,
        make: impl FnOnce(Sender<T>) -> Cmd,
    ) -> io::Result<T> {
        let (tx, rx) = bounded(1);
        self.command_to(i, make(tx))?;
        rx.recv().map_err(|_| stopped())
    }

    /// Sends a command to every shard; returns their answers in shard order.
    pub(crate) fn call_all<T>(&self, make: impl Fn(Sender<T>) -> Cmd) -> io::Result<Vec<T>> {
        let mut rxs = Vec::new();
        for i in 0..self.shards.len() {
            let (tx, rx) = bounded(1);
            self.command_to(i, make(tx))?;
            rxs.push(rx);
        }
        rxs.into_iter()
            .map(|rx| rx.recv().map_err(|_| stopped()))
            .collect()
    }

    /// Wakes shard `i` (data was put in one of its rings).
    pub(crate) fn wake(&self, i: usize) {
        self.shards[i % self.shards.len()].waker.wake();
    }

    /// Wakes every shard.
    pub(crate) fn wake_all(&self) {
        for l in &self.shards {
            l.waker.wake();
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

pub(crate) fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the runtime has stopped")
}

/// Wakes the poll thread through an `eventfd`, only when it sleeps.
#[derive(Debug)]
struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
    pending: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: plain eventfd(2); the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: a fresh fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
            pending: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        self.pending.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake_now();
        }
    }

    fn wake_now(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        // SAFETY: reads into a valid 8-byte buffer from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }
}

/// Commands from application threads.
pub(crate) enum Cmd {
    Listen {
        prefix: IpNet,
        ports: PortSpec,
        reuseport: bool,
        backlog: usize,
        max_connections: Option<usize>,
        queue: Arc<Backlog>,
        reply: Sender<Result<TcpListenerHandle, BindError>>,
    },
    ListenerClose(TcpListenerHandle),
    Connect {
        local: SocketAddr,
        remote: SocketAddr,
        pipe: Arc<Pipe>,
        reply: Sender<Result<TcpHandle, ConnectError>>,
    },
    SetNodelay(TcpHandle, bool),
    UdpBind {
        prefix: IpNet,
        ports: PortSpec,
        reuseport: bool,
        queue: Arc<DgramQueue>,
        reply: Sender<Result<UdpHandle, BindError>>,
    },
    UdpSend {
        h: UdpHandle,
        src: SocketAddr,
        dst: SocketAddr,
        data: Vec<u8>,
        reply: Sender<Result<(), SendError>>,
    },
    UdpClose(UdpHandle),
    Explain {
        proto: subnetstack_demux::Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        reply: Sender<String>,
    },
    Snapshot(Sender<Snapshot>),
    /// Another shard learned where a neighbour is.
    Neighbor(IpAddr, Mac),
    /// A frame of one of this shard's connections that arrived on another shard's queue.
    Frame(Vec<u8>, FrameMeta),
    /// Like `Connect`, answering into a slot an async task can wait on.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    ConnectAsync {
        local: SocketAddr,
        remote: SocketAddr,
        pipe: Arc<Pipe>,
        slot: Arc<Reply<Result<TcpHandle, ConnectError>>>,
    },
    /// Like `UdpSend`, answering into a slot.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    UdpSendAsync {
        h: UdpHandle,
        src: SocketAddr,
        dst: SocketAddr,
        data: Vec<u8>,
        slot: Arc<Reply<Result<(), SendError>>>,
    },
}

/// A one-shot answer from the poll thread that an async task can await.
pub(crate) type Reply<T> = Guarded<Option<T>>;

impl<T> Reply<T> {
    fn put(&self, v: T) {
        *self.lock() = Some(v);
        self.notify();
    }

    /// Waits for the answer without blocking the thread.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_async(&self, rt: &Shared) -> io::Result<T> {
        std::future::poll_fn(|cx| {
            let mut g = self.lock();
            if let Some(v) = g.take() {
                return std::task::Poll::Ready(Ok(v));
            }
            if !rt.is_running() {
                return std::task::Poll::Ready(Err(stopped()));
            }
            self.register(&g, cx.waker());
            std::task::Poll::Pending
        })
        .await
    }
}

/// Counters of one TCP listener, with its binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// `prefix:ports`.
    pub binding: String,
    /// The listener's number (its demux `ListenerId`).
    pub listener: u32,
    /// Its counters.
    pub stats: ListenerStats,
}

/// Counters of one UDP socket, with its binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSnapshot {
    /// `prefix:ports`.
    pub binding: String,
    /// Its counters.
    pub stats: UdpSocketStats,
}

/// Everything the runtime counts, at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Stack-wide counters and drops by reason.
    pub counters: Counters,
    /// TCP connections open.
    pub tcp_connections: usize,
    /// Per TCP listener.
    pub tcp: Vec<ListenerSnapshot>,
    /// Per UDP socket.
    pub udp: Vec<UdpSnapshot>,
    /// Frames a shard received for a connection another shard opened, and passed on (the
    /// kernel put the flow on another queue).
    pub shard_handoffs: u64,
}

impl Snapshot {
    /// Sums shards' snapshots (listeners and sockets by binding).
    pub(crate) fn merge(parts: Vec<Snapshot>) -> Snapshot {
        let mut out = Snapshot::default();
        for p in parts {
            out.counters.add(&p.counters);
            out.tcp_connections += p.tcp_connections;
            for l in p.tcp {
                match out.tcp.iter_mut().find(|o| o.binding == l.binding) {
                    Some(o) => o.stats.add(&l.stats),
                    None => out.tcp.push(l),
                }
            }
            for u in p.udp {
                match out.udp.iter_mut().find(|o| o.binding == u.binding) {
                    Some(o) => {
                        o.stats.queued += u.stats.queued;
                        o.stats.received += u.stats.received;
                        o.stats.dropped += u.stats.dropped;
                    }
                    None => out.udp.push(u),
                }
            }
        }
        out
    }

    /// The Prometheus text exposition format (version 0.0.4), ready to serve at `/metrics`.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let c = &self.counters;
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                o,
                "# HELP subnetstack_{name} {help}\n# TYPE subnetstack_{name} {kind}"
            );
        };
        for (name, help, v) in [
            (
                "rx_frames_total",
                "Frames handed to the stack.",
                c.rx_frames,
            ),
            ("tx_frames_total", "Frames the stack sent.", c.tx_frames),
            (
                "udp_delivered_total",
                "Datagrams delivered to UDP sockets.",
                c.udp_delivered,
            ),
            (
                "tcp_syncookies_sent_total",
                "SYN-ACKs sent with a cookie.",
                c.tcp_syncookies_sent,
            ),
            (
                "tcp_syncookies_valid_total",
                "Connections made from a valid cookie.",
                c.tcp_syncookies_valid,
            ),
            (
                "tcp_retransmitted_bytes_total",
                "Bytes retransmitted by ended connections.",
                c.tcp_retransmitted_bytes,
            ),
            (
                "tcp_timeouts_total",
                "Retransmission timeouts of ended connections.",
                c.tcp_timeouts,
            ),
            (
                "tcp_time_wait_reused_total",
                "TIME-WAIT ended early by a newer SYN.",
                c.tcp_time_wait_reused,
            ),
            (
                "tcp_time_wait_skipped_total",
                "Closes that skipped TIME-WAIT (limit reached).",
                c.tcp_time_wait_skipped,
            ),
            (
                "tcp_handed_over_total",
                "Queued connections given to a reuseport sibling.",
                c.tcp_handed_over,
            ),
            (
                "tcp_idle_timeouts_total",
                "Connections reset by the idle timeout.",
                c.tcp_idle_timeouts,
            ),
        ] {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "subnetstack_{name} {v}");
        }
        family(&mut o, "tcp_connections", "gauge", "TCP connections open.");
        let _ = writeln!(o, "subnetstack_tcp_connections {}", self.tcp_connections);
        family(
            &mut o,
            "drops_total",
            "counter",
            "Frames dropped, by reason.",
        );
        for (r, n) in c.drops() {
            let _ = writeln!(o, "subnetstack_drops_total{{reason=\"{}\"}} {n}", r.name());
        }
        type Field = fn(&ListenerStats) -> u64;
        let fields: [(&str, &str, &str, Field); 9] = [
            (
                "listener_syns_total",
                "counter",
                "SYNs that reached the listener.",
                |s| s.syns,
            ),
            (
                "listener_syncookies_sent_total",
                "counter",
                "Cookies the listener sent.",
                |s| s.syncookies_sent,
            ),
            (
                "listener_syncookies_valid_total",
                "counter",
                "Valid cookies the listener took.",
                |s| s.syncookies_valid,
            ),
            (
                "listener_accepted_total",
                "counter",
                "Handshakes completed.",
                |s| s.accepted,
            ),
            (
                "listener_overflows_total",
                "counter",
                "Accept queue overflows.",
                |s| s.overflows,
            ),
            (
                "listener_resets_total",
                "counter",
                "Connections the peer reset.",
                |s| s.resets,
            ),
            ("listener_active", "gauge", "Connections open.", |s| {
                s.active
            }),
            (
                "listener_bytes_in_total",
                "counter",
                "Bytes received by the application.",
                |s| s.bytes_in,
            ),
            (
                "listener_bytes_out_total",
                "counter",
                "Bytes sent by the application.",
                |s| s.bytes_out,
            ),
        ];
        for (name, kind, help, get) in fields {
            family(&mut o, name, kind, help);
            for l in &self.tcp {
                let _ = writeln!(
                    o,
                    "subnetstack_{name}{{proto=\"tcp\",binding=\"{}\",listener=\"{}\"}} {}",
                    l.binding,
                    l.listener,
                    get(&l.stats)
                );
            }
        }
        type UdpField = fn(&UdpSocketStats) -> u64;
        let udp_fields: [(&str, &str, UdpField); 2] = [
            (
                "udp_received_total",
                "Datagrams queued for the socket.",
                |s| s.received,
            ),
            (
                "udp_dropped_total",
                "Datagrams dropped: socket queue full.",
                |s| s.dropped,
            ),
        ];
        for (name, help, get) in udp_fields {
            family(&mut o, name, "counter", help);
            for u in &self.udp {
                let _ = writeln!(
                    o,
                    "subnetstack_{name}{{proto=\"udp\",binding=\"{}\"}} {}",
                    u.binding,
                    get(&u.stats)
                );
            }
        }
        o
    }
}

/// State shared with the poll thread, and the ways to wait for it to change: a condition
/// variable for blocking handles, wakers for async ones.
#[derive(Debug, Default)]
pub(crate) struct Guarded<T> {
    m: Mutex<T>,
    cv: Condvar,
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl<T> Guarded<T> {
    pub(crate) fn new(t: T) -> Self {
        Guarded {
            m: Mutex::new(t),
            cv: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// The state changed: wake blocked threads and pending tasks. Call without holding the
    /// state's lock.
    pub(crate) fn notify(&self) {
        self.cv.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers {
            w.wake();
        }
    }

    /// Registers a task to wake at the next change. Call while holding the state's lock (the
    /// guard proves it), after finding the state not ready, so that no change slips between.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn register(&self, _held: &MutexGuard<'_, T>, w: &std::task::Waker) {
        let mut v = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the condition until `done` holds or `timeout` passes; returns the guard and
    /// whether `done` holds.
    pub(crate) fn wait_until<'a>(
        &'a self,
        mut g: MutexGuard<'a, T>,
        timeout: Option<Duration>,
        mut done: impl FnMut(&T) -> bool,
    ) -> (MutexGuard<'a, T>, bool) {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if done(&g) {
                return (g, true);
            }
            match deadline {
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return (g, false);
                    }
                    g = self
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

/// One connection's rings and status, shared by its stream and the poll thread.
pub(crate) type Pipe = Guarded<PipeState>;

/// See [`Pipe`].
#[derive(Debug, Default)]
pub(crate) struct PipeState {
    /// Received bytes for the application.
    pub(crate) rx: VecDeque<u8>,
    /// Bytes the application wrote, for the connection.
    pub(crate) tx: VecDeque<u8>,
    pub(crate) cap: usize,
    pub(crate) established: bool,
    pub(crate) eof: bool,
    pub(crate) error: Option<io::ErrorKind>,
    pub(crate) error_text: &'static str,
    /// The application will write no more: FIN once `tx` is empty.
    pub(crate) write_shut: bool,
    /// The stream was dropped: close once `tx` is empty.
    pub(crate) dropped: bool,
    pub(crate) local: Option<SocketAddr>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) handle: Option<TcpHandle>,
    /// The shard the connection lives in.
    pub(crate) shard: usize,
    /// The runtime opened it (it is in `Shared::flows`).
    pub(crate) active_open: bool,
}

impl PipeState {
    pub(crate) fn new(cap: usize) -> Self {
        PipeState {
            cap,
            ..Default::default()
        }
    }

    pub(crate) fn fail(&mut self, e: TcpError) {
        let (k, t) = match e {
            TcpError::Refused => (io::ErrorKind::ConnectionRefused, "connection refused"),
            TcpError::Reset => (io::ErrorKind::ConnectionReset, "connection reset by peer"),
            TcpError::TimedOut => (io::ErrorKind::TimedOut, "connection timed out"),
            TcpError::Aborted => (io::ErrorKind::ConnectionAborted, "connection aborted"),
            TcpError::Unreachable => (io::ErrorKind::HostUnreachable, "destination unreachable"),
        };
        if self.error.is_none() {
            self.error = Some(k);
            self.error_text = t;
        }
    }

    pub(crate) fn io_error(&self) -> Option<io::Error> {
        self.error.map(|k| io::Error::new(k, self.error_text))
    }
}

/// A listener's queue of accepted connections (bounded by its backlog).
pub(crate) type Backlog = Guarded<BacklogState>;

/// See [`Backlog`].
#[derive(Debug, Default)]
pub(crate) struct BacklogState {
    pub(crate) queue: VecDeque<(Arc<Pipe>, SocketAddr, SocketAddr)>,
    pub(crate) cap: usize,
    pub(crate) closed: bool,
}

/// A UDP socket's received datagrams (bounded).
pub(crate) type DgramQueue = Guarded<DgramState>;

/// See [`DgramQueue`].
#[derive(Debug, Default)]
pub(crate) struct DgramState {
    pub(crate) queue: VecDeque<subnetstack_stack::Datagram>,
    pub(crate) cap: usize,
    pub(crate) closed: bool,
}

/// The poll thread's state.
struct Shard {
    index: usize,
    rx: Batch,
    stack: Stack,
    drv: Driver<Box<dyn Device>>,
    cmds: Receiver<Cmd>,
    shared: Arc<Shared>,
    poll: PollMode,
    grace: Duration,
    clock: SystemClock,
    conns: HashMap<TcpHandle, Arc<Pipe>>,
    listeners: HashMap<TcpListenerHandle, Arc<Backlog>>,
    udp: HashMap<UdpHandle, Arc<DgramQueue>>,
    /// `prefix:ports` of each listener and UDP socket, for snapshots.
    names: HashMap<(bool, u32), String>,
    scratch: Vec<u8>,
    in_loop: Option<InLoop>,
}

impl Shard {
    fn new(
        stack: Stack,
        dev: Box<dyn Device>,
        cmds: Receiver<Cmd>,
        shared: Arc<Shared>,
        poll: PollMode,
        grace: Duration,
        index: usize,
    ) -> Shard {
        let max = dev.info().max_frame();
        Shard {
            index,
            rx: Batch::new(32, max),
            stack,
            drv: Driver::new(dev),
            cmds,
            shared,
            poll,
            grace,
            clock: SystemClock::new(),
            conns: HashMap::new(),
            listeners: HashMap::new(),
            udp: HashMap::new(),
            names: HashMap::new(),
            scratch: vec![0; 64 * 1024],
            in_loop: None,
        }
    }

    fn run(&mut self) {
        let mut last_work = Instant::now();
        let mut last_counters = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            let now = self.clock.now();
            self.link().waker.pending.store(false, Ordering::SeqCst);
            let mut work = match self.receive(now) {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "device failed; the runtime stops");
                    break;
                }
            };
            while let Ok(c) = self.cmds.try_recv() {
                self.command(now, c);
                work = true;
            }
            work |= self.service(now);
            if let Some(f) = self.in_loop.as_mut() {
                work |= f(&mut self.stack, now);
            }
            if let Err(e) = self.drv.flush(&mut self.stack) {
                tracing::error!(error = %e, "device failed; the runtime stops");
                break;
            }
            self.share_neighbors();
            if last_counters.elapsed() > Duration::from_millis(5) {
                *self.link().lock_counters() = self.stack.counters().clone();
                last_counters = Instant::now();
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                let since = *stopping.get_or_insert_with(|| {
                    tracing::info!(open = self.conns.len(), "shutting down: accepting no more");
                    self.stop_accepting(now);
                    Instant::now()
                });
                if self.conns.is_empty() || since.elapsed() > self.grace {
                    break;
                }
            }
            if work {
                last_work = Instant::now();
                continue;
            }
            match self.poll {
                PollMode::Busy => continue,
                PollMode::Adaptive(spin) if last_work.elapsed() < spin => continue,
                _ => self.sleep(now),
            }
        }
        *self.link().lock_counters() = self.stack.counters().clone();
        tracing::info!(counters = %self.stack.counters(), "subnetstack runtime stopped");
        self.fail_all();
    }

    /// Sleeps on the device, the wakeup fd and the stack's next deadline.
    fn sleep(&mut self, now: Duration) {
        let w = &self.shared.shards[self.index].waker;
        w.sleeping.store(true, Ordering::SeqCst);
        if w.pending.swap(false, Ordering::SeqCst) || !self.cmds.is_empty() {
            w.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        let timeout = [self.stack.poll_timeout(), self.drv.device().next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(1), |d| d.saturating_sub(now))
            .min(Duration::from_secs(1));
        let mut fds = [
            libc::pollfd {
                fd: w.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.drv.device().poll_fd().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Round up so that a deadline 0.4 ms away is not a busy loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: two valid pollfds for the duration of the call (a -1 fd is ignored).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        w.sleeping.store(false, Ordering::SeqCst);
        if fds[0].revents != 0 {
            w.drain();
        }
    }

    /// Receives a batch into the stack (passing other shards' connections on), runs its timers
    /// if due, and transmits. Returns whether frames arrived.
    fn receive(&mut self, now: Duration) -> io::Result<bool> {
        self.rx.clear();
        let n = self.drv.device_mut().recv(&mut self.rx)?;
        let sharded = self.shared.shards.len() > 1;
        for f in self.rx.frames() {
            if sharded {
                if let Some(owner) = self.owner_elsewhere(f.data()) {
                    let l = &self.shared.shards[owner];
                    let _ = l.cmds.try_send(Cmd::Frame(f.data().to_vec(), f.meta));
                    l.waker.wake();
                    self.shared.handoffs.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            self.stack.handle_frame(now, f.data(), f.meta);
        }
        if self.stack.poll_timeout().is_some_and(|t| t <= now) {
            self.stack.handle_timeout(now);
        }
        self.drv.flush(&mut self.stack)?;
        Ok(n > 0)
    }

    /// The other shard a frame belongs to: a TCP segment of a connection this shard does not
    /// have and another one opened.
    fn owner_elsewhere(&self, frame: &[u8]) -> Option<usize> {
        let (local, remote) = Stack::tcp_flow_of(frame)?;
        if self.stack.tcp_has_flow(local, remote) {
            return None;
        }
        let flows = self.shared.flows.read().unwrap_or_else(|e| e.into_inner());
        flows
            .get(&(local, remote))
            .copied()
            .filter(|&o| o != self.index)
    }

    fn link(&self) -> &ShardLink {
        &self.shared.shards[self.index]
    }

    /// Tells the other shards what this one learned from ARP/NDP: the answer to one shard's
    /// question may arrive on another's queue.
    fn share_neighbors(&mut self) {
        let learned = self.stack.take_learned_neighbors();
        if learned.is_empty() || self.shared.shards.len() == 1 {
            return;
        }
        for (i, l) in self.shared.shards.iter().enumerate() {
            if i != self.index {
                for &(ip, mac) in &learned {
                    // Never block on a busy shard: a missed hint costs one more resolution.
                    let _ = l.cmds.try_send(Cmd::Neighbor(ip, mac));
                }
                l.waker.wake();
            }
        }
    }

    fn command(&mut self, now: Duration, c: Cmd) {
        match c {
            Cmd::Neighbor(ip, mac) => self.stack.teach_neighbor(now, ip, mac),
            Cmd::Frame(data, meta) => self.stack.handle_frame(now, &data, meta),
            Cmd::Listen {
                prefix,
                ports,
                reuseport,
                backlog,
                max_connections,
                queue,
                reply,
            } => {
                let r = self.stack.tcp_listen(prefix, ports, reuseport, backlog);
                if let Ok(l) = r {
                    self.stack.tcp_set_listener_limit(l, max_connections);
                }
                match &r {
                    Ok(l) => tracing::debug!(%prefix, %ports, listener = l.id(), "tcp listen"),
                    Err(e) => tracing::debug!(%prefix, %ports, error = %e, "tcp listen refused"),
                }
                if let Ok(l) = r {
                    self.listeners.insert(l, queue);
                    self.names
                        .insert((true, l.id()), format!("{prefix}:{ports}"));
                }
                let _ = reply.send(r);
            }
            Cmd::ListenerClose(l) => self.close_listener(now, l),
            Cmd::Connect {
                local,
                remote,
                pipe,
                reply,
            } => {
                let _ = reply.send(self.connect(now, local, remote, pipe));
            }
            Cmd::ConnectAsync {
                local,
                remote,
                pipe,
                slot,
            } => slot.put(self.connect(now, local, remote, pipe)),
            Cmd::UdpSendAsync {
                h,
                src,
                dst,
                data,
                slot,
            } => slot.put(self.stack.udp_send(now, h, src, dst, &data)),
            Cmd::SetNodelay(h, on) => {
                let _ = self.stack.tcp_set_nodelay(h, on);
            }
            Cmd::UdpBind {
                prefix,
                ports,
                reuseport,
                queue,
                reply,
            } => {
                let r = self.stack.udp_bind(prefix, ports, reuseport);
                match &r {
                    Ok(h) => tracing::debug!(%prefix, %ports, socket = h.id(), "udp bind"),
                    Err(e) => tracing::debug!(%prefix, %ports, error = %e, "udp bind refused"),
                }
                if let Ok(h) = r {
                    self.udp.insert(h, queue);
                    self.names
                        .insert((false, h.id()), format!("{prefix}:{ports}"));
                }
                let _ = reply.send(r);
            }
            Cmd::UdpSend {
                h,
                src,
                dst,
                data,
                reply,
            } => {
                let _ = reply.send(self.stack.udp_send(now, h, src, dst, &data));
            }
            Cmd::UdpClose(h) => {
                self.stack.udp_close(h);
                if let Some(q) = self.udp.remove(&h) {
                    q.lock().closed = true;
                    q.notify();
                }
            }
            Cmd::Explain {
                proto,
                src,
                dst,
                reply,
            } => {
                let text = subnetstack_demux::Flow::new(src.ip(), src.port(), dst.ip(), dst.port())
                    .map(|f| self.stack.demux().snapshot().explain(proto, &f).to_string())
                    .unwrap_or_else(|e| format!("{e:?}"));
                let _ = reply.send(text);
            }
            Cmd::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    /// Closes a listener. Connections it accepted that the application has not taken yet go,
    /// like the stack's own queue, to the reuseport sibling their flow now hashes to, or are
    /// reset if there is none.
    fn close_listener(&mut self, now: Duration, l: TcpListenerHandle) {
        self.stack.tcp_listener_close(now, l);
        let Some(q) = self.listeners.remove(&l) else {
            return;
        };
        let name = self.names.remove(&(true, l.id())).unwrap_or_default();
        let queued: Vec<_> = {
            let mut g = q.lock();
            g.closed = true;
            g.queue.drain(..).collect()
        };
        q.notify();
        for (pipe, local, peer) in queued {
            let heir =
                subnetstack_demux::Flow::new(peer.ip(), peer.port(), local.ip(), local.port())
                    .ok()
                    .and_then(|f| {
                        let id = self
                            .stack
                            .demux()
                            .snapshot()
                            .lookup(subnetstack_demux::Protocol::Tcp, &f)?
                            .listener
                            .0;
                        self.listeners
                            .iter()
                            .find(|(h, _)| u64::from(h.id()) == id)
                            .filter(|(h, _)| self.names.get(&(true, h.id())) == Some(&name))
                            .map(|(_, q)| q.clone())
                    });
            match heir {
                Some(sib) => {
                    sib.lock().queue.push_back((pipe, local, peer));
                    sib.notify();
                    self.shared.handovers.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    let h = pipe.lock().handle;
                    if let Some(h) = h {
                        self.stack.tcp_abort(now, h);
                        self.conns.remove(&h);
                    }
                }
            }
        }
    }

    fn connect(
        &mut self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
        pipe: Arc<Pipe>,
    ) -> Result<TcpHandle, ConnectError> {
        let h = self.stack.tcp_connect(now, local, remote)?;
        {
            let mut p = pipe.lock();
            p.shard = self.index;
            p.handle = Some(h);
            p.peer = Some(remote);
            p.local = self.stack.tcp_local_addr(h);
            if let (true, Some(l)) = (self.shared.shards.len() > 1, p.local) {
                p.active_open = true;
                self.shared
                    .flows
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((l, remote), self.index);
            }
        }
        self.conns.insert(h, pipe);
        Ok(h)
    }

    fn snapshot(&mut self) -> Snapshot {
        let name = |k| self.names.get(&k).cloned().unwrap_or_default();
        let mut tcp: Vec<ListenerSnapshot> = self
            .listeners
            .keys()
            .filter_map(|&l| {
                Some(ListenerSnapshot {
                    binding: name((true, l.id())),
                    listener: l.id(),
                    stats: self.stack.tcp_listener_stats(l)?,
                })
            })
            .collect();
        tcp.sort_by_key(|l| l.listener);
        let handles: Vec<UdpHandle> = self.udp.keys().copied().collect();
        let mut udp: Vec<UdpSnapshot> = handles
            .into_iter()
            .filter_map(|h| {
                Some(UdpSnapshot {
                    binding: name((false, h.id())),
                    stats: self.stack.udp_stats(h)?,
                })
            })
            .collect();
        udp.sort_by(|a, b| a.binding.cmp(&b.binding));
        Snapshot {
            counters: self.stack.counters().clone(),
            tcp_connections: self.stack.tcp_connections(),
            tcp,
            udp,
            shard_handoffs: 0,
        }
    }

    /// Moves accepted connections, bytes and datagrams between the stack and the handles.
    /// Returns whether anything moved.
    fn service(&mut self, now: Duration) -> bool {
        let mut work = false;
        for (&l, q) in &self.listeners {
            let mut g = q.lock();
            let mut added = false;
            while g.queue.len() < g.cap {
                let Some((h, local, remote)) = self.stack.tcp_accept(l) else {
                    break;
                };
                let mut st = PipeState::new(self.shared.ring);
                st.shard = self.index;
                st.established = true;
                st.local = Some(local);
                st.peer = Some(remote);
                st.handle = Some(h);
                let pipe = Arc::new(Pipe::new(st));
                self.conns.insert(h, pipe.clone());
                g.queue.push_back((pipe, local, remote));
                added = true;
            }
            if added {
                q.notify();
                work = true;
            }
        }
        let mut gone = Vec::new();
        for (&h, pipe) in &self.conns {
            let (moved, done) =
                Self::service_conn(&mut self.stack, &mut self.scratch, now, h, pipe);
            work |= moved;
            if done {
                gone.push(h);
            }
        }
        for h in gone {
            if let Some(p) = self.conns.remove(&h) {
                let g = p.lock();
                if let (true, Some(l), Some(r)) = (g.active_open, g.local, g.peer) {
                    self.shared
                        .flows
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(l, r));
                }
            }
        }
        for (&h, q) in &self.udp {
            let mut g = q.lock();
            let mut added = false;
            while g.queue.len() < g.cap {
                let Some(d) = self.stack.udp_recv(h) else {
                    break;
                };
                g.queue.push_back(d);
                added = true;
            }
            if added {
                q.notify();
                work = true;
            }
        }
        work
    }

    /// One connection: returns (bytes or state moved, the poll thread is done with it).
    fn service_conn(
        stack: &mut Stack,
        scratch: &mut [u8],
        now: Duration,
        h: TcpHandle,
        pipe: &Pipe,
    ) -> (bool, bool) {
        let mut p = pipe.lock();
        let mut moved = false;
        let state = stack.tcp_state(h);
        if !p.established
            && matches!(
                state,
                Some(
                    TcpState::Established
                        | TcpState::CloseWait
                        | TcpState::FinWait1
                        | TcpState::FinWait2
                )
            )
        {
            p.established = true;
            moved = true;
        }
        // Into the receive ring.
        while !p.dropped && p.rx.len() < p.cap && !p.eof {
            let room = (p.cap - p.rx.len()).min(scratch.len());
            match stack.tcp_recv(now, h, &mut scratch[..room]) {
                Ok(0) => {
                    p.eof = true;
                    moved = true;
                }
                Ok(n) => {
                    p.rx.extend(&scratch[..n]);
                    moved = true;
                }
                Err(IoError::Failed(e)) => {
                    p.fail(e);
                    moved = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Out of the send ring.
        while !p.tx.is_empty() {
            let (a, _) = p.tx.as_slices();
            match stack.tcp_send(now, h, a) {
                Ok(n) => {
                    p.tx.drain(..n);
                    moved = true;
                }
                Err(IoError::Failed(e)) => {
                    p.fail(e);
                    moved = true;
                    break;
                }
                Err(IoError::WouldBlock) => break,
                Err(_) => {
                    // Closed for writing under us: what is left cannot be sent.
                    p.tx.clear();
                    break;
                }
            }
        }
        if let (None, Some(e)) = (p.error, stack.tcp_error(h)) {
            p.fail(e);
            moved = true;
        }
        let mut done = false;
        if p.tx.is_empty() {
            if p.dropped {
                stack.tcp_close(now, h);
                done = true;
            } else if p.write_shut {
                stack.tcp_shutdown(now, h);
            }
        }
        if p.error.is_some() && !done {
            if p.dropped {
                stack.tcp_close(now, h);
            }
            done = p.dropped;
        }
        drop(p);
        if moved {
            pipe.notify();
        }
        (moved, done)
    }

    fn stop_accepting(&mut self, now: Duration) {
        for (l, q) in self.listeners.drain() {
            self.stack.tcp_listener_close(now, l);
            q.lock().closed = true;
            q.notify();
        }
    }

    /// The runtime ends: every handle still waiting learns it.
    fn fail_all(&mut self) {
        for (_, p) in self.conns.drain() {
            let mut g = p.lock();
            if g.error.is_none() {
                g.error = Some(io::ErrorKind::NotConnected);
                g.error_text = "the runtime has stopped";
            }
            drop(g);
            p.notify();
        }
        for (_, q) in self.udp.drain() {
            q.lock().closed = true;
            q.notify();
        }
    }
}
