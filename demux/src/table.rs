//! The control plane (validation, conflicts, bookkeeping) and publication to data-path readers.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use left_right::{ReadGuard, ReadHandle, WriteHandle};
use prefix_trie::PrefixMap;

use crate::fib::{AddrKey, Fib, Group, Member, Op};
use crate::hash::HashKey;
use crate::trie::{leaf, NONE};
use crate::types::{
    BindError, BindPolicy, Binding, BindingId, ConflictKind, Flow, ListenerId, PortSpec, Protocol,
};

/// Largest number of distinct `(protocol, prefix, ports)` groups (leaves carry a 24-bit index).
pub const MAX_GROUPS: u32 = (1 << 24) - 2;

/// Direct-pointing widths of an IPv6 trie and the prefix count from which each is used; a trie
/// shrinks back only below a quarter of that count (hysteresis). Wider arrays cut a trie level off
/// most lookups but cost 32 bytes a slot, so small tries stay narrow.
const DP_STEPS_V6: [(u8, usize); 3] = [(8, 0), (14, 1024), (16, 16384)];

/// Direct-table widths of an IPv4 structure (8 bytes a slot) by prefix count. From 16 bits on,
/// range blocks hold `u16` keys (6 bytes an interval instead of 8). At a million uniformly spread
/// prefixes, 17 bits (1 MiB, mostly cache-resident) and blocks of about 7.6 prefixes (two cache
/// lines, fetched together) measured faster than 16 bits (512 KiB, blocks of three or four lines)
/// and than 18 bits (2 MiB, blocks of about one line), at 12.5 bytes a prefix in all.
const DP_STEPS_V4: [(u8, usize); 4] = [(8, 0), (12, 512), (16, 8192), (17, 1 << 19)];

/// The direct-pointing width for a trie of `count` prefixes that currently uses `old`.
fn dp_bits_for(steps: &[(u8, usize)], count: usize, old: u8) -> u8 {
    let fit = |n: usize| steps.iter().rev().find(|s| s.1 <= n).map_or(8, |s| s.0);
    let grown = fit(count);
    if grown > old {
        return grown;
    }
    let at_old = steps.iter().find(|s| s.0 == old).map_or(0, |s| s.1);
    if count.saturating_mul(4) < at_old {
        fit(count.saturating_mul(4))
    } else {
        old
    }
}

type GroupKey = (Protocol, IpNet, PortSpec);
/// A trie is per (protocol, IPv6?, ports).
type TrieKey = (Protocol, bool, PortSpec);
/// `(address as u128, prefix length, leaf)`.
type Entry = (u128, u8, u32);

#[derive(Clone, Debug)]
struct GroupCtl {
    gidx: u32,
    members: Vec<BindingId>,
}

#[derive(Clone, Copy, Debug)]
struct TrieCtl {
    count: usize,
    dp_bits: u8,
}

/// Bookkeeping of the writer: everything needed to validate an operation and to derive the edits of
/// the published table. Never read by the data path.
#[derive(Clone, Debug)]
struct Control {
    policy: BindPolicy,
    key: HashKey,
    next_id: u64,
    bindings: HashMap<BindingId, Binding>,
    groups: HashMap<GroupKey, GroupCtl>,
    free_groups: Vec<u32>,
    next_group: u32,
    nets4: [PrefixMap<Ipv4Net, Vec<PortSpec>>; 2],
    nets6: [PrefixMap<Ipv6Net, Vec<PortSpec>>; 2],
    tries: HashMap<TrieKey, TrieCtl>,
}

