//! A [packetdrill](https://github.com/google/packetdrill) adapter for subnetstack.
//!
//! packetdrill can test a TCP stack that is not the kernel's: with
//! `--so_filename=LIB.so --so_flags=STRING` it `dlopen`s the library, calls
//! [`packetdrill_interface_init`] with the flags, and from then on sends every system call of
//! the script, every packet it injects, every packet it sniffs, and its clock through the
//! function table that call filled in ([`PacketdrillInterface`], the layout of `struct
//! packetdrill_interface` in packetdrill's `packetdrill.h`). This crate builds that library
//! (`libsubnetstack_packetdrill.so`) around one sans-IO [`Stack`](subnetstack_stack::Stack):
//!
//! ```sh
//! cargo build --release -p subnetstack-packetdrill
//! packetdrill --so_filename=target/release/libsubnetstack_packetdrill.so \
//!     --local_ip=198.18.0.1 --remote_ip=198.19.0.1 tests/packetdrill/handshake.pkt
//! ```
//!
//! # The link
//! packetdrill speaks raw IP (`so_netdev_send` hands over `packet_start()` for `ip_bytes`, and
//! sniffed packets are parsed from layer 3); the stack speaks Ethernet. The adapter wraps every
//! injected packet in a frame from [`adapter::PEER_MAC`] to [`adapter::STACK_MAC`], teaches the
//! stack that the packet's source lives at the peer MAC, and strips the header (and padding)
//! from what the stack sends. ARP requests and neighbour solicitations the stack sends are
//! answered inside the adapter and never reach packetdrill.
//!
//! # The clock
//! Time is virtual; the stack sees `now` only from the adapter, so a script runs in
//! milliseconds whatever its timeline, and a timer fires exactly when it is due:
//! - `usleep(n)` moves the clock by `n`, running each stack timer that falls due on the way at
//!   its own instant (a retransmission sent during the sleep is stamped with its due time).
//! - `gettimeofday()` returns the virtual clock (from 2023-11-14T22:13:20Z at start) and, in
//!   the driving thread (see below), moves it by the `tick_us` flag (1 µs by default):
//!   packetdrill spin-waits the last 20 µs before each event on `gettimeofday()`, and the
//!   very first event with no `usleep()` at all.
//! - `netdev_receive()` is where packetdrill waits for an outbound packet. It returns the
//!   oldest packet the stack sent, stamped with the virtual time it was sent at; when none is
//!   queued it jumps the clock to the stack's next timer and looks again, up to `block_ms`
//!   (600 s) of virtual time; with no timer left it gives other threads 50 ms of real time and
//!   then reports "nothing" (`*count = 0`, which packetdrill turns into an error for the
//!   expected packet). packetdrill's so-mode loop never times out by itself, so this bound is
//!   what ends a script waiting for a packet that never comes.
//!
//! # Threads
//! packetdrill runs the script in its main thread and each *blocking* system call (a call
//! with a time range, `+0...0.1 read(...)`) in a second thread, which it lets go on once the
//! thread sleeps. The adapter keeps all its state behind one mutex, with a condition variable
//! that every state change signals. The *driving* thread is the one that last called
//! `usleep`, `netdev_send` or `netdev_receive` (or first called `gettimeofday`): packetdrill's
//! main thread, or a test's only thread. A call that has to wait (a blocking `accept`, `read`,
//! `write`, `connect`, or `poll` with a timeout) waits differently depending on who makes it:
//! - from another thread, it sleeps on the condition variable and looks again whenever the
//!   driving thread changes anything, until it succeeds, the socket's timeout (`SO_RCVTIMEO`
//!   or `SO_SNDTIMEO`, else `block_ms`) of *virtual* time passes, or 10 s of real time pass.
//!   The driving thread does not move the clock past a change (an injected packet, a timer)
//!   before every blocked call has looked at it, nor past a blocked call's deadline, so the
//!   call ends at the virtual instant its data came; and because packetdrill reads a blocking
//!   call's end time with `gettimeofday()` just after the call returns, while its main thread
//!   may already be moving the clock on, the first `gettimeofday()` of that thread after the
//!   call reports the instant the call ended;
//! - from the driving thread itself (nobody else would move the clock), it moves the clock
//!   itself, from stack timer to stack timer, until it succeeds or its timeout passes.
//!
//! A call that gives up fails with `EAGAIN` (`accept`, `read`, `write`), `ETIMEDOUT`
//! (`connect`; `EINPROGRESS` with `SO_SNDTIMEO`, as in Linux), or returns 0 (`poll` with a
//! timeout; `EINTR` for an infinite one). Nothing blocks forever.
//!
//! # Descriptors
//! Sockets are numbered from 1000 up, and each number is a real descriptor: an anonymous
//! `memfd` the adapter holds. packetdrill closes the descriptors a script left open with the
//! real `close(2)` when the script ends, so they must exist and must not collide with its own.
//!
//! # Calls
//! `socket` (TCP over `AF_INET`/`AF_INET6` only, else `EPROTONOSUPPORT`/`EAFNOSUPPORT`),
//! `bind`, `listen`, `accept`, `connect`, `read`, `readv`, `recv`, `recvfrom`, `recvmsg` (no
//! control messages), `write`, `writev`, `send`, `sendto`, `sendmsg` (no control messages),
//! `close`, `shutdown`, `poll`, `fcntl` (`F_GETFL`/`F_SETFL` with `O_NONBLOCK`,
//! `F_GETFD`/`F_SETFD`), `ioctl` (`FIONBIO`, `FIONREAD`; others `ENOTTY`), `setsockopt` and
//! `getsockopt` (`SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`, `SO_LINGER`, `SO_RCVTIMEO`,
//! `SO_SNDTIMEO`, `SO_RCVBUF`/`SO_SNDBUF` (kept, not applied: buffer sizes are per stack,
//! see the flags), `TCP_NODELAY`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`,
//! `IPV6_V6ONLY`; `getsockopt` also `SO_ERROR`, `SO_TYPE`, `SO_DOMAIN`, `SO_PROTOCOL`,
//! `SO_ACCEPTCONN`; anything else `ENOPROTOOPT`). `epoll_create`, `epoll_ctl`,
//! `epoll_wait`, `pipe` and `splice` fail with `ENOTSUP`. Receive flags other than
//! `MSG_DONTWAIT`/`MSG_WAITALL` and send flags other than `MSG_DONTWAIT`/`MSG_NOSIGNAL` fail
//! with `EOPNOTSUPP` (the same number as `ENOTSUP` on Linux).
//!
//! Errors follow Linux where the stack lets them: a connection's error (`ECONNRESET`,
//! `ECONNREFUSED`, `ETIMEDOUT`, ...) is reported once, by `SO_ERROR` or the next read or
//! write, after which reads see end of stream and writes `EPIPE`. Known differences:
//! `bind()` conflicts show at `listen()` (the demux decides there); `listen()` on an unbound
//! socket is `EDESTADDRREQ` (Linux picks a port); `close()` is whatever the stack's
//! `tcp_close` does (Linux resets a connection with unread data).
//!
//! # Flags
//! See [`flags`] for the `--so_flags` keys (local prefixes, default source addresses, MTU,
//! TCP options, timers, limits, `log=1` tracing to stderr).
//!
//! The calls are never allowed to unwind into C: every entry point catches panics (the call
//! then fails with `EIO`).
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod adapter;
pub mod addr;
pub mod flags;

