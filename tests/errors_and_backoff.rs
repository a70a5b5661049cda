//! Errors and backoff (contract §4, crate docs "Errors"): every row of the error table, the
//! exact jittered delays, deadlines, rate limits and `Retry-After`, fatal failures, bad 200s,
//! the body cap, and the hot-loop guard that paces answers delivering nothing.

use std::time::Duration;

use matrix_sync_service::{
    BackoffPolicy, ErrorClass, EventKind, Failure, InputError, RequestKind, SyncError, SyncState,
    TransportErrorKind, TransportFailure,
};
use matrix_sync_testkit::backoff::{base_delay, ReferenceBackoff};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::Harness;

// ---- transport failures and exact jitter ---------------------------------------------------------

#[test]
fn transport_failures_back_off_with_the_documented_jittered_delays() {
    let mut c = config();
    c.jitter_seed = 0x5EED_1234_ABCD;
    let mut reference = ReferenceBackoff::from_config(&c);
    let mut h = Harness::new(c);
    let kinds = [
        TransportErrorKind::Connect,
        TransportErrorKind::Reset,
        TransportErrorKind::Dns,
        TransportErrorKind::Tls,
        TransportErrorKind::Truncated,
        TransportErrorKind::Other,
        TransportErrorKind::Connect,
        TransportErrorKind::Reset,
        TransportErrorKind::Dns,
        TransportErrorKind::Tls,
    ];
    let mut req = h.request();
    let mut delays = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let attempt = i as u32 + 1;
        assert_eq!(
            req.kind,
            RequestKind::Sync {
                timeout: Duration::ZERO
            }
        );
        assert_eq!(timeout_param(&req), "0");
        let failure = TransportFailure::new(kind, format!("failure {attempt}"));
        h.machine
            .handle_failure(req.id, failure.clone(), h.now)
            .unwrap();
        h.drain();
        let failed_at = h.now;
        let err = h.one_error();
        let expected = reference.delay(attempt);
        assert_eq!(
            err,
            SyncError {
                failure: Failure::Transport(failure),
                class: ErrorClass::Transient,
                request: RequestKind::Sync {
                    timeout: Duration::ZERO
                },
                attempt,
                delay: expected,
            }
        );
        assert_eq!(err.failure.status(), None);
        assert_eq!(err.failure.errcode(), None);
        assert_eq!(h.machine.state(), SyncState::BackingOff);
        assert_eq!(h.machine.since(), None);
        assert!(h.machine.in_flight().is_none());
        delays.push(expected);
        req = h.retry_after(failed_at, expected);
    }
    // The jitter really is there (seeded, not zero), and the cap holds.
    let bases: Vec<Duration> = (1..=10)
        .map(|n| base_delay(&BackoffPolicy::default(), n))
        .collect();
    assert_eq!(bases[0], Duration::from_millis(500));
    assert_eq!(bases[7], Duration::from_secs(60));
    for (d, b) in delays.iter().zip(&bases) {
        assert!(*d <= *b && *d >= b.mul_f64(0.5), "{d:?} vs base {b:?}");
    }
    assert!(
        delays.iter().zip(&bases).any(|(d, b)| d != b),
        "jitter applied"
    );
    assert_eq!(
        h.take_states(),
        [SyncState::InitialSync]
            .into_iter()
            .chain([SyncState::BackingOff, SyncState::InitialSync].repeat(10))
            .collect::<Vec<_>>()
    );

    // Success resets the attempt counter; the generator goes on.
    h.respond(&req, json_response(&empty_sync("s1")));
    assert_eq!(h.take_states(), [SyncState::Live]);
    let req = h.request();
    assert_eq!(timeout_param(&req), "30000");
    h.machine
        .handle_failure(
            req.id,
            TransportFailure::new(TransportErrorKind::Reset, "x"),
            h.now,
        )
        .unwrap();
    h.drain();
    let err = h.one_error();
    assert_eq!(err.attempt, 1);
    assert_eq!(err.delay, reference.delay(1));
    assert_eq!(
        err.request,
        RequestKind::Sync {
            timeout: Duration::from_secs(30)
        }
    );
    assert_eq!(h.take_states(), [SyncState::BackingOff]);
    let failed_at = h.now;
    let req = h.retry_after(failed_at, err.delay);
    assert_eq!(
        timeout_param(&req),
        "0",
        "first request after an error catches up"
    );
    assert_eq!(since_param(&req).as_deref(), Some("s1"));
    assert_eq!(h.take_states(), [SyncState::CatchingUp]);
    h.respond(&req, json_response(&empty_sync("s2")));
    assert_eq!(h.take_states(), [SyncState::Live]);
    assert_eq!(timeout_param(&h.request()), "30000");
}

