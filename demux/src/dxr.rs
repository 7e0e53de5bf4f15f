//! The IPv4 longest-prefix-match structure: a direct table and sorted range blocks (also used,
//! over a window of up to 55 address bits, below the anchor of clustered IPv6 tables: see
//! [`crate::window`]).
//!
//! Layout (after Zec, Rizzo & Mikuc, "DXR: towards a billion routing lookups per second in
//! software", 2012, algorithm only):
//! - a direct table indexed by the top `dp_bits` of the address; each 8-byte entry holds the best
//!   prefix of length <= `dp_bits` covering its slot (`default`) and a reference to the slot's
//!   range block (none when no longer prefix lies in the slot);
//! - a range block lists, for the low `32 - dp_bits` bits of the addresses of its slot, where the
//!   longest match changes: sorted interval starts (`u16` keys when the remainder has at most 16
//!   bits, `u32` otherwise) in chunks of 8, then one leaf per interval. A lookup counts the keys
//!   below the address (a SIMD-friendly compare over a few chunks, a binary search over chunks for
//!   dense slots) and reads the leaf at that index. `NONE` leaves stand for the slot's default;
//! - a slot whose only content is one prefix (no default) keeps it in its direct entry instead of
//!   a block (*inline*: its leaf and its address), so sparse tables answer most lookups with one
//!   memory access and a compare, at every direct width.
//!
//! A lookup therefore reads the direct entry and then at most one block, whose cache lines are
//! contiguous and can be fetched together: at a million uniformly spread `/16`..`/32` prefixes
//! with 17 direct bits a block averages about 13 keys (about 84 bytes: two or three cache lines)
//! and the whole structure 12.5 bytes per prefix.
//!
//! Updates are local: a prefix no longer than `dp_bits` rewrites the defaults of the slots it
//! covers; a longer one rewrites its slot's block (decoded to intervals, edited, re-encoded).
//! Blocks are recycled through exact-size free lists.

use std::collections::HashMap;

use crate::trie::{depth, leaf_len, prefetch, Lpm, CHUNK, NIL, NONE};

/// Direct entry without a range block.
const NO_BLOCK: u32 = u32::MAX;
/// Keys per chunk (16 bytes of `u16` keys: one SSE compare).
const CHUNK_KEYS: usize = 8;
/// Key-count field value meaning "many keys: the chunk count is in the block header".
const BIG: u32 = 63;
/// Bits of the key-count field of a block reference.
const CHUNK_FIELD: u32 = 6;
/// Largest block offset (in 8-byte units) a reference can hold: 512 MiB of blocks.
const MAX_OFF: usize = (1 << (32 - CHUNK_FIELD)) - 1;
/// Up to this many chunks, a lookup compares a fixed `LINEAR_CHUNKS * 8` keys from the block's
/// start, masking those past its end (no data-dependent branch: a mispredicted loop exit would
/// stall the next lookups too); above, it first binary-searches the chunks.
const LINEAR_CHUNKS: usize = 4;
/// Arena size (`u16`s) from which a scalar lookup prefetches a block's last line along with its
/// first (blocks mostly come from memory then).
const SCALAR_PREFETCH: usize = 1 << 21;
/// `u16`s kept readable after the last block, so that a fixed-size compare never leaves the arena.
const TAIL: usize = LINEAR_CHUNKS * CHUNK_KEYS;

/// Tag (in a leaf's length byte, where IPv4 lengths never reach) of an inline direct entry.
const INLINE: u32 = 0x80;

/// A direct-table entry: 8 bytes. Either a default and a block reference, or *inline*: a slot
/// whose only content is one prefix (and no default) holds it in place of a block, as the prefix's
/// leaf tagged `INLINE` in `default` and its address (the whole 32-bit key) in `block`; the
/// prefix length in the leaf says how many of the key's bits must match. Sparse tables (most
/// slots hold one prefix) then answer with one memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(8))]
struct Dir {
    /// Best prefix of length <= `dp_bits` covering the slot (`NONE`: none); or an inline leaf.
    default: u32,
    /// `offset / 8 bytes << 6 | min(keys, 63)`, or `NO_BLOCK`; or the prefix's key inline.
    block: u32,
}

impl Dir {
    #[inline(always)]
    fn is_inline(self) -> bool {
        self.default & INLINE != 0
    }

    /// The answer of an inline entry for a key of `bits` bits whose low 32 bits are `key`: its
    /// leaf if the prefix covers the key. The slot's bits match by construction, and the bits
    /// below them (at most 31) are among the low 32.
    #[inline(always)]
    fn inline_leaf(self, key: u32, bits: u32) -> u32 {
        // An inline prefix is longer than the direct bits (>= 8): the shift stays below 32; the
        // `u64` keeps it defined for any length byte anyway.
        let len = self.default & 0x3f;
        if u64::from(key ^ self.block) >> (bits - len) == 0 {
            self.default & !INLINE
        } else {
            NONE
        }
    }

    /// The answer of an entry without a block reference (inline, or its default alone), with
    /// no branch: a default-only entry compares no key bits.
    #[inline(always)]
    fn final_leaf(self, key: u32, bits: u32) -> u32 {
        let care = 0u32.wrapping_sub(u32::from(self.is_inline()));
        let len = self.default & 0x3f;
        // `bits - len` < 64: keys have at most 55 bits.
        if u64::from((key ^ self.block) & care) >> (bits - len) == 0 {
            self.default & !INLINE
        } else {
            NONE
        }
    }

