//! The one harness of the machine tests: a [`Checked`] `SyncMachine` (so every run also checks
//! the kit's invariants), a simulated clock, and a [`Log`] of everything that happened.
//!
//! * The server is the test ([`Harness`], `Sim<Manual>`: take a request, answer it, move the
//!   clock), or a scripted homeserver ([`Homeserver`]): a closure that sees every request the
//!   machine hands out (kind, `since`, `timeout`, `/messages` `from`/`to`, send instant) and
//!   decides what happens to it: a response after a simulated latency, a transport failure
//!   after a latency, or no answer at all ([`Reply::Stall`], so the machine's deadline fires).
//!   It owns a [`Feed`], a `next_batch` token stream that writes valid sync bodies with new,
//!   uniquely numbered events and remembers every batch it produced.
//! * With a scripted server, the clock only ever jumps to the next instant something happens:
//!   the arrival of the scripted answer, or the machine's
//!   [`poll_timeout`](matrix_sync_service::SyncMachine::poll_timeout), whichever is first (an
//!   answer wins a tie). No wall-clock time passes.
//! * Everything is seeded ([`SplitMix64`]) and deterministic, and everything is recorded in the
//!   [`Log`]: every request (send instant, kind, `since`, `timeout`, deadline, outcome), every
//!   error, every state change and every delivered event, each with its instant.
//!
//! [`Sim::step`] is the canonical run loop of the crate docs: drain events, errors and states,
//! then `poll_request`; send what it returns; wait for the answer or the wake-up instant; feed
//! the input. Besides the kit's invariants, every drain and every request asserts what the
//! harness can see of the protocol (`since` moves only at a checkpoint and a sync starts from
//! the last one handed on, the URL agrees with the request kind, no wake-ups that lead
//! nowhere).
pub use crate::rng::SplitMix64;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::Checked;
use matrix_sync_service::{
    Config, Event, EventKind, InputError, OutgoingRequest, RequestId, RequestKind, SyncError,
    SyncState, TransportErrorKind, TransportFailure,
};

/// The homeserver every simulated machine talks to (nothing is ever sent).
pub const HOMESERVER: &str = "https://hs.example.org";
/// The access token of every simulated machine; it must never appear in a URL.
pub const TOKEN: &str = "sim_access_token_do_not_leak";

/// A default configuration for the simulated homeserver.
pub fn config() -> Config {
    Config::new(HOMESERVER, TOKEN)
}

// ---- what the server sees and answers ---------------------------------------------------------

/// What a request is, as read back from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `GET /_matrix/client/v3/sync`.
    Sync,
    /// `GET /_matrix/client/v3/rooms/{room}/messages`.
    Messages {
        /// The room id, percent-decoded.
        room: String,
    },
    /// A refresh: `POST /_matrix/client/v3/refresh`, or an OAuth token endpoint.
    Refresh,
    /// Any other request kind.
    Other {
        /// The decoded path.
        path: String,
    },
}

/// What became of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still awaited.
    Pending,
    /// Answered with an HTTP response that the machine accepted.
    Answered {
        /// Arrival instant.
        at: Duration,
        /// HTTP status.
        status: u16,
    },
    /// Failed below HTTP (the machine accepted the failure).
    Failed {
        /// Arrival instant.
        at: Duration,
    },
    /// The machine gave up on it (its deadline passed, or it was stopped).
    Abandoned {
        /// When.
        at: Duration,
    },
}

/// One request the machine handed out, as the simulated server saw it.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The machine's id for it.
    pub id: RequestId,
    /// Send instant, from the start of the simulation.
    pub at: Duration,
    /// Sync or messages.
    pub kind: Kind,
    /// `since` query parameter (sync).
    pub since: Option<String>,
    /// `timeout` query parameter (sync), in milliseconds as sent.
    pub timeout: Option<Duration>,
    /// `from` query parameter (messages).
    pub from: Option<String>,
    /// `to` query parameter (messages).
    pub to: Option<String>,
    /// The machine's deadline for it, from the start of the simulation.
    pub deadline: Duration,
    /// The bearer token it carries, if any.
    pub token: Option<String>,
    /// The `next_batch` of the last checkpoint handed on before it was sent (or the configured
    /// `since`).
    pub checkpoint_before: Option<String>,
    /// What became of it.
    pub outcome: Outcome,
}

