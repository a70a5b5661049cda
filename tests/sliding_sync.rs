//! Simplified sliding sync (MSC4186, contract §12) on the one harness: the request as Synapse
//! reads it, the (pos, to-device cursor) checkpoint, the growing range, resets, the automatic
//! choice of protocol, room subscriptions, and a property test against a model of Synapse's
//! connection and to-device semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use matrix_sync_service::sliding::{ResetReason, SlidingPosition};
use matrix_sync_service::{
    ActiveProtocol, EventKind, Failure, InputError, OutgoingRequest, Protocol, RequestKind,
    RoomSubscription, SyncState,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::{Harness, Reply, Sent, Server, Sim, SplitMix64};
use proptest::prelude::*;
use serde_json::{json, Value};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

fn sliding_config() -> matrix_sync_service::Config {
    let mut c = config_no_jitter();
    c.protocol = Protocol::SlidingSync;
    c
}

fn body(req: &OutgoingRequest) -> Value {
    serde_json::from_slice(req.http.body()).expect("a JSON body")
}

fn pos_param(req: &OutgoingRequest) -> Option<String> {
    query(req).get("pos").cloned()
}

fn to_device_since(req: &OutgoingRequest) -> Option<String> {
    body(req)["extensions"]["to_device"]["since"]
        .as_str()
        .map(str::to_owned)
}

fn range(req: &OutgoingRequest) -> Value {
    body(req)["lists"]["all"]["ranges"].clone()
}

/// An answer with `pos`, the list's `count`, one message per room in `rooms`, and the
/// to-device cursor `next_batch` with `to_device` messages.
fn answer(
    pos: &str,
    count: u64,
    rooms: &[(&str, &str)],
    next_batch: &str,
    to_device: &[&str],
) -> Value {
    let rooms: serde_json::Map<String, Value> = rooms
        .iter()
        .map(|(room, id)| {
            let event = json!({"type":"m.room.message","event_id":id,"sender":"@a:x",
                "origin_server_ts":1,"content":{"msgtype":"m.text","body":id}});
            (
                room.to_string(),
                json!({"initial": true, "limited": false, "timeline": [event]}),
            )
        })
        .collect();
    let to_device: Vec<Value> = to_device
        .iter()
        .map(|m| json!({"type":"m.test","sender":"@a:x","content":{"n":m}}))
        .collect();
    json!({
        "pos": pos,
        "lists": {"all": {"count": count, "ops": [{"op":"SYNC","range":[0,99],"room_ids":[]}]}},
        "rooms": rooms,
        "extensions": {"to_device": {"next_batch": next_batch, "events": to_device}},
    })
}

fn position(token: &str) -> SlidingPosition {
    SlidingPosition::from_token(token).expect("a sliding sync checkpoint")
}

/// A machine live on sliding sync at pos `1/s1` with to-device cursor `5`.
fn live() -> Harness {
    let mut h = Harness::new(sliding_config());
    let req = h.request();
    h.respond(
        &req,
        json_response(&answer("1/s1", 1, &[("!a:x", "$1")], "5", &[])),
    );
    assert_eq!(h.machine.state(), SyncState::Live);
    h.take_events();
    h.take_states();
    h
}

// ---- the request ---------------------------------------------------------------------------------

#[test]
fn the_request_is_what_synapse_reads_and_the_first_has_neither_pos_nor_cursor() {
    let mut h = Harness::new(sliding_config());
    let req = h.request();
    assert_eq!(
        req.kind,
        RequestKind::SlidingSync {
            timeout: Duration::ZERO
        }
    );
    assert_eq!(req.http.method(), http::Method::POST);
    assert_eq!(path(&req), PATH);
    assert_eq!(query(&req).keys().collect::<Vec<_>>(), ["timeout"]);
    assert_eq!(timeout_param(&req), "0");
    let body = body(&req);
    assert_eq!(body["conn_id"], "matrix-sync-service");
    assert_eq!(body["lists"]["all"]["ranges"], json!([[0, 99]]));
    assert_eq!(body["lists"]["all"]["timeline_limit"], 50);
    assert_eq!(body["lists"]["all"]["required_state"], json!([["*", "*"]]));
    for extension in ["to_device", "e2ee", "account_data", "receipts", "typing"] {
        assert_eq!(
            body["extensions"][extension]["enabled"], true,
            "{extension}"
        );
    }
    assert_eq!(to_device_since(&req), None);
    let auth = req.http.headers().get(http::header::AUTHORIZATION).unwrap();
    assert!(auth.is_sensitive());
    assert!(!req.http.uri().to_string().contains(TOKEN));
    assert!(!format!("{req:?}").contains(TOKEN));
    assert_eq!(h.machine.state(), SyncState::InitialSync);
    assert_eq!(h.machine.protocol(), ActiveProtocol::SlidingSync);
}

#[test]
fn the_checkpoint_is_the_pair_and_the_next_request_carries_both_in_their_places() {
    let mut c = sliding_config();
    c.long_poll_timeout = Duration::from_millis(12_345);
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(
        &req,
        json_response(&answer("1/s1_2", 1, &[("!a:x", "$1")], "17", &["m1"])),
    );
    let events = h.take_events();
    assert_eq!(
        kinds(&events),
        ["to_device", "list_update", "message", "checkpoint"]
    );
    let EventKind::Checkpoint(checkpoint) = &events[3].kind else {
        panic!("no checkpoint")
    };
    let expected = SlidingPosition {
        pos: Some("1/s1_2".into()),
        to_device_since: Some("17".into()),
    };
    assert_eq!(checkpoint.sliding_position(), Some(expected.clone()));
    assert_eq!(h.machine.since(), Some(checkpoint.next_batch.as_str()));
    assert_eq!(h.machine.sliding_position(), Some(expected));
    assert_eq!(h.machine.state(), SyncState::Live);
    let req = h.request();
    assert_eq!(pos_param(&req).as_deref(), Some("1/s1_2"));
    assert!(req.http.uri().query().unwrap().contains("pos=1%2Fs1_2"));
    assert_eq!(timeout_param(&req), "12345");
    assert_eq!(to_device_since(&req).as_deref(), Some("17"));
    // The list did not change: no second list update; the message is not repeated either.
    h.respond(
        &req,
        json_response(&answer("2/s3", 1, &[("!a:x", "$1")], "17", &[])),
    );
    assert_eq!(kinds(&h.take_events()), ["checkpoint"]);
}

#[test]
fn an_answer_that_moves_nothing_hands_on_nothing_and_the_loop_does_not_spin() {
    let mut h = live();
    let req = h.request();
    // Answered at once with the same position and nothing new: paced by the backoff.
    h.respond(&req, json_response(&answer("1/s1", 1, &[], "5", &[])));
    assert!(h.take_events().is_empty());
    assert!(h.machine.poll_request().is_none(), "the next sync waits");
    let next = h.next_request();
    assert_eq!(pos_param(&next).as_deref(), Some("1/s1"));
}

#[test]
fn the_range_grows_while_catching_up_and_live_comes_once_it_covers_the_list() {
    let mut c = sliding_config();
    c.sliding_sync.window = 100;
    let mut h = Harness::new(c);
    let mut ranges = Vec::new();
    let mut timeouts = Vec::new();
    for (n, pos) in ["1/s1", "2/s1", "3/s1", "4/s1"].iter().enumerate() {
        let req = h.next_request();
        ranges.push(range(&req));
        timeouts.push(timeout_param(&req));
        let room = format!("!r{n}:x");
        let id = format!("${n}");
        h.respond(
            &req,
            json_response(&answer(pos, 250, &[(&room, &id)], "1", &[])),
        );
    }
    assert_eq!(
        ranges,
        [
            json!([[0, 99]]),
            json!([[0, 199]]),
            json!([[0, 299]]),
            json!([[0, 299]])
        ]
    );
    assert_eq!(timeouts, ["0", "0", "0", "30000"]);
    let states = h.take_states();
    assert_eq!(states.iter().filter(|s| **s == SyncState::Live).count(), 1);
    assert_eq!(h.machine.sliding_range_end(), Some(299));
}

// ---- resets ----------------------------------------------------------------------------------------

fn reset_by(errcode: &str, error: &str, reason: ResetReason) {
    let mut h = live();
    let since = h.machine.since().map(str::to_owned);
    let req = h.request();
    assert_eq!(pos_param(&req).as_deref(), Some("1/s1"));
    let refusal = json!({"errcode": errcode, "error": error});
    h.reply(&req, 400, serde_json::to_vec(&refusal).unwrap());
    let events = h.take_events();
    assert_eq!(kinds(&events), ["connection_reset"], "{errcode}");
    let EventKind::ConnectionReset(reset) = &events[0].kind else {
        unreachable!()
    };
    assert_eq!(reset.reason, reason);
    assert_eq!(reset.to_device_since.as_deref(), Some("5"));
    assert!(!serde_json::to_string(&events[0]).unwrap().contains(error));
    assert_eq!(h.take_states(), [SyncState::InitialSync]);
    assert!(
        h.take_errors().is_empty(),
        "a reset is an event, not an error"
    );
    assert_eq!(h.machine.since(), since.as_deref(), "the checkpoint stays");
    // A fresh connection: no pos, the cursor kept, catching up.
    let req = h.next_request();
    assert_eq!(pos_param(&req), None);
    assert_eq!(to_device_since(&req).as_deref(), Some("5"));
    assert_eq!(timeout_param(&req), "0");
    assert_eq!(range(&req), json!([[0, 99]]));
    h.respond(
        &req,
        json_response(&answer("9/s4", 1, &[("!a:x", "$2")], "6", &[])),
    );
    let events = h.take_events();
    assert_eq!(kinds(&events), ["list_update", "message", "checkpoint"]);
    assert_eq!(
        position(h.machine.since().unwrap()),
        SlidingPosition {
            pos: Some("9/s4".into()),
            to_device_since: Some("6".into())
        }
    );
    assert_eq!(h.take_states(), [SyncState::Live]);
    assert_eq!(pos_param(&h.request()).as_deref(), Some("9/s4"));
}

#[test]
fn unknown_pos_resets_once_then_a_fresh_connection_goes_on() {
    reset_by("M_UNKNOWN_POS", "Unknown position", ResetReason::UnknownPos);
}

#[test]
fn a_malformed_pos_resets_the_same_way() {
    reset_by(
        "M_UNKNOWN",
        "Invalid stream token 'garbage'",
        ResetReason::InvalidPos,
    );
}

#[test]
fn other_refusals_are_not_resets_and_a_request_without_pos_is_never_reset() {
    let mut h = live();
    let req = h.request();
    h.reply(
        &req,
        400,
        r#"{"errcode":"M_UNKNOWN","error":"something else"}"#,
    );
    assert!(h.take_events().is_empty());
    let errors = h.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].request.name(), "sliding_sync");
    assert_eq!(h.machine.state(), SyncState::Refused);
    assert_eq!(
        pos_param(&h.next_request()).as_deref(),
        Some("1/s1"),
        "kept"
    );

    // A server answering M_UNKNOWN_POS to a request that carried no pos: a refusal, no loop.
    let mut h = Harness::new(sliding_config());
    let req = h.request();
    h.reply(
        &req,
        400,
        r#"{"errcode":"M_UNKNOWN_POS","error":"Unknown position"}"#,
    );
    assert!(h.take_events().is_empty());
    assert!(matches!(
        h.take_errors()[0].failure,
        Failure::Refused { status: 400, .. }
    ));
    assert_eq!(h.machine.state(), SyncState::Refused);
}

