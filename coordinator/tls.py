"""TLS towards the workers: which certificates an https:// worker may present.

The coordinator verifies every https:// worker's certificate and host name
(Twisted's ``BrowserLikePolicyForHTTPS`` and ``optionsForClientTLS``, through
pyOpenSSL and service_identity), against the system's trust store or, with
``--worker-cacert``, against the CA certificate(s) of a PEM file only: a pool
can then run over a network that is not trusted with a CA of its own.
"""

from __future__ import annotations

import re
from typing import Any

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TLSConfigError(ValueError):
    pass


def load_trust_root(path: str) -> Any:
    """The CA certificates in the PEM file at ``path``, as a Twisted trust root."""
    from twisted.internet import ssl

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TLSConfigError(f"--worker-cacert {path}: {e.strerror}") from None
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise TLSConfigError(f"--worker-cacert {path}: no PEM certificate in it")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:  # noqa: BLE001 - OpenSSL's errors have no common base worth naming
        raise TLSConfigError(f"--worker-cacert {path}: not a certificate: {e}") from None
    return ssl.trustRootFromCertificates(certificates)
