//! Connection buffers: a send ring and a receive ring with an out-of-order assembler. Both
//! allocate lazily and grow up to their limit, so an idle connection holds no buffer memory.

use std::cell::RefCell;
use std::cmp::min;

/// The smallest ring storage: what most request and response buffers need.
const MIN_RING: usize = 2048;
/// Released smallest storages kept per thread for the next ring that starts.
const SPARE_MAX: usize = 256;

thread_local! {
    /// Storage of released smallest rings. A keep-alive connection empties its buffers after
    /// every exchange, and idle connections hold none: without this, every request would
    /// allocate and free (and zero) two 2 KiB buffers. At most 512 KiB per thread.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Storage of `cap` bytes: a spare one when there is one of that size (its old bytes are never
/// read: a ring reads only what was written since), else a new zeroed one.
fn new_storage(cap: usize) -> Vec<u8> {
    if cap == MIN_RING {
        if let Ok(Some(v)) = SPARE.try_with(|s| s.borrow_mut().pop()) {
            return v;
        }
    }
    vec![0u8; cap]
}

/// Gives storage back: kept if it is of the smallest size and there is room.
fn free_storage(v: Vec<u8>) {
    if v.len() == MIN_RING {
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_MAX {
                s.push(v);
            }
        });
    }
}

/// A byte ring with a capacity limit, growing by doubling from empty.
#[derive(Debug, Default)]
struct Ring {
    buf: Vec<u8>,
    head: usize,
    limit: usize,
    /// The size the storage had when it was last released: regrowth goes straight back to it
    /// (a bulk sender's buffer empties whenever the peer acknowledges everything, and doubling
    /// up from 2 KiB again costs an allocation and a copy per step).
    last: u32,
}

impl Ring {
    fn new(limit: usize) -> Self {
        Ring {
            buf: Vec::new(),
            head: 0,
            limit,
            last: 0,
        }
    }

    /// Makes the storage at least `need` bytes (up to the limit), keeping `used` bytes from head.
    fn grow(&mut self, need: usize, used: usize) {
        let need = need.min(self.limit);
        if need <= self.buf.len() {
            return;
        }
        let mut cap = self.buf.len().max(MIN_RING);
        if need > MIN_RING {
            // A large write: back to the earlier size at once (a small one starts small, so that
            // a connection that once sent a lot does not allocate as much for every reply).
            cap = cap.max(self.last as usize);
        }
        while cap < need {
            cap *= 2;
        }
        let cap = cap.min(self.limit);
        let mut b = new_storage(cap);
        let (x, y) = self.slices(0, used);
        b[..x.len()].copy_from_slice(x);
        b[x.len()..x.len() + y.len()].copy_from_slice(y);
        free_storage(std::mem::replace(&mut self.buf, b));
        self.head = 0;
    }

    /// The bytes at `off..off + len` from the head, as up to two slices.
    fn slices(&self, off: usize, len: usize) -> (&[u8], &[u8]) {
        if self.buf.is_empty() || len == 0 {
            return (&[], &[]);
        }
        let cap = self.buf.len();
        let start = (self.head + off) % cap;
        let first = min(len, cap - start);
        (&self.buf[start..start + first], &self.buf[..len - first])
    }

    fn write_at(&mut self, off: usize, data: &[u8]) {
        let cap = self.buf.len();
        let start = (self.head + off) % cap;
        let first = min(data.len(), cap - start);
        self.buf[start..start + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
    }

    fn advance(&mut self, n: usize) {
        if !self.buf.is_empty() {
            self.head = (self.head + n) % self.buf.len();
        }
    }

    fn release_if_empty(&mut self, used: usize) {
        if used == 0 && !self.buf.is_empty() {
            self.last = self.buf.len() as u32;
            free_storage(std::mem::take(&mut self.buf));
            self.head = 0;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        free_storage(std::mem::take(&mut self.buf));
    }
}

/// Bytes the application wrote and the peer has not acknowledged yet.
#[derive(Debug)]
pub struct SendBuffer {
    ring: Ring,
    len: usize,
}

impl SendBuffer {
    /// Holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        SendBuffer {
            ring: Ring::new(limit),
            len: 0,
        }
    }

    /// Bytes held (sent and unsent).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Free space.
    pub fn space(&self) -> usize {
        self.ring.limit - self.len
    }

    /// Free space in storage already allocated (what can be queued without growing).
    pub fn room_in_place(&self) -> usize {
        self.ring.buf.len().saturating_sub(self.len)
    }

