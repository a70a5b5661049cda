//! Normalized events and gap filling (contract §5 and §7): the exact normalized output of
//! Synapse's initial, incremental and leave syncs, gap filling with `/messages`, and both at
//! their bounds (a gap-fill cap, a fatal gap-fill failure, members without a state key).
//!
//! Expected streams are computed independently from the fixture JSON (a reference walk of the
//! documented order and classification) and cross-checked against hard-coded counts.

use std::collections::{BTreeMap, HashSet};

use matrix_sync_service::{
    Config, ErrorClass, Event, EventKind, Gap, GapFill, RequestKind, SyncFilter, SyncState,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::Harness;
use serde_json::{json, Value};

const INITIAL: &str = "synapse-initial.json";
const INCREMENTAL: &str = "synapse-incremental.json";
const LEAVE: &str = "synapse-leave.json";
const GAP_SYNC: &str = "synapse-gap-sync.json";
const GAP_MESSAGES: &str = "synapse-gap-messages.json";

// ---- the reference: what the stream must be, from the JSON alone --------------------------------

/// Everything a normalized item exposes, in comparable form.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    kind: String,
    event_type: String,
    room_id: Option<String>,
    event_id: Option<String>,
    sender: Option<String>,
    ts: Option<u64>,
    state_key: Option<String>,
    body: String,
    /// `(rel_type, target, key)`.
    relation: Option<(String, String, Option<String>)>,
    redacts: Option<String>,
    /// The event's JSON, for items that carry a server event.
    raw: Option<Value>,
}

fn actual(e: &Event) -> Item {
    let carries_event = !matches!(
        e.kind,
        EventKind::Checkpoint(_)
            | EventKind::Gap(_)
            | EventKind::DeviceLists
            | EventKind::OneTimeKeyCounts
    );
    Item {
        kind: e.kind.name().to_owned(),
        event_type: e.event_type.to_string(),
        room_id: e.room_id.as_ref().map(|r| r.to_string()),
        event_id: e.event_id.as_ref().map(|r| r.to_string()),
        sender: e.sender.as_ref().map(|r| r.to_string()),
        ts: e.origin_server_ts.map(|t| u64::from(t.0)),
        state_key: e.state_key.clone(),
        body: e.body.clone().unwrap_or_default(),
        relation: e
            .relation
            .as_ref()
            .map(|r| (r.rel_type.clone(), r.event_id.to_string(), r.key.clone())),
        redacts: e.redacts.as_ref().map(|r| r.to_string()),
        raw: carries_event.then(|| serde_json::from_str(e.raw.get()).expect("raw is JSON")),
    }
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Sections of a response, as the reference classifies them.
#[derive(Clone, Copy, PartialEq)]
enum Sec {
    Timeline,
    State,
    Ephemeral,
    RoomData,
    GlobalData,
    Presence,
    ToDevice,
    Invite,
}

fn reference_kind(sec: Sec, ev: &Value) -> &'static str {
    let ty = ev.get("type").and_then(Value::as_str).unwrap_or("");
    let has_key = ev.get("state_key").is_some_and(Value::is_string);
    match sec {
        Sec::Timeline | Sec::State => {
            if ty == "m.room.member" && has_key {
                "member"
            } else if has_key || sec == Sec::State {
                "state"
            } else {
                match ty {
                    "m.room.message" => "message",
                    "m.room.encrypted" => "encrypted",
                    "m.reaction" => "reaction",
                    "m.room.redaction" => "redaction",
                    _ => "other_timeline",
                }
            }
        }
        Sec::Ephemeral => match ty {
            "m.typing" => "typing",
            "m.receipt" => "receipt",
            _ => "other_ephemeral",
        },
        Sec::RoomData => "room_account_data",
        Sec::GlobalData => "global_account_data",
        Sec::Presence => "presence",
        Sec::ToDevice => "to_device",
        Sec::Invite => "invite",
    }
}

fn reference_item(kind: &str, ev: &Value, room: Option<&str>) -> Item {
    let content = ev.get("content").cloned().unwrap_or(Value::Null);
    let body = if kind == "encrypted" {
        String::new()
    } else {
        s(&content, "body").unwrap_or_default()
    };
    let rel = content.get("m.relates_to");
    let relation = rel.and_then(|r| match (s(r, "rel_type"), s(r, "event_id")) {
        (Some(t), Some(id)) => Some((t, id, s(r, "key"))),
        _ => r
            .get("m.in_reply_to")
            .and_then(|i| s(i, "event_id"))
            .map(|id| ("m.in_reply_to".to_owned(), id, None)),
    });
    let redacts = (kind == "redaction")
        .then(|| s(ev, "redacts").or_else(|| s(&content, "redacts")))
        .flatten();
    Item {
        kind: kind.to_owned(),
        event_type: s(ev, "type").unwrap_or_default(),
        room_id: room.map(str::to_owned).or_else(|| s(ev, "room_id")),
        event_id: s(ev, "event_id"),
        sender: s(ev, "sender"),
        ts: ev.get("origin_server_ts").and_then(Value::as_u64),
        state_key: s(ev, "state_key"),
        body,
        relation,
        redacts,
        raw: Some(ev.clone()),
    }
}

