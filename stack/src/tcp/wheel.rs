//! A hashed timing wheel: O(1) arm, lazy cancel, 1 ms ticks.
//!
//! Entries carry an id (a connection) and an absolute deadline. Cancelling is the owner's job:
//! when an entry fires, the owner checks whether it still wants that deadline (each connection
//! keeps one armed deadline, its earliest timer, and re-arms after handling). The slots hold
//! only the current turn (4,096 ticks); later deadlines (TIME-WAIT's minute, keepalive) wait in
//! a heap and move into their slot when the wheel reaches their turn, so that neither expiry nor
//! the next-deadline question ever walks over entries that are not due this turn.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

const SLOTS: usize = 4096;
const TICK: Duration = Duration::from_millis(1);

/// The wheel.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<(u64, u32)>>,
    /// Entries due after the current turn, earliest first.
    far: BinaryHeap<Reverse<(u64, u32)>>,
    /// The next tick to visit.
    tick: u64,
    len: usize,
    /// A tick at or before the earliest entry, once known, so that asking for the next
    /// deadline (every poll round) does not look again.
    earliest: std::cell::Cell<Option<u64>>,
    /// One bit per slot holding entries, so that a search skips empty slots 64 at a time.
    occupied: [u64; SLOTS / 64],
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

fn ticks(t: Duration) -> u64 {
    (t.as_nanos() / TICK.as_nanos()) as u64
}

impl TimerWheel {
    /// An empty wheel at time zero.
    pub fn new() -> Self {
        TimerWheel {
            // Room for two entries per slot from the start (128 KiB): a slot's list would
            // otherwise allocate the first time a deadline lands in it, which with few
            // connections goes on for minutes of traffic.
            slots: (0..SLOTS).map(|_| Vec::with_capacity(2)).collect(),
            far: BinaryHeap::new(),
            tick: 0,
            len: 0,
            earliest: std::cell::Cell::new(None),
            occupied: [0; SLOTS / 64],
        }
    }

    /// Entries held (live and stale).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn place(&mut self, t: u64, id: u32) {
        if t >= self.tick + SLOTS as u64 {
            self.far.push(Reverse((t, id)));
            return;
        }
        let i = (t as usize) % SLOTS;
        self.slots[i].push((t, id));
        self.occupied[i / 64] |= 1 << (i % 64);
    }

    /// Arms `id` to fire at `at` (rounded up to the next tick; never in the past).
    pub fn arm(&mut self, id: u32, at: Duration) {
        let t = ticks(at + TICK - Duration::from_nanos(1)).max(self.tick);
        self.place(t, id);
        self.len += 1;
        if let Some(e) = self.earliest.get() {
            self.earliest.set(Some(e.min(t)));
        }
    }

    /// Moves every entry due at `now` into `out`.
    pub fn expire(&mut self, now: Duration, out: &mut Vec<u32>) {
        let target = ticks(now);
        if self.earliest.get().is_some_and(|e| e <= target) {
            self.earliest.set(None);
        }
        if self.len == 0 {
            self.tick = self.tick.max(target + 1);
            return;
        }
        // Visit each slot at most once, however far time jumped.
        let last = target.min(self.tick + SLOTS as u64 - 1);
        while self.tick <= last {
            let i = (self.tick as usize) % SLOTS;
            if self.occupied[i / 64] & (1 << (i % 64)) != 0 {
                // A slot holds only this turn's entries: all of them are due.
                let slot = &mut self.slots[i];
                self.len -= slot.len();
                out.extend(slot.drain(..).map(|(_, id)| id));
                self.occupied[i / 64] &= !(1 << (i % 64));
            }
            self.tick += 1;
        }
        self.tick = self.tick.max(target + 1);
        // Entries of the turn now begun (or already due, after a long jump) come in.
        while let Some(&Reverse((t, id))) = self.far.peek() {
            if t >= self.tick + SLOTS as u64 {
                break;
            }
            self.far.pop();
            if t <= target {
                out.push(id);
                self.len -= 1;
            } else {
                self.place(t, id);
            }
        }
    }

    /// A time at or before the earliest entry, if any.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        if let Some(e) = self.earliest.get() {
            return Some(TICK * e as u32);
        }
        let found = self.search();
        self.earliest.set(Some(found));
        Some(TICK * found as u32)
    }

    /// The earliest entry's tick: the first occupied slot of the turn, else the heap's top.
    fn search(&self) -> u64 {
        let mut k = 0u64;
        while k < SLOTS as u64 {
            let i = ((self.tick + k) as usize) % SLOTS;
            let rest = self.occupied[i / 64] >> (i % 64);
            if rest == 0 {
                k += 64 - (i % 64) as u64;
                continue;
            }
            k += u64::from(rest.trailing_zeros());
            if k < SLOTS as u64 {
                return self.tick + k;
            }
        }
        self.far
            .peek()
            .map_or(self.tick + SLOTS as u64, |Reverse((t, _))| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn fires_in_order_of_ticks_and_later_rounds_wait() {
        let mut w = TimerWheel::new();
        w.arm(1, ms(5));
        w.arm(2, ms(3));
        w.arm(3, ms(5000)); // a later round of the same slot region
        w.arm(4, Duration::from_micros(5500)); // rounds up to 6 ms
        assert_eq!(w.next_deadline(), Some(ms(3)));
        let mut out = Vec::new();
        w.expire(ms(4), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        w.expire(ms(5), &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        w.expire(ms(6), &mut out);
        assert_eq!(out, vec![4]);
        out.clear();
        w.expire(ms(4999), &mut out);
        assert!(out.is_empty());
        w.expire(ms(5000), &mut out);
        assert_eq!(out, vec![3]);
        assert!(w.is_empty());
        // Arming in the past fires at the next expiry.
        w.arm(9, ms(1));
        w.expire(ms(5001), &mut out);
        assert_eq!(out, vec![3, 9]);
    }

    #[test]
    fn matches_a_naive_list_under_random_arms_and_jumps() {
        let mut w = TimerWheel::new();
        let mut naive: Vec<(u64, u32)> = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut now = 0u64;
        let mut out = Vec::new();
        for id in 0..20_000u32 {
            if rnd(3) > 0 {
                // Mostly near, sometimes several turns away.
                let span = if rnd(10) == 0 { 20_000 } else { 300 };
                let at = now + rnd(span);
                w.arm(id, ms(at));
                naive.push((at.max(now + 1).max(w.tick), id));
            } else {
                let span = if rnd(20) == 0 { 9000 } else { 50 };
                now += rnd(span);
                out.clear();
                w.expire(ms(now), &mut out);
                out.sort();
                let mut due: Vec<u32> = naive.iter().filter(|e| e.0 <= now).map(|e| e.1).collect();
                due.sort();
                naive.retain(|e| e.0 > now);
                assert_eq!(out, due, "at {now}");
            }
            // The deadline given is at or before the earliest entry, and within a turn of now.
            let min = naive.iter().map(|e| e.0).min();
            match (w.next_deadline(), min) {
                (None, None) => {}
                (Some(d), Some(m)) => assert!(d <= ms(m), "{d:?} after {m} ms"),
                (d, m) => panic!("{d:?} vs {m:?}"),
            }
        }
    }

    #[test]
    fn a_long_jump_visits_each_slot_once() {
        let mut w = TimerWheel::new();
        for i in 0..100 {
            w.arm(i, ms(u64::from(i) * 97));
        }
        let mut out = Vec::new();
        w.expire(Duration::from_secs(3600), &mut out);
        out.sort();
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert!(w.is_empty());
    }
}
