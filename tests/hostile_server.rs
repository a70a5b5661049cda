//! What a broken or hostile homeserver can do, played on the simulated clock (see the test
//! kit's `sim`): it cannot make the loop spin, bloat, stall, or lose or repeat events.

use std::collections::HashSet;
use std::time::Duration;

use matrix_sync_service::{
    defaults, BackoffPolicy, Config, ConfigError, ErrorClass, EventKind, Failure, FilterDefinition,
    SyncFilter, SyncState, MAX_TOKEN_BYTES,
};

use matrix_sync_testkit::sim;
use sim::{ms, secs, Feed, Homeserver, Kind, Reply, Sent, Server, Sim};

const HOUR: Duration = Duration::from_secs(3600);
const ROOM: &str = "!room:example.org";
const OTHER: &str = "!other:example.org";

fn config() -> Config {
    let mut c = sim::config();
    c.since = Some("s0".to_owned());
    c.jitter_seed = 7;
    c
}

/// The documented bound on sync requests that deliver nothing, in one hour, for `policy`:
/// two per backoff step (the catch-up after a failure, and the long-poll after it), the steps
/// below the cap, then one step per `(1 - jitter) * max`; each delivering answer may start the
/// ramp again.
fn hourly_bound(policy: &BackoffPolicy, delivering: usize) -> usize {
    let ramp = (1..)
        .take_while(|n| policy.base_delay(*n) < policy.max)
        .count();
    let at_cap = (HOUR.as_secs_f64() / (policy.max.as_secs_f64() * (1.0 - policy.jitter))).ceil();
    2 * (ramp * (delivering + 1) + at_cap as usize)
}

fn sync_requests(sim: &Sim<impl Server>) -> Vec<&Sent> {
    sim.log
        .requests
        .iter()
        .filter(|r| r.kind == Kind::Sync)
        .collect()
}

/// The most sync requests in any one-hour window (sliding, at every request), and the number of
/// delivering batches in that window.
fn busiest_hour(sim: &Sim<impl Server>) -> (usize, usize) {
    let syncs = sync_requests(sim);
    let delivering: Vec<Duration> = batches_with_messages(sim);
    let mut worst = (0usize, 0usize);
    for (i, first) in syncs.iter().enumerate() {
        let end = first.at + HOUR;
        let n = syncs[i..].iter().take_while(|r| r.at < end).count();
        let d = delivering
            .iter()
            .filter(|at| **at >= first.at && **at < end)
            .count();
        if n.saturating_sub(d) > worst.0.saturating_sub(worst.1) {
            worst = (n, d);
        }
    }
    worst
}

/// When each batch that handed on at least one message ended.
fn batches_with_messages(sim: &Sim<impl Server>) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut messages = 0;
    for e in &sim.log.events {
        match e.kind {
            EventKind::Message => messages += 1,
            EventKind::Checkpoint(_) => {
                if messages > 0 {
                    out.push(e.at);
                }
                messages = 0;
            }
            _ => {}
        }
    }
    out
}

fn assert_within_bound(sim: &Sim<impl Server>, what: &str) {
    let policy = sim.machine.config().backoff.clone();
    let (requests, delivering) = busiest_hour(sim);
    let bound = hourly_bound(&policy, delivering);
    assert!(
        requests - delivering <= bound,
        "{what}: {requests} sync requests in the busiest hour, {delivering} delivering; bound {bound}"
    );
}

fn body(json: &str) -> Vec<u8> {
    json.as_bytes().to_vec()
}

// ---- 1. a zero long-poll timeout ---------------------------------------------------------------

#[test]
fn a_long_poll_timeout_below_the_minimum_is_refused_naming_the_field() {
    for timeout in [Duration::ZERO, ms(99)] {
        let mut c = config();
        c.long_poll_timeout = timeout;
        let err = c.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::DurationOutOfRange {
                    field: "long_poll_timeout",
                    min,
                    ..
                } if min == defaults::MIN_LONG_POLL_TIMEOUT
            ),
            "{err:?}"
        );
    }
}

