//! Send-to-receive latency of 100 messages through the `tail` example, against a real Synapse,
//! beside a bare long-poll loop measured in the same run.
//!
//! ```text
//! cargo build --release --example tail && cargo bench --bench latency
//! ```
//!
//! A throwaway Synapse on loopback; bob creates a room, alice joins. Two receivers run as alice
//! at the same time:
//!
//! * `tail`: the release build of the example, as a child process with its own device's token;
//!   each stdout line is timestamped when read;
//! * `bare`: a plain `ureq` loop on a second device, `GET /sync?timeout=30000&since=..` and
//!   nothing else (no filter, no backoff, no normalization); timestamped when a body is read.
//!
//! Once both are live (tail printed a checkpoint, the bare loop holds a token), bob sends
//! `lat 0` .. `lat 99`, one every 100 ms. Latency is the receive instant minus the instant just
//! before bob's send call, matched by body. Percentiles are nearest-rank.
//!
//! Without `--bench` (as under `cargo test --benches`) it only says it was skipped: it needs
//! Synapse and the release `tail` binary, and takes about a minute.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use matrix_sync_testkit::client::{self, room_of_two};
use matrix_sync_testkit::synapse::Synapse;
use serde_json::Value;

/// Messages bob sends.
const MESSAGES: usize = 100;
/// Interval between the starts of two sends.
const INTERVAL: Duration = Duration::from_millis(100);
/// How long both receivers get to become live.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the last send the receivers get to report every message.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long tail gets to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the benchmark's message bodies.
const PREFIX: &str = "lat ";

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Source {
    Tail,
    Bare,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Tail => "tail",
            Source::Bare => "bare",
        }
    }
}

/// First arrival of each message per receiver: (receiver, body) -> (event id, instant).
type Received = HashMap<(Source, String), (String, Instant)>;

/// One message bob sent.
struct Sent {
    body: String,
    event_id: String,
    /// Just before the send call.
    at: Instant,
    /// How long the send call took.
    took: Duration,
}

/// What the receiver threads report to the main thread.
enum Report {
    /// The receiver is live: tail printed a checkpoint, the bare loop has its first token.
    Live(Source),
    /// A benchmark message arrived.
    Received {
        source: Source,
        body: String,
        event_id: String,
        at: Instant,
    },
    /// The receiver ended (EOF on tail's stdout, or the bare loop failed); `None` when clean.
    Ended(Source, Option<String>),
}

/// Kills the child on drop, so that a panic never leaves `tail` running.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("tail is running").id()
    }

    /// SIGTERM, then waits up to `EXIT_TIMEOUT`; `None` if it had to be killed.
    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.0.take()?;
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sent {
            eprintln!("latency: could not send SIGTERM to tail ({pid})");
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("latency: skipped (needs Synapse and a release tail; run `cargo bench --bench latency`)");
        return ExitCode::SUCCESS;
    }
    let Some(tail_bin) = find_tail() else {
        eprintln!(
            "latency: the tail example is not built; run `cargo build --release --example tail` first"
        );
        return ExitCode::FAILURE;
    };
    warn_if_stale(&tail_bin);
    run(&tail_bin)
}

/// `target/release/examples/tail`, next to this bench's `deps` directory, or under the manifest.
fn find_tail() -> Option<PathBuf> {
    let name = format!("tail{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/release/deps/latency-<hash>
        if let Some(profile_dir) = exe.parent().and_then(|deps| deps.parent()) {
            if profile_dir.ends_with("release") {
                candidates.push(profile_dir.join("examples").join(&name));
            }
        }
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/release/examples")
            .join(&name),
    );
    candidates.into_iter().find(|p| p.is_file())
}

/// Warns when a source file is newer than the tail binary (a stale build would be measured).
fn warn_if_stale(tail_bin: &Path) {
    let Ok(built) = tail_bin.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![root.join("examples/tail.rs")];
    if let Ok(entries) = std::fs::read_dir(root.join("src")) {
        sources.extend(entries.flatten().map(|e| e.path()));
    }
    let newer: Vec<String> = sources
        .iter()
        .filter(|p| {
            p.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
        })
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.display().to_string())
        .collect();
    if !newer.is_empty() {
        eprintln!(
            "latency: warning: {} changed after tail was built; run `cargo build --release --example tail` to measure the current code",
            newer.join(", ")
        );
    }
}

