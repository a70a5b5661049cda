//! The sans-IO sync state machine.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ruma_client_api::message::get_message_events::v3 as messages;
use ruma_common::api::IncomingResponseExt;
use ruma_common::OwnedRoomId;
use serde_json::value::RawValue;

use crate::backoff::Backoff;
use crate::batch::{Delivery, KeyCounts, ParsedBody, RoomFill, RoomFills};
use crate::classify::{bad_response, classify};
use crate::config::{Config, ConfigError};
use crate::dedup::Dedup;
use crate::error::{ErrorClass, Failure, InputError, SyncError};
use crate::normalize::{Event, EventKind, Gap};
use crate::request::{self, OutgoingRequest, RequestId, RequestKind};

/// What the service is doing, as reported by [`SyncMachine::poll_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncState {
    /// The first sync, without `since`, is under way.
    InitialSync,
    /// Catching up from a stored `since` (at start, or after an error) with `timeout=0`.
    CatchingUp,
    /// Caught up: everything before was history, what follows is live traffic.
    Live,
    /// Waiting after a transient failure or a rate limit.
    BackingOff,
    /// A fatal failure (401 unknown token, 403, 400 unknown `since`, other 4xx): retrying only
    /// at the maximum backoff until stopped or until a request succeeds again.
    Unauthorized,
    /// Stopped; no more requests.
    Stopped,
}

#[derive(Debug)]
struct InFlight {
    id: RequestId,
    kind: RequestKind,
    sent_at: Instant,
    deadline: Instant,
    /// For a sync: the `since` it carried.
    since: Option<String>,
    /// For a sync: sent to catch up (first request, or first after an error), so what it
    /// returns is history, not live traffic.
    catch_up: bool,
}

/// A parsed sync response waiting for its gaps to be filled before it is delivered.
#[derive(Debug)]
struct PendingBatch {
    parsed: ParsedBody,
    live: bool,
    jobs: VecDeque<GapJob>,
    fills: RoomFills,
}

#[derive(Debug)]
struct GapJob {
    room_id: OwnedRoomId,
    /// Next page starts here (the limited timeline's `prev_batch`, then each page's `end`).
    from: String,
    /// The sync token held before the gap.
    to: String,
    newest_first: Vec<Box<RawValue>>,
    /// Consecutive pages that came back empty but with an `end`.
    empty_pages: u32,
}

/// Consecutive empty `/messages` pages tolerated before the rest of a gap is reported.
const MAX_EMPTY_PAGES: u32 = 3;

/// The sans-IO core of the sync loop. See the [crate docs](crate) for the run loop.
#[derive(Debug)]
pub struct SyncMachine {
    config: Config,
    since: Option<String>,
    state: SyncState,
    backoff: Backoff,
    idle_streak: u32,
    next_id: u64,
    in_flight: Option<InFlight>,
    send_at: Option<Instant>,
    now: Instant,
    catching_up: bool,
    first_sync: bool,
    batch: Option<PendingBatch>,
    /// The batch whose events are being handed on, built one by one as they are polled.
    delivering: Option<Delivery>,
    errors: VecDeque<SyncError>,
    states: VecDeque<SyncState>,
    dedup: Dedup,
    last_key_counts: Option<KeyCounts>,
    stopped: bool,
}

impl SyncMachine {
    /// Validates `config` and creates a machine whose clock starts at `now`.
    ///
    /// The first request is due at once: call [`poll_request`](Self::poll_request).
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut config = config;
        config.homeserver = config.homeserver.trim_end_matches('/').to_owned();
        let state = if config.since.is_some() {
            SyncState::CatchingUp
        } else {
            SyncState::InitialSync
        };
        Ok(Self {
            since: config.since.clone(),
            backoff: Backoff::new(config.backoff.clone(), config.jitter_seed),
            dedup: Dedup::new(config.dedup_capacity, config.jitter_seed),
            config,
            state,
            idle_streak: 0,
            next_id: 0,
            in_flight: None,
            send_at: None,
            now,
            catching_up: true,
            first_sync: true,
            batch: None,
            delivering: None,
            errors: VecDeque::new(),
            states: VecDeque::from([state]),
            last_key_counts: None,
            stopped: false,
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
        if let Err(failure) = classify(parts.status, &parts.headers, bytes) {
            self.fail(in_flight, failure);
            return Ok(());
        }
        match in_flight.kind {
            RequestKind::Sync { .. } => self.on_sync(in_flight, parts.status, body.into()),
            RequestKind::Messages { .. } => {
                self.on_messages(in_flight, http::Response::from_parts(parts, bytes))
            }
        }
        Ok(())
    }

    /// Reports that request `id` failed below HTTP (connect, reset, TLS, truncated body...).
    pub fn handle_failure(
        &mut self,
        id: RequestId,
        failure: crate::TransportFailure,
        now: Instant,
    ) -> Result<(), InputError> {
        let in_flight = self.accept(id, now)?;
        self.fail(in_flight, Failure::Transport(failure));
        Ok(())
    }

    /// Advances the clock to `now`: a request past its deadline fails, a backoff that ended
    /// makes the next request due. Call it at the instant [`poll_timeout`](Self::poll_timeout)
    /// gave, or any time.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), InputError> {
        self.check_input(now)?;
        self.now = now;
        if self.in_flight.as_ref().is_some_and(|f| now >= f.deadline) {
            if let Some(in_flight) = self.in_flight.take() {
                let waited = in_flight
                    .deadline
                    .saturating_duration_since(in_flight.sent_at);
                self.fail(in_flight, Failure::DeadlineExceeded(waited));
            }
        }
        Ok(())
    }

