//! Throughput of a sync response through three parsers, over the same bytes:
//!
//! * (a) `serde_json::from_slice::<IgnoredAny>`: reads every byte and keeps nothing, the floor;
//! * (b) ruma's lazy parse, `sync_events::v3::Response::try_from_http_response` (events stay
//!   `Raw`);
//! * (c) this crate's whole path: a fresh `SyncMachine`, its first request, `handle_response`,
//!   then every event drained with `poll_event` and dropped, the machine dropped too. The body
//!   is handed over as the driver hands it, an owned `Vec<u8>` moved in (made before the clock
//!   starts, as the driver's comes from the socket; freeing it is timed);
//! * (c') the same with the body borrowed (`&[u8]`), which the machine copies, since it keeps
//!   the body while its events are polled: (c) plus one copy of the body;
//! * (d) no parse at all: a clone of each item (c) hands out, then its drop. What the owned
//!   [`Event`] of the public API costs (its allocations and copies) before any byte is read, a
//!   part of (c) no parser can take away.
//!
//! ```text
//! cargo bench --bench normalize [-- FILTER]
//! SYNC_FIXTURE=path/to/sync.json cargo bench --bench normalize
//! ```
//!
//! Inputs: the success fixtures of `tests/fixtures` (the `response` of `synapse-gap-sync.json`),
//! a generated response of 100 joined rooms and over 5,000 events (`benches/gen`), and the file
//! named by `SYNC_FIXTURE` when set (a bare sync body, or an object with the body under
//! `response`). `FILTER` keeps the inputs whose name contains it. `BENCH_MS` sets the time spent
//! per input and parser (default 1500 ms); each figure is the median of the timed samples, the
//! three parsers sampled in turn so that they share whatever load the machine has. Samples are
//! timed in this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), which a busy machine disturbs
//! far less than wall time; `BENCH_CLOCK=wall` times them in wall time instead.
//!
//! Without `--bench` (as under `cargo test --benches`) each measurement runs once, as a check.
//!
//! For profilers, `BENCH_PROFILE=a|b|c|c'|d` (with `BENCH_RUNS`, default 20) runs only that
//! parser, untimed, over the selected inputs (for (c), the copy of the body it is handed is made
//! in the loop, so a profile of (c) includes one `memcpy` of the body per run):
//!
//! ```text
//! BENCH_PROFILE=c perf record -g --call-graph dwarf target/release/deps/normalize-* --bench large
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use matrix_sync_service::{Config, Event, SyncMachine};
use matrix_sync_testkit::{cpu_clock, gen as generator};
use ruma_client_api::sync::sync_events::v3 as sync;
use ruma_common::api::IncomingResponseExt;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// A parser under test: takes the body, returns the number of events it yielded (0 if none).
#[derive(Clone, Copy)]
enum Parser {
    Borrowed(fn(&[u8]) -> usize),
    /// Given its own copy of the body, made before the clock starts.
    Owned(fn(Vec<u8>) -> usize),
    /// Given the items (c) handed out for the body, made before the clock starts.
    Events(fn(&[Event]) -> usize),
}

impl Parser {
    /// Runs over `body`, or over `events` (what (c) handed out for it; empty when no parser of
    /// this run needs them, so that they do not sit in the heap while the others run).
    fn run(self, body: &[u8], events: &[Event]) -> usize {
        match self {
            Parser::Borrowed(f) => f(body),
            Parser::Owned(f) => f(body.to_vec()),
            Parser::Events(f) => f(events),
        }
    }
}

struct Input {
    name: String,
    body: Vec<u8>,
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The body itself, or the `response` member of a recorded exchange.
fn sync_body(bytes: Vec<u8>) -> Vec<u8> {
    #[derive(serde::Deserialize)]
    struct Recorded<'a> {
        #[serde(borrow)]
        response: Option<&'a RawValue>,
        next_batch: Option<IgnoredAny>,
    }
    match serde_json::from_slice::<Recorded<'_>>(&bytes) {
        Ok(Recorded {
            response: Some(raw),
            next_batch: None,
        }) => raw.get().as_bytes().to_vec(),
        _ => bytes,
    }
}

fn inputs() -> Vec<Input> {
    let mut inputs: Vec<Input> = [
        "synapse-initial.json",
        "synapse-incremental.json",
        "synapse-leave.json",
        "synapse-gap-sync.json",
    ]
    .iter()
    .map(|name| Input {
        name: (*name).to_owned(),
        body: sync_body(fixture(name)),
    })
    .collect();
    inputs.push(Input {
        name: "generated-large".to_owned(),
        body: generator::generate(&generator::Spec::large()),
    });
    if let Some(path) = std::env::var_os("SYNC_FIXTURE") {
        let body = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading SYNC_FIXTURE {}: {e}", path.to_string_lossy()));
        let name = std::path::Path::new(&path)
            .file_name()
            .map(|n| format!("SYNC_FIXTURE={}", n.to_string_lossy()))
            .unwrap_or_else(|| "SYNC_FIXTURE".to_owned());
        inputs.push(Input {
            name,
            body: sync_body(body),
        });
    }
    inputs
}

