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

/// How a failure is treated: the class decides the delay before the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Network trouble, 5xx, deadline passed, a body that is not a sync response.
    /// The machine backs off exponentially (with jitter) and retries.
    Transient,
    /// 429: the machine waits for the larger of the server's requested wait (capped by
    /// [`Config::max_server_wait`](crate::Config::max_server_wait)) and its own backoff.
    RateLimited,
    /// 401, 403, 400 and every other 4xx: retrying will not help until something outside
    /// the machine changes (a new token, a fresh `since`). The machine keeps the service alive,
    /// retrying only at the maximum backoff, until the caller stops it.
    Fatal,
}

/// Why a request failed below HTTP: reported by whoever performs the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportErrorKind {
    /// The connection could not be established (refused, unreachable).
    Connect,
    /// The connection broke while the request or response was in flight.
    Reset,
    /// The host name did not resolve.
    Dns,
    /// The TLS handshake or record layer failed.
    Tls,
    /// The client-side deadline passed (for a timer the driver owns).
    TimedOut,
    /// The body ended before its announced length.
    Truncated,
    /// The body was larger than [`Config::max_body_bytes`](crate::Config::max_body_bytes).
    BodyTooLarge,
    /// Any other I/O failure.
    Other,
}

/// A failure of the transport, handed to [`SyncMachine::handle_failure`](crate::SyncMachine::handle_failure).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct TransportFailure {
    /// What kind of failure.
    pub kind: TransportErrorKind,
    /// A human-readable detail for logs. Never put the access token here.
    pub detail: String,
}

impl TransportFailure {
    /// A transport failure of `kind` with a detail for logs.
    pub fn new(kind: TransportErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// What exactly failed. The [`class`](Failure::class) decides what happens next.
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
    /// The status was a success (or an unexpected 1xx/3xx) but the body is not what the
    /// endpoint returns.
    #[error("bad response (status {status}): {reason}; body starts with {excerpt:?}")]
    BadResponse {
        /// HTTP status.
        status: u16,
        /// Why the body was rejected.
        reason: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
    },
    /// The machine could not build its request (an unusable configuration value slipped past
    /// validation). Retrying at the maximum backoff keeps the service observable.
    #[error("could not build the request: {0}")]
    InvalidRequest(String),
    /// The body exceeded [`Config::max_body_bytes`](crate::Config::max_body_bytes).
    #[error("response body larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
}

fn fmt_errcode(errcode: &Option<String>, message: &Option<String>) -> String {
    match (errcode, message) {
        (Some(c), Some(m)) => format!(" {c}: {m}"),
        (Some(c), None) => format!(" {c}"),
        (None, Some(m)) => format!(": {m}"),
        (None, None) => String::new(),
    }
}

impl Failure {
    /// The class that decides the delay before the next attempt.
    pub fn class(&self) -> ErrorClass {
        match self {
            Failure::RateLimited { .. } => ErrorClass::RateLimited,
            Failure::UnknownToken { .. } | Failure::Refused { .. } | Failure::InvalidRequest(_) => {
                ErrorClass::Fatal
            }
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
            | Failure::BadResponse { status, .. } => Some(*status),
            Failure::RateLimited { .. } => Some(429),
            Failure::UnknownToken { .. } => Some(401),
            _ => None,
        }
    }

    /// The Matrix `errcode`, where the body had one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Failure::Server { errcode, .. }
            | Failure::Refused { errcode, .. }
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
/// [`Fatal`](ErrorClass::Fatal) and you cannot fix the cause (for example, log in again).
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
    /// The id was never handed out by this machine.
    #[error("no request with id {0} was ever sent")]
    UnknownRequest(RequestId),
    /// The request was abandoned (its deadline passed, or it was superseded); its response
    /// must be discarded.
    #[error("request {0} is no longer awaited")]
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
}
