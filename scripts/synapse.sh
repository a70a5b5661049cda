#!/usr/bin/env bash
# Throwaway Synapse homeserver for integration tests and the demo.
#
# Usage:
#   scripts/synapse.sh install                 create the virtualenv and install matrix-synapse
#   scripts/synapse.sh init DIR PORT           write DIR/homeserver.yaml (localhost, SQLite, 127.0.0.1:PORT)
#   scripts/synapse.sh run DIR                 run Synapse in the foreground
#   scripts/synapse.sh supervise DIR           run Synapse in the background until stdin closes
#   scripts/synapse.sh start DIR PORT          start daemonized (pidfile DIR/synapse.pid), wait for /health
#   scripts/synapse.sh stop DIR                stop a daemonized Synapse
#   scripts/synapse.sh free-port               print a free loopback TCP port
#   scripts/synapse.sh register URL USER PASS  register a user, print the JSON response
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
    [ -f "$1/homeserver.yaml" ] || die "no homeserver.yaml in $1; run: $0 init $1 PORT"
}

check_port() {
    case "$1" in
        '' | *[!0-9]*) die "invalid port: '$1'" ;;
    esac
    if [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
        die "invalid port: $1"
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

cmd_init() {
    [ $# -eq 2 ] || usage
    local port="$2"
    check_port "${port}"
    require_venv
    local dir
    dir="$(abs_dir "$1")"
    local config="${dir}/homeserver.yaml"
    # Re-init overwrites the config; the data (database, media, signing key) is reset too.
    rm -f "${config}" "${dir}/localhost.log.config" "${dir}/homeserver.db" \
        "${dir}/homeserver.db-wal" "${dir}/homeserver.db-shm" "${dir}/homeserver.log"
    (
        cd "${dir}"
        "${VENV_PY}" -m synapse.app.homeserver \
            --server-name localhost \
            --config-path "${config}" \
            --data-directory "${dir}" \
            --generate-config \
            --report-stats=no
    ) >/dev/null || die "could not generate ${config}"

    # Rewrite the generated config with the test settings.  Editing the parsed
    # YAML (PyYAML ships with Synapse) avoids the pitfalls of appending to the
    # generated text, which has no trailing newline and already defines some
    # of the keys (trusted_key_servers).
    "${VENV_PY}" - "${config}" "${port}" <<'PY' || die "could not rewrite ${config}"
import sys
import yaml

path, port = sys.argv[1], int(sys.argv[2])
with open(path) as f:
    config = yaml.safe_load(f)

config["listeners"] = [{
    "port": port,
    "bind_addresses": ["127.0.0.1"],
    "type": "http",
    "tls": False,
    "x_forwarded": False,
    "resources": [{"names": ["client"], "compress": False}],
}]
# Synapse refuses to start without an explicit answer; never phone home.
config["report_stats"] = False

relaxed = {"per_second": 10000, "burst_count": 100000}
config.update({
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "suppress_key_server_warning": True,
    "trusted_key_servers": [],
    "presence": {"enabled": True},
    "url_preview_enabled": False,
    # Very relaxed rate limits: tests create many rooms, users and events quickly.
    "rc_message": relaxed,
    "rc_registration": relaxed,
    "rc_registration_token_validity": relaxed,
    "rc_login": {
        "address": relaxed,
        "account": relaxed,
        "failed_attempts": relaxed,
    },
    "rc_room_creation": relaxed,
    "rc_joins": {"local": relaxed, "remote": relaxed},
    "rc_joins_per_room": relaxed,
    "rc_invites": {
        "per_room": relaxed,
        "per_user": relaxed,
        "per_issuer": relaxed,
    },
    "rc_3pid_validation": relaxed,
    "rc_admin_redaction": relaxed,
    "rc_key_requests": relaxed,
    "rc_presence": {"per_user": relaxed},
})

with open(path, "w") as f:
    f.write("# Throwaway Synapse for tests, generated by scripts/synapse.sh init.\n")
    yaml.safe_dump(config, f, default_flow_style=False, sort_keys=False)
PY

    # Log to DIR/homeserver.log at WARNING level.
    cat >"${dir}/localhost.log.config" <<YAML
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: ${dir}/homeserver.log
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
YAML
}

cmd_run() {
    [ $# -eq 1 ] || usage
    require_venv
    local dir
    dir="$(abs_dir "$1")"
    require_config "${dir}"
    cd "${dir}"
    exec "${VENV_PY}" -m synapse.app.homeserver -c "${dir}/homeserver.yaml"
}

# Send TERM to a pid, wait up to 5 s, then KILL.
terminate() {
    local pid="$1"
    kill -TERM "${pid}" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "${pid}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
}

# Runs Synapse in the background and stays in the foreground as its
# supervisor, so that a parent process can tie Synapse's lifetime to a pipe:
#   - EOF on stdin (the parent closed the pipe, or died): TERM Synapse, KILL
#     it after 5 s, exit 0;
#   - a line "kill" on stdin: KILL Synapse at once, exit 0;
#   - TERM/INT/HUP: as for EOF;
#   - Synapse exits on its own: exit with its status (1 if it was 0).
# Other lines on stdin are ignored.  Synapse's output goes to DIR/synapse.stdout
# and its pid to DIR/synapse.pid.
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
    cd "${SUPERVISED_DIR}"
    trap 'stop_supervised; exit 0' TERM INT HUP
    trap 'stop_supervised' EXIT
    "${VENV_PY}" -m synapse.app.homeserver -c "${SUPERVISED_DIR}/homeserver.yaml" \
        >>"${SUPERVISED_DIR}/synapse.stdout" 2>&1 </dev/null &
    SUPERVISED_PID=$!
    echo "${SUPERVISED_PID}" >"${SUPERVISED_DIR}/synapse.pid"

    local line rc status
    while true; do
        rc=0
        IFS= read -r -t 1 line || rc=$?
        if [ "${rc}" -eq 0 ]; then
            if [ "${line}" = "kill" ]; then
                kill -KILL "${SUPERVISED_PID}" 2>/dev/null || true
                break
            fi
        elif [ "${rc}" -gt 128 ]; then
            # Timeout: check that Synapse is still alive.
            if ! kill -0 "${SUPERVISED_PID}" 2>/dev/null; then
                status=0
                wait "${SUPERVISED_PID}" 2>/dev/null || status=$?
                SUPERVISED_PID=""
                echo "synapse.sh: Synapse exited on its own (status ${status})" >&2
                [ "${status}" -ne 0 ] || status=1
                exit "${status}"
            fi
        else
            # EOF (or a read error): the parent is gone.
            break
        fi
    done
    stop_supervised
}

wait_healthy() {
    local port="$1" pid="$2" timeout="$3" dir="$4"
    "${VENV_PY}" - "${port}" "${pid}" "${timeout}" <<'PY' || {
import os, sys, time, urllib.request
port, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
url = "http://127.0.0.1:%s/health" % port
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("Synapse (pid %d) exited before becoming healthy" % pid)
    try:
        with opener.open(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("Synapse did not answer 200 on %s within %ss" % (url, sys.argv[3]))
PY
        echo "synapse.sh: --- tail of ${dir}/homeserver.log ---" >&2
        tail -n 30 "${dir}/homeserver.log" >&2 2>/dev/null || true
        echo "synapse.sh: --- tail of ${dir}/synapse.stdout ---" >&2
        tail -n 30 "${dir}/synapse.stdout" >&2 2>/dev/null || true
        return 1
    }
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local port="$2"
    check_port "${port}"
    require_venv
    local dir
    dir="$(abs_dir "$1")"
    require_config "${dir}"
    local pidfile="${dir}/synapse.pid"
    if [ -f "${pidfile}" ] && kill -0 "$(cat "${pidfile}")" 2>/dev/null; then
        die "Synapse already running for ${dir} (pid $(cat "${pidfile}"))"
    fi
    (
        cd "${dir}"
        exec "${VENV_PY}" -m synapse.app.homeserver -c "${dir}/homeserver.yaml" \
            >>"${dir}/synapse.stdout" 2>&1 </dev/null
    ) &
    local pid=$!
    echo "${pid}" >"${pidfile}"
    if ! wait_healthy "${port}" "${pid}" 60 "${dir}"; then
        terminate "${pid}"
        rm -f "${pidfile}"
        die "Synapse failed to start on 127.0.0.1:${port} (see ${dir}/homeserver.log)"
    fi
    echo "synapse.sh: Synapse running on http://127.0.0.1:${port} (pid ${pid})" >&2
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir
    dir="$(abs_dir "$1")"
    local pidfile="${dir}/synapse.pid"
    if ! [ -f "${pidfile}" ]; then
        echo "synapse.sh: no pidfile in ${dir}; nothing to stop" >&2
        return 0
    fi
    local pid
    pid="$(cat "${pidfile}")"
    if kill -0 "${pid}" 2>/dev/null; then
        kill -TERM "${pid}" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "${pid}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pid}" 2>/dev/null; then
            echo "synapse.sh: Synapse (pid ${pid}) ignored TERM for 10 s; killing" >&2
            kill -KILL "${pid}" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "${pid}" 2>/dev/null || break
                sleep 0.1
            done
        fi
    fi
    rm -f "${pidfile}"
}

cmd_free_port() {
    [ $# -eq 0 ] || usage
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cmd_register() {
    [ $# -eq 3 ] || usage
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys, urllib.error, urllib.request
base, user, password = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
body = json.dumps({
    "username": user,
    "password": password,
    "auth": {"type": "m.login.dummy"},
}).encode()
req = urllib.request.Request(
    base + "/_matrix/client/v3/register",
    data=body,
    headers={"Content-Type": "application/json"},
    method="POST",
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=30) as r:
        print(r.read().decode())
except urllib.error.HTTPError as e:
    sys.stderr.write("register failed: HTTP %d: %s\n" % (e.code, e.read().decode(errors="replace")))
    sys.exit(1)
except urllib.error.URLError as e:
    sys.stderr.write("register failed: %s\n" % e.reason)
    sys.exit(1)
PY
}

main() {
    [ $# -ge 1 ] || usage
    local sub="$1"
    shift
    case "${sub}" in
        install) [ $# -eq 0 ] || usage; cmd_install ;;
        init) cmd_init "$@" ;;
        run) cmd_run "$@" ;;
        supervise) cmd_supervise "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        free-port) cmd_free_port "$@" ;;
        register) cmd_register "$@" ;;
        -h | --help | help) usage ;;
        *) echo "synapse.sh: unknown command: ${sub}" >&2; usage ;;
    esac
}

main "$@"
