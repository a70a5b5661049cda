//! The hostile-server behaviours of `hostile_server.rs` that the `tail` example can reach,
//! shown on the real clock: `tail` runs as a process against a scripted loopback server for a
//! few seconds, the server counts what it is asked, and `tail` is stopped with SIGTERM.
//!
//! The request bounds come from the documented backoff schedule (500 ms, doubling, capped at
//! 60 s; jitter removes up to half of each step), so they hold on any machine: a slow machine
//! only sends fewer requests. Linux only, like `tail_process.rs`.
#![cfg(target_os = "linux")]

mod support;

use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fake_server::{FakeServer, Request, Response};
use support::service::{tail_binary, Tail};

/// The exit statuses `tail` documents.
const STOPPED: i32 = 0;
const USAGE: i32 = 2;

const ROOM: &str = "!room:example.org";

/// The documented sync backoff: the first step, its growth, its cap, and the largest fraction
/// of a step that jitter removes.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const JITTER: f64 = 0.5;

/// How many backoff steps can end within `window`: with jitter each step lasts at least half
/// its base, so step `n` ends no earlier than the sum of the first `n` half-bases
/// (0.25 s, 0.75 s, 1.75 s, 3.75 s, 7.75 s, ...).
fn steps_within(window: Duration) -> usize {
    let mut base = BACKOFF_INITIAL;
    let mut earliest_end = Duration::ZERO;
    let mut steps = 0;
    loop {
        earliest_end += base.mul_f64(1.0 - JITTER);
        if earliest_end >= window {
            return steps;
        }
        steps += 1;
        base = (base * 2).min(BACKOFF_MAX);
    }
}

// ---- the scripted homeserver ---------------------------------------------------------------

fn is_sync(request: &Request) -> bool {
    request.path() == "/_matrix/client/v3/sync"
}

fn is_messages(request: &Request) -> bool {
    request.path().starts_with("/_matrix/client/v3/rooms/") && request.path().ends_with("/messages")
}

/// A `timeout=0` sync: the first one, or the first after a failure.
fn is_catch_up(request: &Request) -> bool {
    request.query("timeout").as_deref() == Some("0")
}

fn not_found() -> Response {
    Response::json(404, r#"{"errcode":"M_UNRECOGNIZED","error":"not here"}"#)
}

fn syncs(requests: &[Request]) -> Vec<&Request> {
    requests.iter().filter(|r| is_sync(r)).collect()
}

// ---- the tail process ----------------------------------------------------------------------

/// Reads `from` to its end on a thread.
fn drain(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let _ = from.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// What one run of tail showed.
struct Run {
    /// Whether tail ended by itself within the window (no signal sent).
    ended_by_itself: bool,
    /// Its exit status.
    code: Option<i32>,
    /// Every request the server received within the window, in order.
    requests: Vec<Request>,
    /// Every stdout line, parsed.
    lines: Vec<Value>,
    stderr: String,
    /// The since-file's content after the run, if it exists.
    since: Option<String>,
}

impl Run {
    /// The stdout lines that carry a server event (not a checkpoint or gap item).
    fn events(&self) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|l| l["kind"] != "checkpoint" && l["kind"] != "gap")
            .collect()
    }

    fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect()
    }

    fn states(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("state: "))
            .collect()
    }

    /// The report for a failed assertion.
    fn show(&self) -> String {
        format!(
            "exit {:?}, {} requests, {} stdout lines, since-file {:?}; stderr:\n{}",
            self.code,
            self.requests.len(),
            self.lines.len(),
            self.since
                .as_ref()
                .map(|s| s.chars().take(40).collect::<String>()),
            cap(&self.stderr)
        )
    }
}

/// At most 4 KiB of `text`, for a failure report.
fn cap(text: &str) -> String {
    if text.len() <= 4096 {
        return text.to_owned();
    }
    let mut end = 4096;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes]", &text[..end], text.len())
}

