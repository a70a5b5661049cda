//! An account in many rooms: time and bytes until the latest events of the first 20 rooms,
//! with sliding sync (MSC4186) against the `/v3/sync` initial sync with the lazy-loading
//! filter, in the same run against the same Synapse.
//!
//! ```text
//! cargo bench --bench sliding_first_rooms
//! SLIDING_ROOMS=200 SLIDING_RUNS=3 cargo bench --bench sliding_first_rooms   # smaller, faster
//! ```
//!
//! Setup (not timed): one user creates `SLIDING_ROOMS` rooms (default 1,000) and sends one
//! message in each. Each measured sync is the first request of a fresh [`SyncMachine`], sent
//! over one keep-alive agent, timed from the send until the whole body is read, then fed to
//! the machine and its events counted:
//!
//! * `/v3/sync`: the default configuration (`SyncFilter::lazy_loading()`): every room comes
//!   in this one answer, so it is the time to the first 20 rooms as well;
//! * sliding sync: a window of 20 rooms, `timeline_limit` 1, `required_state` the room name
//!   and the lazy-loaded members: what a client shows first.
//!
//! `SLIDING_RUNS` samples of each (default 5), in turn, after one warm-up each. Without
//! `--bench` it only says it was skipped (it needs Synapse and takes minutes). It never
//! asserts a timing.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use matrix_sync_service::{Config, EventKind, Protocol, SyncMachine};
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

struct Sample {
    bytes: usize,
    rooms_with_messages: usize,
    time: Duration,
}

fn first_sync(agent: &ureq::Agent, account: &Account, sliding: bool) -> Sample {
    let mut config = Config::new(account.base_url(), account.access_token.as_str());
    config.max_body_bytes = u64::MAX;
    if sliding {
        config.protocol = Protocol::SlidingSync;
        config.sliding_sync.window = 20;
        config.sliding_sync.timeline_limit = 1;
        config.sliding_sync.required_state = vec![
            ("m.room.name".to_owned(), String::new()),
            ("m.room.member".to_owned(), "$LAZY".to_owned()),
        ];
    }
    let mut machine = SyncMachine::new(config, Instant::now()).expect("valid configuration");
    let request = machine.poll_request().expect("the first sync is due");
    let sent = Instant::now();
    let response = agent.run(request.http).expect("the sync request");
    let (parts, mut body) = response.into_parts();
    let bytes = body
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .expect("the sync body");
    let time = sent.elapsed();
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&bytes));
    let size = bytes.len();
    machine
        .handle_response(
            request.id,
            http::Response::from_parts(parts, bytes),
            Instant::now(),
        )
        .expect("the answer to the request");
    let mut rooms = std::collections::BTreeSet::new();
    let mut checkpoint = false;
    while let Some(event) = machine.poll_event() {
        match event.kind {
            EventKind::Message => {
                rooms.insert(event.room_id.clone());
            }
            EventKind::Checkpoint(_) => checkpoint = true,
            _ => {}
        }
    }
    assert!(checkpoint, "no checkpoint: {:?}", machine.poll_error());
    Sample {
        bytes: size,
        rooms_with_messages: rooms.len(),
        time,
    }
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sliding_first_rooms: skipped (needs Synapse; run `cargo bench --bench sliding_first_rooms`)");
        return ExitCode::SUCCESS;
    }
    let rooms = env_usize("SLIDING_ROOMS", 1000).max(20);
    let runs = env_usize("SLIDING_RUNS", 5).max(1);
    let synapse = SynapseOptions::new()
        .config("bcrypt_rounds", json!(4))
        .start();
    let base = synapse.base_url();
    let started = Instant::now();
    let owner = Account::register(&base, "many");
    parallel(rooms, 4, |i| {
        let (status, created) = owner.post_json(
            "/_matrix/client/v3/createRoom",
            &json!({"preset": "private_chat", "name": format!("room {i}")}),
        );
        assert_eq!(status, 200, "createRoom: {created}");
        let room = created["room_id"].as_str().expect("room_id").to_owned();
        owner.send_text(&room, &format!("latest in room {i}"));
    });
    eprintln!(
        "setup: {rooms} rooms, one message each, in {:.1?}",
        started.elapsed()
    );
    let agent = client::agent();
    first_sync(&agent, &owner, false);
    first_sync(&agent, &owner, true);
    let (mut v3, mut sliding) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        v3.push(first_sync(&agent, &owner, false));
        sliding.push(first_sync(&agent, &owner, true));
    }
    println!("{rooms} rooms, {runs} runs each after one warm-up (median time):");
    for (name, samples) in [
        ("/v3/sync lazy-loading", &v3),
        ("sliding sync, 20 rooms", &sliding),
    ] {
        let mut times: Vec<Duration> = samples.iter().map(|s| s.time).collect();
        let time = median(&mut times);
        println!(
            "  {name:<24} {:>8.1} ms {:>10} bytes {:>5} rooms with their latest message",
            time.as_secs_f64() * 1000.0,
            samples[0].bytes,
            samples[0].rooms_with_messages,
        );
    }
    ExitCode::SUCCESS
}
