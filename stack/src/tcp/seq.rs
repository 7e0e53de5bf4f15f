//! TCP sequence numbers: 32-bit, compared modulo 2^32 (RFC 9293 §3.4).

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A sequence number. Ordering is circular: `a < b` when `b` is at most 2^31 - 1 ahead of `a`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Seq(pub u32);

impl Seq {
    /// The distance from `earlier` to `self` (wrapping), as a signed number.
    #[inline]
    pub fn diff(self, earlier: Seq) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }

    /// `self` in the half-open window `[lo, lo + len)`.
    #[inline]
    pub fn in_window(self, lo: Seq, len: u32) -> bool {
        self.0.wrapping_sub(lo.0) < len
    }

    /// The later of two.
    #[inline]
    pub fn max(self, other: Seq) -> Seq {
        if self >= other {
            self
        } else {
            other
        }
    }

    /// The earlier of two.
    #[inline]
    pub fn min(self, other: Seq) -> Seq {
        if self <= other {
            self
        } else {
            other
        }
    }
}

impl PartialOrd for Seq {
    fn partial_cmp(&self, other: &Seq) -> Option<Ordering> {
        Some(self.diff(*other).cmp(&0))
    }
}

impl Add<u32> for Seq {
    type Output = Seq;
    #[inline]
    fn add(self, n: u32) -> Seq {
        Seq(self.0.wrapping_add(n))
    }
}

impl AddAssign<u32> for Seq {
    #[inline]
    fn add_assign(&mut self, n: u32) {
        self.0 = self.0.wrapping_add(n);
    }
}

impl Sub<Seq> for Seq {
    type Output = u32;
    /// Bytes from `rhs` up to `self`; `self` must not be before `rhs`.
    #[inline]
    fn sub(self, rhs: Seq) -> u32 {
        debug_assert!(self >= rhs, "{self:?} - {rhs:?}");
        self.0.wrapping_sub(rhs.0)
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        let a = Seq(u32::MAX - 10);
        let b = a + 20;
        assert_eq!(b, Seq(9));
        assert!(a < b);
        assert!(b > a);
        assert_eq!(b - a, 20);
        assert_eq!(b.diff(a), 20);
        assert_eq!(a.diff(b), -20);
        assert!(Seq(5).in_window(a, 20));
        assert!(!Seq(9).in_window(a, 20));
        assert_eq!(a.max(b), b);
        assert_eq!(a.min(b), a);
    }
}
