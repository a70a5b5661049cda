//! The same scenarios against both homeservers of the test kit, Synapse and palpo: one
//! `#[test]` per scenario and server, named by both. Where palpo behaves differently, the test
//! asserts what it really does, named by that behaviour (see the README's table of
//! divergences).

mod support;

use std::time::{Duration, Instant};

use matrix_sync_service::{
    start, Config, Event, EventKind, GapFill, Protocol, SlidingPosition, SyncFilter, SyncService,
};
use matrix_sync_testkit::homeserver::Server;
use serde_json::{json, Value};
use support::client::{self, encode, room_of_two, Account};
use support::service::{bodies_in, collect_until, config_for, drain_until_live, last_checkpoint};

const WITHIN: Duration = Duration::from_secs(60);

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

fn send_all(bob: &Account, room: &str, bodies: &[String], pause: Duration) {
    for body in bodies {
        bob.send_text(room, body);
        std::thread::sleep(pause);
    }
}

/// A driver for `alice` with short long polls, a small timeline and gap filling.
fn config(alice: &Account, since: Option<String>) -> Config {
    let mut config = config_for(alice);
    config.long_poll_timeout = Duration::from_secs(5);
    config.filter = Some(SyncFilter::timeline_limit(5));
    config.since = since;
    config
}

/// Receives events until `room` holds `n` text messages and a checkpoint follows the last.
fn collect_messages(service: &SyncService, room: &str, n: usize) -> Vec<Event> {
    collect_until(service, WITHIN, |events| {
        let seen = bodies_in(events, room).len();
        seen >= n
            && matches!(
                events.last().map(|e| &e.kind),
                Some(EventKind::Checkpoint(_))
            )
    })
}

fn gaps(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Gap(_)))
        .count()
}

// ---- the driver receives a second user's messages, in order and once ---------------------------

fn messages_arrive_in_order_and_once(server: Server) {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "reader", "writer");
    let service = start(config(&alice, None)).expect("valid config");
    drain_until_live(&service);
    let sent = numbered("ordered", 8);
    send_all(&bob, &room, &sent, Duration::from_millis(100));
    let events = collect_messages(&service, &room, sent.len());
    assert_eq!(bodies_in(&events, &room), sent, "on {server}");
    assert_eq!(gaps(&events), 0, "on {server}");
    service.stop();
}

#[test]
fn messages_arrive_in_order_and_once_on_synapse() {
    messages_arrive_in_order_and_once(Server::Synapse);
}

#[test]
fn messages_arrive_in_order_and_once_on_palpo() {
    messages_arrive_in_order_and_once(Server::Palpo);
}

// ---- a restart from the last checkpoint loses and duplicates nothing ---------------------------

fn restart_from_checkpoint_loses_and_duplicates_nothing(server: Server) {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "restarter", "writer");
    let first = start(config(&alice, None)).expect("valid config");
    drain_until_live(&first);
    let before = numbered("before", 4);
    send_all(&bob, &room, &before, Duration::from_millis(50));
    let events = collect_messages(&first, &room, before.len());
    let checkpoint = last_checkpoint(&events).expect("a checkpoint");
    first.stop();

    // Fewer than either server's timeline holds: no gap to fill.
    let away = numbered("away", 4);
    send_all(&bob, &room, &away, Duration::ZERO);
    let second = start(config(&alice, Some(checkpoint))).expect("valid config");
    let mut after = collect_messages(&second, &room, away.len());
    // Anything more (a duplicate) would come in the next few long polls.
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Ok(event) = second.events().recv_deadline(quiet) {
        after.push(event);
    }
    second.stop();

    let mut all = bodies_in(&events, &room);
    all.extend(bodies_in(&after, &room));
    let expected: Vec<String> = before.iter().chain(&away).cloned().collect();
    assert_eq!(all, expected, "on {server}");
    assert_eq!(gaps(&after), 0, "on {server}");
}