/// Runs `tail --homeserver <server> --since-file <file> <args>` for `window` (the since-file
/// holding `since` first, if given), counts the requests, then stops it with SIGTERM.
fn run_tail(server: &FakeServer, args: &[&str], since: Option<&str>, window: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let since_file = dir.path().join("since");
    if let Some(token) = since {
        fs::write(&since_file, format!("{token}\n")).unwrap();
    }
    let mut command = Command::new(tail_binary());
    command
        .args(["--homeserver", &server.url()])
        .arg("--since-file")
        .arg(&since_file)
        .args(args)
        .env("MATRIX_ACCESS_TOKEN", "secret-token")
        .env_remove("MATRIX_HOMESERVER")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tail = Tail(command.spawn().expect("tail starts"));
    let stdout = drain(tail.0.stdout.take().unwrap());
    let stderr = drain(tail.0.stderr.take().unwrap());

    let ended = tail.wait_exit(window);
    let requests = server.log();
    let ended_by_itself = ended.is_some();
    let status = ended.or_else(|| {
        let pid = tail.0.id() as i32;
        // SAFETY: kill takes two integers; the pid is our unreaped child, so it is not reused.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        tail.wait_exit(Duration::from_secs(3))
    });
    drop(tail);
    let stdout = stdout.join().unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    Run {
        ended_by_itself,
        code: status.and_then(|s| s.code()),
        requests,
        lines,
        stderr: stderr.join().unwrap(),
        since: fs::read_to_string(&since_file)
            .ok()
            .map(|t| t.trim().to_owned()),
    }
}

// ---- 1. a long-poll timeout that would be polling ------------------------------------------

#[test]
fn a_long_poll_timeout_below_100_ms_is_refused_at_once_with_2() {
    let server = FakeServer::start(|_| not_found());
    for timeout in ["0", "50"] {
        let started = Instant::now();
        let run = run_tail(
            &server,
            &["--timeout-ms", timeout],
            None,
            Duration::from_secs(2),
        );
        let took = started.elapsed();
        let show = run.show();
        eprintln!("--timeout-ms {timeout}: exit {:?} after {took:?}", run.code);
        assert!(
            run.ended_by_itself,
            "--timeout-ms {timeout}: still ran; {show}"
        );
        assert_eq!(run.code, Some(USAGE), "--timeout-ms {timeout}: {show}");
        assert_eq!(run.stderr.lines().count(), 1, "one line: {show}");
        assert!(run.stderr.contains("long_poll_timeout"), "{show}");
        assert!(run.requests.is_empty(), "refused before syncing: {show}");
        assert!(run.lines.is_empty(), "{show}");
        assert_eq!(run.since, None, "no since-file created: {show}");
    }
    assert_eq!(server.requests(), 0);
}

// ---- 2. instant answers that deliver nothing -------------------------------------------------

#[test]
fn instant_answers_that_deliver_nothing_are_paced_by_the_backoff() {
    let batches = AtomicUsize::new(0);
    let server = FakeServer::start(move |request| {
        if !is_sync(request) {
            return not_found();
        }
        let n = batches.fetch_add(1, Ordering::SeqCst) + 1;
        let body = json!({ "next_batch": format!("n{n}"), "rooms": { "join": { "!r:x": {} } } });
        Response::json(200, body.to_string())
    });
    let window = Duration::from_secs(4);
    let run = run_tail(&server, &[], None, window);
    let show = run.show();
    let syncs = syncs(&run.requests).len();
    // The first sync (`timeout=0`, nothing to hold, so not paced) and the long-poll right
    // after it go out at once; every later one waits one more backoff step. Steps end no
    // earlier than 0.25, 0.75, 1.75, 3.75, 7.75 s, so 4 of them fit in 4 s: 2 + 4 = 6 syncs.
    // The library before the pacing rule sent about 1000 a second.
    let bound = 2 + steps_within(window);
    assert_eq!(bound, 6);
    eprintln!("instant empty answers: {syncs} syncs in {window:?} (bound {bound})");
    assert!(syncs <= bound, "{syncs} syncs in {window:?}: {show}");
    assert!(syncs >= 3, "the ramp started: {show}");
    assert!(
        !run.ended_by_itself,
        "tail kept running until SIGTERM: {show}"
    );
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.events().is_empty(), "only checkpoints: {show}");
    let last = run.lines.last().expect("checkpoints on stdout");
    assert_eq!(last["kind"], "checkpoint", "{show}");
    assert_eq!(
        run.since.as_deref(),
        last["next_batch"].as_str(),
        "the last checkpoint printed is stored: {show}"
    );
    assert!(run.error_lines().is_empty(), "nothing failed: {show}");
}

