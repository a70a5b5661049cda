//! A fleet of worker processes on NATS JetStream (feature `fleet`, off by default).
//!
//! Accounts are spread over any number of worker processes, on any number of machines. Each
//! worker runs a [`reactor`](crate::reactor) for the accounts it holds a lease on, and
//! publishes every normalized event to a JetStream stream, one subject per account. A worker
//! that dies loses its leases when they expire, and the others take its accounts over from
//! their last checkpoint.
//!
//! ```no_run
//! use matrix_sync_service::fleet::{self, AccountEntry, FleetClient, FleetConfig};
//!
//! // An operator adds an account (any process, any time).
//! let client = FleetClient::connect(&FleetConfig::new("nats://127.0.0.1:4222", "admin"))?;
//! client.put_account("alice", &AccountEntry::new("https://matrix.example.org", "token"))?;
//!
//! // A worker runs until `stop` receives (or is disconnected).
//! let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
//! # drop(stop_tx);
//! fleet::run(FleetConfig::new("nats://127.0.0.1:4222", "worker-1"), &stop)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What lives where
//!
//! | what | where | key | written by |
//! |---|---|---|---|
//! | accounts: homeserver and credentials ([`AccountEntry`]) | KV bucket [`FleetConfig::accounts_bucket`] | account name | the operator ([`FleetClient::put_account`]); refreshed credentials by the worker holding the account, before they are used |
//! | leases | KV bucket [`FleetConfig::leases_bucket`], `max_age` = [`FleetConfig::lease_ttl`] | account name | the worker holding it |
//! | checkpoints (the `since` token) | KV bucket [`FleetConfig::checkpoints_bucket`] | account name | the worker holding the lease, fenced |
//! | live workers | KV bucket [`FleetConfig::workers_bucket`], `max_age` = the lease TTL | worker id | each worker, every [`FleetConfig::renew_every`] |
//! | events | stream [`FleetConfig::stream`], subject `<subject_prefix>.<account>.events` | `Nats-Msg-Id` | the worker holding the lease |
//!
//! Account names and worker ids are 1 to 128 characters of `A-Z a-z 0-9 _ -`: they are KV keys
//! and subject tokens as they are. An entry under another key is reported and left alone.
//!
//! # The guarantees (contract §13)
//!
//! * **One sync per account across all workers.** A worker syncs an account only while it
//!   holds the account's lease: a key in the leases bucket it created with *create if absent*,
//!   renewed every [`renew_every`](FleetConfig::renew_every) by an update that names the
//!   revision it last wrote (a revision-checked renewal). The bucket's `max_age` is the lease
//!   TTL: a lease no one renews disappears, and only then can another worker create it. A
//!   worker counts its lease valid until `TTL − margin` after it *sent* its last successful
//!   renewal; when that passes without a renewal (NATS unreachable), or a renewal finds
//!   another revision (someone else holds it), the account is removed from the reactor at once.
//! * **Fencing on every checkpoint write.** Before a batch's checkpoint is stored, the lease is
//!   renewed with its revision, and the checkpoint itself is written with the revision of the
//!   checkpoint the worker read when it took the lease (or last wrote). A worker whose lease
//!   moved on fails one of the two and stops the account; it never moves another worker's
//!   checkpoint.
//! * **At least once into the stream, in order per account.** Each event is published with a
//!   `Nats-Msg-Id` of `<account>:<event id>`, or `<account>:<since>:<position in batch>` for
//!   events without an id (typing, receipts, to-device, ...), and the next event of the
//!   account is published only after JetStream acknowledged the previous one. The checkpoint
//!   is stored only after every event of its batch was acknowledged. A failed or unanswered
//!   publish stops the account's publishing at once; the account restarts from its stored
//!   checkpoint (same lease), so what is republished repeats the same ids and JetStream's
//!   duplicate window ([`FleetConfig::duplicate_window`]) drops the copies. The window must
//!   be longer than a takeover (lease TTL plus a sync round trip); the default is two
//!   minutes. A message republished after the window has passed is stored again: that is
//!   the "at least once".
//! * **To-device messages survive a crash too.** The homeserver deletes a batch's to-device
//!   messages (the room keys of encrypted rooms among them) once a sync carries the position
//!   after them, so an account's next sync goes out only once its checkpoint is stored (the
//!   reactor runs with [`acknowledge_checkpoints`](crate::reactor::ReactorConfig::acknowledge_checkpoints)):
//!   a worker that dies in between leaves the server holding them for the next one.
//! * **Credentials** come from the accounts bucket and are never logged (they are not in any
//!   `Debug` output either). Tokens refreshed by the homeserver are written back to the
//!   account's entry, with the entry's revision, before the machine uses them (the reactor's
//!   `on_credentials`); a write that fails keeps the old tokens and is offered again.
//! * **Accounts come and go at run time**: each worker watches the accounts bucket. A new
//!   entry is taken by some worker; a deleted one is stopped and its lease released (its
//!   checkpoint stays, so adding it again resumes); a changed one gets its new credentials.
//! * **Sharing.** Each worker takes free leases up to its fair share,
//!   ⌈accounts ÷ live workers⌉, and gives back leases above it (a worker joining a running
//!   fleet gets its share as the others shed). A worker under its share tries only the
//!   accounts whose lease no one holds, as it last listed the leases bucket (at most once
//!   every [`renew_every`](FleetConfig::renew_every)). Workers wait [`FleetConfig::settle`]
//!   after they start before taking any, so that workers started together see each other.
//!
//! Each message carries the headers `Fleet-Worker` (the worker's id) and `Fleet-Lease` (the
//! revision at which it took the lease): per account, consecutive leases have increasing
//! revisions, so a consumer can tell which worker and which lease wrote each message.
//!
//! # Why async-nats
//!
//! The synchronous `nats` crate is deprecated (its last release, 0.26, says "use async-nats
//! instead"): a new feature should not start on it. `async-nats` is the maintained client: its JetStream KV has *create* (fails if the key exists), *update* with an expected
//! revision, *delete* with an expected revision, buckets with `max_age`, and publishing with
//! `Nats-Msg-Id` returns an acknowledgement future that says whether the message was a
//! duplicate. It declares Rust 1.89 as its minimum and builds here on 1.95. Its
//! `create_key_value` first asks for the account's limits in a shape nats-server 2.9 (Debian's
//! package) does not answer with, so the buckets' streams are created here with the settings
//! it would use, then opened as buckets. It runs on a small tokio runtime owned by the
//! worker (one worker thread); the API of this module is blocking, like the rest of the
//! crate, and tokio was already an optional dependency (of `e2ee`). Its default features are
//! off: only `jetstream`, `kv`, `ring` (TLS to NATS) and `nuid`, which speak to nats-server
//! 2.9 and newer.
//!
//! # Failure of NATS
//!
//! While NATS is unreachable, publishes and renewals fail: accounts stop publishing, and an
//! account whose lease could not be renewed within its TTL is stopped. When NATS is back
//! (the client reconnects by itself), the accounts restart from their checkpoints and free
//! leases are taken again. JetStream's file store keeps the stream, the buckets and the
//! duplicate window across a restart of the server.

