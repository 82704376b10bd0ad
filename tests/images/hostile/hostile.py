"""A test worker that attacks its host and its own sandbox. params["do"] picks the attack.

It speaks the protocol by hand, so that each attack decides exactly what reaches
stdout, when, and whether the process ever exits. Two kinds of attack:

* on the host (fork bomb, memory bomb, CPU spin, floods, never exiting): these
  never return a result; the host must stop them and say why;
* on the sandbox (filling /tmp, writing to the root, the network, the Docker
  socket, the host's files, privileges): these try, and report what they got
  (errno names) in their result, so that a test can assert the sandbox held.
"""

import ctypes
import errno
import json
import os
import socket
import sys
import threading
import time

MIB = 1024 * 1024
PTRACE_ATTACH = 16
MS_REMOUNT = 32
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000


def log(message):
    sys.stderr.write(f"hostile: {message}\n")
    sys.stderr.flush()


def reply(result, code=0):
    write_all(json.dumps({"success": True, "result": result}).encode())
    sys.exit(code)


def write_all(data):
    """All of ``data`` on stdout: gVisor's stdout takes at most 64 KiB a write (a short
    write), and Python's unbuffered text stdout would drop the rest."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def forever():
    while True:
        time.sleep(3600)


def name(code):
    """EPERM for 1: what a test asserts on."""
    return errno.errorcode.get(code, str(code))


def attempt(action):
    """Run ``action``; "ok" if it succeeded (the sandbox did not hold), else the errno's name."""
    try:
        action()
    except OSError as exc:
        return name(exc.errno) if exc.errno else type(exc).__name__
    return "ok"


LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.ptrace.restype = ctypes.c_long
LIBC.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)


def libc_call(function, *args):
    """A libc call as an ``attempt``: -1 means its errno."""

    def call():
        ctypes.set_errno(0)
        if function(*args) == -1:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return attempt(call)


# -- attacks on the host: they never return a result -------------------------------


def fork_bomb(params):
    """Fork until the kernel says no, keep every child alive, and never return."""
    forked, error = 0, None
    while forked < 100000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = name(exc.errno)
            break
        if pid == 0:
            forever()
        forked += 1
    log(f"forked {forked} children, then fork failed with {error}; keeping them all alive")
    forever()


def memory_bomb(params):
    """Touch memory a MiB at a time until something stops us."""
    blocks = []
    while True:
        blocks.append(b"\x01" * MIB)  # written, so every page is real
        if len(blocks) % 16 == 0:
            log(f"holding {len(blocks)} MiB")


def spin():
    while True:
        pass


def cpu_spin(params):
    """Processes x threads, every one of them spinning, forever."""
    for _ in range(int(params.get("processes", 4)) - 1):
        if os.fork() == 0:
            break
    for _ in range(int(params.get("threads", 8))):
        threading.Thread(target=spin, daemon=True).start()
    spin()


def flood(params):
    """Endless output on stdout, stderr, or stderr's side channel (span lines)."""
    stream = params["stream"]
    if stream == "side":
        import workerhost_sdk as sdk

        while True:
            with sdk.span("flood", {"padding": "x" * 100}):
                pass
    fd = 1 if stream == "stdout" else 2
    chunk = b"y" * 65536
    while True:
        os.write(fd, chunk)


def sleep_forever(params):
    """Never close stdout, never exit; with "partial", after half a result."""
    if params.get("partial"):
        sys.stdout.write('{"success": true, "result": {"half": ')
        sys.stdout.flush()
    forever()


