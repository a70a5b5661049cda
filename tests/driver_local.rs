//! The driver and the `tail` example where no homeserver is needed: a closed loopback port.

mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::connect_proxy::ConnectProxy;
use support::fake_server::{FakeServer, Response};
use support::service::tail_binary;

use matrix_sync_service::{
    start, start_with, BackoffPolicy, Config, ConfigError, DriverConfig, ErrorClass, Failure,
    ServiceError, StartError, SyncState, TransportErrorKind,
};

/// A loopback URL nothing listens on.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn errors_never_block_the_sync_and_the_oldest_are_dropped_and_counted() {
    let mut config = Config::new(closed_port_url(), "token");
    let mut driver = DriverConfig::new();
    driver.error_channel_capacity = 2;
    config.backoff = BackoffPolicy::default()
        .with_initial(Duration::from_millis(1))
        .with_max(Duration::from_millis(5));
    let service = start_with(config, driver).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.dropped_errors() < 5 {
        assert!(
            Instant::now() < deadline,
            "errors kept flowing without a reader"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        service.errors().len(),
        2,
        "the channel holds the newest two"
    );
    assert_eq!(service.state(), SyncState::BackingOff);
    let Ok(ServiceError::Sync(error)) = service.errors().recv() else {
        panic!("a sync error")
    };
    assert_eq!(error.class, ErrorClass::Transient);
    assert!(
        error.attempt > 5,
        "an old report was dropped, this is a newer one: {}",
        error.attempt
    );
    let Failure::Transport(failure) = &error.failure else {
        panic!("{error}")
    };
    assert_eq!(failure.kind, TransportErrorKind::Connect);
    service.stop();
    service.join().unwrap();
    assert_eq!(service.state(), SyncState::Stopped);
}

#[test]
fn stop_during_a_backoff_wait_is_immediate() {
    let mut config = Config::new(closed_port_url(), "token");
    config.backoff = BackoffPolicy::default()
        .with_initial(Duration::from_secs(30))
        .with_max(Duration::from_secs(60))
        .with_jitter(0.0);
    let service = start(config).unwrap();
    let Ok(ServiceError::Sync(error)) = service.errors().recv_timeout(Duration::from_secs(5))
    else {
        panic!("a first failure")
    };
    assert_eq!(error.delay, Duration::from_secs(30));
    let started = Instant::now();
    service.stop();
    service.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert!(service.events().recv().is_err(), "events closed");
}

#[test]
fn start_refuses_bad_configurations_field_by_field() {
    let bad = |config: Config| match start(config) {
        Err(StartError::Config(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        bad(Config::new("http://127.0.0.1:1", "")),
        ConfigError::MissingAccessToken
    );
    assert_eq!(
        bad(Config::new("http://matrix.example.org", "t")),
        ConfigError::InsecureHttp
    );
    assert!(matches!(
        bad(Config::new("matrix.example.org", "t")),
        ConfigError::InvalidHomeserver { .. }
    ));
    assert!(matches!(
        bad(Config::new("ftp://matrix.example.org", "t")),
        ConfigError::InvalidHomeserver { .. }
    ));
    let mut config = Config::new("https://matrix.example.org", "t");
    config.long_poll_timeout = Duration::from_secs(86_400 * 365);
    assert!(matches!(
        bad(config),
        ConfigError::DurationOutOfRange {
            field: "long_poll_timeout",
            ..
        }
    ));
    let mut driver = DriverConfig::new();
    driver.event_channel_capacity = 0;
    assert!(matches!(
        start_with(Config::new("https://matrix.example.org", "t"), driver),
        Err(StartError::Config(ConfigError::Invalid {
            field: "event_channel_capacity",
            ..
        }))
    ));
    let mut config = Config::new("http://matrix.example.org", "t");
    config.allow_insecure_http = true;
    let service = start(config).expect("explicit opt-in");
    service.stop();
}

#[test]
fn tail_rejects_bad_arguments_and_a_missing_token_with_one_line_and_exit_2() {
    let run = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(tail_binary());
        command
            .args(args)
            .env_remove("MATRIX_ACCESS_TOKEN")
            .env_remove("MATRIX_HOMESERVER");
        if let Some(token) = token {
            command.env("MATRIX_ACCESS_TOKEN", token);
        }
        let output = command
            .output()
            .expect("the tail example is built by cargo test");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        assert!(output.stdout.is_empty());
        stderr
    };
    let url = closed_port_url();
    assert!(run(&["--homeserver", &url], None).contains("MATRIX_ACCESS_TOKEN"));
    assert!(run(&["--bogus"], Some("t")).contains("--bogus"));
    assert!(run(&[], Some("t")).contains("--homeserver"));
    assert!(run(&["--homeserver", &url, "--timeline-limit", "x"], Some("t")).contains("number"));
    assert!(run(&["--homeserver", "not a url"], Some("t")).contains("homeserver"));
    let secret = "syt_very_secret";
    let out = run(&["--homeserver", "http://example.org"], Some(secret));
    assert!(!out.contains(secret), "the token never shows: {out}");
}

/// Runs `tail` against `homeserver` with `HTTP_PROXY` set to `proxy` for `how_long`, then
/// kills it; returns its stderr.
fn tail_through_proxy(homeserver: &str, proxy: &str, how_long: Duration) -> String {
    let mut child = Command::new(tail_binary())
        .args(["--homeserver", homeserver, "--timeout-ms", "200"])
        .env("MATRIX_ACCESS_TOKEN", "token")
        .env_remove("ALL_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("NO_PROXY")
        .env("HTTP_PROXY", proxy)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(how_long);
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The driver's documented proxy limit (`DriverConfig::proxy_from_env`): a plain `http://`
/// homeserver is reached through an HTTP proxy by a `CONNECT` tunnel, not in absolute form; a
/// proxy that tunnels only to port 443 refuses it, which is reported as a connect failure
/// naming the `CONNECT`, backed off from, and the homeserver never sees a request.
#[test]
fn an_http_proxy_is_asked_to_connect_even_for_plain_http_and_a_refusal_is_reported_and_backed_off()
{
    let server = FakeServer::start(|_| Response::json(200, r#"{"next_batch":"s1"}"#));
    let target = server.url().trim_start_matches("http://").to_owned();

    let open = ConnectProxy::start();
    tail_through_proxy(&server.url(), &open.url(), Duration::from_secs(2));
    assert!(open.tunnels_to(&target) >= 1, "{:?}", open.tunnels());
    assert!(server.requests() >= 1, "the tunnel reached the homeserver");

    let strict = ConnectProxy::start_ssl_ports_only();
    let reached = server.requests();
    let stderr = tail_through_proxy(&server.url(), &strict.url(), Duration::from_secs(3));
    let refused = strict.refused_to(&target);
    // The default backoff starts at 500 ms (jitter 50 %) and doubles: at most 4 or 5 attempts
    // in 3 s, not a loop.
    assert!((1..=5).contains(&refused), "{refused} refused CONNECTs");
    assert_eq!(
        server.requests(),
        reached,
        "the homeserver was never reached"
    );
    assert!(
        stderr.contains("Connect") && stderr.contains("CONNECT proxy failed"),
        "{stderr}"
    );
}
