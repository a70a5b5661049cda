//! Test support shared by the crate's tests, benchmarks, examples and fuzz targets.
//!
//! * [`Checked`]: the one list of invariants (below), asserted at every call.
//! * [`sim`]: the one harness: a [`Checked`] machine, a simulated clock and a log, with the
//!   test as the server ([`sim::Harness`]) or a scripted homeserver; [`canned`]: fixtures,
//!   responses and small bodies for it.
//! * [`backoff`]: the documented backoff, replayed independently; [`rng`]: the one seeded
//!   generator; [`query`]: requests read back; [`gen`]: realistic large sync bodies;
//!   [`cpu_clock`]: CPU-time clocks.
//! * With the `net` feature (default): [`synapse`], a throwaway Synapse (also as the
//!   `synapse` binary), [`client`], a blocking test client, [`proxy`], a fault-injecting
//!   proxy, [`fake_server`], a scripted loopback HTTP server, and [`tls`], a loopback TLS
//!   terminator with a throwaway CA; [`palpo`], a throwaway palpo with its PostgreSQL, the
//!   second homeserver, and [`homeserver`], either server behind one interface;
//!   [`synapse_db`], SQL on a throwaway Synapse's database; [`nats`], a throwaway
//!   `nats-server -js` for the fleet.
//!
//! [`Checked`] wraps a [`SyncMachine`] and checks, at every call, the invariants that must hold
//! whatever the inputs: the model test, the simulations and the `input_sequence` fuzz target
//! all drive the machine through it, so there is one list of invariants, here.
//!
//! * After [`stop`](Checked::stop), nothing more comes out: no request, event or error, no
//!   wake-up, and `Stopped` is the last state.
//! * Pacing: in any window of time, the sync requests that delivered nothing (failed, or
//!   answered early with nothing for the consumer) are no more than the backoff schedule
//!   allows: `2 × (d + 1)` ramps of the schedule's minimum delays fit in the window, `d` being
//!   the answers in it that delivered something or were held by the server (windows are
//!   checked up to two hours and eight such answers back). Each ramp is the
//!   sequence of delays `(1 − jitter) × min(initial × factor^(n−1), max)`; with a jitter of 1
//!   a delay may be zero and no bound exists, so none is checked.
//! * `since` never passes a batch whose gap fill failed on authentication: after such a
//!   failure, no event comes out before the next sync is sent.
//! * The gap-fill memory held for a pending batch never exceeds `max_body_bytes`.
//! * `since` moves only when a checkpoint is handed on, to that checkpoint's token: never on
//!   another event, never on an input. A refused input changes nothing (state, request in
//!   flight, wake-up instant).
//! * Requests: one at a time (none while one is in flight), ids increasing, the one handed out
//!   is the one in flight, its deadline in the future, the access token never in its URL, and
//!   a sync asks from the current `since`.
//! * Never stuck ([`Checked::assert_waiting`], once everything is drained): stopped, or a
//!   wake-up in the future, at the deadline of the request in flight if there is one.
//! * Server discovery paces itself too: in any window, its requests are no more than
//!   `MAX_DISCOVERY_REDIRECTS + 2` per step of the schedule's ramp (an attempt is the
//!   well-known, its redirects and the versions check; attempts are spaced by the backoff).
//!   Discovery requests are unauthenticated, like a refresh.
//! * Errors: at least attempt 1, the class of their failure, and a delay within the backoff
//!   cap (for rate limits, the larger of it and `max_server_wait`).
//! * Sliding sync: its requests are syncs for pacing; each carries the `pos` of the last
//!   checkpoint handed on (a sliding sync position), or none before the first and after a
//!   connection reset was handed on, and always the to-device cursor of the last checkpoint;
//!   a reset moves neither `since` nor that cursor; list updates and resets are the machine's
//!   own items, not deliveries.

