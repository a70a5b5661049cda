//! `tail`: print every event of a Matrix account as one JSON object per line.
//!
//! ```text
//! MATRIX_ACCESS_TOKEN=... cargo run --release --example tail -- --homeserver URL|NAME|@USER \
//!     [--since-file PATH] [--timeline-limit N] [--no-fill-gaps] [--timeout-ms N] \
//!     [--format json|text] [--raw] [--ca-file PEM] [--platform-roots] [--e2ee --store DIR] \
//!     [--sliding-sync [auto]]
//! cargo run --release --example tail -- --homeserver URL --token-file PATH \
//!     [--oauth-token-endpoint URL --oauth-client-id ID] ...
//! ```
//!
//! `--homeserver` takes the homeserver's base URL (`https://matrix.example.org`), used as is,
//! or a server name (`example.org`) or user id (`@me:example.org`), from which the homeserver
//! is found by server discovery (its well-known) before the first sync.
//!
//! With `--token-file` the credentials come from a JSON file, `{"access_token": ...,
//! "refresh_token": ..., "expires_in_ms": ...}` (the last two optional; `expires_in_ms` counts
//! from the file's modification time). When the token is refreshed (through the homeserver's
//! `/refresh`, or the OAuth 2.0 token endpoint given), the file is rewritten atomically, mode
//! 0600, with the new credentials before they are used: a restart from it goes on with the
//! rotated refresh token. A refresh answer with a token that is empty, longer than 4,096
//! bytes or not visible ASCII is refused (an `error:` line naming the field, never the token)
//! and the refresh retried with backoff: the file keeps the old tokens.
//!
//! With `--e2ee --store DIR` (feature `e2ee`) encrypted rooms are decrypted, with the crypto
//! store in `DIR` (its secrets encrypted with `MATRIX_STORE_PASSPHRASE` when set) and the
//! device id from `MATRIX_DEVICE_ID` (or `whoami`): a decrypted message prints like a
//! plaintext one plus `"encrypted": true`, an undecryptable one says why.
//!
//! `--sliding-sync` syncs with simplified sliding sync (MSC4186) instead of `/v3/sync` (a
//! room left prints a `leave` line only when `--homeserver` is the user id);
//! `--sliding-sync auto` uses it when the server offers it (and, with `--since-file`, goes on
//! with the protocol of the stored checkpoint). The since file then holds the sliding sync
//! position (`pos` and the to-device cursor, one small JSON object), `--timeline-limit` sets
//! the list's timeline limit, and two more kinds of lines may come: `list_update` (the room
//! list's count changed) and `connection_reset` (the server dropped the connection; a fresh
//! one follows).
//!
//! `--format text` prints one readable line per event a person cares about (`[room] sender:
//! body`, edits, replies, reactions, who is typing, who read what, membership); the default
//! `--format json` prints one JSON object per event with the fields that apply (absent ones
//! left out), and `--raw` adds the event as the server sent it.
//!
//! Events go to stdout (flushed after each batch); state changes and errors to stderr, one
//! line each. With `--since-file` it resumes from the token stored there and stores each
//! checkpoint only after every line before it was written and flushed (at-least-once), and
//! no sync goes out before the checkpoint is stored, so that the server keeps to-device
//! messages until they are printed (`DriverConfig::acknowledge_checkpoints`).
//!
//! Exit status (also in `--help`):
//!
//! * 0: stopped by SIGINT or SIGTERM (or SIGHUP).
//! * 1: runtime failure: stdout closed at start, a write to stdout failed (including a broken
//!   pipe, as when the consumer exits: `tail | head -1` ends with 1), a checkpoint that could
//!   not be stored, the sync driver thread panicked. The checkpoint of a batch whose lines were
//!   not all written is never stored.
//! * 2: usage or configuration error: bad arguments, missing token, invalid configuration, a
//!   `--since-file` that is not a regular file or whose directory is not writable.
//!
//! A signal stops it within about 100 ms even when stdout or stderr is a pipe nobody reads:
//! if the main thread has not finished by then, the process ends at once with status 0,
//! without destructors and without storing anything more (the last line on stdout may then be
//! incomplete; it belongs to a batch whose checkpoint was not stored).
//!
//! Diagnostics never panic: a closed or broken stderr only loses them.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, never, select, Receiver};
use matrix_sync_service::{
    start_with, Config, Credentials, DriverConfig, Event, EventKind, FileCheckpointStore, Protocol,
    RefreshMethod, ServiceError, StartError, SyncFilter, SyncService, TrustRoots,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: tail --homeserver URL|SERVER_NAME|@USER_ID [--since-file PATH] [--timeline-limit N] [--no-fill-gaps] [--timeout-ms N] [--format json|text] [--raw] [--ca-file PEM] [--platform-roots] [--e2ee --store DIR] [--sliding-sync [auto]] [--token-file PATH [--oauth-token-endpoint URL --oauth-client-id ID]] (token in MATRIX_ACCESS_TOKEN or --token-file)";

const EXIT_STATUS: &str = "exit status:
  0  stopped by SIGINT or SIGTERM
  1  runtime failure: stdout closed or broken (also when the consumer exits, as with `| head`),
     a checkpoint that could not be stored, the sync driver thread panicked
  2  usage or configuration error: bad arguments, missing token, unusable --since-file
     or --token-file";

/// After a signal, how long the main thread may take to finish before the process ends anyway.
const SIGNAL_GRACE: Duration = Duration::from_millis(100);

/// How tail ends; each has its own exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// Stopped by SIGINT or SIGTERM (or `--help`).
    Success = 0,
    /// Stdout closed or broken, a checkpoint that could not be stored, a driver panic.
    Failed = 1,
    /// Bad arguments or configuration.
    Usage = 2,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// Why tail ends early: its exit status and one line for stderr.
#[derive(Debug)]
struct Fatal {
    exit: Exit,
    message: String,
}

impl Fatal {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Failed,
            message: message.into(),
        }
    }
}

