//! Many accounts long-polling one local Synapse, two ways side by side in one run: the
//! `many_accounts` example (one thread, one poll loop, one `SyncMachine` each) versus the
//! blocking driver (one `start()` per account: one sync thread each).
//!
//! ```text
//! bash scripts/many_bench.sh                 # N = 1000
//! MANY_N=200 MANY_IDLE_S=30 bash scripts/many_bench.sh
//! MANY_VARIANTS=driver,loop bash scripts/many_bench.sh   # the other order (or one alone)
//! ```
//!
//! (The script builds the example in release mode first, then runs `cargo bench --bench
//! many_accounts`.) It starts a throwaway Synapse (presence off, bcrypt rounds 4),
//! registers N accounts, joins them all to one room, writes their tokens to a file, then for
//! each variant in turn starts a child process on that file and measures:
//!
//! * **initial sync**: from the spawn until every account printed its first checkpoint
//!   (whoami included, in both variants);
//! * **RSS**: `VmRSS` of the child after the idle window, and `VmHWM` (peak);
//! * **idle CPU**: the child's CPU time (every thread's, from `/proc/PID/task/*/schedstat`,
//!   in ns) over `MANY_IDLE_S` seconds (default 60) with every account long-polling and no
//!   traffic, per minute;
//! * **send-to-receive latency**: `MANY_MESSAGES` messages (default 3) sent one after the
//!   other into the room, each once every account has the previous one; per account and
//!   message, from just before the `PUT` until the parent read the account's line for it.
//!   p50 and p99 over all N × messages samples.
//!
//! Both children print the same lines (tail's shape plus `"account"`) to a pipe the parent
//! reads; both use the same filter (timeline limit 1, lazy-loaded members, no presence or
//! ephemeral events), the same long-poll timeout (30 s) and the same tokens.
//!
//! The driver child is this binary run with `--driver-child`: for each token, one thread does
//! whoami (blocking `ureq`), calls `start()`, and prints that account's events (so 2 threads
//! per account: the driver's sync thread and its consumer, which sleeps in `recv`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::{start, Config, Event, SyncFilter};
use matrix_sync_testkit::client::Account;
use matrix_sync_testkit::example::example_binary;
use matrix_sync_testkit::parallel::parallel;
use matrix_sync_testkit::synapse::SynapseOptions;
use serde_json::{json, Value};

const FILTER: &str = r#"{"presence":{"types":[]},"room":{"timeline":{"limit":1},"state":{"lazy_load_members":true},"ephemeral":{"types":[]}}}"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--driver-child") {
        driver_child(&args[at + 1], &args[at + 2]);
        return;
    }
    let n = env_usize("MANY_N", 1000);
    let idle = Duration::from_secs(env_usize("MANY_IDLE_S", 60) as u64);
    let messages = env_usize("MANY_MESSAGES", 3);
    let example = example_binary(
        "many_accounts",
        "run `cargo build --release --example many_accounts` (scripts/many_bench.sh does)",
    );

    let setup = Instant::now();
    let synapse = SynapseOptions::new()
        .config("bcrypt_rounds", json!(4))
        .config("presence", json!({"enabled": false}))
        .start();
    let base = synapse.base_url();
    let sender = Account::register(&base, "sender");
    let (status, created) = sender.post_json(
        "/_matrix/client/v3/createRoom",
        &json!({"preset": "public_chat"}),
    );
    assert_eq!(status, 200, "createRoom: {created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let accounts = parallel(n, 8, |_| {
        let account = Account::register(&base, "many");
        account.join(&room);
        account
    });
    // Warm Synapse's caches for the room, so that the first variant's first message is not
    // the room's first (the children see these in their initial sync, never as a sample).
    for i in 0..3 {
        sender.send_text(&room, &format!("warm-up {i}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let text: String = accounts
        .iter()
        .map(|a| format!("{}\n", a.access_token))
        .collect();
    std::fs::write(&tokens, text).unwrap();
    eprintln!(
        "setup: Synapse, {n} accounts registered and joined in {:.0?}",
        setup.elapsed()
    );

    let mut results = Vec::new();
    let order = std::env::var("MANY_VARIANTS").unwrap_or_else(|_| "loop,driver".to_owned());
    for variant in order.split(',') {
        let variant: &'static str = match variant {
            "loop" => "loop",
            "driver" => "driver",
            other => panic!("MANY_VARIANTS: unknown variant {other:?} (loop, driver)"),
        };
        let mut command = if variant == "loop" {
            let mut c = Command::new(&example);
            c.args(["--homeserver", &base, "--tokens"])
                .arg(&tokens)
                .args(["--filter", FILTER]);
            c
        } else {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.arg("--driver-child").arg(&base).arg(&tokens);
            c
        };
        let result = measure(variant, &mut command, n, idle, messages, &sender, &room);
        eprintln!("{result}");
        results.push(result);
        // Let Synapse forget the long-polls of the child that just stopped.
        thread::sleep(Duration::from_secs(5));
    }
    println!("\n{n} accounts, idle window {idle:?}, {messages} messages; one run:");
    println!(
        "{:<8} {:>14} {:>10} {:>10} {:>16} {:>10} {:>10} {:>8}",
        "variant",
        "initial sync",
        "RSS MB",
        "peak MB",
        "idle CPU ms/min",
        "p50 ms",
        "p99 ms",
        "threads"
    );
    for r in &results {
        println!(
            "{:<8} {:>12.1} s {:>10.1} {:>10.1} {:>16.0} {:>10.0} {:>10.0} {:>8}",
            r.variant,
            r.initial_sync.as_secs_f64(),
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0,
            r.idle_cpu_per_min_ms,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.threads,
        );
    }
}

struct Result {
    variant: &'static str,
    initial_sync: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    idle_cpu_per_min_ms: f64,
    p50: Duration,
    p99: Duration,
    threads: usize,
}

impl std::fmt::Display for Result {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: initial sync {:.1?}, RSS {} kB (peak {} kB), idle CPU {:.1} ms/min, latency p50 {:.0?} p99 {:.0?}, {} threads",
            self.variant,
            self.initial_sync,
            self.rss_kb,
            self.hwm_kb,
            self.idle_cpu_per_min_ms,
            self.p50,
            self.p99,
            self.threads
        )
    }
}