pub mod backoff;
pub mod canned;
#[cfg(feature = "net")]
pub mod client;
pub mod cpu_clock;
pub mod example;
#[cfg(feature = "net")]
pub mod fake_server;
pub mod gen;
#[cfg(feature = "net")]
pub mod homeserver;
#[cfg(feature = "net")]
mod lifecycle;
#[cfg(feature = "net")]
pub mod nats;
#[cfg(feature = "net")]
pub mod palpo;
pub mod parallel;
#[cfg(feature = "net")]
pub mod proxy;
pub mod query;
pub mod rng;
pub mod sim;
#[cfg(feature = "net")]
pub mod synapse;
#[cfg(feature = "net")]
pub mod synapse_db;
#[cfg(feature = "net")]
pub mod tls;

use std::ops::Deref;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    AccessToken, ActiveProtocol, BackoffPolicy, Config, ConfigError, Credentials, ErrorClass,
    Event, EventKind, Failure, InputError, OutgoingRequest, RequestId, RequestKind,
    SlidingPosition, SyncError, SyncMachine, SyncState, TransportFailure,
};

/// How far back pacing windows are checked: the bound grows linearly past the ramp, so
/// longer windows show nothing new, and a limit keeps week-long simulations fast.
const WINDOW_HORIZON: Duration = Duration::from_secs(2 * 3600);
/// Windows are checked back to this many delivering (or held) answers: each one allows two
/// more ramps, so a window holding many is never where a spinning loop shows.
const WINDOW_RESETS: usize = 8;

/// A [`SyncMachine`] whose every input and output is checked against the invariants. Reading
/// methods are reached through `Deref`; every method that changes the machine is wrapped.
#[derive(Debug)]
pub struct Checked {
    machine: SyncMachine,
    now: Instant,
    invariants: Invariants,
    /// Credentials were handed out and not yet answered: nothing may be sent meanwhile.
    credentials_out: bool,
}

