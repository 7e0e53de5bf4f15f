//! Keyed flow hashing and rendezvous (highest random weight) member selection.

use std::hash::{BuildHasher, Hasher};

use siphasher::sip::SipHasher13;

use crate::types::{Flow, ListenerId};

/// 128-bit secret that keys flow hashing, so that remote peers cannot steer flows to one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashKey(pub [u8; 16]);

impl HashKey {
    /// A key from the operating system's randomness (through std's `RandomState`).
    pub fn random() -> Self {
        let s = std::collections::hash_map::RandomState::new();
        let a = s.hash_one(0x5ca1ab1e_u64);
        let b = s.hash_one(0xdecade_u64);
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&a.to_le_bytes());
        k[8..].copy_from_slice(&b.to_le_bytes());
        HashKey(k)
    }

    fn hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_key(&self.0)
    }

    /// Keyed SipHash-1-3 of the 4-tuple. The stack computes it once per packet and uses it both for
    /// its connection table and for reuseport selection.
    pub fn flow_hash(&self, flow: &Flow) -> u64 {
        let mut h = self.hasher();
        match *flow {
            Flow::V4 { src, dst, .. } => {
                h.write(&src.octets());
                h.write(&dst.octets());
            }
            Flow::V6 { src, dst, .. } => {
                h.write(&src.octets());
                h.write(&dst.octets());
            }
        }
        h.write_u32(u32::from(flow.sport()) << 16 | u32::from(flow.dport()));
        h.finish()
    }
}

/// A 64-bit finaliser with full avalanche (MurmurHash3's fmix64 constants).
#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Index of the member with the highest weight for `flow_hash`: rendezvous hashing. Removing a
/// member moves only the flows it had; adding one takes about 1/n of the flows from the others.
/// Ties (astronomically rare) go to the lower listener salt, so the choice never depends on member order.
#[inline]
///
/// The flow hash is keyed, so a member's weight needs no secret of its own: it is a full-avalanche
/// mix of the flow hash and the listener id.
pub(crate) fn rendezvous(flow_hash: u64, listeners: impl Iterator<Item = ListenerId>) -> usize {
    let mut best = 0;
    let mut best_w = (0u64, 0u64);
    for (i, l) in listeners.enumerate() {
        let s = mix(l.0 ^ 0x9e37_79b9_7f4a_7c15);
        let w = (mix(flow_hash ^ s), u64::MAX - s);
        if i == 0 || w > best_w {
            best = i;
            best_w = w;
        }
    }
    best
}
