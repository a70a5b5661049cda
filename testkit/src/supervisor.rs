//! The `supervise` process of a throwaway homeserver (`scripts/<server>.sh supervise DIR ...`):
//! the one implementation of starting it, telling it to kill or stop its server, and reaping
//! it, for [`Synapse`](crate::synapse::Synapse) and [`Palpo`](crate::palpo::Palpo) alike.
//!
//! The supervisor's stdin is a pipe held by this process: a line `kill` asks for SIGKILL, and
//! its end (this process exiting, for whatever reason) for a graceful stop, so no server
//! outlives its tests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::homeserver::{self, wait_for_200, Install, NotReady};

/// What differs between the servers' supervisors.
pub(crate) struct Kind {
    pub(crate) install: Install,
    /// Files in the data directory holding the pids of the processes the supervisor runs:
    /// killed directly when the supervisor itself is stuck, and removed once it exited.
    pub(crate) pid_files: &'static [&'static str],
    /// The logs in the data directory worth showing when something fails, the supervisor's
    /// own (`supervise.log`) last.
    pub(crate) logs: &'static [&'static str],
    /// How long the supervisor may take to exit after being told to stop.
    pub(crate) stop_timeout: Duration,
}

/// A server's supervisor, running or not.
pub(crate) struct Supervisor {
    kind: &'static Kind,
    dir: PathBuf,
    /// `None` while not running.
    child: Option<Child>,
    /// Write end of the supervisor's stdin.
    stdin: Option<ChildStdin>,
}

impl Supervisor {
    /// A supervisor for the server in `dir`, not started.
    pub(crate) fn new(kind: &'static Kind, dir: PathBuf) -> Supervisor {
        Supervisor {
            kind,
            dir,
            child: None,
            stdin: None,
        }
    }

    /// The server's data directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Spawns `SCRIPT supervise DIR ARGS...` (its output appended to `DIR/supervise.log`) and
    /// waits until `url` answers 200; how long that took.
    pub(crate) fn spawn_and_wait(
        &mut self,
        args: &[String],
        url: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let name = self.kind.install.name;
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
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        wait_for_200(url, &mut self.child, timeout).map_err(|why| match why {
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

    /// Kills the server and starts it again with `spawn` (the same data directory and ports)
    /// until it comes up, for up to 30 s; how long the start that worked took. Panics when
    /// it never does.
    pub(crate) fn restart(
        &mut self,
        port: u16,
        mut spawn: impl FnMut(&mut Supervisor) -> Result<Duration, String>,
    ) -> Duration {
        let name = self.kind.install.name;
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match spawn(self) {
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
        homeserver::log_tail(&self.dir, self.kind.logs, lines)
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