#[test]
fn restart_from_checkpoint_loses_and_duplicates_nothing_on_synapse() {
    restart_from_checkpoint_loses_and_duplicates_nothing(Server::Synapse);
}

#[test]
fn restart_from_checkpoint_loses_and_duplicates_nothing_on_palpo() {
    restart_from_checkpoint_loses_and_duplicates_nothing(Server::Palpo);
}

// ---- a held long poll wakes up when a message is sent ------------------------------------------

/// The longest of three wake-ups: a message sent while the driver's long poll is held,
/// until the driver hands it on.
fn longest_wake_up(server: Server) -> Duration {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "waiter", "writer");
    let mut config = config(&alice, None);
    config.long_poll_timeout = Duration::from_secs(30);
    let service = start(config).expect("valid config");
    drain_until_live(&service);
    let mut longest = Duration::ZERO;
    for i in 0..3 {
        // The driver's next long poll is held by now.
        std::thread::sleep(Duration::from_millis(500));
        let body = format!("wake {i}");
        let sent = Instant::now();
        bob.send_text(&room, &body);
        collect_until(&service, WITHIN, |events| {
            bodies_in(events, &room).contains(&body)
        });
        longest = longest.max(sent.elapsed());
    }
    service.stop();
    eprintln!("{server}: longest wake-up of a held long poll {longest:?}");
    longest
}

/// Synapse wakes a held long poll at once (about 150 ms here, sending included).
#[test]
fn a_held_long_poll_wakes_up_within_two_seconds_on_synapse() {
    let longest = longest_wake_up(Server::Synapse);
    assert!(longest < Duration::from_secs(2), "{longest:?}");
}

/// palpo's long poll checks the database once a second (and holds at most 30 s, whatever
/// the `timeout`): a wake-up takes up to about a second.
#[test]
fn a_held_long_poll_wakes_up_within_three_seconds_on_palpo() {
    let longest = longest_wake_up(Server::Palpo);
    assert!(longest < Duration::from_secs(3), "{longest:?}");
}

// ---- protocol divergences, asked directly --------------------------------------------------------

fn sync_json(account: &Account, query: &str) -> (u16, Value) {
    account.get_json(&format!("/_matrix/client/v3/sync?timeout=0{query}"))
}

fn garbage_since_answer(server: Server) -> (u16, Value) {
    let url = server.shared().base_url();
    let alice = Account::register(&url, "garbage");
    sync_json(&alice, "&since=not-a-token")
}

#[test]
fn a_garbage_since_is_refused_on_synapse() {
    let (status, body) = garbage_since_answer(Server::Synapse);
    assert!((400..500).contains(&status), "{status} {body}");
}

#[test]
fn a_garbage_since_is_accepted_as_an_initial_sync_on_palpo() {
    let (status, body) = garbage_since_answer(Server::Palpo);
    assert_eq!(status, 200, "{body}");
    assert!(body["next_batch"].is_string(), "{body}");
}

/// The timeline of a room where 12 messages were sent, asked with a limit of 2.
fn timeline_with_limit_two(server: Server) -> Value {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "limited", "writer");
    send_all(&bob, &room, &numbered("limit", 12), Duration::ZERO);
    let filter = encode(&json!({"room": {"timeline": {"limit": 2}}}).to_string());
    let (status, body) = sync_json(&alice, &format!("&filter={filter}"));
    assert_eq!(status, 200, "{body}");
    body["rooms"]["join"][&room]["timeline"].clone()
}