#[test]
fn the_same_token_answered_at_once_at_the_shortest_timeout_is_spaced() {
    let mut c = config();
    c.long_poll_timeout = defaults::MIN_LONG_POLL_TIMEOUT;
    let server = Homeserver::new(Feed::new(1, &[ROOM]), |_, r: &Sent| {
        Reply::ok(ZERO, Feed::idle(r))
    });
    let mut sim = Sim::scripted(c, server);
    sim.run_until(HOUR);
    let n = sync_requests(&sim).len();
    assert!(n <= hourly_bound(&sim.machine.config().backoff, 0), "{n}");
    assert!(n > 10, "it keeps polling: {n}");
}

const ZERO: Duration = Duration::ZERO;

// ---- 2. answers that deliver nothing ------------------------------------------------------------

#[test]
fn fresh_tokens_with_empty_rooms_answered_at_once_are_spaced_by_what_was_delivered() {
    let mut n = 0u64;
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, _: &Sent| {
        n += 1;
        Reply::ok(
            ZERO,
            body(&format!(
                r#"{{"next_batch":"e{n}","rooms":{{"join":{{"!r:x":{{}}}}}}}}"#
            )),
        )
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_until(3 * HOUR);
    let n = sync_requests(&sim).len();
    // Was 1,055 requests per second.
    assert!(
        n <= 3 * hourly_bound(&sim.machine.config().backoff, 0),
        "{n}"
    );
    assert_within_bound(&sim, "empty joined rooms");
    assert_eq!(sim.last_checkpoint(), Some(format!("e{n}").as_str()));
}

#[test]
fn a_limited_empty_timeline_whose_history_is_missing_is_spaced() {
    let mut n = 0u64;
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, r: &Sent| match r.kind {
        Kind::Refresh | Kind::Other { .. } => unreachable!("only syncs and /messages here"),
        Kind::Sync => {
            n += 1;
            Reply::ok(
                ZERO,
                body(&format!(
                    r#"{{"next_batch":"l{n}","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"p{n}"}}}}}}}}}}"#
                )),
            )
        }
        Kind::Messages { .. } => Reply::error(ZERO, 404, "M_NOT_FOUND", ""),
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_until(HOUR);
    // Was 726 requests per second.
    assert_within_bound(&sim, "limited timeline with a 404 history");
    let gaps = sim
        .log
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Gap(_)))
        .count();
    assert!(gaps > 10, "every batch reports its gap: {gaps}");
}

// ---- 3. a proxy that cuts long-polls ------------------------------------------------------------

