//! Server discovery (client-server API, "Server Discovery"): from a server name to the
//! homeserver's base URL, before the first sync.
//!
//! The flow, as the specification gives it and as implemented:
//!
//! 1. `GET {server}/.well-known/matrix/client`, where `{server}` is
//!    [`Config::homeserver`](crate::Config::homeserver) (for [`Config::discover`]:
//!    `https://` and the server name, `http://` for a loopback name). Unauthenticated: no `Authorization` header.
//!    Redirects are followed, at most [`MAX_DISCOVERY_REDIRECTS`](crate::defaults::MAX_DISCOVERY_REDIRECTS) in a row (the specification asks for
//!    it, and no token rides on the request); a redirect from https to plain http only with
//!    [`Config::allow_insecure_http`](crate::Config::allow_insecure_http).
//! 2. 404: `IGNORE`. There is no well-known, so the server name's own address is the base
//!    URL: `{server}` itself.
//! 3. Any other status but 200 (429 and 5xx aside), an empty body, a body that is not a JSON
//!    object, no `m.homeserver` object or no `base_url` string in it: `FAIL_PROMPT`.
//! 4. `base_url` (trailing slashes removed) that is not an absolute http(s) URL the machine
//!    may use, or whose `GET {base_url}/_matrix/client/versions` does not answer a JSON object
//!    with a `versions` array of strings: `FAIL_ERROR`.
//! 5. Otherwise the base URL is the homeserver of every later request.
//!
//! Where this crate chose:
//!
//! * **No answer is not a verdict.** The specification calls "no response" `FAIL_PROMPT`; a
//!   long-running service would then stop at the first network blip. Here a transport failure,
//!   a deadline, a 5xx or a 429 (of either request) is a transient failure like any other:
//!   backed off with jitter and retried from step 1.
//! * **The verdicts wait for the user, and retry.** `FAIL_PROMPT` and `FAIL_ERROR` are
//!   [`Failure::Discovery`](crate::Failure::Discovery), class
//!   [`NeedsUser`](crate::ErrorClass::NeedsUser): reported, then retried only at the maximum
//!   backoff, exactly like a refused sync. The application may stop and ask the user for a
//!   URL; left alone, the service picks up a well-known fixed on the server within a backoff
//!   step, without a restart, at one request a minute with the defaults.
//! * **One ramp for the whole of discovery.** Both requests count on one backoff counter that
//!   never resets before discovery succeeds (it succeeds once): a well-known that works
//!   followed by a versions check that fails cannot make the loop spin. Redirects are
//!   followed at once, but at most [`MAX_DISCOVERY_REDIRECTS`](crate::defaults::MAX_DISCOVERY_REDIRECTS) per attempt, so an attempt is at most
//!   `MAX_DISCOVERY_REDIRECTS + 2` requests.
//! * **The port stays.** The specification builds the well-known URL from the server name's
//!   host name; a port in the server name is kept here, because a server name with a port
//!   most often names a server that serves everything there (a test or private server).
//! * **No downgrade.** A `base_url` in plain http is accepted from a well-known read over
//!   plain http (a loopback server name, or `allow_insecure_http`), or with
//!   `allow_insecure_http`; from one read over https it is `FAIL_ERROR`, even to loopback.
//! * **Found once.** The base URL is announced once, as an [`EventKind::Discovered`] event
//!   before the first sync (persist it and start next time with [`Config::new`] to skip
//!   discovery), and returned by [`SyncMachine::homeserver`](crate::SyncMachine::homeserver).
//!   It is never rediscovered by this machine.
//!
//! [`Config::discover`]: crate::Config::discover()
//! [`Config::new`]: crate::Config::new
//! [`EventKind::Discovered`]: crate::EventKind::Discovered

use http::header::{HeaderMap, HeaderValue, ACCEPT, LOCATION};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::classify::{classify, excerpt};
use crate::config::{validate_url, ConfigError};
use crate::defaults::MAX_DISCOVERY_REDIRECTS as MAX_REDIRECTS;
use crate::error::{DiscoveryError, Failure};
use crate::text::capped;

/// Where discovery stands: what goes out next (or is in flight), or the result to announce.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// `GET url` (the well-known, or where it redirected after `hops` redirects).
    WellKnown { url: String, hops: u8 },
    /// `GET {base_url}/_matrix/client/versions`.
    Versions { base_url: String },
    /// Found: announced as an event before the first sync.
    Found { base_url: String },
}

impl Step {
    /// The first step for the server at `server` (a URL without trailing slash).
    pub(crate) fn start(server: &str) -> Self {
        Step::WellKnown {
            url: format!("{server}/.well-known/matrix/client"),
            hops: 0,
        }
    }
}

