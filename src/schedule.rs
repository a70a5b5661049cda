//! When the next request may go out: backoff after failures, server-requested waits, and the
//! one pacing rule that keeps any server from making the loop spin.
//!
//! **The pacing rule.** After every sync answer or failure the next sync waits for the current
//! backoff step, unless the answer *delivered something* to the consumer or the server *used the
//! timeout it was given* (held a long-poll for at least half of it; a catch-up with `timeout=0`
//! has none to use). Every failure and every answer that does neither counts one more step, so
//! such requests are spaced `initial`, `initial·factor`, ... up to `max` (jitter removes up to its
//! fraction of each). The count goes back to zero only when an answer that delivered something
//! (or was held) comes from a request at least as demanding as the one that has been failing:
//! a `timeout=0` catch-up that works proves nothing about the long-polls that fail behind a proxy.
//!
//! Gap-fill (`/messages`) requests back off on a counter of their own, restarted for each room;
//! how many times they are retried is bounded by [`crate::gapfill`].

use std::time::{Duration, Instant};

use crate::config::BackoffPolicy;
use crate::error::{ErrorClass, Failure};

/// The kind of sync request an outcome belongs to, ordered by what its success proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Channel {
    /// `timeout=0`: the first request, or the first after a failure.
    CatchUp,
    /// A long-poll with the configured timeout.
    LongPoll,
}

/// The wait chosen after a failure, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retry {
    pub(crate) attempt: u32,
    pub(crate) delay: Duration,
}

#[derive(Debug)]
pub(crate) struct Schedule {
    sync: Backoff,
    fill: Backoff,
    refresh: Backoff,
    /// Server discovery's requests: one counter for the whole of it, never reset (discovery
    /// succeeds once, and is then over).
    discovery: Backoff,
    /// The most demanding kind of sync request that went unproductive since the last reset.
    failing: Option<Channel>,
    /// The next request may not go out before this instant.
    send_at: Option<Instant>,
    max_server_wait: Duration,
}

impl Schedule {
    pub(crate) fn new(policy: BackoffPolicy, seed: u64, max_server_wait: Duration) -> Self {
        Self {
            sync: Backoff::new(policy.clone(), seed),
            // A different stream, so gap fills do not shift the sync's jitter.
            fill: Backoff::new(policy.clone(), seed ^ 0x5EED_F111_6A95_0000),
            refresh: Backoff::new(policy.clone(), seed ^ 0x5EED_0EF2_E540_0000),
            discovery: Backoff::new(policy, seed ^ 0x5EED_D15C_0000_0000),
            failing: None,
            send_at: None,
            max_server_wait,
        }
    }

