//! The IPv6 longest-prefix-match structure (a poptrie-style multibit trie, with an anchor for
//! clustered tables: see [`Anchored`]), the leaf encoding, and the [`Lpm`] interface the port index
//! uses for both families (IPv4 uses [`crate::dxr::Dxr`]).
//!
//! Layout (after Asai & Ohara, "Poptrie", SIGCOMM 2015, algorithm only):
//! - a direct-pointing array indexed by the top `dp_bits` of the address; each entry (32 bytes)
//!   holds the best prefix of length <= `dp_bits` covering it (`default`) and, inline, the root
//!   node of its subtree (empty when no longer prefix exists under it), so that the first memory
//!   access of a walk reads both;
//! - subtree nodes branch 64 ways (6 bits a level, fewer on the last). A node is 24 bytes: `vector`
//!   marks the positions that lead to child nodes, `leafvec` marks where a run of equal leaves starts;
//!   children and leaves sit in contiguous blocks found with `base + popcount`.
//!
//! Leaves are `u32`: 0 means "no prefix here, use the direct-pointing default"; otherwise
//! `(group + 1) << 8 | prefix_len`, so comparing two candidate matches needs no extra memory access.
//!
//! Updates are incremental and local: inserting or removing a prefix rewrites the leaves it covers
//! (and, for a short prefix, the direct-pointing entries), adding or collapsing nodes on its path.
//! Blocks are recycled through exact-size free lists (sizes 1..=64).

use crate::dxr::Dxr;
use crate::window::Window;

/// Leaf meaning "nothing matched at this level".
pub(crate) const NONE: u32 = 0;

/// "No trie" in trie-id lists.
pub(crate) const NIL: u32 = u32::MAX;

/// Queries a batched walk keeps in flight together.
pub(crate) const CHUNK: usize = 64;

/// What the port index needs of a longest-prefix-match structure over keys `K`.
pub(crate) trait Lpm<K>: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// An empty structure with `dp_bits` direct-pointing bits.
    fn new(dp_bits: u8) -> Self;
    /// A structure that holds nothing and allocates nothing.
    fn placeholder() -> Self;
    /// A compact structure built in bulk from `(key, len, leaf)` entries.
    fn build(dp_bits: u8, entries: &mut [(K, u8, u32)]) -> Self;
    /// Number of prefixes.
    fn len(&self) -> usize;
    /// Adds a prefix (`key` with host bits clear) whose leaf is `l`.
    fn insert(&mut self, key: K, len: u8, l: u32);
    /// Removes the prefix inserted with leaf `l`; `parent` is the leaf of the longest remaining
    /// prefix strictly covering it (`NONE` if none).
    fn remove(&mut self, key: K, len: u8, l: u32, parent: u32);
    /// Longest match for `key` (`NONE` if none).
    fn lookup(&self, key: K) -> u32;
    /// Bytes a lookup may touch.
    fn footprint(&self) -> usize;
    /// Heap bytes held.
    fn heap_bytes(&self) -> usize;
    /// Batched lookups of up to `CHUNK` queries: `out[i]` = `tries[tid[i]].lookup(keys[i])`,
    /// `NONE` where `tid[i]` is `NIL`.
    fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[K], out: &mut [u32]);
}

/// Encodes a group index and prefix length as a leaf.
#[inline]
pub(crate) fn leaf(group: u32, plen: u8) -> u32 {
    ((group + 1) << 8) | u32::from(plen)
}

/// Group index of a leaf (`leaf != NONE`).
#[inline]
pub(crate) fn leaf_group(leaf: u32) -> u32 {
    (leaf >> 8) - 1
}

/// Prefix length of a leaf (`leaf != NONE`).
#[inline]
pub(crate) fn leaf_len(leaf: u32) -> u8 {
    (leaf & 0xff) as u8
}

/// Prefix length of a leaf, -1 for `NONE`: a larger depth is a better match.
#[inline]
pub(crate) fn depth(leaf: u32) -> i32 {
    if leaf == NONE {
        -1
    } else {
        (leaf & 0xff) as i32
    }
}

/// An address as a fixed-width big-endian bit string.
pub(crate) trait Key:
    Copy + Ord + std::hash::Hash + Default + std::fmt::Debug + Send + Sync + 'static
{
    const BITS: u8;
    /// The LPM structure used for this family.
    type Lpm: Lpm<Self>;
    /// `n` (1..=16) bits starting `off` bits from the most significant end.
    fn bits(self, off: u8, n: u8) -> usize;
    /// Number of leading bits `self` and `other` share.
    fn common_len(self, other: Self) -> u8;
    /// `n` (1..=64) bits starting `off` bits from the most significant end (`off + n <= BITS`).
    fn window(self, off: u8, n: u8) -> u64;
    /// `self` with its low `bits` bits cleared.
    fn masked_top(self, bits: u32) -> Self;
    /// Do `self` and `other` share their top `len` bits?
    #[inline(always)]
    fn same_top(self, other: Self, len: u8) -> bool {
        self.common_len(other) >= len
    }
}

impl Key for u32 {
    const BITS: u8 = 32;
    type Lpm = crate::dxr::Dxr;
    #[inline(always)]
    fn bits(self, off: u8, n: u8) -> usize {
        ((self << off) >> (32 - n)) as usize
    }
    #[inline(always)]
    fn window(self, off: u8, n: u8) -> u64 {
        u64::from(self.checked_shl(u32::from(off)).unwrap_or(0) >> (32 - n))
    }
    #[inline(always)]
    fn common_len(self, other: Self) -> u8 {
        (self ^ other).leading_zeros() as u8
    }
    fn masked_top(self, bits: u32) -> Self {
        self.checked_shr(bits).map_or(0, |v| v << bits)
    }
}

