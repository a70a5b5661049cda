//! The blocking driver against a real homeserver, Synapse and palpo: live events, stop, fatal
//! errors, restarts.

mod support;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    start, start_with, BackoffPolicy, DriverConfig, ErrorClass, Event, EventKind, Failure,
    ServiceError, SyncState,
};
use matrix_sync_testkit::homeserver::Server;
use support::client::{room_of_two, Account};
use support::service::{collect_until, config_for, drain_until_live, tail_binary, time_to_close};

fn live_events_arrive_in_order_with_their_fields(server: Server) {
    let homeserver = server.shared();
    let (alice, bob, room) = room_of_two(&homeserver.base_url(), "alice", "bob");
    let doomed = bob.create_room(&[&alice.user_id]);
    alice.join(&doomed);

    let service = start(config_for(&alice)).expect("valid config");
    drain_until_live(&service);

    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(bob.send_text(&room, &format!("message {i}")));
    }
    let edit = bob.send_edit(&room, &sent[0], "message 0, edited");
    let reaction = bob.send_reaction(&room, &sent[1], "👍");
    bob.typing(&room, true);
    bob.receipt(&room, &sent[4]);
    let invite_room = bob.create_room(&[&alice.user_id]);
    bob.kick(&doomed, &alice.user_id);
    bob.send_to_device(
        "org.example.ping",
        &alice.user_id,
        &alice.device_id,
        &serde_json::json!({"n": 1}),
    );
    alice.set_account_data(
        "org.example.settings",
        &serde_json::json!({"theme": "dark"}),
    );

    let has = |events: &[Event], pred: &dyn Fn(&Event) -> bool| events.iter().any(pred);
    let events = collect_until(&service, Duration::from_secs(30), |events| {
        has(events, &|e| {
            e.event_id
                .as_ref()
                .is_some_and(|id| id.as_str() == reaction)
        }) && has(events, &|e| e.kind == EventKind::Typing)
            && has(events, &|e| e.kind == EventKind::Receipt)
            && has(events, &|e| e.kind == EventKind::Invite)
            && has(events, &|e| e.kind == EventKind::Leave)
            && has(events, &|e| e.kind == EventKind::ToDevice)
            && has(events, &|e| {
                e.kind == EventKind::GlobalAccountData && e.event_type == "org.example.settings"
            })
    });

    let messages: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.kind == EventKind::Message && e.room_id.as_ref().is_some_and(|r| r.as_str() == room)
        })
        .collect();
    let ids: Vec<&str> = messages
        .iter()
        .filter_map(|e| e.event_id.as_ref().map(|i| i.as_str()))
        .collect();
    let mut expected: Vec<&str> = sent.iter().map(String::as_str).collect();
    expected.push(&edit);
    assert_eq!(ids, expected, "messages in send order");
    for (i, message) in messages.iter().take(5).enumerate() {
        assert_eq!(message.body, Some(format!("message {i}")));
        assert_eq!(message.sender.as_ref().unwrap().as_str(), bob.user_id);
        let ts = u64::from(message.origin_server_ts.expect("timestamp").0);
        assert!(ts > 1_600_000_000_000, "plausible timestamp {ts}");
    }
    let edit_event = messages[5];
    let relation = edit_event.relation.as_ref().expect("edit relation");
    assert_eq!(
        (relation.rel_type.as_str(), relation.event_id.as_str()),
        ("m.replace", sent[0].as_str())
    );
    let reaction_event = events
        .iter()
        .find(|e| e.kind == EventKind::Reaction)
        .unwrap();
    let relation = reaction_event.relation.as_ref().unwrap();
    assert_eq!(relation.rel_type, "m.annotation");
    assert_eq!(relation.key.as_deref(), Some("👍"));
    let invite = events.iter().find(|e| e.kind == EventKind::Invite).unwrap();
    assert_eq!(invite.room_id.as_ref().unwrap().as_str(), invite_room);
    let leave = events.iter().find(|e| e.kind == EventKind::Leave).unwrap();
    assert_eq!(leave.room_id.as_ref().unwrap().as_str(), doomed);
    let to_device = events
        .iter()
        .find(|e| e.kind == EventKind::ToDevice)
        .unwrap();
    assert_eq!(to_device.event_type, "org.example.ping");
    assert_eq!(to_device.sender.as_ref().unwrap().as_str(), bob.user_id);
    let checkpoints = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Checkpoint(c) if c.live))
        .count();
    assert!(checkpoints >= 1, "live batches end with a live checkpoint");
    assert!(time_to_close(&service) < Duration::from_secs(1));
    service.join().expect("clean end");
}

