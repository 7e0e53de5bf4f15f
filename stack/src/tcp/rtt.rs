//! Retransmission timeout estimation (RFC 6298), with Karn's rule applied by the caller (only
//! samples from segments sent once, or from timestamps).

use std::time::Duration;

/// Lower bound of the RTO (RFC 6298 says 1 s; Linux uses 200 ms, as do we: data centres and
/// namespaces have sub-millisecond RTTs, and 1 s stalls recovery for nothing).
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Upper bound of the RTO.
pub const MAX_RTO: Duration = Duration::from_secs(60);
/// RTO before any sample (RFC 6298 2.1).
pub const INITIAL_RTO: Duration = Duration::from_secs(1);

/// SRTT, RTTVAR and the RTO with its backoff.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    backoff: u32,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            backoff: 0,
        }
    }
}

impl RttEstimator {
    /// Takes one RTT measurement (RFC 6298 2.2 / 2.3) and clears the backoff.
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(r);
                self.rttvar = self.rttvar * 3 / 4 + err / 4;
                self.srtt = Some(srtt * 7 / 8 + r / 8);
            }
        }
        self.backoff = 0;
    }

    /// Smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The current RTO, backoff included, within [`MIN_RTO`, `MAX_RTO`].
    pub fn rto(&self) -> Duration {
        let base = match self.srtt {
            None => INITIAL_RTO,
            // G (clock granularity) is 1 ms here.
            Some(s) => s + (self.rttvar * 4).max(Duration::from_millis(1)),
        };
        base.max(MIN_RTO)
            .saturating_mul(1 << self.backoff.min(16))
            .min(MAX_RTO)
    }

    /// Doubles the RTO after a timeout (RFC 6298 5.5).
    pub fn back_off(&mut self) {
        self.backoff = (self.backoff + 1).min(16);
    }

    /// Number of consecutive backoffs.
    pub fn backoffs(&self) -> u32 {
        self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6298_arithmetic_and_bounds() {
        let mut e = RttEstimator::default();
        assert_eq!(e.rto(), INITIAL_RTO);
        e.sample(Duration::from_millis(100));
        // SRTT 100, RTTVAR 50: RTO = 100 + 200 = 300 ms.
        assert_eq!(e.rto(), Duration::from_millis(300));
        e.sample(Duration::from_millis(200));
        // RTTVAR = 37.5 + 25 = 62.5, SRTT = 87.5 + 25 = 112.5: RTO = 362.5 ms.
        assert_eq!(e.rto(), Duration::from_micros(362_500));
        e.back_off();
        e.back_off();
        assert_eq!(e.rto(), Duration::from_micros(1_450_000));
        for _ in 0..20 {
            e.back_off();
        }
        assert_eq!(e.rto(), MAX_RTO);
        let mut tiny = RttEstimator::default();
        tiny.sample(Duration::from_micros(50));
        assert_eq!(tiny.rto(), MIN_RTO);
    }
}
