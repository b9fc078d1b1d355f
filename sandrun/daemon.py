"""What the worker's and the coordinator's ``cli.py`` share: where to listen, when to stop,
what clients may hold open.

A leaf shared with the coordinator, like the wire helpers: it imports only the
standard library and Twisted, nothing from the rest of Sandrun.  Only a
``cli.py`` calls ``stop_signal``: signal handlers are the whole process's.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
)


def listen_description(value: str) -> str:
    """Accept ``HOST:PORT`` or a Twisted endpoint string (``tcp:8443:interface=...``)."""
    if value.startswith(("tcp:", "tcp6:", "ssl:", "unix:")):
        return value
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: use HOST:PORT or an endpoint string")
    host = host.strip("[]") or "127.0.0.1"
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def address_text(address: Any) -> str:
    """A listening or peer address as people write it: ``127.0.0.1:8443``, ``[::1]:8443``,
    a Unix socket's path; never a Python repr."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return str(address)


def stop_signal(reactor: Any) -> defer.Deferred[None]:
    """Handle SIGTERM and SIGINT from now on; fires (in the reactor) on the first of them."""
    done: defer.Deferred[None] = defer.Deferred()

    def stop() -> None:
        if not done.called:
            done.callback(None)

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done


# syslog priorities, which journald reads from a "<N>" prefix on each line.
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}


def journal_line(event: dict[str, Any]) -> str:
    """One log event as one line for the journal: ``<priority>namespace: text``.

    No time stamp (the journal keeps its own); a traceback is folded into the
    same line, so that one event is one journal entry.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getTraceback()}"
    text = " | ".join(part for part in text.splitlines() if part.strip())
    priority = _PRIORITY.get(event.get("log_level", LogLevel.info), 6)
    return f"<{priority}>{event.get('log_namespace', '-')}: {text}\n"


def _stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream (systemd sets JOURNAL_STREAM=dev:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def start_logging(stream: IO[str] | None = None) -> ILogObserver:
    """Log to stderr: one line per event for the journal under systemd, else with times."""
    stream = stream or sys.stderr
    observer: ILogObserver
    if stream is sys.stderr and _stderr_is_journal():
        observer = FileLogObserver(stream, journal_line)
    else:
        observer = text_observer(stream)
    globalLogBeginner.beginLoggingTo([observer])
    return observer


def text_observer(stream: IO[str]) -> ILogObserver:
    """``textFileLogObserver``'s lines, with the time stamp formatted once a second, not
    once a line (a busy worker logs a few lines per job)."""
    format_time = _time_once_a_second()
    return FileLogObserver(stream, lambda event: formatEventAsClassicLogText(
        event, formatTime=format_time))


def _time_once_a_second() -> Callable[[float | None], str]:
    """``twisted.logger.formatTime`` (whole seconds), remembered for the second it names."""
    last: list[tuple[int, str]] = [(-1, "")]

    def format_time(when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        cached = last[0]  # one tuple, replaced whole: safe from a thread's log line
        if cached[0] != second:
            cached = (second, formatTime(second))
            last[0] = cached
        return cached[1]

    return format_time


MB = 1000 * 1000


@dataclass(frozen=True)
class ConnectionPolicy:
    """What clients may hold open at once, and for how long; flags of the same names."""

    # Open client connections, all clients; lowered to stay below RLIMIT_NOFILE.
    max_connections: int = 1000
    max_connections_per_ip: int = 64  # open connections from one client address
    # Seconds to a request's last header, from the connection or the request's first byte.
    header_timeout: float = 10.0
    # Seconds without a byte from the client, between requests or inside a body.
    idle_timeout: float = 30.0
    # A request body's least average rate, bytes a second, after its first upload_grace
    # seconds (0: none); else 408.  A slow client's 100 MB upload at 4 KiB/s still passes.
    min_upload_rate: int = 4096
    upload_grace: float = 10.0
    max_inflight_upload_bytes: int = 400 * MB  # request bodies in flight, all clients, bytes
    max_inflight_upload_bytes_per_ip: int = 100 * MB  # ... from one client address, bytes
    exempt: tuple[str, ...] = ()  # addresses or networks with no per-address cap


def raise_open_files_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(wanted: int, reserve: int) -> int:
    """``wanted``, lowered so that ``reserve`` descriptors stay free for everything else."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


