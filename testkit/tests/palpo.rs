//! The throwaway palpo and the test client against each other: palpo starts with its own
//! PostgreSQL, registers users, creates rooms, sends and joins, serves /messages, and stops
//! with everything it started when dropped.

use std::net::TcpStream;
use std::time::Duration;

use matrix_sync_testkit::client::Account;
use matrix_sync_testkit::homeserver::Server;
use matrix_sync_testkit::palpo::Palpo;

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

#[test]
fn palpo_registers_sends_joins_and_stops_with_its_database_at_drop() {
    let palpo = Palpo::start();
    eprintln!("palpo started in {:?}", palpo.startup_time());
    let base = palpo.base_url();
    let (port, pg_port, dir) = (
        palpo.port(),
        palpo.postgres_port(),
        palpo.data_dir().to_owned(),
    );

    let alice = Account::register(&base, "alice");
    let bob = Account::register(&base, "bob");
    assert!(alice.user_id.ends_with(":localhost"), "{}", alice.user_id);
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let sent = bob.send_text(&room, "hello from bob");
    let messages = alice.messages(&room, 10);
    let chunk = messages["chunk"].as_array().expect("a chunk");
    assert!(
        chunk.iter().any(|e| e["event_id"] == sent.as_str()),
        "the sent message in /messages: {messages}"
    );

    assert!(port_open(port) && port_open(pg_port));
    drop(palpo);
    assert!(!port_open(port), "palpo still listens after drop");
    assert!(!port_open(pg_port), "PostgreSQL still listens after drop");
    assert!(!dir.exists(), "the data directory outlives the server");
}

#[test]
fn either_server_behind_one_interface() {
    let palpo = Server::Palpo.shared();
    assert_eq!(palpo.server(), Server::Palpo);
    assert_eq!(palpo.server_name(), "localhost");
    assert_eq!(
        palpo.base_url(),
        format!("http://127.0.0.1:{}", palpo.port())
    );
    let account = Account::register(&palpo.base_url(), "shared");
    let (status, me) = account.get_json("/_matrix/client/v3/account/whoami");
    assert_eq!(
        (status, me["user_id"].as_str()),
        (200, Some(&*account.user_id))
    );
    assert_eq!(Server::ALL.map(Server::name), ["synapse", "palpo"]);
}

#[test]
fn a_killed_palpo_restarts_on_its_port_with_its_database() {
    let mut palpo = Palpo::start();
    let base = palpo.base_url();
    let alice = Account::register(&base, "survivor");
    palpo.kill();
    assert!(!palpo.is_running());
    assert!(!port_open(palpo.port()), "palpo still listens after kill");
    palpo.restart();
    assert!(palpo.is_running());
    assert_eq!(palpo.base_url(), base);
    let (status, me) = alice.get_json("/_matrix/client/v3/account/whoami");
    assert_eq!(
        (status, me["user_id"].as_str()),
        (200, Some(&*alice.user_id))
    );
    let again = Account::login(&base, &alice.user_id, matrix_sync_testkit::client::PASSWORD);
    assert_eq!(again.user_id, alice.user_id);
}
