//! Many accounts on one thread: the reactor (feature `reactor`, on by default).
//!
//! One thread follows any number of accounts, one [`SyncMachine`] each, over non-blocking
//! sockets: `mio` for readiness, HTTP/1.1 by `ureq-proto` (the sans-IO layer under ureq), TLS by
//! rustls' sans-IO `ClientConnection`. It is the loop of the crate's chapter on driving many
//! machines, as a library: the application adds and removes accounts at run time under keys
//! of its own choosing, and receives every account's events tagged with its key.
//!
//! ```no_run
//! use matrix_sync_service::reactor::{self, ReactorConfig};
//! use matrix_sync_service::{Config, EventKind};
//!
//! let reactor = reactor::start(ReactorConfig::new())?;
//! reactor.add("alice".to_owned(), Config::new("https://example.org", "token-a"))?;
//! reactor.add("bob".to_owned(), Config::new("https://example.org", "token-b"))?;
//! for tagged in reactor.events() {
//!     if let EventKind::Checkpoint(checkpoint) = &tagged.event.kind {
//!         // persist checkpoint.next_batch for tagged.account here
//!         # let _ = checkpoint;
//!         # break;
//!     }
//! }
//! reactor.remove(&"bob".to_owned())?;
//! reactor.stop();
//! reactor.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The contract
//!
//! * **Per account, the driver's guarantees.** At most one request in flight; each request's
//!   [`deadline`](crate::OutgoingRequest::deadline) enforced (the transfer is aborted and the
//!   machine told [`TransportErrorKind::TimedOut`](crate::TransportErrorKind::TimedOut)); the
//!   body capped at the account's [`Config::max_body_bytes`] while it is read
//!   ([`BodyTooLarge`](crate::TransportErrorKind::BodyTooLarge)), a response head at 64 KiB,
//!   informational (1xx) answers at 16 per request; statuses are values; no redirect is followed (discovery follows its own, in the
//!   machine). One keep-alive HTTP/1.1 connection per account, reopened when the origin of a
//!   request changes (after server discovery).
//! * **No account delays another.** Nothing on the loop thread waits for a peer: sockets are
//!   non-blocking, a name is looked up on a thread of its own, an account gets at most
//!   256 KiB of reads per turn of the loop and then waits behind the others, and parsing is
//!   linear in the bytes read. A server that
//!   trickles its answer, or never answers, costs its own account its deadline and nothing
//!   else. At most [`ReactorConfig::max_connecting`] connections are being opened at once
//!   (a listener's accept queue is short); the others wait their turn.
//! * **Outputs.** [`Reactor::events`] is bounded: while it is full the loop waits, for every
//!   account (backpressure, never loss); read it without pause. [`errors`](Reactor::errors)
//!   and [`states`](Reactor::states) never slow the loop: when full, the oldest item is
//!   dropped (errors are counted in [`dropped_errors`](Reactor::dropped_errors)).
//! * **Orderings that matter.** One account's events come in the machine's order, each
//!   batch ending with its [`Checkpoint`](crate::Checkpoint): persist the checkpoint of a key
//!   only after handling the events of that key before it. Events of different accounts
//!   interleave in no promised order. Commands ([`add`](Reactor::add),
//!   [`remove`](Reactor::remove), [`set_credentials`](Reactor::set_credentials),
//!   [`checkpoint_stored`](Reactor::checkpoint_stored)) take effect in the order they were
//!   called, so a remove followed by an add of the same key starts a fresh machine after the
//!   old one ended. Events of a removed account that were already in the channel stay there;
//!   none is added after its key came on [`ended`](Reactor::ended).
//! * **Acknowledged checkpoints** (opt-in: [`ReactorConfig::acknowledge_checkpoints`], the
//!   driver's [`acknowledge_checkpoints`](crate::DriverConfig::acknowledge_checkpoints) per
//!   account): after handing out a checkpoint, an account sends nothing until the application
//!   says it stored it ([`checkpoint_stored`](Reactor::checkpoint_stored) with its key), so
//!   that a crash between reading a batch and storing its checkpoint loses none of the
//!   batch's to-device messages. Only that account waits; the others go on. One never
//!   acknowledged waits for good, until it is removed.
//! * **Removing an account** aborts its request in flight, closes its socket and stops its
//!   machine: its key then comes on [`ended`](Reactor::ended) (never dropped), when every
//!   event of it is already in [`events`](Reactor::events); its last state,
//!   [`Stopped`](crate::SyncState::Stopped), comes on [`states`](Reactor::states). Its key may
//!   be added again at once.
//! * **Refreshed credentials** are handed to [`ReactorConfig::on_credentials`] on the loop
//!   thread before they are used (store them durably; every account waits meanwhile, so keep
//!   it short); without it they live in memory only.
//! * **TLS and proxies as in the driver:** the roots of [`ReactorConfig::trust_roots`] plus
//!   [`ReactorConfig::extra_ca`]; with [`ReactorConfig::proxy_from_env`] the proxy named by
//!   `ALL_PROXY`, `HTTPS_PROXY` or `HTTP_PROXY` (read once, at start, with `NO_PROXY`), which
//!   must be an `http://` proxy: `https` origins through a `CONNECT` tunnel, plain `http`
//!   ones by absolute-form requests to the proxy, as curl does.
//! * **Name resolution** runs on a short-lived thread per look-up (an IP literal needs none),
//!   and an answer is reused for a minute; a look-up that fails is a
//!   [`Dns`](crate::TransportErrorKind::Dns) failure of the request that needed it.
//! * [`stop`](Reactor::stop) ends everything: every machine stopped, every socket closed,
//!   the channels disconnected once the thread ends. Dropping the handle stops it too.
//! * A panic on the loop thread is a bug in this crate: it ends the reactor (every account
//!   stopped and reported ended, as far as it can be), the channels disconnect and
//!   [`join`](Reactor::join) returns [`ReactorError::Panicked`].