    /// Whether a request may go out at `now`.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        self.send_at.is_none_or(|at| at <= now)
    }

    /// When the next request may go out (`now` if it may already).
    pub(crate) fn next_send(&self, now: Instant) -> Instant {
        self.send_at.map_or(now, |at| at.max(now))
    }

    /// A request went out: the wait it honoured is over.
    pub(crate) fn sent(&mut self) {
        self.send_at = None;
    }

    /// A sync request of `channel` failed at `now`.
    pub(crate) fn sync_failed(
        &mut self,
        channel: Channel,
        failure: &Failure,
        now: Instant,
    ) -> Retry {
        self.failing = self.failing.max(Some(channel));
        let retry = wait_after(&mut self.sync, failure, self.max_server_wait);
        self.send_at = Some(now + retry.delay);
        retry
    }

    /// A sync answer of `channel` was handed on at `now`; `productive` if it delivered
    /// something or the server used its timeout. Returns the spacing chosen, if any.
    pub(crate) fn sync_answered(
        &mut self,
        channel: Channel,
        productive: bool,
        now: Instant,
    ) -> Option<Duration> {
        if productive {
            if self.failing.is_none_or(|failing| channel >= failing) {
                self.sync.reset();
                self.failing = None;
            }
            self.send_at = None;
            return None;
        }
        self.failing = self.failing.max(Some(channel));
        let delay = self.sync.next_delay();
        self.send_at = Some(now + delay);
        Some(delay)
    }

    /// A gap-fill request failed at `now` with a failure worth retrying.
    pub(crate) fn fill_failed(&mut self, failure: &Failure, now: Instant) -> Retry {
        let retry = wait_after(&mut self.fill, failure, self.max_server_wait);
        self.send_at = Some(now + retry.delay);
        retry
    }

    /// A refresh failed at `now` in a way worth retrying. `hold`: nothing else may go out
    /// before the retry (the access token is known to be dead); otherwise only the refresh
    /// waits, and syncs go on with the token still valid.
    pub(crate) fn refresh_failed(&mut self, failure: &Failure, now: Instant, hold: bool) -> Retry {
        let retry = wait_after(&mut self.refresh, failure, self.max_server_wait);
        if hold {
            self.send_at = Some(now + retry.delay);
        }
        retry
    }

    /// A server discovery request failed at `now`: nothing goes out before the retry.
    pub(crate) fn discovery_failed(&mut self, failure: &Failure, now: Instant) -> Retry {
        let retry = wait_after(&mut self.discovery, failure, self.max_server_wait);
        self.send_at = Some(now + retry.delay);
        retry
    }

    /// A refresh answered: its retries start over.
    pub(crate) fn refresh_answered(&mut self) {
        self.refresh.reset();
    }

    /// Nothing goes out before the maximum backoff from `now` (the session ended, or new
    /// credentials could not be stored). Returns the report of the wait.
    pub(crate) fn hold_max(&mut self, now: Instant) -> Retry {
        let delay = self.refresh.next_fatal();
        self.send_at = Some(now + delay);
        Retry {
            attempt: self.refresh.attempt(),
            delay,
        }
    }

    /// The wait in force is lifted: the next request may go out at once.
    pub(crate) fn lift_wait(&mut self) {
        self.send_at = None;
    }

    /// A gap-fill page arrived, or a room is done: its retries start over.
    pub(crate) fn fill_answered(&mut self) {
        self.fill.reset();
    }

    #[cfg(test)]
    fn sync_attempt(&self) -> u32 {
        self.sync.attempt()
    }
}

/// Whether the server used the `timeout` it was given: held the request at least half of it.
/// A request without a timeout (a catch-up) has nothing to use.
pub(crate) fn held(sent_at: Instant, now: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(sent_at) >= timeout / 2
}

/// Counts one more failure on `backoff` and chooses the wait by the failure's class.
fn wait_after(backoff: &mut Backoff, failure: &Failure, max_server_wait: Duration) -> Retry {
    let delay = match failure.class() {
        ErrorClass::Transient => backoff.next_delay(),
        ErrorClass::RateLimited => {
            let own = backoff.next_delay();
            let asked = match failure {
                Failure::RateLimited {
                    retry_after: Some(wait),
                    ..
                } => *wait,
                _ => Duration::ZERO,
            };
            own.max(asked.min(max_server_wait))
        }
        ErrorClass::NeedsUser => backoff.next_fatal(),
    };
    Retry {
        attempt: backoff.attempt(),
        delay,
    }
}

