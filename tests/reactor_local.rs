//! The reactor against loopback servers of the test's own: the body cap enforced while
//! reading, a request's deadline enforced on a server that never answers, the proxy of
//! the environment (`https` through a `CONNECT` tunnel, plain `http` in absolute form, with
//! the proxy's credentials), and acknowledged checkpoints (an account holding its next sync
//! until its checkpoint is stored, the others going on).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use matrix_sync_service::reactor::{self, Reactor, ReactorConfig};
use matrix_sync_service::{Config, EventKind, Failure};
use matrix_sync_testkit::fake_server::{FakeServer, Response};
use matrix_sync_testkit::tls::TlsTerminator;

const SYNC_BODY: &str = r#"{"next_batch":"s1","rooms":{"join":{"!r:example.org":{"timeline":{"events":[
    {"type":"m.room.message","event_id":"$e1","sender":"@a:example.org",
     "origin_server_ts":1,"content":{"msgtype":"m.text","body":"hi"}}]}}}}}"#;

fn sync_server() -> FakeServer {
    FakeServer::start(|request| {
        assert!(request.path().ends_with("/v3/sync"), "{}", request.target);
        Response::json(200, SYNC_BODY)
    })
}

/// The first error of account `key`, within ten seconds.
fn first_error(reactor: &Reactor<String>, key: &str) -> Failure {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = reactor
            .errors()
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no error of {key}: {e}"));
        if error.account == key {
            return error.error.failure;
        }
    }
}

#[test]
fn a_body_over_the_cap_is_refused_and_a_server_that_never_answers_costs_its_deadline() {
    let big = FakeServer::start(|_| {
        Response::json(200, format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024)))
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", listener.local_addr().unwrap());
    let closed = Arc::new(AtomicBool::new(false));
    let seen_closed = closed.clone();
    thread::spawn(move || {
        // Accepts, reads, never answers; notes when the client closes the connection.
        for mut stream in listener.incoming().map_while(Result::ok) {
            let closed = seen_closed.clone();
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        closed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });

    let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    let mut capped = Config::new(big.url(), "token");
    capped.max_body_bytes = 1024;
    reactor.add("capped".to_owned(), capped).unwrap();
    let mut silent = Config::new(silent_url, "token");
    silent.initial_sync_deadline = Duration::from_millis(300);
    let started = Instant::now();
    reactor.add("silent".to_owned(), silent).unwrap();

    assert_eq!(
        first_error(&reactor, "capped"),
        Failure::BodyTooLarge { limit: 1024 }
    );
    let failure = first_error(&reactor, "silent");
    assert!(
        matches!(failure, Failure::DeadlineExceeded(_)),
        "{failure:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closed.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the aborted request's connection stayed open"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        reactor.events().try_recv().is_err(),
        "no event came of either"
    );
    reactor.stop();
    reactor.join().unwrap();
}

/// What the proxy saw: request lines (`CONNECT host:port HTTP/1.1`, or an absolute-form
/// request line) and their `Proxy-Authorization` values.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    authorizations: Vec<Option<String>>,
}

