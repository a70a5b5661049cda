//! Exponential backoff with seeded jitter.

use std::time::Duration;

use crate::config::{check_duration, ConfigError};
use crate::defaults;

/// How delays grow between consecutive failures.
///
/// The `n`-th consecutive failure (from 1) waits `min(initial * factor^(n-1), max)`, of which
/// jitter removes a random fraction in `[0, jitter)`: every delay lies in
/// `[(1 - jitter) * base, base]`, never above `max`.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth factor, at least 1.
    pub factor: f64,
    /// Cap on every delay; also the fixed delay after a fatal error.
    pub max: Duration,
    /// Fraction in `[0, 1]` of each delay that jitter may remove.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: defaults::BACKOFF_INITIAL,
            factor: defaults::BACKOFF_FACTOR,
            max: defaults::BACKOFF_MAX,
            jitter: defaults::BACKOFF_JITTER,
        }
    }
}

impl BackoffPolicy {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let day = Duration::from_secs(86_400);
        check_duration(
            "backoff.initial",
            self.initial,
            Duration::from_millis(1),
            day,
        )?;
        check_duration("backoff.max", self.max, self.initial, day)?;
        if !(1.0..=100.0).contains(&self.factor) {
            return Err(ConfigError::Invalid {
                field: "backoff.factor",
                reason: "must be within 1..=100",
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::Invalid {
                field: "backoff.jitter",
                reason: "must be within 0..=1",
            });
        }
        Ok(())
    }

    /// The delay before jitter for the `attempt`-th consecutive failure (1-based).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs).min(self.max)
        }
    }
}

/// SplitMix64: tiny, fast, and the same sequence on every platform for a seed.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Consecutive-failure counter and the delays it yields.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy, seed: u64) -> Self {
        Self {
            policy,
            attempt: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// Counts one more failure and returns its jittered delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let base = self.policy.base_delay(self.attempt);
        let cut = self.policy.jitter * self.rng.next_unit();
        base.mul_f64(1.0 - cut).min(self.policy.max)
    }

    /// Counts one more failure that waits the maximum (fatal errors).
    pub(crate) fn next_fatal(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.policy.max
    }

    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_delays_double_up_to_the_cap() {
        let p = BackoffPolicy::default();
        let ms: Vec<u128> = (1..=9).map(|n| p.base_delay(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
        assert_eq!(p.base_delay(u32::MAX), p.max);
    }

    #[test]
    fn jitter_stays_within_bounds_and_is_seeded() {
        let policy = BackoffPolicy::default();
        let mut a = Backoff::new(policy.clone(), 7);
        let mut b = Backoff::new(policy.clone(), 7);
        for n in 1..=50 {
            let d = a.next_delay();
            assert_eq!(d, b.next_delay());
            let base = policy.base_delay(n);
            assert!(d <= base && d >= base.mul_f64(0.5), "{d:?} vs {base:?}");
        }
        let mut c = Backoff::new(policy, 8);
        let mut a = Backoff::new(BackoffPolicy::default(), 7);
        let differs = (0..10).any(|_| a.next_delay() != c.next_delay());
        assert!(differs, "different seeds must give different jitter");
    }

    #[test]
    fn zero_jitter_gives_the_base_and_reset_restarts() {
        let policy = BackoffPolicy {
            jitter: 0.0,
            ..BackoffPolicy::default()
        };
        let mut b = Backoff::new(policy, 1);
        assert_eq!(b.next_delay(), Duration::from_millis(500));
        assert_eq!(b.next_delay(), Duration::from_millis(1000));
        assert_eq!(b.attempt(), 2);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(), Duration::from_millis(500));
        assert_eq!(b.next_fatal(), Duration::from_secs(60));
    }

    #[test]
    fn validation_rejects_each_unusable_field() {
        let ok = BackoffPolicy::default();
        assert_eq!(ok.validate(), Ok(()));
        let field = |p: BackoffPolicy| match p.validate() {
            Err(
                ConfigError::DurationOutOfRange { field, .. } | ConfigError::Invalid { field, .. },
            ) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(BackoffPolicy {
                initial: Duration::ZERO,
                ..ok.clone()
            }),
            "backoff.initial"
        );
        assert_eq!(
            field(BackoffPolicy {
                max: Duration::from_millis(100),
                ..ok.clone()
            }),
            "backoff.max"
        );
        assert_eq!(
            field(BackoffPolicy {
                max: Duration::from_secs(86_401),
                ..ok.clone()
            }),
            "backoff.max"
        );
        assert_eq!(
            field(BackoffPolicy {
                factor: 0.5,
                ..ok.clone()
            }),
            "backoff.factor"
        );
        assert_eq!(
            field(BackoffPolicy {
                factor: f64::NAN,
                ..ok.clone()
            }),
            "backoff.factor"
        );
        assert_eq!(
            field(BackoffPolicy {
                jitter: 1.5,
                ..ok.clone()
            }),
            "backoff.jitter"
        );
        assert_eq!(
            field(BackoffPolicy {
                jitter: -0.1,
                ..ok.clone()
            }),
            "backoff.jitter"
        );
        assert_eq!(
            BackoffPolicy {
                factor: 1.0,
                jitter: 1.0,
                ..ok.clone()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(
            BackoffPolicy {
                max: ok.initial,
                ..ok
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (reference implementation by Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
