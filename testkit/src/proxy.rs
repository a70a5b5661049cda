//! A small fault-injecting HTTP/1.1 proxy for integration tests.
//!
//! The proxy sits between the client under test and a real homeserver. For
//! every request it draws from a seeded PRNG and either forwards the request
//! upstream or injects a fault (connection reset, error status, rate limit,
//! truncated body, stall, or a non-JSON body). Decisions are deterministic
//! given the seed and the order in which eligible requests arrive.
//!
//! Only `std` is used. The proxy listens on `127.0.0.1:0`; every client
//! connection is served by its own thread, and every forwarded request opens
//! a fresh upstream connection with `Connection: close`.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::rng::{index_below, SplitMix64};

/// Granularity of every blocking wait: reads poll with this timeout so that
/// shutdown and client disconnects are noticed promptly.
const POLL: Duration = Duration::from_millis(50);
/// Body of an injected `Fault::Garbage`.
const GARBAGE_BODY: &[u8] = b"<html><body>oops, this is not JSON</body></html>\n";
/// Cap on a request or response head (request line/status line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Cap on a single chunk-size or trailer line of a chunked upstream body.
const MAX_LINE: usize = 8 * 1024;
/// Cap on a request body accepted from the client.
const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;
/// Timeout for connecting to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout for any single write to a peer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful close waits for the client to close its side.
const LINGER: Duration = Duration::from_millis(500);

/// A fault the proxy can inject instead of (or on top of) forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Read the request, then abort the connection without answering. On
    /// Linux, Android and Apple/BSD systems the socket is closed with
    /// `SO_LINGER` 0, so the client sees a TCP RST (`ECONNRESET`); elsewhere
    /// it is a plain close without any response byte.
    Reset,
    /// Answer with this status and a small body: an nginx-style HTML page for
    /// 502/503/504, otherwise a Matrix JSON error (`M_UNKNOWN`).
    Status(u16),
    /// Answer 429 with a `M_LIMIT_EXCEEDED` JSON body carrying
    /// `retry_after_ms`, and a `Retry-After` header in whole seconds (rounded
    /// up).
    RateLimited { retry_after_ms: u64 },
    /// Forward the request, then send the upstream status and headers with
    /// the real `Content-Length` but only the first half of the body, then
    /// close the connection.
    Truncated,
    /// Read the request, send nothing for this long (or until the client
    /// closes, or the proxy is dropped), then close the connection. The
    /// request is not forwarded.
    Stall(Duration),
    /// Answer 200 with `Content-Type: application/json` and a body that is
    /// valid UTF-8 but not JSON (an HTML snippet), so the client fails while
    /// decoding JSON rather than while reading the body.
    Garbage,
}

/// When and how to inject faults.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    /// Probability in `[0, 1]` that an eligible request gets a fault.
    pub rate: f64,
    /// Faults to choose from, uniformly. Empty means no faults.
    pub modes: Vec<Fault>,
    /// Seed of the PRNG behind every decision.
    pub seed: u64,
    /// Only requests whose path (the target without its query string)
    /// contains this substring are eligible, e.g. `"/sync"`. Requests that
    /// are not eligible are always forwarded and do not consume PRNG draws.
    pub path_filter: Option<String>,
    /// At most this many eligible requests in a row get a fault; the next
    /// one is then forwarded, so tests make progress.
    pub max_consecutive: Option<u32>,
}

impl FaultPlan {
    /// A plan that injects one of `modes` with probability `rate`.
    pub fn new(rate: f64, modes: Vec<Fault>, seed: u64) -> FaultPlan {
        FaultPlan {
            rate,
            modes,
            seed,
            path_filter: None,
            max_consecutive: None,
        }
    }

    /// A plan that never injects anything: a transparent proxy.
    pub fn off() -> FaultPlan {
        FaultPlan::new(0.0, Vec::new(), 0)
    }

    /// A plan that injects `fault` into every eligible request.
    pub fn always(fault: Fault) -> FaultPlan {
        FaultPlan::new(1.0, vec![fault], 0)
    }

    /// Restrict faults to requests whose path contains `needle`.
    pub fn with_path_filter(mut self, needle: impl Into<String>) -> FaultPlan {
        self.path_filter = Some(needle.into());
        self
    }

