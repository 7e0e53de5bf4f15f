//! The published, read-only side of the table: per protocol and family, a port index over LPM
//! tries, and the reuseport groups their leaves point to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::hash::{rendezvous, HashKey};
use crate::trie::leaf_len;
use crate::trie::{depth, leaf_group, Key, Lpm, CHUNK, NIL, NONE};
use crate::types::{BindingId, Flow, ListenerId, PortSpec, Protocol};

/// One listener in a reuseport group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    /// The binding that made this member.
    pub binding: BindingId,
    /// Where its flows go.
    pub listener: ListenerId,
}

/// The bindings that share one `(protocol, prefix, ports)` (a reuseport set, or a set of one), as a
/// lookup found them.
///
/// A handle: finding a group reads only the LPM structure; the group record is read when
/// [`ports`](Self::ports), [`members`](Self::members) or [`pick`](Self::pick) is called.
#[derive(Clone, Copy)]
pub struct Group<'a> {
    dst: IpAddr,
    len: u8,
    ports: PortSpec,
    rec: &'a Member,
    pool: &'a [Member],
}

impl PartialEq for Group<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.prefix() == other.prefix()
            && self.ports() == other.ports()
            && self.members() == other.members()
    }
}

impl Eq for Group<'_> {}

impl std::fmt::Debug for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("prefix", &self.prefix())
            .field("ports", &self.ports())
            .field("members", &self.members())
            .finish()
    }
}

impl<'a> Group<'a> {
    /// The bound prefix that matched.
    pub fn prefix(&self) -> IpNet {
        IpNet::new(self.dst, self.len)
            .expect("leaf lengths fit the family")
            .trunc()
    }
    /// The bound ports that matched.
    pub fn ports(&self) -> PortSpec {
        self.ports
    }
    /// Members in bind order (never empty).
    #[inline]
    pub fn members(&self) -> &'a [Member] {
        let r = self.rec;
        if r.binding != POOLED {
            std::slice::from_ref(r)
        } else {
            let (start, len) = (
                (r.listener.0 >> 16) as usize,
                (r.listener.0 & 0xffff) as usize,
            );
            &self.pool[start..start + len]
        }
    }
    /// The member a flow with this keyed hash goes to (see [`HashKey::flow_hash`]).
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> &'a Member {
        let members = self.members();
        if members.len() == 1 {
            return &members[0];
        }
        &members[rendezvous(flow_hash, members.iter().map(|m| m.listener))]
    }
}

/// The binding id of a group record that is not a member but says where the group's members sit
/// in the member pool (`listener` = `start << 16 | len`). Binding ids start at 1.
///
/// A group record is one [`Member`] (16 bytes): a set of one, the common case, is its own record
/// and costs one memory access. The group's ports are not stored: a lookup knows which port
/// selector's trie matched.
const POOLED: BindingId = BindingId(0);

/// The record of a pooled group.
fn pooled(start: u32, len: usize) -> Member {
    Member {
        binding: POOLED,
        listener: ListenerId(u64::from(start) << 16 | len as u64),
    }
}

/// Port index and tries of one (protocol, family).
#[derive(Clone, Debug)]
pub(crate) struct PortTries<K: Key> {
    /// Exact-port index, two levels so that a few bound ports cost 2 KiB rather than 256 KiB:
    /// empty, or 256 entries naming a block of `exact_lo` (NIL: no port of that block is bound).
    exact_hi: Vec<u32>,
    /// Blocks of 256 trie ids (NIL: none), one per high byte in use.
    exact_lo: Vec<[u32; 256]>,
    /// `(lo, hi, trie)`, narrowest first.
    ranges: Vec<(u16, u16, u32)>,
    any: u32,
    tries: Vec<K::Lpm>,
    free: Vec<u32>,
    /// Sum of the tries' footprints.
    footprint: usize,
}

/// Below this many bytes of tries, batched lookups run the scalar path: the data mostly sits in
/// cache and the lanes would only add work (measured on the 1k-100k benchmark tables).
const CACHE_RESIDENT: usize = 4 << 20;

