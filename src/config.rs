//! The service's configuration and its validation.
//!
//! Why the defaults are what they are is written in [`crate::defaults`].

use std::net::IpAddr;
use std::time::Duration;

use ruma_client_api::filter::FilterDefinition;
use ruma_common::presence::PresenceState;
use ruma_common::{OwnedServerName, ServerName, UserId};

use crate::credentials::{AccessToken, RefreshMethod, RefreshToken};
use crate::defaults;
use crate::sliding::{Protocol, SlidingPosition, SlidingSyncConfig};
use crate::text::Escaped;
use crate::token::{self, TokenProblem};

/// Which events the server should send.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SyncFilter {
    /// A filter sent inline with every request (and reused, in its `room.timeline` part,
    /// for gap-filling `/messages` requests).
    Definition(Box<FilterDefinition>),
    /// A filter uploaded beforehand with `POST /user/{userId}/filter`: `/sync` carries its
    /// `id`, and gap-filling `/messages` requests carry the `room.timeline` part of its
    /// `definition` (they take no filter id), so both deliver the same event types.
    Uploaded {
        /// The id the server returned for the upload.
        id: String,
        /// The filter that was uploaded.
        definition: Box<FilterDefinition>,
    },
}

impl SyncFilter {
    /// The default filter: room members lazy-loaded (only the members who sent the events
    /// delivered, without redundant repeats), nothing else filtered. See [`defaults`].
    pub fn lazy_loading() -> Self {
        SyncFilter::Definition(Box::new(FilterDefinition::with_lazy_loading()))
    }

    /// The default filter, with every room timeline limited to `limit` events.
    pub fn timeline_limit(limit: u32) -> Self {
        let mut def = FilterDefinition::with_lazy_loading();
        def.room.timeline.limit = Some(limit.into());
        SyncFilter::Definition(Box::new(def))
    }

    /// Parses an inline filter from its JSON text.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        Ok(SyncFilter::Definition(Box::new(serde_json::from_str(
            json,
        )?)))
    }
}

/// Gap filling: what the machine does when a room's timeline comes back `limited`.
///
/// Start from [`GapFill::default`] and change what differs:
///
/// ```
/// use matrix_sync_service::GapFill;
/// let gap_fill = GapFill::default().with_max_events_per_room(200).with_page_size(50);
/// assert!(gap_fill.enabled);
/// assert!(!GapFill::disabled().enabled);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GapFill {
    /// Fetch the missing events with `/rooms/{roomId}/messages`. When off, a gap item reports
    /// each gap instead.
    pub enabled: bool,
    /// At most this many events are fetched per room and batch; past it, the rest is reported
    /// as a gap item.
    pub max_events_per_room: usize,
    /// `limit` of each `/messages` request.
    pub page_size: u32,
}

impl Default for GapFill {
    fn default() -> Self {
        Self {
            enabled: true,
            max_events_per_room: defaults::GAP_FILL_MAX_EVENTS,
            page_size: defaults::GAP_FILL_PAGE_SIZE,
        }
    }
}

impl GapFill {
    /// No filling: every gap is reported as a gap item.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Sets [`enabled`](Self::enabled).
    #[must_use]
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Sets [`max_events_per_room`](Self::max_events_per_room).
    #[must_use]
    pub fn with_max_events_per_room(mut self, max: usize) -> Self {
        self.max_events_per_room = max;
        self
    }

    /// Sets [`page_size`](Self::page_size).
    #[must_use]
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size;
        self
    }
}

