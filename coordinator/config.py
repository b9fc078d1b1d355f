"""The coordinator's configuration, and the workers.json file it routes to.

workers.json is a JSON list with one object per worker::

    [{"worker_id": "<standard base64 of the worker's Ed25519 public key>",
      "endpoint": "http://10.0.0.5:8443",
      "max_concurrent_jobs": 4,
      "name": "rack1-a"}]

- ``worker_id`` (required): what ``sandrun keygen`` printed.  Every health
  check must be signed by this key, so this is what authenticates the
  worker; the endpoint alone proves nothing.
- ``endpoint`` (required): ``http://`` or ``https://``, host and optional
  port, nothing after it.
- ``max_concurrent_jobs`` (optional): how many jobs the coordinator counts
  this worker as running at once, in place of the ``capacity`` the worker
  signs in its health answers.  The worker's queue (its signed
  ``queue_capacity``) always comes on top: see ``scheduling.job_limit``.
- ``name`` (optional): a label for ``/pool`` and the log.
- ``comment`` (optional): ignored; JSON has no comments.

Any other key is refused, as are a repeated ``worker_id`` or endpoint: a file
that may not mean what its author thought is never half-applied.  A refused
file names the entry (its index and, where known, its name or endpoint).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from coordinator.jobids import worker_tag
from sandrun.daemon import ConnectionPolicy

MAX_WORKERS_FILE_BYTES = 1024 * 1024
_ENTRY_KEYS = {"worker_id", "endpoint", "max_concurrent_jobs", "name", "comment"}


class WorkersFileError(ValueError):
    """workers.json cannot be used; the message names the bad entry."""


@dataclass(frozen=True)
class WorkerEntry:
    """One configured worker."""

    worker_id: str  # standard base64 of the raw Ed25519 public key
    endpoint: str  # normalised "scheme://host:port", no trailing slash
    max_concurrent_jobs: int | None = None  # None: what the worker signs as its capacity
    name: str | None = None

    @property
    def tag(self) -> str:
        return worker_tag(self.worker_id)

    @property
    def label(self) -> str:
        return self.name or self.endpoint


@dataclass(frozen=True)
class PoolQuota:
    """Per-client-IP limits that hold across the whole pool (``quota.py``)."""

    cpu_seconds_per_minute: float = 10.0  # CPU-seconds, summed over every worker
    max_active_jobs: int = 2  # queued or running, anywhere in the pool
    jobs_per_hour: int = 20  # accepted submissions, anywhere in the pool
    exempt: tuple[str, ...] = ()  # addresses or CIDR networks no pool quota applies to


@dataclass(frozen=True)
class CoordinatorConfig:
    workers_path: str = "workers.json"
    listen: str = "tcp:9000:interface=127.0.0.1"
    health_interval: float = 5.0  # seconds between health rounds
    health_timeout: float = 2.0  # seconds a worker has to answer a health check
    max_clock_skew: float = 60.0  # seconds a signed health answer's time may be off
    request_timeout: float = 30.0  # seconds to the response headers of a proxied request
    submit_timeout: float = 300.0  # seconds to forward an upload (or start a download)
    max_upload_bytes: int = 100 * 1000 * 1000  # request body of /submit; more is 413
    spool_dir: str | None = None  # where uploads wait; None = /dev/shm (RAM) when present
    trusted_proxies: tuple[str, ...] = ()  # whose X-Forwarded-For the coordinator believes
    quotas: PoolQuota = field(default_factory=PoolQuota)
    drain_seconds: float = 3600.0  # how long a worker removed by a reload stays reachable
    max_replicas: int = 3  # the most ``replicas`` a manifest may ask for; more is 400
    max_disagreements: int = 3  # disagreements with other replicas that suspend a worker
    open_enrollment: bool = False  # whether workers not in workers.json may join (POST /pool/join)
    max_open_workers: int = 32  # open workers enrolled at once; more joins are 503
    # PEM file of the CA certificate(s) that sign the https:// workers' certificates;
    # None = the system's trust store.
    worker_cacert: str | None = None
    # Prometheus metrics: on their own listener (an endpoint string) when set, and then
    # never on the API's; otherwise at the API's /metrics, to these addresses or networks.
    metrics_listen: str | None = None
    metrics_allow: tuple[str, ...] = ("127.0.0.0/8", "::1")
    # Connections and uploads in flight clients may hold; header and idle timeouts.
    connections: ConnectionPolicy = field(default_factory=ConnectionPolicy)


def parse_workers(text: str | bytes) -> tuple[WorkerEntry, ...]:
    """Parse and validate workers.json; raises ``WorkersFileError`` naming the bad entry."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkersFileError(f"workers.json is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise WorkersFileError("workers.json must be a JSON list of worker objects")
    entries: list[WorkerEntry] = []
    ids: dict[str, int] = {}
    endpoints: dict[str, int] = {}
    tags: dict[str, int] = {}
    for index, raw in enumerate(data):
        entry = _parse_entry(index, raw)
        where = _where(index, raw)
        for seen, value, what in ((ids, entry.worker_id, "worker_id"),
                                  (endpoints, entry.endpoint, "endpoint"),
                                  (tags, entry.tag, "job-id tag")):
            if value in seen:
                raise WorkersFileError(
                    f"{where}: {what} {value!r} is already used by entry {seen[value]}")
            seen[value] = index
        entries.append(entry)
    return tuple(entries)


