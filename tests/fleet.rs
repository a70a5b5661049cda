//! The fleet (feature `fleet`) against a real `nats-server -js` and a real Synapse: three
//! worker processes (`examples/fleet.rs`) share 300 accounts; messages are sent in batches;
//! one worker is SIGKILLed in the middle of a batch, and nats-server is stopped after a batch
//! and started again 1.5 s into the next (its messages are synced while it is down). Read back from the stream (a durable consumer while it runs, the whole stream at
//! the end):
//!
//! * every account received every message of its room, in the order sent, once;
//! * no message id twice in the stream (JetStream's duplicate window dropped every
//!   republished copy);
//! * no account synced by two workers at once: from the workers' lease history (the span
//!   from each `acquired` to its `released`/`lost`, or to the SIGKILL), the spans of one
//!   account never overlap, and in the stream the lease revisions of one account never go
//!   back;
//! * the killed worker's accounts were taken over; an account removed from the accounts
//!   bucket at run time gives its lease back, and added again resumes from its checkpoint;
//!   a worker stopped with SIGTERM hands its accounts to the last one, which then stops
//!   cleanly too, giving back every lease.
//!
//! A second test breaks a worker's lease (no homeserver needed): the worker stops the account
//! at its next renewal, then takes a new lease. A third adds accounts to two workers holding
//! 150 each: each new one, the only free lease among hundreds held, is taken within a few
//! renewals.
//!
//! nats-server comes from `NATS_SERVER_BIN` or `PATH` (`scripts/nats.sh install`): without
//! it the test fails, it never skips.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use matrix_sync_service::fleet::{self, AccountEntry, FleetClient, FleetConfig, StreamMessage};
use matrix_sync_testkit::example::example_binary;
use matrix_sync_testkit::nats::NatsServer;
use matrix_sync_testkit::parallel::parallel;
use serde_json::{json, Value};
use support::client::Account;
use support::synapse::SynapseOptions;

const ACCOUNTS: usize = 300;
const ROOMS: usize = 10;
const WORKERS: usize = 3;
const LEASE_TTL: Duration = Duration::from_secs(4);
/// Long enough that 300 idle long-polls cost Synapse little.
const LONG_POLL_MS: u64 = 10_000;
const BUILD: &str = "run `cargo build --features fleet --examples`";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Worker {
    id: String,
    child: Child,
    stderr: Option<thread::JoinHandle<String>>,
}

/// Lease history lines of every worker, in arrival order.
type History = Arc<Mutex<Vec<Value>>>;