/// One line on stderr. Never panics: a closed or broken stderr loses the line, nothing else.
fn diagnostic(line: impl Display) {
    let _ = writeln!(io::stderr(), "{line}");
}

struct Args {
    homeserver: String,
    since_file: Option<String>,
    timeline_limit: Option<u32>,
    fill_gaps: bool,
    timeout_ms: Option<u64>,
    output: Output,
    token_file: Option<String>,
    oauth_token_endpoint: Option<String>,
    oauth_client_id: Option<String>,
    /// `--e2ee --store DIR`: the crypto store's directory.
    e2ee_store: Option<String>,
    /// `--ca-file PEM`: CA certificates trusted besides the bundled roots.
    ca_file: Option<String>,
    /// `--platform-roots`: the operating system's trust store instead of the bundled roots.
    platform_roots: bool,
    /// `--sliding-sync [auto]`.
    protocol: Protocol,
}

/// The arguments, or `None` for `--help`.
fn parse_args() -> Result<Option<Args>, String> {
    let mut args = std::env::args().skip(1).peekable();
    let mut parsed = Args {
        homeserver: std::env::var("MATRIX_HOMESERVER").unwrap_or_default(),
        since_file: None,
        timeline_limit: None,
        fill_gaps: true,
        timeout_ms: None,
        output: Output {
            text: false,
            raw: false,
        },
        token_file: None,
        oauth_token_endpoint: None,
        oauth_client_id: None,
        e2ee_store: None,
        ca_file: None,
        platform_roots: false,
        protocol: Protocol::V3,
    };
    let (mut e2ee, mut store) = (false, None);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--raw" => parsed.output.raw = true,
            "--format" => match value("--format")?.as_str() {
                "json" => parsed.output.text = false,
                "text" => parsed.output.text = true,
                other => return Err(format!("--format: json or text, not {other:?}")),
            },
            "--homeserver" => parsed.homeserver = value("--homeserver")?,
            "--since-file" => parsed.since_file = Some(value("--since-file")?),
            "--timeline-limit" => {
                let v = value("--timeline-limit")?;
                parsed.timeline_limit = Some(
                    v.parse()
                        .map_err(|_| format!("--timeline-limit: not a number: {v}"))?,
                );
            }
            "--timeout-ms" => {
                let v = value("--timeout-ms")?;
                parsed.timeout_ms = Some(
                    v.parse()
                        .map_err(|_| format!("--timeout-ms: not a number: {v}"))?,
                );
            }
            "--no-fill-gaps" => parsed.fill_gaps = false,
            "--token-file" => parsed.token_file = Some(value("--token-file")?),
            "--oauth-token-endpoint" => {
                parsed.oauth_token_endpoint = Some(value("--oauth-token-endpoint")?)
            }
            "--oauth-client-id" => parsed.oauth_client_id = Some(value("--oauth-client-id")?),
            "--ca-file" => parsed.ca_file = Some(value("--ca-file")?),
            "--platform-roots" => parsed.platform_roots = true,
            "--sliding-sync" => {
                parsed.protocol = if args.next_if(|next| next == "auto").is_some() {
                    Protocol::Auto
                } else {
                    Protocol::SlidingSync
                };
            }
            "--e2ee" => e2ee = true,
            "--store" => store = Some(value("--store")?),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if parsed.oauth_token_endpoint.is_some() != parsed.oauth_client_id.is_some() {
        return Err("--oauth-token-endpoint and --oauth-client-id go together".to_owned());
    }
    if parsed.oauth_token_endpoint.is_some() && parsed.token_file.is_none() {
        return Err("OAuth refresh needs --token-file (for the refresh token)".to_owned());
    }
    parsed.e2ee_store = match (e2ee, store) {
        (true, Some(dir)) => Some(dir),
        (false, None) => None,
        _ => return Err(format!("--e2ee and --store DIR go together; {USAGE}")),
    };
    if parsed.homeserver.is_empty() {
        return Err(format!(
            "missing --homeserver (or MATRIX_HOMESERVER); {USAGE}"
        ));
    }
    Ok(Some(parsed))
}

