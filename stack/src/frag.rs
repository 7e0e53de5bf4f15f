//! Reassembly of IPv4 and IPv6 fragments with bounded memory and a timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::DropReason;

/// Limits.
#[derive(Clone, Debug)]
pub struct ReassemblyConfig {
    /// Reassemble at all (off: every fragment is a counted drop).
    pub enabled: bool,
    /// Bytes held across all partial datagrams.
    pub max_bytes: usize,
    /// How long a partial datagram may wait for its missing fragments.
    pub timeout: Duration,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            enabled: true,
            max_bytes: 4 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A datagram's identity: addresses, protocol (IPv4; the IPv6 next header) and identification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source.
    pub src: IpAddr,
    /// Destination.
    pub dst: IpAddr,
    /// IPv4 protocol (0 for IPv6, whose next header travels in the first fragment).
    pub proto: u8,
    /// Identification.
    pub ident: u32,
}

#[derive(Debug)]
struct Partial {
    data: Vec<u8>,
    /// Received byte ranges, sorted, disjoint.
    have: Vec<(usize, usize)>,
    total: Option<usize>,
    deadline: Duration,
    /// Next header from the first fragment (IPv6).
    next: Option<u8>,
}

/// Partial datagrams.
#[derive(Debug, Default)]
pub struct Reassembler {
    cfg: ReassemblyConfig,
    used: usize,
    map: HashMap<FragKey, Partial>,
    /// At or before the earliest deadline (exact after `poll`): `next_deadline` is asked every
    /// poll round and must not walk the map.
    earliest: Option<Duration>,
}

/// A completed datagram.
#[derive(Debug)]
pub struct Complete {
    /// The reassembled payload.
    pub payload: Vec<u8>,
    /// The next header carried by the first fragment (IPv6), if recorded.
    pub next: Option<u8>,
}

impl Reassembler {
    /// Empty.
    pub fn new(cfg: ReassemblyConfig) -> Self {
        Reassembler {
            cfg,
            used: 0,
            map: HashMap::new(),
            earliest: None,
        }
    }

    /// Bytes held.
    pub fn used(&self) -> usize {
        self.used
    }

    fn forget(&mut self, key: &FragKey) {
        if let Some(p) = self.map.remove(key) {
            self.used -= p.data.capacity();
        }
    }

    /// Adds a fragment at byte `offset`; `more` is the more-fragments flag; `next` the next header
    /// (IPv6, first fragment). Returns the whole payload when the datagram is complete.
    pub fn add(
        &mut self,
        key: FragKey,
        offset: usize,
        more: bool,
        data: &[u8],
        next: Option<u8>,
        now: Duration,
    ) -> Result<Option<Complete>, DropReason> {
        if !self.cfg.enabled {
            return Err(DropReason::FragDisabled);
        }
        let end = offset + data.len();
        if end > 65535 {
            self.forget(&key);
            return Err(DropReason::FragTooBig);
        }
        // Every fragment but the last carries a multiple of 8 bytes.
        if more && (data.is_empty() || data.len() % 8 != 0) {
            return Err(DropReason::FragMalformed);
        }
        if !self.map.contains_key(&key) {
            let d = now + self.cfg.timeout;
            self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
            self.map.insert(
                key,
                Partial {
                    data: Vec::new(),
                    have: Vec::new(),
                    total: None,
                    deadline: now + self.cfg.timeout,
                    next: None,
                },
            );
        }
        let p = self.map.get_mut(&key).expect("inserted");
        if p.have.iter().any(|&(s, e)| offset < e && s < end) {
            self.forget(&key);
            return Err(DropReason::FragOverlap);
        }
        if !more {
            if p.total.is_some_and(|t| t != end) || p.have.iter().any(|&(_, e)| e > end) {
                self.forget(&key);
                return Err(DropReason::FragMalformed);
            }
            p.total = Some(end);
        } else if p.total.is_some_and(|t| end > t) {
            self.forget(&key);
            return Err(DropReason::FragMalformed);
        }
        if p.data.len() < end {
            let grow = end.max(p.data.capacity()) - p.data.capacity();
            if self.used + grow > self.cfg.max_bytes {
                self.forget(&key);
                return Err(DropReason::FragNoMemory);
            }
            let before = p.data.capacity();
            p.data.resize(end, 0);
            self.used += p.data.capacity() - before;
        }
        p.data[offset..end].copy_from_slice(data);
        if offset == 0 {
            p.next = next;
        }
        let at = p.have.partition_point(|&(s, _)| s < offset);
        p.have.insert(at, (offset, end));
        // Complete when the ranges cover 0..total without a gap.
        let complete = p.total.is_some_and(|t| {
            let mut covered = 0;
            for &(s, e) in &p.have {
                if s != covered {
                    return false;
                }
                covered = e;
            }
            covered == t
        });
        if !complete {
            return Ok(None);
        }
        let p = self.map.remove(&key).expect("present");
        self.used -= p.data.capacity();
        Ok(Some(Complete {
            payload: p.data,
            next: p.next,
        }))
    }

