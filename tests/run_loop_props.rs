//! Properties of the machine under arbitrary inputs, driven like the canonical loop: one input,
//! then drain everything, then take at most one request. The machine is the test kit's
//! `Checked`, so every invariant of the kit is asserted at every call; this file adds what
//! depends on its inputs:
//!
//! * no panic, whatever the server, the network or the caller does;
//! * `since` only ever becomes the `next_batch` of a parsable 200 sync body that was fed, and only
//!   when its checkpoint is polled; no input moves it by itself;
//! * every delay is within the documented bounds, never more than one request in flight and
//!   refused inputs change nothing (the kit's invariants);
//! * the machine never stalls (the kit's `assert_waiting` after every step);
//! * the inputs the caller gets wrong are refused with the error that says so;
//! * same seed and inputs give the same outputs, bit for bit.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    BackoffPolicy, Config, EventKind, GapFill, InputError, OutgoingRequest, RequestId, RequestKind,
    TransportErrorKind, TransportFailure,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::{foreign_request_id, Checked};
use proptest::prelude::*;
use serde_json::json;

#[derive(Clone, Debug)]
enum Op {
    /// A parsable 200 for the request in flight (a sync body or a `/messages` page).
    Valid {
        after_ms: u32,
        token: u8,
        same_token: bool,
        msgs: u8,
        limited: bool,
        end: bool,
    },
    /// A 200 whose body is not what the endpoint returns.
    Garbage { after_ms: u32, which: u8 },
    /// An error status.
    Status {
        after_ms: u32,
        status: u16,
        which: u8,
        header: Option<u16>,
        retry_ms: Option<u32>,
    },
    /// A transport failure.
    Transport { after_ms: u32, kind: u8 },
    /// Time passes.
    Advance(u32),
    /// Time passes up to the machine's wake-up instant.
    Wake,
    /// A response to an id that is not the one in flight.
    WrongId(u64),
    /// An input from the past.
    Backwards(u32),
    /// The caller stops the machine.
    Stop,
    /// The application answers the credentials handed out: stored, or not.
    Store(bool),
    /// The application sets an access token of its own (`set_access_token`).
    SetToken(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let after = prop_oneof![3 => Just(0u32), 2 => 0u32..5_000, 1 => 0u32..200_000];
    prop_oneof![
        24 => (after.clone(), 0u8..6, any::<bool>(), 0u8..5, prop::bool::weighted(0.3), any::<bool>())
            .prop_map(|(after_ms, token, same_token, msgs, limited, end)| Op::Valid {
                after_ms, token, same_token, msgs, limited, end
            }),
        8 => (after.clone(), 0u8..8).prop_map(|(after_ms, which)| Op::Garbage { after_ms, which }),
        12 => (
            after.clone(),
            prop::sample::select(vec![429u16, 429, 500, 502, 503, 504, 401, 401, 400, 403, 404, 302]),
            0u8..4,
            prop::option::of(0u16..700),
            prop::option::of(0u32..1_000_000),
        )
            .prop_map(|(after_ms, status, which, header, retry_ms)| Op::Status {
                after_ms, status, which, header, retry_ms
            }),
        8 => (after, 0u8..8).prop_map(|(after_ms, kind)| Op::Transport { after_ms, kind }),
        8 => (0u32..700_000).prop_map(Op::Advance),
        16 => Just(Op::Wake),
        4 => any::<u64>().prop_map(Op::WrongId),
        4 => (1u32..10_000).prop_map(Op::Backwards),
        1 => Just(Op::Stop),
        6 => any::<bool>().prop_map(Op::Store),
        2 => any::<u8>().prop_map(Op::SetToken),
    ]
}

#[derive(Clone, Debug)]
struct Params {
    seed: u64,
    initial_ms: u64,
    factor: f64,
    extra_max_ms: u64,
    jitter: f64,
    max_server_wait_ms: u64,
    since: bool,
    long_poll_ms: u64,
    margin_ms: u64,
    initial_deadline_ms: u64,
    gap_enabled: bool,
    gap_max: usize,
    page_size: u32,
    small_bodies: bool,
}

fn params() -> impl Strategy<Value = Params> {
    (
        (
            any::<u64>(),
            1u64..2_000,
            1.0f64..4.0,
            0u64..120_000,
            0.0f64..=1.0,
        ),
        (
            0u64..600_000,
            any::<bool>(),
            100u64..60_000,
            1u64..60_000,
            1u64..600_000,
        ),
        (
            any::<bool>(),
            0usize..10,
            1u32..5,
            prop::bool::weighted(0.2),
        ),
    )
        .prop_map(
            |(
                (seed, initial_ms, factor, extra_max_ms, jitter),
                (max_server_wait_ms, since, long_poll_ms, margin_ms, initial_deadline_ms),
                (gap_enabled, gap_max, page_size, small_bodies),
            )| Params {
                seed,
                initial_ms,
                factor,
                extra_max_ms,
                jitter,
                max_server_wait_ms,
                since,
                long_poll_ms,
                margin_ms,
                initial_deadline_ms,
                gap_enabled,
                gap_max,
                page_size,
                small_bodies,
            },
        )
}

fn build_config(p: &Params) -> Config {
    let mut c = config();
    c.jitter_seed = p.seed;
    c.backoff = BackoffPolicy::default()
        .with_initial(Duration::from_millis(p.initial_ms))
        .with_factor(p.factor)
        .with_max(Duration::from_millis(p.initial_ms + p.extra_max_ms))
        .with_jitter(p.jitter);
    c.max_server_wait = Duration::from_millis(p.max_server_wait_ms);
    c.since = p.since.then(|| "start_token".to_owned());
    c.long_poll_timeout = Duration::from_millis(p.long_poll_ms);
    c.deadline_margin = Duration::from_millis(p.margin_ms);
    c.initial_sync_deadline = Duration::from_millis(p.initial_deadline_ms);
    c.gap_fill = GapFill::default()
        .with_enabled(p.gap_enabled)
        .with_max_events_per_room(p.gap_max)
        .with_page_size(p.page_size);
    if p.small_bodies {
        c.max_body_bytes = 700;
    }
    // Half the runs hold a refresh token, and know when the access token expires.
    if p.seed.is_multiple_of(2) {
        c.refresh_token = Some(matrix_sync_service::RefreshToken::new("rt_start"));
        c.access_token_expires_in = Some(Duration::from_millis(p.initial_deadline_ms));
    }
    c
}

const ERROR_BODIES: [&str; 4] = [
    "",
    "<html><body>Bad Gateway</body></html>",
    r#"{"errcode":"M_UNKNOWN","error":"boom"}"#,
    "{\"errcode\":",
];

fn garbage(which: u8) -> Vec<u8> {
    match which {
        0 => Vec::new(),
        1 => b"<html><body>Welcome to nginx!</body></html>".to_vec(),
        2 => b"{}".to_vec(),
        3 => br#"{"next_batch": 5}"#.to_vec(),
        4 => b"null".to_vec(),
        5 => vec![0xff, 0xfe, 0x00, 0x80, b'{'],
        6 => {
            br#"{"next_batch":"ok","rooms":{"join":{"!r:localhost":{"timeline":{"events":"#.to_vec()
        }
        _ => br#"{"chunk": 7, "next_batch": []}"#.to_vec(),
    }
}

fn transport_kind(k: u8) -> TransportErrorKind {
    [
        TransportErrorKind::Connect,
        TransportErrorKind::Reset,
        TransportErrorKind::Dns,
        TransportErrorKind::Tls,
        TransportErrorKind::TimedOut,
        TransportErrorKind::Truncated,
        TransportErrorKind::BodyTooLarge,
        TransportErrorKind::Other,
    ][k as usize % 8]
}

/// One run: drives the machine through `ops`, checking every property, and returns the
/// transcript of everything it said.
fn run(p: &Params, ops: &[Op], base: Instant) -> Vec<String> {
    let config = build_config(p);
    let max_body = config.max_body_bytes;
    // Checked asserts the invariants at every call; this test adds what is particular to
    // its inputs: which tokens were fed, which inputs are refused, and never being stuck.
    let mut m = Checked::new(config.clone(), base).expect("generated configs are valid");
    let mut now = base;
    let mut log: Vec<String> = Vec::new();
    let mut allowed: BTreeSet<String> = config.since.iter().cloned().collect();
    let mut current: Option<OutgoingRequest> = None;
    // Every id handed out, in order (ids are opaque; the test only records them).
    let mut issued: Vec<RequestId> = Vec::new();
    let mut counter: u64 = 0;
    let mut stopped = false;
    // Credentials handed out and not yet answered.
    let mut credentials_out = false;

    // Drains everything, checking that checkpoints carry tokens that were fed.
    let drain = |m: &mut Checked, log: &mut Vec<String>, allowed: &BTreeSet<String>| {
        while let Some(event) = m.poll_event() {
            if let EventKind::Checkpoint(cp) = &event.kind {
                assert!(
                    allowed.contains(&cp.next_batch),
                    "checkpoint {cp:?} not fed"
                );
            }
            log.push(format!("event {event:?}"));
        }
        while let Some(err) = m.poll_error() {
            log.push(format!("error {err:?}"));
        }
        while let Some(state) = m.poll_state() {
            log.push(format!("state {state:?}"));
        }
        m.poll_credentials()
            .map(|c| log.push(format!("credentials {c:?}")))
    };

    credentials_out |= drain(&mut m, &mut log, &allowed).is_some();
    for op in ops {
        let waiting_for_store = credentials_out;
        let mut refused = false;
        // An instant 200 with the token it was asked with and nothing in it.
        let mut idle_answer = false;
        let result: Result<(), InputError> = match op {
            Op::Valid { after_ms, .. }
            | Op::Garbage { after_ms, .. }
            | Op::Status { after_ms, .. }
            | Op::Transport { after_ms, .. }
                if current.is_some() =>
            {
                let req = current.as_ref().unwrap();
                let at = now + Duration::from_millis(u64::from(*after_ms));
                let r = match op {
                    Op::Transport { kind, .. } => m.handle_failure(
                        req.id,
                        TransportFailure::new(transport_kind(*kind), "injected"),
                        at,
                    ),
                    _ => {
                        let response = response_for(op, req, m.since(), &mut counter);
                        if let (Op::Valid { .. }, RequestKind::Sync { .. }) = (op, &req.kind) {
                            if response.body().len() as u64 <= max_body {
                                let body: serde_json::Value =
                                    serde_json::from_slice(response.body()).unwrap();
                                let token = body["next_batch"].as_str().unwrap().to_owned();
                                // Spaced only when a long-poll came back early; one the
                                // server held for half its timeout or more is spacing enough.
                                let RequestKind::Sync { timeout } = req.kind else {
                                    unreachable!()
                                };
                                let sent_at = req.deadline - timeout - m.config().deadline_margin;
                                idle_answer = body.get("rooms").is_none()
                                    && m.since() == Some(token.as_str())
                                    && at - sent_at < timeout / 2;
                                allowed.insert(token);
                            }
                        }
                        m.handle_response(req.id, response, at)
                    }
                };
                if r.is_ok() {
                    now = at;
                }
                r
            }
            Op::Advance(ms) => {
                let at = now + Duration::from_millis(u64::from(*ms));
                let r = m.handle_timeout(at);
                if r.is_ok() {
                    now = at;
                }
                r
            }
            Op::WrongId(x) => {
                // One of ours, or (past the end) another machine's, past all of ours.
                let pick = *x as usize % (issued.len() + 3);
                let id = issued
                    .get(pick)
                    .copied()
                    .unwrap_or_else(|| foreign_request_id(issued.len() + pick));
                if current.as_ref().is_some_and(|r| r.id == id) {
                    Ok(())
                } else {
                    refused = true;
                    let r = m.handle_response(id, json_response(&empty_sync("never")), now);
                    let expected = if stopped {
                        InputError::Stopped
                    } else {
                        InputError::StaleRequest(id)
                    };
                    assert_eq!(r, Err(expected));
                    r
                }
            }
            Op::Backwards(ms) => {
                refused = true;
                let at = now - Duration::from_millis(u64::from(*ms));
                let r = match &current {
                    Some(req) => m.handle_response(req.id, json_response(&empty_sync("past")), at),
                    None => m.handle_timeout(at),
                };
                let expected = if stopped {
                    InputError::Stopped
                } else {
                    InputError::TimeWentBackwards { last: now, now: at }
                };
                assert_eq!(r, Err(expected));
                r
            }
            Op::Stop => {
                m.stop();
                stopped = true;
                Ok(())
            }
            Op::Store(stored) => {
                let r = if *stored {
                    m.handle_credentials_stored(now)
                } else {
                    m.handle_credentials_not_stored("injected", now)
                };
                if stopped {
                    r
                } else if waiting_for_store {
                    credentials_out = false;
                    r
                } else {
                    refused = true;
                    assert_eq!(r, Err(InputError::NoCredentialsPending));
                    r
                }
            }
            Op::SetToken(n) => {
                let r = m.set_access_token(&format!("set_token_{n}"), now);
                if r.is_ok() {
                    credentials_out = false;
                }
                r
            }
            // A response op with nothing in flight, or a plain wake-up.
            _ => match m.poll_timeout() {
                Some(at) if at > now => {
                    let r = m.handle_timeout(at);
                    if r.is_ok() {
                        now = at;
                    }
                    r
                }
                _ => m.handle_timeout(now),
            },
        };
        log.push(format!("input {op:?} -> {result:?}"));
        if stopped {
            if !matches!(op, Op::Stop) {
                assert_eq!(result, Err(InputError::Stopped));
            }
        } else if !refused {
            assert!(result.is_ok(), "{op:?} refused: {result:?}");
        }
        credentials_out |= drain(&mut m, &mut log, &allowed).is_some();

        // The request we hold is no longer awaited (answered, failed, timed out, stopped).
        if current
            .as_ref()
            .is_some_and(|r| m.in_flight().map(|f| f.id) != Some(r.id))
        {
            current = None;
        }
        // At most one new request per step (one in flight, ids increasing, deadline ahead,
        // no token in the URL, nothing after stop: Checked).
        if let Some(req) = m.poll_request() {
            assert!(
                !idle_answer || !matches!(req.kind, RequestKind::Sync { .. }),
                "spinning: a sync right after an unchanged empty answer"
            );
            assert!(m.poll_request().is_none(), "two requests at once");
            issued.push(req.id);
            log.push(format!("request {req:?}"));
            current = Some(req);
        }
        credentials_out |= drain(&mut m, &mut log, &allowed).is_some();
        if credentials_out {
            assert!(m.in_flight().is_none(), "a request while credentials wait");
        }
        if let Some(since) = m.since() {
            assert!(allowed.contains(since), "since {since} was never fed");
        }
        m.assert_waiting();
        log.push(format!("wake {:?}", m.poll_timeout().map(|t| t - base)));
    }
    log
}

/// The HTTP response an op stands for, shaped for the request it answers.
fn response_for(
    op: &Op,
    req: &OutgoingRequest,
    since: Option<&str>,
    counter: &mut u64,
) -> http::Response<Vec<u8>> {
    match op {
        Op::Valid {
            token,
            same_token,
            msgs,
            limited,
            end,
            ..
        } => {
            let mut events = Vec::new();
            for _ in 0..*msgs {
                *counter += 1;
                events.push(json!({
                    "type": "m.room.message",
                    "event_id": format!("$e{counter}:localhost"),
                    "sender": "@bob:localhost",
                    "origin_server_ts": 1_700_000_000_000u64 + *counter,
                    "content": {"msgtype": "m.text", "body": format!("message {counter}")}
                }));
            }
            *counter += 1;
            let body = match &req.kind {
                RequestKind::Sync { .. } => {
                    let next_batch = match (same_token, since) {
                        (true, Some(s)) => s.to_owned(),
                        _ => format!("t{token}"),
                    };
                    if events.is_empty() && !limited {
                        empty_sync(&next_batch)
                    } else {
                        json!({
                            "next_batch": next_batch,
                            "rooms": {"join": {"!room:localhost": {"timeline": {
                                "events": events,
                                "limited": limited,
                                "prev_batch": format!("pb{counter}"),
                            }}}}
                        })
                    }
                }
                RequestKind::Refresh => json!({
                    "access_token": format!("at{counter}"),
                    "refresh_token": format!("rt{counter}"),
                    "expires_in_ms": 1 + *counter * 997 % 600_000,
                }),
                RequestKind::Messages { .. } => {
                    let mut page = json!({"chunk": events, "start": format!("st{counter}")});
                    if *end {
                        page["end"] = json!(format!("end{counter}"));
                    }
                    page
                }
                other => panic!("a request kind this test does not know: {other:?}"),
            };
            json_response(&body)
        }
        Op::Garbage { which, .. } => response(200, garbage(*which)),
        Op::Status {
            status,
            which,
            header,
            retry_ms,
            ..
        } => {
            let body = match (status, retry_ms) {
                (429, Some(ms)) => {
                    json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": ms})
                        .to_string()
                }
                (401, _) => json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": which % 2 == 0}).to_string(),
                _ => ERROR_BODIES[*which as usize % ERROR_BODIES.len()].to_owned(),
            };
            let value = header.map(|h| h.to_string());
            let headers: Vec<(&str, &str)> =
                value.iter().map(|v| ("retry-after", v.as_str())).collect();
            response_with(*status, &headers, body)
        }
        _ => unreachable!("not a response op"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn the_machine_keeps_its_promises_under_any_input(
        p in params(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        // Far from the clock's origin, so inputs from the past stay representable.
        let base = Instant::now() + Duration::from_secs(3600);
        let first = run(&p, &ops, base);
        let second = run(&p, &ops, base);
        prop_assert_eq!(first, second);
    }
}

/// A long, mostly-healthy run: many batches delivered, with `since` following each checkpoint.
/// (A response op with nothing in flight waits for the next request instead.)
#[test]
fn a_long_healthy_run_delivers_every_batch() {
    let p = Params {
        seed: 1,
        initial_ms: 500,
        factor: 2.0,
        extra_max_ms: 59_500,
        jitter: 0.5,
        max_server_wait_ms: 300_000,
        since: false,
        long_poll_ms: 30_000,
        margin_ms: 30_000,
        initial_deadline_ms: 600_000,
        gap_enabled: true,
        gap_max: 5,
        page_size: 2,
        small_bodies: false,
    };
    let mut ops = Vec::new();
    for i in 0..200u32 {
        ops.push(Op::Valid {
            after_ms: i % 7,
            token: (i % 6) as u8,
            same_token: false,
            msgs: (i % 4) as u8,
            limited: i % 9 == 0,
            end: i % 2 == 0,
        });
        if i % 13 == 0 {
            ops.push(Op::Status {
                after_ms: 0,
                status: 503,
                which: 0,
                header: None,
                retry_ms: None,
            });
        }
    }
    let log = run(&p, &ops, Instant::now() + Duration::from_secs(3600));
    let checkpoints = log.iter().filter(|l| l.contains("Checkpoint(")).count();
    let messages = log
        .iter()
        .filter(|l| l.starts_with("event") && l.contains("kind: Message"))
        .count();
    // A quarter of the answers carry no message and space the next request, so some ops
    // arrive while nothing is in flight.
    assert!(checkpoints >= 120, "only {checkpoints} checkpoints");
    assert!(messages >= 200, "only {messages} messages");
    assert!(
        log.iter().any(|l| l.contains("Messages {")),
        "gap filling exercised"
    );
}

/// The generated runs do reach the refresh paths: refresh requests, credentials handed out,
/// and their answers (so the property above covers them).
#[test]
fn the_generated_runs_play_refreshes_and_their_answers() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut refreshes, mut handed_out) = (0, 0);
    for _ in 0..200 {
        let p = params().new_tree(&mut runner).unwrap().current();
        let ops = prop::collection::vec(op(), 1..60)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let log = run(&p, &ops, Instant::now() + Duration::from_secs(3600));
        refreshes += log.iter().filter(|l| l.contains("kind: Refresh")).count();
        handed_out += log.iter().filter(|l| l.starts_with("credentials")).count();
    }
    eprintln!("{refreshes} refresh requests, {handed_out} credentials handed out");
    assert!(refreshes > 20 && handed_out > 5, "{refreshes} {handed_out}");
}
