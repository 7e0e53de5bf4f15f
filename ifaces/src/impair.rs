//! A wrapper that impairs any device's traffic, the real TAP included: seeded loss, duplication,
//! bit-flip corruption, reordering, delay and jitter, per direction, with counters of everything
//! it did. The same seed and the same traffic give the same behaviour.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::{gso, Batch, Clock, Csum, Device, DeviceInfo, Frame, FrameMeta};

/// Impairments of one direction. Probabilities are per frame, 0.0 to 1.0.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// Drop the frame.
    pub loss: f64,
    /// Deliver the frame twice.
    pub duplicate: f64,
    /// Flip one random bit of the frame.
    pub corrupt: f64,
    /// Hold the frame back until `reorder_depth` later frames have passed (or `reorder_timeout`).
    pub reorder: f64,
    /// How many later frames overtake a held frame.
    pub reorder_depth: u32,
    /// Longest a held frame waits for others to overtake it.
    pub reorder_timeout: Duration,
    /// Fixed delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter` (this alone can reorder frames).
    pub jitter: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            loss: 0.0,
            duplicate: 0.0,
            corrupt: 0.0,
            reorder: 0.0,
            reorder_depth: 3,
            reorder_timeout: Duration::from_millis(10),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }
}

/// What the wrapper does in each direction, and its seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImpairConfig {
    /// RNG seed: same seed, same pattern.
    pub seed: u64,
    /// Frames the wrapped device receives (towards the stack).
    pub rx: Impairment,
    /// Frames the stack sends (towards the wrapped device).
    pub tx: Impairment,
}

/// Counters of one direction. `passed = seen - dropped + duplicated` once nothing is queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImpairStats {
    /// Frames that entered.
    pub seen: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Frames with a flipped bit.
    pub corrupted: u64,
    /// Frames held back for reordering.
    pub reordered: u64,
    /// Frames given a non-zero delay.
    pub delayed: u64,
    /// Frames that left.
    pub passed: u64,
}

struct Queued {
    at: Duration,
    seq: u64,
    data: Vec<u8>,
    meta: FrameMeta,
}

struct Held {
    after_passed: u64,
    deadline: Duration,
    frame: Queued,
}

struct Lane {
    cfg: Impairment,
    rng: Xoshiro256PlusPlus,
    /// Ordered by (at, seq).
    queue: VecDeque<Queued>,
    held: Vec<Held>,
    pool: Vec<Vec<u8>>,
    seq: u64,
    stats: ImpairStats,
}

impl Lane {
    fn new(cfg: Impairment, seed: u64) -> Self {
        Lane {
            cfg,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            queue: VecDeque::new(),
            held: Vec::new(),
            pool: Vec::new(),
            seq: 0,
            stats: ImpairStats::default(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        // Always draw, so that the pattern of one impairment does not depend on another's setting.
        let x: f64 = self.rng.random();
        x < p
    }

    fn enqueue(&mut self, q: Queued) {
        let pos = self
            .queue
            .partition_point(|e| (e.at, e.seq) <= (q.at, q.seq));
        self.queue.insert(pos, q);
    }

    /// Runs one frame through the impairments.
    fn admit(&mut self, data: &[u8], meta: FrameMeta, now: Duration) {
        self.stats.seen += 1;
        let lose = self.chance(self.cfg.loss);
        let corrupt = self.chance(self.cfg.corrupt);
        let dup = self.chance(self.cfg.duplicate);
        let bit: u64 = self.rng.random();
        if lose {
            self.stats.dropped += 1;
            return;
        }
        let copies = if dup {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        // A bit flips on the wire, after the device's offloads: a super-frame or a frame whose
        // checksum the device completes is first cut and completed as the device would (else
        // the device would checksum the flipped bit and nobody could tell). A corrupted frame
        // also loses any checksum-valid mark, so the receiver checks it.
        let mut owned: Vec<Vec<u8>> = Vec::new();
        if corrupt && (meta.gso.is_some() || matches!(meta.csum, Csum::Partial { .. })) {
            let done = gso::device_transmit(data, &meta, |s| owned.push(s.to_vec()));
            if done.is_err() {
                owned.clear();
            }
        }
        let single = [data];
        let refs: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let (pieces, mut meta) = if owned.is_empty() {
            (&single[..], meta)
        } else {
            (&refs[..], FrameMeta::default())
        };
        if corrupt {
            meta.csum = Csum::Complete;
        }
        let victim = ((bit >> 32) % pieces.len() as u64) as usize;
        for _ in 0..copies {
            for (i, piece) in pieces.iter().enumerate() {
                let mut buf = self.pool.pop().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(piece);
                if corrupt && i == victim && !buf.is_empty() {
                    let b = (bit % (buf.len() as u64 * 8)) as usize;
                    buf[b / 8] ^= 1 << (b % 8);
                }
                self.queue_copy(buf, meta, now);
            }
        }
        if corrupt {
            self.stats.corrupted += 1;
        }
    }

    /// Queues one frame (held back for reordering, delayed by the jitter).
    fn queue_copy(&mut self, buf: Vec<u8>, meta: FrameMeta, now: Duration) {
        let hold = self.chance(self.cfg.reorder);
        let jitter = if self.cfg.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.rng.random_range(0..=self.cfg.jitter.as_nanos() as u64))
        };
        let delay = self.cfg.delay + jitter;
        if !delay.is_zero() {
            self.stats.delayed += 1;
        }
        self.seq += 1;
        let q = Queued {
            at: now + delay,
            seq: self.seq,
            data: buf,
            meta,
        };
        if hold {
            self.stats.reordered += 1;
            self.held.push(Held {
                after_passed: self.stats.passed + u64::from(self.cfg.reorder_depth),
                deadline: now + delay + self.cfg.reorder_timeout,
                frame: q,
            });
        } else {
            self.enqueue(q);
        }
    }

    /// Moves held frames whose time has come into the queue.
    fn release_held(&mut self, now: Duration) {
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            if self.stats.passed >= h.after_passed || now >= h.deadline {
                let mut h = self.held.remove(i);
                h.frame.at = h.frame.at.max(now);
                self.enqueue(h.frame);
            } else {
                i += 1;
            }
        }
    }