/// Everything the machine and the driver need. Build it with [`Config::new`], change the
/// public fields, and let [`SyncMachine::new`](crate::SyncMachine::new) (or `start`) validate it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Base URL of the homeserver, such as `https://matrix.example.org`. With
    /// [`discover`](Config#structfield.discover), the address of the server name instead (such as
    /// `https://example.org`), where its well-known is asked for.
    pub homeserver: String,
    /// Find the homeserver by server discovery before the first sync: `GET
    /// {homeserver}/.well-known/matrix/client`, and the base URL it names (or, on a 404,
    /// `homeserver` itself) for every request after. Off with [`Config::new`], on with
    /// [`Config::discover()`]. Once the base URL is found, the machine's
    /// [`config`](crate::SyncMachine::config) holds it in `homeserver`, with `discover` off. See the crate docs
    /// (and the `discovery` module's, in the source).
    pub discover: bool,
    /// The access token, sent in the `Authorization` header only.
    pub access_token: AccessToken,
    /// The refresh token: with one, the machine refreshes the access token ahead of
    /// [`access_token_expires_in`](Self::access_token_expires_in), and once after a 401
    /// `M_UNKNOWN_TOKEN`, handing the new credentials out before using them.
    pub refresh_token: Option<RefreshToken>,
    /// How long the access token lives from when the machine is created (`expires_in_ms` of
    /// the login, less the time since). `None`: unknown, refreshed only after a 401.
    pub access_token_expires_in: Option<Duration>,
    /// Where the refresh token is exchanged.
    pub refresh: RefreshMethod,
    /// Resume from this `next_batch` token (for instance a stored checkpoint).
    pub since: Option<String>,
    /// Filter for `/sync`: by default [`SyncFilter::lazy_loading`]; `None` sends none.
    pub filter: Option<SyncFilter>,
    /// Server-side long-poll timeout of incremental syncs.
    pub long_poll_timeout: Duration,
    /// How long past the long-poll timeout the client waits for an answer.
    pub deadline_margin: Duration,
    /// Client-side deadline of a sync without `since`.
    pub initial_sync_deadline: Duration,
    /// Client-side deadline of a catch-up (`timeout=0`) from a `since`: after days offline
    /// the server may take minutes to assemble it.
    pub catch_up_deadline: Duration,
    /// Delays between failed attempts.
    pub backoff: BackoffPolicy,
    /// Seed of the jitter generator: same seed and inputs, same delays.
    pub jitter_seed: u64,
    /// Bodies larger than this are refused.
    pub max_body_bytes: u64,
    /// Ceiling on a wait requested by the server (429).
    pub max_server_wait: Duration,
    /// `set_presence` of sync requests.
    pub set_presence: PresenceState,
    /// `full_state` of the first sync request.
    pub full_state: bool,
    /// Allow plain `http` to a host that is not loopback.
    pub allow_insecure_http: bool,
    /// Gap filling of limited timelines.
    pub gap_fill: GapFill,
    /// How many recently delivered event ids are remembered to suppress duplicates.
    pub dedup_capacity: usize,
    /// The sync protocol: `/v3/sync` (the default), simplified sliding sync (MSC4186), or
    /// sliding sync when the server offers it ([`Protocol::Auto`]).
    pub protocol: Protocol,
    /// The settings of sliding sync, used when it is the protocol spoken.
    pub sliding_sync: SlidingSyncConfig,
}

impl Config {
    /// A configuration with every default, for `homeserver` (the base URL, used as given:
    /// no discovery) and `access_token`.
    pub fn new(homeserver: impl Into<String>, access_token: impl Into<String>) -> Self {
        Self {
            homeserver: homeserver.into(),
            discover: false,
            access_token: AccessToken::new(access_token),
            refresh_token: None,
            access_token_expires_in: None,
            refresh: RefreshMethod::Matrix,
            since: None,
            filter: Some(SyncFilter::lazy_loading()),
            long_poll_timeout: defaults::LONG_POLL_TIMEOUT,
            deadline_margin: defaults::DEADLINE_MARGIN,
            initial_sync_deadline: defaults::INITIAL_SYNC_DEADLINE,
            catch_up_deadline: defaults::CATCH_UP_DEADLINE,
            backoff: BackoffPolicy::default(),
            jitter_seed: 0,
            max_body_bytes: defaults::MAX_BODY_BYTES,
            max_server_wait: defaults::MAX_SERVER_WAIT,
            set_presence: PresenceState::Online,
            full_state: false,
            allow_insecure_http: false,
            gap_fill: GapFill::default(),
            dedup_capacity: defaults::DEDUP_CAPACITY,
            protocol: Protocol::V3,
            sliding_sync: SlidingSyncConfig::default(),
        }
    }

