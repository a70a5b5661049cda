//! Simplified sliding sync (MSC4186) against a real Synapse, through the driver: messages,
//! edits, reactions, typing and receipts arrive once and in order; a restart from the stored
//! checkpoint (the pair of `pos` and to-device cursor) loses and duplicates nothing, a room
//! whose timeline comes back `limited` after it is filled from `/messages`; a
//! connection deleted in Synapse's database (`M_UNKNOWN_POS`), one expired by Synapse's two
//! expiry rules (unused for 7 days; idle over an hour with more than 100 rooms updated) and a
//! malformed `pos` (`M_UNKNOWN` "Invalid stream token") each reset once, and the sync goes on.

mod support;

use std::time::Duration;

use matrix_sync_service::sliding::{ResetReason, SlidingPosition};
use matrix_sync_service::{
    start, start_with, Config, DriverConfig, Event, EventKind, Protocol, SyncService, SyncState,
};
use matrix_sync_testkit::parallel::parallel;
use matrix_sync_testkit::synapse_db;
use serde_json::json;
use support::client::{room_of_two, Account};
use support::service::{bodies_in, collect_until, config_for, drain_until_live, time_to_close};
use support::synapse::Synapse;

fn sliding_config(account: &Account) -> Config {
    let mut config = config_for(account);
    config.protocol = Protocol::SlidingSync;
    config.long_poll_timeout = Duration::from_secs(2);
    config
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} {i}")).collect()
}

fn count_id(events: &[Event], id: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event_id.as_ref().is_some_and(|e| e.as_str() == id))
        .count()
}

fn resets(events: &[Event]) -> Vec<ResetReason> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ConnectionReset(reset) => Some(reset.reason),
            _ => None,
        })
        .collect()
}

/// Receives events until a checkpoint after everything `done` waits for.
fn collect_to_checkpoint(
    service: &SyncService,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = false;
    collect_until(service, Duration::from_secs(60), |events| {
        seen = seen || done(events);
        seen && matches!(
            events.last().map(|e| &e.kind),
            Some(EventKind::Checkpoint(_))
        )
    })
}

fn last_position(events: &[Event]) -> SlidingPosition {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::Checkpoint(c) => c.sliding_position(),
            _ => None,
        })
        .expect("a sliding sync checkpoint")
}

#[test]
fn messages_edits_reactions_typing_and_receipts_arrive_once_and_in_order() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "slider", "sender");
    let service = start(sliding_config(&alice)).expect("valid config");
    drain_until_live(&service);

    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(bob.send_text(&room, &format!("sliding {i}")));
    }
    let edit = bob.send_edit(&room, &ids[3], "sliding 3, edited");
    let reaction = bob.send_reaction(&room, &ids[5], "👍");
    bob.receipt(&room, &ids[29]);
    bob.typing(&room, true);

    let events = collect_to_checkpoint(&service, |events| {
        let typing = events
            .iter()
            .any(|e| e.kind == EventKind::Typing && e.raw.get().contains(bob.user_id.as_str()));
        let receipt = events
            .iter()
            .any(|e| e.kind == EventKind::Receipt && e.raw.get().contains(ids[29].as_str()));
        count_id(events, &reaction) > 0 && typing && receipt
    });
    let mut expected = numbered("sliding", 0..30);
    expected.push("* sliding 3, edited".to_owned());
    assert_eq!(bodies_in(&events, &room), expected, "once, in order");
    for id in ids.iter().chain([&edit, &reaction]) {
        assert_eq!(count_id(&events, id), 1, "{id} once");
    }
    let edit_event = events
        .iter()
        .find(|e| e.event_id.as_ref().is_some_and(|i| i.as_str() == edit))
        .unwrap();
    assert_eq!(edit_event.relation.as_ref().unwrap().rel_type, "m.replace");
    let reaction_event = events
        .iter()
        .find(|e| e.event_id.as_ref().is_some_and(|i| i.as_str() == reaction))
        .unwrap();
    assert_eq!(reaction_event.kind, EventKind::Reaction);
    assert_eq!(
        reaction_event.relation.as_ref().unwrap().key.as_deref(),
        Some("👍")
    );
    let receipt = events
        .iter()
        .find(|e| e.kind == EventKind::Receipt)
        .unwrap();
    assert_eq!(receipt.room_id.as_ref().unwrap().as_str(), room);
    assert!(resets(&events).is_empty());
    assert!(
        events.iter().all(|e| !matches!(e.kind, EventKind::Gap(_))),
        "no gap with a timeline of 50"
    );
    assert!(time_to_close(&service) < Duration::from_secs(2));
}

