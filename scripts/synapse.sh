#!/usr/bin/env bash
# Installs and runs the throwaway Synapse homeserver of the tests and the demo.
#
# Usage:
#   scripts/synapse.sh install                 create the virtualenv and install matrix-synapse
#   scripts/synapse.sh run DIR                 run Synapse in the foreground
#   scripts/synapse.sh supervise DIR           run Synapse in the background until stdin closes
#
# DIR holds the configuration the test kit writes (matrix_sync_testkit::synapse, which
# chooses the port, waits for health and registers users): homeserver.yaml and, read
# after it, test.yaml.  To start a throwaway server by hand:
#   cargo run -q -p matrix-sync-testkit --bin synapse -- --help
#
# Environment:
#   SYNAPSE_VENV   virtualenv location (default: <repo>/.synapse/venv)
#   PYTHON         interpreter used to create the virtualenv (default: python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
VENV="${SYNAPSE_VENV:-${REPO_ROOT}/.synapse/venv}"
VENV_PY="${VENV}/bin/python"

die() {
    echo "synapse.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd)
}

require_venv() {
    if ! [ -x "${VENV_PY}" ] || ! "${VENV_PY}" -c 'import synapse' >/dev/null 2>&1; then
        die "Synapse is not installed in ${VENV}; run: $0 install"
    fi
}

require_config() {
    [ -f "$1/homeserver.yaml" ] || die "no homeserver.yaml in $1 (the test kit writes it)"
}

# The -c arguments for DIR: homeserver.yaml, then test.yaml when there is one.
config_args() {
    CONFIG_ARGS=(-c "$1/homeserver.yaml")
    if [ -f "$1/test.yaml" ]; then
        CONFIG_ARGS+=(-c "$1/test.yaml")
    fi
}

cmd_install() {
    mkdir -p "$(dirname "${VENV}")"
    # Serialize concurrent installs (e.g. test binaries run in parallel).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"${VENV}.lock"
        flock 9
    fi
    if [ -x "${VENV_PY}" ] && "${VENV_PY}" -c 'import synapse' >/dev/null 2>&1; then
        echo "synapse.sh: Synapse already installed in ${VENV}" >&2
        return 0
    fi
    local python="${PYTHON:-python3}"
    command -v "${python}" >/dev/null 2>&1 || die "${python} not found"
    if ! [ -x "${VENV_PY}" ]; then
        echo "synapse.sh: creating virtualenv in ${VENV}" >&2
        "${python}" -m venv "${VENV}" || die "could not create virtualenv ${VENV}"
    fi
    echo "synapse.sh: installing matrix-synapse (this takes a minute the first time)" >&2
    "${VENV_PY}" -m pip install --quiet --disable-pip-version-check --upgrade pip \
        || die "could not upgrade pip in ${VENV}"
    "${VENV_PY}" -m pip install --quiet --disable-pip-version-check matrix-synapse \
        || die "pip install matrix-synapse failed"
    "${VENV_PY}" -c 'import synapse' || die "Synapse installed but 'import synapse' fails"
    echo "synapse.sh: installed Synapse $("${VENV_PY}" -c 'import synapse; print(synapse.__version__)')" >&2
}

cmd_run() {
    [ $# -eq 1 ] || usage
    require_venv
    local dir
    dir="$(abs_dir "$1")"
    require_config "${dir}"
    config_args "${dir}"
    cd "${dir}"
    exec "${VENV_PY}" -m synapse.app.homeserver "${CONFIG_ARGS[@]}"
}

# shellcheck source=scripts/supervise.sh
. "${SCRIPT_DIR}/supervise.sh"

# Supervises Synapse as scripts/supervise.sh says. Synapse's output goes to
# DIR/synapse.stdout and its pid to DIR/synapse.pid.
SUPERVISED_PID=""
SUPERVISED_DIR=""

# shellcheck disable=SC2317,SC2329  # invoked via trap
stop_supervised() {
    trap - TERM INT HUP EXIT
    if [ -n "${SUPERVISED_PID}" ]; then
        terminate "${SUPERVISED_PID}"
        wait "${SUPERVISED_PID}" 2>/dev/null || true
        SUPERVISED_PID=""
    fi
    rm -f "${SUPERVISED_DIR}/synapse.pid"
}

cmd_supervise() {
    [ $# -eq 1 ] || usage
    require_venv
    SUPERVISED_DIR="$(abs_dir "$1")"
    require_config "${SUPERVISED_DIR}"
    config_args "${SUPERVISED_DIR}"
    cd "${SUPERVISED_DIR}"
    trap 'stop_supervised; exit 0' TERM INT HUP
    trap 'stop_supervised' EXIT
    "${VENV_PY}" -m synapse.app.homeserver "${CONFIG_ARGS[@]}" \
        >>"${SUPERVISED_DIR}/synapse.stdout" 2>&1 </dev/null &
    SUPERVISED_PID=$!
    echo "${SUPERVISED_PID}" >"${SUPERVISED_DIR}/synapse.pid"

    watch_stdin synapse.sh Synapse "${SUPERVISED_PID}"
    stop_supervised
}

main() {
    [ $# -ge 1 ] || usage
    local sub="$1"
    shift
    case "${sub}" in
        install) [ $# -eq 0 ] || usage; cmd_install ;;
        run) cmd_run "$@" ;;
        supervise) cmd_supervise "$@" ;;
        -h | --help | help) usage ;;
        *) echo "synapse.sh: unknown command: ${sub}" >&2; usage ;;
    esac
}

main "$@"