#[test]
fn the_filter_s_timeline_limit_is_honoured_on_synapse() {
    let timeline = timeline_with_limit_two(Server::Synapse);
    assert_eq!(timeline["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(timeline["limited"], true);
}

#[test]
fn the_filter_s_timeline_limit_is_ignored_for_ten_events_on_palpo() {
    let timeline = timeline_with_limit_two(Server::Palpo);
    assert_eq!(
        timeline["events"].as_array().map(Vec::len),
        Some(10),
        "{timeline}"
    );
    assert_eq!(timeline["limited"], true);
}

fn advertised_versions(server: Server) -> Vec<String> {
    let url = server.shared().base_url();
    let mut resp = client::agent()
        .get(format!("{url}/_matrix/client/versions"))
        .call()
        .expect("versions");
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().expect("body"))
        .expect("JSON versions");
    body["versions"]
        .as_array()
        .expect("a versions list")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn versions_include_v1_11_on_synapse() {
    let versions = advertised_versions(Server::Synapse);
    assert!(versions.iter().any(|v| v == "v1.11"), "{versions:?}");
}

#[test]
fn versions_stop_at_v1_5_on_palpo() {
    let versions = advertised_versions(Server::Palpo);
    assert_eq!(
        versions.last().map(String::as_str),
        Some("v1.5"),
        "{versions:?}"
    );
}

/// `POST /join` with an empty body and no Content-Type, as some clients send it.
fn join_without_content_type(server: Server) -> u16 {
    let url = server.shared().base_url();
    let alice = Account::register(&url, "typeless");
    let bob = Account::register(&url, "host");
    let room = bob.create_room(&[&alice.user_id]);
    let resp = client::agent()
        .post(format!(
            "{url}/_matrix/client/v3/rooms/{}/join",
            encode(&room)
        ))
        .header("Authorization", &format!("Bearer {}", alice.access_token))
        .send_empty()
        .expect("join");
    resp.status().as_u16()
}

#[test]
fn a_post_without_content_type_is_served_on_synapse() {
    assert_eq!(join_without_content_type(Server::Synapse), 200);
}

#[test]
fn a_post_without_content_type_is_bad_json_on_palpo() {
    assert_eq!(join_without_content_type(Server::Palpo), 400);
}

// ---- a burst longer than the timeline, filled from /messages -----------------------------------

/// 25 messages sent while the driver is away, then a restart from its checkpoint: the
/// timeline is limited and the driver fills the gap from `/messages`. Returns the bodies
/// delivered after the restart and the number of gaps reported.
fn burst_after_a_restart(server: Server, page_size: u32) -> (Vec<String>, usize) {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "burst", "writer");
    let first = start(config(&alice, None)).expect("valid config");
    let events = collect_until(&first, WITHIN, |events| {
        matches!(
            events.last().map(|e| &e.kind),
            Some(EventKind::Checkpoint(_))
        )
    });
    let checkpoint = last_checkpoint(&events).expect("a checkpoint");
    first.stop();

    send_all(&bob, &room, &numbered("burst", 25), Duration::ZERO);
    bob.send_text(&room, "last");
    let mut config = config(&alice, Some(checkpoint));
    config.gap_fill = GapFill::default().with_page_size(page_size);
    let second = start(config).expect("valid config");
    let mut after = collect_until(&second, WITHIN, |events| {
        bodies_in(events, &room).iter().any(|b| b == "last")
            && matches!(
                events.last().map(|e| &e.kind),
                Some(EventKind::Checkpoint(_))
            )
    });
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Ok(event) = second.events().recv_deadline(quiet) {
        after.push(event);
    }
    second.stop();
    let bodies = bodies_in(&after, &room);
    eprintln!(
        "{server}, pages of {page_size}: {} gaps, bodies {bodies:?}",
        gaps(&after)
    );
    (bodies, gaps(&after))
}

fn burst_bodies(older: impl Iterator<Item = usize>) -> Vec<String> {
    older.map(|i| format!("burst {i}")).collect()
}

/// What the sync timeline itself carries after the burst: the last ten events on palpo,
/// which ignores the filter's limit (on Synapse the limit of 5 holds, and the gap fill
/// brings the rest).
fn palpo_timeline_part() -> Vec<String> {
    let mut part = burst_bodies(17..25);
    part.push("last".to_owned());
    part
}

#[test]
fn a_burst_longer_than_the_timeline_is_filled_in_order_on_synapse() {
    let (bodies, gaps) = burst_after_a_restart(Server::Synapse, 100);
    let mut expected = burst_bodies(0..25);
    expected.push("last".to_owned());
    assert_eq!((bodies, gaps), (expected, 0));
}

/// palpo answers `/messages?dir=b` oldest first; the gap filler sees a page's timestamps
/// going up and takes it newest first, as the specification has pages: the filled part comes
/// in order. Nothing is lost or duplicated (the fill fits one page).
#[test]
fn a_burst_longer_than_the_timeline_is_filled_whole_and_in_order_on_palpo() {
    let (bodies, gaps) = burst_after_a_restart(Server::Palpo, 100);
    let mut expected = burst_bodies(0..17);
    expected.extend(palpo_timeline_part());
    assert_eq!((bodies, gaps), (expected, 0));
}

#[test]
fn a_burst_longer_than_a_page_is_filled_in_order_on_synapse() {
    let (bodies, gaps) = burst_after_a_restart(Server::Synapse, 5);
    let mut expected = burst_bodies(0..25);
    expected.push("last".to_owned());
    assert_eq!((bodies, gaps), (expected, 0));
}

/// palpo's first page backwards ends where it started (`end` == `from`): it will not page
/// on. After that full page the gap filler stops and reports the older messages as a `Gap`
/// (with the tokens to fetch them), so nothing is lost silently.
#[test]
fn a_burst_longer_than_a_page_reports_the_older_messages_as_a_gap_on_palpo() {
    let (bodies, gaps) = burst_after_a_restart(Server::Palpo, 5);
    let mut expected = burst_bodies(12..17);
    expected.extend(palpo_timeline_part());
    assert_eq!((bodies, gaps), (expected, 1));
}

// ---- /messages, asked directly -------------------------------------------------------------------

/// Two pages of `/messages?dir=b&limit=3` from the newest event of a room holding
/// `page 0` .. `page 8`: each page's bodies, `start` and `end`.
fn two_pages_backwards(server: Server) -> Vec<(Vec<String>, Value, Value)> {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "pager", "writer");
    send_all(&bob, &room, &numbered("page", 9), Duration::ZERO);
    let mut pages = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..2 {
        let mut path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=3",
            encode(&room)
        );
        if let Some(from) = &from {
            path.push_str(&format!("&from={}", encode(from)));
        }
        let (status, body) = alice.get_json(&path);
        assert_eq!(status, 200, "{body}");
        let bodies = body["chunk"]
            .as_array()
            .expect("a chunk")
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect();
        from = body["end"].as_str().map(str::to_owned);
        pages.push((bodies, body["start"].clone(), body["end"].clone()));
    }
    eprintln!("{server}: {pages:?}");
    pages
}