    /// A configuration with every default that finds the homeserver by server discovery
    /// ([`discover`](Config#structfield.discover)), from a server name (`example.org`,
    /// `matrix.example.org:8448`, `127.0.0.1:8008`) or a user id (`@me:example.org`: its
    /// server name).
    ///
    /// The well-known is asked for at `https://{server_name}` (the port, if any, is kept). A
    /// loopback server name (`localhost`, `127.0.0.0/8`, `[::1]`, with or without a port) is
    /// asked over plain http instead: a server on this machine has no certificate for such a
    /// name, and plain http to loopback never leaves the host, as for
    /// [`homeserver`](Self::homeserver) URLs. For https to a loopback name, or plain http
    /// to another (with [`allow_insecure_http`](Self::allow_insecure_http)), set
    /// `homeserver` and `discover` yourself.
    ///
    /// ```
    /// use matrix_sync_service::Config;
    /// let config = Config::discover("@me:example.org", "secret-token")?;
    /// assert_eq!(config.homeserver, "https://example.org");
    /// assert!(config.discover);
    /// let local = Config::discover("127.0.0.1:8008", "secret-token")?;
    /// assert_eq!(local.homeserver, "http://127.0.0.1:8008");
    /// assert!(Config::discover("https://example.org", "t").is_err(), "a URL: use Config::new");
    /// # Ok::<(), matrix_sync_service::ConfigError>(())
    /// ```
    ///
    /// Fails with [`ConfigError::InvalidServerName`] when `server_name_or_user_id` is neither.
    pub fn discover(
        server_name_or_user_id: &str,
        access_token: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let server_name = server_name_of(server_name_or_user_id)?;
        let scheme = if is_loopback(server_name.host()) {
            "http"
        } else {
            "https"
        };
        let mut config = Self::new(format!("{scheme}://{server_name}"), access_token);
        config.discover = true;
        Ok(config)
    }

    /// Checks every field; the first unusable one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_url(&self.homeserver, self.allow_insecure_http)?;
        if self.discover {
            validate_discovery_root(&self.homeserver)?;
        }
        // The rule of every credential (`token::check_credential`): a header value takes
        // visible ASCII only, and a token past MAX_TOKEN_BYTES is refused wherever it comes from.
        match token::check_credential(self.access_token.expose()) {
            Ok(()) => {}
            Err(TokenProblem::Empty) => return Err(ConfigError::MissingAccessToken),
            Err(TokenProblem::TooLong) => {
                return Err(ConfigError::Invalid {
                    field: "access_token",
                    reason: TokenProblem::TooLong.reason(),
                })
            }
            Err(TokenProblem::ControlCharacter | TokenProblem::NotVisibleAscii) => {
                return Err(ConfigError::InvalidAccessToken)
            }
        }
        if let Some(Err(problem)) = self
            .refresh_token
            .as_ref()
            .map(|t| token::check_credential(t.expose()))
        {
            return Err(ConfigError::Invalid {
                field: "refresh_token",
                reason: problem.reason(),
            });
        }
        if let RefreshMethod::OAuth {
            token_endpoint,
            client_id,
        } = &self.refresh
        {
            validate_url(token_endpoint, self.allow_insecure_http).map_err(|e| match e {
                ConfigError::InvalidHomeserver { reason } => ConfigError::Invalid {
                    field: "refresh.token_endpoint",
                    reason,
                },
                _ => ConfigError::Invalid {
                    field: "refresh.token_endpoint",
                    reason: "plain http is only allowed to loopback",
                },
            })?;
            if client_id.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "refresh.client_id",
                    reason: "must not be empty",
                });
            }
        }
        if let Some(since) = &self.since {
            match token::check(since) {
                Ok(()) => {}
                Err(TokenProblem::Empty) => return Err(ConfigError::EmptySince),
                Err(problem) => {
                    return Err(ConfigError::Invalid {
                        field: "since",
                        reason: problem.reason(),
                    })
                }
            }
            if self.protocol == Protocol::SlidingSync
                && SlidingPosition::from_token(since).is_none()
            {
                return Err(ConfigError::Invalid {
                    field: "since",
                    reason: "not a sliding sync checkpoint (a /v3/sync token? start without \
                             one, or use Protocol::Auto to resume /v3/sync from it)",
                });
            }
        }
        validate_sliding(&self.sliding_sync)?;
        check_duration(
            "long_poll_timeout",
            self.long_poll_timeout,
            defaults::MIN_LONG_POLL_TIMEOUT,
            HOUR,
        )?;
        check_duration(
            "deadline_margin",
            self.deadline_margin,
            Duration::from_millis(1),
            HOUR,
        )?;
        check_duration(
            "initial_sync_deadline",
            self.initial_sync_deadline,
            Duration::from_millis(1),
            DAY,
        )?;
        check_duration(
            "catch_up_deadline",
            self.catch_up_deadline,
            Duration::from_millis(1),
            DAY,
        )?;
        check_duration("max_server_wait", self.max_server_wait, Duration::ZERO, DAY)?;
        self.backoff.validate()?;
        if self.max_body_bytes == 0 {
            return Err(ConfigError::Invalid {
                field: "max_body_bytes",
                reason: "must not be zero",
            });
        }
        check_nonzero(&[
            ("gap_fill.page_size", self.gap_fill.page_size as usize),
            ("dedup_capacity", self.dedup_capacity),
        ])
    }
}

