//! AF_XDP: the stack on a real interface's queues, taking only its own frames.
//!
//! [`Xdp::open`] loads a small XDP program (hand-assembled, loaded with `bpf(2)`: no clang, no
//! libbpf), attaches it to the interface with a BPF link, and opens one AF_XDP socket per queue.
//! The program sends to the sockets only what the stack owns: IPv4 and IPv6 packets to an
//! address inside a local prefix (kept in one `BPF_MAP_TYPE_LPM_TRIE` per family), ARP asking
//! for such an address and Neighbour Solicitations for one. Everything else goes on to the
//! kernel (`XDP_PASS`), so the host's own services on the same interface keep working.
//!
//! The link is a file descriptor: when the last [`XdpDevice`] (and the [`XdpProgram`]) is
//! dropped, or the process dies (even by `kill -9`), the kernel detaches the program.
//!
//! Modes: native XDP (in the driver) is tried first and generic XDP (after the kernel built an
//! skb) is the fallback; zero-copy sockets are tried first and copy mode is the fallback (veth
//! has no zero-copy). [`XdpProgram::describe`] says what was chosen and why.

mod bpf;
mod xsk;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ipnet::IpNet;

pub use xsk::XskKernelStats;
use xsk::{Xsk, XskSizes, FRAME, XDP_COPY, XDP_USE_NEED_WAKEUP, XDP_ZEROCOPY};

use crate::tap::{interface_mac, interface_mtu};
use crate::{Batch, Device, DeviceInfo, Frame, FrameMeta, Offloads};

/// Where the XDP program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Native if the driver supports it, else generic.
    #[default]
    Auto,
    /// In the driver, before any skb exists (fails if the driver cannot).
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Generic,
}

/// Whether the sockets may share buffers with the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy where the driver allows it, else copy mode.
    #[default]
    Auto,
    /// Copy mode always.
    Off,
    /// Zero-copy or an error.
    Required,
}

/// How to open AF_XDP on an interface.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// Interface name.
    pub interface: String,
    /// Queues `0..queues`, one socket (and one shard) each.
    pub queues: u32,
    /// The stack's local prefixes: frames for these go to the sockets.
    pub prefixes: Vec<IpNet>,
    /// Where the program runs.
    pub mode: XdpMode,
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
    /// UMEM frames per socket (4 KiB each; up to a ring's worth receive, the rest transmit).
    /// Default 4096 (16 MiB); kept between twice the ring size and 2^20.
    pub frames: u32,
    /// Entries per ring, rounded up to a power of two (at most 65,536). Default 2048.
    pub ring: u32,
    /// Capacity of each prefix map. Default 65,536.
    pub max_prefixes: u32,
}

impl XdpConfig {
    /// One queue, automatic modes, default sizes.
    pub fn new(interface: &str, prefixes: Vec<IpNet>) -> Self {
        XdpConfig {
            interface: interface.to_owned(),
            queues: 1,
            prefixes,
            mode: XdpMode::Auto,
            zero_copy: ZeroCopy::Auto,
            frames: 4096,
            ring: 2048,
            max_prefixes: 65_536,
        }
    }
}

/// The attached program and its maps; shared by the devices so that it lives as long as any.
#[derive(Debug)]
struct Attached {
    v4: bpf::Map,
    v6: bpf::Map,
    xsks: bpf::Map,
    _prog: OwnedFd,
    _link: OwnedFd,
    native: bool,
    why_generic: Option<String>,
    ifindex: u32,
    interface: String,
}

/// Handle on the attached XDP program: which prefixes it steers to the stack.
#[derive(Clone, Debug)]
pub struct XdpProgram(Arc<Attached>);

fn lpm_key(p: &IpNet) -> Vec<u8> {
    let mut k = u32::from(p.prefix_len()).to_ne_bytes().to_vec();
    match p.trunc() {
        IpNet::V4(v) => k.extend_from_slice(&v.network().octets()),
        IpNet::V6(v) => k.extend_from_slice(&v.network().octets()),
    }
    k
}

impl XdpProgram {
    /// Steers a prefix to the stack. Errors when the map is full (`max_prefixes`).
    pub fn add_prefix(&self, p: &IpNet) -> io::Result<()> {
        let map = if p.addr().is_ipv4() {
            &self.0.v4
        } else {
            &self.0.v6
        };
        map.update(&lpm_key(p), &1u32.to_ne_bytes())
            .map_err(|e| io::Error::new(e.kind(), format!("XDP prefix map, adding {p}: {e}")))
    }

    /// Stops steering a prefix; `Ok(false)` if it was not steered.
    pub fn remove_prefix(&self, p: &IpNet) -> io::Result<bool> {
        let map = if p.addr().is_ipv4() {
            &self.0.v4
        } else {
            &self.0.v6
        };
        map.delete(&lpm_key(p))
    }

