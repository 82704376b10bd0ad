"""A test worker that misbehaves on request. params["do"] picks the behaviour.

It speaks the protocol by hand (not through the SDK) so that tests control
exactly what reaches stdout and which exit code the container ends with.
"""

import json
import os
import resource
import socket
import sys
import time


def reply(obj, code=0):
    write_out(json.dumps(obj).encode())
    sys.exit(code)


def write_out(data):
    """In 64 KiB pieces: gVisor (Debian 12's runsc) delivers only the first 64 KiB of a larger write."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view[:65536]) :]


def ok(result):
    reply({"success": True, "result": result})


def read_cgroup(*candidates):
    for path in candidates:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def capability_mask():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("CapEff:", "NoNewPrivs:")):
                yield line.split(":")[0], line.split(":")[1].strip()


def probe():
    root_writable = True
    try:
        open("/probe", "w").close()
    except OSError:
        root_writable = False
    with open("/tmp/probe", "w") as f:
        f.write("x")
    return {
        "memory_limit": read_cgroup("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "memsw_limit": read_cgroup(
            "/sys/fs/cgroup/memory.swap.max", "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"
        ),
        "pids_limit": read_cgroup("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
        "cpu_max": read_cgroup("/sys/fs/cgroup/cpu.max"),
        "cfs_quota": read_cgroup("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"),
        "cfs_period": read_cgroup(
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"
        ),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "root_writable": root_writable,
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "status": dict(capability_mask()),
        "hostname": socket.gethostname(),
        "kernel": os.uname().release,
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "rlimit_fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("WORKERHOST_", "TRACEPARENT", "TEST_"))},
    }


def fork_bomb():
    children, error = [], None
    while len(children) < 10000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = str(exc)
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
    for pid in children:
        os.waitpid(pid, 0)
    ok({"forked": len(children), "error": error})


def main():
    task = json.loads(sys.stdin.read() or "{}") if os.environ.get("TEST_IGNORE_STDIN") != "1" else {}
    params = task.get("params", {})
    do = params.get("do", "ok")
    sys.stderr.write(f"behave: {do} attempt {task.get('attempt')}\n")
    if os.environ.get("TEST_FAIL") == "1":  # a broken build of this worker
        reply({"success": False, "error": {"type": "Broken", "message": "TEST_FAIL=1", "retriable": True}}, 1)
    if do == "ok":
        ok({"params": params, "attempt": task.get("attempt"), "task": {k: v for k, v in task.items() if k != "params"}})
    elif do == "exit":
        if params.get("stdout"):
            sys.stdout.write(params["stdout"])
            sys.stdout.flush()
        sys.exit(int(params["code"]))
    elif do == "sleep":
        # "again": how long to sleep on attempt 2 and later instead (a task that is slow only once).
        attempt = task.get("attempt") or 1
        seconds = params["again"] if attempt > 1 and "again" in params else params["seconds"]
        started = time.time()
        time.sleep(float(seconds))
        ok({"slept": seconds, "attempt": attempt, "started": started, "ended": time.time()})
    elif do == "close_stdout_and_sleep":
        sys.stdout.close()
        os.close(1)
        time.sleep(float(params["seconds"]))
    elif do == "alloc":
        blocks = []
        for _ in range(int(params["mb"])):
            blocks.append(bytearray(b"x" * (1024 * 1024)))
        ok({"allocated_mb": len(blocks)})
    elif do == "fork_bomb":
        fork_bomb()
    elif do == "raw":
        sys.stdout.write(params["stdout"])
        sys.stdout.flush()
        sys.exit(int(params.get("code", 0)))
    elif do == "flood":
        stream = sys.stdout if params["stream"] == "stdout" else sys.stderr
        chunk = "y" * 65536
        for _ in range(int(params["mb"]) * 16):
            stream.write(chunk)
        stream.flush()
        ok({})
    elif do == "stderr":  # these exact bytes on stderr (hex: control characters, invalid UTF-8)
        data = bytes.fromhex(params["hex"])
        while data:
            data = data[os.write(2, data) :]
        if "code" in params:  # and then fail with this exit code, saying nothing on stdout
            sys.exit(int(params["code"]))
        ok({"written": len(bytes.fromhex(params["hex"]))})
    elif do == "echo_blob":
        ok({"blob": params["blob"], "length": len(params["blob"])})
    elif do == "blob":
        ok({"blob": "z" * int(params["size"])})
    elif do == "probe":
        ok(probe())
    elif do == "spans":
        import workerhost_sdk as sdk

        with sdk.span("outer", {"n": 1}), sdk.span("inner"):
            time.sleep(0.05)
        sdk.progress(50, "half way")
        ok({"spans": 2})
    elif do == "abuse_side_channel":
        import workerhost_sdk as sdk

        err = sys.stderr
        err.write('{"workerhost": "span", "this is": not json\n')
        err.write('{"workerhost": "span", "trace_id": "zz"}\n')
        err.write('{"workerhost": "span", "name": "' + "x" * (2 * 1024 * 1024) + '"}\n')
        for i in range(int(params.get("spans", 5000))):
            with sdk.span(f"flood {i}"):
                pass
        err.write("a plain log line after all that\n")
        ok({"abused": True})
    else:
        reply({"success": False, "error": {"type": "UnknownBehaviour", "message": do}}, 2)


if __name__ == "__main__":
    main()
