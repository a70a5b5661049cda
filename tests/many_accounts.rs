//! The `many_accounts` example (one thread, one poll loop, one `SyncMachine` per account)
//! against a real homeserver (Synapse and palpo) with 50 accounts in one room: every message
//! reaches every account once and in order, and SIGTERM ends the process within 200 ms. The same with 10 accounts
//! over `https`, through the test kit's TLS terminator, its CA given with `--ca-file`; and
//! without the CA every account is refused as a TLS failure.
//!
//! On palpo the example talks to palpo through a recording proxy, and each account must get
//! exactly the messages palpo's own `/sync` stream gave it (palpo can skip a message for an
//! account whose sync ran while the message was being written: see
//! `support::palpo_stream`); every message it lacks must be one palpo skipped, shown by
//! replaying palpo's `/sync` from the same `since`.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_testkit::example::example_binary;
use matrix_sync_testkit::homeserver::{Options, Server};
use matrix_sync_testkit::parallel::parallel;
use matrix_sync_testkit::tls::TlsTerminator;
use serde_json::Value;
use support::client::Account;
use support::palpo_stream::Stream;

const ACCOUNTS: usize = 50;
const TLS_ACCOUNTS: usize = 10;
const MESSAGES: usize = 5;
/// The bound from SIGTERM to the process having exited.
const STOP_BOUND: Duration = Duration::from_millis(200);

/// How to build the example this test runs.
const BUILD: &str = "run `cargo build --examples` (a full `cargo test` builds it)";

/// Registers `n` accounts, a few at a time.
fn register(base: &str, n: usize) -> Vec<Account> {
    parallel(n, 4, |_| Account::register(base, "many"))
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<Value>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Running {
    /// The next stdout line, failing the test after `deadline`.
    fn next(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        match self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => line,
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!(
                    "no line ({e}) while waiting for {waiting_for}; stderr:\n{}",
                    stderr.unwrap_or_default()
                );
            }
        }
    }
}

fn spawn(base: &str, tokens: &Path, extra: &[&str]) -> Running {
    let mut child = Command::new(example_binary("many_accounts", BUILD))
        .args(["--homeserver", base, "--tokens"])
        .arg(tokens)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn many_accounts");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("stdout of many_accounts");
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Running {
        child,
        lines,
        stderr: Some(stderr),
    }
}

#[test]
fn fifty_accounts_on_one_thread_get_every_message_once_in_order_and_stop_within_200_ms_on_synapse()
{
    every_message_once_in_order_and_a_quick_stop(Server::Synapse, ACCOUNTS, false);
}

#[test]
fn fifty_accounts_on_one_thread_get_every_message_palpos_sync_stream_has_once_in_order_and_stop_within_200_ms_on_palpo(
) {
    every_message_once_in_order_and_a_quick_stop(Server::Palpo, ACCOUNTS, false);
}

#[test]
fn over_https_ten_accounts_get_every_message_once_in_order_and_without_the_ca_none_starts_on_synapse(
) {
    every_message_once_in_order_and_a_quick_stop(Server::Synapse, TLS_ACCOUNTS, true);
}

#[test]
fn over_https_ten_accounts_get_every_message_palpos_sync_stream_has_once_in_order_and_without_the_ca_none_starts_on_palpo(
) {
    every_message_once_in_order_and_a_quick_stop(Server::Palpo, TLS_ACCOUNTS, true);
}

