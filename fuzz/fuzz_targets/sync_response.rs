//! Arbitrary status, headers and body as the answer to a sync request.
//!
//! Input layout (see `fuzz/seeds/README.md`):
//!
//! * byte 0, flags: bit 0 set = incremental step (a valid first response is fed first, so
//!   `since` is set and the fuzzed response answers a long-poll);
//! * bytes 1-2, status selector (little endian): even = 200, odd = `100 + (v >> 1) % 900`;
//! * byte 3, header count (low 2 bits), then each header: a name selector byte
//!   (0 `retry-after`, 1 `content-type`, 2 `content-length`, else a name of `b & 15` bytes
//!   that follow), a value length byte (`& 31`) and the value bytes;
//! * the rest: the body.
//!
//! Checks: no panic; the strict pass over the body accepts only what serde_json accepts,
//! reading the same response; a non-2xx status or a body that is not a sync response leaves
//! `since` unchanged and reports an error carrying the status; a valid one is delivered up to a
//! checkpoint that moves `since` (unless it is an idle answer or waits for gap filling); every
//! error delay is within the configured caps; and the machine hands out its next request,
//! at once or after `handle_timeout(poll_timeout())`.
#![no_main]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use matrix_sync_service::{
    Config, ErrorClass, Event, EventKind, OutgoingRequest, RequestKind, SyncError, SyncMachine,
    MAX_TOKEN_BYTES,
};
use ruma_client_api::sync::sync_events::v3 as sync;
use ruma_common::api::IncomingResponseExt;

const TOKEN: &str = "fuzz_secret_token";

/// A small valid first response: one joined room with one message.
const FIRST: &str = r#"{"next_batch":"s_first","rooms":{"join":{"!r:example.org":{"timeline":{"events":[
    {"type":"m.room.message","event_id":"$first:example.org","sender":"@a:example.org",
     "origin_server_ts":1,"content":{"msgtype":"m.text","body":"first"}}],
    "limited":false,"prev_batch":"p_first"}}}}}"#;

struct Input<'a> {
    incremental: bool,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: &'a [u8],
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

fn parse(mut data: &[u8]) -> Input<'_> {
    let flags = byte(&mut data);
    let selector = u16::from_le_bytes([byte(&mut data), byte(&mut data)]);
    let status = if selector % 2 == 0 {
        200
    } else {
        100 + (selector >> 1) % 900
    };
    let status = StatusCode::from_u16(status).expect("100..=999 is a valid status");
    let count = byte(&mut data) & 3;
    let mut headers = Vec::new();
    for _ in 0..count {
        let name = match byte(&mut data) {
            0 => Some(http::header::RETRY_AFTER),
            1 => Some(http::header::CONTENT_TYPE),
            2 => Some(http::header::CONTENT_LENGTH),
            b => {
                let len = (b & 15) as usize;
                HeaderName::from_bytes(take(&mut data, len)).ok()
            }
        };
        let len = (byte(&mut data) & 31) as usize;
        let value = HeaderValue::from_bytes(take(&mut data, len)).ok();
        if let (Some(name), Some(value)) = (name, value) {
            headers.push((name, value));
        }
    }
    Input {
        incremental: flags & 1 == 1,
        status,
        headers,
        body: data,
    }
}

fn config() -> Config {
    Config::new("https://example.org", TOKEN)
}

#[derive(Default)]
struct Drained {
    events: Vec<Event>,
    errors: Vec<SyncError>,
}

/// Drains events, errors and states, checking that `since` moves only at a checkpoint and
/// that every delay is within its cap.
fn drain(m: &mut SyncMachine) -> Drained {
    let mut out = Drained::default();
    loop {
        let before = m.since().map(str::to_owned);
        let Some(event) = m.poll_event() else { break };
        match &event.kind {
            EventKind::Checkpoint(c) => assert_eq!(m.since(), Some(c.next_batch.as_str())),
            _ => assert_eq!(
                m.since(),
                before.as_deref(),
                "since moved without a checkpoint"
            ),
        }
        out.events.push(event);
    }
    while let Some(error) = m.poll_error() {
        check_delay(m.config(), &error);
        out.errors.push(error);
    }
    while m.poll_state().is_some() {}
    out
}

