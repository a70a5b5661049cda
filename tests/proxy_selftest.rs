//! Self-tests of the fault-injecting proxy against a tiny in-process upstream.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_testkit::proxy;

use proxy::{Action, Fault, FaultPlan, Proxy};

// ---------------------------------------------------------------------------
// A tiny upstream server
// ---------------------------------------------------------------------------

/// What the upstream saw for one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Serves one request per connection and closes, like an upstream that was
/// asked for `Connection: close`. Routes:
/// - `/chunked`: a chunked JSON body;
/// - `/eof`: a body delimited by closing the connection;
/// - `/slow`: answers after 5 s;
/// - anything else: a JSON body with `Content-Length` describing the request.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let seen = Arc::clone(&seen);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let seen = Arc::clone(&seen);
                    thread::spawn(move || upstream_serve(stream, &seen));
                }
            })
        };
        Upstream {
            addr,
            seen,
            stop,
            accept: Some(accept),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn upstream_serve(mut stream: TcpStream, seen: &Mutex<Vec<Seen>>) {
    let Some(response) = read_message(&mut stream) else {
        return;
    };
    let mut lines = response.head.split("\r\n");
    let mut first = lines.next().unwrap().split(' ');
    let method = first.next().unwrap().to_owned();
    let target = first.next().unwrap().to_owned();
    let headers = parse_header_lines(lines);
    let request = Seen {
        method,
        target,
        headers,
        body: response.body,
    };
    seen.lock().unwrap().push(request.clone());

    let path = request.target.split('?').next().unwrap().to_owned();
    let reply: Vec<u8> = match path.as_str() {
        "/chunked" => b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\nX-Upstream: yes\r\n\r\n\
              7\r\n{\"next_\r\n\
              a;ext=1\r\nbatch\":\"s1\r\n\
              3\r\n23\"\r\n\
              1\r\n}\r\n\
              0\r\nX-Trailer: t\r\n\r\n"
            .to_vec(),
        "/eof" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
        "/slow" => {
            thread::sleep(Duration::from_secs(5));
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_vec()
        }
        _ => {
            let body = format!(
                "{{\"method\":\"{}\",\"target\":\"{}\",\"body_len\":{},\"padding\":\"0123456789\"}}",
                request.method,
                request.target,
                request.body.len()
            );
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    };
    let _ = stream.write_all(&reply);
    let _ = stream.shutdown(Shutdown::Write);
    // Let the peer read everything before the socket goes away.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

// ---------------------------------------------------------------------------
// A raw HTTP client
// ---------------------------------------------------------------------------

struct Message {
    head: String,
    body: Vec<u8>,
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn parse_header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// Reads a head and a `Content-Length` body (0 without one). `None` on EOF
/// before any byte.
fn read_message(stream: &mut TcpStream) -> Option<Message> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => {
                assert!(buf.is_empty(), "closed mid-head: {buf:?}");
                return None;
            }
            Ok(_) => buf.push(byte[0]),
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let length = head
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    Some(Message { head, body })
}

fn connect(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn send(stream: &mut TcpStream, method: &str, target: &str, extra: &str, body: &[u8]) {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: proxy.test\r\n{extra}");
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).unwrap();
}

fn receive(stream: &mut TcpStream) -> Response {
    let message = read_message(stream).expect("connection closed before a response");
    let mut lines = message.head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    Response {
        status,
        headers: parse_header_lines(lines),
        body: message.body,
    }
}

fn get(stream: &mut TcpStream, target: &str) -> Response {
    send(stream, "GET", target, "", b"");
    receive(stream)
}

/// Asserts the proxy closes the connection without sending anything more.
fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "unexpected bytes: {rest:?}"),
        Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset),
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn actions(proxy: &Proxy) -> Vec<Action> {
    proxy.log().into_iter().map(|event| event.action).collect()
}

fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

#[test]
fn forwards_several_requests_on_one_keep_alive_connection() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    for i in 0..3 {
        let target = format!("/_matrix/client/v3/sync?since=s{i}&access_token=secret{i}&timeout=0");
        send(
            &mut client,
            "GET",
            &target,
            "Authorization: Bearer hunter2\r\nConnection: keep-alive\r\n",
            b"",
        );
        let response = receive(&mut client);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert!(response
            .text()
            .contains(&format!("\"target\":\"{target}\"")));
    }

    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert_eq!(
            request.header("host"),
            Some(upstream.addr.to_string().as_str())
        );
        assert_eq!(request.header("connection"), Some("close"));
        assert_eq!(request.header("authorization"), Some("Bearer hunter2"));
        assert!(request.target.contains("access_token=secret"));
    }

    let log = proxy.log();
    assert_eq!(log.len(), 3);
    for (i, event) in log.iter().enumerate() {
        assert_eq!(event.method, "GET");
        assert_eq!(
            event.path,
            format!("/_matrix/client/v3/sync?since=s{i}&access_token=REDACTED&timeout=0")
        );
        assert_eq!(event.action, Action::Forwarded { status: 200 });
        assert!(!format!("{event:?}").contains("secret"));
        assert!(!format!("{event:?}").contains("hunter2"));
    }
    assert!(log.windows(2).all(|pair| pair[0].at <= pair[1].at));
}