    /// Cap the number of consecutive faults.
    pub fn with_max_consecutive(mut self, max: u32) -> FaultPlan {
        self.max_consecutive = Some(max);
        self
    }

    /// The decisions this plan makes for its first `n` eligible requests:
    /// `Some(fault)` to inject, `None` to forward. A proxy running this plan
    /// (freshly started or after `set_plan`) makes exactly these decisions.
    pub fn simulate(&self, n: usize) -> Vec<Option<Fault>> {
        let mut decider = Decider::new(self.clone());
        (0..n).map(|_| decider.decide_eligible()).collect()
    }

    fn applies_to(&self, path: &str) -> bool {
        self.path_filter
            .as_deref()
            .is_none_or(|needle| path.contains(needle))
    }
}

impl Default for FaultPlan {
    fn default() -> FaultPlan {
        FaultPlan::off()
    }
}

/// One request the proxy handled.
#[derive(Clone, Debug)]
pub struct ProxyEvent {
    /// When the request (head and body) had been read from the client.
    pub at: Instant,
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Path and query, with the value of any `access_token` query parameter
    /// replaced by `REDACTED`.
    pub path: String,
    /// What the proxy did with it.
    pub action: Action,
}

/// One forwarded answer, kept once [`Proxy::keep_answers`] asked for its path.
#[derive(Clone, Debug)]
pub struct Answer {
    /// When the request (head and body) had been read from the client.
    pub at: Instant,
    /// Path and query, redacted as in [`ProxyEvent::path`].
    pub path: String,
    /// The request's `Authorization: Bearer` token, to tell accounts apart.
    pub bearer: Option<String>,
    /// The upstream's status.
    pub status: u16,
    /// The upstream's body, de-chunked, as the client got it.
    pub body: Vec<u8>,
}

/// What the proxy did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forwarded upstream; the client got the upstream's answer.
    Forwarded { status: u16 },
    /// A fault was injected.
    Injected(Fault),
    /// The upstream could not be reached or answered something unusable;
    /// the client got a 502.
    UpstreamError(String),
    /// The request was abandoned while waiting for the upstream because the
    /// client closed its connection or the proxy was being dropped.
    Aborted(String),
}

/// A running proxy. Dropping it stops it.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Bind `127.0.0.1:0` and start serving, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind proxy listener");
        let addr = listener.local_addr().expect("proxy listener address");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            upstream: Mutex::new(upstream),
            decider: Mutex::new(Decider::new(plan)),
            log: Mutex::new(Vec::new()),
            keep: Mutex::new(None),
            answers: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn proxy accept thread")
        };
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of the proxy, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of every handled request, in the order outcomes were
    /// known. Injected faults are recorded as soon as they are chosen;
    /// forwarded requests once the upstream answered (so with concurrent
    /// connections a long-poll may appear after later requests; `at` is the
    /// arrival time).
    pub fn log(&self) -> Vec<ProxyEvent> {
        lock(&self.shared.log).clone()
    }

    /// Forget every recorded event.
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// Replace the plan. The PRNG is reseeded from `plan.seed` and the
    /// consecutive-fault counter is reset, so decisions from now on follow
    /// `plan.simulate(..)`.
    pub fn set_plan(&self, plan: FaultPlan) {
        *lock(&self.shared.decider) = Decider::new(plan);
    }

    /// Send future requests to `addr`. Requests already in flight keep
    /// their upstream connection.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *lock(&self.shared.upstream) = addr;
    }

    /// From now on, keep every forwarded answer (body included) to a request whose path
    /// contains `needle`, e.g. `/sync`.
    pub fn keep_answers(&self, needle: impl Into<String>) {
        *lock(&self.shared.keep) = Some(needle.into());
    }

    /// A snapshot of the answers kept so far, in the order they were sent to the client.
    pub fn answers(&self) -> Vec<Answer> {
        lock(&self.shared.answers).clone()
    }

    /// Number of client connections currently being served.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread, which then joins every connection thread;
        // those notice the stop flag within one poll interval.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(handle) = self.accept.take() {
            if woke {
                let _ = handle.join();
            }
        }
    }
}

