//! Credentials and their refresh: what the machine holds, the refresh request for either
//! method, and how its answer is read.
//!
//! Why the rules are what they are:
//!
//! * **Refresh first, whatever `soft_logout` says.** Synapse answers an expired token with
//!   `soft_logout: true`, Synapse behind an OAuth 2.0 server with `soft_logout: false`; with a
//!   refresh token in hand, a refresh is the one thing that may help in both cases.
//! * **Persist before use.** With rotation, a refresh answer carries the only valid refresh
//!   token from then on: once the new access token is used, the old refresh token is dead
//!   (Synapse) or already was (OAuth 2.0 rotation). Had the application not stored the new
//!   pair, a crash would end the session for good. So the machine hands new credentials out
//!   and uses them only once the application says it stored them.
//! * **A refused refresh ends the session.** 401, 403 and 400 (`invalid_grant`) from the
//!   refresh endpoint mean the refresh token itself is unknown, reused or expired: trying
//!   again cannot help, so no more refreshes are made until new credentials are set.

use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONTENT_TYPE};
use serde::Deserialize;

use crate::config::Config;
use crate::credentials::{AccessToken, Credentials, RefreshMethod, RefreshToken};
use crate::defaults;
use crate::error::Failure;

/// Where the machine's credentials stand. One enum, so that "a refresh is due", "new tokens
/// wait to be stored" and "the session is over" cannot be true together.
#[derive(Clone, Debug)]
pub(crate) enum Auth {
    /// The access token is in use. `refresh_at`: when to refresh ahead of expiry (known
    /// expiry and a refresh token only). `unproven`: it came from a refresh after a 401 and
    /// no request has worked with it yet, so another 401 is not refreshed again.
    Valid {
        refresh_at: Option<Instant>,
        unproven: bool,
    },
    /// The access token was refused and a refresh token is in hand: refresh before any
    /// other request.
    Expired,
    /// A refresh answered; the new credentials go out through `poll_credentials` at
    /// `offer_at` (`None`: handed out, the application's answer is awaited) and are used
    /// once the application stored them.
    Storing {
        new: Credentials,
        expires_at: Option<(Instant, Duration)>,
        offer_at: Option<Instant>,
        after_401: bool,
    },
    /// The refresh token was refused: no more refreshes until new credentials are set.
    Ended,
}

impl Auth {
    /// The state for credentials that start (or were set) at `now`.
    pub(crate) fn fresh(expires: Option<(Instant, Duration)>, can_refresh: bool) -> Self {
        Auth::Valid {
            refresh_at: expires.filter(|_| can_refresh).map(refresh_instant),
            unproven: false,
        }
    }
}

/// When to refresh a token that expires at `expires_at`: [`defaults::REFRESH_LEAD`] before,
/// or a fifth of the remaining lifetime before for short-lived tokens, so that a token of a
/// few seconds is not refreshed in a loop.
fn refresh_instant(expires_at: (Instant, Duration)) -> Instant {
    let (at, lifetime) = expires_at;
    at - (lifetime / 5).min(defaults::REFRESH_LEAD)
}

/// The expiry of a token issued at `issued` with lifetime `expires_in`, and that lifetime.
pub(crate) fn expiry(issued: Instant, expires_in: Option<Duration>) -> Option<(Instant, Duration)> {
    let lifetime = expires_in?;
    Some((issued.checked_add(lifetime)?, lifetime))
}

/// The refresh request for `method`. No `Authorization` header: the access token may be the
/// expired one, and neither endpoint wants it.
pub(crate) fn refresh_request(
    config: &Config,
    refresh_token: &RefreshToken,
) -> Result<http::Request<Vec<u8>>, http::Error> {
    let (uri, content_type, body) = match &config.refresh {
        RefreshMethod::Matrix => (
            format!("{}/_matrix/client/v3/refresh", config.homeserver),
            "application/json",
            serde_json::json!({ "refresh_token": refresh_token.expose() })
                .to_string()
                .into_bytes(),
        ),
        RefreshMethod::OAuth {
            token_endpoint,
            client_id,
        } => (
            token_endpoint.clone(),
            "application/x-www-form-urlencoded",
            crate::request::form_pairs(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
                ("client_id", client_id),
            ])
            .into_bytes(),
        ),
    };
    http::Request::post(uri)
        .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
        .header(http::header::ACCEPT, "application/json")
        .body(body)
}

