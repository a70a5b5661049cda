//! The driver's one loop: the machine, then its stages, on one thread.
//!
//! Each turn drains every output (states, reports, events through the stages to the
//! consumer, credentials to store), then sends one request, a stage's before the machine's,
//! or waits for the earliest instant anyone wants, a stop, or new credentials.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::stage::Stage;
use super::transport::perform;
use super::{lock, ServiceError, Shared, StoreCredentials};
use crate::lossy::Lossy;
use crate::{Credentials, Event, OutgoingRequest, SyncMachine, SyncState, TransportFailure};

/// How long the loop waits when nobody has a timer, which happens only while a stage holds
/// the sync (a safety net: a stage that holds it always has a timer).
const IDLE_TICK: Duration = Duration::from_secs(1);

pub(super) struct Driver {
    pub(super) machine: SyncMachine,
    /// After the machine, in order (the E2EE stage, if any).
    pub(super) stages: Vec<Box<dyn Stage>>,
    pub(super) agent: ureq::Agent,
    pub(super) events: Sender<Event>,
    pub(super) errors: Lossy<ServiceError>,
    pub(super) states: Lossy<SyncState>,
    pub(super) stop: Receiver<()>,
    pub(super) credentials: Receiver<SetCredentials>,
    /// Acknowledgements of stored checkpoints, when the application gives them.
    pub(super) acks: Option<Receiver<()>>,
    /// Checkpoints handed to the consumer and not acknowledged yet: no request goes out
    /// while there is one.
    pub(super) unacknowledged: usize,
    pub(super) store: Option<Arc<StoreCredentials>>,
    pub(super) shared: Arc<Shared>,
}

/// Why the loop ends.
pub(super) struct Stopped;

/// A request's id, what came of it, and when.
type Exchanged = (
    crate::RequestId,
    Result<http::Response<Vec<u8>>, TransportFailure>,
    Instant,
);

/// Credentials set through the handle; `keep_refresh_token` for `set_access_token`.
pub(super) struct SetCredentials {
    pub(super) credentials: Credentials,
    pub(super) keep_refresh_token: bool,
}

impl Driver {
    pub(super) fn run(&mut self) {
        while self.step().is_ok() {}
        log::debug!("sync driver stopping");
    }

    /// One turn of the canonical loop: drain the outputs, then send one request (a stage's
    /// first; the machine's unless a stage holds the sync) or wait.
    fn step(&mut self) -> Result<(), Stopped> {
        self.drain()?;
        let token = self.machine.config().access_token.clone();
        for index in 0..self.stages.len() {
            if let Some(request) = self.stages[index].poll_request(&token) {
                let (id, outcome, now) = self.exchange(request)?;
                let stage = &mut self.stages[index];
                match outcome {
                    Ok(response) => stage.handle_response(id, response, now),
                    Err(failure) => stage.handle_failure(id, failure, now),
                }
                // The machine may have a timer due meanwhile (it waited out this exchange).
                let _ = self.machine.handle_timeout(Instant::now());
                return Ok(());
            }
        }
        self.take_acks();
        let unacknowledged = self.unacknowledged > 0;
        let held = unacknowledged || self.stages.iter().any(|stage| stage.holds_sync());
        if !held {
            if let Some(request) = self.machine.poll_request() {
                let (id, outcome, now) = self.exchange(request)?;
                let input = match outcome {
                    Ok(response) => self.machine.handle_response(id, response, now),
                    Err(failure) => self.machine.handle_failure(id, failure, now),
                };
                if let Err(err) = input {
                    log::warn!("input refused by the machine: {err}");
                }
                let now = Instant::now();
                for stage in &mut self.stages {
                    stage.handle_timeout(now);
                }
                return Ok(());
            }
        }
        let machine_wake = if held {
            None
        } else {
            self.machine.poll_timeout()
        };
        let stages_wake = self.stages.iter().filter_map(|s| s.poll_timeout()).min();
        let now = Instant::now();
        let wake = match (machine_wake, stages_wake) {
            // Stopped, with nothing of the stages' left to do.
            (None, None) if !held => return Err(Stopped),
            (None, None) => now + IDLE_TICK,
            (a, b) => a.into_iter().chain(b).min().unwrap_or(now),
        };
        let wait = wake.saturating_duration_since(now);
        let acks = match (&self.acks, unacknowledged) {
            (Some(acks), true) => acks.clone(),
            _ => crossbeam_channel::never(),
        };
        if !wait.is_zero() {
            select! {
                recv(self.stop) -> _ => return Err(Stopped),
                recv(self.credentials) -> set => if let Ok(set) = set { self.put_in_force(set) },
                recv(acks) -> ack => if ack.is_ok() { self.acknowledged() },
                default(wait) => {}
            }
        }
        // `Instant::now()` is monotonic, so nobody sees time go backwards; a timer that fired
        // a little early only makes the next turn wait the rest.
        self.tick(Instant::now());
        Ok(())
    }

