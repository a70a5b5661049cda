//! The fleet's stream hop (feature `fleet`): N accounts (default 1,000) on one local Synapse,
//! synced two ways one after the other in this process, and what the stream adds.
//!
//! ```text
//! cargo bench --features fleet --bench fleet
//! FLEET_BENCH_ACCOUNTS=300 FLEET_BENCH_MESSAGES=3 cargo bench --features fleet --bench fleet
//! ```
//!
//! It starts a throwaway Synapse (presence off, bcrypt rounds 4) and a throwaway
//! `nats-server -js`, registers N accounts in rooms of 50, then:
//!
//! 1. **reactor alone**: every account added to a reactor, events read from its channel;
//! 2. **through the stream**: one fleet worker (`fleet::run`, on a thread here) syncing the same
//!    accounts, events read back by a durable consumer (`FleetClient::durable`).
//!
//! For each: the **initial sync** (from the start until every account's first events were
//! read: events per second), then `FLEET_BENCH_MESSAGES` messages (default 5) sent into each
//! room one room after the other, and per account and message the **latency** from just
//! before the `PUT` until the event was read (p50, p99 over every sample), and the
//! **throughput** of that traffic (events read per second from the first send to the last
//! event). Both use the same filter (timeline limit 1, lazy-loaded members, no presence or
//! ephemeral events) and a 30 s long-poll. The difference of the latencies is the added
//! latency of the stream hop (publish, acknowledgement, consumer fetch).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::fleet::{self, AccountEntry, FleetClient, FleetConfig};
use matrix_sync_service::reactor::{self, ReactorConfig};
use matrix_sync_service::{Config, EventKind, SyncFilter};
use matrix_sync_testkit::client::Account;
use matrix_sync_testkit::nats::NatsServer;
use matrix_sync_testkit::parallel::parallel;
use matrix_sync_testkit::synapse::SynapseOptions;
use serde_json::{json, Value};

const FILTER: &str = r#"{"presence":{"types":[]},"room":{"timeline":{"limit":1},"state":{"lazy_load_members":true},"ephemeral":{"types":[]}}}"#;
const ROOM_SIZE: usize = 50;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Send instants by event id.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

struct Outcome {
    initial: Duration,
    initial_events: usize,
    latencies: Vec<Duration>,
    traffic: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, o: &mut Outcome) {
    o.latencies.sort();
    println!(
        "{name}: initial sync {:.1} s, {} events ({:.0} events/s); traffic {} events in {:.2} s \
         ({:.0} events/s); latency p50 {:.1} ms, p99 {:.1} ms",
        o.initial.as_secs_f64(),
        o.initial_events,
        o.initial_events as f64 / o.initial.as_secs_f64(),
        o.latencies.len(),
        o.traffic.as_secs_f64(),
        o.latencies.len() as f64 / o.traffic.as_secs_f64(),
        percentile(&o.latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&o.latencies, 0.99).as_secs_f64() * 1e3,
    );
}

