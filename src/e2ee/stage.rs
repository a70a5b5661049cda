//! The E2EE stage itself: an `OlmMachine` between the sync machine's events and the consumer.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, OutgoingRequest as CryptoRequest};
use matrix_sdk_crypto::{
    DecryptionSettings, EncryptionSyncChanges, OlmMachine, RoomEventDecryptionResult,
    TrustRequirement,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma16::api::IncomingResponse;
use ruma16::serde::Raw;
use ruma_common::{OwnedDeviceId, OwnedUserId};
use ruma_crypto as ruma16;
use serde_json::value::RawValue;

use super::info::{Decrypted, Encryption, Undecryptable, UndecryptableReason, Verification};
use crate::classify::{bad_response, classify};
use crate::config::{BackoffPolicy, Config};
use crate::credentials::AccessToken;
use crate::error::{
    ErrorClass, Failure, InputError, SyncError, TransportErrorKind, TransportFailure,
};
use crate::normalize::{normalize, Event, EventKind, Section};
use crate::request::{CryptoRequestKind, OutgoingRequest, RequestId, RequestKind};
use crate::schedule::Backoff;

/// The stage's request ids live above the machine's, so one dispatch table can hold both.
const ID_BASE: u64 = 1 << 63;
/// Extra time a keys request may take beyond the configured margin (`/keys/query` and
/// `/keys/claim` wait up to 10 s for remote servers).
const KEYS_DEADLINE_EXTRA: Duration = Duration::from_secs(10);

/// Where the crypto state (identity keys, Olm sessions, room keys) lives.
#[derive(Clone)]
#[non_exhaustive]
pub enum CryptoStore {
    /// In memory: lost when the stage is dropped. For tests.
    Memory,
    /// matrix-sdk-sqlite's crypto store in this directory (created if missing), its secrets
    /// encrypted with `passphrase` when one is given.
    Sqlite {
        /// The directory of the store.
        dir: PathBuf,
        /// Encrypts the store's secrets at rest; `None` stores them unencrypted.
        passphrase: Option<String>,
    },
}

impl fmt::Debug for CryptoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoStore::Memory => f.write_str("Memory"),
            CryptoStore::Sqlite { dir, passphrase } => f
                .debug_struct("Sqlite")
                .field("dir", dir)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// The configuration of the E2EE stage.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct E2eeConfig {
    /// The crypto store.
    pub store: CryptoStore,
    /// The user the access token belongs to; asked from `GET /account/whoami` when `None`.
    pub user_id: Option<OwnedUserId>,
    /// The device of the access token; asked from `GET /account/whoami` when `None`. A store
    /// belongs to one device: opening it with another one is refused.
    pub device_id: Option<OwnedDeviceId>,
    /// How many undecryptable events are kept, to be delivered again when their room key
    /// arrives later in the run (oldest dropped first).
    pub max_pending_undecryptable: usize,
}

impl E2eeConfig {
    /// A configuration with `store`, ids from `whoami`, and a cap of 1,024 pending events.
    pub fn new(store: CryptoStore) -> Self {
        Self {
            store,
            user_id: None,
            device_id: None,
            max_pending_undecryptable: 1024,
        }
    }

    /// Sets the user and device ids, so that no `whoami` request is needed.
    pub fn with_ids(mut self, user_id: OwnedUserId, device_id: OwnedDeviceId) -> Self {
        self.user_id = Some(user_id);
        self.device_id = Some(device_id);
        self
    }
}

/// What went wrong in the E2EE stage. Like [`SyncError`], a report: the stage has already
/// decided what to do (retry with backoff, or go on without the refused request).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum E2eeError {
    /// One of the stage's own requests failed (keys upload, query, claim, to-device, whoami).
    #[error(transparent)]
    Request(SyncError),
    /// The crypto library or its store failed; `what` says at which step. The detail names
    /// no key and no content.
    #[error("crypto {what} failed: {detail}")]
    Crypto {
        /// The step: `open store`, `sync changes`, `decrypt`, ...
        what: &'static str,
        /// The library's error message.
        detail: String,
    },
    /// The configuration still discovers its homeserver
    /// ([`Config::discover`](Config#structfield.discover)): the stage's
    /// requests would go to the server name's address. Create the stage from the machine's
    /// [`config`](crate::SyncMachine::config) once it announced
    /// [`EventKind::Discovered`](crate::EventKind::Discovered), or from the base URL.
    #[error("the E2EE stage needs the homeserver's base URL: server discovery has not run yet")]
    NotDiscoveredYet,
}

/// Which crypto request a pending one is, for parking refused ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Which {
    Whoami,
    Crypto(CryptoKind),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CryptoKind {
    KeysUpload,
    KeysQuery,
    KeysClaim,
    ToDevice,
    Signatures,
    RoomMessage,
}

impl CryptoKind {
    fn of(request: &AnyOutgoingRequest) -> Self {
        match request {
            AnyOutgoingRequest::KeysUpload(_) => CryptoKind::KeysUpload,
            AnyOutgoingRequest::KeysQuery(_) => CryptoKind::KeysQuery,
            AnyOutgoingRequest::KeysClaim(_) => CryptoKind::KeysClaim,
            AnyOutgoingRequest::ToDeviceRequest(_) => CryptoKind::ToDevice,
            AnyOutgoingRequest::SignatureUpload(_) => CryptoKind::Signatures,
            AnyOutgoingRequest::RoomMessage(_) => CryptoKind::RoomMessage,
        }
    }