/// The first of `counts` that is zero, as the error naming its field.
pub(crate) fn check_nonzero(counts: &[(&'static str, usize)]) -> Result<(), ConfigError> {
    match counts.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => Err(ConfigError::Invalid {
            field,
            reason: "must not be zero",
        }),
        None => Ok(()),
    }
}

// ---- backoff ------------------------------------------------------------------------------

/// How delays grow between consecutive failures.
///
/// The `n`-th consecutive failure (from 1) waits `min(initial * factor^(n-1), max)`, of which
/// jitter removes a random fraction in `[0, jitter)`: every delay lies in
/// `[(1 - jitter) * base, base]`, never above `max`.
///
/// Start from [`BackoffPolicy::default`] and change what differs:
///
/// ```
/// use std::time::Duration;
/// use matrix_sync_service::BackoffPolicy;
/// let backoff = BackoffPolicy::default()
///     .with_initial(Duration::from_millis(250))
///     .with_max(Duration::from_secs(30))
///     .with_jitter(0.0);
/// assert_eq!(backoff.factor, 2.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth factor, at least 1.
    pub factor: f64,
    /// Cap on every delay; also the fixed delay after a fatal error.
    pub max: Duration,
    /// Fraction in `[0, 1]` of each delay that jitter may remove.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: defaults::BACKOFF_INITIAL,
            factor: defaults::BACKOFF_FACTOR,
            max: defaults::BACKOFF_MAX,
            jitter: defaults::BACKOFF_JITTER,
        }
    }
}

impl BackoffPolicy {
    /// Sets [`initial`](Self::initial).
    #[must_use]
    pub fn with_initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// Sets [`factor`](Self::factor).
    #[must_use]
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Sets [`max`](Self::max).
    #[must_use]
    pub fn with_max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Sets [`jitter`](Self::jitter).
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let day = Duration::from_secs(86_400);
        check_duration(
            "backoff.initial",
            self.initial,
            Duration::from_millis(1),
            day,
        )?;
        check_duration("backoff.max", self.max, self.initial, day)?;
        if !(1.0..=100.0).contains(&self.factor) {
            return Err(ConfigError::Invalid {
                field: "backoff.factor",
                reason: "must be within 1..=100",
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::Invalid {
                field: "backoff.jitter",
                reason: "must be within 0..=1",
            });
        }
        Ok(())
    }

    /// The delay before jitter for the `attempt`-th consecutive failure (1-based).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs).min(self.max)
        }
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