#[test]
fn a_restart_from_the_stored_pair_gets_to_device_messages_again_even_after_a_reset() {
    let mut h = live();
    // A batch with to-device messages, whose checkpoint the consumer never stores: the
    // machine restarts from the last one it stored.
    let req = h.request();
    h.respond(
        &req,
        json_response(&answer(
            "2/s2",
            1,
            &[("!a:x", "$3")],
            "8",
            &["m6", "m7", "m8"],
        )),
    );
    let stored = h.take_events();
    assert_eq!(
        stored
            .iter()
            .filter(|e| e.kind == EventKind::ToDevice)
            .count(),
        3
    );
    let mut c = sliding_config();
    c.since = Some(
        SlidingPosition {
            pos: Some("1/s1".into()),
            to_device_since: Some("5".into()),
        }
        .to_token(),
    );
    let mut restarted = Harness::new(c);
    assert_eq!(restarted.machine.state(), SyncState::CatchingUp);
    let req = restarted.request();
    assert_eq!(pos_param(&req).as_deref(), Some("1/s1"));
    assert_eq!(
        to_device_since(&req).as_deref(),
        Some("5"),
        "the messages come again"
    );
    assert_eq!(timeout_param(&req), "0");
    // The server lost the position meanwhile: reset, and the cursor is still 5.
    restarted.reply(
        &req,
        400,
        r#"{"errcode":"M_UNKNOWN_POS","error":"Unknown position"}"#,
    );
    let req = restarted.next_request();
    assert_eq!(
        (pos_param(&req), to_device_since(&req).as_deref()),
        (None, Some("5"))
    );
}

