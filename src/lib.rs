//! A Matrix `/v3/sync` loop: a pure sans-IO state machine, and a blocking driver.
#![warn(missing_docs)]

mod backoff;
mod batch;
mod checkpoint;
mod classify;
mod config;
mod dedup;
pub mod defaults;
#[cfg(feature = "driver")]
mod driver;
mod error;
mod machine;
mod normalize;
mod request;

pub use backoff::BackoffPolicy;
pub use checkpoint::FileCheckpointStore;
pub use config::{AccessToken, Config, ConfigError, GapFill, SyncFilter};
#[cfg(feature = "driver")]
pub use driver::{start, ServiceError, SyncService};
pub use error::{ErrorClass, Failure, InputError, SyncError, TransportErrorKind, TransportFailure};
pub use machine::{SyncMachine, SyncState};
pub use normalize::{Checkpoint, Event, EventKind, Gap, Relation};
pub use request::{OutgoingRequest, RequestId, RequestKind};

pub use ruma_client_api::filter::FilterDefinition;
pub use ruma_common::presence::PresenceState;
