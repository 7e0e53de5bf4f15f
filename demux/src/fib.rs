//! The published, read-only side of the table: per protocol and family, a port index over LPM
//! tries, and the reuseport groups their leaves point to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::hash::{rendezvous, HashKey};
use crate::trie::leaf_len;
use crate::trie::{depth, leaf_group, prefetch, Key, Trie, Walk, NONE};
use crate::types::{BindingId, Flow, ListenerId, PortSpec, Protocol};

const NIL: u32 = u32::MAX;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group<'a> {
    dst: IpAddr,
    len: u8,
    ports: PortSpec,
    members: &'a [Member],
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
    pub fn members(&self) -> &'a [Member] {
        self.members
    }
    /// The member a flow with this keyed hash goes to (see [`HashKey::flow_hash`]).
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> &'a Member {
        if self.members.len() == 1 {
            return &self.members[0];
        }
        &self.members[rendezvous(flow_hash, self.members.iter().map(|m| m.listener))]
    }
}

/// Where a group's members sit in the member pool, and its ports. 12 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupRec {
    start: u32,
    len: u16,
    ports: PortSpec,
}

/// Port index and tries of one (protocol, family).
#[derive(Clone, Debug)]
pub(crate) struct PortTries<K> {
    /// Empty, or one trie id per port (NIL: none).
    exact: Vec<u32>,
    /// `(lo, hi, trie)`, narrowest first.
    ranges: Vec<(u16, u16, u32)>,
    any: u32,
    tries: Vec<Trie<K>>,
    free: Vec<u32>,
}

