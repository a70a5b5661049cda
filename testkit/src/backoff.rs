//! The documented backoff, replayed independently of the crate: the one reference the
//! machine tests, the simulations and the pacing invariant of [`crate::Checked`] share.
//!
//! The `n`-th consecutive failure (from 1) waits `min(initial × factor^(n−1), max) ×
//! (1 − jitter × u_n)`, `u_n` the `n`-th draw of SplitMix64 seeded with the jitter seed, as the
//! top 53 bits over 2^53.

use std::time::Duration;

use matrix_sync_service::{BackoffPolicy, Config};

use crate::rng::SplitMix64;

/// `min(initial × factor^(attempt−1), max)`: the delay of the `attempt`-th consecutive failure
/// before jitter.
pub fn base_delay(policy: &BackoffPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(1024) as i32;
    let secs = policy.initial.as_secs_f64() * policy.factor.powi(exponent);
    if !secs.is_finite() || secs >= policy.max.as_secs_f64() {
        policy.max
    } else {
        Duration::from_secs_f64(secs).min(policy.max)
    }
}

/// The jittered delays of one machine: one generator, one draw per transient or rate-limited
/// failure.
#[derive(Clone, Debug)]
pub struct ReferenceBackoff {
    pub policy: BackoffPolicy,
    pub rng: SplitMix64,
    /// Failures counted by [`ReferenceBackoff::next_delay`].
    pub attempt: u32,
}

impl ReferenceBackoff {
    /// The delays of a machine with this policy and jitter seed.
    pub fn new(policy: BackoffPolicy, seed: u64) -> Self {
        Self {
            policy,
            rng: SplitMix64::new(seed),
            attempt: 0,
        }
    }

    /// The delays of a machine made with `config`.
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.backoff.clone(), config.jitter_seed)
    }

    /// The delay of the `attempt`-th consecutive failure; draws one number.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let base = base_delay(&self.policy, attempt);
        base.mul_f64(1.0 - self.policy.jitter * self.rng.next_unit())
            .min(self.policy.max)
    }

    /// The delay of the next consecutive failure; draws one number.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt += 1;
        self.delay(self.attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_doubles_to_the_cap() {
        let policy = BackoffPolicy::default()
            .with_initial(Duration::from_millis(500))
            .with_factor(2.0)
            .with_max(Duration::from_secs(60));
        let bases: Vec<u64> = (1..=9)
            .map(|n| base_delay(&policy, n).as_millis() as u64)
            .collect();
        assert_eq!(
            bases,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
        assert_eq!(base_delay(&policy, u32::MAX), policy.max);
    }

    #[test]
    fn jitter_takes_one_draw_per_failure() {
        let policy = BackoffPolicy::default();
        let mut replay = ReferenceBackoff::new(policy.clone(), 9);
        let mut rng = SplitMix64::new(9);
        for n in 1..=5 {
            let expected = base_delay(&policy, n).mul_f64(1.0 - policy.jitter * rng.next_unit());
            assert_eq!(replay.next_delay(), expected);
        }
    }
}