    /// True when the program runs in the driver (native XDP).
    pub fn native(&self) -> bool {
        self.0.native
    }

    /// The interface's index.
    pub fn ifindex(&self) -> u32 {
        self.0.ifindex
    }

    /// One line: interface, XDP mode and why.
    pub fn describe(&self) -> String {
        match &self.0.why_generic {
            None if self.0.native => format!("{}: native XDP", self.0.interface),
            None => format!("{}: generic XDP (asked for)", self.0.interface),
            Some(why) => format!("{}: generic XDP (native failed: {why})", self.0.interface),
        }
    }
}

/// Counters of one AF_XDP queue (ours; the kernel's are in [`XdpDevice::kernel_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Received descriptors pointing outside the UMEM (skipped).
    pub rx_invalid: u64,
    /// Received frames larger than the stack's buffers (dropped).
    pub rx_drop_too_big: u64,
    /// Frames to send larger than a UMEM frame (dropped).
    pub tx_drop_oversize: u64,
}

/// One queue of an interface, as a [`Device`] for one shard.
#[derive(Debug)]
pub struct XdpDevice {
    xsk: Xsk,
    copy_reason: Option<String>,
    info: DeviceInfo,
    queue: u32,
    stats: XdpStats,
    program: XdpProgram,
}

impl XdpDevice {
    /// Our counters.
    pub fn stats(&self) -> XdpStats {
        self.stats
    }

    /// The kernel's counters for this socket (ring full, fill ring empty, invalid descriptors).
    pub fn kernel_stats(&self) -> io::Result<XskKernelStats> {
        self.xsk.kernel_stats()
    }

    /// The queue id.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// True when the socket runs zero-copy.
    pub fn zero_copy(&self) -> bool {
        self.xsk.zero_copy
    }

    /// `"zero-copy"`, or `"copy mode"` and why (asked for, or what the zero-copy bind said).
    pub fn copy_mode(&self) -> String {
        match (&self.copy_reason, self.xsk.zero_copy) {
            (_, true) => "zero-copy".into(),
            (None, false) => "copy mode (asked for)".into(),
            (Some(why), false) => format!("copy mode (the driver refused zero-copy: {why})"),
        }
    }

    /// The program this queue's frames come through.
    pub fn program(&self) -> &XdpProgram {
        &self.program
    }
}

impl Device for XdpDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        let room = (batch.capacity() - batch.len()) as u32;
        let (mut got, mut too_big) = (0usize, 0u64);
        let (_, bad) = self.xsk.recv(room, |data| {
            if let Some(f) = batch.next_free() {
                if f.copy_from(data, FrameMeta::default()) {
                    batch.commit();
                    got += 1;
                } else {
                    too_big += 1;
                }
            }
        });
        self.stats.rx_frames += got as u64;
        self.stats.rx_drop_too_big += too_big;
        self.stats.rx_invalid += u64::from(bad);
        Ok(got)
    }

    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        let (taken, oversize) = self.xsk.send(frames.iter().map(Frame::data));
        self.stats.tx_frames += (taken - oversize) as u64;
        self.stats.tx_drop_oversize += oversize as u64;
        Ok(taken)
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.xsk.fd().as_fd())
    }
}

/// An interface opened for AF_XDP: the program handle and one device per queue.
#[derive(Debug)]
pub struct Xdp {
    /// The attached program (prefix updates).
    pub program: XdpProgram,
    /// One device per queue, in queue order.
    pub queues: Vec<XdpDevice>,
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {name}: {}", io::Error::last_os_error()),
        )),
        i => Ok(i),
    }
}

fn explain_attach(e: io::Error, mode: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!("{mode} XDP: {e} (needs CAP_NET_ADMIN and CAP_BPF)"),
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            format!("{mode} XDP: {e} (another XDP program is attached to the interface)")
        }
        Some(libc::EOPNOTSUPP) => format!("{mode} XDP: {e} (the driver has no native XDP)"),
        Some(libc::ERANGE) | Some(libc::EINVAL) => format!(
            "{mode} XDP: {e} (MTU too large for native XDP without multi-buffer support, or a \
             kernel before 5.9 without XDP links)"
        ),
        _ => format!("{mode} XDP: {e}"),
    }
}