#[test]
fn forwards_request_bodies() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    let body = br#"{"room":{"timeline":{"limit":10}}}"#;
    send(
        &mut client,
        "POST",
        "/_matrix/client/v3/user/u/filter",
        "Content-Type: application/json\r\n",
        body,
    );
    let response = receive(&mut client);
    assert_eq!(response.status, 200);
    assert!(response
        .text()
        .contains(&format!("\"body_len\":{}", body.len())));
    let seen = upstream.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[0].header("content-type"), Some("application/json"));
}

#[test]
fn dechunks_chunked_upstream_responses() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    for _ in 0..2 {
        let response = get(&mut client, "/chunked");
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), r#"{"next_batch":"s123"}"#);
        assert_eq!(response.header("content-length"), Some("21"));
        assert_eq!(response.header("transfer-encoding"), None);
        assert_eq!(response.header("x-upstream"), Some("yes"));
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn forwards_close_delimited_upstream_responses() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    let response = get(&mut client, "/eof");
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "until the end");
    assert_eq!(response.header("content-length"), Some("13"));
}

#[test]
fn honours_connection_close_from_the_client() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    send(&mut client, "GET", "/x", "Connection: close\r\n", b"");
    let response = receive(&mut client);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert_closed(&mut client);
}

#[test]
fn rejects_chunked_request_bodies_and_huge_heads() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());

    let mut client = connect(&proxy);
    client
        .write_all(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(receive(&mut client).status, 501);
    assert_closed(&mut client);

    let mut client = connect(&proxy);
    let huge = format!(
        "GET /x HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    client.write_all(huge.as_bytes()).unwrap();
    assert_eq!(receive(&mut client).status, 431);

    assert!(upstream.seen().is_empty());
}

#[test]
fn upstream_down_gives_502_and_recovers() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(closed_port(), FaultPlan::off());
    let mut client = connect(&proxy);

    let response = get(&mut client, "/_matrix/client/v3/sync");
    assert_eq!(response.status, 502);
    assert_eq!(response.header("content-type"), Some("text/html"));
    assert!(response.text().contains("502 Bad Gateway"));
    assert!(
        matches!(&actions(&proxy)[0], Action::UpstreamError(message) if message.contains("connect"))
    );

    proxy.set_upstream(upstream.addr);
    let response = get(&mut client, "/_matrix/client/v3/sync");
    assert_eq!(response.status, 200);
    assert_eq!(actions(&proxy)[1], Action::Forwarded { status: 200 });
}

#[test]
fn abandons_the_upstream_when_the_client_goes_away() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);
    send(&mut client, "GET", "/slow", "", b"");
    wait_until(
        "the upstream to see the request",
        Duration::from_secs(2),
        || upstream.seen().len() == 1,
    );
    drop(client);
    wait_until("the connection to end", Duration::from_secs(1), || {
        proxy.active_connections() == 0
    });
    assert!(matches!(&actions(&proxy)[0], Action::Aborted(_)));
}

// ---------------------------------------------------------------------------
// Fault modes
// ---------------------------------------------------------------------------

#[test]
fn reset_closes_without_answering() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::always(Fault::Reset));
    let mut client = connect(&proxy);

    send(&mut client, "GET", "/_matrix/client/v3/sync", "", b"");
    let mut buf = [0u8; 16];
    let outcome = client.read(&mut buf);
    #[cfg(target_os = "linux")]
    assert_eq!(
        outcome.map_err(|error| error.kind()),
        Err(ErrorKind::ConnectionReset)
    );
    #[cfg(not(target_os = "linux"))]
    assert!(matches!(outcome, Ok(0) | Err(_)));

    assert!(upstream.seen().is_empty());
    assert_eq!(actions(&proxy), vec![Action::Injected(Fault::Reset)]);
}

