//! palpo's own `/sync` stream, recorded on the wire, for the palpo variants of the tests
//! that need every message at every long-polling account.
//!
//! palpo 0.0.2 can hand an account a `next_batch` past a message without the message:
//! `sync_v3::sync_events` takes `next_batch` from the global sequence (`curr_sn() + 1`, the
//! sequence's `last_value`), and `room::timeline::get_pdus` silently skips an event whose
//! `events` row (and stream number) exists but whose JSON (`event_datas`) is not written
//! yet. `room::timeline::build_and_append_pdu` writes the `events` row first
//! (`create_hash_and_sign_event`), then in `append_pdu` a private read receipt with a later
//! stream number (one every member's sync returns), then the JSON. A sync computed in
//! between (the second pass of a long-poll, which `routing::client::sync_v3` answers
//! whatever it finds, or a first pass with something else to return, such as that receipt)
//! answers with a `next_batch` past the message and without it; from there on palpo never
//! sends it to that account. Seen: answers from `since=316` to `next_batch=317` without the
//! message numbered 316.
//!
//! So on palpo a test asserts what the library can be held to: every message palpo's stream
//! gave an account is handed on, once and in order, and nothing else; every `since` the
//! library sent is the `next_batch` of palpo's previous answer to it; and every message an
//! account lacks is one palpo itself skipped: an answer to that account from `since=a` to
//! `next_batch=b`, not `limited`, lacks it although the message's stream number (its
//! `/context` starts and ends there) lies between `a` and `b`; or the same `/sync?since=a`,
//! replayed now with the account's token straight to palpo, has it and `/sync?since=b` has
//! not (palpo's stream from there on never carries it).

use std::collections::HashMap;
use std::time::Instant;

use matrix_sync_service::Config;
use matrix_sync_testkit::client::{encode, Account};
use matrix_sync_testkit::homeserver::Server;
use matrix_sync_testkit::proxy::{Answer, FaultPlan, Proxy};
use serde_json::Value;

/// A recording proxy in front of palpo, forwarding everything untouched.
pub struct Stream {
    proxy: Proxy,
    /// Replays already made: (token, since, event id) -> whether the answer had the event.
    replays: std::sync::Mutex<HashMap<(String, u64, String), bool>>,
    /// Stream numbers already asked for: event id -> its number (it never changes).
    positions: std::sync::Mutex<HashMap<String, u64>>,
}

/// One `/sync` answer palpo gave an account.
#[derive(Clone, Debug)]
pub struct Batch {
    /// When the request had arrived.
    pub at: Instant,
    /// The request's `since`, if any.
    pub since: Option<u64>,
    /// The answer's `next_batch`.
    pub next_batch: u64,
    /// The event ids of the room's timeline in the answer, in order.
    pub timeline: Vec<String>,
    /// Whether the room's timeline was `limited`.
    pub limited: bool,
}

impl Stream {
    /// Starts the proxy in front of palpo at `port`, keeping every `/sync` answer.
    pub fn start(port: u16) -> Stream {
        let proxy = Proxy::start(([127, 0, 0, 1], port).into(), FaultPlan::off());
        proxy.keep_answers("/sync");
        Stream {
            proxy,
            replays: Default::default(),
            positions: Default::default(),
        }
    }

    /// On palpo, the proxy in front of it at `port`; `None` on a server whose stream needs
    /// no recording.
    pub fn on(server: Server, port: u16) -> Option<Stream> {
        (server == Server::Palpo).then(|| Stream::start(port))
    }

    /// As [`on`](Self::on), with `config` syncing through the proxy.
    pub fn route(server: Server, port: u16, config: &mut Config) -> Option<Stream> {
        let stream = Stream::on(server, port)?;
        config.homeserver = stream.url();
        Some(stream)
    }

    /// The proxy's base URL, for the library under test.
    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// The proxy's port (for a TLS terminator in front of it).
    pub fn port(&self) -> u16 {
        self.proxy.addr().port()
    }

    /// palpo's successful `/sync` answers to `token`, in order, with `room`'s timeline.
    pub fn batches(&self, token: &str, room: &str) -> Vec<Batch> {
        self.proxy
            .answers()
            .iter()
            .filter(|a| a.bearer.as_deref() == Some(token) && a.status == 200)
            .map(|a| batch(a, room))
            .collect()
    }

