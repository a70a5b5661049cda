#!/usr/bin/env bash
# Many accounts on one local Synapse: the one-thread poll loop of examples/many_accounts.rs
# versus the blocking driver (one thread per account). See benches/many_accounts.rs.
#   MANY_N (default 1000)  MANY_IDLE_S (default 60)  MANY_MESSAGES (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/synapse.sh install
cargo build --release --example many_accounts
cargo bench --bench many_accounts
