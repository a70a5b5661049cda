//! A Matrix `/v3/sync` loop that survives every failure a network or server can produce and
//! hands the application a clean stream of normalized events.
//!
//! Two layers:
//!
//! * [`SyncMachine`], the sans-IO core: pure and synchronous. It consumes HTTP responses (or
//!   transport failures) and time ticks, and yields the requests to send, the instant it next
//!   wants to be woken, normalized [`Event`]s, [`SyncError`] reports and [`SyncState`] changes.
//!   It never reads a clock, sleeps, does I/O or spawns a thread; backoff jitter comes from
//!   [`Config::jitter_seed`]. Same inputs, same outputs, bit for bit. (The dedup key is drawn
//!   at random per machine, so that no server can aim for a fingerprint collision; it changes
//!   no output unless two ids collide, about 10⁻¹¹ per run.)
//! * The blocking driver ([`start`], feature `driver`, on by default): one thread running
//!   `ureq`, publishing over `crossbeam-channel` behind a [`SyncService`] handle with `events`,
//!   `errors`, `states` and an idempotent `stop()`. With `default-features = false` the crate
//!   is the machine alone, for any event loop and any HTTP client.
//!
//! For many accounts, the [`reactor`] (feature `reactor`, on by default) runs any number of
//! machines on one thread over non-blocking sockets: accounts are added and removed at run
//! time under keys the application chooses, their events come out tagged with the key, and
//! the driver's guarantees (deadlines, body cap, TLS roots, proxy) hold per account, with no
//! account able to delay another.
//!
//! # The rules
//!
//! 1. Feed the machine one input: [`handle_response`](SyncMachine::handle_response),
//!    [`handle_failure`](SyncMachine::handle_failure) or
//!    [`handle_timeout`](SyncMachine::handle_timeout), each with the current `Instant`.
//! 2. Drain its outputs until each says `None`: events, errors, states and
//!    [`poll_credentials`](SyncMachine::poll_credentials) are independent queues, drained in
//!    any order (answer credentials before asking for the next request); then [`poll_request`](SyncMachine::poll_request), and send
//!    what it returns. The one ordering that matters: no request is handed out while events
//!    wait, so drain the events first.
//! 3. Wait for whichever comes first: the response, or
//!    [`poll_timeout`](SyncMachine::poll_timeout). Go to 1.
//! 4. Every request has an id; answer it with the same id. An answer the machine no longer
//!    waits for (stale id, after a deadline or a stop) is refused with an [`InputError`] and
//!    changes nothing; so is time going backwards.
//! 5. At most one request is in flight, and none is handed out while events wait to be
//!    drained: `since` advances (when you take the [`Checkpoint`]) only past events you took.
//! 6. A panic means a bug in this crate, never bad input: no server response, body or timing
//!    can make the machine panic.
//!
//! # The protocol, as implemented
//!
//! * **Server discovery** (off unless asked for: [`Config::discover()`] from a server name or a
//!   user id, or [`Config::discover`](Config#structfield.discover) set by hand). Before the first
//!   sync, in [`SyncState::Discovering`], through the same one-request slot and with the
//!   usual deadline margin: `GET /.well-known/matrix/client` of the server name
//!   ([`RequestKind::Discovery`], redirects followed up to
//!   [`defaults::MAX_DISCOVERY_REDIRECTS`]), then `GET {base_url}/_matrix/client/versions`
//!   ([`RequestKind::VersionsCheck`]); neither carries the token. The base URL (trailing
//!   slashes removed) is announced once as an [`EventKind::Discovered`] event, is
//!   [`SyncMachine::homeserver`], and takes every later request (syncs, gap fills, refreshes).
//!   The specification's outcomes: a 404 is `IGNORE`, and the server name's own address
//!   (`https://{server_name}`, `http://` for a loopback name) is the base URL; an unusable well-known (`FAIL_PROMPT`) or
//!   base URL (`FAIL_ERROR`) is [`Failure::Discovery`], class `NeedsUser`, retried only at the
//!   maximum backoff ([`SyncState::Refused`] meanwhile), so a well-known fixed on the server is
//!   picked up without a restart. Transport failures, deadlines, 5xx and 429 of either request
//!   back off like any transient failure (the specification would give up on "no response";
//!   a service waits). Both requests count on one backoff counter, reset by nothing before
//!   success, so no answer can make discovery spin. A loopback server name (`localhost`,
//!   `127.0.0.0/8`, `[::1]`) is asked over plain http, like a loopback homeserver URL; a
//!   well-known read over https may not name a plain-http base URL unless
//!   [`Config::allow_insecure_http`]. A port in the server name is kept in the well-known URL
//!   (the specification uses the host name alone). The reasons are in the `discovery`
//!   module's source.
//! * `GET /_matrix/client/v3/sync` with `since`, `timeout`, `filter`, `full_state` (first request
//!   only) and `set_presence`; the token only in the `Authorization` header (marked sensitive,
//!   so it never shows in `Debug`).
//! * The first request, and the first after any error, uses `timeout=0`; then the long-poll
//!   timeout. Each request has a deadline: the long-poll timeout plus a margin for a long-poll,
//!   [`Config::catch_up_deadline`] for a `timeout=0` catch-up from a `since` (after days
//!   offline it is as heavy as an initial sync), [`Config::initial_sync_deadline`] without one.
//! * **Simplified sliding sync** (MSC4186) instead, with [`Config::protocol`]
//!   ([`Protocol::SlidingSync`], or [`Protocol::Auto`]): `POST
//!   /_matrix/client/unstable/org.matrix.simplified_msc3575/sync` as Synapse reads it, the
//!   same events plus [`EventKind::ListUpdate`] and [`EventKind::ConnectionReset`], the
//!   checkpoint the pair of `pos` and to-device cursor ([`SlidingPosition`]). Everything below
//!   holds for it too, except gap filling (a limited timeline is a [`Gap`] item). See the
//!   [`sliding`] module.
//! * A sync body is parsed once, every event kept as a slice of the body; the machine keeps the
//!   body until its batch is handed on, and builds each [`Event`] when it is polled, from the few
//!   fields normalization reads (never the whole event into ruma's typed enums). So a batch
//!   costs its body plus a cursor, not a queue of built events: pass the body as an owned
//!   `Vec<u8>` and it is not even copied. ruma's id and key types validate what the machine
//!   relies on, and ruma parses `/messages` pages. A 2xx body that does not parse is a
//!   transient failure; `since` stays.
//! * **One pacing rule.** After every sync answer or failure, the next sync waits for the
//!   current backoff step, unless the answer *delivered something* to the consumer (a server
//!   event, not just a checkpoint or a gap item) or the server *held* the request for at least
//!   half its timeout (a `timeout=0` catch-up has none to hold). Every failure and every answer
//!   that did neither counts one more step. The count resets only after an answer that
//!   delivered something (or was held) to a request at least as demanding as the one failing:
//!   a catch-up that works proves nothing about long-polls cut by a proxy.
//! * **The bound that follows.** Whatever a server answers, the sync requests that deliver
//!   nothing are at most two per backoff step (the catch-up after a failure, and the long-poll
//!   after it). With the defaults that is at most 2 × (8 + 120) = 256 in an hour: 8 steps below
//!   the 60 s cap, then one step per at least 30 s (the cap less its jitter); each answer that
//!   delivers something may start the 8-step ramp again. In general: `2 × (ramp × (d + 1) +
//!   3600 s / ((1 − jitter) × max))` for `d` delivering answers in the hour. A long-poll is at
//!   least [`defaults::MIN_LONG_POLL_TIMEOUT`], so a held one is at least half of that apart.
//! * Failures are classified as [`ErrorClass`] says: transient (network, 5xx, bad body,
//!   deadline) back off exponentially with seeded jitter; 429 waits the larger of the server's
//!   wait (capped by [`Config::max_server_wait`]) and the backoff; refusals, class `NeedsUser` (401, 403, other 4xx,
//!   and a 3xx, reported with its `Location` as a configuration problem) retries only at the
//!   maximum backoff until stopped.
//! * A token the machine would store or send back (`next_batch`, a limited timeline's
//!   `prev_batch`, a page's `end`) that is empty, holds a control character or is longer than
//!   [`MAX_TOKEN_BYTES`] makes the response bad (transient): it is never stored, never put in
//!   a URL. Tokens are otherwise kept byte for byte.
//! * Order within a batch: to-device, device lists and key counts, global account data,
//!   presence, then rooms (joined, invited, knocked, left). Per room: gap item, gap-fill events,
//!   state, timeline, ephemeral, room account data. Then a [`Checkpoint`].
//! * A limited timeline on an incremental sync is filled with `/rooms/{roomId}/messages` (from
//!   its `prev_batch` back to the previous `since`), up to [`GapFill::max_events_per_room`],
//!   and within a memory budget: the fetched events held for one batch never exceed
//!   [`Config::max_body_bytes`] (so a pending batch holds at most its body, that budget, and
//!   the page being read). Past either bound, or with filling off, an [`EventKind::Gap`] item
//!   says what was not delivered. The `/messages` requests carry the `room.timeline` part of
//!   the sync filter (for an uploaded filter, of [`SyncFilter::Uploaded`]'s definition).
//! * Gap-fill failures by meaning: 401 pauses the batch exactly like a failed sync (nothing
//!   delivered, `since` unchanged, [`SyncState::Refused`]); 403, 404, other 4xx or a
//!   redirect end that room with a gap item; transient failures and 429 are retried with
//!   backoff, at most 3 times per room and 8 times per batch, after which the room (or every
//!   room left) ends with a gap item and the batch goes on. One room never stalls the account.
//! * **Tokens that expire.** With [`Config::refresh_token`], the machine refreshes the access
//!   token ([`RequestKind::Refresh`], at most one request in flight as always, through
//!   `/v3/refresh` or an OAuth 2.0 token endpoint, [`RefreshMethod`]) ahead of a known expiry
//!   ([`Config::access_token_expires_in`], by [`defaults::REFRESH_LEAD`]), and once after a
//!   401 `M_UNKNOWN_TOKEN` to a sync or gap fill, which is then retried from the same `since`
//!   (nothing delivered twice). New credentials come out of
//!   [`poll_credentials`](SyncMachine::poll_credentials) and are used only once the
//!   application answered [`handle_credentials_stored`](SyncMachine::handle_credentials_stored);
//!   nothing is sent in between. A refused refresh (401, 403, 400 `invalid_grant`) ends the
//!   session ([`SyncState::SessionEnded`], [`Failure::RefreshRefused`]): no more refreshes,
//!   syncs only at the maximum backoff. A failing one (network, 5xx) is retried with backoff,
//!   keeping the old tokens; so is a refresh answer whose tokens break the rule of
//!   `next_batch` (empty, control characters, longer than [`MAX_TOKEN_BYTES`]) or are not
//!   visible ASCII ([`Failure::BadResponse`], naming the field, never the token: nothing of
//!   it is handed out). A lifetime below [`defaults::MIN_TOKEN_LIFETIME`] (5 s) is raised to
//!   it. [`set_credentials`](SyncMachine::set_credentials) replaces them
//!   live; a machine waiting after a refusal retries at once. The reasons are in the `auth`
//!   module's source and in [`defaults`].
//! * Events already delivered are not delivered again, within the memory of the last
//!   [`Config::dedup_capacity`] event ids (16,384 by default): overlaps between a gap fill and
//!   its timeline, or state repeated in a limited sync, are caught; an id older than that
//!   window is not remembered.
//! * Where this crate chose:
//!   - [`SyncState::Live`] is announced when the catch-up batch (the answer to the `timeout=0`
//!     request) has been handed on: the machine is caught up, and every later batch is live
//!     traffic ([`Checkpoint::live`] says the same in the event stream). Waiting instead for a
//!     long-poll to come back empty would never announce it in a busy account.
//!   - A left room's events come with their usual kinds, followed by an [`EventKind::Leave`]
//!     marker. Room summaries and unread counts are not events and are not reported;
//!     one-time-key counts are reported only when they change.
//!   - A 429's wait is `max(min(server wait, max_server_wait), backoff)`: the ceiling caps
//!     what the server may ask, never the client's own backoff.
//!   - [`stop`](SyncMachine::stop) in the middle of a delivery drops the rest of the batch: its
//!     checkpoint never comes, so `since` stays before it, and after the `Stopped` state nothing
//!     more comes out.
//!   - `long_poll_timeout` below 100 ms is refused by validation rather than run as polling:
//!     the pacing rule tells a held long-poll from an instant answer by its timeout.
//!
//! The reasons behind the defaults are in [`defaults`].
//!
//! # The run loop
//!
//! ```
//! use std::time::{Duration, Instant};
//! use matrix_sync_service::{Config, EventKind, SyncMachine};
//!
//! // A stand-in for your HTTP client: answers every sync with one message.
//! fn send(request: &http::Request<Vec<u8>>) -> http::Response<Vec<u8>> {
//!     assert!(request.uri().path().ends_with("/v3/sync"));
//!     let body = r#"{"next_batch":"s2","rooms":{"join":{"!r:example.org":{"timeline":{"events":[
//!         {"type":"m.room.message","event_id":"$e1","sender":"@a:example.org",
//!          "origin_server_ts":1,"content":{"msgtype":"m.text","body":"hi"}}]}}}}}"#;
//!     http::Response::builder().status(200).body(body.as_bytes().to_vec()).unwrap()
//! }
//!
//! let mut now = Instant::now();
//! let config = Config::new("https://example.org", "secret-token");
//! let mut machine = SyncMachine::new(config, now).expect("valid config");
//! let mut bodies = Vec::new();
//! let mut checkpoints = 0;
//! while checkpoints < 2 {
//!     // 2. drain the outputs
//!     while let Some(event) = machine.poll_event() {
//!         match event.kind {
//!             EventKind::Checkpoint(_) => checkpoints += 1,
//!             _ => bodies.extend(event.body),
//!         }
//!     }
//!     while let Some(error) = machine.poll_error() {
//!         eprintln!("{error}");
//!     }
//!     while let Some(_state) = machine.poll_state() {}
//!     if let Some(request) = machine.poll_request() {
//!         // 3. send it; 1. feed the answer back with the request's id
//!         let response = send(&request.http);
//!         now += Duration::from_millis(20);
//!         machine.handle_response(request.id, response, now).expect("awaited");
//!     } else if let Some(wake) = machine.poll_timeout() {
//!         // 3. nothing to send: sleep until the machine's next instant
//!         now = now.max(wake);
//!         machine.handle_timeout(now).expect("time moves forward");
//!     }
//! }
//! // The event id repeats in the second batch and is not delivered twice.
//! assert_eq!(bodies, ["hi"]);
//! assert_eq!(machine.since(), Some("s2"));
//! ```
//!
//! With the driver, the same loop runs on its own thread:
//!
//! ```no_run
//! # #[cfg(feature = "driver")] {
//! use matrix_sync_service::{start, Config, EventKind};
//!
//! let service = start(Config::new("https://example.org", "secret-token"))?;
//! for event in service.events() {
//!     if let EventKind::Checkpoint(checkpoint) = &event.kind {
//!         // persist checkpoint.next_batch here
//!     }
//! }
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![doc = include_str!("docs_many_machines.md")]
#![warn(missing_docs)]

