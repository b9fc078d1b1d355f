"""What the worker's and the coordinator's ``cli.py`` share: where to listen, when to stop.

A leaf shared with the coordinator, like the wire helpers: it imports only the
standard library and Twisted, nothing from the rest of Sandrun.  Only a
``cli.py`` calls ``stop_signal``: signal handlers are the whole process's.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from twisted.internet import defer


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
