//! The sans-IO sync state machine.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ruma_client_api::message::get_message_events::v3 as messages;
use ruma_common::api::IncomingResponseExt;

use crate::auth::{self, Auth};
use crate::batch::{Delivery, KeyCounts, ParsedBody, RoomFills};
use crate::classify::{bad_response, classify};
use crate::config::{Config, ConfigError};
use crate::credentials::Credentials;
use crate::dedup::Dedup;
use crate::discovery::{self, Step, WellKnown};
use crate::error::{ErrorClass, Failure, InputError, SyncError};
use crate::gapfill::{FillFailure, GapFiller, Plan};
use crate::normalize::{Event, EventKind, Gap};
use crate::request::{self, InFlightRequest, OutgoingRequest, RequestId, RequestKind};
use crate::schedule::{self, Channel, Retry, Schedule};
use crate::sliding::request::{self as sliding_request, Ask, LIST};
use crate::sliding::response::{Context, ListMemory, SlidingBody, SlidingDelivery};
use crate::sliding::{
    ActiveProtocol, ConnectionReset, Protocol, ResetReason, RoomSubscription, SlidingPosition,
};
use crate::token;
use ruma_common::{OwnedRoomId, RoomId};

/// What the service is doing, as reported by [`SyncMachine::poll_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncState {
    /// Server discovery ([`Config::discover()`]) is under way: the first sync waits for the
    /// homeserver's base URL.
    Discovering,
    /// The first sync, without `since`, is under way.
    InitialSync,
    /// Catching up from a stored `since` (at start, or after an error) with `timeout=0`.
    CatchingUp,
    /// Caught up: everything before was history, what follows is live traffic.
    Live,
    /// Waiting after a transient failure or a rate limit.
    BackingOff,
    /// Refused by the server (3xx, 401 unknown token, 403, 400 unknown `since`, other 4xx, a
    /// server discovery that failed for good; the reason is the [`Failure`] of the error
    /// reported with it): retrying only at the maximum backoff until stopped or until a
    /// request succeeds again.
    Refused,
    /// The refresh token was refused ([`Failure::RefreshRefused`]): the session is over.
    /// No more refreshes are made; syncs go on at the maximum backoff with the last access
    /// token until new credentials are set
    /// ([`set_credentials`](SyncMachine::set_credentials)).
    SessionEnded,
    /// The application could not store refreshed credentials
    /// ([`Failure::CredentialsNotStored`]): nothing is sent, and they are offered again
    /// after the maximum backoff.
    CredentialsNotStored,
    /// Stopped; no more requests.
    Stopped,
}

/// What the machine is doing. Each phase carries the data only it has, so what must agree
/// cannot disagree: a request is in flight only while discovering, syncing or filling gaps, a
/// batch is held only while it is filled or handed on, and nothing leaves `Stopped`.
#[derive(Debug)]
enum Phase {
    /// Finding the homeserver before the first sync: the step says which request goes out
    /// (or is in flight), or that the base URL is found and waits to be announced.
    Discovering {
        step: Step,
        in_flight: Option<InFlight>,
    },
    /// Waiting for the next sync to be due, or for the answer to the one in flight.
    Syncing { in_flight: Option<InFlight> },
    /// A sync answer is parsed; its limited rooms are filled before it is delivered.
    FillingGaps {
        filler: GapFiller<Answered>,
        answer: Answer,
        in_flight: Option<InFlight>,
    },
    /// A batch is being handed on, event by event, ending with its checkpoint (or a sliding
    /// sync connection reset is being announced).
    Delivering { delivery: Batch, answer: Answer },
    /// Stopped: no request, event, error or state comes out any more.
    Stopped,
}

/// A sync answer of either protocol, held while its gaps are filled.
#[derive(Debug)]
enum Answered {
    V3(ParsedBody),
    Sliding {
        body: SlidingBody,
        /// The position the request was sent from.
        sent: SlidingPosition,
    },
}

/// What is being handed on.
#[derive(Debug)]
enum Batch {
    /// A `/v3/sync` batch.
    V3(Delivery),
    /// A sliding sync batch.
    Sliding(SlidingDelivery),
    /// A single item of the machine's own (a connection reset); `None` once taken.
    Notice(Option<Box<Event>>),
}

impl Batch {
    #[inline]
    fn next_event(&mut self, dedup: &mut Dedup) -> Option<Event> {
        match self {
            Batch::V3(delivery) => delivery.next_event(dedup),
            Batch::Sliding(delivery) => delivery.next_event(dedup),
            Batch::Notice(event) => event.take().map(|event| *event),
        }
    }

    fn delivered(&self) -> usize {
        match self {
            Batch::V3(delivery) => delivery.delivered(),
            Batch::Sliding(delivery) => delivery.delivered(),
            Batch::Notice(_) => 0,
        }
    }
}

/// The protocol spoken, with the state only sliding sync has.
#[derive(Debug)]
enum Wire {
    /// [`Protocol::Auto`] without a checkpoint: the versions check decides.
    Deciding,
    V3,
    Sliding(Sliding),
}

/// A sliding sync connection. Its position is the last checkpoint handed on (`since`, a
/// [`SlidingPosition`] token), unless the server dropped it.
#[derive(Debug)]
struct Sliding {
    pos: Pos,
    /// The last index of the list's one range.
    range_end: u64,
    /// The list's `count` in the last answer.
    count: Option<u64>,
    /// The list as last reported.
    lists: ListMemory,
}

/// Which `pos` the next sliding sync request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pos {
    /// The last checkpoint's (none before the first).
    Checkpoint,
    /// None: the server dropped the connection; the next checkpoint starts a new one.
    Dropped,
}

impl Sliding {
    fn new(config: &Config) -> Self {
        Self {
            pos: Pos::Checkpoint,
            range_end: u64::from(config.sliding_sync.window) - 1,
            count: None,
            lists: ListMemory::new(),
        }
    }

    /// Widens the range by a window when the list has rooms past it; true if it did.
    fn grow(&mut self, window: u32) -> bool {
        match self.count {
            Some(count) if count > self.range_end + 1 => {
                self.range_end += u64::from(window);
                log::debug!("sliding sync: range grows to 0..={}", self.range_end);
                true
            }
            _ => false,
        }
    }
}

/// The request the machine waits for.
#[derive(Debug)]
struct InFlight {
    id: RequestId,
    kind: RequestKind,
    sent_at: Instant,
    deadline: Instant,
    /// Which credentials it was sent with: a 401 to replaced ones says nothing of the new.
    credentials: u64,
}

/// What the sync behind a batch was, for pacing once the batch is handed on.
#[derive(Clone, Copy, Debug)]
struct Answer {
    channel: Channel,
    /// The server used the timeout it was given.
    held: bool,
}

/// Which sync goes out next. `since` says whether it is an initial sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The first sync of this run (`timeout=0`, and `full_state` if configured).
    First,
    /// The first sync after a failure (`timeout=0`).
    CatchUp,
    /// Caught up: long-polls.
    LongPoll,
}

impl Mode {
    fn channel(self) -> Channel {
        match self {
            Mode::First | Mode::CatchUp => Channel::CatchUp,
            Mode::LongPoll => Channel::LongPoll,
        }
    }
}

