//! Stages: what sits between the machine and the consumer on the driver thread.
//!
//! A stage has the machine's handle/poll shape: it takes the events of the step before it in
//! order, may send requests of its own through the driver's one transport, wants the time at
//! an instant of its own, and yields events for the step after it and reports. The driver
//! runs the machine and its stages in one loop ([`super::run`]); a build without stages is
//! the same loop with an empty stack.
//!
//! Ordering that matters, kept by the loop: a stage's requests go out before the machine's,
//! and no sync request goes out while any stage [holds the sync](Stage::holds_sync) (the
//! E2EE stage holds it until its keys are uploaded and while a batch's crypto state is not
//! yet stored).

use std::time::Instant;

use crate::{Event, OutgoingRequest, RequestId, TransportFailure};

use super::ServiceError;

/// One stage of the driver's stack. Implemented by the E2EE stage (feature `e2ee`).
pub(crate) trait Stage: Send {
    /// An event of the step before, in order.
    fn handle_event(&mut self, event: Event);
    /// An event for the step after (the next stage or the consumer).
    fn poll_event(&mut self) -> Option<Event>;
    /// A report for the `errors` channel.
    fn poll_error(&mut self) -> Option<ServiceError>;
    /// A request of the stage's own; `access_token` is the machine's current one, for the
    /// stage to put on it (it may have been refreshed since the stage's last request).
    fn poll_request(&mut self, access_token: &crate::AccessToken) -> Option<OutgoingRequest>;
    /// The answer to one of the stage's requests.
    fn handle_response(&mut self, id: RequestId, response: http::Response<Vec<u8>>, now: Instant);
    /// A transport failure of one of the stage's requests.
    fn handle_failure(&mut self, id: RequestId, failure: TransportFailure, now: Instant);
    /// The time, at or after [`poll_timeout`](Self::poll_timeout).
    fn handle_timeout(&mut self, now: Instant);
    /// When the stage next wants the time; `None`: nothing to do.
    fn poll_timeout(&self) -> Option<Instant>;
    /// True while no sync request may go out.
    fn holds_sync(&self) -> bool;
}

#[cfg(feature = "e2ee")]
impl Stage for crate::E2ee {
    fn handle_event(&mut self, event: Event) {
        crate::E2ee::handle_event(self, event);
    }

    fn poll_event(&mut self) -> Option<Event> {
        crate::E2ee::poll_event(self)
    }

    fn poll_error(&mut self) -> Option<ServiceError> {
        crate::E2ee::poll_error(self).map(|error| match error {
            crate::E2eeError::Request(error) => ServiceError::Sync(error),
            other => ServiceError::E2ee(other),
        })
    }

    fn poll_request(&mut self, access_token: &crate::AccessToken) -> Option<OutgoingRequest> {
        self.set_access_token(access_token.clone());
        crate::E2ee::poll_request(self)
    }

    fn handle_response(&mut self, id: RequestId, response: http::Response<Vec<u8>>, now: Instant) {
        if let Err(err) = crate::E2ee::handle_response(self, id, response, now) {
            log::warn!("input refused by the e2ee stage: {err}");
        }
    }

    fn handle_failure(&mut self, id: RequestId, failure: TransportFailure, now: Instant) {
        if let Err(err) = crate::E2ee::handle_failure(self, id, failure, now) {
            log::warn!("input refused by the e2ee stage: {err}");
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        let _ = crate::E2ee::handle_timeout(self, now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        crate::E2ee::poll_timeout(self)
    }

    fn holds_sync(&self) -> bool {
        crate::E2ee::holds_sync(self)
    }
}
