//! The sliding sync request, in Synapse's wire format.

use std::collections::BTreeMap;
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use ruma_common::OwnedRoomId;
use serde_json::{json, Map, Value};

use super::{RoomSubscription, SlidingPosition, SlidingSyncConfig};
use crate::config::Config;
use crate::request::{bearer, form_pairs};

/// The path Synapse serves simplified sliding sync at (no stable path yet).
pub(crate) const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// The one list the machine asks for.
pub(crate) const LIST: &str = "all";

/// Synapse's cap on to-device messages per answer.
const TO_DEVICE_LIMIT: u32 = 100;

/// What one sliding sync request carries besides the configuration.
pub(crate) struct Ask<'a> {
    pub(crate) position: &'a SlidingPosition,
    pub(crate) timeout: Duration,
    /// The last index of the list's one range.
    pub(crate) range_end: u64,
    pub(crate) subscriptions: &'a BTreeMap<OwnedRoomId, RoomSubscription>,
}

/// `POST …/org.matrix.simplified_msc3575/sync?pos=…&timeout=…` with its JSON body.
pub(crate) fn sync_request(
    config: &Config,
    ask: &Ask<'_>,
) -> Result<http::Request<Vec<u8>>, String> {
    let timeout = ask.timeout.as_millis().to_string();
    let query = match &ask.position.pos {
        Some(pos) => form_pairs(&[("pos", pos), ("timeout", &timeout)]),
        None => form_pairs(&[("timeout", &timeout)]),
    };
    let uri = format!("{}{PATH}?{query}", config.homeserver);
    let body = serde_json::to_vec(&body(&config.sliding_sync, ask)).map_err(|e| e.to_string())?;
    let value = bearer(&config.access_token)
        .map_err(|e| format!("could not build the sliding sync request: {e}"))?;
    http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(AUTHORIZATION, value)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| format!("could not build the sliding sync request: {e}"))
}

fn pairs(state: &[(String, String)]) -> Value {
    state
        .iter()
        .map(|(event_type, key)| json!([event_type, key]))
        .collect()
}

/// The request body: the connection id, one list with one range, the subscriptions and the
/// extensions asked for.
pub(crate) fn body(sliding: &SlidingSyncConfig, ask: &Ask<'_>) -> Value {
    let mut extensions = Map::new();
    let on = &sliding.extensions;
    if on.to_device {
        let mut to_device = json!({ "enabled": true, "limit": TO_DEVICE_LIMIT });
        if let Some(since) = &ask.position.to_device_since {
            to_device["since"] = json!(since);
        }
        extensions.insert("to_device".to_owned(), to_device);
    }
    for (name, enabled) in [
        ("e2ee", on.e2ee),
        ("account_data", on.account_data),
        ("receipts", on.receipts),
        ("typing", on.typing),
    ] {
        if enabled {
            extensions.insert(name.to_owned(), json!({ "enabled": true }));
        }
    }
    let subscriptions: Map<String, Value> = ask
        .subscriptions
        .iter()
        .map(|(room, sub)| {
            let value = json!({
                "timeline_limit": sub.timeline_limit,
                "required_state": pairs(&sub.required_state),
            });
            (room.to_string(), value)
        })
        .collect();
    json!({
        "conn_id": sliding.conn_id,
        "lists": { LIST: {
            "ranges": [[0, ask.range_end]],
            "timeline_limit": sliding.timeline_limit,
            "required_state": pairs(&sliding.required_state),
        }},
        "room_subscriptions": subscriptions,
        "extensions": extensions,
    })
}

/// `GET /_matrix/client/versions`, with the access token: Synapse answers per user whether
/// sliding sync is on.
pub(crate) fn versions_request(config: &Config) -> Result<http::Request<Vec<u8>>, String> {
    let value = bearer(&config.access_token)
        .map_err(|e| format!("could not build the versions request: {e}"))?;
    http::Request::builder()
        .method(http::Method::GET)
        .uri(format!("{}/_matrix/client/versions", config.homeserver))
        .header(AUTHORIZATION, value)
        .body(Vec::new())
        .map_err(|e| format!("could not build the versions request: {e}"))
}

/// Whether a `/versions` body offers simplified sliding sync.
pub(crate) fn offers_sliding_sync(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Versions {
        #[serde(default)]
        unstable_features: BTreeMap<String, Value>,
    }
    serde_json::from_slice::<Versions>(body).is_ok_and(|v| {
        v.unstable_features.get("org.matrix.simplified_msc3575") == Some(&Value::Bool(true))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pos_and_timeout_go_in_the_query_string_and_the_token_in_a_sensitive_header() {
        let config = Config::new("https://hs.example.org", "secret");
        let position = SlidingPosition {
            pos: Some("5/s1_2~3".to_owned()),
            to_device_since: Some("9".to_owned()),
        };
        let subscriptions = BTreeMap::new();
        let ask = Ask {
            position: &position,
            timeout: Duration::from_secs(30),
            range_end: 99,
            subscriptions: &subscriptions,
        };
        let request = sync_request(&config, &ask).unwrap();
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.uri().path(), PATH);
        assert_eq!(
            request.uri().query(),
            Some("pos=5%2Fs1_2%7E3&timeout=30000")
        );
        assert!(request.headers()[AUTHORIZATION].is_sensitive());
        assert!(!request.uri().to_string().contains("secret"));
        let body: Value = serde_json::from_slice(request.body()).unwrap();
        assert_eq!(body["conn_id"], "matrix-sync-service");
        assert_eq!(body["lists"]["all"]["ranges"], json!([[0, 99]]));
        assert_eq!(body["lists"]["all"]["required_state"], json!([["*", "*"]]));
        assert_eq!(body["extensions"]["to_device"]["since"], "9");
        assert_eq!(body["extensions"]["typing"]["enabled"], true);
        assert!(body.get("pos").is_none() && body.get("timeout").is_none());
    }

    #[test]
    fn versions_must_say_true() {
        assert!(offers_sliding_sync(
            br#"{"versions":["v1.11"],"unstable_features":{"org.matrix.simplified_msc3575":true}}"#
        ));
        for no in [
            &br#"{"versions":[],"unstable_features":{"org.matrix.simplified_msc3575":false}}"#[..],
            br#"{"versions":[]}"#,
            br#"{"unstable_features":{"org.matrix.simplified_msc3575":"true"}}"#,
            b"not json",
        ] {
            assert!(!offers_sliding_sync(no));
        }
    }
}