    /// Appends as much of `data` as fits; returns how much.
    pub fn write(&mut self, data: &[u8]) -> usize {
        let n = min(data.len(), self.space());
        if n == 0 {
            return 0;
        }
        self.ring.grow(self.len + n, self.len);
        self.ring.write_at(self.len, &data[..n]);
        self.len += n;
        n
    }

    /// Copies `len` bytes starting `off` bytes after the oldest unacknowledged byte into `out`.
    pub fn read_at(&self, off: usize, out: &mut [u8]) {
        let (a, b) = self.ring.slices(off, out.len());
        out[..a.len()].copy_from_slice(a);
        out[a.len()..].copy_from_slice(b);
    }

    /// Appends `len` bytes starting `off` bytes after the oldest unacknowledged byte to `out`
    /// (a frame being built: no zeroing first).
    pub fn append_at(&self, off: usize, len: usize, out: &mut Vec<u8>) {
        let (a, b) = self.ring.slices(off, len);
        out.extend_from_slice(a);
        out.extend_from_slice(b);
    }

    /// Drops `n` acknowledged bytes from the front.
    pub fn ack(&mut self, n: usize) {
        let n = min(n, self.len);
        self.ring.advance(n);
        self.len -= n;
        self.ring.release_if_empty(self.len);
    }

    /// Heap bytes held.
    pub fn capacity(&self) -> usize {
        self.ring.buf.capacity()
    }
}

/// Most out-of-order ranges kept; a segment that would need more is dropped (the sender
/// retransmits it).
pub const MAX_RANGES: usize = 32;

/// Received bytes: in order (readable) and out of order (held in place inside the window).
#[derive(Debug)]
pub struct RecvBuffer {
    ring: Ring,
    /// Readable bytes from the head.
    len: usize,
    /// Out-of-order ranges `[start, end)` as offsets from the end of the readable bytes, sorted,
    /// disjoint, not touching.
    ooo: Vec<(usize, usize)>,
}