    fn request_kind(self) -> RequestKind {
        RequestKind::Crypto(match self {
            CryptoKind::KeysUpload => CryptoRequestKind::KeysUpload,
            CryptoKind::KeysQuery => CryptoRequestKind::KeysQuery,
            CryptoKind::KeysClaim => CryptoRequestKind::KeysClaim,
            CryptoKind::ToDevice => CryptoRequestKind::ToDevice,
            CryptoKind::Signatures => CryptoRequestKind::KeysSignatures,
            CryptoKind::RoomMessage => CryptoRequestKind::RoomSend,
        })
    }
}

#[derive(Clone, Copy)]
enum FailureKind {
    UnknownToken,
    Other,
}

/// A request built and waiting to go out (or in flight).
struct Pending {
    which: Which,
    crypto: Option<CryptoRequest>,
    http: http::Request<Vec<u8>>,
}

struct InFlight {
    id: RequestId,
    pending: Pending,
    deadline: Instant,
}

/// An undecryptable event kept for a late key.
struct Waiting {
    room_id: ruma16::OwnedRoomId,
    session_id: String,
    event: Event,
}

/// The end-to-end encryption stage: feed it the machine's events, hand its events to the
/// consumer, send its requests. See the [module docs](crate::e2ee).
pub struct E2ee {
    config: E2eeConfig,
    homeserver: String,
    token: AccessToken,
    deadline_margin: Duration,
    policy: BackoffPolicy,
    max_server_wait: Duration,
    runtime: tokio::runtime::Runtime,
    olm: Option<OlmMachine>,
    settings: DecryptionSettings,
    now: Instant,
    next_id: u64,
    queue: VecDeque<Pending>,
    in_flight: Option<InFlight>,
    backoff: Backoff,
    /// The next request may not go out before this instant.
    send_at: Option<Instant>,
    /// The crypto library may have new requests: ask it when idle.
    dirty: bool,
    /// Request kinds refused by the server, with the instant they may go again (`None`: not
    /// again this run).
    parked: Vec<(Which, Option<Instant>)>,
    /// The first keys upload was acknowledged (or refused): the sync may start.
    keys_settled: bool,
    /// Events of the batch being received, up to its checkpoint.
    batch: Vec<Event>,
    /// Complete batches not processed yet (the crypto machine is not open, or a store write
    /// failed and is retried at `retry_at`).
    held: VecDeque<Vec<Event>>,
    retry_at: Option<Instant>,
    out: VecDeque<Event>,
    errors: VecDeque<E2eeError>,
    waiting: VecDeque<Waiting>,
    tracked: HashSet<String>,
}

