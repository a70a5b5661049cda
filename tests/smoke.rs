//! Smoke test of the test kit's homeservers, Synapse and palpo: a throwaway server starts,
//! accounts can be registered, messages land in a room, the client helpers work, and the
//! data survives a hard kill and restart.

mod support;

use matrix_sync_testkit::homeserver::Server;
use serde_json::json;
use support::client::Account;

fn a_shared_server_stores_a_message(server: Server) {
    let server = server.shared();
    let base = server.base_url();
    assert_eq!(base, format!("http://127.0.0.1:{}", server.port()));

    let alice = Account::register(&base, "alice");
    let bob = Account::register(&base, "bob");
    assert_ne!(alice.user_id, bob.user_id);

    let room = alice.create_room(&[&bob.user_id]);
    bob.join(&room);
    let event_id = alice.send_text(&room, "hello from the smoke test");

    let path = format!(
        "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
        support::client::encode(&room)
    );
    let (status, page) = bob.get_json(&path);
    assert_eq!(status, 200, "messages: {page}");
    let chunk = page["chunk"].as_array().expect("chunk array");
    let found = chunk
        .iter()
        .find(|e| e["event_id"] == event_id.as_str())
        .unwrap_or_else(|| panic!("{event_id} not in the newest events: {page}"));
    assert_eq!(found["sender"], alice.user_id.as_str());
    assert_eq!(found["content"]["body"], "hello from the smoke test");
}

#[test]
fn a_shared_server_stores_a_message_on_synapse() {
    a_shared_server_stores_a_message(Server::Synapse);
}

#[test]
fn a_shared_server_stores_a_message_on_palpo() {
    a_shared_server_stores_a_message(Server::Palpo);
}

/// Every client helper once, then a kill and restart. Returns the types of the room's
/// newest events as `/messages?dir=b&limit=10` lists them.
fn client_helpers_and_restart(kind: Server) -> Vec<String> {
    let mut server = kind.start();
    let base = server.base_url();
    let alice = Account::register(&base, "Alice");
    let bob = Account::register(&base, "bob");
    let carol = Account::register(&base, "carol");

    let room = alice.create_room(&[]);
    alice.invite(&room, &bob.user_id);
    alice.invite(&room, &carol.user_id);
    bob.join(&room);
    carol.join(&room);
    alice.set_room_name(&room, "smoke");
    let first = bob.send_text(&room, "first");
    let edit = bob.send_edit(&room, &first, "first, edited");
    let reaction = alice.send_reaction(&room, &first, "👍");
    let redaction = alice.redact(&room, &reaction);
    bob.typing(&room, true);
    bob.typing(&room, false);
    alice.receipt(&room, &edit);
    bob.send_to_device(
        "org.example.ping",
        &alice.user_id,
        &alice.device_id,
        &json!({"n": 1}),
    );
    alice.set_account_data("org.example.global", &json!({"a": 1}));
    alice.set_room_account_data(&room, "org.example.room", &json!({"b": 2}));
    alice.kick(&room, &carol.user_id);
    bob.leave(&room);

    let page = alice.messages(&room, 10);
    let types: Vec<String> = page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_ne!(redaction, reaction);

    let (status, sync) = alice.get_json("/_matrix/client/v3/sync?timeout=0");
    assert_eq!(status, 200, "{sync}");
    assert_eq!(
        sync["to_device"]["events"][0]["type"], "org.example.ping",
        "{sync}"
    );
    assert_eq!(
        sync["rooms"]["join"][&room]["account_data"]["events"][0]["type"],
        "org.example.room"
    );

    // Data survives a hard kill and restart on the same port.
    let port = server.port();
    server.kill();
    assert!(!server.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open after kill"
    );
    server.restart();
    assert_eq!(server.port(), port);
    let (status, _) = alice.get_json("/_matrix/client/v3/account/whoami");
    assert_eq!(status, 200);
    let alice2 = alice.new_device();
    assert_ne!(alice2.device_id, alice.device_id);

    alice.logout();
    let (status, body) = alice.get_json("/_matrix/client/v3/account/whoami");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
    eprintln!("{kind}: {types:?}");
    types
}

/// The newest six events, newest first: the leave, the kick, the redaction, the reaction,
/// the edit and the message.
const NEWEST_SIX: [&str; 6] = [
    "m.room.member",
    "m.room.member",
    "m.room.redaction",
    "m.reaction",
    "m.room.message",
    "m.room.message",
];

#[test]
fn client_helpers_and_restart_on_synapse() {
    let types = client_helpers_and_restart(Server::Synapse);
    assert_eq!(types[..6], NEWEST_SIX, "{types:?}");
}

/// palpo lists a `/messages?dir=b` page oldest first: the newest six are the last six.
#[test]
fn client_helpers_and_restart_listing_messages_oldest_first_on_palpo() {
    let mut types = client_helpers_and_restart(Server::Palpo);
    types.reverse();
    assert_eq!(types[..6], NEWEST_SIX, "{types:?}");
}
