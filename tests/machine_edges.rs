//! Edge cases of the machine found by mutation testing: each pins a boundary or a branch.

mod common;

use common::*;
use matrix_sync_service::{ErrorClass, EventKind, Failure, Gap, SyncState};
use serde_json::json;

const ROOM: &str = "!r:x";

fn limited_sync(next_batch: &str, prev_batch: &str) -> serde_json::Value {
    json!({
        "next_batch": next_batch,
        "rooms": {"join": {ROOM: {"timeline": {
            "limited": true,
            "prev_batch": prev_batch,
            "events": [{"type": "m.room.message", "event_id": "$t1", "sender": "@a:x",
                        "origin_server_ts": 1, "content": {"body": "newest"}}]
        }}}}
    })
}

fn page(ids: &[&str], end: Option<&str>) -> serde_json::Value {
    let chunk: Vec<_> = ids
        .iter()
        .map(|id| {
            json!({"type": "m.room.message", "event_id": id, "sender": "@a:x",
                   "origin_server_ts": 1, "room_id": ROOM, "content": {"body": id}})
        })
        .collect();
    let mut page = json!({"chunk": chunk, "start": "s"});
    if let Some(end) = end {
        page["end"] = json!(end);
    }
    page
}

fn live_with_since(mut c: matrix_sync_service::Config) -> Harness {
    c.since = Some("s0".to_owned());
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, json_response(&empty_sync("s1")));
    h.take_events();
    h
}

#[test]
fn a_body_exactly_at_the_cap_is_read_one_byte_more_is_refused() {
    let body = serde_json::to_vec(&empty_sync("s1")).unwrap();
    let mut c = config();
    c.max_body_bytes = body.len() as u64;
    let mut h = Harness::new(c.clone());
    let req = h.request();
    h.respond(&req, response(200, body.clone()));
    assert!(h.take_errors().is_empty());
    assert_eq!(h.m.since(), Some("s1"));

    c.max_body_bytes = body.len() as u64 - 1;
    let limit = c.max_body_bytes;
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, response(200, body));
    let errors = h.take_errors();
    assert_eq!(errors[0].failure, Failure::BodyTooLarge { limit });
    assert_eq!(errors[0].class, ErrorClass::Transient);
    assert_eq!(h.m.since(), None);
}

#[test]
fn the_last_gap_page_asks_only_for_what_the_cap_leaves() {
    let mut c = config();
    c.gap_fill.page_size = 4;
    c.gap_fill.max_events_per_room = 6;
    let mut h = live_with_since(c);
    let req = h.next_request();
    h.respond(&req, json_response(&limited_sync("s2", "p1")));
    h.take_states();
    let req = h.request();
    assert!(
        h.take_states().is_empty(),
        "filling a gap while live stays Live"
    );
    assert_eq!(query(&req)["limit"], "4");
    h.respond(
        &req,
        json_response(&page(&["$g4", "$g3", "$g2", "$g1"], Some("p2"))),
    );
    let req = h.request();
    assert_eq!(query(&req)["limit"], "2", "6 allowed, 4 fetched");
    assert_eq!(query(&req)["from"], "p2");
    h.respond(&req, json_response(&page(&["$g0", "$gx"], Some("p3"))));
    let events = h.take_events();
    assert_eq!(
        events[0].kind,
        EventKind::Gap(Gap {
            prev_batch: "p3".to_owned(),
            previous_since: "s1".to_owned()
        })
    );
    let bodies: Vec<&str> = events[1..]
        .iter()
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        bodies,
        ["$gx", "$g0", "$g1", "$g2", "$g3", "$g4", "newest", ""]
    );
}

#[test]
fn a_fatal_gap_fill_failure_reports_the_rest_as_a_gap_and_delivers_the_batch() {
    let mut h = live_with_since(config());
    let req = h.next_request();
    h.respond(&req, json_response(&limited_sync("s2", "p1")));
    let req = h.request();
    h.respond(&req, json_response(&page(&["$g2", "$g1"], Some("p2"))));
    let req = h.request();
    h.reply(
        &req,
        403,
        r#"{"errcode":"M_FORBIDDEN","error":"history is hidden"}"#,
    );
    let errors = h.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].class, ErrorClass::NeedsUser);
    assert_eq!(
        errors[0].delay,
        std::time::Duration::ZERO,
        "nothing to wait for"
    );
    let events = h.take_events();
    assert_eq!(
        events[0].kind,
        EventKind::Gap(Gap {
            prev_batch: "p2".to_owned(),
            previous_since: "s1".to_owned()
        })
    );
    let bodies: Vec<&str> = events[1..]
        .iter()
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(bodies, ["$g1", "$g2", "newest", ""]);
    assert_eq!(checkpoint(events.last().unwrap()), Some("s2"));
    assert_ne!(h.m.state(), SyncState::Refused, "the sync itself is fine");
    let req = h.next_request();
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
}