#[test]
fn same_seed_same_delays_other_seed_other_delays() {
    let run = |seed: u64| {
        let mut c = config();
        c.jitter_seed = seed;
        let mut h = Harness::new(c);
        let mut delays = Vec::new();
        for _ in 0..6 {
            let req = h.next_request();
            h.machine
                .handle_failure(
                    req.id,
                    TransportFailure::new(TransportErrorKind::Connect, "refused"),
                    h.now,
                )
                .unwrap();
            h.drain();
            delays.push(h.one_error().delay);
        }
        delays
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

// ---- deadlines -----------------------------------------------------------------------------------

#[test]
fn deadline_passed_is_transient_and_a_late_answer_is_stale() {
    let mut c = config_no_jitter();
    c.initial_sync_deadline = Duration::from_secs(600);
    let mut h = Harness::new(c);
    let start = h.now;
    let req = h.request();
    assert_eq!(
        req.deadline,
        start + Duration::from_secs(600),
        "initial sync deadline"
    );
    assert_eq!(h.machine.poll_timeout(), Some(req.deadline));
    let awaited = h.machine.in_flight().unwrap();
    let (id, kind, deadline) = (awaited.id, awaited.kind, awaited.deadline);
    assert_eq!(
        (id, kind.clone(), deadline),
        (req.id, req.kind.clone(), req.deadline)
    );

    h.advance(Duration::from_secs(600) - Duration::from_nanos(1));
    assert!(h.take_errors().is_empty(), "not yet");
    assert!(h.machine.in_flight().is_some());
    h.advance(Duration::from_nanos(1));
    let err = h.one_error();
    assert_eq!(
        err.failure,
        Failure::DeadlineExceeded(Duration::from_secs(600))
    );
    assert_eq!(
        (err.class, err.attempt, err.delay),
        (ErrorClass::Transient, 1, Duration::from_millis(500))
    );
    assert!(h.machine.in_flight().is_none());
    assert_eq!(h.machine.state(), SyncState::BackingOff);

    // The answer that comes too late is refused and changes nothing.
    let got = h
        .machine
        .handle_response(req.id, json_response(&empty_sync("late")), h.now);
    assert_eq!(got, Err(InputError::StaleRequest(req.id)));
    assert_eq!(h.machine.since(), None);
    assert_eq!(h.machine.poll_event().map(|e| e.kind), None);

    // An incremental catch-up (timeout 0) has the margin as deadline, a long-poll timeout+margin.
    let failed_at = h.now;
    let req = h.retry_after(failed_at, Duration::from_millis(500));
    h.respond(&req, json_response(&empty_sync("s1")));
    let req = h.request();
    assert_eq!(req.deadline, h.now + Duration::from_secs(60));
    h.advance(Duration::from_secs(60));
    let err = h.one_error();
    assert_eq!(
        err.failure,
        Failure::DeadlineExceeded(Duration::from_secs(60))
    );
    assert_eq!(err.attempt, 1, "reset by the success");
    let failed_at = h.now;
    let req = h.retry_after(failed_at, Duration::from_millis(500));
    assert_eq!(
        req.kind,
        RequestKind::Sync {
            timeout: Duration::ZERO
        }
    );
    assert_eq!(
        req.deadline,
        h.now + matrix_sync_service::defaults::CATCH_UP_DEADLINE,
        "a catch-up from a since gets the catch-up deadline"
    );
}

// ---- 5xx -------------------------------------------------------------------------------------------

#[test]
fn server_errors_with_any_body_are_transient() {
    let mut h = Harness::new(config_no_jitter());
    let cases: [(u16, &str, Option<&str>, Option<&str>); 5] = [
        (500, "", None, None),
        (
            502,
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            None,
            None,
        ),
        (
            503,
            r#"{"errcode":"M_UNKNOWN","error":"Service unavailable"}"#,
            Some("M_UNKNOWN"),
            Some("Service unavailable"),
        ),
        (504, "upstream timed out", None, None),
        (
            500,
            r#"{"errcode":"M_UNKNOWN","error":"Internal server error"}"#,
            Some("M_UNKNOWN"),
            Some("Internal server error"),
        ),
    ];
    let mut req = h.request();
    for (i, (status, body, errcode, message)) in cases.into_iter().enumerate() {
        let attempt = i as u32 + 1;
        h.reply(&req, status, body);
        let err = h.one_error();
        let delay = Duration::from_millis(500 << i);
        assert_eq!(
            err,
            SyncError {
                failure: Failure::Server {
                    status,
                    errcode: errcode.map(str::to_owned),
                    message: message.map(str::to_owned),
                },
                class: ErrorClass::Transient,
                request: RequestKind::Sync {
                    timeout: Duration::ZERO
                },
                attempt,
                delay,
            }
        );
        assert_eq!(err.failure.status(), Some(status));
        assert_eq!(err.failure.errcode(), errcode);
        assert!(h.events().is_empty());
        assert_eq!(h.machine.since(), None);
        let failed_at = h.now;
        req = h.retry_after(failed_at, delay);
    }
}

// ---- 429 -------------------------------------------------------------------------------------------

#[test]
fn rate_limit_waits_for_the_larger_of_server_wait_and_backoff() {
    let body = fixture(E429);
    let fixture_wait = Duration::from_millis(36304);
    // (Retry-After header, max_server_wait, expected server wait before the backoff)
    let cases: [(Option<&str>, Duration, Duration); 5] = [
        (None, Duration::from_secs(300), fixture_wait),
        (
            Some("120"),
            Duration::from_secs(300),
            Duration::from_secs(120),
        ),
        (Some("10"), Duration::from_secs(300), fixture_wait),
        (
            Some("120"),
            Duration::from_secs(20),
            Duration::from_secs(20),
        ),
        (None, Duration::ZERO, Duration::ZERO),
    ];
    for (header, cap, server_wait) in cases {
        let mut c = config();
        c.jitter_seed = 99;
        c.max_server_wait = cap;
        let mut reference = ReferenceBackoff::from_config(&c);
        let mut h = Harness::live(c);
        let mut req = h.request();
        for attempt in 1..=3 {
            let headers: Vec<(&str, &str)> = header.iter().map(|v| ("retry-after", *v)).collect();
            h.respond(&req, response_with(429, &headers, body.clone()));
            let err = h.one_error();
            let own = reference.delay(attempt);
            let expected = own.max(server_wait);
            let asked = match header {
                Some(v) => Duration::from_secs(v.parse().unwrap()).max(fixture_wait),
                None => fixture_wait,
            };
            assert_eq!(
                err.failure,
                Failure::RateLimited {
                    retry_after: Some(asked),
                    errcode: Some("M_LIMIT_EXCEEDED".to_owned()),
                    message: Some("Too Many Requests".to_owned()),
                },
                "{header:?}"
            );
            assert_eq!(err.class, ErrorClass::RateLimited);
            assert_eq!(err.failure.status(), Some(429));
            assert_eq!(err.failure.errcode(), Some("M_LIMIT_EXCEEDED"));
            assert_eq!(err.attempt, attempt);
            assert_eq!(
                err.delay, expected,
                "header {header:?} cap {cap:?} attempt {attempt}"
            );
            assert_eq!(h.machine.state(), SyncState::BackingOff);
            assert_eq!(h.machine.since(), Some("s0"));
            let failed_at = h.now;
            req = h.retry_after(failed_at, expected);
            assert_eq!(timeout_param(&req), "0");
            assert_eq!(since_param(&req).as_deref(), Some("s0"));
        }
        assert_eq!(
            h.take_states(),
            [SyncState::BackingOff, SyncState::CatchingUp].repeat(3)
        );
    }
}

#[test]
fn rate_limit_backoff_wins_when_larger_and_header_alone_counts() {
    // Backoff larger than the server's wait.
    let mut c = config_no_jitter();
    c.backoff.initial = Duration::from_secs(45);
    let mut h = Harness::live(c);
    let req = h.request();
    h.reply(&req, 429, fixture(E429));
    assert_eq!(h.one_error().delay, Duration::from_secs(45));
    // An HTML 429 from a proxy, with only a Retry-After header.
    let mut h = Harness::live(config_no_jitter());
    let req = h.request();
    h.respond(
        &req,
        response_with(429, &[("retry-after", "7")], "<html>slow down</html>"),
    );
    let err = h.one_error();
    assert_eq!(
        err.failure,
        Failure::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
            errcode: None,
            message: None
        }
    );
    assert_eq!(err.delay, Duration::from_secs(7));
}

// ---- fatal -----------------------------------------------------------------------------------------

#[test]
fn unknown_token_is_fatal_and_retried_only_at_the_maximum_backoff() {
    for soft_logout in [false, true] {
        let body = if soft_logout {
            fixture(E401).replace("\"soft_logout\":false", "\"soft_logout\":true")
        } else {
            fixture(E401)
        };
        assert!(body.contains(&format!("\"soft_logout\":{soft_logout}")));
        let mut c = config();
        c.jitter_seed = 3;
        let mut reference = ReferenceBackoff::from_config(&c);
        let mut h = Harness::live(c);
        let mut req = h.request();
        for attempt in 1..=4 {
            h.reply(&req, 401, body.clone());
            let err = h.one_error();
            assert_eq!(
                err,
                SyncError {
                    failure: Failure::UnknownToken {
                        soft_logout,
                        message: Some("Invalid access token passed.".to_owned()),
                    },
                    class: ErrorClass::NeedsUser,
                    request: RequestKind::Sync {
                        timeout: if attempt == 1 {
                            Duration::from_secs(30)
                        } else {
                            Duration::ZERO
                        }
                    },
                    attempt,
                    delay: Duration::from_secs(60),
                }
            );
            assert_eq!(err.failure.status(), Some(401));
            assert_eq!(err.failure.errcode(), Some("M_UNKNOWN_TOKEN"));
            assert_eq!(h.machine.state(), SyncState::Refused);
            assert_eq!(h.machine.since(), Some("s0"));
            let failed_at = h.now;
            req = h.retry_after(failed_at, Duration::from_secs(60));
            assert_eq!(timeout_param(&req), "0");
        }
        assert_eq!(
            h.take_states(),
            [SyncState::Refused],
            "stays unauthorized while retrying"
        );

        // A transient failure now draws the first jitter number (fatal errors draw none).
        h.reply(&req, 503, "");
        let err = h.one_error();
        assert_eq!(err.attempt, 5);
        let expected = reference.delay(5);
        assert_eq!(err.delay, expected);
        assert_eq!(h.take_states(), [SyncState::BackingOff]);
        let failed_at = h.now;
        let req = h.retry_after(failed_at, expected);
        assert_eq!(h.take_states(), [SyncState::CatchingUp]);

        // The token works again: back to live, attempts reset.
        h.respond(&req, json_response(&empty_sync("s1")));
        assert_eq!(h.take_states(), [SyncState::Live]);
        // The catch-up that worked proves nothing about long-polls, which failed first: the
        // count goes on (a fatal wait is the maximum either way).
        let req = h.request();
        h.reply(&req, 401, body.clone());
        let err = h.one_error();
        assert_eq!((err.attempt, err.delay), (6, Duration::from_secs(60)));
    }
}

#[test]
fn a_success_after_unauthorized_catches_up_then_goes_live() {
    let mut h = Harness::live(config());
    let req = h.request();
    h.reply(&req, 401, fixture(E401));
    let _ = h.one_error();
    let failed_at = h.now;
    let req = h.retry_after(failed_at, Duration::from_secs(60));
    h.respond(
        &req,
        json_response(&message_sync("s1", "!r:localhost", "m", &["hello"])),
    );
    let events = h.take_events();
    assert_eq!(kinds(&events), ["message", "checkpoint"]);
    assert_eq!(
        h.take_states(),
        [SyncState::Refused, SyncState::CatchingUp, SyncState::Live]
    );
}

#[test]
fn bad_since_forbidden_and_other_4xx_are_fatal_with_errcode_and_message() {
    let cases: [(u16, String, Option<&str>, Option<&str>); 4] = [
        (
            400,
            fixture(E400),
            Some("M_UNKNOWN"),
            Some("Invalid stream token"),
        ),
        (
            403,
            r#"{"errcode":"M_FORBIDDEN","error":"You are not allowed"}"#.to_owned(),
            Some("M_FORBIDDEN"),
            Some("You are not allowed"),
        ),
        (404, "<html>not found</html>".to_owned(), None, None),
        (
            401,
            r#"{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}"#.to_owned(),
            Some("M_MISSING_TOKEN"),
            Some("Missing access token"),
        ),
    ];
    for (status, body, errcode, message) in cases {
        let mut c = config();
        c.since = Some("s_unknown_to_the_server".to_owned());
        let mut h = Harness::new(c);
        let mut req = h.request();
        for attempt in 1..=2 {
            h.reply(&req, status, body.clone());
            let err = h.one_error();
            assert_eq!(
                err,
                SyncError {
                    failure: Failure::Refused {
                        status,
                        errcode: errcode.map(str::to_owned),
                        message: message.map(str::to_owned),
                    },
                    class: ErrorClass::NeedsUser,
                    request: RequestKind::Sync {
                        timeout: Duration::ZERO
                    },
                    attempt,
                    delay: Duration::from_secs(60),
                },
                "{status}"
            );
            assert_eq!(err.failure.status(), Some(status));
            assert_eq!(err.failure.errcode(), errcode);
            let shown = err.to_string();
            if let Some(m) = message {
                assert!(shown.contains(m), "{shown}");
            }
            assert_eq!(h.machine.state(), SyncState::Refused);
            assert_eq!(h.machine.since(), Some("s_unknown_to_the_server"));
            let failed_at = h.now;
            req = h.retry_after(failed_at, Duration::from_secs(60));
        }
        assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Refused]);
    }
}

