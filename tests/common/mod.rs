//! Shared helpers for the machine tests: fixtures, HTTP responses, a fake clock, a driver that
//! pumps the machine like the canonical loop; the reference backoff is the test kit's.
#![allow(dead_code)]

pub use matrix_sync_testkit::query::decode_path as percent_decode;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    Config, Event, EventKind, OutgoingRequest, SyncError, SyncMachine, SyncState,
};

/// Loopback homeserver: nothing is ever sent, the machine is sans-IO.
pub const HOMESERVER: &str = "http://127.0.0.1:8008";
/// A recognisable access token, to check it never leaks.
pub const TOKEN: &str = "syt_c2VjcmV0_TopSecretToken_0xDEADBEEF";

// ---- fixtures ---------------------------------------------------------------------------------

/// The text of a fixture file.
pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading fixture {name}: {e}"))
}

/// A fixture file parsed as JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("parsing fixture {name}: {e}"))
}

// ---- configuration and responses --------------------------------------------------------------

/// A default configuration for the loopback homeserver.
pub fn config() -> Config {
    Config::new(HOMESERVER, TOKEN)
}

/// A default configuration without jitter, so every delay is exact.
pub fn config_no_jitter() -> Config {
    let mut c = config();
    c.backoff.jitter = 0.0;
    c
}

/// An HTTP response with `status` and `body`.
pub fn response(status: u16, body: impl Into<Vec<u8>>) -> http::Response<Vec<u8>> {
    response_with(status, &[], body)
}

/// An HTTP response with `status`, extra headers and `body`.
pub fn response_with(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Vec<u8>>,
) -> http::Response<Vec<u8>> {
    let mut builder = http::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body.into()).expect("valid response")
}

/// A 200 carrying `value` as JSON.
pub fn json_response(value: &serde_json::Value) -> http::Response<Vec<u8>> {
    response(200, serde_json::to_vec(value).expect("serializable"))
}

/// A sync body with nothing in it but `next_batch` (and the key counts Synapse always sends).
pub fn empty_sync(next_batch: &str) -> serde_json::Value {
    serde_json::json!({
        "next_batch": next_batch,
        "device_one_time_keys_count": {"signed_curve25519": 0},
        "device_unused_fallback_key_types": []
    })
}

/// A sync body with one joined room holding `bodies` as `m.room.message` events, with event
/// ids `$<prefix>_<i>:localhost`.
pub fn message_sync(
    next_batch: &str,
    room: &str,
    prefix: &str,
    bodies: &[&str],
) -> serde_json::Value {
    let events: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            serde_json::json!({
                "type": "m.room.message",
                "event_id": format!("${prefix}_{i}:localhost"),
                "sender": "@alice:localhost",
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "content": {"msgtype": "m.text", "body": body}
            })
        })
        .collect();
    serde_json::json!({
        "next_batch": next_batch,
        "rooms": {"join": {room: {"timeline": {"events": events, "limited": false}}}}
    })
}

// ---- requests ---------------------------------------------------------------------------------

/// The decoded query parameters of a request (each key at most once).
pub fn query(req: &OutgoingRequest) -> BTreeMap<String, String> {
    matrix_sync_testkit::query::uri_params(req.http.uri())
}

/// The decoded path of a request.
pub fn path(req: &OutgoingRequest) -> String {
    percent_decode(req.http.uri().path())
}

// ---- driving the machine ------------------------------------------------------------------------

/// A machine, a fake clock, and everything it has said so far.
pub struct Harness {
    pub m: SyncMachine,
    pub base: Instant,
    pub now: Instant,
    pub events: Vec<Event>,
    pub errors: Vec<SyncError>,
    pub states: Vec<SyncState>,
}

impl Harness {
    pub fn new(config: Config) -> Self {
        let base = Instant::now();
        let m = SyncMachine::new(config, base).expect("valid config");
        let mut h = Self {
            m,
            base,
            now: base,
            events: Vec::new(),
            errors: Vec::new(),
            states: Vec::new(),
        };
        h.pump();
        h
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// Drains events (checking that `since` moves only at a checkpoint, to its token), errors
    /// and states.
    pub fn pump(&mut self) {
        loop {
            let before = self.m.since().map(str::to_owned);
            let Some(event) = self.m.poll_event() else {
                break;
            };
            match &event.kind {
                EventKind::Checkpoint(cp) => {
                    assert_eq!(
                        self.m.since(),
                        Some(cp.next_batch.as_str()),
                        "since after checkpoint"
                    );
                }
                _ => assert_eq!(
                    self.m.since().map(str::to_owned),
                    before,
                    "since moved on a non-checkpoint event {event:?}"
                ),
            }
            self.events.push(event);
        }
        while let Some(e) = self.m.poll_error() {
            self.errors.push(e);
        }
        while let Some(s) = self.m.poll_state() {
            self.states.push(s);
        }
    }

    /// The request due now; panics when none is.
    pub fn request(&mut self) -> OutgoingRequest {
        let req = self.m.poll_request().expect("a request is due now");
        assert!(
            self.m.poll_request().is_none(),
            "a second request while one is in flight"
        );
        self.pump();
        req
    }

    /// Advances the clock to each wake-up instant until a request is due, and returns it.
    pub fn next_request(&mut self) -> OutgoingRequest {
        for _ in 0..16 {
            if let Some(req) = self.m.poll_request() {
                assert!(
                    self.m.poll_request().is_none(),
                    "a second request while one is in flight"
                );
                self.pump();
                return req;
            }
            let at = self
                .m
                .poll_timeout()
                .expect("a wake-up instant when no request is due");
            assert!(
                at > self.now,
                "poll_timeout {at:?} is due but no request was given"
            );
            self.now = at;
            self.m.handle_timeout(at).expect("timeout accepted");
            self.pump();
        }
        panic!("no request after 16 wake-ups");
    }

    /// Feeds `response` to `req` now and drains the outputs.
    pub fn respond(&mut self, req: &OutgoingRequest, response: http::Response<Vec<u8>>) {
        self.m
            .handle_response(req.id, response, self.now)
            .expect("response accepted");
        self.pump();
    }

    /// Feeds a status and body to `req` now and drains the outputs.
    pub fn reply(&mut self, req: &OutgoingRequest, status: u16, body: impl Into<Vec<u8>>) {
        self.respond(req, response(status, body));
    }

    /// Moves the clock forward by `d` (and tells the machine).
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.m.handle_timeout(self.now).expect("timeout accepted");
        self.pump();
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn take_errors(&mut self) -> Vec<SyncError> {
        std::mem::take(&mut self.errors)
    }

    pub fn take_states(&mut self) -> Vec<SyncState> {
        std::mem::take(&mut self.states)
    }
}

/// The kind names of `events`, for compact comparisons.
pub fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// The checkpoint token of an event, if it is one.
pub fn checkpoint(e: &Event) -> Option<&str> {
    match &e.kind {
        EventKind::Checkpoint(cp) => Some(cp.next_batch.as_str()),
        _ => None,
    }
}
