//! Long-running failure scenarios, played on a simulated clock against a scripted homeserver
//! (see the test kit's `sim`). A simulated day of failures takes a fraction of a second of wall time;
//! the flapping server, which gets hundreds of thousands of sync responses parsed, runs two
//! simulated days in a debug build and a full week with `--release` (`SIM_FLAP_DAYS`
//! overrides).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use matrix_sync_service::{
    BackoffPolicy, ErrorClass, Failure, InputError, RequestId, SyncState, TransportErrorKind,
};

use matrix_sync_testkit::backoff::{base_delay, ReferenceBackoff};
use matrix_sync_testkit::sim;
use sim::{ms, secs, Feed, Homeserver, Kind, Outcome, Reply, Sent, Sim};

const ZERO: Duration = Duration::ZERO;
const DAY: Duration = Duration::from_secs(86_400);
const ROOM: &str = "!room:example.org";

fn default_policy() -> BackoffPolicy {
    let policy = BackoffPolicy::default();
    assert_eq!(
        policy,
        BackoffPolicy::default()
            .with_initial(ms(500))
            .with_factor(2.0)
            .with_max(secs(60))
            .with_jitter(0.5),
        "the scenarios assume the documented default backoff"
    );
    policy
}

fn sync_requests(requests: &[Sent]) -> impl Iterator<Item = &Sent> {
    requests.iter().filter(|r| r.kind == Kind::Sync)
}

// ---- 1. a day-long outage -----------------------------------------------------------------