use std::ffi::{c_char, c_int, c_longlong, c_uint, c_ulong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::time::Duration;

use libc::{
    epoll_event, iovec, loff_t, msghdr, nfds_t, pollfd, size_t, sockaddr, socklen_t, ssize_t,
    timeval, useconds_t,
};

pub use adapter::{Adapter, Errno};
pub use flags::Flags;

/// `socket(userdata, domain, type, protocol)`.
pub type SocketFn = unsafe extern "C" fn(*mut c_void, c_int, c_int, c_int) -> c_int;
/// `bind`/`connect(userdata, fd, addr, addrlen)`.
pub type AddrFn = unsafe extern "C" fn(*mut c_void, c_int, *const sockaddr, socklen_t) -> c_int;
/// `accept(userdata, fd, addr, addrlen)`.
pub type AcceptFn =
    unsafe extern "C" fn(*mut c_void, c_int, *mut sockaddr, *mut socklen_t) -> c_int;
/// `read(userdata, fd, buf, count)`.
pub type ReadFn = unsafe extern "C" fn(*mut c_void, c_int, *mut c_void, size_t) -> ssize_t;
/// `readv`/`writev(userdata, fd, iov, iovcnt)`.
pub type IovFn = unsafe extern "C" fn(*mut c_void, c_int, *const iovec, c_int) -> ssize_t;
/// `recv(userdata, fd, buf, len, flags)`.
pub type RecvFn = unsafe extern "C" fn(*mut c_void, c_int, *mut c_void, size_t, c_int) -> ssize_t;
/// `recvfrom(userdata, fd, buf, len, flags, src_addr, addrlen)`.
pub type RecvFromFn = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *mut c_void,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
/// `recvmsg(userdata, fd, msg, flags)`.
pub type RecvMsgFn = unsafe extern "C" fn(*mut c_void, c_int, *mut msghdr, c_int) -> ssize_t;
/// `write(userdata, fd, buf, count)`.
pub type WriteFn = unsafe extern "C" fn(*mut c_void, c_int, *const c_void, size_t) -> ssize_t;
/// `send(userdata, fd, buf, len, flags)`.
pub type SendFn = unsafe extern "C" fn(*mut c_void, c_int, *const c_void, size_t, c_int) -> ssize_t;
/// `sendto(userdata, fd, buf, len, flags, dest_addr, addrlen)`.
pub type SendToFn = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *const c_void,
    size_t,
    c_int,
    *const sockaddr,
    socklen_t,
) -> ssize_t;
/// `sendmsg(userdata, fd, msg, flags)`.
pub type SendMsgFn = unsafe extern "C" fn(*mut c_void, c_int, *const msghdr, c_int) -> ssize_t;
/// `fcntl(userdata, fd, cmd, ...)`, declared with its one optional argument fixed: on x86_64
/// and aarch64 Linux a variadic integer argument travels in the same register as a fixed
/// one. packetdrill passes an `int` (or nothing, for `F_GETFL`), so only the low 32 bits mean
/// anything.
pub type FcntlFn = unsafe extern "C" fn(*mut c_void, c_int, c_int, c_ulong) -> c_int;
/// `ioctl(userdata, fd, request, ...)`, its one optional argument (a pointer) fixed like
/// [`FcntlFn`]'s.
pub type IoctlFn = unsafe extern "C" fn(*mut c_void, c_int, c_ulong, c_ulong) -> c_int;
/// `close(userdata, fd)`.
pub type CloseFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
/// `listen`/`shutdown(userdata, fd, int)`.
pub type FdIntFn = unsafe extern "C" fn(*mut c_void, c_int, c_int) -> c_int;
/// `getsockopt(userdata, fd, level, optname, optval, optlen)`.
pub type GetSockOptFn =
    unsafe extern "C" fn(*mut c_void, c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;
/// `setsockopt(userdata, fd, level, optname, optval, optlen)`.
pub type SetSockOptFn =
    unsafe extern "C" fn(*mut c_void, c_int, c_int, c_int, *const c_void, socklen_t) -> c_int;
/// `poll(userdata, fds, nfds, timeout)`.
pub type PollFn = unsafe extern "C" fn(*mut c_void, *mut pollfd, nfds_t, c_int) -> c_int;
/// `netdev_send(userdata, buf, count)`.
pub type NetdevSendFn = unsafe extern "C" fn(*mut c_void, *const c_void, size_t) -> c_int;
/// `netdev_receive(userdata, buf, count, time_usecs)`.
pub type NetdevReceiveFn =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *mut size_t, *mut c_longlong) -> c_int;
/// `usleep(userdata, usec)`.
pub type UsleepFn = unsafe extern "C" fn(*mut c_void, useconds_t) -> c_int;
/// `gettimeofday(userdata, tv, tz)` (`tz` is a `struct timezone *`).
pub type GettimeofdayFn = unsafe extern "C" fn(*mut c_void, *mut timeval, *mut c_void) -> c_int;
/// `epoll_create(userdata, size)`.
pub type EpollCreateFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
/// `epoll_ctl(userdata, epfd, op, fd, event)`.
pub type EpollCtlFn =
    unsafe extern "C" fn(*mut c_void, c_int, c_int, c_int, *mut epoll_event) -> c_int;
