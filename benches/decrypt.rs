//! Cost of the E2EE stage: one sync batch of 1,000 Megolm-encrypted messages through the
//! machine and the stage, beside the same batch in plaintext (machine alone, and machine plus
//! stage, which passes plaintext through).
//!
//! ```text
//! cargo bench --features e2ee --bench decrypt
//! BENCH_RUNS=50 EVENTS=1000 cargo bench --features e2ee --bench decrypt
//! ```
//!
//! No server: the bench plays the homeserver for two crypto machines. The stage's device
//! (memory store) uploads its keys to the bench; a sender `OlmMachine` gets them as a
//! `/keys/query` and `/keys/claim` answer would give them, shares a room key as an
//! Olm-encrypted to-device event, which reaches the stage in a first batch, and encrypts the
//! messages. Each timed run is a fresh `SyncMachine` answering one sync with the batch, every
//! event drained into the stage, and every event of the stage drained; the figure is the
//! median of `BENCH_RUNS` runs (default 20) in wall time. Without `--bench` (as under
//! `cargo test --benches`) each case runs once, on 100 events, as a check.

use std::hint::black_box;
use std::time::{Duration, Instant};

use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{EncryptionSettings, OlmMachine};
use matrix_sync_service::e2ee::Encryption;
use matrix_sync_service::{Config, CryptoStore, E2ee, E2eeConfig, SyncMachine};
use ruma16::api::IncomingResponse;
use ruma_crypto as ruma16;
use serde_json::{json, Value};

const ROOM: &str = "!bench:example.org";
const SENDER: &str = "@sender:example.org";
const SENDER_DEVICE: &str = "SENDERDEV";
const OURS: &str = "@ours:example.org";
const OUR_DEVICE: &str = "OURDEV";

fn response<R: IncomingResponse>(value: Value) -> R {
    let http = http::Response::builder()
        .status(200)
        .body(serde_json::to_vec(&value).unwrap())
        .unwrap();
    R::try_from_http_response(http).expect("a valid response")
}

fn ok(value: Value) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(200)
        .body(serde_json::to_vec(&value).unwrap())
        .unwrap()
}

fn config() -> Config {
    let mut config = Config::new("http://127.0.0.1:9", "token");
    config.allow_insecure_http = true;
    config.jitter_seed = 1;
    config
}

/// Feeds one sync body to a fresh machine, and its events through `stage` (if any); returns
/// the number of events the consumer got and how many of them were decrypted.
fn run(body: &[u8], stage: Option<&mut E2ee>, now: Instant) -> (usize, usize) {
    let mut machine = SyncMachine::new(config(), now).unwrap();
    let request = machine.poll_request().expect("a sync request");
    let response = http::Response::builder()
        .status(200)
        .body(body.to_vec())
        .unwrap();
    machine.handle_response(request.id, response, now).unwrap();
    let mut delivered = 0;
    let mut decrypted = 0;
    match stage {
        None => {
            while let Some(event) = machine.poll_event() {
                delivered += 1;
                black_box(event);
            }
        }
        Some(stage) => {
            while let Some(event) = machine.poll_event() {
                stage.handle_event(event);
            }
            while let Some(event) = stage.poll_event() {
                delivered += 1;
                if matches!(event.encryption.as_deref(), Some(Encryption::Decrypted(_))) {
                    decrypted += 1;
                }
                black_box(event);
            }
        }
    }
    (delivered, decrypted)
}