impl Checked {
    /// [`SyncMachine::new`], checked.
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        let invariants = Invariants::new(&config);
        Ok(Self {
            machine: SyncMachine::new(config, now)?,
            now,
            invariants,
            credentials_out: false,
        })
    }

    /// [`SyncMachine::poll_credentials`], checked: credentials come out only while nothing
    /// is in flight, and until they are answered no request goes out.
    #[must_use]
    pub fn poll_credentials(&mut self) -> Option<Credentials> {
        let credentials = self.machine.poll_credentials();
        if credentials.is_some() {
            assert!(
                !self.credentials_out,
                "credentials handed out twice unanswered"
            );
            assert!(
                self.machine.in_flight().is_none(),
                "credentials handed out with a request in flight"
            );
            assert!(!self.invariants.stopped, "credentials after stop");
            self.credentials_out = true;
        }
        credentials
    }

    /// [`SyncMachine::handle_credentials_stored`], checked.
    pub fn handle_credentials_stored(&mut self, now: Instant) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.handle_credentials_stored(now);
        self.credentials_answered(&result);
        self.after_input(None, now, &result, before);
        result
    }

    /// [`SyncMachine::handle_credentials_not_stored`], checked.
    pub fn handle_credentials_not_stored(
        &mut self,
        reason: &str,
        now: Instant,
    ) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.handle_credentials_not_stored(reason, now);
        self.credentials_answered(&result);
        self.after_input(None, now, &result, before);
        result
    }

    /// [`SyncMachine::set_credentials`], checked: the pending credentials (if any) are
    /// dropped, so nothing is awaited any more.
    pub fn set_credentials(
        &mut self,
        credentials: Credentials,
        now: Instant,
    ) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.set_credentials(credentials, now);
        self.credentials_answered(&result);
        self.after_input(None, now, &result, before);
        result
    }

    /// [`SyncMachine::set_access_token`], checked.
    pub fn set_access_token(&mut self, token: &str, now: Instant) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.set_access_token(token, now);
        self.credentials_answered(&result);
        self.after_input(None, now, &result, before);
        result
    }

    fn credentials_answered(&mut self, result: &Result<(), InputError>) {
        if result.is_ok() {
            self.credentials_out = false;
        }
    }

    /// [`SyncMachine::handle_response`], checked.
    pub fn handle_response<B: AsRef<[u8]> + Into<Vec<u8>>>(
        &mut self,
        id: RequestId,
        response: http::Response<B>,
        now: Instant,
    ) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.handle_response(id, response, now);
        self.after_input(result.is_ok().then_some((id, now)), now, &result, before);
        result
    }

    /// [`SyncMachine::handle_failure`], checked.
    pub fn handle_failure(
        &mut self,
        id: RequestId,
        failure: TransportFailure,
        now: Instant,
    ) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.handle_failure(id, failure, now);
        self.after_input(result.is_ok().then_some((id, now)), now, &result, before);
        result
    }

    /// [`SyncMachine::handle_timeout`], checked.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), InputError> {
        let before = self.snapshot();
        let awaited = self.machine.in_flight().map(|f| f.id);
        let result = self.machine.handle_timeout(now);
        let gone = awaited.filter(|_| self.machine.in_flight().is_none());
        self.after_input(gone.map(|id| (id, now)), now, &result, before);
        result
    }

    /// [`SyncMachine::stop`], checked.
    pub fn stop(&mut self) {
        self.machine.stop();
        self.invariants.stopped = true;
        self.check_machine();
    }

    /// [`SyncMachine::poll_request`], checked.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<OutgoingRequest> {
        let in_flight = self.machine.in_flight().is_some();
        let request = self.machine.poll_request();
        if let Some(request) = &request {
            assert!(!in_flight, "a second request while one is in flight");
            assert!(
                !self.credentials_out,
                "a request went out before the new credentials were stored"
            );
            if matches!(
                request.kind,
                RequestKind::Refresh | RequestKind::Discovery | RequestKind::VersionsCheck
            ) {
                assert!(
                    request.http.headers().get("authorization").is_none(),
                    "a {} request carries the access token",
                    request.kind.name()
                );
            }
            assert_eq!(
                self.machine.in_flight().map(|f| f.id),
                Some(request.id),
                "the request handed out is not the one in flight"
            );
            assert!(
                request.deadline > self.now,
                "a request already past its deadline"
            );
            let uri = request.http.uri().to_string();
            let config = self.machine.config();
            let secrets = [
                Some(config.access_token.expose()),
                config.refresh_token.as_ref().map(|t| t.expose()),
            ];
            for secret in secrets
                .into_iter()
                .flatten()
                .chain([self.invariants.token.expose()])
            {
                assert!(!uri.contains(secret), "a token is in the URL");
            }
            let uri = request.http.uri();
            if let RequestKind::SlidingSync { .. } = request.kind {
                self.check_sliding_request(request);
            }
            if let RequestKind::Sync { .. } = request.kind {
                assert_eq!(
                    query::uri_param(uri, "since").as_deref(),
                    self.machine.since(),
                    "a sync asks from another token than since"
                );
            }
            self.invariants.sent(request, self.now);
        }
        request
    }

    /// A sliding sync request asks from the last checkpoint's position: its `pos` (none
    /// before the first checkpoint and after a reset) and always its to-device cursor.
    fn check_sliding_request(&self, request: &OutgoingRequest) {
        let checkpoint = self
            .machine
            .since()
            .map(|since| SlidingPosition::from_token(since).expect("a sliding sync checkpoint"))
            .unwrap_or_default();
        let pos = query::uri_param(request.http.uri(), "pos");
        let expected = checkpoint
            .pos
            .filter(|_| !self.invariants.reset_since_checkpoint);
        assert_eq!(pos, expected, "a sliding sync asks from another pos");
        let body: serde_json::Value =
            serde_json::from_slice(request.http.body()).expect("a JSON body");
        let since = body["extensions"]["to_device"]["since"].as_str();
        if body["extensions"]["to_device"].is_object() {
            assert_eq!(
                since,
                checkpoint.to_device_since.as_deref(),
                "a sliding sync asks from another to-device cursor"
            );
        }
        assert!(body.get("pos").is_none(), "pos belongs in the query string");
        assert_eq!(
            self.machine.sliding_position().map(|p| p.pos),
            Some(pos),
            "sliding_position() is not what the request carries"
        );
    }

    /// [`SyncMachine::subscribe_room`], checked: changes nothing but the subscriptions.
    pub fn subscribe_room(
        &mut self,
        room: matrix_sync_service::ruma_common::OwnedRoomId,
        subscription: matrix_sync_service::RoomSubscription,
    ) -> Result<(), InputError> {
        let before = self.snapshot();
        let result = self.machine.subscribe_room(room, subscription);
        assert_eq!(
            self.snapshot(),
            before,
            "a subscription changed the machine"
        );
        result
    }

    /// [`SyncMachine::unsubscribe_room`], checked: changes nothing but the subscriptions.
    pub fn unsubscribe_room(
        &mut self,
        room: &matrix_sync_service::ruma_common::RoomId,
    ) -> Result<bool, InputError> {
        let before = self.snapshot();
        let result = self.machine.unsubscribe_room(room);
        assert_eq!(
            self.snapshot(),
            before,
            "an unsubscription changed the machine"
        );
        result
    }

    /// [`SyncMachine::poll_event`], checked.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let before = self.machine.since().map(str::to_owned);
        let event = self.machine.poll_event();
        if let Some(event) = &event {
            match &event.kind {
                EventKind::Checkpoint(cp)
                    if self.machine.protocol() == ActiveProtocol::SlidingSync =>
                {
                    let position = cp.sliding_position().expect("a sliding sync checkpoint");
                    assert!(
                        position.pos.is_some(),
                        "a sliding sync checkpoint without pos"
                    );
                    self.invariants.reset_since_checkpoint = false;
                }
                EventKind::ConnectionReset(reset) => {
                    let kept = before
                        .as_deref()
                        .and_then(SlidingPosition::from_token)
                        .and_then(|p| p.to_device_since);
                    assert_eq!(
                        reset.to_device_since, kept,
                        "a reset lost the to-device cursor"
                    );
                    assert_eq!(
                        self.machine.sliding_position().and_then(|p| p.pos),
                        None,
                        "a pos after a reset"
                    );
                    self.invariants.reset_since_checkpoint = true;
                }
                _ => {}
            }
            match &event.kind {
                EventKind::Checkpoint(cp) => assert_eq!(
                    self.machine.since(),
                    Some(cp.next_batch.as_str()),
                    "since after a checkpoint is not its token"
                ),
                _ => assert_eq!(
                    self.machine.since(),
                    before.as_deref(),
                    "since moved on a non-checkpoint event {event:?}"
                ),
            }
            self.invariants.event(event);
        }
        event
    }

    /// [`SyncMachine::poll_error`], checked.
    #[must_use]
    pub fn poll_error(&mut self) -> Option<SyncError> {
        let error = self.machine.poll_error();
        if let Some(error) = &error {
            self.invariants.error(error);
        }
        error
    }

    /// [`SyncMachine::poll_state`], checked.
    #[must_use]
    pub fn poll_state(&mut self) -> Option<SyncState> {
        let state = self.machine.poll_state();
        if let Some(state) = state {
            self.invariants.state(state);
        }
        state
    }

    /// What an input must not change by itself (`since`), and what a refused one must not
    /// change at all.
    fn snapshot(&self) -> Snapshot {
        let m = &self.machine;
        Snapshot {
            since: m.since().map(str::to_owned),
            rest: format!(
                "state {:?}, in flight {:?}, wake-up {:?}",
                m.state(),
                m.in_flight(),
                m.poll_timeout()
            ),
        }
    }

    /// Asserts the machine is waiting for something, as it must be once everything is drained
    /// and `poll_request` gave nothing: stopped, with no wake-up; or a wake-up in the future,
    /// at the deadline of the request in flight if there is one.
    pub fn assert_waiting(&self) {
        let m = &self.machine;
        match m.poll_timeout() {
            None => assert!(
                self.invariants.stopped || self.credentials_out,
                "no wake-up instant but not stopped, nor waiting for credentials to be stored"
            ),
            Some(at) => {
                assert!(
                    at > self.now,
                    "wake-up {at:?} is due but no request was given"
                );
                if let Some(deadline) = m.in_flight().map(|f| f.deadline) {
                    assert_eq!(at, deadline, "the wake-up is not the deadline in flight");
                }
            }
        }
    }

    fn after_input(
        &mut self,
        answered: Option<(RequestId, Instant)>,
        now: Instant,
        result: &Result<(), InputError>,
        before: Snapshot,
    ) {
        let after = self.snapshot();
        if result.is_ok() {
            self.now = now;
            assert_eq!(after.since, before.since, "an input moved since by itself");
        } else {
            assert_eq!(after, before, "a refused input changed the machine");
        }
        if let Some((id, at)) = answered {
            self.invariants.answered(id, at);
        }
        self.check_machine();
    }

    fn check_machine(&self) {
        let m = &self.machine;
        assert!(
            m.gap_fill_bytes() <= self.invariants.budget,
            "gap fill holds {} bytes, over the budget of {}",
            m.gap_fill_bytes(),
            self.invariants.budget
        );
        if self.invariants.stopped {
            assert_eq!(m.poll_timeout(), None, "a wake-up after stop");
            assert!(m.in_flight().is_none(), "a request in flight after stop");
            assert_eq!(m.state(), SyncState::Stopped);
        }
    }
}

