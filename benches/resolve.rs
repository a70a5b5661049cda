//! What name resolution costs per request (`BENCHMARKS.md`, section 9): ureq's default
//! resolver, which starts a thread for every look-up when a timeout applies (the driver sets
//! one on every request), against the driver's resolver, which parses an IP address itself.
//!
//! ```text
//! cargo bench --bench resolve [-- ROUNDS]
//! ```
//!
//! Two measurements, each over `ROUNDS` (default 5,000) alternating samples:
//! * the resolve step alone, `Resolver::resolve` with the 30 s remaining a request has;
//! * a whole request: `GET` over one keep-alive connection to a loopback server that answers
//!   `{}` at once, through an agent configured as the driver's, with each resolver.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use matrix_sync_service::LiteralFirst;
use ureq::unversioned::resolver::{DefaultResolver, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let port = serve();
    let uri: ureq::http::Uri = format!("http://127.0.0.1:{port}/_matrix/client/v3/sync")
        .parse()
        .unwrap();
    let by_name: ureq::http::Uri = format!("http://localhost:{port}/").parse().unwrap();
    let config = ureq::Agent::config_builder().build();
    let timeout = NextTimeout {
        after: TIMEOUT.into(),
        ..NextTimeout::default()
    };

    let default = DefaultResolver::default();
    let literal = LiteralFirst::default();
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(time(|| default.resolve(&uri, &config, timeout).unwrap()));
        b.push(time(|| literal.resolve(&uri, &config, timeout).unwrap()));
        c.push(time(|| {
            literal.resolve(&by_name, &config, timeout).unwrap()
        }));
    }
    println!("resolve step alone, {rounds} samples each (min / median / max):");
    report("  ureq DefaultResolver, 127.0.0.1", a);
    report("  driver resolver,      127.0.0.1", b);
    report("  driver resolver,      localhost (ureq's thread)", c);

    let default_agent = ureq::Agent::with_parts(
        driver_like(),
        DefaultConnector::default(),
        DefaultResolver::default(),
    );
    let literal_agent = ureq::Agent::with_parts(
        driver_like(),
        DefaultConnector::default(),
        LiteralFirst::default(),
    );
    let url = uri.to_string();
    let get = |agent: &ureq::Agent| {
        let request = ureq::http::Request::get(&url).body(()).unwrap();
        let request = agent
            .configure_request(request)
            .timeout_global(Some(TIMEOUT))
            .build();
        let mut response = agent.run(request).unwrap();
        response.body_mut().read_to_vec().unwrap()
    };
    get(&default_agent);
    get(&literal_agent);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(time(|| get(&default_agent)));
        b.push(time(|| get(&literal_agent)));
    }
    println!("whole keep-alive request to 127.0.0.1, {rounds} samples each:");
    report("  ureq DefaultResolver", a);
    report("  driver resolver     ", b);
}

/// The driver agent's settings (src/driver.rs, `new_agent`) that bear on a request.
fn driver_like() -> ureq::config::Config {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_resolve(Some(Duration::from_secs(10)))
        .max_redirects(0)
        .build()
}

fn time<T>(f: impl FnOnce() -> T) -> Duration {
    let started = Instant::now();
    std::hint::black_box(f());
    started.elapsed()
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what}: {:.1} / {:.1} / {:.1} µs",
        us(samples[0]),
        us(samples[samples.len() / 2]),
        us(samples[samples.len() - 1])
    );
}

/// A loopback server answering every request on a connection with `{}`; returns its port.
fn serve() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                            if writer.write_all(answer).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    port
}
