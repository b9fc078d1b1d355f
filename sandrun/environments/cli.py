"""``sandrun env build NAME`` / ``check NAME`` / ``list``: the admin side of templates."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sandrun.environments.fetch import SANDBOX_PYTHON
from sandrun.environments.registry import DEFAULT_ROOT, EnvironmentUnavailable, Registry

__all__ = ["add_env_commands", "run_env_command"]


def add_env_commands(subparsers: Any) -> None:
    """Add ``env`` (with ``build``, ``check``, ``list``) to the ``sandrun`` parser."""
    env = subparsers.add_parser("env", help="build and list environment templates")
    env.add_argument("--root", default=DEFAULT_ROOT,
                     help=f"where built templates live (default {DEFAULT_ROOT})")
    env.add_argument("--python", default=SANDBOX_PYTHON,
                     help=f"the interpreter jobs run (default {SANDBOX_PYTHON})")
    actions = env.add_subparsers(dest="env_command", required=True)
    b = actions.add_parser("build", help="install a template's pinned packages (wheels only)")
    b.add_argument("name")
    b.add_argument("--timeout", type=float, default=3600.0, help="seconds pip may take")
    b.add_argument("--pip-arg", action="append", default=[], dest="pip_args",
                   help="extra pip option, e.g. --pip-arg=--index-url=URL (repeatable)")
    c = actions.add_parser("check", help="import a built template's modules again")
    c.add_argument("name")
    ls = actions.add_parser("list", help="every template, built or not")
    ls.add_argument("--json", action="store_true", help="the /environments document")
    ls.add_argument("--verbose", action="store_true", help="also every installed version")


def run_env_command(args: argparse.Namespace) -> int:
    # Here, not at the top: every ``sandrun`` command, the worker too, builds this parser.
    from sandrun.environments.builder import BuildError, build, check

    registry = Registry(args.root)

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        if args.env_command == "build":
            template = registry.template(args.name)
            if os.geteuid() != 0:
                print("sandrun env build: run as root (the prefix must be root-owned so "
                      "jobs cannot change it)", file=sys.stderr)
                return 2
            build(template, registry, python=args.python, pip_args=tuple(args.pip_args),
                  timeout=args.timeout, progress=progress)
            return 0
        if args.env_command == "check":
            check(registry, args.name, python=args.python, progress=progress)
            print(f"{args.name}: ok")
            return 0
        return _list(registry, args.json, args.verbose)
    except EnvironmentUnavailable as e:
        print(f"sandrun env: {e.details}", file=sys.stderr)
        return 2
    except BuildError as e:
        print(f"sandrun env {args.env_command}: {e}", file=sys.stderr)
        return 1


def _list(registry: Registry, as_json: bool, verbose: bool) -> int:
    if as_json:
        print(json.dumps(registry.describe(), indent=1))
        return 0
    for name, template in registry.templates.items():
        built = registry.built(name)
        if built is None:
            state = "not built"
        elif built.fingerprint != template.fingerprint:
            state = f"stale (built {built.built_at} from another list; rebuild)"
        else:
            state = f"ready (built {built.built_at})"
        print(f"{name:14} {state}")
        print(f"{'':14} {template.description}")
        print(f"{'':14} {' '.join(template.packages)}")
        if verbose and built is not None:
            print(f"{'':14} installed: {' '.join(built.installed)}")
    return 0