/// What [`Checked`] compares across an input.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    since: Option<String>,
    rest: String,
}

impl Deref for Checked {
    type Target = SyncMachine;

    fn deref(&self) -> &SyncMachine {
        &self.machine
    }
}

/// The `n`-th request id (from 0) of a fresh machine. Ids are opaque, so a test that needs one
/// the machine under test never handed out takes another machine's, past all of its own.
pub fn foreign_request_id(n: usize) -> RequestId {
    let mut now = Instant::now();
    let config = Config::new("https://foreign.example.org", "token");
    let mut other = SyncMachine::new(config, now).expect("a valid configuration");
    let mut id = None;
    for _ in 0..=n {
        let request = other.poll_request().expect("a request is due");
        id = Some(request.id);
        let failure = TransportFailure::new(matrix_sync_service::TransportErrorKind::Reset, "x");
        other
            .handle_failure(request.id, failure, now)
            .expect("awaited");
        while other.poll_error().is_some() {}
        now = other.poll_timeout().expect("a retry is scheduled");
        other.handle_timeout(now).expect("time moves forward");
    }
    id.expect("at least one request")
}

#[derive(Debug)]
struct SyncRecord {
    sent: Instant,
    timeout: Duration,
    answered: Option<Instant>,
    failed: bool,
    delivered: bool,
}

