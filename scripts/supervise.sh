# What synapse.sh and palpo.sh share as supervisors of a throwaway homeserver: sourced by
# them, not run on its own.
#
# A supervisor runs the server in the background and stays in the foreground, so that a
# parent process can tie the server's lifetime to a pipe (the supervisor's stdin):
#   - EOF on stdin (the parent closed the pipe, or died): stop the server gracefully, exit 0;
#   - a line "kill" on stdin: SIGKILL the server at once, stop the rest, exit 0;
#   - TERM/INT/HUP: as for EOF;
#   - a supervised process exits on its own: stop the others, exit with its status (1 if 0).
# Other lines on stdin are ignored.

# Send TERM (or $2) to a pid, wait up to 5 s, then KILL.
terminate() {
    local pid="$1" sig="${2:-TERM}"
    kill -"${sig}" "${pid}" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "${pid}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
}

# Reads stdin until its end or a line "kill" (which SIGKILLs the server, the first pid, at
# once), checking every second that each supervised process still runs; one that exited on
# its own ends the supervisor with its status (the caller's EXIT trap stops the others).
# Arguments: SCRIPT (for messages), then NAME PID pairs, the server first.
watch_stdin() {
    local script="$1"
    shift
    local server_pid="$2" line rc status i name pid
    while true; do
        rc=0
        IFS= read -r -t 1 line || rc=$?
        if [ "${rc}" -eq 0 ]; then
            if [ "${line}" = "kill" ]; then
                kill -KILL "${server_pid}" 2>/dev/null || true
                return 0
            fi
        elif [ "${rc}" -gt 128 ]; then
            # Timeout: check that each is still alive.
            i=1
            while [ "${i}" -lt $# ]; do
                name="${!i}"
                i=$((i + 1))
                pid="${!i}"
                i=$((i + 1))
                if ! kill -0 "${pid}" 2>/dev/null; then
                    status=0
                    wait "${pid}" 2>/dev/null || status=$?
                    echo "${script}: ${name} exited on its own (status ${status})" >&2
                    [ "${status}" -ne 0 ] || status=1
                    exit "${status}"
                fi
            done
        else
            # EOF (or a read error): the parent is gone.
            return 0
        fi
    done
}