fn synthetic(kind: &str, event_type: &str, room: Option<&str>) -> Item {
    Item {
        kind: kind.to_owned(),
        event_type: event_type.to_owned(),
        room_id: room.map(str::to_owned),
        event_id: None,
        sender: None,
        ts: None,
        state_key: None,
        body: String::new(),
        relation: None,
        redacts: None,
        raw: None,
    }
}

/// Builds the expected stream of one machine run, batch by batch.
#[derive(Default)]
struct Reference {
    seen: HashSet<String>,
    last_key_counts: Option<Value>,
    out: Vec<Item>,
}

impl Reference {
    fn push(&mut self, item: Item) {
        let dedup = !matches!(item.kind.as_str(), "invite" | "to_device");
        if let (true, Some(id)) = (dedup, &item.event_id) {
            if !self.seen.insert(id.clone()) {
                return;
            }
        }
        self.out.push(item);
    }

    fn events(&mut self, list: Option<&Value>, sec: Sec, room: Option<&str>) {
        let events = list
            .and_then(|l| l.get("events"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for ev in &events {
            let item = reference_item(reference_kind(sec, ev), ev, room);
            self.push(item);
        }
    }

    /// `fill`: per room, the gap item and filled events (newest first) to put before its state.
    fn batch(&mut self, r: &Value, mut fill: BTreeMap<String, (Option<Gap>, Vec<Value>)>) {
        self.events(r.get("to_device"), Sec::ToDevice, None);
        if let Some(dl) = r.get("device_lists") {
            let non_empty = ["changed", "left"].iter().any(|k| {
                dl.get(k)
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            });
            if non_empty {
                self.out
                    .push(synthetic("device_lists", "device_lists", None));
            }
        }
        let counts = r.get("device_one_time_keys_count");
        let fallback = r.get("device_unused_fallback_key_types");
        let has_counts = counts
            .and_then(Value::as_object)
            .is_some_and(|c| !c.is_empty());
        if has_counts || fallback.is_some() {
            let value = json!([counts, fallback]);
            if self.last_key_counts.as_ref() != Some(&value) {
                self.last_key_counts = Some(value);
                self.out.push(synthetic(
                    "one_time_key_counts",
                    "device_one_time_keys_count",
                    None,
                ));
            }
        }
        self.events(r.get("account_data"), Sec::GlobalData, None);
        self.events(r.get("presence"), Sec::Presence, None);
        let rooms = r.get("rooms").cloned().unwrap_or(json!({}));
        let sorted = |section: &str| -> Vec<(String, Value)> {
            let mut v: Vec<_> = rooms
                .get(section)
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        for (id, room) in sorted("join") {
            self.fill(&id, fill.remove(&id));
            self.events(room.get("state"), Sec::State, Some(&id));
            self.events(room.get("timeline"), Sec::Timeline, Some(&id));
            self.events(room.get("ephemeral"), Sec::Ephemeral, Some(&id));
            self.events(room.get("account_data"), Sec::RoomData, Some(&id));
        }
        for (id, room) in sorted("invite") {
            self.events(room.get("invite_state"), Sec::Invite, Some(&id));
        }
        for (id, room) in sorted("leave") {
            self.fill(&id, fill.remove(&id));
            self.events(room.get("state"), Sec::State, Some(&id));
            self.events(room.get("timeline"), Sec::Timeline, Some(&id));
            self.events(room.get("account_data"), Sec::RoomData, Some(&id));
            let membership = room["timeline"]["events"]
                .as_array()
                .and_then(|evs| evs.iter().rev().find(|e| e["type"] == "m.room.member"))
                .cloned();
            let marker = match membership {
                Some(ev) => {
                    // The membership event was delivered just before; the marker has no id.
                    let mut marker = reference_item("leave", &ev, Some(&id));
                    marker.event_id = None;
                    marker
                }
                None => synthetic("leave", "m.room.member", Some(&id)),
            };
            self.out.push(marker);
        }
        self.out.push(synthetic("checkpoint", "checkpoint", None));
    }

    fn fill(&mut self, room: &str, fill: Option<(Option<Gap>, Vec<Value>)>) {
        let Some((gap, newest_first)) = fill else {
            return;
        };
        if gap.is_some() {
            self.out.push(synthetic("gap", "gap", Some(room)));
        }
        for ev in newest_first.iter().rev() {
            let item = reference_item(reference_kind(Sec::Timeline, ev), ev, Some(room));
            self.push(item);
        }
    }
}

fn counts(items: &[Item]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i.kind.clone()).or_insert(0) += 1;
    }
    m
}

fn count_map(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Compares item by item, so a mismatch names its position.
fn assert_items_eq(actual: &[Item], expected: &[Item]) {
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a, e, "item {i} differs");
    }
    assert_eq!(actual.len(), expected.len(), "number of items");
}