fn run(tail_bin: &Path) -> ExitCode {
    let started = Instant::now();
    let synapse = Synapse::start();
    let base = synapse.base_url();
    let (alice, bob, room) = room_of_two(&base, "alice", "bob");
    // A second device for the bare loop, so that Synapse never serves both receivers from one
    // cached sync response.
    let alice_bare = alice.new_device();
    println!(
        "latency: Synapse on port {} ready, room set up in {:.1} s",
        synapse.port(),
        started.elapsed().as_secs_f64()
    );

    let (tx, rx) = mpsc::channel();

    let mut child = Command::new(tail_bin)
        .arg("--homeserver")
        .arg(&base)
        .env("MATRIX_ACCESS_TOKEN", &alice.access_token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tail_bin.display()));
    let stdout = child.stdout.take().expect("tail stdout is piped");
    let stderr = child.stderr.take().expect("tail stderr is piped");
    let mut tail = ChildGuard(Some(child));
    let tail_reader = spawn_tail_reader(stdout, tx.clone());
    let tail_stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });

    let stop = Arc::new(AtomicBool::new(false));
    let bare_agent = bare_agent();
    let bare = spawn_bare_loop(
        bare_agent.clone(),
        base.clone(),
        alice_bare.access_token.clone(),
        room.clone(),
        stop.clone(),
        tx.clone(),
    );
    drop(tx);

    let mut received: Received = HashMap::new();
    let mut ended: Vec<(Source, Option<String>)> = Vec::new();
    wait_live(&rx, &mut received, &mut ended, tail.pid());
    // Let both receivers send their first long poll before the first message.
    thread::sleep(Duration::from_millis(500));

    let mut sent: Vec<Sent> = Vec::with_capacity(MESSAGES);
    let first = Instant::now();
    for i in 0..MESSAGES {
        let due = first + INTERVAL * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let body = format!("{PREFIX}{i}");
        let at = Instant::now();
        let event_id = bob.send_text(&room, &body);
        sent.push(Sent {
            body,
            event_id,
            at,
            took: at.elapsed(),
        });
        drain(&rx, &mut received, &mut ended);
    }

    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while received.len() < 2 * MESSAGES && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(report) => record(report, &mut received, &mut ended),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    let status = tail.terminate();
    stop.store(true, Ordering::SeqCst);
    bare_agent.shutdown();
    let _ = tail_reader.join();
    let bare_result = bare.join();
    drain(&rx, &mut received, &mut ended);
    let tail_err = tail_stderr.join().unwrap_or_default();

    report(&sent, &received);

    let mut ok = true;
    match status {
        Some(s) if s.success() => println!("tail: exited 0 after SIGTERM"),
        Some(s) => {
            ok = false;
            println!("tail: exited with {s} after SIGTERM")
        }
        None => {
            ok = false;
            println!("tail: did not exit within {EXIT_TIMEOUT:?} of SIGTERM; killed")
        }
    }
    if bare_result.is_err() {
        ok = false;
        println!("bare: the loop thread panicked");
    }
    for (source, error) in &ended {
        if let Some(error) = error {
            println!("{}: ended with an error: {error}", source.name());
        }
    }
    let errors: Vec<&str> = tail_err
        .lines()
        .filter(|l| !l.starts_with("state:"))
        .collect();
    if !errors.is_empty() {
        println!("tail stderr (besides state lines):");
        for line in errors.iter().take(20) {
            println!("  {line}");
        }
    }
    let complete = [Source::Tail, Source::Bare]
        .iter()
        .all(|s| received.keys().filter(|(source, _)| source == s).count() == MESSAGES);
    if !complete {
        ok = false;
        println!("latency: not every message reached both receivers (see the counts above)");
    }
    println!(
        "latency: whole run {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(synapse);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Waits until both receivers are live; panics after `LIVE_TIMEOUT` or if one ends first.
fn wait_live(
    rx: &Receiver<Report>,
    received: &mut Received,
    ended: &mut Vec<(Source, Option<String>)>,
    tail_pid: u32,
) {
    let deadline = Instant::now() + LIVE_TIMEOUT;
    let (mut tail_live, mut bare_live) = (false, false);
    while !(tail_live && bare_live) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Report::Live(Source::Tail)) => tail_live = true,
            Ok(Report::Live(Source::Bare)) => bare_live = true,
            Ok(Report::Ended(source, error)) => panic!(
                "{} ended before the benchmark started: {}",
                source.name(),
                error.unwrap_or_else(|| "end of output".to_owned())
            ),
            Ok(other) => record(other, received, ended),
            Err(_) => panic!(
                "receivers not live within {LIVE_TIMEOUT:?} (tail {tail_pid} live: {tail_live}, bare loop live: {bare_live})"
            ),
        }
    }
}

