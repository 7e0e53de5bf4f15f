//! Neighbour cache for the stack's own sends (ARP for IPv4, NDP for IPv6): bounded, with expiry,
//! retries, and a bounded queue of frames waiting for each resolution.
//!
//! Only next hops the stack sends to have entries; the stack answers ARP/NDP for its local
//! addresses without any per-address state.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::DerefMut;
use std::time::Duration;

use subnetstack_ifaces::Mac;

/// Limits and timers.
#[derive(Clone, Debug)]
pub struct NeighborConfig {
    /// Most entries.
    pub capacity: usize,
    /// Bytes of frames queued per unresolved neighbour (a whole fragmented 64 KiB datagram fits).
    pub pending_bytes: usize,
    /// How long a learned address stays usable.
    pub reachable: Duration,
    /// Time between solicitations.
    pub retry: Duration,
    /// Solicitations before giving up.
    pub tries: u8,
}

impl Default for NeighborConfig {
    fn default() -> Self {
        NeighborConfig {
            capacity: 1024,
            pending_bytes: 128 * 1024,
            reachable: Duration::from_secs(30),
            retry: Duration::from_secs(1),
            tries: 3,
        }
    }
}

#[derive(Debug)]
enum State {
    Reachable {
        mac: Mac,
        expires: Duration,
    },
    /// Past its reachable time but still used, as Linux's STALE/PROBE: frames keep going to
    /// the last known MAC while solicitations check it (queueing every frame behind a new
    /// resolution would stall a busy connection for a round trip, and overflow the queue).
    /// Copies of what is sent meanwhile wait in `pending`: if the answer names another MAC,
    /// they go again to it (the first copies went nowhere); if it confirms, they are dropped.
    Stale {
        mac: Mac,
        next_try: Duration,
        tries: u8,
    },
    Incomplete {
        next_try: Duration,
        tries: u8,
    },
}

#[derive(Debug)]
struct Entry<F> {
    state: State,
    /// Our address to solicit from (the source of the first packet that needed this neighbour).
    src: IpAddr,
    /// Whole frames whose destination MAC is to be filled in.
    pending: VecDeque<F>,
}

/// What to do with a frame for a next hop.
#[derive(Debug)]
pub enum Resolve<F = Vec<u8>> {
    /// Send now to this MAC.
    Send(Mac, F),
    /// Send now to this (stale) MAC, and send a solicitation to confirm it.
    SendAndSolicit(Mac, F),
    /// Queued; send a solicitation now if `solicit`.
    Queued {
        /// A solicitation is due.
        solicit: bool,
    },
    /// Not queued: cache or queue full (the frame is handed back for recycling).
    Dropped(F, crate::DropReason),
}

/// The cache. `F` is the frame type it queues: bytes (its first six are the destination MAC,
/// filled in on resolution), possibly with metadata beside them.
#[derive(Debug)]
pub struct NeighborCache<F = Vec<u8>> {
    cfg: NeighborConfig,
    map: HashMap<IpAddr, Entry<F>>,
    /// At or before the earliest retry (exact after `poll`): `next_deadline` is asked every
    /// poll round and must not walk the map.
    earliest: Option<Duration>,
}

impl<F> Default for NeighborCache<F> {
    fn default() -> Self {
        NeighborCache {
            cfg: NeighborConfig::default(),
            map: HashMap::new(),
            earliest: None,
        }
    }
}