mod actor;
mod admin;
mod store;
mod worker;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ruma_common::OwnedUserId;
use serde::{Deserialize, Serialize};

use crate::reactor::ReactorConfig;
use crate::{AccessToken, Config, RefreshToken};

pub use admin::{DurableConsumer, FleetClient, LeaseInfo, StreamMessage};
pub use worker::run;

/// Headers each published message carries besides `Nats-Msg-Id`.
pub mod headers {
    /// The id of the worker that published the message.
    pub const WORKER: &str = "Fleet-Worker";
    /// The lease revision at which that worker took the account (increases per account with
    /// each new lease).
    pub const LEASE: &str = "Fleet-Lease";
}

/// The longest account name or worker id.
pub const MAX_NAME_LEN: usize = 128;

/// Whether `name` can be an account name or a worker id: 1 to [`MAX_NAME_LEN`] characters of
/// `A-Z a-z 0-9 _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One account as stored in the accounts bucket: where it syncs, its credentials and its user
/// (JSON: `{"homeserver": URL, "access_token": ..., "refresh_token": ..., "user_id": ...}`, the
/// last two optional). `Debug` hides the tokens.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountEntry {
    /// The homeserver's base URL.
    pub homeserver: String,
    /// The access token.
    pub access_token: AccessToken,
    /// The refresh token, if the account has one.
    pub refresh_token: Option<RefreshToken>,
    /// The account's user, if known: with sliding sync it names whose leave ends a room
    /// ([`SlidingSyncConfig::user_id`](crate::SlidingSyncConfig::user_id); without it a left
    /// room has no [`Leave`](crate::EventKind::Leave) marker). `/v3/sync` does not need it.
    pub user_id: Option<OwnedUserId>,
}