pub(crate) fn check_duration(
    field: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::DurationOutOfRange {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

/// An absolute http(s) URL without fragment, user info or query; plain http to loopback
/// only, unless allowed.
pub(crate) fn validate_url(url: &str, allow_insecure_http: bool) -> Result<(), ConfigError> {
    let bad = |reason| ConfigError::InvalidHomeserver { reason };
    // Checked on the text: a fragment would silently drop every path the machine appends.
    if url.contains('#') {
        return Err(bad("must not have a fragment"));
    }
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(bad(
            "must not carry user info (credentials go in access_token)",
        ));
    }
    let scheme = uri
        .scheme_str()
        .ok_or(bad("not an absolute URL (no scheme)"))?;
    let host = uri.host().ok_or(bad("no host"))?;
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    match scheme {
        "https" => Ok(()),
        "http" if allow_insecure_http || is_loopback(host) => Ok(()),
        "http" => Err(ConfigError::InsecureHttp),
        _ => Err(bad("scheme must be http or https")),
    }
}

/// The server name of a server name or a user id, as ruma parses them.
fn server_name_of(input: &str) -> Result<OwnedServerName, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidServerName {
        input: crate::text::capped(input),
        reason: crate::text::capped(&reason),
    };
    if input.starts_with('@') {
        return UserId::parse(input)
            .map(|user| user.server_name().to_owned())
            .map_err(|e| invalid(format!("not a user id: {e}")));
    }
    if input.contains("://") {
        return Err(invalid(
            "a URL, not a server name: use Config::new for a homeserver URL".to_owned(),
        ));
    }
    ServerName::parse(input).map_err(|e| invalid(format!("not a server name: {e}")))
}

/// With discovery, `homeserver` is where a server name is served: the well-known is at its
/// root, so it has no path, and its authority is a server name.
fn validate_discovery_root(url: &str) -> Result<(), ConfigError> {
    let bad = |reason| ConfigError::InvalidHomeserver { reason };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if !matches!(uri.path(), "" | "/") {
        return Err(bad(
            "with discover, must be the server name's address, without a path",
        ));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if ServerName::parse(authority).is_err() {
        return Err(bad(
            "with discover, its host and port must be a server name",
        ));
    }
    Ok(())
}

pub(crate) fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A configuration field that cannot be used. Nothing was started; fix the field and retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `homeserver` is not an absolute http(s) URL.
    #[error("homeserver: {reason}")]
    InvalidHomeserver {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `homeserver` is plain http to a host that is not loopback, and
    /// `allow_insecure_http` is off.
    #[error(
        "homeserver: plain http is only allowed to loopback unless allow_insecure_http is set"
    )]
    InsecureHttp,
    /// The text given to [`Config::discover()`] is neither a server name nor a user id (see
    /// the grammar of the specification's appendices), or is a URL (give that to
    /// [`Config::new`]).
    #[error("server name: {:?} cannot be used: {}", input, Escaped(reason))]
    InvalidServerName {
        /// The text given (cut to about 1 KiB).
        input: String,
        /// Why (ruma's parse error).
        reason: String,
    },
    /// `access_token` is empty.
    #[error("access_token: missing")]
    MissingAccessToken,
    /// `access_token` holds characters other than visible ASCII, which cannot go in a header.
    #[error("access_token: contains characters other than visible ASCII")]
    InvalidAccessToken,
    /// `since` is an empty string (use `None`).
    #[error("since: empty token")]
    EmptySince,
    /// A duration is zero where it may not be, or absurdly long.
    #[error("{field}: {value:?} is outside {min:?}..={max:?}")]
    DurationOutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: Duration,
        /// The smallest accepted value.
        min: Duration,
        /// The largest accepted value.
        max: Duration,
    },
    /// Another field is unusable.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Checks the sliding sync settings: what Synapse would refuse with a 400 is refused here.
