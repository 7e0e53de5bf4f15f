//! What the unit tests of the lookup structures share: a naive longest-prefix match to compare
//! against, prefix masking, and a small deterministic random source.

use crate::trie::{Key, NONE};

/// The leaf of the longest prefix of `prefixes` covering `key` (`NONE` if none): the reference
/// the structures are checked against.
pub(crate) fn naive<K: Key>(prefixes: &[(K, u8, u32)], key: K) -> u32 {
    prefixes
        .iter()
        .filter(|&&(k, len, _)| key.same_top(k, len))
        .max_by_key(|&&(_, len, _)| len)
        .map_or(NONE, |&(_, _, l)| l)
}

/// `k` with the bits past its first `len` cleared.
pub(crate) fn mask<K: Key>(k: K, len: u8) -> K {
    k.masked_top(u32::from(K::BITS - len))
}

/// One xorshift64 step.
pub(crate) fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A seeded xorshift64 source.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        xorshift(&mut self.0)
    }

    pub(crate) fn wide(&mut self) -> u128 {
        u128::from(self.next()) << 64 | u128::from(self.next())
    }
}
