//! Arbitrary bytes as the JSON of one event, read by the hand-written field scanner.
//!
//! Input layout: the whole input is the text (non-UTF-8 inputs are skipped).
//!
//! Checks: no panic (nor hang) on any text; and, where `serde_json::Value` reads the text, the
//! scanner's fields equal a plain reading of that value (last duplicate key wins, keys compared
//! unescaped, `origin_server_ts` as `Value::as_u64`).
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use matrix_sync_service::fuzzing::{event_fields, EventFields};
use serde_json::Value;

fn reference(v: &Value) -> EventFields<'static> {
    let at = |path: &[&str]| -> Option<Cow<'static, str>> {
        let mut v = v;
        for key in path {
            v = v.as_object()?.get(*key)?;
        }
        v.as_str().map(|s| Cow::Owned(s.to_owned()))
    };
    EventFields {
        event_type: at(&["type"]),
        event_id: at(&["event_id"]),
        sender: at(&["sender"]),
        origin_server_ts: v.get("origin_server_ts").and_then(Value::as_u64),
        state_key: at(&["state_key"]),
        redacts: at(&["redacts"]),
        body: at(&["content", "body"]),
        content_redacts: at(&["content", "redacts"]),
        rel_type: at(&["content", "m.relates_to", "rel_type"]),
        rel_event_id: at(&["content", "m.relates_to", "event_id"]),
        rel_key: at(&["content", "m.relates_to", "key"]),
        in_reply_to: at(&["content", "m.relates_to", "m.in_reply_to", "event_id"]),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fields = event_fields(text);
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        assert_eq!(fields, reference(&value), "{text}");
        // Only strings with escapes are copied.
        for s in [&fields.event_type, &fields.body, &fields.in_reply_to]
            .into_iter()
            .flatten()
        {
            if let Cow::Owned(s) = s {
                assert!(text.contains('\\'), "{s:?} copied without escapes");
            }
        }
    }
});