/// A loopback HTTP proxy: `CONNECT` opens a tunnel; an absolute-form request is forwarded to
/// its origin in origin form (answers with a `Content-Length`, as the fake server's are).
fn start_proxy() -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://user:pass@{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let record = record.clone();
            thread::spawn(move || {
                let _ = serve_proxy(client, &record);
            });
        }
    });
    (url, seen)
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn serve_proxy(client: TcpStream, seen: &Mutex<Seen>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    loop {
        let head = read_head(&mut reader)?;
        let request_line = head[0].clone();
        let authorization = head
            .iter()
            .find_map(|h| {
                h.strip_prefix("Proxy-Authorization: ")
                    .or_else(|| h.strip_prefix("proxy-authorization: "))
            })
            .map(str::to_owned);
        {
            let mut seen = seen.lock().unwrap();
            seen.lines.push(request_line.clone());
            seen.authorizations.push(authorization);
        }
        let mut parts = request_line.split(' ');
        let (method, target) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        if method == "CONNECT" {
            let upstream = TcpStream::connect(target)?;
            writer.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
            let (mut up_read, mut up_write) = (upstream.try_clone()?, upstream);
            let mut down = writer.try_clone()?;
            thread::spawn(move || std::io::copy(&mut up_read, &mut down));
            std::io::copy(&mut reader, &mut up_write)?;
            return Ok(());
        }
        let rest = target.strip_prefix("http://").expect("absolute form");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut upstream = TcpStream::connect(authority)?;
        let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
        for header in &head[1..] {
            if !header
                .to_ascii_lowercase()
                .starts_with("proxy-authorization:")
            {
                forwarded.push_str(header);
                forwarded.push_str("\r\n");
            }
        }
        forwarded.push_str("\r\n");
        upstream.write_all(forwarded.as_bytes())?;
        let mut up = BufReader::new(upstream);
        let answer = read_head(&mut up)?;
        let length: usize = answer
            .iter()
            .find_map(|h| {
                h.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        up.read_exact(&mut body)?;
        writer.write_all((answer.join("\r\n") + "\r\n\r\n").as_bytes())?;
        writer.write_all(&body)?;
    }
}

/// The first checkpoint of each of `keys`, within ten seconds.
fn until_checkpoints(reactor: &Reactor<String>, keys: &[&str]) {
    let mut left: Vec<&str> = keys.to_vec();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let tagged = match reactor.events().recv_timeout(wait) {
            Ok(tagged) => tagged,
            Err(e) => {
                let errors: Vec<String> = reactor
                    .errors()
                    .try_iter()
                    .map(|e| format!("{}: {}", e.account, e.error))
                    .collect();
                panic!("no checkpoint of {left:?} ({e}); errors: {errors:#?}");
            }
        };
        if matches!(tagged.event.kind, EventKind::Checkpoint(_)) {
            left.retain(|k| *k != tagged.account);
        }
    }
}

#[test]
fn through_the_environment_s_proxy_https_by_connect_and_http_in_absolute_form() {
    let plain = sync_server();
    let behind_tls = sync_server();
    let terminator = TlsTerminator::start(
        behind_tls
            .url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap(),
    );
    let (proxy_url, seen) = start_proxy();
    // The only test of this binary that reads the environment; the others turn it off.
    std::env::set_var("ALL_PROXY", &proxy_url);
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let config = ReactorConfig::new()
        .add_ca_pem(terminator.ca_pem().as_bytes())
        .unwrap();
    let reactor = reactor::start(config).unwrap();
    std::env::remove_var("ALL_PROXY");
    reactor
        .add("plain".to_owned(), Config::new(plain.url(), "token"))
        .unwrap();
    reactor
        .add(
            "tls".to_owned(),
            Config::new(terminator.base_url(), "token"),
        )
        .unwrap();
    until_checkpoints(&reactor, &["plain", "tls"]);
    reactor.stop();
    reactor.join().unwrap();

    let seen = seen.lock().unwrap();
    let connect = format!("CONNECT 127.0.0.1:{} HTTP/1.1", terminator.port());
    assert!(seen.lines.contains(&connect), "{:#?}", seen.lines);
    let absolute = format!("GET {}/_matrix/client/v3/sync?", plain.url());
    assert!(
        seen.lines.iter().any(|l| l.starts_with(&absolute)),
        "{:#?}",
        seen.lines
    );
    // user:pass, as Basic credentials, on both kinds of request.
    assert!(
        seen.authorizations
            .iter()
            .all(|a| a.as_deref() == Some("Basic dXNlcjpwYXNz")),
        "{:?}",
        seen.authorizations
    );
    assert!(terminator.handshakes() >= 1);
    // Nothing reached the servers but through the proxy: the plain server's requests came
    // in origin form from the proxy.
    assert!(plain.requests() >= 1);
    assert!(behind_tls.requests() >= 1);
}

#[test]
fn refreshed_credentials_are_stored_before_use_and_set_access_token_reaches_one_account() {
    use matrix_sync_service::RefreshToken;
    let stored: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let used_before_stored = Arc::new(AtomicBool::new(false));
    let (store_view, flag) = (stored.clone(), used_before_stored.clone());
    let server = FakeServer::start(move |request| {
        let bearer = request
            .header("authorization")
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
            .to_owned();
        if request.path().ends_with("/v3/refresh") {
            return Response::json(200, r#"{"access_token":"new","refresh_token":"rt-2"}"#);
        }
        if bearer == "new" && !store_view.lock().unwrap().iter().any(|(_, t)| t == "new") {
            flag.store(true, Ordering::SeqCst);
        }
        match bearer.as_str() {
            "old" => Response::json(401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"expired"}"#),
            _ => Response::json(200, r#"{"next_batch":"s1"}"#),
        }
    });
    let store = stored.clone();
    let options = ReactorConfig::new().proxy_from_env(false).on_credentials(
        move |key: &String, credentials| {
            let token = credentials.access_token.expose().to_owned();
            store.lock().unwrap().push((key.clone(), token));
            Ok(())
        },
    );
    let reactor = reactor::start(options).unwrap();
    let mut refreshing = Config::new(server.url(), "old");
    refreshing.refresh_token = Some(RefreshToken::new("rt-1"));
    reactor.add("refreshing".to_owned(), refreshing).unwrap();
    reactor
        .add("other".to_owned(), Config::new(server.url(), "other-token"))
        .unwrap();
    until_checkpoints(&reactor, &["refreshing", "other"]);
    assert_eq!(
        *stored.lock().unwrap(),
        [("refreshing".to_owned(), "new".to_owned())]
    );
    assert!(!used_before_stored.load(Ordering::SeqCst));

    reactor
        .set_access_token(&"other".to_owned(), "newer")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .log()
        .iter()
        .any(|r| r.header("authorization") == Some("Bearer newer"))
    {
        assert!(Instant::now() < deadline, "the new token was never used");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(reactor.set_access_token(&"nobody".to_owned(), "x").is_err());
    reactor.stop();
    reactor.join().unwrap();
}

#[test]
fn a_panic_on_the_loop_thread_ends_every_account_and_reaches_join() {
    use matrix_sync_service::reactor::ReactorError;
    use matrix_sync_service::RefreshToken;
    let server = FakeServer::start(|request| {
        if request.path().ends_with("/v3/refresh") {
            return Response::json(200, r#"{"access_token":"new","refresh_token":"rt-2"}"#);
        }
        match request.header("authorization") {
            Some("Bearer old") => {
                Response::json(401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"expired"}"#)
            }
            _ => Response::json(200, r#"{"next_batch":"s1"}"#),
        }
    });
    // The application's callback runs on the loop thread: its panic ends the reactor.
    let options = ReactorConfig::new()
        .proxy_from_env(false)
        .on_credentials(|_: &String, _| panic!("the store is broken"));
    let reactor = reactor::start(options).unwrap();
    reactor
        .add("bystander".to_owned(), Config::new(server.url(), "fine"))
        .unwrap();
    let mut refreshing = Config::new(server.url(), "old");
    refreshing.refresh_token = Some(RefreshToken::new("rt-1"));
    reactor.add("refreshing".to_owned(), refreshing).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reactor.is_finished() {
        assert!(Instant::now() < deadline, "the reactor did not end");
        thread::sleep(Duration::from_millis(10));
    }
    let joined = reactor.join();
    assert!(
        matches!(&joined, Err(ReactorError::Panicked(m)) if m == "the store is broken"),
        "{joined:?}"
    );
    let mut ended: Vec<String> = reactor.ended().try_iter().collect();
    ended.sort();
    assert_eq!(ended, ["bystander", "refreshing"]);
    // Drained, the events channel reports the end.
    while reactor.events().try_recv().is_ok() {}
    assert!(reactor.events().recv().is_err());
}

#[test]
fn a_server_that_floods_its_account_does_not_starve_another() {
    // An endless chunked body, as fast as the socket takes it: the flooded account reads it
    // until its body cap (128 MiB), a bounded share per turn of the loop.
    const CAP: u64 = 128 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let flood_url = format!("http://{}", listener.local_addr().unwrap());
    let flooded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = flooded.clone();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let count = count.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if read_head(&mut reader).is_err() {
                    return;
                }
                let mut stream = stream;
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                while stream.write_all(chunk.as_bytes()).is_ok() {
                    count.fetch_add(0x10000, Ordering::SeqCst);
                }
            });
        }
    });
    let other = sync_server();

    let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    let mut flood = Config::new(flood_url, "token");
    flood.max_body_bytes = CAP;
    reactor.add("flooded".to_owned(), flood).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while flooded.load(Ordering::SeqCst) < 4 << 20 {
        assert!(Instant::now() < deadline, "the flood never got going");
        thread::sleep(Duration::from_millis(1));
    }
    reactor
        .add("other".to_owned(), Config::new(other.url(), "token"))
        .unwrap();
    until_checkpoints(&reactor, &["other"]);
    let during = flooded.load(Ordering::SeqCst);
    // The flooded account was still reading its body: a loop that served it until its
    // socket ran dry would have reached the cap (and reported it) first.
    let errors: Vec<String> = reactor
        .errors()
        .try_iter()
        .map(|e| format!("{}: {}", e.account, e.error))
        .collect();
    assert!(
        errors.iter().all(|e| !e.starts_with("flooded")),
        "the flood's cap came first: {errors:?}"
    );
    assert!((during as u64) < CAP, "{during} bytes flooded already");
    // And it does end at the cap.
    let failure = first_error(&reactor, "flooded");
    assert_eq!(failure, Failure::BodyTooLarge { limit: CAP });
    reactor.stop();
    reactor.join().unwrap();
}

#[test]
fn server_discovery_moves_the_account_to_the_homeserver_it_names() {
    // The server name's well-known names another server: the account's connection moves.
    let homeserver = FakeServer::start(|request| match request.path() {
        "/_matrix/client/versions" => Response::json(200, r#"{"versions":["v1.11"]}"#),
        _ => Response::json(200, SYNC_BODY),
    });
    let base_url = homeserver.url();
    let name_server = FakeServer::start(move |request| {
        assert_eq!(request.path(), "/.well-known/matrix/client");
        Response::json(
            200,
            format!(r#"{{"m.homeserver":{{"base_url":"{base_url}"}}}}"#),
        )
    });
    let server_name = name_server.url().trim_start_matches("http://").to_owned();
    let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    let config = Config::discover(&server_name, "token").unwrap();
    reactor.add("discovering".to_owned(), config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut discovered = None;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let tagged = reactor.events().recv_timeout(wait).expect("the first sync");
        match &tagged.event.kind {
            EventKind::Discovered { .. } => discovered = Some(tagged.event.kind.clone()),
            EventKind::Message => assert_eq!(tagged.event.body.as_deref(), Some("hi")),
            EventKind::Checkpoint(_) => break,
            _ => {}
        }
    }
    assert!(discovered.is_some(), "no Discovered event");
    assert_eq!(name_server.requests(), 1);
    let paths: Vec<String> = homeserver
        .log()
        .iter()
        .map(|r| r.path().to_owned())
        .collect();
    assert_eq!(paths[0], "/_matrix/client/versions");
    assert!(paths[1].ends_with("/v3/sync"), "{paths:?}");
    // Two origins, two connections.
    assert_eq!(reactor.connections_opened(), 2);
    reactor.stop();
    reactor.join().unwrap();
}

/// A homeserver whose every `/sync` answer holds one message and a new `next_batch`:
/// `<prefix>1` for the first sync, `<prefix>N+1` for `since=<prefix>N`, after `delay` (a
/// long-poll's pace, so that a busy account does not flood the events channel).
fn counting_server(prefix: &'static str, delay: Duration) -> FakeServer {
    FakeServer::start(move |request| {
        assert!(request.path().ends_with("/v3/sync"), "{}", request.target);
        thread::sleep(delay);
        let n: u64 = request
            .query("since")
            .map(|since| {
                since
                    .strip_prefix(prefix)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("a since of another server: {since}"))
            })
            .unwrap_or(0);
        let body = format!(
            r#"{{"next_batch":"{prefix}{next}","rooms":{{"join":{{"!r:example.org":{{"timeline":{{"events":[
                {{"type":"m.room.message","event_id":"$e{next}","sender":"@a:example.org",
                 "origin_server_ts":1,"content":{{"msgtype":"m.text","body":"batch {next}"}}}}]}}}}}}}}}}"#,
            next = n + 1
        );
        Response::json(200, body)
    })
}