impl Key for u128 {
    const BITS: u8 = 128;
    type Lpm = Anchored<u128>;
    #[inline(always)]
    fn bits(self, off: u8, n: u8) -> usize {
        ((self << off) >> (128 - n)) as usize
    }
    #[inline(always)]
    fn window(self, off: u8, n: u8) -> u64 {
        ((self << off) >> (128 - n)) as u64
    }
    #[inline(always)]
    fn common_len(self, other: Self) -> u8 {
        (self ^ other).leading_zeros() as u8
    }
    fn masked_top(self, bits: u32) -> Self {
        self.checked_shr(bits).map_or(0, |v| v << bits)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Node {
    vector: u64,
    leafvec: u64,
    base0: u32,
    base1: u32,
}

/// A direct-pointing slot: the root node of the slot's subtree, stored inline so that a walk's
/// first memory access reads it, and the best prefix of length <= `dp_bits` covering the slot.
/// 32 bytes, cache-line aligned in groups of two. An empty root has `vector == 0` and
/// `leafvec == 0` (every position falls back to `default`).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
struct Root {
    node: Node,
    default: u32,
}

/// Root index tag: node indices with this bit set name `roots[idx & !ROOT]`.
const ROOT: u32 = 1 << 31;

/// The node of an empty root: no children, no leaves (`base0` 1 so that the leaf index a lookup
/// computes, `base0 + 0 - 1`, is the reserved `NONE` leaf 0).
const EMPTY: Node = Node {
    vector: 0,
    leafvec: 0,
    base0: 1,
    base1: 0,
};

/// Number of set bits of `v` at positions `0..=pos`.
#[inline(always)]
fn rank(v: u64, pos: usize) -> usize {
    (v << (63 - pos)).count_ones() as usize
}

#[inline(always)]
fn stride<K: Key>(off: u8) -> u8 {
    (K::BITS - off).min(6)
}

/// Hint the CPU to load `p`'s cache line; never faults.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not dereference in the language sense and cannot fault,
    // whatever the address. SSE is part of the x86_64 baseline. Measured to matter for batched
    // lookups (see benches/demux.rs, subnetstack vs subnetstack_batch).
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// One LPM trie over keys of type `K`.
#[derive(Clone, Debug)]
pub(crate) struct Trie<K> {
    dp_bits: u8,
    /// Bits above the direct-pointing index that every key of this trie shares (see
    /// [`Anchored`]): the array indexes bits `skip..skip + dp_bits`.
    skip: u8,
    roots: Vec<Root>,
    nodes: Vec<Node>,
    /// Leaf runs; index 0 is a permanent `NONE` that empty roots point at.
    leaves: Vec<u32>,
    free_nodes: Vec<Vec<u32>>,
    free_leaves: Vec<Vec<u32>>,
    prefixes: usize,
    _k: std::marker::PhantomData<K>,
}

impl<K: Key> Trie<K> {
    pub(crate) fn new(dp_bits: u8) -> Self {
        Self::new_at(dp_bits, 0)
    }

    /// An empty trie whose direct-pointing array indexes bits `skip..skip + dp_bits`: only keys
    /// whose top `skip` bits are those of the trie's anchor may be inserted or looked up.
    pub(crate) fn new_at(dp_bits: u8, skip: u8) -> Self {
        assert!(dp_bits <= 16 && u32::from(skip) + u32::from(dp_bits) < u32::from(K::BITS));
        Trie {
            dp_bits,
            skip,
            roots: vec![
                Root {
                    node: EMPTY,
                    default: NONE
                };
                1 << dp_bits
            ],
            nodes: Vec::new(),
            leaves: vec![NONE],
            free_nodes: Vec::new(),
            free_leaves: Vec::new(),
            prefixes: 0,
            _k: std::marker::PhantomData,
        }
    }

    /// Bytes of heap the structure holds (capacity, including recycled blocks).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.roots.capacity() * std::mem::size_of::<Root>()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.leaves.capacity() * 4
            + self
                .free_nodes
                .iter()
                .chain(&self.free_leaves)
                .map(|v| v.capacity() * 4 + std::mem::size_of::<Vec<u32>>())
                .sum::<usize>()
    }

    #[inline(always)]
    fn slot(&self, key: K) -> usize {
        if self.dp_bits == 0 {
            0
        } else {
            key.bits(self.skip, self.dp_bits)
        }
    }

    /// Bit offset of the first level below the direct-pointing array.
    #[inline(always)]
    fn top(&self) -> u8 {
        self.skip + self.dp_bits
    }

    /// Bytes a lookup may touch (direct-pointing array, nodes, leaves): decides whether batching
    /// with prefetches pays off.
    pub(crate) fn footprint(&self) -> usize {
        self.roots.len() * std::mem::size_of::<Root>()
            + self.nodes.len() * std::mem::size_of::<Node>()
            + self.leaves.len() * 4
    }

    /// Longest match for `key`: a leaf (`NONE` if no prefix covers it).
    #[inline]
    pub(crate) fn lookup(&self, key: K) -> u32 {
        let r = &self.roots[self.slot(key)];
        let mut n = &r.node;
        let mut off = self.top();
        loop {
            let s = stride::<K>(off);
            let v = key.bits(off, s);
            if n.vector >> v & 1 != 0 {
                n = &self.nodes[n.base1 as usize + rank(n.vector, v) - 1];
                off += s;
                continue;
            }
            let l = self.leaves[n.base0 as usize + rank(n.leafvec, v) - 1];
            return if l == NONE { r.default } else { l };
        }
    }

    /// Prefetches the root for `key`: the first memory access of a walk.
    #[inline(always)]
    pub(crate) fn prefetch_root(&self, key: K) {
        prefetch(self.roots.as_ptr().wrapping_add(self.slot(key)));
    }

    /// One node of a walk at bit offset `off`: `(true, child index)` or `(false, leaf index)`;
    /// prefetches what the next step reads.
    #[inline(always)]
    fn visit(&self, n: &Node, key: K, off: u8) -> (bool, u32) {
        let v = key.bits(off, stride::<K>(off));
        let child = n.vector >> v & 1 != 0;
        let c = n
            .base1
            .wrapping_add(rank(n.vector, v) as u32)
            .wrapping_sub(1);
        let l = n
            .base0
            .wrapping_add(rank(n.leafvec, v) as u32)
            .wrapping_sub(1);
        if child {
            prefetch(self.nodes.as_ptr().wrapping_add(c as usize));
            (true, c)
        } else {
            prefetch(self.leaves.as_ptr().wrapping_add(l as usize));
            (false, l)
        }
    }

    /// First step of a batched walk: reads the root. Returns the default leaf that a `NONE` leaf
    /// below stands for, the bit offset of the next level and the step's outcome (see `visit`).
    #[inline(always)]
    pub(crate) fn step_root(&self, key: K) -> (u32, u8, bool, u32) {
        let r = &self.roots[self.slot(key)];
        let top = self.top();
        let (child, i) = self.visit(&r.node, key, top);
        (r.default, top + stride::<K>(top), child, i)
    }

    /// A later step of a batched walk: reads node `idx` at bit offset `off`.
    #[inline(always)]
    pub(crate) fn step_node(&self, key: K, idx: u32, off: u8) -> (bool, u32) {
        self.visit(&self.nodes[idx as usize], key, off)
    }

    /// Bit offset of the level below one at `off`.
    #[inline(always)]
    pub(crate) fn next_off(off: u8) -> u8 {
        off + stride::<K>(off)
    }

    /// Reads the leaf a batched walk ended on.
    #[inline(always)]
    pub(crate) fn step_leaf(&self, at: u32) -> u32 {
        self.leaves[at as usize]
    }

    /// Batched walk (see [`Lpm::walk_chunk`]), one trie level at a time (group prefetching):
    /// every visit computes and prefetches what the query reads next, then moves on to the next
    /// query, so a chunk's cache misses of one level are all in flight together.
    pub(crate) fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[K], out: &mut [u32]) {
        Self::walk_with(
            |i| (tid[i] != NIL).then(|| &tries[tid[i] as usize]),
            keys,
            out,
        );
    }

