//! Building the HTTP requests the machine asks for.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, AUTHORIZATION};
use ruma_client_api::filter::RoomEventFilter;
use ruma_client_api::message::get_message_events::v3 as messages;
use ruma_common::api::path_builder::VersionHistory;
use ruma_common::api::{MatrixVersion, OutgoingRequest as RumaRequest, SupportedVersions};
use ruma_common::presence::PresenceState;
use ruma_common::OwnedRoomId;

use crate::config::{Config, SyncFilter};

/// Identifies one request handed out by the machine; its response must carry the same id.
/// Opaque: only the machine makes them, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(u64);

impl RequestId {
    pub(crate) fn new(n: u64) -> Self {
        Self(n)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a request is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestKind {
    /// `GET /_matrix/client/v3/sync`.
    Sync {
        /// The server-side long-poll timeout it carries (zero when catching up).
        timeout: Duration,
    },
    /// `GET /_matrix/client/v3/rooms/{roomId}/messages`, filling a gap.
    Messages {
        /// The room whose gap is being filled.
        room_id: OwnedRoomId,
    },
    /// A token refresh: `POST /_matrix/client/v3/refresh`, or the OAuth 2.0 token endpoint
    /// (see [`RefreshMethod`](crate::RefreshMethod)). Its body carries the refresh token.
    Refresh,
    /// A request of the end-to-end encryption stage (feature `e2ee`); the machine never
    /// makes one.
    Crypto(CryptoRequestKind),
    /// Server discovery ([`Config::discover`](crate::Config::discover())): `GET
    /// /.well-known/matrix/client` of the server name, or where it redirected. No
    /// `Authorization` header.
    Discovery,
    /// Server discovery's check of the base URL found: `GET {base_url}/_matrix/client/versions`.
    /// No `Authorization` header.
    VersionsCheck,
    /// Simplified sliding sync (MSC4186): `POST
    /// /_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=…&timeout=…` with a
    /// JSON body (see the [`sliding`](crate::sliding) module).
    SlidingSync {
        /// The server-side long-poll timeout it carries (zero when catching up).
        timeout: Duration,
    },
    /// [`Protocol::Auto`](crate::Protocol::Auto) asking which protocol the server offers:
    /// `GET /_matrix/client/versions` with the access token (Synapse answers per user).
    ProtocolCheck,
}

/// What a request of the E2EE stage is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CryptoRequestKind {
    /// `GET /_matrix/client/v3/account/whoami`: the device id of the access token.
    Whoami,
    /// `POST /_matrix/client/v3/keys/upload`: device and one-time keys.
    KeysUpload,
    /// `POST /_matrix/client/v3/keys/query`: other devices' keys.
    KeysQuery,
    /// `POST /_matrix/client/v3/keys/claim`: one-time keys of other devices.
    KeysClaim,
    /// `PUT /_matrix/client/v3/sendToDevice/{type}/{txnId}`.
    ToDevice,
    /// `POST /_matrix/client/v3/keys/signatures/upload`.
    KeysSignatures,
    /// `PUT /_matrix/client/v3/rooms/{roomId}/send/{type}/{txnId}` (in-room verification).
    RoomSend,
}

impl CryptoRequestKind {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            CryptoRequestKind::Whoami => "whoami",
            CryptoRequestKind::KeysUpload => "keys_upload",
            CryptoRequestKind::KeysQuery => "keys_query",
            CryptoRequestKind::KeysClaim => "keys_claim",
            CryptoRequestKind::ToDevice => "to_device",
            CryptoRequestKind::KeysSignatures => "keys_signatures",
            CryptoRequestKind::RoomSend => "room_send",
        }
    }
}

impl RequestKind {
    /// Whether it is one of server discovery's requests (unauthenticated).
    pub(crate) fn is_discovery(&self) -> bool {
        matches!(self, RequestKind::Discovery | RequestKind::VersionsCheck)
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            RequestKind::Sync { .. } => "sync",
            RequestKind::Messages { .. } => "messages",
            RequestKind::Refresh => "refresh",
            RequestKind::Crypto(kind) => kind.name(),
            RequestKind::Discovery => "discovery",
            RequestKind::VersionsCheck => "versions",
            RequestKind::SlidingSync { .. } => "sliding_sync",
            RequestKind::ProtocolCheck => "protocol_check",
        }
    }
}

/// The request the machine awaits, as [`SyncMachine::in_flight`](crate::SyncMachine::in_flight)
/// reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InFlightRequest<'a> {
    /// Its id.
    pub id: RequestId,
    /// What it is for.
    pub kind: &'a RequestKind,
    /// When the machine gives up on it.
    pub deadline: Instant,
}

