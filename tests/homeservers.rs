//! The same scenarios against both homeservers of the test kit, Synapse and palpo: one
//! `#[test]` per scenario and server, named by both. Where palpo behaves differently, the test
//! asserts what it really does, named by that behaviour (see the README's table of
//! divergences).

mod support;

use std::time::{Duration, Instant};

use matrix_sync_service::{start, Config, Event, EventKind, SyncFilter, SyncService};
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

#[test]
fn a_held_long_poll_wakes_up_within_a_second_on_synapse() {
    let longest = longest_wake_up(Server::Synapse);
    assert!(longest < Duration::from_secs(1), "{longest:?}");
}

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
