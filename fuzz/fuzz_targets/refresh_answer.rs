//! Arbitrary bytes as the 200 answer to a refresh, of either method, through the machine.
//!
//! Input layout (see `fuzz/seeds/README.md`):
//!
//! * byte 0, flags: bit 0 set = OAuth 2.0 token endpoint (else Matrix `/v3/refresh`); bit 1
//!   set = a refresh ahead of a known expiry (else a refresh after a 401);
//! * the rest: the body, where every `#` becomes the marker `CANARY` (so the fuzzer places
//!   the marker inside tokens, keys or anywhere else).
//!
//! Checks, against a reading of the body with `serde_json::Value` and the token rules written
//! out here apart from the crate's: the machine hands out credentials exactly when the answer
//! keeps the rules (an object; `access_token` a string, `refresh_token` absent, null or a
//! string, each non-empty, at most `MAX_TOKEN_BYTES`, visible ASCII; `expires_in_ms` and
//! `expires_in` absent, null or non-negative integers), and then the tokens are the answer's
//! (the old refresh token when it had none) and the lifetime the answer's raised to
//! `defaults::MIN_TOKEN_LIFETIME`; the stored access token is what the next request carries.
//! Otherwise the refusal is a transient `BadResponse` of the refresh with status 200, no
//! excerpt, no marker anywhere in its text (the reason never quotes the body), nothing
//! handed out, the old tokens kept, and a refresh retried after a wait. Every input and
//! output also passes the test kit's invariant checker.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use matrix_sync_service::defaults::MIN_TOKEN_LIFETIME;
use matrix_sync_service::{
    Config, ErrorClass, Failure, RefreshMethod, RefreshToken, RequestKind, SyncError,
    MAX_TOKEN_BYTES,
};
use matrix_sync_testkit::canned::response;
use matrix_sync_testkit::Checked;
use serde_json::Value;

const ACCESS: &str = "old_access_token";
const REFRESH: &str = "old_refresh_token";
const MARKER: &str = "CANARY";
const LIFETIME: Duration = Duration::from_secs(10);

/// A small valid first response.
const FIRST: &str = r#"{"next_batch":"s_first"}"#;

/// The rule of every credential, written out apart from the crate's.
fn keeps_the_rules(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// What the machine must hand out for `body`: `(access, refresh, lifetime)`, or `None` when
/// the answer must be refused.
fn expected(body: &[u8]) -> Option<(String, String, Option<Duration>)> {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let text = |field: &str| match answer.get(field) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => keeps_the_rules(s).then(|| Some(s.clone())),
        Some(_) => None,
    };
    let integer = |field: &str| match answer.get(field) {
        None | Some(Value::Null) => Some(None),
        Some(v) => v.as_u64().map(Some),
    };
    let access = text("access_token")??;
    let refresh = text("refresh_token")?.unwrap_or_else(|| REFRESH.to_owned());
    let lifetime = match (integer("expires_in_ms")?, integer("expires_in")?) {
        (Some(ms), _) => Some(Duration::from_millis(ms)),
        (None, Some(s)) => Some(Duration::from_secs(s)),
        (None, None) => None,
    };
    Some((access, refresh, lifetime.map(|l| l.max(MIN_TOKEN_LIFETIME))))
}

fn errors(m: &mut Checked) -> Vec<SyncError> {
    let mut errors = Vec::new();
    while let Some(error) = m.poll_error() {
        errors.push(error);
    }
    while m.poll_event().is_some() {}
    while m.poll_state().is_some() {}
    errors
}

