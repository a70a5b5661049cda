//! `fleet_consumer`: reads the fleet's stream of events with a durable JetStream consumer
//! (feature `fleet`).
//!
//! ```text
//! cargo run --release --features fleet --example fleet_consumer -- --nats URL \
//!     --durable NAME [--account NAME] [--count N]
//! ```
//!
//! Prints one JSON object per event on stdout, `{"seq": N, "account": NAME, "event": {...}}`,
//! acknowledging each after it was written and flushed, so a consumer restarted under the
//! same `--durable` name goes on where it stopped (a message written but not yet
//! acknowledged when it died is delivered again: at least once). With `--account`, only that
//! account's subject; with `--count`, it exits after that many events. SIGINT or SIGTERM stop
//! it (exit 0); bad arguments exit with 2, a failure with 1.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use matrix_sync_service::fleet::{FleetClient, FleetConfig};

const USAGE: &str = "usage: fleet_consumer --nats URL --durable NAME [--account NAME] [--count N]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("fleet_consumer: {message}");
            ExitCode::from(code)
        }
    }
}

fn run() -> Result<(), (u8, String)> {
    let usage = |m: String| (2, m);
    let mut args = std::env::args().skip(1);
    let (mut nats, mut durable, mut account, mut count) = (None, None, None, None);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--nats" => nats = Some(value("--nats")?),
            "--durable" => durable = Some(value("--durable")?),
            "--account" => account = Some(value("--account")?),
            "--count" => {
                let v = value("--count")?;
                count = Some(
                    v.parse::<u64>()
                        .map_err(|_| usage(format!("--count: {v:?}")))?,
                );
            }
            "-h" | "--help" => return Err(usage(USAGE.to_owned())),
            other => return Err(usage(format!("unknown argument {other:?}; {USAGE}"))),
        }
    }
    let nats = nats.ok_or_else(|| usage(format!("missing --nats; {USAGE}")))?;
    let durable = durable.ok_or_else(|| usage(format!("missing --durable; {USAGE}")))?;
    let config = FleetConfig::new(nats, "fleet-consumer");
    let filter = match &account {
        Some(account) => config.subject(account),
        None => format!("{}.*.events", config.subject_prefix),
    };

    let (signal_tx, signal) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .map_err(|e| (1, format!("signal handler: {e}")))?;

    let client = FleetClient::connect(&config).map_err(|e| (1, e.to_string()))?;
    let mut consumer = client
        .durable(&durable, &filter)
        .map_err(|e| (1, e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while signal.try_recv().is_err() && count.is_none_or(|c| seen < c) {
        let want = count.map_or(256, |c| (c - seen).min(256) as usize);
        let fetched = consumer.fetch(want, Duration::from_millis(500), |message| {
            let event: serde_json::Value =
                serde_json::from_slice(&message.payload).unwrap_or(serde_json::Value::Null);
            let line = serde_json::json!({
                "seq": message.sequence,
                "account": message.account,
                "event": event,
            });
            // Acknowledged only once written and flushed.
            writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
        });
        match fetched {
            Ok(n) => seen += n as u64,
            // NATS away (a restart): try again.
            Err(e) => {
                eprintln!("fleet_consumer: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Ok(())
}