def outlive(params):
    """Double-fork a sleeper that keeps stdout and stderr open, then answer and exit."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        grandchild = os.fork()
        if grandchild:
            os.write(write, str(grandchild).encode())
            os._exit(0)
        forever()
    os.waitpid(child, 0)
    sleeper = int(os.read(read, 32))
    reply({"sleeper": sleeper, "main": os.getpid()})


def big_result(params):
    reply({"blob": "z" * int(params["size"])})


def bad_utf8(params):
    os.write(1, b"\xff\xfe not utf-8 \xc3\x28")
    sys.exit(0)


# -- attacks on the sandbox: they report what they got -----------------------------


def fill_tmp(params):
    """Write files in /tmp (``file_mib`` each, or one without end) until a write fails."""
    written, error = 0, None
    chunk = b"\x01" * MIB
    per_file = int(params.get("file_mib", 0)) * MIB or 4096 * MIB
    files = 0
    while error is None and written < 4096 * MIB:
        fd = os.open(f"/tmp/fill{files}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        files += 1
        try:
            in_file = 0
            while in_file < per_file:
                n = os.write(fd, chunk[: per_file - in_file])
                in_file += n
                written += n
        except OSError as exc:
            error = name(exc.errno)
        finally:
            os.close(fd)
    reply({"written": written, "files": files, "error": error})


def write_root(params):
    """Write where only the read-only root filesystem stands in the way."""
    attempts = {
        # owned by nobody (see the Dockerfile): only the read-only mount refuses it
        "create /app/data/x": lambda: open("/app/data/x", "w").close(),
        "mkdir /app/data/d": lambda: os.mkdir("/app/data/d"),
        "chmod /app/data": lambda: os.chmod("/app/data", 0o777),
        "create /x": lambda: open("/x", "w").close(),
        "append /app/hostile.py": lambda: open("/app/hostile.py", "a").close(),
    }
    reply({what: attempt(action) for what, action in attempts.items()})


def network(params):
    """Interfaces, the routing table, and a connect to the host's port on loopback.

    Nothing is sent anywhere but the container's own loopback: the way out is
    judged from the routes (there must be none), not by trying it.
    """
    interfaces = sorted(ifname for _, ifname in socket.if_nameindex())
    result = {"if_nameindex": interfaces, "sys_class_net": sorted(os.listdir("/sys/class/net"))}
    result["loopback"] = connect("127.0.0.1", int(params["port"]))
    try:
        with open("/proc/net/route") as f:
            result["routes"] = [line.split()[:2] for line in f.read().splitlines()[1:] if line.strip()]
    except OSError as exc:
        result["routes"] = errno.errorcode.get(exc.errno, str(exc))
    reply(result)


def connect(host, port):
    began = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        error = attempt(lambda: sock.connect((host, port)))
    return {"error": error, "seconds": round(time.monotonic() - began, 3)}


def escape(params):
    """The Docker socket, the host's files and processes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        docker = attempt(lambda: sock.connect("/var/run/docker.sock"))
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    with open("/etc/hostname") as f:
        hostname = f.read().strip()
    serve_pid = int(params["serve_pid"])
    with open("/proc/1/cmdline", "rb") as f:
        pid_1 = f.read().replace(b"\0", b" ").decode().strip()
    reply({
        "docker_sock_exists": [os.path.exists(p) for p in ("/var/run/docker.sock", "/run/docker.sock")],
        "docker_sock_connect": docker,
        "etc_hostname": hostname,
        "pids": pids,
        "serve_pid_visible": os.path.exists(f"/proc/{serve_pid}"),
        "pid_1": pid_1,
    })  # fmt: skip


def privileges(params):
    """Each way up, and the errno that refused it."""
    os.makedirs("/tmp/mnt", exist_ok=True)
    serve_pid = int(params["serve_pid"])
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"):
                status[key] = value.strip()
    tried = {
        "setuid(0)": attempt(lambda: os.setuid(0)),
        "setgid(0)": attempt(lambda: os.setgid(0)),
        "mount tmpfs": libc_call(LIBC.mount, b"none", b"/tmp/mnt", b"tmpfs", 0, None),
        "remount / rw": libc_call(LIBC.mount, None, b"/", None, MS_REMOUNT, None),
        "raw socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()),
        "ptrace serve": libc_call(LIBC.ptrace, PTRACE_ATTACH, serve_pid, None, None),
        "ptrace pid 1": libc_call(LIBC.ptrace, PTRACE_ATTACH, 1, None, None),
        "chroot": attempt(lambda: os.chroot("/tmp")),
    }
    # New namespaces are not a way up by themselves (gVisor allows them: they are its own);
    # reported apart from the refusals above.
    namespaces = {
        "unshare mount ns": libc_call(LIBC.unshare, CLONE_NEWNS),
        "unshare user ns": libc_call(LIBC.unshare, CLONE_NEWUSER),
    }
    reply({"tried": tried, "namespaces": namespaces, "status": status, "uid": os.getuid(), "pid": os.getpid()})


ATTACKS = {
    f.__name__: f
    for f in (
        fork_bomb, memory_bomb, cpu_spin, flood, sleep_forever, outlive, big_result, bad_utf8,
        fill_tmp, write_root, network, escape, privileges,
    )
}  # fmt: skip


def read_task():
    """The task; but a task whose params start with "ignore_stdin" is left unread past 4 KiB."""
    head = b""
    while len(head) < 4096:
        data = os.read(0, 4096 - len(head))
        if not data:
            break
        head += data
    if b'"params":{"do":"ignore_stdin"' in head:
        return None, len(head)
    rest = sys.stdin.buffer.read()
    return json.loads(head + rest), len(head) + len(rest)


def main():
    task, read = read_task()
    if task is None:
        log(f"ignore_stdin: read {read} bytes of the task, exiting without the rest")
        reply({"read": read})
    params = task["params"]
    log(f"{params['do']} attempt {task['attempt']}")
    ATTACKS[params["do"]](params)


if __name__ == "__main__":
    main()