fn ok_response<B>(body: B) -> http::Response<B> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .expect("valid response")
}

// ---- the three parsers --------------------------------------------------------------------------

fn floor(body: &[u8]) -> usize {
    let parsed: IgnoredAny = serde_json::from_slice(body).expect("valid JSON");
    black_box(parsed);
    0
}

fn ruma(body: &[u8]) -> usize {
    let response =
        sync::Response::try_from_http_response(ok_response(body)).expect("ruma accepts the body");
    black_box(&response);
    drop(response);
    0
}

fn machine(body: Vec<u8>) -> usize {
    machine_path(body)
}

fn machine_borrowed(body: &[u8]) -> usize {
    machine_path(body)
}

/// The machine's whole path; returns the number of items drained.
fn machine_path<B: AsRef<[u8]> + Into<Vec<u8>>>(body: B) -> usize {
    let mut machine = answered(body);
    let mut events = 0;
    while let Some(event) = machine.poll_event() {
        black_box(&event);
        drop(event);
        events += 1;
    }
    refused(&mut machine);
    events
}

/// The items the machine hands out for `body`, kept.
fn machine_events(body: Vec<u8>) -> Vec<Event> {
    let mut machine = answered(body);
    let events = std::iter::from_fn(|| machine.poll_event()).collect();
    refused(&mut machine);
    events
}

/// A fresh machine, its first request answered with `body`.
#[inline(always)]
fn answered<B: AsRef<[u8]> + Into<Vec<u8>>>(body: B) -> SyncMachine {
    let now = Instant::now();
    let mut machine =
        SyncMachine::new(Config::new("https://example.org", "t"), now).expect("valid config");
    let request = machine.poll_request().expect("the first request is due");
    machine
        .handle_response(request.id, ok_response(body), now)
        .expect("the machine awaits this response");
    machine
}

/// Panics if the machine refused the body it was given.
#[inline(always)]
fn refused(machine: &mut SyncMachine) {
    if let Some(error) = machine.poll_error() {
        panic!("the machine refused the body: {error}");
    }
}

/// (d): each item cloned and the clone dropped.
fn owned_events(events: &[Event]) -> usize {
    for event in events {
        drop(black_box(event.clone()));
    }
    events.len()
}

// ---- timing --------------------------------------------------------------------------------------

/// The clock samples are read from: this thread's CPU time by default (on a shared machine, time
/// spent descheduled is not the code's), wall time with `BENCH_CLOCK=wall`.
#[derive(Clone, Copy, PartialEq)]
enum Clock {
    ThreadCpu,
    Wall(Instant),
}

fn thread_cpu_time() -> Option<Duration> {
    cpu_clock::cpu_time(cpu_clock::THREAD)
}

impl Clock {
    fn from_env() -> Self {
        let wall = Clock::Wall(Instant::now());
        match std::env::var("BENCH_CLOCK").as_deref() {
            Ok("wall") => wall,
            _ if thread_cpu_time().is_some() => Clock::ThreadCpu,
            _ => wall,
        }
    }

