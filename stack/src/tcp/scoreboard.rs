//! The sender's scoreboard: one record per segment in flight (its range, when it was last sent,
//! whether the peer SACKed it, whether it is deemed lost), and loss detection by RACK
//! (RFC 8985): a segment is lost once a segment sent sufficiently later has been delivered.
//! Time-based detection also finds lost retransmissions and needs no duplicate-ACK count, so
//! small windows recover without waiting for a timeout. RFC 6675's duplicate-threshold rule is
//! kept beside it.

use std::collections::VecDeque;
use std::time::Duration;

use super::seq::Seq;

/// Segments SACKed above a hole that make it lost (RFC 6675 DupThresh).
pub const DUP_THRESH: u32 = 3;

#[derive(Clone, Copy, Debug)]
struct Rec {
    start: Seq,
    end: Seq,
    /// Last transmission, microseconds of the connection's clock.
    sent: u64,
    rexmit: bool,
    sacked: bool,
    lost: bool,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// What an acknowledgement told the scoreboard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Bytes newly SACKed.
    pub newly_sacked: u32,
    /// A D-SACK block was present (a duplicate was received).
    pub dsack: bool,
}

/// What RACK learns from deliveries (RFC 8985 6.2).
#[derive(Clone, Copy, Debug, Default)]
struct Rack {
    /// The most recently sent segment known delivered: its send time and end.
    sent: Option<u64>,
    end: Seq,
    /// RTT of that segment, µs.
    rtt: u64,
    /// Smallest RTT seen, µs.
    min_rtt: Option<u64>,
    /// Reordering was observed (a segment delivered after a later-sent one, or a D-SACK).
    reordering: bool,
}

impl Rack {
    /// A segment sent at `sent` (µs) and ending at `end` was delivered at `t`.
    fn deliver(&mut self, t: u64, sent: u64, end: Seq, rexmit: bool) {
        let rtt = t.saturating_sub(sent);
        // An ACK sooner than the minimum RTT after a retransmission answers the original
        // transmission: no information about the retransmission (RFC 8985 6.2 step 2).
        if rexmit && self.min_rtt.is_some_and(|m| rtt < m) {
            return;
        }
        if !rexmit {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        match self.sent {
            Some(s) if sent < s || (sent == s && end <= self.end) => {
                // Delivered after something sent later: reordering, unless retransmitted.
                if !rexmit && end < self.end {
                    self.reordering = true;
                }
            }
            _ => {
                self.sent = Some(sent);
                self.end = end;
                self.rtt = rtt;
            }
        }
    }
}

/// In-flight segments and RACK state.
#[derive(Clone, Debug, Default)]
pub struct Scoreboard {
    recs: VecDeque<Rec>,
    rack: Rack,
    /// Multiplier of the reordering window, raised by each D-SACK (a retransmission proved
    /// spurious) and reset after 16 recoveries without one (RFC 8985 6.2 step 4).
    reo_mult: u32,
    recoveries_left: u32,
    /// Records SACKed, and records lost and not SACKed: kept so that the questions asked per
    /// segment sent are O(1) when the answer is "none".
    sacked_n: usize,
    lost_n: usize,
}

thread_local! {
    /// Record lists of scoreboards that emptied: a keep-alive connection's list empties after
    /// every exchange and an idle one holds none, so without these every response would
    /// allocate one. Small lists only, at most 256 per thread.
    static SPARE: std::cell::RefCell<Vec<VecDeque<Rec>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty record list, with room from a spare one if there is one.
fn take_list() -> VecDeque<Rec> {
    SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keeps an emptied record list's storage for the next scoreboard (if small and room).
fn give_list(mut l: VecDeque<Rec>) {
    if l.capacity() == 0 || l.capacity() > 16 {
        return;
    }
    l.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < 256 {
            s.push(l);
        }
    });
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        give_list(std::mem::take(&mut self.recs));
    }
}

impl Scoreboard {
    /// Forgets everything (the connection ended, or the peer may have reneged).
    pub fn clear(&mut self) {
        give_list(std::mem::take(&mut self.recs));
        self.recount();
    }

    fn recount(&mut self) {
        self.sacked_n = self.recs.iter().filter(|r| r.sacked).count();
        self.lost_n = self.recs.iter().filter(|r| r.lost && !r.sacked).count();
    }