impl<F: DerefMut<Target = [u8]> + Clone> NeighborCache<F> {
    /// An empty cache.
    pub fn new(cfg: NeighborConfig) -> Self {
        NeighborCache {
            cfg,
            map: HashMap::new(),
            earliest: None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The MAC of a resolved neighbour (one being re-checked included).
    pub fn get(&self, ip: IpAddr, now: Duration) -> Option<Mac> {
        match self.map.get(&ip)?.state {
            State::Reachable { mac, expires } if expires > now => Some(mac),
            State::Stale { mac, .. } => Some(mac),
            _ => None,
        }
    }

    /// Makes room for one entry; false if none can be evicted.
    fn make_room(&mut self, now: Duration) -> bool {
        if self.map.len() < self.cfg.capacity {
            return true;
        }
        // Evict the reachable entry that expires first (expired ones first of all).
        let victim = self
            .map
            .iter()
            .filter_map(|(ip, e)| match e.state {
                State::Reachable { expires, .. } if e.pending.is_empty() => {
                    Some((expires.min(now), *ip))
                }
                _ => None,
            })
            .min_by_key(|(t, _)| *t)
            .map(|(_, ip)| ip);
        match victim {
            Some(ip) => {
                self.map.remove(&ip);
                true
            }
            None => false,
        }
    }

    /// Resolves `ip` for `frame` (a whole frame, destination MAC to be set) sent from our
    /// address `src`.
    pub fn resolve(&mut self, ip: IpAddr, src: IpAddr, frame: F, now: Duration) -> Resolve<F> {
        let retry = self.cfg.retry;
        if let Some(e) = self.map.get_mut(&ip) {
            match &mut e.state {
                State::Reachable { mac, expires } if *expires > now => {
                    return Resolve::Send(*mac, frame);
                }
                State::Reachable { mac, .. } => {
                    // Expired while in use: keep sending, and check.
                    let mac = *mac;
                    e.src = src;
                    e.state = State::Stale {
                        mac,
                        next_try: now + retry,
                        tries: 1,
                    };
                    Self::keep_copy(e, &frame, self.cfg.pending_bytes);
                    self.note(now + retry);
                    return Resolve::SendAndSolicit(mac, frame);
                }
                State::Stale { mac, .. } => {
                    let mac = *mac;
                    Self::keep_copy(e, &frame, self.cfg.pending_bytes);
                    return Resolve::Send(mac, frame);
                }
                State::Incomplete { .. } => {}
            }
        }
        if !self.map.contains_key(&ip) && !self.make_room(now) {
            return Resolve::Dropped(frame, crate::DropReason::NeighborCacheFull);
        }
        let cfg = &self.cfg;
        let e = self.map.entry(ip).or_insert_with(|| Entry {
            state: State::Incomplete {
                next_try: now,
                tries: 0,
            },
            src,
            pending: VecDeque::new(),
        });
        if e.pending.iter().map(|f| f.len()).sum::<usize>() + frame.len() > cfg.pending_bytes {
            return Resolve::Dropped(frame, crate::DropReason::NeighborQueueFull);
        }
        e.pending.push_back(frame);
        let State::Incomplete { next_try, tries } = &mut e.state else {
            unreachable!("set above")
        };
        let solicit = *next_try <= now;
        if solicit {
            *tries += 1;
            *next_try = now + cfg.retry;
        }
        let t = *next_try;
        self.note(t);
        Resolve::Queued { solicit }
    }

    /// Notes a retry time, for `next_deadline`.
    fn note(&mut self, t: Duration) {
        self.earliest = Some(self.earliest.map_or(t, |e| e.min(t)));
    }

    /// Keeps a copy of a frame sent to a stale MAC, within the queue's budget.
    fn keep_copy(e: &mut Entry<F>, frame: &F, budget: usize) {
        if e.pending.iter().map(|f| f.len()).sum::<usize>() + frame.len() <= budget {
            e.pending.push_back(frame.clone());
        }
    }

    /// Records that `ip` is at `mac`. Creates an entry only if `create` (the message was addressed
    /// to us); otherwise refreshes an existing one. Returns frames that were waiting, addressed.
    pub fn learn(&mut self, ip: IpAddr, mac: Mac, now: Duration, create: bool) -> Vec<F> {
        if !self.map.contains_key(&ip) && (!create || !self.make_room(now)) {
            return Vec::new();
        }
        let e = self.map.entry(ip).or_insert_with(|| Entry {
            state: State::Incomplete {
                next_try: now,
                tries: 0,
            },
            src: ip,
            pending: VecDeque::new(),
        });
        if matches!(e.state, State::Stale { mac: old, .. } if old == mac) {
            // Confirmed: what was sent meanwhile arrived.
            e.pending.clear();
        }
        e.state = State::Reachable {
            mac,
            expires: now + self.cfg.reachable,
        };
        e.pending
            .drain(..)
            .map(|mut f| {
                f[..6].copy_from_slice(&mac);
                f
            })
            .collect()
    }

    /// Timers: returns the neighbours to solicit again (with the address to solicit from), and
    /// the frames dropped for neighbours that never answered.
    pub fn poll(&mut self, now: Duration) -> (Vec<(IpAddr, IpAddr)>, Vec<F>) {
        let mut again = Vec::new();
        let mut dead: Vec<(IpAddr, Vec<F>)> = Vec::new();
        let tries = self.cfg.tries;
        let retry = self.cfg.retry;
        self.map.retain(|ip, e| match &mut e.state {
            State::Stale {
                next_try, tries: t, ..
            } if *next_try <= now => {
                if *t >= tries {
                    // The old address no longer answers: forget it (the next frame resolves
                    // afresh; the copies were sent once already).
                    false
                } else {
                    *t += 1;
                    *next_try = now + retry;
                    again.push((*ip, e.src));
                    true
                }
            }
            State::Incomplete { next_try, tries: t } if *next_try <= now => {
                if *t >= tries {
                    dead.push((*ip, e.pending.drain(..).collect()));
                    false
                } else {
                    *t += 1;
                    *next_try = now + retry;
                    again.push((*ip, e.src));
                    true
                }
            }
            State::Reachable { expires, .. } => {
                *expires + retry * 60 > now || !e.pending.is_empty()
            }
            _ => true,
        });
        self.earliest = self
            .map
            .values()
            .filter_map(|e| match e.state {
                State::Incomplete { next_try, .. } | State::Stale { next_try, .. } => {
                    Some(next_try)
                }
                State::Reachable { .. } => None,
            })
            .min();
        // The map's order is random per process; sort so that a simulation replays exactly.
        again.sort();
        dead.sort_by_key(|d| d.0);
        (again, dead.into_iter().flat_map(|d| d.1).collect())
    }

    /// When [`poll`](Self::poll) next has work (possibly earlier: `poll` then finds nothing to
    /// do and recomputes it).
    pub fn next_deadline(&self) -> Option<Duration> {
        self.earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [2, 0, 0, 0, 0, 9];

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 255, n))
    }