/// The `since` of each sync request `server` received, in order (`None` for the first).
fn sinces(server: &FakeServer) -> Vec<Option<String>> {
    server.log().iter().map(|r| r.query("since")).collect()
}

/// The `next_batch` of each checkpoint received, per account.
type Checkpoints = std::collections::HashMap<String, Vec<String>>;

/// Receives events for `span`, acknowledging at once the checkpoints of the accounts in
/// `acking`, and returns every account's checkpoints.
fn receive_for(reactor: &Reactor<String>, span: Duration, acking: &[&str]) -> Checkpoints {
    receive(reactor, span, acking, |_| false)
}

/// Receives events as [`receive_for`] does until `done` holds, within ten seconds.
fn receive_until(
    reactor: &Reactor<String>,
    acking: &[&str],
    done: impl Fn(&Checkpoints) -> bool,
) -> Checkpoints {
    let checkpoints = receive(reactor, Duration::from_secs(10), acking, &done);
    assert!(done(&checkpoints), "not within 10 s: {checkpoints:?}");
    checkpoints
}

fn receive(
    reactor: &Reactor<String>,
    span: Duration,
    acking: &[&str],
    done: impl Fn(&Checkpoints) -> bool,
) -> Checkpoints {
    let mut checkpoints = Checkpoints::default();
    let until = Instant::now() + span;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || done(&checkpoints) {
            return checkpoints;
        }
        let Ok(tagged) = reactor.events().recv_timeout(left) else {
            continue;
        };
        if let EventKind::Checkpoint(checkpoint) = &tagged.event.kind {
            checkpoints
                .entry(tagged.account.clone())
                .or_default()
                .push(checkpoint.next_batch.clone());
            if acking.contains(&tagged.account.as_str()) {
                reactor
                    .checkpoint_stored(&tagged.account)
                    .expect("the account is followed");
            }
        }
    }
}

