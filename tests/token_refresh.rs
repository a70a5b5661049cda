//! Tokens that expire, through the machine on the simulated clock: refresh ahead of expiry and
//! after a 401, credentials handed out and used only once stored, the session ending when the
//! refresh token is refused, and credentials replaced live.

use std::time::Duration;

use matrix_sync_service::{
    Config, Credentials, ErrorClass, EventKind, Failure, InputError, OutgoingRequest,
    RefreshMethod, RequestKind, SyncState,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::Harness;
use serde_json::json;

const REFRESH: &str = "syr_refresh_secret_0";

fn config_with_refresh(expires_in: Option<Duration>) -> Config {
    let mut c = config_no_jitter();
    c.refresh_token = Some(matrix_sync_service::RefreshToken::new(REFRESH));
    c.access_token_expires_in = expires_in;
    c
}

fn bearer(req: &OutgoingRequest) -> Option<String> {
    req.http
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
}

fn refresh_answer(n: u32, expires_ms: Option<u64>) -> serde_json::Value {
    let mut answer = json!({
        "access_token": format!("syt_new_access_{n}"),
        "refresh_token": format!("syr_new_refresh_{n}"),
    });
    if let Some(ms) = expires_ms {
        answer["expires_in_ms"] = json!(ms);
    }
    answer
}

/// Takes the credentials handed out, checks nothing goes out before they are stored, and
/// stores them.
fn store(h: &mut Harness) -> Credentials {
    let new = h
        .machine
        .poll_credentials()
        .expect("credentials handed out");
    assert!(
        h.machine.poll_request().is_none(),
        "nothing is sent before the new credentials are stored"
    );
    assert!(h.machine.poll_credentials().is_none(), "handed out once");
    h.machine.handle_credentials_stored(h.now).unwrap();
    h.drain();
    new
}

/// Runs the first sync to Live.
fn go_live(h: &mut Harness) {
    let first = h.request();
    h.respond(
        &first,
        json_response(&message_sync("s1", "!r:localhost", "a", &["one"])),
    );
    assert_eq!(h.machine.state(), SyncState::Live);
}

#[test]
fn a_known_expiry_is_refreshed_ahead_of_time_and_the_new_token_used_once_stored() {
    let mut h = Harness::new(config_with_refresh(Some(Duration::from_secs(10))));
    go_live(&mut h);
    // Long-polls answered at 2 s intervals; the refresh comes at 8 s, before any 401.
    let mut kinds = Vec::new();
    let mut n = 1;
    let mut expected = format!("Bearer {TOKEN}");
    while h.elapsed() < Duration::from_secs(9) {
        let req = h.next_request();
        kinds.push(req.kind.clone());
        if req.kind == RequestKind::Refresh {
            assert_eq!(req.http.method(), "POST");
            assert_eq!(req.http.uri().path(), "/_matrix/client/v3/refresh");
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(req.http.body()).unwrap(),
                json!({ "refresh_token": REFRESH })
            );
            assert!(bearer(&req).is_none(), "no access token sent to /refresh");
            h.respond(&req, json_response(&refresh_answer(1, Some(10_000))));
            let new = store(&mut h);
            assert_eq!(new.access_token.expose(), "syt_new_access_1");
            assert_eq!(new.expires_in, Some(Duration::from_secs(10)));
            expected = "Bearer syt_new_access_1".to_owned();
            continue;
        }
        assert_eq!(bearer(&req).unwrap(), expected);
        h.now += Duration::from_secs(2);
        n += 1;
        let body = message_sync(&format!("s{n}"), "!r:localhost", &format!("m{n}"), &["x"]);
        h.respond(&req, json_response(&body));
    }
    let refreshes = kinds.iter().filter(|k| **k == RequestKind::Refresh).count();
    assert_eq!(refreshes, 1, "{kinds:?}");
    assert_eq!(expected, "Bearer syt_new_access_1");
    assert_eq!(
        h.machine.config().refresh_token.as_ref().unwrap().expose(),
        "syr_new_refresh_1"
    );
    assert!(h.errors().is_empty(), "{:?}", h.errors());
}

#[test]
fn a_401_is_refreshed_once_and_the_sync_retried_from_the_same_since() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(
        &poll,
        401,
        r#"{"errcode":"M_UNKNOWN_TOKEN","error":"Access token has expired","soft_logout":true}"#,
    );
    assert_eq!(h.take_errors().len(), 1);
    assert_ne!(h.machine.state(), SyncState::Refused);
    let refresh = h.request();
    assert_eq!(refresh.kind, RequestKind::Refresh);
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    store(&mut h);
    let retried = h.request();
    assert!(matches!(retried.kind, RequestKind::Sync { .. }));
    assert_eq!(bearer(&retried).unwrap(), "Bearer syt_new_access_1");
    assert_eq!(query(&retried).get("since").map(String::as_str), Some("s1"));
    // The same batch again: the event delivered before is not delivered twice.
    h.respond(
        &retried,
        json_response(&message_sync("s2", "!r:localhost", "a", &["one", "two"])),
    );
    let bodies: Vec<_> = h
        .events()
        .iter()
        .filter_map(|e| e.body.clone())
        .collect::<Vec<_>>();
    assert_eq!(bodies, ["one", "two"]);
    assert_eq!(h.machine.since(), Some("s2"));
}