#[test]
fn a_restart_from_the_stored_pair_loses_and_duplicates_nothing_to_device_included() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "restarter", "sender");
    let service = start(sliding_config(&alice)).expect("valid config");
    drain_until_live(&service);
    for i in 0..10 {
        bob.send_text(&room, &format!("before {i}"));
    }
    bob.send_to_device("m.test", &alice.user_id, &alice.device_id, &json!({"n": 1}));
    let first = collect_to_checkpoint(&service, |events| {
        bodies_in(events, &room).len() >= 10 && events.iter().any(|e| e.kind == EventKind::ToDevice)
    });
    assert_eq!(bodies_in(&first, &room), numbered("before", 0..10));
    let stored = last_position(&first);
    assert!(
        stored.pos.is_some() && stored.to_device_since.is_some(),
        "{stored:?}"
    );
    assert!(time_to_close(&service) < Duration::from_secs(2));

    // Offline: more messages and a second to-device message.
    for i in 0..10 {
        bob.send_text(&room, &format!("after {i}"));
    }
    bob.send_to_device("m.test", &alice.user_id, &alice.device_id, &json!({"n": 2}));

    let mut config = sliding_config(&alice);
    config.since = Some(stored.to_token());
    let service = start(config).expect("valid config");
    let second = collect_to_checkpoint(&service, |events| {
        bodies_in(events, &room).len() >= 10 && events.iter().any(|e| e.kind == EventKind::ToDevice)
    });
    assert_eq!(
        bodies_in(&second, &room),
        numbered("after", 0..10),
        "nothing lost, nothing from before the checkpoint again"
    );
    let to_device: Vec<&str> = second
        .iter()
        .filter(|e| e.kind == EventKind::ToDevice)
        .map(|e| e.raw.get())
        .collect();
    assert_eq!(to_device.len(), 1, "{to_device:?}");
    assert!(to_device[0].contains(r#""n":2"#), "{to_device:?}");
    assert!(resets(&second).is_empty());
    assert!(time_to_close(&service) < Duration::from_secs(2));
}

#[test]
fn a_limited_timeline_after_a_restart_is_filled_from_messages_in_order() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "filled", "chatty");
    let mut config = sliding_config(&alice);
    config.sliding_sync.timeline_limit = 3;
    config.gap_fill = config.gap_fill.with_page_size(4);
    let service = start(config.clone()).expect("valid config");
    drain_until_live(&service);
    bob.send_text(&room, "before");
    let first = collect_to_checkpoint(&service, |events| {
        bodies_in(events, &room).contains(&"before".to_owned())
    });
    let stored = last_position(&first);
    assert!(time_to_close(&service) < Duration::from_secs(2));

    // Offline: four timelines' worth.
    for i in 0..12 {
        bob.send_text(&room, &format!("offline {i}"));
    }
    config.since = Some(stored.to_token());
    let service = start(config).expect("valid config");
    let second = collect_to_checkpoint(&service, |events| bodies_in(events, &room).len() >= 12);
    assert_eq!(
        bodies_in(&second, &room),
        numbered("offline", 0..12),
        "the nine before the timeline fetched, in order, before it"
    );
    assert!(
        second.iter().all(|e| !matches!(e.kind, EventKind::Gap(_))),
        "no gap left"
    );
    assert!(resets(&second).is_empty());
    assert!(time_to_close(&service) < Duration::from_secs(2));
}

#[test]
fn a_connection_deleted_in_synapse_resets_once_and_the_sync_goes_on() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "forgotten", "sender");
    let service = start(sliding_config(&alice)).expect("valid config");
    drain_until_live(&service);
    for i in 0..5 {
        bob.send_text(&room, &format!("kept {i}"));
    }
    let first = collect_to_checkpoint(&service, |events| bodies_in(events, &room).len() >= 5);
    assert_eq!(bodies_in(&first, &room), numbered("kept", 0..5));

    let (_, deleted) = matrix_sync_testkit::synapse_db::execute(
        synapse,
        "DELETE FROM sliding_sync_connections WHERE user_id = ?",
        &[json!(alice.user_id)],
    );
    assert!(deleted >= 1, "the connection was in the database");
    // Synapse 1.163 caches the position it read (`get_and_clear_connection_positions` is
    // `@cached`), and echoes it while the connection's state does not change: the deletion
    // shows when the connection next records new state, such as a room entering the list
    // (an invitation), where it looks the connection up again and finds it gone.
    reset_once_behind_an_invitation(&service, &bob, &alice, &room, "lost?");
    the_sync_goes_on(&service, &bob, &room, Acks::None);
}