/// `epoll_wait(userdata, epfd, events, maxevents, timeout)`.
pub type EpollWaitFn =
    unsafe extern "C" fn(*mut c_void, c_int, *mut epoll_event, c_int, c_int) -> c_int;
/// `pipe(userdata, pipefd)`.
pub type PipeFn = unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int;
/// `splice(userdata, fd_in, off_in, fd_out, off_out, len, flags)`.
pub type SpliceFn = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *mut loff_t,
    c_int,
    *mut loff_t,
    size_t,
    c_uint,
) -> c_int;

/// packetdrill's `struct packetdrill_interface` (`packetdrill.h`), field for field. packetdrill
/// calls every entry without checking for NULL, so [`packetdrill_interface_init`] fills all of
/// them.
#[repr(C)]
#[derive(Debug)]
pub struct PacketdrillInterface {
    /// Passed back as the first argument of every call (the adapter).
    pub userdata: *mut c_void,
    /// Frees `userdata` at the end of the script.
    pub free: Option<unsafe extern "C" fn(*mut c_void)>,
    /// `socket()`.
    pub socket: Option<SocketFn>,
    /// `bind()`.
    pub bind: Option<AddrFn>,
    /// `listen()`.
    pub listen: Option<FdIntFn>,
    /// `accept()`.
    pub accept: Option<AcceptFn>,
    /// `connect()`.
    pub connect: Option<AddrFn>,
    /// `read()`.
    pub read: Option<ReadFn>,
    /// `readv()`.
    pub readv: Option<IovFn>,
    /// `recv()`.
    pub recv: Option<RecvFn>,
    /// `recvfrom()`.
    pub recvfrom: Option<RecvFromFn>,
    /// `recvmsg()`.
    pub recvmsg: Option<RecvMsgFn>,
    /// `write()`.
    pub write: Option<WriteFn>,
    /// `writev()`.
    pub writev: Option<IovFn>,
    /// `send()`.
    pub send: Option<SendFn>,
    /// `sendto()`.
    pub sendto: Option<SendToFn>,
    /// `sendmsg()`.
    pub sendmsg: Option<SendMsgFn>,
    /// `fcntl()` (variadic in C; see [`FcntlFn`]).
    pub fcntl: Option<FcntlFn>,
    /// `ioctl()` (variadic in C; see [`IoctlFn`]).
    pub ioctl: Option<IoctlFn>,
    /// `close()`.
    pub close: Option<CloseFn>,
    /// `shutdown()`.
    pub shutdown: Option<FdIntFn>,
    /// `getsockopt()`.
    pub getsockopt: Option<GetSockOptFn>,
    /// `setsockopt()`.
    pub setsockopt: Option<SetSockOptFn>,
    /// `poll()`.
    pub poll: Option<PollFn>,
    /// Injects an IP packet into the stack; 0 or -1.
    pub netdev_send: Option<NetdevSendFn>,
    /// Sniffs the stack's next outgoing IP packet; `*count` in: buffer size, out: bytes (0 for
    /// none); `*time_usecs`: when it was sent.
    pub netdev_receive: Option<NetdevReceiveFn>,
    /// `usleep()` on the stack's clock.
    pub usleep: Option<UsleepFn>,
    /// `gettimeofday()` on the stack's clock.
    pub gettimeofday: Option<GettimeofdayFn>,
    /// `epoll_create()` (`ENOTSUP`).
    pub epoll_create: Option<EpollCreateFn>,
    /// `epoll_ctl()` (`ENOTSUP`).
    pub epoll_ctl: Option<EpollCtlFn>,
    /// `epoll_wait()` (`ENOTSUP`).
    pub epoll_wait: Option<EpollWaitFn>,
    /// `pipe()` (`ENOTSUP`).
    pub pipe: Option<PipeFn>,
    /// `splice()` (`ENOTSUP`).
    pub splice: Option<SpliceFn>,
}

