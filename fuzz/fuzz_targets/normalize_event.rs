//! Arbitrary bytes as one event of any section of a sync response.
//!
//! Input layout: byte 0 picks the section (modulo 9: timeline, state, ephemeral, room account
//! data, global account data, presence, to-device, invite, knock); the rest, when it is JSON,
//! is the event.
//!
//! Checks: no panic; the raw JSON comes back byte for byte; the kind is one the section can
//! produce; and, where `serde_json::Value` reads the event too, every extracted field agrees
//! with a plain reading of it (type, kind, state key, body, ids, timestamp, relation,
//! redaction target), with an empty body for `m.room.encrypted`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_service::fuzzing::normalize_any;
use matrix_sync_service::{Event, EventKind};
use ruma_common::{EventId, RoomId, UserId};
use serde_json::value::RawValue;
use serde_json::Value;

const SECTIONS: u8 = 9;
const ROOM: &str = "!fuzz:example.org";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Section {
    Timeline,
    State,
    Ephemeral,
    RoomAccountData,
    GlobalAccountData,
    Presence,
    ToDevice,
    Invite,
    Knock,
}

fn section(byte: u8) -> Section {
    use Section::*;
    [
        Timeline,
        State,
        Ephemeral,
        RoomAccountData,
        GlobalAccountData,
        Presence,
        ToDevice,
        Invite,
        Knock,
    ][(byte % SECTIONS) as usize]
}

/// The kinds a section may produce at all, whatever the event.
fn allowed(section: Section, kind: &EventKind) -> bool {
    use EventKind as K;
    match section {
        Section::Timeline => matches!(
            kind,
            K::Message
                | K::Encrypted
                | K::State
                | K::Member
                | K::Reaction
                | K::Redaction
                | K::OtherTimeline
        ),
        Section::State => matches!(kind, K::State | K::Member),
        Section::Ephemeral => matches!(kind, K::Typing | K::Receipt | K::OtherEphemeral),
        Section::RoomAccountData => *kind == K::RoomAccountData,
        Section::GlobalAccountData => *kind == K::GlobalAccountData,
        Section::Presence => *kind == K::Presence,
        Section::ToDevice => *kind == K::ToDevice,
        Section::Invite => *kind == K::Invite,
        Section::Knock => *kind == K::Knock,
    }
}

/// The kind a plain reading of the event gives.
fn expected_kind(section: Section, ty: &str, has_state_key: bool) -> EventKind {
    use EventKind as K;
    match section {
        Section::Timeline | Section::State => {
            if ty == "m.room.member" && has_state_key {
                K::Member
            } else if has_state_key || section == Section::State {
                K::State
            } else {
                match ty {
                    "m.room.message" => K::Message,
                    "m.room.encrypted" => K::Encrypted,
                    "m.reaction" => K::Reaction,
                    "m.room.redaction" => K::Redaction,
                    _ => K::OtherTimeline,
                }
            }
        }
        Section::Ephemeral => match ty {
            "m.typing" => K::Typing,
            "m.receipt" => K::Receipt,
            _ => K::OtherEphemeral,
        },
        Section::RoomAccountData => K::RoomAccountData,
        Section::GlobalAccountData => K::GlobalAccountData,
        Section::Presence => K::Presence,
        Section::ToDevice => K::ToDevice,
        Section::Invite => K::Invite,
        Section::Knock => K::Knock,
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = v;
    for key in path {
        v = v.as_object()?.get(*key)?;
    }
    v.as_str()
}

fn event_id(v: &Value, path: &[&str]) -> Option<String> {
    str_at(v, path)
        .and_then(|s| EventId::parse(s).ok())
        .map(|id| id.to_string())
}

fn check_against_value(section: Section, event: &Event, v: &Value) {
    let ty = str_at(v, &["type"]).unwrap_or("");
    let state_key = str_at(v, &["state_key"]);
    let kind = expected_kind(section, ty, state_key.is_some());
    assert_eq!(event.kind, kind);
    assert_eq!(event.event_type, ty);
    assert_eq!(event.state_key.as_deref(), state_key);

    let body = match kind {
        EventKind::Encrypted => None,
        _ => str_at(v, &["content", "body"]),
    };
    assert_eq!(event.body.as_deref(), body);

    assert_eq!(
        event.event_id.as_ref().map(|id| id.to_string()),
        event_id(v, &["event_id"])
    );
    let sender = str_at(v, &["sender"])
        .and_then(|s| UserId::parse(s).ok())
        .map(|u| u.to_string());
    assert_eq!(event.sender.as_ref().map(|s| s.to_string()), sender);
    let ts = v
        .as_object()
        .and_then(|o| o.get("origin_server_ts"))
        .and_then(Value::as_u64)
        .filter(|t| *t <= js_max());
    assert_eq!(event.origin_server_ts.map(|t| u64::from(t.0)), ts);

    let rel_type = str_at(v, &["content", "m.relates_to", "rel_type"]);
    let target = event_id(v, &["content", "m.relates_to", "event_id"]);
    let reply = event_id(v, &["content", "m.relates_to", "m.in_reply_to", "event_id"]);
    let relation = match (
        rel_type,
        str_at(v, &["content", "m.relates_to", "event_id"]),
        reply,
    ) {
        (Some(rel_type), Some(_), _) => target.map(|t| {
            let key = str_at(v, &["content", "m.relates_to", "key"]).map(str::to_owned);
            (rel_type.to_owned(), t, key)
        }),
        (_, _, Some(reply)) => Some(("m.in_reply_to".to_owned(), reply, None)),
        _ => None,
    };
    let got = event
        .relation
        .as_ref()
        .map(|r| (r.rel_type.clone(), r.event_id.to_string(), r.key.clone()));
    assert_eq!(got, relation);

    let redacts = match kind {
        EventKind::Redaction => {
            match str_at(v, &["redacts"]).or(str_at(v, &["content", "redacts"])) {
                Some(s) => EventId::parse(s).ok().map(|id| id.to_string()),
                None => None,
            }
        }
        _ => None,
    };
    assert_eq!(event.redacts.as_ref().map(|r| r.to_string()), redacts);
}

/// The largest integer `js_int::UInt` holds (2^53 - 1).
fn js_max() -> u64 {
    (1 << 53) - 1
}

fuzz_target!(|data: &[u8]| {
    let Some((&section_byte, json)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(json) else {
        return;
    };
    let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) else {
        return;
    };
    let original = raw.get().to_owned();
    let section = section(section_byte);
    let event = normalize_any(raw, section_byte);

    assert_eq!(event.raw.get(), original, "raw JSON not preserved");
    assert!(
        allowed(section, &event.kind),
        "{:?} from the {section:?} section",
        event.kind
    );
    if event.kind == EventKind::Encrypted {
        assert!(event.body.is_none(), "an encrypted event has a body");
    }
    assert_eq!(
        event.room_id.as_ref().map(|r| r.as_str()),
        Some(RoomId::parse(ROOM).expect("valid").as_str())
    );
    if let Ok(value) = serde_json::from_str::<Value>(&original) {
        check_against_value(section, &event, &value);
    }
});
