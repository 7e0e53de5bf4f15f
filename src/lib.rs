//! subnetstack: a userspace TCP/IP stack whose listeners bind to subnets.
//!
//! This facade re-exports the member crates. Today that is the subnet demux ([`demux`]); the
//! devices, the protocol core and the runtime join it issue by issue (see the README).
#![warn(missing_docs)]

/// The subnet demux: bindings, longest-prefix lookup, reuseport selection, explain.
pub use subnetstack_demux as demux;

/// The README's code blocks, compiled and run as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