impl<K: Key> Default for PortTries<K> {
    fn default() -> Self {
        PortTries {
            exact_hi: Vec::new(),
            exact_lo: Vec::new(),
            ranges: Vec::new(),
            any: NIL,
            tries: Vec::new(),
            free: Vec::new(),
            footprint: 0,
        }
    }
}

impl<K: Key> PortTries<K> {
    /// Trie of an exact port, NIL if none.
    #[inline(always)]
    fn exact(&self, port: u16) -> u32 {
        match self.exact_hi.get(usize::from(port >> 8)) {
            Some(&b) if b != NIL => self.exact_lo[b as usize][usize::from(port & 0xff)],
            _ => NIL,
        }
    }

    fn set_exact(&mut self, port: u16, id: u32) {
        if self.exact_hi.is_empty() {
            self.exact_hi = vec![NIL; 256];
        }
        let hi = usize::from(port >> 8);
        if self.exact_hi[hi] == NIL {
            self.exact_lo.push([NIL; 256]);
            self.exact_hi[hi] = (self.exact_lo.len() - 1) as u32;
        }
        self.exact_lo[self.exact_hi[hi] as usize][usize::from(port & 0xff)] = id;
    }

    fn trie_id(&self, ports: PortSpec) -> u32 {
        match ports {
            PortSpec::Exact(p) => self.exact(p),
            PortSpec::Range { lo, hi } => self
                .ranges
                .iter()
                .find(|r| r.0 == lo && r.1 == hi)
                .map_or(NIL, |r| r.2),
            PortSpec::Any => self.any,
        }
    }

    fn trie_mut(&mut self, ports: PortSpec, dp_bits: u8) -> &mut K::Lpm {
        let mut id = self.trie_id(ports);
        if id == NIL {
            let t = K::Lpm::new(dp_bits);
            id = match self.free.pop() {
                Some(i) => {
                    self.tries[i as usize] = t;
                    i
                }
                None => {
                    self.tries.push(t);
                    (self.tries.len() - 1) as u32
                }
            };
            match ports {
                PortSpec::Exact(p) => self.set_exact(p, id),
                PortSpec::Range { lo, hi } => {
                    self.ranges.push((lo, hi, id));
                    self.ranges
                        .sort_by_key(|&(lo, hi, _)| (PortSpec::Range { lo, hi }.width(), lo));
                }
                PortSpec::Any => self.any = id,
            }
        }
        &mut self.tries[id as usize]
    }

    fn drop_if_empty(&mut self, ports: PortSpec) {
        let id = self.trie_id(ports);
        if id == NIL || self.tries[id as usize].len() > 0 {
            return;
        }
        self.tries[id as usize] = K::Lpm::placeholder();
        self.free.push(id);
        match ports {
            PortSpec::Exact(p) => self.set_exact(p, NIL),
            PortSpec::Range { lo, hi } => self.ranges.retain(|r| !(r.0 == lo && r.1 == hi)),
            PortSpec::Any => self.any = NIL,
        }
    }

    fn insert(&mut self, ports: PortSpec, dp_bits: u8, key: K, len: u8, l: u32) {
        self.trie_mut(ports, dp_bits).insert(key, len, l);
        self.recount();
    }

    fn recount(&mut self) {
        self.footprint = self.tries.iter().map(Lpm::footprint).sum();
    }

    fn remove(&mut self, ports: PortSpec, key: K, len: u8, l: u32, parent: u32) {
        let id = self.trie_id(ports);
        if id != NIL {
            self.tries[id as usize].remove(key, len, l, parent);
            self.drop_if_empty(ports);
            self.recount();
        }
    }

