#!/usr/bin/env bash
# Installs and runs the throwaway palpo homeserver (and its PostgreSQL) of the tests.
#
# Usage:
#   scripts/palpo.sh install          install PostgreSQL (apt) and palpo 0.0.2 (cargo install)
#   scripts/palpo.sh bin              print the path of the palpo binary
#   scripts/palpo.sh supervise DIR PG_PORT
#                                     run a PostgreSQL cluster on 127.0.0.1:PG_PORT and palpo
#                                     (DIR/palpo.toml) in the background until stdin closes
#
# DIR holds palpo.toml, which the test kit writes (matrix_sync_testkit::palpo, which chooses
# the ports, waits for the server and registers users). The cluster lives in DIR/pg; as root
# it runs as the `postgres` system user (PostgreSQL refuses to run as root).
#
# Environment:
#   PALPO_BIN      an existing palpo binary to use instead of installing one
#                  (default: <repo>/target/palpo/bin/palpo, installed there by `install`)
#   PG_BIN         PostgreSQL's server binaries (default: the newest /usr/lib/postgresql/*/bin)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
PALPO_VERSION="0.0.2"
PALPO_ROOT="${REPO_ROOT}/target/palpo"

die() {
    echo "palpo.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

palpo_bin() {
    if [ -n "${PALPO_BIN:-}" ]; then
        echo "${PALPO_BIN}"
    else
        echo "${PALPO_ROOT}/bin/palpo"
    fi
}

# The newest PostgreSQL with initdb under /usr/lib/postgresql, or PG_BIN.
pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "${PG_BIN}"
        return 0
    fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -n "${dir}" ] && [ -x "${dir}/initdb" ]; then
        echo "${dir}"
    fi
}

cmd_install() {
    mkdir -p "${PALPO_ROOT}"
    # Serialize concurrent installs (e.g. test binaries run in parallel).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"${PALPO_ROOT}.lock"
        flock 9
    fi
    if [ -z "$(pg_bin)" ]; then
        echo "palpo.sh: installing PostgreSQL (apt-get install postgresql)" >&2
        command -v apt-get >/dev/null 2>&1 || die "no initdb under /usr/lib/postgresql/*/bin and no apt-get"
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y postgresql >&2 \
            || die "apt-get install postgresql failed"
        [ -n "$(pg_bin)" ] || die "PostgreSQL installed but no initdb under /usr/lib/postgresql/*/bin"
    fi
    local bin
    bin="$(palpo_bin)"
    if [ -x "${bin}" ]; then
        echo "palpo.sh: palpo already installed: ${bin}" >&2
        return 0
    fi
    [ -z "${PALPO_BIN:-}" ] || die "PALPO_BIN=${PALPO_BIN} is not an executable file"
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    echo "palpo.sh: building palpo ${PALPO_VERSION} into ${PALPO_ROOT} (several minutes the first time)" >&2
    cargo install palpo --version "${PALPO_VERSION}" --locked --root "${PALPO_ROOT}" >&2 \
        || die "cargo install palpo ${PALPO_VERSION} failed"
    [ -x "${bin}" ] || die "cargo install succeeded but ${bin} is missing"
}

# The prefix that runs a command as the owner of the cluster: the `postgres` user when we
# are root (setpriv execs, so a background job's pid is PostgreSQL's own).
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# shellcheck source=scripts/supervise.sh
. "${SCRIPT_DIR}/supervise.sh"

PG_PID=""
PALPO_PID=""
SUPERVISED_DIR=""

# shellcheck disable=SC2317,SC2329  # invoked via trap
stop_supervised() {
    trap - TERM INT HUP EXIT
    if [ -n "${PALPO_PID}" ]; then
        terminate "${PALPO_PID}"
        wait "${PALPO_PID}" 2>/dev/null || true
        PALPO_PID=""
    fi
    if [ -n "${PG_PID}" ]; then
        # SIGINT: PostgreSQL's fast shutdown.
        terminate "${PG_PID}" INT
        wait "${PG_PID}" 2>/dev/null || true
        PG_PID=""
    fi
    rm -f "${SUPERVISED_DIR}/palpo.pid" "${SUPERVISED_DIR}/postgres.pid"
}

