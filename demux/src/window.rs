//! The inside of a large anchored IPv6 table: a direct table and range blocks ([`Dxr`]) over a
//! window of the address bits below the anchor, with the few prefixes longer than the window
//! (host routes, mostly) in hash maps.
//!
//! A clustered table's prefixes share their top `skip` bits (the anchor, see
//! [`crate::trie::Anchored`]). The bits below vary over a few dozen positions only (`/40`..`/64`
//! under a `/25`, say): a poptrie walks them in four to six dependent steps, and at a million
//! prefixes it outgrows the caches, so every step is a miss. Here a lookup reads:
//! - one direct entry (20 bits of the window at a million prefixes: 8 MiB, of which only the
//!   slots the table uses are ever touched) and at most one range block (two or three
//!   contiguous cache lines), as for IPv4;
//! - a bit of a small bitmap (`long_bits`, cache-resident) indexed by a hash of the window bits,
//!   set for the window bits of every prefix longer than the window (a one-hash Bloom filter:
//!   such a prefix fixes all of them); only when the bit is set, the hash maps, longest length
//!   first.
//!
//! Prefixes are split by length `len`:
//! - `len <= skip` (they cover the whole anchor): `cover`, the longest of which answers when the
//!   window matches nothing;
//! - `skip < len <= skip + bits`: the [`Dxr`], as `bits`-bit keys (address bits `skip..skip+bits`)
//!   of length `len - skip`, their leaves' length byte lowered by `skip` (and raised back on the
//!   way out);
//! - `len > skip + bits`: `long`, one map per length, keyed by the masked address.
//!
//! The shape is chosen when the table is built (and rebuilt at the port index's resize
//! thresholds): the direct width is the narrowest whose used slots hold at most `PER_SLOT`
//! prefixes on average, with at most two direct slots per prefix; the window is 16 bits longer
//! than the direct width (`u16` range keys) when every prefix but host routes fits, else 31 bits
//! longer (`u32` keys). Inserts and removals keep the shape (a prefix longer than the window goes
//! to `long`), so they stay local: one slot's block rewritten, or one map entry and filter bit.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::dxr::Dxr;
use crate::trie::{depth, Key, NONE};

/// Hasher of the long-prefix maps: a multiply-xorshift of the key's words. The maps' keys are
/// bound prefixes (chosen by the control plane, not by traffic) and a lookup only probes, so a
/// fast non-keyed hash is enough.
#[derive(Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    #[inline(always)]
    fn finish(&self) -> u64 {
        let x = self.0 ^ self.0 >> 29;
        x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ x >> 32
    }
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    #[inline(always)]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0 ^ i)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
    #[inline(always)]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline(always)]
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64);
        self.write_u64((i >> 64) as u64);
    }
}

type LongMap<K> = HashMap<K, u32, BuildHasherDefault<MixHasher>>;

/// Average prefixes per used direct slot that the direct width aims at (blocks of about two
/// cache lines).
const PER_SLOT: usize = 8;

/// See the [module documentation](self).
#[derive(Clone, Debug)]
pub(crate) struct Window<K> {
    /// Anchor length: the window starts at this bit.
    skip: u8,
    /// Window width.
    bits: u8,
    dxr: Dxr,
    /// Leaves of the prefixes covering the anchor (`len <= skip`), any order.
    cover: Vec<u32>,
    /// The longest of `cover` (`NONE`: none).
    best_cover: u32,
    /// Prefixes longer than the window: one map (masked key -> leaf) per length, longest first.
    long: Vec<(u8, LongMap<K>)>,
    /// Bloom filter of the window bits of the long prefixes: bit `hash(w) >> long_shift` is set
    /// if a long prefix has window bits `w` (and maybe for other `w`). Empty while `long` is.
    long_bits: Vec<u64>,
    /// `64 - log2(bits in long_bits)`.
    long_shift: u32,
    /// Long prefixes per set bit of `long_bits`.
    long_count: HashMap<usize, u32>,
}

