//! Arbitrary status and body as the answer to a sliding sync (MSC4186) request.
//!
//! Input layout (see `fuzz/seeds/README.md`):
//!
//! * byte 0, flags: bit 0 set = incremental step (a valid first answer is fed first, so the
//!   fuzzed answer answers a request that carried a `pos` and a to-device cursor);
//! * bytes 1-2, status selector (little endian): even = 200; odd = `100 + (v >> 1) % 900`;
//! * the rest: the body.
//!
//! Checks: no panic; a leave marker (the configured user is `@a:example.org`) names its room
//! and has no event id; `since` moves only at a checkpoint, whose token is a sliding sync
//! position with the body's `pos`; a non-2xx answer either resets the connection (400
//! `M_UNKNOWN_POS`, or `M_UNKNOWN` "Invalid stream token…", to a request that carried a `pos`:
//! one `ConnectionReset` event, no error, `since` unchanged, the next request without `pos`
//! and with the same to-device cursor) or leaves `since` unchanged and reports one error with
//! its status; a 2xx is delivered up to one checkpoint that ends the batch, or refused with
//! one error, or (an answer that moves nothing) hands on nothing, after the gaps of its
//! limited timelines are filled (each page answered empty); every delay is within its
//! cap; the machine hands out its next request, at once or after `poll_timeout()`.
#![no_main]

use std::time::{Duration, Instant};

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use matrix_sync_service::{
    Config, ErrorClass, Event, EventKind, OutgoingRequest, Protocol, RequestKind, SlidingPosition,
    SyncError, SyncMachine,
};

const TOKEN: &str = "fuzz_secret_token";

/// A small valid first answer: one room with one message, a to-device cursor.
const FIRST: &str = r#"{"pos":"1/s1","lists":{"all":{"count":1,"ops":[{"op":"SYNC","range":[0,99],"room_ids":["!r:example.org"]}]}},
    "rooms":{"!r:example.org":{"initial":true,"limited":false,"timeline":[
    {"type":"m.room.message","event_id":"$first:example.org","sender":"@a:example.org",
     "origin_server_ts":1,"content":{"msgtype":"m.text","body":"first"}}]}},
    "extensions":{"to_device":{"next_batch":"7","events":[]}}}"#;

fn config() -> Config {
    let mut config = Config::new("https://example.org", TOKEN);
    config.protocol = Protocol::SlidingSync;
    // The user's own membership events decide the leave markers.
    config.sliding_sync.user_id = Some("@a:example.org".try_into().expect("a user id"));
    config
}

#[derive(Default)]
struct Drained {
    events: Vec<Event>,
    errors: Vec<SyncError>,
}

fn drain(m: &mut SyncMachine) -> Drained {
    let mut out = Drained::default();
    loop {
        let before = m.since().map(str::to_owned);
        let Some(event) = m.poll_event() else { break };
        match &event.kind {
            EventKind::Checkpoint(c) => {
                assert_eq!(m.since(), Some(c.next_batch.as_str()));
                let position = c.sliding_position().expect("a sliding sync checkpoint");
                assert!(position.pos.is_some());
            }
            EventKind::Leave => {
                assert!(event.room_id.is_some(), "a leave marker names its room");
                assert!(event.event_id.is_none(), "a leave marker has no id of its own");
                assert_eq!(m.since(), before.as_deref(), "since moved without a checkpoint");
            }
            _ => assert_eq!(m.since(), before.as_deref(), "since moved without a checkpoint"),
        }
        out.events.push(event);
    }
    while let Some(error) = m.poll_error() {
        let cap = match error.class {
            ErrorClass::RateLimited => m.config().backoff.max.max(m.config().max_server_wait),
            _ => m.config().backoff.max,
        };
        assert!(error.delay <= cap, "delay above cap: {error}");
        out.errors.push(error);
    }
    while m.poll_state().is_some() {}
    out
}

fn next_request(m: &mut SyncMachine, now: &mut Instant) -> (OutgoingRequest, Drained) {
    let mut drained = drain(m);
    if let Some(req) = m.poll_request() {
        return (req, drained);
    }
    let wake = m.poll_timeout().expect("no request and no wake-up instant");
    *now = (*now).max(wake);
    m.handle_timeout(*now).expect("waking at poll_timeout is accepted");
    let more = drain(m);
    drained.events.extend(more.events);
    drained.errors.extend(more.errors);
    let req = m.poll_request().expect("a request is due after poll_timeout");
    (req, drained)
}

/// The request's `pos` and to-device cursor.
fn position_of(req: &OutgoingRequest) -> SlidingPosition {
    assert!(matches!(req.kind, RequestKind::SlidingSync { .. }), "{:?}", req.kind);
    assert!(!req.http.uri().to_string().contains(TOKEN), "token in the URI");
    let body: serde_json::Value = serde_json::from_slice(req.http.body()).expect("JSON body");
    SlidingPosition {
        pos: matrix_sync_testkit::query::uri_param(req.http.uri(), "pos"),
        to_device_since: body["extensions"]["to_device"]["since"].as_str().map(str::to_owned),
    }
}

