//! A throwaway Synapse homeserver for integration tests, benchmarks and the demo: the one
//! implementation of its lifecycle (free port, configuration, health wait, stop).
//!
//! Each [`Synapse`] runs in its own data directory under `target/tmp/synapse-test/`,
//! listening on a free loopback port. Its configuration is the file Synapse generates
//! (`homeserver.yaml`) and, read after it, `test.yaml`: the test settings (loopback listener,
//! open registration, relaxed rate limits) and any [`SynapseOptions::config`] on top.
//!
//! The server runs under `scripts/synapse.sh supervise`, whose stdin is a pipe held by this
//! process: when the process exits, for whatever reason, the pipe closes and the supervisor
//! stops Synapse, so no server outlives its tests.
//!
//! Synapse is installed into `.synapse/venv` on first use (once per process) by
//! `scripts/synapse.sh install`. If it cannot be installed or started the tests panic: they
//! never skip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::lifecycle::{free_port, start_fresh, Install, Kind, Supervisor};

/// Its install script and data directories.
const INSTALL: Install = Install {
    name: "Synapse",
    script: "synapse.sh",
    data: "synapse-test",
};
/// Its supervisor: Synapse alone.
static KIND: Kind = Kind {
    install: INSTALL,
    pid_files: &["synapse.pid"],
    logs: &["homeserver.log", "synapse.stdout", "supervise.log"],
    ready_path: "/health",
    ready_timeout: HEALTH_TIMEOUT,
    stop_timeout: STOP_TIMEOUT,
};
/// Whether `scripts/synapse.sh install` ran in this process, and how it went.
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// How long to wait for `/health` to answer 200 after spawning Synapse.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(90);
/// How long to wait for the supervisor to exit after asking it to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to start a [`Synapse`]: settings of `homeserver.yaml` on top of the test ones.
#[derive(Clone, Debug, Default)]
pub struct SynapseOptions {
    config: Map<String, Value>,
    discoverable: bool,
}

impl SynapseOptions {
    /// The test settings only.
    pub fn new() -> SynapseOptions {
        SynapseOptions::default()
    }

    /// Sets the top-level `homeserver.yaml` setting `key` to `value` (a later call for the
    /// same key wins), e.g. `.config("refreshable_access_token_lifetime", json!("10s"))`.
    /// The value replaces the test setting of that key, if any, as a whole.
    pub fn config(mut self, key: &str, value: Value) -> SynapseOptions {
        self.config.insert(key.to_string(), value);
        self
    }

    /// Every key of the JSON object `settings`, as [`SynapseOptions::config`] does.
    /// Panics if `settings` is not an object.
    pub fn configs(mut self, settings: Value) -> SynapseOptions {
        match settings {
            Value::Object(map) => self.config.extend(map),
            other => panic!("Synapse settings must be a JSON object, not {other}"),
        }
        self
    }

    /// Access tokens that expire after `lifetime` (a Synapse duration: `"10s"`, `"5m"`)
    /// and come with a refresh token when the client asks for one.
    pub fn refreshable_access_token_lifetime(self, lifetime: &str) -> SynapseOptions {
        self.config("refreshable_access_token_lifetime", json!(lifetime))
    }

    /// A server that clients can discover from its server name: the server name is
    /// `127.0.0.1:PORT` (so user ids are `@name:127.0.0.1:PORT`), and it serves its own
    /// `/.well-known/matrix/client` naming `public_baseurl` `http://127.0.0.1:PORT/`
    /// (`serve_client_wellknown`). Set after the port is chosen, before any
    /// [`SynapseOptions::config`] (which may override them).
    pub fn discoverable(mut self) -> SynapseOptions {
        self.discoverable = true;
        self
    }

    /// Starts Synapse with these options: [`Synapse::start_with`].
    pub fn start(self) -> Synapse {
        Synapse::start_with(self)
    }
}

/// A running (or killed) throwaway Synapse.
pub struct Synapse {
    port: u16,
    server_name: String,
    /// `scripts/synapse.sh supervise`, which runs Synapse.
    supervisor: Supervisor,
}

impl Synapse {
    /// Starts a fresh Synapse with an empty database on a free loopback port
    /// and waits until it is healthy.
    ///
    /// Panics with the reason (and the tail of the Synapse log) if Synapse
    /// cannot be installed or started.
    pub fn start() -> Synapse {
        Synapse::start_with(SynapseOptions::new())
    }

    /// Like [`Synapse::start`], with extra settings (see [`SynapseOptions`]).
    pub fn start_with(options: SynapseOptions) -> Synapse {
        start_fresh(&INSTALL, &INSTALLED, || {
            let port = free_port();
            let dir = INSTALL.fresh_dir();
            let server_name = init(&dir, port, &options);
            let mut synapse = Synapse {
                port,
                server_name,
                supervisor: Supervisor::new(&KIND, dir, port, Vec::new()),
            };
            match synapse.supervisor.spawn_and_wait() {
                Ok(_) => Ok(synapse),
                Err(e) => {
                    synapse.kill();
                    Err(format!("(port {port}): {e}"))
                }
            }
        })
    }

