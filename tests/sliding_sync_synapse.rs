//! Simplified sliding sync (MSC4186) against a real Synapse, through the driver: messages,
//! edits, reactions, typing and receipts arrive once and in order; a restart from the stored
//! checkpoint (the pair of `pos` and to-device cursor) loses and duplicates nothing; a
//! connection deleted in Synapse's database (`M_UNKNOWN_POS`) and a malformed `pos`
//! (`M_UNKNOWN` "Invalid stream token") each reset once, and the sync goes on.

mod support;

use std::time::Duration;

use matrix_sync_service::sliding::{ResetReason, SlidingPosition};
use matrix_sync_service::{start, Config, Event, EventKind, Protocol, SyncService};
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
    bob.create_room(&[&alice.user_id]);
    for i in 0..5 {
        bob.send_text(&room, &format!("lost? {i}"));
    }
    let after = collect_to_checkpoint(&service, |events| {
        !resets(events).is_empty() && bodies_in(events, &room).len() >= 5
    });
    assert_eq!(resets(&after), [ResetReason::UnknownPos], "once");
    assert_eq!(
        bodies_in(&after, &room),
        numbered("lost?", 0..5),
        "the fresh connection delivers what was missed, and not what was delivered before"
    );
    // And it goes on: a new message arrives on the new connection, with no other reset.
    bob.send_text(&room, "on the new connection");
    let later = collect_to_checkpoint(&service, |events| !bodies_in(events, &room).is_empty());
    assert_eq!(bodies_in(&later, &room), ["on the new connection"]);
    assert!(resets(&later).is_empty());
    assert!(time_to_close(&service) < Duration::from_secs(2));
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
