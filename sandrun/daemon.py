"""What the worker's and the coordinator's ``cli.py`` share: where to listen, when to stop.

A leaf shared with the coordinator, like the wire helpers: it imports only the
standard library and Twisted, nothing from the rest of Sandrun.  Only a
``cli.py`` calls ``stop_signal``: signal handlers are the whole process's.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
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
        observer = textFileLogObserver(stream)
    globalLogBeginner.beginLoggingTo([observer])
    return observer
