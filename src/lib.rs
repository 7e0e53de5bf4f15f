//! subnetstack facade (scaffold).
pub use subnetstack_demux as demux;