#[test]
fn a_401_right_after_a_refresh_for_a_401_is_a_refusal_not_another_refresh() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let unknown = r#"{"errcode":"M_UNKNOWN_TOKEN","error":"gone"}"#;
    let poll = h.next_request();
    h.reply(&poll, 401, unknown);
    let refresh = h.request();
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    store(&mut h);
    let retried = h.request();
    h.reply(&retried, 401, unknown);
    assert_eq!(h.machine.state(), SyncState::Refused);
    let next = h.next_request();
    assert!(
        matches!(next.kind, RequestKind::Sync { .. }),
        "no second refresh"
    );
    assert!(
        h.elapsed() >= Duration::from_secs(60),
        "at the maximum backoff"
    );
}

#[test]
fn a_refused_refresh_ends_the_session_and_nothing_goes_faster_than_the_maximum_backoff() {
    for (status, body, errcode) in [
        (
            403,
            r#"{"errcode":"M_FORBIDDEN","error":"reused"}"#,
            "M_FORBIDDEN",
        ),
        (
            401,
            r#"{"errcode":"M_UNKNOWN_TOKEN","error":"unknown"}"#,
            "M_UNKNOWN_TOKEN",
        ),
    ] {
        let mut h = Harness::new(config_with_refresh(None));
        go_live(&mut h);
        let poll = h.next_request();
        h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
        let refresh = h.request();
        h.reply(&refresh, status, body);
        assert_eq!(h.machine.state(), SyncState::SessionEnded);
        let error = h.take_errors().pop().unwrap();
        assert!(
            matches!(error.failure, Failure::RefreshRefused { .. }),
            "{error}"
        );
        assert_eq!(error.failure.errcode(), Some(errcode));
        assert_eq!(error.class, ErrorClass::NeedsUser);
        let ended_at = h.now;
        let mut sent = Vec::new();
        for _ in 0..3 {
            let req = h.next_request();
            sent.push((req.kind.clone(), h.now - ended_at));
            h.reply(&req, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
        }
        assert!(
            sent.iter().all(|(kind, _)| *kind != RequestKind::Refresh),
            "{sent:?}"
        );
        let gaps: Vec<_> = sent
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .chain([sent[0].1])
            .collect();
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_secs(60)),
            "{gaps:?}"
        );
        assert_eq!(h.machine.state(), SyncState::SessionEnded);
    }
}

#[test]
fn a_failing_refresh_is_retried_with_backoff_keeping_the_old_tokens() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let mut at = Vec::new();
    for _ in 0..3 {
        let refresh = h.next_request();
        assert_eq!(refresh.kind, RequestKind::Refresh);
        at.push(h.elapsed());
        h.reply(&refresh, 502, "bad gateway");
        assert_eq!(h.machine.state(), SyncState::BackingOff);
    }
    assert!(at[1] - at[0] >= Duration::from_millis(500), "{at:?}");
    assert!(at[2] - at[1] >= Duration::from_secs(1), "{at:?}");
    assert_eq!(
        h.machine.config().refresh_token.as_ref().unwrap().expose(),
        REFRESH
    );
    let refresh = h.next_request();
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    store(&mut h);
    assert!(matches!(h.request().kind, RequestKind::Sync { .. }));
}

#[test]
fn a_proactive_refresh_that_fails_lets_syncs_go_on_while_the_token_lives() {
    let mut h = Harness::new(config_with_refresh(Some(Duration::from_secs(10))));
    go_live(&mut h);
    h.advance(Duration::from_secs(8));
    let refresh = h.next_request();
    assert_eq!(refresh.kind, RequestKind::Refresh);
    h.reply(&refresh, 503, "later");
    let sync = h.request();
    assert!(matches!(sync.kind, RequestKind::Sync { .. }), "not held");
    assert_eq!(bearer(&sync).unwrap(), format!("Bearer {TOKEN}"));
}