impl RecvBuffer {
    /// A window of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        RecvBuffer {
            ring: Ring::new(limit),
            len: 0,
            ooo: Vec::new(),
        }
    }

    /// Readable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is readable.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The receive window: room after the readable bytes.
    pub fn window(&self) -> usize {
        self.ring.limit - self.len
    }

    /// Out-of-order ranges (offsets from the next expected byte), for SACK.
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ooo
    }

    /// Stores `data` that starts `off` bytes after the next expected byte (trimmed to the
    /// window). Returns how many bytes became readable (in order).
    pub fn write(&mut self, off: usize, data: &[u8]) -> usize {
        let win = self.window();
        if off >= win || data.is_empty() {
            return 0;
        }
        let data = &data[..min(data.len(), win - off)];
        let (s, e) = (off, off + data.len());
        if s == 0 && self.ooo.is_empty() {
            // In order with no holes (the common case): append.
            self.ring.grow(self.len + e, self.len);
            self.ring.write_at(self.len, data);
            self.len += e;
            return e;
        }
        // Merge into the range set; refuse when it would need too many ranges.
        let mut merged = (s, e);
        let mut keep = Vec::with_capacity(self.ooo.len() + 1);
        for &(a, b) in &self.ooo {
            if b < merged.0 || a > merged.1 {
                keep.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
            }
        }
        if keep.len() >= MAX_RANGES && merged.0 != 0 {
            return 0;
        }
        // Growing keeps the readable bytes and every out-of-order byte already placed.
        let held = self.len + self.ooo.last().map_or(0, |r| r.1);
        self.ring.grow(self.len + e, held);
        self.ring.write_at(self.len + s, data);
        let at = keep.partition_point(|r| r.0 < merged.0);
        keep.insert(at, merged);
        self.ooo = keep;
        if self.ooo[0].0 != 0 {
            return 0;
        }
        let (_, end) = self.ooo.remove(0);
        self.len += end;
        for r in &mut self.ooo {
            r.0 -= end;
            r.1 -= end;
        }
        end
    }

    /// Copies readable bytes into `out`; returns how many.
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let n = min(out.len(), self.len);
        let (a, b) = self.ring.slices(0, n);
        out[..a.len()].copy_from_slice(a);
        out[a.len()..n].copy_from_slice(b);
        self.ring.advance(n);
        self.len -= n;
        if self.ooo.is_empty() {
            self.ring.release_if_empty(self.len);
        }
        n
    }

    /// Heap bytes held.
    pub fn capacity(&self) -> usize {
        self.ring.buf.capacity() + self.ooo.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_ring_wraps_and_frees() {
        let mut s = SendBuffer::new(5000);
        assert_eq!(s.capacity(), 0);
        let data: Vec<u8> = (0..=255).cycle().take(4000).collect();
        assert_eq!(s.write(&data), 4000);
        s.ack(3000);
        assert_eq!(s.write(&data), 4000);
        assert_eq!(s.write(&data), 0, "full");
        let mut out = vec![0; 1000];
        s.read_at(0, &mut out);
        assert_eq!(out, data[3000..4000]);
        s.read_at(1000, &mut out);
        assert_eq!(out, data[..1000]);
        s.ack(5000);
        assert!(s.is_empty());
        assert_eq!(s.capacity(), 0, "an idle buffer holds nothing");
    }

    #[test]
    fn a_released_ring_regrows_to_its_earlier_size_for_large_writes_only() {
        let mut s = SendBuffer::new(1 << 20);
        assert_eq!(s.write(&[1; 100_000]), 100_000);
        assert_eq!(s.capacity(), 131_072);
        s.ack(100_000);
        assert_eq!(s.capacity(), 0);
        // A large write goes straight back (one allocation instead of six doublings)...
        s.write(&[2; 5000]);
        assert_eq!(s.capacity(), 131_072);
        s.ack(5000);
        // ...a small one starts small.
        s.write(&[3; 500]);
        assert_eq!(s.capacity(), 2048);
    }

    #[test]
    fn receive_assembles_out_of_order_within_the_window() {
        let mut r = RecvBuffer::new(10_000);
        let data: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(r.write(3000, &data[3000..6000]), 0);
        assert_eq!(r.ranges(), &[(3000, 6000)]);
        assert_eq!(r.write(7000, &data[7000..9000]), 0);
        assert_eq!(r.write(0, &data[..3000]), 6000, "fills up to the next hole");
        assert_eq!(r.ranges(), &[(1000, 3000)]);
        // A duplicate of readable data is ignored by the caller's trimming; overlap merges.
        assert_eq!(r.write(0, &data[6000..7500]), 9000 - 6000);
        let mut out = vec![0; 9000];
        assert_eq!(r.read(&mut out), 9000);
        assert!(out == data, "bytes survive reordering and growth");
        // Past the window: trimmed.
        let mut small = RecvBuffer::new(100);
        assert_eq!(small.write(50, &[1; 100]), 0);
        assert_eq!(small.ranges(), &[(50, 100)]);
        assert_eq!(small.write(200, &[1; 10]), 0);
    }

    #[test]
    fn too_many_holes_are_refused_not_grown() {
        let mut r = RecvBuffer::new(1 << 20);
        for i in 0..MAX_RANGES {
            r.write(10 + i * 10, &[1; 5]);
        }
        assert_eq!(r.ranges().len(), MAX_RANGES);
        r.write(5000, &[1; 5]);
        assert_eq!(r.ranges().len(), MAX_RANGES);
        // Filling the first hole still works.
        assert_eq!(r.write(0, &[0; 10]), 15);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Segments of a stream arriving in any order, with duplicates and overlaps, read back
        /// in pieces, give the stream; the buffer never holds more than its window.
        #[test]
        fn any_arrival_order_reads_back_the_stream(
            segs in proptest::collection::vec((0usize..6000, 1usize..1500), 1..80),
            reads in proptest::collection::vec(1usize..3000, 1..40),
        ) {
            let stream: Vec<u8> = (0..6000u32).map(|i| (i * 31 % 253) as u8).collect();
            let mut r = RecvBuffer::new(4096);
            let mut next = 0usize; // the stream offset of the next expected byte
            let mut got = Vec::new();
            let mut reads = reads.into_iter().cycle();
            // Every segment, then retransmissions from the next expected byte until all arrived
            // (as a sender does when the window cut a segment short).
            let retransmits = std::iter::repeat_n((usize::MAX, 1000), 20_000);
            for (off, len) in segs.into_iter().chain(retransmits) {
                let off = if off == usize::MAX { next } else { off };
                if next == 6000 {
                    break;
                }
                let end = (off + len).min(6000);
                if end <= next {
                    continue; // the caller trims old data
                }
                let start = off.max(next);
                next += r.write(start - next, &stream[start..end]);
                prop_assert!(r.len() + r.window() == 4096);
                let mut buf = vec![0; reads.next().unwrap()];
                let n = r.read(&mut buf);
                got.extend_from_slice(&buf[..n]);
            }
            let mut buf = vec![0; 6000];
            let n = r.read(&mut buf);
            got.extend_from_slice(&buf[..n]);
            prop_assert!(got == stream[..got.len()], "bytes in order");
            prop_assert_eq!(got.len(), 6000);
        }
    }
}
