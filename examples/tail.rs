//! `tail`: print every event of a Matrix account as one JSON object per line.
//!
//! ```text
//! MATRIX_ACCESS_TOKEN=... cargo run --release --example tail -- --homeserver URL \
//!     [--since-file PATH] [--timeline-limit N] [--no-fill-gaps] [--timeout-ms N]
//! ```
//!
//! Events go to stdout (flushed after each batch); state changes and errors to stderr, one
//! line each. With `--since-file` it resumes from the token stored there and stores each
//! checkpoint after the batch's lines are flushed. SIGINT or SIGTERM stop it cleanly (exit 0).
//! Bad arguments or a missing token: one line on stderr, exit 2.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{never, select, Receiver};
use matrix_sync_service::{
    start, Config, Event, EventKind, FileCheckpointStore, SyncFilter, SyncService,
};
use serde_json::{json, Value};

struct Args {
    homeserver: String,
    since_file: Option<FileCheckpointStore>,
    timeline_limit: Option<u32>,
    fill_gaps: bool,
    timeout_ms: Option<u64>,
}

const USAGE: &str = "usage: tail --homeserver URL [--since-file PATH] [--timeline-limit N] [--no-fill-gaps] [--timeout-ms N] (token in MATRIX_ACCESS_TOKEN)";

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        homeserver: std::env::var("MATRIX_HOMESERVER").unwrap_or_default(),
        since_file: None,
        timeline_limit: None,
        fill_gaps: true,
        timeout_ms: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--homeserver" => parsed.homeserver = value("--homeserver")?,
            "--since-file" => {
                parsed.since_file = Some(FileCheckpointStore::new(value("--since-file")?))
            }
            "--timeline-limit" => {
                let v = value("--timeline-limit")?;
                parsed.timeline_limit = Some(
                    v.parse()
                        .map_err(|_| format!("--timeline-limit: not a number: {v}"))?,
                );
            }
            "--timeout-ms" => {
                let v = value("--timeout-ms")?;
                parsed.timeout_ms = Some(
                    v.parse()
                        .map_err(|_| format!("--timeout-ms: not a number: {v}"))?,
                );
            }
            "--no-fill-gaps" => parsed.fill_gaps = false,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if parsed.homeserver.is_empty() {
        return Err(format!(
            "missing --homeserver (or MATRIX_HOMESERVER); {USAGE}"
        ));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tail: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let token = std::env::var("MATRIX_ACCESS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or("MATRIX_ACCESS_TOKEN is not set")?;
    let mut config = Config::new(args.homeserver, token);
    if let Some(store) = &args.since_file {
        config.since = store.load().map_err(|e| format!("--since-file: {e}"))?;
    }
    if let Some(limit) = args.timeline_limit {
        config.filter = Some(SyncFilter::timeline_limit(limit));
    }
    if let Some(ms) = args.timeout_ms {
        config.long_poll_timeout = Duration::from_millis(ms);
    }
    config.gap_fill.enabled = args.fill_gaps;
    config.jitter_seed = std::process::id() as u64;

    let service = Arc::new(start(config).map_err(|e| format!("invalid configuration: {e}"))?);
    let on_signal = service.clone();
    ctrlc::set_handler(move || on_signal.stop()).map_err(|e| format!("signal handler: {e}"))?;
    let outcome = pump(&service, args.since_file.as_ref());
    service.stop();
    if let Err(err) = service.join() {
        eprintln!("error: {err}");
    }
    outcome.map_err(|e| format!("stdout: {e}"))
}

fn pump(service: &SyncService, store: Option<&FileCheckpointStore>) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut errors: Receiver<_> = service.errors().clone();
    let mut states: Receiver<_> = service.states().clone();
    loop {
        select! {
            recv(service.events()) -> event => {
                let Ok(event) = event else { break };
                serde_json::to_writer(&mut out, &line(&event))?;
                out.write_all(b"\n")?;
                if let EventKind::Checkpoint(checkpoint) = &event.kind {
                    out.flush()?;
                    if let Some(store) = store {
                        if let Err(e) = store.save(&checkpoint.next_batch) {
                            eprintln!("error: could not store the checkpoint: {e}");
                        }
                    }
                }
            }
            recv(errors) -> error => match error {
                Ok(error) => eprintln!("error: {error}"),
                Err(_) => errors = never(),
            },
            recv(states) -> state => match state {
                Ok(state) => eprintln!("state: {state:?}"),
                Err(_) => states = never(),
            },
        }
    }
    out.flush()
}

fn line(event: &Event) -> Value {
    let mut line = json!({
        "kind": event.kind.name(),
        "type": event.event_type,
        "room_id": event.room_id,
        "event_id": event.event_id,
        "sender": event.sender,
        "origin_server_ts": event.origin_server_ts,
        "body": event.body_opt(),
    });
    let extra = &mut line;
    if let Some(key) = &event.state_key {
        extra["state_key"] = json!(key);
    }
    if let Some(rel) = &event.relation {
        extra["relation"] =
            json!({ "rel_type": rel.rel_type, "event_id": rel.event_id, "key": rel.key });
    }
    if let Some(target) = &event.redacts {
        extra["redacts"] = json!(target);
    }
    match &event.kind {
        EventKind::Checkpoint(c) => {
            extra["next_batch"] = json!(c.next_batch);
            extra["live"] = json!(c.live);
        }
        EventKind::Gap(g) => {
            extra["prev_batch"] = json!(g.prev_batch);
            extra["previous_since"] = json!(g.previous_since);
        }
        _ => {}
    }
    line
}
