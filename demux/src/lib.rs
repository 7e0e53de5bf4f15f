//! The subnet demux of subnetstack: which listener does a new flow reach?
//!
//! A [`Binding`] is `(protocol, prefix, ports)` delivering to a [`ListenerId`]. A lookup takes the
//! binding with the **longest matching prefix**; on equal prefix length the **narrowest port
//! selector** wins (exact port, then the narrowest range, then any port); inside the winning
//! binding's reuseport set a keyed rendezvous hash of the 4-tuple picks the member.
//!
//! ```
//! use subnetstack_demux::*;
//!
//! let mut table = Demux::new(BindPolicy::Nested);
//! let web = Binding::new(Protocol::Tcp, "198.18.0.0/16".parse().unwrap(), PortSpec::exact(80).unwrap(), ListenerId(1));
//! let vip = Binding::new(Protocol::Tcp, "198.18.5.0/24".parse().unwrap(), PortSpec::exact(80).unwrap(), ListenerId(2));
//! table.bind(web).unwrap();
//! table.bind(vip).unwrap();
//!
//! let flow = Flow::new("198.19.255.1".parse().unwrap(), 40000, "198.18.5.9".parse().unwrap(), 80).unwrap();
//! let hit = table.snapshot().lookup(Protocol::Tcp, &flow).unwrap();
//! assert_eq!(hit.listener, ListenerId(2)); // the /24 is longer than the /16
//! ```
//!
//! The data path reads compact longest-prefix-match structures (IPv4: a direct table and sorted
//! range blocks, after DXR; IPv6: a poptrie-style trie, path-compressed over the bits a clustered
//! table shares, and below those shared bits the same direct table and range blocks as IPv4)
//! through wait-free [`DemuxReader`]s; the
//! single writer ([`Demux`]) validates, checks conflicts and publishes edits (see [`Demux`]).
#![warn(missing_docs)]

mod dxr;
mod fib;
mod hash;
pub mod model;
mod table;
#[cfg(test)]
mod test_util;
mod trie;
mod types;
mod window;

pub use fib::{Group, Member};
pub use hash::HashKey;
pub use table::{Candidate, Demux, DemuxReader, Explanation, Hit, Snapshot, MAX_GROUPS};
pub use types::{
    prefix, BindError, BindPolicy, Binding, BindingId, ConflictKind, FamilyMismatch, Flow,
    ListenerId, PortSpec, Protocol,
};
