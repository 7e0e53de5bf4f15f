//! A hashed timing wheel: O(1) arm, lazy cancel, 1 ms ticks.
//!
//! Entries carry an id (a connection) and an absolute deadline. Cancelling is the owner's job:
//! when an entry fires, the owner checks whether it still wants that deadline (each connection
//! keeps one armed deadline, its earliest timer, and re-arms after handling). Slots are visited
//! once per tick; an entry whose deadline is a later round stays in its slot.

use std::time::Duration;

const SLOTS: usize = 4096;
const TICK: Duration = Duration::from_millis(1);

/// The wheel.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<(u64, u32)>>,
    /// The next tick to visit.
    tick: u64,
    len: usize,
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
            slots: vec![Vec::new(); SLOTS],
            tick: 0,
            len: 0,
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

    /// Arms `id` to fire at `at` (rounded up to the next tick; never in the past).
    pub fn arm(&mut self, id: u32, at: Duration) {
        let t = ticks(at + TICK - Duration::from_nanos(1)).max(self.tick);
        self.slots[(t as usize) % SLOTS].push((t, id));
        self.len += 1;
    }

    /// Moves every entry due at `now` into `out`.
    pub fn expire(&mut self, now: Duration, out: &mut Vec<u32>) {
        let target = ticks(now);
        if self.len == 0 {
            self.tick = self.tick.max(target + 1);
            return;
        }
        // Visit each slot at most once, however far time jumped.
        let last = target.min(self.tick + SLOTS as u64 - 1);
        while self.tick <= last {
            let slot = &mut self.slots[(self.tick as usize) % SLOTS];
            let before = slot.len();
            slot.retain(|&(t, id)| {
                if t <= target {
                    out.push(id);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            self.tick += 1;
        }
        self.tick = self.tick.max(target + 1);
    }

    /// A time at or before the earliest entry (exact within the next wheel turn), if any.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        for k in 0..SLOTS as u64 {
            let slot = &self.slots[((self.tick + k) as usize) % SLOTS];
            if let Some(t) = slot
                .iter()
                .map(|e| e.0)
                .filter(|&t| t < self.tick + SLOTS as u64)
                .min()
            {
                return Some(TICK * t as u32);
            }
        }
        // Only later rounds: wake up after one turn to look again.
        Some(TICK * (self.tick + SLOTS as u64) as u32)
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