#[test]
fn status_faults_answer_and_keep_the_connection() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::off());
    let mut client = connect(&proxy);

    proxy.set_plan(FaultPlan::always(Fault::Status(500)));
    let response = get(&mut client, "/sync");
    assert_eq!(response.status, 500);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.text(),
        r#"{"errcode":"M_UNKNOWN","error":"Internal server error"}"#
    );

    for status in [502, 503] {
        proxy.set_plan(FaultPlan::always(Fault::Status(status)));
        let response = get(&mut client, "/sync");
        assert_eq!(response.status, status);
        assert_eq!(response.header("content-type"), Some("text/html"));
        assert!(response.text().contains(&format!("<title>{status} ")));
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }

    proxy.set_plan(FaultPlan::off());
    assert_eq!(get(&mut client, "/sync").status, 200);
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(
        actions(&proxy),
        vec![
            Action::Injected(Fault::Status(500)),
            Action::Injected(Fault::Status(502)),
            Action::Injected(Fault::Status(503)),
            Action::Forwarded { status: 200 },
        ]
    );
}

#[test]
fn rate_limited_sends_429_with_retry_after() {
    let upstream = Upstream::start();
    let fault = Fault::RateLimited {
        retry_after_ms: 1500,
    };
    let proxy = Proxy::start(upstream.addr, FaultPlan::always(fault.clone()));
    let mut client = connect(&proxy);

    let response = get(&mut client, "/sync");
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("2"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
    assert_eq!(body["retry_after_ms"], 1500);
    assert!(upstream.seen().is_empty());
    assert_eq!(actions(&proxy), vec![Action::Injected(fault)]);
}

#[test]
fn truncated_sends_half_the_body_then_closes() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::always(Fault::Truncated));

    for target in ["/plain", "/chunked"] {
        let mut client = connect(&proxy);
        send(&mut client, "GET", target, "", b"");
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        let split = find(&received, b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&received[..split]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let length: usize = head
            .split("\r\n")
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(length > 10);
        assert_eq!(received.len() - split, length / 2, "{target}");
    }
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(actions(&proxy), vec![Action::Injected(Fault::Truncated); 2]);
}

#[test]
fn stall_waits_then_closes_without_forwarding() {
    let upstream = Upstream::start();
    let stall = Duration::from_millis(300);
    let proxy = Proxy::start(upstream.addr, FaultPlan::always(Fault::Stall(stall)));
    let mut client = connect(&proxy);

    let started = Instant::now();
    send(&mut client, "GET", "/sync", "", b"");
    assert_closed(&mut client);
    let waited = started.elapsed();
    assert!(waited >= stall, "{waited:?}");
    assert!(waited < stall + Duration::from_secs(2), "{waited:?}");
    assert!(upstream.seen().is_empty());
    assert_eq!(actions(&proxy), vec![Action::Injected(Fault::Stall(stall))]);
}

#[test]
fn stall_does_not_block_other_connections_and_ends_when_the_client_leaves() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        upstream.addr,
        FaultPlan::always(Fault::Stall(Duration::from_secs(60))).with_path_filter("/sync"),
    );
    let mut stalled = connect(&proxy);
    send(&mut stalled, "GET", "/sync", "", b"");
    wait_until("the stall to start", Duration::from_secs(2), || {
        proxy.log().len() == 1
    });

    let mut other = connect(&proxy);
    let started = Instant::now();
    assert_eq!(get(&mut other, "/versions").status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(other);

    drop(stalled);
    wait_until(
        "the stalled connection to end",
        Duration::from_secs(1),
        || proxy.active_connections() == 0,
    );
}

#[test]
fn garbage_is_not_json() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, FaultPlan::always(Fault::Garbage));
    let mut client = connect(&proxy);

    let response = get(&mut client, "/sync");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert!(serde_json::from_slice::<serde_json::Value>(&response.body).is_err());
    assert!(std::str::from_utf8(&response.body).is_ok());
    assert_eq!(response.header("connection"), Some("keep-alive"));
    assert!(upstream.seen().is_empty());
}

// ---------------------------------------------------------------------------
// Decisions
// ---------------------------------------------------------------------------

fn mixed_plan(seed: u64) -> FaultPlan {
    FaultPlan::new(
        0.5,
        vec![
            Fault::Status(500),
            Fault::Status(503),
            Fault::RateLimited { retry_after_ms: 10 },
            Fault::Garbage,
        ],
        seed,
    )
}

fn run_requests(plan: FaultPlan, count: usize) -> Vec<Action> {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, plan);
    let mut client = connect(&proxy);
    for _ in 0..count {
        get(&mut client, "/_matrix/client/v3/sync");
    }
    actions(&proxy)
}

fn expected_actions(decisions: Vec<Option<Fault>>) -> Vec<Action> {
    decisions
        .into_iter()
        .map(|decision| match decision {
            Some(fault) => Action::Injected(fault),
            None => Action::Forwarded { status: 200 },
        })
        .collect()
}

