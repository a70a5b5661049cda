//! The E2EE stage over sliding sync, against a real Synapse: room keys come through the
//! to-device extension, key counts and device lists through the e2ee extension; encrypted
//! messages decrypt once and in order, across a restart from the stored pair and across a
//! connection reset (the connection deleted in Synapse's database).

mod support;

use std::path::Path;
use std::time::Duration;

use matrix_sync_service::e2ee::Encryption;
use matrix_sync_service::{
    start_encrypted, CryptoStore, DriverConfig, E2eeConfig, Event, EventKind, Protocol, SyncService,
};
use serde_json::json;
use support::client::Account;
use support::e2ee_sender::Sender;
use support::service::{collect_until, config_for, last_checkpoint};
use support::synapse::Synapse;

const WITHIN: Duration = Duration::from_secs(180);

fn start_ours(account: &Account, store: &Path, since: Option<String>) -> SyncService {
    let mut config = config_for(account);
    config.protocol = Protocol::SlidingSync;
    config.long_poll_timeout = Duration::from_secs(2);
    config.since = since;
    let store = CryptoStore::Sqlite {
        dir: store.to_owned(),
        passphrase: Some("a test passphrase".to_owned()),
    };
    start_encrypted(config, DriverConfig::default(), E2eeConfig::new(store))
        .expect("the encrypted service starts")
}

fn decrypted_bodies(events: &[Event], room: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Message)
        .filter(|e| matches!(e.encryption.as_deref(), Some(Encryption::Decrypted(_))))
        .filter(|e| e.room_id.as_ref().is_some_and(|r| r.as_str() == room))
        .filter_map(|e| e.body.clone())
        .collect()
}

fn undecryptable(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Encrypted)
        .count()
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("secret {i}")).collect()
}

fn assert_no_errors(service: &SyncService) {
    if let Ok(error) = service.errors().try_recv() {
        panic!("unexpected error report: {error}");
    }
}

#[test]
fn encrypted_messages_decrypt_over_sliding_sync_across_a_restart_and_a_reset() {
    let server = Synapse::shared();
    let base = server.base_url();
    let ours = Account::register(&base, "slidingbot");
    let alice = Account::register(&base, "alice");
    let store = tempfile::tempdir().unwrap();

    let service = start_ours(&ours, store.path(), None);
    collect_until(&service, WITHIN, |events| last_checkpoint(events).is_some());
    let mut sender = Sender::new(alice.clone());
    let room = sender.encrypted_room_with(&ours);
    let to = [ours.user_id.as_str()];
    for i in 0..20 {
        sender.send_text(&room, &to, &format!("secret {i}"), None);
    }
    let events = collect_until(&service, WITHIN, |events| {
        decrypted_bodies(events, &room).len() >= 20 && last_checkpoint(events).is_some()
    });
    assert_eq!(
        decrypted_bodies(&events, &room),
        numbered(0..20),
        "once, in order"
    );
    assert_eq!(undecryptable(&events), 0);
    assert!(
        events.iter().any(|e| e.kind == EventKind::ToDevice),
        "the room key"
    );
    let events = collect_until(&service, WITHIN, |e| last_checkpoint(e).is_some());
    let stored = last_checkpoint(&events).unwrap();
    assert!(
        matrix_sync_service::SlidingPosition::from_token(&stored).is_some(),
        "{stored}"
    );
    assert_no_errors(&service);
    service.stop();
    service.join().unwrap();

    // A restart from the stored pair, same store: the next messages decrypt.
    let service = start_ours(&ours, store.path(), Some(stored));
    for i in 20..30 {
        sender.send_text(&room, &to, &format!("secret {i}"), None);
    }
    let events = collect_until(&service, WITHIN, |events| {
        decrypted_bodies(events, &room).len() >= 10
    });
    assert_eq!(decrypted_bodies(&events, &room), numbered(20..30));
    assert_eq!(undecryptable(&events), 0);

    // The connection deleted in Synapse's database; a room entering the list makes Synapse
    // look it up again (see tests/sliding_sync_synapse.rs).
    let (_, deleted) = matrix_sync_testkit::synapse_db::execute(
        server,
        "DELETE FROM sliding_sync_connections WHERE user_id = ?",
        &[json!(ours.user_id)],
    );
    assert!(deleted >= 1);
    alice.create_room(&[&ours.user_id]);
    for i in 30..35 {
        sender.send_text(&room, &to, &format!("secret {i}"), None);
    }
    let events = collect_until(&service, WITHIN, |events| {
        decrypted_bodies(events, &room).contains(&"secret 34".to_owned())
    });
    let resets = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ConnectionReset(_)))
        .count();
    assert_eq!(resets, 1);
    // The fresh connection sends the room as new, with its latest events (all 35 fit the
    // timeline limit of 50): those this run delivered (20..30) are not repeated, those only
    // the first run delivered (0..20) come again, in order (at least once), then 30..35.
    let mut expected = numbered(0..20);
    expected.extend(numbered(30..35));
    assert_eq!(decrypted_bodies(&events, &room), expected);
    assert_eq!(undecryptable(&events), 0);
    assert_no_errors(&service);
    service.stop();
    service.join().unwrap();
}