// ---- the jitter generator and the failure counter ------------------------------------------

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
    fn splitmix_matches_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (reference implementation by Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    fn schedule() -> Schedule {
        let policy = BackoffPolicy {
            jitter: 0.0,
            ..BackoffPolicy::default()
        };
        Schedule::new(policy, 1, Duration::from_secs(300))
    }

    fn server_error() -> Failure {
        Failure::Server {
            status: 500,
            errcode: None,
            message: None,
        }
    }

    #[test]
    fn an_answered_refresh_starts_its_retries_over() {
        let mut s = schedule();
        let t = Instant::now();
        let first = s.refresh_failed(&server_error(), t, true);
        let second = s.refresh_failed(&server_error(), t, true);
        assert_eq!((first.attempt, second.attempt), (1, 2));
        assert_eq!(second.delay, 2 * first.delay);
        s.refresh_answered();
        let after = s.refresh_failed(&server_error(), t, true);
        assert_eq!((after.attempt, after.delay), (1, first.delay));
    }

    #[test]
    fn a_refresh_that_may_wait_alone_holds_nothing_else() {
        let mut s = schedule();
        let t = Instant::now();
        let retry = s.refresh_failed(&server_error(), t, false);
        assert_eq!(s.send_at, None, "syncs go on while the token lives");
        let held = s.refresh_failed(&server_error(), t, true);
        assert_eq!(s.send_at, Some(t + held.delay));
        assert!(held.delay > retry.delay);
    }

    #[test]
    fn a_working_catch_up_does_not_reset_failing_long_polls() {
        let mut s = schedule();
        let t = Instant::now();
        let ms = |r: Retry| r.delay.as_millis();
        assert_eq!(
            ms(s.sync_failed(Channel::LongPoll, &server_error(), t)),
            500
        );
        assert_eq!(s.sync_answered(Channel::CatchUp, true, t), None);
        assert!(s.is_due(t), "a productive answer is followed at once");
        assert_eq!(
            ms(s.sync_failed(Channel::LongPoll, &server_error(), t)),
            1000
        );
        assert_eq!(s.sync_answered(Channel::CatchUp, true, t), None);
        assert_eq!(
            ms(s.sync_failed(Channel::LongPoll, &server_error(), t)),
            2000
        );
        // A long-poll that works again resets.
        assert_eq!(s.sync_answered(Channel::LongPoll, true, t), None);
        assert_eq!(
            ms(s.sync_failed(Channel::LongPoll, &server_error(), t)),
            500
        );
    }

    #[test]
    fn unproductive_answers_count_like_failures_and_space_the_next_request() {
        let mut s = schedule();
        let t = Instant::now();
        let delays: Vec<u128> = (0..9)
            .map(|_| {
                s.sync_answered(Channel::LongPoll, false, t)
                    .unwrap()
                    .as_millis()
            })
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
        assert!(!s.is_due(t));
        assert_eq!(s.next_send(t), t + Duration::from_secs(60));
        assert!(s.is_due(t + Duration::from_secs(60)));
        s.sent();
        assert!(s.is_due(t));
        // Failing catch-ups are reset by a productive long-poll (it proves more).
        let mut s = schedule();
        s.sync_failed(Channel::CatchUp, &server_error(), t);
        s.sync_answered(Channel::LongPoll, true, t);
        assert_eq!(s.sync_attempt(), 0);
    }

    #[test]
    fn waits_follow_the_class_and_gap_fills_count_apart() {
        let mut s = schedule();
        let t = Instant::now();
        let limited = Failure::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
            errcode: None,
            message: None,
        };
        assert_eq!(
            s.sync_failed(Channel::LongPoll, &limited, t).delay,
            Duration::from_secs(7)
        );
        let huge = Failure::RateLimited {
            retry_after: Some(Duration::from_secs(86_400)),
            errcode: None,
            message: None,
        };
        assert_eq!(
            s.sync_failed(Channel::LongPoll, &huge, t).delay,
            Duration::from_secs(300)
        );
        let fatal = Failure::Refused {
            status: 403,
            errcode: None,
            message: None,
        };
        assert_eq!(
            s.sync_failed(Channel::LongPoll, &fatal, t),
            Retry {
                attempt: 3,
                delay: Duration::from_secs(60)
            }
        );
        let r = s.fill_failed(&server_error(), t);
        assert_eq!((r.attempt, r.delay.as_millis()), (1, 500));
        s.fill_answered();
        assert_eq!(s.fill_failed(&server_error(), t).attempt, 1);
        assert_eq!(s.sync_attempt(), 3, "gap fills leave the sync count alone");
    }

    #[test]
    fn a_failure_or_an_unproductive_answer_makes_the_next_request_wait() {
        let mut s = schedule();
        let t = Instant::now();
        s.sync_failed(Channel::LongPoll, &server_error(), t);
        assert!(!s.is_due(t));
        assert_eq!(s.next_send(t), t + Duration::from_millis(500));
        assert!(s.is_due(t + Duration::from_millis(500)));
        s.sent();
        s.fill_failed(&server_error(), t);
        assert_eq!(s.next_send(t), t + Duration::from_millis(500));
        s.sent();
        s.sync_answered(Channel::LongPoll, false, t);
        assert_eq!(s.next_send(t), t + Duration::from_millis(1000));
    }

    #[test]
    fn held_means_at_least_half_the_timeout() {
        let t = Instant::now();
        let timeout = Duration::from_secs(30);
        assert!(!held(t, t + Duration::from_millis(14_999), timeout));
        assert!(held(t, t + Duration::from_secs(15), timeout));
        assert!(
            held(t, t, Duration::ZERO),
            "a catch-up has no timeout to use"
        );
    }
}
