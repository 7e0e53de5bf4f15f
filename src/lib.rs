//! subnetstack: a userspace TCP/IP stack whose listeners bind to subnets.
//!
//! This facade re-exports the member crates: the subnet demux ([`demux`]), the frame devices
//! ([`ifaces`]) and the protocol core ([`stack`]); TCP and the runtime join them issue by issue
//! (see the README).
#![warn(missing_docs)]

/// The subnet demux: bindings, longest-prefix lookup, reuseport selection, explain.
pub use subnetstack_demux as demux;

/// Frame devices: TAP, memory pair, impairment, pcap capture, private-namespace harness.
pub use subnetstack_ifaces as ifaces;

/// The sans-IO protocol core: Ethernet, ARP, NDP, IPv4/IPv6, ICMP, UDP.
pub use subnetstack_stack as stack;

/// The README's code blocks, compiled and run as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
