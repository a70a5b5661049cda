//! No event lost: faults between client and server, kills of the client, long absences with
//! small timelines, and a homeserver restart, all against a real Synapse.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::{start, BackoffPolicy, EventKind, SyncFilter};
use serde_json::Value;
use support::client::{room_of_two, Account};
use support::proxy::{Action, Fault, FaultPlan, Proxy};
use support::service::{
    bodies_in, collect_until, config_for, drain_until_live, json_lines, last_checkpoint,
    tail_binary, time_to_close,
};
use support::synapse::Synapse;

fn expected_bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

/// Sends `n` numbered messages from a background thread, `pause` apart.
fn send_in_background(
    bob: &Account,
    room: &str,
    prefix: &str,
    n: usize,
    pause: Duration,
) -> thread::JoinHandle<()> {
    let (bob, room, prefix) = (bob.clone(), room.to_owned(), prefix.to_owned());
    thread::spawn(move || {
        for i in 0..n {
            bob.send_text(&room, &format!("{prefix} {i}"));
            thread::sleep(pause);
        }
    })
}

#[test]
fn every_message_arrives_once_and_in_order_through_a_faulty_network() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "faulty", "sender");

    let modes = vec![
        Fault::Reset,
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::RateLimited {
            retry_after_ms: 400,
        },
        Fault::Truncated,
        Fault::Stall(Duration::from_secs(5)),
        Fault::Garbage,
    ];
    let upstream = format!("127.0.0.1:{}", synapse.port()).parse().unwrap();
    let proxy = Proxy::start(
        upstream,
        FaultPlan::new(0.3, modes, 42).with_path_filter("/sync"),
    );
    let mut config = config_for(&alice);
    config.homeserver = proxy.url();
    config.long_poll_timeout = Duration::from_secs(2);
    config.deadline_margin = Duration::from_secs(1);
    config.backoff = BackoffPolicy::default()
        .with_initial(Duration::from_millis(100))
        .with_max(Duration::from_secs(1));
    config.filter = Some(SyncFilter::timeline_limit(5));
    let service = start(config).expect("valid config");

    // Spread over about 12 s, so that enough syncs go through the proxy for its faults to
    // show (sent in a burst, the whole conversation fits in a few syncs and gap fills).
    let sender = send_in_background(&bob, &room, "faulty", 300, Duration::from_millis(40));
    let events = collect_until(&service, Duration::from_secs(180), |events| {
        bodies_in(events, &room).len() >= 300
    });
    sender.join().unwrap();
    assert_eq!(
        bodies_in(&events, &room),
        expected_bodies("faulty", 300),
        "all 300, once, in order"
    );

    let mut errors = Vec::new();
    while let Ok(e) = service.errors().try_recv() {
        errors.push(e);
    }
    assert!(time_to_close(&service) < Duration::from_secs(2));
    let log = proxy.log();
    let syncs: Vec<_> = log.iter().filter(|e| e.path.contains("/sync")).collect();
    let injected: Vec<_> = syncs
        .iter()
        .filter(|e| matches!(e.action, Action::Injected(_)))
        .collect();
    assert!(
        injected.len() >= 10,
        "the proxy really injected faults: {} of {}",
        injected.len(),
        syncs.len()
    );
    assert!(!errors.is_empty(), "failures were reported");
    // Spacing: after each injected fault, the next sync comes no sooner than the shortest
    // backoff (100 ms with 50 % jitter), and after a 429 no sooner than its 400 ms.
    let mut by_time = syncs.clone();
    by_time.sort_by_key(|e| e.at);
    for pair in by_time.windows(2) {
        let gap = pair[1].at - pair[0].at;
        match &pair[0].action {
            Action::Injected(Fault::RateLimited { retry_after_ms }) => {
                assert!(
                    gap >= Duration::from_millis(*retry_after_ms - 20),
                    "429 honoured: {gap:?}"
                )
            }
            Action::Injected(_) => assert!(
                gap >= Duration::from_millis(45),
                "backoff, no hot loop: {gap:?}"
            ),
            _ => {}
        }
    }
    let fills = log.iter().filter(|e| e.path.contains("/messages")).count();
    eprintln!(
        "{} syncs, {} faults, {} gap-fill requests, {} errors reported",
        syncs.len(),
        injected.len(),
        fills,
        errors.len()
    );
}

