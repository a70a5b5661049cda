//! `tail --e2ee --store DIR` against Synapse and palpo: a decrypted message prints like a
//! plaintext one plus `"encrypted": true`; an undecryptable one says why; the device id comes
//! from `MATRIX_DEVICE_ID`.
//!
//! Needs Synapse and palpo (`scripts/synapse.sh install`, `scripts/palpo.sh install`);
//! without them the test fails loudly.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use matrix_sync_testkit::homeserver::Server;
use serde_json::{json, Value};
use support::client::Account;
use support::e2ee_sender::Sender;
use support::service::tail_binary;

fn tail_prints_decrypted_and_undecryptable_messages(kind: Server) {
    let server = kind.shared();
    let base = server.base_url();
    let ours = Account::register(&base, "bot");
    let alice = Account::register(&base, "alice");
    let store = tempfile::tempdir().unwrap();
    let mut child = Command::new(tail_binary())
        .args(["--homeserver", &base, "--e2ee", "--store"])
        .arg(store.path())
        .env("MATRIX_ACCESS_TOKEN", &ours.access_token)
        .env("MATRIX_DEVICE_ID", &ours.device_id)
        .env_remove("MATRIX_STORE_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let diagnostics = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let (tx, lines) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut until = |what: &str, done: &dyn Fn(&[Value]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "tail: {e} before {what}; saw {seen:#?} (tail is built by \
                     `cargo build --features e2ee --examples`; its stderr follows it out)"
                ),
            }
        }
    };
    until("the first checkpoint", &|s| {
        s.iter().any(|l| l["kind"] == "checkpoint")
    });

    let mut sender = Sender::new(alice);
    let room = sender.encrypted_room_with(&ours);
    let to = [ours.user_id.as_str()];
    let decrypted_id = sender.send_text(&room, &to, "hello, encrypted", None);
    // A message under a fresh room key whose share never goes out.
    sender.discard_room_key(&room);
    let never_sent = sender.share(&room, &to, true);
    assert!(!never_sent.is_empty());
    let undecryptable_id = sender.send_encrypted(
        &room,
        "m.room.message",
        &json!({"msgtype": "m.text", "body": "never decrypted"}),
    );
    let by_id = |s: &[Value], id: &str| s.iter().any(|l| l["event_id"] == id);
    until("both messages", &|s| {
        by_id(s, &decrypted_id) && by_id(s, &undecryptable_id)
    });
    let line = |id: &str| seen.iter().find(|l| l["event_id"] == id).unwrap().clone();
    let decrypted = line(&decrypted_id);
    assert_eq!(decrypted["kind"], "message");
    assert_eq!(decrypted["type"], "m.room.message");
    assert_eq!(decrypted["body"], "hello, encrypted");
    assert_eq!(decrypted["encrypted"], true);
    assert_eq!(decrypted["verification"], "unsigned_device");
    let undecryptable = line(&undecryptable_id);
    assert_eq!(undecryptable["kind"], "encrypted");
    assert_eq!(undecryptable["encrypted"], true);
    assert_eq!(undecryptable["undecryptable"], "missing_room_key");
    assert!(undecryptable["body"].is_null(), "{undecryptable}");

    child.kill().unwrap();
    child.wait().unwrap();
    let stderr = diagnostics.join().unwrap();
    assert!(
        !stderr.contains("hello, encrypted"),
        "no decrypted content in the diagnostics: {stderr}"
    );
}

#[test]
fn tail_prints_decrypted_and_undecryptable_messages_on_synapse() {
    tail_prints_decrypted_and_undecryptable_messages(Server::Synapse);
}

#[test]
fn tail_prints_decrypted_and_undecryptable_messages_on_palpo() {
    tail_prints_decrypted_and_undecryptable_messages(Server::Palpo);
}