    /// Replaces (or creates) the trie of `ports` with one built in bulk.
    fn rebuild(
        &mut self,
        ports: PortSpec,
        dp_bits: u8,
        entries: &[(u128, u8, u32)],
        conv: fn(u128) -> K,
    ) {
        let mut e: Vec<(K, u8, u32)> = entries
            .iter()
            .map(|&(k, len, l)| (conv(k), len, l))
            .collect();
        let t = K::Lpm::build(dp_bits, &mut e);
        let id = self.trie_id(ports);
        if id == NIL {
            *self.trie_mut(ports, dp_bits) = t;
        } else {
            self.tries[id as usize] = t;
        }
        self.drop_if_empty(ports);
        self.recount();
    }

    /// Best leaf for `(key, port)` over the exact, range and any-port tries, in precedence order:
    /// a later candidate must be strictly longer to win; with the port selector that gave it.
    #[inline]
    pub(crate) fn lookup(&self, key: K, port: u16) -> (u32, PortSpec) {
        if port == 0 {
            return (NONE, PortSpec::Any);
        }
        let mut best = NONE;
        let t = self.exact(port);
        if t != NIL {
            best = self.tries[t as usize].lookup(key);
            if self.ranges.is_empty() && self.any == NIL {
                return (best, PortSpec::Exact(port));
            }
        }
        self.lookup_rest(key, port, (best, PortSpec::Exact(port)))
    }

    #[inline]
    fn lookup_rest(&self, key: K, port: u16, mut best: (u32, PortSpec)) -> (u32, PortSpec) {
        for &(lo, hi, t) in &self.ranges {
            if lo <= port && port <= hi {
                let l = self.tries[t as usize].lookup(key);
                if depth(l) > depth(best.0) {
                    best = (l, PortSpec::Range { lo, hi });
                }
            }
        }
        if self.any != NIL {
            let l = self.tries[self.any as usize].lookup(key);
            if depth(l) > depth(best.0) {
                best = (l, PortSpec::Any);
            }
        }
        best
    }

    /// Batched [`lookup`](Self::lookup): `out[i]` gets the leaf for `keys[i]`. Returns `false`
    /// when only exact-port tries exist (every match is then `Exact` of its query's port and
    /// `ports` is left alone), `true` when `ports[i]` holds the selector of each match.
    ///
    /// Walks the exact-port tries over chunks of `CHUNK` queries with the structure's batched walk
    /// (group prefetching); range and any-port candidates are finished after, with the scalar
    /// path.
    pub(crate) fn lookup_batch(
        &self,
        keys: &[(K, u16)],
        out: &mut [u32],
        ports: &mut [PortSpec],
    ) -> bool {
        let n = keys.len().min(out.len()).min(ports.len());
        let rest = !self.ranges.is_empty() || self.any != NIL;
        if self.footprint < CACHE_RESIDENT {
            // Everything sits in cache: prefetching only adds work.
            if rest {
                for ((o, p), &(k, port)) in out[..n].iter_mut().zip(&mut ports[..n]).zip(keys) {
                    (*o, *p) = self.lookup(k, port);
                }
            } else {
                for (o, &(k, port)) in out[..n].iter_mut().zip(keys) {
                    *o = self.lookup(k, port).0;
                }
            }
            return rest;
        }
        let mut tid = [NIL; CHUNK];
        let mut kk = [K::default(); CHUNK];
        for (k, o) in keys[..n].chunks(CHUNK).zip(out[..n].chunks_mut(CHUNK)) {
            for (i, &(key, port)) in k.iter().enumerate() {
                tid[i] = if port == 0 { NIL } else { self.exact(port) };
                kk[i] = key;
            }
            K::Lpm::walk_chunk(&self.tries, &tid[..k.len()], &kk[..k.len()], o);
        }
        if rest {
            for (i, &(k, port)) in keys[..n].iter().enumerate() {
                ports[i] = PortSpec::Exact(port);
                if port != 0 {
                    (out[i], ports[i]) = self.lookup_rest(k, port, (out[i], ports[i]));
                }
            }
        }
        rest
    }