    /// A block reference, if the entry has one.
    #[inline(always)]
    fn block(self) -> Option<u32> {
        (!self.is_inline() && self.block != NO_BLOCK).then_some(self.block)
    }
}

const EMPTY_DIR: Dir = Dir {
    default: NONE,
    block: NO_BLOCK,
};

/// `(interval start, leaf)`, starts increasing from 0, adjacent leaves distinct.
type Intervals = Vec<(u32, u32)>;

/// Number of `u16` keys of `chunk` below `k`.
#[inline(always)]
fn count8(chunk: &[u16], k: u16) -> usize {
    let c: &[u16; CHUNK_KEYS] = chunk.try_into().expect("chunks are 8 keys");
    c.iter().map(|&t| usize::from(t < k)).sum()
}

/// Number of `u32` keys of `chunk` below `k`.
#[inline(always)]
fn count8_wide(chunk: &[u16], k: u32) -> usize {
    let c: &[u16; 2 * CHUNK_KEYS] = chunk.try_into().expect("chunks are 8 keys");
    let mut n = 0;
    for i in 0..CHUNK_KEYS {
        n += usize::from(wide_at(c, i) < k);
    }
    n
}

#[inline(always)]
fn wide_at(keys: &[u16], i: usize) -> u32 {
    u32::from(keys[2 * i]) | u32::from(keys[2 * i + 1]) << 16
}

/// The IPv4 LPM of one `(protocol, ports)`; also, over a window of up to 55 bits of the
/// address (see [`Dxr::new_window`]), the inside of an anchored IPv6 table.
///
/// Keys are `bits` bits wide (32 for IPv4), passed right-aligned in a `u64`; prefix lengths and
/// the lengths in leaves count from the key's top bit.
#[derive(Clone, Debug)]
pub(crate) struct Dxr {
    dp_bits: u8,
    /// Key width.
    bits: u8,
    /// `bits - dp_bits` (at most 31): bits below the direct index.
    rem: u8,
    dir: Vec<Dir>,
    /// Range blocks, each starting at a multiple of 4 (8 bytes), then `TAIL` zeros.
    arena: Vec<u16>,
    /// `u16`s of the arena used by blocks (live or free).
    used: usize,
    /// Free blocks by size (in 8-byte units): their offsets (in 8-byte units).
    free: HashMap<u32, Vec<u32>>,
    prefixes: usize,
}

impl Dxr {
    /// An empty structure over 32-bit keys with `dp_bits` (8..=24) direct bits.
    pub(crate) fn new(dp_bits: u8) -> Self {
        Self::new_window(dp_bits, 32)
    }

    /// An empty structure over `bits`-bit keys with `dp_bits` (8..=24) direct bits; at most 31
    /// bits below them (range keys are at most `u32`).
    pub(crate) fn new_window(dp_bits: u8, bits: u8) -> Self {
        assert!((8..=24).contains(&dp_bits), "direct bits {dp_bits}");
        assert!(bits > dp_bits && bits - dp_bits <= 31, "{bits} bits");
        Dxr {
            dp_bits,
            bits,
            rem: bits - dp_bits,
            dir: vec![EMPTY_DIR; 1 << dp_bits],
            arena: vec![0; TAIL],
            used: 0,
            free: HashMap::new(),
            prefixes: 0,
        }
    }

    /// A placeholder that holds nothing and allocates nothing (for recycled trie slots).
    pub(crate) fn placeholder() -> Self {
        Dxr {
            dp_bits: 32,
            bits: 32,
            rem: 0,
            dir: Vec::new(),
            arena: Vec::new(),
            used: 0,
            free: HashMap::new(),
            prefixes: 0,
        }
    }

