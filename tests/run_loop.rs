//! The run loop's rules (crate docs "The rules" 1 to 5, contract §2): inputs the machine no
//! longer waits for and time going backwards are refused and change nothing, states change only
//! when something happened, and stop ends everything.

use std::time::{Duration, Instant};

use matrix_sync_service::{
    EventKind, InputError, RequestKind, SyncMachine, SyncState, TransportErrorKind,
    TransportFailure,
};
use matrix_sync_testkit::canned::*;
use matrix_sync_testkit::foreign_request_id;
use matrix_sync_testkit::sim::Harness;

// ---- input errors ----------------------------------------------------------------------------------

/// Everything observable about a machine, for "nothing changed" checks.
fn snapshot(m: &SyncMachine) -> String {
    format!(
        "{:?} {:?} {:?} {:?}",
        m.state(),
        m.since(),
        m.in_flight(),
        m.poll_timeout()
    )
}

/// Nothing to poll: no event, error or state (of a machine, checked or not).
macro_rules! assert_no_output {
    ($m:expr) => {{
        let m = &mut $m;
        assert!(m.poll_event().is_none());
        assert!(m.poll_error().is_none());
        assert!(m.poll_state().is_none());
    }};
}

#[test]
fn inputs_outside_the_protocol_are_refused_and_change_nothing() {
    let mut h = Harness::live(config());
    let first = h.request();
    // Let it pass its deadline: its id is now stale.
    h.advance(first.deadline - h.now);
    let _ = h.one_error();
    let req = h.next_request();
    assert!(req.id > first.id);
    let before = snapshot(&h.machine);
    let now = h.now;

    let stale = h
        .machine
        .handle_response(first.id, json_response(&empty_sync("x")), now);
    assert_eq!(stale, Err(InputError::StaleRequest(first.id)));
    let stale = h.machine.handle_failure(
        first.id,
        TransportFailure::new(TransportErrorKind::Reset, "late"),
        now,
    );
    assert_eq!(stale, Err(InputError::StaleRequest(first.id)));
    // Ids are opaque: the only ones not this machine's in flight are stale or another's.
    let unknown = foreign_request_id(50);
    let got = h
        .machine
        .handle_response(unknown, json_response(&empty_sync("x")), now);
    assert_eq!(got, Err(InputError::StaleRequest(unknown)));
    let got = h.machine.handle_failure(
        unknown,
        TransportFailure::new(TransportErrorKind::Dns, "?"),
        now,
    );
    assert_eq!(got, Err(InputError::StaleRequest(unknown)));
    // A later `now` on a refused input does not move the clock either.
    let later = now + Duration::from_secs(5);
    let got = h
        .machine
        .handle_response(first.id, json_response(&empty_sync("x")), later);
    assert_eq!(got, Err(InputError::StaleRequest(first.id)));

    // Time going backwards, on every input.
    let earlier = now - Duration::from_millis(1);
    let back = InputError::TimeWentBackwards {
        last: now,
        now: earlier,
    };
    assert_eq!(h.machine.handle_timeout(earlier), Err(back.clone()));
    assert_eq!(
        h.machine
            .handle_response(req.id, json_response(&empty_sync("x")), earlier),
        Err(back.clone())
    );
    assert_eq!(
        h.machine.handle_failure(
            req.id,
            TransportFailure::new(TransportErrorKind::Tls, "t"),
            earlier
        ),
        Err(back)
    );
    assert_eq!(snapshot(&h.machine), before);
    assert_no_output!(h.machine);
    assert!(
        h.machine.poll_request().is_none(),
        "the request is still in flight"
    );

    // The awaited request can still be answered normally, at the time it expects.
    h.respond(&req, json_response(&empty_sync("s1")));
    assert_eq!(h.machine.since(), Some("s1"));
    // Its id is now stale too.
    assert_eq!(
        h.machine
            .handle_response(req.id, json_response(&empty_sync("s9")), h.now),
        Err(InputError::StaleRequest(req.id))
    );
    assert_eq!(h.machine.since(), Some("s1"));
}

