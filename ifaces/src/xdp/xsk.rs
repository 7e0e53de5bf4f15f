//! One AF_XDP socket over its own UMEM: the four rings mapped from the kernel, with the
//! producer/consumer protocol of `Documentation/networking/af_xdp.rst` (acquire on the other
//! side's index, release on ours), and a frame allocator that never allocates.
//!
//! Our own rings over `libc` rather than `xdpilone`: four small ring types, no licence question
//! for users (xdpilone is EUPL-1.2), and the ring code is where the per-frame cost lives, so we
//! want to own it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::tap::cvt;

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_PGOFF_RX_RING: i64 = 0;
const XDP_PGOFF_TX_RING: i64 = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: i64 = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: i64 = 0x1_8000_0000;
const XDP_RING_NEED_WAKEUP: u32 = 1;
/// `sxdp_flags`: copy mode.
pub const XDP_COPY: u16 = 1 << 1;
/// `sxdp_flags`: zero-copy mode.
pub const XDP_ZEROCOPY: u16 = 1 << 2;
/// `sxdp_flags`: the kernel says when it needs a syscall to make progress.
pub const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;

/// Kernel counters of one socket (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskKernelStats {
    /// Frames dropped for reasons other than a full ring or an empty fill ring.
    pub rx_dropped: u64,
    /// Invalid RX descriptors.
    pub rx_invalid_descs: u64,
    /// Invalid TX descriptors.
    pub tx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when a frame arrived.
    pub rx_fill_ring_empty_descs: u64,
    /// Times the TX ring was empty when the kernel looked.
    pub tx_ring_empty_descs: u64,
}

/// An anonymous mapping, unmapped on drop.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    fn new(len: usize, fd: Option<(i32, i64)>) -> io::Result<Mmap> {
        let (flags, fd, off) = match fd {
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            ),
            Some((fd, off)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, off),
        };
        // SAFETY: a fresh mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
        })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A single-producer single-consumer ring shared with the kernel. `T` is `u64` (fill,
/// completion: UMEM addresses) or [`Desc`] (RX, TX).
struct Ring<T> {
    _map: Mmap,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut T,
    mask: u32,
    /// Our copy of our own index (producer for fill/TX, consumer for RX/completion).
    local: u32,
    /// Last value read of the other side's index.
    remote: u32,
}

/// An RX/TX descriptor (`struct xdp_desc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    addr: u64,
    len: u32,
    options: u32,
}

/// `struct xdp_ring_offset`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

impl<T: Copy> Ring<T> {
    fn map(fd: i32, pgoff: i64, off: &RingOffset, size: u32) -> io::Result<Ring<T>> {
        let len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        let m = Mmap::new(len, Some((fd, pgoff)))?;
        let base = m.ptr.as_ptr();
        // SAFETY: the offsets come from the kernel for this mapping and lie inside it.
        unsafe {
            Ok(Ring {
                producer: base.add(off.producer as usize).cast(),
                consumer: base.add(off.consumer as usize).cast(),
                flags: base.add(off.flags as usize).cast(),
                descs: base.add(off.desc as usize).cast(),
                mask: size - 1,
                local: 0,
                remote: 0,
                _map: m,
            })
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping; the kernel writes it only atomically.
        unsafe { &*self.producer }
    }
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.consumer }
    }
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as above.
        unsafe { &*self.flags }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }
    fn slot(&self, idx: u32) -> *mut T {
        // SAFETY: masked index inside the descriptor array.
        unsafe { self.descs.add((idx & self.mask) as usize) }
    }

    // -- we produce (fill, TX) --
    /// Free slots, up to `want`, refreshing the kernel's consumer index when needed.
    fn free(&mut self, want: u32) -> u32 {
        let size = self.mask + 1;
        let mut free = size - self.local.wrapping_sub(self.remote);
        if free < want {
            self.remote = self.consumer().load(Ordering::Acquire);
            free = size - self.local.wrapping_sub(self.remote);
        }
        free.min(want)
    }
    fn write(&mut self, v: T) {
        // SAFETY: the caller reserved the slot with `free`; the kernel does not read it before
        // `publish`.
        unsafe { self.slot(self.local).write(v) };
        self.local = self.local.wrapping_add(1);
    }
    fn publish(&self) {
        self.producer().store(self.local, Ordering::Release);
    }

    // -- we consume (RX, completion) --
    /// Entries ready, up to `max`.
    fn ready(&mut self, max: u32) -> u32 {
        let mut n = self.remote.wrapping_sub(self.local);
        if n == 0 {
            self.remote = self.producer().load(Ordering::Acquire);
            n = self.remote.wrapping_sub(self.local);
        }
        n.min(max)
    }
    fn read(&mut self) -> T {
        // SAFETY: the slot is below the producer index we loaded with Acquire.
        let v = unsafe { self.slot(self.local).read() };
        self.local = self.local.wrapping_add(1);
        v
    }
    fn release(&self) {
        self.consumer().store(self.local, Ordering::Release);
    }
}

