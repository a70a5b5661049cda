//! What can go wrong, what it means, and what you may do next.
//!
//! Three different things are errors here, and they never mix:
//!
//! * [`SyncError`]: the server or the network failed one request. The machine has already
//!   decided what to do about it (back off and retry); the error is a report, not a question.
//! * [`InputError`]: the caller fed the machine something outside the protocol (a response to
//!   a request it never sent, time going backwards). The input was ignored and the machine's
//!   state is exactly as before; the caller has a bug, or raced a stop.
//! * [`ConfigError`](crate::ConfigError): a configuration field is unusable; nothing started.

use std::fmt;
use std::time::{Duration, Instant};

use crate::request::{RequestId, RequestKind};
use crate::text::{capped, Escaped};

/// How a failure is treated: the class decides the delay before the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Network trouble, 5xx, deadline passed, a body that is not a sync response.
    /// The machine backs off exponentially (with jitter) and retries.
    Transient,
    /// 429: the machine waits for the larger of the server's requested wait (capped by
    /// [`Config::max_server_wait`](crate::Config::max_server_wait)) and its own backoff.
    RateLimited,
    /// 3xx, 401, 403, 400 and every other 4xx, and a server discovery that failed for good
    /// ([`Failure::Discovery`]): the server refused, and retrying will not help until the user
    /// changes something (the homeserver URL, a new token, a fresh `since`).
    /// The machine keeps the service alive, retrying only at the maximum backoff, until the
    /// caller stops it or a request succeeds again.
    NeedsUser,
}

/// Why a request failed below HTTP: reported by whoever performs the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The connection could not be established (refused, unreachable).
    Connect,
    /// The connection broke while the request or response was in flight.
    Reset,
    /// The host name did not resolve.
    Dns,
    /// The TLS handshake or record layer failed.
    Tls,
    /// The client-side deadline passed (for a timer the driver owns). Reported by the machine
    /// as [`Failure::DeadlineExceeded`], like a deadline it noticed itself.
    TimedOut,
    /// The body ended before its announced length.
    Truncated,
    /// The body was larger than [`Config::max_body_bytes`](crate::Config::max_body_bytes).
    /// Reported by the machine as [`Failure::BodyTooLarge`].
    BodyTooLarge,
    /// Any other I/O failure.
    Other,
}

/// A failure of the transport, handed to [`SyncMachine::handle_failure`](crate::SyncMachine::handle_failure).
///
/// `Display` escapes control characters in `detail`: I/O errors quote what the peer sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {}", Escaped(detail))]
pub struct TransportFailure {
    /// What kind of failure.
    pub kind: TransportErrorKind,
    /// A human-readable detail for logs, cut to about 1 KiB by [`new`](Self::new). Never put
    /// the access token here.
    pub detail: String,
}

impl TransportFailure {
    /// A transport failure of `kind` with a detail for logs, cut to about 1 KiB (on a char
    /// boundary, with a `… [+N bytes]` marker).
    pub fn new(kind: TransportErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: capped(&detail.into()),
        }
    }
}