impl Default for PacketdrillInterface {
    /// An empty table (null userdata, no functions), for [`packetdrill_interface_init`] to fill.
    fn default() -> Self {
        PacketdrillInterface {
            userdata: ptr::null_mut(),
            free: None,
            socket: None,
            bind: None,
            listen: None,
            accept: None,
            connect: None,
            read: None,
            readv: None,
            recv: None,
            recvfrom: None,
            recvmsg: None,
            write: None,
            writev: None,
            send: None,
            sendto: None,
            sendmsg: None,
            fcntl: None,
            ioctl: None,
            close: None,
            shutdown: None,
            getsockopt: None,
            setsockopt: None,
            poll: None,
            netdev_send: None,
            netdev_receive: None,
            usleep: None,
            gettimeofday: None,
            epoll_create: None,
            epoll_ctl: None,
            epoll_wait: None,
            pipe: None,
            splice: None,
        }
    }
}

impl PacketdrillInterface {
    /// The adapter's table around `userdata` (an `Adapter` from `Box::into_raw`, or null, in
    /// which case every call fails with `EINVAL`).
    fn table(userdata: *mut c_void) -> Self {
        PacketdrillInterface {
            userdata,
            free: Some(pd_free),
            socket: Some(pd_socket),
            bind: Some(pd_bind),
            listen: Some(pd_listen),
            accept: Some(pd_accept),
            connect: Some(pd_connect),
            read: Some(pd_read),
            readv: Some(pd_readv),
            recv: Some(pd_recv),
            recvfrom: Some(pd_recvfrom),
            recvmsg: Some(pd_recvmsg),
            write: Some(pd_write),
            writev: Some(pd_writev),
            send: Some(pd_send),
            sendto: Some(pd_sendto),
            sendmsg: Some(pd_sendmsg),
            fcntl: Some(pd_fcntl),
            ioctl: Some(pd_ioctl),
            close: Some(pd_close),
            shutdown: Some(pd_shutdown),
            getsockopt: Some(pd_getsockopt),
            setsockopt: Some(pd_setsockopt),
            poll: Some(pd_poll),
            netdev_send: Some(pd_netdev_send),
            netdev_receive: Some(pd_netdev_receive),
            usleep: Some(pd_usleep),
            gettimeofday: Some(pd_gettimeofday),
            epoll_create: Some(pd_epoll_create),
            epoll_ctl: Some(pd_epoll_ctl),
            epoll_wait: Some(pd_epoll_wait),
            pipe: Some(pd_pipe),
            splice: Some(pd_splice),
        }
    }
}

