"""The baseline the benchmarks measure against: one task through docker-py by hand, as lean as it goes."""

from __future__ import annotations

import socket
from typing import Any

from runner.config import WorkerConfig


def host_config(client: Any, worker: WorkerConfig) -> dict[str, Any]:
    """The limits workerhost applies, so that the baseline pays for the same isolation."""
    config: dict[str, Any] = client.create_host_config(
        nano_cpus=int(worker.cpus * 1e9),
        mem_limit=worker.memory,
        memswap_limit=worker.memory,
        pids_limit=worker.pids_limit,
        network_mode="none",
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={worker.tmpfs},mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        log_config={"Type": "none", "Config": {}},
    )
    return config


def bare_task(client: Any, worker: WorkerConfig, payload: bytes, config: dict[str, Any]) -> None:
    """create, attach, start, write stdin, read to EOF, wait, remove: nothing else."""
    container = client.create_container(
        worker.image, worker.command, stdin_open=True, user=worker.user, host_config=config, network_disabled=True
    )["Id"]
    sock = client.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})._sock
    client.start(container)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    client.wait(container)
    sock.close()
    client.remove_container(container, force=True)
