//! `idle_cpu`: CPU time and memory of the running service while the account is idle.
//!
//! ```text
//! MATRIX_ACCESS_TOKEN=... cargo run --release --example idle_cpu -- --homeserver URL \
//!     [--seconds 60] [--timeout-ms N]
//! ```
//!
//! Starts the service with `matrix_sync_service::start`, drains its channels on this thread,
//! waits until the state is `Live`, then measures this process's CPU time (every thread: the
//! driver, this one, and anything the libraries started) over `--seconds` (default 60) and prints
//! it as milliseconds per minute, with the RSS. CPU time is read twice: the process CPU clock
//! (`clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`, nanoseconds, every thread including those that
//! exited during the window, such as a resolver thread) and `utime + stime` of `/proc/self/stat`
//! (clock ticks, 10 ms each at the usual 100 Hz: too coarse for small figures, a cross-check).
//!
//! `--timeout-ms` sets the long-poll timeout (default 30 s, the crate's default).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, Receiver};
use matrix_sync_service::{start, Config, SyncService, SyncState};
use matrix_sync_testkit::cpu_clock;

struct Args {
    homeserver: String,
    seconds: u64,
    timeout_ms: Option<u64>,
}

const USAGE: &str =
    "usage: idle_cpu --homeserver URL [--seconds N] [--timeout-ms N] (token in MATRIX_ACCESS_TOKEN)";

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        homeserver: std::env::var("MATRIX_HOMESERVER").unwrap_or_default(),
        seconds: 60,
        timeout_ms: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match arg.as_str() {
            "--homeserver" => parsed.homeserver = value("--homeserver")?,
            "--seconds" => parsed.seconds = number("--seconds", value("--seconds")?)?,
            "--timeout-ms" => {
                parsed.timeout_ms = Some(number("--timeout-ms", value("--timeout-ms")?)?)
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if parsed.homeserver.is_empty() {
        return Err(format!("missing --homeserver; {USAGE}"));
    }
    Ok(parsed)
}

/// CPU time of the whole process (every thread, including threads that have exited), in
/// nanoseconds.
fn cpu_ns() -> Option<u64> {
    cpu_clock::cpu_time(cpu_clock::PROCESS).map(|d| d.as_nanos() as u64)
}

/// Threads this process has now (`Threads:` of `/proc/self/status`).
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `utime + stime` of the process, in clock ticks (fields 14 and 15 of `/proc/self/stat`).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may contain spaces; count the fields after its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so field n is at index n - 3.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// `VmRSS` and `VmHWM`, in kB.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Counts {
    events: u64,
    /// Events by kind name, counted only while `by_kind` is on (the measured window).
    kinds: std::collections::BTreeMap<&'static str, u64>,
    by_kind: bool,
    errors: u64,
    states: u64,
}

/// Receives from the service's channels until `deadline` (or until `until` says stop).
fn pump(
    service: &SyncService,
    counts: &mut Counts,
    deadline: Instant,
    mut until: impl FnMut(SyncState) -> bool,
) -> Result<(), String> {
    let timer = after(deadline.saturating_duration_since(Instant::now()));
    let mut errors: Receiver<_> = service.errors().clone();
    let mut states: Receiver<_> = service.states().clone();
    let mut events: Receiver<_> = service.events().clone();
    loop {
        select! {
            recv(events) -> event => match event {
                Ok(event) => {
                    counts.events += 1;
                    if counts.by_kind {
                        *counts.kinds.entry(event.kind.name()).or_default() += 1;
                    }
                }
                Err(_) => events = never(),
            },
            recv(errors) -> error => match error {
                Ok(error) => {
                    counts.errors += 1;
                    eprintln!("error: {error}");
                }
                Err(_) => errors = never(),
            },
            recv(states) -> state => match state {
                Ok(state) => {
                    counts.states += 1;
                    eprintln!("state: {state:?}");
                    if until(state) {
                        return Ok(());
                    }
                    if state == SyncState::Stopped {
                        return Err("the service stopped".to_owned());
                    }
                }
                Err(_) => states = never(),
            },
            recv(timer) -> _ => return Ok(()),
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("idle_cpu: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let token = std::env::var("MATRIX_ACCESS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or("MATRIX_ACCESS_TOKEN is not set")?;
    let mut config = Config::new(args.homeserver, token);
    if let Some(ms) = args.timeout_ms {
        config.long_poll_timeout = Duration::from_millis(ms);
    }
    let long_poll = config.long_poll_timeout;
    let service = start(config).map_err(|e| format!("invalid configuration: {e}"))?;

    let mut counts = Counts::default();
    let mut live = false;
    pump(
        &service,
        &mut counts,
        Instant::now() + Duration::from_secs(120),
        |state| {
            live = state == SyncState::Live;
            live
        },
    )?;
    if !live {
        return Err("not Live within 120 s".to_owned());
    }
    // Let the catch-up's events reach us before the window opens.
    pump(
        &service,
        &mut counts,
        Instant::now() + Duration::from_millis(200),
        |_| false,
    )?;

    let window = Duration::from_secs(args.seconds.max(1));
    let before = (counts.events, counts.errors);
    let threads_before = threads();
    counts.by_kind = true;
    let (ns0, ticks0, t0) = (cpu_ns(), cpu_ticks(), Instant::now());
    pump(&service, &mut counts, t0 + window, |_| false)?;
    let (ns1, ticks1, elapsed) = (cpu_ns(), cpu_ticks(), t0.elapsed());
    let threads_after = threads();
    let (rss, hwm) = rss_kb();
    service.stop();
    if let Err(err) = service.join() {
        eprintln!("error: {err}");
    }

    let minutes = elapsed.as_secs_f64() / 60.0;
    let ms = match (ns0, ns1) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => f64::NAN,
    };
    let tick_ms = (ticks1 - ticks0) as f64 * 10.0;
    println!(
        "idle window {:.1} s (long-poll timeout {} ms): {} events {:?}, {} errors during it",
        elapsed.as_secs_f64(),
        long_poll.as_millis(),
        counts.events - before.0,
        counts.kinds,
        counts.errors - before.1
    );
    println!(
        "CPU {ms:.2} ms = {:.2} ms per minute (process CPU clock, all threads); \
         utime+stime {tick_ms:.0} ms = {:.1} ms per minute (10 ms ticks)",
        ms / minutes,
        tick_ms / minutes
    );
    println!("RSS {rss} kB (peak {hwm} kB); threads {threads_before} before the window, {threads_after} after");
    Ok(())
}
