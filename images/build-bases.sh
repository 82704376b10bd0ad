#!/usr/bin/env bash
# Build the two base images, workerhost/python:3.11 and workerhost/python:2.7.
#
# Each base is the official slim image when a registry answers, and otherwise a
# Debian root filesystem made here with debootstrap and `docker import`
# (bookworm for Python 3.11, bullseye for Python 2.7). The imported root is kept
# as workerhost/rootfs:<suite>, so a rebuild with nothing changed skips
# debootstrap and docker's layer cache does the rest.
#
#   images/build-bases.sh            both bases
#   images/build-bases.sh 3.11       one of them
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf 'build-bases: %s\n' "$*" >&2; }

# root_for VERSION -> prints the image to build the base FROM.
root_for() {
    local version=$1 slim suite packages
    case "$version" in
        3.11) slim=python:3.11-slim; suite=bookworm; packages=python3 ;;
        2.7)  slim=python:2.7-slim;  suite=bullseye; packages=python2.7,python2-minimal ;;
        *) log "unknown base version $version"; return 1 ;;
    esac
    if [ -n "$(docker images -q "$slim" 2>/dev/null)" ]; then echo "$slim"; return; fi
    if [ -z "${WORKERHOST_OFFLINE:-}" ] && timeout 60 docker pull -q "$slim" >/dev/null 2>&1; then
        echo "$slim"; return
    fi
    local rootfs=workerhost/rootfs:$suite
    if [ -n "$(docker images -q "$rootfs" 2>/dev/null)" ]; then echo "$rootfs"; return; fi

    log "$slim cannot be pulled: building $rootfs offline with debootstrap ($suite, $packages)"
    if [ "$(id -u)" != 0 ]; then log "debootstrap needs root; run as root or make $slim available"; return 1; fi
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; return 1; }
    local dir
    dir=$(mktemp -d /var/tmp/workerhost-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" RETURN
    debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 || {
        log "debootstrap failed; last lines of $dir.log:"; tail -n 20 "$dir.log" >&2; return 1; }
    rm -f "$dir.log"
    # Keep the image small: package lists and caches are rebuilt by `apt-get update`.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
           "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
    tar -C "$dir" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh"]' - "$rootfs" >/dev/null
    log "imported $rootfs"
    echo "$rootfs"
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.11 2.7)
for version in "${versions[@]}"; do
    root=$(root_for "$version")
    log "workerhost/python:$version FROM $root"
    docker build -q --build-arg "ROOT=$root" -t "workerhost/python:$version" \
        -f "$here/python$version/Dockerfile" "$here" >/dev/null
done
