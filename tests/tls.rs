//! `https` against a real homeserver (Synapse and palpo), through the test kit's loopback
//! TLS terminator and its throwaway CA: trusted as an extra CA, the driver syncs; with the
//! bundled roots alone, or the platform's store, the certificate is refused as a TLS failure,
//! reported and backed off; a PEM without a certificate is a configuration error.

mod support;

use std::time::{Duration, Instant};

use matrix_sync_service::{
    start_with, CaPemError, ConfigError, DriverConfig, ErrorClass, Failure, ServiceError,
    StartError, SyncService, SyncState, TransportErrorKind, TrustRoots,
};
use matrix_sync_testkit::homeserver::Server;
use matrix_sync_testkit::tls::TlsTerminator;
use support::client::Account;
use support::service::{collect_until, config_for, drain_until_live};

/// The driver's own agent, direct (no proxy of the environment), with `roots`.
fn driver(roots: TrustRoots) -> DriverConfig {
    let mut driver = DriverConfig::default().trust_roots(roots);
    driver.proxy_from_env = false;
    driver
}

/// `account` syncing from `homeserver` with `driver`.
fn start_at(account: &Account, homeserver: &str, driver: DriverConfig) -> SyncService {
    let mut config = config_for(account);
    config.homeserver = homeserver.to_owned();
    start_with(config, driver).expect("valid config")
}

/// Two users in one room, and a terminator in front of the shared `server`.
fn setup(server: Server) -> (Account, Account, String, TlsTerminator) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "alice");
    let bob = Account::register(&homeserver.base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    (alice, bob, room, TlsTerminator::start(homeserver.port()))
}

fn receives(service: &SyncService, bob: &Account, room: &str, text: &str) {
    drain_until_live(service);
    let sent = bob.send_text(room, text);
    collect_until(service, Duration::from_secs(20), |events| {
        events
            .iter()
            .any(|e| e.event_id.as_ref().is_some_and(|id| id.as_str() == sent))
    });
}

fn with_the_ca_as_extra_pem_the_driver_syncs_through_tls_and_receives_messages(server: Server) {
    let (alice, bob, room, tls) = setup(server);
    let trusting = || {
        driver(TrustRoots::Bundled)
            .add_ca_pem(tls.ca_pem().as_bytes())
            .expect("the CA's PEM")
    };
    assert_eq!(trusting().extra_ca.len(), 1);

    let service = start_at(&alice, &tls.base_url(), trusting());
    receives(&service, &bob, &room, "over https to an IP address");
    service.stop();
    assert!(tls.handshakes() >= 1, "went through the terminator");
    assert_eq!(tls.refused(), 0);

    // A name (resolved by ureq's resolver, not parsed as an address) works the same way.
    let by_name = format!("https://localhost:{}", tls.port());
    let service = start_at(&alice, &by_name, trusting());
    receives(&service, &bob, &room, "over https to localhost");
    service.stop();
}

/// `error` as a sync error whose failure is a transport failure of kind TLS.
fn tls_failure(error: ServiceError) -> matrix_sync_service::SyncError {
    let ServiceError::Sync(error) = error else {
        panic!("{error}")
    };
    match &error.failure {
        Failure::Transport(f) if f.kind == TransportErrorKind::Tls => {}
        other => panic!("a transport failure of kind Tls, not {other:?}"),
    }
    error
}

/// The first error of `service`, which must be a TLS transport failure; then a few seconds
/// of watching: the state reads backing off, and the retries follow the backoff (no loop).
fn refused_as_tls(service: &SyncService, tls: &TlsTerminator) {
    let first = service
        .errors()
        .recv_timeout(Duration::from_secs(10))
        .expect("an error is reported");
    let error = tls_failure(first);
    assert_eq!(error.class, ErrorClass::Transient);
    assert_eq!(service.state(), SyncState::BackingOff);

    let watch = Duration::from_secs(3);
    let until = Instant::now() + watch;
    let mut errors = 1;
    while let Ok(error) = service.errors().recv_deadline(until) {
        errors += 1;
        tls_failure(error);
    }
    // Backoff from 500 ms doubling (jitter at most halves it): at most 5 attempts in 3 s.
    assert!(
        (2..=5).contains(&errors),
        "{errors} errors in {watch:?} after the first"
    );
    assert_eq!(tls.handshakes(), 0, "no handshake completed");
    assert!(tls.refused() >= errors, "{} refused", tls.refused());
    assert!(service.events().try_recv().is_err(), "no event");
    eprintln!(
        "{errors} TLS refusals in the first ~{watch:?}; terminator counted {}; first: {}",
        tls.refused(),
        error.failure
    );
}

fn with_the_bundled_roots_alone_the_throwaway_ca_is_refused_as_tls_and_backed_off(server: Server) {
    let (alice, _bob, _room, tls) = setup(server);
    let service = start_at(&alice, &tls.base_url(), driver(TrustRoots::Bundled));
    refused_as_tls(&service, &tls);
}

