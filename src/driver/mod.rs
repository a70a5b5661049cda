//! The blocking driver: one thread running `ureq`, feeding a [`SyncMachine`] and publishing
//! what it yields over `crossbeam-channel`.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::tls::{self, CaCertificate, CaPemError, TrustRoots};
use crate::{
    defaults, Config, ConfigError, Credentials, Event, InputError, SyncError, SyncMachine,
    SyncState,
};

const STATE_CHANNEL_CAPACITY: usize = 64;

mod resolve;
mod run;
mod stage;
mod transport;

use crate::lossy::Lossy;
pub use resolve::LiteralFirst;
use run::{Driver, SetCredentials};
use stage::Stage;

/// What reaches the `errors` channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A request failed; the service is already backing off and will retry.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The driver thread panicked (a bug in this crate); the service has ended.
    #[error("the sync driver thread panicked: {0}")]
    Panicked(String),
    /// The end-to-end encryption stage failed a step (feature `e2ee`); it goes on as
    /// [`crate::e2ee`] describes.
    #[cfg(feature = "e2ee")]
    #[error(transparent)]
    E2ee(crate::E2eeError),
}

/// A running sync service: one driver thread, its channels, and `stop`.
///
/// Dropping it stops the service (without waiting for the thread; use
/// [`join`](Self::join) for that).
pub struct SyncService {
    events: Receiver<Event>,
    errors: Receiver<ServiceError>,
    states: Receiver<SyncState>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<(), ServiceError>>>>,
}

struct Shared {
    /// Dropped by `stop()`: every `select!` on the receiving side wakes at once.
    stop: Mutex<Option<Sender<()>>>,
    /// Credentials set by the application, for the driver thread to put in force.
    credentials: Sender<SetCredentials>,
    /// Checkpoints the application stored ([`DriverConfig::acknowledge_checkpoints`]).
    acks: Sender<()>,
    /// A clone of the driver's agent, to abort its in-flight request on stop.
    agent: Mutex<Option<ureq::Agent>>,
    dropped_errors: Arc<AtomicU64>,
    state: Mutex<SyncState>,
}

/// Stores refreshed credentials durably; called on the driver thread before they are used.
/// An `Err` (its text is reported) keeps the old credentials and offers the new ones again
/// after the maximum backoff. See [`DriverConfig::on_credentials`].
pub type StoreCredentials =
    dyn Fn(&Credentials) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync;

