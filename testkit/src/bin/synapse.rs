//! Starts a throwaway Synapse (the test kit's), registers users, prints one JSON line saying
//! where it is and the users' tokens, and runs until SIGTERM, SIGINT or SIGHUP; then it stops
//! Synapse and removes its data.
//!
//! ```text
//! cargo run -q -p matrix-sync-testkit --bin synapse -- [--user NAME[:PASSWORD]]... [--config KEY=JSON]...
//! ```
//!
//! The line: `{"base_url": "http://127.0.0.1:PORT", "users": {"NAME": {"user_id": ..,
//! "access_token": .., "device_id": ..}}}`. `--config` adds a `homeserver.yaml` setting whose
//! value is JSON (a bare word is taken as a string): `--config
//! refreshable_access_token_lifetime=10s`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc;

use matrix_sync_testkit::client::{Account, PASSWORD};
use matrix_sync_testkit::synapse::SynapseOptions;
use serde_json::{json, Map, Value};

const USAGE: &str = "usage: synapse [--user NAME[:PASSWORD]]... [--config KEY=JSON]...";

fn main() -> ExitCode {
    let mut users: Vec<(String, String)> = Vec::new();
    let mut options = SynapseOptions::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--user" | "--config" => {
                let Some(value) = args.next() else {
                    eprintln!("synapse: {arg} needs a value\n{USAGE}");
                    return ExitCode::from(2);
                };
                if arg == "--user" {
                    let (name, password) = value.split_once(':').unwrap_or((&value, PASSWORD));
                    users.push((name.to_string(), password.to_string()));
                } else {
                    let Some((key, raw)) = value.split_once('=') else {
                        eprintln!("synapse: --config takes KEY=JSON, not {value}\n{USAGE}");
                        return ExitCode::from(2);
                    };
                    let value = serde_json::from_str(raw).unwrap_or_else(|_| json!(raw));
                    options = options.config(key, value);
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("synapse: unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    let (stop_tx, stop_rx) = mpsc::channel();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    }) {
        eprintln!("synapse: cannot handle signals: {e}");
        return ExitCode::FAILURE;
    }

    let synapse = options.start();
    let mut registered = Map::new();
    for (name, password) in &users {
        let account = Account::register_as(&synapse.base_url(), name, password);
        registered.insert(
            name.clone(),
            json!({
                "user_id": account.user_id,
                "access_token": account.access_token,
                "device_id": account.device_id,
            }),
        );
    }
    let line = json!({"base_url": synapse.base_url(), "users": Value::Object(registered)});
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);

    let _ = stop_rx.recv();
    drop(synapse);
    ExitCode::SUCCESS
}
