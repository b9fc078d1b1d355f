"""Worker identity: keys on disk, openssl interoperability, signed results, health."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandrun.identity import (
    RESULT_FIELDS,
    IdentityError,
    WorkerIdentity,
    health_response,
    job_hash,
    keygen_main,
    show_key_main,
    sign_result,
    status_result,
    verify_health,
    verify_main,
    verify_result,
    verify_signature,
    write_private_key,
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

# Known answers for the seed bytes(range(32)), computed once and checked
# against `openssl pkeyutl -sign -rawin` (Ed25519 is deterministic).
KAT_SEED = bytes(range(32))
KAT_WORKER_ID = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
KAT_SIGNATURE = (
    "YSGsjrtyuotOBIMlmGtFecTIbpNMsVV90iVGhiSEjHxwyb2yLb9gymk7Rc2M+lVJP7eyvsz+r5cCvVfjtho6Aw=="
)
# DER SubjectPublicKeyInfo of an Ed25519 key is this prefix and the raw 32 bytes.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def openssl(*args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], input=input, capture_output=True, check=True)
    return done.stdout


def openssl_public_key(pem_path: Path) -> bytes:
    der = openssl("pkey", "-in", str(pem_path), "-pubout", "-outform", "DER")
    assert der[:12] == ED25519_SPKI_PREFIX
    assert len(der) == 44
    return der[-32:]


def private_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture
def identity() -> WorkerIdentity:
    return WorkerIdentity.from_seed(KAT_SEED)


@pytest.fixture
def other() -> WorkerIdentity:
    return WorkerIdentity.from_seed(bytes(range(1, 33)))


def signed_status(identity: WorkerIdentity) -> dict[str, Any]:
    """A /status document as the worker serves it, after a JSON round trip."""
    result = {
        "job_id": "job-3k1V2lq9x8W0aBcD",
        "job_hash": "d" * 64,
        "worker_id": identity.worker_id,
        "status": "failed",
        "reason": "exit_nonzero",
        "exit_code": 3,
        "cpu_seconds": 0.25,
        "memory_peak_bytes": 10_485_760,
        "wall_time_ms": 412,
        "finished_at": "2025-01-02T03:04:05Z",
        "outputs": {"out/result.csv": SHA_A, "plot.png": SHA_B},
        "stdout_sha256": SHA_A,
        "stderr_sha256": SHA_B,
    }
    signed, signature = sign_result(identity, result)
    status = {
        "job_id": result["job_id"],
        "status": result["status"],
        "queue_position": None,
        "submitted_at": "2025-01-02T03:04:00Z",
        "started_at": "2025-01-02T03:04:04Z",
        "finished_at": result["finished_at"],
        "execution_metadata": {
            "cpu_seconds": result["cpu_seconds"],
            "memory_peak_bytes": result["memory_peak_bytes"],
            "wall_time_ms": result["wall_time_ms"],
            "exit_code": result["exit_code"],
            "signal": None,
            "reason": result["reason"],
            "environment": "default",
            "interpreter": "python3",
            "stdout_sha256": result["stdout_sha256"],
            "stderr_sha256": result["stderr_sha256"],
        },
        "job_hash": result["job_hash"],
        "output_files": {
            "out/result.csv": {"size_bytes": 120, "sha256": SHA_A, "type": "text/csv"},
            "plot.png": {"size_bytes": 5000, "sha256": SHA_B, "type": "image/png"},
        },
        "worker_metadata": {
            "worker_id": identity.worker_id,
            "signature": signature,
            "signed": signed,
        },
    }
    loaded: dict[str, Any] = json.loads(json.dumps(status))
    return loaded


# Keys on disk and openssl


@needs_openssl
def test_a_key_we_write_is_read_by_openssl_with_the_same_public_key(tmp_path: Path) -> None:
    identity = WorkerIdentity.generate()
    path = tmp_path / "worker.pem"
    write_private_key(identity, path)

    text = openssl("pkey", "-in", str(path), "-noout", "-text").decode()
    assert "ED25519 Private-Key" in text
    assert openssl_public_key(path) == base64.b64decode(identity.worker_id)


def test_a_key_we_write_is_pkcs8_pem() -> None:
    pem = WorkerIdentity.generate().to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pem.rstrip().endswith(b"-----END PRIVATE KEY-----")


@needs_openssl
def test_a_key_from_openssl_genpkey_loads_with_openssls_public_key(tmp_path: Path) -> None:
    path = tmp_path / "worker.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(path))
    path.chmod(0o600)

    identity = WorkerIdentity.load(path)

    assert base64.b64decode(identity.worker_id) == openssl_public_key(path)


def _seed_by_cryptography(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(serialization.Encoding.Raw,  # type: ignore[union-attr]
                             serialization.PrivateFormat.Raw, serialization.NoEncryption())


@needs_openssl
def test_the_usual_key_file_is_read_without_cryptography_to_the_seed_cryptography_reads(
        tmp_path: Path) -> None:
    from sandrun.identity import _plain_ed25519_seed

    pems = [WorkerIdentity.generate().to_pem() for _ in range(20)]
    for i in range(5):
        path = tmp_path / f"openssl-{i}.pem"
        openssl("genpkey", "-algorithm", "ed25519", "-out", str(path))
        pems.append(path.read_bytes())
    for pem in pems:
        assert _plain_ed25519_seed(pem) == _seed_by_cryptography(pem)
        assert _plain_ed25519_seed(pem.replace(b"\n", b"\r\n")) == _seed_by_cryptography(pem)


def test_any_other_key_file_is_left_to_cryptography() -> None:
    from sandrun.identity import _plain_ed25519_seed

    pem = WorkerIdentity.generate().to_pem()
    body = b"".join(pem.splitlines()[1:-1])
    der = base64.b64decode(body)
    wrapped = b"-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n"
    for other in (
        b"a comment first\n" + pem,  # text around the PEM
        pem.replace(b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"),
        wrapped % base64.b64encode(der[:-1]),  # a byte short
        wrapped % base64.b64encode(der + b"\0"),  # a byte more
        wrapped % base64.b64encode(b"\x31" + der[1:]),  # not the Ed25519 structure
        wrapped % base64.b64encode(der)[:-4] + b"!!!!",  # not base64
        b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
        b"",
    ):
        assert _plain_ed25519_seed(other) is None, other


def test_a_written_key_loads_back_as_the_same_identity(tmp_path: Path) -> None:
    identity = WorkerIdentity.generate()
    write_private_key(identity, tmp_path / "k.pem")
    assert WorkerIdentity.load(tmp_path / "k.pem").worker_id == identity.worker_id


def test_the_seed_0_to_31_has_a_fixed_worker_id_and_signature(
    identity: WorkerIdentity,
) -> None:
    assert identity.worker_id == KAT_WORKER_ID
    assert identity.sign(b"sandrun") == KAT_SIGNATURE


@needs_openssl
def test_openssl_signs_sandrun_with_the_seed_0_to_31_exactly_as_we_do(
    identity: WorkerIdentity, tmp_path: Path
) -> None:
    key = tmp_path / "k.pem"
    write_private_key(identity, key)
    data = tmp_path / "data"
    data.write_bytes(b"sandrun")

    signature = openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(data))

    assert base64.b64encode(signature).decode() == KAT_SIGNATURE
    assert openssl_public_key(key) == base64.b64decode(KAT_WORKER_ID)


def test_the_repr_of_an_identity_shows_the_worker_id_and_not_the_seed(
    identity: WorkerIdentity,
) -> None:
    assert KAT_WORKER_ID in repr(identity)
    assert KAT_SEED.hex() not in repr(identity)
    assert base64.b64encode(KAT_SEED).decode() not in repr(identity)


def test_a_seed_that_is_not_32_bytes_is_refused() -> None:
    with pytest.raises(IdentityError, match="32 bytes"):
        WorkerIdentity.from_seed(bytes(31))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o700 | 0o010])
def test_load_refuses_a_key_that_group_or_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    write_private_key(WorkerIdentity.generate(), path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        WorkerIdentity.load(path)


def test_load_accepts_a_key_only_its_owner_can_read(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    write_private_key(WorkerIdentity.generate(), path)
    path.chmod(0o400)
    assert WorkerIdentity.load(path).worker_id


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        WorkerIdentity.load(tmp_path / "absent.pem")


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file"):
        WorkerIdentity.load(tmp_path / "dir")


def test_load_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "k.pem", 0o600)
    with pytest.raises(IdentityError, match="not a regular file"):
        WorkerIdentity.load(tmp_path / "k.pem")


@needs_openssl
@pytest.mark.parametrize(
    "genpkey_args",
    [["-algorithm", "rsa"], ["-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]],
    ids=["rsa", "ec"],
)
def test_load_refuses_a_key_that_is_not_ed25519(tmp_path: Path, genpkey_args: list[str]) -> None:
    path = tmp_path / "k.pem"
    openssl("genpkey", *genpkey_args, "-out", str(path))
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="must be Ed25519"):
        WorkerIdentity.load(path)


@needs_openssl
def test_load_refuses_an_encrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    openssl(
        "genpkey", "-algorithm", "ed25519", "-aes256", "-pass", "pass:secret", "-out", str(path)
    )
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="encrypted"):
        WorkerIdentity.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key at all\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "text", "broken-pem"],
)
def test_load_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    path = private_file(tmp_path / "k.pem", content)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        WorkerIdentity.load(path)


def test_load_refuses_a_huge_file(tmp_path: Path) -> None:
    path = private_file(tmp_path / "k.pem", b"x" * 100_000)
    with pytest.raises(IdentityError, match="too large"):
        WorkerIdentity.load(path)


def test_a_written_key_has_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private_key(WorkerIdentity.generate(), tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_writing_over_an_existing_file_without_force_is_refused_and_keeps_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "k.pem"
    first = WorkerIdentity.generate()
    write_private_key(first, path)
    before = path.read_bytes()

    with pytest.raises(IdentityError, match="already exists"):
        write_private_key(WorkerIdentity.generate(), path)

    assert path.read_bytes() == before
    assert WorkerIdentity.load(path).worker_id == first.worker_id


def test_writing_over_a_symlink_without_force_is_refused_and_leaves_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    (tmp_path / "k.pem").symlink_to(target)
    with pytest.raises(IdentityError, match="already exists"):
        write_private_key(WorkerIdentity.generate(), tmp_path / "k.pem")
    assert target.read_bytes() == b"keep me"


def test_force_replaces_an_existing_key_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    new = WorkerIdentity.generate()

    write_private_key(new, path, force=True)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WorkerIdentity.load(path).worker_id == new.worker_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_writing_into_a_missing_directory_is_an_identity_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot create"):
        write_private_key(WorkerIdentity.generate(), tmp_path / "no" / "k.pem")
    with pytest.raises(IdentityError, match="cannot create"):
        write_private_key(WorkerIdentity.generate(), tmp_path / "no" / "k.pem", force=True)


# Signatures


def test_a_signature_verifies_under_its_worker_id_only(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    signature = identity.sign(b"data")
    assert verify_signature(identity.worker_id, b"data", signature)
    assert not verify_signature(identity.worker_id, b"datA", signature)
    assert not verify_signature(other.worker_id, b"data", signature)


@pytest.mark.parametrize(
    "worker_id, signature",
    [
        ("not base64!", KAT_SIGNATURE),
        (base64.b64encode(bytes(31)).decode(), KAT_SIGNATURE),
        (KAT_WORKER_ID, "not base64!"),
        (KAT_WORKER_ID, KAT_SIGNATURE[:-4]),
        (KAT_WORKER_ID, ""),
        (KAT_WORKER_ID, "é" * 88),
        (None, KAT_SIGNATURE),
        (KAT_WORKER_ID, None),
    ],
)
def test_a_malformed_key_or_signature_does_not_verify_and_does_not_raise(
    worker_id: Any, signature: Any
) -> None:
    assert verify_signature(KAT_WORKER_ID, b"sandrun", KAT_SIGNATURE)
    assert verify_signature(worker_id, b"sandrun", signature) is False


# job_hash


def test_job_hash_is_the_documented_known_answer() -> None:
    # Checked with: printf '{"files":[["data/x.csv","bb…"],["main.py","aa…"]],'
    # '"manifest":{"entrypoint":"main.py"}}' | sha256sum
    digest = job_hash({"entrypoint": "main.py"}, [("main.py", SHA_A), ("data/x.csv", SHA_B)])
    assert digest == "84e940568c841eed0466e05003af9a48593eee90c403c0772bfcc665542743f0"


def test_job_hash_does_not_depend_on_the_order_files_are_given() -> None:
    files = [("b.py", SHA_A), ("a.py", SHA_B), ("c/d.py", SHA_C)]
    assert job_hash({}, files) == job_hash({}, list(reversed(files)))


def test_job_hash_changes_with_any_input() -> None:
    base = job_hash({"entrypoint": "a.py"}, [("a.py", SHA_A)])
    variants = {
        job_hash({"entrypoint": "b.py"}, [("a.py", SHA_A)]),
        job_hash({"entrypoint": "a.py"}, [("a.py", SHA_B)]),
        job_hash({"entrypoint": "a.py"}, [("b.py", SHA_A)]),
        job_hash({"entrypoint": "a.py"}, [("a.py", SHA_A), ("b.py", SHA_A)]),
    }
    assert base not in variants
    assert len(variants) == 4


def test_job_hash_refuses_a_repeated_path_or_a_malformed_sha256() -> None:
    with pytest.raises(ValueError, match="twice"):
        job_hash({}, [("a.py", SHA_A), ("a.py", SHA_B)])
    with pytest.raises(ValueError, match="hex"):
        job_hash({}, [("a.py", SHA_A.upper())])


# Signed results


def test_result_fields_are_the_ones_the_contract_names() -> None:
    assert set(RESULT_FIELDS) == {
        "job_id", "job_hash", "worker_id", "status", "reason", "exit_code",
        "cpu_seconds", "memory_peak_bytes", "wall_time_ms", "finished_at", "outputs",
        "stdout_sha256", "stderr_sha256",
    }  # fmt: skip


def test_a_worker_without_a_key_signs_nothing() -> None:
    assert sign_result(None, {"anything": 1}) == (None, None)


def test_sign_result_signs_the_canonical_json_of_the_result(identity: WorkerIdentity) -> None:
    status = signed_status(identity)
    result = status_result(status)
    signed, signature = sign_result(identity, result)

    assert signed == status["worker_metadata"]["signed"]
    assert signed is not None and signature is not None
    assert json.loads(signed) == result
    assert " " not in signed
    assert verify_signature(identity.worker_id, signed.encode(), signature)


def test_sign_result_refuses_missing_or_extra_fields(identity: WorkerIdentity) -> None:
    result = status_result(signed_status(identity))
    with pytest.raises(IdentityError, match="lacks"):
        sign_result(identity, {k: v for k, v in result.items() if k != "exit_code"})
    with pytest.raises(IdentityError, match="extra"):
        sign_result(identity, {**result, "stdout": "secret"})


def test_sign_result_refuses_a_result_naming_another_worker(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    result = status_result(signed_status(identity))
    with pytest.raises(IdentityError, match="worker_id"):
        sign_result(other, result)


def test_status_result_reads_the_signed_fields_out_of_a_status_document(
    identity: WorkerIdentity,
) -> None:
    result = status_result(signed_status(identity))
    assert result["exit_code"] == 3
    assert result["reason"] == "exit_nonzero"
    assert result["worker_id"] == identity.worker_id
    assert result["outputs"] == {"out/result.csv": SHA_A, "plot.png": SHA_B}
    assert set(result) == set(RESULT_FIELDS)


def test_an_untouched_status_document_verifies(identity: WorkerIdentity) -> None:
    assert verify_result(signed_status(identity), identity.worker_id) is True


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for key in keys[:-1]:
            doc = doc[key]
        doc[keys[-1]] = value

    return mutate


def _delete(*keys: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for key in keys[:-1]:
            doc = doc[key]
        del doc[keys[-1]]

    return mutate


TAMPERINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "job_id": _set("job_id", value="job-someone-elses"),
    "status": _set("status", value="completed"),
    "reason": _set("execution_metadata", "reason", value="timeout"),
    "reason removed": _delete("execution_metadata", "reason"),
    "exit_code": _set("execution_metadata", "exit_code", value=0),
    "exit_code as boolean": _set("execution_metadata", "exit_code", value=True),
    "cpu_seconds": _set("execution_metadata", "cpu_seconds", value=0.5),
    "memory_peak_bytes": _set("execution_metadata", "memory_peak_bytes", value=1),
    "wall_time_ms": _set("execution_metadata", "wall_time_ms", value=413),
    "stdout_sha256": _set("execution_metadata", "stdout_sha256", value="0" * 64),
    "stderr_sha256": _set("execution_metadata", "stderr_sha256", value="0" * 64),
    "finished_at": _set("finished_at", value="2025-01-02T03:04:06Z"),
    "job_hash": _set("job_hash", value="e" * 64),
    "an output's sha256": _set("output_files", "plot.png", "sha256", value=SHA_C),
    "an output added": _set(
        "output_files", "extra.txt", value={"size_bytes": 1, "sha256": SHA_C, "type": "text/plain"}
    ),
    "an output removed": _delete("output_files", "plot.png"),
    "all outputs removed": _delete("output_files"),
    "the shown worker_id": _set(
        "worker_metadata", "worker_id", value=WorkerIdentity.from_seed(bytes(32)).worker_id
    ),
    "the signed text": lambda doc: doc["worker_metadata"].update(
        signed=doc["worker_metadata"]["signed"].replace('"exit_code":3', '"exit_code":0')
    ),
    "the signature": _set("worker_metadata", "signature", value=KAT_SIGNATURE),
    "the signature removed": _set("worker_metadata", "signature", value=None),
    "worker_metadata removed": _delete("worker_metadata"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_tampering_with_any_signed_part_of_a_status_document_makes_it_fail(
    identity: WorkerIdentity, tampering: Callable[[dict[str, Any]], None]
) -> None:
    original = signed_status(identity)
    tampered = copy.deepcopy(original)
    tampering(tampered)

    assert tampered != original
    assert verify_result(original, identity.worker_id) is True
    assert verify_result(tampered, identity.worker_id) is False


def test_fields_outside_the_signed_result_may_change(identity: WorkerIdentity) -> None:
    status = signed_status(identity)
    status["queue_position"] = 7
    status["execution_metadata"]["environment"] = "other"
    status["output_files"]["plot.png"]["size_bytes"] = 1
    assert verify_result(status, identity.worker_id) is True


def test_a_status_document_does_not_verify_under_another_worker_id(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    assert verify_result(signed_status(identity), other.worker_id) is False


def test_a_result_signed_by_another_key_in_our_name_does_not_verify(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    status = signed_status(identity)
    forged = other.sign(status["worker_metadata"]["signed"].encode())
    status["worker_metadata"]["signature"] = forged
    assert verify_result(status, identity.worker_id) is False


def test_a_result_another_worker_signed_for_itself_fails_even_under_its_own_id(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    # The other worker signs our result text verbatim: the signature is its
    # own, but the signed text names our worker id.
    status = signed_status(identity)
    status["worker_metadata"]["signature"] = other.sign(
        status["worker_metadata"]["signed"].encode()
    )
    status["worker_metadata"]["worker_id"] = other.worker_id
    assert verify_result(status, other.worker_id) is False


@pytest.mark.parametrize(
    "document",
    [
        {},
        [],
        None,
        "text",
        {"worker_metadata": {"signed": "not json", "signature": KAT_SIGNATURE}},
        {"worker_metadata": "x"},
        {"output_files": [], "worker_metadata": {"signed": "{}", "signature": "x"}},
    ],
)
def test_verify_result_never_raises_on_a_malformed_document(
    identity: WorkerIdentity, document: Any
) -> None:
    assert verify_result(document, identity.worker_id) is False


def test_a_validly_signed_document_with_malformed_output_files_fails(
    identity: WorkerIdentity,
) -> None:
    status = signed_status(identity)
    status["output_files"]["plot.png"] = "not an object"
    assert verify_result(status, identity.worker_id) is False


def test_a_validly_signed_document_holding_values_json_cannot_express_fails(
    identity: WorkerIdentity,
) -> None:
    status = signed_status(identity)
    status["job_hash"] = b"bytes"
    assert verify_result(status, identity.worker_id) is False


def test_verify_result_never_raises_on_a_malformed_worker_id(identity: WorkerIdentity) -> None:
    status = signed_status(identity)
    assert verify_result(status, "not base64!") is False
    assert verify_result(status, None) is False  # type: ignore[arg-type]


# Health challenge

LOAD = {"active_jobs": 1, "queued_jobs": 0, "capacity": 4}
NOW = 1_700_000_000.0


def test_a_health_answer_verifies_for_the_nonce_it_answers(identity: WorkerIdentity) -> None:
    response = health_response(identity, "n-1", LOAD, NOW)
    assert json.loads(response["signed"]) == {
        "nonce": "n-1",
        "worker_id": identity.worker_id,
        "load": LOAD,
        "time": NOW,
    }
    assert verify_health(response, identity.worker_id, "n-1", NOW + 1) is True


def test_a_health_answer_for_another_nonce_is_rejected(identity: WorkerIdentity) -> None:
    response = health_response(identity, "n-1", LOAD, NOW)
    assert verify_health(response, identity.worker_id, "n-2", NOW) is False


@pytest.mark.parametrize("offset", [61.0, -61.0])
def test_a_health_answer_outside_the_allowed_skew_is_rejected(
    identity: WorkerIdentity, offset: float
) -> None:
    response = health_response(identity, "n-1", LOAD, NOW)
    assert verify_health(response, identity.worker_id, "n-1", NOW + offset) is False
    assert verify_health(response, identity.worker_id, "n-1", NOW + offset * 59 / 61) is True


def test_a_health_answer_from_another_key_is_rejected(
    identity: WorkerIdentity, other: WorkerIdentity
) -> None:
    impostor = health_response(other, "n-1", LOAD, NOW)
    assert verify_health(impostor, identity.worker_id, "n-1", NOW) is False
    # Even when the impostor claims our worker id inside the signed text.
    claimed = json.loads(impostor["signed"]) | {"worker_id": identity.worker_id}
    text = json.dumps(claimed, sort_keys=True, separators=(",", ":"))
    forged = {"signed": text, "signature": other.sign(text.encode())}
    assert verify_health(forged, identity.worker_id, "n-1", NOW) is False


def test_a_health_answer_with_altered_load_is_rejected(identity: WorkerIdentity) -> None:
    response = health_response(identity, "n-1", LOAD, NOW)
    response["signed"] = response["signed"].replace('"active_jobs":1', '"active_jobs":0')
    assert verify_health(response, identity.worker_id, "n-1", NOW) is False


@pytest.mark.parametrize("response", [{}, None, {"signed": 1, "signature": 2}, {"signed": "{"}])
def test_verify_health_never_raises_on_a_malformed_answer(
    identity: WorkerIdentity, response: Any
) -> None:
    assert verify_health(response, identity.worker_id, "n-1", NOW) is False


# CLI helpers


def test_keygen_writes_a_0600_key_and_prints_its_worker_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.pem"
    assert keygen_main(str(path), force=False) == 0
    out = capsys.readouterr().out
    assert out == WorkerIdentity.load(path).worker_id + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_show_prints_the_worker_id_of_an_existing_key_and_refuses_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.pem"
    keygen_main(str(path), force=False)
    made = capsys.readouterr().out
    assert show_key_main(str(path)) == 0
    assert capsys.readouterr().out == made
    assert show_key_main(str(tmp_path / "absent.pem")) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and captured.out == ""


def test_keygen_writes_sandrun_worker_pem_in_the_current_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert keygen_main(None, force=False) == 0
    worker_id = capsys.readouterr().out.strip()
    assert WorkerIdentity.load(tmp_path / "sandrun-worker.pem").worker_id == worker_id


def test_keygen_refuses_to_overwrite_without_force_and_replaces_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.pem"
    keygen_main(str(path), force=False)
    first = capsys.readouterr().out.strip()

    assert keygen_main(str(path), force=False) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err
    assert captured.out == ""
    assert WorkerIdentity.load(path).worker_id == first

    assert keygen_main(str(path), force=True) == 0
    second = capsys.readouterr().out.strip()
    assert second != first
    assert WorkerIdentity.load(path).worker_id == second


def test_verify_accepts_a_valid_status_file(
    identity: WorkerIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps(signed_status(identity)))
    assert verify_main(str(path), identity.worker_id) == 0
    assert capsys.readouterr().out == "valid\n"


def test_verify_reads_the_status_from_stdin_for_a_dash(
    identity: WorkerIdentity, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(signed_status(identity))))
    assert verify_main("-", identity.worker_id) == 0
    assert capsys.readouterr().out == "valid\n"


def test_verify_names_the_tampered_field(
    identity: WorkerIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = signed_status(identity)
    status["execution_metadata"]["exit_code"] = 0
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status))
    assert verify_main(str(path), identity.worker_id) == 76
    out = capsys.readouterr().out
    assert out.startswith("INVALID: ")
    assert "exit_code" in out


def test_verify_rejects_another_workers_id(
    identity: WorkerIdentity,
    other: WorkerIdentity,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps(signed_status(identity)))
    assert verify_main(str(path), other.worker_id) == 76
    assert capsys.readouterr().out.startswith("INVALID: ")


def test_verify_rejects_a_file_that_is_not_json(
    identity: WorkerIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "status.json"
    path.write_text("<html>")
    assert verify_main(str(path), identity.worker_id) == 76
    assert capsys.readouterr().out == "INVALID: the status document is not JSON\n"


def test_verify_reports_a_missing_file_on_stderr(
    identity: WorkerIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify_main(str(tmp_path / "absent.json"), identity.worker_id) == 66
    captured = capsys.readouterr()
    assert "cannot read" in captured.err
    assert captured.out == ""


def test_a_status_relayed_by_a_coordinator_verifies_through_the_workers_own_job_id() -> None:
    identity = WorkerIdentity.from_seed(bytes(range(32)))
    result = {"job_id": "job-abc", "job_hash": "0" * 64, "worker_id": identity.worker_id,
              "status": "completed", "reason": "completed", "exit_code": 0,
              "cpu_seconds": 0.1, "memory_peak_bytes": 1, "wall_time_ms": 2.0,
              "finished_at": "2026-01-01T00:00:00.000Z", "outputs": {},
              "stdout_sha256": "1" * 64, "stderr_sha256": "2" * 64}
    signed, signature = sign_result(identity, result)
    status = {"job_id": "tag12345.1700000000.job-abc", "status": "completed",
              "finished_at": result["finished_at"], "job_hash": result["job_hash"],
              "execution_metadata": {k: result[k] for k in (
                  "cpu_seconds", "memory_peak_bytes", "wall_time_ms", "exit_code", "reason",
                  "stdout_sha256", "stderr_sha256")},
              "output_files": {},
              "worker_metadata": {"worker_id": identity.worker_id, "signature": signature,
                                  "signed": signed, "job_id": "job-abc"}}
    assert verify_result(status, identity.worker_id)
    swapped = dict(status, job_id="tag12345.1700000000.job-other")
    assert not verify_result(swapped, identity.worker_id)
    unrelated = dict(status, worker_metadata=dict(status["worker_metadata"], job_id="job-x"))
    assert not verify_result(unrelated, identity.worker_id)