fn gap_config(previous_since: &str, filter: &Value) -> Config {
    let mut c = config();
    c.since = Some(previous_since.to_owned());
    c.filter = Some(SyncFilter::from_json(&filter.to_string()).expect("fixture filter"));
    c.gap_fill = GapFill::default().with_page_size(12);
    c
}

fn sync_query_since(req: &matrix_sync_service::OutgoingRequest) -> Option<String> {
    query(req).get("since").cloned()
}

// ---- initial, incremental, leave -------------------------------------------------------------

#[test]
fn initial_sync_is_normalized_exactly_and_since_moves_at_the_checkpoint() {
    let json = fixture_json(INITIAL);
    let next_batch = json["next_batch"].as_str().unwrap();
    let now = std::time::Instant::now();
    let mut m = matrix_sync_service::SyncMachine::new(config(), now).unwrap();
    let req = m.poll_request().expect("first request");
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
    assert_eq!(sync_query_since(&req), None, "initial sync has no since");
    assert_eq!(query(&req).get("timeout").map(String::as_str), Some("0"));
    m.handle_response(req.id, response(200, fixture(INITIAL)), now)
        .unwrap();
    assert_eq!(
        m.since(),
        None,
        "since must not move before the events are handed on"
    );
    assert!(m.poll_request().is_none(), "no request while events wait");
    assert_eq!(m.poll_timeout(), None, "no wake-up while events wait");

    let mut events = Vec::new();
    while let Some(e) = m.poll_event() {
        if checkpoint(&e).is_none() {
            assert_eq!(
                m.since(),
                None,
                "since moved before the checkpoint at {}",
                events.len()
            );
        } else {
            assert_eq!(m.since(), Some(next_batch));
        }
        events.push(e);
    }

    // Independent reference.
    let mut reference = Reference::default();
    reference.batch(&json, BTreeMap::new());
    let got: Vec<Item> = events.iter().map(actual).collect();
    assert_items_eq(&got, &reference.out);

    // Hard-coded counts, verified separately against the fixture.
    assert_eq!(
        counts(&got),
        count_map(&[
            ("checkpoint", 1),
            ("encrypted", 12),
            ("global_account_data", 2),
            ("invite", 10),
            ("member", 52),
            ("message", 156),
            ("one_time_key_counts", 1),
            ("presence", 2),
            ("reaction", 12),
            ("receipt", 12),
            ("redaction", 12),
            ("room_account_data", 12),
            ("state", 84),
            ("to_device", 1),
            ("typing", 1),
        ])
    );
    assert_eq!(events.len(), 370);

    // Section order: to-device, key counts, account data, presence, then rooms.
    assert_eq!(
        kinds(&events[..6]),
        [
            "to_device",
            "one_time_key_counts",
            "global_account_data",
            "global_account_data",
            "presence",
            "presence"
        ]
    );
    assert_eq!(events[0].event_type, "org.example.ping");
    assert_eq!(
        events[0].sender.as_ref().unwrap().as_str(),
        "@fx_ann_s1:localhost"
    );
    assert_eq!(events[0].room_id, None);
    assert_eq!(events[2].event_type, "org.example.settings");
    assert_eq!(events[3].event_type, "m.push_rules");
    assert_eq!(
        events[4].sender.as_ref().unwrap().as_str(),
        "@fx_me_s1:localhost"
    );
    assert_eq!(
        events[5].sender.as_ref().unwrap().as_str(),
        "@fx_ann_s1:localhost"
    );
    assert!(events[6..]
        .iter()
        .all(|e| e.room_id.is_some() || checkpoint(e).is_some()));

    // Per joined room: state, then timeline, then ephemeral, then room account data; rooms in
    // room-id order, then invites.
    let mut rooms_seen: Vec<String> = Vec::new();
    for (room, evs) in group_by_room(&events[6..events.len() - 1]) {
        rooms_seen.push(room.clone());
        let joined = json["rooms"]["join"].get(&room);
        if let Some(joined) = joined {
            let n_state = joined["state"]["events"].as_array().unwrap().len();
            let n_tl = joined["timeline"]["events"].as_array().unwrap().len();
            let n_eph = joined["ephemeral"]["events"].as_array().unwrap().len();
            let state_part = &evs[..n_state];
            assert!(state_part
                .iter()
                .all(|e| matches!(e.kind, EventKind::State | EventKind::Member)));
            let tl_ids: Vec<_> = evs[n_state..n_state + n_tl]
                .iter()
                .map(|e| e.event_id.as_ref().unwrap().to_string())
                .collect();
            let fixture_ids: Vec<_> = joined["timeline"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["event_id"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(tl_ids, fixture_ids, "timeline of {room} in server order");
            assert!(evs[n_state + n_tl..n_state + n_tl + n_eph]
                .iter()
                .all(|e| matches!(e.kind, EventKind::Typing | EventKind::Receipt)));
            assert_eq!(evs.last().unwrap().kind, EventKind::RoomAccountData);
            assert_eq!(evs.len(), n_state + n_tl + n_eph + 1);
        } else {
            assert!(evs.iter().all(|e| e.kind == EventKind::Invite), "{room}");
            assert_eq!(evs.len(), 5);
        }
    }
    let joined: Vec<&String> = rooms_seen[..12].iter().collect();
    let mut sorted = joined.clone();
    sorted.sort();
    assert_eq!(joined, sorted, "joined rooms in room-id order");
    assert_eq!(rooms_seen.len(), 14);

    // First and last events with ids, and the first and last messages.
    let with_id: Vec<&Event> = events.iter().filter(|e| e.event_id.is_some()).collect();
    assert_eq!(
        with_id.first().unwrap().event_id.as_ref().unwrap().as_str(),
        json["rooms"]["join"]["!53kzISv6wDQueMxJ6xQQSo1L1VZgDXVmkHVcFVqLNrE"]["state"]["events"][0]
            ["event_id"]
            .as_str()
            .unwrap()
    );
    let last = with_id.last().unwrap();
    assert_eq!(
        last.event_id.as_ref().unwrap().as_str(),
        "$h3KTuafUen-NegBnFnWCIdroUBnP3g6-XsP6xxt1Nfk"
    );
    assert_eq!(last.body.as_deref(), Some("cat.png"));
    let msgs: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == EventKind::Message)
        .collect();
    assert_eq!(
        msgs[0].event_id.as_ref().unwrap().as_str(),
        "$l1oSiOPvicdEswQHjNEUOCVs6LhqYhgETp4jM_FxVLg"
    );
    assert_eq!(
        msgs[0].sender.as_ref().unwrap().as_str(),
        "@fx_ben_s1:localhost"
    );
    assert!(
        msgs[0]
            .body
            .as_deref()
            .unwrap_or_default()
            .starts_with("msg 0 room 8 emoji 🎉"),
        "{:?}",
        msgs[0].body
    );
    assert_eq!(
        msgs.last().unwrap().sender.as_ref().unwrap().as_str(),
        "@fx_ann_s1:localhost"
    );

    // The edit and the reaction of the first room.
    let find = |id: &str| {
        events
            .iter()
            .find(|e| e.event_id.as_ref().is_some_and(|x| x.as_str() == id))
            .unwrap_or_else(|| panic!("{id} not delivered"))
    };
    let edit = find("$AOQrOstbq2rHC4nRtDaSrD4Y0Lj_TJye_TAtxNR9HU0");
    assert_eq!(edit.kind, EventKind::Message);
    assert_eq!(edit.body.as_deref(), Some("* fixed"));
    let rel = edit.relation.as_ref().unwrap();
    assert_eq!(rel.rel_type, "m.replace");
    assert_eq!(
        rel.event_id.as_str(),
        "$DrV6fkW98CPDlN2vHx26xzcOf4gkGMSRoi6JQOC1sg4"
    );
    assert_eq!(rel.key, None);
    let reaction = find("$HJGmXZrT8d1JDCUYCviBuWwdQhp1gdrdT57IewtiKaU");
    assert_eq!(reaction.kind, EventKind::Reaction);
    assert_eq!(reaction.body, None);
    let rel = reaction.relation.as_ref().unwrap();
    assert_eq!(rel.rel_type, "m.annotation");
    assert_eq!(
        rel.event_id.as_str(),
        "$DrV6fkW98CPDlN2vHx26xzcOf4gkGMSRoi6JQOC1sg4"
    );
    assert_eq!(rel.key.as_deref(), Some("👍"));
    let redaction = find("$uqMP5Y5OUIqawMdb1HCtTv2UFS-o2OYQG8rDs2GEhwM");
    assert_eq!(redaction.kind, EventKind::Redaction);
    assert_eq!(
        redaction.redacts.as_ref().unwrap().as_str(),
        "$xECkIYbmFq9JX1eZCzvsTjxRIZ8G8ssKNI-Ft-JJ5qY"
    );
    let redacted = find("$xECkIYbmFq9JX1eZCzvsTjxRIZ8G8ssKNI-Ft-JJ5qY");
    assert_eq!(
        (
            redacted.kind.clone(),
            redacted.body.as_deref().unwrap_or_default()
        ),
        (EventKind::Message, "")
    );
    let relations = |rel_type: &str| {
        events
            .iter()
            .filter(|e| e.relation.as_ref().is_some_and(|r| r.rel_type == rel_type))
            .count()
    };
    assert_eq!(
        (relations("m.replace"), relations("m.annotation")),
        (12, 12)
    );
    for e in events.iter().filter(|e| e.kind == EventKind::Encrypted) {
        assert_eq!(e.body, None);
        assert!(e.raw.get().contains("ciphertext"));
    }

    // The checkpoint, then a long-poll from it.
    let cp = events.last().unwrap();
    assert_eq!(
        cp.kind,
        EventKind::Checkpoint(matrix_sync_service::Checkpoint {
            next_batch: next_batch.to_owned(),
            live: false
        })
    );
    let mut states = Vec::new();
    while let Some(s) = m.poll_state() {
        states.push(s);
    }
    assert_eq!(states, [SyncState::InitialSync, SyncState::Live]);
    let req = m.poll_request().expect("next request after the batch");
    let q = query(&req);
    assert_eq!(q.get("since").map(String::as_str), Some(next_batch));
    assert_eq!(q.get("timeout").map(String::as_str), Some("30000"));
}

fn group_by_room(events: &[Event]) -> Vec<(String, Vec<&Event>)> {
    let mut out: Vec<(String, Vec<&Event>)> = Vec::new();
    for e in events {
        let room = e.room_id.as_ref().unwrap().to_string();
        match out.last_mut() {
            Some((r, evs)) if *r == room => evs.push(e),
            _ => out.push((room, vec![e])),
        }
    }
    let mut names: Vec<&String> = out.iter().map(|(r, _)| r).collect();
    names.dedup();
    let unique: HashSet<&String> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a room's events are contiguous");
    out
}

#[test]
fn incremental_after_initial_is_live_and_exact() {
    let initial = fixture_json(INITIAL);
    let incremental = fixture_json(INCREMENTAL);
    let mut h = Harness::new(config());
    let req = h.request();
    h.reply(&req, 200, fixture(INITIAL));
    let mut reference = Reference::default();
    reference.batch(&initial, BTreeMap::new());
    let first: Vec<Item> = h.take_events().iter().map(actual).collect();
    assert_items_eq(&first, &reference.out);
    reference.out.clear();

    let req = h.request();
    assert_eq!(
        req.kind,
        RequestKind::Sync {
            timeout: std::time::Duration::from_secs(30)
        }
    );
    assert_eq!(
        sync_query_since(&req).as_deref(),
        initial["next_batch"].as_str()
    );
    h.reply(&req, 200, fixture(INCREMENTAL));
    let events = h.take_events();
    reference.batch(&incremental, BTreeMap::new());
    let got: Vec<Item> = events.iter().map(actual).collect();
    assert_items_eq(&got, &reference.out);
    // The key counts did not change: not repeated.
    assert_eq!(
        kinds(&events),
        [
            "message",
            "typing",
            "message",
            "member",
            "message",
            "state",
            "invite",
            "invite",
            "invite",
            "invite",
            "invite",
            "checkpoint"
        ]
    );
    assert_eq!(events[0].body.as_deref(), Some("after the first sync"));
    assert_eq!(
        events[0].event_id.as_ref().unwrap().as_str(),
        "$Lu_wHlsMQ61EaLHrJh8m2Z9HR0ivXBJdy45KFFF7-rs"
    );
    assert_eq!(
        events[0].room_id.as_ref().unwrap().as_str(),
        "!EPX_dGvAzTXk_Nm98bTFBToe1-OQSCMpVSTPLgTDlco"
    );
    let typing: Value = serde_json::from_str(events[1].raw.get()).unwrap();
    assert_eq!(
        typing,
        json!({"type": "m.typing", "content": {"user_ids": []}})
    );
    assert_eq!(events[3].state_key.as_deref(), Some("@fx_ben_s1:localhost"));
    assert_eq!(
        events[3].sender.as_ref().unwrap().as_str(),
        "@fx_ben_s1:localhost"
    );
    assert_eq!(events[5].event_type, "m.room.name");
    assert_eq!(events[5].state_key.as_deref(), Some(""));
    assert_eq!(
        events[6].room_id.as_ref().unwrap().as_str(),
        "!hHmo3dnZ-pJpYtxbCzNPQv_qFR9APrd4w46PZ4JIUs0"
    );
    assert_eq!(
        events[11].kind,
        EventKind::Checkpoint(matrix_sync_service::Checkpoint {
            next_batch: incremental["next_batch"].as_str().unwrap().to_owned(),
            live: true
        })
    );
    assert_eq!(h.machine.since(), incremental["next_batch"].as_str());
    assert_eq!(h.take_states(), [SyncState::InitialSync, SyncState::Live]);
    assert!(h.take_errors().is_empty());
}

#[test]
fn incremental_alone_repeats_nothing_and_counts_keys() {
    let incremental = fixture_json(INCREMENTAL);
    let mut c = config();
    c.since = Some("s7628_53_1_135_14_1_2_17_0_1_1_1_1_1".to_owned());
    let mut h = Harness::new(c);
    let req = h.request();
    assert_eq!(query(&req).get("timeout").map(String::as_str), Some("0"));
    h.reply(&req, 200, fixture(INCREMENTAL));
    let events = h.take_events();
    let mut reference = Reference::default();
    reference.batch(&incremental, BTreeMap::new());
    let got: Vec<Item> = events.iter().map(actual).collect();
    assert_items_eq(&got, &reference.out);
    assert_eq!(events.len(), 13);
    assert_eq!(events[0].kind, EventKind::OneTimeKeyCounts);
    // A catch-up batch is history, not live.
    assert_eq!(
        events[12].kind,
        EventKind::Checkpoint(matrix_sync_service::Checkpoint {
            next_batch: "s7641_53_2_135_14_1_2_17_0_1_1_1_1_1".to_owned(),
            live: false
        })
    );
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
}

#[test]
fn leave_sync_gives_members_then_leave_markers() {
    let leave = fixture_json(LEAVE);
    let mut c = config();
    c.since = Some("s7662_55_2_135_14_1_2_19_0_1_1_1_1_1".to_owned());
    let mut h = Harness::new(c);
    let req = h.request();
    h.reply(&req, 200, fixture(LEAVE));
    let events = h.take_events();
    let mut reference = Reference::default();
    reference.batch(&leave, BTreeMap::new());
    let got: Vec<Item> = events.iter().map(actual).collect();
    assert_items_eq(&got, &reference.out);
    assert_eq!(
        kinds(&events),
        [
            "device_lists",
            "one_time_key_counts",
            "member",
            "leave",
            "member",
            "leave",
            "checkpoint"
        ]
    );
    let dl: Value = serde_json::from_str(events[0].raw.get()).unwrap();
    assert_eq!(dl["left"], json!(["@fx_ann2:localhost"]));
    // The kick, then the own leave, in room-id order; each marker carries its membership event.
    let kicked = "!1jARS5nftcX9QBfpJcDoiE4H39k4OADoP_s-maxcYIM";
    let left = "!QUyEQTEfYtLVVRCNI4Mrr_1rfsEbHc-lY5baMI7GAds";
    for (i, room, id, sender) in [
        (
            2,
            kicked,
            "$OAS4emic1blbuHsKLJeBFQoOa-XwtbyseNVUwKGJ7FI",
            "@fx_ann2:localhost",
        ),
        (
            4,
            left,
            "$C-h_x4qeKuvXJjLg7ZDMkITGawFTYQI2_aMj4D43nGE",
            "@fx_me2:localhost",
        ),
    ] {
        assert_eq!(events[i].event_id.as_ref().unwrap().as_str(), id);
        assert_eq!(
            events[i + 1].event_id,
            None,
            "the marker repeats no event id"
        );
        for e in &events[i..i + 2] {
            assert_eq!(e.room_id.as_ref().unwrap().as_str(), room);
            assert_eq!(e.sender.as_ref().unwrap().as_str(), sender);
            assert_eq!(e.state_key.as_deref(), Some("@fx_me2:localhost"));
        }
        assert_eq!(events[i + 1].kind, EventKind::Leave);
    }
    assert_eq!(checkpoint(&events[6]), leave["next_batch"].as_str());
    assert_eq!(h.machine.since(), leave["next_batch"].as_str());
}

// ---- gaps ------------------------------------------------------------------------------------

struct GapFixture {
    previous_since: String,
    filter: Value,
    response: Value,
    room_id: String,
    pages: Vec<(Value, Value)>,
}

fn gap_fixture() -> GapFixture {
    let sync = fixture_json(GAP_SYNC);
    let messages = fixture_json(GAP_MESSAGES);
    GapFixture {
        previous_since: sync["previous_since"].as_str().unwrap().to_owned(),
        filter: sync["filter"].clone(),
        response: sync["response"].clone(),
        room_id: messages["room_id"].as_str().unwrap().to_owned(),
        pages: messages["pages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["request_query"].clone(), p["response"].clone()))
            .collect(),
    }
}

impl GapFixture {
    fn prev_batch(&self) -> &str {
        self.response["rooms"]["join"][&self.room_id]["timeline"]["prev_batch"]
            .as_str()
            .unwrap()
    }

    fn timeline(&self) -> Vec<Value> {
        self.response["rooms"]["join"][&self.room_id]["timeline"]["events"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn next_batch(&self) -> &str {
        self.response["next_batch"].as_str().unwrap()
    }
}

/// Checks a `/messages` request against the query Synapse answered in the fixture.
fn assert_messages_request(
    req: &matrix_sync_service::OutgoingRequest,
    room_id: &str,
    expected: &Value,
) {
    assert_eq!(req.http.method(), http::Method::GET);
    assert_eq!(
        req.kind,
        RequestKind::Messages {
            room_id: room_id.try_into().unwrap()
        }
    );
    assert_eq!(
        path(req),
        format!("/_matrix/client/v3/rooms/{room_id}/messages")
    );
    let q = query(req);
    for key in ["dir", "from", "to", "limit"] {
        assert_eq!(
            q.get(key).map(String::as_str),
            expected[key].as_str(),
            "query {key} of {}",
            req.http.uri()
        );
    }
    if let Some(filter) = q.get("filter") {
        let filter: Value = serde_json::from_str(filter).expect("filter is JSON");
        assert!(
            filter.get("limit").is_none(),
            "sync timeline limit leaked into /messages"
        );
    }
    assert!(!req.http.uri().to_string().contains(TOKEN));
}

#[test]
fn gap_is_filled_oldest_first_before_the_timeline() {
    let gf = gap_fixture();
    let mut h = Harness::new(gap_config(&gf.previous_since, &gf.filter));
    let req = h.request();
    assert_eq!(
        sync_query_since(&req).as_deref(),
        Some(gf.previous_since.as_str())
    );
    let filter: Value = serde_json::from_str(&query(&req)["filter"]).unwrap();
    assert_eq!(filter, gf.filter);
    h.respond(&req, json_response(&gf.response));
    assert!(
        h.events().is_empty(),
        "nothing is delivered before the gap is filled"
    );
    assert_eq!(h.machine.since(), Some(gf.previous_since.as_str()));

    assert_eq!(gf.pages.len(), 4);
    for (i, (q, page)) in gf.pages.iter().enumerate() {
        let req = h.request();
        assert_messages_request(&req, &gf.room_id, q);
        if i == 0 {
            assert_eq!(q["from"].as_str(), Some(gf.prev_batch()));
            assert_eq!(q["to"].as_str(), Some(gf.previous_since.as_str()));
        }
        assert_eq!(req.deadline, h.now + h.machine.config().deadline_margin);
        h.respond(&req, json_response(page));
        if i + 1 < gf.pages.len() {
            assert!(h.events().is_empty(), "delivered before the last page");
            assert_eq!(h.machine.since(), Some(gf.previous_since.as_str()));
        }
    }
    let events = h.take_events();
    assert!(h.take_errors().is_empty());

    // Reference: filled events (newest first in the pages) then the batch.
    let newest_first: Vec<Value> = gf
        .pages
        .iter()
        .flat_map(|(_, p)| p["chunk"].as_array().unwrap().clone())
        .collect();
    assert_eq!(newest_first.len(), 25);
    let mut reference = Reference::default();
    reference.batch(
        &gf.response,
        BTreeMap::from([(gf.room_id.clone(), (None, newest_first))]),
    );
    let got: Vec<Item> = events.iter().map(actual).collect();
    assert_items_eq(&got, &reference.out);

    assert_eq!(events.len(), 32);
    assert_eq!(events[0].kind, EventKind::OneTimeKeyCounts);
    let messages = &events[1..31];
    let bodies: Vec<&str> = messages
        .iter()
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (0..30).map(|i| format!("gap message {i}")).collect();
    assert_eq!(bodies, expected);
    let ids: HashSet<String> = messages
        .iter()
        .map(|e| e.event_id.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 30, "no duplicates");
    let timeline_ids: Vec<String> = gf
        .timeline()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    let last_five: Vec<String> = messages[25..]
        .iter()
        .map(|e| e.event_id.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(last_five, timeline_ids);
    for e in messages {
        assert_eq!(e.kind, EventKind::Message);
        assert_eq!(e.room_id.as_ref().unwrap().as_str(), gf.room_id);
        assert_eq!(e.sender.as_ref().unwrap().as_str(), "@gapfx_tx:localhost");
    }
    let ts: Vec<_> = messages
        .iter()
        .map(|e| e.origin_server_ts.unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    assert_eq!(checkpoint(&events[31]), Some(gf.next_batch()));
    assert_eq!(h.machine.since(), Some(gf.next_batch()));

    // Back to syncing from the new token.
    let req = h.request();
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
    assert_eq!(sync_query_since(&req).as_deref(), Some(gf.next_batch()));
}

#[test]
fn gap_fill_off_reports_a_gap_item() {
    let gf = gap_fixture();
    let mut c = gap_config(&gf.previous_since, &gf.filter);
    c.gap_fill.enabled = false;
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, json_response(&gf.response));
    let events = h.take_events();
    assert_eq!(
        kinds(&events),
        [
            "one_time_key_counts",
            "gap",
            "message",
            "message",
            "message",
            "message",
            "message",
            "checkpoint"
        ]
    );
    let gap = &events[1];
    assert_eq!(
        gap.kind,
        EventKind::Gap(Gap {
            prev_batch: gf.prev_batch().to_owned(),
            previous_since: gf.previous_since.clone(),
        })
    );
    assert_eq!(gap.room_id.as_ref().unwrap().as_str(), gf.room_id);
    let raw: Value = serde_json::from_str(gap.raw.get()).unwrap();
    assert_eq!(raw["prev_batch"].as_str(), Some(gf.prev_batch()));
    assert_eq!(raw["room_id"].as_str(), Some(gf.room_id.as_str()));
    let bodies: Vec<&str> = events[2..7]
        .iter()
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        bodies,
        [
            "gap message 25",
            "gap message 26",
            "gap message 27",
            "gap message 28",
            "gap message 29"
        ]
    );
    assert_eq!(checkpoint(&events[7]), Some(gf.next_batch()));
    // No /messages request: the next one is the sync.
    let req = h.request();
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
    assert_eq!(sync_query_since(&req).as_deref(), Some(gf.next_batch()));
}

#[test]
fn gap_fill_cap_gives_filled_events_and_a_gap_item() {
    let gf = gap_fixture();
    let mut c = gap_config(&gf.previous_since, &gf.filter);
    c.gap_fill.max_events_per_room = 12;
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, json_response(&gf.response));
    let req = h.request();
    assert_messages_request(&req, &gf.room_id, &gf.pages[0].0);
    h.respond(&req, json_response(&gf.pages[0].1));
    let events = h.take_events();
    assert_eq!(events.len(), 1 + 1 + 12 + 5 + 1, "{:?}", kinds(&events));
    assert_eq!(events[0].kind, EventKind::OneTimeKeyCounts);
    // The rest of the gap, from the last page's `end` back to the old token.
    assert_eq!(
        events[1].kind,
        EventKind::Gap(Gap {
            prev_batch: gf.pages[0].1["end"].as_str().unwrap().to_owned(),
            previous_since: gf.previous_since.clone(),
        })
    );
    assert_eq!(events[1].room_id.as_ref().unwrap().as_str(), gf.room_id);
    let bodies: Vec<&str> = events[2..19]
        .iter()
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (13..30).map(|i| format!("gap message {i}")).collect();
    assert_eq!(bodies, expected);
    assert_eq!(checkpoint(&events[19]), Some(gf.next_batch()));
    let req = h.request();
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
}

#[test]
fn gap_fill_overlapping_the_timeline_delivers_each_event_once() {
    let gf = gap_fixture();
    let mut h = Harness::new(gap_config(&gf.previous_since, &gf.filter));
    let req = h.request();
    h.respond(&req, json_response(&gf.response));
    // A server that also returns the first timeline event at the head of the first page.
    let mut pages = gf.pages.clone();
    let first_timeline = gf.timeline()[0].clone();
    pages[0].1["chunk"]
        .as_array_mut()
        .unwrap()
        .insert(0, first_timeline);
    for (_, page) in &pages {
        let req = h.request();
        h.respond(&req, json_response(page));
    }
    let events = h.take_events();
    let bodies: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::Message)
        .map(|e| e.body.as_deref().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (0..30).map(|i| format!("gap message {i}")).collect();
    assert_eq!(bodies, expected);
    assert_eq!(checkpoint(events.last().unwrap()), Some(gf.next_batch()));
}

#[test]
fn empty_pages_with_an_end_are_paged_through_then_reported_as_a_gap() {
    let gf = gap_fixture();
    let mut h = Harness::new(gap_config(&gf.previous_since, &gf.filter));
    let req = h.request();
    h.respond(&req, json_response(&gf.response));
    // A filter hid everything: empty pages that still point further back.
    let mut froms = Vec::new();
    for n in 0..4 {
        let req = h.request();
        froms.push(query(&req)["from"].clone());
        let page =
            serde_json::json!({"chunk": [], "start": format!("s{n}"), "end": format!("e{n}")});
        h.respond(&req, json_response(&page));
    }
    assert_eq!(
        froms[1..],
        ["e0", "e1", "e2"],
        "each empty page's `end` is followed"
    );
    let events = h.take_events();
    let gap = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::Gap(_)))
        .expect("a gap item");
    assert_eq!(
        gap.kind,
        EventKind::Gap(Gap {
            prev_batch: "e3".to_owned(),
            previous_since: gf.previous_since.clone()
        })
    );
    assert_eq!(checkpoint(events.last().unwrap()), Some(gf.next_batch()));

    // An `end` equal to the page's `from` makes no progress: the range is over, no gap.
    let mut h = Harness::new(gap_config(&gf.previous_since, &gf.filter));
    let req = h.request();
    h.respond(&req, json_response(&gf.response));
    let req = h.request();
    let from = query(&req)["from"].clone();
    h.respond(
        &req,
        json_response(&serde_json::json!({"chunk": [], "start": from, "end": from})),
    );
    let events = h.take_events();
    assert!(!events.iter().any(|e| matches!(e.kind, EventKind::Gap(_))));
    assert_eq!(checkpoint(events.last().unwrap()), Some(gf.next_batch()));
}

// ---- normalization and gap filling at their bounds ---------------------------------------------

#[test]
fn the_last_gap_page_asks_only_for_what_the_cap_leaves() {
    let mut c = config();
    c.gap_fill.page_size = 4;
    c.gap_fill.max_events_per_room = 6;
    let mut h = Harness::live_with_since(c);
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
    let mut h = Harness::live_with_since(config());
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
    assert_ne!(
        h.machine.state(),
        SyncState::Refused,
        "the sync itself is fine"
    );
    let req = h.next_request();
    assert_eq!(path(&req), "/_matrix/client/v3/sync");
}

#[test]
fn membership_without_a_state_key_is_not_a_member_event() {
    let mut h = Harness::new(config());
    let req = h.request();
    let body = json!({"next_batch": "s1", "rooms": {"join": {EDGE_ROOM: {"timeline": {"events": [
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
    let body = json!({"next_batch": "s1", "rooms": {"join": {EDGE_ROOM: {"timeline": {"events": [
        {"type": "m.room.message", "event_id": "$a", "content": {"body": "hi"}},
        {"type": "m.room.message", "event_id": "$b", "content": {}}
    ]}}}}});
    h.respond(&req, json_response(&body));
    let events = h.take_events();
    assert_eq!(events[0].body.as_deref(), Some("hi"));
    assert_eq!(events[1].body.as_deref(), None);
}

#[test]
fn a_gap_fill_cap_of_zero_reports_gaps_without_fetching() {
    let mut c = config();
    c.gap_fill.max_events_per_room = 0;
    let mut h = Harness::live_with_since(c);
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
