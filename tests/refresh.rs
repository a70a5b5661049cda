//! Tokens that expire, against a real Synapse whose access tokens live 10 s: refresh ahead of
//! expiry and after a 401, a revoked session, a token replaced from another thread, and OAuth
//! 2.0 refresh through a loopback double of a token endpoint.
//!
//! palpo 0.0.2 issues no refresh token and has no `/refresh` (its tokens never expire, see
//! the README's table): the tests that need Synapse's expiring tokens say so by name
//! (`_on_synapse`); on palpo, a revoked session with a refresh token palpo never issued ends
//! after one refused refresh, and a token replaced from another thread resumes as on Synapse.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    start_with, BackoffPolicy, Config, Credentials, DriverConfig, EventKind, Failure,
    RefreshMethod, RefreshToken, RequestKind, ServiceError, SyncError, SyncService, SyncState,
};
use matrix_sync_testkit::homeserver::{Homeserver, Server};
use support::client::{Account, PASSWORD};
use support::fake_server::{FakeServer, Response};
use support::service::{collect_until, config_for, drain_until_live};
use support::synapse::{Synapse, SynapseOptions};

/// The access-token lifetime of the Synapse these tests share.
const LIFETIME: Duration = Duration::from_secs(10);

/// The shared server of `server`'s kind for these tests: on Synapse, one whose tokens live
/// [`LIFETIME`].
fn shared(server: Server) -> &'static dyn Homeserver {
    match server {
        Server::Synapse => synapse(),
        Server::Palpo => server.shared(),
    }
}

fn synapse() -> &'static Synapse {
    static SYNAPSE: OnceLock<Synapse> = OnceLock::new();
    SYNAPSE.get_or_init(|| {
        SynapseOptions::new()
            .refreshable_access_token_lifetime("10s")
            .start()
    })
}

/// The service's configuration for `account`, refreshing with Synapse's `/refresh`; the
/// expiry is given to the machine only if `known_expiry`.
fn refreshing(account: &Account, known_expiry: bool) -> Config {
    let mut config = config_for(account);
    let refresh_token = account.refresh_token.clone().expect("a refresh token");
    config.refresh_token = Some(RefreshToken::new(refresh_token));
    if known_expiry {
        config.access_token_expires_in = account.expires_in_ms.map(Duration::from_millis);
        let lifetime = config.access_token_expires_in.expect("an expiry");
        assert!(
            lifetime <= LIFETIME && lifetime > LIFETIME / 2,
            "{lifetime:?}"
        );
    }
    config.backoff = BackoffPolicy::default().with_max(Duration::from_secs(2));
    config
}

/// A driver configuration whose store records every credential handed to it.
fn recording_store() -> (DriverConfig, Arc<Mutex<Vec<Credentials>>>) {
    let stored = Arc::new(Mutex::new(Vec::new()));
    let log = stored.clone();
    let driver = DriverConfig::default().on_credentials(move |credentials| {
        log.lock().unwrap().push(credentials.clone());
        Ok(())
    });
    (driver, stored)
}

fn sync_errors(service: &SyncService) -> Vec<SyncError> {
    service
        .errors()
        .try_iter()
        .map(|e| match e {
            ServiceError::Sync(e) => e,
            other => panic!("{other}"),
        })
        .collect()
}

fn unknown_tokens(errors: &[SyncError]) -> usize {
    errors
        .iter()
        .filter(|e| matches!(e.failure, Failure::UnknownToken { .. }))
        .count()
}

/// Sends `count` messages to `room`, one every `every`, on a thread of its own; returns
/// their event ids in send order when joined.
fn send_spread(
    sender: &Account,
    room: &str,
    count: usize,
    every: Duration,
) -> thread::JoinHandle<Vec<String>> {
    let (sender, room) = (sender.clone(), room.to_owned());
    thread::spawn(move || {
        (0..count)
            .map(|i| {
                let id = sender.send_text(&room, &format!("message {i}"));
                thread::sleep(every);
                id
            })
            .collect()
    })
}

