//! Server discovery through the pure machine on the simulated clock (every input and output
//! checked by the test kit's invariants): the well-known and the versions check before the
//! first sync, every outcome of the specification (404 ignored, FAIL_PROMPT, FAIL_ERROR),
//! transient failures backed off, no spinning whatever the server answers, and every later
//! request going to the base URL found.

use std::time::Duration;

use matrix_sync_service::{
    defaults, Config, ConfigError, DiscoveryAction, DiscoveryError, ErrorClass, EventKind, Failure,
    OutgoingRequest, RefreshToken, RequestKind, SyncError, SyncState, TransportErrorKind,
    TransportFailure,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::Harness;
use serde_json::json;

const WELL_KNOWN: &str = "https://example.org/.well-known/matrix/client";

fn discovering() -> Config {
    let mut c = Config::discover("@me:example.org", TOKEN).expect("a user id");
    c.backoff.jitter = 0.0;
    c
}

fn well_known(base_url: &str) -> http::Response<Vec<u8>> {
    json_response(&json!({
        "m.homeserver": {"base_url": base_url},
        "m.identity_server": {"base_url": "https://vector.im"}
    }))
}

fn versions() -> http::Response<Vec<u8>> {
    json_response(&json!({"versions": ["r0.6.1", "v1.1", "v1.12"], "unstable_features": {}}))
}

fn url(req: &OutgoingRequest) -> String {
    req.http.uri().to_string()
}

fn unauthenticated(req: &OutgoingRequest) {
    assert!(
        req.http.headers().get("authorization").is_none(),
        "{} carries a token",
        req.kind.name()
    );
    assert!(!url(req).contains(TOKEN));
}

/// Runs discovery to its end: the well-known names `base_url`, the versions check passes.
fn discover(h: &mut Harness, base_url: &str) {
    let req = h.next_request();
    assert_eq!(req.kind, RequestKind::Discovery);
    unauthenticated(&req);
    h.respond(&req, well_known(base_url));
    let req = h.request();
    assert_eq!(req.kind, RequestKind::VersionsCheck);
    unauthenticated(&req);
    h.respond(&req, versions());
}

fn discovered(h: &mut Harness) -> String {
    let events = h.take_events();
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0].kind {
        EventKind::Discovered { homeserver } => homeserver.clone(),
        other => panic!("{other:?}"),
    }
}

fn discovery_error(error: &SyncError) -> &DiscoveryError {
    match &error.failure {
        Failure::Discovery(e) => e,
        other => panic!("not a discovery failure: {other:?}"),
    }
}

#[test]
fn a_user_id_discovers_the_homeserver_and_every_request_goes_there() {
    let mut h = Harness::new(discovering());
    assert_eq!(h.take_states(), [SyncState::Discovering]);
    assert_eq!(h.machine.homeserver(), None);
    let req = h.request();
    assert_eq!(url(&req), WELL_KNOWN);
    assert_eq!(req.http.method(), http::Method::GET);
    assert_eq!(req.kind, RequestKind::Discovery);
    unauthenticated(&req);
    assert!(req.deadline > h.now);
    h.respond(&req, well_known("https://matrix.example.org/"));
    let req = h.request();
    assert_eq!(
        url(&req),
        "https://matrix.example.org/_matrix/client/versions"
    );
    unauthenticated(&req);
    assert!(h.take_events().is_empty(), "announced only once checked");
    h.respond(&req, versions());
    // Announced before anything else, then the first sync: to the base URL, with the token.
    assert_eq!(discovered(&mut h), "https://matrix.example.org");
    assert_eq!(h.machine.homeserver(), Some("https://matrix.example.org"));
    assert_eq!(h.machine.config().homeserver, "https://matrix.example.org");
    let sync = h.request();
    assert!(url(&sync).starts_with("https://matrix.example.org/_matrix/client/v3/sync?"));
    assert_eq!(
        sync.http.headers()["authorization"],
        format!("Bearer {TOKEN}").as_str()
    );
    assert_eq!(h.take_states(), [SyncState::InitialSync]);
    h.respond(&sync, json_response(&empty_sync("s1")));
    assert!(h.take_errors().is_empty());
    // Discovery is over: the next sync goes there too, with no well-known again.
    let next = h.next_request();
    assert!(matches!(next.kind, RequestKind::Sync { .. }));
    assert!(url(&next).starts_with("https://matrix.example.org/"));
}

