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