fn bearer(req: &matrix_sync_service::OutgoingRequest) -> Option<&str> {
    req.http
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let oauth = flags & 1 == 1;
    let ahead = flags & 2 == 2;
    let mut marked = Vec::with_capacity(body.len());
    for &b in body {
        if b == b'#' {
            marked.extend_from_slice(MARKER.as_bytes());
        } else {
            marked.push(b);
        }
    }
    let body = marked;

    let mut config = Config::new("https://example.org", ACCESS);
    config.refresh_token = Some(RefreshToken::new(REFRESH));
    config.jitter_seed = 1;
    if oauth {
        config.refresh = RefreshMethod::OAuth {
            token_endpoint: "https://auth.example.org/oauth2/token".into(),
            client_id: "client".into(),
        };
    }
    if ahead {
        config.access_token_expires_in = Some(LIFETIME);
    }
    let mut now = Instant::now();
    let mut m = Checked::new(config, now).expect("valid configuration");

    // To the refresh: ahead of the expiry, or after a 401.
    let first = m.poll_request().expect("the first sync");
    if ahead {
        m.handle_response(first.id, response(200, FIRST), now)
            .unwrap();
        errors(&mut m);
        now += LIFETIME * 4 / 5;
        m.handle_timeout(now).unwrap();
    } else {
        m.handle_response(
            first.id,
            response(401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#),
            now,
        )
        .unwrap();
    }
    errors(&mut m);
    let refresh = m.poll_request().expect("the refresh is due");
    assert_eq!(refresh.kind, RequestKind::Refresh);

    m.handle_response(refresh.id, response(200, body.clone()), now)
        .expect("the answer is taken");
    let reported = errors(&mut m);
    match (m.poll_credentials(), expected(&body)) {
        (Some(new), Some((access, refresh, lifetime))) => {
            assert!(reported.is_empty(), "{reported:?}");
            assert_eq!(new.access_token.expose(), access);
            assert_eq!(
                new.refresh_token.as_ref().map(|t| t.expose()),
                Some(refresh.as_str())
            );
            assert_eq!(new.expires_in, lifetime);
            assert!(keeps_the_rules(new.access_token.expose()));
            assert!(new
                .refresh_token
                .as_ref()
                .is_some_and(|t| keeps_the_rules(t.expose())));
            assert!(new.expires_in.is_none_or(|l| l >= MIN_TOKEN_LIFETIME));
            m.handle_credentials_stored(now).unwrap();
            errors(&mut m);
            // The checker refuses a request whose URL contains a token: only tokens carrying
            // the marker cannot be in a URL by chance (a token "s" is in every sync's).
            if access.contains(MARKER) && refresh.contains(MARKER) {
                let next = m.poll_request().expect("a sync with the new token");
                assert_eq!(bearer(&next), Some(format!("Bearer {access}").as_str()));
            }
        }
        (None, None) => {
            assert_eq!(reported.len(), 1, "one refusal: {reported:?}");
            let error = &reported[0];
            assert_eq!(error.request, RequestKind::Refresh);
            assert_eq!(error.class, ErrorClass::Transient);
            assert!(error.delay > Duration::ZERO, "backed off: {error:?}");
            match &error.failure {
                Failure::BadResponse {
                    status: 200,
                    excerpt,
                    ..
                } => assert!(excerpt.is_empty(), "{excerpt:?}"),
                other => panic!("not a bad response: {other:?}"),
            }
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains(MARKER), "the body is quoted: {shown}");
            let config = m.config();
            assert_eq!(config.access_token.expose(), ACCESS);
            assert_eq!(
                config.refresh_token.as_ref().map(|t| t.expose()),
                Some(REFRESH)
            );
            // The refresh comes again after its wait; ahead of expiry, syncs go on meanwhile
            // with the old token.
            let mut retried = false;
            for _ in 0..4 {
                let req = match m.poll_request() {
                    Some(req) => req,
                    None => {
                        let wake = m.poll_timeout().expect("a wake-up");
                        now = now.max(wake);
                        m.handle_timeout(now).unwrap();
                        errors(&mut m);
                        m.poll_request().expect("due at the wake-up")
                    }
                };
                if req.kind == RequestKind::Refresh {
                    retried = true;
                    break;
                }
                assert!(ahead, "the access token is dead: only the refresh may go");
                assert_eq!(bearer(&req), Some(format!("Bearer {ACCESS}").as_str()));
                now += Duration::from_millis(300);
                m.handle_response(req.id, response(200, FIRST), now)
                    .unwrap();
                errors(&mut m);
            }
            assert!(retried, "the refresh is retried");
        }
        (handed, reference) => panic!(
            "the machine {} but the rules say {}",
            if handed.is_some() {
                "handed out credentials"
            } else {
                "refused"
            },
            if reference.is_some() {
                "keep them"
            } else {
                "refuse"
            }
        ),
    }
});
