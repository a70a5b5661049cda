//! Either homeserver of the integration tests behind one interface, so that a scenario is
//! written once and run against both:
//!
//! ```no_run
//! use matrix_sync_testkit::homeserver::Server;
//!
//! fn scenario(server: Server) {
//!     let homeserver = server.shared();
//!     let url = homeserver.base_url();
//!     // ... register accounts with `client::Account::register(&url, "alice")` ...
//! }
//!
//! #[test]
//! fn scenario_on_synapse() {
//!     scenario(Server::Synapse)
//! }
//!
//! #[test]
//! fn scenario_on_palpo() {
//!     scenario(Server::Palpo)
//! }
//! ```

use std::fmt;

use crate::palpo::Palpo;
use crate::synapse::{Synapse, SynapseOptions};

/// Which homeserver implementation a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    /// Synapse, the reference implementation ([`Synapse`]).
    Synapse,
    /// palpo 0.0.2 with PostgreSQL ([`Palpo`]).
    Palpo,
}

impl Server {
    /// Both servers, Synapse first.
    pub const ALL: [Server; 2] = [Server::Synapse, Server::Palpo];

    /// The server's name, lowercase: `synapse` or `palpo`.
    pub fn name(self) -> &'static str {
        match self {
            Server::Synapse => "synapse",
            Server::Palpo => "palpo",
        }
    }

    /// The one server of this kind shared by all tests of the test binary, started on
    /// first use ([`Synapse::shared`], [`Palpo::shared`]).
    pub fn shared(self) -> &'static dyn Homeserver {
        match self {
            Server::Synapse => Synapse::shared(),
            Server::Palpo => Palpo::shared(),
        }
    }

    /// A fresh server of this kind, stopped when dropped ([`Synapse::start`],
    /// [`Palpo::start`]).
    pub fn start(self) -> Box<dyn Homeserver> {
        self.start_with(Options::new())
    }

    /// A fresh server of this kind started with `options`, stopped when dropped.
    pub fn start_with(self, options: Options) -> Box<dyn Homeserver> {
        match self {
            Server::Synapse => {
                let mut synapse = SynapseOptions::new();
                if options.discoverable {
                    synapse = synapse.discoverable();
                }
                if options.quick_passwords {
                    synapse = synapse.config("bcrypt_rounds", serde_json::json!(4));
                }
                Box::new(synapse.start())
            }
            Server::Palpo => Box::new(Palpo::start_with(options)),
        }
    }
}

/// How to start a fresh server ([`Server::start_with`]), whichever it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub(crate) discoverable: bool,
    quick_passwords: bool,
}

impl Options {
    /// The test settings only.
    pub fn new() -> Options {
        Options::default()
    }

    /// Server name `127.0.0.1:PORT` (user ids `@name:127.0.0.1:PORT`), and
    /// `/.well-known/matrix/client` naming `http://127.0.0.1:PORT`: the server can be
    /// found from a user id or its name.
    pub fn discoverable(mut self) -> Options {
        self.discoverable = true;
        self
    }