/// The configuration for `--homeserver`: a URL (it has a scheme) is used as given; a server
/// name or user id starts with server discovery.
/// A user id names the user for sliding sync's leave markers too.
fn homeserver_config(homeserver: String, token: impl Into<String>) -> Result<Config, Fatal> {
    if homeserver.contains("://") {
        return Ok(Config::new(homeserver, token));
    }
    let mut config = Config::discover(&homeserver, token)
        .map_err(|e| Fatal::usage(format!("--homeserver: {e}")))?;
    config.sliding_sync.user_id = homeserver.as_str().try_into().ok();
    Ok(config)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => Exit::Success.into(),
        Err(fatal) => {
            diagnostic(format_args!("tail: {}", fatal.message));
            fatal.exit.into()
        }
    }
}

fn run() -> Result<(), Fatal> {
    if closed_stdout::was_closed() {
        return Err(Fatal::failed(
            "stdout is closed: refusing to run (events would be lost while checkpoints advance)",
        ));
    }
    // First, before anything that can block (a FIFO as --since-file, a slow start).
    let signalled = handle_signals()?;

    let Some(args) = parse_args().map_err(Fatal::usage)? else {
        let _ = writeln!(io::stdout(), "{USAGE}\n\n{EXIT_STATUS}");
        return Ok(());
    };
    let token_file = args.token_file.map(TokenFile::open).transpose()?;
    let mut config = match &token_file {
        Some(file) => {
            let credentials = file.load()?;
            let mut config = homeserver_config(args.homeserver, credentials.access_token.expose())?;
            config.refresh_token = credentials.refresh_token;
            config.access_token_expires_in = credentials.expires_in;
            config
        }
        None => {
            let token = std::env::var("MATRIX_ACCESS_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Fatal::usage("MATRIX_ACCESS_TOKEN is not set (nor --token-file given)")
                })?;
            homeserver_config(args.homeserver, token)?
        }
    };
    if let (Some(token_endpoint), Some(client_id)) =
        (args.oauth_token_endpoint, args.oauth_client_id)
    {
        config.refresh = RefreshMethod::OAuth {
            token_endpoint,
            client_id,
        };
    }
    let store = match args.since_file {
        Some(path) => {
            let (store, since) = open_since_file(path)?;
            config.since = since;
            Some(store)
        }
        None => None,
    };
    if let Some(limit) = args.timeline_limit {
        config.filter = Some(SyncFilter::timeline_limit(limit));
        config.sliding_sync.timeline_limit = limit;
    }
    config.protocol = args.protocol;
    if let Some(ms) = args.timeout_ms {
        config.long_poll_timeout = Duration::from_millis(ms);
    }
    config.gap_fill.enabled = args.fill_gaps;
    config.jitter_seed = std::process::id() as u64;

    let mut driver = DriverConfig::default();
    if args.platform_roots {
        driver = driver.trust_roots(TrustRoots::Platform);
    }
    if let Some(path) = &args.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| Fatal::usage(format!("--ca-file {path}: {e}")))?;
        driver = driver
            .add_ca_pem(&pem)
            .map_err(|e| Fatal::usage(format!("--ca-file {path}: {e}")))?;
    }
    if let Some(file) = token_file {
        driver = driver.on_credentials(move |credentials| file.save(credentials));
    }
    // No sync goes out before the checkpoint is in the since file: the server deletes
    // to-device messages once a sync carries the position after them.
    driver.acknowledge_checkpoints = store.is_some();
    let service = start_service(config, driver, args.e2ee_store)?.map_err(|e| match e {
        StartError::Config(e) => Fatal::usage(format!("invalid configuration: {e}")),
        other => Fatal::failed(other.to_string()),
    })?;
    let pumped = pump(&service, store.as_ref(), &signalled, args.output);
    service.stop();
    outcome(pumped, service.join())
}

