//! What the lifecycles of both throwaway homeservers ([`Synapse`](crate::synapse::Synapse)
//! and [`Palpo`](crate::palpo::Palpo)) share: the options to start one with, installing it
//! once per process, a fresh data directory and a free port, and the `supervise` process that
//! runs it (`scripts/<server>.sh supervise DIR ...`): starting it, waiting for the server's
//! first 200, telling it to kill or stop the server, and reaping it.
//!
//! The supervisor's stdin is a pipe held by this process: a line `kill` asks for SIGKILL, and
//! its end (this process exiting, for whatever reason) for a graceful stop, so no server
//! outlives its tests.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How to start a fresh server ([`Server::start_with`](crate::homeserver::Server::start_with)),
/// whichever it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub(crate) discoverable: bool,
    pub(crate) quick_passwords: bool,
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

/// How many fresh ports to try when a server dies during startup (a port may be taken between
/// choosing and binding it).
const START_ATTEMPTS: u32 = 3;

/// Installs the server of `install` (once per process), then starts one with `attempt` (it
/// makes fresh ports and a fresh data directory, and on failure stops what it started and
/// says why) until one comes up. Panics with every attempt's
/// failure when none does.
pub(crate) fn start_fresh<T>(
    install: &Install,
    installed: &OnceLock<Result<(), String>>,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    install.ensure(installed);
    let mut failures = Vec::new();
    for number in 1..=START_ATTEMPTS {
        match attempt() {
            Ok(server) => return server,
            Err(why) => failures.push(format!("attempt {number} {why}")),
        }
    }
    panic!(
        "could not start {} after {START_ATTEMPTS} attempts:\n{}",
        install.name,
        failures.join("\n\n")
    );
}

/// What differs between the servers' supervisors.
pub(crate) struct Kind {
    pub(crate) install: Install,
    /// Files in the data directory holding the pids of the processes the supervisor runs:
    /// killed directly when the supervisor itself is stuck, and removed once it exited.
    pub(crate) pid_files: &'static [&'static str],
    /// The logs in the data directory worth showing when something fails, the supervisor's
    /// own (`supervise.log`) last.
    pub(crate) logs: &'static [&'static str],
    /// The path that answers 200 once the server is up.
    pub(crate) ready_path: &'static str,
    /// How long it may take to.
    pub(crate) ready_timeout: Duration,
    /// How long the supervisor may take to exit after being told to stop.
    pub(crate) stop_timeout: Duration,
}

/// A server's supervisor, running or not.
pub(crate) struct Supervisor {
    kind: &'static Kind,
    dir: PathBuf,
    /// The loopback port the server answers on.
    port: u16,
    /// What `supervise DIR` is given after the directory.
    args: Vec<String>,
    /// `None` while not running.
    child: Option<Child>,
    /// Write end of the supervisor's stdin.
    stdin: Option<ChildStdin>,
}

impl Supervisor {
    /// A supervisor for the server in `dir` answering on `port`, run with `args` after the
    /// directory; not started.
    pub(crate) fn new(kind: &'static Kind, dir: PathBuf, port: u16, args: Vec<String>) -> Self {
        Supervisor {
            kind,
            dir,
            port,
            args,
            child: None,
            stdin: None,
        }
    }

    /// The server's data directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Spawns `SCRIPT supervise DIR ARGS...` (its output appended to `DIR/supervise.log`) and
    /// waits until the server's ready path answers 200; how long that took.
    pub(crate) fn spawn_and_wait(&mut self) -> Result<Duration, String> {
        let name = self.kind.install.name;
        let (url, timeout) = (
            format!("http://127.0.0.1:{}{}", self.port, self.kind.ready_path),
            self.kind.ready_timeout,
        );
        assert!(self.child.is_none(), "{name} is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("supervise.log"))
            .map_err(|e| format!("cannot open supervise.log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot clone log handle: {e}"))?;
        let script = self.kind.install.script();
        let started = Instant::now();
        let mut child = Command::new("bash")
            .arg(&script)
            .arg("supervise")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        wait_for_200(&url, &mut self.child, timeout).map_err(|why| match why {
            NotReady::Exited(status) => format!(
                "{name} (or what it runs) exited during startup ({status})\n{}",
                self.log_tail(40)
            ),
            NotReady::TimedOut => format!(
                "{name} did not answer 200 on {url} within {timeout:?}\n{}",
                self.log_tail(40)
            ),
        })?;
        Ok(started.elapsed())
    }

    /// Kills the server and starts it again (the same data directory and ports) until it
    /// comes up, for up to 30 s; how long the start that worked took. Panics when it never
    /// does.
    pub(crate) fn restart(&mut self) -> Duration {
        let (name, port) = (self.kind.install.name, self.port);
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.spawn_and_wait() {
                Ok(startup) => return startup,
                Err(e) if Instant::now() < deadline => {
                    // E.g. the port is briefly still in use; retry.
                    eprintln!("{name}: restart on port {port} failed, retrying: {e}");
                    self.kill();
                    thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("could not restart {name} on port {port}: {e}"),
            }
        }
    }

    /// Whether the supervisor (and so its server) is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last `lines` lines of each of the server's logs.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.dir, self.kind.logs, lines)
    }

    /// Stops the server hard (SIGKILL) and waits until the supervisor is gone. Idempotent.
    pub(crate) fn kill(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // If the supervisor is already gone the write fails, which is fine: the end of
            // the pipe stops everything too.
            let _ = stdin.write_all(b"kill\n");
            let _ = stdin.flush();
        }
        self.reap();
    }

    /// Stops the server gracefully (the end of the supervisor's stdin). Idempotent.
    pub(crate) fn stop(&mut self) {
        drop(self.stdin.take());
        self.reap();
    }

    /// Waits for the supervisor to exit, killing it and what it runs if it takes too long.
    fn reap(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + self.kind.stop_timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    for name in self.kind.pid_files {
                        if let Some(pid) = read_pid(&self.dir.join(name)) {
                            let _ = Command::new("kill")
                                .args(["-KILL", &pid.to_string()])
                                .status();
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        for name in self.kind.pid_files {
            let _ = fs::remove_file(self.dir.join(name));
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A free loopback port, never one already handed out in this process.
pub(crate) fn free_port() -> u16 {
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
    panic!("could not find an unused loopback port");
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