fn pi(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

fn addr_key(net: IpNet) -> AddrKey {
    match net {
        IpNet::V4(n) => AddrKey::V4(u32::from(n.network())),
        IpNet::V6(n) => AddrKey::V6(u128::from(n.network())),
    }
}

impl Control {
    fn new(policy: BindPolicy, key: HashKey, next_id: u64) -> Self {
        Control {
            policy,
            key,
            next_id,
            bindings: HashMap::new(),
            groups: HashMap::new(),
            free_groups: Vec::new(),
            next_group: 0,
            nets4: Default::default(),
            nets6: Default::default(),
            tries: HashMap::new(),
        }
    }

    /// Port selectors bound at exactly this prefix.
    fn specs_at(&self, p: Protocol, net: IpNet) -> &[PortSpec] {
        match net {
            IpNet::V4(n) => self.nets4[pi(p)].get(&n),
            IpNet::V6(n) => self.nets6[pi(p)].get(&n),
        }
        .map_or(&[], Vec::as_slice)
    }

    fn specs_at_mut(&mut self, p: Protocol, net: IpNet) -> &mut Vec<PortSpec> {
        match net {
            IpNet::V4(n) => self.nets4[pi(p)].entry(n).or_default(),
            IpNet::V6(n) => self.nets6[pi(p)].entry(n).or_default(),
        }
    }

    fn forget_spec(&mut self, p: Protocol, net: IpNet, ports: PortSpec) {
        let v = self.specs_at_mut(p, net);
        v.retain(|&s| s != ports);
        if v.is_empty() {
            match net {
                IpNet::V4(n) => {
                    self.nets4[pi(p)].remove(&n);
                }
                IpNet::V6(n) => {
                    self.nets6[pi(p)].remove(&n);
                }
            }
        }
    }

    /// Prefixes strictly covering `net` (shortest first), with their selectors.
    fn covering(&self, p: Protocol, net: IpNet) -> Vec<(IpNet, &[PortSpec])> {
        let mut v: Vec<(IpNet, &[PortSpec])> = match net {
            IpNet::V4(n) => self.nets4[pi(p)]
                .cover(&n)
                .map(|(k, s)| (IpNet::V4(k), s.as_slice()))
                .collect(),
            IpNet::V6(n) => self.nets6[pi(p)]
                .cover(&n)
                .map(|(k, s)| (IpNet::V6(k), s.as_slice()))
                .collect(),
        };
        v.retain(|(k, _)| k.prefix_len() < net.prefix_len());
        v.sort_by_key(|(k, _)| k.prefix_len());
        v
    }

    /// First existing selector strictly inside `net` that overlaps `ports`.
    fn overlapping_child(
        &self,
        p: Protocol,
        net: IpNet,
        ports: PortSpec,
    ) -> Option<(IpNet, PortSpec)> {
        let hit = |s: &[PortSpec]| s.iter().copied().find(|s| s.overlaps(ports));
        match net {
            IpNet::V4(n) => self.nets4[pi(p)]
                .children(&n)
                .filter(|(k, _)| *k != n)
                .find_map(|(k, s)| hit(s).map(|s| (IpNet::V4(k), s))),
            IpNet::V6(n) => self.nets6[pi(p)]
                .children(&n)
                .filter(|(k, _)| *k != n)
                .find_map(|(k, s)| hit(s).map(|s| (IpNet::V6(k), s))),
        }
    }

    fn conflict(
        &self,
        gk: GroupKey,
        kind: ConflictKind,
        pick: impl Fn(&Binding) -> bool,
    ) -> BindError {
        let g = &self.groups[&gk];
        let existing = g
            .members
            .iter()
            .copied()
            .find(|m| pick(&self.bindings[m]))
            .unwrap_or(g.members[0]);
        BindError::Conflict {
            existing,
            with: self.bindings[&existing],
            kind,
        }
    }

    /// Checks `b` (validated) against the table under the policy.
    fn check(&self, b: &Binding) -> Result<(), BindError> {
        let (p, net) = (b.protocol, b.prefix);
        for &spec in self.specs_at(p, net) {
            let gk = (p, net, spec);
            if spec == b.ports {
                let g = &self.groups[&gk];
                if !b.reuseport || g.members.iter().any(|m| !self.bindings[m].reuseport) {
                    return Err(self.conflict(gk, ConflictKind::NotReuseport, |x| !x.reuseport));
                }
                if g.members
                    .iter()
                    .any(|m| self.bindings[m].listener == b.listener)
                {
                    return Err(self.conflict(gk, ConflictKind::DuplicateListener, |x| {
                        x.listener == b.listener
                    }));
                }
            } else if spec.overlaps(b.ports) {
                match self.policy {
                    BindPolicy::Exclusive => {
                        return Err(self.conflict(gk, ConflictKind::ExclusiveOverlap, |_| true))
                    }
                    BindPolicy::Nested if spec.width() == b.ports.width() => {
                        return Err(self.conflict(gk, ConflictKind::AmbiguousPorts, |_| true))
                    }
                    BindPolicy::Nested => {}
                }
            }
        }
        if self.policy == BindPolicy::Exclusive {
            for (k, specs) in self.covering(p, net) {
                if let Some(&s) = specs.iter().find(|s| s.overlaps(b.ports)) {
                    return Err(self.conflict((p, k, s), ConflictKind::ExclusiveOverlap, |_| true));
                }
            }
            if let Some((k, s)) = self.overlapping_child(p, net, b.ports) {
                return Err(self.conflict((p, k, s), ConflictKind::ExclusiveOverlap, |_| true));
            }
        }
        Ok(())
    }

    /// The published form of a group: its members in bind order.
    fn set_group(&self, gidx: u32, members: &[BindingId]) -> Op {
        let members = members
            .iter()
            .map(|id| Member {
                binding: *id,
                listener: self.bindings[id].listener,
            })
            .collect();
        Op::SetGroup(gidx, members)
    }

    /// Every prefix of one trie, as rebuild entries.
    fn trie_entries(&self, p: Protocol, v6: bool, ports: PortSpec) -> Vec<(u128, u8, u32)> {
        let mut out = Vec::new();
        let mut push = |net: IpNet, key: u128, specs: &Vec<PortSpec>| {
            if specs.contains(&ports) {
                let g = self.groups[&(p, net, ports)].gidx;
                out.push((key, net.prefix_len(), leaf(g, net.prefix_len())));
            }
        };
        if v6 {
            for (n, s) in self.nets6[pi(p)].iter() {
                push(IpNet::V6(n), u128::from(n.network()), s);
            }
        } else {
            for (n, s) in self.nets4[pi(p)].iter() {
                push(IpNet::V4(n), u128::from(u32::from(n.network())), s);
            }
        }
        out
    }

    /// Counts a prefix in or out of its trie, resizing the direct-pointing array at the thresholds.
    fn trie_count(
        &mut self,
        p: Protocol,
        net: IpNet,
        ports: PortSpec,
        delta: isize,
        ops: &mut Vec<Op>,
    ) -> u8 {
        let v6 = matches!(net, IpNet::V6(_));
        let t = self.tries.entry((p, v6, ports)).or_insert(TrieCtl {
            count: 0,
            dp_bits: 8,
        });
        t.count = t
            .count
            .checked_add_signed(delta)
            .expect("trie count in range");
        let (count, old) = (t.count, t.dp_bits);
        let steps: &[(u8, usize)] = if v6 { &DP_STEPS_V6 } else { &DP_STEPS_V4 };
        let new = dp_bits_for(steps, count, old);
        if count == 0 {
            self.tries.remove(&(p, v6, ports));
        } else if new != old {
            self.tries
                .get_mut(&(p, v6, ports))
                .expect("present")
                .dp_bits = new;
            ops.push(Op::Rebuild {
                protocol: p,
                v6,
                ports,
                dp_bits: new,
                entries: Arc::new(self.trie_entries(p, v6, ports)),
            });
        }
        new
    }

    /// The whole data-path table built in bulk (compact, no update garbage).
    fn build_fib(&self) -> Fib {
        let mut fib = Fib::new(self.key);
        fib.reserve_groups(self.next_group as usize);
        for g in self.groups.values() {
            fib.apply(&self.set_group(g.gidx, &g.members));
        }
        let mut per_trie: HashMap<TrieKey, Vec<Entry>> = HashMap::new();
        for p in [Protocol::Tcp, Protocol::Udp] {
            let nets4 = self.nets4[pi(p)].iter().map(|(n, s)| (IpNet::V4(n), s));
            let nets6 = self.nets6[pi(p)].iter().map(|(n, s)| (IpNet::V6(n), s));
            for (net, specs) in nets4.chain(nets6) {
                let key = match addr_key(net) {
                    AddrKey::V4(k) => u128::from(k),
                    AddrKey::V6(k) => k,
                };
                for &ports in specs {
                    let g = self.groups[&(p, net, ports)].gidx;
                    let len = net.prefix_len();
                    per_trie
                        .entry((p, net.addr().is_ipv6(), ports))
                        .or_default()
                        .push((key, len, leaf(g, len)));
                }
            }
        }
        for ((p, v6, ports), entries) in per_trie {
            fib.apply(&Op::Rebuild {
                protocol: p,
                v6,
                ports,
                dp_bits: self.tries[&(p, v6, ports)].dp_bits,
                entries: Arc::new(entries),
            });
        }
        fib
    }

    fn bind(&mut self, b: Binding, ops: &mut Vec<Op>) -> Result<BindingId, BindError> {
        let b = b.validate()?;
        self.check(&b)?;
        let gk = (b.protocol, b.prefix, b.ports);
        let fresh = !self.groups.contains_key(&gk);
        if fresh && self.free_groups.is_empty() && self.next_group >= MAX_GROUPS {
            return Err(BindError::TableFull);
        }
        let id = BindingId(self.next_id);
        self.next_id += 1;
        self.bindings.insert(id, b);
        if fresh {
            let gidx = self.free_groups.pop().unwrap_or_else(|| {
                self.next_group += 1;
                self.next_group - 1
            });
            self.groups.insert(
                gk,
                GroupCtl {
                    gidx,
                    members: vec![id],
                },
            );
            ops.push(self.set_group(gidx, &[id]));
            self.specs_at_mut(b.protocol, b.prefix).push(b.ports);
            let len = b.prefix.prefix_len();
            // Insert before counting: a rebuild triggered by the count already contains the prefix.
            let dp_bits = self
                .tries
                .get(&(b.protocol, b.prefix.addr().is_ipv6(), b.ports))
                .map_or(8, |t| t.dp_bits);
            ops.push(Op::Insert {
                protocol: b.protocol,
                ports: b.ports,
                dp_bits,
                key: addr_key(b.prefix),
                len,
                leaf: leaf(gidx, len),
            });
            self.trie_count(b.protocol, b.prefix, b.ports, 1, ops);
        } else {
            let g = self.groups.get_mut(&gk).expect("checked");
            if g.members.len() >= usize::from(u16::MAX) {
                self.bindings.remove(&id);
                return Err(BindError::TableFull);
            }
            g.members.push(id);
            let (gidx, members) = (g.gidx, g.members.clone());
            ops.push(self.set_group(gidx, &members));
        }
        Ok(id)
    }

    fn unbind(&mut self, id: BindingId, ops: &mut Vec<Op>) -> Result<Binding, BindError> {
        let b = self
            .bindings
            .remove(&id)
            .ok_or(BindError::UnknownBinding(id))?;
        let gk = (b.protocol, b.prefix, b.ports);
        let g = self
            .groups
            .get_mut(&gk)
            .expect("bound bindings have a group");
        g.members.retain(|&m| m != id);
        let gidx = g.gidx;
        if !g.members.is_empty() {
            let members = g.members.clone();
            ops.push(self.set_group(gidx, &members));
            return Ok(b);
        }
        self.groups.remove(&gk);
        self.forget_spec(b.protocol, b.prefix, b.ports);
        let parent = self
            .covering(b.protocol, b.prefix)
            .into_iter()
            .rev()
            .find(|(_, specs)| specs.contains(&b.ports))
            .map_or(NONE, |(net, _)| {
                leaf(
                    self.groups[&(b.protocol, net, b.ports)].gidx,
                    net.prefix_len(),
                )
            });
        let len = b.prefix.prefix_len();
        ops.push(Op::Remove {
            protocol: b.protocol,
            ports: b.ports,
            key: addr_key(b.prefix),
            len,
            leaf: leaf(gidx, len),
            parent,
        });
        ops.push(Op::SetGroup(gidx, Vec::new()));
        self.free_groups.push(gidx);
        self.trie_count(b.protocol, b.prefix, b.ports, -1, ops);
        Ok(b)
    }
}

/// The binding table: the single writer. Lookups go through [`DemuxReader`]s (one per data-path
/// thread) or [`Demux::snapshot`].
///
/// Publication is double-buffered (`left-right`): readers use one copy of the data-path table and
/// never block or retry; an update is applied to the other copy, the copies swap, and after readers
/// have left the old copy the same edits are applied to it. Every method publishes before it
/// returns, so a lookup sees either the table before or after a call, never a part of one.
/// Readers must not hold a [`Snapshot`] across a blocking wait, or the writer waits with them.
pub struct Demux {
    w: WriteHandle<Fib, Op>,
    ctl: Control,
}

impl fmt::Debug for Demux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Demux")
            .field("policy", &self.ctl.policy)
            .field("bindings", &self.ctl.bindings.len())
            .finish()
    }
}