/// The service, with the E2EE stage when `--e2ee --store DIR` asked for it.
fn start_service(
    config: Config,
    driver: DriverConfig,
    e2ee_store: Option<String>,
) -> Result<Result<SyncService, StartError>, Fatal> {
    let Some(dir) = e2ee_store else {
        return Ok(start_with(config, driver));
    };
    #[cfg(feature = "e2ee")]
    {
        use matrix_sync_service::{start_encrypted, CryptoStore, E2eeConfig};
        let passphrase = std::env::var("MATRIX_STORE_PASSPHRASE").ok();
        let store = CryptoStore::Sqlite {
            dir: dir.into(),
            passphrase: passphrase.filter(|p| !p.is_empty()),
        };
        let mut e2ee = E2eeConfig::new(store);
        e2ee.device_id = std::env::var("MATRIX_DEVICE_ID")
            .ok()
            .filter(|d| !d.is_empty())
            .map(Into::into);
        Ok(start_encrypted(config, driver, e2ee))
    }
    #[cfg(not(feature = "e2ee"))]
    {
        let _ = (config, driver, dir);
        Err(Fatal::usage(
            "--e2ee: this tail was built without the e2ee feature",
        ))
    }
}

/// The pump's result, then the driver thread's: a driver panic is a runtime failure.
fn outcome(pumped: Result<(), Fatal>, joined: Result<(), ServiceError>) -> Result<(), Fatal> {
    pumped?;
    joined.map_err(|e| Fatal::failed(e.to_string()))
}

/// Installs the SIGINT/SIGTERM handler; the returned channel receives one message per signal.
///
/// The handler asks the main thread to stop, and if it has not finished within
/// [`SIGNAL_GRACE`] (it may sit in a write to a pipe nobody reads), ends the process at once.
fn handle_signals() -> Result<Receiver<()>, Fatal> {
    let (tx, rx) = bounded(1);
    ctrlc::set_handler(move || {
        let _ = tx.try_send(());
        thread::sleep(SIGNAL_GRACE);
        // SAFETY: `_exit` takes no lock and runs no destructor, so it cannot deadlock on the
        // stdout lock held by a blocked main thread. Skipping destructors and buffered output
        // is intended: nothing more is stored, so every stored checkpoint still follows its
        // flushed lines.
        unsafe { libc::_exit(Exit::Success as i32) }
    })
    .map_err(|e| Fatal::failed(format!("could not install the signal handler: {e}")))?;
    Ok(rx)
}

/// The store at `path` and the token it holds; refuses a file that is not regular (a FIFO
/// would block the start) and a directory where the checkpoint could not be stored.
fn open_since_file(path: String) -> Result<(FileCheckpointStore, Option<String>), Fatal> {
    let store = FileCheckpointStore::new(path);
    // The store's errors name the file; a FIFO is refused without being opened.
    let unusable = |e: io::Error| Fatal::usage(format!("--since-file: {e}"));
    let since = store.load().map_err(unusable)?;
    store.check_writable().map_err(unusable)?;
    Ok((store, since))
}

/// The `--token-file`: credentials as JSON, replaced atomically (through the same store as the
/// since-file) with mode 0600.
struct TokenFile {
    store: FileCheckpointStore,
}