# Starts the cluster of DIR on 127.0.0.1:PORT (creating it and the `palpo` database on
# first use) and waits until it accepts connections.
start_postgres() {
    local dir="$1" port="$2" pg
    pg="$(pg_bin)"
    [ -n "${pg}" ] || die "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin); run: $0 install"
    local data="${dir}/pg"
    local fresh=0
    if ! [ -f "${data}/PG_VERSION" ]; then
        fresh=1
        mkdir -p "${data}" "${dir}/pg-socket"
        if [ "$(id -u)" -eq 0 ]; then
            chown postgres:postgres "${data}" "${dir}/pg-socket"
        fi
        chmod 700 "${data}"
        "${AS_PG[@]}" "${pg}/initdb" -D "${data}" -U postgres --auth=trust --encoding=UTF8 \
            --no-locale --no-sync >"${dir}/initdb.log" 2>&1 \
            || die "initdb failed: $(tail -n 20 "${dir}/initdb.log")"
    fi
    "${AS_PG[@]}" "${pg}/postgres" -D "${data}" -h 127.0.0.1 -p "${port}" -k "${dir}/pg-socket" \
        -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        >>"${dir}/postgres.log" 2>&1 </dev/null &
    PG_PID=$!
    echo "${PG_PID}" >"${dir}/postgres.pid"
    for _ in $(seq 1 300); do
        if "${pg}/pg_isready" -q -h 127.0.0.1 -p "${port}" -U postgres; then
            break
        fi
        kill -0 "${PG_PID}" 2>/dev/null || die "PostgreSQL exited during startup: $(tail -n 20 "${dir}/postgres.log")"
        sleep 0.1
    done
    "${pg}/pg_isready" -q -h 127.0.0.1 -p "${port}" -U postgres \
        || die "PostgreSQL not ready on port ${port} after 30 s: $(tail -n 20 "${dir}/postgres.log")"
    if [ "${fresh}" -eq 1 ]; then
        "${pg}/createdb" -h 127.0.0.1 -p "${port}" -U postgres palpo \
            || die "createdb palpo failed"
    fi
}

# Supervises PostgreSQL and palpo as scripts/supervise.sh says (palpo is the server a
# "kill" line kills; PostgreSQL always stops with its fast shutdown). palpo's output goes to
# DIR/palpo.stdout, PostgreSQL's to DIR/postgres.log.
cmd_supervise() {
    [ $# -eq 2 ] || usage
    SUPERVISED_DIR="$(cd "$1" && pwd)"
    local port="$2" bin
    [ -f "${SUPERVISED_DIR}/palpo.toml" ] || die "no palpo.toml in ${SUPERVISED_DIR} (the test kit writes it)"
    bin="$(palpo_bin)"
    [ -x "${bin}" ] || die "palpo is not installed (${bin}); run: $0 install"
    trap 'stop_supervised; exit 0' TERM INT HUP
    trap 'stop_supervised' EXIT
    start_postgres "${SUPERVISED_DIR}" "${port}"
    cd "${SUPERVISED_DIR}"
    PALPO_CONFIG="${SUPERVISED_DIR}/palpo.toml" "${bin}" \
        >>"${SUPERVISED_DIR}/palpo.stdout" 2>&1 </dev/null &
    PALPO_PID=$!
    echo "${PALPO_PID}" >"${SUPERVISED_DIR}/palpo.pid"

    watch_stdin palpo.sh palpo "${PALPO_PID}" PostgreSQL "${PG_PID}"
    stop_supervised
}

main() {
    [ $# -ge 1 ] || usage
    local sub="$1"
    shift
    case "${sub}" in
        install) [ $# -eq 0 ] || usage; cmd_install ;;
        bin) [ $# -eq 0 ] || usage; palpo_bin ;;
        supervise) cmd_supervise "$@" ;;
        -h | --help | help) usage ;;
        *) echo "palpo.sh: unknown command: ${sub}" >&2; usage ;;
    esac
}

main "$@"