/// packetdrill's entry point: parses `flags` (see [`flags`]; null means defaults), creates
/// the adapter and fills `iface`. With bad flags it prints why on stderr and fills the table
/// around a null adapter, so that packetdrill's first call (`gettimeofday`) fails and ends the
/// run.
///
/// # Safety
/// `flags` must be null or a NUL-terminated string; `iface` must be null or point to a
/// writable `struct packetdrill_interface`. The table's `free` must be called at most once,
/// after the last other call.
#[no_mangle]
pub unsafe extern "C" fn packetdrill_interface_init(
    flags: *const c_char,
    iface: *mut PacketdrillInterface,
) {
    if iface.is_null() {
        return;
    }
    let flags = if flags.is_null() {
        String::new()
    } else {
        // SAFETY: the caller vouches for a NUL-terminated string.
        unsafe { CStr::from_ptr(flags) }
            .to_string_lossy()
            .into_owned()
    };
    let made = catch_unwind(|| Flags::parse(&flags).and_then(Adapter::new));
    let userdata = match made {
        Ok(Ok(a)) => Box::into_raw(Box::new(a)).cast::<c_void>(),
        Ok(Err(e)) => {
            eprintln!("subnetstack-packetdrill: --so_flags={flags:?}: {e}");
            ptr::null_mut()
        }
        Err(_) => ptr::null_mut(),
    };
    // SAFETY: `iface` is non-null and writable (caller's contract); the table is plain data.
    unsafe { iface.write(PacketdrillInterface::table(userdata)) };
}

// ---- the entry points ----------------------------------------------------------------------

fn set_errno(e: Errno) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// Runs one call: `Err(e)` sets `errno` and returns `fail`; a panic does the same with `EIO`.
fn call<T>(fail: T, f: impl FnOnce() -> Result<T, Errno>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            fail
        }
        Err(_) => {
            set_errno(libc::EIO);
            fail
        }
    }
}

/// The adapter behind `userdata`.
///
/// # Safety
/// `ud` must be null or the userdata [`packetdrill_interface_init`] stored, not yet freed.
unsafe fn adapter<'a>(ud: *mut c_void) -> Result<&'a Adapter, Errno> {
    // SAFETY: non-null `ud` is a live Box<Adapter> pointer (caller's contract); shared
    // references are fine because Adapter synchronises internally.
    unsafe { ud.cast::<Adapter>().as_ref() }.ok_or(libc::EINVAL)
}

/// # Safety
/// `p` must be null with `n == 0`, or point to `n` bytes valid for reads and writes.
unsafe fn bytes_mut<'a>(p: *mut c_void, n: usize) -> Result<&'a mut [u8], Errno> {
    if n == 0 {
        Ok(&mut [])
    } else if p.is_null() {
        Err(libc::EFAULT)
    } else {
        // SAFETY: non-null with `n` valid bytes (caller's contract).
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), n) })
    }
}

/// # Safety
/// `p` must be null with `n == 0`, or point to `n` readable bytes.
unsafe fn bytes<'a>(p: *const c_void, n: usize) -> Result<&'a [u8], Errno> {
    if n == 0 {
        Ok(&[])
    } else if p.is_null() {
        Err(libc::EFAULT)
    } else {
        // SAFETY: non-null with `n` readable bytes (caller's contract).
        Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) })
    }
}

/// # Safety
/// `iov` must point to `n` readable `iovec`s (or be anything when `n == 0`).
unsafe fn iovecs<'a>(iov: *const iovec, n: usize) -> Result<&'a [iovec], Errno> {
    if n > libc::UIO_MAXIOV as usize {
        return Err(libc::EINVAL);
    }
    if n == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: non-null with `n` iovecs (caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(iov, n) })
}

/// Reads into a scatter list through one contiguous buffer.
///
/// # Safety
/// Every `iovec` must describe writable memory.
unsafe fn read_iov(a: &Adapter, fd: c_int, iov: &[iovec], flags: c_int) -> Result<usize, Errno> {
    let total = iov
        .iter()
        .try_fold(0usize, |t, v| t.checked_add(v.iov_len))
        .filter(|t| *t <= isize::MAX as usize)
        .ok_or(libc::EINVAL)?;
    let mut tmp = vec![0u8; total];
    let n = a.read(fd, &mut tmp, flags)?;
    let mut off = 0;
    for v in iov {
        if off == n {
            break;
        }
        let k = v.iov_len.min(n - off);
        // SAFETY: the caller vouches for `iov_len` writable bytes at `iov_base`.
        let dst = unsafe { bytes_mut(v.iov_base, k) }?;
        dst.copy_from_slice(&tmp[off..off + k]);
        off += k;
    }
    Ok(n)
}

/// Writes a gather list through one contiguous buffer.
///
/// # Safety
/// Every `iovec` must describe readable memory.
unsafe fn write_iov(a: &Adapter, fd: c_int, iov: &[iovec], flags: c_int) -> Result<usize, Errno> {
    let mut tmp = Vec::new();
    for v in iov {
        // SAFETY: the caller vouches for `iov_len` readable bytes at `iov_base`.
        tmp.extend_from_slice(unsafe { bytes(v.iov_base, v.iov_len) }?);
    }
    a.write(fd, &tmp, flags)
}