#[test]
fn credentials_the_application_could_not_store_are_never_used_and_offered_again() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let refresh = h.request();
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    let first = h.machine.poll_credentials().unwrap();
    h.machine
        .handle_credentials_not_stored("disk full", h.now)
        .unwrap();
    h.drain();
    assert_eq!(h.machine.state(), SyncState::CredentialsNotStored);
    let error = h.take_errors().pop().unwrap();
    assert!(
        matches!(&error.failure, Failure::CredentialsNotStored(r) if r == "disk full"),
        "{error}"
    );
    assert!(h.machine.poll_request().is_none());
    assert_eq!(
        h.machine.handle_credentials_stored(h.now),
        Err(InputError::NoCredentialsPending),
        "nothing is awaited until offered again"
    );
    let again = h.machine.poll_timeout().unwrap();
    assert!(again - h.now >= Duration::from_secs(60));
    h.advance(again - h.now);
    assert_eq!(h.machine.poll_credentials(), Some(first));
    h.machine.handle_credentials_stored(h.now).unwrap();
    h.drain();
    assert_eq!(h.machine.state(), SyncState::Live);
    let retried = h.request();
    assert_eq!(bearer(&retried).unwrap(), "Bearer syt_new_access_1");
}

#[test]
fn a_token_set_while_refused_is_used_at_once_keeping_since_and_dedup() {
    let mut h = Harness::new(config_no_jitter());
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    assert_eq!(h.machine.state(), SyncState::Refused);
    assert!(
        h.machine.poll_request().is_none(),
        "waiting at the maximum backoff"
    );
    assert_eq!(
        h.machine.set_access_token("has space", h.now),
        Err(InputError::UnusableCredentials)
    );
    h.machine.set_access_token("syt_replaced", h.now).unwrap();
    let retried = h.request();
    assert_eq!(bearer(&retried).unwrap(), "Bearer syt_replaced");
    assert_eq!(query(&retried).get("since").map(String::as_str), Some("s1"));
    h.respond(
        &retried,
        json_response(&message_sync("s2", "!r:localhost", "a", &["one", "two"])),
    );
    let bodies: Vec<_> = h.events().iter().filter_map(|e| e.body.clone()).collect();
    assert_eq!(bodies, ["one", "two"]);
}

#[test]
fn a_401_to_a_request_sent_with_replaced_credentials_is_retried_at_once() {
    let mut h = Harness::new(config_no_jitter());
    go_live(&mut h);
    let poll = h.next_request();
    h.machine.set_access_token("syt_replaced", h.now).unwrap();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    assert_eq!(h.machine.state(), SyncState::Live);
    let retried = h.request();
    assert_eq!(bearer(&retried).unwrap(), "Bearer syt_replaced");
}

#[test]
fn a_refresh_answer_for_replaced_credentials_or_after_its_deadline_changes_nothing() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let refresh = h.request();
    h.machine
        .set_credentials(
            Credentials::new("syt_app").with_refresh_token("syr_app"),
            h.now,
        )
        .unwrap();
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    assert!(
        h.machine.poll_credentials().is_none(),
        "the application's credentials win"
    );
    let sync = h.request();
    assert_eq!(bearer(&sync).unwrap(), "Bearer syt_app");

    // A refresh past its deadline: its late answer is refused as stale.
    h.reply(&sync, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let refresh = h.request();
    h.advance(refresh.deadline - h.now);
    let late =
        h.machine
            .handle_response(refresh.id, json_response(&refresh_answer(2, None)), h.now);
    assert_eq!(late, Err(InputError::StaleRequest(refresh.id)));
    assert!(h.machine.poll_credentials().is_none());
    let retry = h.next_request();
    assert_eq!(retry.kind, RequestKind::Refresh, "the refresh is retried");
    assert_eq!(
        h.machine.config().refresh_token.as_ref().unwrap().expose(),
        "syr_app"
    );
}

#[test]
fn stop_racing_a_refresh_ends_everything() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let refresh = h.request();
    h.machine.stop();
    let answer =
        h.machine
            .handle_response(refresh.id, json_response(&refresh_answer(1, None)), h.now);
    assert_eq!(answer, Err(InputError::Stopped));
    assert!(h.machine.poll_credentials().is_none());
    assert!(h.machine.poll_request().is_none());
    assert_eq!(
        h.machine.handle_credentials_stored(h.now),
        Err(InputError::Stopped)
    );
    h.drain();
    assert_eq!(
        h.log.states.last().map(|(_, s)| s),
        Some(&SyncState::Stopped)
    );
}