impl fmt::Debug for E2ee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("E2ee")
            .field("store", &self.config.store)
            .field(
                "user_id",
                &self.olm.as_ref().map(|o| o.user_id().to_string()),
            )
            .field(
                "device_id",
                &self.olm.as_ref().map(|o| o.device_id().to_string()),
            )
            .field("keys_settled", &self.keys_settled)
            .field("queued", &self.queue.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl Drop for E2ee {
    fn drop(&mut self) {
        // The SQLite store's connection pool closes its connections on the runtime.
        let _context = self.runtime.enter();
        self.olm = None;
    }
}

impl E2ee {
    /// Creates the stage for the account of `sync` (homeserver, token, backoff policy), at
    /// `now`. With both ids configured, the store is opened here (an unusable store is an
    /// error now); otherwise the first request is `GET /account/whoami`.
    pub fn new(sync: &Config, config: E2eeConfig, now: Instant) -> Result<Self, E2eeError> {
        if sync.discover {
            return Err(E2eeError::NotDiscoveredYet);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| E2eeError::Crypto {
                what: "runtime",
                detail: e.to_string(),
            })?;
        let mut stage = Self {
            homeserver: sync.homeserver.trim_end_matches('/').to_owned(),
            token: sync.access_token.clone(),
            deadline_margin: sync.deadline_margin,
            backoff: Backoff::new(sync.backoff.clone(), sync.jitter_seed ^ 0xE2EE_5EED),
            policy: sync.backoff.clone(),
            max_server_wait: sync.max_server_wait,
            runtime,
            olm: None,
            settings: DecryptionSettings {
                sender_device_trust_requirement: TrustRequirement::Untrusted,
            },
            now,
            next_id: 0,
            queue: VecDeque::new(),
            in_flight: None,
            send_at: None,
            dirty: true,
            parked: Vec::new(),
            keys_settled: false,
            batch: Vec::new(),
            held: VecDeque::new(),
            retry_at: None,
            out: VecDeque::new(),
            errors: VecDeque::new(),
            waiting: VecDeque::new(),
            tracked: HashSet::new(),
            config,
        };
        match (stage.config.user_id.clone(), stage.config.device_id.clone()) {
            (Some(user), Some(device)) => stage.open(&user, &device)?,
            _ => {
                let whoami = stage.whoami();
                stage.queue.push_back(whoami);
            }
        }
        Ok(stage)
    }

    fn open(&mut self, user: &OwnedUserId, device: &OwnedDeviceId) -> Result<(), E2eeError> {
        // The SQLite store's connection pool needs the runtime even to be dropped.
        let _context = self.runtime.enter();
        let crypto = |what| {
            move |e: &dyn fmt::Display| E2eeError::Crypto {
                what,
                detail: e.to_string(),
            }
        };
        let user16 = ruma16::UserId::parse(user.as_str()).map_err(|e| crypto("user id")(&e))?;
        let device16: ruma16::OwnedDeviceId = device.as_str().into();
        let olm = match &self.config.store {
            CryptoStore::Memory => self.runtime.block_on(OlmMachine::new(&user16, &device16)),
            CryptoStore::Sqlite { dir, passphrase } => {
                let store = self
                    .runtime
                    .block_on(SqliteCryptoStore::open(dir, passphrase.as_deref()))
                    .map_err(|e| crypto("open store")(&e))?;
                self.runtime
                    .block_on(OlmMachine::with_store(&user16, &device16, store, None))
                    .map_err(|e| crypto("open store")(&e))?
            }
        };
        log::info!("e2ee: crypto machine open for {user} device {device}");
        self.olm = Some(olm);
        self.dirty = true;
        Ok(())
    }

    // ---- inputs ---------------------------------------------------------------------------

    /// Feeds one event from the machine, in the order the machine yields them. Events are
    /// held until their batch's checkpoint; then the batch's to-device events, device lists
    /// and key counts go to the crypto library (and its store) before any room event of the
    /// batch is decrypted, and the batch comes out of [`poll_event`](Self::poll_event),
    /// ending with its checkpoint.
    pub fn handle_event(&mut self, event: Event) {
        let end = matches!(event.kind, EventKind::Checkpoint(_));
        self.batch.push(event);
        if end {
            let batch = std::mem::take(&mut self.batch);
            self.held.push_back(batch);
            self.process_held();
        }
    }

    /// Feeds the HTTP response to the stage's request `id`, received at `now`.
    pub fn handle_response<B: AsRef<[u8]>>(
        &mut self,
        id: RequestId,
        response: http::Response<B>,
        now: Instant,
    ) -> Result<(), InputError> {
        let flight = self.take_in_flight(id, now)?;
        let (parts, body) = response.into_parts();
        let body = body.as_ref();
        match classify(parts.status, &parts.headers, body) {
            Ok(body) => {
                let response = http::Response::from_parts(parts, body.to_vec());
                self.answered(flight.pending, response);
            }
            Err(failure) => self.failed(flight.pending, failure),
        }
        Ok(())
    }

    /// Feeds a transport failure of the stage's request `id`, at `now`.
    pub fn handle_failure(
        &mut self,
        id: RequestId,
        failure: TransportFailure,
        now: Instant,
    ) -> Result<(), InputError> {
        let flight = self.take_in_flight(id, now)?;
        let failure = match failure.kind {
            TransportErrorKind::TimedOut => Failure::DeadlineExceeded(self.deadline()),
            _ => Failure::Transport(failure),
        };
        self.failed(flight.pending, failure);
        Ok(())
    }

    /// Tells the stage the time is `now`: a request past its deadline fails, a wait ends.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), InputError> {
        self.advance(now)?;
        if self.in_flight.as_ref().is_some_and(|f| f.deadline <= now) {
            if let Some(flight) = self.in_flight.take() {
                self.failed(flight.pending, Failure::DeadlineExceeded(self.deadline()));
            }
        }
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            self.process_held();
        }
        Ok(())
    }

    // ---- outputs --------------------------------------------------------------------------

    /// The next event for the consumer.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_front()
    }

    /// The next failure report.
    #[must_use]
    pub fn poll_error(&mut self) -> Option<E2eeError> {
        self.errors.pop_front()
    }

    /// The next request to send, if one is due now. One is in flight at a time.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<OutgoingRequest> {
        if self.in_flight.is_some() || self.send_at.is_some_and(|at| at > self.now) {
            return None;
        }
        self.send_at = None;
        if self.queue.is_empty() && self.dirty && self.olm.is_some() {
            self.refresh();
        }
        let pending = self.queue.pop_front()?;
        let id = RequestId::new(ID_BASE | self.next_id);
        self.next_id += 1;
        let deadline = self.now + self.deadline();
        let kind = match pending.which {
            Which::Whoami => RequestKind::Crypto(CryptoRequestKind::Whoami),
            Which::Crypto(kind) => kind.request_kind(),
        };
        log::debug!("e2ee request {id}: {}", kind.name());
        let mut http = clone_request(&pending.http);
        if let Ok(value) = crate::request::bearer(&self.token) {
            http.headers_mut().insert(AUTHORIZATION, value);
        }
        self.in_flight = Some(InFlight {
            id,
            pending,
            deadline,
        });
        Some(OutgoingRequest {
            id,
            kind,
            http,
            deadline,
        })
    }

    /// When the stage next wants [`handle_timeout`](Self::handle_timeout), if it waits for
    /// anything: the in-flight request's deadline, the end of a backoff, a retry of a batch.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let flight = self.in_flight.as_ref().map(|f| f.deadline);
        let send = if self.in_flight.is_none() && (!self.queue.is_empty() || self.dirty) {
            self.send_at
        } else {
            None
        };
        [flight, send, self.retry_at].into_iter().flatten().min()
    }

    /// True while the sync must not go on: until the crypto machine is set up (`whoami`, the
    /// store) and the device's keys are uploaded (so that a sender can share room keys with
    /// it), and while a received batch is not yet through the crypto library (the next sync
    /// would let the server delete its to-device messages). The driver sends no sync request
    /// while this holds. A refused keys upload does not hold it (it is reported).
    pub fn holds_sync(&self) -> bool {
        self.olm.is_none() || !self.keys_settled || !self.held.is_empty()
    }

    /// The user id, once known.
    pub fn user_id(&self) -> Option<OwnedUserId> {
        self.olm
            .as_ref()
            .and_then(|o| OwnedUserId::try_from(o.user_id().as_str()).ok())
    }

    /// The device id, once known.
    pub fn device_id(&self) -> Option<OwnedDeviceId> {
        self.olm.as_ref().map(|o| o.device_id().as_str().into())
    }

    /// How many undecryptable events are kept for a late key.
    pub fn waiting_events(&self) -> usize {
        self.waiting.len()
    }

    // ---- requests -------------------------------------------------------------------------

    fn deadline(&self) -> Duration {
        self.deadline_margin + KEYS_DEADLINE_EXTRA
    }

    fn advance(&mut self, now: Instant) -> Result<(), InputError> {
        if now < self.now {
            return Err(InputError::TimeWentBackwards {
                last: self.now,
                now,
            });
        }
        self.now = now;
        Ok(())
    }

    fn take_in_flight(&mut self, id: RequestId, now: Instant) -> Result<InFlight, InputError> {
        if self.in_flight.as_ref().map(|f| f.id) != Some(id) {
            return Err(InputError::StaleRequest(id));
        }
        self.advance(now)?;
        self.in_flight.take().ok_or(InputError::StaleRequest(id))
    }

    fn is_parked(&self, which: Which) -> bool {
        self.parked
            .iter()
            .any(|(w, until)| *w == which && until.is_none_or(|at| at > self.now))
    }

    /// Asks the crypto library what it wants sent.
    fn refresh(&mut self) {
        self.dirty = false;
        let Some(olm) = &self.olm else { return };
        let requests = match self.runtime.block_on(olm.outgoing_requests()) {
            Ok(requests) => requests,
            Err(e) => {
                self.crypto_error("outgoing requests", &e);
                return;
            }
        };
        let mut upload = false;
        for request in requests {
            let kind = CryptoKind::of(request.request());
            if self.is_parked(Which::Crypto(kind)) {
                continue;
            }
            upload |= kind == CryptoKind::KeysUpload;
            match self.build_crypto(request.request()) {
                Ok(http) => self.queue.push_back(Pending {
                    which: Which::Crypto(kind),
                    crypto: Some(request),
                    http,
                }),
                Err(e) => self.crypto_error("build request", &e),
            }
        }
        if !upload && !self.keys_settled {
            log::info!("e2ee: device keys are on the server; sync may start");
            self.keys_settled = true;
        }
    }

    fn build(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> http::Request<Vec<u8>> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.homeserver));
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        // The token is added when the request is handed out: it may be refreshed meanwhile.
        builder
            .body(body.unwrap_or_default())
            .unwrap_or_else(|_| http::Request::new(Vec::new()))
    }

    /// Replaces the access token the stage's requests carry (after a refresh); the driver
    /// passes the machine's before each of the stage's requests.
    pub fn set_access_token(&mut self, token: AccessToken) {
        self.token = token;
    }

    fn build_crypto(
        &self,
        request: &AnyOutgoingRequest,
    ) -> Result<http::Request<Vec<u8>>, serde_json::Error> {
        use http::Method;
        let post = |path: &str, body: serde_json::Value| -> Result<_, serde_json::Error> {
            Ok(self.build(Method::POST, path, Some(serde_json::to_vec(&body)?)))
        };
        match request {
            AnyOutgoingRequest::KeysUpload(r) => {
                let mut body = serde_json::Map::new();
                if let Some(device_keys) = &r.device_keys {
                    body.insert("device_keys".into(), serde_json::to_value(device_keys)?);
                }
                body.insert(
                    "one_time_keys".into(),
                    serde_json::to_value(&r.one_time_keys)?,
                );
                body.insert(
                    "fallback_keys".into(),
                    serde_json::to_value(&r.fallback_keys)?,
                );
                post("/_matrix/client/v3/keys/upload", body.into())
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut body = serde_json::json!({ "device_keys": r.device_keys });
                if let Some(timeout) = r.timeout {
                    body["timeout"] = (timeout.as_millis() as u64).into();
                }
                post("/_matrix/client/v3/keys/query", body)
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let mut body = serde_json::json!({ "one_time_keys": r.one_time_keys });
                if let Some(timeout) = r.timeout {
                    body["timeout"] = (timeout.as_millis() as u64).into();
                }
                post("/_matrix/client/v3/keys/claim", body)
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                let path = format!(
                    "/_matrix/client/v3/sendToDevice/{}/{}",
                    encode(&r.event_type.to_string()),
                    encode(r.txn_id.as_str())
                );
                let body = serde_json::to_vec(&serde_json::json!({ "messages": r.messages }))?;
                Ok(self.build(Method::PUT, &path, Some(body)))
            }
            AnyOutgoingRequest::SignatureUpload(r) => post(
                "/_matrix/client/v3/keys/signatures/upload",
                serde_json::to_value(&r.signed_keys)?,
            ),
            AnyOutgoingRequest::RoomMessage(r) => {
                use ruma16::events::MessageLikeEventContent;
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/{}/{}",
                    encode(r.room_id.as_str()),
                    encode(&r.content.event_type().to_string()),
                    encode(r.txn_id.as_str())
                );
                let body = serde_json::to_vec(&r.content)?;
                Ok(self.build(Method::PUT, &path, Some(body)))
            }
        }
    }

    fn answered(&mut self, pending: Pending, response: http::Response<Vec<u8>>) {
        self.backoff.reset();
        self.dirty = true;
        let status = response.status().as_u16();
        let Some(request) = pending.crypto else {
            self.whoami_answered(status, response.body());
            return;
        };
        let Some(olm) = &self.olm else { return };
        let id = request.request_id();
        use ruma16::api::client::{keys, message, to_device};
        macro_rules! mark {
            ($response:ty) => {
                match <$response>::try_from_http_response(response) {
                    Ok(parsed) => self.runtime.block_on(olm.mark_request_as_sent(id, &parsed)),
                    Err(e) => {
                        let failure = bad_response(status, e.to_string(), b"");
                        self.failed(
                            Pending {
                                crypto: Some(request.clone()),
                                ..pending
                            },
                            failure,
                        );
                        return;
                    }
                }
            };
        }
        let marked = match request.request() {
            AnyOutgoingRequest::KeysUpload(_) => mark!(keys::upload_keys::v3::Response),
            AnyOutgoingRequest::KeysQuery(_) => mark!(keys::get_keys::v3::Response),
            AnyOutgoingRequest::KeysClaim(_) => mark!(keys::claim_keys::v3::Response),
            AnyOutgoingRequest::ToDeviceRequest(_) => {
                mark!(to_device::send_event_to_device::v3::Response)
            }
            AnyOutgoingRequest::SignatureUpload(_) => {
                mark!(keys::upload_signatures::v3::Response)
            }
            AnyOutgoingRequest::RoomMessage(_) => {
                mark!(message::send_message_event::v3::Response)
            }
        };
        if let Err(e) = marked {
            self.crypto_error("mark request as sent", &e);
        }
        if matches!(request.request(), AnyOutgoingRequest::KeysUpload(_)) && !self.keys_settled {
            log::info!("e2ee: device keys uploaded; sync may start");
            self.keys_settled = true;
        }
    }

    fn whoami_answered(&mut self, status: u16, body: &[u8]) {
        #[derive(serde::Deserialize)]
        struct WhoAmI {
            user_id: OwnedUserId,
            device_id: Option<OwnedDeviceId>,
        }
        let whoami: WhoAmI = match serde_json::from_slice(body) {
            Ok(w) => w,
            Err(e) => {
                let failure = bad_response(status, e.to_string(), body);
                self.failed(self.whoami(), failure);
                return;
            }
        };
        let user = self.config.user_id.clone().unwrap_or(whoami.user_id);
        let Some(device) = self.config.device_id.clone().or(whoami.device_id) else {
            self.errors.push_back(E2eeError::Crypto {
                what: "whoami",
                detail: "the server names no device for this access token; configure the device id"
                    .to_owned(),
            });
            self.whoami_later();
            return;
        };
        if let Err(e) = self.open(&user, &device) {
            log::warn!("e2ee: {e}");
            self.errors.push_back(e);
            self.whoami_later();
            return;
        }
        self.process_held();
    }

    fn whoami(&self) -> Pending {
        Pending {
            which: Which::Whoami,
            crypto: None,
            http: self.build(http::Method::GET, "/_matrix/client/v3/account/whoami", None),
        }
    }

    /// The crypto machine could not be set up: try again (whoami, then the store) after the
    /// maximum backoff. The sync stays held meanwhile: a batch let through without the crypto
    /// machine would lose its to-device room keys for good.
    fn whoami_later(&mut self) {
        let pending = self.whoami();
        self.queue.push_front(pending);
        self.send_at = Some(self.now + self.policy.max);
    }

    fn failed(&mut self, pending: Pending, failure: Failure) {
        let class = failure.class();
        let kind = match pending.which {
            Which::Whoami => RequestKind::Crypto(CryptoRequestKind::Whoami),
            Which::Crypto(kind) => kind.request_kind(),
        };
        let delay = match class {
            ErrorClass::Transient => self.backoff.next_delay(),
            ErrorClass::RateLimited => {
                let asked = match &failure {
                    Failure::RateLimited {
                        retry_after: Some(wait),
                        ..
                    } => *wait,
                    _ => Duration::ZERO,
                };
                self.backoff
                    .next_delay()
                    .max(asked.min(self.max_server_wait))
            }
            ErrorClass::NeedsUser => self.backoff.next_fatal(),
        };
        let attempt = self.backoff.attempt();
        let failure_kind = if matches!(failure, Failure::UnknownToken { .. }) {
            FailureKind::UnknownToken
        } else {
            FailureKind::Other
        };
        log::warn!("e2ee {} request failed: {failure}", kind.name());
        self.errors.push_back(E2eeError::Request(SyncError {
            failure,
            class,
            request: kind,
            attempt,
            delay,
        }));
        match class {
            // An expired token is not a refusal of the request: the machine refreshes it (or
            // reports the end of the session), and the request goes again with backoff.
            ErrorClass::NeedsUser if !matches!(failure_kind, FailureKind::UnknownToken) => {
                // Refused: not sent again in a loop. `whoami` is retried at the maximum
                // backoff (nothing works without it, and the sync stays held); a refused keys
                // upload is not sent again this run (its keys would be refused the same way),
                // and the sync goes on; other kinds wait the maximum backoff.
                match pending.which {
                    Which::Whoami => {
                        self.queue.push_front(pending);
                        self.send_at = Some(self.now + delay);
                    }
                    Which::Crypto(CryptoKind::KeysUpload) => {
                        self.parked.push((pending.which, None));
                        self.keys_settled = true;
                    }
                    which => self.parked.push((which, Some(self.now + self.policy.max))),
                }
            }
            _ => {
                self.queue.push_front(pending);
                self.send_at = Some(self.now + delay);
            }
        }
    }

    fn crypto_error(&mut self, what: &'static str, error: &dyn fmt::Display) {
        log::warn!("e2ee: crypto {what} failed: {error}");
        self.errors.push_back(E2eeError::Crypto {
            what,
            detail: error.to_string(),
        });
    }

    // ---- batches --------------------------------------------------------------------------

    /// Processes the held batches in order, while the crypto machine is there and works.
    fn process_held(&mut self) {
        while self.retry_at.is_none() {
            let Some(batch) = self.held.pop_front() else {
                return;
            };
            if self.olm.is_none() {
                self.held.push_front(batch);
                return;
            }
            match self.process(batch) {
                Ok(()) => {}
                Err(batch) => {
                    let delay = self.backoff.next_delay();
                    self.held.push_front(batch);
                    self.retry_at = Some(self.now + delay);
                }
            }
        }
    }

    /// One batch: sync changes into the crypto library (and its store), late keys, then the
    /// room events decrypted, in order. `Err` gives the batch back when the store failed.
    fn process(&mut self, batch: Vec<Event>) -> Result<(), Vec<Event>> {
        let Some(olm) = self.olm.clone() else {
            return Err(batch);
        };
        let mut to_device = Vec::new();
        let mut device_lists = ruma16::api::client::sync::sync_events::DeviceLists::default();
        let mut counts = BTreeMap::new();
        let mut fallback: Option<Vec<ruma16::OneTimeKeyAlgorithm>> = None;
        let mut next_batch = None;
        for event in &batch {
            match &event.kind {
                EventKind::ToDevice => to_device.push(Raw::from_json(event.raw.clone())),
                EventKind::DeviceLists => {
                    if let Ok(lists) = serde_json::from_str(event.raw.get()) {
                        device_lists = lists;
                    }
                }
                EventKind::OneTimeKeyCounts => {
                    let (c, f) = key_counts(&event.raw);
                    counts = c;
                    fallback = f;
                }
                EventKind::Checkpoint(c) => next_batch = Some(c.next_batch.clone()),
                _ => {}
            }
        }
        if batch
            .iter()
            .any(|e| matches!(e.kind, EventKind::ConnectionReset(_)))
        {
            // Sliding sync gives device list changes only relative to a `pos`: after a reset,
            // any tracked user's devices may have changed unseen.
            let dirty = self.runtime.block_on(olm.mark_all_tracked_users_as_dirty());
            if let Err(e) = dirty {
                self.crypto_error("marking tracked users outdated", &e);
                return Err(batch);
            }
            log::info!(
                "e2ee: sliding sync connection reset: every tracked user's devices outdated"
            );
        }
        let changes = EncryptionSyncChanges {
            to_device_events: to_device,
            changed_devices: &device_lists,
            one_time_keys_counts: &counts,
            unused_fallback_keys: fallback.as_deref(),
            next_batch_token: next_batch,
        };
        let room_keys = match self
            .runtime
            .block_on(olm.receive_sync_changes(changes, &self.settings))
        {
            Ok((_, room_keys)) => room_keys,
            Err(e) => {
                self.crypto_error("sync changes", &e);
                return Err(batch);
            }
        };
        self.backoff.reset();
        self.dirty = true;
        if !room_keys.is_empty() {
            log::debug!("e2ee: {} room keys received", room_keys.len());
            self.retry_waiting(&olm, &room_keys);
        }
        let mut senders = Vec::new();
        for event in batch {
            let event = if event.kind == EventKind::Encrypted {
                if let Some(sender) = &event.sender {
                    if self.tracked.insert(sender.to_string()) {
                        if let Ok(user) = ruma16::UserId::parse(sender.as_str()) {
                            senders.push(user);
                        }
                    }
                }
                self.decrypt(&olm, event, false)
            } else {
                event
            };
            self.out.push_back(event);
        }
        if !senders.is_empty() {
            let users = senders.iter().map(|u| &**u);
            if let Err(e) = self.runtime.block_on(olm.update_tracked_users(users)) {
                self.crypto_error("track users", &e);
            }
        }
        Ok(())
    }

    /// Decrypts one `m.room.encrypted` room event; an undecryptable one that a later key may
    /// cure is kept.
    fn decrypt(&mut self, olm: &OlmMachine, mut event: Event, late: bool) -> Event {
        let Some(room_id) = event
            .room_id
            .as_ref()
            .and_then(|r| ruma16::RoomId::parse(r.as_str()).ok())
        else {
            return event;
        };
        let raw: Raw<EncryptedEvent> = Raw::from_json(event.raw.clone());
        let result =
            self.runtime
                .block_on(olm.try_decrypt_room_event(&raw, &room_id, &self.settings));
        match result {
            Ok(RoomEventDecryptionResult::Decrypted(decrypted)) => {
                let info = &decrypted.encryption_info;
                let facts = Decrypted {
                    sender_device: info.sender_device.as_ref().map(|d| d.as_str().into()),
                    verification: verification(&info.verification_state),
                    session_id: info.session_id().map(str::to_owned),
                    late,
                };
                let plaintext: Box<RawValue> = decrypted.event.into_json();
                let mut out = normalize(plaintext, Section::Timeline, event.room_id.as_ref());
                out.encryption = Some(Box::new(Encryption::Decrypted(facts)));
                out
            }
            Ok(RoomEventDecryptionResult::UnableToDecrypt(utd)) => {
                let reason = utd_reason(&utd.reason);
                let session_id = utd.session_id.clone().or_else(|| session_id_of(&event.raw));
                if let (true, Some(session)) = (reason.may_resolve(), &session_id) {
                    self.keep(room_id, session.clone(), &event);
                }
                event.encryption = Some(Box::new(Encryption::Undecryptable(Undecryptable {
                    reason,
                    session_id,
                })));
                event
            }
            Err(e) => {
                self.crypto_error("decrypt", &e);
                event.encryption = Some(Box::new(Encryption::Undecryptable(Undecryptable {
                    reason: UndecryptableReason::Other,
                    session_id: session_id_of(&event.raw),
                })));
                event
            }
        }
    }

    fn keep(&mut self, room_id: ruma16::OwnedRoomId, session_id: String, event: &Event) {
        if self.config.max_pending_undecryptable == 0 {
            return;
        }
        if self.waiting.len() >= self.config.max_pending_undecryptable {
            self.waiting.pop_front();
        }
        let mut event = event.clone();
        event.encryption = None;
        self.waiting.push_back(Waiting {
            room_id,
            session_id,
            event,
        });
    }

    /// Delivers again, decrypted and marked late, the kept events whose keys just arrived.
    fn retry_waiting(
        &mut self,
        olm: &OlmMachine,
        keys: &[matrix_sdk_crypto::store::types::RoomKeyInfo],
    ) {
        let matches = |w: &Waiting| {
            keys.iter()
                .any(|k| k.room_id == w.room_id && k.session_id == w.session_id)
        };
        let (ready, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| matches(w));
        self.waiting = rest;
        for waiting in ready {
            let event = self.decrypt(olm, waiting.event, true);
            if matches!(event.encryption.as_deref(), Some(Encryption::Decrypted(_))) {
                self.out.push_back(event);
            }
        }
    }
}