/// What only the driver uses: the capacities of its channels, where refreshed credentials
/// are stored, and how its agent connects (proxy, TLS roots). The machine's own
/// configuration is [`Config`].
#[derive(Clone)]
#[non_exhaustive]
pub struct DriverConfig {
    /// Capacity of the bounded `events` channel: while it is full the driver waits
    /// (backpressure, never loss).
    pub event_channel_capacity: usize,
    /// Capacity of the `errors` channel (oldest dropped when full).
    pub error_channel_capacity: usize,
    /// Called with refreshed credentials before they are used (see
    /// [`SyncMachine::poll_credentials`]). Without it they are used at once and live only in
    /// memory: a restart then needs a new login if the refresh token rotated.
    pub on_credentials: Option<Arc<StoreCredentials>>,
    /// Route requests through the proxy named by `HTTPS_PROXY`, `HTTP_PROXY` or `ALL_PROXY`
    /// (as curl reads them, `NO_PROXY` included), read once at start. On by default; off means
    /// always direct. Ignored with [`agent`](Self::agent).
    ///
    /// An HTTP proxy is asked for a `CONNECT` tunnel for every request, a plain `http://`
    /// homeserver's included (ureq's choice; curl sends those in absolute form instead). A
    /// proxy that tunnels only to port 443, as many forward proxies are set up, refuses a
    /// plain-http homeserver on another port: each sync then fails as a
    /// [`TransportErrorKind::Connect`](crate::TransportErrorKind::Connect) whose detail names
    /// the `CONNECT`, and the service backs off. Use `https`, or put the homeserver in
    /// `NO_PROXY`.
    pub proxy_from_env: bool,
    /// The certificate authorities trusted for `https`: the bundled web roots (the default)
    /// or the platform's store, see [`TrustRoots`]. Ignored with [`agent`](Self::agent).
    pub trust_roots: TrustRoots,
    /// CA certificates trusted besides [`trust_roots`](Self::trust_roots), for a homeserver
    /// whose certificate a private CA signed; added with [`add_ca_pem`](Self::add_ca_pem).
    /// With [`TrustRoots::Bundled`] both are trusted; with [`TrustRoots::Platform`] a start
    /// is refused ([`ConfigError::Invalid`], field `extra_ca`: the platform verifier takes
    /// no extra roots here). Ignored with [`agent`](Self::agent).
    pub extra_ca: Vec<CaCertificate>,
    /// The application's own agent (its proxy, TLS roots, resolver) instead of the driver's:
    /// then [`proxy_from_env`](Self::proxy_from_env), [`trust_roots`](Self::trust_roots) and
    /// [`extra_ca`](Self::extra_ca) are ignored, the agent's own settings apply.
    /// The guarantees stay: every request is sent with statuses as values, no redirects
    /// followed, its deadline, and the body cap. [`SyncService::stop`] shuts this agent down
    /// to abort the request in flight, and clones share its pool: give the service an agent
    /// of its own.
    pub agent: Option<ureq::Agent>,
    /// Hold every request after handing a checkpoint to the consumer until the application
    /// says it stored it ([`SyncService::checkpoint_stored`]). Off by default: then the next
    /// sync goes out as soon as the checkpoint is in the `events` channel.
    ///
    /// Why it exists: the server deletes to-device messages once a later sync carries the
    /// position after them (`/v3/sync`'s `since`, sliding sync's to-device cursor). Without
    /// acknowledgements, a consumer that crashes with a batch still in the channel (read but
    /// its checkpoint not yet stored) restarts from an older checkpoint and gets the room
    /// events again, but not the batch's to-device messages: the server deleted them. With
    /// them on, to-device messages are delivered at least once across crashes too.
    pub acknowledge_checkpoints: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            event_channel_capacity: defaults::EVENT_CHANNEL_CAPACITY,
            error_channel_capacity: defaults::ERROR_CHANNEL_CAPACITY,
            on_credentials: None,
            proxy_from_env: true,
            trust_roots: TrustRoots::default(),
            extra_ca: Vec::new(),
            agent: None,
            acknowledge_checkpoints: false,
        }
    }
}

impl std::fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverConfig")
            .field("event_channel_capacity", &self.event_channel_capacity)
            .field("error_channel_capacity", &self.error_channel_capacity)
            .field("on_credentials", &self.on_credentials.is_some())
            .field("proxy_from_env", &self.proxy_from_env)
            .field("trust_roots", &self.trust_roots)
            .field("extra_ca", &self.extra_ca.len())
            .field("agent", &self.agent.is_some())
            .field("acknowledge_checkpoints", &self.acknowledge_checkpoints)
            .finish()
    }
}