/// Reads a 2xx refresh answer of either endpoint: Matrix says `expires_in_ms`, OAuth 2.0
/// `expires_in` (seconds); the first wins when both are there. A missing (or null) refresh
/// token keeps `old`.
///
/// A server answer like a sync's: every token in it must pass the rule of every credential
/// ([`token::check_credential`]: non-empty, at most [`MAX_TOKEN_BYTES`](crate::token::MAX_TOKEN_BYTES),
/// visible ASCII), or the whole answer is refused, nothing of it kept. The reason names the
/// field and the rule and never quotes the body, which carries secrets: the body is read as
/// any JSON first, so that no parser message (`invalid type: string "..."`) can show a value.
/// A lifetime below [`defaults::MIN_TOKEN_LIFETIME`] is raised to it.
pub(crate) fn parse_refresh(body: &[u8], old: &RefreshToken) -> Result<Credentials, String> {
    use serde_json::Value;
    let answer: Value = serde_json::from_slice(body).map_err(|e| {
        // A syntax or end-of-input error names a position, never a value.
        format!("not a refresh answer: not JSON ({e})")
    })?;
    let Value::Object(answer) = answer else {
        return Err("not a refresh answer: not a JSON object".to_owned());
    };
    let text = |field: &str| match answer.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{field} is not a string")),
    };
    let integer = |field: &str| match answer.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{field} is not a non-negative integer")),
    };
    let access_token = text("access_token")?.ok_or("access_token is missing")?;
    let refresh_token = text("refresh_token")?;
    let expires_in = match (integer("expires_in_ms")?, integer("expires_in")?) {
        (Some(ms), _) => Some(Duration::from_millis(ms)),
        (None, Some(s)) => Some(Duration::from_secs(s)),
        (None, None) => None,
    };
    let credentials = Credentials {
        access_token: AccessToken::new(access_token),
        refresh_token: Some(refresh_token.map_or_else(|| old.clone(), RefreshToken::new)),
        expires_in: expires_in.map(|lifetime| {
            if lifetime < defaults::MIN_TOKEN_LIFETIME {
                log::warn!(
                    "refresh answer: a token lifetime of {lifetime:?} is below the floor of \
                     {:?}; taken as the floor",
                    defaults::MIN_TOKEN_LIFETIME
                );
            }
            lifetime.max(defaults::MIN_TOKEN_LIFETIME)
        }),
    };
    credentials.check()?;
    Ok(credentials)
}

/// Whether a failed refresh means the refresh token is dead: any 4xx but 429 (Synapse: 401
/// unknown, 403 reused or expired; OAuth 2.0: 400 `invalid_grant`, 401 `invalid_client`).
pub(crate) fn ends_session(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::UnknownToken { .. } | Failure::Refused { .. } | Failure::RefreshRefused { .. }
    )
}

