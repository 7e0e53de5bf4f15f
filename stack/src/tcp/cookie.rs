//! SYN cookies (RFC 4987 3.6): when a listener's SYN queue is full, the SYN-ACK's sequence
//! number carries what the connection needs, and the stack keeps no state until the client's
//! ACK returns it.
//!
//! Layout of the 32-bit cookie: 5 bits of the time period (64 s each), 24 bits of a keyed hash
//! of the 4-tuple, the client's ISN and the period, and 3 bits indexing an MSS table. When the
//! client sent timestamps, the low 6 bits of our TSval carry its window scale and SACK-permitted
//! option, which come back in its TSecr (what Linux does too). The hash key is derived from a
//! secret per period, so the secret rotates every 64 s and a cookie is valid for two periods.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use siphasher::sip::SipHasher13;

use super::seq::Seq;

/// Length of a cookie period.
pub const PERIOD: Duration = Duration::from_secs(64);
/// MSS values a cookie can carry: a peer's MSS rounds down to one of these.
pub const MSS_TABLE: [u16; 8] = [536, 1220, 1300, 1380, 1440, 1460, 4312, 8960];
/// Bits of TSval that carry options.
const TS_BITS: u32 = 6;
const TS_MASK: u32 = (1 << TS_BITS) - 1;
/// Window scale value meaning "not offered".
const NO_WSCALE: u32 = 0xf;

/// The options a cookie ACK gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieOptions {
    /// The MSS, rounded down to [`MSS_TABLE`].
    pub mss: u16,
    /// The client's window scale, if it offered one (only known with timestamps).
    pub wscale: Option<u8>,
    /// SACK permitted (only known with timestamps).
    pub sack: bool,
}

/// The stack's cookie secret.
#[derive(Clone)]
pub struct CookieJar {
    master: [u8; 16],
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieJar(..)")
    }
}

fn write_addr(h: &mut SipHasher13, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(v) => h.write(&v.octets()),
        IpAddr::V6(v) => h.write(&v.octets()),
    }
    h.write_u16(a.port());
}

impl CookieJar {
    /// A jar with this master secret.
    pub fn new(master: [u8; 16]) -> CookieJar {
        CookieJar { master }
    }

    fn period(now: Duration) -> u32 {
        (now.as_secs() / PERIOD.as_secs()) as u32
    }

    fn hash(&self, period: u32, local: SocketAddr, remote: SocketAddr, peer_isn: Seq) -> u32 {
        // The period's key: derived from the master secret, so each period has its own.
        let sub = |tag: u8| {
            let mut k = SipHasher13::new_with_key(&self.master);
            k.write_u8(tag);
            k.write_u32(period);
            k.finish()
        };
        let mut h = SipHasher13::new_with_keys(sub(1), sub(2));
        write_addr(&mut h, local);
        write_addr(&mut h, remote);
        h.write_u32(peer_isn.0);
        h.finish() as u32 & 0x00ff_ffff
    }

    /// The cookie (our ISN) for a SYN with sequence number `peer_isn` and MSS option `peer_mss`.
    pub fn make(
        &self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
        peer_isn: Seq,
        peer_mss: u16,
    ) -> Seq {
        let period = Self::period(now);
        let idx = MSS_TABLE.iter().rposition(|&m| m <= peer_mss).unwrap_or(0) as u32;
        let h = self.hash(period, local, remote, peer_isn);
        Seq(((period & 0x1f) << 27) | (h << 3) | idx)
    }

    /// Checks the cookie an ACK returns (its acknowledgement number less one), for the client
    /// ISN `peer_isn` (its sequence number less one). Returns the MSS it carried.
    pub fn check(
        &self,
        now: Duration,
        local: SocketAddr,
        remote: SocketAddr,
        peer_isn: Seq,
        cookie: Seq,
    ) -> Option<u16> {
        let now_period = Self::period(now);
        let c = cookie.0;
        (0..2).find_map(|age| {
            let period = now_period.checked_sub(age)?;
            let ok = (c >> 27) == (period & 0x1f)
                && ((c >> 3) & 0x00ff_ffff) == self.hash(period, local, remote, peer_isn);
            ok.then(|| MSS_TABLE[(c & 7) as usize])
        })
    }

