#!/bin/sh
# Echo worker, protocol v1 by hand: one JSON task on stdin, one JSON result on
# stdout, logs on stderr, exit 0 (ok), 2 (bad input, not retriable).
#
# The task's ids come from the envelope, not the environment: a prewarmed
# container was started before its task was known (README "Warm containers").
# Started for reuse (WORKERHOST_MODE=reuse), it speaks the line protocol: it
# says it is ready, then reads one task per line and answers each with one
# result line and a "done" mark on stderr, until stdin ends.
set -u

# handle TASK: prints the result line; returns the exit code.
handle() {
    task=$1
    if ! printf '%s' "$task" | jq -e 'type == "object" and (.params | type == "object")' >/dev/null 2>&1; then
        printf '{"success": false, "error": {"type": "InvalidTask", "message": "stdin is not a task object", "retriable": false}}\n'
        return 2
    fi
    start=$(date +%s.%N)
    printf '%s' "$task" | jq -r '"echo worker: task \(.id) (attempt \(.attempt), correlation \(.correlation_id))"' >&2
    result=$(printf '%s' "$task" | jq -c --arg host "$(hostname)" --arg mode "${WORKERHOST_MODE:-cold}" '{
        success: true,
        result: {
            echo: .params,
            text: ((.params.text // "") | ascii_upcase),
            attempt: .attempt,
            correlation_id: .correlation_id,
            shell: "POSIX sh + jq",
            container: $host,
            mode: $mode
        }
    }')
    # A span of our own, by hand, on the SDK's side channel (stderr): the host puts
    # it into the task's trace, as a child of the attempt (the envelope's traceparent).
    traceparent=$(printf '%s' "$task" | jq -r '.traceparent // ""')
    trace_id=$(echo "$traceparent" | cut -d- -f2)
    parent_id=$(echo "$traceparent" | cut -d- -f3)
    if [ -n "$trace_id" ] && [ -n "$parent_id" ]; then
        span_id=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
        printf '{"workerhost": "span", "trace_id": "%s", "span_id": "%s", "parent_id": "%s", "name": "echo", "start": %s, "end": %s, "attrs": {"shell": "sh"}}\n' \
            "$trace_id" "$span_id" "$parent_id" "$start" "$(date +%s.%N)" >&2
    fi
    printf '%s\n' "$result"
    return 0
}

if [ "${WORKERHOST_MODE:-}" = "reuse" ]; then
    echo '{"workerhost": "ready"}' >&2
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        handle "$line"
        echo "{\"workerhost\": \"done\", \"exit_code\": $?}" >&2
    done
    exit 0
fi
handle "$(cat)"
exit $?