    /// Stops the machine: the request in flight is abandoned, no more are made, and every
    /// later input is refused with [`InputError::Stopped`]. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.in_flight = None;
        self.batch = None;
        self.send_at = None;
        self.set_state(SyncState::Stopped);
    }

    // ---- outputs --------------------------------------------------------------------------

    /// The next request to send, if one is due now.
    ///
    /// Call after every input, once the events are drained: no request is made while events
    /// are undelivered, so `since` only moves past events that were handed on. At most one
    /// request is in flight at any time.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<OutgoingRequest> {
        if self.stopped || self.in_flight.is_some() || self.delivering.is_some() {
            return None;
        }
        if self.send_at.is_some_and(|at| at > self.now) {
            return None;
        }
        self.send_at = None;
        let now = self.now;
        let built = match self.batch.as_ref().and_then(|b| b.jobs.front()) {
            Some(job) => {
                let room = job.room_id.clone();
                let remaining = self.config.gap_fill.max_events_per_room - job.newest_first.len();
                let limit = (self.config.gap_fill.page_size as usize).min(remaining) as u32;
                let http =
                    request::messages_request(&self.config, &room, &job.from, &job.to, limit);
                let deadline = now + self.config.deadline_margin;
                if self.state == SyncState::BackingOff {
                    self.set_state(SyncState::CatchingUp);
                }
                (
                    http,
                    RequestKind::Messages { room_id: room },
                    deadline,
                    None,
                    false,
                )
            }
            None => {
                let since = self.since.clone();
                let catch_up = self.catching_up || since.is_none();
                let timeout = if catch_up {
                    Duration::ZERO
                } else {
                    self.config.long_poll_timeout
                };
                let deadline = now
                    + match since {
                        None => self.config.initial_sync_deadline,
                        Some(_) => timeout + self.config.deadline_margin,
                    };
                let full_state = self.first_sync && self.config.full_state;
                let http =
                    request::sync_request(&self.config, since.as_deref(), timeout, full_state);
                if self.state != SyncState::Unauthorized && catch_up {
                    let state = if since.is_some() {
                        SyncState::CatchingUp
                    } else {
                        SyncState::InitialSync
                    };
                    self.set_state(state);
                }
                (
                    http,
                    RequestKind::Sync { timeout },
                    deadline,
                    since,
                    catch_up,
                )
            }
        };
        let (http, kind, deadline, since, catch_up) = built;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let in_flight = InFlight {
            id,
            kind: kind.clone(),
            sent_at: now,
            deadline,
            since,
            catch_up,
        };
        match http {
            Ok(http) => {
                self.in_flight = Some(in_flight);
                log::debug!("request {id}: {} {}", kind.name(), http.uri().path());
                Some(OutgoingRequest {
                    id,
                    kind,
                    http,
                    deadline,
                })
            }
            Err(err) => {
                self.fail(in_flight, Failure::InvalidRequest(err.to_string()));
                None
            }
        }
    }

    /// The next normalized event. Drain until `None` after every input.
    ///
    /// Handing on a [`Checkpoint`](EventKind::Checkpoint) is what advances `since`.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.delivering.as_mut()?.next_event(&mut self.dedup);
        match &event {
            Some(Event {
                kind: EventKind::Checkpoint(checkpoint),
                ..
            }) => {
                // The batch is over: its body is freed now, not at the next batch.
                self.delivering = None;
                self.since = Some(checkpoint.next_batch.clone());
                self.first_sync = false;
                if !checkpoint.live {
                    self.caught_up();
                }
            }
            Some(_) => {}
            None => self.delivering = None,
        }
        event
    }

    /// The next failure report. Drain after every input; the machine already acted on it.
    #[must_use]
    pub fn poll_error(&mut self) -> Option<SyncError> {
        self.errors.pop_front()
    }

    /// The next change of [`SyncState`]; the first one is the initial state.
    #[must_use]
    pub fn poll_state(&mut self) -> Option<SyncState> {
        self.states.pop_front()
    }

    /// When the machine next wants [`handle_timeout`](Self::handle_timeout): the in-flight
    /// request's deadline, or the end of a backoff. `None` while events wait to be drained
    /// (drain them, then [`poll_request`](Self::poll_request)) and after a stop. An instant
    /// not after the last `now` means a request is due: call `poll_request`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped || self.delivering.is_some() {
            return None;
        }
        match &self.in_flight {
            Some(in_flight) => Some(in_flight.deadline),
            None => Some(self.send_at.unwrap_or(self.now)),
        }
    }

    // ---- observation ----------------------------------------------------------------------

    /// The token the next sync starts from: the `next_batch` of the last checkpoint handed on.
    pub fn since(&self) -> Option<&str> {
        self.since.as_deref()
    }

    /// The current state.
    pub fn state(&self) -> SyncState {
        self.state
    }

    /// The request awaited, if any, with its deadline.
    pub fn in_flight(&self) -> Option<(RequestId, &RequestKind, Instant)> {
        self.in_flight.as_ref().map(|f| (f.id, &f.kind, f.deadline))
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    // ---- internals ------------------------------------------------------------------------

    fn check_input(&self, now: Instant) -> Result<(), InputError> {
        if self.stopped {
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

    /// Validates an input for request `id` and takes the request out of flight.
    fn accept(&mut self, id: RequestId, now: Instant) -> Result<InFlight, InputError> {
        self.check_input(now)?;
        match &self.in_flight {
            Some(f) if f.id == id => {}
            _ if id.0 < self.next_id => return Err(InputError::StaleRequest(id)),
            _ => return Err(InputError::UnknownRequest(id)),
        }
        self.now = now;
        self.in_flight.take().ok_or(InputError::StaleRequest(id))
    }

    fn set_state(&mut self, state: SyncState) {
        if self.state != state {
            log::debug!("state {:?} -> {:?}", self.state, state);
            self.state = state;
            self.states.push_back(state);
        }
    }

    fn caught_up(&mut self) {
        if self.catching_up {
            self.catching_up = false;
            self.set_state(SyncState::Live);
        }
    }

    fn fail(&mut self, in_flight: InFlight, failure: Failure) {
        let class = failure.class();
        let mut delay = match class {
            ErrorClass::Transient => self.backoff.next_delay(),
            ErrorClass::RateLimited => {
                let own = self.backoff.next_delay();
                let asked = match &failure {
                    Failure::RateLimited {
                        retry_after: Some(wait),
                        ..
                    } => *wait,
                    _ => Duration::ZERO,
                };
                own.max(asked.min(self.config.max_server_wait))
            }
            ErrorClass::Fatal => self.backoff.next_fatal(),
        };
        let mut attempt = self.backoff.attempt();
        if class == ErrorClass::Fatal && matches!(in_flight.kind, RequestKind::Messages { .. }) {
            // History this room will not give us: report the rest as a gap, deliver the batch.
            self.backoff.reset();
            (delay, attempt) = (Duration::ZERO, 1);
            self.abandon_gap_job();
        } else {
            self.catching_up = true;
            let state = if class == ErrorClass::Fatal {
                SyncState::Unauthorized
            } else {
                SyncState::BackingOff
            };
            self.set_state(state);
        }
        self.send_at = Some(self.now + delay);
        log::warn!(
            "{} request {} failed: {failure}",
            in_flight.kind.name(),
            in_flight.id
        );
        self.errors.push_back(SyncError {
            failure,
            class,
            request: in_flight.kind,
            attempt,
            delay,
        });
    }

    fn on_sync(&mut self, in_flight: InFlight, status: http::StatusCode, body: Vec<u8>) {
        let parsed = match ParsedBody::parse(body) {
            Ok(parsed) => parsed,
            Err((body, err)) => {
                let failure = bad_response(status.as_u16(), err.to_string(), &body);
                return self.fail(in_flight, failure);
            }
        };
        let response = parsed.response();
        self.backoff.reset();
        if self.state == SyncState::Unauthorized {
            self.set_state(if self.since.is_some() {
                SyncState::CatchingUp
            } else {
                SyncState::InitialSync
            });
        }
        let live = !in_flight.catch_up;
        let unchanged = in_flight.since.as_deref() == Some(response.next_batch.as_str());
        let empty = response.is_empty();
        let early = match in_flight.kind {
            RequestKind::Sync { timeout } => self.now - in_flight.sent_at < timeout / 2,
            RequestKind::Messages { .. } => false,
        };
        if early && (unchanged || empty) {
            // A long-poll that returns early with nothing new: space the next request so a
            // server that answers at once cannot make us spin. A new token with nothing in it
            // is legitimate once (filtered-out activity), so it is only spaced when it
            // repeats. A long-poll the server held for its timeout is spacing enough.
            self.idle_streak = self.idle_streak.saturating_add(1);
            let streak = if unchanged {
                self.idle_streak
            } else {
                self.idle_streak - 1
            };
            if streak > 0 {
                self.send_at = Some(self.now + self.backoff.policy().base_delay(streak));
            }
        } else {
            self.idle_streak = 0;
        }
        if unchanged && empty {
            if in_flight.catch_up {
                self.caught_up();
            }
            return;
        }

        let mut jobs = VecDeque::new();
        let mut fills = RoomFills::new();
        if let Some(previous_since) = in_flight.since.as_deref() {
            let fill = self.config.gap_fill.enabled && self.config.gap_fill.max_events_per_room > 0;
            for (room_id, prev_batch) in response.limited_timelines() {
                let (from, to) = (prev_batch.to_owned(), previous_since.to_owned());
                if fill {
                    jobs.push_back(GapJob {
                        room_id: room_id.clone(),
                        from,
                        to,
                        newest_first: Vec::new(),
                        empty_pages: 0,
                    });
                } else {
                    let unfilled = Some(Gap {
                        prev_batch: from,
                        previous_since: to,
                    });
                    fills.insert(
                        room_id.clone(),
                        RoomFill {
                            unfilled,
                            newest_first: Vec::new(),
                        },
                    );
                }
            }
        }
        if jobs.is_empty() {
            self.deliver(parsed, fills, live);
        } else {
            self.batch = Some(PendingBatch {
                parsed,
                live,
                jobs,
                fills,
            });
        }
    }

    fn on_messages(&mut self, in_flight: InFlight, response: http::Response<&[u8]>) {
        let page = match parse::<messages::Response>(response) {
            Ok(page) => page,
            Err(failure) => return self.fail(in_flight, failure),
        };
        self.backoff.reset();
        let cap = self.config.gap_fill.max_events_per_room;
        let Some(batch) = self.batch.as_mut() else {
            return;
        };
        let Some(job) = batch.jobs.front_mut() else {
            return;
        };
        let got = page.chunk.len();
        job.newest_first
            .extend(page.chunk.into_iter().map(|raw| raw.into_json()));
        let unfilled = match page.end {
            // No `end`, or no progress: the range is exhausted.
            None => None,
            Some(end) if end == job.from => None,
            Some(end) if job.newest_first.len() >= cap => Some(Gap {
                prev_batch: end,
                previous_since: job.to.clone(),
            }),
            // An empty page with `end` means a filter hid events and more may follow; a run
            // of them is reported as a gap rather than paged through forever.
            Some(end) if got == 0 && job.empty_pages >= MAX_EMPTY_PAGES => Some(Gap {
                prev_batch: end,
                previous_since: job.to.clone(),
            }),
            Some(end) => {
                job.empty_pages = if got == 0 { job.empty_pages + 1 } else { 0 };
                job.from = end;
                return;
            }
        };
        if let Some(job) = batch.jobs.pop_front() {
            batch.fills.insert(
                job.room_id,
                RoomFill {
                    unfilled,
                    newest_first: job.newest_first,
                },
            );
        }
        self.finish_if_filled();
    }

    /// Gives up filling the current room: what was fetched is kept, the rest becomes a gap.
    fn abandon_gap_job(&mut self) {
        let Some(batch) = self.batch.as_mut() else {
            return;
        };
        if let Some(job) = batch.jobs.pop_front() {
            let gap = Gap {
                prev_batch: job.from,
                previous_since: job.to,
            };
            batch.fills.insert(
                job.room_id,
                RoomFill {
                    unfilled: Some(gap),
                    newest_first: job.newest_first,
                },
            );
        }
        self.finish_if_filled();
    }

    fn finish_if_filled(&mut self) {
        if !self.batch.as_ref().is_some_and(|b| b.jobs.is_empty()) {
            return;
        }
        let Some(batch) = self.batch.take() else {
            return;
        };
        self.deliver(batch.parsed, batch.fills, batch.live);
    }

    fn deliver(&mut self, parsed: ParsedBody, fills: RoomFills, live: bool) {
        let delivery = Delivery::plan(parsed, fills, &mut self.last_key_counts, live);
        self.delivering = Some(delivery);
    }
}

/// Parses a 2xx body with ruma; a body that is not what the endpoint returns is a
/// transient `BadResponse` carrying an excerpt.
fn parse<R: IncomingResponseExt>(response: http::Response<&[u8]>) -> Result<R, Failure> {
    let status = response.status().as_u16();
    let body = *response.body();
    R::try_from_http_response(response).map_err(|err| bad_response(status, err.to_string(), body))
}