    /// One Synapse shared by all tests of this test binary, started on first
    /// use.  For tests that never kill or restart the server.
    ///
    /// It is never dropped: it stops when the test process exits and the
    /// supervisor's stdin closes.
    pub fn shared() -> &'static Synapse {
        static SHARED: OnceLock<Synapse> = OnceLock::new();
        SHARED.get_or_init(Synapse::start)
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server name: `localhost`, or `127.0.0.1:PORT` when
    /// [`discoverable`](SynapseOptions::discoverable).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The loopback port Synapse listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (config, SQLite database, logs).
    pub fn data_dir(&self) -> &Path {
        self.supervisor.dir()
    }

    /// Whether the supervised Synapse is (still) running.
    pub fn is_running(&mut self) -> bool {
        self.supervisor.is_running()
    }

    /// The last `lines` lines of the Synapse log and of its stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        self.supervisor.log_tail(lines)
    }

    /// Stops Synapse hard (SIGKILL, no graceful shutdown) and waits until the
    /// process is gone and the port is closed.  Idempotent.
    pub fn kill(&mut self) {
        self.supervisor.kill();
    }

    /// Starts Synapse again on the same port and data directory (the
    /// database survives) and waits until it is healthy.  Kills it first if
    /// it is still running.
    pub fn restart(&mut self) {
        self.supervisor.restart();
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.supervisor.stop();
        if std::env::var_os("SYNAPSE_KEEP_DATA").is_none() && !thread::panicking() {
            let _ = fs::remove_dir_all(self.supervisor.dir());
        }
    }
}

/// The virtualenv `scripts/synapse.sh install` installs Synapse into.
fn venv_python() -> PathBuf {
    let venv = match std::env::var_os("SYNAPSE_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => Install::repo_root().join(".synapse").join("venv"),
    };
    venv.join("bin").join("python")
}

/// Writes the configuration into `dir`: the file Synapse generates (keys, SQLite database
/// and log paths), `test.yaml` with the test settings and `extra` on top, and a log
/// configuration at WARNING level. Returns the server name. Panics with Synapse's output on
/// failure.
fn init(dir: &Path, port: u16, options: &SynapseOptions) -> String {
    let config = dir.join("homeserver.yaml");
    let out = Command::new(venv_python())
        .args(["-m", "synapse.app.homeserver", "--server-name", "localhost"])
        .arg("--config-path")
        .arg(&config)
        .arg("--data-directory")
        .arg(dir)
        .args(["--generate-config", "--report-stats=no"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", venv_python().display()));
    if !out.status.success() {
        panic!(
            "generating {} failed ({}):\n{}{}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut settings = test_settings(port);
    if options.discoverable {
        // Read after homeserver.yaml: only the name changes, the key and log paths stay.
        let discoverable = json!({
            "server_name": format!("127.0.0.1:{port}"),
            "public_baseurl": format!("http://127.0.0.1:{port}/"),
            "serve_client_wellknown": true,
        });
        if let Value::Object(map) = discoverable {
            settings.extend(map);
        }
    }
    settings.extend(options.config.clone());
    let server_name = match settings.get("server_name") {
        Some(Value::String(name)) => name.clone(),
        _ => "localhost".to_owned(),
    };
    // JSON is YAML: Synapse reads this file after homeserver.yaml, key by key.
    let text = serde_json::to_string_pretty(&Value::Object(settings)).expect("JSON settings");
    write(&dir.join("test.yaml"), &text);
    write(&dir.join("localhost.log.config"), &log_config(dir));
    server_name
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The settings every test Synapse has: one plain HTTP client listener on the loopback port,
/// open registration, no federation lookups or previews, and rate limits tests never reach.
fn test_settings(port: u16) -> Map<String, Value> {
    let relaxed = json!({"per_second": 10000, "burst_count": 100000});
    let settings = json!({
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{"names": ["client"], "compress": false}],
        }],
        // Synapse refuses to start without an explicit answer; never phone home.
        "report_stats": false,
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "suppress_key_server_warning": true,
        "trusted_key_servers": [],
        "presence": {"enabled": true},
        "url_preview_enabled": false,
        // Tests create many rooms, users and events quickly.
        "rc_message": relaxed,
        "rc_registration": relaxed,
        "rc_registration_token_validity": relaxed,
        "rc_login": {"address": relaxed, "account": relaxed, "failed_attempts": relaxed},
        "rc_room_creation": relaxed,
        "rc_joins": {"local": relaxed, "remote": relaxed},
        "rc_joins_per_room": relaxed,
        "rc_invites": {"per_room": relaxed, "per_user": relaxed, "per_issuer": relaxed},
        "rc_3pid_validation": relaxed,
        "rc_admin_redaction": relaxed,
        "rc_key_requests": relaxed,
        "rc_presence": {"per_user": relaxed},
    });
    match settings {
        Value::Object(map) => map,
        _ => unreachable!("the settings are an object"),
    }
}

/// Logs to `dir/homeserver.log` at WARNING level.
fn log_config(dir: &Path) -> String {
    format!(
        "version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {}
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
",
        dir.join("homeserver.log").display()
    )
}
