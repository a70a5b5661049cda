//! `many_accounts`: many Matrix accounts followed by one thread, one `SyncMachine` each, through
//! the crate's reactor (`matrix_sync_service::reactor`).
//!
//! ```text
//! cargo run --release --example many_accounts -- --homeserver URL --tokens FILE \
//!     [--timeout-ms N] [--filter JSON] [--ca-file PEM]
//! ```
//!
//! `FILE` holds one access token per line (blank lines and lines starting with `#` are
//! skipped). Every event of every account goes to stdout as one JSON object per line, the
//! shape `tail` prints, plus `"account"`: the user id the token belongs to. State changes and
//! errors go to stderr, one line each, prefixed with the account. SIGINT or SIGTERM stop it
//! (exit status 0); bad arguments exit with 2, a runtime failure (stdout closed, no account
//! left) with 1.
//!
//! The user id comes from `GET /_matrix/client/v3/account/whoami`, asked for every token
//! before the reactor starts (blocking `ureq`, a few threads); an account whose token is
//! refused is reported on stderr and left out. Each account is then added to the reactor under
//! its user id, and the events come back tagged with it.
//!
//! Stdout is written with blocking writes, flushed whenever no event waits: a consumer that
//! stops reading stalls every account, as it should (events are not dropped).

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{select, Receiver};
use matrix_sync_service::reactor::{self, AccountEvent, Reactor, ReactorConfig};
use matrix_sync_service::{CaCertificate, Config, Event, SyncFilter};

const USAGE: &str = "usage: many_accounts --homeserver URL --tokens FILE [--timeout-ms N] \
                     [--filter JSON] [--ca-file PEM]";
/// How many whoami requests are in flight at once.
const WHOAMI_THREADS: usize = 16;

struct Args {
    homeserver: String,
    tokens: String,
    timeout_ms: Option<u64>,
    filter: Option<String>,
    ca_file: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut homeserver, mut tokens, mut timeout_ms, mut filter) = (None, None, None, None);
    let mut ca_file = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--homeserver" => homeserver = Some(value("--homeserver")?),
            "--tokens" => tokens = Some(value("--tokens")?),
            "--timeout-ms" => {
                let v = value("--timeout-ms")?;
                timeout_ms = Some(v.parse().map_err(|_| format!("--timeout-ms: {v:?}"))?);
            }
            "--filter" => filter = Some(value("--filter")?),
            "--ca-file" => ca_file = Some(value("--ca-file")?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(Args {
        homeserver: homeserver.ok_or_else(|| format!("missing --homeserver; {USAGE}"))?,
        tokens: tokens.ok_or_else(|| format!("missing --tokens; {USAGE}"))?,
        timeout_ms,
        filter,
        ca_file,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal::Usage(message)) => {
            eprintln!("many_accounts: {message}");
            ExitCode::from(2)
        }
        Err(Fatal::Failed(message)) => {
            eprintln!("many_accounts: {message}");
            ExitCode::from(1)
        }
    }
}

enum Fatal {
    Usage(String),
    Failed(String),
}

