//! Shared helpers for the machine tests: fixtures, HTTP responses, a fake clock, a driver that
//! pumps the machine like the canonical loop; the reference backoff is the test kit's.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use matrix_sync_testkit::harness::{checkpoint, kinds, response, response_with, Harness};
pub use matrix_sync_testkit::query::decode_path as percent_decode;

use std::collections::BTreeMap;

use matrix_sync_service::{Config, OutgoingRequest};

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
