"""Shared fixtures: the real Docker engine, the images, and a check that nothing is left behind.

A test that needs the engine skips on a laptop without one and fails under
CI (``CI=true``): a skipped test in CI is a failed promise.

Every host id the suite gives a container starts with this session's prefix,
and each test that starts a host (``serve``, a runner) takes its own id from
``new_host_id()``: a later ``serve`` reaps the containers of its own host id
only, so it cannot silently remove what an earlier test left, and the check
after each test that uses the engine blames the test that left a container.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGES = Path(__file__).resolve().parent / "images"
BEHAVE_IMAGE = "workerhost-test/behave:latest"
BASE_IMAGES = ("workerhost/python:3.11", "workerhost/python:2.7")
EXAMPLE_IMAGES = ("workerhost/text-stats:latest", "workerhost/legacy-tags:latest", "workerhost/shell-echo:latest")
# This session's host ids are PREFIX-0, PREFIX-1, ...: the checks see ours and
# nobody else's (another pytest on the same engine has another pid).
SESSION_PREFIX = f"pytest-{os.getpid()}"
_host_numbers = itertools.count()
# Folders whose tests use the engine (with the ``docker`` marker, wherever it is).
ENGINE_FOLDERS = ("integration", "acceptance", "hostile")
# A host removes a finished container off the task's path: give it this long.
REMOVAL_GRACE = 15.0


def new_host_id() -> str:
    """A host id of this session that no other test uses."""
    return f"{SESSION_PREFIX}-{next(_host_numbers)}"


def is_ours(host_id: str) -> bool:
    """Whether a container's host id is one of this session's (``pytest-12`` is not ``pytest-123``'s)."""
    return host_id.startswith(f"{SESSION_PREFIX}-")


# For tests that need only one host id and start no ``serve`` (a runner used in-process).
HOST_ID = new_host_id()


def unavailable(reason: str) -> NoReturn:
    """Skip where the engine is optional; fail under CI, where it is promised."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: this must not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    from runner.docker import connect
    from runner.errors import EngineError

    try:
        client = connect(timeout=120)
    except EngineError as exc:
        unavailable(f"no Docker engine: {exc}")
    for image in BASE_IMAGES:
        try:
            client.inspect_image(image)
        except Exception:
            unavailable(f"base image {image} is missing: run `make build-images`")
    return client


@pytest.fixture(scope="session")
def example_images(docker_client: Any) -> None:
    """The shipped example workers, as `make build-images` builds them."""
    missing = [i for i in EXAMPLE_IMAGES if not _has_image(docker_client, i)]
    if missing:
        done = subprocess.run([sys.executable, str(ROOT / "images" / "build_workers.py")], cwd=ROOT)
        if done.returncode != 0:
            unavailable(f"cannot build the example workers ({', '.join(missing)})")


def build_test_image(tag: str, folder: str) -> str:
    """Build a test-only image from ``tests/images/<folder>`` (every session, so that edits count)."""
    build = subprocess.run(
        ["docker", "build", "-q", "-t", tag, str(TEST_IMAGES / folder)], capture_output=True, text=True
    )
    if build.returncode != 0:
        pytest.fail(f"building {tag} failed:\n{build.stderr}")
    return tag


@pytest.fixture(scope="session")
def behave_image(docker_client: Any) -> str:
    """The test-only misbehaving worker, built from the Python 3 base."""
    return build_test_image(BEHAVE_IMAGE, "behave")


@pytest.fixture
def host_id() -> str:
    """This test's own host id (every ``serve`` it starts shares it, as restarts of one host do)."""
    return new_host_id()


@pytest.fixture(autouse=True)
def nothing_left_by_this_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that uses the engine, no container of this session may remain.

    Runs after the test's own fixtures have stopped its hosts. A host still
    serving (a module's) may be removing a container it just finished, so a
    leftover gets REMOVAL_GRACE to go; what stays is removed here and named.
    """
    yield
    if not _uses_engine(request.node):
        return
    client = _engine()
    if client is None:
        return
    left = _left_behind(client, wait=REMOVAL_GRACE)
    if left:
        _remove(client, left)
        pytest.fail(f"{request.node.nodeid} left {len(left)} containers behind: {_describe(left)}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the suite (module fixtures' hosts included), no container of this session may remain."""
    yield
    client = _engine()
    if client is None:
        return
    left = _left_behind(client, wait=REMOVAL_GRACE)
    _remove(client, left)
    assert not left, f"the tests left {len(left)} containers behind: {_describe(left)}"


def _uses_engine(item: pytest.Item) -> bool:
    if item.get_closest_marker("docker") is not None:
        return True
    try:
        folder = Path(str(item.path)).resolve().relative_to(Path(__file__).resolve().parent).parts[0]
    except (ValueError, IndexError):
        return False
    return folder in ENGINE_FOLDERS


@functools.cache
def _engine() -> Any:
    """A client for the checks, or None without an engine (the tests that need one were skipped)."""
    from runner.docker import connect
    from runner.errors import EngineError

    try:
        return connect(timeout=30)
    except EngineError:
        return None


def _left_behind(client: Any, wait: float) -> list[dict[str, Any]]:
    """This session's containers, after giving them up to ``wait`` seconds to go."""
    from runner.docker import LABEL_HOST

    deadline = time.monotonic() + wait
    while True:
        found = client.containers(all=True, filters={"label": LABEL_HOST})
        ours = [c for c in found if is_ours((c.get("Labels") or {}).get(LABEL_HOST, ""))]
        if not ours or time.monotonic() > deadline:
            return ours
        time.sleep(0.2)


def _remove(client: Any, containers: list[dict[str, Any]]) -> None:
    import docker.errors

    for container in containers:
        with contextlib.suppress(docker.errors.NotFound):  # it went meanwhile
            client.remove_container(container["Id"], force=True)


def _describe(containers: list[dict[str, Any]]) -> str:
    from runner.docker import LABEL_HOST, LABEL_TASK

    def one(c: dict[str, Any]) -> str:
        labels = c.get("Labels") or {}
        name = (c.get("Names") or ["?"])[0].lstrip("/")
        return f"{c['Id'][:12]} {name} (host {labels.get(LABEL_HOST)}, task {labels.get(LABEL_TASK)}, {c.get('State')})"

    return "; ".join(one(c) for c in containers)


def _has_image(client: Any, image: str) -> bool:
    try:
        client.inspect_image(image)
    except Exception:
        return False
    return True