    /// Whether palpo's stream gave `token` the event `event_id` of `room`.
    pub fn delivered(&self, token: &str, room: &str, event_id: &str) -> bool {
        self.batches(token, room)
            .iter()
            .any(|b| b.timeline.iter().any(|e| e == event_id))
    }

    /// Every `since` the library sent with `token` is the `next_batch` of palpo's previous
    /// answer to it: the library passed palpo's tokens on and skipped none.
    pub fn assert_since_chain(&self, token: &str, who: &str, room: &str) {
        let batches = self.batches(token, room);
        // (A `since`-less request is an initial sync, e.g. of another client on the token.)
        for pair in batches.windows(2).filter(|p| p[1].since.is_some()) {
            assert_eq!(
                pair[1].since,
                Some(pair[0].next_batch),
                "{who}: a /sync since {:?} after palpo answered next_batch {}",
                pair[1].since,
                pair[0].next_batch
            );
        }
    }

    /// The answer in which palpo's stream skipped `event_id` for `account` (the account's
    /// stream never had it), if there is one yet: an answer from `since=a` to
    /// `next_batch=b` without the event, where either the event's own stream number lies
    /// strictly between `a` and `b` and the answer's timeline was not `limited` (so the
    /// answer should have carried it), or `/sync?since=a` replayed now with the account's
    /// token has it and `/sync?since=b` has not. (The replay alone misses a skip that a
    /// later burst pushed out of the replay's ten timeline events.) Call it once the event's
    /// send has returned (the event is then fully written).
    pub fn skipped(&self, account: &Account, room: &str, event_id: &str) -> Option<Batch> {
        let token = &account.access_token;
        let batches = self.batches(token, room);
        if batches
            .iter()
            .any(|b| b.timeline.iter().any(|e| e == event_id))
        {
            return None;
        }
        let position = self.position(account, room, event_id);
        batches.into_iter().find(|b| {
            let Some(a) = b.since.filter(|&a| a < b.next_batch) else {
                return false;
            };
            let passed_over = position.is_some_and(|s| a < s && s < b.next_batch);
            (passed_over && !b.limited)
                || (self.replay_has(account, room, a, event_id)
                    && !self.replay_has(account, room, b.next_batch, event_id))
        })
    }

    /// The stream number palpo gave `event_id`: its `/context` with `limit=0` starts and
    /// ends at it.
    fn position(&self, account: &Account, room: &str, event_id: &str) -> Option<u64> {
        if let Some(&known) = self.positions.lock().unwrap().get(event_id) {
            return Some(known);
        }
        let (status, body) = account.get_json(&format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=0",
            encode(room),
            encode(event_id)
        ));
        assert_eq!(status, 200, "/context of {event_id}: {body}");
        let (start, end) = (body["start"].as_str()?, body["end"].as_str()?);
        let position = (start == end).then(|| start.parse().ok()).flatten()?;
        self.positions
            .lock()
            .unwrap()
            .insert(event_id.to_owned(), position);
        Some(position)
    }

    /// Whether palpo's `/sync?since=since&timeout=0` for `account`, straight to palpo, has
    /// `event_id` in `room`'s timeline.
    fn replay_has(&self, account: &Account, room: &str, since: u64, event_id: &str) -> bool {
        let key = (account.access_token.clone(), since, event_id.to_owned());
        if let Some(&has) = self.replays.lock().unwrap().get(&key) {
            return has;
        }
        let (status, body) =
            account.get_json(&format!("/_matrix/client/v3/sync?since={since}&timeout=0"));
        assert_eq!(status, 200, "replayed /sync since {since}: {body}");
        let has = timeline(&body, room).iter().any(|e| e == event_id);
        self.replays.lock().unwrap().insert(key, has);
        has
    }
}

fn batch(answer: &Answer, room: &str) -> Batch {
    let body: Value = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("a /sync answer that is not JSON ({e})"));
    let token = |v: &str| -> u64 {
        v.parse()
            .unwrap_or_else(|_| panic!("palpo's batch tokens are stream numbers, not {v:?}"))
    };
    let since = answer
        .path
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("since=")))
        .map(token);
    let next_batch = token(body["next_batch"].as_str().expect("next_batch"));
    Batch {
        at: answer.at,
        since,
        next_batch,
        timeline: timeline(&body, room),
        limited: body["rooms"]["join"][room]["timeline"]["limited"] == true,
    }
}

fn timeline(body: &Value, room: &str) -> Vec<String> {
    body["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
