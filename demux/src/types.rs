//! Public vocabulary of the demux: protocols, port selectors, bindings, flows and errors.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Transport protocol of a binding. TCP and UDP bindings never conflict with each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP: a binding receives new connections (SYNs).
    Tcp,
    /// UDP: a binding receives datagrams.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Which destination ports a binding takes.
///
/// Build one with [`PortSpec::exact`], [`PortSpec::range`] or use [`PortSpec::Any`]; the constructors
/// validate (port 0 and inverted ranges are errors) and normalise a one-port range to `Exact`.
/// On equal prefix length a narrower selector wins: `Exact` < `Range` (narrower first) < `Any`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// One port (1..=65535).
    Exact(u16),
    /// An inclusive range `lo..=hi` with `1 <= lo < hi`.
    Range {
        /// First port of the range.
        lo: u16,
        /// Last port of the range (inclusive).
        hi: u16,
    },
    /// Every port 1..=65535.
    Any,
}

impl PortSpec {
    /// One port; port 0 is not a destination port and is refused.
    pub fn exact(port: u16) -> Result<Self, BindError> {
        if port == 0 {
            return Err(BindError::PortZero);
        }
        Ok(PortSpec::Exact(port))
    }

    /// The inclusive range `lo..=hi`. `lo == hi` gives `Exact(lo)`; `lo > hi` and ranges that include
    /// port 0 are refused.
    pub fn range(lo: u16, hi: u16) -> Result<Self, BindError> {
        if lo > hi {
            return Err(BindError::InvertedRange { lo, hi });
        }
        if lo == 0 {
            return Err(BindError::PortZero);
        }
        if lo == hi {
            return Ok(PortSpec::Exact(lo));
        }
        Ok(PortSpec::Range { lo, hi })
    }

    /// Checks a value built by hand (the enum's fields are public) the way the constructors would,
    /// returning the normalised form.
    pub fn validate(self) -> Result<Self, BindError> {
        match self {
            PortSpec::Exact(p) => Self::exact(p),
            PortSpec::Range { lo, hi } => Self::range(lo, hi),
            PortSpec::Any => Ok(PortSpec::Any),
        }
    }

    /// Does this selector take `port`? Port 0 is never taken.
    #[inline]
    pub fn contains(self, port: u16) -> bool {
        port != 0
            && match self {
                PortSpec::Exact(p) => p == port,
                PortSpec::Range { lo, hi } => lo <= port && port <= hi,
                PortSpec::Any => true,
            }
    }

    /// Inclusive bounds of the selector.
    #[inline]
    pub fn bounds(self) -> (u16, u16) {
        match self {
            PortSpec::Exact(p) => (p, p),
            PortSpec::Range { lo, hi } => (lo, hi),
            PortSpec::Any => (1, u16::MAX),
        }
    }

    /// Do the two selectors share a port?
    pub fn overlaps(self, other: PortSpec) -> bool {
        let (a, b) = self.bounds();
        let (c, d) = other.bounds();
        a <= d && c <= b
    }

    /// Number of ports the selector covers, with `Any` counted as 65536 so that it is wider than the
    /// widest range (1-65535). This is the port precedence key: smaller wins.
    #[inline]
    pub fn width(self) -> u32 {
        match self {
            PortSpec::Exact(_) => 1,
            PortSpec::Range { lo, hi } => u32::from(hi) - u32::from(lo) + 1,
            PortSpec::Any => 65536,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Exact(p) => write!(f, "{p}"),
            PortSpec::Range { lo, hi } => write!(f, "{lo}-{hi}"),
            PortSpec::Any => f.write_str("*"),
        }
    }
}

/// Opaque identity of the listener (socket) a binding delivers to, chosen by the caller.
///
/// It is also the identity used by reuseport hashing: a flow maps to the same listener for as long as
/// the set of listener ids in its group is unchanged, even across a whole-table replacement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listener#{}", self.0)
    }
}

/// Handle of one binding inside a table, returned by `bind`. Never reused by a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingId(pub u64);

impl fmt::Display for BindingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "binding#{}", self.0)
    }
}

/// A request to bind: `(protocol, prefix, ports)` delivering to `listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The local network, IPv4 or IPv6, any length; host bits must be zero.
    pub prefix: IpNet,
    /// Destination ports taken.
    pub ports: PortSpec,
    /// Opt into sharing this exact `(protocol, prefix, ports)` with other reuseport bindings.
    pub reuseport: bool,
    /// Where matching flows go.
    pub listener: ListenerId,
}

impl Binding {
    /// A binding without reuseport.
    pub fn new(protocol: Protocol, prefix: IpNet, ports: PortSpec, listener: ListenerId) -> Self {
        Binding {
            protocol,
            prefix,
            ports,
            reuseport: false,
            listener,
        }
    }

    /// The same binding with reuseport set.
    pub fn reuseport(mut self) -> Self {
        self.reuseport = true;
        self
    }

    /// Validates host bits and the port selector; returns the normalised binding.
    pub fn validate(mut self) -> Result<Self, BindError> {
        if self.prefix.trunc() != self.prefix {
            return Err(BindError::HostBitsSet(self.prefix));
        }
        self.ports = self.ports.validate()?;
        Ok(self)
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.protocol, self.prefix, self.ports)?;
        if self.reuseport {
            f.write_str(" (reuseport)")?;
        }
        write!(f, " -> {}", self.listener)
    }
}