fn stop_mid_long_poll_closes_both_channels_promptly(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "stopper");
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let service = start(config_for(&alice)).expect("valid config");
        drain_until_live(&service);
        // Now in a 30 s long-poll with nothing to return.
        thread::sleep(Duration::from_millis(150));
        let closed = time_to_close(&service);
        service.join().expect("clean end");
        latencies.push(closed);
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "stop latency over {} stops: median {median:?}, max {max:?}",
        latencies.len()
    );
    assert!(
        max < Duration::from_secs(1),
        "every stop well under a second: {latencies:?}"
    );
}

fn stop_works_while_blocked_on_a_full_events_channel(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "slowreader");
    let room = alice.create_room(&[]);
    for i in 0..10 {
        alice.send_text(&room, &format!("backlog {i}"));
    }
    let mut driver = DriverConfig::new();
    driver.event_channel_capacity = 1;
    let service = start_with(config_for(&alice), driver).expect("valid config");
    // The initial batch has far more than one event: the driver blocks on the full channel.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        service.events().len(),
        1,
        "channel full, nothing lost by skipping"
    );
    assert!(!service.is_finished());
    let closed = time_to_close(&service);
    assert!(closed < Duration::from_secs(1), "stopped in {closed:?}");
    service.join().expect("clean end");
}

fn stop_is_idempotent_from_any_thread_and_dropping_stops(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "idem");
    let service = Arc::new(start(config_for(&alice)).expect("valid config"));
    drain_until_live(&service);
    let other = service.clone();
    thread::spawn(move || other.stop()).join().unwrap();
    service.stop();
    service.stop();
    service.join().expect("clean end");
    assert!(service.is_finished());
    service.stop();
    assert_eq!(service.state(), SyncState::Stopped);
    assert!(service
        .events()
        .recv_timeout(Duration::from_secs(1))
        .is_err());

    let service = start(config_for(&alice)).expect("valid config");
    let events = service.events().clone();
    drain_until_live(&service);
    let started = Instant::now();
    drop(service);
    while events.recv_timeout(Duration::from_secs(5)).is_ok() {}
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop stopped the thread"
    );
}

fn a_logged_out_token_is_fatal_and_retried_at_the_maximum_backoff(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "loggedout");
    let device = alice.new_device();
    let mut config = config_for(&device);
    config.long_poll_timeout = Duration::from_millis(500);
    config.backoff = BackoffPolicy::default().with_max(Duration::from_secs(2));
    let service = start(config).expect("valid config");
    drain_until_live(&service);
    device.logout();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        match service
            .errors()
            .recv_timeout(Duration::from_secs(10))
            .expect("an error report")
        {
            ServiceError::Sync(error) => {
                let Failure::UnknownToken { soft_logout, .. } = &error.failure else {
                    panic!("unexpected failure {error}");
                };
                assert!(!soft_logout);
                assert_eq!(error.class, ErrorClass::NeedsUser);
                assert_eq!(error.failure.errcode(), Some("M_UNKNOWN_TOKEN"));
                assert_eq!(error.delay, Duration::from_secs(2));
                seen.push(Instant::now());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(service.state(), SyncState::Refused);
    assert!(!service.is_finished(), "the service stays alive");
    for pair in seen.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1900),
            "retries no faster than the maximum backoff: {gap:?}"
        );
    }
    assert!(time_to_close(&service) < Duration::from_secs(1));
}

