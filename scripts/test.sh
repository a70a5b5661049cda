#!/usr/bin/env bash
# Every check the project has: formatting, lints, the dependency boundary of the pure
# machine, and every test (unit, property, simulation, doctests, and the integration tests
# against a real Synapse and a real palpo, which this script installs first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "Synapse for the integration tests"
bash scripts/synapse.sh install

step "palpo and PostgreSQL for the integration tests (palpo is cached in target/palpo)"
bash scripts/palpo.sh install

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (default features, and the pure machine alone)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --no-default-features --lib --tests -- -D warnings

step "the pure machine pulls in no I/O crates"
if cargo tree --no-default-features -e normal --prefix none | grep -E '^(ureq|crossbeam-channel) '; then
    echo "ureq or crossbeam-channel is in the dependency tree without the driver feature" >&2
    exit 1
fi

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

step "tests of the pure machine, without the driver"
cargo test --no-default-features

step "the test kit's own tests"
cargo test -p matrix-sync-testkit

step "every test, with the driver and a real Synapse and palpo"
cargo test

step "the unit tests inside the tail example (its exit statuses)"
cargo test --example tail

# ---- the optional features: end-to-end encryption (`e2ee`) and the fleet (`fleet`) ------------
# Both are built together, once: one more build of the crate, not one per feature.

step "without the features, no crypto crate and no NATS client in the dependency tree"
for features in "" "--no-default-features"; do
    if cargo tree ${features} -e normal --prefix none \
        | grep -E '^(matrix-sdk-[a-z-]+|vodozemac|ruma|tokio|rusqlite|libsqlite3-sys|async-nats) '; then
        echo "a crypto crate or a NATS client is in the dependency tree without its feature (${features:-default features})" >&2
        exit 1
    fi
done

step "nats-server for the fleet test"
NATS_SERVER_BIN="$(bash scripts/nats.sh install)"
export NATS_SERVER_BIN

step "clippy and cargo doc with e2ee and fleet"
cargo clippy --all-targets --features e2ee,fleet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet --features e2ee,fleet

step "e2ee: the stage's unit tests, the decrypt bench as a check, the tests against Synapse and palpo"
cargo test --features e2ee,fleet --lib e2ee
cargo test --features e2ee,fleet --bench decrypt
cargo build --features e2ee,fleet --examples
cargo test --features e2ee,fleet --test e2ee --test e2ee_crash --test e2ee_tail --test sliding_sync_e2ee

step "fleet: unit tests, doctests, three workers against nats-server and Synapse"
cargo test --features e2ee,fleet --lib fleet
cargo test --features e2ee,fleet --doc fleet
cargo test --features e2ee,fleet --test fleet
