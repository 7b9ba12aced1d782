//! Retry backoff: capped exponential growth with jitter.
//!
//! Used by the queue for job retries and, later, by the instance lifecycle for
//! restarts. Pure functions of their inputs, so schedules are testable.

use std::time::Duration;

/// A capped exponential backoff with proportional jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub base: Duration,
    /// No delay exceeds this (before jitter).
    pub max: Duration,
    /// Each retry waits this many times longer than the previous one.
    pub factor: f64,
    /// Random spread: a delay `d` becomes a value in `[d·(1-jitter), d·(1+jitter)]`,
    /// so that jobs that failed together do not retry together.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(300),
            factor: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (1 for the first retry), without jitter.
    pub(crate) fn nominal(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(63) as i32;
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()))
    }

    /// The delay before retry number `retry`, with jitter drawn from `unit`
    /// (a value in `[0, 1)`; pass `rand::random()`).
    pub(crate) fn delay_with(&self, retry: u32, unit: f64) -> Duration {
        let nominal = self.nominal(retry).as_secs_f64();
        let spread = (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * self.jitter;
        Duration::from_secs_f64((nominal * (1.0 + spread)).max(0.0))
    }

    /// The delay before retry number `retry`, with random jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, rand::random())
    }

    /// The bounds `delay` keeps to for retry number `retry`.
    pub fn bounds(&self, retry: u32) -> (Duration, Duration) {
        (self.delay_with(retry, 0.0), self.delay_with(retry, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=10).map(|n| b.nominal(n).as_secs()).collect();
        assert_eq!(secs, vec![2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let b = Backoff::default();
        for retry in 1..8 {
            let (lo, hi) = b.bounds(retry);
            let nominal = b.nominal(retry).as_secs_f64();
            assert!((lo.as_secs_f64() - nominal * 0.8).abs() < 1e-9);
            assert!((hi.as_secs_f64() - nominal * 1.2).abs() < 1e-9);
            for _ in 0..100 {
                let d = b.delay(retry);
                assert!(d >= lo && d <= hi, "{d:?} outside {lo:?}..{hi:?}");
            }
        }
    }

    #[test]
    fn huge_retry_counts_do_not_overflow() {
        let b = Backoff::default();
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(300));
    }
}