impl AccountEntry {
    /// An account with an access token and no refresh token.
    pub fn new(homeserver: impl Into<String>, access_token: impl Into<String>) -> Self {
        Self {
            homeserver: homeserver.into(),
            access_token: AccessToken::new(access_token),
            refresh_token: None,
            user_id: None,
        }
    }

    /// Sets the refresh token.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(RefreshToken::new(refresh_token));
        self
    }

    /// Sets the account's user.
    #[must_use]
    pub fn with_user_id(mut self, user_id: OwnedUserId) -> Self {
        self.user_id = Some(user_id);
        self
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let json = EntryJson {
            homeserver: self.homeserver.clone(),
            access_token: self.access_token.expose().to_owned(),
            refresh_token: self.refresh_token.as_ref().map(|t| t.expose().to_owned()),
            user_id: self.user_id.clone(),
        };
        serde_json::to_vec(&json).unwrap_or_default()
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let json: EntryJson = serde_json::from_slice(bytes)?;
        Ok(Self {
            homeserver: json.homeserver,
            access_token: AccessToken::new(json.access_token),
            refresh_token: json.refresh_token.map(RefreshToken::new),
            user_id: json.user_id,
        })
    }
}

impl fmt::Debug for AccountEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountEntry")
            .field("homeserver", &self.homeserver)
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("user_id", &self.user_id)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct EntryJson {
    homeserver: String,
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<OwnedUserId>,
}

/// What happened to a lease of this worker, as reported to [`FleetConfig::on_lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseChangeKind {
    /// The worker took the lease and its account starts syncing here.
    Acquired,
    /// The account stopped syncing here and the lease was given back (shed to another
    /// worker, the account removed, or the worker stopping).
    Released,
    /// The account stopped syncing here because the lease could not be renewed in time or
    /// another worker holds it now.
    Lost,
}

/// A lease change of this worker: when an account started or stopped syncing here. Every
/// `Acquired` is followed by one `Released` or `Lost` (unless the process dies), reported
/// after the account's sync stopped.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LeaseChange {
    /// The account.
    pub account: String,
    /// What happened.
    pub kind: LeaseChangeKind,
    /// The revision at which this worker took the lease.
    pub lease: u64,
    /// When (wall clock): for `Acquired`, just before the account was added to the reactor;
    /// for `Released` and `Lost`, once its sync had ended. The span from one to the other
    /// covers every moment the account was synced here (and, for `Released`, ends before the
    /// lease was given back).
    pub at: SystemTime,
}

/// Called with each lease change, on the worker's thread (keep it short).
pub type OnLease = dyn Fn(&LeaseChange) + Send + Sync;