fn recovers_by_itself_after_the_server_restarts(server: Server) {
    let mut homeserver = server.start();
    let (alice, bob, room) = room_of_two(&homeserver.base_url(), "survivor", "talker");
    let mut config = config_for(&alice);
    config.backoff = BackoffPolicy::default().with_max(Duration::from_secs(1));
    let service = start(config).expect("valid config");
    drain_until_live(&service);

    homeserver.kill();
    let error = service
        .errors()
        .recv_timeout(Duration::from_secs(40))
        .expect("a failure while down");
    let ServiceError::Sync(error) = error else {
        panic!("unexpected {error}")
    };
    assert_eq!(error.class, ErrorClass::Transient);
    homeserver.restart();
    let sent = bob.send_text(&room, "after the restart");
    let events = collect_until(&service, Duration::from_secs(60), |events| {
        events
            .iter()
            .any(|e| e.event_id.as_ref().is_some_and(|id| id.as_str() == sent))
    });
    assert!(events
        .iter()
        .any(|e| e.body.as_deref() == Some("after the restart")));
    assert!(time_to_close(&service) < Duration::from_secs(1));
}

fn tail_exits_cleanly_on_sigint_and_sigterm_in_the_middle_of_a_long_poll(server: Server) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "signalled");
    for signal in ["-INT", "-TERM"] {
        let mut child = Command::new(tail_binary())
            .args(["--homeserver", &homeserver.base_url()])
            .env("MATRIX_ACCESS_TOKEN", &alice.access_token)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first_checkpoint =
            lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("\"checkpoint\"")));
        assert!(first_checkpoint.is_some(), "tail printed its first batch");
        thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        let took = started.elapsed();
        eprintln!("tail exit after {signal}: {took:?}");
        assert_eq!(status.code(), Some(0), "{signal}: clean exit");
        assert!(
            took < Duration::from_millis(200),
            "{signal}: exited in {took:?}"
        );
    }
}

#[test]
fn live_events_arrive_in_order_with_their_fields_on_synapse() {
    live_events_arrive_in_order_with_their_fields(Server::Synapse);
}

#[test]
fn live_events_arrive_in_order_with_their_fields_on_palpo() {
    live_events_arrive_in_order_with_their_fields(Server::Palpo);
}

#[test]
fn stop_mid_long_poll_closes_both_channels_promptly_on_synapse() {
    stop_mid_long_poll_closes_both_channels_promptly(Server::Synapse);
}

#[test]
fn stop_mid_long_poll_closes_both_channels_promptly_on_palpo() {
    stop_mid_long_poll_closes_both_channels_promptly(Server::Palpo);
}

#[test]
fn stop_works_while_blocked_on_a_full_events_channel_on_synapse() {
    stop_works_while_blocked_on_a_full_events_channel(Server::Synapse);
}

#[test]
fn stop_works_while_blocked_on_a_full_events_channel_on_palpo() {
    stop_works_while_blocked_on_a_full_events_channel(Server::Palpo);
}

#[test]
fn stop_is_idempotent_from_any_thread_and_dropping_stops_on_synapse() {
    stop_is_idempotent_from_any_thread_and_dropping_stops(Server::Synapse);
}

#[test]
fn stop_is_idempotent_from_any_thread_and_dropping_stops_on_palpo() {
    stop_is_idempotent_from_any_thread_and_dropping_stops(Server::Palpo);
}

#[test]
fn a_logged_out_token_is_fatal_and_retried_at_the_maximum_backoff_on_synapse() {
    a_logged_out_token_is_fatal_and_retried_at_the_maximum_backoff(Server::Synapse);
}

#[test]
fn a_logged_out_token_is_fatal_and_retried_at_the_maximum_backoff_on_palpo() {
    a_logged_out_token_is_fatal_and_retried_at_the_maximum_backoff(Server::Palpo);
}

#[test]
fn recovers_by_itself_after_the_server_restarts_on_synapse() {
    recovers_by_itself_after_the_server_restarts(Server::Synapse);
}

#[test]
fn recovers_by_itself_after_the_server_restarts_on_palpo() {
    recovers_by_itself_after_the_server_restarts(Server::Palpo);
}

#[test]
fn tail_exits_cleanly_on_sigint_and_sigterm_in_the_middle_of_a_long_poll_on_synapse() {
    tail_exits_cleanly_on_sigint_and_sigterm_in_the_middle_of_a_long_poll(Server::Synapse);
}

#[test]
fn tail_exits_cleanly_on_sigint_and_sigterm_in_the_middle_of_a_long_poll_on_palpo() {
    tail_exits_cleanly_on_sigint_and_sigterm_in_the_middle_of_a_long_poll(Server::Palpo);
}
