//! Arbitrary bytes as the JSON of one event, read by the hand-written field scanner.
//!
//! Input layout: the whole input is the text (non-UTF-8 inputs are skipped).
//!
//! Checks: no panic (nor hang) on any text; and, where `serde_json::Value` reads the text, the
//! scanner's fields equal a plain reading of that value (last duplicate key wins, keys compared
//! unescaped, `origin_server_ts` as `Value::as_u64`); the strict pass over a body accepts only
//! what `serde_json` accepts, and notes the same fields.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use matrix_sync_service::fuzzing::{event_fields, reference_fields, strict_event_fields};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fields = event_fields(text);
    // The strict pass over a body takes only what serde_json takes, and notes the same fields.
    let strict = strict_event_fields(text);
    if let Some(strict) = &strict {
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok(),
            "the strict pass accepts what serde_json refuses: {text}"
        );
        assert_eq!(strict, &fields, "{text}");
    }
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        assert_eq!(fields, reference_fields(&value), "{text}");
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
