"""``[task_manager] type = "amqp"``: the config, and what the source refuses before it connects."""

from __future__ import annotations

import pytest

from runner.config import AmqpSource, loads
from runner.errors import ConfigError
from runner.sources.amqp import AmqpTaskSource, redact

WORKER = """
[[workers]]
name = "Echo"
image = "workerhost/echo:latest"
task_types = ["Echo", "Other"]
"""


def test_an_amqp_source_parses_with_its_defaults() -> None:
    config = loads(f'[task_manager]\ntype = "amqp"\nurl = "amqp://u:p@broker:5672/vh"\n{WORKER}')
    manager = config.task_manager
    assert isinstance(manager, AmqpSource)
    assert (manager.queues, manager.results_exchange, manager.redelivery_delay) == ({}, "", 30.0)
    source = AmqpTaskSource(manager, config.workers)
    assert source.queues == {"Echo": "Echo", "Other": "Other"}
    assert source.max_attempts == {"Echo": 4, "Other": 4}
    assert source.url == "amqp://u:***@broker:5672/vh" and "p@" not in repr(manager)


def test_a_bad_url_names_the_setting_and_not_the_password() -> None:
    with pytest.raises(ConfigError) as refused:
        loads(f'[task_manager]\ntype = "amqp"\nurl = "http://u:secret@broker/"\n{WORKER}')
    (line,) = refused.value.problems
    assert "task_manager: url:" in line and "amqp://" in line and "secret" not in line


def test_an_unknown_type_lists_amqp() -> None:
    with pytest.raises(ConfigError, match=r"expected one of: .*amqp"):
        loads('[task_manager]\ntype = "kafka"\n')


def test_two_types_on_one_queue_and_queues_of_unknown_types_are_refused() -> None:
    text = '[task_manager]\ntype = "amqp"\nurl = "amqp://h/"\nqueues = { Echo = "q", Other = "q", Nope = "x" }\n'
    config = loads(text + WORKER)
    with pytest.raises(ConfigError) as refused:
        AmqpTaskSource(config.task_manager, config.workers)  # type: ignore[arg-type]
    assert any("share the queue 'q'" in p for p in refused.value.problems)
    assert any("'Nope'" in p for p in refused.value.problems)


def test_redact() -> None:
    assert redact("amqps://user:pw@host/") == "amqps://user:***@host/"
    assert redact("amqp://host:5672/") == "amqp://host:5672/"