// ---- bad 200s --------------------------------------------------------------------------------------

#[test]
fn a_200_that_is_not_a_sync_response_is_transient_with_an_excerpt() {
    let full = fixture(INCREMENTAL);
    let half = full[..full.len() / 2].to_owned();
    let long_html = format!("<html>{}</html>", "x".repeat(1000));
    let cases: Vec<String> = vec![
        half,
        String::new(),
        "<html><body>Welcome to nginx!</body></html>".to_owned(),
        long_html,
        "{}".to_owned(),
        r#"{"next_batch": 5}"#.to_owned(),
        "null".to_owned(),
    ];
    let mut h = Harness::live(config_no_jitter());
    let mut req = h.request();
    for (i, body) in cases.iter().enumerate() {
        let attempt = i as u32 + 1;
        h.reply(&req, 200, body.clone());
        let err = h.one_error();
        let delay = BackoffPolicy::default().base_delay(attempt);
        assert_eq!(delay, base_delay(&BackoffPolicy::default(), attempt));
        match &err.failure {
            Failure::BadResponse {
                status,
                reason,
                excerpt,
            } => {
                assert_eq!(*status, 200);
                assert!(!reason.is_empty());
                let n = body.len().min(256);
                assert_eq!(excerpt, &body[..n], "case {i}");
            }
            other => panic!("case {i}: {other:?}"),
        }
        assert_eq!(
            (err.class, err.attempt, err.delay),
            (ErrorClass::Transient, attempt, delay)
        );
        assert_eq!(err.failure.status(), Some(200));
        assert!(h.events().is_empty(), "no event from a bad body");
        assert_eq!(h.machine.since(), Some("s0"), "since unchanged");
        let failed_at = h.now;
        req = h.retry_after(failed_at, delay);
        assert_eq!(since_param(&req).as_deref(), Some("s0"));
        assert_eq!(timeout_param(&req), "0");
    }
    // The whole body parses: delivered (the key counts are those of `s0`: not repeated).
    h.reply(&req, 200, full);
    assert_eq!(h.events().len(), 12, "{:?}", kinds(h.events()));
    assert_eq!(h.events()[0].body.as_deref(), Some("after the first sync"));
    assert_eq!(
        h.machine.since(),
        Some("s7641_53_2_135_14_1_2_17_0_1_1_1_1_1")
    );
}