fn drain(
    rx: &Receiver<Report>,
    received: &mut Received,
    ended: &mut Vec<(Source, Option<String>)>,
) {
    while let Ok(report) = rx.try_recv() {
        record(report, received, ended);
    }
}

fn record(report: Report, received: &mut Received, ended: &mut Vec<(Source, Option<String>)>) {
    match report {
        Report::Live(_) => {}
        Report::Received {
            source,
            body,
            event_id,
            at,
        } => {
            // The first arrival counts; a duplicate would show up in the event id check only.
            received.entry((source, body)).or_insert((event_id, at));
        }
        Report::Ended(source, error) => ended.push((source, error)),
    }
}

/// Reads tail's stdout line by line, timestamping each line as soon as it is read.
fn spawn_tail_reader(stdout: impl Read + Send + 'static, tx: Sender<Report>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut live = false;
        let mut error = None;
        for line in BufReader::new(stdout).lines() {
            let at = Instant::now();
            let line = match line {
                Ok(line) => line,
                Err(e) => {
                    error = Some(format!("reading stdout: {e}"));
                    break;
                }
            };
            let value: Value = match serde_json::from_str(&line) {
                Ok(value) => value,
                Err(e) => {
                    error = Some(format!("not JSON ({e}): {line}"));
                    break;
                }
            };
            match value["kind"].as_str() {
                Some("checkpoint") if !live => {
                    live = true;
                    let _ = tx.send(Report::Live(Source::Tail));
                }
                Some("message") => {
                    if let Some(body) = value["body"].as_str().filter(|b| b.starts_with(PREFIX)) {
                        let _ = tx.send(Report::Received {
                            source: Source::Tail,
                            body: body.to_owned(),
                            event_id: value["event_id"].as_str().unwrap_or_default().to_owned(),
                            at,
                        });
                    }
                }
                _ => {}
            }
        }
        let _ = tx.send(Report::Ended(Source::Tail, error));
    })
}

/// The bare loop's agent: every status as a value, no proxy, a deadline past the long poll.
fn bare_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(45)))
        .build()
        .into()
}

/// `GET /sync` in a loop: an initial `timeout=0` sync for a token, then 30 s long polls.
fn spawn_bare_loop(
    agent: ureq::Agent,
    base: String,
    token: String,
    room: String,
    stop: Arc<AtomicBool>,
    tx: Sender<Report>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let auth = format!("Bearer {token}");
        let sync = |query: &str| -> Result<(Value, Instant), String> {
            let url = format!("{base}/_matrix/client/v3/sync?{query}");
            let mut resp = agent
                .get(&url)
                .header("Authorization", &auth)
                .call()
                .map_err(|e| format!("GET /sync: {e}"))?;
            let status = resp.status().as_u16();
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| format!("reading /sync: {e}"))?;
            let at = Instant::now();
            if status != 200 {
                return Err(format!("GET /sync: {status} {text}"));
            }
            let value = serde_json::from_str(&text).map_err(|e| format!("/sync body: {e}"))?;
            Ok((value, at))
        };
        let next_batch = |value: &Value| -> Result<String, String> {
            value["next_batch"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "sync response without next_batch".to_owned())
        };
        let outcome = (|| -> Result<(), String> {
            let (value, _) = sync("timeout=0")?;
            let mut since = next_batch(&value)?;
            let _ = tx.send(Report::Live(Source::Bare));
            while !stop.load(Ordering::SeqCst) {
                let (value, at) = sync(&format!("timeout=30000&since={}", client::encode(&since)))?;
                let events = value["rooms"]["join"][room.as_str()]["timeline"]["events"].as_array();
                for event in events.into_iter().flatten() {
                    let Some(body) = event["content"]["body"].as_str() else {
                        continue;
                    };
                    if body.starts_with(PREFIX) {
                        let _ = tx.send(Report::Received {
                            source: Source::Bare,
                            body: body.to_owned(),
                            event_id: event["event_id"].as_str().unwrap_or_default().to_owned(),
                            at,
                        });
                    }
                }
                since = next_batch(&value)?;
            }
            Ok(())
        })();
        // An error after `stop` is the shutdown aborting the long poll.
        let error = outcome.err().filter(|_| !stop.load(Ordering::SeqCst));
        let _ = tx.send(Report::Ended(Source::Bare, error));
    })
}

