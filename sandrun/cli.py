"""``sandrun``: the worker daemon and its admin commands.

The only module that touches ``sys.argv`` and the global reactor.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import sandrun
from sandrun.config import Limits, QuotaConfig, WorkerConfig
from sandrun.daemon import listen_description, stop_signal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandrun", description=sandrun.__doc__)
    parser.add_argument("--version", action="version", version=f"sandrun {sandrun.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a worker")
    d, q = Limits(), QuotaConfig()
    serve.add_argument("--listen", type=listen_description, default="127.0.0.1:8443",
                       help="HOST:PORT or endpoint string (default 127.0.0.1:8443)")
    serve.add_argument("--max-concurrent", type=int, default=os.cpu_count() or 1,
                       help="jobs running at once (default: number of cores)")
    serve.add_argument("--queue-size", type=int, default=100, help="jobs waiting (default 100)")
    serve.add_argument("--state-dir", default="/run/sandrun",
                       help="where the worker mounts its tmpfs (default /run/sandrun)")
    serve.add_argument("--env-dir", default=WorkerConfig.env_dir,
                       help="built templates, as sandrun env --root "
                            f"(default {WorkerConfig.env_dir})")
    serve.add_argument("--deps-dir", default=WorkerConfig.deps_dir,
                       help=f"cache of fetched job dependencies (default {WorkerConfig.deps_dir})")
    serve.add_argument("--worker-key", help="Ed25519 PKCS#8 PEM private key (sandrun keygen)")
    serve.add_argument("--trusted-proxy", action="append", default=[],
                       help="address or CIDR whose X-Forwarded-For is believed (repeatable)")
    serve.add_argument("--metrics-listen", type=listen_description, default=None,
                       help="serve Prometheus /metrics on this HOST:PORT or endpoint only, and not "
                            "on --listen (default: on --listen, to --metrics-allow addresses)")
    serve.add_argument("--metrics-allow", action="append", default=None,
                       help="address or CIDR that may read /metrics on --listen (repeatable; "
                            "default 127.0.0.0/8 and ::1)")
    serve.add_argument("--max-upload-mb", type=int, default=d.max_upload_bytes // 10**6)
    serve.add_argument("--max-timeout", type=int, default=d.max_timeout)
    serve.add_argument("--max-memory-mb", type=int, default=d.max_memory_mb)
    serve.add_argument("--output-cap-mb", type=float, default=d.output_cap_bytes / 2**20)
    serve.add_argument("--max-pids", type=int, default=d.max_pids)
    serve.add_argument("--cpu-quota", type=float, default=q.cpu_seconds_per_minute,
                       help="CPU-seconds per client IP per rolling minute")
    serve.add_argument("--max-active-per-ip", type=int, default=q.max_active_jobs)
    serve.add_argument("--jobs-per-hour", type=int, default=q.jobs_per_hour)

    keygen = commands.add_parser("keygen", help="create a worker identity key")
    keygen.add_argument("--out", help="where to write the key (default ./sandrun-worker.pem)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")

    verify = commands.add_parser("verify", help="verify a signed result")
    verify.add_argument("status", help="a job id (its /status is fetched from --server), "
                        "a file with the /status JSON, or - for stdin")
    verify.add_argument("--worker-id", required=True, help="the worker's base64 public key")
    verify.add_argument("--server", help="worker or coordinator URL for a job id "
                        "(default: $SANDRUN_URL or http://127.0.0.1:8443)")

    from sandrun.client.cli import add_client_commands

    add_client_commands(commands)

    from sandrun.environments.cli import add_env_commands

    add_env_commands(commands)
    return parser


def config_from(args: argparse.Namespace) -> WorkerConfig:
    limits = Limits(max_upload_bytes=args.max_upload_mb * 10**6, max_timeout=args.max_timeout,
                    max_memory_mb=args.max_memory_mb,
                    output_cap_bytes=int(args.output_cap_mb * 2**20), max_pids=args.max_pids)
    quotas = QuotaConfig(cpu_seconds_per_minute=args.cpu_quota,
                         max_active_jobs=args.max_active_per_ip,
                         jobs_per_hour=args.jobs_per_hour)
    return WorkerConfig(listen=args.listen, max_concurrent=args.max_concurrent,
                        queue_size=args.queue_size, limits=limits, quotas=quotas,
                        state_dir=os.path.abspath(args.state_dir), worker_key=args.worker_key,
                        env_dir=os.path.abspath(args.env_dir),
                        deps_dir=os.path.abspath(args.deps_dir),
                        trusted_proxies=tuple(args.trusted_proxy),
                        metrics_listen=args.metrics_listen,
                        metrics_allow=tuple(args.metrics_allow) if args.metrics_allow
                        else WorkerConfig.metrics_allow)


def serve(config: WorkerConfig) -> None:
    from twisted.internet import defer, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from sandrun.service import WorkerService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])  # type: ignore[list-item]

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        worker = WorkerService(reactor, config)
        yield worker.startService()
        yield stop_signal(reactor)
        yield worker.stopService()

    task.react(lambda reactor: run(reactor))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if os.geteuid() != 0:
            sys.exit("sandrun serve must run as root: it creates namespaces, cgroups and mounts")
        config = config_from(args)
        if config.worker_key:
            from sandrun.identity import IdentityError, WorkerIdentity

            try:  # checked before the reactor starts, so a bad key is one clear line
                WorkerIdentity.load(config.worker_key)
            except IdentityError as e:
                sys.exit(f"sandrun: cannot start: worker key: {e}")
        serve(config)
    elif args.command == "keygen":
        from sandrun.identity import keygen_main

        sys.exit(keygen_main(args.out, args.force))
    elif args.command == "verify":
        sys.exit(_verify(args.status, args.worker_id, args.server))
    elif args.command == "env":
        from sandrun.environments.cli import run_env_command

        sys.exit(run_env_command(args))
    else:
        from sandrun.client.cli import run_client_command

        sys.exit(run_client_command(args))


def _verify(target: str, worker_id: str, server: str | None) -> int:
    """``sandrun verify``: a saved /status document, or a job id fetched from a server."""
    from sandrun.identity import verify_main

    if not (target.startswith("job-") and not os.path.exists(target)):
        return verify_main(target, worker_id)
    import json
    import tempfile

    from sandrun.client import SandrunClient
    from sandrun.client.errors import SandrunError

    try:
        document = SandrunClient(server).status(target).raw
    except SandrunError as e:
        print(f"sandrun verify: cannot fetch {target}: {e}", file=sys.stderr)
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(document, f)
        f.flush()
        return verify_main(f.name, worker_id)