// ---- the hot loop ----------------------------------------------------------------------------------

#[test]
fn an_unchanged_empty_200_answered_instantly_does_not_spin() {
    let mut c = config_no_jitter();
    c.since = Some("s_same".to_owned());
    let policy = c.backoff.clone();
    let mut h = Harness::new(c);
    let mut sent = Vec::new();
    for _ in 0..1000 {
        // Only ever advance the clock to the machine's own wake-up instant.
        let req = h.next_request();
        assert_eq!(since_param(&req).as_deref(), Some("s_same"));
        sent.push(h.now);
        h.respond(&req, json_response(&empty_sync("s_same")));
    }
    assert!(
        h.events().is_empty(),
        "nothing to deliver: {:?}",
        kinds(h.events())
    );
    assert!(h.errors().is_empty());
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
    assert_eq!(h.machine.since(), Some("s_same"));
    // The catch-up (`timeout=0`) is followed at once by the first long-poll; from then on
    // every instant answer to a long-poll spaces the next request.
    assert_eq!(
        sent[1], sent[0],
        "the long-poll follows the catch-up at once"
    );
    let gaps: Vec<Duration> = sent[1..].windows(2).map(|w| w[1] - w[0]).collect();
    assert_spacing_grows_to_the_cap(&gaps, &policy);
    let total = *sent.last().unwrap() - sent[0];
    assert!(
        total >= 900 * policy.max,
        "1000 answers took only {total:?}"
    );

    // Something new resets the spacing: the next request goes out at once.
    let req = h.next_request();
    h.respond(
        &req,
        json_response(&message_sync("s_new", "!r:localhost", "n", &["news"])),
    );
    assert_eq!(kinds(&h.take_events()), ["message", "checkpoint"]);
    let at = h.now;
    let req = h.next_request();
    assert_eq!(h.now, at, "no wait after real news");
    assert_eq!(since_param(&req).as_deref(), Some("s_new"));
}

