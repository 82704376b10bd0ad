"""The hostile suite's fixtures: the hostile image, and one ``workerhost serve`` for the module.

The host runs three workers: the hostile image under each sandbox profile, and
the well-behaved ``Test.Behave``, whose tasks must keep completing while the
hostile ones attack. Every limit is small, so that each attack ends in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import build_test_image, new_host_id, unavailable
from tests.serving import Serve, free_port

HOSTILE_IMAGE = "workerhost-test/hostile:latest"
STANDARD = "Hostile.Standard"
STRICT = "Hostile.Strict"
BEHAVE = "Test.Behave"
TIMEOUT = 5.0  # every worker's timeout, in seconds

LIMITS = """
timeout = "5s"
max_retries = 0
concurrency = 2
memory = "64m"
max_stdout = "1m"
max_stderr = "1m"
"""


def worker_table(name: str, image: str, extra: str = "") -> str:
    return f'\n[[workers]]\nname = "{name}"\nimage = "{image}"\ntask_types = ["{name}"]\n{LIMITS}{extra}'


@pytest.fixture(scope="session")
def hostile_image(docker_client: Any) -> str:
    """The test-only hostile worker, built from the Python 3 base."""
    return build_test_image(HOSTILE_IMAGE, "hostile")


@pytest.fixture(scope="session")
def gvisor(docker_client: Any) -> bool:
    """Whether the engine has gVisor (``runsc``), which the strict profile needs."""
    return "runsc" in (docker_client.info().get("Runtimes") or {})


@pytest.fixture(scope="module")
def host(
    tmp_path_factory: pytest.TempPathFactory, hostile_image: str, behave_image: str, gvisor: bool
) -> Iterator[Serve]:
    """One ``workerhost serve`` for the whole module (the strict worker only where gVisor is:
    serve refuses a strict worker the engine cannot run)."""
    folder = tmp_path_factory.mktemp("hostile")
    port = free_port()
    # Standard's /tmp is as small as strict's: a tmpfs counts against the memory
    # limit, so a 64m /tmp under 64m of memory would end as an OOM kill, not ENOSPC.
    workers = worker_table(STANDARD, hostile_image, 'sandbox = "standard"\ntmpfs = "16m"\npids_limit = 64\n')
    if gvisor:
        workers += worker_table(STRICT, hostile_image, 'sandbox = "strict"\n')  # 256 pids: gVisor needs room
    workers += worker_table(BEHAVE, behave_image, "pids_limit = 64\n")
    config = folder / "serve.toml"
    config.write_text(
        f"""
[host]
id = "{new_host_id()}"
concurrency = 6
http = "127.0.0.1:{port}"
grace = "2s"
poll_max = "200ms"
reap_interval = "1s"

[task_manager]
type = "embedded"
path = "{folder / "queue.db"}"
{workers}"""
    )
    serve = Serve(config, port, folder / "serve.log").start()
    try:
        yield serve
    finally:
        serve.stop()


@pytest.fixture
def worker(request: pytest.FixtureRequest, gvisor: bool) -> str:
    """The hostile worker a test attacks with (parametrized indirectly: STANDARD or STRICT)."""
    name: str = request.param
    if name == STRICT and not gvisor:
        unavailable("gVisor (runsc) is not registered with the engine: run `make sandbox`")
    return name