#[test]
fn a_base_url_with_a_path_and_trailing_slashes_is_normalized() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.respond(&req, well_known("https://example.org/matrix///"));
    let req = h.request();
    assert_eq!(
        url(&req),
        "https://example.org/matrix/_matrix/client/versions"
    );
    h.respond(&req, versions());
    assert_eq!(discovered(&mut h), "https://example.org/matrix");
    let sync = h.request();
    assert!(url(&sync).starts_with("https://example.org/matrix/_matrix/client/v3/sync?"));
}

#[test]
fn a_404_is_ignored_and_the_server_name_s_address_is_the_homeserver() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.reply(&req, 404, r#"{"errcode":"M_NOT_FOUND"}"#);
    assert!(h.take_errors().is_empty());
    assert_eq!(discovered(&mut h), "https://example.org");
    let sync = h.request();
    assert!(matches!(sync.kind, RequestKind::Sync { .. }));
    assert!(url(&sync).starts_with("https://example.org/_matrix/client/v3/sync?"));
}

#[test]
fn gap_fills_and_refreshes_go_to_the_discovered_homeserver() {
    let mut c = discovering();
    c.refresh_token = Some(RefreshToken::new("syr_refresh"));
    let mut h = Harness::new(c);
    discover(&mut h, "https://matrix.example.org");
    discovered(&mut h);
    let sync = h.request();
    h.reply(
        &sync,
        401,
        r#"{"errcode":"M_UNKNOWN_TOKEN","error":"expired","soft_logout":true}"#,
    );
    let refresh = h.next_request();
    assert_eq!(refresh.kind, RequestKind::Refresh);
    assert_eq!(
        url(&refresh),
        "https://matrix.example.org/_matrix/client/v3/refresh"
    );
    h.respond(
        &refresh,
        json_response(&json!({"access_token": "syt_new", "refresh_token": "syr_new"})),
    );
    let _ = h.machine.poll_credentials().expect("handed out");
    h.machine.handle_credentials_stored(h.now).unwrap();
    h.drain();
    let sync = h.next_request();
    h.respond(&sync, json_response(&empty_sync("s1")));
    let sync = h.next_request();
    h.respond(&sync, json_response(&limited_sync("s2", "p1")));
    let fill = h.next_request();
    assert!(matches!(fill.kind, RequestKind::Messages { .. }));
    assert!(url(&fill).starts_with("https://matrix.example.org/_matrix/client/v3/rooms/"));
}

#[test]
fn a_5xx_a_429_a_transport_failure_and_a_deadline_are_transient() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.reply(&req, 502, "<html>bad gateway</html>");
    let error = h.one_error();
    assert_eq!(error.request, RequestKind::Discovery);
    assert_eq!(error.class, ErrorClass::Transient);
    assert!(matches!(error.failure, Failure::Server { status: 502, .. }));
    assert_eq!(error.delay, Duration::from_millis(500));
    assert_eq!(h.machine.state(), SyncState::BackingOff);
    let failed_at = h.now;
    let req = h.retry_after(failed_at, Duration::from_millis(500));
    assert_eq!(url(&req), WELL_KNOWN);
    assert_eq!(h.machine.state(), SyncState::Discovering);
    let failure = TransportFailure::new(TransportErrorKind::Connect, "connection refused");
    h.machine.handle_failure(req.id, failure, h.now).unwrap();
    h.drain();
    let error = h.one_error();
    assert!(matches!(error.failure, Failure::Transport(_)));
    assert_eq!((error.attempt, error.delay), (2, Duration::from_secs(1)));
    // No answer at all: the deadline passes.
    let req = h.next_request();
    let deadline = req.deadline;
    h.advance(deadline - h.now);
    let error = h.one_error();
    assert!(matches!(error.failure, Failure::DeadlineExceeded(_)));
    assert_eq!(error.class, ErrorClass::Transient);
    let req = h.next_request();
    h.respond(
        &req,
        response_with(
            429,
            &[("retry-after", "7")],
            r#"{"errcode":"M_LIMIT_EXCEEDED"}"#,
        ),
    );
    let error = h.one_error();
    assert_eq!(error.class, ErrorClass::RateLimited);
    assert_eq!(error.delay, Duration::from_secs(7));
    // Then it works.
    discover(&mut h, "https://matrix.example.org");
    assert_eq!(discovered(&mut h), "https://matrix.example.org");
}