fn run(mut data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let selector = u16::from_le_bytes([
        data.get(1).copied().unwrap_or(0),
        data.get(2).copied().unwrap_or(0),
    ]);
    data = data.get(3..).unwrap_or_default();
    let status = if selector % 2 == 0 { 200 } else { 100 + (selector >> 1) % 900 };
    let status = StatusCode::from_u16(status).expect("100..=999");

    let mut now = Instant::now();
    let mut m = SyncMachine::new(config(), now).expect("valid config");
    let mut req = m.poll_request().expect("first request at once");
    assert_eq!(position_of(&req), SlidingPosition::default());
    if flags & 1 == 1 {
        now += Duration::from_millis(10);
        let first = http::Response::builder().status(200).body(FIRST).unwrap();
        m.handle_response(req.id, first, now).expect("awaited");
        let (next, drained) = next_request(&mut m, &mut now);
        assert!(drained.errors.is_empty(), "the first answer is valid");
        req = next;
        let expected = SlidingPosition {
            pos: Some("1/s1".to_owned()),
            to_device_since: Some("7".to_owned()),
        };
        assert_eq!(position_of(&req), expected);
    }
    let sent = position_of(&req);
    let since_before = m.since().map(str::to_owned);
    let response = http::Response::builder().status(status).body(data).unwrap();
    now += Duration::from_millis(10);
    m.handle_response(req.id, response, now).expect("awaited");
    assert!(m.in_flight().is_none());
    let mut drained = drain(&mut m);
    // A limited timeline of a room sent before is filled first: each page is answered empty
    // (the range exhausted), and the batch follows. The next sync request is kept for the end.
    let mut pages = 0;
    let (next, more) = loop {
        let (next, more) = next_request(&mut m, &mut now);
        if !matches!(next.kind, RequestKind::Messages { .. }) {
            break (next, more);
        }
        assert!(more.errors.is_empty() && more.events.is_empty());
        pages += 1;
        assert!(pages <= 1000, "filling never ends");
        now += Duration::from_millis(10);
        let page = http::Response::builder()
            .status(200)
            .body(&br#"{"start":"p","chunk":[]}"#[..])
            .unwrap();
        m.handle_response(next.id, page, now).expect("awaited");
        let filled = drain(&mut m);
        drained.events.extend(filled.events);
        drained.errors.extend(filled.errors);
    };

    let resets = drained
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ConnectionReset(_)))
        .count();
    let checkpoints: Vec<usize> = (drained.events.iter().enumerate())
        .filter(|(_, e)| matches!(e.kind, EventKind::Checkpoint(_)))
        .map(|(i, _)| i)
        .collect();
    assert!(checkpoints.len() <= 1, "one batch, at most one checkpoint");
    if let Some(&i) = checkpoints.first() {
        assert_eq!(i + 1, drained.events.len(), "the checkpoint ends the batch");
        assert!(status.is_success());
        assert!(drained.errors.is_empty());
        // Read like the machine reads it: invalid UTF-8 in a member it ignores is no error.
        #[derive(serde::Deserialize)]
        struct Pos {
            pos: String,
        }
        let body: Pos = serde_json::from_slice(data).expect("a delivered body has a pos");
        let position = SlidingPosition::from_token(m.since().unwrap()).unwrap();
        assert_eq!(position.pos.as_deref(), Some(body.pos.as_str()));
    } else if resets == 1 {
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(sent.pos.is_some(), "a reset of a request without pos");
        assert_eq!(drained.events.len(), 1);
        assert!(drained.errors.is_empty(), "a reset is not an error");
        assert_eq!(m.since(), since_before.as_deref());
    } else {
        assert_eq!(resets, 0);
        assert_eq!(m.since(), since_before.as_deref(), "since moved on a refused answer");
        assert!(drained.events.is_empty());
        if !status.is_success() {
            // A 404 is no fallback for forced sliding sync.
            assert_eq!(drained.errors.len(), 1, "one error for a refused answer");
            assert_eq!(drained.errors[0].failure.status(), Some(status.as_u16()));
        } else {
            // Refused as bad, or an answer that moved nothing.
            assert!(drained.errors.len() <= 1);
        }
    }

    assert!(more.errors.is_empty() && more.events.is_empty());
    let carried = position_of(&next);
    let checkpoint = m
        .since()
        .map(|s| SlidingPosition::from_token(s).expect("a sliding position"))
        .unwrap_or_default();
    assert_eq!(carried.to_device_since, checkpoint.to_device_since, "the cursor is the checkpoint's");
    if resets == 1 {
        assert_eq!(carried.pos, None, "a fresh connection after a reset");
    } else {
        assert_eq!(carried.pos, checkpoint.pos);
    }
}

fuzz_target!(|data: &[u8]| {
    run(data);
});
