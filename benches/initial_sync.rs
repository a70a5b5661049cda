//! The initial sync of two accounts, with the default filter (`SyncFilter::lazy_loading()`:
//! room members lazy-loaded) and without any filter: response bytes, events, and time.
//!
//! ```text
//! cargo bench --bench initial_sync
//! INITIAL_ROOMS=50 INITIAL_MESSAGES=20 INITIAL_RUNS=9 cargo bench --bench initial_sync   # larger, slower
//! ```
//!
//! One throwaway Synapse on loopback (bcrypt rounds 4; its test listener does not compress,
//! so the bytes are the JSON as sent). Two accounts, set up before anything is timed:
//!
//! * **demo**: what `scripts/demo.sh` sets up before tail starts: alice creates the private
//!   room "demo", invites bob, bob joins;
//! * **large**: one user in `INITIAL_ROOMS` public rooms (default 30), room `i` with from
//!   `INITIAL_MIN_MEMBERS` to `INITIAL_MAX_MEMBERS` members (default 50 to 200, evenly spread),
//!   taken from one pool of users, then `INITIAL_MESSAGES` messages per room (default 10) from
//!   10 of its members in turn.
//!
//! Each measured sync is the request a fresh [`SyncMachine`] hands out first (exactly what the
//! driver sends: `timeout=0`, no `since`), with the default configuration or with `filter =
//! None`, sent over one keep-alive `ureq` agent. Time is from the send until the whole body is
//! read (wall clock, so it is Synapse's time more than the client's); then the body is fed to
//! the machine and its events drained (`parse ms`: that, in this process's wall clock). The
//! two filters are sampled in turn, `INITIAL_RUNS` times each (default 7), after one warm-up
//! each that is not counted (the first sync of an account fills Synapse's caches).
//!
//! Without `--bench` (as under `cargo test --benches`) it only says it was skipped: it needs
//! Synapse and takes a few minutes. It never asserts a timing.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use matrix_sync_service::{Config, EventKind, SyncMachine};
use matrix_sync_testkit::client::{self, Account};
use matrix_sync_testkit::parallel::parallel;
use matrix_sync_testkit::synapse::SynapseOptions;
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What `scripts/demo.sh` sets up before it starts tail: alice's account.
fn demo_account(base: &str) -> Account {
    let alice = Account::register(base, "alice");
    let bob = Account::register(base, "bob");
    let (status, created) = alice.post_json(
        "/_matrix/client/v3/createRoom",
        &json!({"preset": "private_chat", "name": "demo"}),
    );
    assert_eq!(status, 200, "createRoom: {created}");
    let room = created["room_id"].as_str().expect("room_id").to_owned();
    alice.invite(&room, &bob.user_id);
    bob.join(&room);
    alice
}

/// One user in `rooms` public rooms of `min..=max` members each, with `messages` messages
/// per room.
fn large_account(base: &str, rooms: usize, min: usize, max: usize, messages: usize) -> Account {
    let started = Instant::now();
    let owner = Account::register(base, "large");
    let pool = parallel(max.saturating_sub(1), 8, |_| {
        Account::register(base, "member")
    });
    eprintln!(
        "setup: {} users registered in {:.1?}",
        pool.len() + 1,
        started.elapsed()
    );
    let room_ids = parallel(rooms, 4, |i| {
        let (status, created) = owner.post_json(
            "/_matrix/client/v3/createRoom",
            &json!({"preset": "public_chat", "name": format!("room {i}")}),
        );
        assert_eq!(status, 200, "createRoom: {created}");
        created["room_id"].as_str().expect("room_id").to_owned()
    });
    // Room i has `members(i)` members, the owner included.
    let members = |i: usize| match rooms {
        1 => max,
        _ => min + (max - min) * i / (rooms - 1),
    };
    let joins: Vec<(usize, usize)> = (0..max)
        .flat_map(|user| (0..rooms).map(move |room| (room, user)))
        .filter(|&(room, user)| user + 1 < members(room))
        .collect();
    parallel(joins.len(), 8, |j| {
        let (room, user) = joins[j];
        pool[user].join(&room_ids[room]);
    });
    eprintln!(
        "setup: {} rooms, {} joins in {:.1?}",
        rooms,
        joins.len(),
        started.elapsed()
    );
    parallel(rooms, 8, |room| {
        for m in 0..messages {
            let body = format!("message {m} in room {room}");
            match m % 10 {
                0 => owner.send_text(&room_ids[room], &body),
                k => pool[k - 1].send_text(&room_ids[room], &body),
            };
        }
    });
    eprintln!(
        "setup: {} messages sent; large account ready in {:.1?}",
        rooms * messages,
        started.elapsed()
    );
    owner
}