/// A line the child printed, with the instant the parent read it.
struct Line {
    at: Instant,
    account: String,
    kind: String,
    event_id: Option<String>,
}

fn measure(
    variant: &'static str,
    command: &mut Command,
    n: usize,
    idle: Duration,
    messages: usize,
    sender: &Account,
    room: &str,
) -> Result {
    let spawned = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let stderr = child.stderr.take().unwrap();
    let closing = thread::spawn(move || {
        // The loop's closing line says how many connections it opened.
        BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
            .filter(|l| l.contains("connections opened"))
            .last()
    });
    let lines = read_lines(&mut child);
    let pid = child.id();

    let mut synced = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last = spawned;
    while synced.len() < n {
        let line = next(&lines, deadline, &mut child, "the initial syncs");
        if line.kind == "checkpoint" && synced.insert(line.account) {
            last = line.at;
        }
    }
    let initial_sync = last - spawned;
    eprintln!("{variant}: initial sync of {n} in {initial_sync:.1?}");

    // Let the first long-polls go out, then an idle window.
    thread::sleep(Duration::from_secs(5));
    drain(&lines);
    let cpu_before = cpu_ns(pid);
    let idle_started = Instant::now();
    thread::sleep(idle);
    let cpu_after = cpu_ns(pid);
    let idle_took = idle_started.elapsed();
    let idle_cpu_per_min_ms =
        (cpu_after - cpu_before) as f64 / 1e6 * 60.0 / idle_took.as_secs_f64();
    let (rss_kb, hwm_kb) = rss_kb(pid);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    drain(&lines);

    let mut latencies = Vec::new();
    for i in 0..messages {
        let sent_at = Instant::now();
        let event_id = sender.send_text(room, &format!("latency {i}"));
        let mut got: HashMap<String, Instant> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while got.len() < n {
            let line = next(&lines, deadline, &mut child, "a message at every account");
            if line.kind == "message" && line.event_id.as_deref() == Some(event_id.as_str()) {
                got.entry(line.account).or_insert(line.at);
            }
        }
        latencies.extend(got.values().map(|at| *at - sent_at));
        thread::sleep(Duration::from_secs(1));
    }
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (p50, p99) = (pick(0.50), pick(0.99));

    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    if let Ok(Some(line)) = closing.join() {
        eprintln!("{variant}: {line}");
    }
    Result {
        variant,
        initial_sync,
        rss_kb,
        hwm_kb,
        idle_cpu_per_min_ms,
        p50,
        p99,
        threads,
    }
}

fn read_lines(child: &mut Child) -> mpsc::Receiver<Line> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                panic!("not a JSON line: {line}");
            };
            let field = |k: &str| value[k].as_str().map(str::to_owned);
            let line = Line {
                at,
                account: field("account").unwrap_or_default(),
                kind: field("kind").unwrap_or_default(),
                event_id: field("event_id"),
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next(lines: &mpsc::Receiver<Line>, deadline: Instant, child: &mut Child, what: &str) -> Line {
    match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(line) => line,
        Err(e) => {
            let _ = child.kill();
            panic!("no line ({e}) while waiting for {what}");
        }
    }
}

fn drain(lines: &mpsc::Receiver<Line>) {
    while lines.try_recv().is_ok() {}
}

/// CPU time of every thread of `pid`, in ns (first field of each task's `schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `VmRSS` and `VmHWM` of `pid`, in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---- the driver child --------------------------------------------------------------------

/// One thread per token: whoami, `start()`, print the account's events until the process ends.
fn driver_child(homeserver: &str, tokens: &str) {
    ctrlc::set_handler(|| std::process::exit(0)).expect("signal handler");
    let text = std::fs::read_to_string(tokens).expect("the tokens file");
    let filter = SyncFilter::from_json(FILTER).expect("the filter");
    let handles: Vec<_> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, token)| {
            let (homeserver, token, filter) = (
                homeserver.to_owned(),
                token.trim().to_owned(),
                filter.clone(),
            );
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || follow(i, &homeserver, &token, filter))
                .expect("spawn a consumer thread")
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}

fn follow(index: usize, homeserver: &str, token: &str, filter: SyncFilter) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let body = agent
        .get(format!("{homeserver}/_matrix/client/v3/account/whoami"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .expect("whoami");
    let whoami: Value = serde_json::from_str(&body).expect("whoami JSON");
    let account = whoami["user_id"].as_str().expect("user_id").to_owned();
    let mut config = Config::new(homeserver, token);
    config.filter = Some(filter);
    config.jitter_seed = index as u64 + 1;
    let service = start(config).expect("start");
    for event in service.events() {
        let line = OutLine {
            account: &account,
            event: &event,
        };
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &line);
        let _ = out.write_all(b"\n");
    }
}

/// One line of the driver child: the same as the `many_accounts` example's (the account, then
/// the event in its JSON shape), so that both children print the same bytes.
#[derive(serde::Serialize)]
struct OutLine<'a> {
    account: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}