#[test]
fn a_server_that_drops_every_connection_is_paced_not_spun() {
    // Every request with a pos is refused as unknown; every fresh one answers the same room.
    struct Forgetful(u64);
    impl Server for Forgetful {
        fn answer(&mut self, _: &Sent, http: &http::Request<Vec<u8>>) -> Reply {
            if matrix_sync_testkit::sim::query(http.uri(), "pos").is_some() {
                let body = br#"{"errcode":"M_UNKNOWN_POS","error":"Unknown position"}"#;
                return Reply::Response {
                    latency: Duration::from_millis(20),
                    status: 400,
                    headers: vec![],
                    body: body.to_vec(),
                };
            }
            self.0 += 1;
            let body = answer(&format!("{}/s1", self.0), 1, &[("!a:x", "$same")], "1", &[]);
            Reply::ok(
                Duration::from_millis(20),
                serde_json::to_vec(&body).unwrap(),
            )
        }
    }
    let mut sim = Sim::scripted(sliding_config(), Forgetful(0));
    sim.run_until(Duration::from_secs(3600));
    let resets = sim
        .log
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ConnectionReset(_)))
        .count();
    let requests = sim.log.requests.len();
    // The pacing bound of the crate docs: at most 2 × (8 + 120) = 256 unproductive requests
    // an hour with the defaults (the kit's Checked asserts the windows all along).
    assert!(requests <= 256 + 2, "{requests} requests in an hour");
    assert!(
        resets >= 20,
        "still resetting at the maximum backoff: {resets}"
    );
    assert!(
        resets * 2 <= requests + 1,
        "one reset per pos that was refused"
    );
}