def add_connection_flags(flag: Any) -> None:
    """What clients may hold open (``sandrun.connections``): the worker's and the
    coordinator's flags alike.  --trusted-proxy and --quota-exempt addresses have no
    per-address cap."""
    c = ConnectionPolicy()
    flag("--max-connections", type=int, metavar="N", default=c.max_connections,
         help="open client connections at once, all clients; lowered to stay below the "
              "open-files limit, whose soft value is raised to the hard one at start "
              "(default %(default)s)")
    flag("--max-connections-per-ip", type=int, metavar="N", default=c.max_connections_per_ip,
         help="open connections from one client address (default %(default)s)")
    flag("--header-timeout", type=float, metavar="SECONDS", default=c.header_timeout,
         help="a request's headers must arrive within this long, else 408 "
              "(default %(default)g)")
    flag("--idle-timeout", type=float, metavar="SECONDS", default=c.idle_timeout,
         help="a connection that sends nothing for this long is closed, between requests "
              "or inside a body (default %(default)g)")
    flag("--min-upload-rate", type=int, metavar="BYTES_PER_S", default=c.min_upload_rate,
         help="a request body must arrive at this many bytes a second on average, its first "
              "--upload-grace seconds free, else 408; 0 for no minimum (default %(default)s)")
    flag("--upload-grace", type=float, metavar="SECONDS", default=c.upload_grace,
         help="seconds at the start of a request body that --min-upload-rate does not count "
              "(default %(default)g)")
    flag("--max-inflight-upload-mb", type=int, metavar="MB", default=None,
         help="request bodies being received at once, all clients, MB; past it 503 "
              "(default: four times --max-upload-mb)")
    flag("--max-inflight-upload-mb-per-ip", type=int, metavar="MB", default=None,
         help="request bodies being received at once from one client address, MB; past it "
              "429, before the body is read (default: --max-upload-mb, one whole upload)")


def connection_policy(args: argparse.Namespace, exempt: tuple[str, ...]) -> ConnectionPolicy:
    per_ip = args.max_inflight_upload_mb_per_ip or args.max_upload_mb
    total = args.max_inflight_upload_mb or 4 * args.max_upload_mb
    return ConnectionPolicy(max_connections=args.max_connections,
                            max_connections_per_ip=args.max_connections_per_ip,
                            header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                            min_upload_rate=args.min_upload_rate, upload_grace=args.upload_grace,
                            max_inflight_upload_bytes=total * 10**6,
                            max_inflight_upload_bytes_per_ip=per_ip * 10**6, exempt=exempt)


def check_connections(c: ConnectionPolicy, max_upload_bytes: int) -> str | None:
    """What is wrong with the connection flags (worker and coordinator alike); or None."""
    if c.max_connections < 1 or c.max_connections_per_ip < 1:
        return "--max-connections and --max-connections-per-ip must be at least 1"
    if not (c.header_timeout > 0 and c.idle_timeout > 0):
        return "--header-timeout and --idle-timeout must be positive"
    if c.min_upload_rate < 0 or c.upload_grace < 0:
        return "--min-upload-rate and --upload-grace must not be negative"
    if c.max_inflight_upload_bytes_per_ip < max_upload_bytes:
        return "--max-inflight-upload-mb-per-ip must be at least --max-upload-mb"
    if c.max_inflight_upload_bytes < c.max_inflight_upload_bytes_per_ip:
        return "--max-inflight-upload-mb must be at least --max-inflight-upload-mb-per-ip"
    return None
    return None