impl TokenFile {
    /// Refuses what `--since-file` refuses, and makes the file private: it holds secrets.
    fn open(path: String) -> Result<Self, Fatal> {
        let store = FileCheckpointStore::new(path);
        let unusable = |e: io::Error| Fatal::usage(format!("--token-file: {e}"));
        store.check_writable().map_err(unusable)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let metadata = std::fs::metadata(store.path()).map_err(unusable)?;
            if metadata.permissions().mode() & 0o077 != 0 {
                let private = std::fs::Permissions::from_mode(0o600);
                std::fs::set_permissions(store.path(), private).map_err(unusable)?;
            }
        }
        Ok(Self { store })
    }

    /// The credentials; the expiry counts from the file's modification time.
    fn load(&self) -> Result<Credentials, Fatal> {
        let unusable = |e: String| Fatal::usage(format!("--token-file: {e}"));
        let text = self
            .store
            .load()
            .map_err(|e| unusable(e.to_string()))?
            .ok_or_else(|| unusable("empty".to_owned()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| unusable(e.to_string()))?;
        let access_token = value["access_token"]
            .as_str()
            .ok_or_else(|| unusable("no access_token".to_owned()))?;
        let mut credentials = Credentials::new(access_token);
        if let Some(refresh_token) = value["refresh_token"].as_str() {
            credentials = credentials.with_refresh_token(refresh_token);
        }
        if let Some(ms) = value["expires_in_ms"].as_u64() {
            let written = std::fs::metadata(self.store.path())
                .and_then(|m| m.modified())
                .map_err(|e| unusable(e.to_string()))?;
            let age = written.elapsed().unwrap_or_default();
            credentials =
                credentials.with_expires_in(Duration::from_millis(ms).saturating_sub(age));
        }
        Ok(credentials)
    }

    /// Stores refreshed credentials; called by the driver before it uses them.
    fn save(
        &self,
        credentials: &Credentials,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut value = json!({ "access_token": credentials.access_token.expose() });
        if let Some(refresh_token) = &credentials.refresh_token {
            value["refresh_token"] = json!(refresh_token.expose());
        }
        if let Some(expires_in) = credentials.expires_in {
            value["expires_in_ms"] = json!(expires_in.as_millis() as u64);
        }
        self.store.save(&value.to_string())?;
        diagnostic(format_args!(
            "tail: credentials refreshed and stored in {}",
            self.store.path().display()
        ));
        Ok(())
    }
}

/// Prints events until a signal, the end of the stream or a failure. A checkpoint is stored
/// only after every line before it was written and flushed; any stdout error ends the pump.
fn pump(
    service: &SyncService,
    store: Option<&FileCheckpointStore>,
    signalled: &Receiver<()>,
    output: Output,
) -> Result<(), Fatal> {
    let stdout_failed = |e: io::Error| Fatal::failed(format!("stdout: {e}"));
    let mut out = BufWriter::new(io::stdout().lock());
    let mut printer = Printer::new(output);
    let mut errors: Receiver<_> = service.errors().clone();
    let mut states: Receiver<_> = service.states().clone();
    loop {
        select! {
            recv(signalled) -> _ => {
                // Best effort: these lines follow the last stored checkpoint.
                let _ = out.flush();
                return Ok(());
            }
            recv(service.events()) -> event => {
                let Ok(event) = event else { break };
                printer.write(&mut out, &event).map_err(stdout_failed)?;
                if let EventKind::Checkpoint(checkpoint) = &event.kind {
                    out.flush().map_err(stdout_failed)?;
                    if let Some(store) = store {
                        store.save(&checkpoint.next_batch).map_err(|e| {
                            Fatal::failed(format!(
                                "could not store the checkpoint in {:?}: {e}",
                                store.path()
                            ))
                        })?;
                        // Stopped meanwhile: nothing more goes out anyway.
                        let _ = service.checkpoint_stored();
                    }
                }
            }
            recv(errors) -> error => match error {
                Ok(error @ ServiceError::Panicked(_)) => return Err(Fatal::failed(error.to_string())),
                Ok(error) => diagnostic(format_args!("error: {error}")),
                Err(_) => errors = never(),
            },
            recv(states) -> state => match state {
                Ok(state) => diagnostic(format_args!("state: {state:?}")),
                Err(_) => states = never(),
            },
        }
    }
    out.flush().map_err(stdout_failed)
}

/// How events are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Output {
    text: bool,
    raw: bool,
}

/// Writes events in the chosen format, remembering room names for the text one.
struct Printer {
    output: Output,
    /// `m.room.name` of each room seen, for the text format's `[room]` label.
    room_names: HashMap<String, String>,
    /// The bodies of recent messages, so that an edit, reply or reaction can quote its target
    /// (forgotten all at once past [`QUOTED_BODIES`]).
    bodies: HashMap<String, String>,
}