    /// Batched walk of up to `CHUNK` queries: query `i` looks `keys[i]` up in `pick(i)` (none:
    /// `NONE`).
    #[inline(always)]
    pub(crate) fn walk_with<'a>(
        pick: impl Fn(usize) -> Option<&'a Self>,
        keys: &[K],
        out: &mut [u32],
    ) where
        K: 'a,
    {
        let n = keys.len().min(out.len());
        debug_assert!(n <= CHUNK);
        let mut trie: [Option<&Self>; CHUNK] = [None; CHUNK];
        let mut default = [NONE; CHUNK];
        let mut at = [0u32; CHUNK];
        let mut off = [0u8; CHUNK];
        // Queries still walking nodes, and those whose walk ended on a leaf (compacted without
        // branches: every entry is written, the count advances by the outcome).
        let mut walking = [0u8; CHUNK];
        let mut leaf = [0u8; CHUNK];
        let (mut nw, mut nl) = (0, 0);
        for i in 0..n {
            out[i] = NONE;
            trie[i] = pick(i);
            if let Some(t) = trie[i] {
                t.prefetch_root(keys[i]);
                walking[nw] = i as u8;
                nw += 1;
            }
        }
        let mut next = 0;
        for j in 0..nw {
            let i = usize::from(walking[j]);
            let (d, o, child, x) = trie[i].expect("walking").step_root(keys[i]);
            default[i] = d;
            off[i] = o;
            at[i] = x;
            walking[next] = i as u8;
            leaf[nl] = i as u8;
            next += usize::from(child);
            nl += usize::from(!child);
        }
        nw = next;
        while nw > 0 {
            next = 0;
            for j in 0..nw {
                let i = usize::from(walking[j]);
                let (child, x) = trie[i].expect("walking").step_node(keys[i], at[i], off[i]);
                at[i] = x;
                off[i] = Self::next_off(off[i]);
                walking[next] = i as u8;
                leaf[nl] = i as u8;
                next += usize::from(child);
                nl += usize::from(!child);
            }
            nw = next;
        }
        for &i in &leaf[..nl] {
            let i = usize::from(i);
            let l = trie[i].expect("walking").step_leaf(at[i]);
            out[i] = if l == NONE { default[i] } else { l };
        }
    }

    // ---- updates -------------------------------------------------------------------------

    /// A node by index: `ROOT`-tagged indices name roots.
    #[inline]
    fn node(&self, idx: u32) -> &Node {
        if idx & ROOT != 0 {
            &self.roots[(idx & !ROOT) as usize].node
        } else {
            &self.nodes[idx as usize]
        }
    }

    #[inline]
    fn node_mut(&mut self, idx: u32) -> &mut Node {
        if idx & ROOT != 0 {
            &mut self.roots[(idx & !ROOT) as usize].node
        } else {
            &mut self.nodes[idx as usize]
        }
    }

    fn free_block(lists: &mut Vec<Vec<u32>>, size: usize, at: u32) {
        if lists.is_empty() {
            lists.resize(65, Vec::new());
        }
        lists[size].push(at);
    }

    fn alloc_nodes(&mut self, n: usize) -> u32 {
        if let Some(i) = self.free_nodes.get_mut(n).and_then(Vec::pop) {
            return i;
        }
        let i = self.nodes.len();
        self.nodes.resize(i + n, Node::default());
        i as u32
    }

    fn alloc_leaves(&mut self, n: usize) -> u32 {
        if let Some(i) = self.free_leaves.get_mut(n).and_then(Vec::pop) {
            return i;
        }
        let i = self.leaves.len();
        self.leaves.resize(i + n, NONE);
        i as u32
    }

    /// The leaf values of every position of a node (`NONE` where a child sits).
    fn unpack(&self, idx: u32, s: u8) -> [u32; 64] {
        let n = *self.node(idx);
        let mut out = [NONE; 64];
        if n.leafvec == 0 {
            return out;
        }
        let mut li = n.base0 as usize;
        let mut first = true;
        for (p, slot) in out.iter_mut().enumerate().take(1 << s) {
            if n.vector >> p & 1 != 0 {
                continue;
            }
            if n.leafvec >> p & 1 != 0 {
                if !first {
                    li += 1;
                }
                first = false;
            }
            *slot = self.leaves[li];
        }
        out
    }

    /// Re-encodes a node's leaves from `vals`, moving its leaf block if the run count changed.
    fn pack(&mut self, idx: u32, s: u8, vals: &[u32; 64]) {
        let n = *self.node(idx);
        let mut leafvec = 0u64;
        let mut runs = [NONE; 64];
        let mut count = 0;
        let mut prev = None;
        for (p, &v) in vals.iter().enumerate().take(1 << s) {
            if n.vector >> p & 1 != 0 {
                continue;
            }
            if prev != Some(v) {
                leafvec |= 1 << p;
                runs[count] = v;
                count += 1;
                prev = Some(v);
            }
        }
        // A root that holds nothing keeps no leaf block: it reads as its default.
        let empty_root = idx & ROOT != 0 && n.vector == 0 && count == 1 && runs[0] == NONE;
        if empty_root {
            leafvec = 0;
            count = 0;
        }
        let old = n.leafvec.count_ones() as usize;
        let base0 = if old == count {
            n.base0
        } else {
            if old > 0 {
                Self::free_block(&mut self.free_leaves, old, n.base0);
            }
            if count > 0 {
                self.alloc_leaves(count)
            } else {
                0
            }
        };
        let base0 = if empty_root { EMPTY.base0 } else { base0 };
        self.leaves[base0 as usize..base0 as usize + count].copy_from_slice(&runs[..count]);
        let node = self.node_mut(idx);
        node.leafvec = leafvec;
        node.base0 = base0;
    }

    /// A new node whose every position holds `fill`.
    fn new_leaf_node(&mut self, fill: u32) -> Node {
        let b = self.alloc_leaves(1);
        self.leaves[b as usize] = fill;
        Node {
            vector: 0,
            leafvec: 1,
            base0: b,
            base1: 0,
        }
    }

    /// Turns leaf position `p` of node `idx` into a child whose positions all hold `fill`.
    fn add_child(&mut self, idx: u32, s: u8, p: usize, fill: u32) -> u32 {
        let vals = self.unpack(idx, s);
        let n = *self.node(idx);
        let old = n.vector.count_ones() as usize;
        let child = self.new_leaf_node(fill);
        let at = rank(n.vector, p); // children before position p
        let base1 = self.alloc_nodes(old + 1);
        for i in 0..old {
            let c = self.nodes[n.base1 as usize + i];
            self.nodes[base1 as usize + i + usize::from(i >= at)] = c;
        }
        self.nodes[base1 as usize + at] = child;
        if old > 0 {
            Self::free_block(&mut self.free_nodes, old, n.base1);
        }
        let node = self.node_mut(idx);
        node.vector |= 1 << p;
        node.base1 = base1;
        self.pack(idx, s, &vals);
        base1 + at as u32
    }

    /// If child at position `p` of `idx` holds one value everywhere and has no children, folds it back
    /// into a leaf of `idx`.
    fn try_collapse(&mut self, idx: u32, s: u8, p: usize) {
        let n = *self.node(idx);
        let at = rank(n.vector, p) - 1;
        let c = self.nodes[n.base1 as usize + at];
        if c.vector != 0 || c.leafvec.count_ones() != 1 {
            return;
        }
        let fill = self.leaves[c.base0 as usize];
        Self::free_block(&mut self.free_leaves, 1, c.base0);
        let mut vals = self.unpack(idx, s);
        vals[p] = fill;
        let old = n.vector.count_ones() as usize;
        let base1 = if old == 1 {
            0
        } else {
            let b = self.alloc_nodes(old - 1);
            for i in 0..old {
                if i != at {
                    let c = self.nodes[n.base1 as usize + i];
                    self.nodes[b as usize + i - usize::from(i > at)] = c;
                }
            }
            b
        };
        Self::free_block(&mut self.free_nodes, old, n.base1);
        let node = self.node_mut(idx);
        node.vector &= !(1 << p);
        node.base1 = base1;
        self.pack(idx, s, &vals);
    }

    /// Applies `f` to every leaf of the subtree under node `idx`, children included.
    fn rewrite_subtree(&mut self, idx: u32, off: u8, f: &impl Fn(u32) -> u32) {
        let s = stride::<K>(off);
        let mut vals = self.unpack(idx, s);
        let n = *self.node(idx);
        for (p, v) in vals.iter_mut().enumerate().take(1 << s) {
            if n.vector >> p & 1 == 0 {
                *v = f(*v);
            }
        }
        self.pack(idx, s, &vals);
        for i in 0..n.vector.count_ones() {
            let n = *self.node(idx);
            self.rewrite_subtree(n.base1 + i, off + s, f);
        }
    }

    /// Applies `f` to the leaves covered by the prefix (`key` masked to `len`, `len > dp_bits`),
    /// creating the path down to its level. Returns the path for later collapsing.
    fn rewrite_prefix(&mut self, key: K, len: u8, f: impl Fn(u32) -> u32) -> Vec<(u32, u8, usize)> {
        let mut idx = ROOT | self.slot(key) as u32;
        let mut off = self.top();
        let mut path = Vec::new();
        loop {
            let s = stride::<K>(off);
            let p = key.bits(off, s);
            if len <= off + s {
                let span = 1usize << (off + s - len);
                let mut vals = self.unpack(idx, s);
                let n = *self.node(idx);
                for (q, v) in vals.iter_mut().enumerate().skip(p).take(span) {
                    if n.vector >> q & 1 == 0 {
                        *v = f(*v);
                    }
                }
                self.pack(idx, s, &vals);
                for q in p..p + span {
                    let n = *self.node(idx);
                    if n.vector >> q & 1 != 0 {
                        let c = n.base1 + rank(n.vector, q) as u32 - 1;
                        self.rewrite_subtree(c, off + s, &f);
                    }
                }
                path.push((idx, s, usize::MAX));
                return path;
            }
            let n = *self.node(idx);
            path.push((idx, s, p));
            idx = if n.vector >> p & 1 != 0 {
                n.base1 + rank(n.vector, p) as u32 - 1
            } else {
                let fill = self.unpack(idx, s)[p];
                self.add_child(idx, s, p, fill)
            };
            off += s;
        }
    }

    /// Range of direct-pointing slots covered by a prefix of length `len <= skip + dp_bits`
    /// (all of them when `len <= skip`: such a prefix covers the anchor).
    fn slots(&self, key: K, len: u8) -> std::ops::Range<usize> {
        if len <= self.skip {
            return 0..1 << self.dp_bits;
        }
        let first = self.slot(key);
        first..first + (1usize << (self.top() - len))
    }

    /// Builds a compact trie from `(key, len, leaf)` entries in one pass: every block is allocated
    /// once, at its exact size, with no garbage (used for whole-table replacement and resizes).
    pub(crate) fn build(dp_bits: u8, entries: &mut [(K, u8, u32)]) -> Self {
        Self::build_at(dp_bits, 0, entries)
    }

    /// [`build`](Self::build) for a trie indexing bits `skip..skip + dp_bits` (see
    /// [`new_at`](Self::new_at)).
    pub(crate) fn build_at(dp_bits: u8, skip: u8, entries: &mut [(K, u8, u32)]) -> Self {
        let mut t = Trie::new_at(dp_bits, skip);
        let top = t.top();
        t.prefixes = entries.len();
        // Short prefixes fill direct-pointing defaults, shortest first so longer ones overwrite.
        let mut short: Vec<(K, u8, u32)> = entries.iter().copied().filter(|e| e.1 <= top).collect();
        short.sort_by_key(|e| e.1);
        for (k, len, l) in short {
            for i in t.slots(k, len) {
                t.roots[i].default = l;
            }
        }
        entries.sort_unstable_by_key(|e| (e.0, e.1));
        let mut rest = &entries[..];
        while let Some(first) = rest.iter().position(|e| e.1 > top) {
            rest = &rest[first..];
            let slot = t.slot(rest[0].0);
            let end = rest
                .iter()
                .position(|e| t.slot(e.0) != slot)
                .unwrap_or(rest.len());
            t.build_node(ROOT | slot as u32, &rest[..end], top, NONE);
            rest = &rest[end..];
        }
        t.nodes.shrink_to_fit();
        t.leaves.shrink_to_fit();
        t
    }

    /// Fills node `idx` (already allocated) at bit offset `off` from `entries` (sorted by key, all
    /// inside this node's range and longer than `off`), whose uncovered positions hold `inherited`.
    fn build_node(&mut self, idx: u32, entries: &[(K, u8, u32)], off: u8, inherited: u32) {
        let s = stride::<K>(off);
        let mut vals = [inherited; 64];
        let mut here: Vec<&(K, u8, u32)> = entries.iter().filter(|e| e.1 <= off + s).collect();
        here.sort_by_key(|e| e.1);
        for &&(k, len, l) in &here {
            let p = k.bits(off, s);
            for v in &mut vals[p..p + (1usize << (off + s - len))] {
                *v = l;
            }
        }
        let mut vector = 0u64;
        for e in entries.iter().filter(|e| e.1 > off + s) {
            vector |= 1 << e.0.bits(off, s);
        }
        self.node_mut(idx).vector = vector;
        self.pack(idx, s, &vals);
        let children = vector.count_ones() as usize;
        if children == 0 {
            return;
        }
        let base1 = self.alloc_nodes(children);
        self.node_mut(idx).base1 = base1;
        let mut i = 0;
        let mut rest = entries;
        while !rest.is_empty() {
            let p = rest[0].0.bits(off, s);
            let end = rest
                .iter()
                .position(|e| e.0.bits(off, s) != p)
                .unwrap_or(rest.len());
            if vector >> p & 1 != 0 {
                let deeper: Vec<(K, u8, u32)> = rest[..end]
                    .iter()
                    .copied()
                    .filter(|e| e.1 > off + s)
                    .collect();
                self.build_node(base1 + i, &deeper, off + s, vals[p]);
                i += 1;
            }
            rest = &rest[end..];
        }
    }

    /// Adds a prefix (`key` with host bits clear) whose leaf is `l`.
    pub(crate) fn insert(&mut self, key: K, len: u8, l: u32) {
        debug_assert!(len <= K::BITS && depth(l) == i32::from(len));
        self.prefixes += 1;
        let better = move |cur: u32| if depth(cur) < i32::from(len) { l } else { cur };
        if len <= self.top() {
            for i in self.slots(key, len) {
                self.roots[i].default = better(self.roots[i].default);
            }
            return;
        }
        self.rewrite_prefix(key, len, better);
    }

    /// Removes the prefix inserted with leaf `l`; `parent` is the leaf of the longest remaining
    /// prefix strictly covering it (`NONE` if none).
    pub(crate) fn remove(&mut self, key: K, len: u8, l: u32, parent: u32) {
        self.prefixes -= 1;
        if len <= self.top() {
            for i in self.slots(key, len) {
                if self.roots[i].default == l {
                    self.roots[i].default = parent;
                }
            }
            return;
        }
        // Inside subtrees, prefixes no longer than dp_bits live in the direct-pointing default.
        let inner = if depth(parent) > i32::from(self.top()) {
            parent
        } else {
            NONE
        };
        let path = self.rewrite_prefix(key, len, |cur| if cur == l { inner } else { cur });
        // Fold nodes that became uniform, bottom-up along the path.
        for w in path.windows(2).rev() {
            let (parent_idx, s, p) = w[0];
            self.try_collapse(parent_idx, s, p);
        }
    }
}