// ---- checkpoints and restarts ------------------------------------------------------------------------

#[test]
fn a_stored_v3_token_is_refused_by_forced_sliding_sync_and_resumed_by_auto() {
    let mut c = sliding_config();
    c.since = Some("s72594_4483_1934".into());
    assert!(matrix_sync_service::SyncMachine::new(c.clone(), std::time::Instant::now()).is_err());
    c.protocol = Protocol::Auto;
    let mut h = Harness::new(c);
    let req = h.request();
    assert!(matches!(req.kind, RequestKind::Sync { .. }));
    assert_eq!(since_param(&req).as_deref(), Some("s72594_4483_1934"));
}

#[test]
fn auto_resumes_sliding_sync_from_a_stored_pair_without_asking() {
    let mut c = config_no_jitter();
    c.protocol = Protocol::Auto;
    c.since = Some(
        SlidingPosition {
            pos: Some("3/s3".into()),
            to_device_since: Some("4".into()),
        }
        .to_token(),
    );
    let mut h = Harness::new(c);
    let req = h.request();
    assert!(matches!(req.kind, RequestKind::SlidingSync { .. }));
    assert_eq!(pos_param(&req).as_deref(), Some("3/s3"));
    assert_eq!(to_device_since(&req).as_deref(), Some("4"));
}

// ---- choosing the protocol --------------------------------------------------------------------------