/// The sans-IO core of the sync loop. See the [crate docs](crate) for the run loop.
#[derive(Debug)]
pub struct SyncMachine {
    config: Config,
    now: Instant,
    phase: Phase,
    /// Where the next sync starts: the `next_batch` of the last checkpoint handed on.
    since: Option<String>,
    mode: Mode,
    schedule: Schedule,
    next_id: u64,
    /// The last state announced.
    state: SyncState,
    errors: VecDeque<SyncError>,
    states: VecDeque<SyncState>,
    dedup: Dedup,
    last_key_counts: Option<KeyCounts>,
    auth: Auth,
    /// Counts the credentials put in force (refreshed or set); requests carry the count.
    credentials: u64,
    /// The protocol spoken.
    wire: Wire,
    /// Sliding sync room subscriptions, sent with every sliding sync request.
    subscriptions: BTreeMap<OwnedRoomId, RoomSubscription>,
    /// The `filter` parameter of every `/sync` request, encoded once (the filter is fixed).
    sync_filter: Option<String>,
}

impl SyncMachine {
    /// Validates `config` and creates a machine whose clock starts at `now`.
    ///
    /// The first request is due at once: call [`poll_request`](Self::poll_request).
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut config = config;
        config.homeserver = config.homeserver.trim_end_matches('/').to_owned();
        let state = if config.discover {
            SyncState::Discovering
        } else if config.since.is_some() {
            SyncState::CatchingUp
        } else {
            SyncState::InitialSync
        };
        let phase = if config.discover {
            Phase::Discovering {
                step: Step::start(&config.homeserver),
                in_flight: None,
            }
        } else {
            Phase::Syncing { in_flight: None }
        };
        let auth = Auth::fresh(
            auth::expiry(now, config.access_token_expires_in),
            config.refresh_token.is_some(),
        );
        let stored_sliding = config
            .since
            .as_deref()
            .map(|since| SlidingPosition::from_token(since).is_some());
        let wire = match (config.protocol, stored_sliding) {
            (Protocol::V3, _) | (Protocol::Auto, Some(false)) => Wire::V3,
            (Protocol::SlidingSync, _) | (Protocol::Auto, Some(true)) => {
                Wire::Sliding(Sliding::new(&config))
            }
            (Protocol::Auto, None) => Wire::Deciding,
        };
        let sync_filter =
            request::sync_filter_param(&config).map_err(|_| ConfigError::Invalid {
                field: "filter",
                reason: "could not be written as JSON",
            })?;
        Ok(Self {
            wire,
            subscriptions: BTreeMap::new(),
            sync_filter,
            auth,
            credentials: 0,
            since: config.since.clone(),
            schedule: Schedule::new(
                config.backoff.clone(),
                config.jitter_seed,
                config.max_server_wait,
            ),
            dedup: Dedup::new(config.dedup_capacity),
            config,
            now,
            phase,
            mode: Mode::First,
            next_id: 0,
            state,
            errors: VecDeque::new(),
            states: VecDeque::from([state]),
            last_key_counts: None,
        })
    }

    // ---- inputs ---------------------------------------------------------------------------

    /// Feeds the HTTP response to request `id`, received at `now`.
    ///
    /// The body may be any byte container. A sync body is kept until its events are handed on
    /// (they are built from it as they are polled): pass an owned `Vec<u8>` to have it moved
    /// in, anything else is copied. A response to a request the machine no longer waits for is
    /// refused with an [`InputError`] and changes nothing.
    pub fn handle_response<B: AsRef<[u8]> + Into<Vec<u8>>>(
        &mut self,
        id: RequestId,
        response: http::Response<B>,
        now: Instant,
    ) -> Result<(), InputError> {
        let in_flight = self.accept(id, now)?;
        let (parts, body) = response.into_parts();
        let bytes = body.as_ref();
        if bytes.len() as u64 > self.config.max_body_bytes {
            let limit = self.config.max_body_bytes;
            self.fail(in_flight, Failure::BodyTooLarge { limit });
            return Ok(());
        }
        if in_flight.kind.is_discovery() {
            // Unauthenticated, with verdicts of their own (a 404 is an answer).
            self.on_discovery(in_flight, &parts, bytes);
            return Ok(());
        }
        if let Err(failure) = classify(parts.status, &parts.headers, bytes) {
            if let RequestKind::SlidingSync { .. } = in_flight.kind {
                if let Some(reason) = reset_reason(&failure).filter(|_| self.pos_sent()) {
                    self.reset(reason);
                    return Ok(());
                }
                if self.may_fall_back(&failure) {
                    log::info!("sliding sync is not served here (404): falling back to /v3/sync");
                    self.wire = Wire::V3;
                    return Ok(());
                }
            }
            let failure = match in_flight.kind {
                RequestKind::Refresh if auth::ends_session(&failure) => {
                    auth::refused(parts.status.as_u16(), bytes)
                }
                _ => failure,
            };
            self.fail(in_flight, failure);
            return Ok(());
        }
        if let Auth::Valid { unproven, .. } = &mut self.auth {
            // A request worked with these credentials: a later 401 may be refreshed again.
            if in_flight.credentials == self.credentials && in_flight.kind != RequestKind::Refresh {
                *unproven = false;
            }
        }
        match in_flight.kind {
            RequestKind::Sync { .. } => self.on_sync(in_flight, parts.status, body.into()),
            RequestKind::Messages { .. } => {
                self.on_page(in_flight, http::Response::from_parts(parts, bytes))
            }
            RequestKind::Refresh => self.on_refresh(in_flight, parts.status, bytes),
            RequestKind::SlidingSync { .. } => {
                self.on_sliding(in_flight, parts.status, body.into())
            }
            RequestKind::ProtocolCheck => self.on_protocol_check(bytes),
            // The machine never sends the E2EE stage's requests; discovery's went above.
            RequestKind::Crypto(_) | RequestKind::Discovery | RequestKind::VersionsCheck => self
                .fail(
                    in_flight,
                    Failure::InvalidRequest("not a sync request".into()),
                ),
        }
        Ok(())
    }

    /// Reports that request `id` failed below HTTP (connect, reset, TLS, truncated body...).
    ///
    /// One fact, one failure, whoever noticed it: a transport that timed out is reported as
    /// [`Failure::DeadlineExceeded`], one that stopped reading at the body cap as
    /// [`Failure::BodyTooLarge`], exactly as when the machine notices them itself.
    pub fn handle_failure(
        &mut self,
        id: RequestId,
        failure: crate::TransportFailure,
        now: Instant,
    ) -> Result<(), InputError> {
        let in_flight = self.accept(id, now)?;
        let failure = match failure.kind {
            crate::TransportErrorKind::TimedOut => Failure::DeadlineExceeded(
                in_flight
                    .deadline
                    .saturating_duration_since(in_flight.sent_at),
            ),
            crate::TransportErrorKind::BodyTooLarge => Failure::BodyTooLarge {
                limit: self.config.max_body_bytes,
            },
            _ => Failure::Transport(failure),
        };
        self.fail(in_flight, failure);
        Ok(())
    }

    /// Advances the clock to `now`: a request past its deadline fails, a backoff that ended
    /// makes the next request due. Call it at the instant [`poll_timeout`](Self::poll_timeout)
    /// gave, or any time.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), InputError> {
        self.check_input(now)?;
        self.now = now;
        let expired = self.in_flight().is_some_and(|f| now >= f.deadline);
        if expired {
            if let Some(in_flight) = self.in_flight_slot().and_then(Option::take) {
                let waited = in_flight
                    .deadline
                    .saturating_duration_since(in_flight.sent_at);
                self.fail(in_flight, Failure::DeadlineExceeded(waited));
            }
        }
        Ok(())
    }

    /// Stops the machine: the request in flight is abandoned, a batch not yet handed on is
    /// dropped (its checkpoint never comes, so `since` stays before it), error reports not yet
    /// polled are dropped, no more requests are made, and every later input is refused with
    /// [`InputError::Stopped`]. The states polled end with `Stopped`; after it, nothing more
    /// comes out. Idempotent.
    pub fn stop(&mut self) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        self.set_state(SyncState::Stopped);
        self.phase = Phase::Stopped;
        self.errors.clear();
    }

    /// Answers the credentials [`poll_credentials`](Self::poll_credentials) handed out: the
    /// application stored them, so the machine uses them from the next request on.
    ///
    /// Refused with [`InputError::NoCredentialsPending`] when none were handed out.
    pub fn handle_credentials_stored(&mut self, now: Instant) -> Result<(), InputError> {
        self.check_input(now)?;
        let Auth::Storing {
            new,
            expires_at,
            offer_at: None,
            after_401,
        } = &self.auth
        else {
            return Err(InputError::NoCredentialsPending);
        };
        let (new, expires_at, after_401) = (new.clone(), *expires_at, *after_401);
        self.now = now;
        log::info!("refreshed credentials stored; using them from the next request");
        self.put_in_force(new, expires_at);
        if let Auth::Valid { unproven, .. } = &mut self.auth {
            *unproven = after_401;
        }
        if self.state == SyncState::CredentialsNotStored {
            self.set_state(self.resumed_state());
        }
        Ok(())
    }

    /// Answers the credentials [`poll_credentials`](Self::poll_credentials) handed out: the
    /// application could not store them (`reason` is reported). They are not used: the
    /// machine reports [`Failure::CredentialsNotStored`], enters
    /// [`SyncState::CredentialsNotStored`], sends nothing, and offers them again after the
    /// maximum backoff.
    pub fn handle_credentials_not_stored(
        &mut self,
        reason: impl Into<String>,
        now: Instant,
    ) -> Result<(), InputError> {
        self.check_input(now)?;
        if !matches!(self.auth, Auth::Storing { offer_at: None, .. }) {
            return Err(InputError::NoCredentialsPending);
        }
        self.now = now;
        let retry = self.schedule.hold_max(now);
        if let Auth::Storing { offer_at, .. } = &mut self.auth {
            *offer_at = Some(now + retry.delay);
        }
        let failure = Failure::CredentialsNotStored(crate::text::capped(&reason.into()));
        log::error!("{failure}");
        self.set_state(SyncState::CredentialsNotStored);
        self.report(failure, RequestKind::Refresh, retry);
        Ok(())
    }

    /// Replaces the credentials (for applications that manage tokens themselves). They take
    /// effect on the next request; `since`, dedup and a pending batch are kept. A machine
    /// waiting after a refusal ([`SyncState::Refused`], [`SyncState::SessionEnded`],
    /// [`SyncState::CredentialsNotStored`]) retries at once. A refresh in flight, or
    /// refreshed credentials not yet stored, are dropped: these win.
    ///
    /// Refused with [`InputError::UnusableCredentials`] (nothing changes) when a token is
    /// empty, longer than [`MAX_TOKEN_BYTES`](crate::MAX_TOKEN_BYTES) or not visible ASCII.
    /// `expires_in` counts from `now`.
    pub fn set_credentials(
        &mut self,
        credentials: Credentials,
        now: Instant,
    ) -> Result<(), InputError> {
        self.check_input(now)?;
        if !credentials.is_usable() {
            return Err(InputError::UnusableCredentials);
        }
        self.now = now;
        let expires_at = auth::expiry(now, credentials.expires_in);
        self.put_in_force(credentials, expires_at);
        // New credentials answer a refusal of the old ones, not a discovery verdict.
        let discovering = matches!(self.phase, Phase::Discovering { .. });
        if !discovering
            && matches!(
                self.state,
                SyncState::Refused | SyncState::SessionEnded | SyncState::CredentialsNotStored
            )
        {
            self.schedule.lift_wait();
            if self.state != SyncState::Refused {
                self.set_state(self.resumed_state());
            }
        }
        Ok(())
    }

    /// [`set_credentials`](Self::set_credentials) with a new access token alone: the
    /// refresh token in force (if any) is kept, the expiry becomes unknown.
    pub fn set_access_token(
        &mut self,
        access_token: impl Into<String>,
        now: Instant,
    ) -> Result<(), InputError> {
        let mut credentials = Credentials::new(access_token);
        credentials.refresh_token = self.config.refresh_token.clone();
        self.set_credentials(credentials, now)
    }

    // ---- outputs --------------------------------------------------------------------------

    /// Refreshed credentials to store before the machine uses them. When one comes out, store
    /// it durably (both tokens: with rotation the old refresh token is dead once the new
    /// access token is used), then call
    /// [`handle_credentials_stored`](Self::handle_credentials_stored), or
    /// [`handle_credentials_not_stored`](Self::handle_credentials_not_stored) if that failed.
    /// No request goes out in between. Poll it with the other outputs after every input.
    #[must_use]
    pub fn poll_credentials(&mut self) -> Option<Credentials> {
        let Auth::Storing { new, offer_at, .. } = &mut self.auth else {
            return None;
        };
        match offer_at {
            Some(at) if *at <= self.now => {
                *offer_at = None;
                Some(new.clone())
            }
            _ => None,
        }
    }

    /// The next request to send, if one is due now.
    ///
    /// Call after every input, once the events are drained: no request is made while events
    /// are undelivered, so `since` only moves past events that were handed on. At most one
    /// request is in flight at any time.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<OutgoingRequest> {
        if matches!(self.auth, Auth::Storing { .. }) || !self.schedule.is_due(self.now) {
            return None;
        }
        let idle = matches!(
            self.phase,
            Phase::Syncing { in_flight: None }
                | Phase::FillingGaps {
                    in_flight: None,
                    ..
                }
        );
        let refresh_token = self
            .config
            .refresh_token
            .as_ref()
            .filter(|_| match self.auth {
                Auth::Expired => true,
                Auth::Valid {
                    refresh_at: Some(at),
                    ..
                } => at <= self.now,
                _ => false,
            });
        let (http, kind, deadline) = match (&self.phase, refresh_token) {
            (_, Some(token)) if idle => (
                auth::refresh_request(&self.config, token).map_err(|e| e.to_string()),
                RequestKind::Refresh,
                self.now + self.config.deadline_margin,
            ),
            (Phase::Syncing { in_flight: None }, _) => self.build_sync(),
            (
                Phase::Discovering {
                    step,
                    in_flight: None,
                },
                _,
            ) => {
                let (http, kind) = match step {
                    Step::WellKnown { url, .. } => {
                        (discovery::request(url), RequestKind::Discovery)
                    }
                    Step::Versions { base_url } => (
                        discovery::versions_request(base_url),
                        RequestKind::VersionsCheck,
                    ),
                    // Announced first, as an event.
                    Step::Found { .. } => return None,
                };
                let http = http.map_err(|e| e.to_string());
                (http, kind, self.now + self.config.deadline_margin)
            }
            (
                Phase::FillingGaps {
                    filler,
                    in_flight: None,
                    ..
                },
                _,
            ) => {
                let page = filler.next_request(&self.config)?;
                let http = request::messages_request(
                    &self.config,
                    page.room_id,
                    page.from,
                    page.to,
                    page.limit,
                )
                .map_err(|e| e.to_string());
                let kind = RequestKind::Messages {
                    room_id: page.room_id.clone(),
                };
                (http, kind, self.now + self.config.deadline_margin)
            }
            _ => return None,
        };
        if matches!(kind, RequestKind::Messages { .. }) && self.state == SyncState::BackingOff {
            self.set_state(SyncState::CatchingUp);
        }
        // A verdict that needs the user stays `Refused` while it is retried.
        if kind.is_discovery() && self.state != SyncState::Refused {
            self.set_state(SyncState::Discovering);
        }
        self.schedule.sent();
        let id = RequestId::new(self.next_id);
        self.next_id += 1;
        let in_flight = InFlight {
            id,
            kind: kind.clone(),
            sent_at: self.now,
            deadline,
            credentials: self.credentials,
        };
        match http {
            Ok(http) => {
                log::debug!("request {id}: {} {}", kind.name(), http.uri().path());
                if let Some(slot) = self.in_flight_slot() {
                    *slot = Some(in_flight);
                }
                Some(OutgoingRequest {
                    id,
                    kind,
                    http,
                    deadline,
                })
            }
            Err(err) => {
                self.fail(in_flight, Failure::InvalidRequest(err));
                None
            }
        }
    }

    /// The next normalized event. Drain until `None` after every input.
    ///
    /// Handing on a [`Checkpoint`](EventKind::Checkpoint) is what advances `since`.
    #[must_use]
    #[inline]
    pub fn poll_event(&mut self) -> Option<Event> {
        let Phase::Delivering { delivery, .. } = &mut self.phase else {
            return self.poll_notice();
        };
        // Returned as it came, so that the event is built where the caller takes it.
        let event = delivery.next_event(&mut self.dedup);
        if let Some(Event {
            kind: kind @ (EventKind::Checkpoint(_) | EventKind::ConnectionReset(_)),
            ..
        }) = &event
        {
            self.batch_ended(kind);
        }
        event
    }

    /// [`poll_event`](Self::poll_event) outside a batch: the homeserver discovery found.
    fn poll_notice(&mut self) -> Option<Event> {
        let Phase::Discovering {
            step: Step::Found { base_url },
            ..
        } = &mut self.phase
        else {
            return None;
        };
        let homeserver = std::mem::take(base_url);
        log::info!("server discovery: the homeserver is {homeserver}");
        self.config.homeserver.clone_from(&homeserver);
        // From here `homeserver` is the base URL itself: a copy of this configuration
        // starts syncing there at once.
        self.config.discover = false;
        self.phase = Phase::Syncing { in_flight: None };
        if self.state == SyncState::Refused {
            // The verdict that needed the user is over: the server answered well.
            self.set_state(self.catch_up_state());
        }
        Some(Event::discovered(homeserver))
    }

    /// The batch being delivered handed on its last item, `kind`.
    #[cold]
    fn batch_ended(&mut self, kind: &EventKind) {
        let Phase::Delivering { delivery, answer } = &self.phase else {
            return;
        };
        let channel = answer.channel;
        match kind {
            EventKind::Checkpoint(checkpoint) => {
                // The batch is over: its body is freed now, not at the next batch.
                let productive = delivery.delivered() > 0 || answer.held;
                self.phase = Phase::Syncing { in_flight: None };
                self.since = Some(checkpoint.next_batch.clone());
                if let Wire::Sliding(sliding) = &mut self.wire {
                    sliding.pos = Pos::Checkpoint;
                }
                self.answered(channel, productive);
            }
            EventKind::ConnectionReset(_) => {
                // Announced: the fresh connection is paced like an answer that delivered
                // nothing, so a server that keeps dropping connections cannot make it spin.
                self.phase = Phase::Syncing { in_flight: None };
                if let Some(delay) = self.schedule.sync_answered(channel, false, self.now) {
                    log::debug!("connection reset: next sync in {} ms", delay.as_millis());
                }
            }
            _ => {}
        }
    }

    /// The next failure report. Drain after every input; the machine already acted on it.
    #[must_use]
    pub fn poll_error(&mut self) -> Option<SyncError> {
        self.errors.pop_front()
    }

    /// The next change of [`SyncState`]; the first one is the initial state, the last one
    /// `Stopped`.
    #[must_use]
    pub fn poll_state(&mut self) -> Option<SyncState> {
        self.states.pop_front()
    }

    /// When the machine next wants [`handle_timeout`](Self::handle_timeout): the in-flight
    /// request's deadline, or the end of a wait. `None` while events wait to be drained
    /// (drain them, then [`poll_request`](Self::poll_request)) and after a stop. An instant
    /// not after the last `now` means a request is due: call `poll_request`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let (Auth::Storing { offer_at, .. }, false) =
            (&self.auth, matches!(self.phase, Phase::Stopped))
        {
            // Nothing goes out before the application answers; a refused store is offered
            // again at `offer_at`.
            return *offer_at;
        }
        match &self.phase {
            Phase::Delivering { .. }
            | Phase::Stopped
            | Phase::Discovering {
                step: Step::Found { .. },
                ..
            } => None,
            Phase::Syncing { in_flight: Some(f) }
            | Phase::FillingGaps {
                in_flight: Some(f), ..
            }
            | Phase::Discovering {
                in_flight: Some(f), ..
            } => Some(f.deadline),
            Phase::Syncing { in_flight: None }
            | Phase::FillingGaps { .. }
            | Phase::Discovering { .. } => Some(self.schedule.next_send(self.now)),
        }
    }

    // ---- observation ----------------------------------------------------------------------

    /// The token the next sync starts from: the `next_batch` of the last checkpoint handed on.
    pub fn since(&self) -> Option<&str> {
        self.since.as_deref()
    }

    /// The homeserver's base URL every request goes to (without a trailing slash); `None`
    /// while server discovery ([`Config::discover()`]) has not announced it
    /// ([`EventKind::Discovered`]).
    pub fn homeserver(&self) -> Option<&str> {
        (!self.config.discover).then_some(self.config.homeserver.as_str())
    }

    /// The current state.
    pub fn state(&self) -> SyncState {
        self.state
    }

    /// The request awaited, if any, with its deadline.
    pub fn in_flight(&self) -> Option<InFlightRequest<'_>> {
        match &self.phase {
            Phase::Syncing { in_flight }
            | Phase::FillingGaps { in_flight, .. }
            | Phase::Discovering { in_flight, .. } => in_flight.as_ref().map(|f| InFlightRequest {
                id: f.id,
                kind: &f.kind,
                deadline: f.deadline,
            }),
            _ => None,
        }
    }

    /// Bytes of gap-fill events held for the batch being filled: never more than
    /// [`Config::max_body_bytes`] (see [`GapFill`](crate::GapFill)).
    pub fn gap_fill_bytes(&self) -> u64 {
        match &self.phase {
            Phase::FillingGaps { filler, .. } => filler.held_bytes(),
            _ => 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The protocol spoken ([`Config::protocol`] as decided).
    pub fn protocol(&self) -> ActiveProtocol {
        match self.wire {
            Wire::Deciding => ActiveProtocol::Deciding,
            Wire::V3 => ActiveProtocol::V3,
            Wire::Sliding(_) => ActiveProtocol::SlidingSync,
        }
    }

    /// Sliding sync: the position the next request carries (the last checkpoint's, without
    /// `pos` after a [connection reset](EventKind::ConnectionReset)); `None` under another
    /// protocol.
    pub fn sliding_position(&self) -> Option<SlidingPosition> {
        matches!(self.wire, Wire::Sliding(_)).then(|| self.next_position())
    }

    /// Sliding sync: the last index of the list's range the next request asks for; `None`
    /// under another protocol.
    pub fn sliding_range_end(&self) -> Option<u64> {
        match &self.wire {
            Wire::Sliding(sliding) => Some(sliding.range_end),
            _ => None,
        }
    }

    /// Subscribes to `room` (sliding sync): from the next request on, the room is synced
    /// whether or not it is in the list's window. Replaces an earlier subscription to it.
    /// Kept, and unused, while the protocol is `/v3/sync` (which syncs every room anyway).
    ///
    /// A request already in flight (a long-poll) goes on without it: the subscription
    /// takes effect with the next request. Refused with
    /// [`InputError::InvalidSubscription`] for a `timeline_limit` outside 1 to 1000, and
    /// [`InputError::Stopped`] after a stop.
    pub fn subscribe_room(
        &mut self,
        room: OwnedRoomId,
        subscription: RoomSubscription,
    ) -> Result<(), InputError> {
        if matches!(self.phase, Phase::Stopped) {
            return Err(InputError::Stopped);
        }
        if !crate::sliding::valid_subscription(&subscription) {
            return Err(InputError::InvalidSubscription);
        }
        self.subscriptions.insert(room, subscription);
        Ok(())
    }

    /// Ends the subscription to `room` from the next request on; true if there was one. The
    /// room is still synced while it is in the list's window.
    pub fn unsubscribe_room(&mut self, room: &RoomId) -> Result<bool, InputError> {
        if matches!(self.phase, Phase::Stopped) {
            return Err(InputError::Stopped);
        }
        Ok(self.subscriptions.remove(room).is_some())
    }

    /// The sliding sync room subscriptions in force.
    pub fn room_subscriptions(&self) -> &BTreeMap<OwnedRoomId, RoomSubscription> {
        &self.subscriptions
    }

    // ---- internals ------------------------------------------------------------------------

    fn check_input(&self, now: Instant) -> Result<(), InputError> {
        if matches!(self.phase, Phase::Stopped) {
            return Err(InputError::Stopped);
        }
        if now < self.now {
            return Err(InputError::TimeWentBackwards {
                last: self.now,
                now,
            });
        }
        Ok(())
    }

    /// The in-flight slot of the phases that send requests.
    fn in_flight_slot(&mut self) -> Option<&mut Option<InFlight>> {
        match &mut self.phase {
            Phase::Syncing { in_flight }
            | Phase::FillingGaps { in_flight, .. }
            | Phase::Discovering { in_flight, .. } => Some(in_flight),
            Phase::Delivering { .. } | Phase::Stopped => None,
        }
    }

    /// Validates an input for request `id` and takes the request out of flight.
    fn accept(&mut self, id: RequestId, now: Instant) -> Result<InFlight, InputError> {
        self.check_input(now)?;
        match self.in_flight() {
            Some(awaited) if awaited.id == id => {}
            _ => return Err(InputError::StaleRequest(id)),
        }
        self.now = now;
        self.in_flight_slot()
            .and_then(Option::take)
            .ok_or(InputError::StaleRequest(id))
    }

    /// The next sync request: its HTTP form, kind and deadline.
    fn build_sync(&mut self) -> (Result<http::Request<Vec<u8>>, String>, RequestKind, Instant) {
        match self.wire {
            Wire::V3 => {}
            Wire::Sliding(_) => return self.build_sliding(),
            Wire::Deciding => {
                let http = sliding_request::versions_request(&self.config);
                let deadline = self.now + self.config.deadline_margin;
                return (http, RequestKind::ProtocolCheck, deadline);
            }
        }
        let since = self.since.as_deref();
        let timeout = match self.mode {
            Mode::First | Mode::CatchUp => Duration::ZERO,
            Mode::LongPoll => self.config.long_poll_timeout,
        };
        let deadline = self.now
            + match (since, self.mode) {
                (None, _) => self.config.initial_sync_deadline,
                (Some(_), Mode::First | Mode::CatchUp) => self.config.catch_up_deadline,
                (Some(_), Mode::LongPoll) => timeout + self.config.deadline_margin,
            };
        let full_state = self.mode == Mode::First && self.config.full_state;
        let filter = self.sync_filter.as_deref();
        let http = request::sync_request(&self.config, filter, since, timeout, full_state)
            .map_err(|e| e.to_string());
        let waiting_on_user = matches!(self.state, SyncState::Refused | SyncState::SessionEnded);
        if !waiting_on_user && self.mode != Mode::LongPoll {
            self.set_state(self.catch_up_state());
        }
        (http, RequestKind::Sync { timeout }, deadline)
    }

    fn catch_up_state(&self) -> SyncState {
        let dropped = matches!(&self.wire, Wire::Sliding(s) if s.pos == Pos::Dropped);
        if self.since.is_some() && !dropped {
            SyncState::CatchingUp
        } else {
            SyncState::InitialSync
        }
    }

    fn set_state(&mut self, state: SyncState) {
        if self.state != state && !matches!(self.phase, Phase::Stopped) {
            log::debug!("state {:?} -> {:?}", self.state, state);
            self.state = state;
            self.states.push_back(state);
        }
    }

    /// A sync answer was handed on (or had nothing to hand on): pace the next request, and
    /// a catch-up's answer means the machine is live.
    fn answered(&mut self, channel: Channel, productive: bool) {
        if let Some(delay) = self.schedule.sync_answered(channel, productive, self.now) {
            log::debug!("nothing delivered: next sync in {} ms", delay.as_millis());
        }
        // Sliding sync: while the list has rooms past the range, the range grows and the
        // machine keeps catching up.
        let window = self.config.sliding_sync.window;
        let growing = match &mut self.wire {
            Wire::Sliding(sliding) => sliding.grow(window),
            Wire::V3 | Wire::Deciding => false,
        };
        // Only the answer to a catch-up means caught up; a gap fill that failed during a
        // long-poll's batch leaves the next sync a catch-up.
        if channel == Channel::CatchUp && self.mode != Mode::LongPoll && !growing {
            self.mode = Mode::LongPoll;
            self.set_state(SyncState::Live);
        }
    }

    /// A sync failed, or a gap fill failed in a way that fails the whole batch: back off and
    /// catch up from the unchanged `since`.
    fn sync_failed(&mut self, failure: &Failure) -> Retry {
        let retry = self
            .schedule
            .sync_failed(self.mode.channel(), failure, self.now);
        if self.mode == Mode::LongPoll {
            self.mode = Mode::CatchUp;
        }
        let state = match failure.class() {
            ErrorClass::NeedsUser if matches!(self.auth, Auth::Ended) => SyncState::SessionEnded,
            ErrorClass::NeedsUser => SyncState::Refused,
            ErrorClass::Transient | ErrorClass::RateLimited => SyncState::BackingOff,
        };
        self.set_state(state);
        retry
    }

    /// A 401 `M_UNKNOWN_TOKEN` to a sync or gap fill: retried at once when it was sent with
    /// credentials replaced since, or after one refresh when a refresh token is in hand and
    /// these credentials were not themselves the fruit of a refresh after a 401. `None`: a
    /// refusal like any other.
    fn token_refused(&mut self, in_flight: &InFlight) -> Option<Retry> {
        let now = Retry {
            attempt: 1,
            delay: Duration::ZERO,
        };
        if in_flight.credentials != self.credentials {
            return Some(now);
        }
        let fresh = matches!(
            self.auth,
            Auth::Valid {
                unproven: false,
                ..
            }
        );
        if self.config.refresh_token.is_some() && fresh {
            log::info!("access token refused: refreshing, then retrying");
            self.auth = Auth::Expired;
            return Some(now);
        }
        None
    }

    /// A refresh failed: a refusal ends the session; anything else is retried with backoff,
    /// holding every other request only if the access token is known to be dead.
    fn refresh_failed(&mut self, in_flight: &InFlight, failure: &Failure) -> Retry {
        if in_flight.credentials != self.credentials {
            // The credentials were replaced meanwhile: this refresh is moot.
            return Retry {
                attempt: 1,
                delay: Duration::ZERO,
            };
        }
        if matches!(failure, Failure::RefreshRefused { .. }) {
            self.auth = Auth::Ended;
            self.set_state(SyncState::SessionEnded);
            return self.schedule.hold_max(self.now);
        }
        let dead = matches!(self.auth, Auth::Expired);
        let retry = self.schedule.refresh_failed(failure, self.now, dead);
        match &mut self.auth {
            Auth::Valid { refresh_at, .. } => *refresh_at = Some(self.now + retry.delay),
            _ if failure.class() == ErrorClass::NeedsUser => self.set_state(SyncState::Refused),
            _ => self.set_state(SyncState::BackingOff),
        }
        retry
    }

    /// A discovery request failed: back off on discovery's own counter, and start over from
    /// the well-known.
    fn discovery_failed(&mut self, failure: &Failure) -> Retry {
        let retry = self.schedule.discovery_failed(failure, self.now);
        if let Phase::Discovering { step, .. } = &mut self.phase {
            *step = Step::start(&self.config.homeserver);
        }
        self.set_state(match failure.class() {
            ErrorClass::NeedsUser => SyncState::Refused,
            ErrorClass::Transient | ErrorClass::RateLimited => SyncState::BackingOff,
        });
        retry
    }

    /// An answer to a discovery request: the next step, or a failure.
    fn on_discovery(&mut self, in_flight: InFlight, parts: &http::response::Parts, body: &[u8]) {
        let Phase::Discovering { step, .. } = &self.phase else {
            return;
        };
        let next = match (&in_flight.kind, step) {
            (RequestKind::Discovery, Step::WellKnown { url, hops }) => {
                let answer = discovery::read_well_known(
                    url,
                    *hops,
                    parts.status,
                    &parts.headers,
                    body,
                    self.config.allow_insecure_http,
                );
                match answer {
                    Ok(WellKnown::Found { base_url }) => Step::Versions { base_url },
                    Ok(WellKnown::Ignore) => {
                        log::info!("server discovery: no well-known (404), using the server name's address");
                        Step::Found {
                            base_url: self.config.homeserver.clone(),
                        }
                    }
                    Ok(WellKnown::Redirect(url)) => Step::WellKnown {
                        url,
                        hops: hops.saturating_add(1),
                    },
                    Err(failure) => return self.fail(in_flight, failure),
                }
            }
            (RequestKind::VersionsCheck, Step::Versions { base_url }) => {
                match discovery::read_versions(base_url, parts.status, &parts.headers, body) {
                    Ok(()) => Step::Found {
                        base_url: base_url.clone(),
                    },
                    Err(failure) => return self.fail(in_flight, failure),
                }
            }
            // Not reached: the request in flight is the step's.
            _ => {
                let failure = Failure::InvalidRequest("discovery answer out of step".into());
                return self.fail(in_flight, failure);
            }
        };
        if let Phase::Discovering { step, .. } = &mut self.phase {
            *step = next;
        }
    }

    /// Puts `credentials` in force for the next request.
    fn put_in_force(&mut self, credentials: Credentials, expires_at: Option<(Instant, Duration)>) {
        self.config.access_token = credentials.access_token;
        self.config.refresh_token = credentials.refresh_token;
        self.credentials += 1;
        self.auth = Auth::fresh(expires_at, self.config.refresh_token.is_some());
    }

    /// The state to show when a wait on the application or the user is over.
    fn resumed_state(&self) -> SyncState {
        match self.mode {
            Mode::LongPoll => SyncState::Live,
            Mode::First | Mode::CatchUp => self.catch_up_state(),
        }
    }

    fn report(&mut self, failure: Failure, request: RequestKind, retry: Retry) {
        self.errors.push_back(SyncError {
            class: failure.class(),
            failure,
            request,
            attempt: retry.attempt,
            delay: retry.delay,
        });
    }

    fn fail(&mut self, in_flight: InFlight, mut failure: Failure) {
        let refused_token = matches!(failure, Failure::UnknownToken { .. })
            && in_flight.kind != RequestKind::Refresh
            && !in_flight.kind.is_discovery();
        let retry = match refused_token
            .then(|| self.token_refused(&in_flight))
            .flatten()
        {
            Some(retry) => retry,
            None => match &in_flight.kind {
                RequestKind::Sync { .. }
                | RequestKind::SlidingSync { .. }
                | RequestKind::ProtocolCheck
                | RequestKind::Crypto(_) => self.sync_failed(&failure),
                RequestKind::Messages { .. } => self.fill_failed(&failure),
                RequestKind::Refresh => self.refresh_failed(&in_flight, &failure),
                RequestKind::Discovery | RequestKind::VersionsCheck => {
                    self.discovery_failed(&failure)
                }
            },
        };
        if let (RequestKind::Refresh, Failure::BadResponse { excerpt, .. }) =
            (&in_flight.kind, &mut failure)
        {
            // A refresh answer carries tokens: never quote it.
            excerpt.clear();
        }
        log::warn!(
            "{} request {} failed: {failure}",
            in_flight.kind.name(),
            in_flight.id
        );
        self.report(failure, in_flight.kind, retry);
    }

    /// A gap-fill request failed: what it means decides between failing the batch, ending
    /// the room, and retrying within bounds.
    fn fill_failed(&mut self, failure: &Failure) -> Retry {
        let Phase::FillingGaps { filler, .. } = &mut self.phase else {
            return Retry {
                attempt: 1,
                delay: Duration::ZERO,
            };
        };
        let meaning = FillFailure::of(failure);
        if meaning == FillFailure::Unauthorized {
            // Exactly a failed sync: the batch is dropped, `since` stays before it.
            self.phase = Phase::Syncing { in_flight: None };
            return self.sync_failed(failure);
        }
        // The contract: the first sync after any error catches up.
        if self.mode == Mode::LongPoll {
            self.mode = Mode::CatchUp;
        }
        match meaning {
            FillFailure::HistoryRefused | FillFailure::Unauthorized => filler.end_room(),
            FillFailure::Retry => {
                if filler.on_retryable_failure() {
                    self.set_state(SyncState::BackingOff);
                    return self.schedule.fill_failed(failure, self.now);
                }
            }
        }
        // The room is over: the next one (or the delivery) goes on at once.
        let attempt = self.schedule.fill_failed(failure, self.now).attempt;
        self.schedule.fill_answered();
        self.schedule.sent();
        self.deliver_if_filled();
        Retry {
            attempt,
            delay: Duration::ZERO,
        }
    }

    fn on_sync(&mut self, in_flight: InFlight, status: http::StatusCode, body: Vec<u8>) {
        let parsed = match ParsedBody::parse(body) {
            Ok(parsed) => parsed,
            Err((body, err)) => {
                let failure = bad_response(status.as_u16(), err.to_string(), &body);
                return self.fail(in_flight, failure);
            }
        };
        if let Err(reason) = check_tokens(&parsed) {
            return self.fail(in_flight, bad_response(status.as_u16(), reason, b""));
        }
        if matches!(self.state, SyncState::Refused | SyncState::SessionEnded) {
            self.set_state(self.catch_up_state());
        }
        let timeout = match in_flight.kind {
            RequestKind::Sync { timeout } => timeout,
            RequestKind::Messages { .. }
            | RequestKind::Refresh
            | RequestKind::Crypto(_)
            | RequestKind::Discovery
            | RequestKind::VersionsCheck
            | RequestKind::SlidingSync { .. }
            | RequestKind::ProtocolCheck => Duration::ZERO,
        };
        let answer = Answer {
            channel: self.mode.channel(),
            held: schedule::held(in_flight.sent_at, self.now, timeout),
        };
        let response = parsed.response();
        if self.since.as_deref() == Some(response.next_batch.as_str()) && response.is_empty() {
            // Nothing to hand on, not even a checkpoint: the position is unchanged.
            return self.answered(answer.channel, answer.held);
        }
        let gaps = parsed.gaps(self.since.as_deref());
        self.fill_then_deliver(Answered::V3(parsed), gaps, answer);
    }

    /// Delivers an answer at once, or first fills its `gaps`.
    fn fill_then_deliver(
        &mut self,
        answered: Answered,
        gaps: Vec<(OwnedRoomId, Gap)>,
        answer: Answer,
    ) {
        match GapFiller::plan(answered, gaps, &self.config) {
            Plan::Deliver(answered, fills) => self.deliver(answered, fills, answer),
            Plan::Fill(filler) => {
                self.phase = Phase::FillingGaps {
                    filler,
                    answer,
                    in_flight: None,
                }
            }
        }
    }

    fn on_refresh(&mut self, in_flight: InFlight, status: http::StatusCode, body: &[u8]) {
        if in_flight.credentials != self.credentials {
            log::info!("refresh answer for credentials replaced since: ignored");
            return;
        }
        let Some(old) = self.config.refresh_token.clone() else {
            return;
        };
        match auth::parse_refresh(body, &old) {
            Err(reason) => self.fail(in_flight, bad_response(status.as_u16(), reason, b"")),
            Ok(new) => {
                log::info!("access token refreshed; handing it out to be stored");
                self.schedule.refresh_answered();
                self.auth = Auth::Storing {
                    expires_at: auth::expiry(in_flight.sent_at, new.expires_in),
                    new,
                    offer_at: Some(self.now),
                    after_401: matches!(self.auth, Auth::Expired),
                };
            }
        }
    }

    fn on_page(&mut self, in_flight: InFlight, response: http::Response<&[u8]>) {
        let status = response.status().as_u16();
        let page = match parse::<messages::Response>(response) {
            Ok(page) => page,
            Err(failure) => return self.fail(in_flight, failure),
        };
        let Phase::FillingGaps { filler, .. } = &mut self.phase else {
            return;
        };
        if let Err(reason) = filler.on_page(page, &self.config.gap_fill) {
            return self.fail(in_flight, bad_response(status, reason, b""));
        }
        self.schedule.fill_answered();
        self.deliver_if_filled();
    }

    fn deliver_if_filled(&mut self) {
        let Phase::FillingGaps { filler, .. } = &self.phase else {
            return;
        };
        if !filler.is_done() {
            return;
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Syncing { in_flight: None });
        if let Phase::FillingGaps { filler, answer, .. } = phase {
            let (answered, fills) = filler.into_parts();
            self.deliver(answered, fills, answer);
        }
    }

    fn deliver(&mut self, answered: Answered, fills: RoomFills, answer: Answer) {
        let live = answer.channel == Channel::LongPoll;
        let delivery = match answered {
            Answered::V3(parsed) => {
                self.dedup.reserve(parsed.response().events_found);
                let delivery = Delivery::plan(parsed, fills, &mut self.last_key_counts, live);
                Batch::V3(delivery)
            }
            Answered::Sliding { body, sent } => {
                let Wire::Sliding(sliding) = &mut self.wire else {
                    return;
                };
                let context = Context {
                    sent: &sent,
                    fills,
                    live,
                    last_key_counts: &mut self.last_key_counts,
                    lists: &mut sliding.lists,
                    user_id: self.config.sliding_sync.user_id.as_deref(),
                };
                Batch::Sliding(SlidingDelivery::plan(body, context))
            }
        };
        self.phase = Phase::Delivering { delivery, answer };
    }

    // ---- sliding sync ---------------------------------------------------------------------

    /// The position the next sliding sync request carries.
    fn next_position(&self) -> SlidingPosition {
        let Wire::Sliding(sliding) = &self.wire else {
            return SlidingPosition::default();
        };
        let mut position = self
            .since
            .as_deref()
            .and_then(SlidingPosition::from_token)
            .unwrap_or_default();
        if sliding.pos == Pos::Dropped {
            position.pos = None;
        }
        position
    }

    /// Whether the sliding sync request in flight carried a `pos` (nothing changes the
    /// position while a request is in flight).
    fn pos_sent(&self) -> bool {
        matches!(self.wire, Wire::Sliding(_)) && self.next_position().pos.is_some()
    }

    /// [`Protocol::Auto`] falls back to `/v3/sync` when the sliding sync endpoint is not
    /// served (404 `M_UNRECOGNIZED`), unless a checkpoint was handed on already.
    fn may_fall_back(&self, failure: &Failure) -> bool {
        let not_served = matches!(
            failure,
            Failure::Refused { status: 404, errcode, .. }
                if errcode.as_deref().is_none_or(|e| e == "M_UNRECOGNIZED")
        );
        not_served && self.config.protocol == Protocol::Auto && self.since.is_none()
    }

    /// The server dropped the connection: announce it, then start a fresh one (no `pos`,
    /// the to-device cursor kept), paced like an answer that delivered nothing.
    fn reset(&mut self, reason: ResetReason) {
        let to_device_since = self.next_position().to_device_since;
        log::warn!(
            "sliding sync connection reset by the server ({}): starting a fresh connection",
            reason.name()
        );
        let window = self.config.sliding_sync.window;
        if let Wire::Sliding(sliding) = &mut self.wire {
            sliding.pos = Pos::Dropped;
            sliding.range_end = u64::from(window) - 1;
            sliding.count = None;
            sliding.lists.clear();
        }
        // Paced on the channel of the request refused, as a failure of it would be: a
        // catch-up that works after it proves nothing about the long-polls.
        let channel = self.mode.channel();
        if self.mode == Mode::LongPoll {
            self.mode = Mode::CatchUp;
        }
        if !matches!(self.state, SyncState::Refused | SyncState::SessionEnded) {
            self.set_state(SyncState::InitialSync);
        }
        let event = Event::connection_reset(ConnectionReset {
            reason,
            to_device_since,
        });
        self.phase = Phase::Delivering {
            delivery: Batch::Notice(Some(Box::new(event))),
            answer: Answer {
                channel,
                held: false,
            },
        };
    }

    /// The answer to the versions check of [`Protocol::Auto`].
    fn on_protocol_check(&mut self, body: &[u8]) {
        if sliding_request::offers_sliding_sync(body) {
            log::info!("the server offers simplified sliding sync: using it");
            self.wire = Wire::Sliding(Sliding::new(&self.config));
        } else {
            log::info!("the server does not offer simplified sliding sync: using /v3/sync");
            self.wire = Wire::V3;
        }
    }

    fn on_sliding(&mut self, in_flight: InFlight, status: http::StatusCode, body: Vec<u8>) {
        let parsed = match SlidingBody::parse(body) {
            Ok(parsed) => parsed,
            Err((body, err)) => {
                let failure = bad_response(status.as_u16(), err.to_string(), &body);
                return self.fail(in_flight, failure);
            }
        };
        let sent = self.next_position();
        if let Err(reason) = parsed.response().check_tokens(&sent) {
            return self.fail(in_flight, bad_response(status.as_u16(), reason, b""));
        }
        if matches!(self.state, SyncState::Refused | SyncState::SessionEnded) {
            self.set_state(self.catch_up_state());
        }
        let timeout = match in_flight.kind {
            RequestKind::SlidingSync { timeout } => timeout,
            _ => Duration::ZERO,
        };
        let answer = Answer {
            channel: self.mode.channel(),
            held: schedule::held(in_flight.sent_at, self.now, timeout),
        };
        let Wire::Sliding(sliding) = &mut self.wire else {
            return;
        };
        let response = parsed.response();
        if let Some(count) = response.count(LIST) {
            sliding.count = Some(count);
        }
        let unchanged = sent.pos.as_deref() == Some(response.pos.as_str())
            && response.next_position(&sent) == sent
            && response.is_empty();
        if unchanged {
            // Nothing to hand on, not even a checkpoint: the position is unchanged.
            return self.answered(answer.channel, answer.held);
        }
        // After a connection reset, the last checkpoint's stream part: rooms come back
        // `initial`, and a `limited` one has a real gap back to it.
        let dropped = self
            .since
            .as_deref()
            .and_then(SlidingPosition::from_token)
            .and_then(|p| p.pos)
            .filter(|_| sliding.pos == Pos::Dropped);
        let reset_floor = dropped.as_deref().map(SlidingPosition::stream_part);
        let gaps = response.gaps(&sent, reset_floor);
        let answered = Answered::Sliding { body: parsed, sent };
        self.fill_then_deliver(answered, gaps, answer);
    }

    /// The next sliding sync request.
    fn build_sliding(&mut self) -> (Result<http::Request<Vec<u8>>, String>, RequestKind, Instant) {
        let position = self.next_position();
        let range_end = match &self.wire {
            Wire::Sliding(sliding) => sliding.range_end,
            _ => u64::from(self.config.sliding_sync.window) - 1,
        };
        let timeout = match self.mode {
            Mode::First | Mode::CatchUp => Duration::ZERO,
            Mode::LongPoll => self.config.long_poll_timeout,
        };
        let deadline = self.now
            + match (&position.pos, self.mode) {
                (None, _) => self.config.initial_sync_deadline,
                (Some(_), Mode::First | Mode::CatchUp) => self.config.catch_up_deadline,
                (Some(_), Mode::LongPoll) => timeout + self.config.deadline_margin,
            };
        let ask = Ask {
            position: &position,
            timeout,
            range_end,
            subscriptions: &self.subscriptions,
        };
        let http = sliding_request::sync_request(&self.config, &ask);
        let waiting_on_user = matches!(self.state, SyncState::Refused | SyncState::SessionEnded);
        if !waiting_on_user && self.mode != Mode::LongPoll {
            self.set_state(self.catch_up_state());
        }
        (http, RequestKind::SlidingSync { timeout }, deadline)
    }
}

/// Every token of a sync answer the machine may store or send back must survive the trip.
fn check_tokens(parsed: &ParsedBody) -> Result<(), String> {
    let response = parsed.response();
    token::check(&response.next_batch).map_err(|p| p.describe("next_batch"))?;
    for (_, prev_batch) in response.limited_timelines() {
        token::check(prev_batch).map_err(|p| p.describe("prev_batch"))?;
    }
    Ok(())
}

/// Parses a 2xx body with ruma; a body that is not what the endpoint returns is a
/// transient `BadResponse` carrying an excerpt.
fn parse<R: IncomingResponseExt>(response: http::Response<&[u8]>) -> Result<R, Failure> {
    let status = response.status().as_u16();
    let body = *response.body();
    R::try_from_http_response(response).map_err(|err| bad_response(status, err.to_string(), body))
}

/// The reset a refusal of a sliding sync request that carried a `pos` means, if any: 400
/// `M_UNKNOWN_POS`, or Synapse's 400 `M_UNKNOWN` "Invalid stream token…".
fn reset_reason(failure: &Failure) -> Option<ResetReason> {
    let Failure::Refused {
        status: 400,
        errcode: Some(errcode),
        message,
    } = failure
    else {
        return None;
    };
    match errcode.as_str() {
        "M_UNKNOWN_POS" => Some(ResetReason::UnknownPos),
        "M_UNKNOWN"
            if message
                .as_deref()
                .is_some_and(|m| m.starts_with("Invalid stream token")) =>
        {
            Some(ResetReason::InvalidPos)
        }
        _ => None,
    }
}
