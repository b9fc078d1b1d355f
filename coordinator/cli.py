"""``sandrun-coordinator``: run a pool coordinator in front of Sandrun workers.

The only module that touches ``sys.argv``, signals and the global reactor.
SIGTERM and SIGINT stop it (``sandrun.daemon.stop_signal``, as for the worker);
SIGHUP reloads workers.json.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from coordinator.config import CoordinatorConfig, PoolQuota, WorkersFileError, load_workers
from sandrun.daemon import (
    add_connection_flags,
    check_connections,
    connection_policy,
    listen_description,
    raise_open_files_limit,
    start_logging,
    stop_signal,
)
from sandrun.netaddr import parse_trusted_proxies


def _positive(kind: Any) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sandrun")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    d, q = CoordinatorConfig(), PoolQuota()
    parser = argparse.ArgumentParser(
        prog="sandrun-coordinator",
        description="Route Sandrun jobs to a pool of authenticated workers.")
    parser.add_argument("--version", action="version", version=f"sandrun-coordinator {_version()}")
    parser.add_argument("--workers", default=d.workers_path,
                        help="the workers.json file (default ./workers.json)")
    parser.add_argument("--listen", type=listen_description, default="127.0.0.1:9000",
                        help="HOST:PORT or endpoint string (default 127.0.0.1:9000)")
    parser.add_argument("--health-interval", type=_positive(float), default=d.health_interval,
                        help="seconds between health checks (default 5)")
    parser.add_argument("--health-timeout", type=_positive(float), default=d.health_timeout,
                        help="seconds a worker has to answer a health check (default 2)")
    parser.add_argument("--request-timeout", type=_positive(float), default=d.request_timeout,
                        help="seconds to a worker's response headers (default 30)")
    parser.add_argument("--submit-timeout", type=_positive(float), default=d.submit_timeout,
                        help="seconds to forward a submission (default 300)")
    parser.add_argument("--max-upload-mb", type=_positive(int), metavar="MB",
                        default=d.max_upload_bytes // 10**6,
                        help="largest submission body, MB (default %(default)s)")
    parser.add_argument("--spool-dir", help="where uploads wait (default /dev/shm, RAM)")
    parser.add_argument("--trusted-proxy", action="append", default=[],
                        help="address or CIDR whose X-Forwarded-For is believed (repeatable; "
                             "default: none)")
    parser.add_argument("--cpu-quota", type=_positive(float), default=q.cpu_seconds_per_minute,
                        help="CPU-seconds per client IP per rolling minute, pool-wide "
                             "(default %(default)g)")
    parser.add_argument("--max-active-per-ip", type=_positive(int), default=q.max_active_jobs,
                        help="jobs queued or running per client IP, pool-wide (default %(default)s)")
    parser.add_argument("--jobs-per-hour", type=_positive(int), default=q.jobs_per_hour,
                        help="submissions per client IP per rolling hour, pool-wide "
                             "(default %(default)s)")
    parser.add_argument("--quota-exempt", action="append", default=[], metavar="CIDR",
                        help="address or network to which no pool-wide quota applies "
                             "(repeatable; default: none); give the workers the same")
    parser.add_argument("--metrics-listen", type=listen_description, default=None,
                        help="serve Prometheus /metrics on this HOST:PORT or endpoint only, and not "
                             "on --listen (default: on --listen, to --metrics-allow addresses)")
    parser.add_argument("--metrics-allow", action="append", default=None,
                        help="address or CIDR that may read /metrics on --listen (repeatable; "
                             "default 127.0.0.0/8 and ::1)")
    parser.add_argument("--drain-seconds", type=_positive(float), default=d.drain_seconds,
                        help="how long a worker removed by a reload stays reachable "
                             f"(default {d.drain_seconds:g})")
    parser.add_argument("--max-replicas", type=_positive(int), default=d.max_replicas,
                        help="the most replicas a manifest may ask for "
                             f"(default {d.max_replicas})")
    parser.add_argument("--max-disagreements", type=_positive(int),
                        default=d.max_disagreements,
                        help="disagreements with other replicas after which a worker gets no "
                             "jobs until a reload re-admits it "
                             f"(default {d.max_disagreements})")
    parser.add_argument("--open-enrollment", action="store_true",
                        help="let workers not in workers.json join by proving their key; they "
                             "only run extra replicas next to a listed worker (default off)")
    parser.add_argument("--max-open-workers", type=_positive(int), default=d.max_open_workers,
                        help=f"open workers enrolled at once (default {d.max_open_workers})")
    parser.add_argument("--worker-cacert", metavar="PEM",
                        help="CA certificate(s) that sign the https:// workers' certificates "
                             "(default: the system's trust store)")
    add_connection_flags(parser.add_argument)
    return parser


def config_from(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers_path=args.workers, listen=args.listen, health_interval=args.health_interval,
        health_timeout=args.health_timeout, request_timeout=args.request_timeout,
        submit_timeout=args.submit_timeout, max_upload_bytes=args.max_upload_mb * 10**6,
        spool_dir=args.spool_dir, trusted_proxies=tuple(args.trusted_proxy),
        quotas=PoolQuota(cpu_seconds_per_minute=args.cpu_quota,
                         max_active_jobs=args.max_active_per_ip,
                         jobs_per_hour=args.jobs_per_hour,
                         exempt=tuple(args.quota_exempt)),
        drain_seconds=args.drain_seconds, max_replicas=args.max_replicas,
        max_disagreements=args.max_disagreements, open_enrollment=args.open_enrollment,
        max_open_workers=args.max_open_workers, worker_cacert=args.worker_cacert,
        metrics_listen=args.metrics_listen,
        metrics_allow=tuple(args.metrics_allow) if args.metrics_allow
        else CoordinatorConfig.metrics_allow,
        connections=connection_policy(args, tuple(args.trusted_proxy) + tuple(args.quota_exempt)))


def serve(config: CoordinatorConfig) -> None:
    from twisted.internet import defer, task

    from coordinator.service import CoordinatorService

    start_logging()
    raise_open_files_limit()  # the connection cap stays below what this leaves

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        coordinator = CoordinatorService(reactor, config)
        # Installed before the first await: a SIGHUP during start-up must not kill us.
        signal.signal(signal.SIGHUP,
                      lambda signum, frame: reactor.callFromThread(coordinator.reload))
        try:
            yield coordinator.startService()
        except Exception as e:  # noqa: BLE001 - one clear line (port in use, bad endpoint)
            print(f"sandrun-coordinator: cannot start: {e}", file=sys.__stderr__)
            raise SystemExit(1) from None
        yield stop_signal(reactor)
        yield coordinator.stopService()

    task.react(lambda reactor: run(reactor))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag, entries in (("--trusted-proxy", args.trusted_proxy),
                          ("--quota-exempt", args.quota_exempt)):
        try:
            parse_trusted_proxies(tuple(entries))
        except ValueError as e:
            sys.exit(f"sandrun-coordinator: bad {flag}: {e}")
    config = config_from(args)
    problem = check_connections(config.connections, config.max_upload_bytes)
    if problem:
        sys.exit(f"sandrun-coordinator: cannot start: {problem}")
    try:
        load_workers(config.workers_path)  # refuse a bad file with its message, not a traceback
    except WorkersFileError as e:
        sys.exit(f"sandrun-coordinator: cannot start: {e}")
    if config.worker_cacert is not None:
        from coordinator.tls import TLSConfigError, load_trust_root

        try:
            load_trust_root(config.worker_cacert)
        except TLSConfigError as e:
            sys.exit(f"sandrun-coordinator: cannot start: {e}")
    serve(config)
