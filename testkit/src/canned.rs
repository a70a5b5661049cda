//! Canned inputs and readers for the machine tests: the recorded Synapse fixtures, HTTP
//! responses, small sync and `/messages` bodies, a loopback configuration, the query of a
//! request read back, and the few steps many tests share (a machine already live, a retry
//! exactly after its backoff).

use std::borrow::Borrow;
use std::collections::BTreeMap;

use serde_json::json;

use matrix_sync_service::{Config, Event, EventKind, OutgoingRequest};

pub use crate::query::decode_path as percent_decode;

/// Loopback homeserver: nothing is ever sent, the machine is sans-IO.
pub const HOMESERVER: &str = "http://127.0.0.1:8008";
/// A recognisable access token, to check it never leaks.
pub const TOKEN: &str = "syt_c2VjcmV0_TopSecretToken_0xDEADBEEF";

// ---- fixtures ---------------------------------------------------------------------------------

/// The text of a fixture file.
pub fn fixture(name: &str) -> String {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
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

/// A 200 carrying `value` as JSON.
pub fn json_response(value: &serde_json::Value) -> http::Response<Vec<u8>> {
    response(200, serde_json::to_vec(value).expect("serializable"))
}

/// A sync body with nothing in it but `next_batch` (and the key counts Synapse always sends).
pub fn empty_sync(next_batch: &str) -> serde_json::Value {
    json!({
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
            json!({
                "type": "m.room.message",
                "event_id": format!("${prefix}_{i}:localhost"),
                "sender": "@alice:localhost",
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "content": {"msgtype": "m.text", "body": body}
            })
        })
        .collect();
    json!({
        "next_batch": next_batch,
        "rooms": {"join": {room: {"timeline": {"events": events, "limited": false}}}}
    })
}

// ---- requests ---------------------------------------------------------------------------------

/// The decoded query parameters of a request (each key at most once).
pub fn query(req: &OutgoingRequest) -> BTreeMap<String, String> {
    crate::query::uri_params(req.http.uri())
}

/// The decoded path of a request.
pub fn path(req: &OutgoingRequest) -> String {
    percent_decode(req.http.uri().path())
}

// ---- the machine tests' shared steps ----------------------------------------------------------

pub const INCREMENTAL: &str = "synapse-incremental.json";
pub const E401: &str = "synapse-401-unknown-token.json";
pub const E429: &str = "synapse-429-limit-exceeded.json";
pub const E400: &str = "synapse-400-invalid-since.json";

pub fn timeout_param(req: &matrix_sync_service::OutgoingRequest) -> String {
    query(req)
        .get("timeout")
        .cloned()
        .expect("timeout in query")
}

pub fn since_param(req: &matrix_sync_service::OutgoingRequest) -> Option<String> {
    query(req).get("since").cloned()
}

pub const EDGE_ROOM: &str = "!r:x";

pub fn limited_sync(next_batch: &str, prev_batch: &str) -> serde_json::Value {
    json!({
        "next_batch": next_batch,
        "rooms": {"join": {EDGE_ROOM: {"timeline": {
            "limited": true,
            "prev_batch": prev_batch,
            "events": [{"type": "m.room.message", "event_id": "$t1", "sender": "@a:x",
                        "origin_server_ts": 1, "content": {"body": "newest"}}]
        }}}}
    })
}

pub fn page(ids: &[&str], end: Option<&str>) -> serde_json::Value {
    let chunk: Vec<_> = ids
        .iter()
        .map(|id| {
            json!({"type": "m.room.message", "event_id": id, "sender": "@a:x",
                   "origin_server_ts": 1, "room_id": EDGE_ROOM, "content": {"body": id}})
        })
        .collect();
    let mut page = json!({"chunk": chunk, "start": "s"});
    if let Some(end) = end {
        page["end"] = json!(end);
    }
    page
}

// ---- responses and events ---------------------------------------------------------------------

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

/// The kind names of `events`, for compact comparisons.
pub fn kinds<E: Borrow<Event>>(events: &[E]) -> Vec<&'static str> {
    events.iter().map(|e| e.borrow().kind.name()).collect()
}

/// The checkpoint token of an event, if it is one.
pub fn checkpoint(e: &Event) -> Option<&str> {
    match &e.kind {
        EventKind::Checkpoint(cp) => Some(cp.next_batch.as_str()),
        _ => None,
    }
}
