//! Server discovery through the driver: a real homeserver (Synapse and palpo) serving its
//! own well-known, found from a user id and from its server name; and loopback fake servers whose well-known is
//! garbage (FAIL_PROMPT) or names something that is not a homeserver (FAIL_ERROR), reported
//! as documented.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    start, Config, DiscoveryAction, DiscoveryError, ErrorClass, Event, EventKind, Failure,
    RequestKind, ServiceError, SyncError, SyncService, SyncState,
};
use matrix_sync_testkit::homeserver::{Homeserver, Options, Server};
use support::client::room_of_two;
use support::fake_server::{FakeServer, Response};
use support::service::collect_until;

/// One discoverable server of each kind for this binary: server name `127.0.0.1:PORT`,
/// serving `/.well-known/matrix/client` that names `http://127.0.0.1:PORT`.
fn discoverable(server: Server) -> &'static dyn Homeserver {
    static SYNAPSE: OnceLock<Box<dyn Homeserver>> = OnceLock::new();
    static PALPO: OnceLock<Box<dyn Homeserver>> = OnceLock::new();
    let cell = match server {
        Server::Synapse => &SYNAPSE,
        Server::Palpo => &PALPO,
    };
    cell.get_or_init(|| server.start_with(Options::new().discoverable()))
        .as_ref()
}

fn discovered(events: &[Event]) -> Option<&str> {
    events.iter().find_map(|e| match &e.kind {
        EventKind::Discovered { homeserver } => Some(homeserver.as_str()),
        _ => None,
    })
}

/// Runs the service from `server_name_or_user_id` until `bob`'s message reaches it.
fn receives_a_message_after_discovery(
    server: Server,
    server_name_or_user_id: impl Fn(&str) -> String,
    prefix: &str,
) {
    let homeserver = discoverable(server);
    let (alice, bob, room) = room_of_two(&homeserver.base_url(), &format!("{prefix}a"), "bob");
    assert!(
        alice
            .user_id
            .ends_with(&format!(":{}", homeserver.server_name())),
        "{} is of server {}",
        alice.user_id,
        homeserver.server_name()
    );
    let mut config = Config::discover(
        &server_name_or_user_id(&alice.user_id),
        alice.access_token.clone(),
    )
    .expect("a valid server name or user id");
    config.jitter_seed = 1;
    assert_eq!(config.homeserver, homeserver.base_url());
    let service = start(config).expect("valid config");
    let events = collect_until(&service, Duration::from_secs(30), |events| {
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Checkpoint(_)))
    });
    assert!(
        matches!(events[0].kind, EventKind::Discovered { .. }),
        "announced first: {:?}",
        events[0].kind
    );
    // The well-known's base URL, without a trailing slash.
    assert_eq!(discovered(&events), Some(homeserver.base_url().as_str()));
    let sent = bob.send_text(&room, "found you");
    let events = collect_until(&service, Duration::from_secs(30), |events| {
        events
            .iter()
            .any(|e| e.event_id.as_ref().is_some_and(|id| id.as_str() == sent))
    });
    let message = events
        .iter()
        .find(|e| e.event_id.as_ref().is_some_and(|id| id.as_str() == sent))
        .expect("the message");
    assert_eq!(message.kind, EventKind::Message);
    assert_eq!(message.body.as_deref(), Some("found you"));
    assert_eq!(
        message.room_id.as_ref().map(|r| r.as_str()),
        Some(room.as_str())
    );
    assert!(service.errors().try_recv().is_err(), "no error on the way");
    service.stop();
}

#[test]
fn a_user_id_finds_the_server_through_its_well_known_on_synapse() {
    receives_a_message_after_discovery(Server::Synapse, |user_id| user_id.to_owned(), "uid");
}

#[test]
fn a_user_id_finds_the_server_through_its_well_known_on_palpo() {
    receives_a_message_after_discovery(Server::Palpo, |user_id| user_id.to_owned(), "uid");
}