/// What exactly failed. The [`class`](Failure::class) decides what happens next.
///
/// Text the server chose (`errcode`, `message`, `location`, a `reason` quoting the body) is
/// cut to about 1 KiB when the failure is built, on a char boundary and marked
/// `… [+N bytes]`, and a body `excerpt` to 256 bytes, so `Debug` stays bounded. `Display`
/// also escapes control characters (`\n`, `\u{1b}`, bidi controls), so a server cannot forge
/// log lines or drive a terminal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// The request never got a complete HTTP response.
    #[error("transport failure: {0}")]
    Transport(TransportFailure),
    /// No response arrived before the request's client-side deadline.
    #[error("no response within the deadline of {0:?}")]
    DeadlineExceeded(Duration),
    /// The server answered 5xx.
    #[error("server error {status}{}", fmt_errcode(errcode, message))]
    Server {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode`, if the body had one.
        errcode: Option<String>,
        /// Matrix `error`, if the body had one.
        message: Option<String>,
    },
    /// The server answered 429.
    #[error("rate limited (429){}", fmt_errcode(errcode, message))]
    RateLimited {
        /// The wait the server asked for (`Retry-After` header or `retry_after_ms`), uncapped.
        retry_after: Option<Duration>,
        /// Matrix `errcode`, normally `M_LIMIT_EXCEEDED`.
        errcode: Option<String>,
        /// Matrix `error`.
        message: Option<String>,
    },
    /// 401 `M_UNKNOWN_TOKEN`: the access token is no longer valid.
    #[error("access token rejected (401 M_UNKNOWN_TOKEN, soft_logout: {soft_logout})")]
    UnknownToken {
        /// The server's `soft_logout` flag: if true, logging in again with the same device
        /// keeps its keys.
        soft_logout: bool,
        /// Matrix `error`.
        message: Option<String>,
    },
    /// Any other 4xx: the request was refused (bad `since`, forbidden, not found, ...).
    #[error("request refused with {status}{}", fmt_errcode(errcode, message))]
    Refused {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode`, if the body had one.
        errcode: Option<String>,
        /// Matrix `error`, if the body had one.
        message: Option<String>,
    },
    /// The server answered 3xx: the homeserver URL is not where the server lives (`http://`
    /// moved to `https://`, a bare domain sent on to its `matrix.` host, a server that moved).
    ///
    /// Redirects are not followed: the next request would carry the access token to whatever
    /// address the answer names. Retrying the same URL gets the same answer, so the class is
    /// [`NeedsUser`](ErrorClass::NeedsUser). Check that `location` is the server you meant, set
    /// [`Config::homeserver`](crate::Config::homeserver) to it, and start again.
    #[error(
        "the homeserver redirected ({status}){}: set the homeserver URL to the final address",
        fmt_location(location)
    )]
    Redirected {
        /// HTTP status, 300 to 399.
        status: u16,
        /// The `Location` header, if there was one (lossily decoded, cut to about 1 KiB). It
        /// may be relative to the request URL.
        location: Option<String>,
    },
    /// The status was a success (or an unexpected 1xx, or above 599) but the body is not
    /// what the endpoint returns, or carries a token that breaks the token rules (see
    /// [`MAX_TOKEN_BYTES`](crate::MAX_TOKEN_BYTES)).
    ///
    /// A refresh answer is refused the same way: unreadable, or with an access or refresh
    /// token that is empty, longer than `MAX_TOKEN_BYTES`, or not visible ASCII. Nothing of
    /// it is kept or handed to `poll_credentials`; the refresh is retried with backoff as
    /// after a 5xx, with the old tokens (syncs go on with the old access token while it
    /// lives). `reason` names the field and the rule, and `excerpt` is empty: a refresh
    /// answer carries secrets. Nothing to do but fix the server if it keeps answering so.
    #[error(
        "bad response (status {status}): {}; body starts with {excerpt:?}",
        Escaped(reason)
    )]
    BadResponse {
        /// HTTP status.
        status: u16,
        /// Why the body was rejected (it may quote the body, so it is cut to about 1 KiB).
        reason: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
    },
    /// The machine could not build its request (an unusable configuration value slipped past
    /// validation). Retrying at the maximum backoff keeps the service observable.
    #[error("could not build the request: {}", Escaped(.0))]
    InvalidRequest(String),
    /// The body exceeded [`Config::max_body_bytes`](crate::Config::max_body_bytes).
    #[error("response body larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The refresh endpoint refused the refresh token (401, 403, or a 4xx such as OAuth 2.0's
    /// `invalid_grant`): it is unknown, reused or expired, and the session is over. No more
    /// refreshes are made ([`SyncState::SessionEnded`](crate::SyncState::SessionEnded)); log
    /// in again and hand the new credentials to `set_credentials`.
    #[error(
        "the refresh token was refused ({status}{}): the session is over, log in again",
        fmt_errcode(errcode, message)
    )]
    RefreshRefused {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode`, or the OAuth 2.0 `error` code.
        errcode: Option<String>,
        /// Matrix `error`, or the OAuth 2.0 `error_description`.
        message: Option<String>,
    },
    /// The application reported that it could not store refreshed credentials. They are not
    /// used (with rotation, losing them would end the session): the machine offers them again
    /// after the maximum backoff
    /// ([`SyncState::CredentialsNotStored`](crate::SyncState::CredentialsNotStored)).
    #[error("the refreshed credentials could not be stored: {}", Escaped(.0))]
    CredentialsNotStored(String),
    /// Server discovery ([`Config::discover`](crate::Config::discover())) ended in a verdict of
    /// the specification, `FAIL_PROMPT` or `FAIL_ERROR` ([`DiscoveryError::action`]): the
    /// server name's well-known is unusable, or names a homeserver that does not work.
    ///
    /// Class [`NeedsUser`](ErrorClass::NeedsUser): the machine retries discovery only at the
    /// maximum backoff ([`SyncState::Refused`](crate::SyncState::Refused) meanwhile), so a
    /// well-known fixed on the server is picked up without a restart. To go on without it,
    /// stop the machine and start again with the homeserver URL ([`Config::new`](crate::Config::new)):
    /// ask the user for it after `FAIL_PROMPT`; after `FAIL_ERROR` the server's admin must fix
    /// the well-known. (Network failures, deadlines, 5xx and 429 of discovery requests are not
    /// this: they are reported as for any request, and backed off.)
    #[error("server discovery failed ({action}): {0}", action = .0.action())]
    Discovery(Box<DiscoveryError>),
}

fn fmt_errcode(errcode: &Option<String>, message: &Option<String>) -> String {
    match (errcode, message) {
        (Some(c), Some(m)) => format!(" {}: {}", Escaped(c), Escaped(m)),
        (Some(c), None) => format!(" {}", Escaped(c)),
        (None, Some(m)) => format!(": {}", Escaped(m)),
        (None, None) => String::new(),
    }
}

fn fmt_location(location: &Option<String>) -> String {
    match location {
        // Debug quotes, and escapes a `"` in the target along with the control characters.
        Some(l) => format!(" to {l:?}"),
        None => " without a Location header".to_owned(),
    }
}

