//! Linux TAP devices: `IFF_TAP | IFF_NO_PI`, non-blocking, optionally multi-queue
//! (`IFF_MULTI_QUEUE`, one [`Tap`] per queue for one shard thread each) and with virtio-net
//! offloads (`IFF_VNET_HDR` + `TUNSETOFFLOAD`: GSO super-frames in, TSO super-frames out).
//!
//! Done with `libc` ioctls rather than a TUN crate: we need the raw fd per queue, vnet headers on
//! `readv`/`writev` without copies, and nothing else; see the README's dependency table.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::vnet::VirtioNetHdr;
use crate::{Batch, Device, DeviceInfo, Frame, Mac, Offloads, MAX_GSO_FRAME};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// How to open a TAP device.
#[derive(Clone, Debug)]
pub struct TapConfig {
    /// Interface name (up to 15 bytes); created if absent, attached if it exists.
    pub name: String,
    /// Number of queues; more than one sets `IFF_MULTI_QUEUE`.
    pub queues: usize,
    /// Turn on virtio-net offloads (checksum, TSO4, TSO6). Off by default.
    pub offload: bool,
    /// The stack's MAC on this link (the kernel side has its own).
    pub mac: Mac,
    /// Frames the kernel may queue towards us (the interface's `txqueuelen`, default 65,536).
    /// Linux's default for a TAP is 500: 10,000 busy connections (a request and an ACK each in
    /// flight) overflowed even 10,000 while the poll thread reads one frame per system call,
    /// and every overflow is a kernel retransmission a second later. `None` leaves the
    /// kernel's setting.
    pub tx_queue_len: Option<u32>,
}

impl TapConfig {
    /// One queue, no offloads, a locally administered MAC derived from the name.
    pub fn new(name: &str) -> Self {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let b = h.to_le_bytes();
        TapConfig {
            name: name.to_owned(),
            queues: 1,
            offload: false,
            mac: [0x02, 0x53, b[0], b[1], b[2], b[3]],
            tx_queue_len: Some(65_536),
        }
    }
}

/// Counters of one TAP queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Received frames dropped because they did not fit the buffer (truncated).
    pub rx_drop_truncated: u64,
    /// Received frames dropped for a virtio-net header we cannot use.
    pub rx_drop_bad_vnet: u64,
    /// Frames the kernel refused on transmit (skipped, counted).
    pub tx_errors: u64,
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    info: DeviceInfo,
    vnet: bool,
    stats: TapStats,
}

pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "bad interface name {name:?} (1 to {} bytes)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Runs one interface ioctl (`SIOC*`) on `r` through a throwaway datagram socket.
///
/// # Safety
///
/// `req` must be an interface request that reads and writes only `r` (and, for `SIOCETHTOOL`,
/// the buffer its `ifru_data` points to, which must be valid).
pub(crate) unsafe fn if_ioctl(req: libc::Ioctl, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let s = unsafe {
        OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    // SAFETY: the caller vouches for `req` and `r`.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), req, r as *mut libc::ifreq) }).map(|_| ())
}

/// The MTU of an interface in the calling thread's network namespace.
pub fn interface_mtu(name: &str) -> io::Result<usize> {
    let mut r = ifreq(name)?;
    // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu of our ifreq.
    unsafe { if_ioctl(libc::SIOCGIFMTU, &mut r) }?;
    // SAFETY: the kernel filled the mtu member.
    Ok(unsafe { r.ifr_ifru.ifru_mtu } as usize)
}

/// The MAC address of an interface in the calling thread's network namespace.
pub fn interface_mac(name: &str) -> io::Result<Mac> {
    let mut r = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of our ifreq.
    unsafe { if_ioctl(libc::SIOCGIFHWADDR, &mut r) }?;
    // SAFETY: the kernel filled the hwaddr member.
    let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(m)
}

/// Sets an interface's `txqueuelen` (`SIOCSIFTXQLEN`).
fn set_tx_queue_len(name: &str, len: u32) -> io::Result<()> {
    let mut r = ifreq(name)?;
    // ifr_qlen shares the union with ifr_metric.
    r.ifr_ifru.ifru_metric = len as libc::c_int;
    // SAFETY: SIOCSIFTXQLEN reads ifr_name and ifr_qlen of our ifreq.
    unsafe { if_ioctl(libc::SIOCSIFTXQLEN, &mut r) }
}

impl Tap {
    /// Opens (creating if needed) the device's queues. Needs `CAP_NET_ADMIN`; errors say which
    /// step failed.
    pub fn open(cfg: &TapConfig) -> io::Result<Vec<Tap>> {
        if cfg.queues == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TAP needs at least one queue",
            ));
        }
        let mut flags = IFF_TAP | IFF_NO_PI;
        if cfg.queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        if cfg.offload {
            flags |= IFF_VNET_HDR;
        }
        let mut name = cfg.name.clone();
        let mut out = Vec::with_capacity(cfg.queues);
        for q in 0..cfg.queues {
            let tag = format!("TAP {name} queue {q}");
            let ctx =
                |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{tag}: {what}: {e}"));
            // SAFETY: open(2) of a constant path; the fd is owned at once.
            let fd = unsafe {
                OwnedFd::from_raw_fd(
                    cvt(libc::open(
                        c"/dev/net/tun".as_ptr(),
                        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                    ))
                    .map_err(|e| ctx(e, "open /dev/net/tun"))?,
                )
            };
            let mut r = ifreq(&name)?;
            r.ifr_ifru.ifru_flags = flags;
            // SAFETY: TUNSETIFF reads and writes our ifreq.
            cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut r) })
                .map_err(|e| ctx(e, "TUNSETIFF"))?;
            // SAFETY: the kernel wrote a NUL-terminated name.
            name = unsafe { CStr::from_ptr(r.ifr_name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            if cfg.offload {
                let sz: libc::c_int = VirtioNetHdr::LEN as libc::c_int;
                // SAFETY: TUNSETVNETHDRSZ reads an int.
                cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &sz) })
                    .map_err(|e| ctx(e, "TUNSETVNETHDRSZ"))?;
                // SAFETY: TUNSETOFFLOAD takes the flags by value.
                cvt(unsafe {
                    libc::ioctl(
                        fd.as_raw_fd(),
                        TUNSETOFFLOAD,
                        (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) as libc::c_ulong,
                    )
                })
                .map_err(|e| ctx(e, "TUNSETOFFLOAD"))?;
            }
            out.push(Tap {
                fd,
                info: DeviceInfo {
                    name: name.clone(),
                    mac: cfg.mac,
                    mtu: 1500,
                    offloads: Offloads {
                        rx_gso: cfg.offload,
                        rx_csum: cfg.offload,
                        tx_tso4: cfg.offload,
                        tx_tso6: cfg.offload,
                        tx_csum: cfg.offload,
                        max_gso_frame: if cfg.offload { MAX_GSO_FRAME } else { 0 },
                    },
                },
                vnet: cfg.offload,
                stats: TapStats::default(),
            });
        }
        if let Ok(mtu) = interface_mtu(&name) {
            for t in &mut out {
                t.info.mtu = mtu;
            }
        }
        if let Some(len) = cfg.tx_queue_len {
            set_tx_queue_len(&name, len).map_err(|e| {
                io::Error::new(e.kind(), format!("TAP {name}: txqueuelen {len}: {e}"))
            })?;
        }
        Ok(out)
    }

    /// Re-reads the interface MTU (after `ip link set mtu`).
    pub fn refresh_mtu(&mut self) -> io::Result<usize> {
        self.info.mtu = interface_mtu(&self.info.name)?;
        Ok(self.info.mtu)
    }

    /// This queue's counters.
    pub fn stats(&self) -> TapStats {
        self.stats
    }

    fn read_one(&mut self, f: &mut Frame) -> io::Result<usize> {
        let mut hdr = [0u8; VirtioNetHdr::LEN];
        // One spill byte after the buffer tells a frame that fits exactly from a truncated one.
        let mut spill = [0u8; 1];
        let buf = f.buffer_mut();
        let cap = buf.len();
        let hdr_len = if self.vnet { hdr.len() } else { 0 };
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr_len,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: cap,
            },
            libc::iovec {
                iov_base: spill.as_mut_ptr().cast(),
                iov_len: 1,
            },
        ];
        // SAFETY: every iovec points into a live, writable buffer of the stated length.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 3) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).saturating_sub(hdr_len);
        if n > cap {
            self.stats.rx_drop_truncated += 1;
            return Ok(usize::MAX);
        }
        if self.vnet {
            match VirtioNetHdr::parse(&hdr).and_then(|h| h.to_meta()) {
                Ok(m) => f.meta = m,
                Err(_) => {
                    self.stats.rx_drop_bad_vnet += 1;
                    return Ok(usize::MAX);
                }
            }
        }
        f.set_len(n);
        Ok(n)
    }

    fn write_one(&mut self, f: &Frame) -> io::Result<()> {
        let n = if self.vnet {
            let hdr = VirtioNetHdr::from_meta(&f.meta).emit();
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut _,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: f.data().as_ptr() as *mut _,
                    iov_len: f.len(),
                },
            ];
            // SAFETY: both iovecs point into live buffers of the stated lengths; writev only reads.
            unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) }
        } else {
            // SAFETY: the frame is live for its length; write only reads.
            unsafe { libc::write(self.fd.as_raw_fd(), f.data().as_ptr().cast(), f.len()) }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Device for Tap {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        let mut got = 0;
        loop {
            let Some(f) = batch.next_free() else {
                return Ok(got);
            };
            match self.read_one(f) {
                Ok(usize::MAX) => continue,
                Ok(_) => {
                    batch.commit();
                    self.stats.rx_frames += 1;
                    got += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Report what arrived; the error comes back on the next call.
                Err(_) if got > 0 => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        for (i, f) in frames.iter().enumerate() {
            loop {
                match self.write_one(f) {
                    Ok(()) => {
                        self.stats.tx_frames += 1;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(i),
                    // A frame the kernel will not take (bad GSO metadata, too large): skip it.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE)
                        ) =>
                    {
                        self.stats.tx_errors += 1;
                        break;
                    }
                    Err(_) if i > 0 => return Ok(i),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(frames.len())
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }
}