/// How many message bodies the text format remembers for quoting.
const QUOTED_BODIES: usize = 10_000;

impl Printer {
    fn new(output: Output) -> Self {
        Self {
            output,
            room_names: HashMap::new(),
            bodies: HashMap::new(),
        }
    }

    fn write(&mut self, out: &mut impl Write, event: &Event) -> io::Result<()> {
        if self.output.text {
            self.learn_room_name(event);
            let line = text_line(event, &self.room_names, &self.bodies);
            if let (EventKind::Message, Some(id), Some(body)) =
                (&event.kind, &event.event_id, &event.body)
            {
                if self.bodies.len() >= QUOTED_BODIES {
                    self.bodies.clear();
                }
                self.bodies.insert(id.to_string(), body.clone());
            }
            return match line {
                Some(text) => writeln!(out, "{text}"),
                None => Ok(()),
            };
        }
        if self.output.raw {
            /// The event's line (`Event`'s JSON shape) plus the event as the server sent it,
            /// re-serialized compactly so that it stays on one line.
            #[derive(serde::Serialize)]
            struct WithRaw<'a> {
                #[serde(flatten)]
                event: &'a Event,
                raw: Value,
            }
            let raw = serde_json::from_str(event.raw.get()).unwrap_or(Value::Null);
            serde_json::to_writer(&mut *out, &WithRaw { event, raw })?;
        } else {
            serde_json::to_writer(&mut *out, event)?;
        }
        out.write_all(b"\n")
    }

    /// Keeps the name an `m.room.name` state event gives its room.
    fn learn_room_name(&mut self, event: &Event) {
        let (Some(room), "m.room.name") = (&event.room_id, event.event_type.as_ref()) else {
            return;
        };
        #[derive(serde::Deserialize)]
        struct Name {
            name: Option<String>,
        }
        match event
            .deserialize_content::<Name>()
            .ok()
            .and_then(|c| c.name)
        {
            Some(name) if !name.is_empty() => self.room_names.insert(room.to_string(), name),
            _ => self.room_names.remove(room.as_str()),
        };
    }
}

/// One readable line per event a person cares about; `None` for the rest (checkpoints,
/// device lists, account data...), which only the JSON format shows.
fn text_line(
    event: &Event,
    room_names: &HashMap<String, String>,
    bodies: &HashMap<String, String>,
) -> Option<String> {
    let room = event.room_id.as_ref().map_or("", |r| r.as_str());
    let room = room_names.get(room).map_or(room, String::as_str);
    let sender = event.sender.as_ref().map_or("?", |s| s.as_str());
    let body = event.body.as_deref().unwrap_or("");
    // A message quoted by its body when it is known, by its id otherwise.
    let target = |e: &matrix_sync_service::ruma_common::OwnedEventId| match bodies.get(e.as_str()) {
        Some(body) => format!("{body:?}"),
        None => e.to_string(),
    };
    let text = match &event.kind {
        EventKind::Message => match &event.relation {
            Some(rel) if rel.rel_type == "m.replace" => {
                format!("{sender} edited {}: {body}", target(&rel.event_id))
            }
            Some(rel) if rel.rel_type == "m.in_reply_to" => {
                format!("{sender} replied to {}: {body}", target(&rel.event_id))
            }
            _ => format!("{sender}: {body}"),
        },
        EventKind::Reaction => match &event.relation {
            Some(rel) => format!(
                "{sender} reacted {} to {}",
                rel.key.as_deref().unwrap_or("?"),
                target(&rel.event_id)
            ),
            None => format!("{sender} reacted"),
        },
        EventKind::Redaction => match &event.redacts {
            Some(t) => format!("{sender} redacted {}", target(t)),
            None => format!("{sender} redacted an event"),
        },
        EventKind::Typing => {
            let who: Vec<String> = event
                .typing_user_ids()
                .iter()
                .map(|u| u.to_string())
                .collect();
            match who.as_slice() {
                [] => "nobody is typing".to_owned(),
                _ => format!("typing: {}", who.join(", ")),
            }
        }
        EventKind::Receipt => {
            let read: Vec<String> = event
                .receipts()
                .iter()
                .map(|(e, _, u)| format!("{u} read {}", target(e)))
                .collect();
            if read.is_empty() {
                return None;
            }
            read.join("; ")
        }
        EventKind::Member => {
            let membership: Value = serde_json::from_str(event.raw.get()).unwrap_or(Value::Null);
            let membership = membership["content"]["membership"].as_str().unwrap_or("?");
            let who = event.state_key.as_deref().unwrap_or(sender);
            format!("{who}: {membership}")
        }
        EventKind::Encrypted => match event.encryption.as_deref() {
            Some(matrix_sync_service::Encryption::Undecryptable(u)) => {
                format!("{sender}: (undecryptable: {})", u.reason)
            }
            _ => format!("{sender}: (encrypted)"),
        },
        EventKind::Invite => format!("invited by {sender}"),
        EventKind::Leave => "left the room".to_owned(),
        EventKind::Gap(_) => "(some history was not fetched)".to_owned(),
        EventKind::ConnectionReset(reset) => format!(
            "(sliding sync connection reset by the server: {}; starting over)",
            reset.reason.name()
        ),
        EventKind::State if event.event_type == "m.room.name" => {
            let name = room_names.get(event.room_id.as_ref()?.as_str());
            format!(
                "{sender} named the room {:?}",
                name.map_or("", String::as_str)
            )
        }
        EventKind::State => format!("{sender} set {}", event.event_type),
        _ => return None,
    };
    let encrypted = match event.encryption.as_deref() {
        Some(matrix_sync_service::Encryption::Decrypted(_)) => " [encrypted]",
        _ => "",
    };
    Some(match room {
        "" => format!("{text}{encrypted}"),
        room => format!("[{room}] {text}{encrypted}"),
    })
}