/// Ring and UMEM sizes of one socket.
#[derive(Clone, Copy, Debug)]
pub struct XskSizes {
    /// UMEM frames (chunk size [`FRAME`]); half receive, half transmit.
    pub frames: u32,
    /// Entries of each ring (power of two).
    pub ring: u32,
}

/// UMEM chunk size: one frame of up to `FRAME - headroom` bytes.
pub const FRAME: u32 = 4096;

/// An AF_XDP socket bound to one queue, with its UMEM and rings.
pub struct Xsk {
    fd: OwnedFd,
    umem: Mmap,
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<Desc>,
    tx: Ring<Desc>,
    /// TX frames not in flight (UMEM offsets).
    tx_free: Vec<u64>,
    /// Receive frames waiting for room in the fill ring (normally none: the ring holds them
    /// all; kept so that a short answer from the ring never loses a frame).
    fill_pending: Vec<u64>,
    /// Whether the socket runs zero-copy.
    pub zero_copy: bool,
}

// SAFETY: the raw pointers point into mappings the Xsk owns; it is used by one thread at a time.
unsafe impl Send for Xsk {}

impl std::fmt::Debug for Xsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xsk")
            .field("fd", &self.fd)
            .field("zero_copy", &self.zero_copy)
            .finish_non_exhaustive()
    }
}

fn setsockopt<T>(fd: &OwnedFd, opt: libc::c_int, v: &T, what: &str) -> io::Result<()> {
    // SAFETY: `v` is a valid T of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_XDP,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
    .map_err(|e| io::Error::new(e.kind(), format!("AF_XDP {what}: {e}")))
}