/// Builds a prefix from an address and a length, refusing lengths past the family's width and
/// addresses with host bits set.
pub fn prefix(addr: IpAddr, len: u8) -> Result<IpNet, BindError> {
    let net = match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, len).map(IpNet::V4),
        IpAddr::V6(a) => Ipv6Net::new(a, len).map(IpNet::V6),
    }
    .map_err(|_| BindError::PrefixLenOutOfRange {
        len,
        max: if addr.is_ipv4() { 32 } else { 128 },
    })?;
    if net.trunc() != net {
        return Err(BindError::HostBitsSet(net));
    }
    Ok(net)
}

/// A flow's 4-tuple, one address family by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flow {
    /// IPv4 flow.
    V4 {
        /// Remote (source) address.
        src: Ipv4Addr,
        /// Remote (source) port.
        sport: u16,
        /// Local (destination) address.
        dst: Ipv4Addr,
        /// Local (destination) port.
        dport: u16,
    },
    /// IPv6 flow.
    V6 {
        /// Remote (source) address.
        src: Ipv6Addr,
        /// Remote (source) port.
        sport: u16,
        /// Local (destination) address.
        dst: Ipv6Addr,
        /// Local (destination) port.
        dport: u16,
    },
}

impl Flow {
    /// Builds a flow from generic addresses; mixing families is an error.
    pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Result<Flow, FamilyMismatch> {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Ok(Flow::V4 {
                src,
                sport,
                dst,
                dport,
            }),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Ok(Flow::V6 {
                src,
                sport,
                dst,
                dport,
            }),
            _ => Err(FamilyMismatch { src, dst }),
        }
    }

    /// Local (destination) address.
    pub fn dst(&self) -> IpAddr {
        match *self {
            Flow::V4 { dst, .. } => IpAddr::V4(dst),
            Flow::V6 { dst, .. } => IpAddr::V6(dst),
        }
    }

    /// Remote (source) port.
    pub fn sport(&self) -> u16 {
        match *self {
            Flow::V4 { sport, .. } | Flow::V6 { sport, .. } => sport,
        }
    }

    /// Local (destination) port.
    pub fn dport(&self) -> u16 {
        match *self {
            Flow::V4 { dport, .. } | Flow::V6 { dport, .. } => dport,
        }
    }
}

/// A flow's source and destination are of different address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyMismatch {
    /// The source given.
    pub src: IpAddr,
    /// The destination given.
    pub dst: IpAddr,
}

impl fmt::Display for FamilyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "flow mixes address families: {} -> {}",
            self.src, self.dst
        )
    }
}

impl std::error::Error for FamilyMismatch {}

/// Why two bindings cannot coexist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// Same prefix and the same port selector, and not every binding opted into reuseport.
    NotReuseport,
    /// Same prefix, overlapping port selectors of equal width that are not identical: no precedence
    /// rule could tell them apart.
    AmbiguousPorts,
    /// `BindPolicy::Exclusive`: nested (or equal) prefixes with overlapping ports.
    ExclusiveOverlap,
    /// The listener is already a member of this reuseport group.
    DuplicateListener,
}

/// Error from a table operation. The table is unchanged whenever one is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindError {
    /// The prefix has bits set past its length, e.g. `198.18.0.1/24`.
    HostBitsSet(IpNet),
    /// A prefix length past 32 (IPv4) or 128 (IPv6).
    PrefixLenOutOfRange {
        /// The length given.
        len: u8,
        /// The family's maximum.
        max: u8,
    },
    /// Port 0 as an exact port or inside a range.
    PortZero,
    /// A range whose first port is above its last.
    InvertedRange {
        /// First port given.
        lo: u16,
        /// Last port given.
        hi: u16,
    },
    /// The binding conflicts with an existing one, which is named.
    Conflict {
        /// The existing binding that stands in the way.
        existing: BindingId,
        /// Its description.
        with: Binding,
        /// Which rule refused it.
        kind: ConflictKind,
    },
    /// No such binding (never bound, or already removed).
    UnknownBinding(BindingId),
    /// The table holds the maximum number of distinct (protocol, prefix, ports) groups.
    TableFull,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindError::HostBitsSet(p) => {
                write!(
                    f,
                    "prefix {p} has host bits set (did you mean {}?)",
                    p.trunc()
                )
            }
            BindError::PrefixLenOutOfRange { len, max } => {
                write!(f, "prefix length {len} is out of range (0..={max})")
            }
            BindError::PortZero => f.write_str("port 0 cannot be bound"),
            BindError::InvertedRange { lo, hi } => write!(f, "port range {lo}-{hi} is inverted"),
            BindError::Conflict {
                existing,
                with,
                kind,
            } => {
                let why = match kind {
                    ConflictKind::NotReuseport => "same prefix and ports, not all reuseport",
                    ConflictKind::AmbiguousPorts => {
                        "same prefix, overlapping port ranges of equal width"
                    }
                    ConflictKind::ExclusiveOverlap => {
                        "nested prefixes with overlapping ports (exclusive policy)"
                    }
                    ConflictKind::DuplicateListener => "listener already in this reuseport group",
                };
                write!(f, "conflicts with {existing} ({with}): {why}")
            }
            BindError::UnknownBinding(id) => write!(f, "no such binding: {id}"),
            BindError::TableFull => f.write_str("binding table is full"),
        }
    }
}

impl std::error::Error for BindError {}

/// How strictly bindings may overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BindPolicy {
    /// Nested prefixes coexist (longest prefix wins); on one prefix, selectors of different width
    /// coexist (narrowest wins); identical selectors need reuseport on every member.
    #[default]
    Nested,
    /// The SO_BINDTOSUBNET RFC rule: two bindings conflict when their networks, masked with the
    /// shorter prefix, are equal and their ports overlap; the same prefix and ports with reuseport on
    /// every member is still allowed.
    Exclusive,
}