impl Failure {
    /// The class that decides the delay before the next attempt.
    pub fn class(&self) -> ErrorClass {
        match self {
            Failure::RateLimited { .. } => ErrorClass::RateLimited,
            Failure::Redirected { .. }
            | Failure::UnknownToken { .. }
            | Failure::Refused { .. }
            | Failure::RefreshRefused { .. }
            | Failure::CredentialsNotStored(_)
            | Failure::Discovery(_)
            | Failure::InvalidRequest(_) => ErrorClass::NeedsUser,
            Failure::Transport(_)
            | Failure::DeadlineExceeded(_)
            | Failure::Server { .. }
            | Failure::BadResponse { .. }
            | Failure::BodyTooLarge { .. } => ErrorClass::Transient,
        }
    }

    /// The HTTP status, where a response arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Server { status, .. }
            | Failure::Refused { status, .. }
            | Failure::RefreshRefused { status, .. }
            | Failure::Redirected { status, .. }
            | Failure::BadResponse { status, .. } => Some(*status),
            Failure::RateLimited { .. } => Some(429),
            Failure::UnknownToken { .. } => Some(401),
            Failure::Discovery(error) => error.status(),
            _ => None,
        }
    }

    /// The Matrix `errcode`, where the body had one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Failure::Server { errcode, .. }
            | Failure::Refused { errcode, .. }
            | Failure::RefreshRefused { errcode, .. }
            | Failure::RateLimited { errcode, .. } => errcode.as_deref(),
            Failure::UnknownToken { .. } => Some("M_UNKNOWN_TOKEN"),
            _ => None,
        }
    }
}