/// Invites `alice` to a new room (so that her connection records new state, where Synapse
/// looks it up again) and sends five messages `"{prefix} {i}"` to `room`; asserts that the
/// driver reports exactly one `M_UNKNOWN_POS` reset and the fresh connection delivers the
/// five once, in order, and nothing delivered before.
fn reset_once_behind_an_invitation(
    service: &SyncService,
    bob: &Account,
    alice: &Account,
    room: &str,
    prefix: &str,
) {
    bob.create_room(&[&alice.user_id]);
    for i in 0..5 {
        bob.send_text(room, &format!("{prefix} {i}"));
    }
    let after = collect_to_checkpoint(service, |events| {
        !resets(events).is_empty() && bodies_in(events, room).len() >= 5
    });
    assert_eq!(resets(&after), [ResetReason::UnknownPos], "once");
    assert_eq!(
        bodies_in(&after, room),
        numbered(prefix, 0..5),
        "the fresh connection delivers what was missed, once, in order, and nothing before it"
    );
}

/// How the test's driver wants its checkpoints acknowledged.
enum Acks {
    /// Not at all (`acknowledge_checkpoints` off).
    None,
    /// Each, as it arrives.
    Each,
}

/// After a reset the sync goes on: a new message arrives on the new connection, with no other
/// reset, and the service stops at once.
fn the_sync_goes_on(service: &SyncService, bob: &Account, room: &str, acks: Acks) {
    bob.send_text(room, "on the new connection");
    let arrived = |events: &[Event]| !bodies_in(events, room).is_empty();
    let later = match acks {
        Acks::None => collect_to_checkpoint(service, arrived),
        Acks::Each => collect_acking(service, false, arrived),
    };
    assert_eq!(bodies_in(&later, room), ["on the new connection"]);
    assert!(resets(&later).is_empty());
    assert!(time_to_close(service) < Duration::from_secs(2));
}

/// How many of `user_id`'s sliding sync connections Synapse's database holds.
fn connections_of(synapse: &Synapse, user_id: &str) -> u64 {
    let (rows, _) = synapse_db::execute(
        synapse,
        "SELECT count(*) FROM sliding_sync_connections WHERE user_id = ?",
        &[json!(user_id)],
    );
    rows[0][0].as_u64().expect("a count")
}

/// Synapse expires a connection unused for 7 days (`CONNECTION_EXPIRY`): a background sweep,
/// `delete_old_sliding_sync_connections` (`storage/databases/main/sliding_sync.py`), deletes
/// every `sliding_sync_connections` row whose `last_used_ts` is older than now minus 7 days.
/// No request checks the 7 days: a request only refreshes `last_used_ts` (on the first read of
/// a position, if over 5 minutes old). The sweep runs every hour, first an hour after Synapse started
/// (`clock.looping_call`, which waits before its first call), and no API starts it, so the test
/// runs Synapse's own statement with Synapse's own constant at once
/// ([`synapse_db::sweep_expired_sliding_sync_connections`]) instead of waiting up to an hour.
/// The connection's age is set in the column the sweep compares: 7 days less an hour keeps it,
/// 7 days and an hour expires it.
#[test]
fn a_connection_unused_for_seven_days_is_expired_by_synapse_and_resets_once() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "weekold", "sender");
    let service = start(sliding_config(&alice)).expect("valid config");
    drain_until_live(&service);
    for i in 0..5 {
        bob.send_text(&room, &format!("kept {i}"));
    }
    let first = collect_to_checkpoint(&service, |events| bodies_in(events, &room).len() >= 5);
    assert_eq!(bodies_in(&first, &room), numbered("kept", 0..5));
    assert_eq!(connections_of(synapse, &alice.user_id), 1);

    const HOUR: Duration = Duration::from_secs(3600);
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    let changed = synapse_db::set_sliding_sync_last_used(synapse, &alice.user_id, WEEK - HOUR);
    assert_eq!(changed, 1);
    let sweep = synapse_db::sweep_expired_sliding_sync_connections(synapse);
    assert_eq!(
        sweep.expiry_ms,
        WEEK.as_millis() as u64,
        "Synapse's CONNECTION_EXPIRY"
    );
    assert_eq!(
        connections_of(synapse, &alice.user_id),
        1,
        "unused for less than 7 days: kept"
    );
    let changed = synapse_db::set_sliding_sync_last_used(synapse, &alice.user_id, WEEK + HOUR);
    assert_eq!(changed, 1);
    let sweep = synapse_db::sweep_expired_sliding_sync_connections(synapse);
    assert!(sweep.deleted >= 1, "{sweep:?}");
    assert_eq!(
        connections_of(synapse, &alice.user_id),
        0,
        "unused for more than 7 days: expired"
    );

    // The expiry shows when the connection next records new state (Synapse answers a
    // position it read already from its cache): a room entering the list.
    reset_once_behind_an_invitation(&service, &bob, &alice, &room, "missed");
    assert_eq!(
        connections_of(synapse, &alice.user_id),
        1,
        "a new connection"
    );
    the_sync_goes_on(&service, &bob, &room, Acks::None);
}