impl SyncRecord {
    /// The server used the timeout it was given (and did not fail).
    fn held(&self) -> bool {
        !self.failed
            && self
                .answered
                .is_some_and(|at| at.saturating_duration_since(self.sent) >= self.timeout / 2)
    }

    /// Ends a run of the backoff schedule: something reached the consumer, or a long-poll
    /// was held.
    fn resets(&self) -> bool {
        !self.failed && (self.delivered || (self.held() && !self.timeout.is_zero()))
    }

    /// Counted against the schedule: failed, or answered early with nothing delivered.
    /// (A catch-up, with no timeout to hold, is followed at once by design.)
    fn unproductive(&self) -> bool {
        self.answered.is_some() && (self.failed || (!self.delivered && !self.held()))
    }
}

#[derive(Debug)]
struct Invariants {
    budget: u64,
    /// The access token, never to be seen in a URL.
    token: AccessToken,
    /// The most an error may say to wait: the backoff cap, and for rate limits
    /// `max_server_wait` if larger.
    backoff_max: Duration,
    rate_limited_max: Duration,
    /// The last request id handed out.
    last_id: Option<RequestId>,
    /// `ramp[n]`: the least time `n + 1` consecutive counted requests take; `None` without a
    /// bound (jitter 1).
    ramp: Option<Ramp>,
    stopped: bool,
    saw_stopped: bool,
    syncs: Vec<SyncRecord>,
    /// The request awaited, and whether it is a sync.
    awaited: Option<(RequestId, bool)>,
    /// A gap fill failed on authentication: its batch must not be delivered.
    batch_dropped: bool,
    /// When each server discovery request went out.
    discoveries: Vec<Instant>,
    /// A sliding sync connection reset was handed on after the last checkpoint: the next
    /// request carries no `pos`.
    reset_since_checkpoint: bool,
}

