//! `many_accounts`: many Matrix accounts followed by one thread, one `SyncMachine` each.
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
//! How it is built, and what it shows: no HTTP client and no thread per account, but kept
//! sans-IO parts composed around one poll loop.
//!
//! * One `mio::Poll` over every account's non-blocking socket (HTTP/1.1, one keep-alive
//!   connection per account), plus a `mio::Waker` for the signal handler.
//! * `https` by rustls' `ClientConnection`, sans-IO as well: ciphertext read from the socket
//!   goes in (`read_tls`, `process_new_packets`), plaintext comes out of its reader, and the
//!   other way through its writer and `write_tls`. Each connection is a [`Transport`],
//!   `Plain` or `Tls`, behind the same non-blocking read and write. Trusted: the bundled web
//!   roots (`webpki-roots`), plus the certificates of `--ca-file` for a private CA.
//! * HTTP/1.1 by `ureq-proto`, the sans-IO protocol layer under `ureq`: it writes the request
//!   head and body into a buffer and parses the response head and body out of the bytes read;
//!   this loop only moves bytes.
//! * One timer heap fed by every machine's `poll_timeout` (and each transfer's deadline):
//!   `poll` sleeps until the earliest instant of all accounts.
//! * The machine's contract, per account: feed one input, drain the events, errors, states
//!   and credentials, then `poll_request`; at most one request in flight; a transfer past its
//!   `deadline` is aborted and reported as `TransportFailure` of kind `TimedOut`.
//! * The user id comes from `GET /_matrix/client/v3/account/whoami`, sent through the same
//!   loop before the account's machine is made; an account whose token is refused is
//!   reported on stderr and left out.
//!
//! The homeserver name is resolved once, before the loop (a blocking look-up).
//!
//! Stdout is written with blocking writes from the loop thread, flushed once per loop turn:
//! a consumer that stops reading stalls every account, as it should (events are not dropped).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sync_service::{
    Config, Event, RequestId, SyncFilter, SyncMachine, TransportErrorKind, TransportFailure,
};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use serde_json::Value;
use ureq_proto::client::state::{RecvBody, RecvResponse};
use ureq_proto::client::{Call, RecvBodyResult, RecvResponseResult, SendRequestResult};
use ureq_proto::BodyMode;

const USAGE: &str = "usage: many_accounts --homeserver URL --tokens FILE [--timeout-ms N] \
                     [--filter JSON] [--ca-file PEM]";

/// The waker's token; account `i` uses `Token(i)`.
const WAKER: Token = Token(usize::MAX);
/// How long the whoami request may take (it goes out for every account at once).
const WHOAMI_DEADLINE: Duration = Duration::from_secs(60);
/// At most this many connections are being opened at once; the others wait their turn. A
/// listener's accept queue is short (Synapse's is 50): a thousand SYNs at once overflow it,
/// and each one dropped costs a retransmission a second or more later.
const MAX_CONNECTING: usize = 32;
/// Socket reads go through a buffer of this size.
const READ_CHUNK: usize = 64 * 1024;

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
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(Fatal::Usage(format!("--tokens {}: no token", args.tokens)));
    }
    let homeserver = args.homeserver.trim_end_matches('/').to_owned();
    let (addr, tls_name) = resolve(&homeserver).map_err(Fatal::Usage)?;
    let tls = match tls_name {
        Some(name) => Some(TlsSetup {
            config: client_config(args.ca_file.as_deref()).map_err(Fatal::Usage)?,
            name,
        }),
        None if args.ca_file.is_some() => {
            return Err(Fatal::Usage(
                "--ca-file needs an https homeserver".to_owned(),
            ))
        }
        None => None,
    };
    let filter = args
        .filter
        .as_deref()
        .map(SyncFilter::from_json)
        .transpose()
        .map_err(|e| Fatal::Usage(format!("--filter: {e}")))?;
    let template = {
        let mut config = Config::new(homeserver.clone(), "template");
        config.filter = filter;
        if let Some(ms) = args.timeout_ms {
            config.long_poll_timeout = Duration::from_millis(ms);
        }
        config
            .validate()
            .map_err(|e| Fatal::Usage(format!("invalid configuration: {e}")))?;
        config
    };

    let poll = Poll::new().map_err(|e| Fatal::Failed(format!("poll: {e}")))?;
    let waker = Arc::new(
        Waker::new(poll.registry(), WAKER).map_err(|e| Fatal::Failed(format!("waker: {e}")))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, waker) = (stop.clone(), waker.clone());
        ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            let _ = waker.wake();
        })
        .map_err(|e| Fatal::Failed(format!("signal handler: {e}")))?;
    }

    let mut event_loop = Loop {
        poll,
        addr,
        tls,
        homeserver,
        template,
        accounts: tokens.into_iter().map(Account::new).collect(),
        timers: BinaryHeap::new(),
        out: BufWriter::with_capacity(256 * 1024, io::stdout()),
        scratch: vec![0; READ_CHUNK],
        connecting: 0,
        connect_queue: VecDeque::new(),
        opened: 0,
    };
    event_loop.run(&stop)
}

