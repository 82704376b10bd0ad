"""``[task_manager] type = "redis"``: what the config accepts and how it refuses (no Redis needed)."""

from __future__ import annotations

import pytest

from runner.config import RedisSource, loads
from runner.errors import ConfigError
from runner.sources.redis import shown_url


def test_a_redis_source_with_its_defaults() -> None:
    config = loads('[task_manager]\ntype = "redis"\nurl = "rediss://:pw@broker:6380/2"\nlease = "9s"\n')
    manager = config.task_manager
    assert isinstance(manager, RedisSource)
    assert (manager.prefix, manager.lease, manager.retention) == ("workerhost", 9.0, 7 * 86400.0)
    assert "pw" not in repr(config)  # the URL is a secret


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://broker:6379", "expected redis://"),
        ("redis://", "expected redis://"),
        ("redis://broker:port/0", "not a Redis URL"),
    ],
)
def test_a_bad_url_names_the_setting(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        loads(f'[task_manager]\ntype = "redis"\nurl = "{url}"\n')
    assert "task_manager.url" in str(refused.value) and expected in str(refused.value)


def test_a_url_that_is_not_a_string_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError, match="expected a string") as refused:
        loads('[task_manager]\ntype = "redis"\nurl = 12345\n')
    assert "12345" not in str(refused.value)


def test_errors_show_the_url_without_its_password() -> None:
    assert shown_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert shown_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.parametrize("url", ["http://:s3cret@host/", "redis://:s3cret@", "amqp://user:s3cret@host/"])
def test_a_bad_redis_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        loads(f'[task_manager]\ntype = "redis"\nurl = "{url}"\n', source="x.toml", environ={})
    [problem] = refused.value.problems
    assert problem.startswith("x.toml: task_manager.url: ")
    assert "s3cret" not in problem and "not shown" in problem