/// Receives until every id of `expected` was delivered; returns the delivered message ids
/// of `room` in delivery order.
fn delivered_ids(service: &SyncService, room: &str, count: usize, within: Duration) -> Vec<String> {
    let in_room = |e: &matrix_sync_service::Event| {
        e.kind == EventKind::Message && e.room_id.as_ref().is_some_and(|r| r.as_str() == room)
    };
    let events = collect_until(service, within, |events| {
        events.iter().filter(|e| in_room(e)).count() >= count
    });
    events
        .iter()
        .filter(|e| in_room(e))
        .map(|e| e.event_id.as_ref().unwrap().to_string())
        .collect()
}

fn assert_once_in_order(delivered: &[String], sent: &[String]) {
    let unique: HashSet<_> = delivered.iter().collect();
    assert_eq!(unique.len(), delivered.len(), "an event delivered twice");
    assert_eq!(delivered, sent, "every message once, in send order");
}

#[test]
fn tokens_living_10_s_are_refreshed_ahead_and_150_messages_over_90_s_arrive_once_in_order_on_synapse(
) {
    let alice = Account::register_refreshable(&synapse().base_url(), "alice");
    let bob = Account::register(&synapse().base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let (driver, stored) = recording_store();
    let service = start_with(refreshing(&alice, true), driver).expect("valid config");
    drain_until_live(&service);

    let started = Instant::now();
    let sender = send_spread(&bob, &room, 150, Duration::from_millis(600));
    let delivered = delivered_ids(&service, &room, 150, Duration::from_secs(150));
    let sent = sender.join().unwrap();
    assert_once_in_order(&delivered, &sent);

    let errors = sync_errors(&service);
    let refreshes = stored.lock().unwrap().len();
    eprintln!(
        "{} s: {refreshes} refreshes ahead of expiry, {} 401s, {} errors in all",
        started.elapsed().as_secs(),
        unknown_tokens(&errors),
        errors.len()
    );
    assert!(unknown_tokens(&errors) <= 1, "{errors:#?}");
    assert!(
        refreshes as u64 >= started.elapsed().as_secs() / LIFETIME.as_secs(),
        "{refreshes} refreshes in {:?}",
        started.elapsed()
    );
    let rotated: HashSet<_> = stored
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.refresh_token.as_ref().unwrap().expose().to_owned())
        .collect();
    assert_eq!(
        rotated.len(),
        refreshes,
        "every refresh rotated the refresh token"
    );
    service.stop();
}