mod conn;
mod dns;
mod event_loop;
mod proxy;
mod transfer;

use std::any::Any;
use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use mio::{Poll, Waker};

use self::dns::Resolver;
use self::event_loop::{Command, Loop, Outputs, WAKER};
use self::proxy::HttpProxy;
use crate::lossy::Lossy;
use crate::tls::{CaCertificate, CaPemError, TrustRoots};
use crate::{
    defaults, Config, ConfigError, Credentials, Event, InputError, SyncError, SyncMachine,
    SyncState,
};

/// What an application may use as an account's key: a user id, a lease id, a number. Every
/// type that is `Clone + Eq + Hash + Debug + Send + 'static` is one.
pub trait AccountKey: Clone + Eq + Hash + Debug + Send + 'static {}

impl<K: Clone + Eq + Hash + Debug + Send + 'static> AccountKey for K {}

/// An event of one account.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AccountEvent<K> {
    /// The key the account was added with.
    pub account: K,
    /// The event, as the account's [`SyncMachine`] gave it.
    pub event: Event,
}

/// A failure report of one account; its machine is already backing off and will retry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountError<K> {
    /// The key the account was added with.
    pub account: K,
    /// What failed, and what the machine does about it.
    pub error: SyncError,
}

/// A state change of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountState<K> {
    /// The key the account was added with.
    pub account: K,
    /// Its new state; [`SyncState::Stopped`] is its last, after a remove or a stop.
    pub state: SyncState,
}

/// Stores one account's refreshed credentials durably; called on the reactor's thread before
/// they are used. An `Err` (its text is reported) keeps the old credentials and offers the new
/// ones again after the maximum backoff. See [`ReactorConfig::on_credentials`].
pub type StoreAccountCredentials<K> =
    dyn Fn(&K, &Credentials) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync;

