//! Congestion control: NewReno (RFC 5681, 6582) and CUBIC (RFC 9438), selectable per connection.
//!
//! The connection owns loss detection and recovery (fast retransmit, SACK, RTO); this module only
//! says how the window grows on acknowledgements and how far it falls on a loss.

use std::time::Duration;

/// Which congestion controller a connection runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// NewReno: additive increase of one segment per RTT, halving on loss.
    NewReno,
    /// CUBIC (RFC 9438), the default: window growth is a cubic function of the time since the
    /// last loss, so long fat paths refill in seconds rather than minutes, and it shares links
    /// fairly with the Linux peers (also CUBIC by default) that our users' traffic meets.
    #[default]
    Cubic,
}

/// CUBIC's constant C (RFC 9438 4.1), in segments per second cubed.
const C: f64 = 0.4;
/// CUBIC's multiplicative decrease factor (RFC 9438 4.6).
const BETA: f64 = 0.7;

/// Window growth state.
#[derive(Clone, Debug)]
pub struct Controller {
    algo: Congestion,
    /// Window before the last reduction, in segments (W_max).
    w_max: f64,
    /// Start of the current congestion-avoidance epoch.
    epoch: Option<Duration>,
    /// Time from the epoch to reach W_max again, seconds (K).
    k: f64,
    /// The Reno-friendly estimate, in segments (W_est).
    w_est: f64,
    /// Window when the epoch started, in segments (cwnd_epoch).
    w_epoch: f64,
}

impl Controller {
    /// A controller of kind `algo`.
    pub fn new(algo: Congestion) -> Controller {
        Controller {
            algo,
            w_max: 0.0,
            epoch: None,
            k: 0.0,
            w_est: 0.0,
            w_epoch: 0.0,
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> Congestion {
        self.algo
    }

    /// Growth in congestion avoidance: the new window after `acked` bytes were acknowledged.
    pub fn on_ack(
        &mut self,
        now: Duration,
        srtt: Duration,
        cwnd: u32,
        acked: u32,
        mss: u32,
    ) -> u32 {
        let mss_f = f64::from(mss.max(1));
        match self.algo {
            Congestion::NewReno => cwnd + (mss * mss / cwnd.max(1)).max(1),
            Congestion::Cubic => {
                let w = f64::from(cwnd) / mss_f;
                let epoch = *self.epoch.get_or_insert_with(|| {
                    self.w_epoch = w;
                    self.w_est = w;
                    self.k = if self.w_max > w {
                        ((self.w_max - w) / C).cbrt()
                    } else {
                        self.w_max = w;
                        0.0
                    };
                    now
                });
                let t = (now.saturating_sub(epoch) + srtt).as_secs_f64();
                let target = (C * (t - self.k).powi(3) + self.w_max).clamp(w, 1.5 * w);
                // Reno-friendly region (RFC 9438 4.3): alpha is 3(1 - beta)/(1 + beta) per RTT.
                let alpha = 3.0 * (1.0 - BETA) / (1.0 + BETA);
                self.w_est += alpha * f64::from(acked) / f64::from(cwnd.max(1));
                let next = if target < self.w_est {
                    self.w_est.max(w)
                } else {
                    // Concave or convex region: close (target - cwnd) over one window.
                    w + (target - w) * f64::from(acked) / f64::from(cwnd.max(1))
                };
                ((next * mss_f) as u32).max(cwnd)
            }
        }
    }

    /// A loss was detected with `cwnd` bytes of window: returns the new slow-start threshold.
    pub fn on_loss(&mut self, cwnd: u32, flight: u32, mss: u32) -> u32 {
        match self.algo {
            // RFC 5681 (4): half the flight size, at least two segments.
            Congestion::NewReno => (flight / 2).max(2 * mss),
            Congestion::Cubic => {
                let w = f64::from(cwnd) / f64::from(mss.max(1));
                // Fast convergence (RFC 9438 4.7): give up bandwidth faster when the window
                // stopped short of the last W_max.
                self.w_max = if w < self.w_max {
                    w * (1.0 + BETA) / 2.0
                } else {
                    w
                };
                self.epoch = None;
                ((f64::from(cwnd) * BETA) as u32).max(2 * mss)
            }
        }
    }

    /// A retransmission timeout: like a loss, and the epoch restarts after slow start.
    pub fn on_timeout(&mut self, cwnd: u32, flight: u32, mss: u32) -> u32 {
        self.on_loss(cwnd, flight, mss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1000;
    const RTT: Duration = Duration::from_millis(100);

    /// Runs congestion avoidance for `secs` seconds of one-window-per-RTT acks; returns cwnd.
    fn grow(c: &mut Controller, mut cwnd: u32, start: Duration, secs: u64) -> u32 {
        let mut now = start;
        while now < start + Duration::from_secs(secs) {
            let segs = cwnd / MSS;
            for _ in 0..segs {
                cwnd = c.on_ack(now, RTT, cwnd, MSS, MSS);
            }
            now += RTT;
        }
        cwnd
    }

    #[test]
    fn reno_adds_about_one_segment_per_rtt() {
        let mut c = Controller::new(Congestion::NewReno);
        let cwnd = grow(&mut c, 10 * MSS, Duration::ZERO, 1);
        // Ten RTTs: about ten segments more.
        assert!((19 * MSS..=21 * MSS).contains(&cwnd), "{cwnd}");
        assert_eq!(c.on_loss(cwnd, cwnd, MSS), cwnd / 2);
    }

    #[test]
    fn cubic_falls_to_seventy_percent_and_returns_to_w_max_near_k() {
        let mut c = Controller::new(Congestion::Cubic);
        let w_max = 100 * MSS;
        let ssthresh = c.on_loss(w_max, w_max, MSS);
        assert_eq!(ssthresh, 70 * MSS);
        // K = cbrt(30 / 0.4) = 4.2 s: just before, still below W_max; after it, past it.
        let before = grow(&mut c, ssthresh, Duration::from_secs(10), 3);
        assert!(before < w_max && before > ssthresh, "{before}");
        let mut c2 = Controller::new(Congestion::Cubic);
        c2.on_loss(w_max, w_max, MSS);
        let after = grow(&mut c2, ssthresh, Duration::from_secs(10), 6);
        assert!(after > w_max, "{after}");
    }

    #[test]
    fn cubic_outgrows_reno_on_a_long_path_after_a_loss() {
        let mut cubic = Controller::new(Congestion::Cubic);
        let mut reno = Controller::new(Congestion::NewReno);
        let w = 1000 * MSS;
        let s_c = cubic.on_loss(w, w, MSS);
        let s_r = reno.on_loss(w, w, MSS);
        let c = grow(&mut cubic, s_c, Duration::ZERO, 20);
        let r = grow(&mut reno, s_r, Duration::ZERO, 20);
        assert!(c > r, "cubic {c} reno {r}");
    }

    #[test]
    fn fast_convergence_lowers_w_max_when_losses_come_early() {
        let mut c = Controller::new(Congestion::Cubic);
        c.on_loss(100 * MSS, 100 * MSS, MSS);
        c.on_loss(80 * MSS, 80 * MSS, MSS);
        assert!((c.w_max - 68.0).abs() < 1e-9, "{}", c.w_max);
    }
}
