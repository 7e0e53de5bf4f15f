//! Private network namespaces for live tests, benchmarks and the demo.
//!
//! [`tap_env`] moves the **calling thread** into a new network namespace (`unshare(CLONE_NEWNET)`),
//! brings `lo` up, creates a TAP there and configures the kernel's side of it: addresses
//! [`KERNEL_V4`]/24 and [`KERNEL_V6`]/64 and routes for the stack's local prefixes. Threads spawned
//! afterwards from that thread, and child processes (`ping`, `curl`, `wrk`), live in the same
//! namespace; nothing leaks to the host, and tests in other threads get namespaces of their own.
//! The namespace disappears when its last thread and file descriptor are gone.
//!
//! Configuration uses iproute2's `ip` (and `nft`, `sysctl`) as child processes: the commands are
//! the documentation, and a failing step says exactly which command failed.
//!
//! Only `198.18.0.0/15` and `2001:db8::/32` may be routed (refused otherwise).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::tap::{Tap, TapConfig};
use crate::Mac;

/// The kernel's IPv4 address on the TAP.
pub const KERNEL_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The stack's IPv4 address in the kernel's subnet (the gateway for routed prefixes).
pub const STACK_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// The kernel's IPv6 address on the TAP.
pub const KERNEL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
/// The stack's IPv6 address in the kernel's subnet.
pub const STACK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2);

/// Environment variable that turns a skip into a failure (CI sets it: live tests must run there).
pub const REQUIRE_LIVE: &str = "SUBNETSTACK_REQUIRE_LIVE";

/// Why live tests cannot run on this machine, or `None` when they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not root (needs CAP_NET_ADMIN and CAP_SYS_ADMIN for network namespaces)".into(),
        );
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Some("iproute2's `ip` is not installed".into());
    }
    None
}

/// For live tests: `true` when they can run. Otherwise prints `skipped: <reason>` and returns
/// `false`, or panics when [`REQUIRE_LIVE`] is set.
pub fn live(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            if std::env::var_os(REQUIRE_LIVE).is_some_and(|v| v != "0") {
                panic!("{test}: live test cannot run ({why}) but {REQUIRE_LIVE} is set");
            }
            println!("skipped: {test}: {why}");
            false
        }
    }
}

/// Runs a command, turning a non-zero exit into an error that names the command and its stderr.
pub fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

/// Moves the calling thread into a new, empty network namespace and brings `lo` up.
pub fn enter_private_netns() -> io::Result<()> {
    // SAFETY: unshare(2) with CLONE_NEWNET affects only the calling thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unshare(CLONE_NEWNET): {e}"),
        ));
    }
    ip(&["link", "set", "lo", "up"])
}

/// True if `net` lies inside the ranges live traffic may use (`198.18.0.0/15`, `2001:db8::/32`).
pub fn allowed(net: &IpNet) -> bool {
    let v4: IpNet = "198.18.0.0/15".parse().expect("literal");
    let v6: IpNet = "2001:db8::/32".parse().expect("literal");
    v4.contains(net) || v6.contains(net)
}

/// How to build a TAP environment.
#[derive(Clone, Debug)]
pub struct TapEnvConfig {
    /// The TAP and how to open it.
    pub tap: TapConfig,
    /// The stack's local prefixes, routed by the kernel to the TAP.
    pub routes: Vec<IpNet>,
    /// Route via the stack's address in the kernel subnet ([`STACK_V4`], [`STACK_V6`]) instead of
    /// on-link (on-link makes the kernel ARP for every destination address).
    pub via_gateway: bool,
    /// For [`Backend::Xdp`]: the prefixes the XDP program steers to the stack (its local
    /// prefixes). Empty means the routes (plus [`STACK_V4`]/[`STACK_V6`] with `via_gateway`).
    pub local: Vec<IpNet>,
}

impl TapEnvConfig {
    /// A TAP called `name`, one queue, no offloads, on-link routes to `routes`.
    pub fn new(name: &str, routes: &[&str]) -> Self {
        TapEnvConfig {
            tap: TapConfig::new(name),
            routes: routes
                .iter()
                .map(|r| r.parse().expect("route literal"))
                .collect(),
            via_gateway: false,
            local: Vec::new(),
        }
    }
}

/// A configured TAP in a private namespace: the calling thread is inside it.
#[derive(Debug)]
pub struct TapEnv {
    /// Interface name.
    pub name: String,
    /// One device per queue.
    pub queues: Vec<Tap>,
    /// The kernel side's MAC address.
    pub kernel_mac: Mac,
}

/// The MAC address of an interface in the calling thread's namespace (`SIOCGIFHWADDR`).
pub use crate::tap::interface_mac;