/// Synapse 1.163's `NUM_ROOMS_THRESHOLD` (`handlers/sliding_sync/room_lists.py`).
const NUM_ROOMS_THRESHOLD: usize = 100;

/// Receives events, acknowledging each checkpoint (the driver runs with
/// `acknowledge_checkpoints`), until `done` holds at a checkpoint. With `hold`, that last
/// checkpoint is left unacknowledged: the driver then sends nothing until
/// `checkpoint_stored`.
fn collect_acking(
    service: &SyncService,
    hold: bool,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = false;
    let mut finished = false;
    let events = collect_until(service, Duration::from_secs(120), |events| {
        if let Some(EventKind::Checkpoint(_)) = events.last().map(|e| &e.kind) {
            seen = seen || done(events);
            finished = seen;
            if !(finished && hold) {
                service.checkpoint_stored().expect("the service runs");
            }
        }
        finished
    });
    events
}

/// [`drain_until_live`], acknowledging checkpoints.
fn drain_acking_until_live(service: &SyncService) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut checkpoint = false;
    while !(checkpoint && service.state() == SyncState::Live) {
        assert!(
            std::time::Instant::now() < deadline,
            "not live within 120 s (checkpoint seen: {checkpoint}, state {:?})",
            service.state()
        );
        match service.events().recv_timeout(Duration::from_millis(20)) {
            Ok(event) if matches!(&event.kind, EventKind::Checkpoint(_)) => {
                checkpoint = true;
                service.checkpoint_stored().expect("the service runs");
            }
            Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("events ended before the service was live: {e}"),
        }
    }
}

/// The connection position (the part of `pos` before the `/`) of the last checkpoint.
fn connection_position(events: &[Event]) -> String {
    let pos = last_position(events).pos.expect("a pos");
    pos.split('/').next().unwrap().to_owned()
}