struct Stats {
    count: usize,
    median: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// Nearest-rank percentiles of `ms` (sorted in place); `None` when empty.
fn stats(ms: &mut [f64]) -> Option<Stats> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Some(Stats {
        count: ms.len(),
        median: rank(0.5),
        p90: rank(0.9),
        p99: rank(0.99),
        max: ms[ms.len() - 1],
    })
}

fn report(sent: &[Sent], received: &Received) {
    let mut send_ms: Vec<f64> = sent.iter().map(|s| ms(s.took)).collect();
    let send = stats(&mut send_ms).expect("messages were sent");
    println!();
    println!(
        "{MESSAGES} messages, one every {} ms; latency = receive - start of bob's send call (ms)",
        INTERVAL.as_millis()
    );
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "received", "median", "p90", "p99", "max"
    );
    let mut all = Vec::new();
    for source in [Source::Tail, Source::Bare] {
        let mut latencies = Vec::new();
        let mut wrong_ids = 0;
        for s in sent {
            if let Some((got_id, got_at)) = received.get(&(source, s.body.clone())) {
                if *got_id != s.event_id {
                    wrong_ids += 1;
                }
                latencies.push(ms(got_at.saturating_duration_since(s.at)));
            }
        }
        let line = stats(&mut latencies);
        match &line {
            Some(s) => println!(
                "{:<10} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                source.name(),
                s.count,
                s.median,
                s.p90,
                s.p99,
                s.max
            ),
            None => println!("{:<10} {:>8}", source.name(), 0),
        }
        if wrong_ids > 0 {
            println!("  {wrong_ids} message(s) arrived at {} with another event id than the send returned", source.name());
        }
        all.push(line);
    }
    println!(
        "{:<10} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        "send call", send.count, send.median, send.p90, send.p99, send.max
    );
    if let [Some(tail), Some(bare)] = &all[..] {
        println!(
            "tail/bare: median {:.2}x, p99 {:.2}x",
            tail.median / bare.median,
            tail.p99 / bare.p99
        );
    } else {
        println!("tail/bare: n/a (a receiver got nothing)");
    }

    // Where the time goes: after bob's send call returned, and tail against bare per message.
    let get = |source: Source, s: &Sent| received.get(&(source, s.body.clone())).map(|r| r.1);
    println!("receive - end of send call (ms; negative: before it returned):");
    for source in [Source::Tail, Source::Bare] {
        let mut after: Vec<f64> = sent
            .iter()
            .filter_map(|s| get(source, s).map(|at| signed_ms(at, s.at + s.took)))
            .collect();
        if let Some(st) = stats(&mut after) {
            println!(
                "  {:<8} median {:>6.1}  p90 {:>6.1}  p99 {:>6.1}  max {:>6.1}  min {:>6.1}",
                source.name(),
                st.median,
                st.p90,
                st.p99,
                st.max,
                after[0]
            );
        }
    }
    let mut paired: Vec<f64> = sent
        .iter()
        .filter_map(|s| Some(signed_ms(get(Source::Tail, s)?, get(Source::Bare, s)?)))
        .collect();
    if let Some(st) = stats(&mut paired) {
        println!(
            "tail - bare, same message (ms, {} pairs): median {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  min {:.1}",
            st.count, st.median, st.p90, st.p99, st.max, paired[0]
        );
    }
    println!();
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    match a.checked_duration_since(b) {
        Some(d) => ms(d),
        None => -ms(b - a),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
