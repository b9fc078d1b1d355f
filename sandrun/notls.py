"""Keep pyOpenSSL out of a worker that speaks plain HTTP.

Twisted tries to import pyOpenSSL (and with it cryptography and
service_identity) as soon as the reactor or ``twisted.internet.endpoints`` is
imported: ``posixbase``, ``tcp`` and ``endpoints`` each try, and each carries on
without TLS when the import fails.  In a worker that is 13 MB of its idle RSS
(measured with ``bench/memory.py``: most of it cryptography's Rust extension and
libcrypto), paid by every worker whether or not anything in it uses TLS.

A worker that listens on no ``ssl:`` endpoint and announces itself to no
``https://`` coordinator uses none of it, so ``sandrun serve`` calls
``refuse_tls`` before the reactor is imported.  From then on an import of
pyOpenSSL or service_identity in that process fails with an ``ImportError`` that
says why: Twisted leaves TLS out (the reactor does not provide ``IReactorSSL``;
``wrapClientTLS`` and ``listenSSL`` raise ``NotImplementedError``) rather than
half-work.  cryptography itself stays importable: PEM keys (``identity``) and
autobahn's WAMP modules import it where they are used.

Coordinator processes never call this: they dial https:// workers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["REFUSED", "refuse_tls", "uses_tls"]

# Top-level packages a plain-HTTP worker never imports (pyOpenSSL and what only it needs).
REFUSED = frozenset({"OpenSSL", "service_identity"})

# Endpoint strings (``--listen``, ``--metrics-listen``) that speak TLS.
_TLS_ENDPOINTS = ("ssl:", "tls:", "le:", "lets:")


def uses_tls(listen: Iterable[str | None], urls: Iterable[str | None]) -> bool:
    """Whether a process listening on ``listen`` endpoints and dialling ``urls`` needs TLS."""
    return any(e and e.lower().startswith(_TLS_ENDPOINTS) for e in listen) or \
        any(u and u.lower().startswith("https:") for u in urls)


class _RefuseTLS:
    """A meta path finder that fails the import of every ``REFUSED`` package.

    (Not an ``importlib.abc.MetaPathFinder``: that module would load
    ``importlib.resources`` only for its base class.)
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> Any:
        if fullname.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(
                f"{fullname} is not loaded in a worker that speaks plain HTTP "
                "(no ssl: listener, no https:// coordinator; see sandrun/notls.py)",
                name=fullname)
        return None


def refuse_tls() -> bool:
    """Make every later import of pyOpenSSL fail, in this process, for good.

    Call it before the reactor is imported.  False, and nothing changed, when
    pyOpenSSL is already loaded: too late to save anything, and refusing it now
    would only break what holds it (``tests/unit/test_lean_imports.py`` catches
    a start-up path that loads it first).
    """
    if any(name.partition(".")[0] in REFUSED for name in sys.modules):
        return False
    if not any(isinstance(finder, _RefuseTLS) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RefuseTLS())
    return True