/// What the reactor itself uses: its channels, where refreshed credentials are stored, how it
/// connects. Each account's own configuration is the [`Config`] given to [`Reactor::add`].
#[non_exhaustive]
pub struct ReactorConfig<K = String> {
    /// Capacity of the bounded `events` channel, shared by every account: while it is full the
    /// loop waits (backpressure, never loss).
    pub event_channel_capacity: usize,
    /// Capacity of the `errors` channel (oldest dropped when full).
    pub error_channel_capacity: usize,
    /// Capacity of the `states` channel (oldest dropped when full).
    pub state_channel_capacity: usize,
    /// Called with an account's refreshed credentials before they are used (see
    /// [`SyncMachine::poll_credentials`]), on the reactor's thread: every account waits
    /// while it runs, and a panic in it ends the reactor ([`ReactorError::Panicked`]).
    /// Without it they are used at once and live only in memory.
    pub on_credentials: Option<Arc<StoreAccountCredentials<K>>>,
    /// Route requests through the proxy named by `ALL_PROXY`, `HTTPS_PROXY` or `HTTP_PROXY`
    /// (as the driver reads them, `NO_PROXY` included), read once at start. On by default.
    /// It must be an `http://` proxy: another kind refuses the start
    /// ([`ConfigError::Invalid`], field `proxy_from_env`).
    pub proxy_from_env: bool,
    /// The certificate authorities trusted for `https` (the bundled web roots by default).
    pub trust_roots: TrustRoots,
    /// CA certificates trusted besides [`trust_roots`](Self::trust_roots); with
    /// [`TrustRoots::Platform`] a start is refused ([`ConfigError::Invalid`], field
    /// `extra_ca`), as in the driver.
    pub extra_ca: Vec<CaCertificate>,
    /// At most this many connections are being opened at once; the others wait their turn.
    /// A listener's accept queue is short (Synapse's is 50): a thousand SYNs at once overflow
    /// it, and each one dropped costs a retransmission a second or more later.
    pub max_connecting: usize,
    /// After handing an account's checkpoint to [`Reactor::events`], send nothing more for
    /// that account until the application says it stored it ([`Reactor::checkpoint_stored`]
    /// with its key). Off by default: then the account's next sync goes out as soon as the
    /// checkpoint is in the channel. The same setting as the driver's
    /// [`DriverConfig::acknowledge_checkpoints`](crate::DriverConfig::acknowledge_checkpoints),
    /// for every account of the reactor.
    ///
    /// Why it exists: the server deletes to-device messages (among them the room keys of
    /// end-to-end encryption) once a later sync carries the position after them (`/v3/sync`'s
    /// `since`, sliding sync's to-device cursor). Without acknowledgements, an application
    /// that crashes with a batch read but its checkpoint not yet stored restarts that account
    /// from an older checkpoint and gets the room events again, but not the batch's to-device
    /// messages: the server deleted them when the account's next sync went out. With them on,
    /// to-device messages are delivered at least once across crashes too.
    ///
    /// Only the account that waits is held: the others go on syncing. An application that
    /// never acknowledges stalls that account for good (no request, no error: it waits in
    /// whatever state it reached); [`Reactor::remove`] and [`Reactor::stop`] end a waiting
    /// account as any other.
    pub acknowledge_checkpoints: bool,
}

impl<K> Default for ReactorConfig<K> {
    fn default() -> Self {
        Self {
            event_channel_capacity: defaults::EVENT_CHANNEL_CAPACITY,
            error_channel_capacity: defaults::ERROR_CHANNEL_CAPACITY,
            state_channel_capacity: 1024,
            on_credentials: None,
            proxy_from_env: true,
            trust_roots: TrustRoots::default(),
            extra_ca: Vec::new(),
            max_connecting: 32,
            acknowledge_checkpoints: false,
        }
    }
}

