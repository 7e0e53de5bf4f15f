//! A connected pair of in-process devices: two stacks talk over it in tests, simulations and
//! benchmarks, with an optional link model (latency, bandwidth, queue limit).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    gso, Batch, Clock, Device, DeviceInfo, Frame, FrameMeta, Mac, Offloads, MAX_GSO_FRAME,
};

/// The link between the two ends (each direction separately).
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub latency: Duration,
    /// Bits per second; 0 means unlimited.
    pub bandwidth_bps: u64,
    /// Frames queued per direction before tail drop.
    pub queue_frames: usize,
    /// MTU of both ends.
    pub mtu: usize,
    /// MAC of end A and end B.
    pub macs: (Mac, Mac),
    /// Both ends offer transmit offloads as a NIC does (TSO for IPv4 and IPv6, checksum
    /// completion): super-frames and partial checksums are turned into ordinary frames on send
    /// ([`gso::device_transmit`](crate::gso::device_transmit)), so the receiver sees what the
    /// wire would carry.
    pub offload: bool,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            latency: Duration::ZERO,
            bandwidth_bps: 0,
            queue_frames: 4096,
            mtu: 1500,
            macs: ([0x02, 0, 0, 0, 0, 0x0a], [0x02, 0, 0, 0, 0, 0x0b]),
            offload: false,
        }
    }
}

/// Counters of one direction of the link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames accepted for transmission.
    pub sent: u64,
    /// Frames handed to the receiver.
    pub delivered: u64,
    /// Frames dropped because the queue was full.
    pub drop_queue_full: u64,
    /// Frames dropped because they exceeded the MTU.
    pub drop_too_big: u64,
    /// Super-frames or partial checksums the offload emulation could not handle.
    pub drop_bad_offload: u64,
    /// Super-frames cut into segments on send.
    pub tso_frames: u64,
}

#[derive(Debug, Default)]
struct Dir {
    queue: VecDeque<(Duration, Vec<u8>, FrameMeta)>,
    free_at: Duration,
    pool: Vec<Vec<u8>>,
    stats: LinkStats,
}

impl Dir {
    /// Queues one frame for delivery after its serialisation time and the latency.
    fn enqueue(&mut self, cfg: &LinkConfig, now: Duration, data: &[u8], meta: FrameMeta) {
        if data.len() > cfg.mtu + 14 && meta.gso.is_none() {
            self.stats.drop_too_big += 1;
            return;
        }
        if self.queue.len() >= cfg.queue_frames {
            self.stats.drop_queue_full += 1;
            return;
        }
        let start = self.free_at.max(now);
        // Serialisation time; an unlimited link (0 bit/s) takes none.
        let tx = (data.len() as u64 * 8)
            .saturating_mul(1_000_000_000)
            .checked_div(cfg.bandwidth_bps)
            .map_or(Duration::ZERO, Duration::from_nanos);
        self.free_at = start + tx;
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        self.queue
            .push_back((self.free_at + cfg.latency, buf, meta));
        self.stats.sent += 1;
    }
}

#[derive(Debug)]
struct Shared {
    cfg: LinkConfig,
    dirs: [Dir; 2],
}

/// An `eventfd` per direction, readable while frames wait in it, so that a receiver can sleep
/// in `poll(2)` as on a TAP.
/// The bells ring only once some end has asked for its fd (a receiver that sleeps in `poll`):
/// simulations that never sleep make no system calls for them. Once on, every send rings and
/// every receive quiets, with no shortcut: skipping a write or a read on a flag races with the
/// other thread and can leave a bell readable forever (a busy loop) or silent (a lost wakeup).
#[derive(Debug)]
struct Bells([OwnedFd; 2], AtomicBool);