mod auth;
mod batch;
mod checkpoint;
mod classify;
mod config;
mod credentials;
mod dedup;
pub mod defaults;
mod discovery;
#[cfg(feature = "driver")]
mod driver;
#[cfg(feature = "e2ee")]
pub mod e2ee;
#[cfg(not(feature = "e2ee"))]
mod e2ee;
mod error;
#[cfg(feature = "fleet")]
pub mod fleet;
mod gapfill;
#[cfg(feature = "driver")]
mod lossy;
mod machine;
mod normalize;
#[cfg(feature = "reactor")]
pub mod reactor;
mod request;
mod response;
mod scan;
mod schedule;
pub mod sliding;
mod text;
#[cfg(feature = "driver")]
mod tls;
mod token;

pub use checkpoint::FileCheckpointStore;
pub use config::{BackoffPolicy, Config, ConfigError, GapFill, SyncFilter};
pub use credentials::{AccessToken, Credentials, RefreshMethod, RefreshToken};
#[cfg(all(feature = "driver", feature = "e2ee"))]
pub use driver::start_encrypted;
#[cfg(feature = "driver")]
pub use driver::{
    start, start_with, DriverConfig, LiteralFirst, ServiceError, StartError, StoreCredentials,
    SyncService,
};
#[cfg(feature = "e2ee")]
pub use e2ee::{CryptoStore, E2ee, E2eeConfig, E2eeError};
pub use e2ee::{Decrypted, Encryption, Undecryptable, UndecryptableReason, Verification};
pub use error::{
    DiscoveryAction, DiscoveryError, ErrorClass, Failure, InputError, SyncError,
    TransportErrorKind, TransportFailure,
};
pub use machine::{SyncMachine, SyncState};
pub use normalize::{Checkpoint, Event, EventKind, EventType, Gap, Relation};
pub use request::{CryptoRequestKind, InFlightRequest, OutgoingRequest, RequestId, RequestKind};
pub use sliding::{ActiveProtocol, Protocol, RoomSubscription, SlidingPosition, SlidingSyncConfig};
#[cfg(feature = "driver")]
pub use tls::{CaCertificate, CaPemError, TrustRoots};
pub use token::MAX_TOKEN_BYTES;

pub use ruma_client_api::filter::FilterDefinition;

/// The ruma crates whose types this API uses (ids, filters, presence), re-exported so that an
/// application names exactly the versions the machine was built with.
pub use {ruma_client_api, ruma_common, ruma_events};

/// The README's examples, compiled as doctests so they stay true.
#[cfg(all(doctest, feature = "driver"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Internals for the fuzz targets only; not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use serde_json::value::RawValue;

    pub use crate::response::check_against_serde;
    pub use crate::scan::{event_fields, reference_fields, strict_event_fields, EventFields};

    /// Normalizes one event as found in a room timeline, state, or any other section
    /// (`section` picks one of them by index, modulo their number).
    pub fn normalize_any(raw: Box<RawValue>, section: u8) -> crate::Event {
        use crate::normalize::Section;
        let room = ruma_common::OwnedRoomId::try_from("!fuzz:example.org").ok();
        let section = Section::ALL[section as usize % Section::ALL.len()];
        crate::normalize::normalize(raw, section, room.as_ref())
    }
}
pub use ruma_common::presence::PresenceState;