fn long_polls_fail(failure: fn() -> Reply) -> Sim<impl Server> {
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, r: &Sent| {
        if r.is_catch_up() {
            Reply::ok(ZERO, Feed::idle(r))
        } else {
            failure()
        }
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_until(4 * HOUR);
    sim
}

#[test]
fn long_polls_that_always_fail_while_catch_ups_work_back_off_to_the_cap() {
    for (what, failure) in [
        (
            "500",
            (|| Reply::error(ZERO, 500, "M_UNKNOWN", "")) as fn() -> Reply,
        ),
        ("429 retry 0", || Reply::rate_limited(ZERO, 0, None)),
    ] {
        let sim = long_polls_fail(failure);
        let errors = &sim.log.errors;
        let last = errors.last().expect("failures");
        // Was 5.4 requests per second, the attempt count never past 1.
        assert!(last.attempt > 100, "{what}: attempt {}", last.attempt);
        assert!(last.delay >= secs(30), "{what}: delay {:?}", last.delay);
        let late: Vec<_> = sync_requests(&sim)
            .into_iter()
            .filter(|r| r.at >= 3 * HOUR)
            .collect();
        assert!(
            late.len() <= 2 * 120,
            "{what}: {} requests in the fourth hour",
            late.len()
        );
        assert_within_bound(&sim, what);
    }
}

// ---- 4. the memory budget of gap filling ------------------------------------------------------

/// Two limited rooms whose history pages hold large events, for ever.
struct BigHistory {
    page: u64,
    event_bytes: usize,
}

impl Server for BigHistory {
    fn answer(&mut self, r: &Sent, _: &http::Request<Vec<u8>>) -> Reply {
        match &r.kind {
            Kind::Refresh | Kind::Other { .. } => unreachable!("only syncs and /messages here"),
            Kind::Sync if r.since.as_deref() == Some("s0") => Reply::ok(
                ZERO,
                body(&format!(
                    r#"{{"next_batch":"s1","rooms":{{"join":{{
                "{ROOM}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"a0"}}}},
                "{OTHER}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"b0"}}}}}}}}}}"#
                )),
            ),
            Kind::Sync => Reply::ok(secs(30), Feed::idle(r)),
            Kind::Messages { .. } => {
                self.page += 1;
                let pad = "x".repeat(self.event_bytes);
                let events: Vec<String> = (0..4)
                    .map(|i| {
                        format!(
                            r#"{{"type":"m.room.message","event_id":"$big{}_{i}","room_id":"{ROOM}","sender":"@a:x","origin_server_ts":1,"content":{{"body":"{pad}"}}}}"#,
                            self.page
                        )
                    })
                    .collect();
                Reply::ok(
                    ZERO,
                    body(&format!(
                        r#"{{"start":"x","end":"page{}","chunk":[{}]}}"#,
                        self.page,
                        events.join(",")
                    )),
                )
            }
        }
    }
}

#[test]
fn gap_fill_holds_no_more_than_the_body_cap_and_reports_the_rest_as_gaps() {
    let mut c = config();
    c.max_body_bytes = 256 * 1024;
    c.gap_fill.max_events_per_room = 10_000;
    let budget = c.max_body_bytes;
    let mut sim = Sim::scripted(
        c,
        BigHistory {
            page: 0,
            event_bytes: 20_000,
        },
    );
    let mut peak = 0;
    while sim.elapsed() < secs(60) && sim.step_until(secs(60)) {
        peak = peak.max(sim.machine.gap_fill_bytes());
        assert!(peak <= budget, "{peak} bytes held, budget {budget}");
    }
    sim.drain();
    assert!(peak > budget / 2, "the budget was reached: {peak}");
    let gaps: Vec<_> = sim
        .log
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Gap(_)))
        .map(|e| e.room_id.clone().unwrap())
        .collect();
    assert_eq!(gaps, [OTHER, ROOM], "both rooms end in a gap item");
    assert_eq!(
        sim.last_checkpoint(),
        Some("s1"),
        "and the batch is delivered"
    );
}

// ---- 5. the token revoked in the middle of a batch -------------------------------------------

