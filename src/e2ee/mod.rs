//! End-to-end encryption: a stage between the machine's events and the consumer (feature
//! `e2ee`), on matrix-sdk-crypto's `OlmMachine`. This crate writes no cryptography.
//!
//! The [`SyncMachine`](crate::SyncMachine) stays pure and crypto-free. The stage, [`E2ee`],
//! has the same handle/poll shape:
//!
//! * inputs: every [`Event`](crate::Event) the machine yields, in order
//!   ([`E2ee::handle_event`]); the responses to the stage's own requests
//!   ([`E2ee::handle_response`], [`E2ee::handle_failure`]); time ([`E2ee::handle_timeout`]);
//! * outputs: events for the consumer ([`E2ee::poll_event`]), requests to send
//!   ([`E2ee::poll_request`]: `whoami`, keys upload, query, claim, to-device; each with its
//!   [`RequestKind`](crate::RequestKind), classified and backed off like the machine's),
//!   reports ([`E2ee::poll_error`]) and the instant it next wants the time
//!   ([`E2ee::poll_timeout`]).
//!
//! The [driver](crate::start_encrypted) runs it on its thread; a custom loop runs it the same
//! way: drain the machine's events into the stage, drain the stage's events to the consumer,
//! send the stage's requests first, and send the machine's only while
//! [`E2ee::holds_sync`] is false.
//!
//! # Order and durability
//!
//! A batch is held until its [`Checkpoint`](crate::Checkpoint). Then its to-device events,
//! device-list changes, one-time-key counts and unused fallback key types go to
//! `receive_sync_changes` (which writes the crypto store) before any room event of the batch
//! is decrypted; then the batch comes out, ending with its checkpoint. So the crypto state is
//! on disk before the checkpoint reaches the consumer, and before the machine's next sync
//! (which lets the server delete the batch's to-device messages: a room key lost there is
//! lost for good). If the store write fails, the batch is retried with backoff and the sync
//! is held meanwhile.
//!
//! With sliding sync the same events come from its `to_device` and `e2ee` extensions. A
//! [`ConnectionReset`](crate::EventKind::ConnectionReset) (held with the batch that follows
//! it) marks every tracked user's devices outdated before that batch's changes go in: device
//! list changes are only given relative to a `pos`, so those made meanwhile are unknown.
//!
//! The machine reports key counts only when they change; an item without a
//! `signed_curve25519` count means zero (matrix-sdk-crypto 0.18 would read it as
//! "unchanged" and never replenish the one-time keys).
//!
//! # Keys
//!
//! The device keys and one-time keys are uploaded before the first sync request
//! ([`E2ee::holds_sync`] is true until then), so that a sender can open an Olm session with
//! this device. After every batch and every answer, whatever `outgoing_requests()` yields is
//! sent and acknowledged (`mark_request_as_sent`): key uploads when the server's count runs
//! low, key queries for the senders of encrypted events (they are tracked from their first
//! encrypted event) and for changed device lists. A request that fails transiently is retried
//! with backoff; a refused one (4xx) is reported once and not retried in a loop (a refused
//! keys upload not again this run, other kinds after the maximum backoff).
//!
//! # Decrypted events
//!
//! A decrypted event is normalized like a plaintext one, from the decrypted event (kind from
//! the decrypted type, body, relation, state key), `raw` is the decrypted event, and
//! [`Event::encryption`](crate::Event::encryption) holds [`Encryption::Decrypted`]: the
//! sender's device and verification state from the crypto library's encryption info. An
//! event that cannot be decrypted stays [`EventKind::Encrypted`](crate::EventKind::Encrypted)
//! with [`Encryption::Undecryptable`] and the reason. When its room key arrives later in the
//! run, the event is delivered again, decrypted, with [`Decrypted::late`] set: the one
//! documented exception to dedup. The stage keeps at most
//! [`E2eeConfig::max_pending_undecryptable`] such events (1,024 by default, oldest dropped).
//! To-device events reach the consumer as the server sent them (room keys stay ciphertext).
//!
//! # Store and identity
//!
//! [`CryptoStore::Sqlite`] is matrix-sdk-sqlite's crypto store in a directory the application
//! chooses (identity, Olm sessions and room keys survive restarts); [`CryptoStore::Memory`]
//! is for tests. The user and device ids come from [`E2eeConfig`], or from
//! `GET /account/whoami`.
//!
//! # How the crypto library is driven
//!
//! matrix-sdk-crypto 0.18.0 is the newest release this crate's toolchain builds. Every
//! `OlmMachine` call is `async`, and the library spawns tokio tasks and uses tokio timers, so
//! the stage owns a tokio current-thread runtime (time enabled) and runs each call in its
//! `block_on` (as the library's own FFI bindings do); no other executor works. 0.18 speaks
//! ruma 0.16 (ruma-common 0.19) while this crate uses ruma-common 0.20: instead of aligning
//! the two, events cross as JSON (the machine keeps every event's raw JSON), the library's
//! requests become `http::Request`s here, and their responses are parsed with ruma 0.16's
//! response types (the dependency `ruma-crypto`, used for nothing else).
//!
//! Logs name request kinds, counts and ids, never key material or decrypted content.

mod info;
#[cfg(feature = "e2ee")]
mod stage;

pub use info::{Decrypted, Encryption, Undecryptable, UndecryptableReason, Verification};
#[cfg(feature = "e2ee")]
pub use stage::{CryptoStore, E2ee, E2eeConfig, E2eeError};