    #[test]
    fn queue_solicit_learn_flush() {
        let mut c = NeighborCache::<Vec<u8>>::new(NeighborConfig::default());
        let t = Duration::from_secs(1);
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![0; 20], t),
            Resolve::Queued { solicit: true }
        ));
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![1; 20], t),
            Resolve::Queued { solicit: false }
        ));
        let flushed = c.learn(ip(1), MAC, t, false);
        assert_eq!(flushed.len(), 2);
        assert!(flushed.iter().all(|f| f[..6] == MAC));
        assert!(matches!(c.resolve(ip(1), ip(9), vec![0; 20], t), Resolve::Send(m, _) if m == MAC));
        // Past its reachable time, a used entry keeps its MAC and is checked again...
        let later = t + Duration::from_secs(31);
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![0; 20], later),
            Resolve::SendAndSolicit(m, _) if m == MAC
        ));
        assert!(
            matches!(c.resolve(ip(1), ip(9), vec![0; 20], later), Resolve::Send(m, _) if m == MAC)
        );
        // ...an answer makes it reachable again (confirming: nothing to send again)...
        assert!(c.learn(ip(1), MAC, later, false).is_empty());
        assert_eq!(c.get(ip(1), later + Duration::from_secs(29)), Some(MAC));
        // ...and silence to every check forgets it.
        let stale = later + Duration::from_secs(31);
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![0; 20], stale),
            Resolve::SendAndSolicit(..)
        ));
        let mut checks = 1;
        for s in 1..10 {
            checks += c.poll(stale + Duration::from_secs(s)).0.len();
        }
        assert_eq!(checks, 3, "three checks in all");
        assert_eq!(c.get(ip(1), stale + Duration::from_secs(10)), None);
        // A stale MAC that turns out wrong: what was sent to it goes again to the right one.
        let t2 = stale + Duration::from_secs(100);
        c.learn(ip(2), [2, 0, 0, 0, 0, 1], t2, true);
        let t3 = t2 + Duration::from_secs(31);
        assert!(matches!(
            c.resolve(ip(2), ip(9), vec![7; 20], t3),
            Resolve::SendAndSolicit(..)
        ));
        assert!(matches!(
            c.resolve(ip(2), ip(9), vec![8; 20], t3),
            Resolve::Send(..)
        ));
        let again = c.learn(ip(2), MAC, t3, false);
        assert_eq!(again.len(), 2, "both sent again");
        assert!(again.iter().all(|f| f[..6] == MAC));
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![0; 20], stale + Duration::from_secs(10)),
            Resolve::Queued { solicit: true }
        ));
    }

    #[test]
    fn learning_unsolicited_needs_create() {
        let mut c = NeighborCache::<Vec<u8>>::new(NeighborConfig::default());
        c.learn(ip(2), MAC, Duration::ZERO, false);
        assert!(c.is_empty());
        c.learn(ip(2), MAC, Duration::ZERO, true);
        assert_eq!(c.get(ip(2), Duration::ZERO), Some(MAC));
    }

    #[test]
    fn retries_then_gives_up_and_bounds_hold() {
        let cfg = NeighborConfig {
            capacity: 2,
            pending_bytes: 40,
            ..Default::default()
        };
        let mut c = NeighborCache::<Vec<u8>>::new(cfg);
        let t0 = Duration::ZERO;
        c.resolve(ip(1), ip(9), vec![0; 20], t0);
        c.resolve(ip(1), ip(9), vec![0; 20], t0);
        assert!(matches!(
            c.resolve(ip(1), ip(9), vec![0; 20], t0),
            Resolve::Dropped(_, crate::DropReason::NeighborQueueFull)
        ));
        c.resolve(ip(2), ip(9), vec![0; 20], t0);
        assert!(matches!(
            c.resolve(ip(3), ip(9), vec![0; 20], t0),
            Resolve::Dropped(_, crate::DropReason::NeighborCacheFull)
        ));
        let mut solicits = 0;
        let mut dead = 0;
        for s in 1..10 {
            let (again, d) = c.poll(Duration::from_secs(s));
            solicits += again.len();
            dead += d.len();
        }
        assert_eq!(solicits, 4, "two more tries each after the first");
        assert_eq!(dead, 3);
        assert!(c.is_empty());
    }
}
