//! Handles in the manner of `std::net`, bound to subnets: [`TcpListener`], [`TcpStream`] and
//! [`UdpSocket`]. They work from any thread; the connection itself lives on the runtime's poll
//! thread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use subnetstack_demux::{BindError, PortSpec, Protocol};
use subnetstack_stack::{ConnectError, SendError, TcpHandle, TcpListenerHandle, UdpHandle};

use crate::runtime::{
    stopped, Backlog, BacklogState, Cmd, DgramQueue, DgramState, Pipe, PipeState, Runtime, Shared,
};

fn bind_error(e: BindError) -> io::Error {
    let kind = match e {
        BindError::Conflict { .. } => io::ErrorKind::AddrInUse,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

pub(crate) fn connect_error(e: ConnectError) -> io::Error {
    let kind = match e {
        ConnectError::NonLocalSource(_) => io::ErrorKind::AddrNotAvailable,
        ConnectError::AddrInUse => io::ErrorKind::AddrInUse,
        ConnectError::Limit => io::ErrorKind::OutOfMemory,
        ConnectError::FamilyMismatch | ConnectError::PortZero => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

pub(crate) fn send_error(e: SendError) -> io::Error {
    let kind = match e {
        SendError::NonLocalSource(_) => io::ErrorKind::AddrNotAvailable,
        SendError::UnknownSocket => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

/// The shards' answers to a bind: the handles of those that bound, and the first refusal.
fn split_binds<H>(results: Vec<Result<H, BindError>>) -> (Vec<H>, Option<BindError>) {
    let mut handles = Vec::new();
    let mut error = None;
    for r in results {
        match r {
            Ok(h) => handles.push(h),
            Err(e) => error = error.or(Some(e)),
        }
    }
    (handles, error)
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, "timed out")
}

/// A TCP listener bound to `(prefix, ports)`: every address of the prefix, on those ports, that
/// no more specific binding claims (see the README's bind semantics).
#[derive(Debug)]
pub struct TcpListener {
    pub(crate) rt: Arc<Shared>,
    /// One listener per shard, all feeding `queue`.
    handles: Vec<TcpListenerHandle>,
    pub(crate) queue: Arc<Backlog>,
}

/// Options of a [`TcpListener`].
#[derive(Clone, Copy, Debug)]
pub struct ListenOptions {
    /// Join a reuseport set: listeners with the same prefix and ports share new connections by
    /// flow hash (all members must set it).
    pub reuseport: bool,
    /// Accept queue (and SYN queue) length.
    pub backlog: usize,
    /// Most connections of this listener at once (half-open and open); past it SYNs are
    /// dropped (counted as `TcpListenerLimit`; clients retry). Each shard enforces its share
    /// (the limit divided by the number of shards, rounded up). Unlimited by default.
    pub max_connections: Option<usize>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            reuseport: false,
            backlog: 1024,
            max_connections: None,
        }
    }
}

impl TcpListener {
    /// Listens on `(prefix, ports)` with default options. A conflicting binding is refused
    /// with `AddrInUse`, and the error names it.
    pub fn bind(rt: &Runtime, prefix: IpNet, ports: PortSpec) -> io::Result<TcpListener> {
        Self::bind_with(rt, prefix, ports, ListenOptions::default())
    }

    /// Listens with options.
    pub fn bind_with(
        rt: &Runtime,
        prefix: IpNet,
        ports: PortSpec,
        opts: ListenOptions,
    ) -> io::Result<TcpListener> {
        let queue = Arc::new(Backlog::new(BacklogState {
            cap: opts.backlog.max(1),
            ..Default::default()
        }));
        // Every shard binds the same; the accepted connections of all meet in one queue.
        let shards = rt.shards();
        let results = rt.shared.call_all(|reply| Cmd::Listen {
            prefix,
            ports,
            reuseport: opts.reuseport,
            backlog: opts.backlog,
            max_connections: opts.max_connections.map(|m| m.div_ceil(shards)),
            queue: queue.clone(),
            reply,
        })?;
        let (handles, error) = split_binds(results);
        let l = TcpListener {
            rt: rt.shared.clone(),
            handles,
            queue,
        };
        match error {
            // Dropping `l` unbinds the shards that did bind.
            Some(e) => Err(bind_error(e)),
            None => Ok(l),
        }
    }

    /// The listener's number (its demux `ListenerId`; also the `listener` label of its metrics).
    pub fn id(&self) -> u32 {
        self.handles.first().map_or(u32::MAX, |h| h.id())
    }

    /// Waits for a connection: the stream, **the local address the client targeted**, and the
    /// client's address.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr, SocketAddr)> {
        self.accept_timeout(None)?.ok_or_else(timed_out)
    }

    /// Like [`accept`](Self::accept), giving up after `timeout` (`Ok(None)`).
    pub fn accept_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> io::Result<Option<(TcpStream, SocketAddr, SocketAddr)>> {
        let g = self.queue.lock();
        let rt = self.rt.clone();
        let (mut g, ready) = self.queue.wait_until(g, timeout, |s| {
            !s.queue.is_empty() || s.closed || !rt.is_running()
        });
        if !ready {
            return Ok(None);
        }
        match g.queue.pop_front() {
            Some((pipe, local, peer)) => Ok(Some((
                TcpStream::from_pipe(self.rt.clone(), pipe),
                local,
                peer,
            ))),
            None => Err(stopped()),
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        for (i, &h) in self.handles.iter().enumerate() {
            let _ = self.rt.command_to(i, Cmd::ListenerClose(h));
        }
    }
}

/// A TCP connection: `std::io::Read` and `Write`, half-close, timeouts.
#[derive(Debug)]
pub struct TcpStream {
    conn: Arc<Conn>,
    pub(crate) rt: Arc<Shared>,
    pub(crate) pipe: Arc<Pipe>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

/// The connection behind a stream and its clones: closed when the last goes.
#[derive(Debug)]
struct Conn {
    rt: Arc<Shared>,
    pipe: Arc<Pipe>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut g = self.pipe.lock();
        g.dropped = true;
        let shard = g.shard;
        drop(g);
        self.rt.wake(shard);
    }
}

impl TcpStream {
    pub(crate) fn from_pipe(rt: Arc<Shared>, pipe: Arc<Pipe>) -> TcpStream {
        TcpStream {
            conn: Arc::new(Conn {
                rt: rt.clone(),
                pipe: pipe.clone(),
            }),
            rt,
            pipe,
            read_timeout: None,
            write_timeout: None,
        }
    }

    /// Another handle on the same connection (one thread reads while another writes); the
    /// connection closes when the last handle is dropped. Timeouts are per handle.
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        Ok(TcpStream {
            conn: self.conn.clone(),
            rt: self.rt.clone(),
            pipe: self.pipe.clone(),
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        })
    }

    /// Connects from `local` (an address inside the runtime's prefixes; port 0 picks one) to
    /// `remote`: what proxies do to dial out with a chosen source address.
    pub fn connect_from(
        rt: &Runtime,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<TcpStream> {
        Self::connect_from_timeout(rt, local, remote, None)
    }

    /// Like [`connect_from`](Self::connect_from), giving up after `timeout`.
    pub fn connect_from_timeout(
        rt: &Runtime,
        local: SocketAddr,
        remote: SocketAddr,
        timeout: Option<Duration>,
    ) -> io::Result<TcpStream> {
        let pipe = Arc::new(Pipe::new(PipeState::new(rt.shared.ring)));
        let p = pipe.clone();
        let shard = rt.shared.pick();
        rt.shared
            .call_to(shard, |reply| Cmd::Connect {
                local,
                remote,
                pipe: p,
                reply,
            })?
            .map_err(connect_error)?;
        let s = TcpStream::from_pipe(rt.shared.clone(), pipe);
        let g = s.pipe.lock();
        let rt2 = s.rt.clone();
        let (g, ok) = s.pipe.wait_until(g, timeout, |p| {
            p.established || p.error.is_some() || !rt2.is_running()
        });
        if let Some(e) = g.io_error() {
            return Err(e);
        }
        if !ok {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        drop(g);
        Ok(s)
    }

    /// The local address (for accepted streams, the one the client targeted).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.pipe.lock().local.ok_or_else(stopped)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.pipe.lock().peer.ok_or_else(stopped)
    }

    /// `TCP_NODELAY`: send small segments at once instead of waiting (Nagle off).
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        let g = self.pipe.lock();
        let (h, shard): (TcpHandle, usize) = (g.handle.ok_or_else(stopped)?, g.shard);
        drop(g);
        self.rt.command_to(shard, Cmd::SetNodelay(h, nodelay))
    }

    /// Reads wait at most this long (`None`: forever); a timeout is `WouldBlock`, as in std.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.read_timeout = t;
        Ok(())
    }

    /// Writes wait at most this long for room (`None`: forever).
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.write_timeout = t;
        Ok(())
    }

    /// Half-closes: `Write` sends FIN after what was written; `Read` discards further input;
    /// `Both` does both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut g = self.pipe.lock();
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            g.write_shut = true;
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            g.rx.clear();
            g.eof = true;
        }
        let shard = g.shard;
        drop(g);
        self.rt.wake(shard);
        Ok(())
    }
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let g = self.pipe.lock();
        let rt = self.rt.clone();
        let (mut g, ready) = self.pipe.wait_until(g, self.read_timeout, |p| {
            !p.rx.is_empty() || p.eof || p.error.is_some() || !rt.is_running()
        });
        if !g.rx.is_empty() {
            let n = buf.len().min(g.rx.len());
            let was_full = g.rx.len() == g.cap;
            for (d, s) in buf.iter_mut().zip(g.rx.drain(..n)) {
                *d = s;
            }
            let shard = g.shard;
            drop(g);
            if was_full {
                // The poll thread stopped pulling for want of room.
                self.rt.wake(shard);
            }
            return Ok(n);
        }
        if g.eof {
            return Ok(0);
        }
        if let Some(e) = g.io_error() {
            return Err(e);
        }
        if !ready {
            return Err(timed_out());
        }
        Err(stopped())
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let g = self.pipe.lock();
        let rt = self.rt.clone();
        let (mut g, ready) = self.pipe.wait_until(g, self.write_timeout, |p| {
            p.tx.len() < p.cap || p.error.is_some() || !rt.is_running()
        });
        if let Some(e) = g.io_error() {
            return Err(e);
        }
        if g.write_shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "shut down for writing",
            ));
        }
        if !ready {
            return Err(timed_out());
        }
        if !self.rt.is_running() {
            return Err(stopped());
        }
        let n = buf.len().min(g.cap - g.tx.len());
        g.tx.extend(&buf[..n]);
        let shard = g.shard;
        drop(g);
        self.rt.wake(shard);
        Ok(n)
    }

    /// Waits until everything written has been handed to the connection.
    fn flush(&mut self) -> io::Result<()> {
        let g = self.pipe.lock();
        let rt = self.rt.clone();
        let (g, _) = self.pipe.wait_until(g, self.write_timeout, |p| {
            p.tx.is_empty() || p.error.is_some() || !rt.is_running()
        });
        match g.io_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A UDP socket bound to `(prefix, ports)`: it receives datagrams sent to any address of the
/// prefix and learns which one each was sent to.
#[derive(Debug)]
pub struct UdpSocket {
    pub(crate) rt: Arc<Shared>,
    /// One socket per shard, all feeding `queue`.
    pub(crate) handles: Vec<UdpHandle>,
    pub(crate) queue: Arc<DgramQueue>,
    read_timeout: Option<Duration>,
}

impl UdpSocket {
    /// Binds `(prefix, ports)`; `reuseport` joins a set sharing datagrams by flow hash.
    pub fn bind(
        rt: &Runtime,
        prefix: IpNet,
        ports: PortSpec,
        reuseport: bool,
    ) -> io::Result<UdpSocket> {
        let queue = Arc::new(DgramQueue::new(DgramState {
            cap: 1024,
            ..Default::default()
        }));
        let results = rt.shared.call_all(|reply| Cmd::UdpBind {
            prefix,
            ports,
            reuseport,
            queue: queue.clone(),
            reply,
        })?;
        let (handles, error) = split_binds(results);
        let u = UdpSocket {
            rt: rt.shared.clone(),
            handles,
            queue,
            read_timeout: None,
        };
        match error {
            Some(e) => Err(bind_error(e)),
            None => Ok(u),
        }
    }

    /// Receives a datagram: `(length, source, local destination)`. A datagram longer than `buf`
    /// is cut, as with std.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        let g = self.queue.lock();
        let rt = self.rt.clone();
        let (mut g, ready) = self.queue.wait_until(g, self.read_timeout, |q| {
            !q.queue.is_empty() || q.closed || !rt.is_running()
        });
        let was_full = g.queue.len() == g.cap;
        match g.queue.pop_front() {
            Some(d) => {
                drop(g);
                if was_full {
                    self.rt.wake_all();
                }
                let n = buf.len().min(d.payload.len());
                buf[..n].copy_from_slice(&d.payload[..n]);
                Ok((n, d.src, d.dst))
            }
            None if !ready => Err(timed_out()),
            None => Err(stopped()),
        }
    }

    /// Sends `data` from `local` (inside the runtime's prefixes) to `remote`.
    pub fn send_from(
        &self,
        data: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<usize> {
        let i = self.shard_for(local, remote);
        self.rt
            .call_to(i, |reply| Cmd::UdpSend {
                h: self.handles[i],
                src: local,
                dst: remote,
                data: data.to_vec(),
                reply,
            })?
            .map_err(send_error)?;
        Ok(data.len())
    }

    /// Receives wait at most this long (`None`: forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.read_timeout = t;
        Ok(())
    }
}

impl UdpSocket {
    /// The shard that sends a flow's datagrams: always the same one, so that the kernel keeps
    /// the flow's answers on that shard's queue.
    pub(crate) fn shard_for(&self, local: SocketAddr, remote: SocketAddr) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one((local, remote));
        (h % self.handles.len().max(1) as u64) as usize
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        for (i, &h) in self.handles.iter().enumerate() {
            let _ = self.rt.command_to(i, Cmd::UdpClose(h));
        }
    }
}

impl Runtime {
    /// Which binding and reuseport member a packet `src -> dst` of `proto` would reach, and why.
    pub fn explain(&self, proto: Protocol, src: SocketAddr, dst: SocketAddr) -> io::Result<String> {
        self.shared.call_to(0, |reply| Cmd::Explain {
            proto,
            src,
            dst,
            reply,
        })
    }
}