/// One initial sync as a fresh machine asks for it.
struct Sample {
    bytes: usize,
    events: usize,
    members: usize,
    http: Duration,
    parse: Duration,
}

fn initial_sync(agent: &ureq::Agent, account: &Account, filtered: bool) -> Sample {
    let mut config = Config::new(account.base_url(), account.access_token.as_str());
    if !filtered {
        config.filter = None;
    }
    let mut machine = SyncMachine::new(config, Instant::now()).expect("valid configuration");
    let request = machine.poll_request().expect("the initial sync is due");
    let sent = Instant::now();
    let response = agent.run(request.http).expect("the sync request");
    let (parts, mut body) = response.into_parts();
    let bytes = body
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .expect("the sync body");
    let http = sent.elapsed();
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&bytes));
    let size = bytes.len();
    let parsing = Instant::now();
    machine
        .handle_response(
            request.id,
            http::Response::from_parts(parts, bytes),
            Instant::now(),
        )
        .expect("the answer to the request");
    let (mut events, mut members) = (0, 0);
    let mut checkpoint = false;
    while let Some(event) = machine.poll_event() {
        events += 1;
        match event.kind {
            EventKind::Member => members += 1,
            EventKind::Checkpoint(_) => checkpoint = true,
            _ => {}
        }
    }
    let parse = parsing.elapsed();
    assert!(
        checkpoint,
        "the sync ended without a checkpoint: {:?}",
        machine.poll_error()
    );
    Sample {
        bytes: size,
        events,
        members,
        http,
        parse,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn median<T: Copy + Ord>(values: &mut [T]) -> T {
    values.sort();
    values[values.len() / 2]
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("initial_sync: skipped (needs Synapse; run `cargo bench --bench initial_sync`)");
        return ExitCode::SUCCESS;
    }
    let rooms = env_usize("INITIAL_ROOMS", 30).max(1);
    let min = env_usize("INITIAL_MIN_MEMBERS", 50).max(2);
    let max = env_usize("INITIAL_MAX_MEMBERS", 200).max(min);
    let messages = env_usize("INITIAL_MESSAGES", 10);
    let runs = env_usize("INITIAL_RUNS", 7).max(1);

    let synapse = SynapseOptions::new()
        .config("bcrypt_rounds", json!(4))
        .start();
    let base = synapse.base_url();
    let demo = demo_account(&base);
    let large = large_account(&base, rooms, min, max, messages);
    let agent = client::agent();

    println!(
        "initial sync, {runs} runs per row after one warm-up; large: {rooms} rooms of {min}-{max} members, {messages} messages each"
    );
    println!(
        "{:<8} {:<14} {:>11} {:>8} {:>8} {:>24} {:>9}",
        "account", "filter", "bytes", "events", "members", "ms min / median / max", "parse ms"
    );
    for (name, account) in [("demo", &demo), ("large", &large)] {
        for filtered in [true, false] {
            initial_sync(&agent, account, filtered);
        }
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (i, filtered) in [true, false].into_iter().enumerate() {
                samples[i].push(initial_sync(&agent, account, filtered));
            }
        }
        for (i, filter) in ["lazy_loading", "none"].into_iter().enumerate() {
            let samples = &samples[i];
            let mut bytes: Vec<usize> = samples.iter().map(|s| s.bytes).collect();
            let mut http: Vec<Duration> = samples.iter().map(|s| s.http).collect();
            let mut parse: Vec<Duration> = samples.iter().map(|s| s.parse).collect();
            let bytes = median(&mut bytes);
            let http_median = median(&mut http);
            let times = format!(
                "{} / {} / {}",
                ms(http[0]),
                ms(http_median),
                ms(http[http.len() - 1])
            );
            println!(
                "{:<8} {:<14} {:>11} {:>8} {:>8} {:>24} {:>9}",
                name,
                filter,
                bytes,
                samples[0].events,
                samples[0].members,
                times,
                ms(median(&mut parse)),
            );
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(synapse);
    ExitCode::SUCCESS
}