impl<K> Clone for ReactorConfig<K> {
    fn clone(&self) -> Self {
        Self {
            event_channel_capacity: self.event_channel_capacity,
            error_channel_capacity: self.error_channel_capacity,
            state_channel_capacity: self.state_channel_capacity,
            on_credentials: self.on_credentials.clone(),
            proxy_from_env: self.proxy_from_env,
            trust_roots: self.trust_roots,
            extra_ca: self.extra_ca.clone(),
            max_connecting: self.max_connecting,
            acknowledge_checkpoints: self.acknowledge_checkpoints,
        }
    }
}

impl<K> Debug for ReactorConfig<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorConfig")
            .field("event_channel_capacity", &self.event_channel_capacity)
            .field("error_channel_capacity", &self.error_channel_capacity)
            .field("state_channel_capacity", &self.state_channel_capacity)
            .field("on_credentials", &self.on_credentials.is_some())
            .field("proxy_from_env", &self.proxy_from_env)
            .field("trust_roots", &self.trust_roots)
            .field("extra_ca", &self.extra_ca.len())
            .field("max_connecting", &self.max_connecting)
            .field("acknowledge_checkpoints", &self.acknowledge_checkpoints)
            .finish()
    }
}

impl<K> ReactorConfig<K> {
    /// The defaults, to change field by field.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`on_credentials`](Self::on_credentials): `store` must have written both tokens
    /// of the account durably when it returns `Ok`.
    #[must_use]
    pub fn on_credentials(
        mut self,
        store: impl Fn(&K, &Credentials) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.on_credentials = Some(Arc::new(store));
        self
    }

    /// Sets [`trust_roots`](Self::trust_roots).
    #[must_use]
    pub fn trust_roots(mut self, roots: TrustRoots) -> Self {
        self.trust_roots = roots;
        self
    }

    /// Sets [`proxy_from_env`](Self::proxy_from_env).
    #[must_use]
    pub fn proxy_from_env(mut self, on: bool) -> Self {
        self.proxy_from_env = on;
        self
    }

    /// Sets [`acknowledge_checkpoints`](Self::acknowledge_checkpoints).
    #[must_use]
    pub fn acknowledge_checkpoints(mut self, on: bool) -> Self {
        self.acknowledge_checkpoints = on;
        self
    }

    /// Adds every certificate of `pem` to [`extra_ca`](Self::extra_ca), as
    /// [`DriverConfig::add_ca_pem`](crate::DriverConfig::add_ca_pem) does: a PEM that holds
    /// no usable certificate is refused with its cause and adds nothing.
    pub fn add_ca_pem(mut self, pem: &[u8]) -> Result<Self, CaPemError> {
        self.extra_ca.extend(CaCertificate::from_pem(pem)?);
        Ok(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        crate::config::check_nonzero(&[
            ("event_channel_capacity", self.event_channel_capacity),
            ("error_channel_capacity", self.error_channel_capacity),
            ("state_channel_capacity", self.state_channel_capacity),
            ("max_connecting", self.max_connecting),
        ])?;
        crate::tls::check_extra_ca(self.trust_roots, &self.extra_ca)
    }
}

/// Why [`start`] returned no reactor. Nothing was started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A field of the configuration is unusable (or the environment names a proxy the
    /// reactor cannot use): fix it and start again.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The operating system refused the poller, its waker or the thread (resource limits):
    /// retry later or raise the limit.
    #[error("could not set up the reactor: {0}")]
    Io(#[source] io::Error),
    /// The TLS configuration could not be built (the platform's verifier did not start):
    /// use [`TrustRoots::Bundled`], or fix the platform's store.
    #[error("could not set up TLS: {0}")]
    Tls(String),
}

/// Why [`Reactor::add`] refused an account. Nothing was added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// An account with this key is already followed: remove it first, or choose another key.
    #[error("an account with this key is already in the reactor")]
    Duplicate,
    /// The account's configuration is unusable ([`SyncMachine::new`] refused it): fix it and
    /// add again.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The reactor has ended (stopped, or its thread panicked): start a new one.
    #[error("the reactor has stopped")]
    Stopped,
}