impl Demux {
    /// An empty table with a random hash key.
    pub fn new(policy: BindPolicy) -> Self {
        Self::with_key(policy, HashKey::random())
    }

    /// An empty table with the given hash key (deterministic member choice, e.g. in tests).
    pub fn with_key(policy: BindPolicy, key: HashKey) -> Self {
        let (w, _r) = left_right::new_from_empty(Fib::new(key));
        Demux {
            w,
            ctl: Control::new(policy, key, 1),
        }
    }

    fn publish(&mut self, ops: Vec<Op>) {
        if !ops.is_empty() {
            self.w.extend(ops);
            self.w.publish();
        }
    }

    /// Adds a binding. On error nothing changes.
    pub fn bind(&mut self, b: Binding) -> Result<BindingId, BindError> {
        let mut ops = Vec::new();
        let r = self.ctl.bind(b, &mut ops);
        self.publish(ops);
        r
    }

    /// Adds many bindings and publishes once; each gets its own result (a failed one changes
    /// nothing, the others still apply).
    pub fn bind_many(
        &mut self,
        bs: impl IntoIterator<Item = Binding>,
    ) -> Vec<Result<BindingId, BindError>> {
        let mut ops = Vec::new();
        let r = bs.into_iter().map(|b| self.ctl.bind(b, &mut ops)).collect();
        self.publish(ops);
        r
    }