#[test]
fn a_401_in_the_middle_of_a_gap_fill_refreshes_and_the_same_page_is_fetched_again() {
    let mut c = config_with_refresh(None);
    c.since = Some("s0".into());
    let mut h = Harness::new(c);
    let first = h.request();
    let limited = json!({
        "next_batch": "s1",
        "rooms": {"join": {"!r:localhost": {"timeline": {
            "limited": true, "prev_batch": "p1",
            "events": [{"type": "m.room.message", "event_id": "$t:localhost",
                "sender": "@a:localhost", "origin_server_ts": 2,
                "content": {"msgtype": "m.text", "body": "timeline"}}]
        }}}}
    });
    h.respond(&first, json_response(&limited));
    let page = h.request();
    assert!(matches!(page.kind, RequestKind::Messages { .. }));
    h.reply(&page, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    assert!(h.events().is_empty());
    let refresh = h.request();
    assert_eq!(refresh.kind, RequestKind::Refresh);
    h.respond(&refresh, json_response(&refresh_answer(1, None)));
    store(&mut h);
    let again = h.request();
    assert_eq!(again.http.uri(), page.http.uri(), "the same page");
    assert_eq!(bearer(&again).unwrap(), "Bearer syt_new_access_1");
    let history = json!({
        "start": "p1",
        "chunk": [{"type": "m.room.message", "event_id": "$h:localhost",
            "sender": "@a:localhost", "origin_server_ts": 1, "room_id": "!r:localhost",
            "content": {"msgtype": "m.text", "body": "history"}}]
    });
    h.respond(&again, json_response(&history));
    let bodies: Vec<_> = h.events().iter().filter_map(|e| e.body.clone()).collect();
    assert_eq!(bodies, ["history", "timeline"]);
    assert_eq!(h.machine.since(), Some("s1"));
}

#[test]
fn oauth_refresh_posts_the_form_and_invalid_grant_ends_the_session() {
    let mut c = config_with_refresh(None);
    c.refresh = RefreshMethod::OAuth {
        token_endpoint: "http://127.0.0.1:9/oauth2/token".into(),
        client_id: "client-1".into(),
    };
    let mut h = Harness::new(c);
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(
        &poll,
        401,
        r#"{"errcode":"M_UNKNOWN_TOKEN","soft_logout":false}"#,
    );
    let refresh = h.request();
    assert_eq!(refresh.http.uri(), "http://127.0.0.1:9/oauth2/token");
    assert_eq!(
        std::str::from_utf8(refresh.http.body()).unwrap(),
        format!("grant_type=refresh_token&refresh_token={REFRESH}&client_id=client-1")
    );
    h.reply(
        &refresh,
        400,
        r#"{"error":"invalid_grant","error_description":"session ended"}"#,
    );
    assert_eq!(h.machine.state(), SyncState::SessionEnded);
    let error = h.take_errors().pop().unwrap();
    assert_eq!(error.failure.errcode(), Some("invalid_grant"));
}

#[test]
fn no_token_shows_in_debug_or_in_errors() {
    let mut h = Harness::new(config_with_refresh(None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    let refresh = h.request();
    let shown = format!("{refresh:?} {:?}", h.machine.config());
    assert!(
        !shown.contains(REFRESH) && !shown.contains(TOKEN),
        "{shown}"
    );
    // An answer that does not parse is reported without quoting it.
    h.reply(&refresh, 200, format!(r#"{{"refresh_token":"{REFRESH}"}}"#));
    let errors = h.take_errors();
    let shown = format!("{errors:?} {}", errors[0]);
    assert!(!shown.contains(REFRESH), "{shown}");
    let refresh = h.next_request();
    h.respond(&refresh, json_response(&refresh_answer(7, None)));
    let new = h.machine.poll_credentials().unwrap();
    let shown = format!("{new:?}");
    assert!(!shown.contains("syr_new_refresh_7") && !shown.contains("syt_new_access_7"));
    assert!(matches!(
        h.events().last().map(|e| &e.kind),
        Some(EventKind::Checkpoint(_))
    ));
}

// ---- refresh answers whose tokens break the rules -----------------------------------------------

/// Marks every token text of the answers below: no report may show it.
const SECRET: &str = "SECRET";

fn oauth() -> RefreshMethod {
    RefreshMethod::OAuth {
        token_endpoint: "http://127.0.0.1:9/oauth2/token".into(),
        client_id: "client-1".into(),
    }
}

fn config_for(method: &RefreshMethod, expires_in: Option<Duration>) -> Config {
    let mut c = config_with_refresh(expires_in);
    c.refresh = method.clone();
    c
}

/// A 200 answer of `method`'s shape (Matrix: `expires_in_ms`; OAuth 2.0: `token_type` and
/// `expires_in` in seconds) with the tokens given (a field left out when `None`).
fn answer_of(
    method: &RefreshMethod,
    access: Option<&str>,
    refresh: Option<&str>,
    lifetime_ms: u64,
) -> serde_json::Value {
    let mut answer = json!({});
    if let Some(access) = access {
        answer["access_token"] = json!(access);
    }
    if let Some(refresh) = refresh {
        answer["refresh_token"] = json!(refresh);
    }
    match method {
        RefreshMethod::OAuth { .. } => {
            answer["token_type"] = json!("Bearer");
            answer["expires_in"] = json!(lifetime_ms / 1000);
        }
        _ => answer["expires_in_ms"] = json!(lifetime_ms),
    }
    answer
}

/// Every way a refresh answer's tokens can break the rule: the access token, the refresh
/// token (the other one valid, and secret too), and the reason the report must give.
fn bad_shapes() -> Vec<(Option<String>, Option<String>, &'static str)> {
    let ok = || Some(format!("{SECRET}_fine_token"));
    let long = || Some(format!("{SECRET}{}", "a".repeat(100_000)));
    vec![
        (long(), ok(), "access_token is longer than 4096 bytes"),
        (ok(), long(), "refresh_token is longer than 4096 bytes"),
        (Some(String::new()), ok(), "access_token is empty"),
        (ok(), Some(String::new()), "refresh_token is empty"),
        (
            Some(format!("{SECRET}\u{7}bell")),
            ok(),
            "access_token contains a control character",
        ),
        (
            ok(),
            Some(format!("{SECRET}\nline")),
            "refresh_token contains a control character",
        ),
        (
            Some(format!("{SECRET} space")),
            ok(),
            "access_token has a byte that is not visible ASCII",
        ),
        (
            ok(),
            Some(format!("{SECRET}_caf\u{e9}")),
            "refresh_token has a byte that is not visible ASCII",
        ),
        (None, ok(), "access_token is missing"),
    ]
}

/// Plays a sync answered 401, then the refreshes it brings, each answered by `answer` (status
/// and body); returns when each refresh was sent and the errors reported for them.
fn refreshes_after_a_401(
    method: &RefreshMethod,
    answer: impl Fn() -> (u16, Vec<u8>),
) -> (Harness, Vec<Duration>, Vec<matrix_sync_service::SyncError>) {
    let mut h = Harness::new(config_for(method, None));
    go_live(&mut h);
    let poll = h.next_request();
    h.reply(&poll, 401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    h.take_errors();
    let mut at = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..3 {
        let refresh = h.next_request();
        assert_eq!(
            refresh.kind,
            RequestKind::Refresh,
            "only refreshes while the token is dead"
        );
        at.push(h.elapsed());
        let (status, body) = answer();
        h.reply(&refresh, status, body);
        assert_eq!(h.machine.state(), SyncState::BackingOff);
        assert!(h.machine.poll_credentials().is_none(), "nothing handed out");
        errors.extend(h.take_errors());
    }
    (h, at, errors)
}

#[test]
fn a_refresh_answer_breaking_the_token_rules_is_a_failure_backed_off_like_a_5xx_keeping_the_old_tokens(
) {
    for method in [RefreshMethod::Matrix, oauth()] {
        let (_, reference, _) = refreshes_after_a_401(&method, || (502, b"bad gateway".to_vec()));
        for (access, refresh, reason) in bad_shapes() {
            let body = answer_of(&method, access.as_deref(), refresh.as_deref(), 60_000);
            let body = serde_json::to_vec(&body).unwrap();
            let (mut h, at, errors) = refreshes_after_a_401(&method, || (200, body.clone()));
            let case = format!("{method:?}: {reason}");
            assert_eq!(at, reference, "{case}: the backoff of a 5xx");
            assert_eq!(errors.len(), 3, "{case}");
            for error in &errors {
                assert_eq!(error.request, RequestKind::Refresh, "{case}");
                assert_eq!(error.class, ErrorClass::Transient, "{case}");
                match &error.failure {
                    Failure::BadResponse {
                        status: 200,
                        reason: given,
                        excerpt,
                    } => {
                        assert_eq!(given, reason, "{case}");
                        assert!(excerpt.is_empty(), "{case}: {excerpt:?}");
                    }
                    other => panic!("{case}: {other:?}"),
                }
                let shown = format!("{error} {error:?}");
                assert!(!shown.contains(SECRET), "{case}: {shown}");
            }
            // The old tokens are still the ones in force, and the next answer that keeps the
            // rules is taken as usual.
            let config = h.machine.config();
            assert_eq!(config.access_token.expose(), TOKEN, "{case}");
            assert_eq!(
                config.refresh_token.as_ref().unwrap().expose(),
                REFRESH,
                "{case}"
            );
            let refresh = h.next_request();
            assert_eq!(refresh.kind, RequestKind::Refresh);
            h.respond(
                &refresh,
                json_response(&answer_of(
                    &method,
                    Some("syt_good"),
                    Some("syr_good"),
                    60_000,
                )),
            );
            assert_eq!(store(&mut h).access_token.expose(), "syt_good");
            let sync = h.request();
            assert_eq!(bearer(&sync).unwrap(), "Bearer syt_good", "{case}");
            assert!(
                h.log.requests.iter().all(|r| r
                    .token
                    .as_deref()
                    .is_none_or(|t| t == TOKEN || t == "syt_good")),
                "{case}: only the old and the good token were ever sent"
            );
        }
    }
}

#[test]
fn a_bad_answer_to_a_refresh_ahead_of_expiry_lets_syncs_go_on_with_the_old_token_while_it_lives() {
    for method in [RefreshMethod::Matrix, oauth()] {
        let mut h = Harness::new(config_for(&method, Some(Duration::from_secs(10))));
        go_live(&mut h);
        h.advance(Duration::from_secs(8));
        let refresh = h.next_request();
        assert_eq!(refresh.kind, RequestKind::Refresh);
        let long = format!("{SECRET}{}", "a".repeat(100_000));
        h.respond(
            &refresh,
            json_response(&answer_of(&method, Some(&long), Some("syr_next"), 10_000)),
        );
        assert!(h.machine.poll_credentials().is_none());
        let error = h.take_errors().pop().expect("the refusal reported");
        assert!(
            matches!(&error.failure, Failure::BadResponse { reason, .. }
                if reason == "access_token is longer than 4096 bytes"),
            "{error}"
        );
        // Not held: the old access token still lives, so the sync goes out at once with it.
        let sync = h.request();
        assert!(matches!(sync.kind, RequestKind::Sync { .. }), "{method:?}");
        assert_eq!(bearer(&sync).unwrap(), format!("Bearer {TOKEN}"));
        // Long-polls answered every 100 ms, with the old token, until the refresh is retried
        // after its backoff.
        let mut n = 2;
        let mut sync = sync;
        loop {
            assert_eq!(bearer(&sync).unwrap(), format!("Bearer {TOKEN}"));
            h.now += Duration::from_millis(100);
            let body = message_sync(&format!("s{n}"), "!r:localhost", &format!("m{n}"), &["x"]);
            h.respond(&sync, json_response(&body));
            n += 1;
            let next = h.next_request();
            if next.kind == RequestKind::Refresh {
                break;
            }
            sync = next;
        }
        assert!(
            h.elapsed() >= Duration::from_millis(8_500),
            "retried after its backoff, not before: {:?}",
            h.elapsed()
        );
        assert!(n > 4, "syncs went on meanwhile");
        assert_eq!(
            h.machine.config().refresh_token.as_ref().unwrap().expose(),
            REFRESH
        );
    }
}

#[test]
fn a_lifetime_below_the_floor_is_raised_to_it_so_refreshes_never_run_in_a_loop() {
    let floor = matrix_sync_service::defaults::MIN_TOKEN_LIFETIME;
    for (method, lifetime_ms) in [
        (RefreshMethod::Matrix, 0),
        (RefreshMethod::Matrix, 1),
        (oauth(), 0),
    ] {
        let mut h = Harness::new(config_for(&method, Some(Duration::from_secs(10))));
        go_live(&mut h);
        let mut refreshed_at = Vec::new();
        let mut syncs_between = vec![0];
        let mut n = 1;
        while h.elapsed() < Duration::from_secs(60) {
            let req = h.next_request();
            if req.kind == RequestKind::Refresh {
                refreshed_at.push(h.elapsed());
                let access = format!("syt_short_{n}");
                h.respond(
                    &req,
                    json_response(&answer_of(&method, Some(&access), None, lifetime_ms)),
                );
                let new = store(&mut h);
                assert_eq!(new.expires_in, Some(floor), "{method:?} {lifetime_ms} ms");
                syncs_between.push(0);
                continue;
            }
            *syncs_between.last_mut().unwrap() += 1;
            h.now += Duration::from_millis(500);
            n += 1;
            let body = message_sync(&format!("s{n}"), "!r:localhost", &format!("m{n}"), &["x"]);
            h.respond(&req, json_response(&body));
        }
        let case = format!("{method:?}, {lifetime_ms} ms: refreshes at {refreshed_at:?}");
        // The first at four fifths of the configured 10 s, then one per four fifths of the floor.
        assert!(refreshed_at.len() >= 10, "{case}");
        assert!(refreshed_at.len() <= 1 + 52 / 4, "{case}");
        for pair in refreshed_at.windows(2) {
            assert!(pair[1] - pair[0] >= floor * 4 / 5, "{case}");
        }
        assert!(
            syncs_between.iter().skip(1).all(|n| *n >= 1),
            "{case}: a sync between any two refreshes ({syncs_between:?})"
        );
        assert!(h.errors().is_empty(), "{case}: {:?}", h.errors());
    }
}

// ---- the simulation: a server whose tokens expire ----------------------------------------------

mod simulated {
    use std::collections::HashMap;
    use std::time::Duration;

    use matrix_sync_service::{EventKind, RefreshToken, RequestKind, SyncState};
    use matrix_sync_testkit::rng::SplitMix64;
    use matrix_sync_testkit::sim::{self, secs, CredentialAnswers, Kind, Reply, Sent, Server, Sim};

    /// A homeserver whose access tokens live `lifetime` and whose refresh tokens rotate, with
    /// the failures of a bad day: 500s on syncs and refreshes, refresh answers so slow they
    /// arrive after the machine gave up, and limited timelines whose gap fill may meet an
    /// expired token.
    struct Expiring {
        rng: SplitMix64,
        lifetime: Duration,
        /// The valid access token and when it dies; the valid refresh token, and the one it
        /// replaced, valid (as Synapse has it) until the new access token is used.
        access: (String, Duration),
        refresh: String,
        previous_refresh: Option<String>,
        refresh_latency: Duration,
        issued: u32,
        next_batch: u64,
        next_event: u64,
        /// Every event id the server sent, and how many times it was delivered.
        sent: HashMap<String, u32>,
        unauthorized: u32,
        slow_refreshes: u32,
    }

    const ROOM: &str = "!r:example.org";

    impl Expiring {
        fn new(seed: u64, lifetime: Duration) -> Self {
            Self {
                rng: SplitMix64::new(seed),
                lifetime,
                access: (sim::TOKEN.to_owned(), lifetime),
                refresh: "rt0".to_owned(),
                previous_refresh: None,
                refresh_latency: Duration::from_millis(20),
                issued: 0,
                next_batch: 1,
                next_event: 1,
                sent: HashMap::new(),
                unauthorized: 0,
                slow_refreshes: 0,
            }
        }

        fn event(&mut self) -> String {
            let n = self.next_event;
            self.next_event += 1;
            let id = format!("$ev{n}");
            self.sent.insert(id.clone(), 0);
            format!(
                r#"{{"type":"m.room.message","event_id":"{id}","sender":"@a:example.org","origin_server_ts":{n},"content":{{"msgtype":"m.text","body":"m{n}"}}}}"#
            )
        }

        fn json(status: u16, body: String) -> Reply {
            Reply::Response {
                latency: Duration::from_millis(20),
                status,
                headers: vec![("content-type", "application/json".to_owned())],
                body: body.into_bytes(),
            }
        }
    }

    impl Server for Expiring {
        fn answer(&mut self, r: &Sent, http: &http::Request<Vec<u8>>) -> Reply {
            if r.kind == Kind::Refresh {
                let asked: serde_json::Value = serde_json::from_slice(http.body()).unwrap();
                let asked = asked["refresh_token"].as_str().unwrap();
                if asked != self.refresh && Some(asked) != self.previous_refresh.as_deref() {
                    return Self::json(403, r#"{"errcode":"M_FORBIDDEN"}"#.into());
                }
                if self.rng.chance(0.15) {
                    return Reply::error(Duration::from_millis(20), 503, "M_UNKNOWN", "");
                }
                self.issued += 1;
                let n = self.issued;
                let (access, refresh) = (format!("at{n}"), format!("rt{n}"));
                let answer = format!(
                    r#"{{"access_token":"{access}","refresh_token":"{refresh}","expires_in_ms":{}}}"#,
                    self.lifetime.as_millis()
                );
                // The server takes the rotation whether or not the answer arrives in time.
                self.access = (access, r.at + self.lifetime);
                let replaced = std::mem::replace(&mut self.refresh, refresh);
                if Some(asked) != self.previous_refresh.as_deref() {
                    self.previous_refresh = Some(replaced);
                }
                if self.rng.chance(0.1) {
                    self.slow_refreshes += 1;
                    let mut late = Self::json(200, answer);
                    if let Reply::Response { latency, .. } = &mut late {
                        *latency = r.deadline - r.at + secs(5);
                    }
                    return late;
                }
                let mut reply = Self::json(200, answer);
                if let Reply::Response { latency, .. } = &mut reply {
                    *latency = self.refresh_latency;
                }
                return reply;
            }
            let (valid, dies) = &self.access;
            if r.token.as_deref() != Some(valid.as_str()) || r.at >= *dies {
                self.unauthorized += 1;
                return Reply::error(Duration::from_millis(20), 401, "M_UNKNOWN_TOKEN", "");
            }
            // The new access token is used: the refresh token it replaced is dead.
            self.previous_refresh = None;
            match &r.kind {
                Kind::Messages { .. } => {
                    let history: Vec<_> = (0..2).map(|_| self.event()).collect();
                    Self::json(
                        200,
                        format!(r#"{{"start":"x","chunk":[{}]}}"#, history.join(",")),
                    )
                }
                _ if self.rng.chance(0.1) => {
                    Reply::error(Duration::from_millis(20), 500, "M_UNKNOWN", "")
                }
                _ => {
                    let n = self.next_batch;
                    self.next_batch += 1;
                    let limited = r.since.is_some() && self.rng.chance(0.3);
                    let events: Vec<_> = (0..self.rng.range(1, 3)).map(|_| self.event()).collect();
                    let held = r.timeout.unwrap_or_default().min(secs(20));
                    let mut reply = Self::json(
                        200,
                        format!(
                            r#"{{"next_batch":"s{n}","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"events":[{}],"limited":{limited},"prev_batch":"p{n}"}}}}}}}}}}"#,
                            events.join(",")
                        ),
                    );
                    if let Reply::Response { latency, .. } = &mut reply {
                        *latency = held;
                    }
                    reply
                }
            }
        }
    }

    fn config() -> matrix_sync_service::Config {
        let mut c = sim::config();
        c.refresh_token = Some(RefreshToken::new("rt0"));
        c.access_token_expires_in = Some(secs(600));
        c.jitter_seed = 5;
        c
    }

    #[test]
    fn a_day_of_expiring_tokens_loses_and_repeats_nothing_and_every_invariant_holds() {
        let mut gap_fill_401s = 0;
        for seed in 0..4 {
            let mut sim = Sim::scripted(config(), Expiring::new(seed, secs(600)));
            sim.credentials = CredentialAnswers::Stored { failures: 2 };
            sim.run_until(secs(24 * 3600));
            for e in &sim.log.events {
                if let Some(id) = e.id() {
                    *sim.server
                        .sent
                        .get_mut(id)
                        .expect("an event the server sent") += 1;
                }
            }
            // Every event of a batch whose checkpoint was handed on was delivered once; only
            // the batch in flight at the end may be missing.
            let missing = sim.server.sent.values().filter(|n| **n == 0).count();
            let twice = sim.server.sent.values().filter(|n| **n > 1).count();
            assert_eq!(twice, 0, "seed {seed}: delivered twice");
            assert!(missing <= 8, "seed {seed}: {missing} never delivered");
            let refreshes = sim
                .log
                .requests
                .iter()
                .filter(|r| r.kind == Kind::Refresh)
                .count();
            let late = &sim.log.late_answers;
            assert!(
                late.iter().all(|l| l.result.is_err()),
                "a late answer was taken"
            );
            assert!(
                refreshes >= 144,
                "seed {seed}: {refreshes} refreshes in a day; states {:?}; last errors {:?}",
                sim.log.states.iter().rev().take(6).collect::<Vec<_>>(),
                sim.log
                    .errors
                    .iter()
                    .rev()
                    .take(4)
                    .map(|e| (e.at, &e.failure, e.delay))
                    .collect::<Vec<_>>()
            );
            assert!(
                sim.server.unauthorized <= 2 * sim.server.slow_refreshes + 2,
                "seed {seed}: {} 401s with {} slow refreshes",
                sim.server.unauthorized,
                sim.server.slow_refreshes
            );
            assert_ne!(sim.machine.state(), SyncState::SessionEnded, "seed {seed}");
            let in_gap_fills = sim
                .log
                .errors
                .iter()
                .filter(|e| matches!(e.failure, matrix_sync_service::Failure::UnknownToken { .. }))
                .filter_map(|e| e.request.map(|i| &sim.log.requests[i].kind))
                .filter(|k| matches!(k, Kind::Messages { .. }))
                .count();
            gap_fill_401s += in_gap_fills;
            sim::assert_valid_transitions(&sim.log.states);
            eprintln!(
                "seed {seed}: {} events, {refreshes} refreshes ({} late answers refused), {} 401s, {} syncs",
                sim.server.sent.len(),
                late.len(),
                sim.server.unauthorized,
                sim.log.requests.iter().filter(|r| r.kind == Kind::Sync).count()
            );
        }
        assert!(
            gap_fill_401s > 0,
            "no refresh in the middle of a gap fill was played"
        );
        eprintln!("{gap_fill_401s} gap fills met an expired token and were refreshed");
    }

    #[test]
    fn a_stop_racing_a_refresh_ends_everything_and_its_answer_is_refused() {
        let mut server = Expiring::new(9, secs(600));
        server.refresh_latency = secs(5);
        let mut sim = Sim::scripted(config(), server);
        // The refresh is due at 480 s; step a second at a time so its answer is still on
        // the way when the stop comes.
        sim.run_until(secs(470));
        while sim
            .machine
            .in_flight()
            .is_none_or(|f| *f.kind != RequestKind::Refresh)
        {
            assert!(sim.elapsed() < secs(600), "no refresh sent");
            sim.step_until(sim.elapsed() + secs(1));
        }
        assert_eq!(
            sim.machine.in_flight().map(|f| f.kind.clone()),
            Some(RequestKind::Refresh)
        );
        sim.stop();
        sim.run_until(sim.elapsed() + secs(120));
        assert_eq!(
            sim.log.late_answers.len(),
            1,
            "the refresh answer came and was refused"
        );
        assert!(sim.log.late_answers[0].result.is_err());
        assert_eq!(sim.log.states.last().map(|s| s.1), Some(SyncState::Stopped));
        assert!(sim
            .log
            .events
            .last()
            .is_none_or(|e| matches!(e.kind, EventKind::Checkpoint(_))));
    }
}