fn the_platform_store_does_not_hold_the_throwaway_ca_and_refuses_it_the_same_way(server: Server) {
    let (alice, _bob, _room, tls) = setup(server);
    let service = start_at(&alice, &tls.base_url(), driver(TrustRoots::Platform));
    refused_as_tls(&service, &tls);
}

#[test]
fn a_pem_without_a_certificate_and_platform_roots_with_extra_ca_are_config_errors() {
    let key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
    for pem in ["", "hello", key] {
        let refused = DriverConfig::default().add_ca_pem(pem.as_bytes());
        assert!(
            matches!(refused, Err(CaPemError::NoCertificate)),
            "{pem:?}: {refused:?}"
        );
    }
    let tls = TlsTerminator::start(9); // no backend needed: nothing connects
    let driver = driver(TrustRoots::Platform)
        .add_ca_pem(tls.ca_pem().as_bytes())
        .unwrap();
    let config = matrix_sync_service::Config::new(tls.base_url(), "token");
    let refused = start_with(config, driver);
    assert!(
        matches!(
            refused,
            Err(StartError::Config(ConfigError::Invalid {
                field: "extra_ca",
                ..
            }))
        ),
        "{refused:?}"
    );
}

fn tail_with_ca_file_prints_a_message_received_through_tls_and_without_it_prints_none(
    server: Server,
) {
    use std::process::{Command, Stdio};
    use support::service::{json_lines, tail_binary, Tail};

    let (alice, bob, room, tls) = setup(server);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, tls.ca_pem()).unwrap();
    let tail = |ca: Option<&std::path::Path>| {
        let mut command = Command::new(tail_binary());
        command
            .args(["--homeserver", &tls.base_url(), "--timeout-ms", "1000"])
            .env("MATRIX_ACCESS_TOKEN", &alice.access_token)
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(ca) = ca {
            command.arg("--ca-file").arg(ca);
        }
        let mut tail = Tail::spawn(&mut command);
        let lines = json_lines(tail.0.stdout.take().unwrap());
        (tail, lines)
    };

    let (mut trusting, lines) = tail(Some(&ca_file));
    let sent = bob.send_text(&room, "tail over https");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("tail printed the message in time");
        if line["event_id"] == sent.as_str() {
            assert_eq!(line["body"], "tail over https");
            break;
        }
    }
    let (status, _) = trusting.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));

    // Without the CA the same tail prints nothing: every attempt is a refused handshake.
    let refused_before = tls.refused();
    let (mut untrusting, lines) = tail(None);
    assert!(
        lines.recv_timeout(Duration::from_secs(3)).is_err(),
        "nothing printed without the CA"
    );
    untrusting.signal(libc::SIGTERM);
    assert!(
        tls.refused() > refused_before,
        "its handshakes were refused"
    );
}

#[test]
fn with_the_ca_as_extra_pem_the_driver_syncs_through_tls_and_receives_messages_on_synapse() {
    with_the_ca_as_extra_pem_the_driver_syncs_through_tls_and_receives_messages(Server::Synapse);
}

#[test]
fn with_the_ca_as_extra_pem_the_driver_syncs_through_tls_and_receives_messages_on_palpo() {
    with_the_ca_as_extra_pem_the_driver_syncs_through_tls_and_receives_messages(Server::Palpo);
}

#[test]
fn with_the_bundled_roots_alone_the_throwaway_ca_is_refused_as_tls_and_backed_off_on_synapse() {
    with_the_bundled_roots_alone_the_throwaway_ca_is_refused_as_tls_and_backed_off(Server::Synapse);
}

#[test]
fn with_the_bundled_roots_alone_the_throwaway_ca_is_refused_as_tls_and_backed_off_on_palpo() {
    with_the_bundled_roots_alone_the_throwaway_ca_is_refused_as_tls_and_backed_off(Server::Palpo);
}

#[test]
fn the_platform_store_does_not_hold_the_throwaway_ca_and_refuses_it_the_same_way_on_synapse() {
    the_platform_store_does_not_hold_the_throwaway_ca_and_refuses_it_the_same_way(Server::Synapse);
}

#[test]
fn the_platform_store_does_not_hold_the_throwaway_ca_and_refuses_it_the_same_way_on_palpo() {
    the_platform_store_does_not_hold_the_throwaway_ca_and_refuses_it_the_same_way(Server::Palpo);
}

#[test]
fn tail_with_ca_file_prints_a_message_received_through_tls_and_without_it_prints_none_on_synapse() {
    tail_with_ca_file_prints_a_message_received_through_tls_and_without_it_prints_none(
        Server::Synapse,
    );
}

#[test]
fn tail_with_ca_file_prints_a_message_received_through_tls_and_without_it_prints_none_on_palpo() {
    tail_with_ca_file_prints_a_message_received_through_tls_and_without_it_prints_none(
        Server::Palpo,
    );
}