/// A request the machine wants sent: give its response (or failure) back with the same `id`.
///
/// `Debug` shows no secret: the `Authorization` header is marked sensitive, and the body
/// (a refresh request's carries the refresh token) is shown by its length only.
#[must_use = "a request the machine handed out must be sent, or the machine waits for it until its deadline"]
pub struct OutgoingRequest {
    /// The id to hand back with the response.
    pub id: RequestId,
    /// What the request is for.
    pub kind: RequestKind,
    /// The HTTP request (method, URL, headers, empty body).
    pub http: http::Request<Vec<u8>>,
    /// When the machine gives up on it; a driver should abort the transfer by then.
    pub deadline: Instant,
}

impl fmt::Debug for OutgoingRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingRequest")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("method", self.http.method())
            .field("uri", self.http.uri())
            .field("headers", self.http.headers())
            .field("body_bytes", &self.http.body().len())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Error building a request: a bug in us or in ruma, reported rather than panicking.
#[derive(Debug, thiserror::Error)]
#[error("could not build the {what} request: {detail}")]
pub(crate) struct BuildError {
    what: &'static str,
    detail: String,
}

fn versions() -> SupportedVersions {
    SupportedVersions {
        versions: [MatrixVersion::V1_1].into(),
        features: Default::default(),
    }
}

fn finish<R: RumaRequest<PathBuilder = VersionHistory>>(
    what: &'static str,
    request: R,
    config: &Config,
) -> Result<http::Request<Vec<u8>>, BuildError> {
    let err = |e: &dyn fmt::Display| BuildError {
        what,
        detail: e.to_string(),
    };
    let versions = versions();
    let input = Cow::Borrowed(&versions);
    // The token is added below, not by ruma, so that the header is marked sensitive.
    let mut http = request
        .try_into_http_request_inner(&config.homeserver, input)
        .map_err(|e| err(&e))?
        .map(|_| Vec::new());
    http.headers_mut().insert(
        AUTHORIZATION,
        bearer(&config.access_token).map_err(|e| err(&e))?,
    );
    Ok(http)
}

/// `GET /sync` with the given `since` and server-side `timeout`.
///
/// Written out here rather than built by ruma, which costs more than a small sync's whole
/// parse (the request type, a clone of the filter, a serializer per field); a test holds the
/// two equal, method, URL and headers, over every setting that reaches the request.
pub(crate) fn sync_request(
    config: &Config,
    filter: Option<&str>,
    since: Option<&str>,
    timeout: Duration,
    full_state: bool,
) -> Result<http::Request<Vec<u8>>, BuildError> {
    let err = |e: &dyn fmt::Display| BuildError {
        what: "sync",
        detail: e.to_string(),
    };
    let base = &config.homeserver;
    let mut url = String::with_capacity(
        base.len() + 64 + filter.map_or(0, str::len) + since.map_or(0, |s| 3 * s.len()),
    );
    url.push_str(base.strip_suffix('/').unwrap_or(base));
    url.push_str("/_matrix/client/v3/sync?");
    if let Some(filter) = filter {
        url.push_str("filter=");
        url.push_str(filter);
        url.push('&');
    }
    if let Some(since) = since {
        url.push_str("since=");
        form_encode(&mut url, since);
        url.push('&');
    }
    if full_state {
        url.push_str("full_state=true&");
    }
    if config.set_presence != PresenceState::Online {
        url.push_str("set_presence=");
        form_encode(&mut url, config.set_presence.as_str());
        url.push('&');
    }
    url.push_str("timeout=");
    url.push_str(itoa::Buffer::new().format(timeout.as_millis()));
    http::Request::builder()
        .method(http::Method::GET)
        .uri(url)
        .header(
            AUTHORIZATION,
            bearer(&config.access_token).map_err(|e| err(&e))?,
        )
        .body(Vec::new())
        .map_err(|e| err(&e))
}

/// The `filter` parameter of `config`'s `/sync` requests, form-encoded; `None` without a
/// filter. The machine keeps it: the filter does not change while it runs.
pub(crate) fn sync_filter_param(config: &Config) -> Result<Option<String>, BuildError> {
    let text = match &config.filter {
        Some(SyncFilter::Definition(def)) => {
            &serde_json::to_string(def).map_err(|e| BuildError {
                what: "sync",
                detail: e.to_string(),
            })?
        }
        Some(SyncFilter::Uploaded { id, .. }) => id,
        None => return Ok(None),
    };
    let mut encoded = String::with_capacity(text.len() * 2);
    form_encode(&mut encoded, text);
    Ok(Some(encoded))
}

/// `pairs` as an `application/x-www-form-urlencoded` string (`k=v&k=v`, each side encoded by
/// [`form_encode`]): a query string or a form body.
pub(crate) fn form_pairs(pairs: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_encode(&mut out, key);
        out.push('=');
        form_encode(&mut out, value);
    }
    out
}

/// Appends `text` encoded as `application/x-www-form-urlencoded` does (what
/// `form_urlencoded::byte_serialize` writes: `*-._` and ASCII alphanumerics as they are, space
/// as `+`, every other byte as `%XX`), a byte at a time into one buffer: the crate yields a
/// piece per run of plain bytes, a cost a JSON filter pays once per punctuation mark.
fn form_encode(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        match byte {
            b'*' | b'-' | b'.' | b'_' | b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
    }
}