/// Whether fd 1 was closed when the process started.
///
/// Rust's runtime reopens a closed stdout as `/dev/null` before `main`, so every write would
/// succeed and checkpoints advance while events go nowhere. The check must run earlier: on
/// Linux, from `.init_array`, which the loader runs before the runtime's own setup. Elsewhere
/// it is compiled out (there is no equally simple hook), and a closed stdout goes undetected.
#[cfg(target_os = "linux")]
mod closed_stdout {
    use std::sync::atomic::{AtomicBool, Ordering};

    static CLOSED: AtomicBool = AtomicBool::new(false);

    extern "C" fn check() {
        // SAFETY: F_GETFD only reads the descriptor flags of fd 1; no memory is passed.
        let flags = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) };
        let closed =
            flags == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
        CLOSED.store(closed, Ordering::Relaxed);
    }

    // SAFETY: the loader calls each function pointer in `.init_array` once, before `main`, on
    // the main thread; it passes (argc, argv, envp), which a C function without parameters
    // ignores. `check` needs nothing from the Rust runtime: one syscall, errno, an atomic.
    #[used]
    #[unsafe(link_section = ".init_array")]
    static CHECK: extern "C" fn() = check;

    pub fn was_closed() -> bool {
        CLOSED.load(Ordering::Relaxed)
    }
}

#[cfg(not(target_os = "linux"))]
mod closed_stdout {
    pub fn was_closed() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_id_as_homeserver_names_the_sliding_sync_user() {
        let user = |homeserver: &str| {
            homeserver_config(homeserver.to_owned(), "t")
                .map(|c| c.sliding_sync.user_id.map(|u| u.to_string()))
                .ok()
        };
        assert_eq!(
            user("@me:example.org"),
            Some(Some("@me:example.org".to_owned()))
        );
        assert_eq!(user("example.org"), Some(None));
        assert_eq!(user("https://example.org"), Some(None));
    }

    /// The events of one sync answer with `body`.
    fn events_of(body: &str) -> Vec<Event> {
        use matrix_sync_service::SyncMachine;
        let now = std::time::Instant::now();
        let mut machine = SyncMachine::new(Config::new("http://127.0.0.1:1", "t"), now).unwrap();
        let request = machine.poll_request().unwrap();
        let response = http::Response::new(body.to_owned());
        machine.handle_response(request.id, response, now).unwrap();
        std::iter::from_fn(|| machine.poll_event()).collect()
    }