#[test]
fn decisions_are_deterministic_for_a_seed() {
    let first = run_requests(mixed_plan(42), 40);
    let second = run_requests(mixed_plan(42), 40);
    assert_eq!(first, second);
    assert_eq!(first, expected_actions(mixed_plan(42).simulate(40)));
    let injected = first
        .iter()
        .filter(|action| matches!(action, Action::Injected(_)))
        .count();
    assert!((8..=32).contains(&injected), "{injected} of 40");

    assert_ne!(mixed_plan(42).simulate(40), mixed_plan(43).simulate(40));

    // Fixed expectations, so that a change to the PRNG is noticed.
    let pattern: String = mixed_plan(7)
        .simulate(16)
        .iter()
        .map(|decision| match decision {
            None => '.',
            Some(Fault::Status(500)) => '5',
            Some(Fault::Status(503)) => '3',
            Some(Fault::RateLimited { .. }) => 'R',
            Some(Fault::Garbage) => 'G',
            Some(other) => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(pattern, PATTERN_SEED_7);
}

const PATTERN_SEED_7: &str = "5.533G.....3.3..";

#[test]
fn rate_and_mode_choice_are_roughly_uniform() {
    let decisions = mixed_plan(1).simulate(10_000);
    let injected: Vec<Fault> = decisions.into_iter().flatten().collect();
    assert!(
        (4_700..=5_300).contains(&injected.len()),
        "{}",
        injected.len()
    );
    for mode in mixed_plan(1).modes {
        let count = injected.iter().filter(|fault| **fault == mode).count();
        assert!((1_000..=1_500).contains(&count), "{mode:?}: {count}");
    }
    assert!(FaultPlan::new(0.0, vec![Fault::Garbage], 1)
        .simulate(1_000)
        .iter()
        .all(Option::is_none));
    assert!(FaultPlan::new(1.0, vec![Fault::Garbage], 1)
        .simulate(1_000)
        .iter()
        .all(Option::is_some));
    assert!(FaultPlan::new(1.0, vec![], 1)
        .simulate(10)
        .iter()
        .all(Option::is_none));
}

#[test]
fn set_plan_restarts_the_sequence() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(upstream.addr, mixed_plan(9));
    let mut client = connect(&proxy);
    for _ in 0..5 {
        get(&mut client, "/sync");
    }
    proxy.clear_log();
    proxy.set_plan(mixed_plan(9));
    for _ in 0..12 {
        get(&mut client, "/sync");
    }
    assert_eq!(
        actions(&proxy),
        expected_actions(mixed_plan(9).simulate(12))
    );
}

#[test]
fn path_filter_limits_eligible_requests() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        upstream.addr,
        FaultPlan::always(Fault::Status(503)).with_path_filter("/sync"),
    );
    let mut client = connect(&proxy);

    assert_eq!(get(&mut client, "/_matrix/client/versions").status, 200);
    assert_eq!(
        get(&mut client, "/_matrix/client/v3/sync?timeout=0").status,
        503
    );
    // The query string does not count as part of the path.
    assert_eq!(
        get(&mut client, "/_matrix/client/v3/rooms?next=/sync").status,
        200
    );
}

#[test]
fn max_consecutive_lets_requests_through() {
    let plan = FaultPlan::always(Fault::Status(500)).with_max_consecutive(2);
    let actions = run_requests(plan.clone(), 7);
    let fault = Action::Injected(Fault::Status(500));
    let ok = Action::Forwarded { status: 200 };
    assert_eq!(
        actions,
        vec![
            fault.clone(),
            fault.clone(),
            ok.clone(),
            fault.clone(),
            fault.clone(),
            ok,
            fault,
        ]
    );
    assert_eq!(actions, expected_actions(plan.simulate(7)));
    assert!(FaultPlan::always(Fault::Garbage)
        .with_max_consecutive(0)
        .simulate(5)
        .iter()
        .all(Option::is_none));
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[test]
fn drop_is_prompt_with_busy_connections() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        upstream.addr,
        FaultPlan::always(Fault::Stall(Duration::from_secs(60))).with_path_filter("/sync"),
    );
    let mut idle = connect(&proxy);
    assert_eq!(get(&mut idle, "/versions").status, 200);
    let mut stalled = connect(&proxy);
    send(&mut stalled, "GET", "/sync", "", b"");
    let mut waiting = connect(&proxy);
    send(&mut waiting, "GET", "/slow", "", b"");
    wait_until("all three connections", Duration::from_secs(2), || {
        proxy.active_connections() == 3 && proxy.log().len() == 2 && upstream.seen().len() == 2
    });

    let started = Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_closed(&mut idle);
    assert_closed(&mut stalled);
    assert_closed(&mut waiting);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