impl Sent {
    /// True for a sync request with `timeout=0`.
    pub fn is_catch_up(&self) -> bool {
        self.kind == Kind::Sync && self.timeout == Some(Duration::ZERO)
    }
}

/// What the scripted server does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An HTTP response arriving `latency` after the request was sent.
    Response {
        /// Time to arrival.
        latency: Duration,
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: Vec<(&'static str, String)>,
        /// Response body.
        body: Vec<u8>,
    },
    /// A transport failure reported `latency` after the request was sent.
    Failure {
        /// Time to the failure.
        latency: Duration,
        /// What failed.
        kind: TransportErrorKind,
    },
    /// No answer, ever: the machine's deadline decides.
    Stall,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(latency: Duration, body: Vec<u8>) -> Self {
        Reply::Response {
            latency,
            status: 200,
            headers: vec![("content-type", "application/json".to_owned())],
            body,
        }
    }

    /// A Matrix error response: `{"errcode": .., "error": ..}` plus `extra` fields.
    pub fn error(latency: Duration, status: u16, errcode: &str, extra: &str) -> Self {
        let mut body = format!(r#"{{"errcode":"{errcode}","error":"simulated {status}""#);
        if !extra.is_empty() {
            body.push(',');
            body.push_str(extra);
        }
        body.push('}');
        Reply::Response {
            latency,
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.into_bytes(),
        }
    }

    /// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms` in the body and, if given, a `Retry-After`
    /// header in seconds.
    pub fn rate_limited(latency: Duration, retry_after_ms: u64, header_secs: Option<u64>) -> Self {
        let mut reply = Reply::error(
            latency,
            429,
            "M_LIMIT_EXCEEDED",
            &format!(r#""retry_after_ms":{retry_after_ms}"#),
        );
        if let (Reply::Response { headers, .. }, Some(secs)) = (&mut reply, header_secs) {
            headers.push(("retry-after", secs.to_string()));
        }
        reply
    }

    /// Connection refused after `latency`.
    pub fn refused(latency: Duration) -> Self {
        Reply::Failure {
            latency,
            kind: TransportErrorKind::Connect,
        }
    }

    fn latency(&self) -> Option<Duration> {
        match self {
            Reply::Response { latency, .. } | Reply::Failure { latency, .. } => Some(*latency),
            Reply::Stall => None,
        }
    }
}

/// Anything that can play the homeserver.
pub trait Server {
    /// Decides what happens to `request` (`http` is the request exactly as the machine built it).
    fn answer(&mut self, request: &Sent, http: &http::Request<Vec<u8>>) -> Reply;
}

/// A scripted homeserver: `script` decides every request, with a [`Feed`] to write bodies.
pub struct Homeserver<F> {
    /// The token stream and its record of every batch produced.
    pub feed: Feed,
    script: F,
}

impl<F: FnMut(&mut Feed, &Sent) -> Reply> Homeserver<F> {
    /// A homeserver running `script` over `feed`.
    pub fn new(feed: Feed, script: F) -> Self {
        Self { feed, script }
    }
}

impl<F: FnMut(&mut Feed, &Sent) -> Reply> Server for Homeserver<F> {
    fn answer(&mut self, request: &Sent, _http: &http::Request<Vec<u8>>) -> Reply {
        (self.script)(&mut self.feed, request)
    }
}

// ---- the token stream -------------------------------------------------------------------------

/// One batch the feed produced.
#[derive(Clone, Debug)]
pub struct Emitted {
    /// The request it answers.
    pub request: RequestId,
    /// That request's `since`.
    pub since: Option<String>,
    /// Its `next_batch`.
    pub next_batch: String,
    /// Its event ids, in the order the machine must deliver them (rooms in id order, each
    /// room's timeline in server order).
    pub event_ids: Vec<String>,
}

/// A `next_batch` token stream producing valid sync bodies with new messages.
///
/// Tokens are `s1`, `s2`, ... (start a machine from `s0`); events are `$ev1`, `$ev2`, ...,
/// each an `m.room.message` whose body is `message N`, spread over the feed's rooms.
#[derive(Clone, Debug)]
pub struct Feed {
    /// Randomness for scripts and for spreading events over rooms.
    pub rng: SplitMix64,
    /// Joined rooms the events go to.
    pub rooms: Vec<String>,
    /// Every batch produced, in order.
    pub emitted: Vec<Emitted>,
    next_token: u64,
    next_event: u64,
}

impl Feed {
    /// A feed over `rooms`, seeded with `seed`.
    pub fn new(seed: u64, rooms: &[&str]) -> Self {
        assert!(!rooms.is_empty());
        Self {
            rng: SplitMix64::new(seed),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            emitted: Vec::new(),
            next_token: 1,
            next_event: 1,
        }
    }

    /// The token the next new batch will carry.
    pub fn peek_token(&self) -> String {
        format!("s{}", self.next_token)
    }

    /// A body with `events` new messages and a fresh `next_batch`, answering `request`.
    pub fn new_batch(&mut self, request: &Sent, events: usize) -> Vec<u8> {
        let next_batch = self.peek_token();
        self.next_token += 1;
        let mut by_room: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for _ in 0..events {
            let room = self.rng.range(0, self.rooms.len() as u64 - 1) as usize;
            by_room.entry(room).or_default().push(self.next_event);
            self.next_event += 1;
        }
        // Delivery order is room-id order; sort by the room ids themselves.
        let mut rooms: Vec<(&str, Vec<u64>)> = by_room
            .into_iter()
            .map(|(i, ids)| (self.rooms[i].as_str(), ids))
            .collect();
        rooms.sort_by(|a, b| a.0.cmp(b.0));

        let mut body = format!(r#"{{"next_batch":"{next_batch}","rooms":{{"join":{{"#);
        let mut event_ids = Vec::with_capacity(events);
        for (r, (room, ids)) in rooms.iter().enumerate() {
            if r > 0 {
                body.push(',');
            }
            let _ = write!(body, r#""{room}":{{"timeline":{{"events":["#);
            for (i, n) in ids.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                let _ = write!(
                    body,
                    r#"{{"type":"m.room.message","event_id":"$ev{n}","sender":"@alice:example.org","origin_server_ts":{ts},"content":{{"msgtype":"m.text","body":"message {n}"}}}}"#,
                    ts = 1_700_000_000_000u64 + n,
                );
                event_ids.push(format!("$ev{n}"));
            }
            let _ = write!(
                body,
                r#"],"limited":false,"prev_batch":"p{}"}}}}"#,
                self.next_token - 1
            );
        }
        body.push_str("}}}");
        self.emitted.push(Emitted {
            request: request.id,
            since: request.since.clone(),
            next_batch,
            event_ids,
        });
        body.into_bytes()
    }

    /// A body saying nothing happened: `next_batch` equal to the request's `since`.
    pub fn idle(request: &Sent) -> Vec<u8> {
        let since = request
            .since
            .as_deref()
            .expect("an idle answer needs a since");
        format!(r#"{{"next_batch":"{since}"}}"#).into_bytes()
    }
}

// ---- the log ----------------------------------------------------------------------------------

/// One error the machine reported (reads as the [`SyncError`] itself).
#[derive(Clone, Debug)]
pub struct ErrorRecord {
    /// When it was reported (the instant of the input that caused it).
    pub at: Duration,
    /// Index in [`Log::requests`] of the request that failed, when the harness fed its answer.
    pub request: Option<usize>,
    /// The report.
    pub error: SyncError,
}

impl Deref for ErrorRecord {
    type Target = SyncError;

    fn deref(&self) -> &SyncError {
        &self.error
    }
}

/// One delivered item of the event stream (reads as the [`Event`] itself).
#[derive(Clone, Debug)]
pub struct Delivered {
    /// When it was drained.
    pub at: Duration,
    /// The event.
    pub event: Event,
}

impl Deref for Delivered {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

impl Borrow<Event> for Delivered {
    fn borrow(&self) -> &Event {
        &self.event
    }
}

impl Delivered {
    /// The checkpoint token, if this is a checkpoint.
    pub fn checkpoint(&self) -> Option<&str> {
        crate::canned::checkpoint(&self.event)
    }

    /// The `live` flag, for a checkpoint.
    pub fn checkpoint_live(&self) -> Option<bool> {
        match &self.kind {
            EventKind::Checkpoint(c) => Some(c.live),
            _ => None,
        }
    }

    /// The event id as a string.
    pub fn id(&self) -> Option<&str> {
        self.event_id.as_ref().map(|e| e.as_str())
    }
}

/// An answer that arrived after the machine stopped waiting for it.
#[derive(Clone, Debug)]
pub struct LateAnswer {
    /// The request it answered.
    pub id: RequestId,
    /// Arrival.
    pub at: Duration,
    /// What the machine said.
    pub result: Result<(), InputError>,
}

/// Everything that happened.
#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Every request, in send order.
    pub requests: Vec<Sent>,
    /// Every error report.
    pub errors: Vec<ErrorRecord>,
    /// Every state change (the first is the initial state).
    pub states: Vec<(Duration, SyncState)>,
    /// Every delivered event, checkpoints included.
    pub events: Vec<Delivered>,
    /// Answers fed after their request was abandoned, with the machine's verdict.
    pub late_answers: Vec<LateAnswer>,
    /// Every credential handed out to be stored, with when.
    pub credentials: Vec<(Duration, matrix_sync_service::Credentials)>,
}

impl Log {
    /// The states alone.
    pub fn state_sequence(&self) -> Vec<SyncState> {
        self.states.iter().map(|(_, s)| *s).collect()
    }

    /// Delivered items grouped into batches: (event ids, checkpoint token) per checkpoint.
    pub fn batches(&self) -> Vec<(Vec<String>, String)> {
        let mut out = Vec::new();
        let mut current = Vec::new();
        for e in &self.events {
            match e.checkpoint() {
                Some(token) => out.push((std::mem::take(&mut current), token.to_owned())),
                None => current.push(e.id().unwrap_or_default().to_owned()),
            }
        }
        assert!(current.is_empty(), "events after the last checkpoint");
        out
    }
}

/// Asserts that every state change is one the [`SyncState`] docs allow.
pub fn assert_valid_transitions(states: &[(Duration, SyncState)]) {
    use SyncState::*;
    for pair in states.windows(2) {
        let ((_, from), (at, to)) = (pair[0], pair[1]);
        let ok = match from {
            // A refresh refused or credentials not stored can interrupt any state but the
            // last; their waits end like a refusal's, or back where the machine was.
            _ if matches!(to, SessionEnded | CredentialsNotStored) => from != Stopped,
            InitialSync | CatchingUp => matches!(to, Live | BackingOff | Refused | Stopped),
            Live => matches!(to, BackingOff | Refused | Stopped),
            BackingOff => matches!(to, InitialSync | CatchingUp | Stopped),
            Refused => matches!(to, InitialSync | CatchingUp | BackingOff | Stopped),
            SessionEnded | CredentialsNotStored => {
                matches!(
                    to,
                    InitialSync | CatchingUp | Live | BackingOff | Refused | Stopped
                )
            }
            Stopped => false,
            other => panic!("a state the transition table does not know: {other:?}"),
        };
        assert!(ok, "state {from:?} -> {to:?} at {at:?} is not allowed");
    }
}

// ---- the simulation ---------------------------------------------------------------------------

enum Answer {
    Response(http::Response<Vec<u8>>),
    Failure(TransportFailure),
}

struct Flight {
    id: RequestId,
    index: usize,
    arrival: Option<(Duration, Answer)>,
}

/// The server of a [`Harness`]: the test itself, which takes each request with
/// [`Sim::request`] or [`Sim::next_request`] and answers it with [`Sim::respond`].
#[derive(Debug, Default)]
pub struct Manual;

/// Who answers the credentials the machine hands out to be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialAnswers {
    /// The test, through the machine (`poll_credentials` and its answers).
    ByTest,
    /// The harness, at once: stored, except for the next `failures` of them.
    Stored {
        /// How many of the next credentials handed out fail to be stored.
        failures: u32,
    },
}

/// The one harness of the machine tests: a [`Checked`] machine, a simulated clock, and a
/// [`Log`] of everything the machine said and was sent.
///
/// Two ways to play the server, same clock, same drain, same checks:
/// * [`Harness`] (`Sim<Manual>`): the test takes each request ([`request`](Sim::request),
///   [`next_request`](Sim::next_request)), answers it ([`respond`](Sim::respond)) and moves
///   the clock ([`advance`](Sim::advance)); [`take_events`](Sim::take_events) and its siblings
///   hand over what came out since the last take.
/// * `Sim<S: Server>`: a scripted server answers every request after a latency (or never), and
///   [`step`](Sim::step) plays the crate docs' run loop with a clock that jumps to the next
///   answer or wake-up.
///
/// Every drain checks that `since` moves only at a checkpoint, to its token; every request
/// sent is read back from its URL and checked against its kind (and a sync's `since` against
/// the last checkpoint handed on).
pub struct Sim<S> {
    /// The machine under test, its invariants checked at every call.
    pub machine: Checked,
    /// The server.
    pub server: S,
    /// Everything that happened.
    pub log: Log,
    /// The machine's current instant.
    pub now: Instant,
    /// Who answers credentials handed out to be stored.
    pub credentials: CredentialAnswers,
    origin: Instant,
    flight: Option<Flight>,
    late: Vec<Flight>,
    last_checkpoint: Option<String>,
    concluded: Option<usize>,
    idle_wakes: u32,
    taken: Taken,
}

/// How much of each log the test has taken.
#[derive(Default)]
struct Taken {
    events: usize,
    errors: usize,
    states: usize,
}

/// The harness with the test as the server.
pub type Harness = Sim<Manual>;

impl Harness {
    /// A machine built from `config` at a fresh instant, its first outputs drained.
    pub fn new(config: Config) -> Self {
        Sim::with_server(config, Manual, CredentialAnswers::ByTest)
    }

    /// A machine that completed its initial sync (token `s0`) and is live.
    pub fn live(mut c: matrix_sync_service::Config) -> Harness {
        c.since = None;
        let mut h = Harness::new(c);
        let req = h.request();
        h.respond(
            &req,
            crate::canned::json_response(&crate::canned::empty_sync("s0")),
        );
        assert_eq!(h.machine.since(), Some("s0"));
        assert_eq!(h.machine.state(), SyncState::Live);
        h.take_events();
        h.take_states();
        h
    }

    /// A machine restored at `s0` whose first incremental sync (to `s1`) was answered.
    pub fn live_with_since(mut c: matrix_sync_service::Config) -> Harness {
        c.since = Some("s0".to_owned());
        let mut h = Harness::new(c);
        let req = h.request();
        h.respond(
            &req,
            crate::canned::json_response(&crate::canned::empty_sync("s1")),
        );
        h.take_events();
        h
    }

    /// The one error the machine reported; panics unless there is exactly one.
    pub fn one_error(&mut self) -> SyncError {
        let errors = self.take_errors();
        assert_eq!(errors.len(), 1, "expected exactly one error: {errors:?}");
        errors.into_iter().next().unwrap()
    }

    /// Waits for the retry and checks it comes exactly `delay` after `failed_at`.
    pub fn retry_after(
        &mut self,
        failed_at: Instant,
        delay: Duration,
    ) -> matrix_sync_service::OutgoingRequest {
        assert_eq!(
            self.machine.poll_timeout(),
            Some(failed_at + delay),
            "wake-up at the end of the backoff"
        );
        if !delay.is_zero() {
            assert!(
                self.machine.poll_request().is_none(),
                "no request during the backoff"
            );
            // Just before the end: still nothing.
            self.advance(delay - Duration::from_nanos(1));
            assert!(
                self.machine.poll_request().is_none(),
                "no request before the backoff ended"
            );
        }
        let req = self.next_request();
        assert_eq!(
            self.now - failed_at,
            delay,
            "retry sent exactly after the delay"
        );
        req
    }

    /// The request due now (checked and logged); panics when none is.
    pub fn request(&mut self) -> OutgoingRequest {
        let req = self.machine.poll_request().expect("a request is due now");
        self.sent(&req);
        req
    }

    /// Advances the clock to each wake-up instant until a request is due, and returns it.
    pub fn next_request(&mut self) -> OutgoingRequest {
        for _ in 0..16 {
            if let Some(req) = self.machine.poll_request() {
                self.sent(&req);
                return req;
            }
            let at = self
                .machine
                .poll_timeout()
                .expect("a wake-up instant when no request is due");
            assert!(
                at > self.now,
                "poll_timeout {at:?} is due but no request was given"
            );
            self.advance(at - self.now);
        }
        panic!("no request after 16 wake-ups");
    }

    /// Feeds `response` to `req` now and drains the outputs.
    pub fn respond(&mut self, req: &OutgoingRequest, response: http::Response<Vec<u8>>) {
        let status = response.status().as_u16();
        self.machine
            .handle_response(req.id, response, self.now)
            .expect("response accepted");
        self.concluded(
            req.id,
            Outcome::Answered {
                at: self.elapsed(),
                status,
            },
        );
        self.drain();
    }

    /// Feeds a status and body to `req` now and drains the outputs.
    pub fn reply(&mut self, req: &OutgoingRequest, status: u16, body: impl Into<Vec<u8>>) {
        self.respond(req, crate::canned::response(status, body));
    }

    /// Feeds a transport failure to `req` now and drains the outputs.
    pub fn fail(&mut self, req: &OutgoingRequest, failure: TransportFailure) {
        self.machine
            .handle_failure(req.id, failure, self.now)
            .expect("failure accepted");
        self.concluded(req.id, Outcome::Failed { at: self.elapsed() });
        self.drain();
    }

    /// Logs a request the test took: one at a time, checked against its URL.
    fn sent(&mut self, req: &OutgoingRequest) {
        assert!(
            self.machine.poll_request().is_none(),
            "a second request while one is in flight"
        );
        self.check_abandoned();
        let sent = self.read_back(req);
        self.flight = Some(Flight {
            id: req.id,
            index: self.log.requests.len(),
            arrival: None,
        });
        self.log.requests.push(sent);
        self.drain();
    }

    fn concluded(&mut self, id: RequestId, outcome: Outcome) {
        if let Some(flight) = self.flight.take_if(|f| f.id == id) {
            self.log.requests[flight.index].outcome = outcome;
            self.concluded = Some(flight.index);
        }
    }
}

impl<S: Server> Sim<S> {
    /// A simulation of a machine built from `config`, against `server`, from time zero; the
    /// harness stores every credential handed out.
    pub fn scripted(config: Config, server: S) -> Self {
        Sim::with_server(config, server, CredentialAnswers::Stored { failures: 0 })
    }

    /// One turn of the run loop: drain, `poll_request` (and send), then jump to the next
    /// instant and feed that input. Returns false when nothing will ever happen again
    /// (stopped). Stops short, without feeding anything, if the next instant is after `limit`.
    pub fn step_until(&mut self, limit: Duration) -> bool {
        self.drain();
        if let Some(out) = self.machine.poll_request() {
            self.idle_wakes = 0;
            self.send(out);
        }
        let now = self.elapsed();
        let timer = self.machine.poll_timeout().map(|t| self.offset(t));
        let answer = self
            .flight
            .iter()
            .chain(&self.late)
            .filter_map(|f| f.arrival.as_ref().map(|(at, _)| *at))
            .min();
        let (at, is_answer) = match (answer, timer) {
            (Some(a), Some(t)) if a <= t => (a, true),
            (_, Some(t)) => (t, false),
            (Some(a), None) => (a, true),
            (None, None) => return false,
        };
        let at = at.max(now);
        if at > limit {
            self.now = self.instant(now.max(limit));
            return false;
        }
        if at == now && !is_answer {
            self.idle_wakes += 1;
            assert!(
                self.idle_wakes < 3,
                "the machine keeps asking to be woken at {at:?} without sending anything"
            );
        } else if at > now {
            self.idle_wakes = 0;
        }
        self.now = self.instant(at);
        if is_answer {
            self.feed_answer(at);
        } else {
            self.machine
                .handle_timeout(self.now)
                .expect("time only moves forward");
            self.check_abandoned();
        }
        true
    }

    /// [`step_until`](Self::step_until) without a limit.
    pub fn step(&mut self) -> bool {
        self.step_until(Duration::MAX)
    }

    /// Steps until simulated time reaches `end` (or nothing more can happen).
    pub fn run_until(&mut self, end: Duration) {
        while self.elapsed() < end && self.step_until(end) {}
        self.drain();
    }

    /// Steps while `condition` holds (checked before each step); panics after `max_steps`.
    pub fn run_while(&mut self, max_steps: usize, mut condition: impl FnMut(&Self) -> bool) {
        for _ in 0..max_steps {
            self.drain();
            if !condition(self) || !self.step() {
                self.drain();
                return;
            }
        }
        panic!("still running after {max_steps} steps");
    }

    fn send(&mut self, out: OutgoingRequest) {
        let sent = self.read_back(&out);
        let reply = self.server.answer(&sent, &out.http);
        let arrival = reply.latency().map(|latency| {
            let answer = match reply {
                Reply::Response {
                    status,
                    headers,
                    body,
                    ..
                } => {
                    let mut builder = http::Response::builder().status(status);
                    for (name, value) in headers {
                        builder = builder.header(name, value);
                    }
                    Answer::Response(builder.body(body).expect("valid scripted response"))
                }
                Reply::Failure { kind, .. } => {
                    Answer::Failure(TransportFailure::new(kind, "simulated"))
                }
                Reply::Stall => unreachable!(),
            };
            (sent.at + latency, answer)
        });
        self.flight = Some(Flight {
            id: out.id,
            index: self.log.requests.len(),
            arrival,
        });
        self.log.requests.push(sent);
    }

    fn feed_answer(&mut self, at: Duration) {
        let instant = self.instant(at);
        let in_flight_due = self
            .flight
            .as_ref()
            .and_then(|f| f.arrival.as_ref())
            .is_some_and(|(t, _)| *t == at);
        if in_flight_due {
            let flight = self.flight.take().expect("checked");
            let (_, answer) = flight.arrival.expect("checked");
            let (result, outcome) = match answer {
                Answer::Response(r) => {
                    let status = r.status().as_u16();
                    (
                        self.machine.handle_response(flight.id, r, instant),
                        Outcome::Answered { at, status },
                    )
                }
                Answer::Failure(f) => (
                    self.machine.handle_failure(flight.id, f, instant),
                    Outcome::Failed { at },
                ),
            };
            if let Err(e) = result {
                panic!("the answer to {} was refused: {e}", flight.id);
            }
            self.log.requests[flight.index].outcome = outcome;
            self.concluded = Some(flight.index);
            return;
        }
        let i = self
            .late
            .iter()
            .position(|f| f.arrival.as_ref().is_some_and(|(t, _)| *t == at))
            .expect("a late answer is due");
        let flight = self.late.remove(i);
        let (_, answer) = flight.arrival.expect("checked");
        let result = match answer {
            Answer::Response(r) => self.machine.handle_response(flight.id, r, instant),
            Answer::Failure(f) => self.machine.handle_failure(flight.id, f, instant),
        };
        self.log.late_answers.push(LateAnswer {
            id: flight.id,
            at,
            result,
        });
    }
}

impl<S> Sim<S> {
    fn with_server(config: Config, server: S, credentials: CredentialAnswers) -> Self {
        let origin = Instant::now();
        let last_checkpoint = config.since.clone();
        let machine = Checked::new(config, origin).expect("valid config");
        let mut sim = Self {
            machine,
            server,
            log: Log::default(),
            now: origin,
            credentials,
            origin,
            flight: None,
            late: Vec::new(),
            last_checkpoint,
            concluded: None,
            idle_wakes: 0,
            taken: Taken::default(),
        };
        sim.drain();
        sim
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.offset(self.now)
    }

    /// The `Instant` the machine sees for a simulated time.
    pub fn instant(&self, at: Duration) -> Instant {
        self.origin + at
    }

    /// Simulated time of a machine `Instant`.
    pub fn offset(&self, at: Instant) -> Duration {
        at.duration_since(self.origin)
    }

    /// Moves the clock forward by `d`, tells the machine, and drains.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.machine
            .handle_timeout(self.now)
            .expect("time only moves forward");
        self.check_abandoned();
        self.drain();
    }

    /// Drains events, errors and states into the log (step 2 of the run loop, before
    /// `poll_request`), checking that `since` moves only at a checkpoint, to its token; then
    /// answers credentials handed out, unless the test answers them.
    pub fn drain(&mut self) {
        let at = self.elapsed();
        loop {
            let before = self.machine.since().map(str::to_owned);
            let Some(event) = self.machine.poll_event() else {
                break;
            };
            if let EventKind::Checkpoint(c) = &event.kind {
                assert_eq!(
                    self.machine.since(),
                    Some(c.next_batch.as_str()),
                    "since must advance to a checkpoint once it is handed on"
                );
                self.last_checkpoint = Some(c.next_batch.clone());
            } else {
                assert_eq!(
                    self.machine.since(),
                    before.as_deref(),
                    "since moved on a non-checkpoint event {event:?}"
                );
            }
            self.log.events.push(Delivered { at, event });
        }
        while let Some(error) = self.machine.poll_error() {
            let request = self.concluded.take();
            self.log.errors.push(ErrorRecord { at, request, error });
        }
        while let Some(state) = self.machine.poll_state() {
            self.log.states.push((at, state));
        }
        let CredentialAnswers::Stored { failures } = &mut self.credentials else {
            return;
        };
        if let Some(credentials) = self.machine.poll_credentials() {
            let result = if *failures > 0 {
                *failures -= 1;
                self.machine
                    .handle_credentials_not_stored("simulated store failure", self.now)
            } else {
                self.machine.handle_credentials_stored(self.now)
            };
            result.expect("credentials handed out are awaited");
            self.log.credentials.push((at, credentials));
            // Answering may report an error or change the state.
            self.drain();
        }
    }

    /// Reads a request back from its URL, checks it against its kind, and records it as sent
    /// now.
    fn read_back(&self, out: &OutgoingRequest) -> Sent {
        // One request at a time and no token in the URL: the kit's Checked asserts those.
        let uri = out.http.uri().clone();
        let path = crate::query::uri_path(&uri);
        let kind = match &out.kind {
            RequestKind::Sync { .. } => Kind::Sync,
            RequestKind::Refresh => Kind::Refresh,
            RequestKind::Messages { room_id } => Kind::Messages {
                room: room_id.to_string(),
            },
            _ => Kind::Other { path: path.clone() },
        };
        let expected_path = match &kind {
            Kind::Sync => path.ends_with("/v3/sync"),
            Kind::Refresh => out.http.method() == http::Method::POST,
            Kind::Messages { room } => path.ends_with(&format!("/v3/rooms/{room}/messages")),
            Kind::Other { .. } => true,
        };
        assert!(
            expected_path,
            "URL path {path} for a {:?} request",
            out.kind
        );
        let timeout = query(&uri, "timeout").map(|ms| {
            Duration::from_millis(ms.parse().expect("timeout is a number of milliseconds"))
        });
        if let (
            Some(t),
            RequestKind::Sync { timeout: declared }
            | RequestKind::SlidingSync { timeout: declared },
        ) = (timeout, &out.kind)
        {
            assert_eq!(t, *declared, "timeout in the URL and in the kind differ");
        }
        let since = query(&uri, "since");
        if kind == Kind::Sync {
            assert_eq!(
                since, self.last_checkpoint,
                "a sync must start from the last checkpoint handed on"
            );
        }
        Sent {
            id: out.id,
            at: self.elapsed(),
            kind,
            since,
            timeout,
            from: query(&uri, "from"),
            to: query(&uri, "to"),
            deadline: self.offset(out.deadline),
            token: out
                .http
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned),
            checkpoint_before: self.last_checkpoint.clone(),
            outcome: Outcome::Pending,
        }
    }

    /// After an input that may have made the machine give up on the request in flight.
    fn check_abandoned(&mut self) {
        let awaited = self.machine.in_flight().map(|f| f.id);
        if let Some(flight) = self.flight.take() {
            if awaited == Some(flight.id) {
                self.flight = Some(flight);
                return;
            }
            let at = self.elapsed();
            let outcome = &mut self.log.requests[flight.index].outcome;
            if *outcome == Outcome::Pending {
                *outcome = Outcome::Abandoned { at };
            }
            self.concluded = Some(flight.index);
            if flight.arrival.is_some() {
                self.late.push(flight);
            }
        }
    }

    /// Stops the machine; an answer still on its way will be fed (and refused) when it arrives.
    pub fn stop(&mut self) {
        self.machine.stop();
        self.check_abandoned();
        self.drain();
    }

    /// The `next_batch` of the last checkpoint handed on (or the configured `since`).
    pub fn last_checkpoint(&self) -> Option<&str> {
        self.last_checkpoint.as_deref()
    }

    /// The events delivered since the last [`take_events`](Self::take_events).
    pub fn events(&self) -> &[Delivered] {
        &self.log.events[self.taken.events..]
    }

    /// The errors reported since the last [`take_errors`](Self::take_errors).
    pub fn errors(&self) -> &[ErrorRecord] {
        &self.log.errors[self.taken.errors..]
    }

    /// The events delivered since the last take, marked taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        let events = self.events().iter().map(|d| d.event.clone()).collect();
        self.taken.events = self.log.events.len();
        events
    }

    /// The errors reported since the last take, marked taken.
    pub fn take_errors(&mut self) -> Vec<SyncError> {
        let errors = self.errors().iter().map(|r| r.error.clone()).collect();
        self.taken.errors = self.log.errors.len();
        errors
    }

    /// The states entered since the last take, marked taken.
    pub fn take_states(&mut self) -> Vec<SyncState> {
        let states = self.log.states[self.taken.states..]
            .iter()
            .map(|(_, s)| *s)
            .collect();
        self.taken.states = self.log.states.len();
        states
    }
}

// ---- small utilities --------------------------------------------------------------------------

/// The percent-decoded value of query parameter `key`.
pub fn query(uri: &http::Uri, key: &str) -> Option<String> {
    crate::query::uri_param(uri, key)
}

/// `ms` milliseconds.
pub const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `s` seconds.
pub const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