#[test]
fn an_expiry_unknown_to_the_client_is_met_by_one_refresh_and_a_retry_after_its_401_on_synapse() {
    let alice = Account::register_refreshable(&synapse().base_url(), "alice");
    let bob = Account::register(&synapse().base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let (driver, stored) = recording_store();
    let service = start_with(refreshing(&alice, false), driver).expect("valid config");
    drain_until_live(&service);

    let sender = send_spread(&bob, &room, 50, Duration::from_millis(500));
    let delivered = delivered_ids(&service, &room, 50, Duration::from_secs(60));
    let sent = sender.join().unwrap();
    assert_once_in_order(&delivered, &sent);
    let errors = sync_errors(&service);
    let refreshes = stored.lock().unwrap().len();
    eprintln!(
        "{} 401s, {refreshes} refreshes, errors: {:?}",
        unknown_tokens(&errors),
        errors.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
    // The first token's expiry is unknown: it is met by a 401. Synapse's refresh answers
    // carry `expires_in_ms`, so the tokens after it are refreshed ahead of time.
    assert_eq!(
        unknown_tokens(&errors),
        1,
        "the first token's expiry is met by a 401"
    );
    assert!(
        refreshes >= 2,
        "{refreshes} refreshes in 25 s with tokens living 10 s"
    );
    assert!(
        errors
            .iter()
            .all(|e| matches!(e.failure, Failure::UnknownToken { .. })),
        "{errors:#?}"
    );
    service.stop();
}

/// A session with a refresh token revoked by logging out every device (on palpo, a refresh
/// token it never issued): the errors reported
/// (the sync refused, the refresh refused, syncs at the maximum backoff).
fn a_revoked_session_ends_after_one_refresh_attempt(server: Server) -> Vec<SyncError> {
    let mut alice = Account::register_refreshable(&shared(server).base_url(), "alice");
    if server == Server::Palpo {
        assert_eq!(alice.refresh_token, None, "palpo issues no refresh token");
        alice.refresh_token = Some("never-issued-by-palpo".to_owned());
    }
    let mut config = refreshing(&alice, false);
    config.long_poll_timeout = Duration::from_secs(1);
    let (driver, stored) = recording_store();
    let service = start_with(config, driver).expect("valid config");
    drain_until_live(&service);
    alice.logout_all();

    let deadline = Instant::now() + Duration::from_secs(10);
    while service.state() != SyncState::SessionEnded {
        assert!(Instant::now() < deadline, "state {:?}", service.state());
        thread::sleep(Duration::from_millis(20));
    }
    let ended = Instant::now();
    thread::sleep(Duration::from_secs(7));
    let errors = sync_errors(&service);
    let kinds: Vec<_> = errors.iter().map(|e| e.request.clone()).collect();
    // The sync refused, the one refresh refused, then syncs at the maximum backoff only.
    assert!(matches!(kinds[0], RequestKind::Sync { .. }), "{errors:#?}");
    assert_eq!(kinds[1], RequestKind::Refresh, "{errors:#?}");
    assert!(
        kinds[2..]
            .iter()
            .all(|k| matches!(k, RequestKind::Sync { .. })),
        "no second refresh: {kinds:?}"
    );
    let later = errors.len() - 2;
    assert!(
        (2..=4).contains(&later),
        "{later} requests in the 7 s after the end, 2 s apart at least"
    );
    assert!(errors[2..]
        .iter()
        .all(|e| e.delay >= Duration::from_secs(2)));
    assert!(stored.lock().unwrap().is_empty());
    assert_eq!(service.state(), SyncState::SessionEnded);
    eprintln!(
        "{server}: ended {} ms after the logout was seen; {later} syncs in the next 7 s; \
         the refresh: {}",
        ended.elapsed().as_millis() - 7000,
        errors[1].failure
    );
    service.stop();
    errors
}

#[test]
fn a_revoked_session_ends_after_one_refresh_attempt_and_then_waits_the_maximum_backoff_on_synapse()
{
    let errors = a_revoked_session_ends_after_one_refresh_attempt(Server::Synapse);
    assert!(
        matches!(errors[1].failure, Failure::RefreshRefused { .. }),
        "{errors:#?}"
    );
}

#[test]
fn a_refresh_palpo_cannot_do_ends_the_session_after_one_attempt_and_then_waits_the_maximum_backoff_on_palpo(
) {
    let errors = a_revoked_session_ends_after_one_refresh_attempt(Server::Palpo);
    // palpo has no `/refresh`: 405 M_UNRECOGNIZED, reported as the refresh refused.
    assert!(
        matches!(errors[1].failure, Failure::RefreshRefused { .. }),
        "{errors:#?}"
    );
    assert_eq!(errors[1].failure.errcode(), Some("M_UNRECOGNIZED"));
    assert!(
        errors[1].failure.to_string().contains("405"),
        "{}",
        errors[1].failure
    );
}

fn a_token_set_from_another_thread_while_refused_resumes_within_a_second(server: Server) {
    let alice = Account::register(&shared(server).base_url(), "alice");
    let bob = Account::register(&shared(server).base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let device = alice.new_device();
    let mut config = config_for(&device);
    config.long_poll_timeout = Duration::from_secs(1);
    let service = Arc::new(start_with(config, DriverConfig::default()).expect("valid config"));
    drain_until_live(&service);
    let before = bob.send_text(&room, "before the logout");
    device.logout();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.state() != SyncState::Refused {
        assert!(Instant::now() < deadline, "state {:?}", service.state());
        thread::sleep(Duration::from_millis(20));
    }
    let during = bob.send_text(&room, "while refused");
    let replacement = alice.new_device();
    let handle = service.clone();
    let set_at = Instant::now();
    thread::spawn(move || handle.set_access_token(replacement.access_token.clone()))
        .join()
        .unwrap()
        .expect("a usable token");
    let delivered = delivered_ids(&service, &room, 2, Duration::from_secs(10));
    let resumed = set_at.elapsed();
    let wanted = [before, during];
    assert!(
        delivered.ends_with(&wanted[1..]) && delivered.contains(&wanted[0]),
        "{delivered:?}"
    );
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>().len(),
        delivered.len()
    );
    eprintln!(
        "{server}: resumed {} ms after set_access_token",
        resumed.as_millis()
    );
    assert!(resumed < Duration::from_secs(1), "{resumed:?}");
    service.stop();
}

#[test]
fn a_token_set_from_another_thread_while_refused_resumes_within_a_second_on_synapse() {
    a_token_set_from_another_thread_while_refused_resumes_within_a_second(Server::Synapse);
}

#[test]
fn a_token_set_from_another_thread_while_refused_resumes_within_a_second_on_palpo() {
    a_token_set_from_another_thread_while_refused_resumes_within_a_second(Server::Palpo);
}

/// A loopback test double of an OAuth 2.0 token endpoint (RFC 6749 §6), not a real
/// authorization server: it takes a form-encoded `grant_type=refresh_token` with its client
/// id, rotates the refresh token on every grant (the old one is `invalid_grant` from then
/// on), and mints each access token by logging the user in to the real Synapse, so the
/// tokens it hands out work there and expire like Synapse's own.
struct TokenEndpointDouble {
    server: FakeServer,
    state: Arc<Mutex<DoubleState>>,
}

struct DoubleState {
    current: String,
    grants: u32,
    revoked: bool,
    refused: u32,
}

const CLIENT_ID: &str = "sync-test-client";

impl TokenEndpointDouble {
    fn start(user: &str) -> Self {
        let state = Arc::new(Mutex::new(DoubleState {
            current: "oauth-rt-0".into(),
            grants: 0,
            revoked: false,
            refused: 0,
        }));
        let shared = state.clone();
        let (base, user) = (synapse().base_url(), user.to_owned());
        let server = FakeServer::start(move |request| {
            let refuse = |state: &mut DoubleState, error: &str| {
                state.refused += 1;
                Response::json(400, format!(r#"{{"error":"{error}"}}"#))
            };
            let mut state = shared.lock().unwrap();
            let form: Vec<(String, String)> =
                form_urlencoded::parse(&request.body).into_owned().collect();
            let field = |name: &str| {
                form.iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let form_encoded = request
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
            if request.method != "POST" || request.path() != "/oauth2/token" || !form_encoded {
                return refuse(&mut state, "invalid_request");
            }
            if field("grant_type") != Some("refresh_token") {
                return refuse(&mut state, "unsupported_grant_type");
            }
            if field("client_id") != Some(CLIENT_ID) {
                return Response::json(401, r#"{"error":"invalid_client"}"#);
            }
            if state.revoked || field("refresh_token") != Some(state.current.as_str()) {
                return refuse(&mut state, "invalid_grant");
            }
            let minted = Account::login_refreshable(&base, &user, PASSWORD);
            state.grants += 1;
            state.current = format!("oauth-rt-{}", state.grants);
            let answer = serde_json::json!({
                "access_token": minted.access_token,
                "token_type": "Bearer",
                "expires_in": minted.expires_in_ms.unwrap() / 1000,
                "refresh_token": state.current,
            });
            Response::json(200, answer.to_string())
        });
        Self { server, state }
    }
}

#[test]
fn oauth_refresh_through_a_token_endpoint_double_rotates_tokens_and_invalid_grant_ends_it_on_synapse(
) {
    let alice = Account::register_refreshable(&synapse().base_url(), "alice");
    let bob = Account::register(&synapse().base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let localpart = alice.user_id[1..].split(':').next().unwrap().to_owned();
    let double = TokenEndpointDouble::start(&localpart);
    let mut config = refreshing(&alice, true);
    config.refresh_token = Some(RefreshToken::new("oauth-rt-0"));
    config.refresh = RefreshMethod::OAuth {
        token_endpoint: format!("{}/oauth2/token", double.server.url()),
        client_id: CLIENT_ID.into(),
    };
    config.long_poll_timeout = Duration::from_secs(2);
    let (driver, stored) = recording_store();
    let service = start_with(config, driver).expect("valid config");
    drain_until_live(&service);

    let sender = send_spread(&bob, &room, 40, Duration::from_millis(500));
    let delivered = delivered_ids(&service, &room, 40, Duration::from_secs(60));
    let sent = sender.join().unwrap();
    assert_once_in_order(&delivered, &sent);
    let grants = double.state.lock().unwrap().grants;
    let rotated: Vec<_> = stored
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.refresh_token.as_ref().unwrap().expose().to_owned())
        .collect();
    let expected: Vec<_> = (1..=grants).map(|n| format!("oauth-rt-{n}")).collect();
    assert!(grants >= 2, "{grants} grants in 20 s with 10 s tokens");
    assert_eq!(rotated, expected, "each rotation stored, in order");
    assert_eq!(double.state.lock().unwrap().refused, 0, "no grant refused");
    let errors = sync_errors(&service);
    assert!(unknown_tokens(&errors) <= 1, "{errors:#?}");

    double.state.lock().unwrap().revoked = true;
    let deadline = Instant::now() + LIFETIME + Duration::from_secs(5);
    while service.state() != SyncState::SessionEnded {
        assert!(Instant::now() < deadline, "state {:?}", service.state());
        thread::sleep(Duration::from_millis(50));
    }
    let refused = sync_errors(&service)
        .into_iter()
        .find(|e| matches!(e.failure, Failure::RefreshRefused { .. }))
        .expect("the refusal reported");
    assert_eq!(refused.failure.errcode(), Some("invalid_grant"));
    eprintln!("{grants} OAuth grants; ended with {refused}");
    service.stop();
}

#[test]
fn tail_killed_right_after_a_refresh_goes_on_from_its_files_with_the_rotated_refresh_token_on_synapse(
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let alice = Account::register_refreshable(&synapse().base_url(), "alice");
    let bob = Account::register(&synapse().base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    let since_file = dir.path().join("since");
    let initial = serde_json::json!({
        "access_token": alice.access_token,
        "refresh_token": alice.refresh_token,
        "expires_in_ms": alice.expires_in_ms,
    });
    std::fs::write(&token_file, initial.to_string()).unwrap();
    let stored = || std::fs::read_to_string(&token_file).unwrap();
    let refresh_token = |text: &str| {
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        value["refresh_token"].as_str().unwrap().to_owned()
    };
    let spawn_tail = || {
        Command::new(support::service::tail_binary())
            .args([
                "--homeserver",
                &synapse().base_url(),
                "--timeout-ms",
                "2000",
            ])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--since-file")
            .arg(&since_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Lines of stdout on a thread, so the test can watch the files meanwhile.
    let collect = |child: &mut std::process::Child| {
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let log = errors.clone();
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        (rx, errors)
    };

    let mut first = spawn_tail();
    let (lines, first_errors) = collect(&mut first);
    let sender = send_spread(&bob, &room, 20, Duration::from_millis(400));
    // Kill it the moment the refreshed credentials are on disk.
    let deadline = Instant::now() + LIFETIME * 2;
    let before = stored();
    while stored() == before {
        assert!(Instant::now() < deadline, "no refresh stored");
        thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let rotated = refresh_token(&stored());
    assert_ne!(rotated, alice.refresh_token.clone().unwrap());
    let mut printed: Vec<String> = lines.try_iter().collect();
    thread::sleep(Duration::from_secs(1));

    let mut second = spawn_tail();
    let (lines, second_errors) = collect(&mut second);
    let sent = sender.join().unwrap();
    // Until every message was printed and tail refreshed again with the rotated token.
    let deadline = Instant::now() + Duration::from_secs(40);
    let printed_all = |printed: &[String]| {
        sent.iter()
            .all(|id| printed.iter().any(|l| l.contains(&format!("\"{id}\""))))
    };
    while !(printed_all(&printed) && refresh_token(&stored()) != rotated) {
        assert!(
            Instant::now() < deadline,
            "errors: {:?}",
            second_errors.lock().unwrap()
        );
        printed.extend(lines.recv_timeout(Duration::from_millis(100)).ok());
    }
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    second.wait().unwrap();
    let errors = second_errors.lock().unwrap();
    assert!(
        !errors
            .iter()
            .any(|l| l.contains("M_FORBIDDEN") || l.contains("session")),
        "{errors:?}"
    );
    eprintln!(
        "first run: {:?}; second run: {:?}",
        first_errors.lock().unwrap(),
        errors
    );
}