/// The `Authorization` header of an access token, marked sensitive (so that no `Debug` output
/// shows it).
pub(crate) fn bearer(
    token: &crate::credentials::AccessToken,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// `GET /rooms/{roomId}/messages?dir=b&from=..&to=..&limit=..`.
pub(crate) fn messages_request(
    config: &Config,
    room_id: &OwnedRoomId,
    from: &str,
    to: &str,
    limit: u32,
) -> Result<http::Request<Vec<u8>>, BuildError> {
    let mut request = messages::Request::backward(room_id.clone()).from(from.to_owned());
    request.to = Some(to.to_owned());
    request.limit = limit.into();
    request.filter = timeline_filter(config);
    finish("messages", request, config)
}

fn timeline_filter(config: &Config) -> RoomEventFilter {
    match &config.filter {
        Some(
            SyncFilter::Definition(def)
            | SyncFilter::Uploaded {
                definition: def, ..
            },
        ) => {
            let mut filter = def.room.timeline.clone();
            // The page size is ours; the sync's timeline limit would shrink every page.
            filter.limit = None;
            filter
        }
        None => RoomEventFilter::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma_client_api::sync::sync_events::v3 as sync;

    /// The request as ruma builds it.
    fn by_ruma(
        config: &Config,
        since: Option<&str>,
        timeout: Duration,
        full_state: bool,
    ) -> http::Request<Vec<u8>> {
        let mut request = sync::Request::new();
        request.since = since.map(str::to_owned);
        request.timeout = Some(timeout);
        request.full_state = full_state;
        request.set_presence = config.set_presence.clone();
        request.filter = config.filter.as_ref().map(|f| match f {
            SyncFilter::Definition(def) => sync::Filter::FilterDefinition((**def).clone()),
            SyncFilter::Uploaded { id, .. } => sync::Filter::FilterId(id.clone()),
        });
        finish("sync", request, config).expect("ruma builds it")
    }

    #[test]
    fn sync_request_is_the_one_ruma_builds() {
        let filters = [
            None,
            Some(SyncFilter::lazy_loading()),
            Some(SyncFilter::timeline_limit(5)),
            Some(
                SyncFilter::from_json(r#"{"room":{"rooms":["!a b:x"],"timeline":{"types":["m.room.message"]}},"presence":{"not_types":["*"]}}"#)
                    .unwrap(),
            ),
            Some(SyncFilter::Uploaded {
                id: "f 1&=/é".to_owned(),
                definition: Box::default(),
            }),
        ];
        let mut checked = 0;
        for homeserver in [
            "https://example.org",
            "https://example.org/",
            "http://127.0.0.1:8008/prefix",
        ] {
            for filter in &filters {
                for presence in [
                    PresenceState::Online,
                    PresenceState::Offline,
                    PresenceState::Unavailable,
                ] {
                    let mut config = Config::new(homeserver, "secret token");
                    config.filter = filter.clone();
                    config.set_presence = presence;
                    for since in [None, Some("s72594_4483_1934"), Some("a b&c=d/é+%#?")] {
                        for timeout in [0, 30_000, 1_234_567] {
                            for full_state in [false, true] {
                                let timeout = Duration::from_millis(timeout);
                                let filter = sync_filter_param(&config).expect("encodes");
                                let ours = sync_request(
                                    &config,
                                    filter.as_deref(),
                                    since,
                                    timeout,
                                    full_state,
                                )
                                .expect("builds");
                                let theirs = by_ruma(&config, since, timeout, full_state);
                                assert_eq!(ours.method(), theirs.method());
                                assert_eq!(ours.uri(), theirs.uri());
                                assert_eq!(ours.headers(), theirs.headers());
                                assert!(ours.headers()[AUTHORIZATION].is_sensitive());
                                assert_eq!(ours.body(), theirs.body());
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 3 * 5 * 3 * 3 * 3 * 2);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn form_encoding_is_the_crate_s(text in proptest::prelude::any::<String>(),
                                        ascii in "[ -~]{0,40}") {
            for text in [&text, &ascii] {
                let mut ours = String::new();
                form_encode(&mut ours, text);
                let theirs: String = form_urlencoded::byte_serialize(text.as_bytes()).collect();
                proptest::prop_assert_eq!(ours, theirs);
            }
        }

        #[test]
        fn form_pairs_are_the_crate_s(pairs in proptest::collection::vec(
            (proptest::prelude::any::<String>(), "[ -~]{0,20}"), 0..4)) {
            let borrowed: Vec<(&str, &str)> =
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut theirs = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &borrowed {
                theirs.append_pair(k, v);
            }
            proptest::prop_assert_eq!(form_pairs(&borrowed), theirs.finish());
        }
    }
}