fn ssize(r: Result<usize, Errno>) -> Result<ssize_t, Errno> {
    r.map(|n| n as ssize_t)
}

unsafe extern "C" fn pd_free(ud: *mut c_void) {
    if ud.is_null() {
        return;
    }
    let _ = catch_unwind(|| {
        // SAFETY: `ud` came from Box::into_raw in packetdrill_interface_init and packetdrill
        // frees it once, after its last call.
        drop(unsafe { Box::from_raw(ud.cast::<Adapter>()) });
    });
}

unsafe extern "C" fn pd_socket(ud: *mut c_void, domain: c_int, ty: c_int, proto: c_int) -> c_int {
    // SAFETY: `ud` is the userdata packetdrill_interface_init stored (this holds for every
    // entry point, as does: packetdrill passes pointers valid for the sizes it passes with
    // them, as for the real system calls).
    call(-1, || unsafe { adapter(ud) }?.socket(domain, ty, proto))
}

unsafe extern "C" fn pd_bind(
    ud: *mut c_void,
    fd: c_int,
    sa: *const sockaddr,
    len: socklen_t,
) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket; `sa` has `len` readable bytes.
        let (a, sa) = unsafe { (adapter(ud)?, addr::read(sa, len)?) };
        a.bind(fd, sa).map(|()| 0)
    })
}

unsafe extern "C" fn pd_listen(ud: *mut c_void, fd: c_int, backlog: c_int) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket.
        unsafe { adapter(ud) }?.listen(fd, backlog).map(|()| 0)
    })
}

unsafe extern "C" fn pd_accept(
    ud: *mut c_void,
    fd: c_int,
    sa: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket.
        let (nfd, peer, v6) = unsafe { adapter(ud) }?.accept(fd)?;
        // SAFETY: `sa`/`len` are null or a buffer and its size, as for accept(2).
        unsafe { addr::write(peer, v6, sa, len) };
        Ok(nfd)
    })
}

unsafe extern "C" fn pd_connect(
    ud: *mut c_void,
    fd: c_int,
    sa: *const sockaddr,
    len: socklen_t,
) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket; `sa` has `len` readable bytes.
        let (a, sa) = unsafe { (adapter(ud)?, addr::read(sa, len)?) };
        a.connect(fd, sa).map(|()| 0)
    })
}

unsafe extern "C" fn pd_read(ud: *mut c_void, fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` writable bytes.
        let (a, buf) = unsafe { (adapter(ud)?, bytes_mut(buf, n)?) };
        ssize(a.read(fd, buf, 0))
    })
}

unsafe extern "C" fn pd_readv(ud: *mut c_void, fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    call(-1, || {
        let n = usize::try_from(n).map_err(|_| libc::EINVAL)?;
        // SAFETY: see pd_socket; `iov` has `n` entries describing writable buffers.
        unsafe { ssize(read_iov(adapter(ud)?, fd, iovecs(iov, n)?, 0)) }
    })
}

unsafe extern "C" fn pd_recv(
    ud: *mut c_void,
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
) -> ssize_t {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` writable bytes.
        let (a, buf) = unsafe { (adapter(ud)?, bytes_mut(buf, n)?) };
        ssize(a.read(fd, buf, flags))
    })
}

unsafe extern "C" fn pd_recvfrom(
    ud: *mut c_void,
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    _src: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` writable bytes.
        let (a, buf) = unsafe { (adapter(ud)?, bytes_mut(buf, n)?) };
        let r = a.read(fd, buf, flags)?;
        if !len.is_null() {
            // TCP reports no source address (Linux sets the length to 0).
            // SAFETY: non-null `len` is writable, as for recvfrom(2).
            unsafe { *len = 0 };
        }
        Ok(r as ssize_t)
    })
}

unsafe extern "C" fn pd_recvmsg(
    ud: *mut c_void,
    fd: c_int,
    msg: *mut msghdr,
    flags: c_int,
) -> ssize_t {
    call(-1, || {
        // SAFETY: `msg` is null or a valid msghdr, as for recvmsg(2).
        let m = unsafe { msg.as_mut() }.ok_or(libc::EFAULT)?;
        // SAFETY: see pd_socket; the msghdr's iovecs describe writable buffers.
        let n = unsafe { read_iov(adapter(ud)?, fd, iovecs(m.msg_iov, m.msg_iovlen)?, flags) }?;
        m.msg_namelen = 0;
        m.msg_controllen = 0;
        m.msg_flags = 0;
        Ok(n as ssize_t)
    })
}

unsafe extern "C" fn pd_write(
    ud: *mut c_void,
    fd: c_int,
    buf: *const c_void,
    n: size_t,
) -> ssize_t {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` readable bytes.
        let (a, data) = unsafe { (adapter(ud)?, bytes(buf, n)?) };
        ssize(a.write(fd, data, 0))
    })
}