/// Why a command for one account ([`Reactor::remove`], [`Reactor::set_credentials`],
/// [`Reactor::checkpoint_stored`]) was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountCommandError {
    /// No account with this key is followed (never added, or already removed).
    #[error("no account with this key is in the reactor")]
    Unknown,
    /// The credentials could not go in a request (see [`InputError::UnusableCredentials`]).
    #[error(transparent)]
    Input(#[from] InputError),
    /// The reactor has ended (stopped, or its thread panicked).
    #[error("the reactor has stopped")]
    Stopped,
}

/// How the reactor's thread ended, from [`Reactor::join`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReactorError {
    /// The thread panicked (a bug in this crate): every account ended with it.
    #[error("the reactor thread panicked: {0}")]
    Panicked(String),
}

/// A running reactor: its thread, its channels, and the commands to add and remove accounts.
///
/// Dropping it stops the reactor (without waiting for the thread; use [`join`](Self::join)).
pub struct Reactor<K: AccountKey = String> {
    events: Receiver<AccountEvent<K>>,
    errors: Receiver<AccountError<K>>,
    states: Receiver<AccountState<K>>,
    ended: Receiver<K>,
    shared: Arc<Shared<K>>,
    thread: Mutex<Option<JoinHandle<Result<(), ReactorError>>>>,
}

struct Shared<K> {
    /// The keys added and not removed, as the application sees them.
    keys: Mutex<HashSet<K>>,
    commands: Sender<Command<K>>,
    waker: Arc<Waker>,
    /// Dropped by `stop()`: a loop waiting to send an event wakes at once.
    stop: Mutex<Option<Sender<()>>>,
    dropped_errors: Arc<AtomicU64>,
    connections_opened: Arc<AtomicU64>,
}

/// Starts a reactor with no account: its thread runs until [`Reactor::stop`].
///
/// Reads the proxy environment once, now (if [`ReactorConfig::proxy_from_env`]).
pub fn start<K: AccountKey>(config: ReactorConfig<K>) -> Result<Reactor<K>, StartError> {
    config.validate()?;
    let proxy = if config.proxy_from_env {
        HttpProxy::from_env().map_err(|reason| ConfigError::Invalid {
            field: "proxy_from_env",
            reason,
        })?
    } else {
        None
    };
    let tls = conn::client_config(config.trust_roots, &config.extra_ca)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let poll = Poll::new().map_err(StartError::Io)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(StartError::Io)?);
    let (event_tx, event_rx) = bounded(config.event_channel_capacity);
    let (error_tx, error_rx) = bounded(config.error_channel_capacity);
    let (state_tx, state_rx) = bounded(config.state_channel_capacity);
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let (command_tx, command_rx) = crossbeam_channel::unbounded();
    let (ended_tx, ended_rx) = crossbeam_channel::unbounded();
    let dropped_errors = Arc::new(AtomicU64::new(0));
    let connections_opened = Arc::new(AtomicU64::new(0));
    let out = Outputs {
        events: event_tx,
        errors: Lossy::new(error_tx, &error_rx, Some(dropped_errors.clone())),
        states: Lossy::new(state_tx, &state_rx, None),
        store: config.on_credentials.clone(),
        connections_opened: connections_opened.clone(),
        ended: ended_tx,
    };
    let mut event_loop = Loop::new(
        poll,
        command_rx,
        stop_rx,
        out,
        tls,
        proxy,
        Resolver::new(waker.clone()),
        config.max_connecting,
        config.acknowledge_checkpoints,
    );
    let thread = thread::Builder::new()
        .name("matrix-sync-reactor".to_owned())
        .spawn(move || {
            panic::catch_unwind(AssertUnwindSafe(|| event_loop.run())).map_err(|payload| {
                let message = panic_message(payload);
                log::error!("reactor thread panicked: {message}");
                // Every account still ends, as far as the loop's state allows.
                let _ = panic::catch_unwind(AssertUnwindSafe(|| event_loop.shut_down()));
                ReactorError::Panicked(message)
            })
        })
        .map_err(StartError::Io)?;
    Ok(Reactor {
        events: event_rx,
        errors: error_rx,
        states: state_rx,
        ended: ended_rx,
        shared: Arc::new(Shared {
            keys: Mutex::new(HashSet::new()),
            commands: command_tx,
            waker,
            stop: Mutex::new(Some(stop_tx)),
            dropped_errors,
            connections_opened,
        }),
        thread: Mutex::new(Some(thread)),
    })
}