    /// Removes a binding; returns what it was. Established connections are not the table's concern
    /// and are never disturbed.
    pub fn unbind(&mut self, id: BindingId) -> Result<Binding, BindError> {
        let mut ops = Vec::new();
        let r = self.ctl.unbind(id, &mut ops);
        self.publish(ops);
        r
    }

    /// Replaces the whole table atomically: either every binding is valid and conflict-free and
    /// readers switch to the new table in one step, or nothing changes and the error names the
    /// offending input (its index). The hash key is kept, so flows keep their reuseport member when
    /// the listener ids of their group are unchanged.
    pub fn replace_all(
        &mut self,
        bs: impl IntoIterator<Item = Binding>,
    ) -> Result<Vec<BindingId>, (usize, BindError)> {
        let mut ctl = Control::new(self.ctl.policy, self.ctl.key, self.ctl.next_id);
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        for (i, b) in bs.into_iter().enumerate() {
            ids.push(ctl.bind(b, &mut ops).map_err(|e| (i, e))?);
            ops.clear();
        }
        let fib = ctl.build_fib();
        self.ctl = ctl;
        self.publish(vec![Op::Replace(Arc::new(fib))]);
        Ok(ids)
    }

    /// The binding behind an id.
    pub fn get(&self, id: BindingId) -> Option<&Binding> {
        self.ctl.bindings.get(&id)
    }