fn spawn_worker(nats: &str, id: &str, history: &History) -> Worker {
    let mut child = Command::new(example_binary("fleet", BUILD))
        .args(["--nats", nats, "--worker", id])
        .args(["--lease-ttl-ms", &LEASE_TTL.as_millis().to_string()])
        .args(["--timeout-ms", &LONG_POLL_MS.to_string(), "--verbose"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the fleet example");
    let stdout = child.stdout.take().unwrap();
    let history = history.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("stdout of a worker");
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            history.lock().unwrap().push(value);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Worker {
        id: id.to_owned(),
        child,
        stderr: Some(stderr),
    }
}

/// What the test's durable consumer has read: per account, the messages in stream order.
#[derive(Default)]
struct Seen {
    per_account: HashMap<String, Vec<StreamMessage>>,
}

impl Seen {
    /// The event ids of `account`'s room messages (kind `message`), in stream order.
    fn messages(&self, account: &str) -> Vec<String> {
        messages_of(self.per_account.get(account).map_or(&[][..], |v| v))
    }
}

fn messages_of(stream: &[StreamMessage]) -> Vec<String> {
    stream
        .iter()
        .filter_map(|m| {
            let event: Value = serde_json::from_slice(&m.payload).ok()?;
            (event["kind"] == "message").then(|| event["event_id"].as_str().map(str::to_owned))?
        })
        .collect()
}

/// Reads the durable consumer until `done` holds (or fails the test at `deadline`), riding
/// out a NATS restart.
fn read_until(
    admin: &FleetClient,
    seen: &mut Seen,
    what: &str,
    deadline: Duration,
    workers: &mut [Worker],
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + deadline;
    let mut consumer = None;
    while !done(seen) {
        if Instant::now() > deadline {
            let stderr: Vec<String> = workers
                .iter_mut()
                .map(|w| {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    let text = w.stderr.take().map(|h| h.join().unwrap_or_default());
                    format!("--- {}:\n{}", w.id, text.unwrap_or_default())
                })
                .collect();
            let events: usize = seen.per_account.values().map(Vec::len).sum();
            let stream = admin.read_all().unwrap_or_default();
            for i in 0..ACCOUNTS {
                let name = format!("acct-{i:03}");
                if !seen.per_account.contains_key(&name) {
                    eprintln!(
                        "{name}: lease {:?}, checkpoint {:?}, {} in the stream",
                        admin.lease(&name),
                        admin.checkpoint(&name),
                        stream.iter().filter(|m| m.account == name).count()
                    );
                }
            }
            panic!(
                "timed out waiting for {what} ({} accounts, {events} events read); \
                 workers' stderr:\n{}",
                seen.per_account.len(),
                stderr.join("\n")
            );
        }
        if consumer.is_none() {
            match admin.durable("fleet-test", "sync.*.events") {
                Ok(c) => consumer = Some(c),
                Err(e) => {
                    eprintln!("durable consumer: {e}; retrying");
                    thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        let fetched = consumer
            .as_mut()
            .unwrap()
            .fetch(1000, Duration::from_millis(200), |m| {
                seen.per_account
                    .entry(m.account.clone())
                    .or_default()
                    .push(m.clone());
                true
            });
        if let Err(e) = fetched {
            eprintln!("fetch: {e}; retrying");
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// SIGTERM, then a clean exit within 20 s; its stderr.
fn stop_cleanly(worker: &mut Worker) -> (String, String) {
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(worker.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not exit after SIGTERM",
            worker.id
        );
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = worker.stderr.take().unwrap().join().unwrap();
    assert!(
        status.success(),
        "{}: {status}; stderr:\n{stderr}",
        worker.id
    );
    (worker.id.clone(), stderr)
}

#[test]
fn three_workers_share_300_accounts_survive_a_sigkill_and_a_nats_restart_and_lose_nothing() {
    let started = Instant::now();
    let mut nats = NatsServer::start();
    let synapse = SynapseOptions::new()
        .config("bcrypt_rounds", json!(4))
        .config("presence", json!({"enabled": false}))
        // No user directory: its background updates for 300 joins slow the initial syncs.
        .config("user_directory", json!({"enabled": false}))
        .start();
    let base = synapse.base_url();

    // 300 accounts in 10 public rooms of one sender.
    let sender = Account::register(&base, "fleetsender");
    let accounts = parallel(ACCOUNTS, 4, |_| Account::register(&base, "fleet"));
    let rooms: Vec<String> = (0..ROOMS)
        .map(|_| {
            let (status, resp) = sender.post_json(
                "/_matrix/client/v3/createRoom",
                &json!({"preset": "public_chat"}),
            );
            assert_eq!(status, 200, "createRoom: {resp}");
            resp["room_id"].as_str().unwrap().to_owned()
        })
        .collect();
    parallel(ACCOUNTS, 4, |i| accounts[i].join(&rooms[i % ROOMS]));
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i:03}")).collect();
    let room_of = |name: &str| -> usize {
        name.trim_start_matches("acct-").parse::<usize>().unwrap() % ROOMS
    };
    eprintln!(
        "set-up (Synapse, {ACCOUNTS} users, {ROOMS} rooms): {:?}",
        started.elapsed()
    );

    // The accounts bucket, then the workers.
    let admin =
        FleetClient::connect(&FleetConfig::new(nats.url(), "test-admin").lease_ttl(LEASE_TTL))
            .expect("connect to NATS");
    for (name, account) in names.iter().zip(&accounts) {
        admin
            .put_account(name, &AccountEntry::new(&base, &account.access_token))
            .unwrap();
    }
    let history: History = Arc::default();
    let mut workers: Vec<Worker> = (1..=WORKERS)
        .map(|i| spawn_worker(&nats.url(), &format!("w{i}"), &history))
        .collect();
    let mut seen = Seen::default();

    // Every account's initial sync in the stream and its checkpoint stored.
    let all: HashSet<String> = names.iter().cloned().collect();
    read_until(
        &admin,
        &mut seen,
        "every account's initial sync",
        Duration::from_secs(90),
        &mut workers,
        |s| all.iter().all(|a| s.per_account.contains_key(a)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in &names {
        while admin.checkpoint(name).unwrap().is_none() {
            assert!(Instant::now() < deadline, "{name}: no checkpoint stored");
            thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("initial syncs in the stream: {:?}", started.elapsed());

    let mut sent: Vec<Vec<String>> = vec![Vec::new(); ROOMS];
    let send_round = |sent: &mut Vec<Vec<String>>, label: &str| {
        for (r, room) in rooms.iter().enumerate() {
            sent[r].push(sender.send_text(room, &format!("{label} room {r}")));
        }
    };
    let received_all = |sent: &Vec<Vec<String>>| {
        let sent = sent.clone();
        let names = names.clone();
        move |s: &Seen| {
            names
                .iter()
                .all(|n| s.messages(n).len() >= sent[room_of(n)].len())
        }
    };

    // Batch 1.
    send_round(&mut sent, "batch 1");
    read_until(
        &admin,
        &mut seen,
        "batch 1",
        Duration::from_secs(60),
        &mut workers,
        received_all(&sent),
    );
    eprintln!("batch 1 everywhere: {:?}", started.elapsed());

    // Batch 2: SIGKILL the worker holding the most accounts between its two rounds.
    send_round(&mut sent, "batch 2a");
    let held = |history: &[Value], worker: &str| -> HashSet<String> {
        let mut held = HashSet::new();
        for line in history.iter().filter(|l| l["worker"] == worker) {
            let account = line["account"].as_str().unwrap().to_owned();
            if line["change"] == "acquired" {
                held.insert(account);
            } else {
                held.remove(&account);
            }
        }
        held
    };
    let (victim, victim_held) = {
        let history = history.lock().unwrap();
        workers
            .iter()
            .enumerate()
            .map(|(i, w)| (i, held(&history, &w.id)))
            .max_by_key(|(_, h)| h.len())
            .unwrap()
    };
    let victim_id = workers[victim].id.clone();
    eprintln!(
        "SIGKILL {victim_id}, holding {} accounts: {:?}",
        victim_held.len(),
        started.elapsed()
    );
    assert!(
        victim_held.len() >= ACCOUNTS / WORKERS / 2,
        "the workers did not share the accounts: {victim_id} holds {}",
        victim_held.len()
    );
    let killed_at = now_ms();
    workers[victim].child.kill().unwrap();
    workers[victim].child.wait().unwrap();
    let victim_stderr = workers[victim].stderr.take().unwrap().join().unwrap();
    drop(workers.remove(victim));
    send_round(&mut sent, "batch 2b");
    read_until(
        &admin,
        &mut seen,
        "batch 2 after the SIGKILL",
        Duration::from_secs(60),
        &mut workers,
        received_all(&sent),
    );
    eprintln!("batch 2 everywhere: {:?}", started.elapsed());

    // nats-server restarted between two batches, and down while batch 3 is synced: the
    // workers' publishes fail, the accounts restart from their checkpoints once it is back.
    nats.stop();
    send_round(&mut sent, "batch 3");
    thread::sleep(Duration::from_millis(1500));
    nats.restart();
    eprintln!(
        "nats-server down during batch 3, started again: {:?}",
        started.elapsed()
    );
    read_until(
        &admin,
        &mut seen,
        "batch 3 after the NATS restart",
        Duration::from_secs(60),
        &mut workers,
        received_all(&sent),
    );
    eprintln!("batch 3 everywhere: {:?}", started.elapsed());
    // An account removed at run time: its lease is given back; added again, it resumes from
    // its checkpoint (nothing twice, nothing missing: checked below with the others).
    admin.remove_account(&names[0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin.lease(&names[0]).unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "{}: lease kept after its removal",
            names[0]
        );
        thread::sleep(Duration::from_millis(50));
    }
    admin
        .put_account(
            &names[0],
            &AccountEntry::new(&base, &accounts[0].access_token),
        )
        .unwrap();

    // One of the two left stops cleanly (SIGTERM): the last one takes all its accounts.
    let mut stderrs = vec![(victim_id.clone(), victim_stderr)];
    let mut stopping = workers.remove(0);
    stderrs.push(stop_cleanly(&mut stopping));
    eprintln!("{} stopped: {:?}", stopping.id, started.elapsed());
    send_round(&mut sent, "batch 4");
    read_until(
        &admin,
        &mut seen,
        "batch 4 with one worker left",
        Duration::from_secs(60),
        &mut workers,
        received_all(&sent),
    );
    eprintln!("batch 4 everywhere: {:?}", started.elapsed());
    // A moment for anything that would come twice.
    thread::sleep(Duration::from_secs(1));
    read_until(
        &admin,
        &mut seen,
        "nothing",
        Duration::from_secs(5),
        &mut workers,
        |_| true,
    );
    for worker in &mut workers {
        stderrs.push(stop_cleanly(worker));
    }
    for (id, text) in &stderrs {
        let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("WARN")).collect();
        eprintln!("{id}: {} warnings logged", warnings.len());

        for line in warnings.iter().take(5) {
            eprintln!("  {line}");
        }
    }
    let stderr_text = || {
        stderrs
            .iter()
            .map(|(id, text)| format!("--- {id}:\n{text}"))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // 1. The whole stream: every message of every account, in order, once.
    let stream = admin.read_all().expect("read the stream");
    let mut ids = HashSet::new();
    for m in &stream {
        assert!(
            ids.insert(m.message_id.clone()),
            "message id {} twice in the stream",
            m.message_id
        );
    }
    let mut per_account: HashMap<String, Vec<StreamMessage>> = HashMap::new();
    for m in &stream {
        per_account
            .entry(m.account.clone())
            .or_default()
            .push(m.clone());
    }
    for name in &names {
        let in_stream = per_account.get(name).map_or(&[][..], |v| v);
        assert_eq!(
            messages_of(in_stream),
            sent[room_of(name)],
            "{name}: its room's messages, once each, in the order sent; stderr:\n{}",
            stderr_text()
        );
        assert_eq!(
            seen.messages(name),
            sent[room_of(name)],
            "{name}: as read by the durable consumer"
        );
        let mut event_ids = HashSet::new();
        for m in in_stream {
            let event: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(event["account"], name.as_str());
            if let Some(id) = event["event_id"].as_str() {
                assert!(
                    event_ids.insert(id.to_owned()),
                    "{name}: event {id} twice in the stream"
                );
            }
        }
        // 2. Lease revisions never go back in one account's part of the stream.
        let leases: Vec<u64> = in_stream.iter().map(|m| m.lease).collect();
        assert!(
            leases.iter().all(|&l| l > 0),
            "{name}: a message without its lease"
        );
        assert!(
            leases.windows(2).all(|w| w[0] <= w[1]),
            "{name}: lease revisions {leases:?}"
        );
    }
    let total_messages: usize = names
        .iter()
        .map(|n| messages_of(&per_account[n]).len())
        .sum();
    eprintln!(
        "stream: {} events, {total_messages} room messages for {ACCOUNTS} accounts",
        stream.len()
    );

    // 3. No account synced by two workers at once, from the lease history.
    let history = history.lock().unwrap().clone();
    let mut spans: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    let mut open: HashMap<(String, String), u64> = HashMap::new();
    for line in &history {
        let worker = line["worker"].as_str().unwrap().to_owned();
        let account = line["account"].as_str().unwrap().to_owned();
        let at = line["at_ms"].as_u64().unwrap();
        if line["change"] == "acquired" {
            assert!(
                open.insert((worker, account), at).is_none(),
                "acquired twice: {line}"
            );
        } else {
            let start = open
                .remove(&(worker.clone(), account.clone()))
                .unwrap_or_else(|| panic!("ended without a start: {line}"));
            spans.entry(account).or_default().push((start, at, worker));
        }
    }
    for ((worker, account), start) in open {
        assert_eq!(
            worker, victim_id,
            "{worker} stopped with {account} still held"
        );
        spans
            .entry(account)
            .or_default()
            .push((start, killed_at, worker));
    }
    for (account, spans) in &mut spans {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{account} synced by two workers at once: {pair:?}"
            );
        }
    }
    let mut last_takeover = 0;
    for account in &victim_held {
        let taken_over = spans[account]
            .iter()
            .filter(|(start, _, w)| *w != victim_id && *start >= killed_at)
            .map(|(start, _, _)| *start)
            .min();
        let at = taken_over
            .unwrap_or_else(|| panic!("{account} of the killed worker was not taken over"));
        last_takeover = last_takeover.max(at - killed_at);
    }
    eprintln!(
        "the killed worker's {} accounts were all taken over {last_takeover} ms after the \
         SIGKILL (lease TTL {LEASE_TTL:?})",
        victim_held.len()
    );
    let lines_per_kind = history.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(l["change"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
        m
    });
    eprintln!("lease history: {lines_per_kind:?}");

    // 4. Every lease given back by the workers that stopped cleanly (the killed one's
    // expired long ago).
    for name in &names {
        assert_eq!(admin.lease(name).unwrap(), None, "{name}: lease still held");
    }
    eprintln!("total: {:?}", started.elapsed());
}

/// A worker whose lease is taken from it stops the account at once (`lost`), then takes a new
/// lease (a higher revision) and syncs it again; on stop it gives the lease back. No
/// homeserver needed: the account's server refuses connections, the lease is what is tested.
#[test]
fn a_worker_stops_an_account_whose_lease_it_lost_and_takes_a_new_one() {
    use matrix_sync_service::fleet::{LeaseChange, LeaseChangeKind};
    use std::sync::mpsc;

    let nats = NatsServer::start();
    let config = FleetConfig::new(nats.url(), "solo-worker").lease_ttl(Duration::from_secs(2));
    let admin = FleetClient::connect(&config).unwrap();
    admin
        .put_account("solo", &AccountEntry::new("http://127.0.0.1:9", "token"))
        .unwrap();
    let (tx, changes) = mpsc::channel::<LeaseChange>();
    let tx = Mutex::new(tx);
    let mut worker_config = config.clone().on_lease(move |c| {
        let _ = tx.lock().unwrap().send(c.clone());
    });
    worker_config.settle = Duration::ZERO;
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    let worker = thread::spawn(move || fleet::run(worker_config, &stop));
    let next = |what: &str| {
        changes
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no lease change ({e}) while waiting for {what}"))
    };

    let first = next("the first lease");
    assert_eq!(
        (first.account.as_str(), &first.kind),
        ("solo", &LeaseChangeKind::Acquired)
    );
    assert_eq!(admin.lease("solo").unwrap().unwrap().worker, "solo-worker");

    let broken = Instant::now();
    admin.break_lease("solo").unwrap();
    let lost = next("the lease lost");
    assert_eq!(
        (lost.kind, lost.lease),
        (LeaseChangeKind::Lost, first.lease)
    );
    assert!(
        broken.elapsed() < config.renew_every * 2 + Duration::from_secs(2),
        "stopped {:?} after the lease was broken",
        broken.elapsed()
    );

    let again = next("a new lease");
    assert_eq!(again.kind, LeaseChangeKind::Acquired);
    assert!(
        again.lease > first.lease,
        "{} then {}",
        first.lease,
        again.lease
    );

    drop(stop_tx);
    worker.join().unwrap().unwrap();
    let released = next("the lease given back");
    assert_eq!(
        (released.kind, released.lease),
        (LeaseChangeKind::Released, again.lease)
    );
    assert_eq!(admin.lease("solo").unwrap(), None);
}

/// Two workers share 300 accounts, 150 each; then five more are added one at a time, each the
/// only free one among hundreds held, with one worker or both one under their share. Each is
/// taken within a few renewals: a
/// worker under its share tries only the accounts the leases bucket shows free. (Before, each
/// balancing round tried the next account in turn, held elsewhere or not, one round every half
/// renewal: up to a minute and more to reach the free one among hundreds, and the first test
/// above once waited 90 s in vain for its last account.) No homeserver needed: the accounts'
/// server refuses connections.
#[test]
fn the_one_free_lease_among_hundreds_held_is_found_within_a_few_renewals() {
    use matrix_sync_service::fleet::{LeaseChange, LeaseChangeKind};
    use std::sync::mpsc;

    const ACCOUNTS: usize = 300;
    let nats = NatsServer::start();
    let config = FleetConfig::new(nats.url(), "w").lease_ttl(LEASE_TTL);
    let admin = FleetClient::connect(&config).unwrap();
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i:03}")).collect();
    for name in &names {
        admin
            .put_account(name, &AccountEntry::new("http://127.0.0.1:9", "token"))
            .unwrap();
    }
    let (tx, changes) = mpsc::channel::<(usize, LeaseChange)>();
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let tx = Mutex::new(tx.clone());
            let mut worker_config = config.clone().on_lease(move |c| {
                let _ = tx.lock().unwrap().send((i, c.clone()));
            });
            worker_config.worker_id = format!("w{i}");
            let stop = stop.clone();
            thread::spawn(move || fleet::run(worker_config, &stop))
        })
        .collect();
    let mut held: [HashSet<String>; 2] = Default::default();
    let apply = |held: &mut [HashSet<String>; 2], (i, c): (usize, LeaseChange)| {
        if c.kind == LeaseChangeKind::Acquired {
            held[i].insert(c.account.clone());
        } else {
            held[i].remove(&c.account);
        }
        c
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while held.iter().any(|h| h.len() != ACCOUNTS / 2) {
        let left = deadline.saturating_duration_since(Instant::now());
        let change = changes.recv_timeout(left).unwrap_or_else(|e| {
            panic!(
                "no even share ({e}): {} and {}",
                held[0].len(),
                held[1].len()
            )
        });
        apply(&mut held, change);
    }
    // One at a time, at places spread over the sorted names.
    let added = [
        "acct-050a",
        "acct-300",
        "acct-125a",
        "acct-000a",
        "acct-225a",
    ];
    for (n, added) in added.iter().enumerate() {
        let put = Instant::now();
        admin
            .put_account(added, &AccountEntry::new("http://127.0.0.1:9", "token"))
            .unwrap();
        let deadline = put + LEASE_TTL * 2;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (a, b) = (held[0].len(), held[1].len());
            let change = changes.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "{added}: not taken {:?} after it was added ({e}; held {a} and {b})",
                    put.elapsed(),
                )
            });
            let change = apply(&mut held, change);
            if change.account == *added && change.kind == LeaseChangeKind::Acquired {
                break;
            }
        }
        eprintln!("{added}: taken {:?} after it was added", put.elapsed());
        assert_eq!(held[0].len() + held[1].len(), ACCOUNTS + n + 1);
    }

    drop(stop_tx);
    for worker in workers {
        worker.join().unwrap().unwrap();
    }
}
