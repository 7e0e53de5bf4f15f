//! subnetstack: a userspace TCP/IP stack whose listeners bind to subnets.
//!
//! Start a [`Runtime`] on a TAP (or any [`ifaces::Device`]) with the local prefixes it owns,
//! then use [`TcpListener`], [`TcpStream`] and [`UdpSocket`] as with `std::net`, only bound to
//! `(prefix, ports)`. Underneath: the subnet demux ([`demux`]), the frame devices ([`ifaces`])
//! and the sans-IO protocol core ([`stack`]), usable on their own.
#![warn(missing_docs)]

mod net;
mod runtime;
#[cfg(feature = "tokio")]
mod tokio_net;

pub use net::{ListenOptions, TcpListener, TcpStream, UdpSocket};
pub use runtime::{Builder, InLoop, ListenerSnapshot, PollMode, Runtime, Snapshot, UdpSnapshot};

/// The subnet demux: bindings, longest-prefix lookup, reuseport selection, explain.
pub use subnetstack_demux as demux;

/// Frame devices: TAP, memory pair, impairment, pcap capture, private-namespace harness.
pub use subnetstack_ifaces as ifaces;

/// The sans-IO protocol core: Ethernet, ARP, NDP, IPv4/IPv6, ICMP, UDP, TCP.
pub use subnetstack_stack as stack;

/// The README's code blocks, compiled and run as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