/// Enters a private namespace and sets up a TAP there (see the module docs).
pub fn tap_env(cfg: &TapEnvConfig) -> io::Result<TapEnv> {
    if let Some(bad) = cfg.routes.iter().find(|r| !allowed(r)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{bad} is outside 198.18.0.0/15 and 2001:db8::/32"),
        ));
    }
    enter_private_netns()?;
    let queues = Tap::open(&cfg.tap)?;
    let name = queues[0].info().name.clone();
    add_kernel_side(&name)?;
    add_routes(&name, cfg)?;
    let kernel_mac = interface_mac(&name)?;
    Ok(TapEnv {
        name,
        queues,
        kernel_mac,
    })
}

/// Routes `cfg.routes` out of `dev`, on-link or via the stack's address.
fn add_routes(dev: &str, cfg: &TapEnvConfig) -> io::Result<()> {
    for r in &cfg.routes {
        let r = r.to_string();
        let via = match (cfg.via_gateway, r.contains(':')) {
            (false, _) => None,
            (true, false) => Some(IpAddr::V4(STACK_V4).to_string()),
            (true, true) => Some(IpAddr::V6(STACK_V6).to_string()),
        };
        match via {
            Some(g) => ip(&["route", "add", &r, "via", &g, "dev", dev])?,
            None => ip(&["route", "add", &r, "dev", dev])?,
        }
    }
    Ok(())
}

/// A permanent kernel neighbour entry: `addr` is at `mac` on `dev` (so the kernel sends without
/// ARP/NDP).
pub fn static_neighbor(dev: &str, addr: IpAddr, mac: Mac) -> io::Result<()> {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "neigh",
        "add",
        &addr.to_string(),
        "lladdr",
        &mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
}

/// Brings `dev` up with the kernel's addresses on it.
pub fn add_kernel_side(dev: &str) -> io::Result<()> {
    ip(&["link", "set", dev, "up"])?;
    ip(&["addr", "add", &format!("{KERNEL_V4}/24"), "dev", dev])?;
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{KERNEL_V6}/64"),
        "dev",
        dev,
        "nodad",
    ])
}

use crate::Device;

/// Where nftables drops packets on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets the kernel sends out of the device (towards the stack).
    Egress,
    /// Packets arriving from the device (from the stack).
    Ingress,
}

/// Kernel-side random loss without netem: an nftables netdev rule on `dev` that drops `percent`
/// of the TCP packets at `hook` (`numgen random mod 100 < percent`; 100 or more drops all). Removed
/// with the namespace, or by [`nft_loss_clear`].
///
/// Only [`Hook::Ingress`] makes a real loss. A drop at [`Hook::Egress`] is reported back to the
/// kernel socket that sent the segment, as a local transmit failure: it sends the segment again
/// as new and counts no loss (its `RetransSegs` stays 0), so the peer never sees one.
pub fn nft_loss(dev: &str, hook: Hook, percent: u32) -> io::Result<()> {
    let h = match hook {
        Hook::Egress => "egress",
        Hook::Ingress => "ingress",
    };
    let rule = match percent {
        0 => String::new(),
        1..=99 => format!("meta l4proto tcp numgen random mod 100 < {percent} drop"),
        _ => "meta l4proto tcp drop".to_owned(),
    };
    let script = format!(
        "table netdev subnetstack_loss {{\n  chain {h} {{\n    type filter hook {h} device \"{dev}\" priority 0;\n    {rule}\n  }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("nft: {e}")))?;
    io::Write::write_all(child.stdin.as_mut().expect("piped"), script.as_bytes())?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes the rules of [`nft_loss`].
pub fn nft_loss_clear() -> io::Result<()> {
    run("nft", &["delete", "table", "netdev", "subnetstack_loss"])
}

/// Which device carries a live environment's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A TAP device (the kernel side is the TAP interface).
    Tap,
    /// AF_XDP on one end of a veth pair (the kernel side is the other end).
    Xdp,
}

impl Backend {
    /// Both backends, for tests that run on each.
    pub const ALL: [Backend; 2] = [Backend::Tap, Backend::Xdp];

    /// `"tap"` or `"xdp"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tap => "tap",
            Backend::Xdp => "xdp",
        }
    }
}

/// Like [`live`], and for [`Backend::Xdp`] also checks that AF_XDP and BPF work here.
pub fn live_on(test: &str, backend: Backend) -> bool {
    if !live(test) {
        return false;
    }
    if backend == Backend::Xdp {
        if let Some(why) = crate::xdp::unavailable() {
            if std::env::var_os(REQUIRE_LIVE).is_some_and(|v| v != "0") {
                panic!("{test}: AF_XDP test cannot run ({why}) but {REQUIRE_LIVE} is set");
            }
            println!("skipped: {test} on xdp: {why}");
            return false;
        }
    }
    true
}