#[test]
fn an_unauthorized_gap_fill_fails_the_batch_like_a_sync_and_loses_nothing() {
    let mut revoked = true;
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, r: &Sent| match &r.kind {
        Kind::Refresh | Kind::Other { .. } => unreachable!("only syncs and /messages here"),
        Kind::Sync if r.since.as_deref() == Some("s0") => Reply::ok(
            ZERO,
            body(&format!(
                r#"{{"next_batch":"s1","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"events":[
                {{"type":"m.room.message","event_id":"$new","sender":"@a:x","origin_server_ts":2,"content":{{"body":"new"}}}}],
                "limited":true,"prev_batch":"p1"}}}}}}}}}}"#
            )),
        ),
        Kind::Sync => Reply::ok(secs(30), Feed::idle(r)),
        Kind::Messages { .. } if revoked => {
            revoked = false;
            Reply::error(ZERO, 401, "M_UNKNOWN_TOKEN", r#""soft_logout":false"#)
        }
        Kind::Messages { .. } => Reply::ok(
            ZERO,
            body(&format!(
                r#"{{"start":"p1","chunk":[{{"type":"m.room.message","event_id":"$old","room_id":"{ROOM}","sender":"@a:x","origin_server_ts":1,"content":{{"body":"old"}}}}]}}"#
            )),
        ),
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_while(100, |s| s.log.errors.is_empty());
    assert!(sim.log.events.is_empty(), "nothing delivered");
    assert_eq!(sim.machine.since(), Some("s0"), "since unchanged");
    assert_eq!(sim.machine.state(), SyncState::Refused);
    assert_eq!(sim.log.errors[0].class, ErrorClass::NeedsUser);
    // The token works again (the application replaced it): the same batch comes back whole.
    sim.run_until(secs(300));
    let ids: Vec<_> = sim
        .log
        .events
        .iter()
        .filter_map(|e| e.event_id.clone())
        .collect();
    assert_eq!(
        ids,
        ["$old", "$new"],
        "history and timeline, once, in order"
    );
    assert!(!sim
        .log
        .events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Gap(_))));
}

// ---- 6. one room's history keeps failing --------------------------------------------------------

