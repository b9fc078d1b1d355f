"""Worker identity: an Ed25519 key, signed results and the health challenge.

A worker proves who it is with an Ed25519 key pair.  Its ``worker_id`` is the
standard base64 of the raw 32-byte public key, so the id is also the key that
verifies it.  On disk the private key is PKCS#8 PEM (``-----BEGIN PRIVATE
KEY-----``), the same file ``openssl genpkey -algorithm ed25519`` writes, and
it must be readable by its owner only.

Two things are signed, always as the UTF-8 bytes of canonical JSON (see
``sandrun.wire.canonical_json``):

- a finished job's result (``RESULT_FIELDS``), shown in ``/status`` under
  ``worker_metadata`` as ``signed`` and ``signature``.  ``verify_result``
  checks both the signature and that the signed text matches what the rest
  of the status document shows, so a result can be checked from ``/status``
  alone;
- the answer to ``/health?nonce=N`` (``health_response``), so a coordinator
  can tell the real worker from an impostor at the same address.

A leaf module: it imports only the standard library, PyNaCl, cryptography and
``sandrun.wire``; PyNaCl and cryptography only where used: PyNaCl where a key
signs or a signature is checked, cryptography where a key is written or a key
file is not in the usual form (8 MB of a worker's memory, PyNaCl 1 MB: a worker
without a key loads neither, one with a key from ``sandrun keygen`` or ``openssl
genpkey`` only PyNaCl).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sandrun.wire import canonical_json

if TYPE_CHECKING:
    from nacl.signing import SigningKey

__all__ = [
    "CONSENSUS_FIELDS",
    "DEFAULT_KEY_PATH",
    "RESULT_FIELDS",
    "IdentityError",
    "WorkerIdentity",
    "health_response",
    "job_hash",
    "keygen_main",
    "show_key_main",
    "sign_result",
    "status_result",
    "verify_health",
    "verify_main",
    "verify_result",
    "verify_signature",
    "consensus_problem",
    "write_private_key",
]

DEFAULT_KEY_PATH = "./sandrun-worker.pem"

# The fields a signed result covers, in no particular order (canonical JSON
# sorts them).  ``outputs`` maps each output path to its sha256 hex;
# ``stdout_sha256`` and ``stderr_sha256`` are the sha256 hex of the bytes the
# worker kept of each stream (what /logs returns, after any output limit).
RESULT_FIELDS: tuple[str, ...] = (
    "job_id",
    "job_hash",
    "worker_id",
    "status",
    "reason",
    "exit_code",
    "cpu_seconds",
    "memory_peak_bytes",
    "wall_time_ms",
    "finished_at",
    "outputs",
    "stdout_sha256",
    "stderr_sha256",
)

# The signed fields that replicas of one job must agree on (a coordinator's
# ``consensus``): the inputs, how it ended, its output streams and files.
# Timings and resource use differ between any two runs and are not compared.
CONSENSUS_FIELDS: tuple[str, ...] = (
    "job_hash", "status", "reason", "exit_code", "stdout_sha256", "stderr_sha256", "outputs")

# Fields of a result that /status shows inside ``execution_metadata``.
_METADATA_FIELDS = ("reason", "exit_code", "cpu_seconds", "memory_peak_bytes", "wall_time_ms",
                    "stdout_sha256", "stderr_sha256")

# A PEM Ed25519 key is about 120 bytes; anything far larger is not a key.
_MAX_KEY_FILE_BYTES = 64 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class IdentityError(Exception):
    """A key could not be loaded, written or used; the message says why."""


class WorkerIdentity:
    """A worker's Ed25519 signing key and the id derived from it."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        self.worker_id: str = _b64(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> WorkerIdentity:
        """A fresh key from the operating system's random source."""
        from nacl.signing import SigningKey

        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> WorkerIdentity:
        """The key whose 32-byte Ed25519 seed (RFC 8032 private key) is ``seed``."""
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise IdentityError("an Ed25519 seed is exactly 32 bytes")
        from nacl.signing import SigningKey

        return cls(SigningKey(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WorkerIdentity:
        """Read an unencrypted PKCS#8 PEM Ed25519 private key.

        Refuses a file that group or others may read or write: a key anyone
        else can read no longer identifies this worker.  The mode is checked
        on the opened file, so it cannot be swapped between check and read.
        """
        where = os.fspath(path)
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the worker.
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise IdentityError(f"key file {where!r} does not exist") from None
        except OSError as e:
            raise IdentityError(f"cannot open key file {where!r}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IdentityError(f"key file {where!r} is not a regular file")
            if info.st_mode & 0o077:
                raise IdentityError(
                    f"key file {where!r} has mode {stat.S_IMODE(info.st_mode):04o}; "
                    f"group and others must have no access (chmod 600)"
                )
            data = _read_at_most(fd, _MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise IdentityError(f"cannot read key file {where!r}: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise IdentityError(f"key file {where!r} is too large to be a key")
        return cls.from_seed(_ed25519_seed_from_pem(data, where))

    def sign(self, data: bytes) -> str:
        """The Ed25519 signature of ``data``, standard base64 (88 characters)."""
        return _b64(self._key.sign(data).signature)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, as openssl writes it."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        private = Ed25519PrivateKey.from_private_bytes(bytes(self._key))
        return private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        # Never show the seed: reprs end up in logs and tracebacks.
        return f"WorkerIdentity(worker_id={self.worker_id!r})"


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# RFC 8410: an Ed25519 PKCS#8 v1 PrivateKeyInfo (no attributes, no public key) is these
# 16 bytes of DER and then the 32-byte seed; the form openssl genpkey and to_pem write.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def _plain_ed25519_seed(data: bytes) -> bytes | None:
    """The seed of a key file in exactly that form, read without cryptography; else None.

    cryptography costs a worker 8 MB of memory for as long as it runs; this is the
    file every worker in a pool loads at start.  Anything else (text around the
    PEM, a key with its public half or attributes, another algorithm, encryption,
    damage) is None, and cryptography reads it and says what is wrong.
    """
    lines = data.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _PEM_BEGIN or lines[-1].strip() != _PEM_END:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_PKCS8_PREFIX) + 32 or not der.startswith(_ED25519_PKCS8_PREFIX):
        return None
    return der[len(_ED25519_PKCS8_PREFIX):]


def _ed25519_seed_from_pem(data: bytes, where: str) -> bytes:
    seed = _plain_ed25519_seed(data)
    if seed is not None:
        return seed
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(f"key file {where!r} is encrypted; use an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(f"key file {where!r} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"key file {where!r} holds a {type(key).__name__}; a worker key must be Ed25519"
        )
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def write_private_key(
    identity: WorkerIdentity, path: str | os.PathLike[str], force: bool = False
) -> None:
    """Write ``identity`` as PKCS#8 PEM to ``path`` with mode 0600.

    Without ``force`` an existing file (or symlink) is never touched.  With
    ``force`` the key is written to a 0600 temporary file in the same
    directory and renamed over ``path``, so readers see the old key or the
    new one, and the file is never, even briefly, readable by others.
    """
    pem = identity.to_pem()
    target = os.fspath(path)
    if force:
        _replace_private_key(pem, target)
        return
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise IdentityError(f"{target!r} already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise IdentityError(f"cannot create {target!r}: {e.strerror}") from None
    try:
        # The umask may have taken bits off; set exactly 0600.
        os.fchmod(fd, 0o600)
        _write_all(fd, pem)
    except OSError as e:
        os.close(fd)
        os.unlink(target)
        raise IdentityError(f"cannot write {target!r}: {e.strerror}") from None
    os.close(fd)


def _replace_private_key(pem: bytes, target: str) -> None:
    directory = os.path.dirname(target) or "."
    try:
        # mkstemp creates the file with O_EXCL and mode 0600.
        fd, temporary = tempfile.mkstemp(prefix=".sandrun-key-", dir=directory)
    except OSError as e:
        raise IdentityError(f"cannot create a key file in {directory!r}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, pem)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except OSError as e:
        os.unlink(temporary)
        raise IdentityError(f"cannot write {target!r}: {e.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def verify_signature(worker_id: str, data: bytes, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is the Ed25519 signature of ``data`` by ``worker_id``.

    Any malformed input (bad base64, wrong lengths, wrong types) is simply
    False: callers check untrusted documents and need no exception handling.
    """
    public = _unb64(worker_id, 32)
    signature = _unb64(signature_b64, 64)
    if public is None or signature is None or not isinstance(data, bytes):
        return False
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        VerifyKey(public).verify(data, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def job_hash(manifest: Mapping[str, Any], files: Iterable[tuple[str, str]]) -> str:
    """The SHA-256 of a job's inputs, as /status shows it in ``job_hash``.

    ``files`` are (path relative to the job directory, sha256 hex of the
    file's content).  The hash is, exactly::

        sha256_hex(utf8(canonical_json(
            {"manifest": manifest, "files": [[path, sha256], ...]})))

    with ``files`` sorted by path (Unicode code point order, which is also
    UTF-8 byte order) and ``canonical_json`` from ``sandrun.wire`` (sorted
    keys, no spaces, non-ASCII kept as is).  This definition is part of the
    wire contract: anyone holding the inputs can recompute it.

    Raises ``ValueError`` for a repeated path or a hash that is not 64
    lowercase hex digits, either of which would make the hash ambiguous.
    """
    listed: list[list[str]] = []
    seen: set[str] = set()
    for path, digest in sorted(files, key=lambda entry: entry[0]):
        if path in seen:
            raise ValueError(f"input file {path!r} is listed twice")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ValueError(f"input file {path!r}: sha256 must be 64 lowercase hex digits")
        seen.add(path)
        listed.append([path, digest])
    text = canonical_json({"manifest": manifest, "files": listed})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sign_result(
    identity: WorkerIdentity | None, result: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """Sign a finished job's result: ``(signed, signature)``, or ``(None, None)``.

    ``result`` must hold exactly ``RESULT_FIELDS`` and name this worker in
    ``worker_id``.  ``signed`` is the canonical JSON text; it goes into
    /status as ``worker_metadata.signed`` unchanged.  A worker with no key
    gets ``(None, None)``.
    """
    if identity is None:
        return None, None
    keys = set(result)
    if keys != set(RESULT_FIELDS):
        missing = sorted(set(RESULT_FIELDS) - keys)
        extra = sorted(keys - set(RESULT_FIELDS))
        raise IdentityError(f"a result to sign lacks {missing} and has extra {extra}")
    if result["worker_id"] != identity.worker_id:
        raise IdentityError("a result to sign must name this worker's worker_id")
    signed = canonical_json(dict(result))
    return signed, identity.sign(signed.encode("utf-8"))


def status_result(status: Mapping[str, Any]) -> dict[str, Any]:
    """The result a /status document shows, in the shape ``sign_result`` signs.

    A field the document leaves out counts as null, as /status shows a field
    that is not set.  Raises ``IdentityError`` when the document does not
    have /status's shape (for example ``output_files`` that is not an
    object of objects with a string ``sha256``).
    """
    if not isinstance(status, Mapping):
        raise IdentityError("a status document is a JSON object")
    metadata = _object_or_empty(status.get("execution_metadata"), "execution_metadata")
    worker = _object_or_empty(status.get("worker_metadata"), "worker_metadata")
    files = _object_or_empty(status.get("output_files"), "output_files")
    outputs: dict[str, str] = {}
    for path, info in files.items():
        if not isinstance(info, Mapping) or not isinstance(info.get("sha256"), str):
            raise IdentityError(f"output_files[{path!r}] has no string sha256")
        outputs[path] = info["sha256"]
    result: dict[str, Any] = {
        "job_id": _signed_job_id(status.get("job_id"), worker.get("job_id")),
        "job_hash": status.get("job_hash"),
        "worker_id": worker.get("worker_id"),
        "status": status.get("status"),
        "finished_at": status.get("finished_at"),
        "outputs": outputs,
    }
    for name in _METADATA_FIELDS:
        result[name] = metadata.get(name)
    return result


def _signed_job_id(shown: Any, at_worker: Any) -> Any:
    """The job id the worker signed.

    A coordinator shows ``<worker tag>.<time>.<worker job id>`` and keeps the
    worker's own id in ``worker_metadata.job_id``; the signature covers the
    worker's id, and the id shown must end with it, so neither can be swapped.
    """
    if isinstance(at_worker, str) and isinstance(shown, str) and at_worker \
            and shown != at_worker:
        if not shown.endswith("." + at_worker):
            raise IdentityError("job_id does not name the worker's job")
        return at_worker
    return shown


def _object_or_empty(value: Any, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise IdentityError(f"{name} is not an object")
    return value


def verify_result(status: Mapping[str, Any], worker_id: str) -> bool:
    """Whether a /status document carries a valid result signed by ``worker_id``.

    True only when ``worker_metadata.signature`` verifies
    ``worker_metadata.signed`` under ``worker_id``, the signed result names
    ``worker_id``, and the signed text is exactly the canonical JSON of what
    the rest of the document shows (``status_result``): changing any signed
    field, an output's hash, or the set of outputs makes it False.  Never
    raises on malformed input.
    """
    return _result_problem(status, worker_id) is None


def _result_problem(status: Any, worker_id: str) -> str | None:
    """Why ``status`` does not verify under ``worker_id``, or None when it does."""
    if not isinstance(status, Mapping):
        return "the status document is not a JSON object"
    if _unb64(worker_id, 32) is None:
        return "the worker id is not the base64 of a 32-byte Ed25519 public key"
    worker = status.get("worker_metadata")
    if not isinstance(worker, Mapping):
        return "the status document has no worker_metadata"
    signed, signature = worker.get("signed"), worker.get("signature")
    if not isinstance(signed, str) or not isinstance(signature, str):
        return "the result is not signed"
    try:
        signed_bytes = signed.encode("utf-8")
    except UnicodeEncodeError:
        return "the signed text is not valid UTF-8"
    if not verify_signature(worker_id, signed_bytes, signature):
        return "the signature does not verify under this worker id"
    try:
        claimed = json.loads(signed)
    except ValueError:
        return "the signed text is not JSON"
    if not isinstance(claimed, dict) or claimed.get("worker_id") != worker_id:
        return "the signed result names another worker"
    try:
        shown = status_result(status)
        if canonical_json(shown) == signed:
            return None
        differing = sorted(
            name
            for name in set(shown) | set(claimed)
            if canonical_json(shown.get(name)) != canonical_json(claimed.get(name))
        )
    except IdentityError as e:
        return f"the status document is malformed: {e}"
    except (TypeError, ValueError, RecursionError):
        # Only a document built in Python, not one parsed from JSON, gets here.
        return "the status document is not JSON-serialisable"
    if differing:
        return f"the status document differs from the signed result in {', '.join(differing)}"
    return "the signed text is not the canonical form of the result"


def health_response(
    identity: WorkerIdentity, nonce: str, load: Mapping[str, Any], now: float
) -> dict[str, str]:
    """The signed part of ``/health?nonce=N``: ``{"signed", "signature"}``.

    ``signed`` is canonical JSON of ``{"nonce", "worker_id", "load", "time"}``
    with ``time`` the worker's clock (seconds since the epoch).  Echoing the
    caller's fresh nonce is what stops an impostor replaying an old answer.
    """
    signed = canonical_json(
        {"nonce": nonce, "worker_id": identity.worker_id, "load": dict(load), "time": now}
    )
    return {"signed": signed, "signature": identity.sign(signed.encode("utf-8"))}


def verify_health(
    response: Mapping[str, Any],
    worker_id: str,
    nonce: str,
    now: float,
    max_skew: float = 60,
) -> bool:
    """Whether a health answer comes from ``worker_id`` and answers ``nonce``.

    Also requires the signed time to be within ``max_skew`` seconds of
    ``now``, either way.  Never raises on malformed input.
    """
    if not isinstance(response, Mapping):
        return False
    signed, signature = response.get("signed"), response.get("signature")
    if not isinstance(signed, str) or not isinstance(signature, str):
        return False
    try:
        signed_bytes = signed.encode("utf-8")
        claimed = json.loads(signed)
    except (UnicodeEncodeError, ValueError):
        return False
    if not verify_signature(worker_id, signed_bytes, signature):
        return False
    if not isinstance(claimed, dict):
        return False
    if claimed.get("nonce") != nonce or claimed.get("worker_id") != worker_id:
        return False
    at = claimed.get("time")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return False
    return abs(now - at) <= max_skew


def keygen_main(out: str | None, force: bool) -> int:
    """``sandrun keygen``: write a new key (0600) and print its worker id.

    ``out`` defaults to ``./sandrun-worker.pem``.  Errors go to stderr and
    exit 1; an existing file is kept unless ``force``.
    """
    path = out if out is not None else DEFAULT_KEY_PATH
    identity = WorkerIdentity.generate()
    try:
        write_private_key(identity, path, force=force)
    except IdentityError as e:
        print(f"sandrun keygen: {e}", file=sys.stderr)
        return 1
    print(identity.worker_id)
    return 0


def show_key_main(path: str) -> int:
    """``sandrun keygen --show FILE``: print the worker id of an existing key (exit 0),
    or why it cannot be read (stderr, exit 1)."""
    try:
        identity = WorkerIdentity.load(path)
    except IdentityError as e:
        print(f"sandrun keygen: {e}", file=sys.stderr)
        return 1
    print(identity.worker_id)
    return 0


# ``sandrun verify``'s exit statuses: the same as ``sandrun status --worker-id``'s
# (``sandrun.client.cli``: 66 cannot read the input, 76 the signature does not verify).
EXIT_NOINPUT = 66
EXIT_NOT_VERIFIED = 76


def consensus_problem(status: Any, worker_id: str | None = None) -> str | None:
    """Why a coordinator's answer for a replicated job does not hold, or None when it does.

    It holds when ``consensus.results`` lists at least two replicas, each
    result's ``signed`` text verifies under the ``worker_id`` it names and
    names that worker and its job, all of them sign the same
    ``CONSENSUS_FIELDS``, the coordinator says ``agreed``, and the document
    shows that result.  With ``worker_id``, that worker must be one of the
    replicas.  Which workers' keys to trust is the caller's business: the
    answer names them in ``consensus.results[].worker_id``.
    """
    if not isinstance(status, Mapping) or not isinstance(status.get("consensus"), Mapping):
        return "the document has no consensus block"
    consensus = status["consensus"]
    results = consensus.get("results")
    if not isinstance(results, list) or len(results) < 2:
        return "the consensus lists fewer than two replicas"
    signed_results: list[dict[str, Any]] = []
    for index, entry in enumerate(results):
        where = f"replica {index + 1}"
        if not isinstance(entry, Mapping):
            return f"{where} is not an object"
        replica_id, signed, signature = (entry.get("worker_id"), entry.get("signed"),
                                         entry.get("signature"))
        if not isinstance(replica_id, str) or not isinstance(signed, str) \
                or not isinstance(signature, str):
            return f"{where} is not signed"
        if not verify_signature(replica_id, signed.encode("utf-8"), signature):
            return f"{where}'s signature does not verify under its worker id"
        try:
            claimed = json.loads(signed)
        except ValueError:
            return f"{where}'s signed text is not JSON"
        if not isinstance(claimed, dict) or claimed.get("worker_id") != replica_id:
            return f"{where}'s signed result names another worker"
        if claimed.get("job_id") != entry.get("job_id"):
            return f"{where}'s signed result is for another job"
        signed_results.append(claimed)
    ids = [r["worker_id"] for r in signed_results]
    if len(set(ids)) != len(ids):
        return "a worker appears twice among the replicas"
    if worker_id is not None and worker_id not in ids:
        return "the given worker is not one of the replicas"
    for name in CONSENSUS_FIELDS:
        if len({canonical_json(r.get(name)) for r in signed_results}) > 1:
            return f"the replicas' signed results differ in {name}"
    if consensus.get("agreed") is not True:
        return "the coordinator does not report agreement"
    worker = status.get("worker_metadata")
    own_id = worker.get("job_id") if isinstance(worker, Mapping) else None
    try:
        shown = status_result({**status, "job_id": own_id})
    except IdentityError as e:
        return f"the status document is malformed: {e}"
    for name in CONSENSUS_FIELDS:
        if canonical_json(shown.get(name)) != canonical_json(signed_results[0].get(name)):
            return f"the status document differs from the replicas' result in {name}"
    return None


def verify_main(status_path: str, worker_id: str | None) -> int:
    """``sandrun verify``: check a saved /status document against a worker id.

    Reads ``status_path``, or stdin when it is ``-``.  Prints ``valid`` (exit
    0) or ``INVALID: <why>`` (exit 76) on stdout; a file that cannot be read
    is an error on stderr, exit 66.  A coordinator's answer for a replicated
    job (one with ``consensus``) is checked by ``consensus_problem``, every
    replica under its own key, and ``worker_id`` is then optional; any other
    document needs ``worker_id`` (exit 2, a bad command line, without it).
    """
    try:
        if status_path == "-":
            text = sys.stdin.read()
        else:
            with open(status_path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"sandrun verify: cannot read {status_path!r}: {e}", file=sys.stderr)
        return EXIT_NOINPUT
    try:
        status = json.loads(text)
    except ValueError:
        print("INVALID: the status document is not JSON")
        return EXIT_NOT_VERIFIED
    if isinstance(status, dict) and "consensus" in status:
        problem = consensus_problem(status, worker_id)
        if problem is not None:
            print(f"INVALID: {problem}")
            return EXIT_NOT_VERIFIED
        ids = [r["worker_id"] for r in status["consensus"]["results"]]
        print(f"valid: {len(ids)} replicas agree, signed by " + ", ".join(ids))
        return 0
    if worker_id is None:
        print("sandrun verify: --worker-id is needed for a result that is not a consensus",
              file=sys.stderr)
        return 2
    problem = _result_problem(status, worker_id)
    if problem is not None:
        print(f"INVALID: {problem}")
        return EXIT_NOT_VERIFIED
    print("valid")
    return 0


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any, length: int) -> bytes | None:
    """Strict standard base64 of exactly ``length`` bytes, else None."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None