    /// Cheap password hashing, for tests that register many accounts: Synapse's
    /// `bcrypt_rounds` 4. palpo has no such setting (its release build hashes quickly).
    pub fn quick_passwords(mut self) -> Options {
        self.quick_passwords = true;
        self
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What tests use of a running throwaway homeserver, whichever it is.
pub trait Homeserver: Send + Sync {
    /// Which implementation this is.
    fn server(&self) -> Server;
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    fn base_url(&self) -> String;
    /// The loopback port the client API listens on.
    fn port(&self) -> u16;
    /// The server name, the suffix of user and room ids.
    fn server_name(&self) -> &str;
    /// The last `lines` lines of the server's logs, for failure messages.
    fn log_tail(&self, lines: usize) -> String;
    /// Stops the server hard (SIGKILL) and waits until it is gone. Idempotent.
    fn kill(&mut self);
    /// Starts the server again on the same port with its data (killing it first if it
    /// still runs) and waits until it answers.
    fn restart(&mut self);
    /// Whether the server is (still) running.
    fn is_running(&mut self) -> bool;
}

impl Homeserver for Synapse {
    fn server(&self) -> Server {
        Server::Synapse
    }
    fn base_url(&self) -> String {
        Synapse::base_url(self)
    }
    fn port(&self) -> u16 {
        Synapse::port(self)
    }
    fn server_name(&self) -> &str {
        Synapse::server_name(self)
    }
    fn log_tail(&self, lines: usize) -> String {
        Synapse::log_tail(self, lines)
    }
    fn kill(&mut self) {
        Synapse::kill(self)
    }
    fn restart(&mut self) {
        Synapse::restart(self)
    }
    fn is_running(&mut self) -> bool {
        Synapse::is_running(self)
    }
}

impl Homeserver for Palpo {
    fn server(&self) -> Server {
        Server::Palpo
    }
    fn base_url(&self) -> String {
        Palpo::base_url(self)
    }
    fn port(&self) -> u16 {
        Palpo::port(self)
    }
    fn server_name(&self) -> &str {
        Palpo::server_name(self)
    }
    fn log_tail(&self, lines: usize) -> String {
        Palpo::log_tail(self, lines)
    }
    fn kill(&mut self) {
        Palpo::kill(self)
    }
    fn restart(&mut self) {
        Palpo::restart(self)
    }
    fn is_running(&mut self) -> bool {
        Palpo::is_running(self)
    }
}

/// Where a server's install script and throwaway data directories are: what the Synapse and
/// palpo lifecycles share.
pub(crate) struct Install {
    /// The server's name, for messages.
    pub(crate) name: &'static str,
    /// Its script under `scripts/`, which takes `install`.
    pub(crate) script: &'static str,
    /// The directory under `target/tmp/` that holds its data directories.
    pub(crate) data: &'static str,
}

impl Install {
    pub(crate) fn repo_root() -> std::path::PathBuf {
        let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        kit.parent().unwrap_or(kit).to_path_buf()
    }

    pub(crate) fn script(&self) -> std::path::PathBuf {
        Self::repo_root().join("scripts").join(self.script)
    }

    /// Parent of all of this server's data directories.
    pub(crate) fn test_root(&self) -> std::path::PathBuf {
        Self::repo_root().join("target").join("tmp").join(self.data)
    }

    /// Runs the install script once per process (`installed` remembers the outcome) after
    /// removing data directories left behind by test processes that are gone. Panics, loudly,
    /// if the install fails: a test that needs the server never skips.
    pub(crate) fn ensure(&self, installed: &std::sync::OnceLock<Result<(), String>>) {
        let result = installed.get_or_init(|| {
            self.remove_stale_dirs();
            let script = self.script();
            let out = std::process::Command::new("bash")
                .arg(&script)
                .arg("install")
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`{} install` failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        });
        if let Err(e) = result {
            panic!(
                "{} is required for this test and could not be installed: {e}",
                self.name
            );
        }
    }

    /// Data directories are named `<pid>-<n>-<nanos>`; removes those whose process no longer
    /// exists (only where `/proc` tells us).
    fn remove_stale_dirs(&self) {
        let proc = std::path::Path::new("/proc");
        if !proc.join("self").exists() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.test_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !proc.join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// A new, empty data directory for one server of this process.
    pub(crate) fn fresh_dir(&self) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = self
            .test_root()
            .join(format!("{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create {} data dir {}: {e}",
                self.name,
                dir.display()
            )
        });
        dir
    }
}

/// Why a server did not come up.
pub(crate) enum NotReady {
    /// Its process ended first.
    Exited(std::process::ExitStatus),
    /// It did not answer 200 in time.
    TimedOut,
}

/// Polls `url` every 100 ms until it answers 200, the server's process (`child`) ends, or
/// `timeout` passes.
pub(crate) fn wait_for_200(
    url: &str,
    child: &mut Option<std::process::Child>,
    timeout: std::time::Duration,
) -> Result<(), NotReady> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .into();
    let started = std::time::Instant::now();
    loop {
        if let Some(Ok(Some(status))) = child.as_mut().map(std::process::Child::try_wait) {
            return Err(NotReady::Exited(status));
        }
        if let Ok(resp) = agent.get(url).call() {
            if resp.status().as_u16() == 200 {
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            return Err(NotReady::TimedOut);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The last `lines` lines of each of `files` in a server's data directory `dir`, for a
/// failure message.
pub(crate) fn log_tail(dir: &std::path::Path, files: &[&str], lines: usize) -> String {
    let mut out = String::new();
    for name in files {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- tail of {} ---\n", path.display()));
        for line in &all[all.len().saturating_sub(lines)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
