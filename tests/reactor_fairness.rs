//! The reactor's head-of-line test: one slow or hostile account never delays another.
//!
//! Ten accounts on a real homeserver (Synapse and palpo), in one room. A control run measures
//! how long a message takes to reach all ten through a reactor following only them. Then a
//! second reactor follows the same ten plus two hostile accounts whose "homeserver" is a
//! loopback server of this test: one trickles its answer one byte a second, the other accepts and never answers. The
//! same measurement must stay within a generous multiple of the control (a loop blocked by
//! the trickle would take tens of seconds: the trickled answer is long). Then the trickling
//! account is removed: its `Stopped` state comes, its socket is closed (the trickler's
//! writes fail), it is reported ended, and the key can be added again.
//!
//! On palpo the reactors talk to palpo through a recording proxy, and a message counts as
//! delivered to an account when the account has it or palpo's own `/sync` stream skipped it
//! for that account (palpo can: see `support::palpo_stream`), shown by replaying palpo's
//! `/sync` from the same `since`; every message must still reach some account, and every
//! message palpo's stream gave an account must reach it.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::reactor::{self, AccountCommandError, AddError, Reactor, ReactorConfig};
use matrix_sync_service::{Config, EventKind, SyncState};
use matrix_sync_testkit::homeserver::{Options, Server};
use matrix_sync_testkit::parallel::parallel;
use support::client::Account;
use support::palpo_stream::Stream;

const ACCOUNTS: usize = 10;
const MESSAGES: usize = 3;
const TRICKLER: &str = "trickler";
const SILENT: &str = "silent";

/// A loopback "homeserver" that, on every connection, reads the request head and then answers
/// one byte a second (a long answer: minutes of it), or nothing at all.
struct Hostile {
    url: String,
    /// Bytes sent so far, over every connection.
    sent: Arc<AtomicUsize>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// A write failed: the client closed the connection.
    closed_by_client: Arc<AtomicBool>,
}

impl Hostile {
    fn start(trickle: bool) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_client = Arc::new(AtomicBool::new(false));
        let (s, a, c) = (sent.clone(), accepted.clone(), closed_by_client.clone());
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                a.fetch_add(1, Ordering::SeqCst);
                let (s, c) = (s.clone(), c.clone());
                thread::spawn(move || serve(stream, trickle, &s, &c));
            }
        });
        Hostile {
            url,
            sent,
            accepted,
            closed_by_client,
        }
    }
}

fn serve(mut stream: TcpStream, trickle: bool, sent: &AtomicUsize, closed: &AtomicBool) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    if !trickle {
        // Hold the connection open, answering nothing, until the client closes it.
        let _ = stream.read(&mut byte);
        return;
    }
    let body = format!("{{\"next_batch\":\"s1\",\"pad\":\"{}\"}}", "x".repeat(600));
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for b in answer.bytes() {
        if stream.write_all(&[b]).is_err() {
            closed.store(true, Ordering::SeqCst);
            return;
        }
        sent.fetch_add(1, Ordering::SeqCst);
        thread::sleep(Duration::from_secs(1));
    }
}

fn config(homeserver: &str, token: &str, seed: u64) -> Config {
    let mut config = Config::new(homeserver, token);
    config.long_poll_timeout = Duration::from_secs(30);
    config.jitter_seed = seed;
    config
}

/// Waits until every account in `keys` has had its first checkpoint.
fn until_synced(reactor: &Reactor<String>, keys: &HashSet<String>) {
    let mut synced = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while synced.len() < keys.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let tagged = reactor
            .events()
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("{} of {} synced: {e}", synced.len(), keys.len()));
        assert!(
            keys.contains(&tagged.account),
            "an event of {} (only the homeserver's accounts have any): {:?}",
            tagged.account,
            tagged.event.kind
        );
        if matches!(tagged.event.kind, EventKind::Checkpoint(_)) {
            synced.insert(tagged.account);
        }
    }
}