    /// Every trie consulted for `port`, in precedence order, with the leaf each gives.
    fn candidates(&self, key: K, port: u16) -> Vec<(PortSpec, u32)> {
        let mut v = Vec::new();
        if port == 0 {
            return v;
        }
        let t = self.exact(port);
        if t != NIL {
            v.push((PortSpec::Exact(port), self.tries[t as usize].lookup(key)));
        }
        for &(lo, hi, t) in &self.ranges {
            if lo <= port && port <= hi {
                v.push((
                    PortSpec::Range { lo, hi },
                    self.tries[t as usize].lookup(key),
                ));
            }
        }
        if self.any != NIL {
            v.push((PortSpec::Any, self.tries[self.any as usize].lookup(key)));
        }
        v
    }

    fn heap_bytes(&self) -> usize {
        self.exact_hi.capacity() * 4
            + self.exact_lo.capacity() * 1024
            + self.ranges.capacity() * 8
            + self.free.capacity() * 4
            + self
                .tries
                .iter()
                .map(|t| t.heap_bytes() + std::mem::size_of::<K::Lpm>())
                .sum::<usize>()
    }
}

/// Address of a prefix inside an op: the family decides the trie set.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AddrKey {
    V4(u32),
    V6(u128),
}

/// One edit of the published table, applied identically to both copies.
#[derive(Debug)]
pub(crate) enum Op {
    /// Sets a group's members (empty: the group is gone).
    SetGroup(u32, Vec<Member>),
    Insert {
        protocol: Protocol,
        ports: PortSpec,
        dp_bits: u8,
        key: AddrKey,
        len: u8,
        leaf: u32,
    },
    Remove {
        protocol: Protocol,
        ports: PortSpec,
        key: AddrKey,
        len: u8,
        leaf: u32,
        parent: u32,
    },
    Rebuild {
        protocol: Protocol,
        v6: bool,
        ports: PortSpec,
        dp_bits: u8,
        entries: Arc<Vec<(u128, u8, u32)>>,
    },
    Replace(Arc<Fib>),
}

/// The data-path table: immutable while readers look at it.
#[derive(Clone, Debug)]
pub struct Fib {
    pub(crate) v4: [PortTries<u32>; 2],
    pub(crate) v6: [PortTries<u128>; 2],
    groups: Vec<Member>,
    members: Vec<Member>,
    free_members: Vec<Vec<u32>>,
    pub(crate) key: HashKey,
}