#[test]
fn auto_asks_versions_with_the_token_and_follows_the_answer() {
    for (offered, sliding) in [
        (
            r#"{"versions":["v1.11"],"unstable_features":{"org.matrix.simplified_msc3575":true}}"#,
            true,
        ),
        (
            r#"{"versions":["v1.11"],"unstable_features":{"org.matrix.simplified_msc3575":false}}"#,
            false,
        ),
        (r#"{"versions":["v1.11"]}"#, false),
    ] {
        let mut c = config_no_jitter();
        c.protocol = Protocol::Auto;
        let mut h = Harness::new(c);
        assert_eq!(h.machine.protocol(), ActiveProtocol::Deciding);
        let req = h.request();
        assert_eq!(req.kind, RequestKind::ProtocolCheck);
        assert_eq!(path(&req), "/_matrix/client/versions");
        assert!(req
            .http
            .headers()
            .get(http::header::AUTHORIZATION)
            .unwrap()
            .is_sensitive());
        h.reply(&req, 200, offered);
        let next = h.request();
        assert_eq!(
            matches!(next.kind, RequestKind::SlidingSync { .. }),
            sliding,
            "{offered}"
        );
        assert_eq!(
            matches!(next.kind, RequestKind::Sync { .. }),
            !sliding,
            "{offered}"
        );
    }
}

#[test]
fn auto_falls_back_to_v3_on_a_404_from_the_endpoint_and_a_failed_check_backs_off() {
    let mut c = config_no_jitter();
    c.protocol = Protocol::Auto;
    let mut h = Harness::new(c);
    let req = h.request();
    h.reply(&req, 502, "");
    assert_eq!(h.take_errors()[0].request, RequestKind::ProtocolCheck);
    let req = h.next_request();
    assert_eq!(
        req.kind,
        RequestKind::ProtocolCheck,
        "asked again after the backoff"
    );
    h.reply(
        &req,
        200,
        r#"{"versions":[],"unstable_features":{"org.matrix.simplified_msc3575":true}}"#,
    );
    let req = h.request();
    h.reply(
        &req,
        404,
        r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#,
    );
    assert!(h.take_errors().is_empty());
    assert_eq!(h.machine.protocol(), ActiveProtocol::V3);
    let req = h.request();
    assert!(matches!(req.kind, RequestKind::Sync { .. }));
    // Forced sliding sync does not fall back: a 404 is a refusal.
    let mut h = Harness::new(sliding_config());
    let req = h.request();
    h.reply(
        &req,
        404,
        r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#,
    );
    assert_eq!(h.take_errors().len(), 1);
    assert_eq!(h.machine.protocol(), ActiveProtocol::SlidingSync);
}

// ---- subscriptions ------------------------------------------------------------------------------------

#[test]
fn room_subscriptions_are_added_and_removed_at_run_time() {
    let mut h = live();
    let room = matrix_sync_service::ruma_common::owned_room_id!("!sub:x");
    h.machine
        .subscribe_room(room.clone(), RoomSubscription::new(20))
        .unwrap();
    assert_eq!(
        h.machine
            .subscribe_room(room.clone(), RoomSubscription::new(0)),
        Err(InputError::InvalidSubscription)
    );
    let req = h.request();
    assert_eq!(
        body(&req)["room_subscriptions"],
        json!({"!sub:x": {"timeline_limit": 20, "required_state": [["*", "*"]]}})
    );
    h.respond(
        &req,
        json_response(&answer("2/s2", 1, &[("!sub:x", "$s")], "5", &[])),
    );
    assert_eq!(h.machine.unsubscribe_room(&room), Ok(true));
    assert_eq!(h.machine.unsubscribe_room(&room), Ok(false));
    let req = h.request();
    assert_eq!(body(&req)["room_subscriptions"], json!({}));
    h.machine.stop();
    assert_eq!(h.machine.unsubscribe_room(&room), Err(InputError::Stopped));
}

// ---- hostile answers ------------------------------------------------------------------------------------

#[test]
fn tokens_that_cannot_round_trip_and_unreadable_bodies_move_nothing() {
    let long = "x".repeat(matrix_sync_service::MAX_TOKEN_BYTES);
    for bad in [
        json!({"pos": ""}),
        json!({"pos": "1/s\n1"}),
        json!({"pos": long}),
        json!({"pos": "1/s1", "extensions": {"to_device": {"next_batch": "", "events": []}}}),
        json!({"pos": 5}),
        json!({"rooms": {}}),
        json!({"pos": "2/s2", "rooms": {"not a room": {}}}),
    ] {
        let mut h = live();
        let since = h.machine.since().map(str::to_owned);
        let req = h.request();
        h.respond(&req, json_response(&bad));
        assert!(h.take_events().is_empty(), "{bad}");
        let errors = h.take_errors();
        assert!(
            matches!(errors[0].failure, Failure::BadResponse { .. }),
            "{bad}"
        );
        assert!(!errors[0].to_string().contains('\n'));
        assert_eq!(h.machine.since(), since.as_deref());
        assert_eq!(pos_param(&h.next_request()).as_deref(), Some("1/s1"));
    }
    let mut c = sliding_config();
    c.max_body_bytes = 64;
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(
        &req,
        json_response(&answer("1/s1", 1, &[("!a:x", "$1")], "5", &[])),
    );
    assert!(matches!(
        h.take_errors()[0].failure,
        Failure::BodyTooLarge { limit: 64 }
    ));
}

// ---- a model of Synapse's connections --------------------------------------------------------------

/// Synapse's connection and to-device semantics, small: positions `P/sN` (a request from P
/// keeps P and the new position, and drops every other), every room sent `initial` with its
/// latest `limit` events in a connection's first answer, `limited` with a
/// `prev_batch` when more happened, to-device messages deleted only once a request carries a
/// cursor past them; `/messages` pages back from a `prev_batch` (`tN`: before stream N) to a
/// position's stream part (`sN`), newest first. Faults are injected into `/sync` from a seed;
/// traffic stops at `quiet_after`.
struct Model {
    rng: SplitMix64,
    limit: usize,
    rooms: Vec<String>,
    /// Room events: (stream id, room index, event id).
    events: Vec<(u64, usize, String)>,
    /// Pending to-device messages: (stream id, label).
    inbox: Vec<(u64, String)>,
    stream: u64,
    to_device_stream: u64,
    /// Position → (stream at it, rooms the connection had sent).
    positions: BTreeMap<u64, (u64, BTreeSet<usize>)>,
    next_position: u64,
    quiet_after: Duration,
    /// Positions dropped by the model (M_UNKNOWN_POS injected).
    forgets: usize,
    /// `/messages` pages answered.
    pages: usize,
    now: Duration,
}

impl Model {
    fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            limit: 5,
            rooms: (0..4).map(|i| format!("!room{i}:x")).collect(),
            events: Vec::new(),
            inbox: Vec::new(),
            stream: 0,
            to_device_stream: 0,
            positions: BTreeMap::new(),
            next_position: 1,
            quiet_after: Duration::from_secs(3600),
            forgets: 0,
            pages: 0,
            now: Duration::ZERO,
        }
    }

    fn roll(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n
    }

    fn traffic(&mut self) {
        // Nothing happens before the first answer (an initial sync is history, not a gap).
        if self.now >= self.quiet_after || self.next_position == 1 {
            return;
        }
        for _ in 0..self.roll(4) {
            self.stream += 1;
            let room = self.roll(self.rooms.len() as u64) as usize;
            self.events
                .push((self.stream, room, format!("$e{}", self.stream)));
        }
        if self.roll(3) == 0 {
            self.stream += 20;
            for _ in 0..8 {
                self.stream += 1;
                self.events
                    .push((self.stream, 0, format!("$e{}", self.stream)));
            }
        }
        for _ in 0..self.roll(3) {
            self.to_device_stream += 1;
            self.inbox.push((
                self.to_device_stream,
                format!("td{}", self.to_device_stream),
            ));
        }
    }

    fn error(status: u16, errcode: &str, error: &str) -> Reply {
        let body = json!({"errcode": errcode, "error": error});
        Reply::Response {
            latency: Duration::from_millis(30),
            status,
            headers: vec![],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    /// `GET /rooms/{room}/messages?dir=b&from=tN&to=sM&limit=L`: the room's events with
    /// M < stream < N, newest first, `end` when a full page may have more behind it.
    fn messages(&mut self, uri: &http::Uri) -> Reply {
        self.pages += 1;
        let param = |name| matrix_sync_testkit::sim::query(uri, name).expect(name);
        let room_id = uri.path().split('/').nth(5).expect("a room id");
        let room_id = percent_decode(room_id);
        let room = self
            .rooms
            .iter()
            .position(|r| *r == room_id)
            .expect("a room of ours");
        let before: u64 = param("from")
            .strip_prefix('t')
            .expect("a tN token")
            .parse()
            .unwrap();
        let after: u64 = param("to")
            .strip_prefix('s')
            .expect("an sN token")
            .parse()
            .unwrap();
        let limit: usize = param("limit").parse().unwrap();
        assert_eq!(param("dir"), "b");
        let chunk: Vec<&(u64, usize, String)> = self
            .events
            .iter()
            .rev()
            .filter(|(s, r, _)| *r == room && *s < before && *s > after)
            .take(limit)
            .collect();
        let mut body = json!({
            "start": format!("t{before}"),
            "chunk": chunk.iter().map(|(s, _, id)| message(*s, id)).collect::<Vec<_>>(),
        });
        if let (true, Some((oldest, _, _))) = (chunk.len() == limit, chunk.last()) {
            body["end"] = json!(format!("t{oldest}"));
        }
        Reply::ok(
            Duration::from_millis(10),
            serde_json::to_vec(&body).unwrap(),
        )
    }

    fn timeline(&self, room: usize, after: u64) -> Vec<&(u64, usize, String)> {
        self.events
            .iter()
            .filter(|(s, r, _)| *r == room && *s > after)
            .collect()
    }
}

impl Server for Model {
    fn answer(&mut self, sent: &Sent, http: &http::Request<Vec<u8>>) -> Reply {
        self.now = sent.at;
        if http.uri().path().ends_with("/messages") {
            return self.messages(http.uri());
        }
        self.traffic();
        let fault = if self.now < self.quiet_after {
            self.roll(100)
        } else {
            99
        };
        match fault {
            0..=3 => return Model::error(502, "M_UNKNOWN", "bad gateway"),
            4..=5 => return Reply::refused(Duration::from_millis(10)),
            6..=7 => return Reply::ok(Duration::from_millis(10), b"{\"pos\":".to_vec()),
            8..=9 => {
                self.forgets += 1;
                self.positions.clear();
                // More than a timeline's worth in one room while the connection is lost:
                // the fresh connection's `initial` room is `limited`, a real gap.
                let room = 1 + self.roll(self.rooms.len() as u64 - 1) as usize;
                let burst = if self.next_position > 1 { 8 } else { 0 };
                for _ in 0..burst {
                    self.stream += 1;
                    self.events
                        .push((self.stream, room, format!("$e{}", self.stream)));
                }
            }
            _ => {}
        }
        let request: Value = serde_json::from_slice(http.body()).expect("a JSON body");
        let since: u64 = request["extensions"]["to_device"]["since"]
            .as_str()
            .map(|s| s.parse().expect("a cursor we handed out"))
            .unwrap_or(0);
        let (from, mut sent_rooms, base) = match matrix_sync_testkit::sim::query(http.uri(), "pos")
        {
            None => (0, BTreeSet::new(), None),
            Some(pos) => {
                let Some((p, stream)) = pos.split_once("/s") else {
                    return Model::error(400, "M_UNKNOWN", "Invalid stream token");
                };
                let p: u64 = p.parse().expect("a position we handed out");
                let Some((at, rooms)) = self.positions.get(&p).cloned() else {
                    return Model::error(400, "M_UNKNOWN_POS", "Unknown position");
                };
                assert_eq!(stream.parse::<u64>().ok(), Some(at), "pos tampered with");
                (at, rooms, Some(p))
            }
        };
        // To-device: delete up to the cursor, send what follows (at most 3).
        self.inbox.retain(|(id, _)| *id > since);
        let out: Vec<(u64, String)> = self.inbox.iter().take(3).cloned().collect();
        let next_batch = out
            .last()
            .map_or(since.max(self.to_device_stream), |(id, _)| *id);
        let mut rooms = serde_json::Map::new();
        for room in 0..self.rooms.len() {
            let initial = !sent_rooms.contains(&room);
            let after = if initial { 0 } else { from };
            let timeline = self.timeline(room, after);
            // A connection's first answer has every room of the range (as Synapse's has),
            // later ones the rooms with news.
            if timeline.is_empty() && base.is_some() {
                continue;
            }
            let limited = timeline.len() > self.limit;
            let shown = &timeline[timeline.len().saturating_sub(self.limit)..];
            let events: Vec<Value> = shown.iter().map(|(s, _, id)| message(*s, id)).collect();
            let mut value = json!({"limited": limited, "timeline": events});
            if let Some((first, _, _)) = shown.first() {
                value["prev_batch"] = json!(format!("t{first}"));
            }
            if initial {
                value["initial"] = json!(true);
            }
            rooms.insert(self.rooms[room].clone(), value);
            sent_rooms.insert(room);
        }
        let to_device: Vec<Value> = out
            .iter()
            .map(|(_, label)| json!({"type":"m.test","sender":"@a:x","content":{"label":label}}))
            .collect();
        let timeout = matrix_sync_testkit::sim::query(http.uri(), "timeout")
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        let empty = rooms.is_empty() && to_device.is_empty();
        let latency = if empty && base.is_some() {
            Duration::from_millis(timeout.max(30))
        } else {
            Duration::from_millis(30)
        };
        let p = self.next_position;
        self.next_position += 1;
        self.positions.retain(|k, _| Some(*k) == base);
        self.positions.insert(p, (self.stream, sent_rooms));
        let body = json!({
            "pos": format!("{p}/s{}", self.stream),
            "lists": {"all": {"count": self.rooms.len(), "ops": [{"op":"SYNC","range":[0,99],"room_ids":[]}]}},
            "rooms": rooms,
            "extensions": {"to_device": {"next_batch": next_batch.to_string(), "events": to_device}},
        });
        Reply::ok(latency, serde_json::to_vec(&body).unwrap())
    }
}

fn message(stream: u64, id: &str) -> Value {
    json!({"type":"m.room.message","event_id":id,"sender":"@a:x",
        "origin_server_ts":stream,"content":{"msgtype":"m.text","body":id}})
}

fn percent_decode(text: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).expect("a %XX escape"));
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Against the model, with faults: every room event is delivered at least once, in
    /// stream order per room (gaps filled from `/messages`, in pages of 3, none reported);
    /// every to-device message is
    /// delivered at least once, in order, and the server's inbox ends empty (the cursor only
    /// passes what was handed on); one reset per position the server dropped, never more.
    #[test]
    fn against_a_model_of_synapse_nothing_is_lost_and_resets_are_bounded(seed in any::<u64>()) {
        let mut c = sliding_config();
        c.jitter_seed = seed;
        c.backoff.jitter = 0.3;
        c.gap_fill = c.gap_fill.with_page_size(3);
        let mut sim = Sim::scripted(c, Model::new(seed));
        sim.run_until(Duration::from_secs(3600 + 1200));
        let model = &sim.server;
        let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut gapped: BTreeSet<String> = BTreeSet::new();
        let mut to_device = Vec::new();
        let mut resets = 0;
        for (n, e) in sim.log.events.iter().enumerate() {
            match &e.kind {
                EventKind::Message => {
                    first_seen.entry(e.event_id.as_ref().unwrap().to_string()).or_insert(n);
                }
                EventKind::Gap(_) => {
                    gapped.insert(e.room_id.as_ref().unwrap().to_string());
                }
                EventKind::ToDevice => {
                    let label = e.raw.get().split("\"label\":\"").nth(1).unwrap();
                    let label = label.split('"').next().unwrap().to_owned();
                    if !to_device.contains(&label) {
                        to_device.push(label);
                    }
                }
                EventKind::ConnectionReset(_) => resets += 1,
                _ => {}
            }
        }
        prop_assert!(gapped.is_empty(), "gaps reported in {gapped:?}");
        prop_assert!(model.pages > 0, "no gap was filled");
        for (room, name) in model.rooms.iter().enumerate() {
            let order: Vec<usize> = model
                .events
                .iter()
                .filter(|(_, r, _)| *r == room)
                .map(|(_, _, id)| *first_seen.get(id).unwrap_or_else(|| panic!("{id} of {name} lost")))
                .collect();
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{name} out of order");
        }
        let expected: Vec<String> = (1..=model.to_device_stream).map(|n| format!("td{n}")).collect();
        prop_assert_eq!(&to_device, &expected);
        prop_assert!(model.inbox.is_empty(), "{} to-device messages never acknowledged", model.inbox.len());
        prop_assert!(resets <= model.forgets, "{resets} resets for {} dropped positions", model.forgets);
        prop_assert_eq!(sim.machine.state(), SyncState::Live);
    }
}