// ---- 3. catch-ups work, long-polls fail --------------------------------------------------------

#[test]
fn a_working_catch_up_does_not_reset_failing_long_polls() {
    let server = FakeServer::start(|request| {
        if !is_sync(request) {
            return not_found();
        }
        if is_catch_up(request) {
            Response::json(200, r#"{"next_batch":"s0"}"#)
        } else {
            Response::json(500, r#"{"errcode":"M_UNKNOWN","error":"down"}"#)
        }
    });
    let window = Duration::from_secs(5);
    let run = run_tail(&server, &[], Some("s0"), window);
    let show = run.show();
    let syncs = syncs(&run.requests);
    // Each backoff step is followed by two syncs: the catch-up (answered at once, so not
    // paced) and the long-poll that fails again. The first pair goes out at once; steps end no
    // earlier than 0.25, 0.75, 1.75, 3.75, 7.75 s, so 4 fit in 5 s: 2 + 2 * 4 = 10 syncs. Were
    // the count reset by each working catch-up, every wait would be the first step (at most
    // 0.5 s), and 5 s would see at least 20.
    let bound = 2 + 2 * steps_within(window);
    assert_eq!(bound, 10);
    eprintln!(
        "catch-ups OK, long-polls 500: {} syncs in {window:?} (bound {bound})",
        syncs.len()
    );
    assert!(
        syncs.len() <= bound,
        "{} syncs in {window:?}: {show}",
        syncs.len()
    );
    for (i, sync) in syncs.iter().enumerate() {
        assert_eq!(
            is_catch_up(sync),
            i % 2 == 0,
            "catch-ups and long-polls alternate; sync {i} is {}: {show}",
            sync.target
        );
        assert_eq!(sync.query("since").as_deref(), Some("s0"), "{show}");
    }
    let attempts: Vec<u32> = run
        .error_lines()
        .iter()
        .map(|line| {
            let (_, rest) = line
                .split_once("attempt ")
                .unwrap_or_else(|| panic!("no attempt in {line:?}"));
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect();
    eprintln!("attempts on stderr: {attempts:?}");
    assert!(attempts.len() >= 3, "{attempts:?}: {show}");
    assert_eq!(
        attempts,
        (1..=attempts.len() as u32).collect::<Vec<_>>(),
        "each failing long-poll counts one more step: {show}"
    );
    assert!(!run.ended_by_itself, "{show}");
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.lines.is_empty(), "nothing to print: {show}");
    assert_eq!(run.since.as_deref(), Some("s0"), "{show}");
}

// ---- 4. a token too long to store ---------------------------------------------------------------

#[test]
fn a_70_kb_next_batch_is_a_bad_response_never_printed_stored_or_sent() {
    let long = "t".repeat(70_000);
    let body = json!({ "next_batch": long }).to_string();
    let server = FakeServer::start(move |request| {
        if !is_sync(request) {
            return not_found();
        }
        Response::json(200, body.as_str())
    });
    let window = Duration::from_secs(2);
    let run = run_tail(&server, &[], Some("s0"), window);
    let show = run.show();
    let syncs = syncs(&run.requests);
    // A bad response is a failure: the first sync goes out at once, each later one after one
    // more step; steps end no earlier than 0.25, 0.75, 1.75, 3.75 s: 1 + 3 = 4 in 2 s.
    let bound = 1 + steps_within(window);
    assert_eq!(bound, 4);
    eprintln!(
        "70 KB next_batch: {} syncs in {window:?} (bound {bound})",
        syncs.len()
    );
    assert!(!syncs.is_empty(), "{show}");
    assert!(
        syncs.len() <= bound,
        "{} syncs in {window:?}: {show}",
        syncs.len()
    );
    for sync in &syncs {
        assert_eq!(
            sync.query("since").as_deref(),
            Some("s0"),
            "the token is never sent back: {show}"
        );
    }
    assert!(!run.ended_by_itself, "{show}");
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.lines.is_empty(), "nothing on stdout: {show}");
    assert_eq!(run.since.as_deref(), Some("s0"), "never stored: {show}");
    let errors = run.error_lines();
    assert!(!errors.is_empty(), "{show}");
    assert!(
        errors.iter().all(|l| l.contains("next_batch")),
        "each error names next_batch: {show}"
    );
    assert!(
        !run.stderr.contains(&"t".repeat(100)),
        "the token is not echoed: {show}"
    );
}

// ---- 5. a homeserver that redirects -----------------------------------------------------------

#[test]
fn a_redirect_is_reported_with_its_location_once_and_not_retried_for_a_minute() {
    let server = FakeServer::start(|request| {
        if !is_sync(request) {
            return not_found();
        }
        Response {
            status: 301,
            headers: vec![(
                "Location".to_owned(),
                "https://elsewhere.example.org/".to_owned(),
            )],
            body: Vec::new(),
        }
    });
    let window = Duration::from_secs(3);
    let run = run_tail(&server, &[], Some("s0"), window);
    let show = run.show();
    eprintln!("301: {} requests in {window:?}", run.requests.len());
    // A redirect is fatal: the retry waits the maximum step, 60 s.
    assert_eq!(run.requests.len(), 1, "{show}");
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "one error line: {show}");
    let error = errors[0];
    assert!(
        error.contains("\"https://elsewhere.example.org/\""),
        "names the location: {show}"
    );
    assert!(
        error.contains("set the homeserver URL"),
        "says what to change: {show}"
    );
    assert!(error.contains("60000 ms"), "retried at the maximum: {show}");
    assert!(run.states().contains(&"Refused"), "{show}");
    assert!(!run.ended_by_itself, "{show}");
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.lines.is_empty(), "{show}");
    assert_eq!(run.since.as_deref(), Some("s0"), "{show}");
}