impl<K: AccountKey> Reactor<K> {
    /// Follows a new account under `key`: its machine is made now (the configuration
    /// validated) and starts syncing on the reactor's thread at once. Callable from any
    /// thread. Refused for a key already followed.
    pub fn add(&self, key: K, config: Config) -> Result<(), AddError> {
        let machine = SyncMachine::new(config, Instant::now())?;
        if lock(&self.shared.stop).is_none() {
            return Err(AddError::Stopped);
        }
        let mut keys = lock(&self.shared.keys);
        if keys.contains(&key) {
            return Err(AddError::Duplicate);
        }
        self.shared
            .send(Command::Add(key.clone(), Box::new(machine)))
            .map_err(|()| AddError::Stopped)?;
        keys.insert(key);
        Ok(())
    }

    /// Ends the account of `key`: its request in flight aborted, its socket closed, its
    /// machine stopped; then its key comes on [`ended`](Self::ended) and its `Stopped` state
    /// on [`states`](Self::states). Returns once asked (the loop does it next); the key may
    /// be added again at once.
    pub fn remove(&self, key: &K) -> Result<(), AccountCommandError> {
        let mut keys = lock(&self.shared.keys);
        if !keys.contains(key) {
            return Err(AccountCommandError::Unknown);
        }
        self.shared
            .send(Command::Remove(key.clone()))
            .map_err(|()| AccountCommandError::Stopped)?;
        keys.remove(key);
        Ok(())
    }

    /// Replaces the credentials of the account of `key` (see
    /// [`SyncMachine::set_credentials`]): they take effect on its next request, and an
    /// account waiting after a refusal retries at once.
    pub fn set_credentials(
        &self,
        key: &K,
        credentials: Credentials,
    ) -> Result<(), AccountCommandError> {
        self.command(key, credentials, false)
    }

    /// Replaces the access token of the account of `key`, keeping its refresh token (see
    /// [`SyncMachine::set_access_token`]).
    pub fn set_access_token(
        &self,
        key: &K,
        access_token: impl Into<String>,
    ) -> Result<(), AccountCommandError> {
        self.command(key, Credentials::new(access_token), true)
    }

    fn command(
        &self,
        key: &K,
        credentials: Credentials,
        keep_refresh_token: bool,
    ) -> Result<(), AccountCommandError> {
        if !credentials.is_usable() {
            return Err(InputError::UnusableCredentials.into());
        }
        let keys = lock(&self.shared.keys);
        if !keys.contains(key) {
            return Err(AccountCommandError::Unknown);
        }
        self.shared
            .send(Command::SetCredentials(
                key.clone(),
                credentials,
                keep_refresh_token,
            ))
            .map_err(|()| AccountCommandError::Stopped)
    }