// ---- edges ------------------------------------------------------------------------------------------

#[test]
fn the_range_grows_exactly_when_the_list_has_a_room_past_it() {
    for (count, grows) in [(100, false), (101, true)] {
        let mut h = Harness::new(sliding_config());
        let req = h.request();
        h.respond(
            &req,
            json_response(&answer("1/s1", count, &[("!a:x", "$1")], "1", &[])),
        );
        let expected_end = if grows { 199 } else { 99 };
        assert_eq!(
            h.machine.sliding_range_end(),
            Some(expected_end),
            "count {count}"
        );
        assert_eq!(
            h.machine.state() == SyncState::Live,
            !grows,
            "count {count}"
        );
        let req = h.next_request();
        assert_eq!(range(&req), json!([[0, expected_end]]));
        assert_eq!(timeout_param(&req) == "0", grows, "count {count}");
    }
}

#[test]
fn a_new_to_device_cursor_alone_is_a_checkpoint() {
    let mut h = live();
    let req = h.request();
    // Same pos, nothing for the consumer, but the cursor moved (messages deleted meanwhile
    // by another request of this device): the pair changed, so it is handed out.
    h.respond(&req, json_response(&answer("1/s1", 1, &[], "9", &[])));
    let events = h.take_events();
    assert_eq!(kinds(&events), ["checkpoint"]);
    assert_eq!(
        position(h.machine.since().unwrap())
            .to_device_since
            .as_deref(),
        Some("9")
    );
}