    /// Our TSval for a cookie SYN-ACK: `tsval` (the clock's) with the client's options in the
    /// low bits, never ahead of the clock.
    pub fn ts_encode(tsval: u32, wscale: Option<u8>, sack: bool) -> u32 {
        let opts = wscale.map_or(NO_WSCALE, |w| u32::from(w.min(14))) | (u32::from(sack) << 4);
        let ts = (tsval & !TS_MASK) | opts;
        if (ts.wrapping_sub(tsval) as i32) > 0 {
            ts.wrapping_sub(1 << TS_BITS)
        } else {
            ts
        }
    }

    /// The client's options from the TSecr of its cookie ACK.
    pub fn ts_decode(tsecr: u32) -> (Option<u8>, bool) {
        let w = tsecr & NO_WSCALE;
        ((w != NO_WSCALE).then_some(w as u8), tsecr & 0x10 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            "198.18.1.7:80".parse().unwrap(),
            "198.19.200.9:40000".parse().unwrap(),
        )
    }

    #[test]
    fn a_cookie_round_trips_its_mss_within_two_periods() {
        let jar = CookieJar::new([7; 16]);
        let (l, r) = addrs();
        let t = Duration::from_secs(1000);
        let c = jar.make(t, l, r, Seq(5), 1460);
        assert_eq!(jar.check(t, l, r, Seq(5), c), Some(1460));
        assert_eq!(jar.check(t + PERIOD, l, r, Seq(5), c), Some(1460));
        assert_eq!(jar.check(t + PERIOD * 2, l, r, Seq(5), c), None, "expired");
        // Rounded down to the table.
        let c = jar.make(t, l, r, Seq(5), 1400);
        assert_eq!(jar.check(t, l, r, Seq(5), c), Some(1380));
        let c = jar.make(t, l, r, Seq(5), 100);
        assert_eq!(jar.check(t, l, r, Seq(5), c), Some(536));
    }

    #[test]
    fn a_cookie_is_bound_to_its_tuple_isn_and_secret() {
        let jar = CookieJar::new([7; 16]);
        let (l, r) = addrs();
        let t = Duration::from_secs(1000);
        let c = jar.make(t, l, r, Seq(5), 1460);
        assert_eq!(jar.check(t, l, r, Seq(6), c), None);
        let other: SocketAddr = "198.19.200.9:40001".parse().unwrap();
        assert_eq!(jar.check(t, l, other, Seq(5), c), None);
        assert_eq!(jar.check(t, l, r, Seq(5), c + 8), None);
        assert_eq!(CookieJar::new([8; 16]).check(t, l, r, Seq(5), c), None);
        // Guessing: of 100,000 random cookies, none passes (24 bits of hash).
        let mut x = 0x1234_5678u32;
        let forged = (0..100_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                jar.check(t, l, r, Seq(5), Seq(x)).is_some()
            })
            .count();
        assert!(forged <= 1, "{forged}");
    }

    #[test]
    fn options_ride_in_the_timestamp_and_it_never_runs_ahead() {
        for now in [0u32, 63, 64, 1000, u32::MAX] {
            for (w, s) in [
                (Some(7), true),
                (None, false),
                (Some(0), false),
                (None, true),
            ] {
                let ts = CookieJar::ts_encode(now, w, s);
                assert!((now.wrapping_sub(ts) as i32) >= 0, "{now} {ts}");
                assert!(now.wrapping_sub(ts) < 128);
                assert_eq!(CookieJar::ts_decode(ts), (w, s));
            }
        }
    }
}