#[test]
fn day_long_outage_makes_exactly_the_requests_the_backoff_allows_then_recovers() {
    const SEED: u64 = 0x0DAB_0FF5_EED5;
    let policy = default_policy();

    // Independently: requests at t_0 = 0, t_k = t_(k-1) + delay_k, as long as t < 24 h.
    let mut replay = ReferenceBackoff::new(policy.clone(), SEED);
    let mut expected_delays = Vec::new();
    let mut t = ZERO;
    while t < DAY {
        let delay = replay.next_delay();
        expected_delays.push(delay);
        t += delay;
    }
    let expected_requests = expected_delays.len();
    let recovery_at = t;
    assert!(
        (1440..=2900).contains(&expected_requests),
        "{expected_requests} requests in a day is implausible for a 60 s cap with 50 % jitter"
    );

    let mut after_outage = 0;
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |feed, req| {
        if req.at < DAY {
            return Reply::refused(ZERO);
        }
        after_outage += 1;
        match after_outage {
            1 => Reply::ok(ms(20), feed.new_batch(req, 2)),
            2 => Reply::refused(ZERO),
            _ => Reply::Stall,
        }
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    config.jitter_seed = SEED;
    let mut sim = Sim::scripted(config, server);
    sim.run_while(100_000, |s| s.log.errors.len() <= expected_requests);

    let log = &sim.log;
    let outage: Vec<&Sent> = log.requests.iter().filter(|r| r.at < DAY).collect();
    assert_eq!(
        outage.len(),
        expected_requests,
        "requests during the outage"
    );
    let errors = &log.errors[..expected_requests];
    for (n, (e, expected)) in errors.iter().zip(&expected_delays).enumerate() {
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(matches!(
            &e.failure,
            Failure::Transport(t) if t.kind == TransportErrorKind::Connect
        ));
        assert_eq!(e.attempt as usize, n + 1, "attempt of failure {n}");
        assert_eq!(e.delay, *expected, "delay of failure {}", n + 1);
        assert!(e.delay <= policy.max);
        // The next request goes out exactly when the delay ends, not a nanosecond earlier.
        assert_eq!(log.requests[n + 1].at, e.at + e.delay);
        assert!(log.requests[n].is_catch_up(), "every retry catches up");
    }

    // The server is back: the first request after the outage succeeds...
    let back = &log.requests[expected_requests];
    assert_eq!(back.at, recovery_at);
    assert!(back.is_catch_up());
    assert!(matches!(
        back.outcome,
        Outcome::Answered { status: 200, .. }
    ));
    let delivered: Vec<_> = log.batches();
    assert_eq!(
        delivered,
        vec![(vec!["$ev1".to_owned(), "$ev2".to_owned()], "s1".to_owned())]
    );
    // ...the next one is a long-poll from the new token, and the backoff was reset.
    let next = &log.requests[expected_requests + 1];
    assert_eq!(next.since.as_deref(), Some("s1"));
    assert_eq!(next.timeout, Some(secs(30)));
    assert_eq!(next.at, back.at + ms(20), "no wait after a success");
    let after = &log.errors[expected_requests];
    assert_eq!(after.attempt, 1, "backoff reset after the success");
    assert!(
        after.delay <= ms(500) && after.delay >= ms(250),
        "{:?}",
        after.delay
    );

    // States: CatchingUp, then (BackingOff, CatchingUp) per failure, Live once caught up.
    let mut expected_states = vec![SyncState::CatchingUp];
    for _ in 0..expected_requests {
        expected_states.extend([SyncState::BackingOff, SyncState::CatchingUp]);
    }
    expected_states.extend([SyncState::Live, SyncState::BackingOff]);
    assert_eq!(log.state_sequence(), expected_states);
    sim::assert_valid_transitions(&log.states);
    let live_at = log.states[log.states.len() - 2].0;
    assert_eq!(
        live_at,
        back.at + ms(20),
        "Live once the catch-up is delivered"
    );
}

// ---- 2. a server asking for a ten-day wait ------------------------------------------------

fn rate_limited_run(
    max_server_wait: Duration,
    retry_after_ms: u64,
    header_secs: Option<u64>,
    seed: u64,
    requests: usize,
) -> Sim<impl sim::Server> {
    let server = Homeserver::new(Feed::new(2, &[ROOM]), move |_, _| {
        Reply::rate_limited(ms(5), retry_after_ms, header_secs)
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    config.jitter_seed = seed;
    config.max_server_wait = max_server_wait;
    let mut sim = Sim::scripted(config, server);
    sim.run_while(10 * requests + 10, |s| s.log.errors.len() < requests);
    sim
}

#[test]
fn huge_server_waits_are_capped_exactly_at_max_server_wait() {
    let ten_days = 10 * DAY;
    let cap = matrix_sync_service::defaults::MAX_SERVER_WAIT;
    assert_eq!(cap, secs(300));
    let policy = default_policy();
    assert!(policy.max < cap);
    let sim = rate_limited_run(
        cap,
        ten_days.as_millis() as u64,
        Some(ten_days.as_secs()),
        7,
        300,
    );
    let log = &sim.log;
    assert_eq!(log.errors.len(), 300);
    for (n, e) in log.errors.iter().enumerate() {
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(
            e.failure,
            Failure::RateLimited {
                retry_after: Some(ten_days),
                errcode: Some("M_LIMIT_EXCEEDED".to_owned()),
                message: Some("simulated 429".to_owned()),
            },
            "the error reports the server's uncapped wait"
        );
        assert_eq!(e.attempt as usize, n + 1);
        assert_eq!(e.delay, cap, "failure {}: exactly the ceiling", n + 1);
        let i = e.request.expect("a request failed");
        if let Some(next) = log.requests.get(i + 1) {
            assert_eq!(next.at, e.at + cap);
        }
    }
    // 300 requests, each 5 ms of latency plus exactly 5 min apart.
    assert_eq!(log.requests[299].at, (secs(300) + ms(5)) * 299);
    assert!(log
        .state_sequence()
        .iter()
        .all(|s| matches!(s, SyncState::CatchingUp | SyncState::BackingOff)));
}

#[test]
fn server_waits_take_the_larger_of_capped_wait_and_backoff() {
    let policy = default_policy();
    // (ceiling, server's wait in ms, Retry-After header in s)
    let cases = [
        (
            secs(2),
            10 * DAY.as_millis() as u64,
            Some(10 * DAY.as_secs()),
        ),
        (secs(300), 90_000, None),
        (secs(300), 0, Some(45)),
        (ZERO, 3_600_000, Some(3600)),
        (secs(300), 1, None),
    ];
    for (case, (cap, body_ms, header)) in cases.into_iter().enumerate() {
        let seed = 100 + case as u64;
        let sim = rate_limited_run(cap, body_ms, header, seed, 40);
        let asked = Duration::from_millis(body_ms).max(secs(header.unwrap_or(0)));
        let mut replay = ReferenceBackoff::new(policy.clone(), seed);
        for (n, e) in sim.log.errors.iter().enumerate() {
            let own = replay.next_delay();
            let expected = asked.min(cap).max(own);
            assert_eq!(e.delay, expected, "case {case}, failure {}", n + 1);
            assert!(
                e.delay <= cap.max(policy.max),
                "never more than the ceiling"
            );
            assert_eq!(
                e.failure,
                Failure::RateLimited {
                    retry_after: Some(asked),
                    errcode: Some("M_LIMIT_EXCEEDED".to_owned()),
                    message: Some("simulated 429".to_owned()),
                }
            );
        }
    }
}

// ---- 3. a flapping server for a week ------------------------------------------------------

/// Up for 10 s, down for 10 s, starting up.
fn up(at: Duration) -> bool {
    (at.as_millis() / 10_000).is_multiple_of(2)
}

#[test]
fn flapping_server_for_a_week_delivers_every_batch_once_in_order_without_spinning() {
    // A week with optimizations (`cargo test --release`, about 10 s); two days in a debug
    // build, where parsing a third of a million sync responses would take over a minute.
    // `SIM_FLAP_DAYS` overrides both.
    let days: u32 = std::env::var("SIM_FLAP_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 2 } else { 7 });
    let end = DAY * days;
    let policy = default_policy();
    let server = Homeserver::new(
        Feed::new(3, &["!a:example.org", "!b:example.org", "!c:example.org"]),
        |feed, req| {
            if !up(req.at) {
                return Reply::refused(ZERO);
            }
            // Long-polls are held 1 s; a catch-up (timeout=0) is answered at once.
            let latency = if req.is_catch_up() { ms(50) } else { secs(1) };
            let events = feed.rng.range(1, 3) as usize;
            Reply::ok(latency, feed.new_batch(req, events))
        },
    );
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    config.jitter_seed = 0xF1A9;
    let mut sim = Sim::scripted(config, server);
    sim.run_until(end);
    let log = &sim.log;
    let emitted = &sim.server.feed.emitted;

    // Every batch the server answered successfully, delivered exactly once and in order.
    let by_request: HashMap<RequestId, usize> = emitted
        .iter()
        .enumerate()
        .map(|(i, b)| (b.request, i))
        .collect();
    let answered: Vec<(Vec<String>, String)> = log
        .requests
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Answered { status: 200, .. }))
        .map(|r| {
            let b = &emitted[by_request[&r.id]];
            (b.event_ids.clone(), b.next_batch.clone())
        })
        .collect();
    let delivered = log.batches();
    assert_eq!(delivered.len(), answered.len());
    assert!(
        delivered == answered,
        "delivered batches differ from the answered ones"
    );
    let mut seen = HashSet::new();
    for (ids, _) in &delivered {
        for id in ids {
            assert!(seen.insert(id.as_str()), "{id} delivered twice");
        }
    }
    // At most one response (the one in flight at the end) was produced and not delivered.
    assert!(emitted.len() - answered.len() <= 1);

    // `since` is always the last checkpoint, and only moves on a delivered batch.
    let mut last = Some("s0".to_owned());
    for r in sync_requests(&log.requests) {
        assert_eq!(r.since, last, "request {} at {:?}", r.id, r.at);
        assert_eq!(r.since, r.checkpoint_before);
        if matches!(r.outcome, Outcome::Answered { status: 200, .. }) {
            last = Some(emitted[by_request[&r.id]].next_batch.clone());
        }
    }

    // It never spins.
    let seconds = end.as_secs_f64();
    assert!(
        (log.requests.len() as f64) < seconds / 0.4,
        "{} requests in {seconds} s",
        log.requests.len()
    );
    for e in &log.errors {
        let i = e.request.expect("each failure belongs to a request");
        assert_eq!(e.class, ErrorClass::Transient);
        let base = base_delay(&policy, e.attempt);
        assert!(e.delay <= base && e.delay >= base.mul_f64(0.5), "{e:?}");
        if let Some(next) = log.requests.get(i + 1) {
            assert!(next.at >= e.at + e.delay, "retry before the delay ended");
            assert_eq!(next.at, e.at + e.delay, "the clock jumps to the deadline");
        }
    }
    let min_spacing = policy.initial.mul_f64(1.0 - policy.jitter);
    for pair in log.requests.windows(2) {
        if pair[1].at - pair[0].at < min_spacing {
            let previous = &pair[0];
            let new_data = matches!(previous.outcome, Outcome::Answered { status: 200, .. })
                && emitted[by_request[&previous.id]].next_batch.as_str()
                    != previous.since.as_deref().unwrap_or("");
            assert!(
                new_data,
                "requests {} and {} only {:?} apart",
                previous.id,
                pair[1].id,
                pair[1].at - pair[0].at
            );
        }
    }

    // Every down phase was noticed and every up phase was used.
    let cycles = end.as_secs() / 20;
    let failures = log.errors.len() as u64;
    assert!(failures >= cycles, "{failures} failures in {cycles} cycles");
    eprintln!(
        "{} requests, {} failures, {} batches in {cycles} cycles",
        log.requests.len(),
        failures,
        answered.len()
    );
    assert!(answered.len() as u64 >= 4 * cycles);
    // Live once per recovery: the first success, and each success right after a failure.
    let ok = |r: &Sent| matches!(r.outcome, Outcome::Answered { status: 200, .. });
    let recoveries = 1 + log
        .requests
        .windows(2)
        .filter(|p| !ok(&p[0]) && ok(&p[1]))
        .count();
    let lives = log
        .states
        .iter()
        .filter(|(_, s)| *s == SyncState::Live)
        .count();
    assert_eq!(lives, recoveries);
    assert!(
        lives as u64 >= cycles / 2,
        "{lives} recoveries in {cycles} cycles"
    );
    sim::assert_valid_transitions(&log.states);
}

// ---- 4. a server that never answers ---------------------------------------------------------

#[test]
fn stalled_initial_sync_hits_its_own_deadline_and_late_answers_are_stale() {
    let mut config = sim::config();
    let deadline = config.initial_sync_deadline;
    assert_eq!(deadline, secs(600));
    config.jitter_seed = 4;
    let mut calls = 0;
    let server = Homeserver::new(Feed::new(4, &[ROOM]), move |feed, req| {
        calls += 1;
        match calls {
            // Answered one second after the deadline: too late.
            1 => Reply::ok(deadline + secs(1), feed.new_batch(req, 1)),
            _ => Reply::Stall,
        }
    });
    let mut sim = Sim::scripted(config, server);
    sim.run_while(100, |s| s.log.errors.len() < 2);
    let log = &sim.log;
    let first = &log.requests[0];
    assert_eq!(first.since, None);
    assert_eq!(first.timeout, Some(ZERO));
    assert_eq!(first.deadline, deadline);
    assert_eq!(first.outcome, Outcome::Abandoned { at: deadline });
    let e = &log.errors[0];
    assert_eq!(e.at, deadline);
    assert_eq!(e.failure, Failure::DeadlineExceeded(deadline));
    assert_eq!(e.class, ErrorClass::Transient);
    assert_eq!(e.attempt, 1);
    // The late answer arrived during the backoff and was refused without effect.
    assert_eq!(log.late_answers.len(), 1);
    assert_eq!(log.late_answers[0].at, deadline + secs(1));
    assert_eq!(
        log.late_answers[0].result,
        Err(InputError::StaleRequest(first.id))
    );
    assert!(
        log.events.is_empty(),
        "nothing of the late answer delivered"
    );
    // The retry is still an initial sync, with the same deadline, and stalls again.
    let second = &log.requests[1];
    assert_eq!(second.since, None);
    assert_eq!(second.deadline, second.at + deadline);
    assert_eq!(log.errors[1].at, second.at + deadline);
    assert_eq!(log.errors[1].failure, Failure::DeadlineExceeded(deadline));
    assert_eq!(log.errors[1].attempt, 2);
    assert_eq!(
        log.state_sequence(),
        [
            SyncState::InitialSync,
            SyncState::BackingOff,
            SyncState::InitialSync,
            SyncState::BackingOff
        ]
    );
}

#[test]
fn stalled_long_poll_hits_timeout_plus_margin_and_late_answers_change_nothing() {
    for (timeout, margin) in [(secs(30), secs(30)), (secs(45), secs(5)), (ms(100), ms(20))] {
        let mut config = sim::config();
        config.since = Some("s0".to_owned());
        config.long_poll_timeout = timeout;
        config.deadline_margin = margin;
        config.jitter_seed = 5;
        let mut calls = 0;
        let server = Homeserver::new(Feed::new(5, &[ROOM]), move |feed, req| {
            calls += 1;
            match calls {
                1 => Reply::ok(ms(10), feed.new_batch(req, 1)),
                _ => Reply::Stall,
            }
        });
        let mut sim = Sim::scripted(config, server);
        sim.run_while(100, |s| s.log.errors.len() < 2);

        let catch_up = &sim.log.requests[0];
        assert_eq!(catch_up.timeout, Some(ZERO));
        assert_eq!(
            catch_up.deadline,
            matrix_sync_service::defaults::CATCH_UP_DEADLINE,
            "a catch-up from a since has the catch-up deadline"
        );
        let poll = &sim.log.requests[1];
        assert_eq!(poll.since.as_deref(), Some("s1"));
        assert_eq!(poll.timeout, Some(timeout));
        assert_eq!(poll.deadline, poll.at + timeout + margin);
        let e = &sim.log.errors[0];
        assert_eq!(e.at, poll.deadline, "the deadline fires on time");
        assert_eq!(e.failure, Failure::DeadlineExceeded(timeout + margin));
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(poll.outcome, Outcome::Abandoned { at: poll.deadline });
        // The retry catches up with timeout=0, under the catch-up deadline.
        let catch_up_deadline = matrix_sync_service::defaults::CATCH_UP_DEADLINE;
        let retry = &sim.log.requests[2];
        assert_eq!(retry.at, e.at + e.delay);
        assert_eq!(retry.timeout, Some(ZERO));
        assert_eq!(
            sim.log.errors[1].failure,
            Failure::DeadlineExceeded(catch_up_deadline)
        );
        assert_eq!(sim.log.errors[1].at, retry.at + catch_up_deadline);

        // Feed a late answer to the abandoned long-poll, by hand: refused, nothing changes.
        let late = sim.instant(sim.log.errors[1].at + secs(1));
        let m = &mut sim.machine;
        let before = (
            m.since().map(str::to_owned),
            m.state(),
            m.in_flight().map(|f| (f.id, f.kind.clone(), f.deadline)),
            m.poll_timeout(),
        );
        let body = br#"{"next_batch":"late","rooms":{"join":{"!room:example.org":{"timeline":{"events":[{"type":"m.room.message","event_id":"$late","sender":"@a:example.org","origin_server_ts":1,"content":{"body":"late"}}]}}}}}"#;
        let response = http::Response::builder()
            .status(200)
            .body(body.to_vec())
            .unwrap();
        assert_eq!(
            m.handle_response(poll.id, response, late),
            Err(InputError::StaleRequest(poll.id))
        );
        let failure = matrix_sync_service::TransportFailure::new(TransportErrorKind::Reset, "x");
        assert_eq!(
            m.handle_failure(catch_up.id, failure, late),
            Err(InputError::StaleRequest(catch_up.id))
        );
        let after = (
            m.since().map(str::to_owned),
            m.state(),
            m.in_flight().map(|f| (f.id, f.kind.clone(), f.deadline)),
            m.poll_timeout(),
        );
        assert_eq!(before, after);
        assert!(m.poll_event().is_none());
        assert!(m.poll_error().is_none());
        assert!(m.poll_state().is_none());
        assert_eq!(
            sim.log.state_sequence(),
            [
                SyncState::CatchingUp,
                SyncState::Live,
                SyncState::BackingOff,
                SyncState::CatchingUp,
                SyncState::BackingOff
            ]
        );
    }
}

// ---- 5. a server answering long-polls at once with nothing new ------------------------------

#[test]
fn server_answering_long_polls_at_once_with_nothing_new_cannot_make_it_spin() {
    let policy = default_policy();
    let server = Homeserver::new(Feed::new(6, &[ROOM]), |feed, req| {
        if req.since.as_deref() == Some("s0") {
            Reply::ok(ZERO, feed.new_batch(req, 1))
        } else {
            Reply::ok(ZERO, Feed::idle(req))
        }
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    let mut sim = Sim::scripted(config, server);
    let hour = secs(3600);
    sim.run_until(hour);
    let log = &sim.log;
    assert!(log.errors.is_empty());
    assert_eq!(log.batches().len(), 1, "idle answers deliver nothing");
    // After the first (new) batch, requests are spaced by the backoff schedule, up to its cap.
    // The jitter is the documented one: the same draws as failures would take.
    let mut reference = ReferenceBackoff::new(policy, 0);
    let idle: Vec<&Sent> = log.requests.iter().skip(1).collect();
    for (k, pair) in idle.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        assert_eq!(
            gap,
            reference.next_delay(),
            "gap after idle answer {}",
            k + 1
        );
    }
    // 500 ms + 1 + 2 + ... + 32 s, then one per 30 to 60 s (jitter).
    assert!(log.requests.len() < 130, "{} requests", log.requests.len());
    assert_eq!(
        log.state_sequence(),
        [SyncState::CatchingUp, SyncState::Live]
    );
}

#[test]
fn server_answering_long_polls_at_once_with_fresh_empty_tokens_cannot_make_it_spin() {
    let policy = default_policy();
    let server = Homeserver::new(Feed::new(6, &[ROOM]), |feed, req| {
        if req.since.as_deref() == Some("s0") {
            return Reply::ok(ZERO, feed.new_batch(req, 1));
        }
        let token = feed.peek_token();
        let _ = feed.new_batch(req, 0);
        Reply::ok(ms(3), format!(r#"{{"next_batch":"{token}"}}"#).into_bytes())
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    let mut sim = Sim::scripted(config, server);
    sim.run_until(secs(3600));
    let log = &sim.log;
    assert!(log.errors.is_empty());
    // Every fresh token is a checkpoint, and `since` follows them all.
    let answered = log
        .requests
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Answered { .. }))
        .count();
    assert_eq!(log.batches().len(), answered);
    // Nothing but a checkpoint reached the consumer: from the first early empty answer on,
    // the requests are spaced by the backoff schedule (with its documented jitter).
    let mut reference = ReferenceBackoff::new(policy, 0);
    let gaps: Vec<Duration> = log.requests.windows(2).map(|p| p[1].at - p[0].at).collect();
    assert_eq!(gaps[0], ZERO, "the catch-up batch is followed at once");
    for gap in &gaps[1..] {
        assert_eq!(*gap, ms(3) + reference.next_delay());
    }
    // As above: the ramp, then one per 30 to 60 s.
    assert!(log.requests.len() < 130, "{} requests", log.requests.len());
}

/// A quiet account, whose server holds every long-poll for the full timeout and then answers
/// with the same token, is not treated like a server answering at once: the held poll is
/// spacing enough, so the next long-poll goes out immediately and events are not delayed.
#[test]
fn quiet_long_polls_held_for_their_timeout_are_not_spaced() {
    let server = Homeserver::new(Feed::new(6, &[ROOM]), |feed, req| {
        if req.since.as_deref() == Some("s0") {
            return Reply::ok(ZERO, feed.new_batch(req, 1));
        }
        // Held for the whole long-poll, then: nothing happened.
        Reply::ok(req.timeout.unwrap_or(ZERO), Feed::idle(req))
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    let mut sim = Sim::scripted(config, server);
    sim.run_until(secs(3600));
    for pair in sim.log.requests.windows(2) {
        let Outcome::Answered { at, .. } = pair[0].outcome else {
            panic!("{:?}", pair[0])
        };
        assert_eq!(
            pair[1].at,
            at,
            "request {} waits {:?} after a quiet long-poll",
            pair[1].id,
            pair[1].at - at
        );
    }
}

// ---- gap filling through the scripted server ------------------------------------------------

fn message(id: &str) -> String {
    format!(
        r#"{{"type":"m.room.message","event_id":"{id}","sender":"@bob:example.org","origin_server_ts":1,"content":{{"msgtype":"m.text","body":"{id}"}}}}"#
    )
}

#[test]
fn limited_timeline_is_filled_through_messages_with_a_retried_page() {
    let mut calls = 0;
    let server = Homeserver::new(Feed::new(8, &[ROOM]), move |feed, req| {
        calls += 1;
        match (calls, &req.kind) {
            (1, Kind::Sync) => Reply::ok(ms(5), feed.new_batch(req, 1)),
            (2, Kind::Sync) => {
                let body = format!(
                    r#"{{"next_batch":"s2","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"limited":true,"prev_batch":"p2","events":[{},{}]}}}}}}}}}}"#,
                    message("$t1"),
                    message("$t2")
                );
                Reply::ok(secs(2), body.into_bytes())
            }
            (3, Kind::Messages { room }) => {
                assert_eq!(room, ROOM);
                assert_eq!(req.from.as_deref(), Some("p2"));
                assert_eq!(req.to.as_deref(), Some("s1"));
                // Newest first; overlaps the timeline by one event (its `prev_batch` was one
                // event late): `$t1` must not be delivered twice.
                let chunk = [message("$t1"), message("$g3"), message("$g2")].join(",");
                let body = format!(r#"{{"start":"p2","end":"p2b","chunk":[{chunk}]}}"#);
                Reply::ok(ms(30), body.into_bytes())
            }
            (4, Kind::Messages { .. }) => Reply::Failure {
                latency: ms(30),
                kind: TransportErrorKind::Reset,
            },
            (5, Kind::Messages { .. }) => {
                assert_eq!(req.from.as_deref(), Some("p2b"));
                assert_eq!(req.to.as_deref(), Some("s1"));
                let chunk = [message("$g1"), message("$g0")].join(",");
                let body = format!(r#"{{"start":"p2b","chunk":[{chunk}]}}"#);
                Reply::ok(ms(30), body.into_bytes())
            }
            (_, Kind::Sync) => Reply::Stall,
            (n, k) => panic!("unexpected request {n}: {k:?}"),
        }
    });
    let mut config = sim::config();
    config.since = Some("s0".to_owned());
    let mut sim = Sim::scripted(config, server);
    sim.run_while(100, |s| s.log.requests.len() < 6);
    let log = &sim.log;
    let kinds: Vec<(Kind, Option<String>)> = log
        .requests
        .iter()
        .map(|r| (r.kind.clone(), r.from.clone().or(r.since.clone())))
        .collect();
    let messages = Kind::Messages {
        room: ROOM.to_owned(),
    };
    assert_eq!(
        kinds,
        [
            (Kind::Sync, Some("s0".to_owned())),
            (Kind::Sync, Some("s1".to_owned())),
            (messages.clone(), Some("p2".to_owned())),
            (messages.clone(), Some("p2b".to_owned())),
            (messages, Some("p2b".to_owned())),
            (Kind::Sync, Some("s2".to_owned())),
        ]
    );
    let e = &log.errors[0];
    assert_eq!(
        (e.request, e.attempt, e.class),
        (Some(3), 1, ErrorClass::Transient)
    );
    assert_eq!(
        log.requests[4].at,
        e.at + e.delay,
        "the page is retried after the delay"
    );
    let batches = log.batches();
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        batches,
        [
            (ids(&["$ev1"]), "s1".to_owned()),
            (
                ids(&["$g0", "$g1", "$g2", "$g3", "$t1", "$t2"]),
                "s2".to_owned()
            ),
        ]
    );
    // Nothing of the batch was handed on before its gap was filled.
    let s2 = log
        .events
        .iter()
        .find(|e| e.checkpoint() == Some("s2"))
        .unwrap();
    let fill_done = match log.requests[4].outcome {
        Outcome::Answered { at, .. } => at,
        ref o => panic!("{o:?}"),
    };
    assert!(log
        .events
        .iter()
        .filter(|e| e.event_id.as_deref().is_some_and(|id| id != "$ev1"))
        .all(|e| e.at == fill_done));
    assert_eq!(s2.at, fill_done);
    assert_eq!(log.requests[5].since.as_deref(), Some("s2"));
    // The failed page was reported as a backoff and retried as catching up; the batch, from
    // a long-poll, is live traffic, but the first sync after the error still catches up.
    assert!(log.states.contains(&(e.at, SyncState::BackingOff)));
    let after_error: Vec<SyncState> = log
        .states
        .iter()
        .filter(|(at, _)| *at >= e.at)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(
        after_error[..2],
        [SyncState::BackingOff, SyncState::CatchingUp]
    );
    assert_eq!(
        s2.checkpoint_live(),
        Some(true),
        "the batch answered a long-poll"
    );
    assert_eq!(
        log.requests[5].timeout,
        Some(ZERO),
        "timeout=0 after an error"
    );
}

// ---- determinism ----------------------------------------------------------------------------

/// A hostile server mixing every kind of answer, with random latencies.
fn chaos(feed: &mut Feed, req: &Sent) -> Reply {
    let latency = ms(feed.rng.range(0, 40_000));
    match feed.rng.range(0, 11) {
        0..=3 => {
            let n = feed.rng.range(0, 4) as usize;
            Reply::ok(latency, feed.new_batch(req, n))
        }
        4 if req.since.is_some() => Reply::ok(latency, Feed::idle(req)),
        5 => Reply::error(latency, 500 + feed.rng.range(0, 4) as u16, "M_UNKNOWN", ""),
        6 => Reply::rate_limited(latency, feed.rng.range(0, 600_000), None),
        7 => Reply::error(latency, 401, "M_UNKNOWN_TOKEN", r#""soft_logout":true"#),
        8 => Reply::ok(latency, b"<html>502 Bad Gateway</html>".to_vec()),
        9 => Reply::Stall,
        _ => Reply::Failure {
            latency,
            kind: TransportErrorKind::Reset,
        },
    }
}

fn chaos_run(jitter_seed: u64) -> String {
    let mut config = sim::config();
    config.jitter_seed = jitter_seed;
    let mut sim = Sim::scripted(
        config,
        Homeserver::new(Feed::new(9, &[ROOM, "!b:x.org"]), chaos),
    );
    sim.run_until(DAY);
    let log = &sim.log;
    assert!(log.requests.len() > 500);
    sim::assert_valid_transitions(&log.states);
    assert!(log.late_answers.iter().all(|l| l.result.is_err()));
    format!("{log:?}")
}

#[test]
fn same_seed_same_day_bit_for_bit() {
    let a = chaos_run(11);
    let b = chaos_run(11);
    assert!(a == b, "two runs with the same seeds differ");
    let c = chaos_run(12);
    assert!(a != c, "the jitter seed has no effect");
}