/// What a well-known answer says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WellKnown {
    /// A base URL (normalized, not yet checked with `/versions`).
    Found { base_url: String },
    /// 404: no well-known (`IGNORE`).
    Ignore,
    /// Follow the redirect to this URL.
    Redirect(String),
}

/// `GET url`, unauthenticated, asking for JSON.
pub(crate) fn request(url: &str) -> Result<http::Request<Vec<u8>>, http::Error> {
    http::Request::get(url)
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .body(Vec::new())
}

/// `GET {base_url}/_matrix/client/versions`, unauthenticated.
pub(crate) fn versions_request(base_url: &str) -> Result<http::Request<Vec<u8>>, http::Error> {
    request(&format!("{base_url}/_matrix/client/versions"))
}

/// Reads the answer to `GET url` of the well-known, after `hops` redirects.
pub(crate) fn read_well_known(
    url: &str,
    hops: u8,
    status: http::StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    allow_insecure_http: bool,
) -> Result<WellKnown, Failure> {
    let code = status.as_u16();
    let prompt = |e| Err(Failure::from(e));
    match code {
        200 => {}
        404 => return Ok(WellKnown::Ignore),
        300..=399 => return redirect(url, hops, code, headers, allow_insecure_http),
        429 | 500..=599 => return Err(transient(status, headers, body)),
        _ => {
            return prompt(DiscoveryError::Status {
                url: capped(url),
                status: code,
            })
        }
    }
    let not_json = |reason: String| {
        Failure::from(DiscoveryError::NotJson {
            url: capped(url),
            reason: capped(&reason),
            excerpt: excerpt(body),
        })
    };
    if !starts_object(body) {
        return Err(not_json(if body.trim_ascii().is_empty() {
            "empty body".to_owned()
        } else {
            "not a JSON object".to_owned()
        }));
    }
    #[derive(Deserialize)]
    struct Document<'a> {
        #[serde(rename = "m.homeserver", borrow)]
        homeserver: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Homeserver<'a> {
        #[serde(borrow)]
        base_url: Option<&'a RawValue>,
    }
    let document: Document<'_> =
        serde_json::from_slice(body).map_err(|e| not_json(e.to_string()))?;
    let homeserver = document
        .homeserver
        .filter(|raw| starts_object(raw.get().as_bytes()))
        .and_then(|raw| serde_json::from_str::<Homeserver<'_>>(raw.get()).ok());
    let Some(homeserver) = homeserver else {
        return prompt(DiscoveryError::MissingHomeserver { url: capped(url) });
    };
    let base_url = homeserver
        .base_url
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
    let Some(base_url) = base_url else {
        return prompt(DiscoveryError::MissingBaseUrl { url: capped(url) });
    };
    let https = has_scheme(url, "https");
    let normalized = base_url.trim_end_matches('/');
    check_base_url(normalized, https, allow_insecure_http).map_err(|reason| {
        Failure::from(DiscoveryError::InvalidBaseUrl {
            base_url: capped(&base_url),
            reason,
        })
    })?;
    Ok(WellKnown::Found {
        base_url: normalized.to_owned(),
    })
}

/// Reads the answer to the versions check of `base_url`.
pub(crate) fn read_versions(
    base_url: &str,
    status: http::StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Failure> {
    let code = status.as_u16();
    match code {
        200..=299 => {}
        429 | 500..=599 => return Err(transient(status, headers, body)),
        _ => {
            return Err(Failure::from(DiscoveryError::VersionsStatus {
                base_url: capped(base_url),
                status: code,
            }))
        }
    }
    #[derive(Deserialize)]
    struct Versions<'a> {
        #[serde(borrow)]
        versions: Vec<&'a RawValue>,
    }
    let not_versions = |reason: String| {
        Failure::from(DiscoveryError::NotVersions {
            base_url: capped(base_url),
            reason: capped(&reason),
            excerpt: excerpt(body),
        })
    };
    if !starts_object(body) {
        return Err(not_versions("not a JSON object".to_owned()));
    }
    let answer: Versions<'_> =
        serde_json::from_slice(body).map_err(|e| not_versions(e.to_string()))?;
    if answer.versions.iter().any(|v| !v.get().starts_with('"')) {
        return Err(not_versions("a version is not a string".to_owned()));
    }
    Ok(())
}

/// A base URL the machine may send the access token to: what
/// [`Config::homeserver`](crate::Config::homeserver) accepts, and no plain http after a
/// well-known read over https unless insecure http is allowed.
fn check_base_url(url: &str, https: bool, allow_insecure_http: bool) -> Result<(), &'static str> {
    validate_url(url, allow_insecure_http).map_err(reason)?;
    if https && !allow_insecure_http && !has_scheme(url, "https") {
        return Err("plain http named by a well-known read over https");
    }
    Ok(())
}