fn sync_body(next_batch: &str, to_device: Vec<Value>, timeline: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "next_batch": next_batch,
        "to_device": {"events": to_device},
        "rooms": {"join": {ROOM: {"timeline": {"events": timeline, "limited": false}}}},
    }))
    .unwrap()
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = if benching { env("BENCH_RUNS", 20) } else { 1 };
    let events = env("EVENTS", if benching { 1000 } else { 100 });
    let now = Instant::now();

    // Our stage, its keys "uploaded" to the bench.
    let e2ee =
        E2eeConfig::new(CryptoStore::Memory).with_ids(OURS.try_into().unwrap(), OUR_DEVICE.into());
    let mut stage = E2ee::new(&config(), e2ee, now).expect("the stage");
    let mut uploaded = Value::Null;
    for _ in 0..10 {
        let Some(request) = stage.poll_request() else {
            break;
        };
        let body: Value = serde_json::from_slice(request.http.body()).unwrap_or_default();
        let answer = if request.http.uri().path().ends_with("/keys/upload") {
            if uploaded.is_null() {
                uploaded = body;
            }
            json!({"one_time_key_counts": {"signed_curve25519": 50}})
        } else {
            json!({})
        };
        stage.handle_response(request.id, ok(answer), now).unwrap();
    }
    assert!(!uploaded.is_null(), "the stage uploads its keys");
    assert!(!stage.holds_sync(), "the stage lets the sync start");

    // The sender: our device keys and one one-time key, as a server would hand them out.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let sender_id = ruma16::UserId::parse(SENDER).unwrap();
    let ours_id = ruma16::UserId::parse(OURS).unwrap();
    let sender = runtime.block_on(OlmMachine::new(&sender_id, SENDER_DEVICE.into()));
    runtime
        .block_on(sender.update_tracked_users([&*ours_id]))
        .unwrap();
    for request in runtime.block_on(sender.outgoing_requests()).unwrap() {
        use ruma16::api::client::keys;
        match request.request() {
            AnyOutgoingRequest::KeysUpload(_) => {
                let r: keys::upload_keys::v3::Response =
                    response(json!({"one_time_key_counts": {"signed_curve25519": 50}}));
                runtime
                    .block_on(sender.mark_request_as_sent(request.request_id(), &r))
                    .unwrap();
            }
            AnyOutgoingRequest::KeysQuery(_) => {
                let r: keys::get_keys::v3::Response = response(json!({
                    "device_keys": {OURS: {OUR_DEVICE: uploaded["device_keys"]}},
                }));
                runtime
                    .block_on(sender.mark_request_as_sent(request.request_id(), &r))
                    .unwrap();
            }
            _ => {}
        }
    }
    let (claim_id, _) = runtime
        .block_on(sender.get_missing_sessions([&*ours_id].into_iter()))
        .unwrap()
        .expect("a claim for our device");
    let (key_id, key) = uploaded["one_time_keys"]
        .as_object()
        .and_then(|keys| keys.iter().next())
        .expect("a one-time key");
    let claimed: ruma16::api::client::keys::claim_keys::v3::Response = response(json!({
        "one_time_keys": {OURS: {OUR_DEVICE: {key_id: key}}},
    }));
    runtime
        .block_on(sender.mark_request_as_sent(&claim_id, &claimed))
        .unwrap();
    let room = ruma16::RoomId::parse(ROOM).unwrap();
    // One room key for the whole batch (the default rotates it every 100 messages).
    let settings = EncryptionSettings {
        rotation_period_msgs: events as u64 + 1,
        ..EncryptionSettings::default()
    };
    let shares = runtime
        .block_on(sender.share_room_key(&room, [&*ours_id].into_iter(), settings))
        .unwrap();
    let mut to_device = Vec::new();
    for share in &shares {
        let messages = serde_json::to_value(&share.messages).unwrap();
        to_device.push(json!({
            "type": share.event_type.to_string(),
            "sender": SENDER,
            "content": messages[OURS][OUR_DEVICE],
        }));
        let r: ruma16::api::client::to_device::send_event_to_device::v3::Response =
            response(json!({}));
        runtime
            .block_on(sender.mark_request_as_sent(&share.txn_id, &r))
            .unwrap();
    }
    // The key reaches the stage in a batch of its own.
    let (_, _) = run(
        &sync_body("s1", to_device, Vec::new()),
        Some(&mut stage),
        now,
    );

    // The batch: `events` messages, encrypted and in plaintext.
    let mut encrypted = Vec::with_capacity(events);
    let mut plain = Vec::with_capacity(events);
    for i in 0..events {
        let content =
            json!({"msgtype": "m.text", "body": format!("message number {i} of the bench")});
        let raw = ruma16::serde::Raw::from_json(serde_json::value::to_raw_value(&content).unwrap());
        let result = runtime
            .block_on(sender.encrypt_room_event_raw(&room, "m.room.message", &raw))
            .unwrap();
        let ciphertext: Value = serde_json::from_str(result.content.json().get()).unwrap();
        let common = |kind: &str, content: Value| {
            json!({
                "type": kind,
                "event_id": format!("$event{i}:example.org"),
                "sender": SENDER,
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "content": content,
            })
        };
        encrypted.push(common("m.room.encrypted", ciphertext));
        plain.push(common("m.room.message", content));
    }
    let encrypted = sync_body("s2", Vec::new(), encrypted);
    let plain = sync_body("s2", Vec::new(), plain);

    let cases: [(&str, &[u8], bool); 3] = [
        ("plaintext, machine alone", &plain, false),
        ("plaintext, machine + stage", &plain, true),
        ("megolm, machine + stage", &encrypted, true),
    ];
    let mut medians = Vec::new();
    for (name, body, with_stage) in cases {
        let mut samples = Vec::with_capacity(runs);
        let mut counted = (0, 0);
        for _ in 0..runs {
            let started = Instant::now();
            counted = run(body, with_stage.then_some(&mut stage), now);
            samples.push(started.elapsed());
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        let (delivered, decrypted) = counted;
        if name.starts_with("megolm") {
            assert_eq!(decrypted, events, "every message decrypted");
        }
        let per_event = median / events as u32;
        let rate = events as f64 / median.as_secs_f64();
        println!(
            "{name:<28} {events} events: {:>9.2} ms  {:>10.0} events/s  {:>8.2} us/event  \
             ({delivered} items, {decrypted} decrypted, median of {runs}, [{:.2}..{:.2} ms])",
            ms(median),
            rate,
            per_event.as_secs_f64() * 1e6,
            ms(samples[0]),
            ms(samples[samples.len() - 1]),
        );
        medians.push(median);
    }
    let extra = medians[2].saturating_sub(medians[1]) / events as u32;
    println!(
        "decryption adds {:.2} us per event over plaintext through the stage ({:.1}x the machine alone)",
        extra.as_secs_f64() * 1e6,
        medians[2].as_secs_f64() / medians[0].as_secs_f64()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
