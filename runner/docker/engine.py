"""The engine's client: connecting, translating its failures into EngineError, and the probes.

Every call into docker-py goes through ``engine_errors``, so that nothing above
this package sees a driver's exception, and every EngineError says what was
being done and what kind of failure it was (``EngineFault``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from runner.errors import EngineError
from runner.protocol import EngineFault

API_VERSION = "1.41"

# What docker-py raises: its own errors, and requests' for a connection that fails or says nothing.
DRIVER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


def connect(timeout: float = 60.0, check: bool = True) -> docker.APIClient:
    """A low-level client for the engine that ``DOCKER_HOST`` (or the default socket) names.

    With ``check``, the engine must answer now (EngineError otherwise); without,
    the client is made all the same, for a host that waits for its engine.
    """
    kwargs = docker.utils.kwargs_from_env()
    # A fixed API version (Docker 20.10's) needs no round trip to build the client,
    # and every engine since speaks it.
    client = docker.APIClient(version=API_VERSION, timeout=timeout, max_pool_size=256, **kwargs)
    if check:
        reason = ping(client)
        if reason is not None:
            raise EngineError(reason, EngineFault.UNREACHABLE)
    return client


@contextlib.contextmanager
def engine_errors(doing: str) -> Iterator[None]:
    """Raise a driver's error inside as an EngineError of its kind, saying ``doing: why``.

    EngineErrors raised inside (``ImageMissing``, say) pass through as they are.
    """
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise EngineError(f"{doing}: {reason(exc)}", fault_of(exc)) from None


def fault_of(exc: BaseException) -> EngineFault:
    """The kind of a driver's error: a 4xx is a refusal of the request as given, a 5xx the
    engine's own trouble; no status at all means it did not answer."""
    if isinstance(exc, docker.errors.ImageNotFound):
        return EngineFault.IMAGE_MISSING
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:
        return EngineFault.REFUSED
    if isinstance(status, int) and status >= 500:
        return EngineFault.SERVER
    return EngineFault.UNREACHABLE


def reason(exc: BaseException) -> str:
    """What the engine said, or why it said nothing, in a few words."""
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "the Docker engine does not answer: no connection"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"the Docker engine does not answer in time ({exc})"
    return str(exc) or type(exc).__name__


def unreachable() -> str:
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    return (
        f"the Docker engine at {where} does not answer; start it (scripts/engine.sh does, as root) or set DOCKER_HOST"
    )


# -- probes ---------------------------------------------------------------------------


def ping(client: docker.APIClient) -> str | None:
    """None when the engine answers, else why not."""
    try:
        client.ping()
    except DRIVER_ERRORS as exc:
        return f"{unreachable()} ({reason(exc)})"
    return None


def image_present(client: docker.APIClient, image: str) -> bool:
    """Whether the engine has ``image`` (raises EngineError when it does not answer)."""
    with engine_errors(f"cannot inspect image {image}"):
        try:
            client.inspect_image(image)
        except docker.errors.ImageNotFound:
            return False
    return True


def engine_info(client: docker.APIClient) -> dict[str, Any]:
    """What the engine says of itself: version, runtimes, cgroup version, kernel (EngineError if silent)."""
    try:
        info = client.info()
        version = client.version()
    except DRIVER_ERRORS as exc:
        # Said like ``connect`` says it: doctor's first line is where to start the engine.
        raise EngineError(f"{unreachable()} ({reason(exc)})", fault_of(exc)) from None
    return {
        "version": version.get("Version", "?"),
        "api_version": version.get("ApiVersion", "?"),
        "kernel": info.get("KernelVersion", "?"),
        "os": info.get("OperatingSystem", "?"),
        "cgroup_version": str(info.get("CgroupVersion", "1")),
        "cgroup_driver": info.get("CgroupDriver", "?"),
        "runtimes": sorted((info.get("Runtimes") or {}).keys()),
        "default_runtime": info.get("DefaultRuntime", "runc"),
    }