impl<K: Key> Lpm<K> for Trie<K> {
    fn new(dp_bits: u8) -> Self {
        Trie::new(dp_bits)
    }
    fn placeholder() -> Self {
        Trie::new(0)
    }
    fn build(dp_bits: u8, entries: &mut [(K, u8, u32)]) -> Self {
        Trie::build(dp_bits, entries)
    }
    fn len(&self) -> usize {
        self.prefixes
    }
    fn insert(&mut self, key: K, len: u8, l: u32) {
        Trie::insert(self, key, len, l)
    }
    fn remove(&mut self, key: K, len: u8, l: u32, parent: u32) {
        Trie::remove(self, key, len, l, parent)
    }
    #[inline]
    fn lookup(&self, key: K) -> u32 {
        Trie::lookup(self, key)
    }
    fn footprint(&self) -> usize {
        Trie::footprint(self)
    }
    fn heap_bytes(&self) -> usize {
        Trie::heap_bytes(self)
    }
    fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[K], out: &mut [u32]) {
        Trie::walk_chunk(tries, tid, keys, out)
    }
}

/// Smallest number of prefixes for which a trie looks for an anchor.
const ANCHOR_MIN: usize = 1024;
/// Share of prefixes (in tenths) that must lie under the anchor.
const ANCHOR_SHARE: usize = 9;
/// Shortest anchor worth its check: a shorter one saves no trie level.
const ANCHOR_MIN_BITS: u8 = 8;
/// Longest anchor considered.
const ANCHOR_MAX_BITS: u8 = 64;