/// One failed request, as reported by [`SyncMachine::poll_error`](crate::SyncMachine::poll_error).
///
/// By the time you see it, the machine has already scheduled the retry `delay` from now;
/// there is nothing you must do. Stop the service if the class is
/// [`NeedsUser`](ErrorClass::NeedsUser) and you cannot fix the cause (for example, log in again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncError {
    /// What failed.
    pub failure: Failure,
    /// How it is treated.
    pub class: ErrorClass,
    /// Which request failed.
    pub request: RequestKind,
    /// The number of consecutive failures, this one included (1 for the first).
    pub attempt: u32,
    /// The wait chosen before the next attempt.
    pub delay: Duration,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} request failed ({:?}, attempt {}): {}; retrying in {} ms",
            self.request.name(),
            self.class,
            self.attempt,
            self.failure,
            self.delay.as_millis()
        )
    }
}

impl std::error::Error for SyncError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.failure)
    }
}

/// An input the machine refused. It was not applied: the machine is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The machine does not wait for this request: it was answered already, abandoned (its
    /// deadline passed, or the machine stopped), or it is another machine's. Discard the
    /// response.
    #[error("request {0} is not awaited")]
    StaleRequest(RequestId),
    /// `now` is earlier than an instant the machine was already given.
    #[error("time went backwards: {now:?} is before {last:?}")]
    TimeWentBackwards {
        /// The latest instant seen.
        last: Instant,
        /// The instant given.
        now: Instant,
    },
    /// The machine was stopped; it takes no more input.
    #[error("the machine was stopped")]
    Stopped,
    /// An answer about stored credentials, but none were handed out by
    /// [`poll_credentials`](crate::SyncMachine::poll_credentials) and left unanswered.
    #[error("no credentials were handed out to be stored")]
    NoCredentialsPending,
    /// Credentials given to `set_credentials` or `set_access_token` with a token that breaks
    /// the rule of every credential: empty, longer than
    /// [`MAX_TOKEN_BYTES`](crate::MAX_TOKEN_BYTES), or not visible ASCII (it could not go in
    /// a request, or be stored and sent back as it is). Nothing changed.
    #[error("a token is empty, too long, or holds characters other than visible ASCII")]
    UnusableCredentials,
    /// A sliding sync room subscription with a `timeline_limit` outside 1 to 1000 (Synapse
    /// would refuse every request carrying it). Nothing changed; fix the subscription.
    #[error("room subscription: timeline_limit must be within 1..=1000")]
    InvalidSubscription,
}

/// What the specification says the client should do after a failed discovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiscoveryAction {
    /// `FAIL_PROMPT`: the well-known was unusable (invalid or empty data). Tell the user, and
    /// ask for the homeserver URL.
    FailPrompt,
    /// `FAIL_ERROR`: the well-known named a homeserver that cannot be used. Tell the user, and
    /// do not guess another one.
    FailError,
}

impl std::fmt::Display for DiscoveryAction {
    /// The specification's name: `FAIL_PROMPT` or `FAIL_ERROR`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiscoveryAction::FailPrompt => "FAIL_PROMPT",
            DiscoveryAction::FailError => "FAIL_ERROR",
        })
    }
}