fn validate_sliding(config: &SlidingSyncConfig) -> Result<(), ConfigError> {
    let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
    if config.conn_id.is_empty() || config.conn_id.len() > 64 {
        return invalid("sliding_sync.conn_id", "must be 1 to 64 bytes");
    }
    if config.conn_id.chars().any(char::is_control) {
        return invalid(
            "sliding_sync.conn_id",
            TokenProblem::ControlCharacter.reason(),
        );
    }
    if !(1..=1000).contains(&config.timeline_limit) {
        return invalid("sliding_sync.timeline_limit", "must be within 1..=1000");
    }
    if config.window == 0 {
        return invalid("sliding_sync.window", "must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_delays_double_up_to_the_cap() {
        let p = BackoffPolicy::default();
        let ms: Vec<u128> = (1..=9).map(|n| p.base_delay(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
        assert_eq!(p.base_delay(u32::MAX), p.max);
    }

    #[test]
    fn validation_rejects_each_unusable_field() {
        let ok = BackoffPolicy::default();
        assert_eq!(ok.validate(), Ok(()));
        let field = |p: BackoffPolicy| match p.validate() {
            Err(
                ConfigError::DurationOutOfRange { field, .. } | ConfigError::Invalid { field, .. },
            ) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(BackoffPolicy {
                initial: Duration::ZERO,
                ..ok.clone()
            }),
            "backoff.initial"
        );
        assert_eq!(
            field(BackoffPolicy {
                max: Duration::from_millis(100),
                ..ok.clone()
            }),
            "backoff.max"
        );
        assert_eq!(
            field(BackoffPolicy {
                max: Duration::from_secs(86_401),
                ..ok.clone()
            }),
            "backoff.max"
        );
        assert_eq!(
            field(BackoffPolicy {
                factor: 0.5,
                ..ok.clone()
            }),
            "backoff.factor"
        );
        assert_eq!(
            field(BackoffPolicy {
                factor: f64::NAN,
                ..ok.clone()
            }),
            "backoff.factor"
        );
        assert_eq!(
            field(BackoffPolicy {
                jitter: 1.5,
                ..ok.clone()
            }),
            "backoff.jitter"
        );
        assert_eq!(
            field(BackoffPolicy {
                jitter: -0.1,
                ..ok.clone()
            }),
            "backoff.jitter"
        );
        assert_eq!(
            BackoffPolicy {
                factor: 1.0,
                jitter: 1.0,
                ..ok.clone()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(
            BackoffPolicy {
                max: ok.initial,
                ..ok
            }
            .validate(),
            Ok(())
        );
    }

    fn check(url: &str) -> Result<(), ConfigError> {
        Config::new(url, "t").validate()
    }

    #[test]
    fn homeserver_urls() {
        assert_eq!(check("https://matrix.example.org"), Ok(()));
        assert_eq!(check("https://matrix.example.org/"), Ok(()));
        for loopback in [
            "http://localhost:8008",
            "http://127.0.0.2:1",
            "http://[::1]:8008",
        ] {
            assert_eq!(check(loopback), Ok(()), "{loopback}");
        }
        assert_eq!(
            check("http://matrix.example.org"),
            Err(ConfigError::InsecureHttp)
        );
        assert_eq!(check("http://10.0.0.1"), Err(ConfigError::InsecureHttp));
        for bad in [
            "",
            "matrix.example.org",
            "/relative",
            "ftp://x.org",
            "https://x.org/?a=b",
            "http://localhost:8008/#x",
            "https://x.org#",
            "https://user:pw@x.org",
            "https://user@x.org",
        ] {
            assert!(
                matches!(check(bad), Err(ConfigError::InvalidHomeserver { .. })),
                "{bad}"
            );
        }
        let mut config = Config::new("http://matrix.example.org", "t");
        config.allow_insecure_http = true;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn tokens_since_and_durations() {
        let base = || Config::new("https://x.org", "t");
        assert_eq!(
            Config::new("https://x.org", "").validate(),
            Err(ConfigError::MissingAccessToken)
        );
        assert_eq!(
            Config::new("https://x.org", "a b").validate(),
            Err(ConfigError::InvalidAccessToken)
        );
        for bad in ["a\n", "tök", "a\u{7f}", "\u{a0}x"] {
            assert_eq!(
                Config::new("https://x.org", bad).validate(),
                Err(ConfigError::InvalidAccessToken),
                "{bad:?}"
            );
        }
        // The length bound of every token holds for the credentials too.
        let long = "x".repeat(token::MAX_TOKEN_BYTES + 1);
        assert_eq!(
            Config::new("https://x.org", long.as_str()).validate(),
            Err(ConfigError::Invalid {
                field: "access_token",
                reason: "longer than MAX_TOKEN_BYTES"
            })
        );
        assert_eq!(
            Config::new("https://x.org", "x".repeat(token::MAX_TOKEN_BYTES)).validate(),
            Ok(())
        );
        for (refresh, reason) in [
            (long.as_str(), "longer than MAX_TOKEN_BYTES"),
            ("", "empty"),
            ("r t", "not visible ASCII"),
            ("r\u{0}", "contains a control character"),
        ] {
            let mut c = base();
            c.refresh_token = Some(RefreshToken::new(refresh));
            assert_eq!(
                c.validate(),
                Err(ConfigError::Invalid {
                    field: "refresh_token",
                    reason
                }),
                "{refresh:?}"
            );
        }
        let mut c = base();
        c.since = Some("s\n1".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { field: "since", .. })
        ));
        let mut c = base();
        c.since = Some("x".repeat(token::MAX_TOKEN_BYTES + 1));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { field: "since", .. })
        ));
        let mut c = base();
        c.since = Some("  pad  ".into());
        assert_eq!(
            c.validate(),
            Ok(()),
            "a token that round-trips is kept as is"
        );
        let mut c = base();
        c.since = Some(String::new());
        assert_eq!(c.validate(), Err(ConfigError::EmptySince));
        let mut c = base();
        c.deadline_margin = Duration::ZERO;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DurationOutOfRange {
                field: "deadline_margin",
                ..
            })
        ));
        let mut c = base();
        c.initial_sync_deadline = Duration::from_secs(86_401);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DurationOutOfRange {
                field: "initial_sync_deadline",
                ..
            })
        ));
        for short in [Duration::ZERO, Duration::from_millis(99)] {
            let mut c = base();
            c.long_poll_timeout = short;
            assert!(
                matches!(
                    c.validate(),
                    Err(ConfigError::DurationOutOfRange {
                        field: "long_poll_timeout",
                        ..
                    })
                ),
                "a long-poll of {short:?} is polling: refused"
            );
        }
        let mut c = base();
        c.catch_up_deadline = Duration::ZERO;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DurationOutOfRange {
                field: "catch_up_deadline",
                ..
            })
        ));
        let mut c = base();
        c.max_body_bytes = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                field: "max_body_bytes",
                ..
            })
        ));
        let mut c = base();
        c.gap_fill.page_size = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                field: "gap_fill.page_size",
                ..
            })
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let config = Config::new("https://x.org", "syt_secret_value");
        let debug = format!("{config:?}");
        assert!(!debug.contains("syt_secret_value"));
        assert!(debug.contains("<redacted>"));
        assert_eq!(config.access_token.expose(), "syt_secret_value");
    }

    #[test]
    fn sliding_settings_synapse_would_refuse_are_refused() {
        assert!(validate_sliding(&SlidingSyncConfig::default()).is_ok());
        let mut config = SlidingSyncConfig {
            timeline_limit: 0,
            ..SlidingSyncConfig::default()
        };
        assert!(validate_sliding(&config).is_err());
        config.timeline_limit = 1001;
        assert!(validate_sliding(&config).is_err());
        config.timeline_limit = 1000;
        config.window = 0;
        assert!(validate_sliding(&config).is_err());
        config.window = 1;
        config.conn_id = "x".repeat(65);
        assert!(validate_sliding(&config).is_err());
        config.conn_id = "a\nb".to_owned();
        assert!(validate_sliding(&config).is_err());
        config.conn_id = "x".repeat(64);
        assert!(validate_sliding(&config).is_ok());
    }
}