/// A poptrie whose direct-pointing array starts below a long prefix most keys share (path
/// compression of the top of the trie).
///
/// Clustered IPv6 tables (sites under a few `/32`s of one `/25`, say) put every prefix into one
/// slot of a 16-bit array indexed from bit 0, and their walks then spend five or six levels on
/// bits they all share. When the table is built (and rebuilt at resizes), the longest prefix
/// (the *anchor*, `skip` bits, at least 8) under which 90 % of the prefixes lie is found; the
/// `inside` trie's array indexes bits `skip..skip + dp_bits` and holds those prefixes, plus, as
/// defaults of every slot, the prefixes that cover the anchor. Everything else (prefixes outside
/// the anchor, and again those that cover it) lives in the ordinary `outside` trie. A lookup
/// compares the key's top `skip` bits with the anchor and walks one of the two. Inserts and
/// removals are routed the same way, so the anchor stays fixed until the next rebuild.
///
/// When the anchor leaves room for it (always, for IPv6), the inside is not a trie but a
/// [`Window`]: a direct table and range blocks over the bits below the anchor (two dependent
/// memory accesses instead of a walk of four to six levels), with the prefixes longer than the
/// window in hash maps behind a filter.
#[derive(Clone, Debug)]
pub(crate) struct Anchored<K> {
    skip: u8,
    anchor: K,
    inside: Trie<K>,
    /// When built with an anchor: the inside as a direct table and range blocks over the bits
    /// below the anchor (see [`Window`]); `inside` is then empty and unused.
    pub(crate) window: Option<Window<K>>,
    outside: Trie<K>,
    prefixes: usize,
}