impl<K: Key> Window<K> {
    /// A structure for the inside of an anchor of `skip` bits holding `entries` (all under the
    /// anchor or covering it), or `None` when a window does not fit (keys too short).
    pub(crate) fn build(skip: u8, entries: &[(K, u8, u32)]) -> Option<Self> {
        let room = K::BITS.checked_sub(skip)?.min(64);
        if room < 24 + 16 {
            return None;
        }
        let mut win: Vec<u64> = entries
            .iter()
            .filter(|e| e.1 > skip)
            .map(|e| e.0.window(skip, room))
            .collect();
        win.sort_unstable();
        let n = win.len().max(1);
        // used[d]: direct slots of width d that hold a prefix's start (one sorted pass: a key
        // starts a new slot at every width longer than what it shares with the previous key).
        let mut used = [1usize; 65];
        for p in win.windows(2) {
            let shared = (p[0] ^ p[1]).leading_zeros() as usize - (64 - usize::from(room));
            for u in &mut used[shared + 1..] {
                *u += 1;
            }
        }
        // Direct width: the narrowest whose used slots average at most PER_SLOT prefixes, with a
        // table of at most two slots (16 bytes) per prefix.
        let mut dp = 8u8;
        while dp < 24 && (1usize << (dp + 1)) <= 2 * n && n > PER_SLOT * used[usize::from(dp)] {
            dp += 1;
        }
        // Window width: 16 bits below the table (u16 range keys) if every prefix but the host
        // routes fits, else 31.
        let fits = |b: u8| {
            entries
                .iter()
                .filter(|e| e.1 > skip && e.1 < K::BITS)
                .all(|e| e.1 - skip <= b)
        };
        let bits = if fits(dp + 16) { dp + 16 } else { dp + 31 };
        let mut w = Window {
            skip,
            bits,
            dxr: Dxr::new_window(dp, bits),
            cover: Vec::new(),
            best_cover: NONE,
            long: Vec::new(),
            long_bits: Vec::new(),
            long_shift: 64 - u32::from(dp.max(12)),
            long_count: HashMap::new(),
        };
        let mut mid = Vec::new();
        for &(k, len, l) in entries {
            if len > skip && len - skip <= bits {
                mid.push((w.key(k), len - skip, l - u32::from(skip)));
            } else {
                w.insert(k, len, l);
            }
        }
        w.dxr = Dxr::build_window(dp, bits, &mut mid);
        Some(w)
    }

    /// The window bits of `k`.
    #[inline(always)]
    fn key(&self, k: K) -> u64 {
        k.window(self.skip, self.bits)
    }

    /// The filter bit of window bits `w`.
    #[inline(always)]
    fn long_bit(&self, w: u64) -> usize {
        (w.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.long_shift) as usize
    }

    fn set_long_flag(&mut self, bit: usize, on: bool) {
        if self.long_bits.is_empty() {
            self.long_bits = vec![0; (1usize << (64 - self.long_shift)).div_ceil(64)];
        }
        if on {
            self.long_bits[bit / 64] |= 1 << (bit % 64);
        } else {
            self.long_bits[bit / 64] &= !(1 << (bit % 64));
        }
    }

    /// The leaf of the longest prefix covering the whole anchor.
    fn longest_cover(&self) -> u32 {
        self.cover
            .iter()
            .copied()
            .max_by_key(|&c| depth(c))
            .unwrap_or(NONE)
    }

