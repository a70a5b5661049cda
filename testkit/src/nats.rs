//! A throwaway NATS server with JetStream for the fleet's tests and benchmarks: a free
//! loopback port, a store directory of its own, stopped at drop, restartable on the same port
//! and store (what it stored survives, as in production).
//!
//! The binary is `NATS_SERVER_BIN` if set, else `nats-server` on `PATH` (`scripts/nats.sh
//! install` installs it). If it is missing the tests panic, saying how to install it: they
//! never skip.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a start may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The `nats-server` binary: `NATS_SERVER_BIN`, else the first `nats-server` on `PATH`.
/// Panics, saying how to install it, when there is none.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "NATS_SERVER_BIN={} is not a file: run `bash scripts/nats.sh install`",
            bin.display()
        );
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server is not installed (not on PATH, NATS_SERVER_BIN unset): \
                 run `bash scripts/nats.sh install`, or set NATS_SERVER_BIN"
            )
        })
}

/// A running (or stopped) `nats-server -js`.
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port and an empty store under
    /// `target/tmp/nats-test/`, and waits until it accepts clients.
    pub fn start() -> NatsServer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp/nats-test");
        let dir = root.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).expect("create the NATS store directory");
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            listener.local_addr().unwrap().port()
        };
        let mut server = NatsServer {
            port,
            store: dir.join("store"),
            log: dir.join("nats.log"),
            child: None,
        };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (the same after a restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops it cleanly (SIGTERM: JetStream writes its state) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops it abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the NATS log");
        let mut last_error = String::new();
        // The port of a server just stopped may take a moment to be free again.
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            let mut child = Command::new(binary());
            child
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                ])
                .arg(&self.store)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("clone the log handle"));
            // SAFETY: prctl(2) only, between fork and exec: the server dies with this process
            // (the thread that spawned it), so no server outlives its test.
            unsafe {
                child.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = child
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary().display()));
            match wait_ready(&mut child, self.port, deadline) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = e;
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "nats-server did not start on port {}: {last_error}; log:\n{}",
            self.port,
            self.log_tail(30)
        );
    }
}

/// Waits for the server's `INFO` line with JetStream on.
fn wait_ready(child: &mut Child, port: u16, deadline: Instant) -> Result<(), String> {
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("nats-server exited: {status}"));
        }
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            let mut reader = BufReader::new(stream.take(64 * 1024));
            if reader.read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                if line.contains("\"jetstream\":true") {
                    return Ok(());
                }
                return Err(format!("JetStream is off: {line}"));
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err("not ready in time".to_owned())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