/// The failure a refused refresh is reported as. An OAuth 2.0 error body names its code in
/// `error` and explains in `error_description`; a Matrix one in `errcode` and `error`.
pub(crate) fn refused(status: u16, body: &[u8]) -> Failure {
    #[derive(Deserialize, Default)]
    struct ErrorBody {
        errcode: Option<String>,
        error: Option<String>,
        error_description: Option<String>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let (errcode, message) = match parsed.errcode {
        Some(code) => (Some(code), parsed.error),
        None => (parsed.error, parsed.error_description),
    };
    Failure::RefreshRefused {
        status,
        errcode: errcode.map(|c| crate::text::capped(&c)),
        message: message.map(|m| crate::text::capped(&m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_methods_build_their_request_without_an_authorization_header() {
        let mut config = Config::new("https://example.org", "old-access");
        let token = RefreshToken::new("r&t=1");
        let matrix = refresh_request(&config, &token).unwrap();
        assert_eq!(
            matrix.uri(),
            "https://example.org/_matrix/client/v3/refresh"
        );
        assert_eq!(matrix.body(), br#"{"refresh_token":"r&t=1"}"#);
        assert!(matrix.headers().get("authorization").is_none());
        config.refresh = RefreshMethod::OAuth {
            token_endpoint: "https://auth.example.org/oauth2/token".into(),
            client_id: "01J CLIENT".into(),
        };
        let oauth = refresh_request(&config, &token).unwrap();
        assert_eq!(oauth.method(), http::Method::POST);
        assert_eq!(oauth.uri(), "https://auth.example.org/oauth2/token");
        assert_eq!(
            oauth.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(
            std::str::from_utf8(oauth.body()).unwrap(),
            "grant_type=refresh_token&refresh_token=r%26t%3D1&client_id=01J+CLIENT"
        );
        assert!(oauth.headers().get("authorization").is_none());
    }

    #[test]
    fn answers_of_both_methods_are_read_and_a_missing_refresh_token_keeps_the_old_one() {
        let old = RefreshToken::new("old");
        let matrix = parse_refresh(
            br#"{"access_token":"a1","refresh_token":"r1","expires_in_ms":10000}"#,
            &old,
        )
        .unwrap();
        assert_eq!(matrix.access_token.expose(), "a1");
        assert_eq!(matrix.refresh_token.unwrap().expose(), "r1");
        assert_eq!(matrix.expires_in, Some(Duration::from_secs(10)));
        let oauth = parse_refresh(
            br#"{"access_token":"a2","token_type":"Bearer","expires_in":300}"#,
            &old,
        )
        .unwrap();
        assert_eq!(oauth.refresh_token.unwrap().expose(), "old");
        assert_eq!(oauth.expires_in, Some(Duration::from_secs(300)));
    }

    #[test]
    fn unusable_or_unreadable_answers_never_quote_the_body() {
        let old = RefreshToken::new("old");
        for body in [
            &br#"{"access_token":"","refresh_token":"secret-r"}"#[..],
            br#"{"access_token":"has space","refresh_token":"secret-r"}"#,
            br#"{"access_token":"ok","refresh_token":"new\nline"}"#,
            br#"{"refresh_token":"secret-r"}"#,
            b"secret-r",
        ] {
            let reason = parse_refresh(body, &old).unwrap_err();
            assert!(!reason.contains("secret-r"), "{reason}");
        }
    }

    #[test]
    fn every_bad_shape_of_either_method_is_refused_naming_the_field_and_rule_not_the_token() {
        let old = RefreshToken::new("old");
        let long = "L".repeat(crate::token::MAX_TOKEN_BYTES + 1);
        let fine = "secret-fine-token";
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({ "access_token": long, "refresh_token": fine }),
                "access_token is longer than 4096 bytes",
            ),
            (
                json!({ "access_token": fine, "refresh_token": long }),
                "refresh_token is longer than 4096 bytes",
            ),
            (
                json!({ "access_token": "", "refresh_token": fine }),
                "access_token is empty",
            ),
            (
                json!({ "access_token": fine, "refresh_token": "" }),
                "refresh_token is empty",
            ),
            (
                json!({ "access_token": "secret\u{1b}[2J", "refresh_token": fine }),
                "access_token contains a control character",
            ),
            (
                json!({ "access_token": fine, "refresh_token": "secret\nr" }),
                "refresh_token contains a control character",
            ),
            (
                json!({ "access_token": "secret a", "token_type": "Bearer" }),
                "access_token has a byte that is not visible ASCII",
            ),
            (
                json!({ "access_token": fine, "refresh_token": "secr\u{e9}t" }),
                "refresh_token has a byte that is not visible ASCII",
            ),
            (json!({ "refresh_token": fine }), "access_token is missing"),
            (
                json!({ "access_token": 7, "refresh_token": fine }),
                "access_token is not a string",
            ),
            (
                json!({ "access_token": fine, "refresh_token": ["secret-r"] }),
                "refresh_token is not a string",
            ),
            // A parser's message would quote the value ("invalid type: string ...").
            (
                json!({ "access_token": fine, "expires_in_ms": "secret-ms" }),
                "expires_in_ms is not a non-negative integer",
            ),
            (
                json!({ "access_token": fine, "expires_in": -1 }),
                "expires_in is not a non-negative integer",
            ),
            (
                json!({ "access_token": fine, "expires_in": 1.5 }),
                "expires_in is not a non-negative integer",
            ),
            (
                json!(["secret-array"]),
                "not a refresh answer: not a JSON object",
            ),
        ];
        for (body, reason) in cases {
            let text = body.to_string();
            assert_eq!(
                parse_refresh(text.as_bytes(), &old).unwrap_err(),
                reason,
                "{}",
                &text[..text.len().min(200)]
            );
        }
        let reason = parse_refresh(br#"{"access_token":"secret-cut"#, &old).unwrap_err();
        assert!(
            reason.starts_with("not a refresh answer: not JSON (EOF"),
            "{reason}"
        );
        assert!(!reason.contains("secret"), "{reason}");
    }

    #[test]
    fn a_lifetime_below_the_floor_is_raised_to_it_and_null_fields_count_as_absent() {
        let old = RefreshToken::new("old");
        let floor = defaults::MIN_TOKEN_LIFETIME;
        for (body, lifetime) in [
            (r#"{"access_token":"a","expires_in_ms":0}"#, Some(floor)),
            (r#"{"access_token":"a","expires_in_ms":1}"#, Some(floor)),
            (r#"{"access_token":"a","expires_in":0}"#, Some(floor)),
            (r#"{"access_token":"a","expires_in":4}"#, Some(floor)),
            (r#"{"access_token":"a","expires_in_ms":5000}"#, Some(floor)),
            (
                r#"{"access_token":"a","expires_in_ms":5001}"#,
                Some(floor + Duration::from_millis(1)),
            ),
            (
                r#"{"access_token":"a","expires_in_ms":10000,"expires_in":1}"#,
                Some(Duration::from_secs(10)),
            ),
            (
                r#"{"access_token":"a","expires_in_ms":null,"expires_in":300}"#,
                Some(Duration::from_secs(300)),
            ),
            (r#"{"access_token":"a","expires_in_ms":null}"#, None),
        ] {
            let credentials = parse_refresh(body.as_bytes(), &old).unwrap();
            assert_eq!(credentials.expires_in, lifetime, "{body}");
        }
        let kept = parse_refresh(br#"{"access_token":"a","refresh_token":null}"#, &old).unwrap();
        assert_eq!(kept.refresh_token, Some(old));
    }

    #[test]
    fn the_bound_is_the_one_of_next_batch() {
        let old = RefreshToken::new("old");
        let at_bound = "a".repeat(crate::token::MAX_TOKEN_BYTES);
        let body = json!({ "access_token": at_bound, "refresh_token": at_bound }).to_string();
        let credentials = parse_refresh(body.as_bytes(), &old).unwrap();
        assert_eq!(
            credentials.access_token.expose().len(),
            crate::token::MAX_TOKEN_BYTES
        );
        assert!(credentials.is_usable());
        let over = Credentials::new("a".repeat(crate::token::MAX_TOKEN_BYTES + 1));
        assert!(
            !over.is_usable(),
            "set_credentials refuses what a refresh answer may not bring"
        );
    }

    #[test]
    fn short_lifetimes_refresh_at_four_fifths_and_long_ones_a_minute_early() {
        let t = Instant::now();
        let short = expiry(t, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(refresh_instant(short), t + Duration::from_secs(8));
        let long = expiry(t, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(refresh_instant(long), t + Duration::from_secs(3540));
        assert!(expiry(t, None).is_none());
    }

    #[test]
    fn refusals_name_the_oauth_or_matrix_code() {
        let oauth = refused(
            400,
            br#"{"error":"invalid_grant","error_description":"gone"}"#,
        );
        assert_eq!(oauth.errcode(), Some("invalid_grant"));
        let matrix = refused(403, br#"{"errcode":"M_FORBIDDEN","error":"reused"}"#);
        assert_eq!(matrix.errcode(), Some("M_FORBIDDEN"));
        assert!(ends_session(&matrix));
    }

    #[test]
    fn debug_shows_no_token() {
        let c = Credentials::new("access-secret").with_refresh_token("refresh-secret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