/// Waits until `server` has received `n` requests, within ten seconds.
fn until_requests(server: &FakeServer, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.requests() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} requests of {n}; since values {:?}",
            server.requests(),
            sinces(server)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_unacknowledged_checkpoint_holds_its_account_s_next_sync_and_no_other_account() {
    let held = counting_server("a", Duration::ZERO);
    let busy = counting_server("b", Duration::from_millis(20));
    let reactor = reactor::start(
        ReactorConfig::new()
            .proxy_from_env(false)
            .acknowledge_checkpoints(true),
    )
    .unwrap();
    reactor
        .add("held".to_owned(), Config::new(held.url(), "token"))
        .unwrap();
    reactor
        .add("busy".to_owned(), Config::new(busy.url(), "token"))
        .unwrap();

    // "held" is not acknowledged, "busy" at each checkpoint: until the first checkpoint of
    // "held", then 1.5 s more.
    let first = receive_until(&reactor, &["busy"], |seen| seen.contains_key("held"));
    assert_eq!(first["held"], ["a1"]);
    let seen = receive_for(&reactor, Duration::from_millis(1500), &["busy"]);
    assert_eq!(
        seen.get("held"),
        None,
        "another checkpoint of the held account"
    );
    assert_eq!(
        sinces(&held),
        [None],
        "no request after the unacknowledged checkpoint"
    );
    let busy_batches = seen.get("busy").map_or(0, Vec::len);
    assert!(
        busy_batches >= 5,
        "the other account went on syncing: {busy_batches} checkpoints in 1.5 s"
    );
    let acknowledged = first.get("busy").map_or(0, Vec::len) + busy_batches;
    assert!(
        busy.requests() <= acknowledged + 1,
        "one request per acknowledged checkpoint: {} requests, {acknowledged} checkpoints",
        busy.requests()
    );

    // Acknowledged: the next sync starts from that checkpoint, then waits again.
    reactor.checkpoint_stored(&"held".to_owned()).unwrap();
    until_requests(&held, 2, "after the acknowledgement");
    let seen = receive_for(&reactor, Duration::from_millis(700), &["busy"]);
    assert_eq!(
        seen.get("held").map(Vec::as_slice),
        Some(&["a2".to_owned()][..]),
        "{seen:?}"
    );
    assert_eq!(sinces(&held), [None, Some("a1".to_owned())]);

    // Removing an account that waits ends it as any other; an acknowledgement for it is
    // refused from then on.
    reactor.remove(&"held".to_owned()).unwrap();
    loop {
        let ended = reactor
            .ended()
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting account ended");
        if ended == "held" {
            break;
        }
    }
    assert!(matches!(
        reactor.checkpoint_stored(&"held".to_owned()),
        Err(reactor::AccountCommandError::Unknown)
    ));
    assert_eq!(
        held.requests(),
        2,
        "nothing sent after the second checkpoint"
    );
    reactor.stop();
    reactor.join().unwrap();
}

#[test]
fn without_acknowledge_checkpoints_the_next_sync_goes_out_at_once() {
    let server = counting_server("s", Duration::ZERO);
    let reactor = reactor::start(ReactorConfig::new().proxy_from_env(false)).unwrap();
    reactor
        .add("plain".to_owned(), Config::new(server.url(), "token"))
        .unwrap();
    let seen = receive_for(&reactor, Duration::from_millis(300), &[]);
    assert!(
        seen.get("plain").is_some_and(|c| c.len() >= 2),
        "checkpoints without acknowledgements: {seen:?}"
    );
    let sinces = sinces(&server);
    assert_eq!(sinces[..2], [None, Some("s1".to_owned())]);
    // An acknowledgement changes nothing then, and is not refused.
    reactor.checkpoint_stored(&"plain".to_owned()).unwrap();
    reactor.stop();
    reactor.join().unwrap();
}