    /// Records that `[start, end)` was sent at `now` (new data, or a retransmission).
    pub fn on_send(&mut self, start: Seq, end: Seq, now: Duration) {
        if end <= start {
            return;
        }
        let t = us(now);
        match self.recs.back() {
            None => {}
            Some(last) if start >= last.end => {}
            _ => {
                // A retransmission: refresh the records it covers (splitting at its edges).
                self.split_at(start);
                self.split_at(end);
                for r in self.recs.iter_mut() {
                    if r.start >= start && r.end <= end {
                        r.sent = t;
                        r.rexmit = true;
                        r.lost = false;
                    }
                }
                self.recount();
                return;
            }
        }
        if self.recs.capacity() == 0 {
            self.recs = take_list();
        }
        self.recs.push_back(Rec {
            start,
            end,
            sent: t,
            rexmit: false,
            sacked: false,
            lost: false,
        });
    }

    /// Splits the record containing `at` (strictly inside) in two.
    fn split_at(&mut self, at: Seq) {
        let Some(i) = self.recs.iter().position(|r| r.start < at && at < r.end) else {
            return;
        };
        let mut right = self.recs[i];
        right.start = at;
        self.recs[i].end = at;
        self.recs.insert(i + 1, right);
    }

    /// Takes an acknowledgement: cumulative `ack` and SACK `blocks` (D-SACK blocks already
    /// filtered out by the caller and reported in `dsack`). Updates RACK's notion of the most
    /// recently delivered segment.
    pub fn on_ack(
        &mut self,
        now: Duration,
        ack: Seq,
        blocks: &[(Seq, Seq)],
        dsack: bool,
    ) -> AckOutcome {
        let t = us(now);
        let mut out = AckOutcome {
            dsack,
            ..Default::default()
        };
        if dsack {
            self.rack.reordering = true;
            self.reo_mult = (self.reo_mult.max(1) + 1).min(64);
            self.recoveries_left = 16;
        }
        for &(l, r) in blocks {
            self.split_at(l);
            self.split_at(r);
        }
        // RACK learns from each delivery in record order, with no allocation per ACK.
        let mut rack = self.rack;
        for rec in self.recs.iter_mut() {
            let acked = rec.end <= ack;
            let sacked_now = !rec.sacked
                && !acked
                && blocks.iter().any(|&(l, r)| l <= rec.start && rec.end <= r);
            if sacked_now {
                rec.sacked = true;
                out.newly_sacked += rec.end - rec.start;
            }
            if (acked && !rec.sacked) || sacked_now {
                rack.deliver(t, rec.sent, rec.end, rec.rexmit);
            }
        }
        self.rack = rack;
        while self.recs.front().is_some_and(|r| r.end <= ack) {
            self.recs.pop_front();
        }
        if let Some(f) = self.recs.front_mut() {
            if f.start < ack {
                f.start = ack;
            }
        }
        self.recount();
        if self.recs.is_empty() && self.recs.capacity() > 0 {
            // Idle connections hold no scoreboard memory.
            give_list(std::mem::take(&mut self.recs));
        }
        out
    }

    /// RACK's reordering window, µs (RFC 8985 6.2 step 4).
    fn reo_wnd(&self, in_recovery: bool, srtt: Duration) -> u64 {
        if !self.rack.reordering && (in_recovery || self.sacked_segments() >= DUP_THRESH as usize) {
            return 0;
        }
        (u64::from(self.reo_mult.max(1)) * self.rack.min_rtt.unwrap_or(0) / 4).min(us(srtt))
    }

    /// A loss recovery began: after 16 of them without a D-SACK the reordering window
    /// shrinks back.
    pub fn on_recovery(&mut self) {
        if self.recoveries_left > 0 {
            self.recoveries_left -= 1;
            if self.recoveries_left == 0 {
                self.reo_mult = 1;
            }
        }
    }

    fn sacked_segments(&self) -> usize {
        self.sacked_n
    }

