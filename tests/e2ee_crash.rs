//! Item 3 of the E2EE tests: a process killed with SIGKILL after a batch that carried a room
//! key was received, but before that batch's checkpoint reached the consumer, keeps the key.
//!
//! A test without the libtest harness: the binary is the parent test, and also (with
//! `E2EE_CRASH_CHILD` set) the child it runs and kills: the encrypted driver on an SQLite
//! crypto store, printing one JSON line per event, and stopping to take events (stalling)
//! after the first to-device event. The driver goes on without its consumer: it has already
//! written the batch's key to the store and sends the next sync, which lets the server delete
//! the to-device messages of that batch. Then the child is killed, and a new child resumes
//! from the checkpoint before that batch: the server has no to-device message for it any
//! more, so the messages can only decrypt with the key from the store.
//!
//! Runs against Synapse, then palpo (`scripts/synapse.sh install`, `scripts/palpo.sh
//! install`); without either the test fails loudly.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use matrix_sync_service::e2ee::Encryption;
use matrix_sync_service::{
    start_encrypted, Config, CryptoStore, DriverConfig, E2eeConfig, EventKind,
};
use matrix_sync_testkit::homeserver::Server;
use serde_json::{json, Value};
use support::client::Account;
use support::e2ee_sender::Sender;

const CHILD: &str = "E2EE_CRASH_CHILD";
const WITHIN: Duration = Duration::from_secs(120);

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    for server in Server::ALL {
        let started = Instant::now();
        sigkill_between_a_room_key_and_its_checkpoint(server);
        println!(
            "test sigkill_between_a_room_key_and_its_checkpoint_on_{server} ... ok ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The child: the encrypted driver, one JSON line per event on stdout.
fn child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let mut config = Config::new(var("HOMESERVER"), var("TOKEN"));
    config.since = std::env::var("SINCE").ok();
    let e2ee = E2eeConfig::new(CryptoStore::Sqlite {
        dir: var("STORE").into(),
        passphrase: None,
    })
    .with_ids(
        var("USER_ID").try_into().unwrap(),
        var("DEVICE_ID").as_str().into(),
    );
    let stall = std::env::var_os("STALL_ON_TO_DEVICE").is_some();
    let service = start_encrypted(config, DriverConfig::default(), e2ee).expect("start");
    let mut out = std::io::stdout().lock();
    for event in service.events() {
        let line = json!({
            "kind": event.kind.name(),
            "event_id": event.event_id.as_ref().map(|e| e.as_str()),
            "room_id": event.room_id.as_ref().map(|r| r.as_str()),
            "body": event.body,
            "decrypted": matches!(event.encryption.as_deref(), Some(Encryption::Decrypted(_))),
            "next_batch": match &event.kind {
                EventKind::Checkpoint(c) => Some(c.next_batch.as_str()),
                _ => None,
            },
        });
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
        if stall && event.kind == EventKind::ToDevice {
            writeln!(out, "{}", json!({"stalled": true})).unwrap();
            out.flush().unwrap();
            // Takes no more events: this batch's checkpoint never reaches the consumer.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Running {
    fn start(ours: &Account, store: &std::path::Path, since: Option<&str>, stall: bool) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .env(CHILD, "1")
            .env("HOMESERVER", ours.base_url())
            .env("TOKEN", &ours.access_token)
            .env("USER_ID", &ours.user_id)
            .env("DEVICE_ID", &ours.device_id)
            .env("STORE", store)
            .env_remove("SINCE")
            .env_remove("STALL_ON_TO_DEVICE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(since) = since {
            command.env("SINCE", since);
        }
        if stall {
            command.env("STALL_ON_TO_DEVICE", "1");
        }
        let mut child = command.spawn().expect("spawn the child");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("child line {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until `done` holds for what was seen (since the start).
    fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + WITHIN;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("child: {e} before {what}; saw {:#?}", self.seen),
            }
        }
    }

    fn last_checkpoint(&self) -> Option<String> {
        self.seen
            .iter()
            .rev()
            .find_map(|l| l["next_batch"].as_str().map(str::to_owned))
    }
}

fn sigkill_between_a_room_key_and_its_checkpoint(kind: Server) {
    let server = kind.shared();
    let base = server.base_url();
    let ours = Account::register(&base, "bot");
    let alice = Account::register(&base, "alice");
    let store = tempfile::tempdir().unwrap();

    // 1. A first run until our keys are up (the first checkpoint) and we are in the room.
    let mut first = Running::start(&ours, store.path(), None, true);
    first.until("the first checkpoint", |s| {
        s.iter().any(|l| l["kind"] == "checkpoint")
    });
    let mut sender = Sender::new(alice);
    let room = sender.encrypted_room_with(&ours);
    let joined = |s: &[Value]| {
        s.iter()
            .position(|l| l["kind"] == "member" && l["room_id"] == room.as_str())
            .is_some_and(|at| s[at..].iter().any(|l| l["kind"] == "checkpoint"))
    };
    first.until("the join", joined);
    let before_key = first.last_checkpoint().unwrap();

    // 2. The room key arrives (to-device); the child stalls before that batch's checkpoint.
    let to = [ours.user_id.as_str()];
    sender.prepare(&room, &to, false);
    first.until("the stall", |s| s.iter().any(|l| l["stalled"] == true));
    assert_eq!(
        first.last_checkpoint().as_deref(),
        Some(before_key.as_str()),
        "the key's batch has no checkpoint at the consumer"
    );
    // Messages that need that key, while the child's driver long-polls past the key's batch.
    let mut ids = Vec::new();
    for i in 0..3 {
        let content = json!({"msgtype": "m.text", "body": format!("after the key {i}")});
        ids.push(sender.send_encrypted(&room, "m.room.message", &content));
    }
    // Give the driver time to send its next sync (since past the key's batch: the server
    // deletes the to-device messages) and to receive the messages.
    std::thread::sleep(Duration::from_secs(3));
    first.child.kill().expect("SIGKILL");
    first.child.wait().unwrap();

    // 3. Restart from the checkpoint before the key: the key is in the store.
    let mut second = Running::start(&ours, store.path(), Some(&before_key), false);
    let decrypted = |s: &[Value]| {
        s.iter()
            .filter(|l| l["room_id"] == room.as_str() && l["decrypted"] == true)
            .count()
    };
    second.until("three decrypted messages", |s| decrypted(s) >= 3);
    second.until("their checkpoint", |s| {
        s.iter()
            .rposition(|l| l["decrypted"] == true)
            .is_some_and(|at| s[at..].iter().any(|l| l["kind"] == "checkpoint"))
    });
    let bodies: Vec<&str> = second
        .seen
        .iter()
        .filter(|l| l["room_id"] == room.as_str() && l["decrypted"] == true)
        .map(|l| l["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["after the key 0", "after the key 1", "after the key 2"]
    );
    let to_device = second
        .seen
        .iter()
        .filter(|l| l["kind"] == "to_device")
        .count();
    assert_eq!(
        to_device, 0,
        "the server sent the to-device key again, so this run proves nothing about the store"
    );
    let undecryptable = second
        .seen
        .iter()
        .filter(|l| l["kind"] == "encrypted")
        .count();
    assert_eq!(undecryptable, 0, "{:#?}", second.seen);
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}
