"""``sandrun serve`` arguments (and its TOML ``--config`` file) into the worker's frozen config."""

from __future__ import annotations

import os
from typing import Any

import pytest

from sandrun.cli import (
    ConfigFileError,
    _serve_parser,
    apply_config_file,
    build_parser,
    check_config,
    config_from,
)
from sandrun.config import WorkerConfig


def test_serve_points_the_worker_at_its_templates_and_dependency_cache() -> None:
    config = config_from(build_parser().parse_args(
        ["serve", "--env-dir", "envs", "--deps-dir", "/srv/deps"]))
    assert config.env_dir == os.path.abspath("envs")
    assert config.deps_dir == "/srv/deps"


def test_serve_defaults_to_the_admin_commands_directories() -> None:
    config = config_from(build_parser().parse_args(["serve"]))
    assert (config.env_dir, config.deps_dir) == (WorkerConfig.env_dir, WorkerConfig.deps_dir)
    assert config.env_dir == build_parser().parse_args(["env", "list"]).root


def serve_config(argv: list[str]) -> WorkerConfig:
    return config_from(apply_config_file(build_parser(), ["serve", *argv]))


def test_every_serve_flag_says_what_it_does_and_its_default() -> None:
    serve = _serve_parser(build_parser())
    for action in serve._actions:
        if not action.option_strings or action.dest in ("help", "config", "worker_key"):
            continue
        assert action.help, action.dest
        assert "default" in action.help, (action.dest, action.help)
    text = serve.format_help()
    assert "(default 20)" in " ".join(text.split())  # --jobs-per-hour, with its number


def test_default_timeout_and_memory_have_flags() -> None:
    config = serve_config(["--default-timeout", "30", "--default-memory-mb", "256"])
    assert (config.limits.default_timeout, config.limits.default_memory_mb) == (30, 256)
    assert check_config(config) is None
    assert "--default-timeout" in (check_config(serve_config(
        ["--default-timeout", "100", "--max-timeout", "50"])) or "")


def test_a_toml_file_holds_any_flag_and_the_command_line_overrides_it(tmp_path: Any) -> None:
    path = tmp_path / "sandrun.toml"
    path.write_text('jobs-per-hour = 500\nmax_memory_mb = 4096\ndefault-timeout = 60\n'
                    'quota-exempt = ["10.0.0.0/8", "127.0.0.1"]\nlisten = "0.0.0.0:9443"\n')
    config = serve_config(["--config", str(path), "--jobs-per-hour", "7"])
    assert config.quotas.jobs_per_hour == 7  # the flag wins
    assert config.limits.max_memory_mb == 4096 and config.limits.default_timeout == 60
    assert config.quotas.exempt == ("10.0.0.0/8", "127.0.0.1")
    assert config.listen == "tcp:9443:interface=0.0.0.0"
    flagged = serve_config(["--config", str(path), "--quota-exempt", "192.168.0.0/16"])
    assert flagged.quotas.exempt == ("192.168.0.0/16",)  # a repeatable flag replaces the list
    assert serve_config([]).quotas.exempt == ()  # nothing is exempt by default


@pytest.mark.parametrize("text,words", [
    ("jobs-per-huor = 5\n", "unknown option 'jobs-per-huor' (did you mean jobs-per-hour?)"),
    ("max-pids = 'many'\n", "max-pids: 'many' is not an integer"),
    ("quota-exempt = '10.0.0.0/8'\n", "quota-exempt must be a list of strings"),
    ("max-pids = [\n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path: Any, text: str, words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as caught:
        serve_config(["--config", str(path)])
    assert words in str(caught.value)


def test_a_bad_quota_exempt_entry_is_refused_before_start() -> None:
    problem = check_config(serve_config(["--quota-exempt", "not-a-network"]))
    assert problem is not None and problem.startswith("bad --quota-exempt")
