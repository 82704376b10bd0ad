# -*- coding: utf-8 -*-
"""A test worker on the SDK (Python 2.7 and 3): what its container is, and what it was told.

params["do"]: "ok" (default), "fail" (permanent), "retry" (retriable), "sleep"
(``seconds``), "exit" (``code``: the process ends mid-task), "stderr" (writes
``lines`` to stderr first). Every answer says which container ran the task, how
many tasks that process has run, and the task's ids as the environment has them.
"""
import os
import socket
import sys
import time

import workerhost_sdk as sdk

STARTED = time.time()
sys.stderr.write("pooled: started\n")
sys.stderr.flush()
RUNS = []


def handle(task):
    RUNS.append(task.id)
    params = task.params
    do = params.get("do", "ok")
    for line in params.get("lines", []):
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if do == "fail":
        raise sdk.PermanentError("asked to fail")
    if do == "retry":
        raise sdk.RetriableError("asked to fail, retriably")
    if do == "sleep":
        time.sleep(float(params["seconds"]))
    if do == "exit":
        os._exit(int(params.get("code", 1)))
    env = dict((k, v) for k, v in os.environ.items() if k.startswith(("WORKERHOST_", "TRACEPARENT")))
    return {
        "container": socket.gethostname(),
        "runs": len(RUNS),
        "started": STARTED,
        "answered": time.time(),
        "env": env,
        "version": os.environ.get("POOLED_VERSION"),
        "python": "%d.%d" % sys.version_info[:2],
        "remaining": task.remaining(),
    }


if __name__ == "__main__":
    sdk.run(handle)