/// Configuration of a worker (and, for the names, of a [`FleetClient`]).
#[non_exhaustive]
#[derive(Clone)]
pub struct FleetConfig {
    /// The NATS server, `nats://host:port` (or several, comma-separated).
    pub nats_url: String,
    /// This worker's id, unique in the fleet (see [`valid_name`]).
    pub worker_id: String,
    /// The stream of events (default `MATRIX_SYNC`).
    pub stream: String,
    /// The first token of every event subject (default `sync`): `<prefix>.<account>.events`.
    pub subject_prefix: String,
    /// The accounts bucket (default `sync-accounts`).
    pub accounts_bucket: String,
    /// The leases bucket (default `sync-leases`).
    pub leases_bucket: String,
    /// The checkpoints bucket (default `sync-checkpoints`).
    pub checkpoints_bucket: String,
    /// The live workers bucket (default `sync-workers`).
    pub workers_bucket: String,
    /// How long a lease lives without renewal: the `max_age` of the leases bucket (default
    /// 10 s). A dead worker's accounts move after about this long. The first worker (or
    /// [`FleetClient`]) creates the bucket with it; a worker whose TTL is longer than an
    /// existing bucket's `max_age`, or whose `2 × lease_ttl` exceeds the existing stream's
    /// duplicate window, refuses to start ([`FleetError::Config`]).
    pub lease_ttl: Duration,
    /// How often leases are renewed (default 2.5 s); less than a third of the TTL.
    pub renew_every: Duration,
    /// The stream's duplicate window, set when the stream is created (default 2 minutes).
    pub duplicate_window: Duration,
    /// How long a NATS operation (publish and its acknowledgement, a KV write) may take before
    /// it counts as failed (default 5 s).
    pub nats_timeout: Duration,
    /// How long a new worker waits before taking leases (default 2 × `renew_every`).
    pub settle: Duration,
    /// Settings of every account's [`Config`] besides the homeserver, the credentials,
    /// `since` and the sliding sync user ([`AccountEntry::user_id`]), which come from the
    /// buckets.
    pub template: Config,
    /// The reactor's settings (its `on_credentials` is the worker's own, and
    /// [`acknowledge_checkpoints`](ReactorConfig::acknowledge_checkpoints) is always on: an
    /// account's next sync waits until its checkpoint is in the checkpoints bucket).
    pub reactor: ReactorConfig<String>,
    /// Called with each lease change of this worker.
    pub on_lease: Option<Arc<OnLease>>,
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("nats_url", &self.nats_url)
            .field("worker_id", &self.worker_id)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("accounts_bucket", &self.accounts_bucket)
            .field("leases_bucket", &self.leases_bucket)
            .field("checkpoints_bucket", &self.checkpoints_bucket)
            .field("workers_bucket", &self.workers_bucket)
            .field("lease_ttl", &self.lease_ttl)
            .field("renew_every", &self.renew_every)
            .field("duplicate_window", &self.duplicate_window)
            .field("nats_timeout", &self.nats_timeout)
            .field("settle", &self.settle)
            .field("on_lease", &self.on_lease.is_some())
            .finish_non_exhaustive()
    }
}

impl FleetConfig {
    /// The defaults, for the worker `worker_id` on the NATS server `nats_url`.
    pub fn new(nats_url: impl Into<String>, worker_id: impl Into<String>) -> Self {
        let renew_every = Duration::from_millis(2500);
        Self {
            nats_url: nats_url.into(),
            worker_id: worker_id.into(),
            stream: "MATRIX_SYNC".to_owned(),
            subject_prefix: "sync".to_owned(),
            accounts_bucket: "sync-accounts".to_owned(),
            leases_bucket: "sync-leases".to_owned(),
            checkpoints_bucket: "sync-checkpoints".to_owned(),
            workers_bucket: "sync-workers".to_owned(),
            lease_ttl: Duration::from_secs(10),
            renew_every,
            duplicate_window: Duration::from_secs(120),
            nats_timeout: Duration::from_secs(5),
            settle: renew_every * 2,
            template: Config::new("https://template.invalid", "template"),
            reactor: ReactorConfig::new(),
            on_lease: None,
        }
    }

    /// Sets the lease TTL and renewal interval (a quarter of it) together, and the settle
    /// time to two renewals.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self.renew_every = ttl / 4;
        self.settle = self.renew_every * 2;
        self
    }

    /// Sets [`on_lease`](Self::on_lease).
    #[must_use]
    pub fn on_lease(mut self, f: impl Fn(&LeaseChange) + Send + Sync + 'static) -> Self {
        self.on_lease = Some(Arc::new(f));
        self
    }

    /// The subject of `account`'s events.
    pub fn subject(&self, account: &str) -> String {
        format!("{}.{account}.events", self.subject_prefix)
    }

    /// How long before the lease's expiry on the server the worker stops counting on it.
    pub(crate) fn lease_margin(&self) -> Duration {
        (self.lease_ttl / 4).max(Duration::from_millis(100))
    }

    fn validate(&self) -> Result<(), FleetError> {
        let bad =
            |field: &'static str, reason: &'static str| Err(FleetError::Config { field, reason });
        if !valid_name(&self.worker_id) {
            return bad("worker_id", "1 to 128 characters of A-Z a-z 0-9 _ -");
        }
        if !valid_name(&self.stream) {
            return bad("stream", "1 to 128 characters of A-Z a-z 0-9 _ -");
        }
        if !valid_name(&self.subject_prefix) {
            return bad("subject_prefix", "1 to 128 characters of A-Z a-z 0-9 _ -");
        }
        for (field, bucket) in [
            ("accounts_bucket", &self.accounts_bucket),
            ("leases_bucket", &self.leases_bucket),
            ("checkpoints_bucket", &self.checkpoints_bucket),
            ("workers_bucket", &self.workers_bucket),
        ] {
            if !valid_name(bucket) {
                return bad(field, "1 to 128 characters of A-Z a-z 0-9 _ -");
            }
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad(
                "lease_ttl",
                "at least one second (JetStream's max_age resolution)",
            );
        }
        if self.renew_every.is_zero() || self.renew_every * 3 > self.lease_ttl {
            return bad(
                "renew_every",
                "more than zero and at most a third of lease_ttl",
            );
        }
        if self.duplicate_window < self.lease_ttl * 2 {
            return bad(
                "duplicate_window",
                "at least twice lease_ttl, so that a takeover's republished events are \
                 recognised as duplicates",
            );
        }
        if self.nats_timeout.is_zero() {
            return bad("nats_timeout", "more than zero");
        }
        Ok(())
    }
}