/// Synapse's other expiry (`_filter_relevant_rooms_to_send` in
/// `handlers/sliding_sync/room_lists.py`): on a request with a `pos`, if more than
/// `NUM_ROOMS_THRESHOLD` (100) rooms of the request's windows and subscriptions had events
/// since that position and the connection's `last_used_ts` (as read with the position) is over
/// `MINIMUM_NOT_USED_AGE_EXPIRY` (1 hour) old, it answers `M_UNKNOWN_POS` rather than sending
/// them all. Both inputs are set: the user's window covers 101 rooms with a message each since
/// the position, and `last_used_ts` is set two hours back while the driver holds a position
/// Synapse has not read yet (Synapse caches a position it read, `last_used_ts` included, and
/// the first read of a position refreshes the column), so that the held request is the first
/// to read it.
#[test]
fn a_connection_idle_over_an_hour_with_over_a_hundred_rooms_updated_resets_once() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "busy", "sender");
    let busy: Vec<String> = parallel(NUM_ROOMS_THRESHOLD + 1, 4, |_| alice.create_room(&[]));
    let mut driver = DriverConfig::default();
    driver.acknowledge_checkpoints = true;
    let service = start_with(sliding_config(&alice), driver).expect("valid config");
    drain_acking_until_live(&service);
    for i in 0..5 {
        bob.send_text(&room, &format!("kept {i}"));
    }
    let first = collect_acking(&service, false, |events| {
        bodies_in(events, &room).len() >= 5
    });
    assert_eq!(bodies_in(&first, &room), numbered("kept", 0..5));
    let before = connection_position(&first);

    // A room entering the list makes a new connection position; the driver holds it.
    let invited = bob.create_room(&[&alice.user_id]);
    let held = collect_acking(&service, true, |events| {
        events.iter().any(|e| {
            e.kind == EventKind::Invite && e.room_id.as_ref().is_some_and(|r| r.as_str() == invited)
        })
    });
    assert!(resets(&held).is_empty());
    assert_ne!(
        connection_position(&held),
        before,
        "the invitation made a new position, which Synapse has not read yet"
    );

    // While the driver holds: unused for two hours, and an update in more than 100 rooms of
    // its window (the range grew to cover all 103 rooms while catching up).
    let changed =
        synapse_db::set_sliding_sync_last_used(synapse, &alice.user_id, Duration::from_secs(7200));
    assert_eq!(changed, 1);
    parallel(busy.len(), 4, |i| alice.send_text(&busy[i], "busy"));
    for i in 0..5 {
        bob.send_text(&room, &format!("missed {i}"));
    }
    service.checkpoint_stored().expect("the service runs");

    let busy_bodies = |events: &[Event]| {
        events
            .iter()
            .filter(|e| e.kind == EventKind::Message && e.body.as_deref() == Some("busy"))
            .count()
    };
    let after = collect_acking(&service, false, |events| {
        !resets(events).is_empty()
            && bodies_in(events, &room).len() >= 5
            && busy_bodies(events) >= busy.len()
    });
    assert_eq!(resets(&after), [ResetReason::UnknownPos], "once");
    assert!(
        matches!(after[0].kind, EventKind::ConnectionReset(_)),
        "the held request was the one refused: {:?}",
        after[0].kind
    );
    assert_eq!(
        bodies_in(&after, &room),
        numbered("missed", 0..5),
        "the fresh connection delivers what was missed, once, in order, and nothing before it"
    );
    for id in &busy {
        assert_eq!(bodies_in(&after, id), ["busy"], "{id}: once");
    }
    the_sync_goes_on(&service, &bob, &room, Acks::Each);
}

#[test]
fn a_malformed_pos_is_refused_by_synapse_and_resets_once() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "garbled", "sender");
    bob.send_text(&room, "already there");
    let mut config = sliding_config(&alice);
    config.since = Some(
        SlidingPosition {
            pos: Some("garbage".to_owned()),
            to_device_since: None,
        }
        .to_token(),
    );
    let service = start(config).expect("valid config");
    let events = collect_to_checkpoint(&service, |events| {
        bodies_in(events, &room) == ["already there"]
    });
    assert_eq!(resets(&events), [ResetReason::InvalidPos]);
    assert!(matches!(events[0].kind, EventKind::ConnectionReset(_)));
    bob.send_text(&room, "and then");
    let later = collect_to_checkpoint(&service, |events| !bodies_in(events, &room).is_empty());
    assert_eq!(bodies_in(&later, &room), ["and then"]);
    assert!(resets(&later).is_empty());
    assert!(time_to_close(&service) < Duration::from_secs(2));
}

#[test]
fn auto_chooses_sliding_sync_on_synapse() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "auto", "sender");
    let mut config = config_for(&alice);
    config.protocol = Protocol::Auto;
    config.long_poll_timeout = Duration::from_secs(2);
    let service = start(config).expect("valid config");
    bob.send_text(&room, "chosen");
    let events = collect_to_checkpoint(&service, |events| bodies_in(events, &room) == ["chosen"]);
    let checkpoint = events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::Checkpoint(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        checkpoint.sliding_position().is_some(),
        "Synapse offers simplified sliding sync by default: {checkpoint:?}"
    );
    assert!(time_to_close(&service) < Duration::from_secs(2));
}