#[test]
fn a_long_absence_with_a_small_timeline_is_filled_completely() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "absent", "chatty");

    let mut config = config_for(&alice);
    config.filter = Some(SyncFilter::timeline_limit(10));
    let service = start(config.clone()).expect("valid config");
    drain_until_live(&service);
    bob.send_text(&room, "before the absence");
    let first = collect_until(&service, Duration::from_secs(30), |e| {
        bodies_in(e, &room).len() == 1
    });
    let checkpoint = last_checkpoint(&first);
    service.stop();
    service.join().unwrap();
    let checkpoint = match checkpoint {
        Some(c) => c,
        None => last_checkpoint(&collect_until(&service, Duration::from_secs(5), |e| {
            last_checkpoint(e).is_some()
        }))
        .unwrap(),
    };

    for i in 0..500 {
        bob.send_text(&room, &format!("absent {i}"));
    }

    config.since = Some(checkpoint.clone());
    let service = start(config.clone()).expect("valid config");
    let events = collect_until(&service, Duration::from_secs(120), |e| {
        bodies_in(e, &room).len() >= 500
    });
    assert_eq!(
        bodies_in(&events, &room),
        expected_bodies("absent", 500),
        "all 500, once, in order"
    );
    assert!(
        !events.iter().any(|e| matches!(e.kind, EventKind::Gap(_))),
        "nothing left as a gap"
    );
    assert!(time_to_close(&service) < Duration::from_secs(1));

    // With filling off, the same absence is reported as a gap item instead.
    config.gap_fill.enabled = false;
    let service = start(config).expect("valid config");
    let events = collect_until(&service, Duration::from_secs(60), |e| {
        last_checkpoint(e).is_some()
    });
    let gap = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::Gap(_)))
        .expect("a gap item");
    assert_eq!(gap.room_id.as_ref().unwrap().as_str(), room);
    let EventKind::Gap(info) = &gap.kind else {
        unreachable!()
    };
    assert_eq!(info.previous_since, checkpoint);
    assert!(!info.prev_batch.is_empty());
    assert_eq!(
        bodies_in(&events, &room),
        expected_bodies("absent", 500)[490..].to_vec(),
        "only the timeline's 10"
    );
    assert!(time_to_close(&service) < Duration::from_secs(1));
}

#[test]
fn a_homeserver_restart_mid_stream_loses_and_duplicates_nothing() {
    let mut synapse = Synapse::start();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "steady", "restarter");
    let mut config = config_for(&alice);
    config.backoff = BackoffPolicy::default().with_max(Duration::from_secs(1));
    let service = start(config).expect("valid config");
    drain_until_live(&service);

    for i in 0..50 {
        bob.send_text(&room, &format!("stream {i}"));
    }
    synapse.kill();
    thread::sleep(Duration::from_millis(500));
    synapse.restart();
    for i in 50..100 {
        bob.send_text(&room, &format!("stream {i}"));
    }
    let events = collect_until(&service, Duration::from_secs(90), |e| {
        bodies_in(e, &room).len() >= 100
    });
    assert_eq!(bodies_in(&events, &room), expected_bodies("stream", 100));
    // Nothing more turns up afterwards (no late duplicates).
    thread::sleep(Duration::from_millis(500));
    let mut late = Vec::new();
    while let Ok(e) = service.events().try_recv() {
        late.push(e);
    }
    assert!(
        bodies_in(&late, &room).is_empty(),
        "late duplicates: {late:?}"
    );
    assert!(time_to_close(&service) < Duration::from_secs(1));
}

// ---- the tail example, killed and restarted ----------------------------------------------