/// Sends `MESSAGES` messages one after the other, each once every account has the previous
/// one; returns the slowest send-to-all-delivered time. On palpo (`stream`), an account
/// whose `/sync` stream palpo made skip the message counts as done (see the module docs).
fn slowest_delivery(
    reactor: &Reactor<String>,
    accounts: &HashMap<String, &Account>,
    sender: &Account,
    room: &str,
    stream: Option<&Stream>,
) -> Duration {
    let keys: HashSet<&String> = accounts.keys().collect();
    let mut slowest = Duration::ZERO;
    for i in 0..MESSAGES {
        let sent_at = Instant::now();
        let event_id = sender.send_text(room, &format!("fairness {i}"));
        let mut got = HashSet::new();
        let mut skipped = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while got.len() + skipped.len() < keys.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = match stream {
                Some(_) => left.min(Duration::from_millis(250)),
                None => left,
            };
            let tagged = match reactor.events().recv_timeout(wait) {
                Ok(tagged) => tagged,
                Err(_) if Instant::now() < deadline => {
                    // On palpo: which of the others did palpo's stream skip it for?
                    if let Some(stream) = stream {
                        for (key, account) in accounts {
                            if got.contains(key) || skipped.contains(key) {
                                continue;
                            }
                            if let Some(batch) = stream.skipped(account, room, &event_id) {
                                eprintln!(
                                    "message {i}: palpo's stream skipped it for {key}: \
                                     since {:?}, next_batch {}",
                                    batch.since, batch.next_batch
                                );
                                skipped.insert(key.clone());
                            }
                        }
                    }
                    continue;
                }
                Err(e) => panic!(
                    "message {i}: {} of {} accounts ({} skipped by palpo's stream): {e}",
                    got.len(),
                    keys.len(),
                    skipped.len()
                ),
            };
            assert!(
                keys.contains(&tagged.account),
                "an event of {}",
                tagged.account
            );
            let event = &tagged.event;
            if event.kind == EventKind::Message
                && event.event_id.as_ref().map(|e| e.as_str()) == Some(event_id.as_str())
            {
                assert!(
                    !skipped.contains(&tagged.account),
                    "{}: palpo's stream skipped it, yet it came",
                    tagged.account
                );
                assert!(got.insert(tagged.account), "delivered twice");
            }
        }
        assert!(!got.is_empty(), "message {i} reached no account");
        if let Some(stream) = stream {
            for key in &skipped {
                assert!(!stream.delivered(&accounts[key].access_token, room, &event_id));
            }
        }
        slowest = slowest.max(sent_at.elapsed());
    }
    slowest
}

