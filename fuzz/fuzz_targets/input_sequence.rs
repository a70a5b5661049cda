//! Arbitrary sequences of inputs against the machine's invariants.
//!
//! The input is decoded with `arbitrary` into a configuration and a list of [`Step`]s:
//! answering the request in flight (or any id) with a status from a small set and a body from
//! a few templates, a fixture or raw bytes; a transport failure; time advancing; time going
//! backwards; a stop. After every step the outputs are drained the way the crate docs say.
//! The configuration speaks `/v3/sync` or simplified sliding sync (knob `sliding`); a sync
//! template is written in the protocol spoken (for sliding sync: `pos`, rooms with `initial`,
//! `limited` and `prev_batch`, the to-device extension), and the error codes include
//! `M_UNKNOWN_POS`, which resets a sliding sync connection.
//!
//! Invariants checked: those of the test kit's `Checked` wrapper, which every harness of the
//! crate shares (nothing after a stop, pacing within the backoff schedule, no delivery of a
//! batch whose gap fill failed on authentication, the gap-fill memory budget), and here:
//! * no panic;
//! * at most one request in flight: `poll_request` hands out nothing while one is outstanding,
//!   and nothing while events wait to be drained;
//! * `since` changes only when a checkpoint is polled, and then equals its `next_batch`;
//! * every error delay is at most `backoff.max` (`max(backoff.max, max_server_wait)` when
//!   rate limited);
//! * a refused input (stale or unknown id, time going backwards) changes nothing;
//! * a deadline that passes reports `DeadlineExceeded` and frees the slot;
//! * after `stop`, every input is refused with `InputError::Stopped` and nothing is due;
//! * the same input gives the same outputs (the run is done twice and compared).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use matrix_sync_service::{
    BackoffPolicy, Config, Failure, GapFill, InputError, OutgoingRequest, Protocol, RequestId,
    RequestKind, SlidingPosition, SyncMachine, SyncState, TransportErrorKind, TransportFailure,
};
use matrix_sync_testkit::{foreign_request_id, Checked};
use serde_json::{json, Value};

const MAX_STEPS: usize = 48;

/// With `FUZZ_TRACE` set in the environment, every step and output is printed to stderr
/// (for reading what a reproducer does: `FUZZ_TRACE=1 cargo +nightly fuzz run input_sequence
/// <file>`; `cargo +nightly fuzz fmt input_sequence <file>` prints the decoded input).
fn tracing() -> bool {
    static TRACING: OnceLock<bool> = OnceLock::new();
    *TRACING.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// Appends a line to the run's trace (compared between the two runs of an input).
macro_rules! note {
    ($h:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        if tracing() {
            eprintln!("{line}");
        }
        $h.trace.push_str(&line);
        $h.trace.push('\n');
    }};
}

const INITIAL: &str = include_str!("../../tests/fixtures/synapse-initial.json");
const INCREMENTAL: &str = include_str!("../../tests/fixtures/synapse-incremental.json");
const LEAVE: &str = include_str!("../../tests/fixtures/synapse-leave.json");
const GAP_SYNC: &str = include_str!("../../tests/fixtures/synapse-gap-sync.json");
const GAP_MESSAGES: &str = include_str!("../../tests/fixtures/synapse-gap-messages.json");
const E400: &str = include_str!("../../tests/fixtures/synapse-400-invalid-since.json");
const E401: &str = include_str!("../../tests/fixtures/synapse-401-unknown-token.json");
const E429: &str = include_str!("../../tests/fixtures/synapse-429-limit-exceeded.json");

#[derive(Arbitrary, Debug)]
struct Scenario {
    knobs: Knobs,
    steps: Vec<Step>,
}

