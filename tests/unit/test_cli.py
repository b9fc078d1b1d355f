"""``sandrun serve`` arguments into the worker's frozen config."""

from __future__ import annotations

import os

from sandrun.cli import build_parser, config_from
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