unsafe extern "C" fn pd_writev(ud: *mut c_void, fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    call(-1, || {
        let n = usize::try_from(n).map_err(|_| libc::EINVAL)?;
        // SAFETY: see pd_socket; `iov` has `n` entries describing readable buffers.
        unsafe { ssize(write_iov(adapter(ud)?, fd, iovecs(iov, n)?, 0)) }
    })
}

unsafe extern "C" fn pd_send(
    ud: *mut c_void,
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
) -> ssize_t {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` readable bytes.
        let (a, data) = unsafe { (adapter(ud)?, bytes(buf, n)?) };
        ssize(a.write(fd, data, flags))
    })
}

unsafe extern "C" fn pd_sendto(
    ud: *mut c_void,
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    _dest: *const sockaddr,
    _len: socklen_t,
) -> ssize_t {
    // On a TCP socket the destination is ignored, as in Linux.
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` readable bytes.
        let (a, data) = unsafe { (adapter(ud)?, bytes(buf, n)?) };
        ssize(a.write(fd, data, flags))
    })
}

unsafe extern "C" fn pd_sendmsg(
    ud: *mut c_void,
    fd: c_int,
    msg: *const msghdr,
    flags: c_int,
) -> ssize_t {
    call(-1, || {
        // SAFETY: `msg` is null or a valid msghdr, as for sendmsg(2).
        let m = unsafe { msg.as_ref() }.ok_or(libc::EFAULT)?;
        if m.msg_controllen != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        // SAFETY: see pd_socket; the msghdr's iovecs describe readable buffers.
        unsafe {
            ssize(write_iov(
                adapter(ud)?,
                fd,
                iovecs(m.msg_iov, m.msg_iovlen)?,
                flags,
            ))
        }
    })
}

unsafe extern "C" fn pd_fcntl(ud: *mut c_void, fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    call(-1, || {
        // The caller passed an int (or nothing): keep the low 32 bits.
        // SAFETY: see pd_socket.
        unsafe { adapter(ud) }?.fcntl(fd, cmd, arg as u32 as c_int)
    })
}

unsafe extern "C" fn pd_ioctl(ud: *mut c_void, fd: c_int, request: c_ulong, arg: c_ulong) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket.
        let a = unsafe { adapter(ud) }?;
        let p = arg as *mut c_int;
        // The request came through an int in packetdrill: compare the low 32 bits.
        match request as u32 as c_ulong {
            r if r == libc::FIONBIO as c_ulong => {
                // SAFETY: FIONBIO's argument is null or a readable int, as for ioctl(2).
                let on = unsafe { p.as_ref() }.ok_or(libc::EFAULT)?;
                a.set_nonblocking(fd, *on != 0).map(|()| 0)
            }
            r if r == libc::FIONREAD as c_ulong => {
                let n = a.readable(fd)?;
                // SAFETY: FIONREAD's argument is null or a writable int, as for ioctl(2).
                *unsafe { p.as_mut() }.ok_or(libc::EFAULT)? = n;
                Ok(0)
            }
            _ => Err(libc::ENOTTY),
        }
    })
}

unsafe extern "C" fn pd_close(ud: *mut c_void, fd: c_int) -> c_int {
    // SAFETY: see pd_socket.
    call(-1, || unsafe { adapter(ud) }?.close(fd).map(|()| 0))
}

unsafe extern "C" fn pd_shutdown(ud: *mut c_void, fd: c_int, how: c_int) -> c_int {
    // SAFETY: see pd_socket.
    call(-1, || unsafe { adapter(ud) }?.shutdown(fd, how).map(|()| 0))
}

unsafe extern "C" fn pd_getsockopt(
    ud: *mut c_void,
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket; `len` is null or a readable, writable socklen_t.
        let (a, room) = unsafe { (adapter(ud)?, len.as_mut().ok_or(libc::EFAULT)?) };
        let v = a.getsockopt(fd, level, name)?;
        let n = (*room as usize).min(v.len());
        // SAFETY: `val` has `*len` writable bytes, as for getsockopt(2).
        unsafe { bytes_mut(val, n) }?.copy_from_slice(&v[..n]);
        *room = n as socklen_t;
        Ok(0)
    })
}

unsafe extern "C" fn pd_setsockopt(
    ud: *mut c_void,
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket; `val` has `len` readable bytes.
        let (a, v) = unsafe { (adapter(ud)?, bytes(val, len as usize)?) };
        a.setsockopt(fd, level, name, v).map(|()| 0)
    })
}

unsafe extern "C" fn pd_poll(
    ud: *mut c_void,
    fds: *mut pollfd,
    n: nfds_t,
    timeout: c_int,
) -> c_int {
    call(-1, || {
        let n = usize::try_from(n).map_err(|_| libc::EINVAL)?;
        // SAFETY: see pd_socket.
        let a = unsafe { adapter(ud) }?;
        let fds = if n == 0 {
            &mut [][..]
        } else if fds.is_null() {
            return Err(libc::EFAULT);
        } else {
            // SAFETY: non-null `fds` has `n` pollfds, as for poll(2).
            unsafe { std::slice::from_raw_parts_mut(fds, n) }
        };
        a.poll(fds, timeout)
    })
}