#[test]
fn a_response_nobody_asked_for_before_any_request_is_stale() {
    let mut m = SyncMachine::new(config(), Instant::now()).unwrap();
    assert_eq!(m.poll_state(), Some(SyncState::InitialSync));
    let foreign = foreign_request_id(0);
    let got = m.handle_response(foreign, json_response(&empty_sync("x")), Instant::now());
    assert_eq!(got, Err(InputError::StaleRequest(foreign)));
    assert_eq!(m.since(), None);
    assert!(m.in_flight().is_none());
    assert_eq!(m.state(), SyncState::InitialSync);
    assert_no_output!(m);
}

// ---- stop ------------------------------------------------------------------------------------------

#[test]
fn stop_is_idempotent_and_refuses_later_inputs() {
    let mut h = Harness::live(config());
    let req = h.request();
    let since = h.machine.since().map(str::to_owned);
    h.machine.stop();
    h.machine.stop();
    h.drain();
    assert_eq!(h.take_states(), [SyncState::Stopped]);
    assert_eq!(h.machine.state(), SyncState::Stopped);
    assert!(h.machine.in_flight().is_none());
    assert!(h.machine.poll_request().is_none());
    assert_eq!(h.machine.poll_timeout(), None);
    let now = h.now + Duration::from_secs(1);
    assert_eq!(
        h.machine
            .handle_response(req.id, json_response(&empty_sync("s9")), now),
        Err(InputError::Stopped)
    );
    assert_eq!(
        h.machine.handle_failure(
            req.id,
            TransportFailure::new(TransportErrorKind::Reset, "r"),
            now
        ),
        Err(InputError::Stopped)
    );
    assert_eq!(h.machine.handle_timeout(now), Err(InputError::Stopped));
    assert_eq!(h.machine.handle_timeout(h.now), Err(InputError::Stopped));
    h.machine.stop();
    assert_no_output!(h.machine);
    assert!(h.machine.poll_request().is_none());
    assert_eq!(h.machine.since().map(str::to_owned), since);
    assert_eq!(h.machine.state(), SyncState::Stopped);
}

#[test]
fn stop_during_a_backoff_and_during_gap_filling() {
    // During a backoff: no retry ever comes.
    let mut h = Harness::live(config());
    let req = h.request();
    h.reply(&req, 500, "");
    let _ = h.one_error();
    h.machine.stop();
    assert_eq!(h.machine.poll_timeout(), None);
    assert!(h.machine.poll_request().is_none());
    assert_eq!(
        h.machine.handle_timeout(h.now + Duration::from_secs(3600)),
        Err(InputError::Stopped)
    );

    // While a gap is being filled: the batch is dropped, since stays at the old token.
    let gap = fixture_json("synapse-gap-sync.json");
    let previous = gap["previous_since"].as_str().unwrap();
    let mut c = config();
    c.since = Some(previous.to_owned());
    let mut h = Harness::new(c);
    let req = h.request();
    h.respond(&req, json_response(&gap["response"]));
    let req = h.request();
    assert!(matches!(req.kind, RequestKind::Messages { .. }));
    h.machine.stop();
    assert_eq!(
        h.machine.handle_response(
            req.id,
            json_response(&serde_json::json!({"chunk": [], "start": "x"})),
            h.now
        ),
        Err(InputError::Stopped)
    );
    h.drain();
    assert!(h
        .events()
        .iter()
        .all(|e| !matches!(e.kind, EventKind::Checkpoint(_))));
    assert_eq!(h.machine.since(), Some(previous));
}
// ---- states ------------------------------------------------------------------------------------

#[test]
fn a_long_poll_while_live_changes_no_state() {
    let mut h = Harness::live_with_since(config());
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
    let req = h.next_request();
    assert_eq!(query(&req)["timeout"], "30000");
    assert!(
        h.take_states().is_empty(),
        "a long-poll from Live stays Live"
    );
    h.reply(&req, 401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"gone"}"#);
    assert_eq!(h.take_states(), [SyncState::Refused]);
    let req = h.next_request();
    assert_eq!(query(&req)["timeout"], "0");
    assert!(
        h.take_states().is_empty(),
        "retrying while unauthorized stays Refused"
    );
    h.respond(&req, json_response(&empty_sync("s1")));
    assert_eq!(h.take_states(), [SyncState::CatchingUp, SyncState::Live]);
}