/// Sends `messages` rounds, one message per room per round, recording each send instant.
fn send_all(sender: &Account, rooms: &[String], messages: usize, sent: &Sent) {
    for m in 0..messages {
        for room in rooms {
            let before = Instant::now();
            let id = sender.send_text(room, &format!("bench {m}"));
            sent.lock().unwrap().insert(id, before);
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("FLEET_BENCH_ACCOUNTS", 1000);
    let messages = env_usize("FLEET_BENCH_MESSAGES", 5);
    let nats = NatsServer::start();
    let synapse = SynapseOptions::new()
        .config("bcrypt_rounds", json!(4))
        .config("presence", json!({"enabled": false}))
        .start();
    let base = synapse.base_url();
    let t = Instant::now();
    let sender = Account::register(&base, "benchsender");
    let accounts = parallel(n, 4, |_| Account::register(&base, "bench"));
    let rooms: Vec<String> = (0..n.div_ceil(ROOM_SIZE))
        .map(|_| {
            let (status, resp) = sender.post_json(
                "/_matrix/client/v3/createRoom",
                &json!({"preset": "public_chat"}),
            );
            assert_eq!(status, 200, "{resp}");
            resp["room_id"].as_str().unwrap().to_owned()
        })
        .collect();
    parallel(n, 4, |i| accounts[i].join(&rooms[i / ROOM_SIZE]));
    println!(
        "set-up: {n} accounts in {} rooms, {:?}",
        rooms.len(),
        t.elapsed()
    );
    let expected = n * messages;
    let mut template = Config::new(&base, "template");
    template.filter = Some(SyncFilter::from_json(FILTER).unwrap());

    // 1. The reactor alone.
    let mut direct = {
        let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
        let start = Instant::now();
        for (i, a) in accounts.iter().enumerate() {
            let mut config = template.clone();
            config.access_token = matrix_sync_service::AccessToken::new(&a.access_token);
            reactor.add(i, config).unwrap();
        }
        let (mut synced, mut initial_events) = (HashSet::new(), 0);
        while synced.len() < n {
            let e = reactor
                .events()
                .recv_timeout(Duration::from_secs(300))
                .unwrap();
            initial_events += 1;
            if matches!(e.event.kind, EventKind::Checkpoint(_)) {
                synced.insert(e.account);
            }
        }
        let initial = start.elapsed();
        let sent: Sent = Arc::default();
        let sending = {
            let (sender, rooms, sent) = (&sender, &rooms, sent.clone());
            thread::scope(|scope| {
                let first = Instant::now();
                let to_send = sent.clone();
                let h = scope.spawn(move || send_all(sender, rooms, messages, &to_send));
                let mut latencies = Vec::new();
                let mut last = first;
                while latencies.len() < expected {
                    let e = reactor
                        .events()
                        .recv_timeout(Duration::from_secs(120))
                        .unwrap();
                    if e.event.kind == EventKind::Message {
                        let id = e.event.event_id.as_ref().unwrap().to_string();
                        let now = Instant::now();
                        // A send's id is recorded once its PUT returned: wait for it.
                        let at = loop {
                            if let Some(at) = sent.lock().unwrap().get(&id) {
                                break *at;
                            }
                            thread::sleep(Duration::from_micros(200));
                        };
                        latencies.push(now - at);
                        last = now;
                    }
                }
                h.join().unwrap();
                (latencies, last - first)
            })
        };
        reactor.stop();
        reactor.join().unwrap();
        Outcome {
            initial,
            initial_events,
            latencies: sending.0,
            traffic: sending.1,
        }
    };
    report("reactor alone", &mut direct);

    // 2. Through the stream.
    let mut streamed = {
        let config = FleetConfig::new(nats.url(), "bench-worker").lease_ttl(Duration::from_secs(4));
        let admin = FleetClient::connect(&config).unwrap();
        for (i, a) in accounts.iter().enumerate() {
            admin
                .put_account(&format!("a{i}"), &AccountEntry::new(&base, &a.access_token))
                .unwrap();
        }
        let mut worker_config = config.clone();
        worker_config.template = template.clone();
        worker_config.settle = Duration::ZERO;
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
        let start = Instant::now();
        let worker = thread::spawn(move || fleet::run(worker_config, &stop));
        let mut consumer = admin.durable("bench", "sync.*.events").unwrap();
        let (mut seen, mut initial_events) = (HashSet::new(), 0);
        while seen.len() < n {
            consumer
                .fetch(4096, Duration::from_millis(100), |m| {
                    seen.insert(m.account.clone());
                    initial_events += 1;
                    true
                })
                .unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "initial sync too slow"
            );
        }
        let initial = start.elapsed();
        // The rest of the initial batches, then quiet.
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_secs(2) {
            let got = consumer
                .fetch(4096, Duration::from_millis(200), |_| {
                    initial_events += 1;
                    true
                })
                .unwrap();
            if got > 0 {
                quiet = Instant::now();
            }
        }
        let sent: Sent = Arc::default();
        let (latencies, traffic) = {
            let (sender, rooms, sent) = (&sender, &rooms, sent.clone());
            thread::scope(|scope| {
                let first = Instant::now();
                let to_send = sent.clone();
                let h = scope.spawn(move || send_all(sender, rooms, messages, &to_send));
                let mut latencies = Vec::new();
                let mut last = first;
                while latencies.len() < expected {
                    consumer
                        .fetch(4096, Duration::from_millis(50), |m| {
                            let event: Value = serde_json::from_slice(&m.payload).unwrap();
                            if event["kind"] == "message" {
                                let id = event["event_id"].as_str().unwrap().to_owned();
                                let now = Instant::now();
                                let at = loop {
                                    if let Some(at) = sent.lock().unwrap().get(&id) {
                                        break *at;
                                    }
                                    thread::sleep(Duration::from_micros(200));
                                };
                                latencies.push(now - at);
                                last = now;
                            }
                            true
                        })
                        .unwrap();
                    assert!(
                        first.elapsed() < Duration::from_secs(300),
                        "traffic too slow"
                    );
                }
                h.join().unwrap();
                (latencies, last - first)
            })
        };
        drop(stop_tx);
        worker.join().unwrap().unwrap();
        Outcome {
            initial,
            initial_events,
            latencies,
            traffic,
        }
    };
    report("through the stream", &mut streamed);
    println!(
        "added by the stream hop: p50 {:+.1} ms, p99 {:+.1} ms",
        (percentile(&streamed.latencies, 0.5).as_secs_f64()
            - percentile(&direct.latencies, 0.5).as_secs_f64())
            * 1e3,
        (percentile(&streamed.latencies, 0.99).as_secs_f64()
            - percentile(&direct.latencies, 0.99).as_secs_f64())
            * 1e3,
    );
}
