"""``sandrun``: the worker daemon and its admin commands.

The only module that touches ``sys.argv`` and the global reactor.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable
from typing import Any

import sandrun
from sandrun.config import Limits, QuotaConfig, WorkerConfig
from sandrun.daemon import (
    add_connection_flags,
    check_connections,
    connection_policy,
    listen_description,
    start_logging,
    stop_signal,
)


def build_parser() -> argparse.ArgumentParser:
    from sandrun.client.cli import add_connection_options

    parser = argparse.ArgumentParser(prog="sandrun", description=sandrun.__doc__)
    parser.add_argument("--version", action="version", version=f"sandrun {sandrun.__version__}")
    # Before the command (sandrun --server URL run x.py) as well as after it.
    add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_serve_command(commands)

    keygen = commands.add_parser("keygen", help="create a worker identity key")
    keygen.add_argument("--out", help="where to write the key (default ./sandrun-worker.pem)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.add_argument("--show", metavar="FILE",
                        help="print the worker id of an existing key instead of making one")

    verify = commands.add_parser("verify", help="verify a signed result")
    verify.add_argument("status", help="a job id (its /status is fetched from --server), "
                        "a file with the /status JSON, or - for stdin")
    verify.add_argument("--worker-id",
                        help="the worker's base64 public key (optional for a coordinator's "
                             "consensus answer: each replica is checked under its own key, "
                             "and a given id must be one of them)")
    verify.add_argument("--server", default=argparse.SUPPRESS,
                        help="worker or coordinator URL for a job id "
                             "(default: $SANDRUN_URL or http://127.0.0.1:8443)")

    install = commands.add_parser(
        "install-service", help="install and start the systemd unit (Delegate=yes)")
    install.add_argument("--coordinator", action="store_true",
                         help="the coordinator's unit (sandrun-coordinator.service) instead")
    install.add_argument("--no-start", action="store_true",
                         help="write the unit and reload systemd, but do not enable or start it")

    from sandrun.client.cli import add_client_commands

    add_client_commands(commands)

    from sandrun.environments.cli import add_env_commands

    add_env_commands(commands)
    return parser


def add_serve_command(commands: Any) -> None:
    """``sandrun serve``: every flag says what it does and shows its default; a TOML
    ``--config`` file may set any of them (the flag's long name, dashes or underscores)."""
    d, q = Limits(), QuotaConfig()
    serve = commands.add_parser(
        "serve", help="run a worker",
        description="Run a Sandrun worker. Every option can also be set in a TOML file given "
                    "with --config (keys are the option names, e.g. jobs-per-hour = 100, "
                    "quota-exempt = [\"10.0.0.0/8\"]); options on the command line win.")
    flag = serve.add_argument
    flag("--config", metavar="FILE", help="TOML file holding any of these options")
    flag("--listen", type=listen_description, metavar="ADDRESS", default="127.0.0.1:8443",
         help="HOST:PORT or endpoint string (default 127.0.0.1:8443)")
    flag("--max-concurrent", type=int, metavar="N", default=os.cpu_count() or 1,
         help="jobs running at once (default: number of cores, here %(default)s)")
    flag("--queue-size", type=int, metavar="N", default=100, help="jobs waiting (default %(default)s)")
    flag("--max-finished-jobs", type=int, metavar="N", default=WorkerConfig.max_finished_jobs,
         help="finished jobs held for download; past it the oldest finished is deleted "
              "(default %(default)s)")
    flag("--state-dir", metavar="DIR", default="/run/sandrun",
         help="where the worker mounts its tmpfs (default %(default)s)")
    flag("--env-dir", metavar="DIR", default=WorkerConfig.env_dir,
         help="built templates, as sandrun env --root (default %(default)s)")
    flag("--deps-dir", metavar="DIR", default=WorkerConfig.deps_dir,
         help="cache of fetched job dependencies (default %(default)s)")
    flag("--deps-cache-mb", type=int, metavar="MIB",
         default=WorkerConfig.deps_cache_bytes // 2**20,
         help="most the dependency cache may hold; beyond, the least recently used entries "
              "no running job uses are deleted (default %(default)s)")
    flag("--gpu-dev-dir", metavar="DIR", default=WorkerConfig.gpu_dev_dir,
         help="where the NVIDIA device nodes are (default %(default)s); GPUs are found "
              "through NVML (nvidia-ml-py) at start, none without it")
    flag("--worker-key", metavar="PEM",
         help="Ed25519 PKCS#8 PEM private key, from sandrun keygen (default: none, "
              "results are not signed)")
    flag("--join", metavar="URL",
         help="announce this worker to the coordinator at URL, which must run with "
              "--open-enrollment; needs --worker-key (default: none)")
    flag("--advertise", metavar="URL",
         help="this worker's URL as the coordinator reaches it, for --join (default: "
              "http:// and the --listen address)")
    flag("--trusted-proxy", action="append", default=None, metavar="CIDR",
         help="address or network whose X-Forwarded-For is believed (repeatable; "
              "default: none)")
    flag("--metrics-listen", type=listen_description, default=None, metavar="ADDRESS",
         help="serve Prometheus /metrics on this HOST:PORT or endpoint only, and not on "
              "--listen (default: on --listen, to --metrics-allow addresses)")
    flag("--metrics-allow", action="append", default=None, metavar="CIDR",
         help="address or network that may read /metrics on --listen (repeatable; "
              "default 127.0.0.0/8 and ::1)")
    flag("--max-upload-mb", type=int, metavar="MB", default=d.max_upload_bytes // 10**6,
         help="largest request body, MB (default %(default)s)")
    flag("--default-timeout", type=int, default=d.default_timeout, metavar="SECONDS",
         help="wall-clock limit of a job whose manifest gives none (default %(default)s)")
    flag("--max-timeout", type=int, default=d.max_timeout, metavar="SECONDS",
         help="largest timeout a manifest may ask for; more is a 400 (default %(default)s)")
    flag("--default-memory-mb", type=int, default=d.default_memory_mb, metavar="MB",
         help="memory of a job whose manifest gives none (default %(default)s)")
    flag("--max-memory-mb", type=int, default=d.max_memory_mb, metavar="MB",
         help="largest memory_mb a manifest may ask for; more is a 400 (default %(default)s)")
    flag("--output-cap-mb", type=float, default=d.output_cap_bytes / 2**20, metavar="MIB",
         help="output kept per stream (stdout, stderr) before the job is stopped with "
              "output_limit, MiB (default %(default)g)")
    flag("--max-pids", type=int, metavar="N", default=d.max_pids,
         help="processes and threads per job (default %(default)s)")
    flag("--max-cpus", type=float, metavar="CORES", default=d.max_cpus,
         help="most CPU bandwidth a manifest's cpus may ask for, in cores; a job gets "
              f"{d.default_cpus:g} core unless it asks (default: the number of cores, "
              "here %(default)g)")
    flag("--allow-unlimited-swap", action="store_true",
         help="start even where the host has swap on and cannot cap a job's swap use "
              "(default: refuse to start there)")
    flag("--cpu-quota", type=float, default=q.cpu_seconds_per_minute, metavar="SECONDS",
         help="CPU-seconds per client IP per rolling minute (default %(default)g)")
    flag("--max-active-per-ip", type=int, default=q.max_active_jobs, metavar="N",
         help="jobs queued or running at once per client IP (default %(default)s)")
    flag("--jobs-per-hour", type=int, default=q.jobs_per_hour, metavar="N",
         help="submissions per client IP per rolling hour (default %(default)s)")
    flag("--quota-exempt", action="append", default=None, metavar="CIDR",
         help="address or network to which no per-IP quota applies, e.g. 127.0.0.1 or "
              "10.0.0.0/8 (repeatable; default: none)")
    add_connection_flags(flag)


# ``serve`` options that take a list (repeatable flags; a list in the TOML file).
_LIST_OPTIONS = ("trusted_proxy", "quota_exempt", "metrics_allow")


class ConfigFileError(Exception):
    """A ``--config`` file that cannot be read, is not TOML, or names an unknown option."""


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``sandrun serve`` arguments over the defaults of a ``--config`` TOML file."""
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {}
    if args.command == "serve" and args.config:
        settings = load_config_file(args.config, _serve_parser(parser))
        serve = _serve_parser(parser)
        serve.set_defaults(**{k: v for k, v in settings.items() if k not in _LIST_OPTIONS})
        args = parser.parse_args(argv)
    if args.command == "serve":
        for name in _LIST_OPTIONS:
            if getattr(args, name) is None:  # not on the command line: the file's, or none
                setattr(args, name, list(settings.get(name, [])))
    return args


def _serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]  # type: ignore[no-any-return]
    raise AssertionError("no serve command")


def load_config_file(path: str, serve: argparse.ArgumentParser) -> dict[str, Any]:
    """The options a TOML file sets, by ``dest``, each checked as its flag would be."""
    import tomllib

    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    actions = {a.dest: a for a in serve._actions if a.option_strings and a.dest != "help"}
    settings: dict[str, Any] = {}
    for key, value in document.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            known = sorted(a.option_strings[-1][2:] for a in actions.values()
                           if a.dest not in ("config", "help"))
            close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigFileError(f"{path}: unknown option {key!r}{hint}")
        values = value if dest in _LIST_OPTIONS else [value]
        if not isinstance(values, list) or isinstance(value, (dict, bool)) or \
                any(isinstance(v, (dict, list, bool)) for v in values):
            kind = "a list of strings" if dest in _LIST_OPTIONS else "a number or a string"
            raise ConfigFileError(f"{path}: {key} must be {kind}")
        converted = []
        convert: Callable[[str], Any] = action.type if callable(action.type) else str
        for item in values:
            try:
                converted.append(convert(str(item)))
            except argparse.ArgumentTypeError as e:
                raise ConfigFileError(f"{path}: {key}: {e}") from None
            except ValueError:
                kind = "an integer" if convert is int else "a number" if convert is float \
                    else "valid"
                raise ConfigFileError(f"{path}: {key}: {item!r} is not {kind}") from None
        settings[dest] = converted if dest in _LIST_OPTIONS else converted[0]
    return settings


def config_from(args: argparse.Namespace) -> WorkerConfig:
    limits = Limits(max_upload_bytes=args.max_upload_mb * 10**6,
                    default_timeout=args.default_timeout, max_timeout=args.max_timeout,
                    default_memory_mb=args.default_memory_mb, max_memory_mb=args.max_memory_mb,
                    output_cap_bytes=int(args.output_cap_mb * 2**20), max_pids=args.max_pids,
                    max_cpus=args.max_cpus,
                    default_cpus=min(Limits.default_cpus, args.max_cpus))
    quotas = QuotaConfig(cpu_seconds_per_minute=args.cpu_quota,
                         max_active_jobs=args.max_active_per_ip,
                         jobs_per_hour=args.jobs_per_hour,
                         exempt=tuple(args.quota_exempt or ()))
    return WorkerConfig(listen=args.listen, max_concurrent=args.max_concurrent,
                        queue_size=args.queue_size, limits=limits, quotas=quotas,
                        max_finished_jobs=args.max_finished_jobs,
                        state_dir=os.path.abspath(args.state_dir), worker_key=args.worker_key,
                        env_dir=os.path.abspath(args.env_dir),
                        deps_dir=os.path.abspath(args.deps_dir),
                        deps_cache_bytes=args.deps_cache_mb * 2**20,
                        trusted_proxies=tuple(args.trusted_proxy or ()),
                        allow_unlimited_swap=args.allow_unlimited_swap,
                        join=args.join, advertise=args.advertise,
                        metrics_listen=args.metrics_listen,
                        metrics_allow=tuple(args.metrics_allow) if args.metrics_allow
                        else WorkerConfig.metrics_allow,
                        gpu_dev_dir=os.path.abspath(args.gpu_dev_dir),
                        connections=connection_policy(
                            args, tuple(args.trusted_proxy or ()) + quotas.exempt))


def check_config(config: WorkerConfig) -> str | None:
    """What is wrong with a configuration, in one line, before anything starts; or None."""
    from sandrun.netaddr import parse_trusted_proxies

    for flag, entries in (("--trusted-proxy", config.trusted_proxies),
                          ("--quota-exempt", config.quotas.exempt),
                          ("--metrics-allow", config.metrics_allow)):
        try:
            parse_trusted_proxies(tuple(entries))
        except ValueError as e:
            return f"bad {flag}: {e}"
    if config.join and not config.worker_key:
        return "--join needs --worker-key: joining a pool means proving the key"
    for flag, url in (("--join", config.join), ("--advertise", config.advertise)):
        if url and not url.startswith(("http://", "https://")):
            return f"bad {flag}: {url!r} is not an http:// or https:// URL"
    limits = config.limits
    if not 1 <= limits.default_timeout <= limits.max_timeout:
        return "--default-timeout must be between 1 and --max-timeout"
    if not 16 <= limits.default_memory_mb <= limits.max_memory_mb:
        return "--default-memory-mb must be between 16 and --max-memory-mb"
    if config.max_finished_jobs < 0:
        return "--max-finished-jobs must be 0 or more"
    if not limits.max_cpus >= 0.01:
        return "--max-cpus must be at least 0.01"
    return check_connections(config.connections, limits.max_upload_bytes)


def _allow_open_files() -> None:
    """Descriptors up to the hard limit: each held job keeps its output log open, and a
    worker may hold thousands (``--max-finished-jobs``) besides its connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def lean_imports(config: WorkerConfig) -> None:
    """Before the reactor is imported: keep pyOpenSSL out of a worker that speaks plain
    HTTP (Twisted would load it eagerly; see ``sandrun.notls``)."""
    from sandrun import notls

    if not notls.uses_tls((config.listen, config.metrics_listen), (config.join,)):
        notls.refuse_tls()


def serve(config: WorkerConfig) -> None:
    lean_imports(config)
    from twisted.internet import defer, task
    from twisted.internet.error import CannotListenError

    from sandrun.sandbox.supervisor import SandboxUnavailable
    from sandrun.service import WorkerService

    start_logging()
    _allow_open_files()

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        worker = WorkerService(reactor, config)
        try:
            yield worker.startService()
        except CannotListenError as e:  # one clear line: the port is taken, or not ours
            print(f"sandrun: cannot start: cannot listen on {_where(e)}: "
                  f"{_strerror(e.socketError)}", file=sys.__stderr__)  # not the log's prefix
            raise SystemExit(1) from None
        except SandboxUnavailable as e:  # one line, not a traceback (cgroup v2: what to do)
            print(f"sandrun: cannot start: {e}", file=sys.__stderr__)
            raise SystemExit(1) from None
        yield stop_signal(reactor)
        yield worker.stopService()

    task.react(lambda reactor: run(reactor))


def _where(e: Any) -> str:
    """``CannotListenError``'s interface and port as an address: ``127.0.0.1:8443``."""
    host = e.interface or "0.0.0.0"
    return f"[{host}]:{e.port}" if ":" in host else f"{host}:{e.port}"


def _strerror(error: Any) -> str:
    return getattr(error, "strerror", None) or str(error)


def unknown_option(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse a mistyped option or command, suggesting the close one (``--memroy``:
    did you mean ``--memory``?), before argparse blames the words after it."""
    commands = _subcommands(parser)
    known = {s for a in parser._actions for s in a.option_strings}
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # options before the command
        name = argv[i].split("=", 1)[0]
        if name not in known and argv[i] not in ("-", "--"):
            _refuse(parser, name, known)
        i += 2 if name in takes_value and "=" not in argv[i] else 1
    if i >= len(argv):
        return
    command = argv[i]
    if command not in commands:
        close = difflib.get_close_matches(command, list(commands), n=1)
        if close:
            parser.error(f"unknown command {command!r} (did you mean {close[0]}?)")
        return  # argparse lists the choices
    sub = commands[command]
    known = _options_within(sub)
    for word in argv[i + 1:]:
        if word == "--":
            break
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            if name not in known and not _abbreviates(name, known):
                _refuse(sub, name, known)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options_within(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its own subcommands (``env build ...``)."""
    found = {s for a in parser._actions for s in a.option_strings}
    for sub in _subcommands(parser).values():
        found |= _options_within(sub)
    return found


def _abbreviates(name: str, known: set[str]) -> bool:
    """argparse takes an unambiguous prefix of a long option."""
    return len([k for k in known if k.startswith(name) and k.startswith("--")]) == 1


def _refuse(parser: argparse.ArgumentParser, name: str, known: set[str]) -> None:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    parser.error(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else ""))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    unknown_option(parser, argv)
    try:
        args = apply_config_file(parser, argv)
    except ConfigFileError as e:
        sys.exit(f"sandrun: cannot start: {e}")
    if args.command == "serve":
        config = config_from(args)
        problem = check_config(config)
        if problem:
            sys.exit(f"sandrun: cannot start: {problem}")
        if os.geteuid() != 0:
            sys.exit("sandrun serve must run as root: it creates namespaces, cgroups and mounts")
        ensure_own_cgroup([sys.executable, "-m", "sandrun", *argv])
        if config.worker_key:
            from sandrun.identity import IdentityError, WorkerIdentity

            try:  # checked before the reactor starts, so a bad key is one clear line
                WorkerIdentity.load(config.worker_key)
            except IdentityError as e:
                sys.exit(f"sandrun: cannot start: worker key: {e}")
        serve(config)
    elif args.command == "keygen":
        from sandrun.identity import keygen_main, show_key_main

        if args.show:
            sys.exit(show_key_main(args.show))
        sys.exit(keygen_main(args.out, args.force))
    elif args.command == "install-service":
        from sandrun.deploy import install_service

        if os.geteuid() != 0:
            sys.exit("sandrun install-service must run as root")
        sys.exit(install_service(args.coordinator, start=not args.no_start))
    elif args.command == "verify":
        sys.exit(_verify(args))
    elif args.command == "env":
        from sandrun.environments.cli import run_env_command

        sys.exit(run_env_command(args))
    else:
        from sandrun.client.cli import run_client_command

        sys.exit(run_client_command(args))


# Set in the environment of a worker that re-ran itself in a Delegate=yes scope.
IN_SCOPE = "SANDRUN_IN_DELEGATED_SCOPE"


def ensure_own_cgroup(command: list[str], who: str = "sandrun") -> None:
    """On cgroup v2, go on only where this process may make its own child cgroups.

    From a cgroup that also holds other processes (a login shell's session
    scope) ``command`` (this process again, same arguments) is exec'd in a
    ``Delegate=yes`` scope of its own through ``systemd-run`` when systemd runs
    the host; otherwise one line says what to do and it exits.  See
    ``sandbox.cgroups``.  Used by ``sandrun serve`` and ``bench/launch.py``.
    """
    import shutil

    from sandrun.sandbox import cgroups

    if not os.path.exists(os.path.join(cgroups.ROOT, "cgroup.controllers")):
        return  # cgroup v1: the launcher checks its hierarchies
    try:
        cgroups.enter_leaf()  # so that every process it starts is born in the leaf
        return
    except cgroups.DelegationError as e:
        problem = str(e)
    except (OSError, cgroups.CgroupError) as e:
        sys.exit(f"{who}: cannot start: cgroup v2: {e}")
    systemd_run = shutil.which("systemd-run")
    if systemd_run and os.path.isdir("/run/systemd/system") and IN_SCOPE not in os.environ:
        print(f"{who}: {problem.split(';')[0]}: re-running in a scope of its own "
              "(systemd-run --scope -p Delegate=yes)", file=sys.stderr)
        os.environ[IN_SCOPE] = "1"
        os.execv(systemd_run, [systemd_run, "--scope", "--quiet", "--collect",
                               "-p", "Delegate=yes", f"--description={who}", "--", *command])
    sys.exit(f"{who}: cannot start: {problem}")


def _verify(args: argparse.Namespace) -> int:
    """``sandrun verify``: a saved /status document, or a job id fetched from a server."""
    from sandrun.client.cli import ssl_context_for
    from sandrun.identity import verify_main

    target, worker_id = args.status, args.worker_id

    # A worker's job id, or a coordinator's (``<tag>.<time>.job-...``, ``~`` between replicas).
    is_job_id = target.startswith("job-") or ".job-" in target
    if not is_job_id or os.path.exists(target):
        return verify_main(target, worker_id)
    import json
    import tempfile

    from sandrun.client import SandrunClient
    from sandrun.client.errors import SandrunError

    try:
        document = SandrunClient(args.server, ssl_context=ssl_context_for(args)).status(
            target).raw
    except SandrunError as e:
        from sandrun.client.cli import error_exit_code

        print(f"sandrun verify: cannot fetch {target}: {e}", file=sys.stderr)
        return error_exit_code(e)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(document, f)
        f.flush()
        return verify_main(f.name, worker_id)