fn page_bodies(numbers: [usize; 3]) -> Vec<String> {
    numbers.iter().map(|i| format!("page {i}")).collect()
}

#[test]
fn messages_pages_backwards_newest_first_on_synapse() {
    let pages = two_pages_backwards(Server::Synapse);
    assert_eq!(pages[0].0, page_bodies([8, 7, 6]));
    assert_eq!(pages[1].0, page_bodies([5, 4, 3]));
    assert_eq!(pages[1].1, pages[0].2, "a page starts where the last ended");
    assert_ne!(pages[1].2, pages[1].1, "and ends elsewhere");
}

#[test]
fn messages_pages_oldest_first_and_never_advance_on_palpo() {
    let pages = two_pages_backwards(Server::Palpo);
    assert_eq!(pages[0].0, page_bodies([6, 7, 8]));
    assert_eq!(pages[1].0, page_bodies([6, 7, 8]), "the same page again");
    assert_eq!(pages[1].1, pages[0].2);
    assert_eq!(pages[1].2, pages[1].1, "`end` is `from`: no progress");
    // Tokens are short decimal stream positions; without `from`, `start` is i64::MAX.
    assert_eq!(pages[0].1, json!(i64::MAX.to_string()));
    let end = pages[0].2.as_str().expect("an end");
    assert!(
        end.len() < 20 && end.bytes().all(|b| b.is_ascii_digit()),
        "{end}"
    );
}