#[test]
fn without_the_to_device_extension_the_stored_cursor_is_kept() {
    let mut c = sliding_config();
    c.sliding_sync.extensions.to_device = false;
    c.since = Some(
        SlidingPosition {
            pos: Some("3/s3".into()),
            to_device_since: Some("4".into()),
        }
        .to_token(),
    );
    let mut h = Harness::new(c);
    let req = h.request();
    assert!(body(&req)["extensions"].get("to_device").is_none());
    let mut reply = answer("4/s4", 1, &[("!a:x", "$1")], "0", &[]);
    reply["extensions"] = json!({});
    h.respond(&req, json_response(&reply));
    assert_eq!(
        position(h.machine.since().unwrap()),
        SlidingPosition {
            pos: Some("4/s4".into()),
            to_device_since: Some("4".into())
        }
    );
}

#[test]
fn auto_never_falls_back_from_a_stored_sliding_checkpoint() {
    let mut c = config_no_jitter();
    c.protocol = Protocol::Auto;
    c.since = Some(
        SlidingPosition {
            pos: Some("3/s3".into()),
            to_device_since: None,
        }
        .to_token(),
    );
    let mut h = Harness::new(c);
    let req = h.request();
    h.reply(
        &req,
        404,
        r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#,
    );
    assert_eq!(h.take_errors().len(), 1, "a refusal, reported");
    assert_eq!(h.machine.protocol(), ActiveProtocol::SlidingSync);
    assert!(matches!(
        h.next_request().kind,
        RequestKind::SlidingSync { .. }
    ));
}
