//! Arbitrary answers to the `/rooms/{roomId}/messages` requests that fill a gap.
//!
//! The machine resumes from the fixture's `previous_since` with gap filling on and gets the
//! fixture's incremental sync, whose room timeline is `limited` with a `prev_batch`. Then each
//! round of the input answers the `/messages` request it hands out. Rounds are separated by
//! the bytes `0xff 0xff`; a round is a control byte and a body. Control `c & 15`:
//!
//! * `0..=7`: status 200; `8`: 429 (with `Retry-After: c >> 4` seconds when that is not 0);
//!   `9`: 500; `10`: 502; `11`: 400; `12`: 403; `13`: 404;
//! * `14`: a transport failure; `15`: no answer, the deadline passes.
//!
//! After at most 8 rounds, every `/messages` request still asked for gets a valid empty page
//! (`{"chunk":[],"start":"x"}`). Checks: no panic; `since` unchanged until the checkpoint is
//! polled; no event id delivered twice; every event of the sync's own timeline delivered; error
//! delays within their caps; and the batch delivered in the end, whatever came before: the
//! checkpoint with the sync's `next_batch`, then a sync from it.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use matrix_sync_service::{
    Config, ErrorClass, EventKind, GapFill, OutgoingRequest, RequestKind, SyncFilter, SyncMachine,
    TransportErrorKind, TransportFailure,
};
use serde_json::Value;

const GAP_SYNC: &str = include_str!("../../tests/fixtures/synapse-gap-sync.json");
const MAX_ROUNDS: usize = 8;
const EMPTY_PAGE: &[u8] = br#"{"chunk":[],"start":"x"}"#;

struct Fixture {
    previous_since: String,
    filter: String,
    response: Vec<u8>,
    next_batch: String,
    room_id: String,
    timeline_ids: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let v: Value = serde_json::from_str(GAP_SYNC).expect("fixture is JSON");
        let response = &v["response"];
        let join = response["rooms"]["join"].as_object().expect("joined rooms");
        let (room_id, room) = join
            .iter()
            .find(|(_, r)| r["timeline"]["limited"] == Value::Bool(true))
            .expect("a limited timeline");
        Fixture {
            previous_since: v["previous_since"].as_str().expect("token").to_owned(),
            filter: v["filter"].to_string(),
            response: serde_json::to_vec(response).expect("json"),
            next_batch: response["next_batch"].as_str().expect("token").to_owned(),
            room_id: room_id.clone(),
            timeline_ids: room["timeline"]["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(|e| e["event_id"].as_str().expect("event id").to_owned())
                .collect(),
        }
    })
}

fn config(f: &Fixture) -> Config {
    let mut c = Config::new("https://example.org", "fuzz_secret_token");
    c.since = Some(f.previous_since.clone());
    c.filter = Some(SyncFilter::from_json(&f.filter).expect("fixture filter"));
    c.gap_fill = GapFill::default().with_page_size(12);
    c
}

struct Harness {
    m: SyncMachine,
    now: Instant,
    seen: HashSet<String>,
    checkpoint: Option<String>,
}

impl Harness {
    fn drain(&mut self) {
        let f = fixture();
        loop {
            let before = self.m.since().map(str::to_owned);
            let Some(e) = self.m.poll_event() else { break };
            assert!(
                self.checkpoint.is_none(),
                "an event after the checkpoint: {e:?}"
            );
            match &e.kind {
                EventKind::Checkpoint(c) => {
                    assert_eq!(c.next_batch, f.next_batch, "checkpoint of another batch");
                    assert_eq!(self.m.since(), Some(f.next_batch.as_str()));
                    self.checkpoint = Some(c.next_batch.clone());
                }
                _ => {
                    assert_eq!(self.m.since(), before.as_deref(), "since moved early");
                    assert_eq!(before.as_deref(), Some(f.previous_since.as_str()));
                }
            }
            if let Some(id) = &e.event_id {
                assert!(
                    self.seen.insert(id.to_string()),
                    "event {id} delivered twice"
                );
            }
        }
        while let Some(err) = self.m.poll_error() {
            let config = self.m.config();
            let cap = match err.class {
                ErrorClass::RateLimited => config.backoff.max.max(config.max_server_wait),
                _ => config.backoff.max,
            };
            assert!(
                err.delay <= cap,
                "delay {:?} above {cap:?}: {err}",
                err.delay
            );
        }
        while self.m.poll_state().is_some() {}
        if self.checkpoint.is_none() {
            assert_eq!(self.m.since(), Some(f.previous_since.as_str()));
        }
    }

