//! A simulated clock around a [`Checked`] machine: the harness the machine tests share. It
//! pumps the machine like the canonical loop (drain events, errors and states; then
//! `poll_request`), keeps everything the machine said, and moves the clock only when told or
//! to the machine's next wake-up. Every input and output also goes through the invariants of
//! [`Checked`].
//!
//! The scripted-server simulations ([`crate::sim`]) drive a [`Checked`] machine the same
//! way, with a scripted homeserver, a clock that jumps to the next answer or wake-up, and a
//! recorded log on top.

use std::time::{Duration, Instant};

use matrix_sync_service::{Config, Event, EventKind, OutgoingRequest, SyncError, SyncState};

use crate::Checked;

/// An HTTP response with `status` and `body`.
pub fn response(status: u16, body: impl Into<Vec<u8>>) -> http::Response<Vec<u8>> {
    response_with(status, &[], body)
}

/// An HTTP response with `status`, extra headers and `body`.
pub fn response_with(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Vec<u8>>,
) -> http::Response<Vec<u8>> {
    let mut builder = http::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body.into()).expect("valid response")
}

/// A machine, a fake clock, and everything it has said so far.
pub struct Harness {
    /// The machine, checked at every call.
    pub m: Checked,
    pub base: Instant,
    pub now: Instant,
    pub events: Vec<Event>,
    pub errors: Vec<SyncError>,
    pub states: Vec<SyncState>,
}

impl Harness {
    pub fn new(config: Config) -> Self {
        let base = Instant::now();
        let m = Checked::new(config, base).expect("valid config");
        let mut h = Self {
            m,
            base,
            now: base,
            events: Vec::new(),
            errors: Vec::new(),
            states: Vec::new(),
        };
        h.pump();
        h
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// Drains events (checking that `since` moves only at a checkpoint, to its token), errors
    /// and states.
    pub fn pump(&mut self) {
        loop {
            let before = self.m.since().map(str::to_owned);
            let Some(event) = self.m.poll_event() else {
                break;
            };
            match &event.kind {
                EventKind::Checkpoint(cp) => {
                    assert_eq!(
                        self.m.since(),
                        Some(cp.next_batch.as_str()),
                        "since after checkpoint"
                    );
                }
                _ => assert_eq!(
                    self.m.since().map(str::to_owned),
                    before,
                    "since moved on a non-checkpoint event {event:?}"
                ),
            }
            self.events.push(event);
        }
        while let Some(e) = self.m.poll_error() {
            self.errors.push(e);
        }
        while let Some(s) = self.m.poll_state() {
            self.states.push(s);
        }
    }

    /// The request due now; panics when none is.
    pub fn request(&mut self) -> OutgoingRequest {
        let req = self.m.poll_request().expect("a request is due now");
        assert!(
            self.m.poll_request().is_none(),
            "a second request while one is in flight"
        );
        self.pump();
        req
    }

    /// Advances the clock to each wake-up instant until a request is due, and returns it.
    pub fn next_request(&mut self) -> OutgoingRequest {
        for _ in 0..16 {
            if let Some(req) = self.m.poll_request() {
                assert!(
                    self.m.poll_request().is_none(),
                    "a second request while one is in flight"
                );
                self.pump();
                return req;
            }
            let at = self
                .m
                .poll_timeout()
                .expect("a wake-up instant when no request is due");
            assert!(
                at > self.now,
                "poll_timeout {at:?} is due but no request was given"
            );
            self.now = at;
            self.m.handle_timeout(at).expect("timeout accepted");
            self.pump();
        }
        panic!("no request after 16 wake-ups");
    }

    /// Feeds `response` to `req` now and drains the outputs.
    pub fn respond(&mut self, req: &OutgoingRequest, response: http::Response<Vec<u8>>) {
        self.m
            .handle_response(req.id, response, self.now)
            .expect("response accepted");
        self.pump();
    }

    /// Feeds a status and body to `req` now and drains the outputs.
    pub fn reply(&mut self, req: &OutgoingRequest, status: u16, body: impl Into<Vec<u8>>) {
        self.respond(req, response(status, body));
    }

    /// Moves the clock forward by `d` (and tells the machine).
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.m.handle_timeout(self.now).expect("timeout accepted");
        self.pump();
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn take_errors(&mut self) -> Vec<SyncError> {
        std::mem::take(&mut self.errors)
    }

    pub fn take_states(&mut self) -> Vec<SyncState> {
        std::mem::take(&mut self.states)
    }
}

/// The kind names of `events`, for compact comparisons.
pub fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// The checkpoint token of an event, if it is one.
pub fn checkpoint(e: &Event) -> Option<&str> {
    match &e.kind {
        EventKind::Checkpoint(cp) => Some(cp.next_batch.as_str()),
        _ => None,
    }
}
