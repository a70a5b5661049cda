//! `tail --sliding-sync` and `tail --sliding-sync auto` against a real Synapse: events as JSON
//! lines, the since file holding the sliding sync position, a restart from it that loses and
//! repeats nothing, and a `/v3/sync` token refused by forced sliding sync (exit 2).
#![cfg(target_os = "linux")]

mod support;

use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use matrix_sync_service::SlidingPosition;
use serde_json::Value;
use support::client::room_of_two;
use support::service::{json_lines, tail_binary, Tail};
use support::synapse::Synapse;

/// Lines until `done` holds of them (and a checkpoint follows), or panics after 60 s.
fn lines_until(lines: &Receiver<Value>, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut satisfied = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("tail's lines ended ({e}); got {seen:#?}"));
        seen.push(line);
        satisfied = satisfied || done(&seen);
        if satisfied && seen.last().is_some_and(|l| l["kind"] == "checkpoint") {
            return seen;
        }
    }
}

fn bodies(lines: &[Value], room: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["kind"] == "message" && l["room_id"] == room)
        .map(|l| l["body"].as_str().unwrap().to_owned())
        .collect()
}

fn tail(base_url: &str, token: &str, since_file: &std::path::Path, mode: &[&str]) -> Command {
    let mut command = Command::new(tail_binary());
    command
        .args([
            "--homeserver",
            base_url,
            "--timeout-ms",
            "2000",
            "--since-file",
        ])
        .arg(since_file)
        .args(mode)
        .env("MATRIX_ACCESS_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

#[test]
fn tail_sliding_sync_stores_the_pair_and_resumes_from_it() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "tailer", "sender");
    let dir = tempfile::tempdir().unwrap();
    let since_file = dir.path().join("since");

    let mut first = Tail::spawn(&mut tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &["--sliding-sync"],
    ));
    let lines = json_lines(first.0.stdout.take().unwrap());
    for i in 0..5 {
        bob.send_text(&room, &format!("first {i}"));
    }
    let seen = lines_until(&lines, |l| bodies(l, &room).len() >= 5);
    assert_eq!(
        bodies(&seen, &room),
        (0..5).map(|i| format!("first {i}")).collect::<Vec<_>>()
    );
    assert!(seen.iter().any(|l| l["kind"] == "list_update"));
    let (status, _) = first.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let stored = std::fs::read_to_string(&since_file).unwrap();
    let position = SlidingPosition::from_token(stored.trim_end()).expect("a sliding position");
    assert!(position.pos.is_some(), "{stored}");

    for i in 0..5 {
        bob.send_text(&room, &format!("second {i}"));
    }
    // `auto` goes on with the protocol of the stored checkpoint.
    let mut second = Tail::spawn(&mut tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &["--sliding-sync", "auto"],
    ));
    let lines = json_lines(second.0.stdout.take().unwrap());
    let seen = lines_until(&lines, |l| bodies(l, &room).len() >= 5);
    assert_eq!(
        bodies(&seen, &room),
        (0..5).map(|i| format!("second {i}")).collect::<Vec<_>>(),
        "nothing lost, nothing repeated"
    );
    assert!(!seen.iter().any(|l| l["kind"] == "connection_reset"));
    let (status, _) = second.signal(libc::SIGINT);
    assert_eq!(status.code(), Some(0));
    let stored = std::fs::read_to_string(&since_file).unwrap();
    assert!(SlidingPosition::from_token(stored.trim_end()).is_some());
}

#[test]
fn forced_sliding_sync_refuses_a_v3_since_file_with_exit_2() {
    let synapse = Synapse::shared();
    let (alice, _bob, _room) = room_of_two(&synapse.base_url(), "refuser", "sender");
    let dir = tempfile::tempdir().unwrap();
    let since_file = dir.path().join("since");
    std::fs::write(&since_file, "s72594_4483_1934\n").unwrap();
    let mut command = tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &["--sliding-sync"],
    );
    let out = command.stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a sliding sync checkpoint"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Lines read from `reader` until the first checkpoint line.
fn read_to_checkpoint(reader: &mut impl std::io::BufRead) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("tail's stdout");
        assert!(n > 0, "tail's stdout ended before a checkpoint: {seen:#?}");
        let value: Value = serde_json::from_str(&line).expect("a JSON line");
        let done = value["kind"] == "checkpoint";
        seen.push(value);
        if done {
            return seen;
        }
    }
}

#[test]
fn to_device_messages_survive_a_sigkill_between_the_answer_and_the_checkpoint() {
    let synapse = Synapse::shared();
    let (alice, bob, room) = room_of_two(&synapse.base_url(), "killed", "sender");
    let dir = tempfile::tempdir().unwrap();
    let since_file = dir.path().join("since");
    let mode = ["--sliding-sync", "--timeline-limit", "1000"];

    // A first run stores a checkpoint, and stops.
    let mut first = Tail::spawn(&mut tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &mode,
    ));
    let mut reader = std::io::BufReader::new(first.0.stdout.take().unwrap());
    read_to_checkpoint(&mut reader);
    let (status, _) = first.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let stored = std::fs::read_to_string(&since_file).unwrap();
    assert!(SlidingPosition::from_token(stored.trim_end()).is_some());

    // Offline: a to-device message and more than a pipe holds of messages, so that the next
    // run's first batch cannot be written out before its checkpoint.
    bob.send_to_device(
        "m.test",
        &alice.user_id,
        &alice.device_id,
        &serde_json::json!({"secret": "kept"}),
    );
    let filler = "x".repeat(1000);
    for i in 0..150 {
        bob.send_text(&room, &format!("{i} {filler}"));
    }

    // The second run gets the batch and blocks writing it (nobody reads): killed there.
    let mut second = Tail::spawn(&mut tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &mode,
    ));
    second.wait_until_blocked_writing("the batch");
    // SAFETY: kill takes two integers; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(second.pid(), libc::SIGKILL) }, 0);
    assert!(second.wait_exit(Duration::from_secs(5)).is_some());
    assert_eq!(
        std::fs::read_to_string(&since_file).unwrap(),
        stored,
        "the batch's checkpoint was never stored"
    );

    // No sync went out after the answer (tail acknowledges stored checkpoints): Synapse
    // still holds the message.
    let (inbox, _) = matrix_sync_testkit::synapse_db::execute(
        synapse,
        "SELECT stream_id FROM device_inbox WHERE user_id = ? AND device_id = ?",
        &[
            serde_json::json!(alice.user_id),
            serde_json::json!(alice.device_id),
        ],
    );
    assert_eq!(
        inbox.len(),
        1,
        "the to-device message is still on the server"
    );
    // The third run gets the to-device message again, and every message.
    let mut third = Tail::spawn(&mut tail(
        &synapse.base_url(),
        &alice.access_token,
        &since_file,
        &mode,
    ));
    let lines = json_lines(third.0.stdout.take().unwrap());
    let seen = lines_until(&lines, |l| {
        bodies(l, &room).len() >= 150 && l.iter().any(|l| l["kind"] == "to_device")
    });
    let to_device = seen.iter().filter(|l| l["kind"] == "to_device").count();
    assert_eq!(to_device, 1, "the to-device message, once in this run");
    let expected: Vec<String> = (0..150).map(|i| format!("{i} {filler}")).collect();
    assert_eq!(bodies(&seen, &room), expected);
    let (status, _) = third.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
}
