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
start=$(date +%s.%N)

result=$(printf '%s' "$task" | jq -c --arg host "$(hostname)" '{
    success: true,
    result: {
        echo: .params,
        text: ((.params.text // "") | ascii_upcase),
        attempt: .attempt,
        correlation_id: .correlation_id,
        shell: "POSIX sh + jq",
        container: $host
    }
}')

# A span of our own, by hand, on the SDK's side channel (stderr): the host puts
# it into the task's trace, as a child of the attempt (TRACEPARENT's span).
trace_id=$(echo "${TRACEPARENT:-}" | cut -d- -f2)
parent_id=$(echo "${TRACEPARENT:-}" | cut -d- -f3)
if [ -n "$trace_id" ] && [ -n "$parent_id" ]; then
    span_id=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    printf '{"workerhost": "span", "trace_id": "%s", "span_id": "%s", "parent_id": "%s", "name": "echo", "start": %s, "end": %s, "attrs": {"shell": "sh"}}\n' \
        "$trace_id" "$span_id" "$parent_id" "$start" "$(date +%s.%N)" >&2
fi
printf '%s\n' "$result"
