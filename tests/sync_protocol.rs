//! The sync protocol as sent (contract §3 and §9): the long-poll `timeout` in the query, the
//! first request's `full_state`, and the access token only in the `Authorization` header.

use std::time::Duration;

use matrix_sync_service::RequestKind;
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::sim::Harness;

// ---- timeouts in the query -------------------------------------------------------------------------

#[test]
fn timeout_is_zero_when_catching_up_and_the_long_poll_otherwise() {
    let mut c = config_no_jitter();
    c.long_poll_timeout = Duration::from_millis(12_345);
    let mut h = Harness::new(c);
    let mut seen = Vec::new();
    let mut token = 0;
    // ok, ok, ok, error, ok, ok, error, error, ok, ok
    let script = [
        true, true, true, false, true, true, false, false, true, true,
    ];
    for ok in script {
        let req = h.next_request();
        let t = timeout_param(&req);
        let RequestKind::Sync { timeout } = req.kind else {
            panic!("sync expected")
        };
        assert_eq!(t, timeout.as_millis().to_string());
        seen.push(t);
        if ok {
            token += 1;
            h.respond(&req, json_response(&empty_sync(&format!("s{token}"))));
        } else {
            h.reply(&req, 502, "");
        }
    }
    assert_eq!(
        seen,
        ["0", "12345", "12345", "12345", "0", "12345", "12345", "0", "0", "12345"]
    );
}

// ---- the token -------------------------------------------------------------------------------------

#[test]
fn the_token_is_only_in_the_authorization_header() {
    let c = config();
    assert!(!format!("{c:?}").contains(TOKEN));
    assert!(!format!("{:?}", c.access_token).contains(TOKEN));
    let mut h = Harness::new(c);
    assert!(!format!("{:?}", h.machine).contains(TOKEN));
    let mut requests = Vec::new();
    let req = h.request();
    h.reply(&req, 401, fixture(E401));
    requests.push(req);
    // A gap, to get a /messages request too.
    let gap = fixture_json("synapse-gap-sync.json");
    let req = h.next_request();
    h.respond(
        &req,
        json_response(&empty_sync(gap["previous_since"].as_str().unwrap())),
    );
    requests.push(req);
    let req = h.request();
    h.respond(&req, json_response(&gap["response"]));
    requests.push(req);
    let req = h.request();
    assert!(matches!(req.kind, RequestKind::Messages { .. }));
    requests.push(req);
    for req in &requests {
        let auth = req.http.headers().get(http::header::AUTHORIZATION).unwrap();
        assert_eq!(auth.to_str().unwrap(), format!("Bearer {TOKEN}"));
        assert!(auth.is_sensitive());
        assert_eq!(req.http.headers().len(), 1, "{:?}", req.http.headers());
        assert!(!req.http.uri().to_string().contains(TOKEN));
        assert!(!query(req).contains_key("access_token"));
        assert!(!format!("{req:?}").contains(TOKEN));
        assert!(!format!("{:?}", req.http).contains(TOKEN));
    }
    for err in h.errors() {
        assert!(!format!("{err:?}").contains(TOKEN));
        assert!(!err.to_string().contains(TOKEN));
    }
    assert!(!format!("{:?}", h.machine).contains(TOKEN));
}

// ---- full_state ----------------------------------------------------------------------------------

#[test]
fn full_state_is_asked_for_on_the_first_request_only_and_only_when_configured() {
    let mut h = Harness::new(config());
    let req = h.request();
    assert!(!query(&req).contains_key("full_state"));

    let mut c = config();
    c.full_state = true;
    let mut h = Harness::new(c);
    let req = h.request();
    assert_eq!(query(&req)["full_state"], "true");
    h.respond(&req, json_response(&empty_sync("s1")));
    let req = h.next_request();
    assert!(!query(&req).contains_key("full_state"), "only the first");
}