    /// Marks lost segments (RACK, plus RFC 6675's DupThresh rule with `mss`). Returns whether any
    /// segment became lost, and when to look again (the reordering timer), if some segment
    /// may turn out lost later.
    pub fn detect_loss(
        &mut self,
        now: Duration,
        srtt: Duration,
        in_recovery: bool,
        mss: u32,
    ) -> (bool, Option<Duration>) {
        let t = us(now);
        let reo = self.reo_wnd(in_recovery, srtt);
        let mut newly = false;
        let mut timer: Option<u64> = None;
        if let Some(rs) = self.rack.sent {
            let (rack_end, rack_rtt) = (self.rack.end, self.rack.rtt);
            for r in self.recs.iter_mut() {
                if r.sacked || r.lost {
                    continue;
                }
                let before = r.sent < rs || (r.sent == rs && r.end < rack_end);
                if !before {
                    continue;
                }
                let due = r.sent + rack_rtt + reo;
                if due <= t {
                    r.lost = true;
                    newly = true;
                } else {
                    timer = Some(timer.map_or(due, |x: u64| x.max(due)));
                }
            }
        }
        // RFC 6675 IsLost: more than (DupThresh - 1) segments' worth SACKed above.
        let mut above = 0u32;
        for r in self.recs.iter_mut().rev() {
            if r.sacked {
                above += r.end - r.start;
            } else if above > (DUP_THRESH - 1) * mss && !r.lost && !r.rexmit {
                r.lost = true;
                newly = true;
            }
        }
        if newly {
            self.recount();
        }
        (newly, timer.map(Duration::from_micros))
    }

    /// After a retransmission timeout everything not SACKed is lost (RFC 8985 6.3).
    pub fn on_timeout(&mut self) {
        for r in self.recs.iter_mut().filter(|r| !r.sacked) {
            r.lost = true;
        }
        self.recount();
    }

    /// Forgets SACK marks (the peer may have reneged).
    pub fn forget_sacks(&mut self) {
        for r in self.recs.iter_mut() {
            r.sacked = false;
        }
        self.recount();
    }

    /// The first lost segment awaiting retransmission: `(seq, len)`, at most `max` bytes.
    pub fn next_lost(&self, max: u32) -> Option<(Seq, u32)> {
        if self.lost_n == 0 {
            return None;
        }
        self.recs
            .iter()
            .find(|r| r.lost && !r.sacked)
            .map(|r| (r.start, (r.end - r.start).min(max)))
    }