/// Why server discovery failed for good: reported as
/// [`Failure::Discovery`](crate::Failure::Discovery), class
/// [`NeedsUser`](crate::ErrorClass::NeedsUser).
///
/// In every case the machine retries discovery at the maximum backoff (a fixed server is
/// picked up without a restart) until it is stopped. What the caller may do instead is, per
/// the specification, by [`action`](Self::action): for
/// [`FailPrompt`](DiscoveryAction::FailPrompt), stop, ask the user for the homeserver URL and
/// start again with [`Config::new`](crate::Config::new); for
/// [`FailError`](DiscoveryAction::FailError), stop and show the user the error (the server
/// names a homeserver that does not work: its admin must fix it).
///
/// Text the server chose (`location`, `base_url`, `reason`) is cut to about 1 KiB, an
/// `excerpt` to 256 bytes, and `Display` escapes control characters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// `FAIL_PROMPT`. The well-known URL answered a status other than 200, 404, a redirect,
    /// 429 or 5xx (a 401, 403, 410, 204...): the server has no usable well-known. Check the
    /// server name, or ask for the homeserver URL.
    #[error("{} answered {status}", Escaped(url))]
    Status {
        /// The well-known URL asked.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// `FAIL_PROMPT`. The well-known URL redirected, and the redirect could not be followed:
    /// no `Location`, a target that is not an absolute http(s) URL the machine may use, a
    /// downgrade from https to plain http, or more than [`MAX_DISCOVERY_REDIRECTS`](crate::defaults::MAX_DISCOVERY_REDIRECTS) in a row. Ask for
    /// the homeserver URL (`location` may be a hint).
    #[error(
        "{} redirected ({status}){}: {reason}",
        Escaped(url),
        fmt_location(location)
    )]
    Redirect {
        /// The well-known URL asked.
        url: String,
        /// HTTP status, 300 to 399.
        status: u16,
        /// The `Location` header, if there was one (lossily decoded).
        location: Option<String>,
        /// Why it was not followed.
        reason: &'static str,
    },
    /// `FAIL_PROMPT`. The well-known answered 200 with an empty body or one that is not a JSON
    /// object (an HTML page, a truncated file). Its admin must fix it; meanwhile, ask for
    /// the homeserver URL.
    #[error(
        "{} is not a JSON object: {}; body starts with {excerpt:?}",
        Escaped(url),
        Escaped(reason)
    )]
    NotJson {
        /// The well-known URL asked.
        url: String,
        /// Why it was rejected (it may quote the body).
        reason: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
    },
    /// `FAIL_PROMPT`. The well-known is JSON but has no `m.homeserver` object: it describes
    /// other things (an identity server alone, say). Ask for the homeserver URL.
    #[error("{} has no m.homeserver object", Escaped(url))]
    MissingHomeserver {
        /// The well-known URL asked.
        url: String,
    },
    /// `FAIL_PROMPT`. `m.homeserver` has no `base_url` string. Ask for the homeserver URL.
    #[error("{} has no m.homeserver.base_url string", Escaped(url))]
    MissingBaseUrl {
        /// The well-known URL asked.
        url: String,
    },
    /// `FAIL_ERROR`. `m.homeserver.base_url` is not an absolute http(s) URL without query,
    /// fragment or user info, or is plain http where that is not allowed: plain http is
    /// accepted from a well-known read over plain http (a loopback server name), or with
    /// [`Config::allow_insecure_http`](crate::Config::allow_insecure_http), never from one read
    /// over https otherwise. The server's admin must fix the well-known.
    #[error("m.homeserver.base_url {:?} cannot be used: {reason}", base_url)]
    InvalidBaseUrl {
        /// The `base_url` as the server sent it.
        base_url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `FAIL_ERROR`. `GET {base_url}/_matrix/client/versions` was refused (a 4xx but 429, a
    /// redirect, an unexpected status): the well-known names something that is not a Matrix
    /// homeserver, or not at that path. The server's admin must fix the well-known.
    #[error("the versions check of {} answered {status}", Escaped(base_url))]
    VersionsStatus {
        /// The base URL checked.
        base_url: String,
        /// HTTP status.
        status: u16,
    },
    /// `FAIL_ERROR`. `GET {base_url}/_matrix/client/versions` answered with a body that is not
    /// a JSON object with a `versions` array of strings: not a Matrix homeserver. The server's
    /// admin must fix the well-known.
    #[error(
        "the versions check of {} is not a versions answer: {}; body starts with {excerpt:?}",
        Escaped(base_url),
        Escaped(reason)
    )]
    NotVersions {
        /// The base URL checked.
        base_url: String,
        /// Why it was rejected (it may quote the body).
        reason: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
    },
}

impl DiscoveryError {
    /// What the specification says to do: `FAIL_PROMPT` or `FAIL_ERROR`.
    pub fn action(&self) -> DiscoveryAction {
        match self {
            DiscoveryError::Status { .. }
            | DiscoveryError::Redirect { .. }
            | DiscoveryError::NotJson { .. }
            | DiscoveryError::MissingHomeserver { .. }
            | DiscoveryError::MissingBaseUrl { .. } => DiscoveryAction::FailPrompt,
            DiscoveryError::InvalidBaseUrl { .. }
            | DiscoveryError::VersionsStatus { .. }
            | DiscoveryError::NotVersions { .. } => DiscoveryAction::FailError,
        }
    }