    /// Counts the acknowledgements that came in.
    fn take_acks(&mut self) {
        let Some(acks) = &self.acks else { return };
        let mut came = 0;
        while acks.try_recv().is_ok() {
            came += 1;
        }
        for _ in 0..came {
            self.acknowledged();
        }
    }

    fn acknowledged(&mut self) {
        self.unacknowledged = self.unacknowledged.saturating_sub(1);
    }

    /// Tells the stages and the machine the time.
    fn tick(&mut self, now: Instant) {
        for stage in &mut self.stages {
            stage.handle_timeout(now);
        }
        let _ = self.machine.handle_timeout(now);
    }

    /// Sends `request` (the machine's or a stage's) and returns its id, its outcome and when
    /// it came; `Stopped` if a stop arrived meanwhile.
    fn exchange(&self, request: OutgoingRequest) -> Result<Exchanged, Stopped> {
        let id = request.id;
        let outcome = perform(&self.agent, request, self.machine.config().max_body_bytes);
        self.check_stop()?;
        Ok((id, outcome, Instant::now()))
    }

    /// Moves every output on: states, the machine's reports and events (through the stages,
    /// in order, to the consumer), credentials to store, then each stage's reports and events.
    fn drain(&mut self) -> Result<(), Stopped> {
        self.publish_states();
        while let Some(error) = self.machine.poll_error() {
            self.errors.push(ServiceError::Sync(error));
        }
        while let Some(event) = self.machine.poll_event() {
            self.pass(0, event)?;
        }
        self.settle_credentials();
        for index in 0..self.stages.len() {
            while let Some(error) = self.stages[index].poll_error() {
                self.errors.push(error);
            }
            while let Some(event) = self.stages[index].poll_event() {
                self.pass(index + 1, event)?;
            }
        }
        self.publish_states();
        self.check_stop()
    }

    /// Hands `event` to the stage at `index`, or to the consumer past the last stage (waiting
    /// while the channel is full: backpressure, never loss).
    fn pass(&mut self, index: usize, event: Event) -> Result<(), Stopped> {
        if let Some(stage) = self.stages.get_mut(index) {
            stage.handle_event(event);
            return Ok(());
        }
        if self.acks.is_some() && matches!(event.kind, crate::EventKind::Checkpoint(_)) {
            self.unacknowledged += 1;
        }
        select! {
            send(self.events, event) -> sent => sent.map_err(|_| Stopped),
            recv(self.stop) -> _ => Err(Stopped),
        }
    }

    /// Puts credentials set through the handle in force, and has refreshed ones stored.
    fn settle_credentials(&mut self) {
        while let Ok(set) = self.credentials.try_recv() {
            self.put_in_force(set);
        }
        while let Some(credentials) = self.machine.poll_credentials() {
            self.store(&credentials);
            while let Some(error) = self.machine.poll_error() {
                self.errors.push(ServiceError::Sync(error));
            }
        }
    }

    /// Hands refreshed credentials to the application's store and tells the machine.
    fn store(&mut self, credentials: &Credentials) {
        let stored = match &self.store {
            Some(store) => store(credentials).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        let now = Instant::now();
        let answered = match stored {
            Ok(()) => self.machine.handle_credentials_stored(now),
            Err(reason) => self.machine.handle_credentials_not_stored(reason, now),
        };
        if let Err(err) = answered {
            log::warn!("credentials answer refused by the machine: {err}");
        }
    }

    fn put_in_force(&mut self, set: SetCredentials) {
        let mut credentials = set.credentials;
        if set.keep_refresh_token {
            credentials.refresh_token = self.machine.config().refresh_token.clone();
        }
        if let Err(err) = self.machine.set_credentials(credentials, Instant::now()) {
            log::warn!("new credentials refused by the machine: {err}");
        }
    }

    pub(super) fn publish_states(&mut self) {
        while let Some(state) = self.machine.poll_state() {
            *lock(&self.shared.state) = state;
            self.states.push(state);
        }
    }

    fn check_stop(&self) -> Result<(), Stopped> {
        match self.stop.try_recv() {
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(()),
            _ => Err(Stopped),
        }
    }
}
