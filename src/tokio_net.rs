//! `tokio` integration (feature `tokio`): async accept, `AsyncRead`/`AsyncWrite` on
//! [`TcpStream`], async connect and async UDP. The same handles as the blocking API; a task
//! that would block registers its waker and the poll thread wakes it when the state changes.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::{TcpListener, TcpStream, UdpSocket};
use crate::runtime::{stopped, Cmd, Pipe, PipeState, Reply};
use crate::Runtime;

impl TcpListener {
    /// Waits for a connection without blocking the thread: the stream, the local address the
    /// client targeted, and the client's address.
    pub async fn accept_async(&self) -> io::Result<(TcpStream, SocketAddr, SocketAddr)> {
        poll_fn(|cx| {
            let mut g = self.queue.lock();
            if let Some((pipe, local, peer)) = g.queue.pop_front() {
                return Poll::Ready(Ok((
                    TcpStream::from_pipe(self.rt.clone(), pipe),
                    local,
                    peer,
                )));
            }
            if g.closed || !self.rt.is_running() {
                return Poll::Ready(Err(stopped()));
            }
            self.queue.register(&g, cx.waker());
            drop(g);
            Poll::Pending
        })
        .await
    }
}

impl TcpStream {
    /// Connects from `local` to `remote` without blocking the thread (see
    /// [`connect_from`](TcpStream::connect_from)).
    pub async fn connect_from_async(
        rt: &Runtime,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<TcpStream> {
        let pipe = Arc::new(Pipe::new(PipeState::new(rt.shared.ring)));
        let slot = Arc::new(Reply::default());
        rt.shared.command_to(
            rt.shared.pick(),
            Cmd::ConnectAsync {
                local,
                remote,
                pipe: pipe.clone(),
                slot: slot.clone(),
            },
        )?;
        slot.wait_async(&rt.shared)
            .await?
            .map_err(crate::net::connect_error)?;
        let s = TcpStream::from_pipe(rt.shared.clone(), pipe);
        poll_fn(|cx| {
            let g = s.pipe.lock();
            if let Some(e) = g.io_error() {
                return Poll::Ready(Err(e));
            }
            if g.established {
                return Poll::Ready(Ok(()));
            }
            if !s.rt.is_running() {
                return Poll::Ready(Err(stopped()));
            }
            s.pipe.register(&g, cx.waker());
            Poll::Pending
        })
        .await?;
        Ok(s)
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.pipe.lock();
        if !g.rx.is_empty() {
            let n = buf.remaining().min(g.rx.len());
            let was_full = g.rx.len() == g.cap;
            let (a, b) = g.rx.as_slices();
            let first = a.len().min(n);
            buf.put_slice(&a[..first]);
            buf.put_slice(&b[..n - first]);
            g.rx.drain(..n);
            let shard = g.shard;
            drop(g);
            if was_full {
                self.rt.wake(shard);
            }
            return Poll::Ready(Ok(()));
        }
        if g.eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = g.io_error() {
            return Poll::Ready(Err(e));
        }
        if !self.rt.is_running() {
            return Poll::Ready(Err(stopped()));
        }
        self.pipe.register(&g, cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut g = self.pipe.lock();
        if let Some(e) = g.io_error() {
            return Poll::Ready(Err(e));
        }
        if g.write_shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "shut down for writing",
            )));
        }
        if !self.rt.is_running() {
            return Poll::Ready(Err(stopped()));
        }
        let room = g.cap - g.tx.len();
        if room == 0 {
            self.pipe.register(&g, cx.waker());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        g.tx.extend(&data[..n]);
        let shard = g.shard;
        drop(g);
        self.rt.wake(shard);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let g = self.pipe.lock();
        if let Some(e) = g.io_error() {
            return Poll::Ready(Err(e));
        }
        if g.tx.is_empty() || !self.rt.is_running() {
            return Poll::Ready(Ok(()));
        }
        self.pipe.register(&g, cx.waker());
        Poll::Pending
    }

    /// Sends FIN once everything written is handed over (half-close; reading goes on).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut g = self.pipe.lock();
        g.write_shut = true;
        let shard = g.shard;
        drop(g);
        self.rt.wake(shard);
        self.poll_flush(cx)
    }
}

impl UdpSocket {
    /// Receives a datagram without blocking the thread: `(length, source, local destination)`.
    pub async fn recv_from_async(
        &self,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        poll_fn(|cx| {
            let mut g = self.queue.lock();
            let was_full = g.queue.len() == g.cap;
            if let Some(d) = g.queue.pop_front() {
                drop(g);
                if was_full {
                    self.rt.wake_all();
                }
                let n = buf.len().min(d.payload.len());
                buf[..n].copy_from_slice(&d.payload[..n]);
                return Poll::Ready(Ok((n, d.src, d.dst)));
            }
            if g.closed || !self.rt.is_running() {
                return Poll::Ready(Err(stopped()));
            }
            self.queue.register(&g, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Sends `data` from `local` to `remote` without blocking the thread.
    pub async fn send_from_async(
        &self,
        data: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<usize> {
        let slot = Arc::new(Reply::default());
        let i = self.shard_for(local, remote);
        self.rt.command_to(
            i,
            Cmd::UdpSendAsync {
                h: self.handles[i],
                src: local,
                dst: remote,
                data: data.to_vec(),
                slot: slot.clone(),
            },
        )?;
        slot.wait_async(&self.rt)
            .await?
            .map_err(crate::net::send_error)?;
        Ok(data.len())
    }
}
