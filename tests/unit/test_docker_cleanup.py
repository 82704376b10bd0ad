"""runner.docker.cleanup: what cancel and reap decide, against a fake engine (the real one: test_runner.py)."""

from __future__ import annotations

from typing import Any

import docker.errors
import pytest
import requests
import requests.exceptions

from runner.docker import LABEL_ATTEMPT, LABEL_HOST, LABEL_OWNER, LABEL_TASK, Orphan
from runner.docker.cleanup import Janitor

HOST = "host-1"
ME = "here:100:aaaa"


def conflict() -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = 409
    return docker.errors.APIError("409", response=response, explanation="container is not running")


class FakeEngine:
    """Just the calls the janitor makes: list by label, kill, remove."""

    def __init__(self) -> None:
        self.containers_by_id: dict[str, dict[str, Any]] = {}
        self.kill_error: Exception | None = None
        self.remove_error: Exception | None = None
        self.killed: list[str] = []

    def add(self, cid: str, task: str, owner: str | None, running: bool = True, host: str = HOST) -> None:
        labels = {LABEL_TASK: task, LABEL_HOST: host, LABEL_ATTEMPT: "2"}
        if owner is not None:
            labels[LABEL_OWNER] = owner
        self.containers_by_id[cid] = {"Id": cid, "Labels": labels, "running": running}

    def containers(self, all: bool, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = [tuple(f.split("=", 1)) for f in filters["label"]]
        return [c for c in self.containers_by_id.values() if (all or c["running"]) and all_labels(c["Labels"], wanted)]

    def kill(self, cid: str) -> None:
        if self.kill_error is not None:
            raise self.kill_error
        self.killed.append(cid)
        self.containers_by_id[cid]["running"] = False

    def remove_container(self, cid: str, force: bool, v: bool) -> None:
        if self.remove_error is not None:
            raise self.remove_error
        if cid not in self.containers_by_id:
            response = requests.Response()
            response.status_code = 404
            raise docker.errors.NotFound("404", response=response, explanation=f"No such container: {cid}")
        del self.containers_by_id[cid]


def all_labels(labels: dict[str, str], wanted: list[tuple[str, ...]]) -> bool:
    return all(labels.get(key) == value for key, value in wanted)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def janitor(engine: FakeEngine) -> Janitor:
    return Janitor(engine, HOST, ME)  # type: ignore[arg-type]


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_kills_only_the_container_this_runner_owns(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("theirs", "t1", "there:200:bbbb")
    engine.add("ours", "t1", ME)

    assert janitor.cancel("t1") is True
    assert engine.killed == ["ours"]
    assert janitor.take_cancelled("ours") is True
    assert janitor.take_cancelled("ours") is False  # asked once, by its run
    assert janitor.take_cancelled("theirs") is False


def test_cancel_of_a_task_with_no_running_container_of_ours_is_false(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("theirs", "t1", "there:200:bbbb")
    engine.add("done", "t2", ME, running=False)

    assert janitor.cancel("t1") is False
    assert janitor.cancel("t2") is False
    assert janitor.cancel("t3") is False
    assert engine.killed == []


def test_a_kill_answered_409_is_not_a_cancellation(engine: FakeEngine, janitor: Janitor) -> None:
    # Listed as running, but it exited before the kill arrived: its run reports how it ended.
    engine.add("ours", "t1", ME)
    engine.kill_error = conflict()

    assert janitor.cancel("t1") is False
    assert janitor.take_cancelled("ours") is False


# -- reap -----------------------------------------------------------------------------------


def test_reap_removes_only_what_a_dead_owner_left(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("mine", "t-mine", ME)
    engine.add("alive", "t-alive", "here:300:cccc")
    engine.add("unknown", "t-unknown", "elsewhere:1:dddd")
    engine.add("dead", "t-dead", "here:400:eeee", running=False)
    engine.add("other-host", "t-other", "here:400:eeee", host="host-2")
    asked: list[str] = []

    def dead(owner: str) -> bool:
        asked.append(owner)
        return owner == "here:400:eeee"

    reaped = janitor.reap(dead)

    assert reaped.removed == [Orphan("t-dead", "here:400:eeee", 2)]
    assert reaped.kept == frozenset({"t-mine", "t-alive", "t-unknown"})
    assert set(engine.containers_by_id) == {"mine", "alive", "unknown", "other-host"}
    assert ME not in asked  # our own are never a question


def test_reap_never_removes_our_own_even_when_told_everyone_is_dead(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("mine", "t-mine", ME)

    reaped = janitor.reap(lambda owner: True)

    assert reaped.removed == []
    assert reaped.kept == frozenset({"t-mine"})
    assert "mine" in engine.containers_by_id


@pytest.mark.parametrize("dead_without_owner", [True, False])
def test_a_container_without_an_owner_label_is_asked_about_as_the_empty_owner(
    engine: FakeEngine, janitor: Janitor, dead_without_owner: bool
) -> None:
    engine.add("old", "t-old", None)
    asked: list[str] = []

    def dead(owner: str) -> bool:
        asked.append(owner)
        return dead_without_owner

    reaped = janitor.reap(dead)

    assert asked == [""]
    if dead_without_owner:
        assert reaped.removed == [Orphan("t-old", "", 2)]
        assert "old" not in engine.containers_by_id
    else:
        assert reaped.removed == []
        assert reaped.kept == frozenset({"t-old"})


def test_a_removal_that_fails_keeps_the_task(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("dead", "t-dead", "here:400:eeee")
    engine.remove_error = requests.exceptions.ConnectionError("gone")

    reaped = janitor.reap(lambda owner: True)

    assert reaped.removed == []
    assert reaped.kept == frozenset({"t-dead"})


def test_reap_retries_our_removal_that_failed(engine: FakeEngine, janitor: Janitor) -> None:
    engine.add("mine", "t-mine", ME, running=False)
    engine.remove_error = requests.exceptions.ConnectionError("the engine went away")
    janitor.remove_later("mine")
    janitor.close()  # the removal ran, and failed
    assert "mine" in engine.containers_by_id

    engine.remove_error = None
    reaped = janitor.reap(lambda owner: False)

    assert "mine" not in engine.containers_by_id
    assert reaped.removed == []  # its task was reported by its run: not an orphan
    assert reaped.kept == frozenset()