unsafe extern "C" fn pd_netdev_send(ud: *mut c_void, buf: *const c_void, n: size_t) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket; `buf` has `n` readable bytes.
        let (a, ip) = unsafe { (adapter(ud)?, bytes(buf, n)?) };
        a.netdev_send(ip).map(|()| 0)
    })
}

unsafe extern "C" fn pd_netdev_receive(
    ud: *mut c_void,
    buf: *mut c_void,
    count: *mut size_t,
    time_usecs: *mut c_longlong,
) -> c_int {
    call(-1, || {
        // SAFETY: `count` is null or a readable, writable size_t (packetdrill's buffer size).
        let count = unsafe { count.as_mut() }.ok_or(libc::EFAULT)?;
        // SAFETY: see pd_socket (a null adapter reports "nothing", which ends packetdrill's
        // receive loop, where an error would make it retry forever).
        let Ok(a) = (unsafe { adapter(ud) }) else {
            *count = 0;
            return Ok(0);
        };
        // SAFETY: `buf` has `*count` writable bytes.
        let buf = unsafe { bytes_mut(buf, *count) }?;
        match a.netdev_receive(buf) {
            Some((n, at)) => {
                *count = n;
                // SAFETY: `time_usecs` is null or a writable long long.
                if let Some(t) = unsafe { time_usecs.as_mut() } {
                    *t = at.as_micros() as c_longlong;
                }
            }
            None => *count = 0,
        }
        Ok(0)
    })
}

unsafe extern "C" fn pd_usleep(ud: *mut c_void, usec: useconds_t) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket.
        unsafe { adapter(ud) }?.usleep(Duration::from_micros(usec.into()));
        Ok(0)
    })
}

unsafe extern "C" fn pd_gettimeofday(ud: *mut c_void, tv: *mut timeval, tz: *mut c_void) -> c_int {
    call(-1, || {
        // SAFETY: see pd_socket.
        let now = unsafe { adapter(ud) }?.gettimeofday();
        // SAFETY: `tv` is null or a writable timeval, as for gettimeofday(2).
        if let Some(tv) = unsafe { tv.as_mut() } {
            tv.tv_sec = now.as_secs() as libc::time_t;
            tv.tv_usec = now.subsec_micros() as libc::suseconds_t;
        }
        if !tz.is_null() {
            // SAFETY: `tz` is a writable struct timezone (two ints): UTC, no DST.
            unsafe { ptr::write_bytes(tz.cast::<c_int>(), 0, 2) };
        }
        Ok(0)
    })
}

fn unsupported() -> Result<c_int, Errno> {
    Err(libc::ENOTSUP)
}

unsafe extern "C" fn pd_epoll_create(_ud: *mut c_void, _size: c_int) -> c_int {
    call(-1, unsupported)
}

unsafe extern "C" fn pd_epoll_ctl(
    _ud: *mut c_void,
    _epfd: c_int,
    _op: c_int,
    _fd: c_int,
    _ev: *mut epoll_event,
) -> c_int {
    call(-1, unsupported)
}

unsafe extern "C" fn pd_epoll_wait(
    _ud: *mut c_void,
    _epfd: c_int,
    _ev: *mut epoll_event,
    _max: c_int,
    _timeout: c_int,
) -> c_int {
    call(-1, unsupported)
}

unsafe extern "C" fn pd_pipe(_ud: *mut c_void, _fds: *mut c_int) -> c_int {
    call(-1, unsupported)
}

unsafe extern "C" fn pd_splice(
    _ud: *mut c_void,
    _fd_in: c_int,
    _off_in: *mut loff_t,
    _fd_out: c_int,
    _off_out: *mut loff_t,
    _len: size_t,
    _flags: c_uint,
) -> c_int {
    call(-1, unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_packetdrill_h() {
        // 33 pointer-sized members, in packetdrill.h's order.
        let p = size_of::<*const c_void>();
        assert_eq!(size_of::<PacketdrillInterface>(), 33 * p);
        assert_eq!(offset_of!(PacketdrillInterface, free), p);
        assert_eq!(offset_of!(PacketdrillInterface, fcntl), 17 * p);
        assert_eq!(offset_of!(PacketdrillInterface, poll), 23 * p);
        assert_eq!(offset_of!(PacketdrillInterface, netdev_send), 24 * p);
        assert_eq!(offset_of!(PacketdrillInterface, netdev_receive), 25 * p);
        assert_eq!(offset_of!(PacketdrillInterface, gettimeofday), 27 * p);
        assert_eq!(offset_of!(PacketdrillInterface, splice), 32 * p);
    }
}