    /// All bindings, in no particular order.
    pub fn bindings(&self) -> impl Iterator<Item = (BindingId, &Binding)> {
        self.ctl.bindings.iter().map(|(k, v)| (*k, v))
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        self.ctl.bindings.len()
    }

    /// True when nothing is bound.
    pub fn is_empty(&self) -> bool {
        self.ctl.bindings.is_empty()
    }

    /// The conflict policy.
    pub fn policy(&self) -> BindPolicy {
        self.ctl.policy
    }

    /// The flow-hash key.
    pub fn key(&self) -> HashKey {
        self.ctl.key
    }

    /// A read handle for one data-path thread (clone it for more).
    pub fn reader(&self) -> DemuxReader {
        DemuxReader {
            r: (*self.w).clone(),
        }
    }

    /// The published table, read from the writer's thread.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            fib: self.w.enter().expect("the writer is alive"),
        }
    }

    /// Heap bytes of one copy of the published data-path table: `(tries and port index, group
    /// records and member pool)`. Two copies exist (double buffering); the control plane's
    /// bookkeeping is extra.
    pub fn data_path_bytes(&self) -> (usize, usize) {
        let s = self.snapshot();
        let g = s.fib.group_bytes();
        (s.fib.heap_bytes() - g, g)
    }
}