/// The many-account reactor drives sliding sync machines too: two accounts, each on its own
/// connection, each gets its room's messages once and in order.
#[cfg(feature = "reactor")]
#[test]
fn the_reactor_syncs_two_accounts_with_sliding_sync() {
    use matrix_sync_service::reactor::{self, ReactorConfig};

    let synapse = Synapse::shared();
    let (alice, bob, room_a) = room_of_two(&synapse.base_url(), "reactor-a", "sender");
    let (carol, dave, room_c) = room_of_two(&synapse.base_url(), "reactor-c", "sender");
    let reactor = reactor::start(ReactorConfig::new()).expect("the reactor starts");
    reactor
        .add("alice".to_owned(), sliding_config(&alice))
        .unwrap();
    reactor
        .add("carol".to_owned(), sliding_config(&carol))
        .unwrap();
    for i in 0..10 {
        bob.send_text(&room_a, &format!("to alice {i}"));
        dave.send_text(&room_c, &format!("to carol {i}"));
    }
    let mut per_account: std::collections::BTreeMap<String, Vec<Event>> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while per_account
        .get("alice")
        .map_or(0, |e| bodies_in(e, &room_a).len())
        < 10
        || per_account
            .get("carol")
            .map_or(0, |e| bodies_in(e, &room_c).len())
            < 10
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let tagged = reactor
            .events()
            .recv_timeout(left)
            .expect("both accounts' messages within 60 s");
        per_account
            .entry(tagged.account)
            .or_default()
            .push(tagged.event);
    }
    assert_eq!(
        bodies_in(&per_account["alice"], &room_a),
        numbered("to alice", 0..10)
    );
    assert_eq!(
        bodies_in(&per_account["carol"], &room_c),
        numbered("to carol", 0..10)
    );
    for events in per_account.values() {
        let checkpoint = events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::Checkpoint(c) => Some(c.clone()),
                _ => None,
            })
            .expect("a checkpoint");
        assert!(checkpoint.sliding_position().is_some(), "{checkpoint:?}");
    }
    reactor.stop();
    reactor.join().unwrap();
}

/// With the user's id configured, a room the user left and one the user was removed from each
/// end with a `Leave` marker right after the membership event that took the user out, as in
/// `/v3/sync`; the room the user is still in has none.
#[test]
fn a_room_left_and_a_room_kicked_from_each_end_with_a_leave_marker() {
    let synapse = Synapse::shared();
    let base = synapse.base_url();
    let (alice, bob, left) = room_of_two(&base, "leaver", "host");
    let kicked = bob.create_room(&[alice.user_id.as_str()]);
    alice.join(&kicked);
    let stays = bob.create_room(&[alice.user_id.as_str()]);
    alice.join(&stays);
    let mut config = sliding_config(&alice);
    config.sliding_sync.user_id = Some(alice.user_id.as_str().try_into().unwrap());
    let service = start(config).expect("valid config");
    drain_until_live(&service);

    bob.send_text(&left, "before alice leaves");
    alice.leave(&left);
    bob.kick(&kicked, alice.user_id.as_str());
    let marker = bob.send_text(&stays, "after both");
    let events = collect_to_checkpoint(&service, |events| count_id(events, &marker) > 0);
    let in_room = |room: &str| -> Vec<&Event> {
        events
            .iter()
            .filter(|e| e.room_id.as_ref().is_some_and(|r| r.as_str() == room))
            .collect()
    };
    for (room, by) in [(&left, &alice), (&kicked, &bob)] {
        let events = in_room(room);
        let leave = events
            .iter()
            .position(|e| e.kind == EventKind::Leave)
            .unwrap_or_else(|| panic!("{room}: no leave marker in {events:?}"));
        let before = events[leave - 1];
        assert_eq!(
            before.kind,
            EventKind::Member,
            "{room}: the membership event first"
        );
        assert_eq!(
            before.state_key.as_deref(),
            Some(alice.user_id.as_str()),
            "{room}"
        );
        let marker = events[leave];
        assert_eq!(
            marker.sender.as_ref().map(|s| s.as_str()),
            Some(by.user_id.as_str())
        );
        assert_eq!(marker.event_id, None, "the marker has no id of its own");
        assert_eq!(
            events.iter().filter(|e| e.kind == EventKind::Leave).count(),
            1,
            "{room}: one marker"
        );
    }
    assert!(
        in_room(&stays).iter().all(|e| e.kind != EventKind::Leave),
        "no marker where alice stays"
    );
    assert!(time_to_close(&service) < Duration::from_secs(2));
}
