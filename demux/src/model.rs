//! The reference model: the bind rules of the README implemented literally, as a linear scan.
//!
//! Slow on purpose and obviously right; property tests and the fuzz target compare [`Demux`] with
//! it, and the `linear` benchmark peer uses it.
//!
//! [`Demux`]: crate::Demux

use std::net::IpAddr;

use ipnet::IpNet;

use crate::types::{BindError, BindPolicy, Binding, BindingId, ConflictKind, Protocol};

/// A list of bindings with the literal rules.
#[derive(Clone, Debug, Default)]
pub struct Model {
    policy: BindPolicy,
    next_id: u64,
    bindings: Vec<(BindingId, Binding)>,
}

fn nested(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

impl Model {
    /// An empty model; ids are handed out from 1 like [`crate::Demux`].
    pub fn new(policy: BindPolicy) -> Self {
        Model {
            policy,
            next_id: 1,
            bindings: Vec::new(),
        }
    }

    /// Every existing binding that `b` conflicts with, and why.
    pub fn conflicts(&self, b: &Binding) -> Vec<(BindingId, ConflictKind)> {
        let mut out = Vec::new();
        for &(id, e) in &self.bindings {
            if e.protocol != b.protocol || !e.ports.overlaps(b.ports) {
                continue;
            }
            let same = e.prefix == b.prefix && e.ports == b.ports;
            let group_ok = || {
                b.reuseport
                    && self
                        .bindings
                        .iter()
                        .filter(|(_, x)| {
                            x.protocol == b.protocol && x.prefix == b.prefix && x.ports == b.ports
                        })
                        .all(|(_, x)| x.reuseport)
            };
            if same {
                if !group_ok() {
                    out.push((id, ConflictKind::NotReuseport));
                } else if e.listener == b.listener {
                    out.push((id, ConflictKind::DuplicateListener));
                }
                continue;
            }
            match self.policy {
                BindPolicy::Exclusive if nested(e.prefix, b.prefix) => {
                    out.push((id, ConflictKind::ExclusiveOverlap))
                }
                BindPolicy::Nested
                    if e.prefix == b.prefix && e.ports.width() == b.ports.width() =>
                {
                    out.push((id, ConflictKind::AmbiguousPorts))
                }
                _ => {}
            }
        }
        out
    }

    /// Binds like [`crate::Demux::bind`]; on a conflict the error names one of [`Self::conflicts`].
    pub fn bind(&mut self, b: Binding) -> Result<BindingId, BindError> {
        let b = b.validate()?;
        if let Some(&(existing, kind)) = self.conflicts(&b).first() {
            let with = self
                .bindings
                .iter()
                .find(|x| x.0 == existing)
                .expect("listed")
                .1;
            return Err(BindError::Conflict {
                existing,
                with,
                kind,
            });
        }
        let id = BindingId(self.next_id);
        self.next_id += 1;
        self.bindings.push((id, b));
        Ok(id)
    }

    /// Removes a binding.
    pub fn unbind(&mut self, id: BindingId) -> Result<Binding, BindError> {
        let i = self
            .bindings
            .iter()
            .position(|x| x.0 == id)
            .ok_or(BindError::UnknownBinding(id))?;
        Ok(self.bindings.remove(i).1)
    }

    /// The bindings a new flow to `(dst, port)` could reach: the members of the winning group (the
    /// longest prefix, then the narrowest ports), in bind order.
    pub fn lookup(&self, protocol: Protocol, dst: IpAddr, port: u16) -> Vec<(BindingId, Binding)> {
        let cands = self.bindings.iter().filter(|(_, b)| {
            b.protocol == protocol && b.prefix.contains(&dst) && b.ports.contains(port)
        });
        let best = cands
            .clone()
            .max_by_key(|(_, b)| (b.prefix.prefix_len(), std::cmp::Reverse(b.ports.width())));
        match best {
            None => Vec::new(),
            Some(&(_, w)) => cands
                .filter(|(_, b)| b.prefix == w.prefix && b.ports == w.ports)
                .copied()
                .collect(),
        }
    }

    /// All bindings in bind order.
    pub fn bindings(&self) -> &[(BindingId, Binding)] {
        &self.bindings
    }
}

/// A [`Demux`](crate::Demux) and a [`Model`] driven in lockstep; every method panics when they
/// disagree. Shared by the property tests and the fuzz target.
#[derive(Debug)]
pub struct Differential {
    table: crate::Demux,
    model: Model,
    live: Vec<BindingId>,
}

impl Differential {
    /// Both sides empty, with a fixed hash key.
    pub fn new(policy: BindPolicy) -> Self {
        Differential {
            table: crate::Demux::with_key(policy, crate::HashKey([3; 16])),
            model: Model::new(policy),
            live: Vec::new(),
        }
    }

    /// Binds on both sides: both succeed with the same id, or both fail and the table's conflict
    /// names one the model also finds.
    pub fn bind(&mut self, b: Binding) {
        let want = self.model.bind(b);
        let got = self.table.bind(b);
        match (&got, &want) {
            (Ok(a), Ok(w)) => {
                assert_eq!(a, w);
                self.live.push(*a);
            }
            (Err(BindError::Conflict { existing, kind, .. }), Err(BindError::Conflict { .. })) => {
                let allowed = self
                    .model
                    .conflicts(&b.validate().expect("conflicts come after validation"));
                assert!(
                    allowed.contains(&(*existing, *kind)),
                    "{b}: table says {got:?}, model allows {allowed:?}"
                );
            }
            (Err(a), Err(w)) if !matches!(a, BindError::Conflict { .. }) => assert_eq!(a, w),
            _ => panic!("{b}: table {got:?}, model {want:?}"),
        }
    }

    /// Unbinds the `i`-th live binding (modulo), then checks a second unbind fails on both sides.
    pub fn unbind_nth(&mut self, i: usize) {
        if self.live.is_empty() {
            return;
        }
        let id = self.live.swap_remove(i % self.live.len());
        assert_eq!(self.table.unbind(id), self.model.unbind(id));
        assert_eq!(self.table.unbind(id), Err(BindError::UnknownBinding(id)));
        assert_eq!(self.model.unbind(id), Err(BindError::UnknownBinding(id)));
    }

    /// Unbinds an id that may not exist.
    pub fn unbind_id(&mut self, id: BindingId) {
        assert_eq!(self.table.unbind(id), self.model.unbind(id));
        self.live.retain(|&x| x != id);
    }

    /// A lookup agrees: same group (prefix, ports, size) and a member of it.
    pub fn lookup(&self, p: Protocol, dst: IpAddr, port: u16) {
        let src: IpAddr = if dst.is_ipv4() {
            IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 200, 1))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1,
            ))
        };
        let want = self.model.lookup(p, dst, port);
        let snap = self.table.snapshot();
        for sport in [1u16, 2, 3] {
            let f = crate::Flow::new(src, sport, dst, port).expect("same family");
            match snap.lookup(p, &f) {
                None => assert!(
                    want.is_empty(),
                    "{p} {dst}:{port}: table none, model {want:?}"
                ),
                Some(h) => {
                    assert!(
                        want.iter().any(|(id, _)| *id == h.binding),
                        "{p} {dst}:{port}: table {h:?}, model {want:?}"
                    );
                    assert_eq!(h.members, want.len());
                    assert_eq!(h.prefix, want[0].1.prefix);
                    assert_eq!(h.ports, want[0].1.ports);
                }
            }
        }
        // The batched path agrees with the scalar one.
        let scalar = snap.group(p, dst, port).map(|g| (g.prefix(), g.ports()));
        let batched = match dst {
            IpAddr::V4(a) => {
                let mut out = [None];
                snap.group_batch_v4(p, &[(a, port)], &mut out);
                out[0].map(|g| (g.prefix(), g.ports()))
            }
            IpAddr::V6(a) => {
                let mut out = [None];
                snap.group_batch_v6(p, &[(a, port)], &mut out);
                out[0].map(|g| (g.prefix(), g.ports()))
            }
        };
        assert_eq!(scalar, batched);
    }

    /// Both sides hold the same number of bindings.
    pub fn check_len(&self) {
        assert_eq!(self.table.len(), self.model.bindings().len());
    }

    /// Decodes arbitrary bytes into operations over a small address space (so that prefixes nest
    /// and collide) and runs them: the fuzz target's body.
    pub fn run_bytes(data: &[u8]) {
        let Some((&first, mut rest)) = data.split_first() else {
            return;
        };
        let policy = if first & 1 == 0 {
            BindPolicy::Nested
        } else {
            BindPolicy::Exclusive
        };
        let mut d = Differential::new(policy);
        let addr = |b: &[u8]| -> IpAddr {
            if b[0] & 0x80 == 0 {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    0xC612_0000 | u32::from(b[1]) << 8 | u32::from(b[2] & 0x0f),
                ))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    u16::from(b[1] & 3) << 8,
                    0,
                    0,
                    0,
                    0,
                    u16::from(b[2] & 7),
                ))
            }
        };
        const PORTS: [crate::PortSpec; 8] = [
            crate::PortSpec::Exact(80),
            crate::PortSpec::Exact(81),
            crate::PortSpec::Range { lo: 80, hi: 81 },
            crate::PortSpec::Range { lo: 80, hi: 90 },
            crate::PortSpec::Range { lo: 85, hi: 95 },
            crate::PortSpec::Range { lo: 1, hi: 1023 },
            crate::PortSpec::Any,
            // Invalid on purpose: must be a typed error on both sides.
            crate::PortSpec::Range { lo: 9, hi: 3 },
        ];
        while rest.len() >= 5 {
            let (op, tail) = rest.split_at(5);
            rest = tail;
            let proto = if op[0] & 0x40 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            match op[0] & 3 {
                0 | 1 => {
                    let a = addr(op);
                    let max = if a.is_ipv4() { 33 } else { 129 };
                    let len = op[3] % max;
                    let net = IpNet::new(a, len).expect("len in range");
                    // Keep host bits sometimes: must be refused on both sides.
                    let net = if op[4] & 0x80 != 0 { net } else { net.trunc() };
                    let mut b = Binding::new(
                        proto,
                        net,
                        PORTS[usize::from(op[4] & 7)],
                        crate::ListenerId(u64::from(op[4] >> 3 & 3)),
                    );
                    b.reuseport = op[4] & 0x20 != 0;
                    d.bind(b);
                }
                2 => {
                    if op[1] & 0x80 == 0 {
                        d.unbind_nth(usize::from(op[2]));
                    } else {
                        d.unbind_id(BindingId(u64::from(op[2])));
                    }
                }
                _ => {
                    let port = [80, 81, 85, 90, 443, 0, 1023, 65535][usize::from(op[3] & 7)];
                    d.lookup(proto, addr(op), port);
                }
            }
        }
        d.check_len();
    }
}
