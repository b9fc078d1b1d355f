"""Exceptions raised by the Sandrun clients, and the one table that maps HTTP errors to them.

Every error the server answers carries its JSON body: ``error`` (short message),
``details`` (context) and, for some, ``reason`` and ``retry_after``.  The
exception keeps all of it, so callers can show the server's own words and
back off for exactly as long as it asked.  Pure stdlib; shared by the
synchronous and the Twisted client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BadRequestError",
    "ConflictError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "QueueFullError",
    "RateLimitedError",
    "SandrunConnectionError",
    "SandrunError",
    "ServerError",
    "ServiceUnavailableError",
    "StreamUnavailableError",
    "UnsafeArchiveError",
    "UnsupportedMediaTypeError",
    "WaitTimeoutError",
    "error_from_response",
]


class SandrunError(Exception):
    """Base of every client error.

    ``status`` is the HTTP status (None when no response came back),
    ``error``/``details`` the server's message, ``reason`` and
    ``retry_after`` (seconds) where the server gave them, ``body`` the whole
    decoded JSON error (empty when there was none).
    """

    def __init__(self, error: str, details: str = "", *, status: int | None = None,
                 reason: str | None = None, retry_after: float | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.details = details
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        text = self.error
        if self.details and self.details != self.error:
            text += f": {self.details}"
        if self.retry_after is not None:
            text += f" (retry after {_seconds(self.retry_after)})"
        return text


class SandrunConnectionError(SandrunError):
    """The server could not be reached, or the connection broke mid-request."""


class ProtocolError(SandrunError):
    """The server answered something that is not the Sandrun API (not JSON, wrong shape)."""


class BadRequestError(SandrunError):
    """400: the manifest or the upload was refused; ``details`` names the field or member."""


class NotFoundError(SandrunError):
    """404: no such job (ids expire: see retention), output or endpoint."""


class ConflictError(SandrunError):
    """409: the job is not in a state that allows this (outputs of an unfinished job)."""


class PayloadTooLargeError(SandrunError):
    """413: the upload is over the server's limit."""


class UnsupportedMediaTypeError(SandrunError):
    """415: the request body's content type is not accepted."""


class RateLimitedError(SandrunError):
    """429: this client's quota is spent; ``reason`` says which, ``retry_after`` when."""


class ServiceUnavailableError(SandrunError):
    """503: the worker cannot take the job now (queue or storage full); try again later."""


class QueueFullError(ServiceUnavailableError):
    """503 ``Queue full``: too many jobs are waiting."""


class ServerError(SandrunError):
    """Any other 5xx answer."""


class WaitTimeoutError(SandrunError):
    """``wait`` gave up before the job finished (the job itself goes on)."""


class StreamUnavailableError(SandrunError):
    """The live-output WebSocket could not be opened (the caller may poll instead)."""


class UnsafeArchiveError(SandrunError):
    """A downloaded archive holds a member that must not be written (link, ``..``, absolute)."""


_BY_STATUS: dict[int, type[SandrunError]] = {
    400: BadRequestError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def connection_problem(e: BaseException, scheme: str, timeout: float | None) -> str:
    """Why a connection failed, in one line a person can act on (TLS above all)."""
    import ssl

    text = str(e)
    if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        detail = getattr(e, "verify_message", None) or "not trusted"
        return (f"the server's TLS certificate is {detail}: give its CA with --cacert FILE "
                "(or SSL_CERT_FILE), or --insecure to skip the check while testing")
    if scheme == "https" and (isinstance(e, (ssl.SSLError, ConnectionResetError))
                              or "WRONG_VERSION_NUMBER" in text or "EOF" in text
                              or "handshake" in text):
        return ("the server does not speak TLS on this port (the TLS handshake failed: "
                f"{getattr(e, 'reason', None) or type(e).__name__}); for a plain-HTTP "
                "worker use an http:// URL")
    if isinstance(e, ssl.SSLError):
        return f"TLS failed: {getattr(e, 'reason', None) or text}"
    if isinstance(e, TimeoutError) or "timed out" in text:
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    return getattr(e, "strerror", None) or text or type(e).__name__


def error_from_response(status: int, body: bytes,
                        headers: Mapping[str, str] | None = None) -> SandrunError:
    """The exception for an HTTP error answer (``status`` >= 400).

    ``headers`` keys are lower-case; ``Retry-After`` is used when the body
    gives no ``retry_after``.  A body that is not the contract's JSON error
    still gives an exception of the right class, with the text as details.
    """
    document: dict[str, Any] = {}
    try:
        decoded = json.loads(body.decode("utf-8"))
        if isinstance(decoded, dict):
            document = decoded
    except (UnicodeDecodeError, ValueError):
        pass
    given, given_details = document.get("error"), document.get("details")
    if isinstance(given, str) and given:
        error = given
        details = given_details if isinstance(given_details, str) else ""
    else:
        error = f"HTTP {status}"
        kind = (headers or {}).get("content-type", "").split(";")[0].strip()
        text = body[:200].decode("utf-8", "replace").strip()
        if document or (text.isprintable() and not text.startswith("<") and "html" not in kind):
            details = "" if document else text  # a short plain line says it best
        else:  # a web page or worse: say what it is, not what it holds
            details = (f"the answer is not the Sandrun API ({kind or 'no content type'}, "
                       f"{len(body)} bytes): is this URL a Sandrun worker or coordinator?")
    reason = document.get("reason") if isinstance(document.get("reason"), str) else None
    retry_after = _number(document.get("retry_after"))
    if retry_after is None and headers is not None:
        retry_after = _number(headers.get("retry-after"))
    cls = _BY_STATUS.get(status)
    if cls is ServiceUnavailableError and error == "Queue full":
        cls = QueueFullError
    if cls is None:
        cls = ServerError if status >= 500 else SandrunError
    return cls(error, details or "", status=status, reason=reason, retry_after=retry_after,
               body=document)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _seconds(value: float) -> str:
    return f"{value:g} s"