impl Invariants {
    fn new(config: &Config) -> Self {
        Self {
            budget: config.max_body_bytes,
            token: config.access_token.clone(),
            backoff_max: config.backoff.max,
            rate_limited_max: config.backoff.max.max(config.max_server_wait),
            last_id: None,
            ramp: Ramp::new(&config.backoff),
            stopped: false,
            saw_stopped: false,
            syncs: Vec::new(),
            awaited: None,
            batch_dropped: false,
            discoveries: Vec::new(),
            reset_since_checkpoint: false,
        }
    }

    fn nothing_after_stop(&self, what: &str) {
        assert!(!self.stopped, "{what} after stop");
        assert!(!self.saw_stopped, "{what} after the Stopped state");
    }

    fn sent(&mut self, request: &OutgoingRequest, now: Instant) {
        self.nothing_after_stop("a request");
        assert!(
            self.last_id.is_none_or(|last| request.id > last),
            "request ids are not handed out in increasing order"
        );
        self.last_id = Some(request.id);
        let sync = matches!(
            request.kind,
            RequestKind::Sync { .. } | RequestKind::SlidingSync { .. }
        );
        self.awaited = Some((request.id, sync));
        if matches!(
            request.kind,
            RequestKind::Discovery | RequestKind::VersionsCheck
        ) {
            self.check_discovery_pacing(now);
        }
        if let RequestKind::Sync { timeout } | RequestKind::SlidingSync { timeout } = request.kind {
            self.batch_dropped = false;
            self.check_pacing(now);
            self.syncs.push(SyncRecord {
                sent: now,
                timeout,
                answered: None,
                failed: false,
                delivered: false,
            });
        }
    }

    fn answered(&mut self, id: RequestId, at: Instant) {
        if let Some((awaited, sync)) = self.awaited {
            if awaited == id {
                self.awaited = None;
                if sync {
                    if let Some(record) = self.syncs.last_mut() {
                        record.answered = Some(at);
                    }
                }
            }
        }
    }

    fn event(&mut self, event: &Event) {
        self.nothing_after_stop("an event");
        assert!(
            !self.batch_dropped,
            "an event of a batch whose gap fill failed on authentication: {event:?}"
        );
        let synthetic = matches!(
            event.kind,
            EventKind::Gap(_)
                | EventKind::Checkpoint(_)
                | EventKind::Leave
                | EventKind::Discovered { .. }
                | EventKind::ListUpdate(_)
                | EventKind::ConnectionReset(_)
        );
        if !synthetic {
            if let Some(record) = self.syncs.last_mut() {
                record.delivered = true;
            }
        }
    }

    fn error(&mut self, error: &SyncError) {
        self.nothing_after_stop("an error");
        assert!(error.attempt >= 1, "an error of attempt 0: {error:?}");
        assert_eq!(error.class, error.failure.class(), "{error:?}");
        let bound = match error.class {
            ErrorClass::RateLimited => self.rate_limited_max,
            _ => self.backoff_max,
        };
        assert!(
            error.delay <= bound,
            "delay {:?} above {bound:?}: {error:?}",
            error.delay
        );
        match &error.request {
            RequestKind::Sync { .. } | RequestKind::SlidingSync { .. } => {
                if let Some(record) = self.syncs.last_mut() {
                    record.failed = true;
                }
            }
            RequestKind::Messages { .. } => {
                let auth = matches!(
                    error.failure,
                    Failure::UnknownToken { .. } | Failure::Refused { status: 401, .. }
                );
                // Retried at once (after a refresh, or with credentials set since), the
                // batch is kept; otherwise it failed like its sync.
                if auth && !error.delay.is_zero() {
                    self.batch_dropped = true;
                    // The batch failed like its sync would have.
                    if let Some(record) = self.syncs.last_mut() {
                        record.failed = true;
                    }
                }
            }
            // A refresh paces itself on its own backoff and delivers nothing by itself;
            // discovery is paced apart (`check_discovery_pacing`).
            RequestKind::Refresh | RequestKind::Discovery | RequestKind::VersionsCheck => {}
            // Protocol::Auto's versions check waits on the sync schedule and delivers
            // nothing; it goes out once per decision.
            RequestKind::ProtocolCheck => {}
            other => panic!("a request kind the invariants do not know: {other:?}"),
        }
    }