// ---- 6. a gap fill refused on authentication ------------------------------------------------------

#[test]
fn a_gap_fill_answered_401_fails_the_whole_batch() {
    let server = FakeServer::start(|request| {
        if is_messages(request) {
            return Response::json(
                401,
                r#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":false}"#,
            );
        }
        if !is_sync(request) {
            return not_found();
        }
        let body = json!({
            "next_batch": "s1",
            "rooms": { "join": { ROOM: { "timeline": {
                "limited": true,
                "prev_batch": "p1",
                "events": [{
                    "type": "m.room.message",
                    "event_id": "$new",
                    "sender": "@bob:example.org",
                    "origin_server_ts": 1_700_000_000_000u64,
                    "content": { "msgtype": "m.text", "body": "new" },
                }],
            } } } },
        });
        Response::json(200, body.to_string())
    });
    let window = Duration::from_secs(2);
    let run = run_tail(&server, &[], Some("s0"), window);
    let show = run.show();
    let syncs = syncs(&run.requests);
    let fills = run.requests.iter().filter(|r| is_messages(r)).count();
    eprintln!(
        "gap fill 401: {} syncs and {fills} /messages requests in {window:?}",
        syncs.len()
    );
    // The 401 is fatal: the batch is dropped and the next sync waits the maximum step.
    assert_eq!(syncs.len(), 1, "{show}");
    assert_eq!(syncs[0].query("since").as_deref(), Some("s0"), "{show}");
    assert_eq!(fills, 1, "{show}");
    assert!(!run.ended_by_itself, "{show}");
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.events().is_empty(), "no event delivered: {show}");
    assert!(run.lines.is_empty(), "no checkpoint either: {show}");
    assert_eq!(run.since.as_deref(), Some("s0"), "since unchanged: {show}");
    assert!(run.states().contains(&"Refused"), "{show}");
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{show}");
    assert!(errors[0].contains("401"), "{show}");
}

// ---- 7. a refresh answer whose tokens break the rules -------------------------------------------

/// Marks the token text of the refresh answers below: no line of tail may show it.
const SECRET: &str = "SECRET";

