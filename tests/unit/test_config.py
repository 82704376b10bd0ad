"""runner.config: friendly inputs become one type, and every mistake is one readable line."""

from __future__ import annotations

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
    for bad in ("10x", 0, "0s", -1, True, "", None, "1d"):
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
    worker = _load(STRICT + 'tmpfs = "32m"\nruntime = "runsc-kvm"\n', {}).workers[0]
    assert (worker.tmpfs, worker.runtime) == (32 * 1024**2, "runsc-kvm")


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
