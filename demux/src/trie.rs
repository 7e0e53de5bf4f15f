//! The data-path longest-prefix-match structure: a poptrie-style multibit trie.
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

/// Leaf meaning "nothing matched at this level".
pub(crate) const NONE: u32 = 0;

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
pub(crate) trait Key: Copy + Ord + Send + Sync + 'static {
    const BITS: u8;
    /// `n` (1..=16) bits starting `off` bits from the most significant end.
    fn bits(self, off: u8, n: u8) -> usize;
}

impl Key for u32 {
    const BITS: u8 = 32;
    #[inline(always)]
    fn bits(self, off: u8, n: u8) -> usize {
        ((self << off) >> (32 - n)) as usize
    }
}

impl Key for u128 {
    const BITS: u8 = 128;
    #[inline(always)]
    fn bits(self, off: u8, n: u8) -> usize {
        ((self << off) >> (128 - n)) as usize
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
        assert!(dp_bits <= 16 && dp_bits < K::BITS);
        Trie {
            dp_bits,
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

    /// Number of prefixes inserted.
    pub(crate) fn len(&self) -> usize {
        self.prefixes
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
            key.bits(0, self.dp_bits)
        }
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
        let mut off = self.dp_bits;
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
        let (child, i) = self.visit(&r.node, key, self.dp_bits);
        (
            r.default,
            self.dp_bits + stride::<K>(self.dp_bits),
            child,
            i,
        )
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
        let mut off = self.dp_bits;
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

    /// Range of direct-pointing slots covered by a prefix of length `len <= dp_bits`.
    fn slots(&self, key: K, len: u8) -> std::ops::Range<usize> {
        let first = self.slot(key);
        first..first + (1usize << (self.dp_bits - len))
    }

    /// Builds a compact trie from `(key, len, leaf)` entries in one pass: every block is allocated
    /// once, at its exact size, with no garbage (used for whole-table replacement and resizes).
    pub(crate) fn build(dp_bits: u8, entries: &mut [(K, u8, u32)]) -> Self {
        let mut t = Trie::new(dp_bits);
        t.prefixes = entries.len();
        // Short prefixes fill direct-pointing defaults, shortest first so longer ones overwrite.
        let mut short: Vec<(K, u8, u32)> =
            entries.iter().copied().filter(|e| e.1 <= dp_bits).collect();
        short.sort_by_key(|e| e.1);
        for (k, len, l) in short {
            for i in t.slots(k, len) {
                t.roots[i].default = l;
            }
        }
        entries.sort_unstable_by_key(|e| (e.0, e.1));
        let mut rest = &entries[..];
        while let Some(first) = rest.iter().position(|e| e.1 > dp_bits) {
            rest = &rest[first..];
            let slot = t.slot(rest[0].0);
            let end = rest
                .iter()
                .position(|e| t.slot(e.0) != slot)
                .unwrap_or(rest.len());
            t.build_node(ROOT | slot as u32, &rest[..end], dp_bits, NONE);
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
        if len <= self.dp_bits {
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
        if len <= self.dp_bits {
            for i in self.slots(key, len) {
                if self.roots[i].default == l {
                    self.roots[i].default = parent;
                }
            }
            return;
        }
        // Inside subtrees, prefixes no longer than dp_bits live in the direct-pointing default.
        let inner = if depth(parent) > i32::from(self.dp_bits) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(prefixes: &[(u32, u8, u32)], key: u32) -> u32 {
        prefixes
            .iter()
            .filter(|&&(k, len, _)| len == 0 || (key ^ k) >> (32 - len) == 0)
            .max_by_key(|&&(_, len, _)| len)
            .map_or(NONE, |&(_, _, l)| l)
    }

    fn mask(k: u32, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            k & (u32::MAX << (32 - len))
        }
    }

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
            assert_eq!(t.len(), 0);
        }
    }
}
