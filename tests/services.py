"""Brokers for the tests: Redis and RabbitMQ in containers, from images the project builds offline.

The images come from images/services/* on the Debian rootfs (no registry is reachable here);
testcontainers starts them with Ryuk off and reaches them on loopback only (TC_HOST), never
through the bridge gateway. Each container is labelled with this session's host id prefix, so
the suite's leak checks see it like every other container the tests create.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.conftest import ROOT, build_test_image

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TC_HOST", "127.0.0.1")

REDIS_IMAGE = "workerhost-test/redis:latest"
RABBITMQ_IMAGE = "workerhost-test/rabbitmq:latest"


def build_service(tag: str, folder: str) -> str:
    """Build a broker image from images/services/<folder> (cached by the engine after the first time)."""
    return build_test_image(tag, str(ROOT / "images" / "services" / folder))


@dataclass
class Service:
    """A broker in a container: where it listens on loopback, and the container to stop or restart."""

    container: Any  # testcontainers' DockerContainer
    port: int  # the port inside the container

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.container.get_exposed_port(self.port))

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the same container (its data stays), and wait until it answers again."""
        wrapped = self.container.get_wrapped_container()
        wrapped.restart(timeout=10)
        wait_for_port(*self.address, timeout=timeout)


@contextmanager
def service(
    image: str, port: int, labels: dict[str, str], timeout: float = 60.0, host_port: int | None = None
) -> Iterator[Service]:
    """Run ``image`` with ``port`` published on loopback until the block ends (on ``host_port`` when
    given: the engine may publish on another port after a restart, and clients keep their URL)."""
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(image)
    # Published on loopback only, so that nothing outside this machine reaches a test's broker
    # (testcontainers' with_bind_ports takes no address; docker-py's port map does).
    container.ports = {f"{port}/tcp": ("127.0.0.1", host_port)}
    container = container.with_kwargs(labels=labels)
    container.start()
    try:
        started = Service(container, port)
        wait_for_port(*started.address, timeout=timeout)
        yield started
    finally:
        container.stop(force=True, delete_volume=True)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on {host}:{port} after {timeout}s") from None
            time.sleep(0.1)
