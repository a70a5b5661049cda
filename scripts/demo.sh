#!/usr/bin/env bash
# See the sync loop work against a real homeserver.
#
# Starts a throwaway Synapse on a free loopback port, registers alice and bob,
# puts them in a room, runs the `tail` example as alice (it prints one readable
# line per event on stdout, `--format text`; set DEMO_FORMAT=json for the JSON
# lines) and has bob send messages, an edit, a reaction, typing notifications
# and a read receipt.  Everything is removed at the end, also
# on Ctrl-C.
#
# Narration goes to stderr, the example's output to stdout.
#
# Environment:
#   DEMO_SKIP_TAIL=1   do everything except building and running the example
#   DEMO_PAUSE=SECS    pause between bob's actions (default 1)
#   DEMO_FORMAT=json   print tail's JSON lines instead of the text format
#   SYNAPSE_VENV       see scripts/synapse.sh
#
# The homeserver is the test kit's throwaway Synapse (its `synapse` binary starts it,
# registers the users and stops it on SIGTERM), the same one the integration tests use.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
SYNAPSE_SH="${SCRIPT_DIR}/synapse.sh"
PAUSE="${DEMO_PAUSE:-1}"
FORMAT="${DEMO_FORMAT:-text}"
SKIP_TAIL="${DEMO_SKIP_TAIL:-}"

DIR=""
TAIL_BIN=""
TAIL_PID=""
SYNAPSE_BIN=""
SYNAPSE_PID=""

say() {
    echo "demo: $*" >&2
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "${TAIL_PID}" ] && kill -0 "${TAIL_PID}" 2>/dev/null; then
        say "stopping tail"
        kill -TERM "${TAIL_PID}" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "${TAIL_PID}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${TAIL_PID}" 2>/dev/null; then
            say "tail ignored SIGTERM for 5 s; killing it"
            kill -KILL "${TAIL_PID}" 2>/dev/null || true
        fi
        wait "${TAIL_PID}" 2>/dev/null || true
    fi
    if [ -n "${SYNAPSE_PID}" ]; then
        say "stopping Synapse"
        kill -TERM "${SYNAPSE_PID}" 2>/dev/null || true
        wait "${SYNAPSE_PID}" 2>/dev/null || true
    fi
    if [ -n "${DIR}" ]; then
        rm -rf "${DIR}"
    fi
    exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# mx METHOD TOKEN BODY SEGMENT...
# Calls /_matrix/client/v3/SEGMENT/... (each segment percent-encoded) on the
# demo homeserver and prints the JSON response; fails loudly on non-2xx.
# A segment "@TXN" becomes a fresh transaction id (Synapse deduplicates sends
# by transaction id, so each send needs its own).
mx() {
    python3 - "${BASE_URL}" "$@" <<'PY'
import sys, urllib.error, urllib.parse, urllib.request, uuid
base, method, token, body, *segments = sys.argv[1:]
segments = ["demo-" + uuid.uuid4().hex if s == "@TXN" else s for s in segments]
path = "/_matrix/client/v3/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)
req = urllib.request.Request(
    base + path,
    data=body.encode() if method in ("POST", "PUT") else None,
    headers={"Content-Type": "application/json", "Authorization": "Bearer " + token},
    method=method,
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=30) as r:
        print(r.read().decode())
except urllib.error.HTTPError as e:
    sys.exit("demo: %s %s failed: HTTP %d: %s" % (method, path, e.code, e.read().decode(errors="replace")))
except urllib.error.URLError as e:
    sys.exit("demo: %s %s failed: %s" % (method, path, e.reason))
PY
}

# field NAME: print a top-level string field of the JSON object on stdin.
field() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# json KEY VALUE [KEY VALUE...]: print a JSON object of string values.
json() {
    python3 -c 'import json, sys; a = sys.argv[1:]; print(json.dumps(dict(zip(a[::2], a[1::2]))))' "$@"
}

bob_says() {
    say "bob says \"$1\""
    mx PUT "${BOB_TOKEN}" "$(json msgtype m.text body "$1")" \
        rooms "${ROOM}" send m.room.message @TXN | field event_id
}

# built_exe NAME KIND: the executable of NAME (KIND bin or example) among cargo's JSON
# messages on stdin.
built_exe() {
    python3 -c '
import json, sys
name, kind = sys.argv[1:]
exe = ""
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == name \
            and kind in msg["target"]["kind"] and msg.get("executable"):
        exe = msg["executable"]
print(exe)' "$1" "$2"
}

