"""runner.config: friendly inputs become one type, and every mistake is one readable line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runner import config
from runner.config import Config, WorkerConfig, load, loads
from runner.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "workerhost.toml"

MiB = 1024**2
GiB = 1024**3

WORKER = """
[[workers]]
name = "x"
image = "img:latest"
task_types = ["T.A"]
"""


def _worker(name: str = "x", task_types: str = '["T.A"]', extra: str = "") -> str:
    return f'\n[[workers]]\nname = "{name}"\nimage = "img:latest"\ntask_types = {task_types}\n{extra}\n'


def _load(text: str, environ: dict[str, str] | None = None) -> Config:
    return loads(text, source="test.toml", environ=environ or {})


def _problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(text, environ)
    problems = info.value.problems
    assert problems, "a ConfigError must list at least one problem"
    for line in problems:
        assert "\n" not in line, f"each problem is one line: {line!r}"
        assert line.startswith("test.toml: "), f"each problem names the file: {line!r}"
    # The exception's text is the problems, one per line.
    assert str(info.value) == "\n".join(problems)
    return problems


def _only_problem(text: str, environ: dict[str, str] | None = None) -> str:
    problems = _problems(text, environ)
    assert len(problems) == 1, problems
    return problems[0]


# -- a valid file --------------------------------------------------------------


def test_minimal_worker_gets_the_defaults() -> None:
    cfg = _load(WORKER)
    (worker,) = cfg.workers
    assert worker.name == "x"
    assert worker.image == "img:latest"
    assert worker.task_types == ["T.A"]
    assert worker.timeout == 30.0
    assert worker.memory == 256 * MiB
    assert worker.network == "none"
    assert worker.user == "65534:65534"
    assert worker.command is None
    assert cfg.task_manager.type == "embedded"
    assert cfg.source == "test.toml"


def test_empty_file_is_a_valid_config_without_workers() -> None:
    cfg = _load("")
    assert cfg.workers == []
    assert cfg.task_types() == []
    assert cfg.worker_for("anything") is None


def test_http_task_manager() -> None:
    cfg = _load('[task_manager]\ntype = "http"\nurl = "http://tm.example/api"\n' + WORKER)
    assert cfg.task_manager.type == "http"
    assert cfg.task_manager.url == "http://tm.example/api"  # type: ignore[union-attr]


# -- sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"256m"', 256 * MiB),
        ('"1g"', GiB),
        ('"8192KiB"', 8 * MiB),
        ('"1.5g"', int(1.5 * GiB)),
        ('"64MiB"', 64 * MiB),
        ('"6m"', 6 * MiB),
        (str(300 * MiB), 300 * MiB),
    ],
)
def test_memory_sizes(value: str, expected: int) -> None:
    (worker,) = _load(WORKER + f"memory = {value}\n").workers
    assert worker.memory == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"256m"', 256 * MiB), ('"1g"', GiB), ('"512KiB"', 512 * 1024), ('"1.5g"', int(1.5 * GiB)), ("4096", 4096)],
)
def test_tmpfs_and_output_caps_take_sizes(value: str, expected: int) -> None:
    (worker,) = _load(WORKER + f"tmpfs = {value}\nmax_stdout = {value}\nmax_stderr = {value}\n").workers
    assert (worker.tmpfs, worker.max_stdout, worker.max_stderr) == (expected, expected, expected)


def test_parse_size_directly() -> None:
    assert config.parse_size("256m") == 256 * MiB
    assert config.parse_size(" 2 k ") == 2048
    assert config.parse_size(1) == 1
    for bad in ("256q", 0, -1, True, "", "m", 1.5, None):
        with pytest.raises(ValueError):
            config.parse_size(bad)


@pytest.mark.parametrize(
    ("value", "shown"),
    [('"256q"', "'256q'"), ("0", "0"), ("-1", "-1"), ("true", "True"), ('"0m"', "'0m'"), ('"lots"', "'lots'")],
)
def test_bad_size_names_file_worker_field_and_value(value: str, shown: str) -> None:
    line = _only_problem(WORKER + f"memory = {value}\n")
    assert line.startswith("test.toml: workers[0] (x).memory: ")
    assert line.endswith(f"(got {shown})")


@pytest.mark.parametrize("field", ["tmpfs", "max_stdout", "max_stderr"])
def test_bad_size_in_other_size_fields(field: str) -> None:
    line = _only_problem(WORKER + f'{field} = "256q"\n')
    assert line.startswith(f"test.toml: workers[0] (x).{field}: ")
    assert "(got '256q')" in line


@pytest.mark.parametrize("value", ['"5m"', '"1k"', str(6 * MiB - 1)])
def test_memory_below_6m_is_refused(value: str) -> None:
    line = _only_problem(WORKER + f"memory = {value}\n")
    assert line.startswith("test.toml: workers[0] (x).memory: ")
    assert "at least 6m" in line
    assert "got" in line and value.strip('"') in line


def test_format_size() -> None:
    assert config.format_size(256 * MiB) == "256m"
    assert config.format_size(GiB) == "1g"
    assert config.format_size(1536 * MiB) == "1536m"
    assert config.format_size(2048) == "2k"
    assert config.format_size(1000) == "1000b"


# -- durations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"30s"', 30.0), ('"5m"', 300.0), ('"1h"', 3600.0), ('"500ms"', 0.5), ("45", 45.0), ("0.25", 0.25), ('"2"', 2.0)],
)
def test_durations(value: str, expected: float) -> None:
    (worker,) = _load(WORKER + f"timeout = {value}\nbackoff = {value}\nbackoff_max = {value}\n").workers
    assert worker.timeout == pytest.approx(expected)
    assert worker.backoff == pytest.approx(expected)
    assert worker.backoff_max == pytest.approx(expected)
    assert isinstance(worker.timeout, float)


@pytest.mark.parametrize(
    ("value", "shown"), [('"10x"', "'10x'"), ("0", "0"), ('"0s"', "'0s'"), ("-5", "-5"), ("true", "True")]
)
def test_bad_duration_names_file_worker_field_and_value(value: str, shown: str) -> None:
    line = _only_problem(WORKER + f"timeout = {value}\n")
    assert line.startswith("test.toml: workers[0] (x).timeout: ")
    assert line.endswith(f"(got {shown})")


def test_parse_duration_directly() -> None:
    assert config.parse_duration("1h") == 3600.0
    assert config.parse_duration("500ms") == 0.5
    assert config.parse_duration(3) == 3.0
    assert config.parse_duration("7d") == 7 * 86400.0  # a retention
    for bad in ("10x", 0, "0s", -1, True, "", None, "1w"):
        with pytest.raises(ValueError):
            config.parse_duration(bad)


# -- unknown keys, missing fields --------------------------------------------------


def test_unknown_key_at_top_level() -> None:
    line = _only_problem('colour = "blue"\n' + WORKER)
    assert line == "test.toml: colour: unknown key"


def test_unknown_key_in_host() -> None:
    line = _only_problem("[host]\nconcurency = 4\n" + WORKER)
    assert line == "test.toml: host.concurency: unknown key"


def test_unknown_key_in_a_worker_names_the_worker() -> None:
    text = _worker("first", '["T.A"]') + _worker("second", '["T.B"]', 'memroy = "128m"')
    line = _only_problem(text)
    assert line == "test.toml: workers[1] (second).memroy: unknown key"


def test_unknown_key_in_telemetry_and_task_manager() -> None:
    problems = _problems('[telemetry]\nendpoint = "x"\n[task_manager]\ntype = "embedded"\nurl = "y"\n')
    assert sorted(problems) == sorted(
        ["test.toml: telemetry.endpoint: unknown key", "test.toml: task_manager.url: unknown key"]
    )


def test_missing_image() -> None:
    line = _only_problem('[[workers]]\nname = "x"\ntask_types = ["T.A"]\n')
    assert line == "test.toml: workers[0] (x).image: required but missing"


def test_missing_task_types() -> None:
    line = _only_problem('[[workers]]\nname = "x"\nimage = "img"\n')
    assert line == "test.toml: workers[0] (x).task_types: required but missing"


def test_missing_name_is_reported_without_a_name() -> None:
    line = _only_problem('[[workers]]\nimage = "img"\ntask_types = ["T.A"]\n')
    assert line == "test.toml: workers[0].name: required but missing"


def test_empty_task_types_and_empty_command() -> None:
    problems = _problems('[[workers]]\nname = "x"\nimage = "img"\ntask_types = []\ncommand = []\n')
    assert len(problems) == 2
    assert any(p.startswith("test.toml: workers[0] (x).task_types: ") and "(got [])" in p for p in problems)
    assert any(p.startswith("test.toml: workers[0] (x).command: ") and "(got [])" in p for p in problems)


# -- task types and names ------------------------------------------------------------


def test_task_type_claimed_by_two_workers() -> None:
    text = _worker("first", '["T.A", "T.B"]') + _worker("second", '["T.C", "T.B"]')
    line = _only_problem(text)
    assert line.startswith("test.toml: workers[1] (second).task_types: ")
    assert "'T.B'" in line
    assert "first" in line


def test_two_workers_with_the_same_name() -> None:
    text = _worker("same", '["T.A"]') + _worker("same", '["T.B"]')
    line = _only_problem(text)
    assert line.startswith("test.toml: workers[1] (same).name: ")
    assert "second worker" in line


# -- task manager ----------------------------------------------------------------------


def test_unknown_task_manager_type() -> None:
    line = _only_problem('[task_manager]\ntype = "carrier-pigeon"\n' + WORKER)
    assert line.startswith("test.toml: task_manager: ")
    assert "embedded" in line and "http" in line
    assert "carrier-pigeon" in line


def test_http_task_manager_needs_a_url() -> None:
    line = _only_problem('[task_manager]\ntype = "http"\n' + WORKER)
    assert line == "test.toml: task_manager.url: required but missing"


# -- files ---------------------------------------------------------------------------------


def test_invalid_toml_names_the_file() -> None:
    line = _only_problem("[[workers]\nname = 'x'\n")
    assert line.startswith("test.toml: invalid TOML: ")
    assert "line 1" in line


def test_invalid_toml_in_a_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "unterminated\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: invalid TOML")


def test_missing_file_names_it_and_says_how_to_choose_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: ")
    assert "no such file" in line
    assert "-c" in line
    assert "WORKERHOST_CONFIG" in line


def test_load_reads_a_file_and_names_it_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "hosts" / "w.toml"
    path.parent.mkdir()
    path.write_text(WORKER, encoding="utf-8")
    cfg = load(path, environ={})
    assert cfg.source == str(path)
    assert cfg.workers[0].name == "x"

    path.write_text(WORKER + 'memory = "256q"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path), environ={})
    assert info.value.problems[0].startswith(f"{path}: workers[0] (x).memory: ")


def test_default_path_honours_workerhost_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text(WORKER, encoding="utf-8")
    monkeypatch.setenv("WORKERHOST_CONFIG", str(path))
    assert config.default_path() == path
    assert load(environ={}).source == str(path)
    monkeypatch.delenv("WORKERHOST_CONFIG")
    assert config.default_path() == Path("workerhost.toml")


# -- variables --------------------------------------------------------------------------------


def test_variable_is_substituted() -> None:
    cfg = _load(_worker("x", '["T.A"]', 'network = "net-${SUFFIX}"'), {"SUFFIX": "blue"})
    assert cfg.workers[0].network == "net-blue"


def test_variable_in_env_and_in_a_size() -> None:
    cfg = _load(WORKER + 'memory = "${MEM}"\nenv = { TOKEN = "${TOKEN}" }\n', {"MEM": "1g", "TOKEN": "s3cret"})
    (worker,) = cfg.workers
    assert worker.memory == GiB
    assert worker.env == {"TOKEN": "s3cret"}


def test_variable_in_a_list() -> None:
    cfg = _load(WORKER + 'command = ["python3", "${SCRIPT}"]\n', {"SCRIPT": "/app/w.py"})
    assert cfg.workers[0].command == ["python3", "/app/w.py"]


def test_default_is_used_when_the_variable_is_unset() -> None:
    cfg = _load('[host]\nhttp = "${HTTP:-0.0.0.0:9000}"\n' + WORKER)
    assert cfg.host.http == "0.0.0.0:9000"


def test_empty_default() -> None:
    cfg = _load('[telemetry]\notlp_endpoint = "${OTLP:-}"\n')
    assert cfg.telemetry.otlp_endpoint == ""


def test_variable_wins_over_its_default() -> None:
    cfg = _load('[host]\nhttp = "${HTTP:-0.0.0.0:9000}"\n', {"HTTP": "127.0.0.1:1"})
    assert cfg.host.http == "127.0.0.1:1"


def test_default_is_used_when_the_variable_is_empty() -> None:
    cfg = _load('[host]\nhttp = "${HTTP:-0.0.0.0:9000}"\n', {"HTTP": ""})
    assert cfg.host.http == "0.0.0.0:9000"


def test_several_variables_in_one_string() -> None:
    cfg = _load('[host]\nhttp = "${H}:${P:-80}"\n', {"H": "example"})
    assert cfg.host.http == "example:80"


def test_double_dollar_is_a_literal_dollar() -> None:
    cfg = _load(WORKER + 'env = { PRICE = "$$5", RAW = "$${NOT_A_VAR}", MIX = "$$${V}" }\n', {"V": "x"})
    assert cfg.workers[0].env == {"PRICE": "$5", "RAW": "${NOT_A_VAR}", "MIX": "$x"}


def test_lone_dollar_is_left_alone() -> None:
    cfg = _load(WORKER + 'env = { A = "cost: 5$", B = "$HOME" }\n')
    assert cfg.workers[0].env == {"A": "cost: 5$", "B": "$HOME"}


def test_missing_variable_names_the_location_and_the_variable() -> None:
    line = _only_problem(WORKER + 'env = { TOKEN = "${TOKEN}" }\n')
    assert line.startswith("test.toml: workers[0] (x).env.TOKEN: ")
    assert "TOKEN is not set" in line
    assert "${TOKEN}" in line


def test_missing_variable_outside_workers() -> None:
    line = _only_problem('[host]\nhttp = "${LISTEN}"\n')
    assert line.startswith("test.toml: host.http: ")
    assert "LISTEN" in line


def test_missing_variable_in_a_list_element() -> None:
    line = _only_problem(_worker("x", '["T.A", "${EXTRA_TYPE}"]'))
    assert line.startswith("test.toml: workers[0] (x).task_types[1]: ")
    assert "EXTRA_TYPE" in line


def test_substitution_uses_the_given_environ_not_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WH_TEST_ONLY_IN_OS", "from-os")
    line = _only_problem('[host]\nid = "${WH_TEST_ONLY_IN_OS}"\n')
    assert "WH_TEST_ONLY_IN_OS" in line
    # Without an explicit environ, the process environment is used.
    cfg = loads('[host]\nid = "${WH_TEST_ONLY_IN_OS}"\n', source="test.toml")
    assert cfg.host.id == "from-os"


# -- several mistakes at once ----------------------------------------------------------------


def test_several_mistakes_are_reported_together() -> None:
    text = (
        'colour = "blue"\n'
        "[host]\nconcurrency = 0\n"
        + _worker("a", '["T.A"]', 'memory = "256q"\ntimeout = "10x"\nenv = { TOKEN = "${TOKEN}" }')
        + '\n[[workers]]\nname = "b"\ntask_types = ["T.B"]\nbogus = 1\n'
    )
    problems = _problems(text)
    assert len(problems) == 7, problems
    joined = "\n".join(problems)
    for fragment in (
        "test.toml: colour: unknown key",
        "test.toml: host.concurrency: ",
        "test.toml: workers[0] (a).memory: ",
        "test.toml: workers[0] (a).timeout: ",
        "test.toml: workers[0] (a).env.TOKEN: environment variable TOKEN is not set",
        "test.toml: workers[1] (b).image: required but missing",
        "test.toml: workers[1] (b).bogus: unknown key",
    ):
        assert fragment in joined, fragment


def test_duplicates_are_all_reported() -> None:
    text = _worker("a", '["T.A", "T.B"]') + _worker("a", '["T.A"]') + _worker("c", '["T.B"]')
    problems = _problems(text)
    assert len(problems) == 3, problems
    assert any(p.startswith("test.toml: workers[1] (a).task_types: ") and "'T.A'" in p for p in problems)
    assert any(p.startswith("test.toml: workers[2] (c).task_types: ") and "'T.B'" in p for p in problems)
    assert any(p.startswith("test.toml: workers[1] (a).name: ") for p in problems)


def test_duplicate_task_type_is_reported_alongside_field_errors() -> None:
    text = _worker("a", '["T.A"]') + _worker("b", '["T.A"]', 'memory = "256q"')
    problems = _problems(text)
    assert any(p.startswith("test.toml: workers[1] (b).memory: ") for p in problems)
    assert any(p.startswith("test.toml: workers[1] (b).task_types: ") for p in problems)


def test_duplicate_name_is_reported_alongside_field_errors() -> None:
    text = _worker("a", '["T.A"]', "bogus = 1") + _worker("a", '["T.B"]')
    problems = _problems(text)
    assert len(problems) == 2, problems
    assert "test.toml: workers[0] (a).bogus: unknown key" in problems
    assert any(p.startswith("test.toml: workers[1] (a).name: ") for p in problems)


# -- the shipped file and the lookups ------------------------------------------------------------


def test_shipped_config_loads() -> None:
    cfg = load(SHIPPED, environ={})
    assert cfg.source == str(SHIPPED)
    assert len(cfg.workers) >= 1
    names = [w.name for w in cfg.workers]
    assert len(names) == len(set(names))
    for worker in cfg.workers:
        assert worker.memory >= 6 * MiB
        assert worker.timeout > 0
        assert worker.network == "none"
    # Defaults of ${VAR:-default} apply with an empty environment.
    assert cfg.host.http == "127.0.0.1:8080"
    assert cfg.telemetry.otlp_endpoint == ""
    assert cfg.task_manager.type == "embedded"


def test_the_shipped_echo_worker_declares_its_params_and_the_examples_follow_it() -> None:
    echo = load(SHIPPED, environ={}).worker_for("PrismQ.Example.Echo")
    assert echo is not None
    assert echo.params_problems({}) == ["params: 'text' is a required property (rule: required)"]
    readme = (SHIPPED.parent / "README.md").read_text(encoding="utf-8")
    demo = (SHIPPED.parent / "scripts" / "demo.sh").read_text(encoding="utf-8")
    examples = re.findall(r"PrismQ\.Example\.Echo'? '(\{.*?\})'", demo) + re.findall(
        r'"PrismQ\.Example\.Echo", "params": (\{.*?\})\}', readme
    )
    examples += re.findall(r"run PrismQ\.Example\.Echo '(\{.*?\})'", readme)
    assert len(examples) >= 4, examples
    for example in examples:
        assert echo.params_problems(json.loads(example)) == [], example


def test_every_toml_example_in_the_readme_is_a_valid_config() -> None:
    readme = (SHIPPED.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        loads(block, source="README.md", environ={"PRISMQ_API_KEY": "key"})


def test_shipped_config_takes_variables() -> None:
    cfg = load(SHIPPED, environ={"WORKERHOST_HTTP": "0.0.0.0:9999", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"})
    assert cfg.host.http == "0.0.0.0:9999"
    assert cfg.telemetry.otlp_endpoint == "http://otel:4317"


def test_shipped_config_lookups() -> None:
    cfg = load(SHIPPED, environ={})
    types = cfg.task_types()
    assert types == [t for w in cfg.workers for t in w.task_types]
    assert len(types) == len(set(types))
    for worker in cfg.workers:
        for task_type in worker.task_types:
            assert cfg.worker_for(task_type) is worker
    assert cfg.worker_for("No.Such.Type") is None


def test_worker_for_and_task_types_in_config_order() -> None:
    cfg = _load(_worker("one", '["T.B", "T.A"]') + _worker("two", '["T.C"]'))
    assert cfg.task_types() == ["T.B", "T.A", "T.C"]
    assert cfg.worker_for("T.A") is cfg.workers[0]
    assert cfg.worker_for("T.C") is cfg.workers[1]
    assert cfg.worker_for("t.c") is None


def test_worker_config_can_be_built_directly() -> None:
    worker = WorkerConfig(name="w", image="i", task_types=["T"], memory="128m", timeout="2m")  # type: ignore[arg-type]
    assert worker.memory == 128 * MiB
    assert worker.timeout == 120.0


def test_config_is_frozen() -> None:
    cfg = _load(WORKER)
    with pytest.raises(ValueError):
        cfg.workers[0].memory = 1  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value"), [("concurrency", "true"), ("max_retries", '"3"'), ("cpus", '"2"')])
def test_a_value_of_the_wrong_type_is_not_coerced(field: str, value: str) -> None:
    text = f'[[workers]]\nname = "w"\nimage = "i"\ntask_types = ["t"]\n{field} = {value}\n'
    with pytest.raises(ConfigError) as caught:
        _load(text, {})
    assert any(f"workers[0] (w).{field}:" in line for line in caught.value.problems)


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"])
def test_the_api_address_must_be_host_and_port(address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(f'[host]\nhttp = "{address}"\n', {})
    assert any("host.http:" in line and "HOST:PORT" in line for line in caught.value.problems)


STRICT = '[[workers]]\nname = "untrusted"\nimage = "i"\ntask_types = ["t"]\nsandbox = "strict"\n'


def test_a_strict_worker_gets_gvisor_a_small_tmp_and_no_network() -> None:
    worker = _load(STRICT, {}).workers[0]
    assert (worker.sandbox, worker.runtime, worker.tmpfs, worker.network) == ("strict", "runsc", 16 * 1024**2, "none")
    assert worker.pids_limit == 256
    assert worker.strict
    assert not _load(STRICT.replace('"strict"', '"standard"'), {}).workers[0].strict


def test_a_strict_worker_keeps_what_it_names() -> None:
    worker = _load(STRICT + 'tmpfs = "32m"\nruntime = "runsc"\n', {}).workers[0]
    assert (worker.tmpfs, worker.runtime) == (32 * 1024**2, "runsc")


@pytest.mark.parametrize("runtime", ["runc", "runsc-kvm", "kata"])
def test_strict_always_means_gvisor(runtime: str) -> None:
    line = _only_problem(STRICT + f'runtime = "{runtime}"\n')
    assert line.startswith("test.toml: workers[0] (untrusted): ")
    assert f'runtime = "{runtime}" with sandbox = "strict"' in line
    assert 'strict always runs under gVisor (runtime "runsc")' in line


def test_strict_mistakes_are_reported_together() -> None:
    problems = _problems(STRICT + 'runtime = "runc"\nnetwork = "bridge"\ntimeout = 600\n')
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    for fragment in ('runtime = "runc"', 'network = "bridge"', "timeout = 600s"):
        assert fragment in joined


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ('network = "bridge"', 'network = "bridge" with sandbox = "strict": a strict worker has no network'),
        ("timeout = 600", 'timeout = 600s with sandbox = "strict": the cap is 300s'),
        ("pids_limit = 64", "gVisor's own threads count against it, so it must be at least 128"),
        ('sandbox = "paranoid"', "sandbox"),
    ],
)
def test_strict_mistakes_say_why(extra: str, says: str) -> None:
    text = STRICT + extra + "\n" if "sandbox" not in extra else STRICT.replace('sandbox = "strict"\n', extra + "\n")
    with pytest.raises(ConfigError) as caught:
        _load(text, {})
    (line,) = caught.value.problems
    assert line.startswith("test.toml: workers[0] (untrusted)")
    assert says in line


# -- opt-ins: the host's network, another container's network, root -----------------------------


@pytest.mark.parametrize(
    ("setting", "field", "value", "opt_in"),
    [
        ('network = "host"', "network", "host", "host-network"),
        ('network = "container:db"', "network", "container:db", "container-network"),
        ('user = "0"', "user", "0", "root"),
        ('user = "0:0"', "user", "0:0", "root"),
        ('user = "00:1000"', "user", "00:1000", "root"),
        ('user = "root"', "user", "root", "root"),
        ('user = "root:root"', "user", "root:root", "root"),
        ('user = ""', "user", "", "root"),
        ('user = ":1000"', "user", ":1000", "root"),
    ],
)
def test_a_dangerous_setting_needs_its_opt_in(setting: str, field: str, value: str, opt_in: str) -> None:
    line = _only_problem(WORKER + setting + "\n")
    assert line.startswith(f"test.toml: workers[0] (x).{field}: ")
    assert "needs an explicit opt-in" in line
    assert f'add allow = ["{opt_in}"] to this worker' in line
    assert line.endswith(f"(got {value!r})")


def test_the_opt_in_errors_say_what_each_gives_away() -> None:
    problems = _problems(WORKER + 'network = "host"\nuser = ""\n')
    assert len(problems) == 2, problems
    network, user = sorted(problems)
    assert "the host's network" in network and "this host's API included" in network
    assert "the image's own user (usually root)" in user and "runs as root inside its container" in user


@pytest.mark.parametrize(
    ("setting", "allow"),
    [
        ('network = "host"', '["host-network"]'),
        ('network = "container:db"', '["container-network"]'),
        ('user = "0:0"', '["root"]'),
        ('user = ""', '["root"]'),
        ('network = "host"\nuser = "root"', '["root", "host-network"]'),
    ],
)
def test_with_its_opt_in_a_dangerous_setting_loads_and_warns(setting: str, allow: str) -> None:
    cfg = _load(WORKER + f"{setting}\nallow = {allow}\n")
    warnings = config.opt_in_warnings(cfg)
    opt_ins = [name for name in config.OPT_INS if f'"{name}"' in allow]
    assert len(warnings) == len(opt_ins), warnings
    for opt_in in opt_ins:
        (line,) = [w for w in warnings if f'opted in to "{opt_in}"' in w]
        assert line.startswith("worker x: ")
        assert config.OPT_INS[opt_in] in line  # what it gives away


def test_safe_settings_need_no_opt_in_and_warn_about_nothing() -> None:
    for setting in ('network = "bridge"', 'network = "my-net_1.x"', 'user = "1000:0"', 'user = "10"', 'user = "app"'):
        cfg = _load(WORKER + setting + "\n")
        assert config.opt_in_warnings(cfg) == [], setting


def test_an_opt_in_nothing_uses_is_a_warning() -> None:
    cfg = _load(WORKER + 'allow = ["root"]\n')
    (line,) = config.opt_in_warnings(cfg)
    assert line.startswith('worker x: allows "root" but no setting uses it; remove it')


def test_an_unknown_opt_in_lists_the_known_ones() -> None:
    line = _only_problem(WORKER + 'network = "host"\nallow = ["host-network", "hostnet"]\n')
    assert line.startswith("test.toml: workers[0] (x).allow: unknown opt-in 'hostnet'; ")
    assert 'the known ones are "host-network", "container-network", "root"' in line


def test_one_workers_opt_in_is_not_anothers() -> None:
    text = _worker("a", '["T.A"]', 'network = "host"\nallow = ["host-network"]') + _worker(
        "b", '["T.B"]', 'network = "host"'
    )
    line = _only_problem(text)
    assert line.startswith("test.toml: workers[1] (b).network: ")


def test_a_worker_built_directly_follows_the_same_rules() -> None:
    with pytest.raises(ValueError, match="needs an explicit opt-in"):
        WorkerConfig(name="w", image="i", task_types=["T"], user="0")
    worker = WorkerConfig(name="w", image="i", task_types=["T"], user="0", allow=["root"])
    assert worker.warnings() == [f'worker w: opted in to "root" (user = "0"): {config.OPT_INS["root"]}']


# -- names: image, runtime, network; NUL bytes ------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        "i",
        "img:latest",
        "workerhost/python:3.11",
        "docker.io/library/python:3.11-slim",
        "localhost:5000/team/app:v1.2_rc-3",
        "registry.example.com/a__b/c--d.e:" + "t" * 128,
        "app@sha256:" + "0a" * 32,
        "app:1@sha256:" + "0a" * 32,
    ],
)
def test_valid_image_references(image: str) -> None:
    assert _load(WORKER.replace("img:latest", image)).workers[0].image == image


@pytest.mark.parametrize(
    "image",
    [
        "--privileged",
        "-img",
        "Img:latest",
        "img:latest --privileged",
        "img:",
        "img:-tag",
        "img:" + "t" * 129,
        "img@sha256:abc",
        "img@md5:" + "0" * 32,
        "a___b",
        "img/",
        "img:lätest",
    ],
)
def test_an_image_that_is_not_a_reference_is_refused(image: str) -> None:
    line = _only_problem(WORKER.replace('"img:latest"', json.dumps(image)))
    assert line.startswith("test.toml: workers[0] (x).image: expected a Docker image reference")
    assert line.endswith(f"(got {image!r})")


@pytest.mark.parametrize("runtime", ["--privileged", "run c", "", "runc;rm", "-runc"])
def test_a_runtime_must_be_a_name(runtime: str) -> None:
    line = _only_problem(WORKER + f"runtime = {json.dumps(runtime)}\n")
    assert line.startswith("test.toml: workers[0] (x).runtime: expected the name of a runtime")
    assert line.endswith(f"(got {runtime!r})")


@pytest.mark.parametrize("network", ["--net=host", "container:", "my net", "bridge\n"])
def test_a_network_must_be_a_name(network: str) -> None:
    line = _only_problem(WORKER + f"network = {json.dumps(network)}\n")
    assert line.startswith("test.toml: workers[0] (x).network: expected ")
    assert line.endswith(f"(got {network!r})")


def test_nul_bytes_and_equals_signs_where_they_cannot_go() -> None:
    problems = _problems(WORKER + 'command = ["sh", "-c\\u0000x"]\nenv = { "A=B" = "1" }\n')
    assert len(problems) == 2, problems
    assert any(p.startswith("test.toml: workers[0] (x).command: a command entry holds a NUL byte") for p in problems)
    assert any(p.startswith("test.toml: workers[0] (x).env: the variable name 'A=B'") for p in problems)
    line = _only_problem(WORKER + 'env = { TOKEN = "s3cret\\u0000" }\n')
    assert line.startswith("test.toml: workers[0] (x).env: the value of TOKEN holds a NUL byte")
    assert "s3cret" not in line  # a value may be a secret: it is not echoed


# -- params_schema --------------------------------------------------------------------------------

ECHO_SCHEMA = 'params_schema = { type = "object", required = ["text"], properties = { text = { type = "string" } } }\n'


def test_an_inline_schema_checks_params() -> None:
    (worker,) = _load(WORKER + ECHO_SCHEMA).workers
    assert worker.params_schema == {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    assert worker.params_problems({"text": "hi"}) == []
    assert worker.params_problems({}) == ["params: 'text' is a required property (rule: required)"]
    assert worker.params_problems({"text": 5}) == [
        "params.text: 5 is not of type 'string' (rule: properties.text.type)"
    ]


def test_without_a_schema_any_params_pass() -> None:
    (worker,) = _load(WORKER).workers
    assert worker.params_schema is None
    assert worker.params_problems({"anything": [1, {"goes": None}]}) == []


def test_a_schema_file_is_read_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}}}
    (tmp_path / "schemas" / "list.json").write_text(json.dumps(schema), encoding="utf-8")
    path = tmp_path / "w.toml"
    path.write_text(WORKER + 'params_schema = "schemas/list.json"\n', encoding="utf-8")

    (worker,) = load(path, environ={}).workers
    assert worker.params_schema == schema
    assert worker.params_problems({"items": [1, 2, "three"], "weird key": {}}) == [
        "params.items[2]: 'three' is not of type 'integer' (rule: properties.items.items.type)"
    ]


def test_a_schema_file_that_cannot_be_read_names_the_worker_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(WORKER + 'params_schema = "schemas/missing.json"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: workers[0] (x).params_schema: cannot read the schema file ")
    assert str(tmp_path / "schemas" / "missing.json") in line
    assert "No such file" in line


@pytest.mark.parametrize(
    ("content", "says"),
    [("{not json", "is not JSON"), ("[1, 2]", "holds a list, not a JSON Schema object"),
     ('{"type": "strnig"}', "is not a valid JSON Schema (Draft 2020-12): at type: ")],
)  # fmt: skip
def test_a_schema_file_that_is_not_a_schema_names_the_file(tmp_path: Path, content: str, says: str) -> None:
    (tmp_path / "bad.json").write_text(content, encoding="utf-8")
    path = tmp_path / "w.toml"
    path.write_text(WORKER + 'params_schema = "bad.json"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: workers[0] (x).params_schema: ")
    assert str(tmp_path / "bad.json") in line
    assert says in line


@pytest.mark.parametrize(
    ("schema", "says"),
    [('{ type = "strnig" }', "at type: 'strnig' is not valid"),
     ('{ properties = { text = { pattern = "(" } } }', "at properties.text.pattern: '(' is not a 'regex'"),
     ('{ required = "text" }', "at required: 'text' is not of type 'array'"), ("5", "expected a JSON Schema")],
)  # fmt: skip
def test_an_invalid_inline_schema_is_a_config_error(schema: str, says: str) -> None:
    line = _only_problem(WORKER + f"params_schema = {schema}\n")
    assert line.startswith("test.toml: workers[0] (x).params_schema: ")
    assert says in line


def test_params_problems_name_each_path_and_stop_at_20() -> None:
    schema = (
        'params_schema = { type = "object", additionalProperties = false, properties = { '
        'tags = { type = "array", items = { type = "string", maxLength = 3 } }, '
        '"odd key" = { type = "object", properties = { n = { minimum = 0 } } } } }\n'
    )
    (worker,) = _load(WORKER + schema).workers
    problems = worker.params_problems({"tags": ["ok", "toolong", 7], "odd key": {"n": -1}, "extra": 1})
    assert sorted(problems) == sorted([
        "params.tags[1]: 'toolong' is too long (rule: properties.tags.items.maxLength)",
        "params.tags[2]: 7 is not of type 'string' (rule: properties.tags.items.type)",
        'params["odd key"].n: -1 is less than the minimum of 0 (rule: properties.odd key.properties.n.minimum)',
        "params: Additional properties are not allowed ('extra' was unexpected) (rule: additionalProperties)",
    ])  # fmt: skip

    many = worker.params_problems({"tags": list(range(100))})
    assert len(many) == config.MAX_PARAMS_PROBLEMS == 20
    assert many[:19] == [f"params.tags[{i}]: {i} is not of type 'string' (rule: properties.tags.items.type)"
                         for i in range(19)]  # fmt: skip
    assert many[19] == "... and more (the first 19 are shown)"


def test_a_huge_value_is_quoted_short() -> None:
    (worker,) = _load(WORKER + ECHO_SCHEMA).workers
    (line,) = worker.params_problems({"text": ["x" * 100_000]})
    assert len(line) < 400
    assert line.startswith("params.text: ")


def test_a_schema_that_cannot_be_applied_refuses_instead_of_raising() -> None:
    remote = 'params_schema = { properties = { a = { "$ref" = "https://example.com/a.json" } } }\n'
    (worker,) = _load(WORKER + remote).workers
    (line,) = worker.params_problems({"a": 1})
    assert line.startswith("params: the worker's params_schema cannot be applied: ")
    assert "https://example.com/a.json" in line
    assert worker.params_problems({}) == []  # the reference is not followed where nothing uses it


def test_with_the_prismq_source_a_workers_task_type_the_server_cannot_look_up_is_a_config_error() -> None:
    text = """