    /// Adds a prefix (`key` under the anchor or covering it, host bits clear).
    pub(crate) fn insert(&mut self, key: K, len: u8, l: u32) {
        if len <= self.skip {
            self.cover.push(l);
            self.best_cover = self.longest_cover();
        } else if len - self.skip <= self.bits {
            self.dxr
                .insert_w(self.key(key), len - self.skip, l - u32::from(self.skip));
        } else {
            let i = match self.long.iter().position(|e| e.0 <= len) {
                Some(i) if self.long[i].0 == len => i,
                Some(i) => {
                    self.long.insert(i, (len, LongMap::default()));
                    i
                }
                None => {
                    self.long.push((len, LongMap::default()));
                    self.long.len() - 1
                }
            };
            self.long[i].1.insert(key, l);
            let bit = self.long_bit(self.key(key));
            *self.long_count.entry(bit).or_insert(0) += 1;
            self.set_long_flag(bit, true);
        }
    }

    /// Removes the prefix inserted with leaf `l`; `parent` is the leaf of the longest remaining
    /// prefix strictly covering it (`NONE` if none).
    pub(crate) fn remove(&mut self, key: K, len: u8, l: u32, parent: u32) {
        if len <= self.skip {
            if let Some(i) = self.cover.iter().position(|&c| c == l) {
                self.cover.swap_remove(i);
            }
            self.best_cover = self.longest_cover();
        } else if len - self.skip <= self.bits {
            // Parents covering the anchor are not in the window (`cover` answers for them).
            let p = if depth(parent) > i32::from(self.skip) {
                parent - u32::from(self.skip)
            } else {
                NONE
            };
            self.dxr
                .remove_w(self.key(key), len - self.skip, l - u32::from(self.skip), p);
        } else {
            if let Some(i) = self.long.iter().position(|e| e.0 == len) {
                self.long[i].1.remove(&key);
                if self.long[i].1.is_empty() {
                    self.long.remove(i);
                }
            }
            let bit = self.long_bit(self.key(key));
            if let Some(c) = self.long_count.get_mut(&bit) {
                *c -= 1;
                if *c == 0 {
                    self.long_count.remove(&bit);
                    self.set_long_flag(bit, false);
                }
            }
            if self.long.is_empty() {
                self.long_bits = Vec::new();
                self.long_count = HashMap::new();
            }
        }
    }

    /// Longest match for `key` (under the anchor).
    #[inline(always)]
    pub(crate) fn lookup(&self, key: K) -> u32 {
        let w = self.key(key);
        self.finish(key, w, self.dxr.lookup_w(w))
    }

    /// The answer for `key` (window bits `w`) given the window's leaf `l`: back to address
    /// lengths, the cover where the window has nothing, a long prefix where one matches.
    #[inline(always)]
    pub(crate) fn finish(&self, key: K, w: u64, l: u32) -> u32 {
        let best = if l == NONE {
            self.best_cover
        } else {
            l + u32::from(self.skip)
        };
        if self.long_bits.is_empty() {
            return best;
        }
        let b = self.long_bit(w);
        if self.long_bits[b / 64] >> (b % 64) & 1 == 0 {
            return best;
        }
        self.lookup_long(key).unwrap_or(best)
    }

    #[inline(never)]
    fn lookup_long(&self, key: K) -> Option<u32> {
        self.long
            .iter()
            .find_map(|(len, m)| m.get(&key.masked_top(u32::from(K::BITS - len))).copied())
    }

    /// The direct structure and window key of `key`, for batched walks.
    #[inline(always)]
    pub(crate) fn walk_key(&self, key: K) -> (&Dxr, u64) {
        (&self.dxr, self.key(key))
    }

    #[cfg(test)]
    fn dxr_dp(&self) -> u8 {
        self.dxr.dp_bits()
    }

    /// Bytes a lookup may touch.
    pub(crate) fn footprint(&self) -> usize {
        self.dxr.footprint() + self.long_bits.len() * 8 + self.long_bytes()
    }

    fn long_bytes(&self) -> usize {
        self.long
            .iter()
            .map(|(_, m)| m.capacity() * (std::mem::size_of::<K>() + 4 + 1))
            .sum()
    }

    /// Bytes of heap held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.dxr.heap_bytes()
            + self.cover.capacity() * 4
            + self.long.capacity() * std::mem::size_of::<(u8, LongMap<K>)>()
            + self.long_bytes()
            + self.long_bits.capacity() * 8
            + self.long_count.capacity() * 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{mask, naive, Rng};
    use crate::trie::{leaf, Anchored, Lpm, CHUNK};