fn check_delay(config: &Config, error: &SyncError) {
    let cap = match error.class {
        ErrorClass::RateLimited => config.backoff.max.max(config.max_server_wait),
        _ => config.backoff.max,
    };
    assert!(
        error.delay <= cap,
        "delay {:?} above cap {cap:?}: {error}",
        error.delay
    );
}

/// The `since` query parameter of a sync request, percent-decoded.
fn query_since(req: &OutgoingRequest) -> Option<String> {
    matrix_sync_testkit::query::uri_param(req.http.uri(), "since")
}

/// The next request, at once or after waking the machine at `poll_timeout()`.
fn next_request(m: &mut SyncMachine, now: &mut Instant) -> (OutgoingRequest, Drained) {
    let mut drained = drain(m);
    if let Some(req) = m.poll_request() {
        return (req, drained);
    }
    let wake = m.poll_timeout().expect("no request and no wake-up instant");
    *now = (*now).max(wake);
    m.handle_timeout(*now)
        .expect("waking at poll_timeout is accepted");
    let more = drain(m);
    drained.events.extend(more.events);
    drained.errors.extend(more.errors);
    let req = m
        .poll_request()
        .expect("a request is due after handle_timeout at poll_timeout");
    (req, drained)
}

fn check_request(m: &SyncMachine, req: &OutgoingRequest) {
    assert!(
        !req.http.uri().to_string().contains(TOKEN),
        "token in the URI"
    );
    if matches!(req.kind, RequestKind::Sync { .. }) {
        assert_eq!(
            query_since(req).as_deref(),
            m.since(),
            "the sync carries since"
        );
    }
    assert_eq!(m.in_flight().map(|f| f.id), Some(req.id));
}

/// Ids of events that the machine deduplicates must be unique across the run.
fn check_unique(seen: &mut HashSet<String>, events: &[Event]) {
    for e in events {
        if matches!(
            e.kind,
            EventKind::Invite | EventKind::Knock | EventKind::ToDevice
        ) {
            continue;
        }
        if let Some(id) = &e.event_id {
            assert!(seen.insert(id.to_string()), "event {id} delivered twice");
        }
    }
}

fn expected_class(status: u16) -> ErrorClass {
    match status {
        429 => ErrorClass::RateLimited,
        500..=599 => ErrorClass::Transient,
        300..=499 => ErrorClass::NeedsUser,
        _ => ErrorClass::Transient,
    }
}

/// Whether every token the machine keeps (`next_batch`, a limited timeline's `prev_batch`)
/// is one it may store: not empty, no control character, at most `MAX_TOKEN_BYTES`.
fn tokens_round_trip(response: &sync::Response) -> bool {
    let storable =
        |t: &str| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES && !t.chars().any(char::is_control);
    let limited = |t: &sync::Timeline| !t.limited || t.prev_batch.as_deref().is_none_or(storable);
    storable(&response.next_batch)
        && response.rooms.join.values().all(|r| limited(&r.timeline))
        && response.rooms.leave.values().all(|r| limited(&r.timeline))
}