#[test]
fn a_server_name_finds_the_server_through_its_well_known_on_synapse() {
    let name = discoverable(Server::Synapse).server_name().to_owned();
    receives_a_message_after_discovery(Server::Synapse, |_| name.clone(), "sn");
}

#[test]
fn a_server_name_finds_the_server_through_its_well_known_on_palpo() {
    let name = discoverable(Server::Palpo).server_name().to_owned();
    receives_a_message_after_discovery(Server::Palpo, |_| name.clone(), "sn");
}

/// The first error the service reports, within `within`.
fn first_error(service: &SyncService, within: Duration) -> SyncError {
    match service.errors().recv_timeout(within) {
        Ok(ServiceError::Sync(error)) => error,
        other => panic!("expected a sync error, got {other:?}"),
    }
}

fn wait_for_state(service: &SyncService, state: SyncState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.state() != state {
        assert!(
            Instant::now() < deadline,
            "state {:?}, not {state:?}",
            service.state()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_garbage_well_known_is_fail_prompt() {
    let fake = FakeServer::start(|request| match request.path() {
        "/.well-known/matrix/client" => Response {
            status: 200,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: b"<html><body>\x1b[2J It works!</body></html>".to_vec(),
        },
        _ => Response::json(500, "{}"),
    });
    let server_name = fake.url().trim_start_matches("http://").to_owned();
    let config = Config::discover(&format!("@me:{server_name}"), "syt_secret_token").unwrap();
    let service = start(config).expect("valid config");
    let error = first_error(&service, Duration::from_secs(10));
    assert_eq!(error.request, RequestKind::Discovery);
    assert_eq!(error.class, ErrorClass::NeedsUser);
    let Failure::Discovery(discovery) = &error.failure else {
        panic!("{error}");
    };
    assert!(
        matches!(**discovery, DiscoveryError::NotJson { .. }),
        "{discovery:?}"
    );
    assert_eq!(discovery.action(), DiscoveryAction::FailPrompt);
    assert_eq!(error.delay, matrix_sync_service::defaults::BACKOFF_MAX);
    let shown = error.to_string();
    assert!(shown.contains("FAIL_PROMPT"), "{shown}");
    assert!(!shown.contains('\x1b'), "{shown}");
    wait_for_state(&service, SyncState::Refused);
    // Nothing else went out, and the well-known never saw the token.
    let log = fake.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].path(), "/.well-known/matrix/client");
    assert!(log[0].header("authorization").is_none());
    assert!(service.events().try_recv().is_err(), "no event, no sync");
    service.stop();
}

#[test]
fn a_well_known_naming_no_homeserver_is_fail_error() {
    // The well-known names the fake server itself, which answers /versions with 404.
    let fake = FakeServer::start(|request| match request.path() {
        "/.well-known/matrix/client" => {
            let base = request.header("host").unwrap_or_default();
            Response::json(
                200,
                format!(r#"{{"m.homeserver":{{"base_url":"http://{base}/"}}}}"#),
            )
        }
        _ => Response::json(404, r#"{"errcode":"M_UNRECOGNIZED"}"#),
    });
    let server_name = fake.url().trim_start_matches("http://").to_owned();
    let service = start(Config::discover(&server_name, "syt_secret_token").unwrap()).unwrap();
    let error = first_error(&service, Duration::from_secs(10));
    assert_eq!(error.request, RequestKind::VersionsCheck);
    assert!(
        matches!(
            &error.failure,
            Failure::Discovery(e) if matches!(**e, DiscoveryError::VersionsStatus { status: 404, .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("FAIL_ERROR"), "{error}");
    let log = fake.log();
    assert_eq!(
        log.iter().map(|r| r.path()).collect::<Vec<_>>(),
        ["/.well-known/matrix/client", "/_matrix/client/versions"]
    );
    assert!(log.iter().all(|r| r.header("authorization").is_none()));
    service.stop();
}