fn a_trickling_and_a_silent_account_delay_no_other_and_the_trickler_can_be_removed(server: Server) {
    let homeserver = server.start_with(Options::new().quick_passwords());
    let base = homeserver.base_url();
    let sender = Account::register(&base, "sender");
    let accounts = parallel(ACCOUNTS, 4, |_| Account::register(&base, "fair"));
    let ids: Vec<&str> = accounts.iter().map(|a| a.user_id.as_str()).collect();
    let room = sender.create_room(&ids);
    parallel(ACCOUNTS, 4, |i| accounts[i].join(&room));
    let keys: HashSet<String> = accounts.iter().map(|a| a.user_id.clone()).collect();
    let by_key: HashMap<String, &Account> =
        accounts.iter().map(|a| (a.user_id.clone(), a)).collect();
    let stream = Stream::on(server, homeserver.port());
    let url = stream.as_ref().map_or(base.clone(), Stream::url);
    let add_all = |reactor: &Reactor<String>| {
        for (i, account) in accounts.iter().enumerate() {
            let config = config(&url, &account.access_token, i as u64 + 1);
            reactor.add(account.user_id.clone(), config).unwrap();
        }
    };

    // The control: the ten alone.
    let control = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    add_all(&control);
    until_synced(&control, &keys);
    let control_time = slowest_delivery(&control, &by_key, &sender, &room, stream.as_ref());
    control.stop();
    control.join().unwrap();

    // The same ten, with a trickling and a silent account started first.
    let trickler = Hostile::start(true);
    let silent = Hostile::start(false);
    let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    reactor
        .add(TRICKLER.to_owned(), config(&trickler.url, "t", 100))
        .unwrap();
    reactor
        .add(SILENT.to_owned(), config(&silent.url, "s", 101))
        .unwrap();
    let wait = Instant::now() + Duration::from_secs(10);
    while trickler.sent.load(Ordering::SeqCst) == 0 || silent.accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < wait,
            "the hostile servers were never asked"
        );
        thread::sleep(Duration::from_millis(20));
    }
    add_all(&reactor);
    until_synced(&reactor, &keys);
    let with_hostile = slowest_delivery(&reactor, &by_key, &sender, &room, stream.as_ref());
    let trickled = trickler.sent.load(Ordering::SeqCst);
    // Still trickling (its answer is minutes long): the measurement ran beside it.
    assert!(
        !trickler.closed_by_client.load(Ordering::SeqCst),
        "the trickle ended early ({trickled} bytes)"
    );
    // Generous: five times the control, plus a second for a loaded machine. A loop held by
    // the trickle waits a second per byte, the silent one its whole deadline.
    let bound = control_time * 5 + Duration::from_secs(1);
    assert!(
        with_hostile <= bound,
        "with a trickling and a silent account, the slowest delivery took {with_hostile:?}; \
         alone {control_time:?} (bound {bound:?})"
    );
    eprintln!(
        "slowest delivery: {control_time:?} alone, {with_hostile:?} beside the hostile \
         accounts ({trickled} bytes trickled meanwhile)"
    );

    // Per-account stop: the trickler's key is refused again while present, then removed.
    assert!(matches!(
        reactor.add(TRICKLER.to_owned(), config(&trickler.url, "t", 100)),
        Err(AddError::Duplicate)
    ));
    reactor.remove(&TRICKLER.to_owned()).unwrap();
    assert!(matches!(
        reactor.remove(&TRICKLER.to_owned()),
        Err(AccountCommandError::Unknown)
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = reactor
        .ended()
        .recv_timeout(Duration::from_secs(10))
        .expect("the trickler ended");
    assert_eq!(ended, TRICKLER);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let state = reactor
            .states()
            .recv_timeout(left)
            .expect("the trickler's Stopped state");
        if state.account == TRICKLER && state.state == SyncState::Stopped {
            break;
        }
    }
    while !trickler.closed_by_client.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the trickler's connection was not closed"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The others go on: one more message reaches all ten, and the key can be used again.
    let after = slowest_delivery(&reactor, &by_key, &sender, &room, stream.as_ref());
    assert!(after <= bound, "after the removal: {after:?}");
    assert!(reactor.accounts().len() == ACCOUNTS + 1);
    reactor
        .add(TRICKLER.to_owned(), config(&trickler.url, "t", 102))
        .unwrap();
    reactor.stop();
    reactor.join().unwrap();
    if let Some(stream) = &stream {
        for account in &accounts {
            stream.assert_since_chain(&account.access_token, &account.user_id, &room);
        }
    }
    // At the stop every account left ended, each once.
    let ended: HashSet<String> = reactor.ended().try_iter().collect();
    assert_eq!(ended.len(), ACCOUNTS + 2, "{ended:?}");
}

#[test]
fn a_trickling_and_a_silent_account_delay_no_other_and_the_trickler_can_be_removed_on_synapse() {
    a_trickling_and_a_silent_account_delay_no_other_and_the_trickler_can_be_removed(
        Server::Synapse,
    );
}

#[test]
fn a_trickling_and_a_silent_account_delay_no_other_and_the_trickler_can_be_removed_on_palpo() {
    a_trickling_and_a_silent_account_delay_no_other_and_the_trickler_can_be_removed(Server::Palpo);
}