impl<K: Key> Anchored<K> {
    /// Which tries hold a prefix: `(inside, outside)`.
    #[inline]
    fn route(&self, key: K, len: u8) -> (bool, bool) {
        if self.skip == 0 {
            (true, false)
        } else if len <= self.skip {
            (key.same_top(self.anchor, len), true)
        } else {
            let inside = key.same_top(self.anchor, self.skip);
            (inside, !inside)
        }
    }

    /// The trie a key is looked up in (`None`: the window).
    #[inline(always)]
    fn trie(&self, key: K) -> Option<&Trie<K>> {
        if !key.same_top(self.anchor, self.skip) {
            Some(&self.outside)
        } else if self.window.is_some() {
            None
        } else {
            Some(&self.inside)
        }
    }

    /// The window that answers for `key`, if any.
    #[inline(always)]
    fn window_for(&self, key: K) -> Option<&Window<K>> {
        self.window
            .as_ref()
            .filter(|_| key.same_top(self.anchor, self.skip))
    }

    /// The anchor of a set of prefixes: `(skip, anchor)`, `skip` 0 for none.
    fn choose_anchor(dp_bits: u8, entries: &[(K, u8, u32)]) -> (u8, K) {
        let n = entries.len();
        if n < ANCHOR_MIN {
            return (0, K::default());
        }
        let mut keys: Vec<K> = entries.iter().map(|e| e.0).collect();
        let (_, &mut median, _) = keys.select_nth_unstable(n / 2);
        let max = ANCHOR_MAX_BITS.min(K::BITS - dp_bits - 1);
        // hist[v]: prefixes that fit under an anchor of up to v bits (longer than it, inside it).
        let mut hist = vec![0usize; usize::from(max) + 1];
        for &(k, len, _) in entries {
            if len > 0 {
                let v = (len - 1).min(k.common_len(median)).min(max);
                hist[usize::from(v)] += 1;
            }
        }
        let mut fit = 0;
        for skip in (ANCHOR_MIN_BITS..=max).rev() {
            fit += hist[usize::from(skip)];
            if fit * 10 >= n * ANCHOR_SHARE {
                let mask_len = u32::from(K::BITS - skip);
                return (skip, median.masked_top(mask_len));
            }
        }
        (0, K::default())
    }
}

