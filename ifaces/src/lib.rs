//! Frame devices for subnetstack.
//!
//! A [`Device`] moves Ethernet frames in batches between the stack and something that carries
//! them: a kernel TAP device ([`tap::Tap`], multi-queue, with virtio-net offloads), an in-process
//! link ([`mem::pair`]), or a wrapper around another device that impairs ([`impair::Impaired`]) or
//! records ([`pcap::Capture`]) its traffic. [`netns`] builds private network namespaces for live
//! tests and demos.
//!
//! Buffers are the caller's: a [`Batch`] is allocated once and reused, so the per-frame path does
//! not allocate. Offload metadata (GSO, checksum state) travels beside each frame in
//! [`FrameMeta`].
#![warn(missing_docs)]

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

pub mod gso;
pub mod impair;
pub mod mem;
pub mod netns;
pub mod pcap;
pub mod tap;
mod vnet;
pub mod xdp;

pub use vnet::VirtioNetHdr;

/// Largest frame a device hands over: a 64 KiB GSO super-frame plus its Ethernet header.
pub const MAX_GSO_FRAME: usize = 65_536 + 14;

/// A MAC address.
pub type Mac = [u8; 6];

/// Segmentation offload attached to a frame: the frame carries one large TCP or UDP payload that
/// the receiver (or the kernel, on transmit) cuts into `size`-byte segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Which protocol is segmented.
    pub kind: GsoKind,
    /// Payload bytes per segment (the MSS).
    pub size: u16,
    /// Length of the Ethernet + IP + transport headers that every segment repeats.
    pub hdr_len: u16,
}

/// Kind of segmentation offload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoKind {
    /// TCP over IPv4 (TSO4).
    Tcp4,
    /// TCP over IPv6 (TSO6).
    Tcp6,
    /// UDP segmentation (USO), either family.
    Udp,
}

/// Checksum state of a frame's transport header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Csum {
    /// Complete (or not checked): nothing to do.
    #[default]
    Complete,
    /// The transport checksum holds only the pseudo-header sum; the sum over
    /// `start..` must be folded in and written at `start + offset` (virtio `NEEDS_CSUM`).
    Partial {
        /// Offset from the frame start where summing begins (the transport header).
        start: u16,
        /// Offset of the checksum field from `start`.
        offset: u16,
    },
    /// The sender vouches for the checksum (virtio `DATA_VALID`): the receiver may skip checking.
    Valid,
}

/// Offload metadata travelling with a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameMeta {
    /// Segmentation offload, if the frame is a super-frame.
    pub gso: Option<Gso>,
    /// Checksum state.
    pub csum: Csum,
}

/// One frame buffer: fixed capacity, allocated once, reused. A frame can also take over a
/// buffer whole ([`Batch::push_owned`]), so that a frame built elsewhere is not copied.
#[derive(Clone, Debug)]
pub struct Frame {
    /// At least `len` bytes; `cap` bytes once `buffer_mut` has been called.
    buf: Vec<u8>,
    len: usize,
    cap: usize,
    /// Offload metadata.
    pub meta: FrameMeta,
}

impl Frame {
    /// An empty frame able to hold `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Frame {
            buf: vec![0; capacity],
            len: 0,
            cap: capacity,
            meta: FrameMeta::default(),
        }
    }

    /// The frame's bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The frame's bytes, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the frame holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer, for a device (or the stack) to fill; then call [`set_len`](Self::set_len).
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        if self.buf.len() < self.cap {
            self.buf.resize(self.cap, 0);
        }
        &mut self.buf[..self.cap]
    }

    /// Sets the length after filling [`buffer_mut`](Self::buffer_mut). Panics past the capacity
    /// (a programming error, not an input error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap && len <= self.buf.len(),
            "frame length {len} past capacity"
        );
        self.len = len;
    }

    /// Replaces the contents with a copy of `data`; `false` (and no change) if it does not fit.
    pub fn copy_from(&mut self, data: &[u8], meta: FrameMeta) -> bool {
        if data.len() > self.cap {
            return false;
        }
        if self.buf.len() < data.len() {
            self.buf.resize(data.len(), 0);
        }
        self.buf[..data.len()].copy_from_slice(data);
        self.len = data.len();
        self.meta = meta;
        true
    }
}

/// A reusable set of frame buffers: the first [`len`](Self::len) hold frames, the rest are free.
#[derive(Clone, Debug)]
pub struct Batch {
    frames: Vec<Frame>,
    len: usize,
}

impl Batch {
    /// `count` frames of `frame_capacity` bytes each.
    pub fn new(count: usize, frame_capacity: usize) -> Self {
        Batch {
            frames: (0..count)
                .map(|_| Frame::with_capacity(frame_capacity))
                .collect(),
            len: 0,
        }
    }

    /// Number of frames held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no frame is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of buffers.
    pub fn capacity(&self) -> usize {
        self.frames.len()
    }

    /// True when every buffer holds a frame.
    pub fn is_full(&self) -> bool {
        self.len == self.frames.len()
    }

    /// The frames held.
    pub fn frames(&self) -> &[Frame] {
        &self.frames[..self.len]
    }

    /// The frames held, mutable.
    pub fn frames_mut(&mut self) -> &mut [Frame] {
        &mut self.frames[..self.len]
    }