impl DriverConfig {
    /// The defaults, to change field by field.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`on_credentials`](Self::on_credentials): `store` must have written both tokens
    /// durably when it returns `Ok`.
    #[must_use]
    pub fn on_credentials(
        mut self,
        store: impl Fn(&Credentials) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
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

    /// Adds every certificate of `pem` (the CA file of a private deployment, one or more
    /// `BEGIN CERTIFICATE` sections) to [`extra_ca`](Self::extra_ca). Checked now: a PEM
    /// that holds no certificate, is cut, or holds one that cannot be a trust root is
    /// refused with its cause ([`CaPemError`]) and adds nothing.
    ///
    /// ```
    /// # use matrix_sync_service::{CaPemError, DriverConfig};
    /// let refused = DriverConfig::default().add_ca_pem(b"not a certificate");
    /// assert!(matches!(refused, Err(CaPemError::NoCertificate)));
    /// ```
    pub fn add_ca_pem(mut self, pem: &[u8]) -> Result<Self, CaPemError> {
        self.extra_ca.extend(CaCertificate::from_pem(pem)?);
        Ok(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        crate::config::check_nonzero(&[
            ("event_channel_capacity", self.event_channel_capacity),
            ("error_channel_capacity", self.error_channel_capacity),
        ])?;
        if self.agent.is_some() {
            // The agent's own TLS settings apply.
            return Ok(());
        }
        tls::check_extra_ca(self.trust_roots, &self.extra_ca)
    }
}

/// Why [`start`] returned no service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A field of the configuration is unusable: fix it and start again.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The operating system refused a thread (resource limits): nothing was started; retry
    /// later or raise the limit.
    #[error("could not spawn the driver thread: {0}")]
    Spawn(#[source] io::Error),
    /// The end-to-end encryption stage could not be set up (its store did not open).
    #[cfg(feature = "e2ee")]
    #[error("could not set up end-to-end encryption: {0}")]
    E2ee(#[source] crate::E2eeError),
}

/// Validates `config`, then spawns the driver thread with the default [`DriverConfig`].
/// Sync starts at once.
pub fn start(config: Config) -> Result<SyncService, StartError> {
    start_with(config, DriverConfig::default())
}

/// [`start`] with driver options of your own.
pub fn start_with(config: Config, driver: DriverConfig) -> Result<SyncService, StartError> {
    driver.validate()?;
    let machine = SyncMachine::new(config, Instant::now())?;
    launch(machine, Vec::new(), &driver)
}

/// [`start_with`], with the end-to-end encryption stage after the machine (feature `e2ee`):
/// events reach [`SyncService::events`] decrypted where the stage can (see [`crate::e2ee`]);
/// the stage's failures reach `errors` as [`ServiceError::Sync`] (for its requests) or
/// [`ServiceError::E2ee`]. The same loop as [`start_with`], with one more stage.
///
/// The crypto store is opened here when both ids are configured (an unusable store is a
/// [`StartError::E2ee`]); otherwise after `GET /account/whoami`. A user id configured for the
/// stage serves as [`SlidingSyncConfig::user_id`](crate::sliding::SlidingSyncConfig::user_id)
/// too when that is unset.
///
/// Server discovery ([`Config::discover`](crate::Config::discover())) is refused with
/// [`StartError::Config`]: the stage's requests (whoami, the first keys upload) go out before
/// the first sync, to the homeserver it was created with.
#[cfg(feature = "e2ee")]
pub fn start_encrypted(
    config: Config,
    driver: DriverConfig,
    e2ee: crate::E2eeConfig,
) -> Result<SyncService, StartError> {
    driver.validate()?;
    if config.discover {
        return Err(StartError::Config(ConfigError::Invalid {
            field: "discover",
            reason: "server discovery is not supported with the E2EE stage: \
                     start with the homeserver URL (Config::new)",
        }));
    }
    let config = with_stage_user(config, &e2ee);
    let now = Instant::now();
    let machine = SyncMachine::new(config, now)?;
    let stage = crate::E2ee::new(machine.config(), e2ee, now).map_err(StartError::E2ee)?;
    launch(machine, vec![Box::new(stage)], &driver)
}

/// `config`, with the user the E2EE stage was given as its sliding sync user when it names
/// none (for the leave markers).
#[cfg(feature = "e2ee")]
fn with_stage_user(mut config: Config, e2ee: &crate::E2eeConfig) -> Config {
    if config.sliding_sync.user_id.is_none() {
        config.sliding_sync.user_id.clone_from(&e2ee.user_id);
    }
    config
}

/// Wires the machine and its stages to a new handle and starts the driver thread.
fn launch(
    machine: SyncMachine,
    stages: Vec<Box<dyn Stage>>,
    options: &DriverConfig,
) -> Result<SyncService, StartError> {
    let (driver, service) = wire(machine, stages, options);
    let thread = spawn(driver, Driver::run).map_err(StartError::Spawn)?;
    *lock(&service.thread) = Some(thread);
    Ok(service)
}

/// The driver and its handle, connected by their channels; the thread is not started yet.
fn wire(
    machine: SyncMachine,
    stages: Vec<Box<dyn Stage>>,
    options: &DriverConfig,
) -> (Driver, SyncService) {
    let (event_tx, event_rx) = bounded(options.event_channel_capacity);
    let (error_tx, error_rx) = bounded(options.error_channel_capacity);
    let (state_tx, state_rx) = bounded(STATE_CHANNEL_CAPACITY);
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let (credentials_tx, credentials_rx) = crossbeam_channel::unbounded();
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded();
    let agent = options
        .agent
        .clone()
        .unwrap_or_else(|| transport::new_agent(options));
    let shared = Arc::new(Shared {
        stop: Mutex::new(Some(stop_tx)),
        credentials: credentials_tx,
        acks: acks_tx,
        agent: Mutex::new(Some(agent.clone())),
        dropped_errors: Arc::default(),
        state: Mutex::new(machine.state()),
    });
    let driver = Driver {
        machine,
        stages,
        agent,
        events: event_tx,
        errors: Lossy::new(error_tx, &error_rx, Some(shared.dropped_errors.clone())),
        states: Lossy::new(state_tx, &state_rx, None),
        stop: stop_rx,
        credentials: credentials_rx,
        acks: options.acknowledge_checkpoints.then_some(acks_rx),
        unacknowledged: 0,
        store: options.on_credentials.clone(),
        shared: shared.clone(),
    };
    let service = SyncService {
        events: event_rx,
        errors: error_rx,
        states: state_rx,
        shared,
        thread: Mutex::new(None),
    };
    (driver, service)
}

/// Runs `body` on the driver thread; a panic in it is caught and reported on `errors` and by
/// the join, and the machine is stopped either way so the final state reads `Stopped`.
fn spawn(
    mut driver: Driver,
    body: impl FnOnce(&mut Driver) + Send + 'static,
) -> std::io::Result<JoinHandle<Result<(), ServiceError>>> {
    thread::Builder::new()
        .name("matrix-sync".to_owned())
        .spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| body(&mut driver)));
            let result = outcome.map_err(|payload| {
                let message = panic_message(payload);
                log::error!("sync driver panicked: {message}");
                driver.errors.push(ServiceError::Panicked(message.clone()));
                ServiceError::Panicked(message)
            });
            driver.machine.stop();
            driver.publish_states();
            result
        })
}