/// Each FAIL_PROMPT answer of the well-known: reported, class NeedsUser, retried at the
/// maximum backoff from the well-known again.
#[test]
fn every_fail_prompt_answer_is_reported_and_retried_at_the_maximum_backoff() {
    let cases: Vec<(&str, http::Response<Vec<u8>>)> = vec![
        ("403", response(403, r#"{"errcode":"M_FORBIDDEN"}"#)),
        (
            "401 unknown token",
            response(401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#),
        ),
        ("empty body", response(200, "")),
        (
            "not JSON",
            response(200, "<html><body>Welcome to nginx!</body></html>"),
        ),
        (
            "a JSON array",
            response(200, r#"[{"m.homeserver":{"base_url":"x"}}]"#),
        ),
        (
            "no m.homeserver",
            json_response(&json!({"m.identity_server": {}})),
        ),
        (
            "m.homeserver not an object",
            json_response(&json!({"m.homeserver": "x"})),
        ),
        ("no base_url", json_response(&json!({"m.homeserver": {}}))),
        (
            "base_url not a string",
            json_response(&json!({"m.homeserver": {"base_url": 1}})),
        ),
        ("a redirect without Location", response(302, "")),
    ];
    for (what, answer) in cases {
        let mut c = discovering();
        // A refresh token in hand: a 401 to discovery must not start a refresh.
        c.refresh_token = Some(RefreshToken::new("syr_refresh"));
        let mut h = Harness::new(c);
        let req = h.request();
        h.respond(&req, answer);
        let error = h.one_error();
        assert_eq!(error.request, RequestKind::Discovery, "{what}");
        assert_eq!(error.class, ErrorClass::NeedsUser, "{what}");
        assert_eq!(
            discovery_error(&error).action(),
            DiscoveryAction::FailPrompt,
            "{what}: {error}"
        );
        assert!(error.to_string().contains("FAIL_PROMPT"), "{error}");
        assert_eq!(error.delay, defaults::BACKOFF_MAX, "{what}");
        assert_eq!(h.machine.state(), SyncState::Refused, "{what}");
        assert!(h.take_events().is_empty(), "{what}");
        let failed_at = h.now;
        let again = h.retry_after(failed_at, defaults::BACKOFF_MAX);
        assert_eq!(again.kind, RequestKind::Discovery, "{what}");
        assert_eq!(url(&again), WELL_KNOWN, "{what}");
        assert_eq!(
            h.machine.state(),
            SyncState::Refused,
            "{what}: still refused while retried"
        );
        // Fixed on the server: picked up without a restart.
        h.respond(&again, well_known("https://matrix.example.org"));
        let check = h.request();
        h.respond(&check, versions());
        assert_eq!(discovered(&mut h), "https://matrix.example.org", "{what}");
        let sync = h.request();
        assert!(matches!(sync.kind, RequestKind::Sync { .. }), "{what}");
        assert_eq!(h.machine.state(), SyncState::InitialSync, "{what}");
    }
}

#[test]
fn every_fail_error_answer_is_reported_and_retried_from_the_well_known() {
    let invalid = [
        "matrix.example.org",
        "",
        "ftp://matrix.example.org",
        "https://user:pw@matrix.example.org",
        "https://matrix.example.org/?x=1",
        "https://matrix.example.org/#x",
        "http://matrix.example.org",
        // A well-known read over https may not send the token over plain http, even to
        // loopback.
        "http://127.0.0.1:8008",
    ];
    for base_url in invalid {
        let mut h = Harness::new(discovering());
        let req = h.request();
        h.respond(&req, well_known(base_url));
        let error = h.one_error();
        assert!(
            matches!(
                discovery_error(&error),
                DiscoveryError::InvalidBaseUrl { .. }
            ),
            "{base_url}: {error}"
        );
        assert_eq!(discovery_error(&error).action(), DiscoveryAction::FailError);
        assert!(error.to_string().contains("FAIL_ERROR"), "{error}");
        assert_eq!(error.class, ErrorClass::NeedsUser);
        assert_eq!(error.delay, defaults::BACKOFF_MAX);
    }
    let versions_answers: Vec<(&str, http::Response<Vec<u8>>)> = vec![
        ("404", response(404, r#"{"errcode":"M_UNRECOGNIZED"}"#)),
        ("403", response(403, "")),
        (
            "redirect",
            response_with(301, &[("location", "https://x.org/")], ""),
        ),
        ("not JSON", response(200, "<html>It works!</html>")),
        (
            "no versions",
            json_response(&json!({"unstable_features": {}})),
        ),
        (
            "versions not strings",
            json_response(&json!({"versions": [1, 2]})),
        ),
    ];
    for (what, answer) in versions_answers {
        let mut h = Harness::new(discovering());
        let req = h.request();
        h.respond(&req, well_known("https://matrix.example.org"));
        let check = h.request();
        h.respond(&check, answer);
        let error = h.one_error();
        assert_eq!(error.request, RequestKind::VersionsCheck, "{what}");
        assert!(
            matches!(
                discovery_error(&error),
                DiscoveryError::VersionsStatus { .. } | DiscoveryError::NotVersions { .. }
            ),
            "{what}: {error}"
        );
        assert_eq!(discovery_error(&error).action(), DiscoveryAction::FailError);
        assert_eq!(error.class, ErrorClass::NeedsUser);
        assert_eq!(h.machine.state(), SyncState::Refused);
        // The retry starts over from the well-known.
        let again = h.next_request();
        assert_eq!(url(&again), WELL_KNOWN, "{what}");
    }
    // A versions check that fails transiently backs off, and starts over too.
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.respond(&req, well_known("https://matrix.example.org"));
    let check = h.request();
    h.reply(&check, 503, "");
    let error = h.one_error();
    assert_eq!(error.request, RequestKind::VersionsCheck);
    assert_eq!(error.class, ErrorClass::Transient);
    assert_eq!(url(&h.next_request()), WELL_KNOWN);
}

#[test]
fn redirects_are_followed_a_bounded_number_of_times() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.respond(
        &req,
        response_with(
            301,
            &[(
                "location",
                "https://www.example.org/.well-known/matrix/client",
            )],
            "",
        ),
    );
    assert!(h.take_errors().is_empty());
    let req = h.request();
    assert_eq!(req.kind, RequestKind::Discovery);
    unauthenticated(&req);
    assert_eq!(
        url(&req),
        "https://www.example.org/.well-known/matrix/client"
    );
    h.respond(&req, well_known("https://matrix.example.org"));
    let check = h.request();
    h.respond(&check, versions());
    assert_eq!(discovered(&mut h), "https://matrix.example.org");

    // A loop: followed at once up to the bound, then FAIL_PROMPT.
    let mut h = Harness::new(discovering());
    let loop_back = [("location", "/.well-known/matrix/client")];
    for _ in 0..defaults::MAX_DISCOVERY_REDIRECTS {
        let req = h.request();
        h.respond(&req, response_with(302, &loop_back, ""));
        assert!(h.take_errors().is_empty());
    }
    let req = h.request();
    h.respond(&req, response_with(302, &loop_back, ""));
    let error = h.one_error();
    assert!(matches!(
        discovery_error(&error),
        DiscoveryError::Redirect {
            reason: "too many redirects",
            ..
        }
    ));
    assert_eq!(error.delay, defaults::BACKOFF_MAX);

    // No downgrade from https to plain http.
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.respond(
        &req,
        response_with(302, &[("location", "http://example.org/wk")], ""),
    );
    let error = h.one_error();
    assert_eq!(
        discovery_error(&error).action(),
        DiscoveryAction::FailPrompt
    );
}

/// A server that always fails discovery, one way or another, for an hour: discovery requests
/// stay within the backoff schedule (the test kit asserts it at every request), and the
/// count stays under the documented bound.
#[test]
fn no_answer_makes_discovery_spin() {
    type Answer = fn(&OutgoingRequest) -> http::Response<Vec<u8>>;
    let hostile: [(&str, Answer); 4] = [
        ("well-known works, versions 500", |req| {
            if req.kind == RequestKind::Discovery {
                well_known("https://matrix.example.org")
            } else {
                response(500, "")
            }
        }),
        ("well-known works, versions garbage", |req| {
            if req.kind == RequestKind::Discovery {
                well_known("https://matrix.example.org")
            } else {
                response(200, "garbage")
            }
        }),
        ("a redirect loop", |_| {
            response_with(302, &[("location", "/.well-known/matrix/client")], "")
        }),
        ("garbage", |_| response(200, "\u{0}\u{1b}[2J")),
    ];
    for (what, answer) in hostile {
        // With jitter: the invariants check against the least delays.
        let mut h = Harness::new(Config::discover("example.org", TOKEN).unwrap());
        let mut sent = 0usize;
        while h.elapsed() < Duration::from_secs(3600) {
            let req = h.next_request();
            assert!(
                req.kind.name() == "discovery" || req.kind.name() == "versions",
                "{what}"
            );
            sent += 1;
            h.respond(&req, answer(&req));
            let _ = h.take_errors();
            assert!(h.take_events().is_empty());
        }
        // 8 steps below the 60 s cap, then one per at least 30 s: 128 attempts in an hour
        // at most, each at most MAX_DISCOVERY_REDIRECTS + 2 requests.
        let per_attempt = usize::from(defaults::MAX_DISCOVERY_REDIRECTS) + 2;
        assert!(sent <= per_attempt * (8 + 120), "{what}: {sent} requests");
        assert!(sent > 10, "{what}: retried ({sent})");
    }
}

#[test]
fn stop_during_discovery_ends_everything() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.machine.stop();
    h.drain();
    assert!(h.machine.poll_request().is_none());
    assert!(h
        .machine
        .handle_response(req.id, versions(), h.now)
        .is_err());
    assert_eq!(h.take_states().last(), Some(&SyncState::Stopped));
}

#[test]
fn server_names_and_user_ids_are_validated_at_config_time() {
    let hs = |input: &str| Config::discover(input, TOKEN).map(|c| c.homeserver);
    assert_eq!(hs("example.org").unwrap(), "https://example.org");
    assert_eq!(hs("@me:example.org").unwrap(), "https://example.org");
    assert_eq!(
        hs("matrix.example.org:8448").unwrap(),
        "https://matrix.example.org:8448"
    );
    // Loopback server names go over plain http, as loopback URLs may.
    assert_eq!(hs("@me:127.0.0.1:8008").unwrap(), "http://127.0.0.1:8008");
    assert_eq!(hs("localhost:8008").unwrap(), "http://localhost:8008");
    assert_eq!(hs("[::1]:8008").unwrap(), "http://[::1]:8008");
    assert_eq!(hs("127.0.0.2").unwrap(), "http://127.0.0.2");
    assert_eq!(hs("10.0.0.1").unwrap(), "https://10.0.0.1");
    for bad in [
        "",
        "@",
        "@me",
        "me:example.org",
        "exa mple.org",
        "example.org/path",
        "https://example.org",
        "example.org:99999",
        "ex\nample.org",
    ] {
        assert!(
            matches!(hs(bad), Err(ConfigError::InvalidServerName { .. })),
            "{bad:?}: {:?}",
            hs(bad)
        );
    }
    let shown = Config::discover("ex\u{1b}ample", TOKEN)
        .unwrap_err()
        .to_string();
    assert!(!shown.contains('\u{1b}'), "{shown}");
    // By hand: the well-known is at the root of a server name's address.
    let mut c = Config::new("https://example.org/matrix", TOKEN);
    c.discover = true;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::InvalidHomeserver { .. })
    ));
    let mut c = Config::new("https://localhost:8448", TOKEN);
    c.discover = true;
    assert_eq!(c.validate(), Ok(()));
    // Without discovery, nothing changes.
    let c = Config::new("https://matrix.example.org/", TOKEN);
    assert!(!c.discover);
    let mut h = Harness::new(c);
    assert_eq!(h.take_states(), [SyncState::InitialSync]);
    assert_eq!(h.machine.homeserver(), Some("https://matrix.example.org"));
    assert!(matches!(h.request().kind, RequestKind::Sync { .. }));
    assert!(h.take_events().is_empty());
}

#[test]
fn a_loopback_server_name_discovers_over_plain_http() {
    let mut c = Config::discover("@me:127.0.0.1:8008", TOKEN).unwrap();
    c.backoff.jitter = 0.0;
    let mut h = Harness::new(c);
    let req = h.request();
    assert_eq!(url(&req), "http://127.0.0.1:8008/.well-known/matrix/client");
    h.respond(&req, well_known("http://127.0.0.1:8008/"));
    let check = h.request();
    assert_eq!(url(&check), "http://127.0.0.1:8008/_matrix/client/versions");
    h.respond(&check, versions());
    assert_eq!(discovered(&mut h), "http://127.0.0.1:8008");
}

#[test]
fn once_found_the_configuration_names_the_base_url_and_the_event_line_carries_it() {
    let mut h = Harness::new(discovering());
    assert_eq!(h.machine.homeserver(), None, "not found yet");
    discover(&mut h, "https://matrix.example.org/");
    let events = h.take_events();
    let line = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(
        line,
        json!({"kind": "discovered", "type": "discovered", "homeserver": "https://matrix.example.org"})
    );
    assert_eq!(h.machine.homeserver(), Some("https://matrix.example.org"));
    // A copy of the machine's configuration syncs there at once, without discovering again.
    let copy = h.machine.config().clone();
    assert!(!copy.discover);
    let mut again = Harness::new(copy);
    let req = again.request();
    assert!(matches!(req.kind, RequestKind::Sync { .. }));
    assert!(url(&req).starts_with("https://matrix.example.org/_matrix/client/v3/sync"));
}

#[test]
fn a_machine_stopped_while_discovering_names_no_homeserver() {
    let mut h = Harness::new(discovering());
    let _req = h.request();
    h.stop();
    assert_eq!(h.machine.homeserver(), None);
}

#[test]
fn new_credentials_do_not_cut_short_the_wait_after_a_discovery_verdict() {
    let mut h = Harness::new(discovering());
    let req = h.request();
    h.respond(&req, response(200, "not json"));
    let error = h.one_error();
    assert_eq!(
        discovery_error(&error).action(),
        DiscoveryAction::FailPrompt
    );
    let failed_at = h.now;
    h.machine
        .set_access_token("syt_another_token", h.now)
        .expect("a usable token");
    assert_eq!(h.machine.state(), SyncState::Refused);
    let again = h.retry_after(failed_at, defaults::BACKOFF_MAX);
    assert_eq!(again.kind, RequestKind::Discovery);
}