    /// Drops partial datagrams past their deadline; returns how many.
    pub fn poll(&mut self, now: Duration) -> usize {
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|_, p| {
            let keep = p.deadline > now;
            if !keep {
                freed += p.data.capacity();
            }
            keep
        });
        self.used -= freed;
        self.earliest = self.map.values().map(|p| p.deadline).min();
        before - self.map.len()
    }

    /// The earliest deadline (possibly earlier than any, after completions: `poll` then finds
    /// nothing to do and recomputes it).
    pub fn next_deadline(&self) -> Option<Duration> {
        self.earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> FragKey {
        FragKey {
            src: "198.19.255.1".parse().unwrap(),
            dst: "198.18.1.1".parse().unwrap(),
            proto: 17,
            ident: id,
        }
    }

    #[test]
    fn any_order_completes() {
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let t = Duration::ZERO;
        assert!(r
            .add(key(1), 2000, false, &data[2000..], None, t)
            .unwrap()
            .is_none());
        assert!(r
            .add(key(1), 0, true, &data[..1000], Some(17), t)
            .unwrap()
            .is_none());
        let c = r
            .add(key(1), 1000, true, &data[1000..2000], None, t)
            .unwrap()
            .unwrap();
        assert_eq!(c.payload, data);
        assert_eq!(c.next, Some(17));
        assert_eq!(r.used(), 0);
    }

    #[test]
    fn overlap_size_memory_and_timeout_are_drops() {
        let mut r = Reassembler::new(ReassemblyConfig {
            max_bytes: 4000,
            ..Default::default()
        });
        let t = Duration::ZERO;
        r.add(key(1), 0, true, &[0; 16], None, t).unwrap();
        assert_eq!(
            r.add(key(1), 8, true, &[0; 16], None, t).unwrap_err(),
            DropReason::FragOverlap
        );
        assert_eq!(
            r.add(key(2), 65528, false, &[0; 16], None, t).unwrap_err(),
            DropReason::FragTooBig
        );
        assert_eq!(
            r.add(key(3), 0, true, &[0; 7], None, t).unwrap_err(),
            DropReason::FragMalformed
        );
        assert_eq!(
            r.add(key(4), 8000, true, &[0; 8], None, t).unwrap_err(),
            DropReason::FragNoMemory
        );
        r.add(key(5), 0, true, &[0; 800], None, t).unwrap();
        assert!(r.used() <= 4000);
        assert_eq!(r.poll(Duration::from_secs(31)), 1);
        assert_eq!(r.used(), 0);
        let mut off = Reassembler::new(ReassemblyConfig {
            enabled: false,
            ..Default::default()
        });
        assert_eq!(
            off.add(key(1), 0, true, &[0; 8], None, t).unwrap_err(),
            DropReason::FragDisabled
        );
    }
}