impl SyncService {
    /// Normalized events, in order, ending with a checkpoint per batch. Bounded: while nobody
    /// receives, the driver waits (backpressure, never loss). Disconnected once stopped.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Failure reports. Never slows the sync: when full, the oldest report is dropped and
    /// counted in [`dropped_errors`](Self::dropped_errors). Disconnected once stopped.
    pub fn errors(&self) -> &Receiver<ServiceError> {
        &self.errors
    }

    /// State changes (oldest dropped when nobody reads them). Disconnected once stopped.
    pub fn states(&self) -> &Receiver<SyncState> {
        &self.states
    }

    /// The current state.
    pub fn state(&self) -> SyncState {
        *lock(&self.shared.state)
    }

    /// How many error reports were dropped because the `errors` channel was full.
    pub fn dropped_errors(&self) -> u64 {
        self.shared.dropped_errors.load(Ordering::Relaxed)
    }

    /// Replaces the access token, keeping the refresh token (see
    /// [`SyncMachine::set_access_token`]): it takes effect on the next request, and a service
    /// waiting after a refusal retries at once. Callable from any thread.
    pub fn set_access_token(&self, access_token: impl Into<String>) -> Result<(), InputError> {
        self.set(Credentials::new(access_token), true)
    }

    /// Replaces the credentials (see [`SyncMachine::set_credentials`]): they take effect on
    /// the next request; `since`, dedup and a pending batch are kept. Callable from any
    /// thread. [`InputError::UnusableCredentials`] when a token could not go in a request,
    /// [`InputError::Stopped`] once the service ended.
    pub fn set_credentials(&self, credentials: Credentials) -> Result<(), InputError> {
        self.set(credentials, false)
    }