[task_manager]
type = "http"
url = "http://taskmanager.invalid/api"

[[workers]]
name = "spaced"
image = "workerhost/echo:latest"
task_types = ["Fine.Name", "H1 Space"]
"""
    with pytest.raises(ConfigError) as refused:
        loads(text, source="x.toml", environ={})
    [problem] = refused.value.problems
    assert problem.startswith("x.toml: workers[0] (spaced).task_types: task type 'H1 Space' cannot be looked up")
    embedded = text.replace('type = "http"\nurl = "http://taskmanager.invalid/api"', 'type = "embedded"')
    assert loads(embedded, environ={}).task_types() == ["Fine.Name", "H1 Space"]  # only the server cares


def test_the_redis_example_config_is_valid() -> None:
    config = load(SHIPPED.parent / "examples" / "redis" / "workerhost.toml", environ={"WORKERHOST_API_TOKEN": "t" * 32})
    assert config.task_manager.type == "redis"
    assert [w.name for w in config.workers] == [w.name for w in load(SHIPPED, environ={}).workers]


# -- warm containers: prewarm and reuse --------------------------------------------------------


def test_prewarm_and_reuse_default_to_cold_containers() -> None:
    worker = _load(WORKER).workers[0]
    assert (worker.prewarm, worker.reuse, worker.prewarm_ttl, worker.warm_containers()) == (0, 0, 300.0, 0)


def test_a_reusing_worker_keeps_one_container_per_slot() -> None:
    worker = _load(_worker(extra='reuse = 100\nconcurrency = 3\nprewarm_ttl = "10m"')).workers[0]
    assert (worker.reuse, worker.warm_containers(), worker.prewarm_ttl) == (100, 3, 600.0)


def test_reuse_is_refused_for_a_strict_worker() -> None:
    problem = _only_problem(_worker(extra='sandbox = "strict"\nreuse = 10'))
    assert "workers[0] (x)" in problem
    assert 'reuse = 10 with sandbox = "strict"' in problem and "untrusted code" in problem


def test_prewarm_is_allowed_for_a_strict_worker() -> None:
    assert _load(_worker(extra='sandbox = "strict"\nprewarm = 2')).workers[0].warm_containers() == 2


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("reuse = 1", "reuse = 1 is one task per container"),
        ("reuse = 5\nprewarm = 2", "choose one of them"),
        ("prewarm = -1", "prewarm"),
        ("prewarm = 65", "prewarm"),
        ("prewarm_ttl = 0", "prewarm_ttl"),
    ],
)
def test_bad_warm_settings_are_refused_with_the_field(extra: str, says: str) -> None:
    assert says in _only_problem(_worker(extra=extra))


def test_warm_containers_are_bounded_host_wide_by_their_memory() -> None:
    text = (
        '[host]\nwarm_memory = "1g"\n'
        + _worker("a", '["T.A"]', 'prewarm = 4\nmemory = "256m"')
        + _worker("b", '["T.B"]', 'reuse = 50\nconcurrency = 2\nmemory = "128m"')
    )
    problem = _only_problem(text)
    assert "host.warm_memory" in problem
    assert "1280m" in problem or "1.2" in problem  # what they would hold: 4 x 256m + 2 x 128m
    assert "a 4 x 256m, b 2 x 128m" in problem
    assert _load(text.replace('"1g"', '"2g"')).host.warm_memory == 2 * GiB


@pytest.mark.parametrize("value", ["http://localhost:16686/trace/{trace_id}", "https://grafana.example/x?t={trace_id}"])
def test_trace_url_takes_a_link_with_the_trace_id(value: str) -> None:
    assert _load(f'[telemetry]\ntrace_url = "{value}"').telemetry.trace_url == value


@pytest.mark.parametrize(
    "value", ["http://localhost:16686/trace/", "javascript:alert(1)//{trace_id}", "/trace/{trace_id}"]
)
def test_a_trace_url_that_is_no_http_link_with_the_trace_id_is_refused(value: str) -> None:
    assert "telemetry.trace_url" in _only_problem(f'[telemetry]\ntrace_url = "{value}"')