/// Runs tail with `--token-file` (old tokens, no expiry) against a homeserver that refuses
/// the old access token with a 401 and answers every refresh (at `refresh_path`) with
/// `answer`; checks what must hold for both methods and returns the run.
fn refused_refresh_answer(args: &[&str], refresh_path: &'static str, answer: String) -> Run {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    let stored = br#"{"access_token":"old-access","refresh_token":"old-refresh"}"#;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token_file)
        .unwrap()
        .write_all(stored)
        .unwrap();
    let server = FakeServer::start(move |request| {
        if request.path() == refresh_path {
            return Response::json(200, answer.as_str());
        }
        if !is_sync(request) {
            return not_found();
        }
        if request.header("authorization") == Some("Bearer old-access") {
            return Response::json(
                401,
                r#"{"errcode":"M_UNKNOWN_TOKEN","error":"expired","soft_logout":true}"#,
            );
        }
        Response::json(200, json!({ "next_batch": "s_new" }).to_string())
    });
    let server_url = server.url();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{server}", &server_url))
        .chain(["--token-file".to_owned(), token_file.display().to_string()])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let window = Duration::from_secs(3);
    let run = run_tail(&server, &args, Some("s0"), window);
    let show = run.show();
    let refreshes: Vec<_> = run
        .requests
        .iter()
        .filter(|r| r.path() == refresh_path)
        .collect();
    eprintln!(
        "refused refresh answer at {refresh_path}: {} refreshes, {} syncs in {window:?}",
        refreshes.len(),
        syncs(&run.requests).len()
    );
    // The access token is dead: only refreshes go out after the 401, the first at once, each
    // later one after one more backoff step (a failure like a 5xx).
    assert_eq!(syncs(&run.requests).len(), 1, "{show}");
    assert!(refreshes.len() >= 2, "the refresh is retried: {show}");
    assert!(
        refreshes.len() <= 1 + steps_within(window),
        "{} refreshes in {window:?}: {show}",
        refreshes.len()
    );
    for request in &run.requests {
        let authorization = request.header("authorization");
        assert!(
            authorization.is_none_or(|a| a == "Bearer old-access"),
            "only the old access token is ever sent: {show}"
        );
        assert!(
            !String::from_utf8_lossy(&request.body).contains(SECRET),
            "the refused tokens are never sent: {show}"
        );
    }
    for refresh in &refreshes {
        assert!(
            String::from_utf8_lossy(&refresh.body).contains("old-refresh"),
            "every refresh sends the old refresh token: {show}"
        );
    }
    assert_eq!(
        fs::read(&token_file).unwrap(),
        stored,
        "the token file keeps the old tokens byte for byte: {show}"
    );
    let mode = fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{show}");
    assert!(!run.stderr.contains("credentials refreshed"), "{show}");
    assert!(!run.stderr.contains(SECRET), "no token echoed: {show}");
    assert!(!run.ended_by_itself, "{show}");
    assert_eq!(run.code, Some(STOPPED), "{show}");
    assert!(run.events().is_empty(), "{show}");
    assert_eq!(run.since.as_deref(), Some("s0"), "{show}");
    // The 401, then each refresh answered before the signal (the last may be cut short).
    let errors = run.error_lines().len();
    assert!(
        (refreshes.len()..=1 + refreshes.len()).contains(&errors),
        "{errors} errors: {show}"
    );
    run
}

#[test]
fn a_100_kb_access_token_from_refresh_is_refused_never_stored_nor_sent() {
    let answer = json!({
        "access_token": format!("{SECRET}{}", "a".repeat(100_000)),
        "refresh_token": format!("{SECRET}_new_refresh"),
        "expires_in_ms": 60_000,
    })
    .to_string();
    let run = refused_refresh_answer(&[], "/_matrix/client/v3/refresh", answer);
    let show = run.show();
    let errors = run.error_lines();
    assert!(
        errors[1..]
            .iter()
            .all(|l| l.contains("access_token is longer than 4096 bytes")),
        "each refusal names the field and the rule: {show}"
    );
}

#[test]
fn an_oauth_refresh_token_of_5_kb_is_refused_never_stored_nor_sent() {
    let answer = json!({
        "access_token": format!("{SECRET}_new_access"),
        "refresh_token": format!("{SECRET}{}", "r".repeat(5_000)),
        "token_type": "Bearer",
        "expires_in": 300,
    })
    .to_string();
    let run = refused_refresh_answer(
        &[
            "--oauth-token-endpoint",
            "{server}/oauth2/token",
            "--oauth-client-id",
            "client-1",
        ],
        "/oauth2/token",
        answer,
    );
    let show = run.show();
    let errors = run.error_lines();
    assert!(
        errors[1..]
            .iter()
            .all(|l| l.contains("refresh_token is longer than 4096 bytes")),
        "each refusal names the field and the rule: {show}"
    );
}
