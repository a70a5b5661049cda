//! A throwaway palpo homeserver (<https://github.com/palpo-im/palpo>, version 0.0.2) for
//! integration tests: the second homeserver the tests run against, next to [`Synapse`].
//!
//! Each [`Palpo`] runs in its own data directory under `target/tmp/palpo-test/`: a fresh
//! PostgreSQL cluster (`DIR/pg`, on a free loopback port, trust authentication, the database
//! `palpo`) and palpo itself on another free loopback port, configured by `DIR/palpo.toml`
//! (server name `localhost`, open registration, no federation, no admin room).
//!
//! Both run under `scripts/palpo.sh supervise`, whose stdin is a pipe held by this process:
//! when the process exits, for whatever reason, the pipe closes and the supervisor stops
//! palpo and PostgreSQL, so no server outlives its tests.
//!
//! PostgreSQL and palpo are installed on first use (once per process) by
//! `scripts/palpo.sh install` (`PALPO_BIN` names an existing palpo binary instead). If
//! either cannot be installed or started the tests panic: they never skip.
//!
//! [`Synapse`]: crate::synapse::Synapse

use std::fs;
use std::path::Path;
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use crate::lifecycle::{free_port, start_fresh, Install, Kind, Options, Supervisor};

/// Its install script and data directories.
const INSTALL: Install = Install {
    name: "palpo",
    script: "palpo.sh",
    data: "palpo-test",
};
/// Its supervisor: palpo and PostgreSQL.
static KIND: Kind = Kind {
    install: INSTALL,
    pid_files: &["palpo.pid", "postgres.pid"],
    logs: &[
        "palpo.stdout",
        "postgres.log",
        "initdb.log",
        "supervise.log",
    ],
    ready_path: "/_matrix/client/versions",
    ready_timeout: READY_TIMEOUT,
    stop_timeout: STOP_TIMEOUT,
};
/// Whether `scripts/palpo.sh install` ran in this process, and how it went.
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// How long to wait for `/_matrix/client/versions` to answer 200 after spawning palpo
/// (PostgreSQL's initdb and palpo's migrations included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the supervisor to exit after asking it to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) throwaway palpo with its PostgreSQL.
pub struct Palpo {
    server_name: String,
    port: u16,
    pg_port: u16,
    /// How long the last start took, from spawning the supervisor to the first 200.
    startup: Duration,
    /// `scripts/palpo.sh supervise`, which runs palpo and PostgreSQL.
    supervisor: Supervisor,
}

impl Palpo {
    /// Starts a fresh palpo with an empty database on a free loopback port and waits until
    /// it answers `/_matrix/client/versions`.
    ///
    /// Panics with the reason (and the tails of the logs) if palpo or PostgreSQL cannot be
    /// installed or started.
    pub fn start() -> Palpo {
        Palpo::start_with(Options::new())
    }

    /// Like [`Palpo::start`], with `options` ([`Options::discoverable`]: server name
    /// `127.0.0.1:PORT`; palpo serves its well-known either way).
    pub fn start_with(options: Options) -> Palpo {
        start_fresh(&INSTALL, &INSTALLED, || {
            let port = free_port();
            let pg_port = free_port();
            let dir = INSTALL.fresh_dir();
            let server_name = if options.discoverable {
                format!("127.0.0.1:{port}")
            } else {
                "localhost".to_owned()
            };
            write(
                &dir.join("palpo.toml"),
                &config(&server_name, port, pg_port),
            );
            let mut palpo = Palpo {
                server_name,
                port,
                pg_port,
                startup: Duration::ZERO,
                supervisor: Supervisor::new(&KIND, dir, port, vec![pg_port.to_string()]),
            };
            match palpo.supervisor.spawn_and_wait() {
                Ok(startup) => {
                    palpo.startup = startup;
                    Ok(palpo)
                }
                Err(e) => {
                    palpo.kill();
                    Err(format!("(port {port}, PostgreSQL {pg_port}): {e}"))
                }
            }
        })
    }

    /// One palpo shared by all tests of this test binary, started on first use. For tests
    /// that never kill or restart the server.
    ///
    /// It is never dropped: it stops when the test process exits and the supervisor's stdin
    /// closes.
    pub fn shared() -> &'static Palpo {
        static SHARED: OnceLock<Palpo> = OnceLock::new();
        SHARED.get_or_init(Palpo::start)
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server name: `localhost` (user ids are `@name:localhost`), or `127.0.0.1:PORT`
    /// when [`discoverable`](Options::discoverable).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The loopback port palpo listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The loopback port of palpo's PostgreSQL.
    pub fn postgres_port(&self) -> u16 {
        self.pg_port
    }

    /// The data directory (`palpo.toml`, the PostgreSQL cluster, logs).
    pub fn data_dir(&self) -> &Path {
        self.supervisor.dir()
    }

    /// How long the last start took: from spawning PostgreSQL and palpo (a fresh cluster,
    /// palpo's migrations) to palpo's first answer.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Whether the supervised palpo and PostgreSQL are (still) running.
    pub fn is_running(&mut self) -> bool {
        self.supervisor.is_running()
    }

    /// The last `lines` lines of palpo's output, PostgreSQL's log and the supervisor's.
    pub fn log_tail(&self, lines: usize) -> String {
        self.supervisor.log_tail(lines)
    }

    /// Stops palpo hard (SIGKILL) and PostgreSQL (fast shutdown) and waits until both are
    /// gone. Idempotent.
    pub fn kill(&mut self) {
        self.supervisor.kill();
    }

    /// Starts palpo again on the same ports, data directory and database (it survives),
    /// and waits until it answers. Kills it first if it is still running.
    pub fn restart(&mut self) {
        self.startup = self.supervisor.restart();
    }
}

impl Drop for Palpo {
    fn drop(&mut self) {
        self.supervisor.stop();
        if std::env::var_os("PALPO_KEEP_DATA").is_none() && !thread::panicking() {
            remove_dir(self.supervisor.dir());
        }
    }
}

/// `palpo.toml`: palpo named `server_name` on `port`, its database on `pg_port`.
fn config(server_name: &str, port: u16, pg_port: u16) -> String {
    format!(
        r#"server_name = "{server_name}"
listen_addr = "127.0.0.1:{port}"
allow_registration = true
allow_federation = false
allow_check_for_updates = false
allow_local_presence = true
enable_admin_room = false
enable_lightning_bolt = false
trusted_servers = []
log_format = "compact"
rust_log = "warn"

[db]
url = "postgres://postgres@127.0.0.1:{pg_port}/palpo"
# Its default of 10 stalls 50 accounts long-polling at once (see the README's table).
pool_size = 60

[well_known]
client = "http://127.0.0.1:{port}"
"#
    )
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Removes a data directory. The PostgreSQL cluster in it may belong to the `postgres`
/// user, which root may remove anyway.
fn remove_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}