#[test]
fn fresh_empty_tokens_answered_instantly_are_spaced_from_the_first() {
    let mut h = Harness::live(config_no_jitter());
    let policy = h.machine.config().backoff.clone();
    let mut sent = Vec::new();
    for i in 1..=40 {
        let req = h.next_request();
        assert_eq!(timeout_param(&req), "30000");
        sent.push(h.now);
        let token = format!("t{i}");
        h.respond(&req, json_response(&empty_sync(&token)));
        // A new token is a batch: only its checkpoint, as live traffic.
        let events = h.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].kind,
            EventKind::Checkpoint(matrix_sync_service::Checkpoint {
                next_batch: token.clone(),
                live: true
            })
        );
        assert_eq!(h.machine.since(), Some(token.as_str()));
    }
    assert!(h.errors().is_empty());
    let gaps: Vec<Duration> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    // Nothing reached the consumer but a checkpoint: every such answer is spaced.
    assert_eq!(gaps[0], policy.initial, "{gaps:?}");
    assert_spacing_grows_to_the_cap(&gaps, &policy);

    // An empty answer after a real long-poll wait is normal: no spacing, streak forgotten.
    let req = h.next_request();
    h.advance(Duration::from_secs(20));
    h.respond(&req, json_response(&empty_sync("t_waited")));
    let at = h.now;
    let req = h.next_request();
    assert_eq!(h.now, at, "no wait after a long-poll that waited");
    h.respond(&req, json_response(&empty_sync("t_after")));
    let at = h.now;
    let _ = h.next_request();
    assert_eq!(
        h.now,
        at + policy.initial,
        "the streak was reset: an instant empty answer waits the first step again"
    );
}