#[test]
fn a_room_whose_history_keeps_failing_ends_in_a_gap_and_the_batch_goes_on() {
    let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, r: &Sent| match &r.kind {
        Kind::Refresh | Kind::Other { .. } => unreachable!("only syncs and /messages here"),
        Kind::Sync if r.since.as_deref() == Some("s0") => Reply::ok(
            ZERO,
            body(&format!(
                r#"{{"next_batch":"s1","rooms":{{"join":{{
                "{ROOM}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"a"}}}},
                "{OTHER}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"b"}}}}}}}}}}"#
            )),
        ),
        Kind::Sync => Reply::ok(secs(30), Feed::idle(r)),
        Kind::Messages { room } if room == OTHER => Reply::error(ZERO, 502, "", ""),
        Kind::Messages { .. } => Reply::ok(
            ZERO,
            body(&format!(
                r#"{{"start":"a","chunk":[{{"type":"m.room.message","event_id":"$filled","room_id":"{ROOM}","sender":"@a:x","origin_server_ts":1,"content":{{"body":"filled"}}}}]}}"#
            )),
        ),
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_until(secs(120));
    // Was: 200 retries over 2.4 simulated hours, nothing delivered.
    let failed = sim
        .log
        .requests
        .iter()
        .filter(|r| r.kind == Kind::Messages { room: OTHER.into() })
        .count();
    assert!(failed <= 3, "{failed} attempts for the failing room");
    let delivered: Vec<_> = sim
        .log
        .events
        .iter()
        .map(|e| (e.kind.name(), e.room_id.as_ref().map(|r| r.to_string())))
        .collect();
    assert_eq!(
        delivered[..3],
        [
            ("gap", Some(OTHER.to_owned())),
            ("message", Some(ROOM.to_owned())),
            ("checkpoint", None)
        ]
    );
    assert!(sim.log.events[2].at < secs(10), "delivered within seconds");
}

// ---- 7. stop in the middle of a delivery --------------------------------------------------------

#[test]
fn stop_in_the_middle_of_a_delivery_hands_out_nothing_more_and_keeps_since() {
    let server = Homeserver::new(Feed::new(1, &[ROOM]), |f: &mut Feed, r: &Sent| {
        Reply::ok(ZERO, f.new_batch(r, 5))
    });
    let mut sim = Sim::scripted(config(), server);
    // Feed the first answer, then take two events by hand.
    while sim.log.requests.is_empty() || sim.machine.in_flight().is_some() {
        sim.step();
    }
    let m = &mut sim.machine;
    assert!(m.poll_event().is_some());
    assert!(m.poll_event().is_some());
    m.stop();
    assert!(m.poll_event().is_none(), "nothing after the stop");
    assert!(m.poll_request().is_none());
    assert_eq!(m.poll_timeout(), None);
    assert_eq!(m.since(), Some("s0"), "the batch was not completed");
    let states: Vec<_> = std::iter::from_fn(|| m.poll_state()).collect();
    assert_eq!(states.last(), Some(&SyncState::Stopped));
    assert_eq!(m.state(), SyncState::Stopped);
}

// ---- 8. an uploaded filter is honoured by gap fills ----------------------------------------------

#[test]
fn gap_fills_carry_the_timeline_part_of_an_uploaded_filter() {
    let definition: FilterDefinition =
        serde_json::from_str(r#"{"room":{"timeline":{"types":["m.room.message"],"limit":5}}}"#)
            .unwrap();
    let mut c = config();
    c.filter = Some(SyncFilter::Uploaded {
        id: "f1".into(),
        definition: Box::new(definition),
    });
    type Seen = std::rc::Rc<std::cell::RefCell<Vec<(Kind, Option<String>)>>>;
    let seen = Seen::default();
    struct Recorder(Seen);
    impl Server for Recorder {
        fn answer(&mut self, r: &Sent, http: &http::Request<Vec<u8>>) -> Reply {
            let filter = sim::query(http.uri(), "filter");
            self.0.borrow_mut().push((r.kind.clone(), filter));
            match r.kind {
                Kind::Refresh | Kind::Other { .. } => unreachable!("only syncs and /messages here"),
                Kind::Sync if r.since.as_deref() == Some("s0") => Reply::ok(
                    ZERO,
                    body(&format!(
                        r#"{{"next_batch":"s1","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"p"}}}}}}}}}}"#
                    )),
                ),
                Kind::Sync => Reply::Stall,
                Kind::Messages { .. } => Reply::ok(ZERO, body(r#"{"start":"p","chunk":[]}"#)),
            }
        }
    }
    let mut sim = Sim::scripted(c, Recorder(seen.clone()));
    sim.run_until(secs(5));
    let seen = seen.borrow();
    assert_eq!(seen[0], (Kind::Sync, Some("f1".into())));
    let (kind, filter) = &seen[1];
    assert_eq!(*kind, Kind::Messages { room: ROOM.into() });
    let filter: serde_json::Value = serde_json::from_str(filter.as_deref().unwrap()).unwrap();
    assert_eq!(filter["types"], serde_json::json!(["m.room.message"]));
    assert!(
        filter.get("limit").is_none(),
        "the page size is the machine's"
    );
}

// ---- 9. tokens that cannot make the round trip ----------------------------------------------------

#[test]
fn tokens_too_long_empty_or_with_controls_are_bad_responses_never_stored_or_sent() {
    let long = "t".repeat(70_000);
    for (what, token) in [
        ("70 KB", long.as_str()),
        ("empty", ""),
        ("newline", "s1\nstate: Live"),
    ] {
        let token = token.to_owned();
        let server = Homeserver::new(Feed::new(1, &[ROOM]), move |_, _: &Sent| {
            Reply::ok(
                ZERO,
                serde_json::to_vec(&serde_json::json!({ "next_batch": token })).unwrap(),
            )
        });
        let mut sim = Sim::scripted(config(), server);
        sim.run_until(secs(600));
        assert!(sim.log.events.is_empty(), "{what}: nothing delivered");
        assert_eq!(sim.machine.since(), Some("s0"), "{what}: never stored");
        for r in &sim.log.requests {
            assert!(
                r.since
                    .as_deref()
                    .is_none_or(|s| s.len() <= MAX_TOKEN_BYTES),
                "{what}: never sent"
            );
        }
        let e = &sim.log.errors[0];
        assert_eq!(e.class, ErrorClass::Transient, "{what}");
        assert!(
            matches!(&e.failure, Failure::BadResponse { reason, .. } if reason.contains("next_batch")),
            "{what}: {:?}",
            e.failure
        );
        assert_within_bound(&sim, what);
    }
}

// ---- 10. the catch-up after days offline -------------------------------------------------------

#[test]
fn a_catch_up_from_a_stored_since_gets_the_catch_up_deadline() {
    let mut c = config();
    c.catch_up_deadline = secs(900);
    let server = Homeserver::new(Feed::new(1, &[ROOM]), |f: &mut Feed, r: &Sent| {
        // Ten minutes to assemble the catch-up: past the long-poll deadline of 60 s.
        Reply::ok(if r.is_catch_up() { secs(600) } else { secs(30) }, {
            if r.is_catch_up() {
                f.new_batch(r, 3)
            } else {
                Feed::idle(r)
            }
        })
    });
    let mut sim = Sim::scripted(c, server);
    sim.run_until(secs(700));
    let first = &sim.log.requests[0];
    assert_eq!(first.deadline, secs(900));
    assert!(sim.log.errors.is_empty(), "{:?}", sim.log.errors);
    assert_eq!(sim.last_checkpoint(), Some("s1"));
}

// ---- 11. a homeserver that redirects ----------------------------------------------------------

#[test]
fn a_redirect_is_reported_with_its_location_and_retried_at_the_maximum_backoff() {
    let server = Homeserver::new(Feed::new(1, &[ROOM]), |_, _: &Sent| Reply::Response {
        latency: ZERO,
        status: 301,
        headers: vec![("location", "https://elsewhere.example.org/".to_owned())],
        body: Vec::new(),
    });
    let mut sim = Sim::scripted(config(), server);
    sim.run_until(HOUR);
    let max = sim.machine.config().backoff.max;
    let e = &sim.log.errors[0];
    assert_eq!(e.class, ErrorClass::NeedsUser);
    assert_eq!(e.delay, max);
    match &e.failure {
        Failure::Redirected { status, location } => {
            assert_eq!(*status, 301);
            assert_eq!(location.as_deref(), Some("https://elsewhere.example.org/"));
        }
        other => panic!("{other:?}"),
    }
    let n = sync_requests(&sim).len() as u64;
    assert!(n <= HOUR.as_secs() / max.as_secs() + 1, "{n} requests");
}

// ---- a week against the worst server --------------------------------------------------------------

/// At every request, one of the answers above, chosen at random (seeded): mostly the hostile
/// ones, sometimes a real batch whose events must all arrive, once.
struct Worst {
    feed: Feed,
    n: u64,
}

impl Server for Worst {
    fn answer(&mut self, r: &Sent, _: &http::Request<Vec<u8>>) -> Reply {
        self.n += 1;
        let n = self.n;
        let roll = self.feed.rng.range(0, 99);
        if let Kind::Messages { .. } = r.kind {
            return match roll {
                0..=19 => Reply::error(ZERO, 401, "M_UNKNOWN_TOKEN", ""),
                20..=39 => Reply::error(ZERO, 404, "M_NOT_FOUND", ""),
                40..=59 => Reply::error(ZERO, 500, "", ""),
                60..=69 => Reply::Stall,
                _ => {
                    let pad = "y".repeat(30_000);
                    Reply::ok(
                        ZERO,
                        body(&format!(
                            r#"{{"start":"x","end":"e{n}","chunk":[{{"type":"m.room.message","event_id":"$h{n}","room_id":"{ROOM}","sender":"@a:x","origin_server_ts":1,"content":{{"body":"{pad}"}}}}]}}"#
                        )),
                    )
                }
            };
        }
        match roll {
            0..=9 => Reply::ok(ZERO, Feed::idle(r)),
            10..=19 => Reply::ok(
                ZERO,
                body(&format!(
                    r#"{{"next_batch":"w{n}","rooms":{{"join":{{"!r:x":{{}}}}}}}}"#
                )),
            ),
            20..=29 => Reply::ok(
                ZERO,
                body(&format!(
                    r#"{{"next_batch":"w{n}","rooms":{{"join":{{"{ROOM}":{{"timeline":{{"events":[],"limited":true,"prev_batch":"p{n}"}}}}}}}}}}"#
                )),
            ),
            30..=44 if !r.is_catch_up() => Reply::error(ZERO, 500, "", ""),
            45..=54 if !r.is_catch_up() => Reply::rate_limited(ZERO, 0, None),
            55..=59 => Reply::Response {
                latency: ZERO,
                status: 302,
                headers: vec![("location", "https://x.example.org/".into())],
                body: Vec::new(),
            },
            60..=64 => Reply::ok(
                ZERO,
                serde_json::to_vec(&serde_json::json!({ "next_batch": "t".repeat(70_000) }))
                    .unwrap(),
            ),
            65..=69 => Reply::Stall,
            70..=72 => Reply::ok(ZERO, self.feed.new_batch(r, 3)),
            _ => Reply::ok(ZERO, Feed::idle(r)),
        }
    }
}

#[test]
fn a_week_against_the_worst_server_stays_paced_bounded_and_loses_nothing() {
    let days: u64 = std::env::var("SIM_HOSTILE_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(7);
    let mut c = config();
    c.max_body_bytes = 128 * 1024;
    let budget = c.max_body_bytes;
    let mut sim = Sim::scripted(
        c,
        Worst {
            feed: Feed::new(42, &[ROOM, OTHER]),
            n: 0,
        },
    );
    let end = Duration::from_secs(86_400 * days);
    let mut peak = 0;
    while sim.elapsed() < end && sim.step_until(end) {
        peak = peak.max(sim.machine.gap_fill_bytes());
        assert!(peak <= budget, "{peak} bytes held, budget {budget}");
    }
    sim.drain();

    // Nothing delivered twice.
    let mut seen = HashSet::new();
    for e in &sim.log.events {
        if let Some(id) = e.id() {
            assert!(seen.insert(id.to_owned()), "{id} delivered twice");
        }
    }
    // Nothing lost that the server delivered: every real batch checkpointed arrived whole.
    let checkpoints: HashSet<String> = sim
        .log
        .events
        .iter()
        .filter_map(|e| e.checkpoint().map(str::to_owned))
        .collect();
    let mut real = 0;
    for batch in &sim.server.feed.emitted {
        if checkpoints.contains(&batch.next_batch) {
            real += 1;
            for id in &batch.event_ids {
                assert!(seen.contains(id), "{id} of {} lost", batch.next_batch);
            }
        }
    }
    // `since` never passed a batch whose gap fill failed on authentication: such batches were
    // dropped whole, and the next request carried the same since.
    let requests = &sim.log.requests;
    for (i, e) in sim.log.errors.iter().enumerate() {
        if let (Some(index), Failure::UnknownToken { .. }) = (e.request, &e.failure) {
            if matches!(requests[index].kind, Kind::Messages { .. }) {
                let next_sync = requests[index + 1..]
                    .iter()
                    .find(|r| r.kind == Kind::Sync)
                    .map(|r| r.since.clone());
                let failed_from = requests[..index]
                    .iter()
                    .rev()
                    .find(|r| r.kind == Kind::Sync)
                    .map(|r| r.since.clone());
                if let Some(next) = next_sync {
                    assert_eq!(next, failed_from.unwrap(), "error {i}");
                }
            }
        }
    }
    assert_within_bound(&sim, "the worst server");
    let syncs = sync_requests(&sim).len();
    let (busiest, delivering) = busiest_hour(&sim);
    eprintln!(
        "hostile week: {} requests ({syncs} syncs) over {days} days, busiest hour {busiest} \
         syncs ({delivering} delivering, bound {}), {real} real batches delivered, peak gap-fill \
         memory {peak} of {budget} bytes",
        requests.len(),
        hourly_bound(&sim.machine.config().backoff, delivering)
    );
    assert!(real > 10, "real batches got through: {real}");
}