fn reason(error: ConfigError) -> &'static str {
    match error {
        ConfigError::InvalidHomeserver { reason } => reason,
        ConfigError::InsecureHttp => "plain http to a host that is not loopback",
        _ => "not a usable URL",
    }
}

fn has_scheme(url: &str, scheme: &str) -> bool {
    url.len() > scheme.len()
        && url.as_bytes()[scheme.len()] == b':'
        && url[..scheme.len()].eq_ignore_ascii_case(scheme)
}

/// A 429 or 5xx, classified as for any other request (transient or rate limited).
fn transient(status: http::StatusCode, headers: &HeaderMap, body: &[u8]) -> Failure {
    match classify(status, headers, body) {
        Err(failure) => failure,
        // Not reached: only called with 429 and 5xx.
        Ok(_) => Failure::Server {
            status: status.as_u16(),
            errcode: None,
            message: None,
        },
    }
}

fn starts_object(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().first() == Some(&b'{')
}

/// Follows a redirect of the well-known, or says why not.
fn redirect(
    url: &str,
    hops: u8,
    status: u16,
    headers: &HeaderMap,
    allow_insecure_http: bool,
) -> Result<WellKnown, Failure> {
    let location = headers
        .get(LOCATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let refuse = |reason| {
        Err(Failure::from(DiscoveryError::Redirect {
            url: capped(url),
            status,
            location: location.as_deref().map(capped),
            reason,
        }))
    };
    let Some(target) = location.as_deref() else {
        return refuse("nothing to follow");
    };
    if hops >= MAX_REDIRECTS {
        return refuse("too many redirects");
    }
    let Some(target) = resolve(url, target) else {
        return refuse("not a URL");
    };
    if let Err(reason) = validate_url(&target, allow_insecure_http).map_err(reason) {
        return refuse(reason);
    }
    if has_scheme(url, "https") && !has_scheme(&target, "https") && !allow_insecure_http {
        return refuse("a downgrade from https to plain http");
    }
    Ok(WellKnown::Redirect(target))
}

/// `location` resolved against `base`, without its fragment: absolute, network-path,
/// absolute-path and relative-path references (a relative path joins the base's directory;
/// `.` and `..` segments are kept as sent, and a query-only reference joins the directory
/// too, unlike RFC 3986 §5.2, which a well-known redirect does not need).
fn resolve(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    let location = location.split('#').next().unwrap_or_default();
    if location.is_empty() {
        return None;
    }
    if has_scheme(location, "https") || has_scheme(location, "http") {
        return Some(location.to_owned());
    }
    let uri: http::Uri = base.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str();
    if let Some(rest) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    // A relative path's first segment has no colon: with one, it is another scheme.
    if location
        .split(['/', '?'])
        .next()
        .is_some_and(|first| first.contains(':'))
    {
        return None;
    }
    let path = uri.path();
    let directory = &path[..path.rfind('/').map_or(0, |at| at + 1)];
    Some(format!("{scheme}://{authority}{directory}{location}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DiscoveryAction;

    fn well_known(status: u16, headers: &[(&str, &str)], body: &str) -> Result<WellKnown, Failure> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        read_well_known(
            "https://example.org/.well-known/matrix/client",
            0,
            http::StatusCode::from_u16(status).unwrap(),
            &map,
            body.as_bytes(),
            false,
        )
    }

    fn action(result: Result<WellKnown, Failure>) -> DiscoveryAction {
        match result {
            Err(Failure::Discovery(e)) => e.action(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_spec_s_outcomes() {
        let found = |base: &str| WellKnown::Found {
            base_url: base.to_owned(),
        };
        assert_eq!(
            well_known(
                200,
                &[],
                r#"{"m.homeserver":{"base_url":"https://m.example.org/"}}"#
            ),
            Ok(found("https://m.example.org"))
        );
        assert_eq!(
            well_known(
                200,
                &[],
                r#"{"m.identity_server":{"base_url":"x"},"m.homeserver":{"base_url":"https://m.example.org/matrix//","x":1}}"#
            ),
            Ok(found("https://m.example.org/matrix"))
        );
        assert_eq!(well_known(404, &[], "<html>"), Ok(WellKnown::Ignore));
        for prompt in [
            well_known(403, &[], ""),
            well_known(204, &[], ""),
            well_known(200, &[], ""),
            well_known(200, &[], "<html>"),
            well_known(200, &[], "[1]"),
            well_known(200, &[], r#"{"m.homeserver":"#),
            well_known(200, &[], "{}"),
            well_known(200, &[], r#"{"m.homeserver":"https://m.example.org"}"#),
            well_known(200, &[], r#"{"m.homeserver":{}}"#),
            well_known(200, &[], r#"{"m.homeserver":{"base_url":7}}"#),
            well_known(301, &[], ""),
        ] {
            assert_eq!(action(prompt), DiscoveryAction::FailPrompt);
        }
        for error in [
            r#"{"m.homeserver":{"base_url":"m.example.org"}}"#,
            r#"{"m.homeserver":{"base_url":""}}"#,
            r#"{"m.homeserver":{"base_url":"ftp://m.example.org"}}"#,
            r#"{"m.homeserver":{"base_url":"https://m.example.org/?q"}}"#,
            r#"{"m.homeserver":{"base_url":"http://m.example.org"}}"#,
            r#"{"m.homeserver":{"base_url":"http://127.0.0.1:8008"}}"#,
        ] {
            assert_eq!(
                action(well_known(200, &[], error)),
                DiscoveryAction::FailError,
                "{error}"
            );
        }
        for transient in [500, 502, 503, 429] {
            let failure = well_known(transient, &[], "").unwrap_err();
            assert!(!matches!(failure, Failure::Discovery(_)), "{failure:?}");
        }
    }

    #[test]
    fn redirects_are_resolved_and_bounded() {
        let to = |location: &str| well_known(302, &[("location", location)], "");
        assert_eq!(
            to("https://www.example.org/.well-known/matrix/client"),
            Ok(WellKnown::Redirect(
                "https://www.example.org/.well-known/matrix/client".into()
            ))
        );
        assert_eq!(
            to("/elsewhere/client.json#x"),
            Ok(WellKnown::Redirect(
                "https://example.org/elsewhere/client.json".into()
            ))
        );
        assert_eq!(
            to("client.json"),
            Ok(WellKnown::Redirect(
                "https://example.org/.well-known/matrix/client.json".into()
            ))
        );
        assert_eq!(
            to("//cdn.example.org/wk"),
            Ok(WellKnown::Redirect("https://cdn.example.org/wk".into()))
        );
        assert_eq!(
            action(to("http://www.example.org/wk")),
            DiscoveryAction::FailPrompt
        );
        assert_eq!(
            action(to("javascript:alert(1)")),
            DiscoveryAction::FailPrompt
        );
        assert_eq!(
            action(to("https://u:p@x.org/wk")),
            DiscoveryAction::FailPrompt
        );
        let mut map = HeaderMap::new();
        map.insert(LOCATION, "https://example.org/again".parse().unwrap());
        let status = http::StatusCode::FOUND;
        let too_many = read_well_known(
            "https://example.org/x",
            MAX_REDIRECTS,
            status,
            &map,
            b"",
            false,
        );
        let Err(Failure::Discovery(error)) = too_many else {
            panic!("{too_many:?}");
        };
        assert!(matches!(
            *error,
            DiscoveryError::Redirect {
                reason: "too many redirects",
                ..
            }
        ));
    }

    #[test]
    fn a_well_known_over_plain_http_may_name_plain_http() {
        let body = br#"{"m.homeserver":{"base_url":"http://127.0.0.1:8008/"}}"#;
        let found = read_well_known(
            "http://127.0.0.1:8008/.well-known/matrix/client",
            0,
            http::StatusCode::OK,
            &HeaderMap::new(),
            body,
            false,
        );
        assert_eq!(
            found,
            Ok(WellKnown::Found {
                base_url: "http://127.0.0.1:8008".into()
            })
        );
    }

    #[test]
    fn the_versions_check() {
        let check = |status: u16, body: &str| {
            read_versions(
                "https://m.example.org",
                http::StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                body.as_bytes(),
            )
        };
        assert_eq!(
            check(
                200,
                r#"{"versions":["v1.1","r0.6.1"],"unstable_features":{}}"#
            ),
            Ok(())
        );
        for bad in [
            (200, ""),
            (200, "<html>"),
            (200, "{}"),
            (200, r#"{"versions":"v1.1"}"#),
            (200, r#"{"versions":[1]}"#),
            (404, ""),
            (401, "{}"),
            (301, ""),
        ] {
            match check(bad.0, bad.1) {
                Err(Failure::Discovery(e)) => assert_eq!(e.action(), DiscoveryAction::FailError),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(
            check(503, ""),
            Err(Failure::Server { status: 503, .. })
        ));
    }

    #[test]
    fn server_text_is_capped_and_escaped() {
        let huge = format!(
            r#"{{"m.homeserver":{{"base_url":"https://x.org/{}\n"}}}}"#,
            "p".repeat(1 << 20)
        );
        let failure = well_known(200, &[], &huge).unwrap_err();
        let shown = failure.to_string();
        assert!(shown.len() < 2200, "{}", shown.len());
        assert!(!shown.contains('\n'));
    }
}
