#!/usr/bin/env bash
# Run each example worker once, side by side, through `workerhost run`:
# a Python 3 worker, untouched Python 2.7 code, and a shell worker with no SDK.
set -euo pipefail
workerhost=${1:-workerhost}

run() {
    printf '\n$ workerhost run %s %s\n' "$1" "$2"
    "$workerhost" run "$1" "$2"
}

"$workerhost" workers
run PrismQ.IdeaInspiration.TextStats \
    '{"title": "Containers for every task", "text": "Each task runs in its own container. Containers start fast, and a worker can be written in any language. The host stays small and knows nothing of the work."}'
run PrismQ.Legacy.NormalizeTags '{"tags": ["Café", "cafe", "Big Data", "big_data", "Python 2"]}'
run PrismQ.Example.Echo '{"text": "hello from a shell worker"}'