impl Xdp {
    /// Loads and attaches the program, fills the prefix maps, and opens a socket per queue.
    /// Needs `CAP_NET_ADMIN`, `CAP_BPF` (or `CAP_SYS_ADMIN`) and `CAP_NET_RAW`; errors say in one
    /// line which step failed and what is missing.
    pub fn open(cfg: &XdpConfig) -> io::Result<Xdp> {
        let idx = ifindex(&cfg.interface)?;
        let mtu = interface_mtu(&cfg.interface)?;
        if mtu + 14 > FRAME as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: MTU {mtu} is too large for AF_XDP frames of {FRAME} bytes (at most {})",
                    cfg.interface,
                    FRAME - 14
                ),
            ));
        }
        let mac = interface_mac(&cfg.interface)?;
        let v4 = bpf::Map::lpm(4, cfg.max_prefixes, "sst_prefix4")?;
        let v6 = bpf::Map::lpm(16, cfg.max_prefixes, "sst_prefix6")?;
        let xsks = bpf::Map::xsk(cfg.queues.max(1), "sst_xsks")?;
        let prog = bpf::load_program(&v4, &v6, &xsks)?;
        let (link, native, why_generic) = match cfg.mode {
            XdpMode::Native => (
                bpf::attach_xdp(&prog, idx, bpf::XDP_FLAGS_DRV_MODE)
                    .map_err(|e| io::Error::new(e.kind(), explain_attach(e, "native")))?,
                true,
                None,
            ),
            XdpMode::Generic => (
                bpf::attach_xdp(&prog, idx, bpf::XDP_FLAGS_SKB_MODE)
                    .map_err(|e| io::Error::new(e.kind(), explain_attach(e, "generic")))?,
                false,
                None,
            ),
            XdpMode::Auto => match bpf::attach_xdp(&prog, idx, bpf::XDP_FLAGS_DRV_MODE) {
                Ok(l) => (l, true, None),
                Err(native) => {
                    let why = explain_attach(native, "native");
                    let l = bpf::attach_xdp(&prog, idx, bpf::XDP_FLAGS_SKB_MODE).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}; {why}", explain_attach(e, "generic")))
                    })?;
                    (l, false, Some(why))
                }
            },
        };
        let program = XdpProgram(Arc::new(Attached {
            v4,
            v6,
            xsks,
            _prog: prog,
            _link: link,
            native,
            why_generic,
            ifindex: idx,
            interface: cfg.interface.clone(),
        }));
        for p in &cfg.prefixes {
            program.add_prefix(p)?;
        }
        // Rings are powers of two (rounded up, at most 2^16), and there are frames for both.
        let ring = cfg.ring.clamp(1, 1 << 16).next_power_of_two();
        let sizes = XskSizes {
            frames: cfg.frames.clamp(2 * ring, 1 << 20),
            ring,
        };
        let mut queues = Vec::new();
        for q in 0..cfg.queues.max(1) {
            let copy = XDP_COPY | XDP_USE_NEED_WAKEUP;
            let zc = XDP_ZEROCOPY | XDP_USE_NEED_WAKEUP;
            let mut copy_reason = None;
            let xsk = match cfg.zero_copy {
                ZeroCopy::Off => Xsk::open(idx, q, sizes, copy),
                ZeroCopy::Required => Xsk::open(idx, q, sizes, zc).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "zero-copy AF_XDP on {} queue {q}: {e} (the driver cannot)",
                            cfg.interface
                        ),
                    )
                }),
                ZeroCopy::Auto => Xsk::open(idx, q, sizes, zc).or_else(|e| {
                    copy_reason = Some(e.to_string());
                    Xsk::open(idx, q, sizes, copy)
                }),
            }
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("AF_XDP socket on {} queue {q}: {e}", cfg.interface),
                )
            })?;
            program
                .0
                .xsks
                .update(
                    &q.to_ne_bytes(),
                    &(xsk.fd().as_raw_fd() as u32).to_ne_bytes(),
                )
                .map_err(|e| io::Error::new(e.kind(), format!("XSK map, queue {q}: {e}")))?;
            queues.push(XdpDevice {
                xsk,
                copy_reason,
                info: DeviceInfo {
                    name: if cfg.queues > 1 {
                        format!("{}/xdp{q}", cfg.interface)
                    } else {
                        format!("{}/xdp", cfg.interface)
                    },
                    mac,
                    mtu,
                    offloads: Offloads::default(),
                },
                queue: q,
                stats: XdpStats::default(),
                program: program.clone(),
            });
        }
        Ok(Xdp { program, queues })
    }
}

/// Why AF_XDP cannot run here, or `None` when it can (an AF_XDP socket and an LPM map can be
/// created).
pub fn unavailable() -> Option<String> {
    // SAFETY: plain socket(2), closed at once.
    let s = unsafe { libc::socket(44, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Some(format!(
            "socket(AF_XDP): {} (kernel without CONFIG_XDP_SOCKETS?)",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: our fd.
    unsafe { libc::close(s) };
    if let Err(e) = bpf::Map::lpm(4, 1, "sst_probe") {
        return Some(format!("bpf(2): {e}"));
    }
    None
}