/// The one-time-key counts and unused fallback key types of a key-counts item. A missing
/// `signed_curve25519` count is zero (matrix-sdk-crypto 0.18 would read it as unchanged and
/// never replenish the keys).
fn key_counts(
    raw: &RawValue,
) -> (
    BTreeMap<ruma16::OneTimeKeyAlgorithm, ruma16::UInt>,
    Option<Vec<ruma16::OneTimeKeyAlgorithm>>,
) {
    #[derive(serde::Deserialize)]
    struct Counts {
        #[serde(default)]
        device_one_time_keys_count: Option<BTreeMap<ruma16::OneTimeKeyAlgorithm, ruma16::UInt>>,
        #[serde(default)]
        device_unused_fallback_key_types: Option<Vec<ruma16::OneTimeKeyAlgorithm>>,
    }
    let parsed: Counts = serde_json::from_str(raw.get()).unwrap_or(Counts {
        device_one_time_keys_count: None,
        device_unused_fallback_key_types: None,
    });
    let mut counts = parsed.device_one_time_keys_count.unwrap_or_default();
    counts
        .entry(ruma16::OneTimeKeyAlgorithm::SignedCurve25519)
        .or_insert(ruma16::UInt::MIN);
    (counts, parsed.device_unused_fallback_key_types)
}