impl<K: Key> Lpm<K> for Anchored<K> {
    fn new(dp_bits: u8) -> Self {
        Anchored {
            skip: 0,
            anchor: K::default(),
            inside: Trie::new(dp_bits),
            window: None,
            outside: Trie::new(0),
            prefixes: 0,
        }
    }
    fn placeholder() -> Self {
        Self::new(0)
    }
    fn build(dp_bits: u8, entries: &mut [(K, u8, u32)]) -> Self {
        let (skip, anchor) = Self::choose_anchor(dp_bits, entries);
        let mut t = Anchored {
            skip,
            anchor,
            inside: Trie::new(0),
            window: None,
            outside: Trie::new(0),
            prefixes: entries.len(),
        };
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for &e in entries.iter() {
            let (i, o) = t.route(e.0, e.1);
            if i {
                ins.push(e);
            }
            if o {
                outs.push(e);
            }
        }
        t.window = if skip > 0 {
            Window::build(skip, &ins)
        } else {
            None
        };
        if t.window.is_none() {
            t.inside = Trie::build_at(dp_bits, skip, &mut ins);
        }
        let out_dp = match outs.len() {
            0 => 0,
            n if n >= 16384 => 16,
            n if n >= 1024 => 14,
            _ => 8,
        };
        t.outside = Trie::build(out_dp, &mut outs);
        t
    }
    fn len(&self) -> usize {
        self.prefixes
    }
    fn insert(&mut self, key: K, len: u8, l: u32) {
        self.prefixes += 1;
        let (i, o) = self.route(key, len);
        if i {
            match &mut self.window {
                Some(w) => w.insert(key, len, l),
                None => self.inside.insert(key, len, l),
            }
        }
        if o {
            self.outside.insert(key, len, l);
        }
    }
    fn remove(&mut self, key: K, len: u8, l: u32, parent: u32) {
        self.prefixes -= 1;
        let (i, o) = self.route(key, len);
        if i {
            match &mut self.window {
                Some(w) => w.remove(key, len, l, parent),
                None => self.inside.remove(key, len, l, parent),
            }
        }
        if o {
            self.outside.remove(key, len, l, parent);
        }
    }
    #[inline]
    fn lookup(&self, key: K) -> u32 {
        match self.trie(key) {
            Some(t) => t.lookup(key),
            None => self.window.as_ref().map_or(NONE, |w| w.lookup(key)),
        }
    }
    fn footprint(&self) -> usize {
        self.inside.footprint()
            + self.outside.footprint()
            + self.window.as_ref().map_or(0, Window::footprint)
    }
    fn heap_bytes(&self) -> usize {
        self.inside.heap_bytes()
            + self.outside.heap_bytes()
            + self.window.as_ref().map_or(0, Window::heap_bytes)
    }
    /// Tries first (every query whose answer is in a trie), then windows (their batched
    /// direct-table walk), then each window query's finish (cover, long prefixes).
    fn walk_chunk(tries: &[Self], tid: &[u32], keys: &[K], out: &mut [u32]) {
        let n = keys.len().min(out.len()).min(tid.len());
        let mut win: [Option<&Window<K>>; CHUNK] = [None; CHUNK];
        let mut wkey = [0u64; CHUNK];
        let mut in_tries = false;
        for i in 0..n {
            if tid[i] != NIL {
                let a = &tries[tid[i] as usize];
                win[i] = a.window_for(keys[i]);
                match win[i] {
                    Some(w) => wkey[i] = w.walk_key(keys[i]).1,
                    None => in_tries = true,
                }
            }
        }
        if in_tries {
            Trie::walk_with(
                |i| match win[i] {
                    None if tid[i] != NIL => tries[tid[i] as usize].trie(keys[i]),
                    _ => None,
                },
                &keys[..n],
                &mut out[..n],
            );
        } else {
            out[..n].fill(NONE);
        }
        let mut wout = [NONE; CHUNK];
        Dxr::walk_keys(
            |i| win[i].map(|w| (w.walk_key(keys[i]).0, wkey[i])),
            &mut wout[..n],
        );
        for i in 0..n {
            if let Some(w) = win[i] {
                out[i] = w.finish(keys[i], wkey[i], wout[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{mask, naive};

    #[test]
    fn insert_remove_matches_naive_and_frees_everything() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for dp in [0u8, 8, 16] {
            let mut t = Trie::<u32>::new(dp);
            let mut set: Vec<(u32, u8, u32)> = Vec::new();
            for g in 0..600u32 {
                let len = (rnd() % 33) as u8;
                // Cluster keys so that prefixes nest.
                let k = mask(0xC612_0000 | (rnd() as u32 & 0x0003_ffff), len.max(14));
                let k = mask(k, len);
                if set.iter().any(|&(k2, l2, _)| k2 == k && l2 == len) {
                    continue;
                }
                let l = leaf(g, len);
                t.insert(k, len, l);
                set.push((k, len, l));
            }
            let built = Trie::<u32>::build(dp, &mut set.clone());
            assert!(built.heap_bytes() < t.heap_bytes());
            for _ in 0..3000 {
                let key = 0xC612_0000 | (rnd() as u32 & 0x0003_ffff);
                assert_eq!(t.lookup(key), naive(&set, key), "dp {dp} key {key:x}");
                assert_eq!(
                    built.lookup(key),
                    naive(&set, key),
                    "built, dp {dp} key {key:x}"
                );
            }
            while let Some(i) = (!set.is_empty()).then(|| rnd() as usize % set.len()) {
                let (k, len, l) = set.swap_remove(i);
                let parent = naive(
                    &set.iter()
                        .copied()
                        .filter(|&(_, l2, _)| l2 < len)
                        .collect::<Vec<_>>(),
                    k,
                );
                t.remove(k, len, l, parent);
                for _ in 0..20 {
                    let key = 0xC612_0000 | (rnd() as u32 & 0x0003_ffff);
                    assert_eq!(t.lookup(key), naive(&set, key));
                }
            }
            assert!(t.roots.iter().all(|r| r.node.vector == 0
                && r.node.leafvec == 0
                && r.node.base0 == EMPTY.base0
                && r.default == NONE));
            assert_eq!(Lpm::len(&t), 0);
        }
    }

    fn check6(t: &Anchored<u128>, set: &[(u128, u8, u32)], probes: &[u128]) {
        let mut out = vec![0u32; probes.len()];
        for (c, o) in probes.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
            Anchored::walk_chunk(std::slice::from_ref(t), &[0; CHUNK][..c.len()], c, o);
        }
        for (i, &key) in probes.iter().enumerate() {
            let want = naive(set, key);
            assert_eq!(t.lookup(key), want, "skip {} key {key:#x}", t.skip);
            assert_eq!(out[i], want, "batched, skip {} key {key:#x}", t.skip);
        }
    }

    /// The anchored (path-compressed) trie: prefixes shorter than the anchor and covering it,
    /// exactly as long as it, longer than it inside it, and outside it; built, then updated in
    /// place, then rebuilt once the cluster is gone (the anchor is dropped).
    #[test]
    fn anchored_trie_matches_naive_across_the_anchor() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let site: u128 = 0x2001_0db8 << 96;
        let r128 = |r: &mut dyn FnMut() -> u64| u128::from(r()) << 64 | u128::from(r());
        let mut set: Vec<(u128, u8, u32)> = Vec::new();
        let mut g = 0u32;
        let mut add = |set: &mut Vec<(u128, u8, u32)>, k: u128, len: u8| {
            let k = mask(k, len);
            if !set.iter().any(|&(k2, l2, _)| k2 == k && l2 == len) {
                set.push((k, len, leaf(g, len)));
                g += 1;
            }
        };
        for _ in 0..3000 {
            // Inside the /32: mostly /33../64, some /128, clustered so that they nest.
            let len = match rnd() % 10 {
                0 => 128,
                1 => 33,
                _ => 33 + (rnd() % 32) as u8,
            };
            let k = site | (r128(&mut rnd) >> 32) & (u128::MAX >> 100 | 0xffff << 80);
            add(&mut set, k, len);
        }
        for _ in 0..150 {
            let len = 16 + (rnd() % 49) as u8;
            add(&mut set, r128(&mut rnd), len);
        }
        // Covering the anchor, exactly the anchor, and one just outside it.
        for (k, len) in [
            (0, 0),
            (site, 16),
            (site, 29),
            (site, 32),
            (site ^ 1 << 96, 32),
        ] {
            add(&mut set, k, len);
        }
        let inside_probe =
            |r: &mut dyn FnMut() -> u64| site | (r128(r) >> 32) & (u128::MAX >> 100 | 0xffff << 80);
        let mut probes: Vec<u128> = (0..3000).map(|_| inside_probe(&mut rnd)).collect();
        probes.extend((0..500).map(|_| r128(&mut rnd)));
        probes.extend(set.iter().map(|e| e.0));
        probes.extend(set.iter().map(|e| e.0.wrapping_sub(1)));

        let t = Anchored::build(16, &mut set.clone());
        assert_eq!(t.skip, 32, "the cluster's /32 is the anchor");
        check6(&t, &set, &probes);

        // Incremental: remove and re-add across every class, including the covering prefixes.
        let mut t = t;
        let mut removed = Vec::new();
        for i in (0..set.len()).rev().step_by(3) {
            let (k, len, l) = set.swap_remove(i);
            let parent = naive(
                &set.iter()
                    .copied()
                    .filter(|e| e.1 < len)
                    .collect::<Vec<_>>(),
                k,
            );
            t.remove(k, len, l, parent);
            removed.push((k, len, l));
        }
        check6(&t, &set, &probes);
        for &(k, len, l) in &removed[..removed.len() / 2] {
            t.insert(k, len, l);
            set.push((k, len, l));
        }
        check6(&t, &set, &probes);

        // The cluster goes away: a rebuild finds no anchor and the lookups stay right.
        let rest: Vec<(u128, u8, u32)> = set
            .iter()
            .copied()
            .filter(|e| !e.0.same_top(site, 32) || e.1 < 32)
            .collect();
        let mut many = rest.clone();
        for i in 0..2000u32 {
            let len = 20 + (rnd() % 40) as u8;
            let k = mask(r128(&mut rnd), len);
            if !many.iter().any(|&(k2, l2, _)| k2 == k && l2 == len) {
                many.push((k, len, leaf(100_000 + i, len)));
            }
        }
        let t = Anchored::build(16, &mut many.clone());
        assert_eq!(t.skip, 0);
        check6(&t, &many, &probes);
        let t = Anchored::build(8, &mut rest.clone());
        check6(&t, &rest, &probes);
    }
}