    /// Bytes of heap the structure holds (capacity, including recycled blocks).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.dir.capacity() * std::mem::size_of::<Dir>()
            + self.arena.capacity() * 2
            + self.free.capacity() * 32
            + self.free.values().map(|v| v.capacity() * 4).sum::<usize>()
    }

    /// Direct bits.
    #[cfg(test)]
    pub(crate) fn dp_bits(&self) -> u8 {
        self.dp_bits
    }

    /// Bytes a lookup may touch: decides whether batching with prefetches pays off.
    pub(crate) fn footprint(&self) -> usize {
        self.dir.len() * std::mem::size_of::<Dir>() + self.used * 2
    }

    /// `u16` keys when the remainder fits 16 bits.
    #[inline(always)]
    fn narrow(&self) -> bool {
        self.rem <= 16
    }

    /// Bits below the direct index.
    #[inline(always)]
    fn rem(&self) -> u32 {
        u32::from(self.rem)
    }

    #[inline(always)]
    fn slot(&self, key: u64) -> usize {
        (key >> self.rem()) as usize
    }

    #[inline(always)]
    fn low(&self, key: u64) -> u32 {
        (key as u32) & (((1u64 << self.rem()) - 1) as u32)
    }

    /// The key width, as a shift base for [`Dir::final_leaf`].
    #[inline(always)]
    fn width(&self) -> u32 {
        u32::from(self.bits)
    }

    /// Where a block's keys start (in `u16`s) and how many chunks it has.
    #[inline(always)]
    fn keys_at(&self, block: u32) -> (usize, usize) {
        let base = ((block >> CHUNK_FIELD) as usize) * 4;
        let n = block & ((1 << CHUNK_FIELD) - 1);
        if n == BIG {
            let c = u32::from(self.arena[base]) | u32::from(self.arena[base + 1]) << 16;
            (base + 4, c as usize)
        } else {
            (base, self.chunks(n as usize))
        }
    }

    /// Chunks of a block of `n` keys. The binary search over chunks needs padding in the last
    /// chunk; the short compare (`u16` keys, at most `LINEAR_CHUNKS` chunks) needs none.
    #[inline(always)]
    fn chunks(&self, n: usize) -> usize {
        if self.narrow() && n <= LINEAR_CHUNKS * CHUNK_KEYS {
            n.div_ceil(CHUNK_KEYS).max(1)
        } else {
            n / CHUNK_KEYS + 1
        }
    }

    /// `u16`s per key.
    #[inline(always)]
    fn kw(&self) -> usize {
        if self.narrow() {
            1
        } else {
            2
        }
    }

    /// The leaf of the interval holding `low` in `block` (`NONE`: the slot's default).
    #[inline(always)]
    fn search(&self, block: u32, low: u32) -> u32 {
        let (ks, chunks) = self.keys_at(block);
        let kw = self.kw();
        let nk = kw * CHUNK_KEYS * chunks;
        let idx = if kw == 1 {
            if chunks <= LINEAR_CHUNKS {
                Self::count_short(&self.arena[ks..ks + TAIL], chunks, low as u16)
            } else {
                Self::count_narrow(&self.arena[ks..ks + nk], low as u16)
            }
        } else {
            Self::count_wide(&self.arena[ks..ks + nk], low)
        };
        let li = ks + nk + 2 * idx;
        u32::from(self.arena[li]) | u32::from(self.arena[li + 1]) << 16
    }

    /// Keys below `k` in the first `chunks` (<= `LINEAR_CHUNKS`) chunks of `keys` (`TAIL` long;
    /// past those chunks anything). Per chunk: one SIMD compare, a mask, a popcount, then a
    /// conditional move drops the chunks past the block (written so that LLVM vectorizes it).
    #[inline(always)]
    fn count_short(keys: &[u16], chunks: usize, k: u16) -> usize {
        let keys: &[u16; TAIL] = keys.try_into().expect("TAIL keys");
        let mut c = 0usize;
        for j in 0..LINEAR_CHUNKS {
            let mut cj = 0u16;
            for &t in &keys[CHUNK_KEYS * j..CHUNK_KEYS * (j + 1)] {
                cj += u16::from(t < k);
            }
            c += usize::from(cj) & 0usize.wrapping_sub(usize::from(j < chunks));
        }
        c
    }

    /// Keys below `k` (`keys` sorted, padded with `u16::MAX`, the last chunk holding padding).
    #[inline(always)]
    fn count_narrow(keys: &[u16], k: u16) -> usize {
        let chunks = keys.len() / CHUNK_KEYS;
        // First chunk whose last key is not below `k` (the last chunk's last key is padding).
        let (mut lo, mut len) = (0usize, chunks);
        while len > 1 {
            let half = len / 2;
            if keys[(lo + half) * CHUNK_KEYS - 1] < k {
                lo += half;
            }
            len -= half;
        }
        lo * CHUNK_KEYS + count8(&keys[lo * CHUNK_KEYS..(lo + 1) * CHUNK_KEYS], k)
    }

    /// [`count_narrow`](Self::count_narrow) for `u32` keys stored as `u16` pairs.
    #[inline(always)]
    fn count_wide(keys: &[u16], k: u32) -> usize {
        let chunks = keys.len() / (2 * CHUNK_KEYS);
        let (mut lo, mut len) = (0usize, chunks);
        while len > 1 {
            let half = len / 2;
            if wide_at(keys, (lo + half) * CHUNK_KEYS - 1) < k {
                lo += half;
            }
            len -= half;
        }
        lo * CHUNK_KEYS + count8_wide(&keys[lo * 2 * CHUNK_KEYS..(lo + 1) * 2 * CHUNK_KEYS], k)
    }

    /// Longest match for `key`: a leaf (`NONE` if no prefix covers it).
    ///
    /// The direct-entry part (one load, one compare) is inlined into the caller; a block search
    /// is a call, so that the common one-access answers pay no register saves for it.
    #[inline(always)]
    pub(crate) fn lookup(&self, key: u32) -> u32 {
        self.lookup_w(u64::from(key))
    }

    /// [`lookup`](Self::lookup) of a key of any width.
    #[inline(always)]
    pub(crate) fn lookup_w(&self, key: u64) -> u32 {
        let d = self.dir[self.slot(key)];
        // One branch for "answered by the entry" (inline or no block), then a select: which of
        // the two kinds a slot is follows no pattern in random traffic.
        if (d.is_inline() as u8 | (d.block == NO_BLOCK) as u8) != 0 {
            return d.final_leaf(key as u32, self.width());
        }
        self.lookup_block(d, key)
    }

    /// The rest of a [`lookup`](Self::lookup) whose direct entry `d` refers to a block.
    #[inline(never)]
    fn lookup_block(&self, d: Dir, key: u64) -> u32 {
        if self.arena.len() > SCALAR_PREFETCH {
            self.prefetch_block(d.block);
        }
        let l = self.search(d.block, self.low(key));
        if l == NONE {
            d.default
        } else {
            l
        }
    }

    /// Prefetches the direct entry of `key`: the first memory access of a walk.
    #[inline(always)]
    pub(crate) fn prefetch_first(&self, key: u64) {
        prefetch(self.dir.as_ptr().wrapping_add(self.slot(key)));
    }

    /// Prefetches a block's first, second and last cache lines (a longer block's other lines are
    /// fetched on demand). Unconditional hints (repeats of a line cost nothing): a loop over the
    /// lines would mispredict its exit.
    #[inline(always)]
    fn prefetch_block(&self, block: u32) {
        let base = ((block >> CHUNK_FIELD) as usize) * 4;
        let n = (block & ((1 << CHUNK_FIELD) - 1)) as usize;
        // Keys, then n + 1 leaves (two u16s each).
        let bytes = self.chunks(n) * CHUNK_KEYS * 2 * self.kw() + 4 * (n + 1);
        let p = self.arena.as_ptr().wrapping_add(base) as *const u8;
        prefetch(p);
        prefetch(p.wrapping_add(64.min(bytes - 1)));
        prefetch(p.wrapping_add(bytes - 1));
    }

    /// Batched lookups of up to `CHUNK` queries: `out[i]` gets the longest match of `keys[i]` in
    /// `tries[tid[i]]` (`NONE` where `tid[i]` is `NIL`). Three passes over the chunk (prefetch
    /// the direct entries; read them and prefetch the blocks; search the blocks), so that each
    /// pass's cache misses are all in flight together.
    pub(crate) fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[u32], out: &mut [u32]) {
        let n = keys.len().min(out.len()).min(tid.len());
        Self::walk_keys(
            |i| (tid[i] != NIL).then(|| (&tries[tid[i] as usize], u64::from(keys[i]))),
            &mut out[..n],
        );
    }

    /// [`walk_chunk`](Self::walk_chunk) over keys of any width: query `i` (of `out.len()`, at
    /// most `CHUNK`) looks key `k` up in `t` where `pick(i)` is `Some((t, k))`, and gets `NONE`
    /// where it is `None`.
    #[inline(always)]
    pub(crate) fn walk_keys<'a>(pick: impl Fn(usize) -> Option<(&'a Self, u64)>, out: &mut [u32]) {
        let n = out.len();
        debug_assert!(n <= CHUNK);
        let mut tries: [Option<&Self>; CHUNK] = [None; CHUNK];
        let mut keys = [0u64; CHUNK];
        let mut dir = [EMPTY_DIR; CHUNK];
        for i in 0..n {
            if let Some((t, k)) = pick(i) {
                t.prefetch_first(k);
                tries[i] = Some(t);
                keys[i] = k;
            }
        }
        for i in 0..n {
            if let Some(t) = tries[i] {
                dir[i] = t.dir[t.slot(keys[i])];
                if let Some(b) = dir[i].block() {
                    t.prefetch_block(b);
                }
            }
        }
        for i in 0..n {
            out[i] = match tries[i] {
                None => NONE,
                Some(t) if dir[i].is_inline() => dir[i].inline_leaf(keys[i] as u32, t.width()),
                Some(_) if dir[i].block == NO_BLOCK => dir[i].default,
                Some(t) => {
                    let l = t.search(dir[i].block, t.low(keys[i]));
                    if l == NONE {
                        dir[i].default
                    } else {
                        l
                    }
                }
            };
        }
    }

    // ---- updates -------------------------------------------------------------------------

    /// The intervals of a block.
    fn decode(&self, block: u32) -> Intervals {
        if block == NO_BLOCK {
            return vec![(0, NONE)];
        }
        let (ks, chunks) = self.keys_at(block);
        let kw = self.kw();
        let keys = &self.arena[ks..ks + kw * CHUNK_KEYS * chunks];
        let key = |i: usize| {
            if kw == 1 {
                u32::from(keys[i])
            } else {
                wide_at(keys, i)
            }
        };
        let pad = if kw == 1 {
            u32::from(u16::MAX)
        } else {
            u32::MAX
        };
        let n = (0..CHUNK_KEYS * chunks)
            .take_while(|&i| key(i) != pad)
            .count();
        let lb = ks + keys.len();
        let leaf = |i: usize| {
            u32::from(self.arena[lb + 2 * i]) | u32::from(self.arena[lb + 2 * i + 1]) << 16
        };
        let mut v = Vec::with_capacity(n + 1);
        v.push((0, leaf(0)));
        for i in 0..n {
            v.push((key(i) + 1, leaf(i + 1)));
        }
        v
    }

    /// Size in 8-byte units of a block of `n` keys.
    fn block_units(&self, n: usize) -> (usize, usize, bool) {
        let chunks = self.chunks(n);
        let big = n >= BIG as usize;
        let u16s = usize::from(big) * 4 + self.kw() * CHUNK_KEYS * chunks + 2 * (n + 1);
        (u16s.div_ceil(4), chunks, big)
    }

    fn free_block(&mut self, block: u32) {
        if block == NO_BLOCK {
            return;
        }
        let (ks, chunks) = self.keys_at(block);
        let kw = self.kw();
        let keys = &self.arena[ks..ks + kw * CHUNK_KEYS * chunks];
        let pad = if kw == 1 {
            u32::from(u16::MAX)
        } else {
            u32::MAX
        };
        let n = (0..CHUNK_KEYS * chunks)
            .take_while(|&i| {
                (if kw == 1 {
                    u32::from(keys[i])
                } else {
                    wide_at(keys, i)
                }) != pad
            })
            .count();
        let units = self.block_units(n).0 as u32;
        self.free
            .entry(units)
            .or_default()
            .push(block >> CHUNK_FIELD);
    }

    /// Writes intervals as a block; `NO_BLOCK` when they say "the default everywhere".
    fn encode(&mut self, iv: &[(u32, u32)]) -> u32 {
        debug_assert!(iv[0].0 == 0 && iv.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1));
        if iv.len() == 1 && iv[0].1 == NONE {
            return NO_BLOCK;
        }
        let n = iv.len() - 1;
        let (units, chunks, big) = self.block_units(n);
        let off = match self.free.get_mut(&(units as u32)).and_then(Vec::pop) {
            Some(o) => o as usize,
            None => {
                let o = self.used / 4;
                self.used += units * 4;
                self.arena.resize(self.used + TAIL, 0);
                o
            }
        };
        assert!(off <= MAX_OFF, "range blocks exceed 512 MiB");
        let mut at = off * 4;
        if big {
            self.arena[at] = chunks as u16;
            self.arena[at + 1] = (chunks >> 16) as u16;
            at += 4;
        }
        let kw = self.kw();
        for i in 0..CHUNK_KEYS * chunks {
            let t = iv.get(i + 1).map_or(u32::MAX, |x| x.0 - 1);
            if kw == 1 {
                self.arena[at + i] = t as u16;
            } else {
                self.arena[at + 2 * i] = t as u16;
                self.arena[at + 2 * i + 1] = (t >> 16) as u16;
            }
        }
        at += kw * CHUNK_KEYS * chunks;
        for (i, &(_, l)) in iv.iter().enumerate() {
            self.arena[at + 2 * i] = l as u16;
            self.arena[at + 2 * i + 1] = (l >> 16) as u16;
        }
        (off as u32) << CHUNK_FIELD | (n as u32).min(BIG)
    }

    /// Range of direct slots covered by a prefix of length `len <= dp_bits`.
    fn slots(&self, key: u64, len: u8) -> std::ops::Range<usize> {
        let first = self.slot(key);
        first..first + (1usize << (self.dp_bits - len))
    }

    /// The interval `[a, b)` of a prefix longer than `dp_bits` inside its slot.
    fn span(&self, key: u64, len: u8) -> (u32, u32) {
        let a = self.low(key);
        (a, a + (1u32 << (self.width() - u32::from(len))))
    }

    /// The intervals of slot `s` (its default not included).
    fn slot_intervals(&self, s: usize) -> Intervals {
        let d = self.dir[s];
        if !d.is_inline() {
            return self.decode(d.block);
        }
        let l = d.default & !INLINE;
        let first = self.low(u64::from(d.block));
        let end = u64::from(first) + (1u64 << (self.width() - u32::from(leaf_len(l))));
        let mut v = vec![(0, NONE)];
        if first == 0 {
            v.clear();
        }
        v.push((first, l));
        if end < 1u64 << self.rem() {
            v.push((end as u32, NONE));
        }
        v
    }

    /// Stores intervals as slot `s`'s content (its block freed; `dir[s].default` must be the true
    /// default, not an inline leaf): inline when they are one prefix on no default, else a block.
    fn set_slot(&mut self, s: usize, iv: &[(u32, u32)]) {
        if let Some(b) = self.dir[s].block() {
            self.free_block(b);
        }
        let end = 1u32 << self.rem();
        let one = match *iv {
            [(0, l), (b, NONE)] if l != NONE => Some((0, b, l)),
            [(0, NONE), (a, l)] if l != NONE => Some((a, end, l)),
            [(0, NONE), (a, l), (b, NONE)] => Some((a, b, l)),
            _ => None,
        };
        match one {
            Some((a, b, l)) if self.dir[s].default == NONE => {
                // One leaf over one interval: exactly its prefix's span (leaves are distinct).
                debug_assert_eq!(
                    u64::from(b - a),
                    1u64 << (self.width() - u32::from(leaf_len(l))),
                    "an inline interval is its prefix"
                );
                self.dir[s] = Dir {
                    default: l | INLINE,
                    block: ((s as u64) << self.rem()) as u32 | a,
                };
            }
            _ => self.dir[s].block = self.encode(iv),
        }
    }

    /// Sets the default of slot `s`, turning an inline entry back into a block first (and a block
    /// back into an inline entry when the default goes and one prefix is left).
    fn set_default(&mut self, s: usize, l: u32) {
        if self.dir[s].is_inline() {
            let iv = self.slot_intervals(s);
            self.dir[s] = Dir {
                default: l,
                block: NO_BLOCK,
            };
            self.set_slot(s, &iv);
        } else {
            self.dir[s].default = l;
            // A block left without a default may be one prefix: inline again.
            if let (NONE, Some(b)) = (l, self.dir[s].block()) {
                let iv = self.decode(b);
                self.set_slot(s, &iv);
            }
        }
    }

    /// The default of slot `s` (an inline entry has none).
    fn default_of(&self, s: usize) -> u32 {
        if self.dir[s].is_inline() {
            NONE
        } else {
            self.dir[s].default
        }
    }

    /// Rewrites the leaves of `[a, b)` in slot `s` with `f`.
    fn rewrite(&mut self, s: usize, a: u32, b: u32, f: impl Fn(u32) -> u32) {
        let iv = self.slot_intervals(s);
        let end = 1u32 << self.rem();
        let mut out: Intervals = Vec::with_capacity(iv.len() + 2);
        let push = |out: &mut Intervals, s: u32, l: u32| {
            if out.last().is_none_or(|&(_, p)| p != l) {
                out.push((s, l));
            }
        };
        for (i, &(s, l)) in iv.iter().enumerate() {
            let e = iv.get(i + 1).map_or(end, |x| x.0);
            if s < a.min(e) {
                push(&mut out, s, l);
            }
            let (x, y) = (s.max(a), e.min(b));
            if x < y {
                push(&mut out, x, f(l));
            }
            let z = s.max(b);
            if z < e {
                push(&mut out, z, l);
            }
        }
        if self.dir[s].is_inline() {
            self.dir[s] = EMPTY_DIR;
        }
        self.set_slot(s, &out);
    }

    /// Adds a prefix (`key` with host bits clear) whose leaf is `l`.
    pub(crate) fn insert(&mut self, key: u32, len: u8, l: u32) {
        self.insert_w(u64::from(key), len, l)
    }

    /// [`insert`](Self::insert) of a key of any width.
    pub(crate) fn insert_w(&mut self, key: u64, len: u8, l: u32) {
        debug_assert!(len <= self.bits && depth(l) == i32::from(len));
        self.prefixes += 1;
        let better = move |cur: u32| if depth(cur) < i32::from(len) { l } else { cur };
        if len <= self.dp_bits {
            for i in self.slots(key, len) {
                let d = better(self.default_of(i));
                if d != self.default_of(i) {
                    self.set_default(i, d);
                }
            }
            return;
        }
        let (a, b) = self.span(key, len);
        self.rewrite(self.slot(key), a, b, better);
    }

    /// Removes the prefix inserted with leaf `l`; `parent` is the leaf of the longest remaining
    /// prefix strictly covering it (`NONE` if none).
    pub(crate) fn remove(&mut self, key: u32, len: u8, l: u32, parent: u32) {
        self.remove_w(u64::from(key), len, l, parent)
    }

    /// [`remove`](Self::remove) of a key of any width.
    pub(crate) fn remove_w(&mut self, key: u64, len: u8, l: u32, parent: u32) {
        self.prefixes -= 1;
        if len <= self.dp_bits {
            for i in self.slots(key, len) {
                if self.default_of(i) == l {
                    self.set_default(i, parent);
                }
            }
            return;
        }
        // Inside blocks, prefixes no longer than dp_bits live in the default.
        let inner = if depth(parent) > i32::from(self.dp_bits) {
            parent
        } else {
            NONE
        };
        let (a, b) = self.span(key, len);
        self.rewrite(
            self.slot(key),
            a,
            b,
            |cur| if cur == l { inner } else { cur },
        );
    }

    /// Builds the structure from `(key, len, leaf)` entries in one pass: every block is written
    /// once, at its exact size, with no garbage.
    pub(crate) fn build(dp_bits: u8, entries: &mut [(u32, u8, u32)]) -> Self {
        let mut e: Vec<(u64, u8, u32)> = entries
            .iter()
            .map(|&(k, len, l)| (u64::from(k), len, l))
            .collect();
        Self::build_window(dp_bits, 32, &mut e)
    }

    /// [`build`](Self::build) over keys of `bits` bits (see [`new_window`](Self::new_window)).
    pub(crate) fn build_window(dp_bits: u8, bits: u8, entries: &mut [(u64, u8, u32)]) -> Self {
        let mut t = Dxr::new_window(dp_bits, bits);
        t.prefixes = entries.len();
        // Short prefixes fill defaults, shortest first so longer ones overwrite.
        let mut short: Vec<(u64, u8, u32)> =
            entries.iter().copied().filter(|e| e.1 <= dp_bits).collect();
        short.sort_by_key(|e| e.1);
        for (k, len, l) in short {
            for i in t.slots(k, len) {
                t.dir[i].default = l;
            }
        }
        // Sorted by start then length: a prefix comes right before the prefixes it contains.
        entries.sort_unstable_by_key(|e| (e.0, e.1));
        let long: Vec<(u64, u8, u32)> = entries.iter().copied().filter(|e| e.1 > dp_bits).collect();
        let mut rest = &long[..];
        while !rest.is_empty() {
            let slot = t.slot(rest[0].0);
            let end = rest
                .iter()
                .position(|e| t.slot(e.0) != slot)
                .unwrap_or(rest.len());
            let iv = t.sweep(&rest[..end]);
            t.set_slot(slot, &iv);
            rest = &rest[end..];
        }
        t.arena.shrink_to_fit();
        t
    }

    /// The intervals of one slot's prefixes (sorted by start, then length), in one sweep.
    fn sweep(&self, entries: &[(u64, u8, u32)]) -> Intervals {
        let end = 1u32 << self.rem();
        let mut out: Intervals = vec![(0, NONE)];
        let emit = |out: &mut Intervals, pos: u32, leaf: u32| {
            if pos >= end {
                return;
            }
            let n = out.len();
            if out[n - 1].0 == pos {
                out[n - 1].1 = leaf;
                if n >= 2 && out[n - 2].1 == leaf {
                    out.pop();
                }
            } else if out[n - 1].1 != leaf {
                out.push((pos, leaf));
            }
        };
        // Open prefixes, innermost last: (end, leaf).
        let mut stack: Vec<(u32, u32)> = Vec::new();
        for &(k, len, l) in entries {
            let (a, b) = self.span(k, len);
            while let Some(&(e, _)) = stack.last() {
                if e > a {
                    break;
                }
                stack.pop();
                emit(&mut out, e, stack.last().map_or(NONE, |x| x.1));
            }
            stack.push((b, l));
            emit(&mut out, a, l);
        }
        while let Some((e, _)) = stack.pop() {
            emit(&mut out, e, stack.last().map_or(NONE, |x| x.1));
        }
        out
    }
}