/// A live environment on either backend: the calling thread is inside its private namespace.
pub struct LinkEnv {
    /// The kernel side's interface name (routes and neighbours live there).
    pub name: String,
    /// One device per queue, for one shard each.
    pub queues: Vec<Box<dyn Device>>,
    /// The kernel side's MAC address.
    pub kernel_mac: Mac,
    /// The XDP program, for [`Backend::Xdp`].
    pub xdp: Option<crate::xdp::XdpProgram>,
}

impl std::fmt::Debug for LinkEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEnv")
            .field("name", &self.name)
            .field("queues", &self.queues.len())
            .field("xdp", &self.xdp)
            .finish()
    }
}

/// Enters a private namespace and builds `backend`'s link there: [`tap_env`] or [`xdp_env`].
pub fn link_env(backend: Backend, cfg: &TapEnvConfig) -> io::Result<LinkEnv> {
    match backend {
        Backend::Tap => {
            let e = tap_env(cfg)?;
            Ok(LinkEnv {
                name: e.name,
                queues: e
                    .queues
                    .into_iter()
                    .map(|t| Box::new(t) as Box<dyn Device>)
                    .collect(),
                kernel_mac: e.kernel_mac,
                xdp: None,
            })
        }
        Backend::Xdp => {
            let e = xdp_env(cfg)?;
            Ok(LinkEnv {
                name: e.name,
                queues: e
                    .xdp
                    .queues
                    .into_iter()
                    .map(|q| Box::new(q) as Box<dyn Device>)
                    .collect(),
                kernel_mac: e.kernel_mac,
                xdp: Some(e.xdp.program),
            })
        }
    }
}

/// A veth pair in a private namespace with AF_XDP on the stack's end.
#[derive(Debug)]
pub struct XdpEnv {
    /// The kernel's end (addresses [`KERNEL_V4`]/[`KERNEL_V6`], routes to the prefixes).
    pub name: String,
    /// The stack's end (the XDP program and sockets; its MAC is the stack's).
    pub stack_side: String,
    /// The program and one device per queue.
    pub xdp: crate::xdp::Xdp,
    /// The kernel end's MAC.
    pub kernel_mac: Mac,
}

/// The name of the stack's end of a veth pair whose kernel end is `name`.
pub fn veth_stack_side(name: &str) -> String {
    format!("{}x", &name[..name.len().min(14)])
}

/// Enters a private namespace and builds a veth pair there: the kernel's end is named
/// `cfg.tap.name`, configured as [`tap_env`] configures a TAP; the stack's end (named by
/// [`veth_stack_side`]) carries the XDP program and `cfg.tap.queues` AF_XDP sockets. The
/// kernel's end sends no checksum-offloaded or GSO packets, which AF_XDP would hand over
/// unfinished.
pub fn xdp_env(cfg: &TapEnvConfig) -> io::Result<XdpEnv> {
    if let Some(bad) = cfg.routes.iter().find(|r| !allowed(r)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{bad} is outside 198.18.0.0/15 and 2001:db8::/32"),
        ));
    }
    enter_private_netns()?;
    let name = cfg.tap.name.clone();
    let stack_side = veth_stack_side(&name);
    let q = cfg.tap.queues.max(1).to_string();
    ip(&[
        "link",
        "add",
        &stack_side,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        &name,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ])?;
    ethtool_off(&name)?;
    ip(&["link", "set", &stack_side, "up"])?;
    add_kernel_side(&name)?;
    add_routes(&name, cfg)?;
    let mut local = cfg.local.clone();
    if local.is_empty() {
        local = cfg.routes.clone();
        if cfg.via_gateway {
            local.push(IpNet::from(IpAddr::V4(STACK_V4)));
            local.push(IpNet::from(IpAddr::V6(STACK_V6)));
        }
    }
    let mut x = crate::xdp::XdpConfig::new(&stack_side, local);
    x.queues = cfg.tap.queues.max(1) as u32;
    let xdp = crate::xdp::Xdp::open(&x)?;
    let kernel_mac = interface_mac(&name)?;
    Ok(XdpEnv {
        name,
        stack_side,
        xdp,
        kernel_mac,
    })
}

/// Turns off transmit checksum offload (and with it TSO) and GSO on `dev`, with the legacy
/// ethtool ioctls (no `ethtool` binary needed).
pub fn ethtool_off(dev: &str) -> io::Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_SGSO: u32 = 0x24;
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    for cmd in [ETHTOOL_STXCSUM, ETHTOOL_SGSO] {
        let mut v = Value { cmd, data: 0 };
        let mut r = crate::tap::ifreq(dev)?;
        r.ifr_ifru.ifru_data = (&mut v as *mut Value).cast();
        // SAFETY: SIOCETHTOOL reads our ifreq and the ethtool_value it points to, alive here.
        unsafe { crate::tap::if_ioctl(libc::SIOCETHTOOL, &mut r) }.map_err(|e| {
            io::Error::new(e.kind(), format!("ethtool ioctl {cmd:#x} on {dev}: {e}"))
        })?;
    }
    Ok(())
}
