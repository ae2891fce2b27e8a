//! The rate limit of the replies refusing connections (RST, ICMP unreachable).

/// How many RST / ICMP unreachable replies the datapath may generate: a token bucket per CPU,
/// kept in nanoseconds of credit so the datapath never divides. All zero: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectLimit {
    /// Credit one reply costs: a second over the rate.
    pub interval_ns: u64,
    /// Most credit a bucket holds: `burst` replies.
    pub burst_ns: u64,
}

impl RejectLimit {
    /// `rate` replies per second and CPU, up to `burst` at once. A rate of 0: no limit.
    pub const fn per_second(rate: u32, burst: u32) -> Self {
        if rate == 0 {
            return Self {
                interval_ns: 0,
                burst_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / rate as u64;
        Self {
            interval_ns,
            burst_ns: interval_ns * burst as u64,
        }
    }
}

/// One CPU's bucket of [`RejectLimit`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl RejectBucket {
    /// Whether one more reply may go out at `now_ns`, taking its credit if so. A fresh bucket
    /// starts full.
    #[inline(always)]
    pub fn take(&mut self, limit: &RejectLimit, now_ns: u64) -> bool {
        if limit.interval_ns == 0 {
            return true;
        }
        let earned = now_ns.wrapping_sub(self.last_ns);
        self.credit_ns = self.credit_ns.saturating_add(earned).min(limit.burst_ns);
        self.last_ns = now_ns;
        if self.credit_ns < limit.interval_ns {
            return false;
        }
        self.credit_ns -= limit.interval_ns;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reject_bucket_allows_a_burst_then_the_rate() {
        const MS: u64 = 1_000_000;
        let limit = RejectLimit::per_second(100, 5);
        let mut bucket = RejectBucket::default();
        let start = 1_000_000 * MS;
        let burst = (0..20).filter(|_| bucket.take(&limit, start)).count();
        assert_eq!(burst, 5, "a fresh bucket holds the burst");
        assert!(
            !bucket.take(&limit, start + 9 * MS),
            "10 ms earn one reply, 9 do not"
        );
        assert!(bucket.take(&limit, start + 10 * MS));
        let later = (0..20)
            .filter(|_| bucket.take(&limit, start + 10_000 * MS))
            .count();
        assert_eq!(later, 5, "credit never exceeds the burst");
        let mut unlimited = RejectBucket::default();
        assert!((0..1000).all(|_| unlimited.take(&RejectLimit::default(), start)));
    }
}