    /// Forgets every frame (buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops the first `n` frames, keeping the rest in order (after a partial send).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.frames[..self.len].rotate_left(n);
        self.len -= n;
    }

    /// The next free buffer, reset to empty, for a device to fill; [`commit`](Self::commit) it.
    pub fn next_free(&mut self) -> Option<&mut Frame> {
        let f = self.frames.get_mut(self.len)?;
        f.len = 0;
        f.meta = FrameMeta::default();
        Some(f)
    }

    /// Counts the buffer returned by [`next_free`](Self::next_free) as held.
    pub fn commit(&mut self) {
        assert!(self.len < self.frames.len(), "commit without a free buffer");
        self.len += 1;
    }

    /// Takes `data` as the next frame without copying it, and hands back the buffer it replaces
    /// (for the caller to reuse); `Err(data)` when full or larger than the frame capacity.
    pub fn push_owned(&mut self, data: Vec<u8>, meta: FrameMeta) -> Result<Vec<u8>, Vec<u8>> {
        let Some(f) = self.frames.get_mut(self.len) else {
            return Err(data);
        };
        if data.len() > f.cap {
            return Err(data);
        }
        f.len = data.len();
        f.meta = meta;
        self.len += 1;
        Ok(std::mem::replace(&mut f.buf, data))
    }

    /// Copies a frame in; `false` when full or too large.
    pub fn push(&mut self, data: &[u8], meta: FrameMeta) -> bool {
        let ok = self.next_free().is_some_and(|f| f.copy_from(data, meta));
        if ok {
            self.len += 1;
        }
        ok
    }
}

/// What a device can do for the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Received frames may be GSO super-frames (with [`FrameMeta::gso`] set).
    pub rx_gso: bool,
    /// Received frames may carry [`Csum::Partial`] or [`Csum::Valid`].
    pub rx_csum: bool,
    /// The device segments TCP/IPv4 super-frames on transmit.
    pub tx_tso4: bool,
    /// The device segments TCP/IPv6 super-frames on transmit.
    pub tx_tso6: bool,
    /// The device completes [`Csum::Partial`] checksums on transmit.
    pub tx_csum: bool,
    /// Largest super-frame accepted on transmit (bytes, Ethernet header included).
    pub max_gso_frame: usize,
}

/// Static facts about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name (interface name for kernel devices).
    pub name: String,
    /// The stack's MAC address on this link.
    pub mac: Mac,
    /// Link MTU (IP bytes per frame, without the Ethernet header).
    pub mtu: usize,
    /// Offloads in force.
    pub offloads: Offloads,
}

impl DeviceInfo {
    /// Buffer size that holds any frame this device can deliver.
    pub fn max_frame(&self) -> usize {
        if self.offloads.rx_gso {
            MAX_GSO_FRAME
        } else {
            self.mtu + 14
        }
    }

    /// Buffer size that holds any frame this device takes on transmit (a super-frame when it
    /// segments TCP).
    pub fn max_tx_frame(&self) -> usize {
        (self.mtu + 14).max(self.offloads.max_gso_frame)
    }
}

/// A source and sink of Ethernet frames, driven by one poll thread.
pub trait Device: Send {
    /// Static facts: MAC, MTU, offloads.
    fn info(&self) -> &DeviceInfo;

    /// Receives frames into the free buffers of `batch` (after those it already holds); returns
    /// how many arrived. `Ok(0)` means nothing is ready now.
    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize>;

    /// Transmits frames from the front of `frames`; returns how many the device took. Fewer than
    /// offered means back-pressure: offer the rest again later.
    fn send(&mut self, frames: &[Frame]) -> io::Result<usize>;

    /// A file descriptor that polls readable when frames may be waiting, if the device has one.
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// When the device next has work of its own (delayed frames to release), if ever. Call
    /// [`recv`](Self::recv) or [`send`](Self::send) at or after that time.
    fn next_deadline(&self) -> Option<Duration> {
        None
    }
}

impl<D: Device + ?Sized> Device for Box<D> {
    fn info(&self) -> &DeviceInfo {
        (**self).info()
    }
    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        (**self).recv(batch)
    }
    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        (**self).send(frames)
    }
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).poll_fd()
    }
    fn next_deadline(&self) -> Option<Duration> {
        (**self).next_deadline()
    }
}

/// A time source for devices that model time (links, delays, captures). Times are offsets from
/// an arbitrary origin.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Duration;
}

/// Real time, from the moment the clock was made.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock(Instant);

impl SystemClock {
    /// Starts at zero now.
    pub fn new() -> Self {
        SystemClock(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Simulated time, advanced by its owner: deterministic tests and simulations.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    /// Starts at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        self.0
            .fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the time (never backwards).
    pub fn set(&self, t: Duration) {
        self.0
            .fetch_max(t.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_buffers_whole_and_hands_back_the_ones_it_replaces() {
        let mut b = Batch::new(2, 100);
        let old = b.push_owned(vec![1; 60], FrameMeta::default()).unwrap();
        assert_eq!(old.len(), 100, "the frame's own buffer comes back");
        assert_eq!(b.frames()[0].data(), &[1; 60][..]);
        assert_eq!(
            b.push_owned(vec![2; 101], FrameMeta::default()),
            Err(vec![2; 101])
        );
        assert!(b.push(&[3; 100], FrameMeta::default()));
        assert_eq!(b.push_owned(vec![4; 1], FrameMeta::default()), Err(vec![4]));
        // The taken buffer, shorter than the capacity, still receives a full frame later.
        b.clear();
        assert!(
            b.push(&[5; 100], FrameMeta::default()),
            "copy into the 60-byte buffer"
        );
        assert_eq!(b.frames()[0].data(), &[5; 100][..]);
        b.clear();
        let f = b.next_free().unwrap();
        assert_eq!(f.buffer_mut().len(), 100);
        f.set_len(100);
        b.commit();
        assert_eq!(b.len(), 1);
    }
}