    /// The next request, at once or after waking the machine at `poll_timeout()`.
    fn request(&mut self) -> OutgoingRequest {
        self.drain();
        if let Some(req) = self.m.poll_request() {
            return req;
        }
        let wake = self.m.poll_timeout().expect("no request and no wake-up");
        self.now = self.now.max(wake);
        self.m.handle_timeout(self.now).expect("forward time");
        self.drain();
        self.m
            .poll_request()
            .expect("a request is due after handle_timeout at poll_timeout")
    }

    fn respond(&mut self, req: &OutgoingRequest, status: u16, retry_after: u8, body: &[u8]) {
        let mut response = http::Response::builder().status(status);
        if retry_after != 0 {
            response = response.header(http::header::RETRY_AFTER, retry_after.to_string());
        }
        let response = response.body(body).expect("valid response");
        self.now += Duration::from_millis(5);
        self.m
            .handle_response(req.id, response, self.now)
            .expect("awaited");
    }

    fn is_gap_fill(&self, req: &OutgoingRequest) -> bool {
        match &req.kind {
            RequestKind::Messages { room_id } => {
                assert_eq!(room_id.as_str(), fixture().room_id);
                assert!(
                    self.checkpoint.is_none(),
                    "gap filling after the checkpoint"
                );
                true
            }
            RequestKind::Sync { .. } => false,
            other => panic!("a request kind this target does not know: {other:?}"),
        }
    }
}

fn rounds(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let data = rest?;
        match data.windows(2).position(|w| w == [0xff, 0xff]) {
            Some(i) => {
                rest = Some(&data[i + 2..]);
                Some(&data[..i])
            }
            None => {
                rest = None;
                Some(data)
            }
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let now = Instant::now();
    let mut h = Harness {
        m: SyncMachine::new(config(f), now).expect("valid config"),
        now,
        seen: HashSet::new(),
        checkpoint: None,
    };
    let req = h.request();
    assert!(!h.is_gap_fill(&req));
    h.respond(&req, 200, 0, &f.response);
    let mut req = h.request();
    assert!(h.is_gap_fill(&req), "a limited timeline is filled first");
    assert!(
        h.seen.is_empty(),
        "nothing delivered before the gap is filled"
    );

    for round in rounds(data).take(MAX_ROUNDS) {
        let Some((&control, body)) = round.split_first() else {
            continue;
        };
        let status = match control & 15 {
            0..=7 => 200,
            8 => 429,
            9 => 500,
            10 => 502,
            11 => 400,
            12 => 403,
            13 => 404,
            14 => {
                h.now += Duration::from_millis(5);
                let failure = TransportFailure::new(TransportErrorKind::Reset, "fuzz");
                h.m.handle_failure(req.id, failure, h.now).expect("awaited");
                0
            }
            _ => {
                h.now = h.now.max(req.deadline);
                h.m.handle_timeout(h.now).expect("forward time");
                assert!(h.m.in_flight().is_none(), "deadline passed");
                0
            }
        };
        if status != 0 {
            h.respond(&req, status, control >> 4, body);
        }
        req = h.request();
        if !h.is_gap_fill(&req) {
            break;
        }
    }

    for _ in 0..4 {
        if !h.is_gap_fill(&req) {
            break;
        }
        h.respond(&req, 200, 0, EMPTY_PAGE);
        req = h.request();
    }
    assert!(!h.is_gap_fill(&req), "still filling after empty pages");
    assert_eq!(
        h.checkpoint.as_deref(),
        Some(f.next_batch.as_str()),
        "batch not delivered"
    );
    assert_eq!(h.m.since(), Some(f.next_batch.as_str()));
    for id in &f.timeline_ids {
        assert!(h.seen.contains(id), "timeline event {id} lost");
    }
});