    fn now(self) -> Duration {
        match self {
            Clock::ThreadCpu => thread_cpu_time().unwrap_or_default(),
            Clock::Wall(origin) => origin.elapsed(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Clock::ThreadCpu => "thread CPU time",
            Clock::Wall(_) => "wall time",
        }
    }
}

/// Times every parser over `body`, interleaved (one sample of each per round, so that they all
/// see the same machine load), for about `budget` each. Each sample runs a parser enough times
/// in a row to last at least 2 ms; the figure is the median over the samples.
fn measure(
    parsers: &[Parser],
    body: &[u8],
    events: &[Event],
    budget: Duration,
    clock: Clock,
) -> Vec<Stats> {
    let batches: Vec<u32> = parsers
        .iter()
        .map(|f| {
            f.run(body, events);
            let start = clock.now();
            f.run(body, events);
            let once = (clock.now() - start).max(Duration::from_nanos(50));
            (Duration::from_millis(2).as_nanos() / once.as_nanos()).clamp(1, 100_000) as u32
        })
        .collect();
    let warmup_until = Instant::now() + budget / 10;
    while Instant::now() < warmup_until {
        for f in parsers {
            f.run(body, events);
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); parsers.len()];
    let until = Instant::now() + budget * parsers.len() as u32;
    while samples[0].len() < 5 || (Instant::now() < until && samples[0].len() < 100_000) {
        for (i, f) in parsers.iter().enumerate() {
            let elapsed = match *f {
                Parser::Borrowed(f) => {
                    let start = clock.now();
                    for _ in 0..batches[i] {
                        black_box(f(black_box(body)));
                    }
                    clock.now() - start
                }
                Parser::Owned(f) => {
                    let copies: Vec<Vec<u8>> = (0..batches[i]).map(|_| body.to_vec()).collect();
                    let start = clock.now();
                    for copy in copies {
                        black_box(f(black_box(copy)));
                    }
                    clock.now() - start
                }
                Parser::Events(f) => {
                    let start = clock.now();
                    for _ in 0..batches[i] {
                        black_box(f(black_box(events)));
                    }
                    clock.now() - start
                }
            };
            samples[i].push(elapsed / batches[i]);
        }
    }
    samples
        .into_iter()
        .zip(batches)
        .map(|(mut samples, batch)| {
            samples.sort();
            let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
            Stats {
                median: at(0.5),
                p10: at(0.1),
                p90: at(0.9),
                samples: samples.len(),
                batch,
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    p10: Duration,
    p90: Duration,
    samples: usize,
    batch: u32,
}

fn human_size(bytes: usize) -> String {
    if bytes >= 1_000_000 {
        format!("{:.2} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} kB", bytes as f64 / 1e3)
    }
}

fn human_rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M", per_sec / 1e6)
    } else {
        format!("{:.0} k", per_sec / 1e3)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let budget = std::env::var("BENCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_millis(1500));

    let inputs: Vec<Input> = inputs()
        .into_iter()
        .filter(|i| filter.as_ref().is_none_or(|f| i.name.contains(f.as_str())))
        .collect();
    if let Ok(which) = std::env::var("BENCH_PROFILE") {
        let f = match which.as_str() {
            "a" => Parser::Borrowed(floor),
            "b" => Parser::Borrowed(ruma),
            "c" => Parser::Owned(machine),
            "c'" => Parser::Borrowed(machine_borrowed),
            "d" => Parser::Events(owned_events),
            other => panic!("BENCH_PROFILE must be a, b, c, c' or d, not {other:?}"),
        };
        let runs: usize = std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        for input in &inputs {
            let events = match f {
                Parser::Events(_) => machine_events(input.body.clone()),
                _ => Vec::new(),
            };
            for _ in 0..runs {
                black_box(f.run(black_box(&input.body), &events));
            }
        }
        return;
    }
    if !benching {
        for input in &inputs {
            floor(&input.body);
            ruma(&input.body);
            machine_borrowed(&input.body);
            owned_events(&machine_events(input.body.clone()));
            let events = machine(input.body.clone());
            println!(
                "{}: {} bytes, {events} events: ok",
                input.name,
                input.body.len()
            );
        }
        return;
    }

    let clock = Clock::from_env();
    println!(
        "MB = 10^6 bytes; events = items drained from poll_event (checkpoint included); \
         {}, median of the samples [p10..p90]; {} ms per input and parser, interleaved",
        clock.name(),
        budget.as_millis()
    );
    println!();
    let parsers: [(&str, Parser); 4] = [
        ("(a) floor", Parser::Borrowed(floor)),
        ("(b) ruma", Parser::Borrowed(ruma)),
        ("(c) ours", Parser::Owned(machine)),
        ("(c') ours&", Parser::Borrowed(machine_borrowed)),
    ];
    for input in &inputs {
        let events = machine(input.body.clone());
        let size = input.body.len();
        println!("{}: {}, {events} events", input.name, human_size(size));
        let fns: Vec<Parser> = parsers.iter().map(|(_, f)| *f).collect();
        let stats = measure(&fns, &input.body, &[], budget, clock);
        let medians: Vec<Duration> = stats.iter().map(|s| s.median).collect();
        let line = |label: &str, s: &Stats| {
            let secs = s.median.as_secs_f64();
            println!(
                "  {label:<10} {:>10.1} us  {:>8.1} MB/s  {:>8}events/s   [{:.1}..{:.1} us, {} samples x {}]",
                secs * 1e6,
                size as f64 / secs / 1e6,
                human_rate(events as f64 / secs),
                s.p10.as_secs_f64() * 1e6,
                s.p90.as_secs_f64() * 1e6,
                s.samples,
                s.batch,
            );
        };
        for ((label, _), s) in parsers.iter().zip(&stats) {
            line(label, s);
        }
        let ratio = |t: Duration| t.as_secs_f64() / medians[0].as_secs_f64();
        println!(
            "  ratios     (b)/(a) = {:.2}   (c)/(a) = {:.2}   (c')/(a) = {:.2}   (c)/(b) = {:.2}",
            ratio(medians[1]),
            ratio(medians[2]),
            ratio(medians[3]),
            medians[2].as_secs_f64() / medians[1].as_secs_f64()
        );
        // (d) after the others, with the floor again: its events are kept only meanwhile.
        let kept = machine_events(input.body.clone());
        let pair = [Parser::Borrowed(floor), Parser::Events(owned_events)];
        let [again, owned] = &measure(&pair, &input.body, &kept, budget, clock)[..] else {
            unreachable!("two parsers, two figures")
        };
        line("(d) events", owned);
        println!(
            "  ratio      (d)/(a) = {:.2}   (the floor measured with it: {:.1} us)",
            owned.median.as_secs_f64() / again.median.as_secs_f64(),
            again.median.as_secs_f64() * 1e6
        );
        println!();
    }
}