#[inline]
fn pi(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

impl Fib {
    pub(crate) fn new(key: HashKey) -> Self {
        Fib {
            v4: Default::default(),
            v6: Default::default(),
            groups: Vec::new(),
            members: Vec::new(),
            free_members: Vec::new(),
            key,
        }
    }

    pub(crate) fn apply(&mut self, op: &Op) {
        match op {
            Op::SetGroup(g, members) => self.set_group(*g, members),
            Op::Insert {
                protocol,
                ports,
                dp_bits,
                key,
                len,
                leaf,
            } => match *key {
                AddrKey::V4(k) => self.v4[pi(*protocol)].insert(*ports, *dp_bits, k, *len, *leaf),
                AddrKey::V6(k) => self.v6[pi(*protocol)].insert(*ports, *dp_bits, k, *len, *leaf),
            },
            Op::Remove {
                protocol,
                ports,
                key,
                len,
                leaf,
                parent,
            } => match *key {
                AddrKey::V4(k) => self.v4[pi(*protocol)].remove(*ports, k, *len, *leaf, *parent),
                AddrKey::V6(k) => self.v6[pi(*protocol)].remove(*ports, k, *len, *leaf, *parent),
            },
            Op::Rebuild {
                protocol,
                v6,
                ports,
                dp_bits,
                entries,
            } => {
                if *v6 {
                    self.v6[pi(*protocol)].rebuild(*ports, *dp_bits, entries, |k| k);
                } else {
                    self.v4[pi(*protocol)].rebuild(*ports, *dp_bits, entries, |k| k as u32);
                }
            }
            Op::Replace(f) => *self = (**f).clone(),
        }
    }

    /// Room for `n` group records without regrowing (bulk builds: exact size).
    pub(crate) fn reserve_groups(&mut self, n: usize) {
        self.groups
            .reserve_exact(n.saturating_sub(self.groups.len()));
    }

    fn set_group(&mut self, g: u32, members: &[Member]) {
        let g = g as usize;
        if self.groups.len() <= g {
            self.groups.resize(g + 1, pooled(0, 0));
        }
        let old = self.groups[g];
        let old_len = if old.binding == POOLED {
            (old.listener.0 & 0xffff) as usize
        } else {
            1
        };
        let old_start = (old.listener.0 >> 16) as u32;
        let n = members.len();
        // Sets of one are their own record; larger ones live in the pool.
        let (old_pooled, pooled_now) = (old_len > 1, n > 1);
        let start = if old_pooled && pooled_now && old_len == n {
            old_start
        } else {
            if old_pooled {
                if self.free_members.is_empty() {
                    self.free_members.resize(65, Vec::new());
                }
                if let Some(list) = self.free_members.get_mut(old_len) {
                    list.push(old_start);
                }
            }
            if pooled_now {
                match self.free_members.get_mut(n).and_then(Vec::pop) {
                    Some(at) => at,
                    None => {
                        self.members.extend_from_slice(members);
                        (self.members.len() - n) as u32
                    }
                }
            } else {
                0
            }
        };
        if pooled_now {
            self.members[start as usize..start as usize + n].copy_from_slice(members);
        }
        self.groups[g] = if n == 1 { members[0] } else { pooled(start, n) };
    }

    /// The group a leaf points to (`leaf != NONE`) through the trie of `ports`; `dst` gives the
    /// matched prefix. Reads no group record.
    #[inline]
    pub(crate) fn group(&self, leaf: u32, ports: PortSpec, dst: IpAddr) -> Group<'_> {
        Group {
            dst,
            len: leaf_len(leaf),
            ports,
            rec: &self.groups[leaf_group(leaf) as usize],
            pool: &self.members,
        }
    }

    /// [`group`](Self::group) of a lookup's result, `None` for `NONE`, without a branch on it
    /// (a tenth of the benchmark's queries miss, in random order): `NONE` maps to group index
    /// `u32::MAX`, past every group (there are at most 2^24), so the bounds check says `None`.
    #[inline(always)]
    pub(crate) fn found(&self, leaf: u32, ports: PortSpec, dst: IpAddr) -> Option<Group<'_>> {
        let g = (leaf >> 8).wrapping_sub(1) as usize;
        debug_assert!(
            leaf == NONE || g < self.groups.len(),
            "leaf {leaf:#x} has a group"
        );
        self.groups.get(g).map(|rec| Group {
            dst,
            len: leaf_len(leaf),
            ports,
            rec,
            pool: &self.members,
        })
    }

    #[inline]
    pub(crate) fn lookup_v4(&self, p: Protocol, dst: Ipv4Addr, port: u16) -> Option<Group<'_>> {
        let (l, ports) = self.v4[pi(p)].lookup(u32::from(dst), port);
        self.found(l, ports, dst.into())
    }

    #[inline]
    pub(crate) fn lookup_v6(&self, p: Protocol, dst: Ipv6Addr, port: u16) -> Option<Group<'_>> {
        let (l, ports) = self.v6[pi(p)].lookup(u128::from(dst), port);
        self.found(l, ports, dst.into())
    }

    /// Batched lookup.
    pub(crate) fn lookup_batch_v4(
        &self,
        p: Protocol,
        q: &[(u32, u16)],
        out: &mut [u32],
        ports: &mut [PortSpec],
    ) -> bool {
        self.v4[pi(p)].lookup_batch(q, out, ports)
    }

    /// Batched lookup.
    pub(crate) fn lookup_batch_v6(
        &self,
        p: Protocol,
        q: &[(u128, u16)],
        out: &mut [u32],
        ports: &mut [PortSpec],
    ) -> bool {
        self.v6[pi(p)].lookup_batch(q, out, ports)
    }

    pub(crate) fn candidates(&self, p: Protocol, flow: &Flow) -> Vec<(PortSpec, u32)> {
        match *flow {
            Flow::V4 { dst, dport, .. } => self.v4[pi(p)].candidates(u32::from(dst), dport),
            Flow::V6 { dst, dport, .. } => self.v6[pi(p)].candidates(u128::from(dst), dport),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.v4.iter().map(PortTries::heap_bytes).sum::<usize>()
            + self.v6.iter().map(PortTries::heap_bytes).sum::<usize>()
            + self.group_bytes()
    }

    /// Heap bytes of the group records and the member pool.
    pub(crate) fn group_bytes(&self) -> usize {
        self.groups.capacity() * std::mem::size_of::<Member>()
            + self.members.capacity() * std::mem::size_of::<Member>()
            + self
                .free_members
                .iter()
                .map(|v| v.capacity() * 4 + 24)
                .sum::<usize>()
    }
}

