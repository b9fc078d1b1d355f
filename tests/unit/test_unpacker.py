"""Submissions parsed in a child process with its own limits: same results, contained failures;
small JSON bodies parsed in the calling thread, hostile ones refused there."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandrun.api import uploads
from sandrun.api.unpacker import IN_PROCESS_JSON_BYTES, Unpacker, UnpackLimits
from sandrun.config import Limits
from sandrun.jobs.manifest import ManifestError
from sandrun.jobs.workspace import UploadError
from tests import hostile_archives as ha
from tests.bodies import multipart, tar_bytes


@pytest.fixture
def unpacker() -> Iterator[Unpacker]:
    u = Unpacker(Limits())
    u.start()
    yield u
    u.stop()


def submit(u: Unpacker, tmp_path: Path, files: list[tuple[str, bytes]],
           manifest: str | None = '{"entrypoint": "main.py"}') -> uploads.Submission:
    body, kind = multipart({"manifest": manifest} if manifest else {}, files)
    spooled = tempfile.SpooledTemporaryFile(64 * 1024)  # noqa: SIM115 (as the worker's body)
    spooled.write(body)
    (tmp_path / "work").mkdir(parents=True, exist_ok=True)
    (tmp_path / "staging").mkdir(exist_ok=True)
    return u.parse(kind.encode(), spooled, str(tmp_path / "work"), str(tmp_path / "staging"))


def test_a_submission_parsed_in_the_child_is_the_one_parsed_in_process(
        unpacker: Unpacker, tmp_path: Path) -> None:
    files = [("a.tgz", tar_bytes({"main.py": "print(1)", "lib/x.py": "y = 2"})),
             ("data.bin", bytes(range(256)) * 1000)]
    child = submit(unpacker, tmp_path / "child", files)
    body, kind = multipart({"manifest": '{"entrypoint": "main.py"}'}, files)
    here = tmp_path / "here"
    (here / "work").mkdir(parents=True)
    (here / "staging").mkdir()
    local = uploads.parse_submission(kind.encode(), io.BytesIO(body), str(here / "work"),
                                     str(here / "staging"), Limits())
    assert child.manifest == local.manifest
    assert child.inputs.files == local.inputs.files
    assert [f.path for f in child.inputs.files] == ["data.bin", "lib/x.py", "main.py"]
    assert (tmp_path / "child/work/lib/x.py").read_text() == "y = 2"


def test_a_non_ascii_file_name_survives_the_trip_back(unpacker: Unpacker,
                                                       tmp_path: Path) -> None:
    name = "dír/ünïcödé € ✓.py"
    sub = submit(unpacker, tmp_path, [("a.tar", tar_bytes({name: "1", "main.py": "2"},
                                                          gz=False))])
    assert name in {f.path for f in sub.inputs.files}


@pytest.mark.parametrize(("archive", "words"), [
    (ha.sparse_map_bomb(), "GNU sparse members are not accepted"),
    (ha.digit_pax_headers(), "an extended header of 65536 bytes"),
    (ha.truncated_sparse_map(), "GNU sparse"),
    (ha.truncated_member(), "truncated archive"),
], ids=["sparse-map-bomb", "digit-pax-headers", "truncated-sparse-map", "truncated-member"])
def test_hostile_archives_come_back_as_the_upload_error_naming_them(
        unpacker: Unpacker, tmp_path: Path, archive: bytes, words: str) -> None:
    with pytest.raises(UploadError) as info:
        submit(unpacker, tmp_path, [("evil.tgz", archive)])
    assert info.value.member == "evil.tgz"
    assert words in info.value.message


def test_a_manifest_error_comes_back_naming_the_field(unpacker: Unpacker,
                                                      tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        submit(unpacker, tmp_path, [("main.py", b"1")], '{"entrypoint": "main.py", "x": 1}')
    assert info.value.field == "x"


def test_an_unsupported_content_type_comes_back_as_such(unpacker: Unpacker,
                                                        tmp_path: Path) -> None:
    with pytest.raises(uploads.Unsupported) as info:
        unpacker.parse(b"text/plain", io.BytesIO(b"hello"), str(tmp_path), str(tmp_path))
    assert info.value.kind == "text/plain"


def record_heavy(members: int = 2000) -> bytes:
    """An honest archive that is costly to parse: every member has 2,048 pax records."""
    records = b"8 a=bcd\n" * 2048
    return ha.gz(b"".join(ha.pax(records) + ha.member(f"f{i}", b"")
                          for i in range(members)) + ha.END)


def test_a_child_past_its_cpu_limit_is_a_400_naming_the_limits(tmp_path: Path) -> None:
    u = Unpacker(Limits(), UnpackLimits(cpu_seconds=1, wall_seconds=60))
    try:
        with pytest.raises(UploadError) as info:
            submit(u, tmp_path, [("heavy.tgz", record_heavy())])
        assert "could not be unpacked within" in info.value.message
        assert "1 CPU seconds" in info.value.message
    finally:
        u.stop()


def test_a_child_past_its_wall_limit_is_a_400(tmp_path: Path) -> None:
    u = Unpacker(Limits(), UnpackLimits(cpu_seconds=60, wall_seconds=1))
    try:
        with pytest.raises(UploadError) as info:
            submit(u, tmp_path, [("heavy.tgz", record_heavy())])
        assert "60 CPU seconds and 1 s" in info.value.message
    finally:
        u.stop()


def server_size(u: Unpacker) -> int:
    assert u._server is not None
    status = Path(f"/proc/{u._server.pid}/status").read_text()
    return int(status.split("VmSize:")[1].split()[0]) * 1024


def test_a_child_past_its_memory_limit_is_a_400(tmp_path: Path) -> None:
    probe = Unpacker(Limits())
    probe.start()
    room = server_size(probe) + 8 * 1024 * 1024  # what the child starts with, and 8 MiB
    probe.stop()
    u = Unpacker(Limits(), UnpackLimits(memory_bytes=room))
    try:
        body = b'{"files": {"main.py": "' + b"x" * 12_000_000 + b'"}}'  # read whole, 12 MB
        with pytest.raises(UploadError) as info:
            u.parse(b"application/json", io.BytesIO(body), str(tmp_path), str(tmp_path))
        assert f"needs more than {room // 2**20} MiB to unpack" in info.value.message
    finally:
        u.stop()


def test_a_dead_fork_server_is_started_again_for_the_next_submission(
        unpacker: Unpacker, tmp_path: Path) -> None:
    server = unpacker._server
    assert server is not None
    server.kill()
    server.wait()
    sub = submit(unpacker, tmp_path, [("main.py", b"print(1)")])
    assert [f.path for f in sub.inputs.files] == ["main.py"]
    assert unpacker._server is not server


def test_stopping_ends_the_fork_server(tmp_path: Path) -> None:
    u = Unpacker(Limits())
    u.start()
    server = u._server
    assert server is not None
    u.stop()
    assert server.poll() is not None
    assert not os.path.exists(f"/proc/{server.pid}/status") or server.returncode is not None


# -- small JSON bodies: parsed in the calling thread, never in a child ---------------------------


def parse_json(u: Unpacker, tmp_path: Path, body: bytes,
               kind: bytes = b"application/json") -> uploads.Submission:
    spooled = tempfile.SpooledTemporaryFile(64 * 1024)  # noqa: SIM115 (as the worker's body)
    spooled.write(body)
    (tmp_path / "work").mkdir(parents=True, exist_ok=True)
    (tmp_path / "staging").mkdir(exist_ok=True)
    return u.parse(kind, spooled, str(tmp_path / "work"), str(tmp_path / "staging"))


def test_a_small_json_submission_never_reaches_the_fork_server(tmp_path: Path) -> None:
    u = Unpacker(Limits())  # not started: a request to it would start the fork server
    try:
        sub = parse_json(u, tmp_path, b'{"files": {"main.py": "print(1)"}}',
                         b"application/json; charset=utf-8")
        assert [f.path for f in sub.inputs.files] == ["main.py"]
        assert sub.manifest.entrypoint == "main.py"
        assert (tmp_path / "work/main.py").read_text() == "print(1)"
        assert u._server is None
    finally:
        u.stop()


def test_json_past_the_in_process_size_and_multipart_go_to_the_child(tmp_path: Path) -> None:
    u = Unpacker(Limits())
    try:
        filler = "x" * IN_PROCESS_JSON_BYTES
        sub = parse_json(u, tmp_path / "big", json.dumps(
            {"manifest": {"entrypoint": "main.py"},
             "files": {"main.py": "print(1)", "pad.txt": filler}}).encode())
        assert [f.path for f in sub.inputs.files] == ["main.py", "pad.txt"]
        assert u._server is not None
        server = u._server
        submit(u, tmp_path / "form", [("main.py", b"print(1)")])
        assert u._server is server and server.poll() is None
    finally:
        u.stop()


@pytest.mark.parametrize(("body", "words"), [
    (b"[" * 200_000, "nested too deeply"),
    (b'{"files": {"main.py": "' + b"[{" * 1000 + b'"}}', None),  # text, not nesting
    (b'{"manifest": {"timeout": ' + b"9" * 200_000 + b'}}', "Exceeds the limit"),
    (b'{"manifest": {"cpu_seconds": 1e999999}, "files": {"a.py": ""}}', "positive number"),
    (b'{"files": {"a.py": "\xff\xfe"}}', "not valid UTF-8"),
    (b'{"files": {"a.py": ""}, "files": {"b.py": ""}}', "duplicate key 'files'"),
    (b'{"manifest": {"timeout": NaN}, "files": {"a.py": ""}}', "NaN is not allowed"),
], ids=["deep-nesting", "brackets-in-a-string", "huge-integer", "huge-float", "invalid-utf8",
        "duplicate-key", "nan"])
def test_hostile_small_json_is_a_manifest_error_naming_it_and_no_child(
        tmp_path: Path, body: bytes, words: str | None) -> None:
    assert len(body) <= IN_PROCESS_JSON_BYTES
    u = Unpacker(Limits())
    try:
        if words is None:  # accepted: stored as the file's text
            sub = parse_json(u, tmp_path, body)
            assert [f.size for f in sub.inputs.files] == [2000]
        else:
            with pytest.raises(ManifestError) as info:
                parse_json(u, tmp_path, body)
            assert words in info.value.message
        assert u._server is None
    finally:
        u.stop()


def test_a_string_as_large_as_the_in_process_size_is_stored_whole(tmp_path: Path) -> None:
    u = Unpacker(Limits())
    try:
        text = "é" * ((IN_PROCESS_JSON_BYTES - 100) // 2)  # two bytes each in UTF-8
        body = json.dumps({"files": {"main.py": text}}, ensure_ascii=False).encode()
        assert len(body) <= IN_PROCESS_JSON_BYTES
        sub = parse_json(u, tmp_path, body)
        assert (tmp_path / "work/main.py").read_text() == text
        assert sub.inputs.files[0].size == len(text.encode())
        assert u._server is None
    finally:
        u.stop()