    /// The HTTP status, where the failure is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            DiscoveryError::Status { status, .. }
            | DiscoveryError::Redirect { status, .. }
            | DiscoveryError::VersionsStatus { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<DiscoveryError> for Failure {
    fn from(error: DiscoveryError) -> Self {
        Failure::Discovery(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "x\nstate: Live\x1b[2J\x1b]0;title\x07\u{85}\u{202e}";
    const SHOWN: &str = r"x\nstate: Live\u{1b}[2J\u{1b}]0;title\u{7}\u{85}\u{202e}";

    fn assert_one_safe_line(shown: &str) {
        assert!(
            !shown.contains(['\n', '\r', '\x1b', '\x07', '\u{85}', '\u{202e}']),
            "{shown:?}"
        );
        assert!(shown.contains(SHOWN), "{shown}");
    }

    #[test]
    fn a_transport_detail_is_capped_and_escaped() {
        let failure = TransportFailure::new(TransportErrorKind::Reset, "r".repeat(20 << 20));
        assert!(failure.detail.len() <= 1100 && failure.detail.ends_with(" bytes]"));
        assert!(failure.to_string().len() <= 2048);
        assert!(format!("{failure:?}").len() <= 2048);

        let failure = TransportFailure::new(TransportErrorKind::Tls, EVIL);
        assert_eq!(failure.to_string(), format!("Tls: {SHOWN}"));
        // Escaped even when built without `new`: the field is public.
        let failure = TransportFailure {
            kind: TransportErrorKind::Other,
            detail: EVIL.to_owned(),
        };
        assert_one_safe_line(&failure.to_string());
        assert_one_safe_line(&Failure::Transport(failure).to_string());
    }

    #[test]
    fn every_display_of_a_failure_escapes_server_text() {
        let text = || Some(EVIL.to_owned());
        let failures = [
            Failure::Server {
                status: 500,
                errcode: text(),
                message: text(),
            },
            Failure::Server {
                status: 500,
                errcode: None,
                message: text(),
            },
            Failure::Refused {
                status: 400,
                errcode: text(),
                message: None,
            },
            Failure::RateLimited {
                retry_after: None,
                errcode: text(),
                message: text(),
            },
            Failure::Redirected {
                status: 308,
                location: text(),
            },
            Failure::BadResponse {
                status: 200,
                reason: EVIL.to_owned(),
                excerpt: EVIL.to_owned(),
            },
            Failure::InvalidRequest(EVIL.to_owned()),
        ];
        for failure in failures {
            assert_one_safe_line(&failure.to_string());
            let error = SyncError {
                failure,
                class: ErrorClass::NeedsUser,
                request: RequestKind::Sync {
                    timeout: Duration::ZERO,
                },
                attempt: 1,
                delay: Duration::from_secs(1),
            };
            assert_one_safe_line(&error.to_string());
        }
        // Ordinary text is shown as it is.
        let failure = Failure::Refused {
            status: 403,
            errcode: Some("M_FORBIDDEN".to_owned()),
            message: Some("Vous n'êtes pas membre de « 日本 »".to_owned()),
        };
        assert_eq!(
            failure.to_string(),
            "request refused with 403 M_FORBIDDEN: Vous n'êtes pas membre de « 日本 »"
        );
    }

    #[test]
    fn a_redirect_is_fatal_and_says_what_to_change() {
        let failure = Failure::Redirected {
            status: 301,
            location: Some("https://matrix.example.org".to_owned()),
        };
        assert_eq!(failure.class(), ErrorClass::NeedsUser);
        assert_eq!(failure.status(), Some(301));
        assert_eq!(failure.errcode(), None);
        assert_eq!(
            failure.to_string(),
            "the homeserver redirected (301) to \"https://matrix.example.org\": \
             set the homeserver URL to the final address"
        );
        let failure = Failure::Redirected {
            status: 302,
            location: None,
        };
        assert_eq!(
            failure.to_string(),
            "the homeserver redirected (302) without a Location header: \
             set the homeserver URL to the final address"
        );
    }
}
