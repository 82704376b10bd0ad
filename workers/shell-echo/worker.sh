#!/bin/sh
# Echo worker, protocol v1 by hand: one JSON task on stdin, one JSON result on
# stdout, logs on stderr, exit 0 (ok), 2 (bad input, not retriable).
set -u

task=$(cat)
if ! printf '%s' "$task" | jq -e 'type == "object" and (.params | type == "object")' >/dev/null 2>&1; then
    printf '{"success": false, "error": {"type": "InvalidTask", "message": "stdin is not a task object", "retriable": false}}\n'
    exit 2
fi

id=$(printf '%s' "$task" | jq -r '.id')
echo "echo worker: task $id (attempt $WORKERHOST_ATTEMPT, correlation $WORKERHOST_CORRELATION_ID)" >&2

printf '%s' "$task" | jq -c --arg host "$(hostname)" '{
    success: true,
    result: {
        echo: .params,
        text: ((.params.text // "") | ascii_upcase),
        attempt: .attempt,
        correlation_id: .correlation_id,
        shell: "POSIX sh + jq",
        container: $host
    }
}'