    /// With [`ReactorConfig::acknowledge_checkpoints`]: the application stored the oldest
    /// checkpoint of the account of `key` that it received and did not acknowledge yet (call
    /// it once per checkpoint, in order, after storing it); the account's next request may go
    /// out. Callable from any thread; returns once asked (the loop does it next). Without the
    /// setting, or with no checkpoint of the account waiting, it changes nothing (the loop
    /// logs it).
    ///
    /// Acknowledgements count per account as added: a [`remove`](Self::remove) forgets those
    /// still owed, and one sent after the key was added again counts for the new account.
    pub fn checkpoint_stored(&self, key: &K) -> Result<(), AccountCommandError> {
        let keys = lock(&self.shared.keys);
        if !keys.contains(key) {
            return Err(AccountCommandError::Unknown);
        }
        self.shared
            .send(Command::CheckpointStored(key.clone()))
            .map_err(|()| AccountCommandError::Stopped)
    }

    /// The keys followed now (added and not removed), in no order.
    pub fn accounts(&self) -> Vec<K> {
        lock(&self.shared.keys).iter().cloned().collect()
    }

    /// Every account's events, each with its key: per account in the machine's order.
    /// Bounded, shared by every account: while nobody receives, the loop waits. Disconnected
    /// once the reactor ended.
    pub fn events(&self) -> &Receiver<AccountEvent<K>> {
        &self.events
    }

    /// Every account's failure reports. Never slows the loop: when full, the oldest is
    /// dropped and counted in [`dropped_errors`](Self::dropped_errors).
    pub fn errors(&self) -> &Receiver<AccountError<K>> {
        &self.errors
    }

    /// Every account's state changes, ending with `Stopped` for a removed account (oldest
    /// dropped when nobody reads them).
    pub fn states(&self) -> &Receiver<AccountState<K>> {
        &self.states
    }

    /// The key of each account that ended, once: after [`remove`](Self::remove), and for
    /// every account left at [`stop`](Self::stop). When a key comes here, every event of that
    /// account is already in [`events`](Self::events) (perhaps not yet received): nothing
    /// more of it follows. Never drops an item (one per account); disconnected once the
    /// reactor ended.
    pub fn ended(&self) -> &Receiver<K> {
        &self.ended
    }

    /// How many error reports were dropped because the `errors` channel was full.
    pub fn dropped_errors(&self) -> u64 {
        self.shared.dropped_errors.load(Ordering::Relaxed)
    }

    /// How many connections the reactor opened since it started (a keep-alive connection
    /// serves one account's requests one after the other).
    pub fn connections_opened(&self) -> u64 {
        self.shared.connections_opened.load(Ordering::Relaxed)
    }

    /// Stops the reactor: every account's request aborted, every machine stopped; the
    /// channels disconnect once the thread ended. Idempotent, callable from any thread.
    pub fn stop(&self) {
        drop(lock(&self.shared.stop).take());
        let _ = self.shared.waker.wake();
    }

    /// Waits for the reactor's thread to end (call [`stop`](Self::stop) first, or it runs on).
    /// `Err` if it panicked. Later calls return `Ok(())`.
    pub fn join(&self) -> Result<(), ReactorError> {
        let thread = lock(&self.thread).take();
        match thread.map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(payload)) => Err(ReactorError::Panicked(panic_message(payload))),
        }
    }

    /// True once the reactor's thread has ended.
    pub fn is_finished(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }
}

impl<K: AccountKey> Drop for Reactor<K> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<K: AccountKey> Debug for Reactor<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("accounts", &lock(&self.shared.keys).len())
            .finish_non_exhaustive()
    }
}