/// `n` accounts in one room, the example following them all (over `https` through a TLS
/// terminator if `tls`), messages sent, then SIGTERM. On palpo through a recording proxy,
/// each account's messages checked against palpo's own `/sync` stream to it.
fn every_message_once_in_order_and_a_quick_stop(server: Server, n: usize, tls: bool) {
    let homeserver = server.start_with(Options::new().quick_passwords());
    let base = homeserver.base_url();
    let sender = Account::register(&base, "sender");
    let accounts = register(&base, n);
    let ids: Vec<&str> = accounts.iter().map(|a| a.user_id.as_str()).collect();
    let room = sender.create_room(&ids);
    thread::scope(|scope| {
        for chunk in accounts.chunks(n.div_ceil(4)) {
            let room = &room;
            scope.spawn(move || chunk.iter().for_each(|a| a.join(room)));
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let text: String = accounts
        .iter()
        .map(|a| format!("{}\n", a.access_token))
        .collect();
    std::fs::write(&tokens, text).unwrap();

    let stream = Stream::on(server, homeserver.port());
    let (plain_url, upstream_port) = match &stream {
        Some(stream) => (stream.url(), stream.port()),
        None => (base.clone(), homeserver.port()),
    };
    let terminator = tls.then(|| TlsTerminator::start(upstream_port));
    let ca_file = dir.path().join("ca.pem");
    let (url, extra) = match &terminator {
        Some(terminator) => {
            std::fs::write(&ca_file, terminator.ca_pem()).unwrap();
            let extra = vec!["--ca-file", ca_file.to_str().unwrap()];
            (terminator.base_url(), extra)
        }
        None => (plain_url, Vec::new()),
    };
    let mut running = spawn(&url, &tokens, &extra);
    let expected: HashSet<String> = accounts.iter().map(|a| a.user_id.clone()).collect();
    let mut per_account: HashMap<String, Vec<Value>> = HashMap::new();
    let mut synced = HashSet::new();

    // Every account finishes its initial sync: its first checkpoint (the machine is live once
    // the catch-up batch is handed on; the checkpoint's own `live` flag starts with the next).
    let deadline = Instant::now() + Duration::from_secs(120);
    while synced.len() < n {
        let line = running.next(deadline, "every account's first checkpoint");
        let account = line["account"]
            .as_str()
            .expect("every line names its account");
        assert!(expected.contains(account), "unknown account in {line}");
        if line["kind"] == "checkpoint" {
            synced.insert(account.to_owned());
        }
        per_account
            .entry(account.to_owned())
            .or_default()
            .push(line);
    }

    // Then the messages, each to every account.
    let sent: Vec<String> = (0..MESSAGES)
        .map(|i| sender.send_text(&room, &format!("message {i}")))
        .collect();
    let messages_of = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["kind"] == "message" && l["room_id"] == room.as_str())
            .map(|l| l["event_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let by_id: HashMap<&str, &Account> = accounts.iter().map(|a| (a.user_id.as_str(), a)).collect();
    // On palpo, the (account, message) pairs palpo's own stream skipped.
    // With the answer (`since`, `next_batch`) that went past the message without it.
    let mut skipped: HashMap<(String, String), (Option<u64>, u64)> = HashMap::new();
    let mut complete = |per_account: &HashMap<String, Vec<Value>>| {
        expected.iter().all(|a| {
            let got = per_account
                .get(a)
                .map(|lines| messages_of(lines))
                .unwrap_or_default();
            sent.iter().all(|m| {
                got.contains(m)
                    || skipped.contains_key(&(a.clone(), m.clone()))
                    || stream.as_ref().is_some_and(|stream| {
                        match stream.skipped(by_id[a.as_str()], &room, m) {
                            Some(batch) => {
                                skipped.insert(
                                    (a.clone(), m.clone()),
                                    (batch.since, batch.next_batch),
                                );
                                true
                            }
                            None => false,
                        }
                    })
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !complete(&per_account) {
        // Lines as they come; between them (on palpo) another look at palpo's stream.
        let line = match running.lines.recv_timeout(Duration::from_millis(250)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
            Err(_) => running.next(deadline, "every message at every account"),
        };
        let account = line["account"].as_str().unwrap().to_owned();
        per_account.entry(account).or_default().push(line);
    }
    // A while longer, for anything delivered twice.
    let linger = Instant::now() + Duration::from_secs(2);
    while let Ok(line) = running
        .lines
        .recv_timeout(linger.saturating_duration_since(Instant::now()))
    {
        let account = line["account"].as_str().unwrap().to_owned();
        per_account.entry(account).or_default().push(line);
    }

    // A stop ends it within the bound.
    let signalled = Instant::now();
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    assert_eq!(
        unsafe { libc::kill(running.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(10) {
            let _ = running.child.kill();
            panic!("many_accounts did not exit within 10 s of SIGTERM");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stopped_in = signalled.elapsed();
    let stderr = running.stderr.take().unwrap().join().unwrap();
    while let Ok(line) = running.lines.recv_timeout(Duration::from_secs(1)) {
        let account = line["account"].as_str().unwrap().to_owned();
        per_account.entry(account).or_default().push(line);
    }
    assert!(status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stopped_in <= STOP_BOUND,
        "SIGTERM to exit took {stopped_in:?}, more than {STOP_BOUND:?}"
    );

    assert_eq!(per_account.len(), n, "accounts seen; stderr:\n{stderr}");
    for (account, lines) in &per_account {
        let expected_messages: Vec<String> = match &stream {
            None => sent.clone(),
            Some(stream) => {
                let token = &by_id[account.as_str()].access_token;
                stream.assert_since_chain(token, account, &room);
                sent.iter()
                    .filter(|m| stream.delivered(token, &room, m))
                    .cloned()
                    .collect()
            }
        };
        assert_eq!(
            messages_of(lines),
            expected_messages,
            "{account}: the messages (on palpo: those palpo's stream gave it), once each, in \
             the order sent"
        );
        let mut seen = HashSet::new();
        for line in lines {
            if let Some(id) = line["event_id"].as_str() {
                assert!(seen.insert(id), "{account}: {id} delivered twice");
            }
            for key in ["kind", "type"] {
                assert!(line.get(key).is_some(), "{account}: no {key:?} in {line}");
            }
            if line["kind"] == "message" {
                for key in ["room_id", "event_id", "sender", "origin_server_ts", "body"] {
                    assert!(line.get(key).is_some(), "{account}: no {key:?} in {line}");
                }
            }
        }
    }
    if stream.is_some() {
        // Every message an account lacks is one palpo's stream skipped (proved by replay),
        // and every message reached some account.
        for (account, lines) in &per_account {
            let got = messages_of(lines);
            for m in sent.iter().filter(|m| !got.contains(m)) {
                assert!(
                    skipped.contains_key(&(account.clone(), m.clone())),
                    "{account}: {m} missing, yet palpo's stream did not skip it"
                );
            }
        }
        for m in &sent {
            assert!(
                per_account
                    .values()
                    .any(|lines| messages_of(lines).contains(m)),
                "{m} reached no account"
            );
        }
        eprintln!(
            "palpo's stream skipped {} of {} (account, message) pairs (with the answer's \
             since and next_batch): {skipped:?}",
            skipped.len(),
            n * MESSAGES
        );
    }
    assert!(
        !stderr.contains(" error: "),
        "no sync error was expected; stderr:\n{stderr}"
    );
    if let Some(terminator) = terminator {
        assert!(
            terminator.handshakes() >= n,
            "{} TLS handshakes for {n} accounts",
            terminator.handshakes()
        );
        assert_eq!(terminator.refused(), 0);
        without_the_ca_every_account_is_refused_as_tls(&terminator, &tokens, n);
    }
}

/// The same `https` homeserver with the bundled roots alone: every account's whoami fails
/// as a TLS failure, and with no account left the example exits with 1.
fn without_the_ca_every_account_is_refused_as_tls(
    terminator: &TlsTerminator,
    tokens: &Path,
    n: usize,
) {
    let output = Command::new(example_binary("many_accounts", BUILD))
        .args(["--homeserver", &terminator.base_url(), "--tokens"])
        .arg(tokens)
        .stdin(Stdio::null())
        .output()
        .expect("run many_accounts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    let refused = stderr
        .lines()
        .filter(|l| l.contains("whoami failed, left out: Tls"))
        .count();
    assert_eq!(refused, n, "stderr:\n{stderr}");
    assert!(stderr.contains("no account left"), "stderr:\n{stderr}");
    assert!(output.stdout.is_empty());
}