command -v python3 >/dev/null 2>&1 || { echo "demo: python3 is required" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || { echo "demo: cargo is required" >&2; exit 1; }
cd "${REPO_ROOT}"

say "installing Synapse (first run only)"
bash "${SYNAPSE_SH}" install

say "building the test kit's Synapse starter (cargo build -p matrix-sync-testkit --bin synapse)"
SYNAPSE_BIN="$(cargo build -p matrix-sync-testkit --bin synapse --message-format=json-render-diagnostics \
    | built_exe synapse bin)"
[ -n "${SYNAPSE_BIN}" ] && [ -x "${SYNAPSE_BIN}" ] || { echo "demo: could not build the Synapse starter" >&2; exit 1; }

if [ -z "${SKIP_TAIL}" ]; then
    say "building the tail example (cargo build --release --example tail)"
    # Run the built binary directly rather than through `cargo run`: it starts
    # at once (no waiting on a build-directory lock held by another cargo)
    # and SIGTERM reaches the example itself.
    TAIL_BIN="$(cargo build --release --example tail --message-format=json-render-diagnostics \
        | built_exe tail example)"
    [ -n "${TAIL_BIN}" ] && [ -x "${TAIL_BIN}" ] || { echo "demo: could not build the tail example" >&2; exit 1; }
fi

DIR="$(mktemp -d -t matrix-sync-demo.XXXXXX)"
say "starting a throwaway Synapse and registering alice and bob"
"${SYNAPSE_BIN}" --user alice:alice-demo-password --user bob:bob-demo-password \
    >"${DIR}/synapse.json" </dev/null &
SYNAPSE_PID=$!
# The starter prints one line once Synapse is healthy and the users exist.
for _ in $(seq 1 1200); do
    [ -s "${DIR}/synapse.json" ] && break
    kill -0 "${SYNAPSE_PID}" 2>/dev/null || { SYNAPSE_PID=""; echo "demo: Synapse did not start" >&2; exit 1; }
    sleep 0.1
done
[ -s "${DIR}/synapse.json" ] || { echo "demo: Synapse did not start within 120 s" >&2; exit 1; }
# user FIELD NAME: a field of a registered user's answer.
user() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)["users"][sys.argv[2]][sys.argv[1]])' "$1" "$2" \
        <"${DIR}/synapse.json"
}
BASE_URL="$(field base_url <"${DIR}/synapse.json")"
ALICE_TOKEN="$(user access_token alice)"
BOB_TOKEN="$(user access_token bob)"
BOB_ID="$(user user_id bob)"
say "Synapse is running on ${BASE_URL}"

say "alice creates a room and invites bob"
ROOM="$(mx POST "${ALICE_TOKEN}" '{"preset":"private_chat","name":"demo"}' createRoom | field room_id)"
mx POST "${ALICE_TOKEN}" "$(json user_id "${BOB_ID}")" rooms "${ROOM}" invite >/dev/null
say "bob joins ${ROOM}"
mx POST "${BOB_TOKEN}" '{}' join "${ROOM}" >/dev/null

if [ -z "${SKIP_TAIL}" ]; then
    say "starting the equivalent of: cargo run --release --example tail -- --homeserver ${BASE_URL} --format ${FORMAT} (as alice)"
    MATRIX_ACCESS_TOKEN="${ALICE_TOKEN}" "${TAIL_BIN}" --homeserver "${BASE_URL}" --format "${FORMAT}" &
    TAIL_PID=$!
    sleep 3
    if ! kill -0 "${TAIL_PID}" 2>/dev/null; then
        TAIL_STATUS=0
        wait "${TAIL_PID}" || TAIL_STATUS=$?
        TAIL_PID=""
        echo "demo: the tail example exited early (status ${TAIL_STATUS})" >&2
        exit 1
    fi
else
    say "DEMO_SKIP_TAIL is set: not running the tail example"
fi

sleep "${PAUSE}"
FIRST="$(bob_says "hello alice")"
sleep "${PAUSE}"
say "bob starts typing"
mx PUT "${BOB_TOKEN}" '{"typing":true,"timeout":30000}' rooms "${ROOM}" typing "${BOB_ID}" >/dev/null
sleep "${PAUSE}"
say "bob stops typing"
mx PUT "${BOB_TOKEN}" '{"typing":false}' rooms "${ROOM}" typing "${BOB_ID}" >/dev/null
sleep "${PAUSE}"
SECOND="$(bob_says "this is a live sync demo")"
sleep "${PAUSE}"
say "bob edits \"hello alice\" to \"hello, alice!\""
EDIT_BODY="$(python3 -c '
import json, sys
print(json.dumps({
    "msgtype": "m.text",
    "body": "* hello, alice!",
    "m.new_content": {"msgtype": "m.text", "body": "hello, alice!"},
    "m.relates_to": {"rel_type": "m.replace", "event_id": sys.argv[1]},
}))' "${FIRST}")"
mx PUT "${BOB_TOKEN}" "${EDIT_BODY}" rooms "${ROOM}" send m.room.message @TXN >/dev/null
sleep "${PAUSE}"
say "bob reacts with a thumbs-up to \"this is a live sync demo\""
REACTION_BODY="$(python3 -c '
import json, sys
print(json.dumps({"m.relates_to": {"rel_type": "m.annotation", "event_id": sys.argv[1], "key": "\U0001F44D"}}))' "${SECOND}")"
mx PUT "${BOB_TOKEN}" "${REACTION_BODY}" rooms "${ROOM}" send m.reaction @TXN >/dev/null
sleep "${PAUSE}"
say "bob marks \"this is a live sync demo\" as read"
mx POST "${BOB_TOKEN}" '{}' rooms "${ROOM}" receipt m.read "${SECOND}" >/dev/null
sleep "${PAUSE}"
bob_says "bye!" >/dev/null

# Give the last events time to come through the sync loop.
sleep 2
say "done; cleaning up"