/// Why a worker or a [`FleetClient`] could not start, or a worker ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// A field of [`FleetConfig`] is unusable: fix it and start again.
    #[error("invalid fleet configuration: {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The NATS server could not be reached (or refused the connection): check
    /// [`FleetConfig::nats_url`] and that the server runs, then start again.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// JetStream refused or did not answer an operation (is JetStream enabled, `-js`? does a
    /// bucket or the stream exist with other settings?). Named with what was being done; an
    /// administrative call may be retried, a worker start too.
    #[error("JetStream: {what}: {cause}")]
    JetStream {
        /// What was being done.
        what: String,
        /// The client's error.
        cause: String,
    },
    /// An account name that cannot be a KV key and subject token (see [`valid_name`]).
    #[error("invalid account name {0:?}: 1 to 128 characters of A-Z a-z 0-9 _ -")]
    InvalidAccount(String),
    /// The tokio runtime or a thread could not be started (resource limits): retry later.
    #[error("could not start the worker's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The worker's reactor did not start (its configuration), or it ended with a panic.
    #[error("reactor: {0}")]
    Reactor(String),
}

impl FleetError {
    pub(crate) fn js(what: impl Into<String>, cause: impl fmt::Display) -> Self {
        FleetError::JetStream {
            what: what.into(),
            cause: cause.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kv_keys_and_subject_tokens() {
        assert!(valid_name("alice_01-x"));
        for bad in ["", "a.b", "a b", "*", ">", "@a:b", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn entries_round_trip_as_json_and_hide_their_tokens() {
        let entry = AccountEntry::new("http://127.0.0.1:8008", "secret-a")
            .with_refresh_token("secret-r")
            .with_user_id("@alice:example.org".try_into().unwrap());
        let back = AccountEntry::from_json(&entry.to_json()).unwrap();
        assert_eq!(back, entry);
        assert!(
            AccountEntry::from_json(br#"{"homeserver":"h","access_token":"t","user_id":"alice"}"#)
                .is_err(),
            "a user id that is not one is refused"
        );
        let debug = format!("{entry:?}");
        assert!(!debug.contains("secret"), "{debug}");
        let bare = AccountEntry::new("http://h", "t");
        let bare_json = String::from_utf8(bare.to_json()).unwrap();
        assert!(!bare_json.contains("refresh_token"), "{bare_json}");
        assert!(!bare_json.contains("user_id"), "{bare_json}");
        assert_eq!(AccountEntry::from_json(bare_json.as_bytes()).unwrap(), bare);
    }

    #[test]
    fn configuration_is_checked_field_by_field() {
        let ok = FleetConfig::new("nats://127.0.0.1:4222", "w1");
        ok.validate().unwrap();
        let field = |c: FleetConfig| match c.validate() {
            Err(FleetError::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(FleetConfig::new("nats://h", "w.1")), "worker_id");
        let mut c = ok.clone();
        c.renew_every = c.lease_ttl;
        assert_eq!(field(c), "renew_every");
        let mut c = ok.clone();
        c.duplicate_window = c.lease_ttl;
        assert_eq!(field(c), "duplicate_window");
        let c = ok.clone().lease_ttl(Duration::from_millis(500));
        assert_eq!(field(c), "lease_ttl");
        ok.clone()
            .lease_ttl(Duration::from_secs(4))
            .validate()
            .unwrap();
        assert_eq!(ok.subject("alice"), "sync.alice.events");
    }
}