fn getsockopt<T: Default>(fd: &OwnedFd, opt: libc::c_int) -> io::Result<T> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `v` is writable for `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_XDP,
            opt,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// `struct xdp_umem_reg` as first defined (24 bytes; later fields default to zero).
#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
}

/// `struct sockaddr_xdp`.
#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

impl Xsk {
    /// Creates the socket and its UMEM, binds it to `(ifindex, queue)` with `bind_flags`
    /// (copy/zero-copy, need-wakeup), and fills the fill ring. `EBUSY` right after a previous
    /// socket on the same queue closed is retried for up to a second.
    pub fn open(ifindex: u32, queue: u32, sizes: XskSizes, bind_flags: u16) -> io::Result<Xsk> {
        assert!(sizes.ring.is_power_of_two() && sizes.frames >= 2 * sizes.ring);
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            OwnedFd::from_raw_fd(
                cvt(libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0)).map_err(
                    |e| io::Error::new(e.kind(), format!("socket(AF_XDP): {e} (kernel built without CONFIG_XDP_SOCKETS, or no CAP_NET_RAW)")),
                )?,
            )
        };
        let len = sizes.frames as usize * FRAME as usize;
        let umem = Mmap::new(len, None)
            .map_err(|e| io::Error::new(e.kind(), format!("UMEM mmap of {len} bytes: {e}")))?;
        let reg = UmemReg {
            addr: umem.ptr.as_ptr() as u64,
            len: len as u64,
            chunk_size: FRAME,
            headroom: 0,
        };
        setsockopt(&fd, XDP_UMEM_REG, &reg, "UMEM registration").map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EPERM) {
                io::Error::new(
                    e.kind(),
                    format!("{e}: the UMEM counts against RLIMIT_MEMLOCK without CAP_IPC_LOCK"),
                )
            } else {
                e
            }
        })?;
        setsockopt(&fd, XDP_UMEM_FILL_RING, &sizes.ring, "fill ring")?;
        setsockopt(
            &fd,
            XDP_UMEM_COMPLETION_RING,
            &sizes.ring,
            "completion ring",
        )?;
        setsockopt(&fd, XDP_RX_RING, &sizes.ring, "RX ring")?;
        setsockopt(&fd, XDP_TX_RING, &sizes.ring, "TX ring")?;
        let off: MmapOffsets = getsockopt(&fd, XDP_MMAP_OFFSETS)?;
        let raw = fd.as_raw_fd();
        let fill = Ring::map(raw, XDP_UMEM_PGOFF_FILL_RING, &off.fr, sizes.ring)?;
        let comp = Ring::map(raw, XDP_UMEM_PGOFF_COMPLETION_RING, &off.cr, sizes.ring)?;
        let rx = Ring::map(raw, XDP_PGOFF_RX_RING, &off.rx, sizes.ring)?;
        let tx = Ring::map(raw, XDP_PGOFF_TX_RING, &off.tx, sizes.ring)?;

        let sa = SockaddrXdp {
            family: AF_XDP as u16,
            flags: bind_flags,
            ifindex,
            queue_id: queue,
            shared_umem_fd: 0,
        };
        let mut delay = std::time::Duration::from_millis(10);
        loop {
            // SAFETY: `sa` is a valid sockaddr_xdp of the size passed.
            let r = cvt(unsafe {
                libc::bind(
                    raw,
                    (&sa as *const SockaddrXdp).cast(),
                    std::mem::size_of::<SockaddrXdp>() as libc::socklen_t,
                )
            });
            match r {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && delay.as_millis() < 1000 => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
        // Receive frames: as many as the fill ring holds (so a recycled frame always fits),
        // at most half; the rest transmit.
        let rx_frames = (sizes.frames / 2).min(sizes.ring);
        let mut x = Xsk {
            fd,
            umem,
            fill,
            comp,
            rx,
            tx,
            tx_free: (rx_frames..sizes.frames)
                .map(|i| u64::from(i) * u64::from(FRAME))
                .collect(),
            fill_pending: Vec::with_capacity(rx_frames as usize),
            zero_copy: bind_flags & XDP_ZEROCOPY != 0,
        };
        x.fill_pending
            .extend((0..rx_frames).map(|i| u64::from(i) * u64::from(FRAME)));
        x.refill();
        Ok(x)
    }

    /// The socket's file descriptor (polls readable when the RX ring has frames).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The kernel's counters for this socket.
    pub fn kernel_stats(&self) -> io::Result<XskKernelStats> {
        let v: [u64; 6] = getsockopt(&self.fd, XDP_STATISTICS)?;
        Ok(XskKernelStats {
            rx_dropped: v[0],
            rx_invalid_descs: v[1],
            tx_invalid_descs: v[2],
            rx_ring_full: v[3],
            rx_fill_ring_empty_descs: v[4],
            tx_ring_empty_descs: v[5],
        })
    }

    fn frame(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = (addr as usize).checked_add(len)?;
        if end > self.umem.len {
            return None;
        }
        // SAFETY: inside the UMEM; the kernel handed this frame to us (RX) and does not touch it
        // until we give it back through the fill ring.
        Some(unsafe { std::slice::from_raw_parts(self.umem.ptr.as_ptr().add(addr as usize), len) })
    }

    /// Gives waiting receive frames to the kernel, as many as the fill ring takes.
    fn refill(&mut self) {
        let room = self.fill.free(self.fill_pending.len() as u32);
        for _ in 0..room {
            let a = self.fill_pending.pop().expect("room <= pending");
            self.fill.write(a);
        }
        if room > 0 {
            self.fill.publish();
        }
    }

    /// Receives up to `max` frames, handing each to `f`, and returns their buffers to the fill
    /// ring. Returns how many were received and how many descriptors were invalid (skipped).
    pub fn recv(&mut self, max: u32, mut f: impl FnMut(&[u8])) -> (u32, u32) {
        let n = self.rx.ready(max);
        let mut bad = 0;
        for _ in 0..n {
            let d = self.rx.read();
            match self.frame(d.addr, d.len as usize) {
                Some(data) => f(data),
                None => bad += 1,
            }
            // Aligned chunks: the frame's chunk is its address rounded down.
            self.fill_pending.push(d.addr & !u64::from(FRAME - 1));
        }
        if n > 0 {
            self.rx.release();
        }
        if !self.fill_pending.is_empty() {
            self.refill();
        }
        if self.fill.needs_wakeup() {
            self.kick_rx();
        }
        (n, bad)
    }

    /// Takes back TX frames the kernel has finished with.
    fn reclaim(&mut self) {
        let n = self.comp.ready(u32::MAX);
        for _ in 0..n {
            let a = self.comp.read();
            self.tx_free.push(a & !u64::from(FRAME - 1));
        }
        if n > 0 {
            self.comp.release();
        }
    }

    /// Queues frames for transmission; `next` yields each frame's bytes in turn. Returns how many
    /// were queued; fewer than offered means the TX ring or frames ran out (back-pressure).
    /// Frames larger than a UMEM chunk are skipped and counted as `oversize` (second value).
    pub fn send<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> (usize, usize) {
        self.reclaim();
        let mut taken = 0;
        let mut oversize = 0;
        for data in frames {
            if data.len() > FRAME as usize {
                taken += 1;
                oversize += 1;
                continue;
            }
            if self.tx_free.is_empty() || self.tx.free(1) == 0 {
                break;
            }
            let addr = self.tx_free.pop().expect("checked");
            // SAFETY: the frame is ours (not in the TX ring); inside the UMEM.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.umem.ptr.as_ptr().add(addr as usize),
                    data.len(),
                );
            }
            self.tx.write(Desc {
                addr,
                len: data.len() as u32,
                options: 0,
            });
            taken += 1;
        }
        if taken > oversize {
            self.tx.publish();
            // Copy mode sends only from a syscall; zero-copy drivers ask when they need one.
            if self.tx.needs_wakeup() || !self.zero_copy {
                self.kick_tx();
            }
        }
        (taken, oversize)
    }

    fn kick_tx(&self) {
        // SAFETY: a zero-length sendto on our socket only wakes the kernel's TX path. Errors
        // (EAGAIN, EBUSY, ENOBUFS: busy or out of room) mean "try again later", which the next
        // send does.
        unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
    }

    fn kick_rx(&self) {
        // SAFETY: a zero-length non-blocking recvfrom only wakes the kernel's RX path.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }
}