def load_workers(path: str) -> tuple[WorkerEntry, ...]:
    """Read and validate the file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_WORKERS_FILE_BYTES + 1)
    except OSError as e:
        raise WorkersFileError(f"cannot read {path!r}: {e.strerror}") from None
    if len(data) > MAX_WORKERS_FILE_BYTES:
        raise WorkersFileError(f"{path!r} is larger than {MAX_WORKERS_FILE_BYTES} bytes")
    try:
        return parse_workers(data)
    except WorkersFileError as e:
        raise WorkersFileError(f"{os.path.basename(path)}: {e}") from None


def _where(index: int, raw: Any) -> str:
    label = None
    if isinstance(raw, dict):
        label = raw.get("name") if isinstance(raw.get("name"), str) else None
        if label is None and isinstance(raw.get("endpoint"), str):
            label = raw["endpoint"]
    return f"entry {index}" + (f" ({label})" if label else "")


def _parse_entry(index: int, raw: Any) -> WorkerEntry:
    where = _where(index, raw)
    if not isinstance(raw, dict):
        raise WorkersFileError(f"{where}: must be an object, not {type(raw).__name__}")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise WorkersFileError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    worker_id = raw.get("worker_id")
    if not isinstance(worker_id, str) or not is_public_key(worker_id):
        raise WorkersFileError(
            f"{where}: worker_id must be the standard base64 of a 32-byte Ed25519 public "
            "key, as `sandrun keygen` prints it")
    endpoint = raw.get("endpoint")
    if not isinstance(endpoint, str):
        raise WorkersFileError(f"{where}: endpoint is required, e.g. \"http://host:8443\"")
    normalised = normalise_endpoint(endpoint)
    if normalised is None:
        raise WorkersFileError(
            f"{where}: endpoint {endpoint!r} must be http:// or https://, a host and an "
            "optional port, and nothing after it")
    limit = raw.get("max_concurrent_jobs")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or not 1 <= limit <= 100_000):
        raise WorkersFileError(f"{where}: max_concurrent_jobs must be an integer from 1")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > 100):
        raise WorkersFileError(f"{where}: name must be a string of 1 to 100 characters")
    if "comment" in raw and not isinstance(raw["comment"], str):
        raise WorkersFileError(f"{where}: comment must be a string")
    return WorkerEntry(worker_id=worker_id, endpoint=normalised, max_concurrent_jobs=limit,
                       name=name)


def is_public_key(text: str) -> bool:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return False
    return len(raw) == 32


def normalise_endpoint(text: str) -> str | None:
    try:
        url = urlsplit(text.strip())
        port = url.port
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.hostname:
        return None
    if url.username or url.password or url.query or url.fragment or url.path not in ("", "/"):
        return None
    host = url.hostname
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    if port is None:
        port = 443 if url.scheme == "https" else 80
    return f"{url.scheme}://{host}:{port}"