struct Shared {
    stop: AtomicBool,
    upstream: Mutex<SocketAddr>,
    decider: Mutex<Decider>,
    log: Mutex<Vec<ProxyEvent>>,
    /// The path needle of the answers to keep, if any.
    keep: Mutex<Option<String>>,
    answers: Mutex<Vec<Answer>>,
    active: AtomicUsize,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn record(&self, at: Instant, method: &str, path: &str, action: Action) {
        lock(&self.log).push(ProxyEvent {
            at,
            method: method.to_owned(),
            path: path.to_owned(),
            action,
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Decisions
// ---------------------------------------------------------------------------

struct Decider {
    plan: FaultPlan,
    rng: SplitMix64,
    consecutive: u32,
}

impl Decider {
    fn new(plan: FaultPlan) -> Decider {
        Decider {
            rng: SplitMix64::new(plan.seed),
            plan,
            consecutive: 0,
        }
    }

    fn decide(&mut self, path: &str) -> Option<Fault> {
        if self.plan.applies_to(path) {
            self.decide_eligible()
        } else {
            None
        }
    }

    /// Every eligible request consumes exactly two draws, so the n-th
    /// decision depends only on the seed, n, and the plan.
    fn decide_eligible(&mut self) -> Option<Fault> {
        let roll = self.rng.next_unit();
        let pick = self.rng.next_u64();
        let hit = !self.plan.modes.is_empty() && roll < self.plan.rate;
        let capped = self
            .plan
            .max_consecutive
            .is_some_and(|max| self.consecutive >= max);
        if hit && !capped {
            self.consecutive += 1;
            Some(self.plan.modes[index_below(pick, self.plan.modes.len())].clone())
        } else {
            self.consecutive = 0;
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Accepting and serving client connections
// ---------------------------------------------------------------------------

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let accepted = listener.accept();
        if shared.stopped() {
            break;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        workers.retain(|worker| !worker.is_finished());
        shared.active.fetch_add(1, Ordering::SeqCst);
        let worker_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                let _guard = ActiveGuard(&worker_shared.active);
                serve_client(&worker_shared, stream);
            });
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(_) => {
                shared.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request read from the client.
struct Request {
    method: String,
    /// Origin-form target (path and query) as sent upstream.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The client wants the connection closed after this exchange.
    close: bool,
}

/// Whether the client connection stays open after an exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    KeepAlive,
    Close,
    /// Already closed (e.g. reset); nothing more to do.
    Gone,
}

fn serve_client(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(POLL)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut client = Conn::new(stream, shared, None);
    loop {
        let request = match read_request(&mut client) {
            Ok(request) => request,
            Err(Failure::Reject(status, message)) => {
                let response = simple_response(
                    status,
                    "application/json",
                    matrix_error("M_UNKNOWN", message).as_bytes(),
                    &[],
                    true,
                );
                let _ = (&client.stream).write_all(&response);
                close_gracefully(&client.stream, shared);
                return;
            }
            Err(_) => return,
        };
        let after = handle_request(shared, &client.stream, &request);
        match after {
            After::KeepAlive if !request.close => {}
            After::KeepAlive | After::Close => {
                close_gracefully(&client.stream, shared);
                return;
            }
            After::Gone => return,
        }
    }
}

fn handle_request(shared: &Shared, client: &TcpStream, request: &Request) -> After {
    let at = Instant::now();
    let path_only = request
        .target
        .split_once('?')
        .map_or(request.target.as_str(), |(path, _)| path);
    let logged_path = redact_target(&request.target);
    let fault = lock(&shared.decider).decide(path_only);
    let record = |action| shared.record(at, &request.method, &logged_path, action);
    let keep = if request.close {
        After::Close
    } else {
        After::KeepAlive
    };

    let Some(fault) = fault else {
        return match fetch_upstream(shared, request, client) {
            Ok(response) => {
                record(Action::Forwarded {
                    status: response.status,
                });
                let kept = lock(&shared.keep)
                    .as_deref()
                    .is_some_and(|needle| path_only.contains(needle));
                if kept {
                    let bearer = header(&request.headers, "authorization")
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_owned);
                    lock(&shared.answers).push(Answer {
                        at,
                        path: logged_path.clone(),
                        bearer,
                        status: response.status,
                        body: response.body.clone(),
                    });
                }
                let bytes = response.to_client_bytes(&request.method, request.close, false);
                send(client, &bytes, keep)
            }
            Err(failure) => upstream_failed(client, request, failure, record, keep),
        };
    };

    match &fault {
        Fault::Reset => {
            record(Action::Injected(fault.clone()));
            abort_connection(client);
            After::Gone
        }
        Fault::Status(status) => {
            record(Action::Injected(fault.clone()));
            let (content_type, body) = status_body(*status);
            let bytes = simple_response(*status, content_type, body.as_bytes(), &[], request.close);
            send(client, &bytes, keep)
        }
        Fault::RateLimited { retry_after_ms } => {
            record(Action::Injected(fault.clone()));
            let body = format!(
                r#"{{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":{retry_after_ms}}}"#
            );
            let seconds = retry_after_ms.div_ceil(1000).to_string();
            let bytes = simple_response(
                429,
                "application/json",
                body.as_bytes(),
                &[("Retry-After", seconds.as_str())],
                request.close,
            );
            send(client, &bytes, keep)
        }
        Fault::Truncated => match fetch_upstream(shared, request, client) {
            Ok(response) => {
                record(Action::Injected(fault.clone()));
                let bytes = response.to_client_bytes(&request.method, true, true);
                send(client, &bytes, After::Close)
            }
            Err(failure) => upstream_failed(client, request, failure, record, keep),
        },
        Fault::Stall(duration) => {
            record(Action::Injected(fault.clone()));
            let deadline = Instant::now() + *duration;
            while Instant::now() < deadline && !shared.stopped() && !peer_gone(client) {
                thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
            }
            After::Close
        }
        Fault::Garbage => {
            record(Action::Injected(fault.clone()));
            let bytes = simple_response(200, "application/json", GARBAGE_BODY, &[], request.close);
            send(client, &bytes, keep)
        }
    }
}

fn upstream_failed(
    client: &TcpStream,
    request: &Request,
    failure: Failure,
    record: impl Fn(Action),
    keep: After,
) -> After {
    match failure {
        Failure::ClientGone => {
            record(Action::Aborted("client closed the connection".into()));
            After::Gone
        }
        Failure::Stopped => {
            record(Action::Aborted("proxy stopped".into()));
            After::Gone
        }
        other => {
            record(Action::UpstreamError(other.describe()));
            let (content_type, body) = status_body(502);
            let bytes = simple_response(502, content_type, body.as_bytes(), &[], request.close);
            send(client, &bytes, keep)
        }
    }
}

fn send(client: &TcpStream, bytes: &[u8], after: After) -> After {
    let mut writer = client;
    match writer.write_all(bytes).and_then(|()| writer.flush()) {
        Ok(()) => after,
        Err(_) => After::Gone,
    }
}

/// Reads one request from the client. `Failure::Eof` means the client
/// closed the connection between requests.
fn read_request(client: &mut Conn<'_>) -> Result<Request, Failure> {
    // Tolerate stray empty lines between requests.
    loop {
        if client.buf.is_empty() || client.buf == b"\r" {
            client.fill()?;
        } else if client.buf.starts_with(b"\r\n") {
            client.buf.drain(..2);
        } else {
            break;
        }
    }
    let head = match client.read_head() {
        Ok(head) => head,
        Err(Failure::TooLarge) => {
            return Err(Failure::Reject(431, "Request header fields too large"));
        }
        Err(other) => return Err(other),
    };
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::Reject(400, "Malformed request line"));
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(Failure::Reject(400, "Malformed request line"));
    }
    let headers = parse_headers(lines).ok_or(Failure::Reject(400, "Malformed request header"))?;

    if header(&headers, "transfer-encoding").is_some() {
        return Err(Failure::Reject(
            501,
            "Transfer-Encoding in requests is not supported",
        ));
    }
    let length = content_length(&headers)
        .map_err(|()| Failure::Reject(400, "Invalid Content-Length"))?
        .unwrap_or(0);
    if length > MAX_REQUEST_BODY {
        return Err(Failure::Reject(413, "Request body too large"));
    }
    if length > 0 && has_token(&headers, "expect", "100-continue") {
        (&client.stream)
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(Failure::Io)?;
    }
    let body = client.read_exact(length)?;

    let close = if version == "HTTP/1.0" {
        !has_token(&headers, "connection", "keep-alive")
    } else {
        has_token(&headers, "connection", "close")
    };
    Ok(Request {
        method: method.to_owned(),
        target: origin_form(target),
        headers,
        body,
        close,
    })
}

/// Turns an absolute-form target (`http://host/path?q`) into origin-form.
fn origin_form(target: &str) -> String {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"));
    match rest {
        Some(rest) => match rest.find('/') {
            Some(slash) => rest[slash..].to_owned(),
            None => "/".to_owned(),
        },
        None => target.to_owned(),
    }
}

/// Replaces the value of every `access_token` query parameter.
fn redact_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if key.eq_ignore_ascii_case("access_token")
                    || key.eq_ignore_ascii_case("access%5Ftoken") =>
            {
                format!("{key}=REDACTED")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

// ---------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------

struct UpstreamResponse {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl UpstreamResponse {
    /// The response as sent to the client: hop-by-hop headers dropped, the
    /// body de-chunked with a correct `Content-Length`. With `truncate`, only
    /// the first half of the body is included (the length stays the real one).
    fn to_client_bytes(&self, method: &str, close: bool, truncate: bool) -> Vec<u8> {
        let connection_listed: Vec<String> = self
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, value)| value.split(','))
            .map(|token| token.trim().to_ascii_lowercase())
            .collect();
        let bodiless = method.eq_ignore_ascii_case("HEAD") || status_has_no_body(self.status);
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            let hop_by_hop =
                HOP_BY_HOP.contains(&lower.as_str()) || connection_listed.contains(&lower);
            let keep_length = lower == "content-length" && bodiless;
            if hop_by_hop || (lower == "content-length" && !keep_length) {
                continue;
            }
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !bodiless {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str(if close {
            "Connection: close\r\n\r\n"
        } else {
            "Connection: keep-alive\r\n\r\n"
        });
        let mut bytes = head.into_bytes();
        if !bodiless {
            let end = if truncate {
                self.body.len() / 2
            } else {
                self.body.len()
            };
            bytes.extend_from_slice(&self.body[..end]);
        }
        bytes
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn status_has_no_body(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

fn fetch_upstream(
    shared: &Shared,
    request: &Request,
    client: &TcpStream,
) -> Result<UpstreamResponse, Failure> {
    let addr = *lock(&shared.upstream);
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|error| Failure::Upstream(format!("connect to {addr}: {error}")))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(POLL))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .map_err(Failure::Io)?;

    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\n",
        request.method, request.target
    );
    for (name, value) in &request.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str())
            || matches!(lower.as_str(), "host" | "content-length" | "expect")
        {
            continue;
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !request.body.is_empty() || header(&request.headers, "content-length").is_some() {
        head.push_str(&format!("Content-Length: {}\r\n", request.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&request.body);
    (&stream)
        .write_all(&bytes)
        .map_err(|error| Failure::Upstream(format!("send request to {addr}: {error}")))?;

    let mut upstream = Conn::new(stream, shared, Some(client));
    let (status, reason, headers) = loop {
        let head = match upstream.read_head() {
            Ok(head) => head,
            Err(Failure::Eof) => {
                return Err(Failure::Upstream(
                    "upstream closed the connection without a response".into(),
                ));
            }
            Err(other) => return Err(other),
        };
        let head = String::from_utf8_lossy(&head);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let malformed = || Failure::Upstream(format!("malformed status line {status_line:?}"));
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|code| code.parse().ok())
            .ok_or_else(malformed)?;
        if !version.starts_with("HTTP/1.") || !(100..1000).contains(&status) {
            return Err(malformed());
        }
        let reason = parts.next().unwrap_or_default().to_owned();
        let headers = parse_headers(lines)
            .ok_or_else(|| Failure::Upstream("malformed upstream header".into()))?;
        if status == 101 {
            return Err(Failure::Upstream("upstream switched protocols".into()));
        }
        if (100..200).contains(&status) {
            continue; // Interim response; the real one follows.
        }
        break (status, reason, headers);
    };

    let body = if request.method.eq_ignore_ascii_case("HEAD") || status_has_no_body(status) {
        Vec::new()
    } else if let Some(encoding) = header(&headers, "transfer-encoding") {
        let last = encoding.rsplit(',').next().unwrap_or_default().trim();
        if last.eq_ignore_ascii_case("chunked") {
            read_chunked(&mut upstream)?
        } else {
            upstream.read_to_end()?
        }
    } else {
        match content_length(&headers) {
            Ok(Some(length)) => upstream
                .read_exact(length)
                .map_err(|failure| match failure {
                    Failure::Eof => Failure::Upstream(format!(
                        "upstream closed the connection before {length} body bytes"
                    )),
                    other => other,
                })?,
            Ok(None) => upstream.read_to_end()?,
            Err(()) => return Err(Failure::Upstream("invalid upstream Content-Length".into())),
        }
    };
    Ok(UpstreamResponse {
        status,
        reason,
        headers,
        body,
    })
}

fn read_chunked(upstream: &mut Conn<'_>) -> Result<Vec<u8>, Failure> {
    let premature = |failure| match failure {
        Failure::Eof => Failure::Upstream("upstream closed the connection mid-chunk".into()),
        other => other,
    };
    let mut body = Vec::new();
    loop {
        let line = upstream.read_line().map_err(premature)?;
        let line = String::from_utf8_lossy(&line);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| Failure::Upstream(format!("bad chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailers, up to an empty line. Tolerate an upstream that
            // closes right after the last chunk.
            loop {
                match upstream.read_line() {
                    Ok(trailer) if trailer.is_empty() => return Ok(body),
                    Ok(_) => {}
                    Err(Failure::Eof) => return Ok(body),
                    Err(other) => return Err(other),
                }
            }
        }
        body.extend_from_slice(&upstream.read_exact(size).map_err(premature)?);
        let end = upstream.read_line().map_err(premature)?;
        if !end.is_empty() {
            return Err(Failure::Upstream("chunk not followed by CRLF".into()));
        }
    }
}

// ---------------------------------------------------------------------------
// Buffered, stop-aware connection reading
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Failure {
    /// The peer closed its side.
    Eof,
    /// The proxy is being dropped.
    Stopped,
    /// While waiting for the upstream, the client went away.
    ClientGone,
    /// A head exceeded `MAX_HEAD` or a line exceeded `MAX_LINE`.
    TooLarge,
    /// Answer the client with this status and message, then close.
    Reject(u16, &'static str),
    /// Something wrong with the upstream.
    Upstream(String),
    Io(io::Error),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Eof => "connection closed".into(),
            Failure::Stopped => "proxy stopped".into(),
            Failure::ClientGone => "client closed the connection".into(),
            Failure::TooLarge => "upstream response head too large".into(),
            Failure::Reject(status, message) => format!("{status} {message}"),
            Failure::Upstream(message) => message.clone(),
            Failure::Io(error) => format!("upstream I/O error: {error}"),
        }
    }
}

struct Conn<'a> {
    stream: TcpStream,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
    shared: &'a Shared,
    /// While reading (from the upstream), give up if this peer goes away.
    watch: Option<&'a TcpStream>,
}

impl<'a> Conn<'a> {
    fn new(stream: TcpStream, shared: &'a Shared, watch: Option<&'a TcpStream>) -> Conn<'a> {
        Conn {
            stream,
            buf: Vec::new(),
            shared,
            watch,
        }
    }

    /// Reads at least one more byte into `buf`.
    fn fill(&mut self) -> Result<(), Failure> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if self.shared.stopped() {
                return Err(Failure::Stopped);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Failure::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(error) if is_timeout(&error) => {
                    if self.watch.is_some_and(peer_gone) {
                        return Err(Failure::ClientGone);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(Failure::Io(error)),
            }
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// Reads a head including its terminating empty line. `Failure::Eof` if
    /// the peer closed before sending anything.
    fn read_head(&mut self) -> Result<Vec<u8>, Failure> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = find(&self.buf[scanned..], b"\r\n\r\n") {
                let end = scanned + pos + 4;
                if end > MAX_HEAD {
                    return Err(Failure::TooLarge);
                }
                return Ok(self.take(end));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Failure::TooLarge);
            }
            scanned = self.buf.len().saturating_sub(3);
            match self.fill() {
                Ok(()) => {}
                Err(Failure::Eof) if !self.buf.is_empty() => {
                    return Err(Failure::Upstream("connection closed mid-head".into()));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Reads a line, without its line ending.
    fn read_line(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&byte| byte == b'\n') {
                let mut line = self.take(pos + 1);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(Failure::TooLarge);
            }
            self.fill()?;
        }
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, Failure> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.take(n))
    }

    fn read_to_end(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            match self.fill() {
                Ok(()) => {}
                Err(Failure::Eof) => return Ok(std::mem::take(&mut self.buf)),
                Err(other) => return Err(other),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether the peer has closed (or reset) its side. Data waiting to be read
/// (e.g. a pipelined request) counts as alive. A peer that only shut down its
/// writing half counts as gone.
fn peer_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let gone = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !is_timeout(&error) && error.kind() != io::ErrorKind::Interrupted,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

/// Half-close, then give the client a moment to close its side so that no
/// unread data turns our close into a reset that could discard what we sent.
fn close_gracefully(stream: &TcpStream, shared: &Shared) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut reader = stream;
    while Instant::now() < deadline && !shared.stopped() {
        match reader.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if is_timeout(&error) || error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Closes the connection abruptly: a TCP RST where `SO_LINGER` can be set.
fn abort_connection(stream: &TcpStream) {
    if !set_linger_zero(stream) {
        let _ = stream.shutdown(Shutdown::Both);
    }
    // The caller drops the stream, which closes the socket.
}

#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
))]
fn set_linger_zero(stream: &TcpStream) -> bool {
    use std::ffi::{c_int, c_void};
    use std::os::fd::AsRawFd;

    #[cfg(any(target_os = "linux", target_os = "android"))]
    const SOL_SOCKET: c_int = 1;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const SO_LINGER: c_int = 13;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const SOL_SOCKET: c_int = 0xffff;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const SO_LINGER: c_int = 0x0080;

    #[repr(C)]
    struct Linger {
        l_onoff: c_int,
        l_linger: c_int,
    }

    unsafe extern "C" {
        fn setsockopt(
            socket: c_int,
            level: c_int,
            name: c_int,
            value: *const c_void,
            len: u32,
        ) -> c_int;
    }

    let linger = Linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid `struct linger` for the duration of the
    // call, its size is passed alongside, and the descriptor is owned by
    // `stream`, which outlives the call.
    let result = unsafe {
        setsockopt(
            stream.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            (&linger as *const Linger).cast(),
            std::mem::size_of::<Linger>() as u32,
        )
    };
    result == 0
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
)))]
fn set_linger_zero(_stream: &TcpStream) -> bool {
    false
}

// ---------------------------------------------------------------------------
// HTTP parsing and formatting
// ---------------------------------------------------------------------------

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Option<Vec<(String, String)>> {
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return None; // Obsolete line folding.
        }
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return None;
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Some(headers)
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// Whether a comma-separated header (every occurrence) lists `token`.
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
        .flat_map(|(_, value)| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// `Ok(None)` without the header; `Err` if invalid or inconsistent.
fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, ()> {
    let mut found = None;
    for (_, value) in headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(());
            }
            let length: usize = item.parse().map_err(|_| ())?;
            if found.is_some_and(|previous| previous != length) {
                return Err(());
            }
            found = Some(length);
        }
    }
    Ok(found)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn matrix_error(errcode: &str, error: &str) -> String {
    format!(r#"{{"errcode":"{errcode}","error":"{error}"}}"#)
}

/// Body for an injected status: what nginx would say for gateway errors,
/// a Matrix error otherwise.
fn status_body(status: u16) -> (&'static str, String) {
    match status {
        502..=504 => {
            let title = format!("{status} {}", reason_phrase(status));
            (
                "text/html",
                format!(
                    "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
                     <center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n\
                     </body>\r\n</html>\r\n"
                ),
            )
        }
        500 => (
            "application/json",
            matrix_error("M_UNKNOWN", "Internal server error"),
        ),
        _ => (
            "application/json",
            matrix_error("M_UNKNOWN", reason_phrase(status)),
        ),
    }
}

fn simple_response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
    close: bool,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}