impl Lpm<u32> for Dxr {
    fn new(dp_bits: u8) -> Self {
        Dxr::new(dp_bits)
    }
    fn placeholder() -> Self {
        Dxr::placeholder()
    }
    fn build(dp_bits: u8, entries: &mut [(u32, u8, u32)]) -> Self {
        Dxr::build(dp_bits, entries)
    }
    fn len(&self) -> usize {
        self.prefixes
    }
    fn insert(&mut self, key: u32, len: u8, l: u32) {
        Dxr::insert(self, key, len, l)
    }
    fn remove(&mut self, key: u32, len: u8, l: u32, parent: u32) {
        Dxr::remove(self, key, len, l, parent)
    }
    #[inline(always)]
    fn lookup(&self, key: u32) -> u32 {
        Dxr::lookup(self, key)
    }
    fn footprint(&self) -> usize {
        Dxr::footprint(self)
    }
    fn heap_bytes(&self) -> usize {
        Dxr::heap_bytes(self)
    }
    #[inline]
    fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[u32], out: &mut [u32]) {
        Dxr::walk_chunk(tries, tid, keys, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{mask, naive, Rng};
    use crate::trie::leaf;

    fn parent_of(set: &[(u32, u8, u32)], k: u32, len: u8) -> u32 {
        naive(
            &set.iter()
                .copied()
                .filter(|&(_, l2, _)| l2 < len)
                .collect::<Vec<_>>(),
            k,
        )
    }

    fn check_all(t: &Dxr, set: &[(u32, u8, u32)], rng: &mut Rng, base: u32, span: u32) {
        for _ in 0..2000 {
            let key = base | (rng.next() as u32 & span);
            assert_eq!(
                t.lookup(key),
                naive(set, key),
                "dp {} key {key:#x}",
                t.dp_bits
            );
            let mut got = [0];
            Dxr::walk_chunk(std::slice::from_ref(t), &[0], &[key], &mut got);
            assert_eq!(
                got[0],
                naive(set, key),
                "batched, dp {} key {key:#x}",
                t.dp_bits
            );
        }
        // Around every bound prefix's edges.
        for &(k, len, _) in set.iter().take(300) {
            let size = if len == 0 {
                0
            } else {
                1u32 << (32 - u32::from(len))
            } as u64;
            for key in [
                k as u64,
                (k as u64).wrapping_sub(1),
                k as u64 + size,
                k as u64 + size.saturating_sub(1),
            ] {
                let key = key as u32;
                assert_eq!(
                    t.lookup(key),
                    naive(set, key),
                    "edge dp {} key {key:#x}",
                    t.dp_bits
                );
            }
        }
    }

    /// Random nested prefixes around direct-table widths: shorter than, equal to and longer than
    /// the direct bits, `/0` and `/32`; incremental inserts and removals against a naive model,
    /// and the bulk build; everything freed in the end.
    #[test]
    fn insert_remove_build_match_naive_at_every_width() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        for dp in [8u8, 12, 15, 16, 17, 18, 20, 24] {
            let mut t = Dxr::new(dp);
            let mut set: Vec<(u32, u8, u32)> = Vec::new();
            let lens: Vec<u8> = vec![0, 1, dp - 1, dp, dp + 1, 31, 32];
            for g in 0..800u32 {
                let len = if g % 3 == 0 {
                    lens[(rng.next() % lens.len() as u64) as usize]
                } else {
                    (rng.next() % 33) as u8
                };
                let k = mask(0xC612_0000 | (rng.next() as u32 & 0x0003_ffff), len);
                if set.iter().any(|&(k2, l2, _)| k2 == k && l2 == len) {
                    continue;
                }
                let l = leaf(g, len);
                t.insert(k, len, l);
                set.push((k, len, l));
                if g % 97 == 0 {
                    check_all(&t, &set, &mut rng, 0xC612_0000, 0x0003_ffff);
                }
            }
            check_all(&t, &set, &mut rng, 0xC612_0000, 0x0003_ffff);
            check_all(&t, &set, &mut rng, 0, u32::MAX);
            let built = Dxr::build(dp, &mut set.clone());
            assert!(built.heap_bytes() <= t.heap_bytes());
            check_all(&built, &set, &mut rng, 0xC612_0000, 0x0003_ffff);
            while let Some(i) = (!set.is_empty()).then(|| rng.next() as usize % set.len()) {
                let (k, len, l) = set.swap_remove(i);
                t.remove(k, len, l, parent_of(&set, k, len));
                if set.len() % 50 == 0 {
                    check_all(&t, &set, &mut rng, 0xC612_0000, 0x0003_ffff);
                }
            }
            assert!(t.dir.iter().all(|d| *d == EMPTY_DIR));
            assert_eq!(Lpm::len(&t), 0);
        }
    }

    /// A slot dense enough for header-counted blocks and the chunk binary search: every /32 of a
    /// /20 plus nested shorter prefixes, built and incremental.
    #[test]
    fn dense_slots_use_big_blocks() {
        let mut rng = Rng(7);
        for dp in [12u8, 16, 18] {
            let mut set = Vec::new();
            let mut g = 0;
            for a in (0u32..4096).step_by(3) {
                set.push((0x0a00_0000 | a, 32, leaf(g, 32)));
                g += 1;
            }
            for a in (0u32..4096).step_by(64) {
                set.push((0x0a00_0000 | a, 26, leaf(g, 26)));
                g += 1;
            }
            set.push((0x0a00_0000, 8, leaf(g, 8)));
            let built = Dxr::build(dp, &mut set.clone());
            let b = built.dir[built.slot(0x0a00_0000u64)].block;
            assert_eq!(b & ((1 << CHUNK_FIELD) - 1), BIG);
            check_all(&built, &set, &mut rng, 0x0a00_0000, 0x1fff);
            let mut t = Dxr::new(dp);
            for &(k, len, l) in &set {
                t.insert(k, len, l);
            }
            check_all(&t, &set, &mut rng, 0x0a00_0000, 0x1fff);
            for i in (0..set.len()).rev().step_by(2) {
                let (k, len, l) = set.remove(i);
                t.remove(k, len, l, parent_of(&set, k, len));
            }
            check_all(&t, &set, &mut rng, 0x0a00_0000, 0x1fff);
        }
    }

    /// A slot holding one prefix and no default is inline; a default arriving turns it into a
    /// block, and lookups stay right through every transition.
    #[test]
    fn inline_entries_and_their_transitions() {
        let mut rng = Rng(11);
        let mut t = Dxr::new(16);
        let mut set = Vec::new();
        let s = t.slot(0x0a01_0000u64);
        let mut step = |t: &mut Dxr, set: &mut Vec<(u32, u8, u32)>, op: (bool, u32, u8, u32)| {
            let (add, k, len, l) = op;
            if add {
                t.insert(k, len, l);
                set.push((k, len, l));
            } else {
                set.retain(|e| e.2 != l);
                t.remove(k, len, l, parent_of(set, k, len));
            }
            check_all(t, set, &mut rng, 0x0a01_0000, 0xffff);
            check_all(t, set, &mut rng, 0x0a00_0000, 0x3_ffff);
        };
        let p24 = (0x0a01_0500, 24, leaf(1, 24));
        step(&mut t, &mut set, (true, p24.0, p24.1, p24.2));
        assert!(t.dir[s].is_inline());
        // A prefix at the slot's start and one at its end are inline too.
        for (k, len, l) in [
            (0x0a01_0000, 20, leaf(7, 20)),
            (0x0a01_fff0, 28, leaf(8, 28)),
        ] {
            let mut u = Dxr::new(16);
            u.insert(k, len, l);
            assert!(u.dir[s].is_inline());
            assert_eq!(u.lookup(k), l);
            assert_eq!(u.lookup(k + (1 << (32 - len)) - 1), l);
            assert_eq!(u.lookup(k ^ 0x8000), NONE);
        }
        step(&mut t, &mut set, (true, 0x0a00_0000, 8, leaf(2, 8)));
        assert!(!t.dir[s].is_inline());
        step(&mut t, &mut set, (false, 0x0a00_0000, 8, leaf(2, 8)));
        step(&mut t, &mut set, (true, 0x0a01_0580, 25, leaf(3, 25)));
        assert!(!t.dir[s].is_inline());
        step(&mut t, &mut set, (false, 0x0a01_0580, 25, leaf(3, 25)));
        assert!(t.dir[s].is_inline(), "one prefix again, no default");
        step(&mut t, &mut set, (true, 0x0a01_0000, 16, leaf(4, 16)));
        step(&mut t, &mut set, (false, p24.0, p24.1, p24.2));
        step(&mut t, &mut set, (false, 0x0a01_0000, 16, leaf(4, 16)));
        assert!(t.dir.iter().all(|d| *d == EMPTY_DIR));
        // Under 16 direct bits (wide keys) too, and for prefixes at either end of the slot and
        // of the address space.
        for dp in [8u8, 12, 15] {
            for (k, len) in [
                (p24.0, p24.1),
                (0x0a00_0000, dp + 1),
                (0xffff_ffff, 32),
                (0, 31),
                (0x0a0f_fff0, 28),
            ] {
                let l = leaf(5, len);
                let k = mask(k, len);
                let mut w = Dxr::new(dp);
                w.insert(k, len, l);
                assert!(
                    w.dir[w.slot(u64::from(k))].is_inline(),
                    "dp {dp} {k:#x}/{len}"
                );
                let set = vec![(k, len, l)];
                check_all(&w, &set, &mut rng, k & !0xfff_ffff, 0xfff_ffff);
                w.insert(mask(k, dp), dp, leaf(6, dp));
                assert!(!w.dir[w.slot(u64::from(k))].is_inline());
                w.remove(mask(k, dp), dp, leaf(6, dp), NONE);
                assert!(w.dir[w.slot(u64::from(k))].is_inline());
                w.remove(k, len, l, NONE);
                assert!(w.dir.iter().all(|d| *d == EMPTY_DIR));
            }
        }
    }
}