fn session_id_of(raw: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Outer {
        content: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        session_id: String,
    }
    serde_json::from_str::<Outer>(raw.get())
        .ok()
        .map(|o| o.content.session_id)
}

fn verification(
    state: &matrix_sdk_common::deserialized_responses::VerificationState,
) -> Verification {
    use matrix_sdk_common::deserialized_responses::VerificationState;
    use matrix_sdk_common::deserialized_responses::{DeviceLinkProblem, VerificationLevel};
    match state {
        VerificationState::Verified => Verification::Verified,
        VerificationState::Unverified(level) => match level {
            VerificationLevel::UnverifiedIdentity => Verification::UnverifiedIdentity,
            VerificationLevel::VerificationViolation => Verification::VerificationViolation,
            VerificationLevel::UnsignedDevice => Verification::UnsignedDevice,
            VerificationLevel::None(DeviceLinkProblem::MissingDevice) => {
                Verification::MissingDevice
            }
            VerificationLevel::None(DeviceLinkProblem::InsecureSource) => {
                Verification::InsecureSource
            }
            VerificationLevel::MismatchedSender => Verification::MismatchedSender,
        },
    }
}

fn utd_reason(
    reason: &matrix_sdk_common::deserialized_responses::UnableToDecryptReason,
) -> UndecryptableReason {
    use matrix_sdk_common::deserialized_responses::UnableToDecryptReason as R;
    match reason {
        R::MissingMegolmSession { withheld_code } => UndecryptableReason::MissingRoomKey {
            withheld: withheld_code.as_ref().map(|c| c.as_str().to_owned()),
        },
        R::UnknownMegolmMessageIndex => UndecryptableReason::UnknownMessageIndex,
        R::MalformedEncryptedEvent => UndecryptableReason::Malformed,
        R::MegolmDecryptionFailure => UndecryptableReason::DecryptionFailed,
        R::PayloadDeserializationFailure => UndecryptableReason::BadPlaintext,
        R::MismatchedIdentityKeys => UndecryptableReason::MismatchedIdentityKeys,
        R::SenderIdentityNotTrusted(level) => {
            let state = matrix_sdk_common::deserialized_responses::VerificationState::Unverified(
                level.clone(),
            );
            UndecryptableReason::SenderNotTrusted(verification(&state))
        }
        _ => UndecryptableReason::Other,
    }
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn clone_request(request: &http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let mut out = http::Request::new(request.body().clone());
    *out.method_mut() = request.method().clone();
    *out.uri_mut() = request.uri().clone();
    *out.headers_mut() = request.headers().clone();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_one_time_key_count_reads_as_zero() {
        let raw = RawValue::from_string(
            r#"{"device_one_time_keys_count":{},"device_unused_fallback_key_types":["signed_curve25519"]}"#
                .to_owned(),
        )
        .unwrap();
        let (counts, fallback) = key_counts(&raw);
        assert_eq!(
            counts.get(&ruma16::OneTimeKeyAlgorithm::SignedCurve25519),
            Some(&ruma16::UInt::MIN)
        );
        assert_eq!(fallback.unwrap().len(), 1);
        let raw = RawValue::from_string(
            r#"{"device_one_time_keys_count":{"signed_curve25519":7}}"#.to_owned(),
        )
        .unwrap();
        let (counts, fallback) = key_counts(&raw);
        assert_eq!(
            counts[&ruma16::OneTimeKeyAlgorithm::SignedCurve25519],
            ruma16::UInt::from(7u32)
        );
        assert!(fallback.is_none());
    }

    fn stage(now: Instant) -> E2ee {
        let mut config = Config::new("http://127.0.0.1:9", "token");
        config.allow_insecure_http = true;
        let e2ee = E2eeConfig::new(CryptoStore::Memory).with_ids(
            OwnedUserId::try_from("@ours:example.org").unwrap(),
            "OURDEVICE".into(),
        );
        E2ee::new(&config, e2ee, now).unwrap()
    }

    fn answer(status: u16, body: serde_json::Value) -> http::Response<Vec<u8>> {
        http::Response::builder()
            .status(status)
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap()
    }

    #[test]
    fn the_sync_waits_for_the_first_keys_upload() {
        let now = Instant::now();
        let mut stage = stage(now);
        assert!(stage.holds_sync());
        let upload = stage.poll_request().expect("the keys upload");
        assert_eq!(
            upload.kind,
            RequestKind::Crypto(CryptoRequestKind::KeysUpload)
        );
        assert!(
            upload.id >= RequestId::new(ID_BASE),
            "ids apart from the machine's"
        );
        assert_eq!(upload.http.uri().path(), "/_matrix/client/v3/keys/upload");
        let body: serde_json::Value = serde_json::from_slice(upload.http.body()).unwrap();
        assert!(body["device_keys"].is_object() && body["one_time_keys"].is_object());
        assert!(stage.poll_request().is_none(), "one request in flight");
        assert!(stage.holds_sync());
        let counts = serde_json::json!({"one_time_key_counts": {"signed_curve25519": 50}});
        stage
            .handle_response(upload.id, answer(200, counts), now)
            .unwrap();
        assert!(!stage.holds_sync());
        assert!(stage.poll_error().is_none());
    }

    #[test]
    fn a_failing_upload_backs_off_and_a_refused_one_is_not_retried() {
        let now = Instant::now();
        let mut stage = stage(now);
        let upload = stage.poll_request().unwrap();
        let body = upload.http.body().clone();
        stage
            .handle_response(upload.id, answer(502, serde_json::json!({})), now)
            .unwrap();
        let error = stage.poll_error().expect("reported");
        assert!(matches!(&error, E2eeError::Request(e) if e.class == ErrorClass::Transient));
        assert!(stage.poll_request().is_none(), "backing off");
        let wake = stage.poll_timeout().expect("a wake-up for the retry");
        assert!(wake > now);
        stage.handle_timeout(wake).unwrap();
        let again = stage.poll_request().expect("retried");
        assert_eq!(again.http.body(), &body, "the same keys");
        assert!(stage.holds_sync());

        let refused = serde_json::json!({"errcode": "M_INVALID_PARAM", "error": "exists"});
        stage
            .handle_response(again.id, answer(400, refused), wake)
            .unwrap();
        let error = stage.poll_error().expect("reported");
        assert!(matches!(&error, E2eeError::Request(e) if e.class == ErrorClass::NeedsUser));
        assert!(!stage.holds_sync(), "a refusal does not hold the sync");
        let later = wake + Duration::from_secs(3600);
        stage.handle_timeout(later).unwrap();
        stage.dirty = true;
        let next = stage.poll_request();
        assert!(
            next.as_ref()
                .is_none_or(|r| r.kind != RequestKind::Crypto(CryptoRequestKind::KeysUpload)),
            "a refused upload is not sent again: {next:?}"
        );
        assert!(stage
            .handle_response(upload.id, answer(200, serde_json::json!({})), later)
            .is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("m.room.encrypted"), "m.room.encrypted");
        assert_eq!(encode("!a:b c/d"), "%21a%3Ab%20c%2Fd");
    }
}