fn run(input: Input<'_>) {
    let mut now = Instant::now();
    let mut m = SyncMachine::new(config(), now).expect("valid config");
    let mut seen = HashSet::new();
    let mut req = m.poll_request().expect("first request at once");
    check_request(&m, &req);

    if input.incremental {
        now += Duration::from_millis(10);
        let first = http::Response::builder().status(200).body(FIRST).unwrap();
        m.handle_response(req.id, first, now).expect("awaited");
        let (next, drained) = next_request(&mut m, &mut now);
        assert!(drained.errors.is_empty(), "the first response is valid");
        check_unique(&mut seen, &drained.events);
        assert_eq!(m.since(), Some("s_first"));
        req = next;
        check_request(&m, &req);
    }

    let since_before = m.since().map(str::to_owned);
    let code = input.status.as_u16();
    let body = input.body;
    // The machine's strict pass over a body reads it as serde_json does, or leaves it to it.
    if let Ok(text) = std::str::from_utf8(body) {
        matrix_sync_service::fuzzing::check_against_serde(text);
    }
    // The oracle: ruma's own parse of the body, independent of the machine, less the tokens
    // the machine must refuse because it could not store or send them back.
    let parsed = if input.status.is_success() {
        let r = http::Response::builder().status(200).body(body).unwrap();
        sync::Response::try_from_http_response(r)
            .ok()
            .filter(tokens_round_trip)
    } else {
        None
    };

    let mut builder = http::Response::builder().status(input.status);
    for (name, value) in input.headers {
        builder = builder.header(name, value);
    }
    let response = builder.body(body).expect("valid parts");
    now += Duration::from_millis(10);
    m.handle_response(req.id, response, now).expect("awaited");
    assert!(
        m.in_flight().is_none(),
        "the answered request is no longer in flight"
    );

    let drained = drain(&mut m);
    check_unique(&mut seen, &drained.events);
    let checkpoints: Vec<usize> = (drained.events.iter().enumerate())
        .filter(|(_, e)| matches!(e.kind, EventKind::Checkpoint(_)))
        .map(|(i, _)| i)
        .collect();
    assert!(checkpoints.len() <= 1, "one batch, at most one checkpoint");
    if let Some(&i) = checkpoints.first() {
        assert_eq!(i + 1, drained.events.len(), "the checkpoint ends the batch");
    }

    // The machine reads sync bodies with its own single-pass parser: everything ruma accepts
    // it must accept; a few shapes ruma refuses (a timeline without `events`) it takes too.
    let refused = !drained.errors.is_empty();
    match &parsed {
        None if !refused => {
            assert!(input.status.is_success(), "only a 2xx can be accepted");
        }
        None => {
            assert_eq!(
                m.since(),
                since_before.as_deref(),
                "since moved on a bad response"
            );
            assert!(drained.events.is_empty(), "events from a bad response");
            assert_eq!(
                drained.errors.len(),
                1,
                "exactly one error for a bad response"
            );
            let error = &drained.errors[0];
            assert_eq!(error.failure.status(), Some(code), "{error}");
            assert_eq!(error.class, expected_class(code), "{error}");
            assert!(matches!(error.request, RequestKind::Sync { .. }));
        }
        Some(parsed) => {
            assert!(drained.errors.is_empty(), "a valid response gave errors");
            if checkpoints.is_empty() {
                // Not delivered yet: an idle answer, or waiting for gap filling.
                assert_eq!(m.since(), since_before.as_deref());
                let idle = since_before.as_deref() == Some(parsed.next_batch.as_str());
                let (req, more) = next_request(&mut m, &mut now);
                check_request(&m, &req);
                assert!(more.errors.is_empty());
                let gap_fill = matches!(req.kind, RequestKind::Messages { .. });
                assert!(
                    idle || gap_fill,
                    "a valid response was neither delivered nor pending"
                );
                assert!(
                    since_before.is_some() || !gap_fill,
                    "gap filling on an initial sync"
                );
                return;
            }
            assert_eq!(m.since(), Some(parsed.next_batch.as_str()));
        }
    }

    let since_after = m.since().map(str::to_owned);
    let (req, more) = next_request(&mut m, &mut now);
    check_request(&m, &req);
    assert!(more.errors.is_empty() && more.events.is_empty());
    assert_eq!(m.since(), since_after.as_deref());
}

fuzz_target!(|data: &[u8]| {
    run(parse(data));
});