/// Configuration knobs, clamped into valid ranges.
#[derive(Arbitrary, Debug)]
struct Knobs {
    resume: Option<Tok>,
    backoff_initial_ms: u16,
    backoff_span_ms: u32,
    factor_32ths: u8,
    jitter_255ths: u8,
    max_server_wait_s: u16,
    gap_fill: bool,
    gap_max: u8,
    page_size: u8,
    seed: u64,
    long_poll_s: u8,
    margin_ms: u16,
    initial_deadline_s: u16,
    /// Simplified sliding sync instead of `/v3/sync`.
    sliding: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Tok(u8);

impl Tok {
    fn text(self) -> String {
        format!("t{}", self.0 % 6)
    }

    /// A sliding sync `pos` in Synapse's form (`<connection>/<stream token>`).
    fn pos(self) -> String {
        format!("{}/s{}", self.0 % 3, self.0 % 6)
    }

    /// A sliding sync checkpoint: the `pos` and a to-device cursor.
    fn position(self) -> String {
        let position = SlidingPosition {
            pos: Some(self.pos()),
            to_device_since: Some(format!("{}", self.0 % 4)),
        };
        position.to_token()
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    Respond {
        to: Target,
        status: Status,
        retry_after: Option<u8>,
        body: Body,
        after_ms: u16,
    },
    Fail {
        to: Target,
        kind: Transport,
        after_ms: u16,
    },
    Advance {
        ms: u32,
    },
    /// `handle_timeout` at `poll_timeout()`.
    Wake,
    Backwards {
        ms: u16,
        respond: bool,
    },
    Stop,
}

#[derive(Arbitrary, Debug)]
enum Target {
    InFlight,
    Id(u8),
}

#[derive(Arbitrary, Debug)]
enum Status {
    Ok,
    Created,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooManyRequests,
    Internal,
    BadGateway,
    Unavailable,
    GatewayTimeout,
    Found,
    Other(u16),
}

impl Status {
    fn code(&self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::Created => 201,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::TooManyRequests => 429,
            Status::Internal => 500,
            Status::BadGateway => 502,
            Status::Unavailable => 503,
            Status::GatewayTimeout => 504,
            Status::Found => 302,
            Status::Other(v) => 100 + v % 900,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Transport {
    Connect,
    Reset,
    Dns,
    Tls,
    TimedOut,
    Truncated,
    BodyTooLarge,
    Other,
}

impl Transport {
    fn kind(&self) -> TransportErrorKind {
        match self {
            Transport::Connect => TransportErrorKind::Connect,
            Transport::Reset => TransportErrorKind::Reset,
            Transport::Dns => TransportErrorKind::Dns,
            Transport::Tls => TransportErrorKind::Tls,
            Transport::TimedOut => TransportErrorKind::TimedOut,
            Transport::Truncated => TransportErrorKind::Truncated,
            Transport::BodyTooLarge => TransportErrorKind::BodyTooLarge,
            Transport::Other => TransportErrorKind::Other,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Body {
    Sync(SyncBody),
    Page(PageBody),
    MatrixError(ErrorBody),
    Fixture(Fixture),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct SyncBody {
    /// `None`: the current `since` (an idle answer).
    next: Option<Tok>,
    rooms: Vec<RoomBody>,
    to_device: Vec<Ev>,
}

#[derive(Arbitrary, Debug)]
struct RoomBody {
    room: u8,
    leave: bool,
    limited: bool,
    prev_batch: Option<Tok>,
    events: Vec<Ev>,
}

#[derive(Arbitrary, Debug)]
struct Ev {
    id: u8,
    kind: u8,
}

#[derive(Arbitrary, Debug)]
struct PageBody {
    events: Vec<Ev>,
    end: Option<Tok>,
}

#[derive(Arbitrary, Debug)]
struct ErrorBody {
    errcode: u8,
    retry_after_ms: Option<u32>,
    soft_logout: bool,
}

#[derive(Arbitrary, Debug)]
enum Fixture {
    Initial,
    Incremental,
    Leave,
    GapSync,
    GapPage(u8),
    E400,
    E401,
    E429,
}

fn event(ev: &Ev) -> Value {
    let id = format!("$e{}:example.org", ev.id % 16);
    let mut e = match ev.kind % 5 {
        0 => {
            json!({"type": "m.room.message", "content": {"msgtype": "m.text", "body": format!("m{}", ev.id)}})
        }
        1 => {
            json!({"type": "m.room.encrypted", "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x", "body": "leak"}})
        }
        2 => {
            json!({"type": "m.room.member", "state_key": "@u:example.org", "content": {"membership": "join"}})
        }
        3 => {
            json!({"type": "m.reaction", "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e0:example.org", "key": "+"}}})
        }
        _ => json!({"type": "m.room.redaction", "redacts": "$e1:example.org", "content": {}}),
    };
    e["event_id"] = json!(id);
    e["sender"] = json!("@u:example.org");
    e["origin_server_ts"] = json!(ev.id);
    e
}

/// The fixture bodies, read once.
fn fixture(f: &Fixture) -> Vec<u8> {
    static BODIES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let bodies = BODIES.get_or_init(|| {
        let gap: Value = serde_json::from_str(GAP_SYNC).expect("fixture");
        let messages: Value = serde_json::from_str(GAP_MESSAGES).expect("fixture");
        let mut bodies: Vec<Vec<u8>> = [INITIAL, INCREMENTAL, LEAVE, E400, E401, E429]
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect();
        bodies.push(serde_json::to_vec(&gap["response"]).expect("json"));
        for page in messages["pages"].as_array().expect("pages") {
            bodies.push(serde_json::to_vec(&page["response"]).expect("json"));
        }
        bodies
    });
    let pages = bodies.len() - 7;
    let i = match f {
        Fixture::Initial => 0,
        Fixture::Incremental => 1,
        Fixture::Leave => 2,
        Fixture::E400 => 3,
        Fixture::E401 => 4,
        Fixture::E429 => 5,
        Fixture::GapSync => 6,
        Fixture::GapPage(n) => 7 + *n as usize % pages,
    };
    bodies[i].clone()
}

/// A sliding sync answer: `s.next` gives the `pos` (`None`: the current one) and the to-device
/// cursor; a room's `leave` flag is sent as `initial`.
fn sliding_body(s: &SyncBody, since: Option<&str>) -> Value {
    let current = since.and_then(SlidingPosition::from_token).unwrap_or_default();
    let (pos, cursor) = match s.next {
        Some(t) => (t.pos(), format!("{}", t.0 % 4)),
        None => (
            current.pos.unwrap_or_else(|| "0/s0".to_owned()),
            current.to_device_since.unwrap_or_else(|| "0".to_owned()),
        ),
    };
    let mut rooms = serde_json::Map::new();
    for r in &s.rooms {
        let mut room = json!({
            "timeline": r.events.iter().map(event).collect::<Vec<_>>(),
            "limited": r.limited,
            "initial": r.leave,
        });
        if let Some(p) = r.prev_batch {
            room["prev_batch"] = json!(format!("p{}", p.text()));
        }
        rooms.insert(format!("!r{}:example.org", r.room % 3), room);
    }
    json!({
        "pos": pos,
        "lists": {"all": {"count": 3, "ops": []}},
        "rooms": rooms,
        "extensions": {"to_device": {
            "next_batch": cursor,
            "events": s.to_device.iter().map(event).collect::<Vec<_>>(),
        }},
    })
}

fn body(b: &Body, since: Option<&str>, sliding: bool) -> Vec<u8> {
    let value = match b {
        Body::Raw(bytes) => return bytes.clone(),
        Body::Fixture(f) => return fixture(f),
        Body::Sync(s) if sliding => sliding_body(s, since),
        Body::Sync(s) => {
            let next = match s.next {
                Some(t) => t.text(),
                None => since.unwrap_or("t0").to_owned(),
            };
            let mut join = serde_json::Map::new();
            let mut leave = serde_json::Map::new();
            for r in &s.rooms {
                let mut timeline = json!({
                    "events": r.events.iter().map(event).collect::<Vec<_>>(),
                    "limited": r.limited,
                });
                if let Some(p) = r.prev_batch {
                    timeline["prev_batch"] = json!(format!("p{}", p.text()));
                }
                let id = format!("!r{}:example.org", r.room % 3);
                let map = if r.leave { &mut leave } else { &mut join };
                map.insert(id, json!({ "timeline": timeline }));
            }
            json!({
                "next_batch": next,
                "rooms": {"join": join, "leave": leave},
                "to_device": {"events": s.to_device.iter().map(event).collect::<Vec<_>>()},
            })
        }
        Body::Page(p) => {
            let mut v = json!({
                "chunk": p.events.iter().map(event).collect::<Vec<_>>(),
                "start": "s",
            });
            if let Some(end) = p.end {
                v["end"] = json!(format!("p{}", end.text()));
            }
            v
        }
        Body::MatrixError(e) => {
            let codes = [
                "M_LIMIT_EXCEEDED",
                "M_UNKNOWN_TOKEN",
                "M_FORBIDDEN",
                "M_UNKNOWN",
                "M_INVALID_PARAM",
                "M_UNKNOWN_POS",
            ];
            let mut v = json!({
                "errcode": codes[e.errcode as usize % codes.len()],
                "error": "fuzz",
                "soft_logout": e.soft_logout,
            });
            if let Some(ms) = e.retry_after_ms {
                v["retry_after_ms"] = json!(ms);
            }
            v
        }
    };
    serde_json::to_vec(&value).expect("json")
}

fn config(k: &Knobs) -> Config {
    let mut c = Config::new("https://example.org", "fuzz_secret_token");
    if k.sliding {
        c.protocol = Protocol::SlidingSync;
        c.since = k.resume.map(Tok::position);
    } else {
        c.since = k.resume.map(Tok::text);
    }
    let initial = Duration::from_millis(u64::from(k.backoff_initial_ms.max(1)));
    let span = Duration::from_millis(u64::from(k.backoff_span_ms) % 3_600_000);
    c.backoff = BackoffPolicy::default()
        .with_initial(initial)
        .with_factor(1.0 + f64::from(k.factor_32ths) / 32.0)
        .with_max(initial + span)
        .with_jitter(f64::from(k.jitter_255ths) / 255.0);
    c.jitter_seed = k.seed;
    c.max_server_wait = Duration::from_secs(u64::from(k.max_server_wait_s) % 7200);
    c.gap_fill = GapFill::default()
        .with_enabled(k.gap_fill)
        .with_max_events_per_room(usize::from(k.gap_max % 40))
        .with_page_size(u32::from(k.page_size % 20).max(1));
    c.long_poll_timeout = Duration::from_secs(u64::from(k.long_poll_s % 60).max(1));
    c.deadline_margin = Duration::from_millis(u64::from(k.margin_ms.max(1)));
    c.initial_sync_deadline = Duration::from_secs(u64::from(k.initial_deadline_s.max(1)));
    c
}

#[derive(Clone, Copy)]
struct Outstanding {
    id: RequestId,
    deadline: Instant,
}

/// What must not change when an input is refused.
#[derive(PartialEq, Debug)]
struct Snapshot {
    since: Option<String>,
    in_flight: Option<(RequestId, RequestKind, Instant)>,
    timeout: Option<Instant>,
    state: SyncState,
}

fn snapshot(m: &SyncMachine) -> Snapshot {
    Snapshot {
        since: m.since().map(str::to_owned),
        in_flight: m.in_flight().map(|f| (f.id, f.kind.clone(), f.deadline)),
        timeout: m.poll_timeout(),
        state: m.state(),
    }
}

struct Harness {
    m: Checked,
    base: Instant,
    now: Instant,
    outstanding: Option<Outstanding>,
    /// One past the highest id handed out.
    /// Every id handed out, in order (ids are opaque: only recorded).
    issued: Vec<RequestId>,
    stopped: bool,
    /// The protocol spoken is sliding sync.
    sliding: bool,
    invalid_requests: bool,
    trace: String,
}

impl Harness {
    fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    /// One at a time, ids going up, the deadline ahead, nothing after stop: Checked.
    fn on_request(&mut self, req: OutgoingRequest) {
        let in_flight = self.m.in_flight().map(|f| (f.id, f.deadline));
        assert_eq!(in_flight, Some((req.id, req.deadline)));
        self.issued.push(req.id);
        self.outstanding = Some(Outstanding {
            id: req.id,
            deadline: req.deadline,
        });
        note!(
            self,
            "req {} {:?} {} {:?}",
            req.id,
            req.kind,
            req.http.uri(),
            self.at(req.deadline)
        );
    }

    /// Drains every output as the crate docs say, checking the invariants on the way.
    fn drain(&mut self, expect_deadline_error: bool) {
        // A request handed out means no event was waiting.
        if let Some(req) = self.m.poll_request() {
            self.on_request(req);
            assert!(
                self.m.poll_event().is_none(),
                "request handed out before events drained"
            );
        }
        // `since` moves only at a checkpoint: Checked.
        while let Some(e) = self.m.poll_event() {
            note!(
                self,
                "event {:?} {:?} {:?} {:?}",
                e.kind,
                e.room_id,
                e.event_id,
                e.body
            );
        }
        let mut deadline_error = false;
        // Delays within the caps, attempts from 1: Checked.
        while let Some(err) = self.m.poll_error() {
            match err.failure {
                Failure::DeadlineExceeded(_) => deadline_error = true,
                Failure::InvalidRequest(_) => self.invalid_requests = true,
                _ => {}
            }
            note!(self, "error {err}");
        }
        assert_eq!(deadline_error, expect_deadline_error, "deadline error");
        while let Some(state) = self.m.poll_state() {
            note!(self, "state {state:?}");
        }
        for _ in 0..2 {
            if let Some(req) = self.m.poll_request() {
                self.on_request(req);
            }
        }
        // Nothing in flight or due after stop, a future wake-up otherwise: Checked.
        self.m.assert_waiting();
        if !self.stopped {
            let in_flight = self.m.in_flight().map(|f| f.id);
            assert_eq!(in_flight, self.outstanding.map(|o| o.id));
        }
    }

    fn target(&self, to: &Target) -> RequestId {
        match to {
            Target::InFlight => self.outstanding.map_or_else(|| self.foreign(), |o| o.id),
            // One of ours, or another machine's past all of ours.
            Target::Id(n) => {
                let pick = usize::from(*n) % (self.issued.len() + 2);
                self.issued
                    .get(pick)
                    .copied()
                    .unwrap_or_else(|| self.foreign())
            }
        }
    }

    /// An id this machine never handed out (ids are opaque: another machine's).
    fn foreign(&self) -> RequestId {
        foreign_request_id(self.issued.len() + 1)
    }

    /// Checks the result of an input for request `id` at `at`; returns whether it was applied.
    fn check_result(
        &mut self,
        id: RequestId,
        result: Result<(), InputError>,
        before: Snapshot,
    ) -> bool {
        note!(self, "input {id} -> {result:?}");
        if self.stopped {
            assert_eq!(result, Err(InputError::Stopped));
        } else if self.outstanding.is_some_and(|o| o.id == id) {
            assert_eq!(result, Ok(()), "the awaited request was refused");
        } else {
            match result {
                Err(InputError::StaleRequest(got)) => assert_eq!(got, id),
                other => panic!("an input for {id} that is not awaited gave {other:?}"),
            }
        }
        if result.is_err() {
            assert_eq!(
                snapshot(&self.m),
                before,
                "a refused input changed the machine"
            );
            return false;
        }
        self.outstanding = None;
        true
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Respond {
                to,
                status,
                retry_after,
                body: b,
                after_ms,
            } => {
                let id = self.target(to);
                let at = self.now + Duration::from_millis(u64::from(*after_ms));
                let mut response = http::Response::builder().status(status.code());
                if let Some(secs) = retry_after {
                    response = response.header(http::header::RETRY_AFTER, secs.to_string());
                }
                let response = response
                    .body(body(b, self.m.since(), self.sliding))
                    .expect("valid response");
                let before = snapshot(&self.m);
                let result = self.m.handle_response(id, response, at);
                if self.check_result(id, result, before) {
                    self.now = at;
                }
                self.drain(false);
            }
            Step::Fail { to, kind, after_ms } => {
                let id = self.target(to);
                let at = self.now + Duration::from_millis(u64::from(*after_ms));
                let failure = TransportFailure::new(kind.kind(), "fuzz");
                let before = snapshot(&self.m);
                let result = self.m.handle_failure(id, failure, at);
                let applied = self.check_result(id, result, before);
                if applied {
                    self.now = at;
                }
                // A transport timeout is reported as the deadline, whoever noticed it.
                self.drain(applied && kind.kind() == TransportErrorKind::TimedOut);
            }
            Step::Advance { ms } => {
                let at = self.now + Duration::from_millis(u64::from(*ms));
                self.timeout(at);
            }
            Step::Wake => {
                let at = self.m.poll_timeout().unwrap_or(self.now).max(self.now);
                self.timeout(at);
            }
            Step::Backwards { ms, respond } => {
                let Some(at) = self
                    .now
                    .checked_sub(Duration::from_millis(u64::from(*ms).max(1)))
                else {
                    return;
                };
                let before = snapshot(&self.m);
                let result = if *respond {
                    let id = self.target(&Target::InFlight);
                    let response = http::Response::builder().status(200).body(b"{}").unwrap();
                    self.m.handle_response(id, response, at)
                } else {
                    self.m.handle_timeout(at)
                };
                note!(self, "backwards -> {}", result.is_ok());
                if self.stopped {
                    assert_eq!(result, Err(InputError::Stopped));
                } else {
                    assert!(
                        matches!(result, Err(InputError::TimeWentBackwards { last, now })
                            if last == self.now && now == at),
                        "time going backwards gave {result:?}"
                    );
                }
                assert_eq!(
                    snapshot(&self.m),
                    before,
                    "a refused input changed the machine"
                );
                self.drain(false);
            }
            Step::Stop => {
                self.m.stop();
                self.stopped = true;
                self.outstanding = None;
                note!(self, "stop");
                self.drain(false);
            }
        }
    }

    fn timeout(&mut self, at: Instant) {
        let result = self.m.handle_timeout(at);
        note!(self, "timeout {:?} -> {result:?}", self.at(at));
        if self.stopped {
            assert_eq!(result, Err(InputError::Stopped));
            self.drain(false);
            return;
        }
        assert_eq!(result, Ok(()), "time moving forward was refused");
        self.now = at;
        let expired = self.outstanding.is_some_and(|o| at >= o.deadline);
        if expired {
            self.outstanding = None;
        }
        self.drain(expired);
    }
}

fn run(s: &Scenario) -> String {
    let base = Instant::now();
    let config = config(&s.knobs);
    let m = Checked::new(config, base).expect("clamped config is valid");
    let mut h = Harness {
        m,
        base,
        now: base,
        outstanding: None,
        issued: Vec::new(),
        stopped: false,
        sliding: s.knobs.sliding,
        invalid_requests: false,
        trace: String::new(),
    };
    h.drain(false);
    assert!(h.outstanding.is_some(), "the first request is due at once");
    for step in s.steps.iter().take(MAX_STEPS) {
        if tracing() {
            eprintln!("-- {step:?}");
        }
        h.step(step);
    }
    // Idempotent stop, and everything refused after it.
    h.m.stop();
    h.m.stop();
    h.stopped = true;
    h.outstanding = None;
    let now = h.now;
    assert_eq!(h.m.handle_timeout(now), Err(InputError::Stopped));
    assert_eq!(
        h.m.handle_failure(
            foreign_request_id(0),
            TransportFailure::new(TransportErrorKind::Reset, "x"),
            now
        ),
        Err(InputError::Stopped)
    );
    h.drain(false);
    h.trace
}

fuzz_target!(|s: Scenario| {
    if tracing() {
        eprintln!("-- {:?}", s.knobs);
    }
    let first = run(&s);
    let second = run(&s);
    assert!(first == second, "same inputs, different outputs");
});
