#!/usr/bin/env bash
# Leave a Docker engine answering, without ever touching one that already runs.
#
#   scripts/engine.sh            ensure an engine (install docker.io + debootstrap and
#                                start dockerd when we are root on Debian)
#   scripts/engine.sh --sandbox  the same, then install gVisor (runsc) and register it
#                                with the engine, if this machine's engine is ours to change
#
# Honours DOCKER_HOST: when it points somewhere else, we only check that it answers.
set -euo pipefail

sandbox=0
for arg in "$@"; do
    case "$arg" in
        --sandbox) sandbox=1 ;;
        *) echo "usage: $0 [--sandbox]" >&2; exit 2 ;;
    esac
done

log() { printf 'engine: %s\n' "$*" >&2; }

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Register runsc with the local engine: only as root, only for the engine on this
# machine's default socket, and only by adding to /etc/docker/daemon.json.
register_runsc() {
    if docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null | grep -qw runsc; then
        log "gVisor (runsc) is registered with the engine"
        return 0
    fi
    if [ "$(id -u)" != 0 ] || { [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ]; }; then
        log "cannot register runsc: not root, or the engine is not this machine's; add to its daemon.json:"
        log '  {"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}}}'
        return 1
    fi
    if ! command -v runsc >/dev/null 2>&1; then
        log "installing runsc (gVisor)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
    fi
    mkdir -p /etc/docker
    # Merge, never replace: other runtimes and settings stay as they are. Without
    # --network=none, runsc refuses to start on these machines.
    python3 - <<'PY'
import json, os
path = "/etc/docker/daemon.json"
config = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as f:
        config = json.load(f)
config.setdefault("runtimes", {})["runsc"] = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}
with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
os.replace(path + ".tmp", path)
PY
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        log "registered runsc in /etc/docker/daemon.json; start (or restart) dockerd to use it"
        return 1
    fi
    log "registered runsc in /etc/docker/daemon.json; reloading dockerd (SIGHUP)"
    kill -HUP "$pid"
    for _ in $(seq 1 20); do
        if docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null | grep -qw runsc; then
            log "gVisor (runsc) is registered with the engine"
            return 0
        fi
        sleep 0.5
    done
    log "dockerd did not pick up runsc; see /var/log/dockerd.log"
    return 1
}

if answers; then
    log "Docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    if [ "$sandbox" = 1 ]; then register_runsc; fi
    exit 0
fi

if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ]; then
    log "DOCKER_HOST=${DOCKER_HOST} does not answer; start that engine, or unset DOCKER_HOST"
    exit 1
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "no Docker engine answers and this script can only install one as root on Debian."
    log "Install Docker Engine (https://docs.docker.com/engine/install/) and start it, then retry."
    exit 1
fi

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A dockerd that was killed leaves its pid file behind and the next one refuses
# to start ("pid file found"); remove it only when the pid it names is dead.
pidfile=/var/run/docker.pid
if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "dockerd (pid $pid) is running but does not answer yet; waiting for it"
    else
        log "removing stale $pidfile (pid ${pid:-?} is not alive)"
        rm -f "$pidfile"
    fi
fi

if ! { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
    mkdir -p /var/log
    log "starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
fi

for _ in $(seq 1 60); do
    if answers; then
        log "Docker engine answers ($(docker version --format '{{.Server.Version}}'))"
        if [ "$sandbox" = 1 ]; then register_runsc; fi
        exit 0
    fi
    sleep 1
done
log "dockerd did not answer within 60 s; see /var/log/dockerd.log"
tail -n 20 /var/log/dockerd.log >&2 || true
exit 1