impl<K: Key> Default for PortTries<K> {
    fn default() -> Self {
        PortTries {
            exact: Vec::new(),
            ranges: Vec::new(),
            any: NIL,
            tries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Key> PortTries<K> {
    fn trie_id(&self, ports: PortSpec) -> u32 {
        match ports {
            PortSpec::Exact(p) => self.exact.get(usize::from(p)).copied().unwrap_or(NIL),
            PortSpec::Range { lo, hi } => self
                .ranges
                .iter()
                .find(|r| r.0 == lo && r.1 == hi)
                .map_or(NIL, |r| r.2),
            PortSpec::Any => self.any,
        }
    }

    fn trie_mut(&mut self, ports: PortSpec, dp_bits: u8) -> &mut Trie<K> {
        let mut id = self.trie_id(ports);
        if id == NIL {
            let t = Trie::new(dp_bits);
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
                PortSpec::Exact(p) => {
                    if self.exact.is_empty() {
                        self.exact = vec![NIL; 65536];
                    }
                    self.exact[usize::from(p)] = id;
                }
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
        self.tries[id as usize] = Trie::new(0);
        self.free.push(id);
        match ports {
            PortSpec::Exact(p) => {
                self.exact[usize::from(p)] = NIL;
                if self.exact.iter().all(|&t| t == NIL) {
                    self.exact = Vec::new();
                }
            }
            PortSpec::Range { lo, hi } => self.ranges.retain(|r| !(r.0 == lo && r.1 == hi)),
            PortSpec::Any => self.any = NIL,
        }
    }

    fn insert(&mut self, ports: PortSpec, dp_bits: u8, key: K, len: u8, l: u32) {
        self.trie_mut(ports, dp_bits).insert(key, len, l);
    }

    fn remove(&mut self, ports: PortSpec, key: K, len: u8, l: u32, parent: u32) {
        let id = self.trie_id(ports);
        if id != NIL {
            self.tries[id as usize].remove(key, len, l, parent);
            self.drop_if_empty(ports);
        }
    }

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
        let t = Trie::build(dp_bits, &mut e);
        let id = self.trie_id(ports);
        if id == NIL {
            *self.trie_mut(ports, dp_bits) = t;
        } else {
            self.tries[id as usize] = t;
        }
        self.drop_if_empty(ports);
    }

    /// Best leaf for `(key, port)` over the exact, range and any-port tries, in precedence order:
    /// a later candidate must be strictly longer to win.
    #[inline]
    pub(crate) fn lookup(&self, key: K, port: u16) -> u32 {
        if port == 0 {
            return NONE;
        }
        let mut best = NONE;
        if let Some(&t) = self.exact.get(usize::from(port)) {
            if t != NIL {
                best = self.tries[t as usize].lookup(key);
                if depth(best) == i32::from(K::BITS) {
                    return best;
                }
            }
        }
        self.lookup_rest(key, port, best)
    }

    #[inline]
    fn lookup_rest(&self, key: K, port: u16, mut best: u32) -> u32 {
        for &(lo, hi, t) in &self.ranges {
            if lo <= port && port <= hi {
                let l = self.tries[t as usize].lookup(key);
                if depth(l) > depth(best) {
                    best = l;
                }
            }
        }
        if self.any != NIL {
            let l = self.tries[self.any as usize].lookup(key);
            if depth(l) > depth(best) {
                best = l;
            }
        }
        best
    }

    /// Batched [`lookup`](Self::lookup): walks up to 16 queries through the exact-port tries level
    /// by level, prefetching each next step, then finishes range and any-port candidates.
    pub(crate) fn lookup_batch(&self, keys: &[(K, u16)], out: &mut [u32]) {
        const LANES: usize = 16;
        let has_rest = !self.ranges.is_empty() || self.any != NIL;
        for (qs, os) in keys.chunks(LANES).zip(out.chunks_mut(LANES)) {
            let mut trie = [NIL; LANES];
            for (i, &(k, port)) in qs.iter().enumerate() {
                if port != 0 {
                    if let Some(&t) = self.exact.get(usize::from(port)) {
                        trie[i] = t;
                        if t != NIL {
                            self.tries[t as usize].prefetch_slot(k);
                        }
                    }
                }
            }
            let mut walk = [None::<Walk>; LANES];
            let mut active = 0;
            for (i, &(k, _)) in qs.iter().enumerate() {
                os[i] = NONE;
                if trie[i] != NIL {
                    match self.tries[trie[i] as usize].walk_start(k) {
                        Ok(w) => {
                            walk[i] = Some(w);
                            active += 1;
                        }
                        Err(l) => os[i] = l,
                    }
                }
            }
            while active > 0 {
                for (i, &(k, _)) in qs.iter().enumerate() {
                    if let Some(w) = walk[i].as_mut() {
                        if let Some(l) = self.tries[trie[i] as usize].walk_step(k, w) {
                            os[i] = l;
                            walk[i] = None;
                            active -= 1;
                        }
                    }
                }
            }
            if has_rest {
                for (i, &(k, port)) in qs.iter().enumerate() {
                    if port != 0 && depth(os[i]) < i32::from(K::BITS) {
                        os[i] = self.lookup_rest(k, port, os[i]);
                    }
                }
            }
        }
    }

    /// Every trie consulted for `port`, in precedence order, with the leaf each gives.
    fn candidates(&self, key: K, port: u16) -> Vec<(PortSpec, u32)> {
        let mut v = Vec::new();
        if port == 0 {
            return v;
        }
        if let Some(&t) = self.exact.get(usize::from(port)) {
            if t != NIL {
                v.push((PortSpec::Exact(port), self.tries[t as usize].lookup(key)));
            }
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
        self.exact.capacity() * 4
            + self.ranges.capacity() * 8
            + self.free.capacity() * 4
            + self
                .tries
                .iter()
                .map(|t| t.heap_bytes() + std::mem::size_of::<Trie<K>>())
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
    SetGroup(u32, PortSpec, Vec<Member>),
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
    groups: Vec<GroupRec>,
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
            Op::SetGroup(g, ports, members) => self.set_group(*g, *ports, members),
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

    fn set_group(&mut self, g: u32, ports: PortSpec, members: &[Member]) {
        let g = g as usize;
        if self.groups.len() <= g {
            self.groups.resize(
                g + 1,
                GroupRec {
                    start: 0,
                    len: 0,
                    ports,
                },
            );
        }
        let old = self.groups[g];
        let n = members.len();
        let start = if usize::from(old.len) == n {
            old.start
        } else {
            if old.len > 0 {
                if self.free_members.is_empty() {
                    self.free_members.resize(65, Vec::new());
                }
                if let Some(list) = self.free_members.get_mut(usize::from(old.len)) {
                    list.push(old.start);
                }
            }
            match self.free_members.get_mut(n).and_then(Vec::pop) {
                Some(at) => at,
                None => {
                    self.members.extend_from_slice(members);
                    (self.members.len() - n) as u32
                }
            }
        };
        self.members[start as usize..start as usize + n].copy_from_slice(members);
        self.groups[g] = GroupRec {
            start,
            len: n as u16,
            ports,
        };
    }

    /// The group a leaf points to (`leaf != NONE`); `dst` gives the matched prefix.
    #[inline]
    pub(crate) fn group(&self, leaf: u32, dst: IpAddr) -> Group<'_> {
        let r = self.groups[leaf_group(leaf) as usize];
        Group {
            dst,
            len: leaf_len(leaf),
            ports: r.ports,
            members: &self.members[r.start as usize..r.start as usize + usize::from(r.len)],
        }
    }

    #[inline]
    pub(crate) fn lookup_v4(&self, p: Protocol, dst: Ipv4Addr, port: u16) -> Option<Group<'_>> {
        let l = self.v4[pi(p)].lookup(u32::from(dst), port);
        (l != NONE).then(|| self.group(l, dst.into()))
    }

    #[inline]
    pub(crate) fn lookup_v6(&self, p: Protocol, dst: Ipv6Addr, port: u16) -> Option<Group<'_>> {
        let l = self.v6[pi(p)].lookup(u128::from(dst), port);
        (l != NONE).then(|| self.group(l, dst.into()))
    }

    /// Batched lookup; also prefetches the group records the leaves point to.
    pub(crate) fn lookup_batch_v4(&self, p: Protocol, q: &[(u32, u16)], out: &mut [u32]) {
        self.v4[pi(p)].lookup_batch(q, out);
        self.prefetch_groups(out);
    }

    /// Batched lookup; also prefetches the group records the leaves point to.
    pub(crate) fn lookup_batch_v6(&self, p: Protocol, q: &[(u128, u16)], out: &mut [u32]) {
        self.v6[pi(p)].lookup_batch(q, out);
        self.prefetch_groups(out);
    }

    fn prefetch_groups(&self, leaves: &[u32]) {
        for &l in leaves {
            if l != NONE {
                prefetch(self.groups.as_ptr().wrapping_add(leaf_group(l) as usize));
            }
        }
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
        self.groups.capacity() * std::mem::size_of::<GroupRec>()
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