struct TailRun {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

fn spawn_tail(account: &Account, since_file: &Path) -> TailRun {
    let mut child = Command::new(tail_binary())
        .args([
            "--homeserver",
            account.base_url(),
            "--timeline-limit",
            "5",
            "--since-file",
        ])
        .arg(since_file)
        .env("MATRIX_ACCESS_TOKEN", &account.access_token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail starts");
    let lines = json_lines(child.stdout.take().unwrap());
    TailRun { child, lines }
}

fn message_id(line: &Value, room: &str) -> Option<String> {
    (line["kind"] == "message" && line["room_id"] == room)
        .then(|| line["event_id"].as_str().unwrap().to_owned())
}

#[test]
fn tail_killed_three_times_loses_nothing_and_repeats_only_the_batch_in_flight() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "tailed", "poster");
    let dir = std::env::temp_dir().join(format!("tail-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let since_file = dir.join("since");

    let mut run = spawn_tail(&alice, &since_file);
    thread::sleep(Duration::from_secs(1));
    let (sent_tx, sent_rx) = mpsc::channel();
    let sender = {
        let (bob, room) = (bob.clone(), room.clone());
        thread::spawn(move || {
            for i in 0..300 {
                sent_tx
                    .send(bob.send_text(&room, &format!("tailed {i}")))
                    .unwrap();
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let mut runs: Vec<Vec<Value>> = Vec::new();
    let mut current = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let kill_points = [60usize, 150, 240];
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < 300 {
        assert!(Instant::now() < deadline, "only {} of 300 seen", seen.len());
        if let Ok(line) = run.lines.recv_timeout(Duration::from_millis(100)) {
            if let Some(id) = message_id(&line, &room) {
                seen.insert(id);
            }
            current.push(line);
        }
        if runs.len() < kill_points.len() && seen.len() >= kill_points[runs.len()] {
            run.child.kill().unwrap(); // SIGKILL
            run.child.wait().unwrap();
            while let Ok(line) = run.lines.recv_timeout(Duration::from_millis(200)) {
                current.push(line);
            }
            for line in &current {
                if let Some(id) = message_id(line, &room) {
                    seen.insert(id);
                }
            }
            runs.push(std::mem::take(&mut current));
            run = spawn_tail(&alice, &since_file);
        }
    }
    sender.join().unwrap();
    let sent: Vec<String> = sent_rx.try_iter().collect();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(run.child.id().to_string())
        .status();
    let status = run.child.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    while let Ok(line) = run.lines.recv_timeout(Duration::from_millis(200)) {
        current.push(line);
    }
    runs.push(current);
    assert_eq!(runs.len(), 4, "three kills, four runs");

    let union: HashSet<String> = runs
        .iter()
        .flatten()
        .filter_map(|l| message_id(l, &room))
        .collect();
    let sent_set: HashSet<String> = sent.iter().cloned().collect();
    assert_eq!(union, sent_set, "the union of the outputs holds all 300");

    // A duplicate may only come from the end of the previous run: the batch whose checkpoint
    // was not yet stored when it was killed (everything after its second-to-last checkpoint).
    let mut duplicates = 0;
    for k in 1..runs.len() {
        let earlier: HashMap<String, usize> = runs[..k]
            .iter()
            .flatten()
            .filter_map(|l| message_id(l, &room))
            .map(|id| (id, 0))
            .collect();
        let previous = &runs[k - 1];
        let checkpoints: Vec<usize> = previous
            .iter()
            .enumerate()
            .filter(|(_, l)| l["kind"] == "checkpoint")
            .map(|(i, _)| i)
            .collect();
        let unsure_from = checkpoints
            .len()
            .checked_sub(2)
            .map_or(0, |i| checkpoints[i] + 1);
        let in_flight: HashSet<String> = previous[unsure_from..]
            .iter()
            .filter_map(|l| message_id(l, &room))
            .collect();
        for id in runs[k].iter().filter_map(|l| message_id(l, &room)) {
            if earlier.contains_key(&id) {
                duplicates += 1;
                assert!(
                    in_flight.contains(&id),
                    "run {k} repeated {id}, which was not in flight when run {} was killed",
                    k - 1
                );
            }
        }
    }
    // Within one run, nothing repeats.
    for (k, run) in runs.iter().enumerate() {
        let ids: Vec<String> = run.iter().filter_map(|l| message_id(l, &room)).collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "run {k} repeats nothing");
    }
    eprintln!(
        "tail kill test: {} lines over 4 runs, {duplicates} duplicates",
        runs.iter().map(Vec::len).sum::<usize>()
    );
    std::fs::remove_dir_all(&dir).ok();
}