// ---- to-device messages reach the driver --------------------------------------------------------

/// Three to-device messages from bob to alice's device; the pings the driver handed on.
fn to_device_pings(server: Server) -> Vec<i64> {
    let url = server.shared().base_url();
    let (alice, bob, _room) = room_of_two(&url, "device", "writer");
    let service = start(config(&alice, None)).expect("valid config");
    drain_until_live(&service);
    for i in 0..3 {
        bob.send_to_device(
            "org.example.ping",
            &alice.user_id,
            &alice.device_id,
            &json!({"n": i}),
        );
    }
    let pings = |events: &[Event]| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.kind == EventKind::ToDevice)
            .filter_map(|e| serde_json::from_str::<Value>(e.raw.get()).ok())
            .filter(|raw| raw["type"] == "org.example.ping")
            .filter_map(|raw| raw["content"]["n"].as_i64())
            .collect()
    };
    let mut events = collect_until(&service, WITHIN, |events| pings(events).len() >= 3);
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Ok(event) = service.events().recv_deadline(quiet) {
        events.push(event);
    }
    service.stop();
    pings(&events)
}

#[test]
fn to_device_messages_arrive_once_on_synapse() {
    assert_eq!(to_device_pings(Server::Synapse), [0, 1, 2]);
}

/// palpo may hand a to-device message out again in a later batch, after the client moved
/// past it (seen once: `[0, 1, 2, 1, 2]`); to-device messages carry no id to deduplicate by,
/// so they reach the consumer as the server sends them: every one, in order of first
/// arrival, at least once.
#[test]
fn to_device_messages_arrive_in_order_at_least_once_on_palpo() {
    let pings = to_device_pings(Server::Palpo);
    let mut first_seen: Vec<i64> = Vec::new();
    for n in &pings {
        if !first_seen.contains(n) {
            first_seen.push(*n);
        }
    }
    assert_eq!(first_seen, [0, 1, 2], "{pings:?}");
    assert!(pings.len() <= 9, "a bounded repeat, not a loop: {pings:?}");
}

// ---- sliding sync ----------------------------------------------------------------------------------

fn sliding_sync_answer(server: Server) -> (u16, Value) {
    let url = server.shared().base_url();
    let alice = Account::register(&url, "slider");
    alice.post_json(
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        &json!({"lists": {"all": {
            "ranges": [[0, 10]], "timeline_limit": 1, "required_state": [],
        }}}),
    )
}

#[test]
fn sliding_sync_answers_on_synapse() {
    let (status, body) = sliding_sync_answer(Server::Synapse);
    assert_eq!(status, 200, "{body}");
    assert!(body["pos"].is_string(), "{body}");
}

/// palpo 0.0.2 refuses an authenticated simplified sliding sync request as unauthenticated.
#[test]
fn sliding_sync_errors_on_palpo() {
    let (status, body) = sliding_sync_answer(Server::Palpo);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
}

/// With [`Protocol::Auto`] the driver asks `/versions` which protocol the server offers, then
/// receives a second user's messages through it, in order and once. Returns whether the
/// checkpoints were sliding sync positions.
fn auto_protocol(server: Server) -> bool {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "auto", "writer");
    let mut config = config(&alice, None);
    config.protocol = Protocol::Auto;
    let service = start(config).expect("valid config");
    drain_until_live(&service);
    let sent = numbered("auto", 4);
    send_all(&bob, &room, &sent, Duration::from_millis(100));
    let events = collect_messages(&service, &room, sent.len());
    service.stop();
    let checkpoint = last_checkpoint(&events).expect("a checkpoint after the messages");
    assert_eq!(bodies_in(&events, &room), sent, "on {server}");
    SlidingPosition::from_token(&checkpoint).is_some()
}