// ---- at the bounds -----------------------------------------------------------------------------

#[test]
fn a_body_exactly_at_the_cap_is_read_one_byte_more_is_refused() {
    let body = serde_json::to_vec(&empty_sync("s1")).unwrap();
    let mut c = config();
    c.max_body_bytes = body.len() as u64;
    let mut h = Harness::new(c.clone());
    let req = h.request();
    h.respond(&req, response(200, body.clone()));
    assert!(h.take_errors().is_empty());
    assert_eq!(h.machine.since(), Some("s1"));

    c.max_body_bytes = body.len() as u64 - 1;
    let limit = c.max_body_bytes;
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, response(200, body));
    let errors = h.take_errors();
    assert_eq!(errors[0].failure, Failure::BodyTooLarge { limit });
    assert_eq!(errors[0].class, ErrorClass::Transient);
    assert_eq!(h.machine.since(), None);
}

#[test]
fn a_fractional_retry_after_ms_is_honoured_and_a_negative_one_ignored() {
    let mut c = config_no_jitter();
    c.backoff.initial = std::time::Duration::from_millis(10);
    let mut h = Harness::new(c);
    let req = h.request();
    h.reply(
        &req,
        429,
        r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500.0}"#,
    );
    let e = h.take_errors().remove(0);
    assert_eq!(e.delay, std::time::Duration::from_millis(1500));
    let req = h.next_request();
    h.reply(
        &req,
        429,
        r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":-5.0}"#,
    );
    let e = h.take_errors().remove(0);
    assert_eq!(
        e.delay,
        std::time::Duration::from_millis(20),
        "the backoff alone"
    );
    let Failure::RateLimited { retry_after, .. } = e.failure else {
        panic!()
    };
    assert_eq!(retry_after, None);
}

/// Requests at least `initial` apart, the spacing never shrinking, up to the cap.
fn assert_spacing_grows_to_the_cap(gaps: &[Duration], policy: &BackoffPolicy) {
    assert!(gaps.iter().all(|g| *g >= policy.initial), "{gaps:?}");
    assert!(
        gaps.windows(2).all(|w| w[0] <= w[1]),
        "spacing never shrinks: {gaps:?}"
    );
    assert_eq!(gaps.last(), Some(&policy.max), "spacing grows to the cap");
}
