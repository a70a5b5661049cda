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