/// Synapse lists `org.matrix.simplified_msc3575` in `/versions`: `Auto` syncs by sliding sync.
#[test]
fn auto_protocol_picks_sliding_sync_on_synapse() {
    assert!(
        auto_protocol(Server::Synapse),
        "the checkpoints are sliding sync positions"
    );
}

/// palpo 0.0.2 does not offer sliding sync in `/versions` (its endpoint answers 400, above):
/// `Auto` stays on `/v3/sync`.
#[test]
fn auto_protocol_stays_on_v3_sync_on_palpo() {
    assert!(
        !auto_protocol(Server::Palpo),
        "the checkpoints are /v3/sync tokens"
    );
}

// ---- resuming from a token the server never issued -------------------------------------------

/// The driver resumes from a `since` the server never issued (`not-a-token`), in a room that
/// already holds a message. Returns, after 6 s, the errors the driver reported (as text) and
/// the bodies it delivered.
fn resume_from_a_garbage_since(server: Server) -> (Vec<String>, Vec<String>) {
    let url = server.shared().base_url();
    let (alice, bob, room) = room_of_two(&url, "foreign", "writer");
    bob.send_text(&room, "history");
    let service = start(config(&alice, Some("not-a-token".to_owned()))).expect("valid config");
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut events = Vec::new();
    while let Ok(event) = service.events().recv_deadline(deadline) {
        events.push(event);
    }
    let mut errors = Vec::new();
    while let Ok(error) = service.errors().try_recv() {
        errors.push(error.to_string());
    }
    service.stop();
    eprintln!("{server}: errors {errors:?}");
    (errors, bodies_in(&events, &room))
}

/// Synapse refuses the token (400): the driver reports it as needing the user, delivers
/// nothing, and waits at the maximum backoff.
#[test]
fn a_garbage_since_in_the_driver_is_refused_on_synapse() {
    let (errors, bodies) = resume_from_a_garbage_since(Server::Synapse);
    assert!(!errors.is_empty(), "no error reported");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("sync") && e.contains("400") && e.contains("NeedsUser")),
        "{errors:?}"
    );
    assert!(bodies.is_empty(), "{bodies:?}");
}

/// palpo answers as to an initial sync, with a limited timeline: the driver fills the gap
/// down to `not-a-token`, which palpo's `/messages` refuses (400 `M_UNKNOWN`); the room's
/// history is then delivered as new events. The driver cannot tell it was reset.
#[test]
fn a_garbage_since_in_the_driver_replays_history_on_palpo() {
    let (errors, bodies) = resume_from_a_garbage_since(Server::Palpo);
    assert!(!errors.is_empty(), "no error reported");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("messages") && e.contains("400 M_UNKNOWN")),
        "{errors:?}"
    );
    assert_eq!(bodies, ["history"]);
}

// ---- refreshable access tokens ---------------------------------------------------------------

#[test]
fn a_refresh_token_is_issued_when_asked_and_refreshes_on_synapse() {
    let url = Server::Synapse.shared().base_url();
    let alice = Account::register_refreshable(&url, "refresher");
    assert!(alice.refresh_token.is_some());
    assert_eq!(alice.refresh_json().0, 200);
}

/// palpo ignores `"refresh_token": true` and has no `/refresh`: its tokens never expire, so
/// the driver never needs to refresh one there.
#[test]
fn no_refresh_token_is_issued_and_refresh_is_unrecognized_on_palpo() {
    let url = Server::Palpo.shared().base_url();
    let alice = Account::register_refreshable(&url, "refresher");
    assert_eq!(alice.refresh_token, None);
    assert_eq!(alice.expires_in_ms, None);
    let (status, body) =
        alice.post_json("/_matrix/client/v3/refresh", &json!({"refresh_token": "x"}));
    assert_eq!(
        (status, body["errcode"].as_str()),
        (405, Some("M_UNRECOGNIZED")),
        "{body}"
    );
}