    #[test]
    fn text_lines_name_the_room_once_known_and_quote_the_messages_they_refer_to() {
        let events = events_of(
            "{\"next_batch\": \"s1\", \"rooms\": {\"join\": {\"!r:x\": {\"timeline\": {\"events\": [\n\
             {\"type\": \"m.room.message\", \"event_id\": \"$a:x\", \"sender\": \"@a:x\",\n\
              \"content\": {\"body\": \"before\", \"msgtype\": \"m.text\"}},\n\
             {\"type\": \"m.room.name\", \"state_key\": \"\", \"event_id\": \"$n:x\", \"sender\": \"@a:x\",\n\
              \"content\": {\"name\": \"Demo\"}},\n\
             {\"type\": \"m.room.message\", \"event_id\": \"$b:x\", \"sender\": \"@b:x\",\n\
              \"content\": {\"body\": \"after\", \"msgtype\": \"m.text\"}},\n\
             {\"type\": \"m.reaction\", \"event_id\": \"$c:x\", \"sender\": \"@a:x\",\n\
              \"content\": {\"m.relates_to\": {\"rel_type\": \"m.annotation\", \"event_id\": \"$b:x\", \"key\": \"+1\"}}},\n\
             {\"type\": \"m.reaction\", \"event_id\": \"$d:x\", \"sender\": \"@a:x\",\n\
              \"content\": {\"m.relates_to\": {\"rel_type\": \"m.annotation\", \"event_id\": \"$old:x\", \"key\": \"+1\"}}}]}}}}}",
        );
        let mut printer = Printer::new(Output {
            text: true,
            raw: false,
        });
        let mut out = Vec::new();
        for event in &events {
            printer.write(&mut out, event).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[!r:x] @a:x: before\n\
             [Demo] @a:x named the room \"Demo\"\n\
             [Demo] @b:x: after\n\
             [Demo] @a:x reacted +1 to \"after\"\n\
             [Demo] @a:x reacted +1 to $old:x\n"
        );
    }

    #[test]
    fn json_lines_are_the_events_shape_and_raw_comes_last_on_the_same_line() {
        let events = events_of(
            "{\"next_batch\": \"s1\", \"rooms\": {\"join\": {\"!r:x\": {\"timeline\": {\"events\": [\n\
             {\"type\": \"m.room.message\", \"event_id\": \"$m:x\", \"sender\": \"@a:x\",\n\
              \"content\": {\"body\": \"hi\", \"msgtype\": \"m.text\"}}]}}}}}",
        );
        let print = |raw| {
            let mut out = Vec::new();
            for event in &events {
                Printer::new(Output { text: false, raw })
                    .write(&mut out, event)
                    .unwrap();
            }
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            print(false),
            "{\"kind\":\"message\",\"type\":\"m.room.message\",\"room_id\":\"!r:x\",\"event_id\":\"$m:x\",\"sender\":\"@a:x\",\"body\":\"hi\"}\n\
             {\"kind\":\"checkpoint\",\"type\":\"checkpoint\",\"next_batch\":\"s1\",\"live\":false}\n"
        );
        let with_raw = print(true);
        let lines: Vec<&str> = with_raw.lines().collect();
        assert_eq!(lines.len(), 2, "{with_raw}");
        assert!(lines[0].ends_with(
            ",\"body\":\"hi\",\"raw\":{\"content\":{\"body\":\"hi\",\"msgtype\":\"m.text\"},\"event_id\":\"$m:x\",\"sender\":\"@a:x\",\"type\":\"m.room.message\"}}"
        ), "{}", lines[0]);
        assert!(lines[1].ends_with(",\"raw\":{\"live\":false,\"next_batch\":\"s1\"}}"));
    }

    #[test]
    fn exit_statuses_are_distinct_and_documented() {
        assert_eq!(Exit::Success as u8, 0);
        assert_eq!(Exit::Failed as u8, 1);
        assert_eq!(Exit::Usage as u8, 2);
        for code in ["0  stopped", "1  runtime failure", "2  usage"] {
            assert!(EXIT_STATUS.contains(code), "{code}");
        }
    }

    #[test]
    fn a_driver_panic_is_a_runtime_failure() {
        let panicked = || Err(ServiceError::Panicked("boom".into()));
        let fatal = outcome(Ok(()), panicked()).unwrap_err();
        assert_eq!(fatal.exit, Exit::Failed);
        assert!(fatal.message.contains("boom"));
        let first = outcome(Err(Fatal::failed("stdout: broken pipe")), panicked()).unwrap_err();
        assert_eq!(
            (first.exit, first.message.as_str()),
            (Exit::Failed, "stdout: broken pipe")
        );
        assert!(outcome(Ok(()), Ok(())).is_ok());
    }
}