    fn state(&mut self, state: SyncState) {
        assert!(!self.saw_stopped, "state {state:?} after the Stopped state");
        self.saw_stopped = state == SyncState::Stopped;
    }

    /// A discovery request goes out at `now`: every window ending here holds no more of them
    /// than one attempt's worth per step of the ramp.
    fn check_discovery_pacing(&mut self, now: Instant) {
        self.discoveries.push(now);
        let Some(ramp) = &self.ramp else { return };
        let per_attempt = usize::from(matrix_sync_service::defaults::MAX_DISCOVERY_REDIRECTS) + 2;
        for (n, sent) in self.discoveries.iter().rev().enumerate() {
            let window = now.saturating_duration_since(*sent);
            if window > WINDOW_HORIZON {
                break;
            }
            let allowed = per_attempt * ramp.steps_within(window);
            assert!(
                n < allowed,
                "{} discovery requests within {window:?}: the schedule allows {allowed}",
                n + 1
            );
        }
    }

    /// A sync goes out at `now`: every window ending here holds no more counted requests
    /// than the schedule allows.
    fn check_pacing(&self, now: Instant) {
        let Some(ramp) = &self.ramp else { return };
        let (mut counted, mut resets) = (0usize, 0usize);
        for record in self.syncs.iter().rev() {
            let window = now.saturating_duration_since(record.sent);
            if window > WINDOW_HORIZON || resets > WINDOW_RESETS {
                break;
            }
            counted += usize::from(record.unproductive());
            resets += usize::from(record.resets());
            let allowed = 2 * (resets + 1) * ramp.steps_within(window);
            assert!(
                counted <= allowed,
                "{counted} sync requests that delivered nothing within {window:?} \
                 ({resets} delivering or held answers): the schedule allows {allowed}"
            );
        }
    }
}

/// The least time consecutive counted requests take under a backoff policy.
#[derive(Debug)]
struct Ramp {
    /// `sums[n]`: the least time from the first to the `(n + 1)`-th request, while delays grow.
    sums: Vec<Duration>,
    /// The least delay once at the cap.
    at_cap: Duration,
}

impl Ramp {
    fn new(policy: &BackoffPolicy) -> Option<Self> {
        let keep = 1.0 - policy.jitter;
        if keep <= 0.0 {
            return None;
        }
        let mut sums = vec![Duration::ZERO];
        let mut n = 1;
        while backoff::base_delay(policy, n) < policy.max && n < 10_000 {
            let last = *sums.last().unwrap_or(&Duration::ZERO);
            sums.push(last + backoff::base_delay(policy, n).mul_f64(keep));
            n += 1;
        }
        let at_cap = policy.max.mul_f64(keep);
        (!at_cap.is_zero()).then_some(Self { sums, at_cap })
    }

    /// How many counted requests fit in `window`.
    fn steps_within(&self, window: Duration) -> usize {
        let ramped = self.sums.partition_point(|sum| *sum <= window);
        if ramped < self.sums.len() {
            return ramped;
        }
        let rest = window.saturating_sub(*self.sums.last().unwrap_or(&Duration::ZERO));
        ramped + (rest.as_nanos() / self.at_cap.as_nanos()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_counts_the_schedule_s_least_delays() {
        let policy = BackoffPolicy::default().with_jitter(0.5);
        let ramp = Ramp::new(&policy).unwrap();
        // Least delays: 250 ms, 500 ms, 1 s, 2 s, ... then 30 s at the cap.
        assert_eq!(ramp.steps_within(Duration::ZERO), 1);
        assert_eq!(ramp.steps_within(Duration::from_millis(249)), 1);
        assert_eq!(ramp.steps_within(Duration::from_millis(250)), 2);
        assert_eq!(ramp.steps_within(Duration::from_millis(750)), 3);
        let ramp_time = *ramp.sums.last().unwrap();
        assert_eq!(ramp.steps_within(ramp_time), ramp.sums.len());
        assert_eq!(
            ramp.steps_within(ramp_time + Duration::from_secs(60)),
            ramp.sums.len() + 2
        );
        let no_bound = BackoffPolicy::default().with_jitter(1.0);
        assert!(Ramp::new(&no_bound).is_none());
    }
}
