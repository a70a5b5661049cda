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

use crate::backoff::{Backoff, BackoffPolicy};
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
            fill: Backoff::new(policy, seed ^ 0x5EED_F111_6A95_0000),
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
        ErrorClass::Fatal => backoff.next_fatal(),
    };
    Retry {
        attempt: backoff.attempt(),
        delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