    /// Bytes believed in the network (RFC 6675 pipe): sent, not SACKed, not deemed lost.
    pub fn pipe(&self) -> u32 {
        self.recs
            .iter()
            .filter(|r| !r.sacked && !r.lost)
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Bytes SACKed above the cumulative ACK.
    pub fn sacked_bytes(&self) -> u32 {
        self.recs
            .iter()
            .filter(|r| r.sacked)
            .map(|r| r.end - r.start)
            .sum()
    }

    /// If `seq` lies in a SACKed segment, where that SACKed run ends.
    pub fn sacked_run_end(&self, seq: Seq) -> Option<Seq> {
        if self.sacked_n == 0 {
            return None;
        }
        let i = self
            .recs
            .iter()
            .position(|r| r.start <= seq && seq < r.end && r.sacked)?;
        let mut end = self.recs[i].end;
        for r in self.recs.iter().skip(i + 1) {
            if !r.sacked || r.start != end {
                break;
            }
            end = r.end;
        }
        Some(end)
    }

    /// The start of the first SACKed segment after `seq`.
    pub fn next_sacked_after(&self, seq: Seq) -> Option<Seq> {
        if self.sacked_n == 0 {
            return None;
        }
        self.recs
            .iter()
            .find(|r| r.sacked && r.start > seq)
            .map(|r| r.start)
    }

    /// The last segment sent (for a tail loss probe): `(seq, len)`.
    pub fn last(&self) -> Option<(Seq, u32)> {
        self.recs.back().map(|r| (r.start, r.end - r.start))
    }

    /// Whether any segment is deemed lost and not yet retransmitted.
    pub fn has_lost(&self) -> bool {
        self.lost_n > 0
    }

    /// SACKed ranges, merged (for diagnostics).
    pub fn sacked_ranges(&self) -> Vec<(Seq, Seq)> {
        let mut out: Vec<(Seq, Seq)> = Vec::new();
        for r in self.recs.iter().filter(|r| r.sacked) {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        out
    }

    /// Segments in flight (records).
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// No segment in flight.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Ten 100-byte segments from 1000, one per millisecond.
    fn sent_ten() -> Scoreboard {
        let mut b = Scoreboard::default();
        for k in 0..10u32 {
            b.on_send(Seq(1000 + k * 100), Seq(1100 + k * 100), MS * k);
        }
        b
    }

    #[test]
    fn sacked_data_is_skipped_and_holes_are_lost_by_dupthresh() {
        let mut b = sent_ten();
        // 1100..1200 and 1300..1700 SACKed: holes 1000 and 1200.
        let o = b.on_ack(
            MS * 20,
            Seq(1000),
            &[(Seq(1300), Seq(1700)), (Seq(1100), Seq(1200))],
            false,
        );
        assert_eq!(o.newly_sacked, 500);
        assert_eq!(b.sacked_run_end(Seq(1300)), Some(Seq(1700)));
        assert_eq!(b.next_sacked_after(Seq(1200)), Some(Seq(1300)));
        let (lost, _) = b.detect_loss(MS * 20, MS * 10, false, 100);
        assert!(lost);
        assert_eq!(b.next_lost(1000), Some((Seq(1000), 100)));
        // Retransmitting it clears its lost mark; the next hole is 1200.
        b.on_send(Seq(1000), Seq(1100), MS * 21);
        assert_eq!(b.next_lost(1000), Some((Seq(1200), 100)));
        // In the network: 1700..2000 (300) and the two retransmissions (200).
        b.on_send(Seq(1200), Seq(1300), MS * 21);
        assert_eq!(b.pipe(), 500);
    }

    #[test]
    fn rack_finds_a_single_loss_in_a_small_window_by_time() {
        // Two segments only: no duplicate-ACK rule can fire.
        let mut b = Scoreboard::default();
        b.on_send(Seq(0), Seq(100), Duration::ZERO);
        b.on_send(Seq(100), Seq(200), MS);
        b.on_ack(MS * 11, Seq(0), &[(Seq(100), Seq(200))], false);
        // Delivered segment sent at 1 ms with an RTT of 10 ms: segment 0 (sent at 0) is lost
        // once 0 + 10 ms + reo_wnd has passed; reo_wnd is min_rtt / 4 = 2.5 ms.
        let (lost, timer) = b.detect_loss(MS * 11, MS * 10, false, 100);
        assert!(!lost);
        assert_eq!(timer, Some(Duration::from_micros(12_500)));
        let (lost, _) = b.detect_loss(MS * 13, MS * 10, false, 100);
        assert!(lost);
        assert_eq!(b.next_lost(100), Some((Seq(0), 100)));
    }

    #[test]
    fn a_lost_retransmission_is_found_again() {
        let mut b = Scoreboard::default();
        for k in 0..4u32 {
            b.on_send(Seq(k * 100), Seq(k * 100 + 100), MS * k);
        }
        b.on_ack(MS * 20, Seq(0), &[(Seq(100), Seq(400))], false);
        assert!(b.detect_loss(MS * 20, MS * 17, true, 100).0);
        b.on_send(Seq(0), Seq(100), MS * 21);
        // New data sent after the retransmission is delivered; the retransmission is not.
        b.on_send(Seq(400), Seq(500), MS * 22);
        b.on_ack(
            MS * 40,
            Seq(0),
            &[(Seq(400), Seq(500)), (Seq(100), Seq(400))],
            false,
        );
        assert!(b.detect_loss(MS * 60, MS * 17, true, 100).0);
        assert_eq!(b.next_lost(100), Some((Seq(0), 100)));
    }

    #[test]
    fn d_sacks_widen_the_reordering_window() {
        let mut b = Scoreboard::default();
        b.on_send(Seq(0), Seq(100), Duration::ZERO);
        b.on_send(Seq(100), Seq(200), MS);
        b.on_ack(MS * 11, Seq(0), &[(Seq(100), Seq(200))], false);
        let srtt = MS * 100;
        assert_eq!(b.reo_wnd(false, srtt), 2500);
        b.on_ack(MS * 12, Seq(0), &[], true);
        b.on_ack(MS * 12, Seq(0), &[], true);
        assert_eq!(
            b.reo_wnd(false, srtt),
            7500,
            "three quarter RTTs after two D-SACKs"
        );
        for _ in 0..16 {
            b.on_recovery();
        }
        assert_eq!(b.reo_wnd(false, srtt), 2500);
    }

    #[test]
    fn cumulative_acks_trim_and_an_idle_board_holds_no_memory() {
        let mut b = sent_ten();
        b.on_ack(MS * 20, Seq(1050), &[], false);
        assert_eq!(b.pipe(), 950);
        b.on_ack(MS * 21, Seq(2000), &[], false);
        assert!(b.is_empty());
        assert_eq!(b.recs.capacity(), 0);
    }

    #[test]
    fn blocks_off_segment_edges_split_records() {
        let mut b = sent_ten();
        b.on_ack(MS * 20, Seq(1000), &[(Seq(1150), Seq(1450))], false);
        assert_eq!(b.sacked_bytes(), 300);
        assert_eq!(b.sacked_ranges(), vec![(Seq(1150), Seq(1450))]);
        assert_eq!(b.len(), 12);
    }
}