/// Read handle for one data-path thread: `Send`, not `Sync`; clone it for each thread.
#[derive(Clone)]
pub struct DemuxReader {
    r: ReadHandle<Fib>,
}

impl fmt::Debug for DemuxReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DemuxReader")
    }
}

impl DemuxReader {
    /// Enters the current table (wait-free). `None` once the [`Demux`] is dropped. Hold the
    /// snapshot for a batch of packets, not across blocking waits.
    pub fn enter(&self) -> Option<Snapshot<'_>> {
        self.r.enter().map(|fib| Snapshot { fib })
    }
}

/// What a lookup found: the chosen member and the binding group it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The binding (member) chosen.
    pub binding: BindingId,
    /// Its listener.
    pub listener: ListenerId,
    /// The bound prefix that matched.
    pub prefix: IpNet,
    /// The bound ports that matched.
    pub ports: PortSpec,
    /// Size of the reuseport set.
    pub members: usize,
}

/// Queries handed to the data-path walk at a time by the batched lookups.
const BATCH: usize = 64;

/// A consistent view of the table; lookups against it never block.
pub struct Snapshot<'a> {
    fib: ReadGuard<'a, Fib>,
}

impl fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snapshot")
    }
}

impl Snapshot<'_> {
    /// Keyed hash of a flow (compute once per packet; reuse for connection tables).
    pub fn flow_hash(&self, flow: &Flow) -> u64 {
        self.fib.key.flow_hash(flow)
    }

    /// Which member of which binding a new flow reaches. Hashes the flow only when the group has
    /// more than one member.
    #[inline]
    pub fn lookup(&self, protocol: Protocol, flow: &Flow) -> Option<Hit> {
        let g = match *flow {
            Flow::V4 { dst, dport, .. } => self.fib.lookup_v4(protocol, dst, dport),
            Flow::V6 { dst, dport, .. } => self.fib.lookup_v6(protocol, dst, dport),
        }?;
        let m = if g.members().len() == 1 {
            &g.members()[0]
        } else {
            g.pick(self.flow_hash(flow))
        };
        Some(Hit {
            binding: m.binding,
            listener: m.listener,
            prefix: g.prefix(),
            ports: g.ports(),
            members: g.members().len(),
        })
    }

    /// The group for a destination, without choosing a member.
    #[inline]
    pub fn group(&self, protocol: Protocol, dst: IpAddr, port: u16) -> Option<Group<'_>> {
        match dst {
            IpAddr::V4(a) => self.fib.lookup_v4(protocol, a, port),
            IpAddr::V6(a) => self.fib.lookup_v6(protocol, a, port),
        }
    }

    /// Batched IPv4 group lookup: `out[i]` receives the group for `dsts[i]`. Interleaves the memory
    /// accesses of many lookups. `out` must be at least as long as `dsts`.
    pub fn group_batch_v4<'s>(
        &'s self,
        protocol: Protocol,
        dsts: &[(std::net::Ipv4Addr, u16)],
        out: &mut [Option<Group<'s>>],
    ) {
        self.group_batch(dsts, out, u32::from, |q, l, p| {
            self.fib.lookup_batch_v4(protocol, q, l, p)
        })
    }

    /// Batched IPv6 group lookup; see [`group_batch_v4`](Self::group_batch_v4).
    pub fn group_batch_v6<'s>(
        &'s self,
        protocol: Protocol,
        dsts: &[(std::net::Ipv6Addr, u16)],
        out: &mut [Option<Group<'s>>],
    ) {
        self.group_batch(dsts, out, u128::from, |q, l, p| {
            self.fib.lookup_batch_v6(protocol, q, l, p)
        })
    }

    /// Both batched lookups: converts addresses to trie keys `BATCH` at a time, walks, resolves.
    fn group_batch<'s, A: Copy + Into<IpAddr>, K: Copy + Default>(
        &'s self,
        dsts: &[(A, u16)],
        out: &mut [Option<Group<'s>>],
        key: fn(A) -> K,
        walk: impl Fn(&[(K, u16)], &mut [u32], &mut [PortSpec]) -> bool,
    ) {
        let mut q = [(K::default(), 0u16); BATCH];
        let mut l = [NONE; BATCH];
        let mut ports = [PortSpec::Any; BATCH];
        for (d, o) in dsts.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            for (qi, &(a, p)) in q.iter_mut().zip(d) {
                *qi = (key(a), p);
            }
            let mixed = walk(&q[..d.len()], &mut l[..d.len()], &mut ports[..d.len()]);
            for (i, (oi, &(a, port))) in o.iter_mut().zip(d).enumerate() {
                let pi = if mixed {
                    ports[i]
                } else {
                    PortSpec::Exact(port)
                };
                *oi = self.fib.found(l[i], pi, a.into());
            }
        }
    }

    /// Which binding and member a flow would reach, and why.
    pub fn explain(&self, protocol: Protocol, flow: &Flow) -> Explanation {
        let flow_hash = self.flow_hash(flow);
        let candidates: Vec<Candidate> = self
            .fib
            .candidates(protocol, flow)
            .into_iter()
            .map(|(ports, l)| Candidate {
                ports,
                matched: (l != NONE).then(|| self.fib.group(l, ports, flow.dst()).prefix()),
            })
            .collect();
        let chosen = self.lookup(protocol, flow);
        Explanation {
            protocol,
            flow: *flow,
            flow_hash,
            candidates,
            chosen,
        }
    }
}