    /// Clustered prefixes like the benchmark's: 16 `/32` sites, `/40`..`/64`, 2% `/128`.
    fn clustered(n: usize, rng: &mut Rng) -> Vec<(u128, u8, u32)> {
        let mut seen = std::collections::HashSet::new();
        let mut v = Vec::new();
        while v.len() < n {
            let site = (0x2001_0db8u128 + u128::from(rng.next() % 16)) << 96;
            let len = if rng.next() % 100 < 2 {
                128
            } else {
                40 + (rng.next() % 25) as u8
            };
            let k = mask(site | rng.wide() >> 32, len);
            if seen.insert((k, len)) {
                v.push((k, len, leaf(v.len() as u32, len)));
            }
        }
        v
    }

    fn parent(set: &[(u128, u8, u32)], k: u128, len: u8) -> u32 {
        let shorter: Vec<_> = set.iter().copied().filter(|e| e.1 < len).collect();
        naive(&shorter, k)
    }

    /// Scalar and batched lookups against the naive answer, at random keys under `base`'s top
    /// 32 bits and around every prefix's edges.
    fn check(t: &Anchored<u128>, set: &[(u128, u8, u32)], base: u128, rng: &mut Rng) {
        let mut probes: Vec<u128> = (0..3000).map(|_| base | rng.wide() >> 32).collect();
        probes.extend((0..300).map(|_| rng.wide()));
        for &(k, len, _) in set {
            let size = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            probes.extend([k, k.wrapping_sub(1), k | size, (k | size).wrapping_add(1)]);
        }
        let mut out = vec![NONE; probes.len()];
        for (c, o) in probes.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
            let mut tid = [0u32; CHUNK];
            tid[c.len() / 2] = u32::MAX; // one query of the chunk has no trie
            Anchored::walk_chunk(std::slice::from_ref(t), &tid[..c.len()], c, o);
            if c.len() / 2 < c.len() {
                assert_eq!(o[c.len() / 2], NONE);
                o[c.len() / 2] = t.lookup(c[c.len() / 2]);
            }
        }
        for (i, &key) in probes.iter().enumerate() {
            let want = naive(set, key);
            assert_eq!(t.lookup(key), want, "key {key:#x}");
            assert_eq!(out[i], want, "batched, key {key:#x}");
        }
    }

    /// Prefixes at every boundary of the window (covering the anchor, as long as it, one bit
    /// longer, around the direct width and the window width, host routes and other long
    /// prefixes), built, added and removed one by one down to empty, and built again.
    #[test]
    fn window_matches_naive_across_its_boundaries() {
        let mut rng = Rng(0x9e37_79b9);
        let base: u128 = 0x2001_0db8 << 96;
        let mut set = clustered(4000, &mut rng);
        set.retain(|e| e.0 >> 100 == base >> 100); // one /28 of sites: the anchor
        let t = Anchored::build(16, &mut set.clone());
        let w = t.window.as_ref().expect("a window");
        let (skip, dp, bits) = (w.skip, w.dxr_dp(), w.bits);
        assert!(skip >= 28, "the sites' common bits are the anchor");
        let mut t = t;
        let mut g = 1_000_000u32;
        let mut add = |t: &mut Anchored<u128>, set: &mut Vec<(u128, u8, u32)>, len: u8| {
            let k = mask(base | rng.wide() >> 32, len);
            if !set.iter().any(|e| e.0 == k && e.1 == len) {
                g += 1;
                t.insert(k, len, leaf(g, len));
                set.push((k, len, leaf(g, len)));
            }
        };
        let edges = [
            0,
            16,
            skip - 1,
            skip,
            skip + 1,
            skip + dp - 1,
            skip + dp,
            skip + dp + 1,
            skip + bits - 1,
            skip + bits,
            skip + bits + 1,
            100,
            127,
            128,
        ];
        for &len in &edges {
            for _ in 0..5 {
                add(&mut t, &mut set, len);
            }
        }
        // Nested: a chain of prefixes over one address, every length from 0 to 128.
        let deep = base | rng.wide() >> 32;
        for len in 0..=128u8 {
            let k = mask(deep, len);
            if !set.iter().any(|e| e.0 == k && e.1 == len) {
                g += 1;
                t.insert(k, len, leaf(g, len));
                set.push((k, len, leaf(g, len)));
            }
        }
        check(&t, &set, base, &mut rng);
        let built = Anchored::build(16, &mut set.clone());
        assert!(built.window.is_some());
        check(&built, &set, base, &mut rng);
        // Down to empty, in random order.
        let mut t = built;
        while !set.is_empty() {
            let i = rng.next() as usize % set.len();
            let (k, len, l) = set.swap_remove(i);
            t.remove(k, len, l, parent(&set, k, len));
            if set.len() % 700 == 0 {
                check(&t, &set, base, &mut rng);
            }
        }
        let w = t.window.as_ref().expect("still a window");
        assert!(w.cover.is_empty() && w.best_cover == NONE);
        assert!(w.long.is_empty() && w.long_bits.is_empty() && w.long_count.is_empty());
        assert_eq!(t.lookup(deep), NONE);
        assert_eq!(t.lookup(base), NONE);
    }

    /// Without host bits beyond 16 bits below the table, the window uses `u16` range keys;
    /// with them, 31 bits. Small or unclustered tables get no window.
    #[test]
    fn window_width_follows_the_prefixes() {
        let mut rng = Rng(77);
        let base: u128 = 0x2001_0db8 << 96;
        let narrow: Vec<(u128, u8, u32)> = (0..3000u32)
            .map(|i| {
                let len = 36 + (rng.next() % 10) as u8;
                ((mask(base | rng.wide() >> 32, len), len), leaf(i, len))
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|((k, len), l)| (k, len, l))
            .collect();
        let t = Anchored::build(16, &mut narrow.clone());
        let w = t.window.as_ref().expect("a window");
        assert_eq!(w.bits, w.dxr_dp() + 16);
        check(&t, &narrow, base, &mut rng);
        let mut wide = narrow.clone();
        let len = w.skip + w.dxr_dp() + 20;
        wide.push((mask(base, len), len, leaf(5000, len)));
        wide.push((base | 1, 128, leaf(5001, 128)));
        let t = Anchored::build(16, &mut wide.clone());
        let w = t.window.as_ref().expect("a window");
        assert_eq!(w.bits, w.dxr_dp() + 31);
        assert_eq!(
            w.long.len(),
            1,
            "only the host route is longer than the window"
        );
        check(&t, &wide, base, &mut rng);
        let small: Vec<_> = narrow[..500].to_vec();
        assert!(Anchored::build(16, &mut small.clone()).window.is_none());
    }

    /// The long-prefix filter sends few lookups that match no long prefix to the hash maps.
    #[test]
    fn long_filter_is_selective() {
        let mut rng = Rng(5);
        let set = clustered(200_000, &mut rng);
        let t = Anchored::build(16, &mut set.clone());
        let w = t.window.as_ref().expect("a window");
        let mut probes = 0;
        let n = 100_000;
        for _ in 0..n {
            let e = set[rng.next() as usize % set.len()];
            if e.1 == 128 {
                continue;
            }
            let key = e.0 | rng.wide().checked_shr(u32::from(e.1)).unwrap_or(0);
            let b = w.long_bit(w.key(key));
            probes += usize::from(w.long_bits[b / 64] >> (b % 64) & 1 != 0);
        }
        eprintln!("dp {} bits {} probes {probes}", w.dxr_dp(), w.bits);
        assert!(probes < n / 20, "{probes} of {n}");
    }
}
