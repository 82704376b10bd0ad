#!/usr/bin/env bash
# Leave a Docker engine answering, without ever touching one that already runs.
#
#   scripts/engine.sh            ensure an engine (install docker.io + debootstrap and
#                                start dockerd when we are root on Debian)
#
# Honours DOCKER_HOST: when it points somewhere else, we only check that it answers.
set -euo pipefail

log() { printf 'engine: %s\n' "$*" >&2; }

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if answers; then
    log "Docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
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
        exit 0
    fi
    sleep 1
done
log "dockerd did not answer within 60 s; see /var/log/dockerd.log"
tail -n 20 /var/log/dockerd.log >&2 || true
exit 1