impl<K> Shared<K> {
    /// Queues a command and wakes the loop; `Err` once the loop has ended.
    fn send(&self, command: Command<K>) -> Result<(), ()> {
        self.commands.send(command).map_err(|_| ())?;
        self.waker.wake().map_err(|_| ())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> Config {
        // A port nothing listens on: requests fail with Connect and back off.
        Config::new("http://127.0.0.1:9", "token")
    }

    #[test]
    fn keys_are_the_application_s_duplicates_and_unknown_keys_are_refused() {
        let reactor: Reactor<u64> = start(ReactorConfig::new().proxy_from_env(false)).unwrap();
        reactor.add(7u64, config()).unwrap();
        assert!(matches!(
            reactor.add(7u64, config()),
            Err(AddError::Duplicate)
        ));
        let mut invalid = config();
        invalid.max_body_bytes = 0;
        assert!(matches!(
            reactor.add(8u64, invalid),
            Err(AddError::Config(_))
        ));
        assert!(matches!(
            reactor.remove(&8),
            Err(AccountCommandError::Unknown)
        ));
        assert!(matches!(
            reactor.set_access_token(&7, ""),
            Err(AccountCommandError::Input(InputError::UnusableCredentials))
        ));
        assert_eq!(reactor.accounts(), [7]);

        // Removed: it ends, reported once on `ended`, its last state Stopped.
        reactor.remove(&7).unwrap();
        assert_eq!(reactor.ended().recv_timeout(Duration::from_secs(10)), Ok(7));
        let last = reactor
            .states()
            .iter()
            .find(|s| s.state == SyncState::Stopped)
            .expect("a Stopped state");
        assert_eq!(last.account, 7);
        assert!(reactor.accounts().is_empty());

        // The same key again, then a stop: it ends with the reactor.
        reactor.add(7u64, config()).unwrap();
        reactor.stop();
        reactor.join().unwrap();
        assert!(reactor.is_finished());
        assert_eq!(reactor.ended().try_iter().collect::<Vec<_>>(), [7]);
        assert!(matches!(
            reactor.add(9u64, config()),
            Err(AddError::Stopped)
        ));
        assert!(reactor.events().recv().is_err(), "disconnected once ended");
    }

    #[test]
    fn a_failing_account_reports_its_errors_tagged_with_its_key() {
        let reactor: Reactor<String> = start(ReactorConfig::new().proxy_from_env(false)).unwrap();
        reactor.add("refused".to_owned(), config()).unwrap();
        let error = reactor
            .errors()
            .recv_timeout(Duration::from_secs(10))
            .expect("a failure report");
        assert_eq!(error.account, "refused");
        assert!(
            matches!(
                error.error.failure,
                crate::Failure::Transport(crate::TransportFailure {
                    kind: crate::TransportErrorKind::Connect,
                    ..
                })
            ),
            "{:?}",
            error.error.failure
        );
    }

    #[test]
    fn a_request_that_fails_as_it_starts_holds_up_no_retry() {
        // Unresolvable (failed off the loop thread), and refused at connect (multicast, at once
        // on most systems): each fails again at its backoff pace, not after a deadline.
        let reactor: Reactor<&str> = start(ReactorConfig::new().proxy_from_env(false)).unwrap();
        for (key, url) in [
            ("unresolvable", "http://no-such-host.invalid"),
            ("unconnectable", "http://[ff02::1]:9"),
        ] {
            let mut config = Config::new(url, "token");
            config.backoff.initial = Duration::from_millis(100);
            config.allow_insecure_http = true;
            reactor.add(key, config).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut attempts = std::collections::HashMap::new();
        while attempts.len() < 2 || attempts.values().any(|&n| n < 2) {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = reactor
                .errors()
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("attempts so far {attempts:?}: {e}"));
            *attempts.entry(error.account).or_insert(0) += 1;
        }
    }

    #[test]
    fn extra_cas_with_the_platform_s_roots_are_refused_at_start() {
        let der = webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].as_ref();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            proxy::base64(der)
        );
        let options = ReactorConfig::<String>::new()
            .add_ca_pem(pem.as_bytes())
            .unwrap();
        assert_eq!(options.extra_ca.len(), 1);
        // With the bundled roots, an extra CA is fine.
        let reactor = start(options.clone().proxy_from_env(false)).unwrap();
        reactor.stop();
        reactor.join().unwrap();
        let refused = start(options.trust_roots(TrustRoots::Platform));
        assert!(matches!(
            refused,
            Err(StartError::Config(ConfigError::Invalid {
                field: "extra_ca",
                ..
            }))
        ));
    }
}