fn run() -> Result<(), Fatal> {
    let args = parse_args().map_err(Fatal::Usage)?;
    let text = std::fs::read_to_string(&args.tokens)
        .map_err(|e| Fatal::Usage(format!("--tokens {}: {e}", args.tokens)))?;
    let tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if tokens.is_empty() {
        return Err(Fatal::Usage(format!("--tokens {}: no token", args.tokens)));
    }
    let homeserver = args.homeserver.trim_end_matches('/').to_owned();
    let mut template = Config::new(homeserver.clone(), "template");
    template.filter = args
        .filter
        .as_deref()
        .map(SyncFilter::from_json)
        .transpose()
        .map_err(|e| Fatal::Usage(format!("--filter: {e}")))?;
    if let Some(ms) = args.timeout_ms {
        template.long_poll_timeout = Duration::from_millis(ms);
    }
    template
        .validate()
        .map_err(|e| Fatal::Usage(format!("invalid configuration: {e}")))?;
    let mut options = ReactorConfig::new();
    let mut extra_ca = Vec::new();
    if let Some(path) = &args.ca_file {
        if !homeserver.starts_with("https://") {
            return Err(Fatal::Usage(
                "--ca-file needs an https homeserver".to_owned(),
            ));
        }
        let pem =
            std::fs::read(path).map_err(|e| Fatal::Usage(format!("--ca-file {path}: {e}")))?;
        extra_ca = CaCertificate::from_pem(&pem)
            .map_err(|e| Fatal::Usage(format!("--ca-file {path}: {e}")))?;
        options.extra_ca = extra_ca.clone();
    }

    // Stop on SIGINT or SIGTERM.
    let (signal_tx, signal) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .map_err(|e| Fatal::Failed(format!("signal handler: {e}")))?;

    // Who each token belongs to.
    let agent = whoami_agent(&extra_ca);
    let mut users = vec![None; tokens.len()];
    std::thread::scope(|scope| {
        for (part, users) in users
            .chunks_mut(tokens.len().div_ceil(WHOAMI_THREADS))
            .enumerate()
        {
            let (agent, homeserver, tokens) = (&agent, &homeserver, &tokens);
            scope.spawn(move || {
                let first = part * tokens.len().div_ceil(WHOAMI_THREADS);
                for (j, user) in users.iter_mut().enumerate() {
                    let i = first + j;
                    *user = whoami(agent, homeserver, tokens[i])
                        .map_err(|why| {
                            eprintln!("account #{}: whoami failed, left out: {why}", i + 1)
                        })
                        .ok();
                }
            });
        }
    });
    let reactor: Reactor<String> =
        reactor::start(options).map_err(|e| Fatal::Failed(format!("reactor: {e}")))?;
    let mut added = 0;
    for (i, (token, user)) in tokens.iter().zip(users).enumerate() {
        let Some(user) = user else { continue };
        let mut config = template.clone();
        config.access_token = matrix_sync_service::AccessToken::new(*token);
        config.jitter_seed = i as u64 + 1;
        match reactor.add(user.clone(), config) {
            Ok(()) => added += 1,
            Err(e) => eprintln!("account #{}: {user} not added: {e}", i + 1),
        }
    }
    if added == 0 {
        return Err(Fatal::Failed("no account left".to_owned()));
    }
    let result = print(&reactor, &signal);
    reactor.stop();
    let joined = reactor.join();
    eprintln!(
        "many_accounts: stopping; {} connections opened for {added} accounts",
        reactor.connections_opened()
    );
    for state in reactor.states().try_iter() {
        eprintln!("{} state: {:?}", state.account, state.state);
    }
    joined.map_err(|e| Fatal::Failed(e.to_string()))?;
    result
}

/// Prints every account's events (stdout), errors and states (stderr) until a signal.
fn print(reactor: &Reactor<String>, signal: &Receiver<()>) -> Result<(), Fatal> {
    let mut out = BufWriter::with_capacity(256 * 1024, io::stdout());
    let failed = |e: io::Error| Fatal::Failed(format!("stdout: {e}"));
    loop {
        // Flush only when no event waits: one write per burst, not per line.
        if reactor.events().is_empty() {
            out.flush().map_err(failed)?;
        }
        select! {
            recv(signal) -> _ => return out.flush().map_err(failed),
            recv(reactor.events()) -> tagged => {
                let Ok(AccountEvent { account, event, .. }) = tagged else {
                    return Err(Fatal::Failed("the reactor ended".to_owned()));
                };
                serde_json::to_writer(&mut out, &Line { account: &account, event: &event })
                    .map_err(|e| failed(e.into()))?;
                out.write_all(b"\n").map_err(failed)?;
            }
            recv(reactor.errors()) -> error => if let Ok(error) = error {
                eprintln!("{} error: {}", error.account, error.error);
            },
            recv(reactor.states()) -> state => if let Ok(state) = state {
                eprintln!("{} state: {:?}", state.account, state.state);
            },
        }
    }
}

/// A blocking agent for whoami: statuses as values, the bundled roots plus `extra_ca`.
fn whoami_agent(extra_ca: &[CaCertificate]) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let roots = if extra_ca.is_empty() {
        RootCerts::WebPki
    } else {
        let bundled = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned());
        let extra = extra_ca
            .iter()
            .map(|c| Certificate::from_der(c.der()).to_owned());
        RootCerts::Specific(Arc::new(bundled.chain(extra).collect()))
    };
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build()
        .into()
}

/// The user id `token` belongs to; why not, in the machine's words for a transport failure
/// (`Tls: ...` for a refused certificate).
fn whoami(agent: &ureq::Agent, homeserver: &str, token: &str) -> Result<String, String> {
    let url = format!("{homeserver}/_matrix/client/v3/account/whoami");
    let response = agent
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| {
            let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
                || matches!(&e, ureq::Error::Io(io) if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()));
            if tls {
                format!("Tls: {e}")
            } else {
                e.to_string()
            }
        })?;
    let status = response.status();
    let body = response
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let user = (status == 200)
        .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v["user_id"].as_str().map(str::to_owned));
    user.ok_or_else(|| format!("{status} {body}"))
}

/// One line of output: the account, then the event in its JSON shape (the one `tail`
/// prints).
#[derive(serde::Serialize)]
struct Line<'a> {
    account: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}