impl Bells {
    fn new() -> io::Result<Bells> {
        let one = || {
            // SAFETY: plain eventfd(2); the fd is owned at once.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Ok(Bells([one()?, one()?], AtomicBool::new(false)))
    }

    fn ring(&self, dir: usize) {
        if !self.1.load(Ordering::SeqCst) {
            return;
        }
        let v = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.0[dir].as_raw_fd(), v.as_ptr().cast(), 8) };
    }

    fn quiet(&self, dir: usize) {
        if !self.1.load(Ordering::SeqCst) {
            return;
        }
        let mut v = [0u8; 8];
        // SAFETY: 8 bytes into a valid buffer from our non-blocking eventfd.
        unsafe { libc::read(self.0[dir].as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    }
}

/// One end of a memory pair.
pub struct MemDevice {
    shared: Arc<Mutex<Shared>>,
    bells: Arc<Bells>,
    side: usize,
    info: DeviceInfo,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDevice")
            .field("side", &self.side)
            .finish()
    }
}

/// Two connected ends: what A sends, B receives, and the other way.
pub fn pair(cfg: LinkConfig, clock: Arc<dyn Clock>) -> (MemDevice, MemDevice) {
    let bells = Arc::new(Bells::new().expect("eventfd"));
    let mk = |side: usize, mac: Mac, shared: &Arc<Mutex<Shared>>| MemDevice {
        shared: shared.clone(),
        bells: bells.clone(),
        side,
        info: DeviceInfo {
            name: format!("mem{}", ["a", "b"][side]),
            mac,
            mtu: cfg.mtu,
            offloads: if cfg.offload {
                Offloads {
                    tx_tso4: true,
                    tx_tso6: true,
                    tx_csum: true,
                    max_gso_frame: MAX_GSO_FRAME,
                    ..Offloads::default()
                }
            } else {
                Offloads::default()
            },
        },
        clock: clock.clone(),
    };
    let shared = Arc::new(Mutex::new(Shared {
        cfg: cfg.clone(),
        dirs: Default::default(),
    }));
    (mk(0, cfg.macs.0, &shared), mk(1, cfg.macs.1, &shared))
}

impl MemDevice {
    /// Counters of the direction this end sends in.
    pub fn tx_stats(&self) -> LinkStats {
        self.shared.lock().expect("link lock").dirs[self.side].stats
    }

    /// Frames in flight towards this end.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().expect("link lock").dirs[1 - self.side]
            .queue
            .len()
    }
}

impl Device for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        let now = self.clock.now();
        // Quiet the bell before looking, so that a frame queued meanwhile rings it again.
        self.bells.quiet(1 - self.side);
        let mut sh = self.shared.lock().expect("link lock");
        let dir = &mut sh.dirs[1 - self.side];
        let mut got = 0;
        while dir.queue.front().is_some_and(|f| f.0 <= now) {
            let Some(slot) = batch.next_free() else {
                break;
            };
            let (_, data, meta) = dir.queue.pop_front().expect("front checked");
            // Frames longer than the receiver's buffer cannot arrive: the MTU check on send
            // bounds them, and receivers size buffers from `info().max_frame()`.
            if slot.copy_from(&data, meta) {
                batch.commit();
                got += 1;
                dir.stats.delivered += 1;
            } else {
                dir.stats.drop_too_big += 1;
            }
            dir.pool.push(data);
        }
        Ok(got)
    }

    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        let now = self.clock.now();
        let mut sh = self.shared.lock().expect("link lock");
        let cfg = sh.cfg.clone();
        let dir = &mut sh.dirs[self.side];
        for f in frames {
            if cfg.offload && f.meta != FrameMeta::default() {
                let put = |s: &[u8]| dir.enqueue(&cfg, now, s, FrameMeta::default());
                match gso::device_transmit(f.data(), &f.meta, put) {
                    Ok(n) => dir.stats.tso_frames += u64::from(n > 1),
                    Err(_) => dir.stats.drop_bad_offload += 1,
                }
                continue;
            }
            dir.enqueue(&cfg, now, f.data(), f.meta);
        }
        drop(sh);
        self.bells.ring(self.side);
        Ok(frames.len())
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.bells.1.store(true, Ordering::SeqCst);
        Some(self.bells.0[1 - self.side].as_fd())
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.shared.lock().expect("link lock").dirs[1 - self.side]
            .queue
            .front()
            .map(|f| f.0)
    }
}