/// The socket address of an `http(s)://host[:port]` homeserver, and for `https` the name its
/// certificate must hold.
fn resolve(homeserver: &str) -> Result<(SocketAddr, Option<ServerName<'static>>), String> {
    let uri: http::Uri = homeserver
        .parse()
        .map_err(|e| format!("--homeserver {homeserver:?}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "--homeserver {homeserver:?}: not an http(s):// URL"
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("--homeserver {homeserver:?}: no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let name = https
        .then(|| ServerName::try_from(host.to_owned()))
        .transpose()
        .map_err(|e| format!("--homeserver: {host} cannot be a TLS server name: {e}"))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("--homeserver: cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("--homeserver: {host} has no address"))?;
    Ok((addr, name))
}

/// What every `https` connection shares: the rustls configuration and the server's name.
struct TlsSetup {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// rustls on ring (the provider under ureq), trusting the bundled web roots and the
/// certificates of `ca_file`.
fn client_config(ca_file: Option<&str>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("--ca-file {path}: {e}"))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("--ca-file {path}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("--ca-file {path}: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("--ca-file {path}: no certificate in it"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One account: its token, then (after whoami) its user id and machine.
struct Account {
    token: String,
    user_id: Option<String>,
    machine: Option<SyncMachine>,
    /// Whether the account is gone (its token was refused): nothing more happens to it.
    dropped: bool,
    conn: Option<Conn>,
    transfer: Option<Transfer>,
    /// The instant of this account's live entry in the timer heap (older entries are stale).
    scheduled: Option<Instant>,
}

impl Account {
    fn new(token: String) -> Self {
        Self {
            token,
            user_id: None,
            machine: None,
            dropped: false,
            conn: None,
            transfer: None,
            scheduled: None,
        }
    }

    fn name(&self) -> &str {
        self.user_id.as_deref().unwrap_or("(whoami)")
    }
}

/// A keep-alive connection to the homeserver.
struct Conn {
    stream: TcpStream,
    transport: Transport,
    connected: bool,
    /// Whether it already carried a whole exchange (then a close before any answer byte is a
    /// keep-alive race, and the request is sent again once on a fresh connection).
    reused: bool,
}

/// What runs over a connection's socket: HTTP itself, or TLS carrying it.
enum Transport {
    Plain,
    Tls(Box<ClientConnection>),
}

impl Conn {
    /// Writes (some of) `bytes` of plaintext, like a non-blocking socket: TLS takes them into
    /// its buffer and sends what the socket accepts now; `WouldBlock` only when nothing was
    /// taken.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Transport::Tls(tls) = &mut self.transport else {
            return self.stream.write(bytes);
        };
        let taken = tls.writer().write(bytes)?;
        match send_tls(tls, &mut self.stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && taken > 0 => Ok(taken),
            Err(e) => Err(e),
            Ok(()) if taken == 0 => Err(io::ErrorKind::WouldBlock.into()),
            Ok(()) => Ok(taken),
        }
    }

    /// Sends the ciphertext TLS has queued, until the socket would block. Nothing to do for
    /// plain HTTP.
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.transport {
            Transport::Plain => Ok(()),
            Transport::Tls(tls) => send_tls(tls, &mut self.stream),
        }
    }

    /// Reads plaintext, like a non-blocking socket: `Ok(0)` at the end of the stream, and a
    /// TLS failure as an `InvalidData` error carrying the `rustls::Error`.
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let Transport::Tls(tls) = &mut self.transport else {
            return self.stream.read(buffer);
        };
        loop {
            match tls.reader().read(buffer) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                read => return read, // plaintext, close_notify (0), or a cut stream
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // The handshake's answers, and the request that waited for its end, go out now.
            match send_tls(tls, &mut self.stream) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

/// Writes TLS's queued ciphertext to the socket until it is sent or the socket would block.
fn send_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(stream)?;
    }
    Ok(())
}

/// A TLS failure (the certificate refused, a bad record) as the machine's failure kind.
fn tls_failure(e: &io::Error) -> Option<TransportFailure> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(TransportFailure::new(
        TransportErrorKind::Tls,
        tls.to_string(),
    ))
}

/// Who waits for a transfer's answer.
#[derive(Clone, Copy)]
enum Purpose {
    Whoami,
    Machine(RequestId),
}

/// One request on the wire: the encoded bytes, and ureq-proto's call reading the answer.
struct Transfer {
    purpose: Purpose,
    deadline: Instant,
    bytes: Vec<u8>,
    written: usize,
    /// Bytes read and not yet consumed by the parser.
    input: Vec<u8>,
    answered: bool,
    retried: bool,
    stage: Stage,
    head: Option<http::response::Parts>,
    body: Vec<u8>,
    max_body: u64,
}

enum Stage {
    Head(Call<RecvResponse>),
    Body(Call<RecvBody>),
    /// Between stages (only while a stage is being replaced).
    Moving,
}

/// A whole response, and whether its connection must be closed after it.
type Whole = (http::Response<Vec<u8>>, bool);

/// What a transfer came to.
enum Outcome {
    Pending,
    Done {
        response: http::Response<Vec<u8>>,
        close: bool,
    },
    Failed(TransportFailure),
}

struct Loop {
    poll: Poll,
    addr: SocketAddr,
    /// For an `https` homeserver.
    tls: Option<TlsSetup>,
    homeserver: String,
    template: Config,
    accounts: Vec<Account>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    out: BufWriter<io::Stdout>,
    scratch: Vec<u8>,
    /// Connections being opened (connect sent, not yet established).
    connecting: usize,
    /// Accounts waiting for a connection to be opened, in turn.
    connect_queue: VecDeque<usize>,
    /// Connections opened since the start, for the closing line on stderr.
    opened: u64,
}

impl Loop {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), Fatal> {
        let now = Instant::now();
        for index in 0..self.accounts.len() {
            self.start_whoami(index, now);
        }
        let mut events = Events::with_capacity(1024);
        loop {
            if stop.load(Ordering::SeqCst) {
                return self.shut_down();
            }
            if self.accounts.iter().all(|a| a.dropped) {
                return Err(Fatal::Failed("no account left".to_owned()));
            }
            let timeout = self
                .timers
                .peek()
                .map(|Reverse((at, _))| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Fatal::Failed(format!("poll: {e}")));
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                let token = event.token();
                if token != WAKER && token.0 < self.accounts.len() {
                    self.on_socket(token.0, now);
                }
            }
            self.on_timers(now);
            self.open_queued(now);
            self.out
                .flush()
                .map_err(|e| Fatal::Failed(format!("stdout: {e}")))?;
        }
    }

    /// Stops every machine, prints what the stop leaves to print, and flushes.
    fn shut_down(&mut self) -> Result<(), Fatal> {
        eprintln!(
            "many_accounts: stopping; {} connections opened for {} accounts",
            self.opened,
            self.accounts.len()
        );
        for index in 0..self.accounts.len() {
            if let Some(conn) = self.accounts[index].conn.take() {
                self.close(conn);
            }
            let account = &mut self.accounts[index];
            account.transfer = None;
            if let Some(machine) = account.machine.as_mut() {
                machine.stop();
                let name = account.user_id.as_deref().unwrap_or_default();
                while let Some(state) = machine.poll_state() {
                    eprintln!("{name} state: {state:?}");
                }
            }
        }
        self.out
            .flush()
            .map_err(|e| Fatal::Failed(format!("stdout: {e}")))
    }

    /// Handles every due timer: transfer deadlines, then the machine's own instants.
    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.accounts[index].scheduled != Some(at) {
                continue; // stale: the account was rescheduled since
            }
            self.accounts[index].scheduled = None;
            let overdue = self.accounts[index]
                .transfer
                .as_ref()
                .is_some_and(|t| now >= t.deadline);
            if overdue {
                let failure = TransportFailure::new(
                    TransportErrorKind::TimedOut,
                    "the request's deadline passed",
                );
                self.abort(index, failure, now);
            }
            if let Some(machine) = self.accounts[index].machine.as_mut() {
                if let Err(e) = machine.handle_timeout(now) {
                    log_line(&self.accounts[index], format_args!("timeout refused: {e}"));
                }
            }
            self.pump(index, now);
        }
    }

    /// A readiness event on account `index`'s socket.
    fn on_socket(&mut self, index: usize, now: Instant) {
        if self.accounts[index].transfer.is_none() {
            // An idle keep-alive connection became readable: the server closed it (or sent
            // something unasked). Either way it is not reused.
            if let Some(conn) = self.accounts[index].conn.take() {
                self.close(conn);
            }
            return;
        }
        match self.io(index) {
            Outcome::Pending => {}
            Outcome::Done { response, close } => {
                if close {
                    if let Some(conn) = self.accounts[index].conn.take() {
                        self.close(conn);
                    }
                } else if let Some(conn) = self.accounts[index].conn.as_mut() {
                    conn.reused = true;
                }
                let transfer = self.accounts[index].transfer.take();
                if let Some(transfer) = transfer {
                    self.answer(index, transfer.purpose, Ok(response), now);
                }
            }
            Outcome::Failed(failure) => self.abort(index, failure, now),
        }
    }

    /// Ends account `index`'s transfer with `failure`, closing its connection.
    fn abort(&mut self, index: usize, failure: TransportFailure, now: Instant) {
        if let Some(conn) = self.accounts[index].conn.take() {
            self.close(conn);
        }
        if let Some(transfer) = self.accounts[index].transfer.take() {
            self.answer(index, transfer.purpose, Err(failure), now);
        }
    }

    /// Hands a transfer's result to whoever waits for it, then pumps the account.
    fn answer(
        &mut self,
        index: usize,
        purpose: Purpose,
        result: Result<http::Response<Vec<u8>>, TransportFailure>,
        now: Instant,
    ) {
        match purpose {
            Purpose::Whoami => self.on_whoami(index, result, now),
            Purpose::Machine(id) => {
                let account = &mut self.accounts[index];
                let Some(machine) = account.machine.as_mut() else {
                    return;
                };
                let fed = match result {
                    Ok(response) => machine.handle_response(id, response, now),
                    Err(failure) => machine.handle_failure(id, failure, now),
                };
                if let Err(e) = fed {
                    log_line(account, format_args!("answer refused: {e}"));
                }
            }
        }
        self.pump(index, now);
    }

    fn start_whoami(&mut self, index: usize, now: Instant) {
        let url = format!("{}/_matrix/client/v3/account/whoami", self.homeserver);
        let request = http::Request::get(url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.accounts[index].token),
            )
            .body(Vec::new());
        match request {
            Ok(request) => self.send(index, Purpose::Whoami, &request, now + WHOAMI_DEADLINE),
            Err(e) => {
                eprintln!("account #{}: bad token: {e}", index + 1);
                self.accounts[index].dropped = true;
            }
        }
    }

    /// The whoami answer: the account's user id, and its machine starts.
    fn on_whoami(
        &mut self,
        index: usize,
        result: Result<http::Response<Vec<u8>>, TransportFailure>,
        now: Instant,
    ) {
        let user_id = match &result {
            Ok(response) if response.status() == 200 => {
                serde_json::from_slice::<Value>(response.body())
                    .ok()
                    .and_then(|v| v["user_id"].as_str().map(str::to_owned))
            }
            _ => None,
        };
        let Some(user_id) = user_id else {
            let why = match result {
                Ok(response) => format!(
                    "{} {}",
                    response.status(),
                    String::from_utf8_lossy(response.body())
                ),
                Err(failure) => failure.to_string(),
            };
            eprintln!("account #{}: whoami failed, left out: {why}", index + 1);
            self.accounts[index].dropped = true;
            return;
        };
        let mut config = self.template.clone();
        config.access_token =
            matrix_sync_service::AccessToken::new(self.accounts[index].token.clone());
        config.jitter_seed = index as u64 + 1;
        match SyncMachine::new(config, now) {
            Ok(machine) => {
                let account = &mut self.accounts[index];
                account.user_id = Some(user_id);
                account.machine = Some(machine);
            }
            Err(e) => {
                eprintln!("account #{}: invalid configuration: {e}", index + 1);
                self.accounts[index].dropped = true;
            }
        }
    }

    /// The machine's contract: drain every output, then ask for the next request, and
    /// schedule the account's next instant.
    fn pump(&mut self, index: usize, now: Instant) {
        loop {
            let account = &mut self.accounts[index];
            let Some(machine) = account.machine.as_mut() else {
                break;
            };
            let account_id = account.user_id.as_deref().unwrap_or_default();
            while let Some(event) = machine.poll_event() {
                let line = Line {
                    account: account_id,
                    event: &event,
                };
                // A failed write shows again at the flush, which ends the loop.
                let _ = serde_json::to_writer(&mut self.out, &line);
                let _ = self.out.write_all(b"\n");
            }
            while let Some(error) = machine.poll_error() {
                eprintln!("{account_id} error: {error}");
            }
            while let Some(state) = machine.poll_state() {
                eprintln!("{account_id} state: {state:?}");
            }
            // No refresh token is configured, so no credentials come; were they to, there is
            // nowhere to store them but memory.
            let mut stored = false;
            while machine.poll_credentials().is_some() {
                stored = true;
            }
            if stored {
                let _ = machine.handle_credentials_stored(now);
                continue;
            }
            if account.transfer.is_none() {
                if let Some(request) = machine.poll_request() {
                    self.send(
                        index,
                        Purpose::Machine(request.id),
                        &request.http,
                        request.deadline,
                    );
                    // A send that failed at once was answered (and pumped) inside `send`.
                    return;
                }
            }
            break;
        }
        self.schedule(index);
    }

    /// Puts account `index`'s next instant (its machine's, or its transfer's deadline) on the
    /// timer heap.
    fn schedule(&mut self, index: usize) {
        let account = &mut self.accounts[index];
        let machine = account.machine.as_ref().and_then(SyncMachine::poll_timeout);
        let transfer = account.transfer.as_ref().map(|t| t.deadline);
        let next = match (machine, transfer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next != account.scheduled {
            account.scheduled = next;
            if let Some(at) = next {
                self.timers.push(Reverse((at, index)));
            }
        }
    }

    /// Starts a transfer of `request` for account `index`, on its connection or a new one.
    fn send(
        &mut self,
        index: usize,
        purpose: Purpose,
        request: &http::Request<Vec<u8>>,
        deadline: Instant,
    ) {
        let now = Instant::now();
        let (bytes, call) = match encode(request) {
            Ok(encoded) => encoded,
            Err(e) => {
                let failure = TransportFailure::new(TransportErrorKind::Other, e);
                self.answer(index, purpose, Err(failure), now);
                return;
            }
        };
        self.accounts[index].transfer = Some(Transfer {
            purpose,
            deadline,
            bytes,
            written: 0,
            input: Vec::new(),
            answered: false,
            retried: false,
            stage: Stage::Head(call),
            head: None,
            body: Vec::new(),
            max_body: self.template.max_body_bytes,
        });
        if self.accounts[index].conn.is_none() {
            if self.connecting >= MAX_CONNECTING {
                self.connect_queue.push_back(index);
                self.schedule(index);
                return;
            }
            if let Err(failure) = self.connect(index) {
                self.abort(index, failure, now);
                return;
            }
        }
        // On a connected keep-alive socket the request goes out now; a new one waits for
        // its writable event.
        self.on_socket(index, now);
        self.schedule(index);
    }

    /// Opens the connections of waiting accounts, while fewer than [`MAX_CONNECTING`] are
    /// being opened.
    fn open_queued(&mut self, now: Instant) {
        while self.connecting < MAX_CONNECTING {
            let Some(index) = self.connect_queue.pop_front() else {
                return;
            };
            let account = &self.accounts[index];
            if account.conn.is_some() || account.transfer.is_none() {
                continue; // its transfer ended (deadline) or already has a connection
            }
            match self.connect(index) {
                Ok(()) => self.on_socket(index, now),
                Err(failure) => self.abort(index, failure, now),
            }
        }
    }

    fn connect(&mut self, index: usize) -> Result<(), TransportFailure> {
        let mut stream = TcpStream::connect(self.addr)
            .map_err(|e| TransportFailure::new(TransportErrorKind::Connect, e.to_string()))?;
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| TransportFailure::new(TransportErrorKind::Other, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let transport = match &self.tls {
            None => Transport::Plain,
            Some(tls) => match ClientConnection::new(tls.config.clone(), tls.name.clone()) {
                Ok(connection) => Transport::Tls(Box::new(connection)),
                Err(e) => {
                    let _ = self.poll.registry().deregister(&mut stream);
                    return Err(TransportFailure::new(
                        TransportErrorKind::Tls,
                        e.to_string(),
                    ));
                }
            },
        };
        self.connecting += 1;
        self.opened += 1;
        self.accounts[index].conn = Some(Conn {
            stream,
            transport,
            connected: false,
            reused: false,
        });
        Ok(())
    }

    fn close(&mut self, mut conn: Conn) {
        if !conn.connected {
            self.connecting -= 1;
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }

    /// Moves the bytes of account `index`'s transfer: connect, write, read, parse. Sockets are
    /// edge-triggered, so each direction goes on until it would block.
    fn io(&mut self, index: usize) -> Outcome {
        let account = &mut self.accounts[index];
        let (Some(conn), Some(transfer)) = (account.conn.as_mut(), account.transfer.as_mut())
        else {
            return Outcome::Pending;
        };
        if !conn.connected {
            if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                return connect_failed(e);
            }
            match conn.stream.peer_addr() {
                Ok(_) => {
                    conn.connected = true;
                    self.connecting -= 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Outcome::Pending,
                Err(e) => return connect_failed(e),
            }
        }
        while transfer.written < transfer.bytes.len() {
            match conn.write(&transfer.bytes[transfer.written..]) {
                Ok(n) => transfer.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.lost(index, e.to_string()),
            }
        }
        // TLS records still queued go out as the socket takes them (a writable event later).
        match conn.flush() {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return self.lost(index, e.to_string())
            }
            _ => {}
        }
        loop {
            match conn.read(&mut self.scratch) {
                Ok(0) => return self.eof(index),
                Ok(n) => {
                    transfer.answered = true;
                    transfer.input.extend_from_slice(&self.scratch[..n]);
                    match transfer.parse() {
                        Ok(Some((response, close))) => {
                            return Outcome::Done { response, close };
                        }
                        Ok(None) => {}
                        Err(failure) => return Outcome::Failed(failure),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => match tls_failure(&e) {
                    Some(failure) => return Outcome::Failed(failure),
                    None => return self.lost(index, e.to_string()),
                },
            }
        }
    }

    /// The server closed the connection during a transfer.
    fn eof(&mut self, index: usize) -> Outcome {
        let Some(transfer) = self.accounts[index].transfer.as_mut() else {
            return Outcome::Pending;
        };
        if let Stage::Body(call) = &transfer.stage {
            if call.body_mode() == BodyMode::CloseDelimited {
                return match transfer.finish() {
                    Ok(response) => Outcome::Done {
                        response,
                        close: true,
                    },
                    Err(failure) => Outcome::Failed(failure),
                };
            }
            return Outcome::Failed(TransportFailure::new(
                TransportErrorKind::Truncated,
                "the connection closed inside the body",
            ));
        }
        self.lost(index, "the connection closed before the answer".to_owned())
    }

    /// The connection broke: a keep-alive connection the server closed before answering gets
    /// the request once more on a fresh connection; anything else is a reset.
    fn lost(&mut self, index: usize, detail: String) -> Outcome {
        let reused = self.accounts[index].conn.as_ref().is_some_and(|c| c.reused);
        let Some(transfer) = self.accounts[index].transfer.as_mut() else {
            return Outcome::Pending;
        };
        if reused && !transfer.answered && !transfer.retried {
            transfer.retried = true;
            transfer.written = 0;
            if let Some(conn) = self.accounts[index].conn.take() {
                self.close(conn);
            }
            if self.connecting >= MAX_CONNECTING {
                self.connect_queue.push_back(index);
                return Outcome::Pending;
            }
            return match self.connect(index) {
                Ok(()) => Outcome::Pending,
                Err(failure) => Outcome::Failed(failure),
            };
        }
        Outcome::Failed(TransportFailure::new(TransportErrorKind::Reset, detail))
    }
}

fn connect_failed(e: io::Error) -> Outcome {
    Outcome::Failed(TransportFailure::new(
        TransportErrorKind::Connect,
        e.to_string(),
    ))
}

impl Transfer {
    /// Feeds the bytes read to ureq-proto: the response and whether the connection must be
    /// closed after it, once it is whole.
    fn parse(&mut self) -> Result<Option<Whole>, TransportFailure> {
        let bad =
            |e: ureq_proto::Error| TransportFailure::new(TransportErrorKind::Other, e.to_string());
        loop {
            match &mut self.stage {
                Stage::Head(call) => {
                    let (used, response) = call.try_response(&self.input, false).map_err(bad)?;
                    self.input.drain(..used);
                    let Some(response) = response else {
                        if used == 0 {
                            return Ok(None);
                        }
                        continue; // an informational answer was skipped
                    };
                    self.head = Some(response.into_parts().0);
                    let Stage::Head(call) = std::mem::replace(&mut self.stage, Stage::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    match call.proceed() {
                        Some(RecvResponseResult::RecvBody(call)) => self.stage = Stage::Body(call),
                        Some(RecvResponseResult::Redirect(call)) => {
                            let close = call.must_close_connection();
                            return self.finish().map(|r| Some((r, close)));
                        }
                        Some(RecvResponseResult::Cleanup(call)) => {
                            let close = call.must_close_connection();
                            return self.finish().map(|r| Some((r, close)));
                        }
                        None => {
                            return Err(TransportFailure::new(
                                TransportErrorKind::Other,
                                "response head not complete",
                            ))
                        }
                    }
                }
                Stage::Body(call) => {
                    let mut chunk = [0u8; 16 * 1024];
                    while !self.input.is_empty() {
                        let (used, n) = call.read(&self.input, &mut chunk).map_err(bad)?;
                        self.body.extend_from_slice(&chunk[..n]);
                        self.input.drain(..used);
                        if self.body.len() as u64 > self.max_body {
                            return Err(TransportFailure::new(
                                TransportErrorKind::BodyTooLarge,
                                "the body is larger than the limit",
                            ));
                        }
                        if used == 0 && n == 0 {
                            break;
                        }
                    }
                    let ended = match call.body_mode() {
                        BodyMode::CloseDelimited => false,
                        _ => call.can_proceed(),
                    };
                    if !ended {
                        return Ok(None);
                    }
                    let Stage::Body(call) = std::mem::replace(&mut self.stage, Stage::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    let close = match call.proceed() {
                        Some(RecvBodyResult::Cleanup(call)) => call.must_close_connection(),
                        Some(RecvBodyResult::Redirect(call)) => call.must_close_connection(),
                        None => true,
                    };
                    // Bytes after the answer were never asked for: do not reuse the socket.
                    let close = close || !self.input.is_empty();
                    return self.finish().map(|r| Some((r, close)));
                }
                Stage::Moving => return Ok(None),
            }
        }
    }

    /// The whole response: the head parsed, the body read.
    fn finish(&mut self) -> Result<http::Response<Vec<u8>>, TransportFailure> {
        let head = self
            .head
            .take()
            .ok_or_else(|| TransportFailure::new(TransportErrorKind::Other, "no response head"))?;
        Ok(http::Response::from_parts(
            head,
            std::mem::take(&mut self.body),
        ))
    }
}

/// The request as bytes on the wire, and the ureq-proto call ready to read its answer.
fn encode(request: &http::Request<Vec<u8>>) -> Result<(Vec<u8>, Call<RecvResponse>), String> {
    let body = request.body();
    let mut head = http::Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone());
    for (name, value) in request.headers() {
        head = head.header(name, value);
    }
    if !body.is_empty() && !request.headers().contains_key(http::header::CONTENT_LENGTH) {
        head = head.header(http::header::CONTENT_LENGTH, body.len());
    }
    let head = head.body(()).map_err(|e| e.to_string())?;
    let mut call = Call::new(head).map_err(|e| e.to_string())?.proceed();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut bytes = Vec::new();
    while !call.can_proceed() {
        let n = call.write(&mut buffer).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(&buffer[..n]);
    }
    let call = match call.proceed().map_err(|e| e.to_string())? {
        Some(SendRequestResult::RecvResponse(call)) => call,
        Some(SendRequestResult::SendBody(mut call)) => {
            let mut input = &body[..];
            while !call.can_proceed() {
                let (used, n) = call.write(input, &mut buffer).map_err(|e| e.to_string())?;
                bytes.extend_from_slice(&buffer[..n]);
                input = &input[used..];
                if used == 0 && n == 0 {
                    return Err("the request body could not be written".to_owned());
                }
            }
            call.proceed()
                .ok_or_else(|| "the request body was not complete".to_owned())?
        }
        Some(SendRequestResult::Await100(_)) => {
            return Err("Expect: 100-continue is not supported".to_owned())
        }
        None => return Err("the request head was not complete".to_owned()),
    };
    Ok((bytes, call))
}

fn log_line(account: &Account, what: impl std::fmt::Display) {
    eprintln!("{} {what}", account.name());
}

// ---- the output line --------------------------------------------------------------------

/// One line of output: the account, then the event in its JSON shape (the one `tail`
/// prints).
#[derive(serde::Serialize)]
struct Line<'a> {
    account: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}
