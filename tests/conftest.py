"""Shared fixtures: the real Docker engine, the images, and a check that nothing is left behind.

A test that needs the engine skips on a laptop without one and fails under
CI (``CI=true``): a skipped test in CI is a failed promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGES = Path(__file__).resolve().parent / "images"
BEHAVE_IMAGE = "workerhost-test/behave:latest"
BASE_IMAGES = ("workerhost/python:3.11", "workerhost/python:2.7")
EXAMPLE_IMAGES = ("workerhost/text-stats:latest", "workerhost/legacy-tags:latest", "workerhost/shell-echo:latest")
# Every container the suite creates carries this host id, so the final check
# sees ours and nobody else's.
HOST_ID = f"pytest-{os.getpid()}"


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


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the suite, no container that the tests created may remain on the engine."""
    yield
    from runner.docker import LABEL_HOST, connect
    from runner.errors import EngineError

    try:
        client = connect(timeout=30)
    except EngineError:
        return
    left = client.containers(all=True, filters={"label": f"{LABEL_HOST}={HOST_ID}"})
    for container in left:
        client.remove_container(container["Id"], force=True)
    assert not left, f"the tests left {len(left)} containers behind: {[c['Id'][:12] for c in left]}"


def _has_image(client: Any, image: str) -> bool:
    try:
        client.inspect_image(image)
    except Exception:
        return False
    return True
