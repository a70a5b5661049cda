//! `fleet`: one worker of a fleet syncing Matrix accounts into NATS JetStream
//! (`matrix_sync_service::fleet`, feature `fleet`).
//!
//! ```text
//! cargo run --release --features fleet --example fleet -- --nats URL --worker ID \
//!     [--lease-ttl-ms N] [--timeout-ms N] [--verbose]
//! ```
//!
//! Run as many as you like, on as many machines: each takes a fair share of the accounts in
//! the accounts bucket (add them with `--add NAME HOMESERVER`, the access token read from
//! `MATRIX_ACCESS_TOKEN`, never from the command line) and publishes their events to the
//! stream `MATRIX_SYNC`, subject `sync.<account>.events`.
//!
//! Stdout: one JSON object per lease change of this worker, flushed at once:
//! `{"worker": ID, "account": NAME, "change": "acquired"|"released"|"lost", "lease": REV,
//! "at_ms": UNIX_MS}`. Stderr: the log (warnings; with `--verbose`, every lease and
//! connection change). SIGINT or SIGTERM stop it: its accounts' received events are published,
//! their checkpoints stored and their leases given back (exit 0). Bad arguments exit with 2,
//! a failure to start with 1.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use matrix_sync_service::fleet::{self, AccountEntry, FleetClient, FleetConfig, LeaseChangeKind};

const USAGE: &str = "usage: fleet --nats URL --worker ID [--lease-ttl-ms N] [--timeout-ms N] \
                     [--verbose]\n       fleet --nats URL --add NAME HOMESERVER \
                     (token in MATRIX_ACCESS_TOKEN)\n       fleet --nats URL --remove NAME";

enum Mode {
    Work { worker: String },
    Add { name: String, homeserver: String },
    Remove { name: String },
}

struct Args {
    nats: String,
    mode: Mode,
    lease_ttl: Option<Duration>,
    timeout: Option<Duration>,
    verbose: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut nats, mut worker, mut add, mut remove) = (None, None, None, None);
    let (mut lease_ttl, mut timeout, mut verbose) = (None, None, false);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let ms = |v: String, name: &str| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{name}: {v:?} is not a number of milliseconds"))
        };
        match arg.as_str() {
            "--nats" => nats = Some(value("--nats")?),
            "--worker" => worker = Some(value("--worker")?),
            "--add" => add = Some((value("--add")?, value("--add")?)),
            "--remove" => remove = Some(value("--remove")?),
            "--lease-ttl-ms" => lease_ttl = Some(ms(value("--lease-ttl-ms")?, "--lease-ttl-ms")?),
            "--timeout-ms" => timeout = Some(ms(value("--timeout-ms")?, "--timeout-ms")?),
            "--verbose" | "-v" => verbose = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let mode = match (worker, add, remove) {
        (Some(worker), None, None) => Mode::Work { worker },
        (None, Some((name, homeserver)), None) => Mode::Add { name, homeserver },
        (None, None, Some(name)) => Mode::Remove { name },
        _ => return Err(format!("one of --worker, --add, --remove\n{USAGE}")),
    };
    Ok(Args {
        nats: nats.ok_or_else(|| format!("missing --nats\n{USAGE}"))?,
        mode,
        lease_ttl,
        timeout,
        verbose,
    })
}

/// The log on stderr, one line per record.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("matrix_sync_service")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("fleet: {message}");
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&StderrLog);
    log::set_max_level(if args.verbose {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    });
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleet: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let worker = match args.mode {
        Mode::Work { worker } => worker,
        Mode::Add { name, homeserver } => {
            let token = std::env::var("MATRIX_ACCESS_TOKEN")
                .map_err(|_| "MATRIX_ACCESS_TOKEN is not set".to_owned())?;
            let client = FleetClient::connect(&FleetConfig::new(&args.nats, "fleet-admin"))
                .map_err(|e| e.to_string())?;
            let revision = client
                .put_account(&name, &AccountEntry::new(homeserver, token))
                .map_err(|e| e.to_string())?;
            eprintln!("fleet: account {name} stored (revision {revision})");
            return Ok(());
        }
        Mode::Remove { name } => {
            let client = FleetClient::connect(&FleetConfig::new(&args.nats, "fleet-admin"))
                .map_err(|e| e.to_string())?;
            client.remove_account(&name).map_err(|e| e.to_string())?;
            eprintln!("fleet: account {name} removed");
            return Ok(());
        }
    };
    let mut config = FleetConfig::new(&args.nats, &worker);
    if let Some(ttl) = args.lease_ttl {
        config = config.lease_ttl(ttl);
    }
    if let Some(timeout) = args.timeout {
        config.template.long_poll_timeout = timeout;
    }
    let id = worker.clone();
    config = config.on_lease(move |change| {
        let kind = match change.kind {
            LeaseChangeKind::Acquired => "acquired",
            LeaseChangeKind::Released => "released",
            _ => "lost",
        };
        let at_ms = change
            .at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let line = serde_json::json!({
            "worker": id,
            "account": change.account,
            "change": kind,
            "lease": change.lease,
            "at_ms": at_ms,
        });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });

    let (signal_tx, stop) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .map_err(|e| format!("signal handler: {e}"))?;
    fleet::run(config, &stop).map_err(|e| e.to_string())
}