/// One port selector consulted by a lookup and the longest prefix it matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The port selector (exact, range or any) whose trie was consulted.
    pub ports: PortSpec,
    /// Longest prefix of that selector containing the destination, if any.
    pub matched: Option<IpNet>,
}

/// Result of [`Snapshot::explain`]; `Display` prints it for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Protocol asked about.
    pub protocol: Protocol,
    /// The flow asked about.
    pub flow: Flow,
    /// Its keyed hash (the input to member choice).
    pub flow_hash: u64,
    /// Every selector consulted, in precedence order (exact, ranges narrowest first, any).
    pub candidates: Vec<Candidate>,
    /// The outcome; `None` means no binding (TCP answers RST, UDP port unreachable).
    pub chosen: Option<Hit>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (src, sport) = match self.flow {
            Flow::V4 { src, sport, .. } => (IpAddr::V4(src), sport),
            Flow::V6 { src, sport, .. } => (IpAddr::V6(src), sport),
        };
        writeln!(
            f,
            "{} {} -> {}",
            self.protocol,
            std::net::SocketAddr::new(src, sport),
            std::net::SocketAddr::new(self.flow.dst(), self.flow.dport())
        )?;
        if self.candidates.is_empty() {
            writeln!(f, "  no binding takes port {}", self.flow.dport())?;
        }
        for c in &self.candidates {
            match c.matched {
                Some(p) => writeln!(f, "  ports {:<11} longest prefix {p}", c.ports.to_string())?,
                None => writeln!(
                    f,
                    "  ports {:<11} no prefix contains the address",
                    c.ports.to_string()
                )?,
            }
        }
        match &self.chosen {
            None => write!(f, "  => no binding: unbound"),
            Some(h) => write!(
                f,
                "  => {} ({}:{}:{}), longest prefix /{} then narrowest ports; member {} of {} by \
                 rendezvous hash {:#018x}",
                h.binding,
                self.protocol,
                h.prefix,
                h.ports,
                h.prefix.prefix_len(),
                h.listener,
                h.members,
                self.flow_hash
            ),
        }
    }
}