    /// The next frame due at `now`, if any.
    fn pop_due(&mut self, now: Duration) -> Option<Queued> {
        self.release_held(now);
        if self.queue.front().is_some_and(|q| q.at <= now) {
            self.stats.passed += 1;
            self.queue.pop_front()
        } else {
            None
        }
    }

    fn next_deadline(&self) -> Option<Duration> {
        let q = self.queue.front().map(|q| q.at);
        let h = self.held.iter().map(|h| h.deadline).min();
        q.into_iter().chain(h).min()
    }
}

/// A device whose traffic goes through seeded impairments.
pub struct Impaired<D> {
    inner: D,
    rx: Lane,
    tx: Lane,
    scratch: Batch,
    out: Batch,
    clock: Arc<dyn Clock>,
}

impl<D: Device> Impaired<D> {
    /// Wraps `inner`. Delays are measured with `clock`.
    pub fn new(inner: D, cfg: ImpairConfig, clock: Arc<dyn Clock>) -> Self {
        let info = inner.info();
        Impaired {
            rx: Lane::new(cfg.rx, cfg.seed),
            tx: Lane::new(cfg.tx, cfg.seed ^ 0x9e37_79b9_7f4a_7c15),
            scratch: Batch::new(64, info.max_frame()),
            out: Batch::new(64, info.max_tx_frame()),
            inner,
            clock,
        }
    }

    /// Counters of the receive direction.
    pub fn rx_stats(&self) -> ImpairStats {
        self.rx.stats
    }

    /// Counters of the transmit direction.
    pub fn tx_stats(&self) -> ImpairStats {
        self.tx.stats
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped device, mutable.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// Sends transmit frames that are due to the wrapped device (through a reused batch, so
    /// nothing is allocated per frame once the pools are warm).
    fn flush_tx(&mut self, now: Duration) -> io::Result<()> {
        loop {
            if !self.out.is_empty() {
                let n = self.inner.send(self.out.frames())?;
                self.out.consume(n);
                if !self.out.is_empty() {
                    return Ok(()); // back-pressure: the rest waits in `out`
                }
            }
            while !self.out.is_full() {
                let Some(q) = self.tx.pop_due(now) else {
                    break;
                };
                if !self.out.push(&q.data, q.meta) {
                    self.tx.stats.dropped += 1;
                }
                self.tx.pool.push(q.data);
            }
            if self.out.is_empty() {
                return Ok(());
            }
        }
    }
}

impl<D: Device> Device for Impaired<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        let now = self.clock.now();
        self.flush_tx(now)?;
        self.scratch.clear();
        self.inner.recv(&mut self.scratch)?;
        for f in self.scratch.frames() {
            self.rx.admit(f.data(), f.meta, now);
        }
        let mut got = 0;
        while !batch.is_full() {
            let Some(q) = self.rx.pop_due(now) else {
                break;
            };
            if batch.push(&q.data, q.meta) {
                got += 1;
            }
            self.rx.pool.push(q.data);
        }
        Ok(got)
    }

    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        let now = self.clock.now();
        for f in frames {
            self.tx.admit(f.data(), f.meta, now);
        }
        self.flush_tx(now)?;
        Ok(frames.len())
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.poll_fd()
    }

    fn next_deadline(&self) -> Option<Duration> {
        [
            self.rx.next_deadline(),
            self.tx.next_deadline(),
            self.inner.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