#[test]
fn a_long_poll_while_live_changes_no_state() {
    let mut h = live_with_since(config());
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
    let req = h.next_request();
    assert_eq!(query(&req)["timeout"], "30000");
    assert!(
        h.take_states().is_empty(),
        "a long-poll from Live stays Live"
    );
    h.reply(&req, 401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"gone"}"#);
    assert_eq!(h.take_states(), [SyncState::Refused]);
    let req = h.next_request();
    assert_eq!(query(&req)["timeout"], "0");
    assert!(
        h.take_states().is_empty(),
        "retrying while unauthorized stays Refused"
    );
    h.respond(&req, json_response(&empty_sync("s1")));
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
}

#[test]
fn membership_without_a_state_key_is_not_a_member_event() {
    let mut h = Harness::new(config());
    let req = h.request();
    let body = json!({"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [
        {"type": "m.room.member", "event_id": "$m1", "content": {"membership": "join"}},
        {"type": "m.room.member", "event_id": "$m2", "state_key": "@a:x", "content": {}}
    ]}}}}});
    h.respond(&req, json_response(&body));
    let events = h.take_events();
    assert_eq!(kinds(&events), ["other_timeline", "member", "checkpoint"]);
}

#[test]
fn body_opt_is_none_only_for_an_empty_body() {
    let mut h = Harness::new(config());
    let req = h.request();
    let body = json!({"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [
        {"type": "m.room.message", "event_id": "$a", "content": {"body": "hi"}},
        {"type": "m.room.message", "event_id": "$b", "content": {}}
    ]}}}}});
    h.respond(&req, json_response(&body));
    let events = h.take_events();
    assert_eq!(events[0].body.as_deref(), Some("hi"));
    assert_eq!(events[1].body.as_deref(), None);
}

#[test]
fn a_fractional_retry_after_ms_is_honoured_and_a_negative_one_ignored() {
    let mut c = config_no_jitter();
    c.backoff.initial = std::time::Duration::from_millis(10);
    let mut h = Harness::new(c);
    let req = h.request();
    h.reply(
        &req,
        429,
        r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500.0}"#,
    );
    let e = h.take_errors().remove(0);
    assert_eq!(e.delay, std::time::Duration::from_millis(1500));
    let req = h.next_request();
    h.reply(
        &req,
        429,
        r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":-5.0}"#,
    );
    let e = h.take_errors().remove(0);
    assert_eq!(
        e.delay,
        std::time::Duration::from_millis(20),
        "the backoff alone"
    );
    let Failure::RateLimited { retry_after, .. } = e.failure else {
        panic!()
    };
    assert_eq!(retry_after, None);
}

#[test]
fn full_state_is_asked_for_on_the_first_request_only_and_only_when_configured() {
    let mut h = Harness::new(config());
    let req = h.request();
    assert!(!query(&req).contains_key("full_state"));

    let mut c = config();
    c.full_state = true;
    let mut h = Harness::new(c);
    let req = h.request();
    assert_eq!(query(&req)["full_state"], "true");
    h.respond(&req, json_response(&empty_sync("s1")));
    let req = h.next_request();
    assert!(!query(&req).contains_key("full_state"), "only the first");
}

#[test]
fn a_gap_fill_cap_of_zero_reports_gaps_without_fetching() {
    let mut c = config();
    c.gap_fill.max_events_per_room = 0;
    let mut h = live_with_since(c);
    let req = h.next_request();
    h.respond(&req, json_response(&limited_sync("s2", "p1")));
    let events = h.take_events();
    assert_eq!(
        events[0].kind,
        EventKind::Gap(Gap {
            prev_batch: "p1".to_owned(),
            previous_since: "s1".to_owned()
        })
    );
    assert_eq!(kinds(&events), ["gap", "message", "checkpoint"]);
    let req = h.next_request();
    assert_eq!(
        path(&req),
        "/_matrix/client/v3/sync",
        "no /messages request"
    );
}
