#!/usr/bin/env bash
# Leave Debian's chromium on PATH for the dashboard's browser tests (tests/browser).
#
#   scripts/browser.sh    install the `chromium` package with apt-get when no `chromium`
#                         is on PATH (as root on Debian); otherwise only say which one is there
#
# Playwright drives this system chromium (executable_path): the tests never download a
# browser (`playwright install` is not needed and not used). Without chromium the browser
# tests skip, and fail under CI=true.
set -euo pipefail

log() { printf 'browser: %s\n' "$*" >&2; }

if command -v chromium >/dev/null 2>&1; then
    log "chromium is installed: $(chromium --version 2>/dev/null || command -v chromium)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "chromium is not on PATH, and installing it needs root: run as root, or sudo apt-get install chromium"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "chromium is not on PATH, and there is no apt-get here: install chromium with this system's package manager"
    exit 1
fi

log "installing Debian's chromium with apt-get (a few hundred MB)"
if ! apt-get update -qq; then
    log "apt-get update failed: is a Debian mirror reachable from here?"
    exit 1
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    log "apt-get install chromium failed (see above)"
    exit 1
fi
if ! command -v chromium >/dev/null 2>&1; then
    log "apt-get installed chromium, but there is still no chromium on PATH"
    exit 1
fi
log "chromium is installed: $(chromium --version 2>/dev/null || command -v chromium)"