    fn set(&self, credentials: Credentials, keep_refresh_token: bool) -> Result<(), InputError> {
        if !credentials.is_usable() {
            return Err(InputError::UnusableCredentials);
        }
        let command = SetCredentials {
            credentials,
            keep_refresh_token,
        };
        self.shared
            .credentials
            .send(command)
            .map_err(|_| InputError::Stopped)
    }

    /// With [`DriverConfig::acknowledge_checkpoints`]: the application stored the oldest
    /// checkpoint it received and did not acknowledge yet (call it once per checkpoint, in
    /// order, after storing it); the next request may go out. Callable from any thread; does
    /// nothing without the setting. [`InputError::Stopped`] once the service ended.
    pub fn checkpoint_stored(&self) -> Result<(), InputError> {
        self.shared.acks.send(()).map_err(|_| InputError::Stopped)
    }

    /// Stops the service: aborts the in-flight request and any backoff wait; the channels
    /// close right after. Idempotent, callable from any thread, also after the thread ended.
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Waits for the driver thread to end (call [`stop`](Self::stop) first, or it runs until
    /// a panic). `Err` if it panicked. Later calls return `Ok(())`.
    pub fn join(&self) -> Result<(), ServiceError> {
        let thread = lock(&self.thread).take();
        match thread.map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(payload)) => Err(ServiceError::Panicked(panic_message(payload))),
        }
    }

    /// True once the driver thread has ended.
    pub fn is_finished(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for SyncService {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn request_stop(&self) {
        drop(lock(&self.stop).take());
        if let Some(agent) = lock(&self.agent).take() {
            agent.shutdown();
        }
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
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use matrix_sync_testkit::fake_server::{FakeServer, Response};

    use super::*;
    use crate::{EventKind, OutgoingRequest, RequestId, RequestKind, TransportFailure};

    #[cfg(feature = "e2ee")]
    #[test]
    fn the_stage_s_user_is_the_sliding_sync_user_unless_one_is_set() {
        let stage_user: ruma_common::OwnedUserId = "@stage:x".try_into().unwrap();
        let e2ee = crate::E2eeConfig::new(crate::CryptoStore::Memory)
            .with_ids(stage_user.clone(), "DEVICE".into());
        let config = Config::new("https://example.org", "t");
        assert_eq!(
            with_stage_user(config.clone(), &e2ee).sliding_sync.user_id,
            Some(stage_user)
        );
        let mut own = config.clone();
        own.sliding_sync.user_id = Some("@own:x".try_into().unwrap());
        let kept = with_stage_user(own, &e2ee).sliding_sync.user_id;
        assert_eq!(kept.unwrap().as_str(), "@own:x");
        let unnamed = crate::E2eeConfig::new(crate::CryptoStore::Memory);
        assert_eq!(with_stage_user(config, &unnamed).sliding_sync.user_id, None);
    }

    /// A stage that sends one request of its own first and holds the sync until 200 ms after
    /// its answer (a timer of its own), counting the events that pass through it.
    struct Gate {
        url: String,
        state: GateState,
        opened: Arc<Mutex<Option<Instant>>>,
        passed: Arc<AtomicUsize>,
        events: std::collections::VecDeque<Event>,
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum GateState {
        ToSend,
        Sent,
        OpensAt(Instant),
        Open,
    }

    impl Stage for Gate {
        fn handle_event(&mut self, event: Event) {
            self.passed.fetch_add(1, Ordering::SeqCst);
            self.events.push_back(event);
        }
        fn poll_event(&mut self) -> Option<Event> {
            self.events.pop_front()
        }
        fn poll_error(&mut self) -> Option<ServiceError> {
            None
        }
        fn poll_request(&mut self, _: &crate::AccessToken) -> Option<OutgoingRequest> {
            (self.state == GateState::ToSend).then(|| {
                self.state = GateState::Sent;
                OutgoingRequest {
                    id: RequestId::new(u64::MAX),
                    kind: RequestKind::VersionsCheck,
                    http: http::Request::get(format!("{}/gate", self.url))
                        .body(Vec::new())
                        .unwrap(),
                    deadline: Instant::now() + Duration::from_secs(10),
                }
            })
        }
        fn handle_response(&mut self, _: RequestId, _: http::Response<Vec<u8>>, now: Instant) {
            self.state = GateState::OpensAt(now + Duration::from_millis(200));
        }
        fn handle_failure(&mut self, _: RequestId, _: TransportFailure, _: Instant) {
            self.state = GateState::ToSend;
        }
        fn handle_timeout(&mut self, now: Instant) {
            if matches!(self.state, GateState::OpensAt(at) if at <= now) {
                self.state = GateState::Open;
                *lock(&self.opened) = Some(now);
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            match self.state {
                GateState::OpensAt(at) => Some(at),
                _ => None,
            }
        }
        fn holds_sync(&self) -> bool {
            self.state != GateState::Open
        }
    }

    #[test]
    fn a_stage_sends_first_holds_the_sync_until_its_timer_and_sees_every_event_in_order() {
        let first_sync = Arc::new(Mutex::new(None));
        let seen = first_sync.clone();
        let server = FakeServer::start(move |request| {
            if request.path().ends_with("/sync") {
                lock(&seen).get_or_insert_with(Instant::now);
            }
            Response::json(
                200,
                r#"{"next_batch":"s1","presence":{"events":[
                {"type":"m.presence","sender":"@a:example.org","content":{"presence":"online"}}]}}"#,
            )
        });
        let passed = Arc::new(AtomicUsize::new(0));
        let opened = Arc::new(Mutex::new(None));
        let gate = Gate {
            url: server.url(),
            state: GateState::ToSend,
            opened: opened.clone(),
            passed: passed.clone(),
            events: Default::default(),
        };
        let machine = SyncMachine::new(Config::new(server.url(), "token"), Instant::now()).unwrap();
        let service = launch(machine, vec![Box::new(gate)], &DriverConfig::default()).unwrap();
        let mut received = Vec::new();
        while let Ok(event) = service.events().recv_timeout(Duration::from_secs(10)) {
            let done = matches!(event.kind, EventKind::Checkpoint(_));
            received.push(event);
            if done {
                break;
            }
        }
        service.stop();
        service.join().unwrap();
        let paths: Vec<String> = server.log().iter().map(|r| r.path().to_owned()).collect();
        assert_eq!(
            paths.first().map(String::as_str),
            Some("/gate"),
            "{paths:?}"
        );
        assert!(
            paths.iter().skip(1).all(|p| p.ends_with("/sync")) && paths.len() >= 2,
            "{paths:?}"
        );
        assert!(
            matches!(
                received.last().map(|e| &e.kind),
                Some(EventKind::Checkpoint(_))
            ),
            "{received:?}"
        );
        assert_eq!(received.len(), 2, "the presence event and the checkpoint");
        let (opened, first_sync) = (lock(&opened).unwrap(), lock(&first_sync).unwrap());
        assert!(first_sync >= opened, "no sync while the stage held it");
        assert_eq!(
            passed.load(Ordering::SeqCst),
            received.len(),
            "all through the stage"
        );
    }

    #[test]
    fn a_panic_in_the_driver_thread_reaches_errors_and_join() {
        let config = Config::new("http://127.0.0.1:9", "token");
        let machine = SyncMachine::new(config, Instant::now()).unwrap();
        let (driver, service) = wire(machine, Vec::new(), &DriverConfig::default());
        let thread = spawn(driver, |_| panic!("boom")).unwrap();
        let joined = thread
            .join()
            .expect("the panic is caught inside the thread");
        assert!(matches!(joined, Err(ServiceError::Panicked(m)) if m == "boom"));
        assert!(
            matches!(service.errors().try_recv(), Ok(ServiceError::Panicked(m)) if m == "boom")
        );
        assert_eq!(service.state(), SyncState::Stopped);
    }
}
