//! Helpers for driving a [`SyncService`] in tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use matrix_sync_service::{Config, Event, EventKind, SyncService, SyncState};

use super::client::Account;

/// A config for `account` with a fixed jitter seed.
pub fn config_for(account: &Account) -> Config {
    let mut config = Config::new(account.base_url(), account.access_token.clone());
    config.jitter_seed = 1;
    config
}

/// Receives events until `done` says so, failing after `within`.
pub fn collect_until(
    service: &SyncService,
    within: Duration,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    while !done(&events) {
        match service.events().recv_deadline(deadline) {
            Ok(event) => events.push(event),
            Err(e) => panic!(
                "events ended ({e}) before the test saw what it waits for; got {} events, last: {:#?}",
                events.len(),
                events.last()
            ),
        }
    }
    events
}

/// Receives (and discards) events until the service is live after a checkpoint.
///
/// The driver publishes the state after handing on the batch's events, so the state may read
/// `Live` a moment after the checkpoint arrived: it is polled, not read once.
pub fn drain_until_live(service: &SyncService) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checkpoint = false;
    while !(checkpoint && service.state() == SyncState::Live) {
        assert!(
            Instant::now() < deadline,
            "not live after a first batch within 30 s (checkpoint seen: {checkpoint}, state {:?})",
            service.state()
        );
        match service.events().recv_timeout(Duration::from_millis(20)) {
            Ok(event) => checkpoint |= matches!(&event.kind, EventKind::Checkpoint(_)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("events ended before the service was live: {e}"),
        }
    }
}

/// Stops the service and returns how long until both channels reported disconnection.
pub fn time_to_close(service: &SyncService) -> Duration {
    let started = Instant::now();
    service.stop();
    while service
        .events()
        .recv_timeout(Duration::from_secs(5))
        .is_ok()
    {}
    while service
        .errors()
        .recv_timeout(Duration::from_secs(5))
        .is_ok()
    {}
    started.elapsed()
}

/// The bodies of the text messages among `events` in `room`, in delivery order.
pub fn bodies_in(events: &[Event], room: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Message)
        .filter(|e| e.room_id.as_ref().is_some_and(|r| r.as_str() == room))
        .filter_map(|e| e.body.clone())
        .collect()
}

/// The last checkpoint token among `events`.
pub fn last_checkpoint(events: &[Event]) -> Option<String> {
    events.iter().rev().find_map(|e| match &e.kind {
        EventKind::Checkpoint(c) => Some(c.next_batch.clone()),
        _ => None,
    })
}

/// The `tail` example built by `cargo test` beside this test binary.
/// Every stdout line of a tail, parsed, on a channel (closed at end of file).
pub fn json_lines(stdout: ChildStdout) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value = serde_json::from_str(&line).expect("tail prints JSON lines");
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn tail_binary() -> std::path::PathBuf {
    matrix_sync_testkit::example::example_binary("tail", "run `cargo build --examples` first")
}

/// A running tail, killed when dropped (a failed assertion leaves no process behind).
pub struct Tail(pub Child);

impl Tail {
    pub fn spawn(command: &mut Command) -> Self {
        Self(command.spawn().expect("tail starts"))
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Its exit status, if it ends within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends `signal`; returns the exit status and how long after the signal it came.
    pub fn signal(&mut self, signal: i32) -> (ExitStatus, Duration) {
        let started = Instant::now();
        // SAFETY: kill takes two integers; the pid is our unreaped child, so it is not reused.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
        let status = self
            .wait_exit(Duration::from_secs(3))
            .unwrap_or_else(|| panic!("tail still runs 3 s after signal {signal}"));
        (status, started.elapsed())
    }

    /// The kernel function the main thread sleeps in (`/proc/<pid>/wchan`).
    pub fn main_thread_wchan(&self) -> String {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/wchan")).unwrap_or_default()
    }

    /// Waits until the main thread sleeps in a write to a full pipe.
    pub fn wait_until_blocked_writing(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let wchan = self.main_thread_wchan();
            // `pipe_write` (`anon_pipe_write` on recent kernels), `pipe_wait` on old ones.
            if wchan.contains("pipe_write") || wchan.contains("pipe_wait") {
                return;
            }
            if let Some(status) = self.0.try_wait().unwrap() {
                panic!("tail ended ({status}) before blocking on {what}");
            }
            assert!(
                Instant::now() < deadline,
                "tail did not block writing {what}; main thread in {wchan:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