impl left_right::Absorb<Op> for Fib {
    fn absorb_first(&mut self, op: &mut Op, _other: &Self) {
        self.apply(op);
    }

    fn absorb_second(&mut self, op: Op, _other: &Self) {
        match op {
            // The last user of the replacement takes it without a copy.
            Op::Replace(f) => *self = Arc::try_unwrap(f).unwrap_or_else(|f| (*f).clone()),
            op => self.apply(&op),
        }
    }

    fn sync_with(&mut self, first: &Self) {
        *self = first.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::xorshift;
    use crate::trie::leaf;

    fn random_entries(n: usize, seed: u64, group0: u32) -> Vec<(u128, u8, u32)> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                let len = 16 + (xorshift(&mut x) % 17) as u8;
                let key = (xorshift(&mut x) as u32) & (u32::MAX << (32 - len));
                ((u128::from(key), len), leaf(group0 + i as u32, len))
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|((k, len), l)| (k, len, l))
            .collect()
    }

    /// The lane (AMAC) path only runs on tables too big for cache; check it against the scalar path
    /// with exact, range and any-port tries and port 0 in the mix.
    #[test]
    fn batched_lanes_agree_with_scalar_on_a_large_table() {
        let mut t = PortTries::<u32>::default();
        let exact = random_entries(300_000, 1, 0);
        t.rebuild(PortSpec::Exact(80), 16, &exact, |k| k as u32);
        t.rebuild(
            PortSpec::Range { lo: 80, hi: 90 },
            8,
            &random_entries(500, 2, 300_000),
            |k| k as u32,
        );
        t.rebuild(PortSpec::Any, 8, &random_entries(500, 3, 400_000), |k| {
            k as u32
        });
        assert!(t.footprint >= CACHE_RESIDENT, "{} bytes", t.footprint);
        let mut x = 99;
        let mut q = Vec::new();
        for i in 0..100_000usize {
            let e = exact[xorshift(&mut x) as usize % exact.len()];
            // Mostly inside a bound prefix, some anywhere.
            let key = if i % 10 == 0 {
                xorshift(&mut x) as u32
            } else {
                e.0 as u32
                    | (xorshift(&mut x) as u32)
                        .checked_shr(u32::from(e.1.max(1)))
                        .unwrap_or(0)
            };
            q.push((key, [80u16, 80, 80, 85, 0, 443][i % 6]));
        }
        let mut out = vec![0; q.len()];
        let mut ports = vec![PortSpec::Any; q.len()];
        assert!(t.lookup_batch(&q, &mut out, &mut ports));
        for (i, &(k, port)) in q.iter().enumerate() {
            let (l, p) = t.lookup(k, port);
            assert_eq!(out[i], l, "{k:#x}:{port}");
            if l != NONE {
                assert_eq!(ports[i], p, "{k:#x}:{port}");
            }
        }
        assert!(out.iter().filter(|&&l| l != NONE).count() > 40_000);
    }
}
