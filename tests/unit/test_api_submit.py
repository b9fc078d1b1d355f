"""POST /submit in memory: the three upload forms and every way a submission is refused.

Real ``WorkerAPI``, ``JobManager`` and ``UploadRequest`` behind StubTreq; the
sandbox and storage are fakes (``worker_fakes``), so no root is needed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from typing import Any

import pytest

from sandrun.api import uploads
from sandrun.config import QuotaConfig
from sandrun.jobs.manifest import Manifest
from tests.unit.worker_fakes import Harness, multipart, tar_bytes


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path))


def error(reply: Any, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("access-control-allow-origin") == "*"
    body: dict[str, Any] = reply.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["details"], str)
    return body


def only_job(h: Harness) -> Any:
    (job,) = h.manager.jobs.values()
    return job


def work_files(h: Harness, job_id: str) -> dict[str, bytes]:
    work = os.path.join(h.storage.jobs_dir, job_id, "work")
    found = {}
    for top, _, files in os.walk(work):
        for name in files:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, work)] = f.read()
    return found


# -- accepted forms -----------------------------------------------------------------------


def test_a_json_body_job_is_queued_with_its_files_manifest_and_hash(h: Harness) -> None:
    reply = h.post_json({"manifest": {"entrypoint": "main.py", "args": ["a", "b c"],
                                      "env": {"GREETING": "hi"}, "stdin": "in"},
                         "files": {"main.py": "print(1)",
                                   "data/blob.bin": {"base64": base64.b64encode(b"\0\1").decode()}}})
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"job_id", "status", "position"}
    assert body["status"] == "queued" and body["position"] == 0  # 0: running already
    job_id = body["job_id"]
    assert work_files(h, job_id) == {"main.py": b"print(1)", "data/blob.bin": b"\0\1"}
    run = h.run_of(job_id)
    assert run.argv == ("python3", "main.py", "a", "b c")
    assert run.env == (("GREETING", "hi"),)
    assert run.stdin == b"in"
    status = h.status(job_id)
    assert len(status["job_hash"]) == 64 and status["status"] == "running"


def test_a_single_uploaded_file_is_its_own_entrypoint(h: Harness) -> None:
    reply = h.post_multipart(files=[("hello.rb", b"puts 1")])
    assert reply.status == 200, reply.body
    job_id = reply.json()["job_id"]
    assert h.run_of(job_id).argv == ("ruby", "hello.rb")


def test_a_single_json_file_is_its_own_entrypoint(h: Harness) -> None:
    job_id = h.submit({"run.sh": "echo hi"})
    assert h.run_of(job_id).argv == ("bash", "run.sh")


def test_a_single_file_in_a_folder_of_the_browser_keeps_only_its_base_name(h: Harness) -> None:
    reply = h.post_multipart(files=[("C:\\Users\\me\\x.py", b"pass")])
    assert reply.status == 200, reply.body
    assert work_files(h, reply.json()["job_id"]) == {"x.py": b"pass"}


def test_a_tar_gz_with_job_json_inside_needs_no_manifest_field(h: Harness) -> None:
    archive = tar_bytes({"job.json": json.dumps({"entrypoint": "src/app.js", "args": ["1"]}),
                         "src/app.js": "console.log(1)"})
    reply = h.post_multipart(files=[("job.tar.gz", archive)])
    assert reply.status == 200, reply.body
    job_id = reply.json()["job_id"]
    assert h.run_of(job_id).argv == ("node", "src/app.js", "1")


@pytest.mark.parametrize("name,gz", [("job.tgz", True), ("job.tar", False)])
def test_tgz_and_plain_tar_are_unpacked_too(h: Harness, name: str, gz: bool) -> None:
    archive = tar_bytes({"job.json": '{"entrypoint": "a.pl"}', "a.pl": "print 1"}, gz=gz)
    reply = h.post_multipart(files=[(name, archive)])
    assert reply.status == 200, reply.body
    assert h.run_of(reply.json()["job_id"]).argv == ("perl", "a.pl")


def test_a_form_manifest_wins_over_job_json(h: Harness) -> None:
    archive = tar_bytes({"job.json": '{"entrypoint": "a.py"}', "a.py": "", "b.py": ""})
    reply = h.post_multipart({"manifest": '{"entrypoint": "b.py"}'}, [("x.tar.gz", archive)])
    assert reply.status == 200, reply.body
    assert h.run_of(reply.json()["job_id"]).argv == ("python3", "b.py")


def test_several_files_and_an_archive_combine_in_one_job(h: Harness) -> None:
    reply = h.post_multipart({"manifest": '{"entrypoint": "main.R"}'},
                             [("main.R", b"cat(1)"), ("lib.tar.gz", tar_bytes({"lib/x.R": "1"}))])
    assert reply.status == 200, reply.body
    assert set(work_files(h, reply.json()["job_id"])) == {"main.R", "lib/x.R"}


def test_the_queue_position_counts_from_one_behind_the_running_jobs(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    positions = [h.post_json({"files": {"a.py": ""}}).json()["position"] for _ in range(3)]
    assert positions == [0, 1, 2]


# -- refused: content type, size, form --------------------------------------------------


def test_an_unknown_content_type_is_415_and_leaves_nothing_behind(h: Harness) -> None:
    reply = h.request("POST", "/submit", b"print(1)", {"Content-Type": "text/x-python"})
    body = error(reply, 415)
    assert "text/x-python" in body["details"]
    assert h.manager.jobs == {} and h.storage.job_ids() == []


def test_no_content_type_is_415(h: Harness) -> None:
    error(h.request("POST", "/submit", b"x"), 415)


def test_a_content_length_over_the_limit_is_413_and_creates_no_job(h: Harness) -> None:
    body, content_type = multipart({}, [("big.py", b"#" * 250_000)])
    reply = h.request("POST", "/submit", body, {"Content-Type": content_type})
    assert reply.status == 413
    # Answered by UploadRequest from the header alone, not by the route.
    assert reply.json()["details"] == \
        f"the limit is 200000 bytes; Content-Length is {len(body)}"
    assert reply.header("access-control-allow-origin") == "*"
    assert h.manager.jobs == {} and h.storage.job_ids() == []
    assert h.get("/health").status == 200


def test_a_json_body_over_its_own_cap_is_413(h: Harness,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_JSON_BODY_BYTES", 1000)
    reply = h.post_json({"files": {"a.py": "#" * 2000}})
    assert reply.status == 413
    assert "1000" in reply.json()["details"]
    assert h.manager.jobs == {}


def test_a_multipart_body_without_a_boundary_is_400(h: Harness) -> None:
    body = error(h.request("POST", "/submit", b"--x--", {"Content-Type": "multipart/form-data"}),
                 400)
    assert "boundary" in body["details"]


@pytest.mark.parametrize("raw", [
    b"this is not multipart at all",
    (b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.py\"\r\n\r\n"
     b"print(1)\r\n"),  # truncated: no closing boundary
    b"--b0undary\r\nContent-Disposition form-data\r\n\r\nx\r\n--b0undary--\r\n",  # bad header
])
def test_malformed_multipart_is_400_and_leaves_nothing_behind(h: Harness, raw: bytes) -> None:
    reply = h.request("POST", "/submit", raw,
                      {"Content-Type": "multipart/form-data; boundary=b0undary"})
    body = error(reply, 400)
    assert body["error"] == "Invalid upload"
    assert h.manager.jobs == {} and h.storage.job_ids() == []


def test_an_unknown_form_field_is_named(h: Harness) -> None:
    body = error(h.post_multipart({"manifest": "{}", "priority": "high"}, [("a.py", b"")]), 400)
    assert body["member"] == "priority"


def test_a_form_with_no_file_is_400_naming_files(h: Harness) -> None:
    body = error(h.post_multipart({"manifest": '{"entrypoint": "a.py"}'}), 400)
    assert body["member"] == "files"


def test_a_file_name_that_is_not_utf8_is_400(h: Harness) -> None:
    body = error(h.post_multipart(files=[("bad\udcff.py", b"")]), 400)
    assert "UTF-8" in body["details"]


@pytest.mark.parametrize("name", ["..", "a\x00b.py"])
def test_an_unusable_file_name_is_400(h: Harness, name: str) -> None:
    error(h.post_multipart(files=[(name, b"")]), 400)


# -- refused: manifest ---------------------------------------------------------------------


def test_a_manifest_that_is_not_json_is_400(h: Harness) -> None:
    body = error(h.post_multipart({"manifest": "{entrypoint: a.py"}, [("a.py", b"")]), 400)
    assert body["field"] == "manifest" and "JSON" in body["details"]


def test_a_json_body_that_is_not_json_is_400(h: Harness) -> None:
    reply = h.request("POST", "/submit", b"{nope", {"Content-Type": "application/json"})
    assert error(reply, 400)["field"] == "body"


@pytest.mark.parametrize("raw,field", [
    (b"[1, 2]", "body"),
    (b'{"manifest": {}, "files": {}, "extra": 1}', "extra"),
    (b'{"files": {"a.py": ""}, "files": {"b.py": ""}}', "body"),  # duplicate key
    (b'{"manifest": {"timeout": NaN}, "files": {"a.py": ""}}', "body"),
    (b"[" * 100_000 + b"]" * 100_000, "body"),  # nested beyond the parser's recursion limit
    (b'\xff{"files": {}}', "body"),
])
def test_a_json_body_of_the_wrong_shape_is_400_naming_the_field(h: Harness, raw: bytes,
                                                                field: str) -> None:
    reply = h.request("POST", "/submit", raw, {"Content-Type": "application/json"})
    assert error(reply, 400)["field"] == field


@pytest.mark.parametrize("manifest,field", [
    ({"entrypoint": "a.py", "timeuot": 5}, "timeuot"),
    ({"entrypoint": "a.py", "timeout": "5"}, "timeout"),
    ({"entrypoint": "a.py", "timeout": True}, "timeout"),
    ({"entrypoint": "a.py", "timeout": 61}, "timeout"),  # over the server's maximum (60)
    ({"entrypoint": "a.py", "memory_mb": 257}, "memory_mb"),
    ({"entrypoint": "a.py", "args": "x"}, "args"),
    ({"entrypoint": "a.py", "args": ["a\x00b"]}, "args[0]"),
    ({"entrypoint": "a.py", "env": {"LD_PRELOAD": "x"}}, "env.LD_PRELOAD"),
    ({"entrypoint": "a.py", "env": {"PATH": "/x"}}, "env.PATH"),
    ({"entrypoint": "../a.py"}, "entrypoint"),
    ({"entrypoint": "/etc/passwd"}, "entrypoint"),
    ({"entrypoint": "a\x00.py"}, "entrypoint"),
    ({"entrypoint": "a\udcff.py"}, "entrypoint"),
    ({"entrypoint": "b.py"}, "entrypoint"),  # not among the uploaded files
    ({"entrypoint": "a.py", "outputs": ["../x"]}, "outputs[0]"),
    ({"entrypoint": "a.py", "interpreter": "sh -c"}, "interpreter"),
    ({"entrypoint": "a.py", "environment": "nosuch"}, "environment"),
])
def test_an_invalid_manifest_is_400_naming_the_field_and_leaves_nothing(
        h: Harness, manifest: dict[str, Any], field: str) -> None:
    body = json.dumps({"manifest": manifest, "files": {"a.py": ""}},
                      ensure_ascii=True).encode()  # lone surrogates travel as \udcff escapes
    reply = h.request("POST", "/submit", body, {"Content-Type": "application/json"})
    result = error(reply, 400)
    assert result["field"] == field, result
    assert field in result["details"]
    assert h.manager.jobs == {} and h.storage.job_ids() == []


def test_unknown_manifest_fields_are_all_named(h: Harness) -> None:
    result = error(h.post_json({"manifest": {"entrypoint": "a.py", "zzz": 1, "aaa": 2},
                                "files": {"a.py": ""}}), 400)
    assert result["field"] == "aaa" and "zzz" in result["details"]


def test_a_multi_file_upload_without_a_manifest_is_400(h: Harness) -> None:
    result = error(h.post_multipart(files=[("a.py", b""), ("b.py", b"")]), 400)
    assert result["field"] == "manifest"


def test_job_json_that_is_a_directory_is_400_not_500(h: Harness) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("job.json")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo("a.py")
        tar.addfile(info, io.BytesIO(b""))
    result = error(h.post_multipart(files=[("x.tar.gz", out.getvalue())]), 400)
    assert result["field"] == "job.json"


def test_job_json_that_is_not_json_is_400(h: Harness) -> None:
    archive = tar_bytes({"job.json": "entrypoint = a.py", "a.py": ""})
    assert error(h.post_multipart(files=[("x.tar.gz", archive)]), 400)["field"] == "manifest"


@pytest.mark.parametrize("files", [
    {"../evil.py": "x"}, {"/abs.py": "x"}, {"a\x00.py": "x"}, {"a//b.py": "x"},
])
def test_a_json_file_path_that_escapes_or_is_not_normal_is_400(h: Harness,
                                                              files: dict[str, str]) -> None:
    result = error(h.post_json({"manifest": {"entrypoint": "x.py"}, "files": files}), 400)
    assert result["member"] == next(iter(files))
    assert not os.path.exists(os.path.join(h.storage.jobs_dir, "evil.py"))


def test_invalid_base64_content_is_400_naming_the_file(h: Harness) -> None:
    result = error(h.post_json({"files": {"a.bin": {"base64": "***"}}}), 400)
    assert result["member"] == "a.bin"


# -- refused: archives (the extraction rules themselves are tested in test_workspace) ---


def test_an_archive_member_with_dotdot_is_400_naming_it(h: Harness) -> None:
    archive = tar_bytes({"job.json": '{"entrypoint": "a.py"}', "a.py": "", "../x": "boom"})
    result = error(h.post_multipart(files=[("x.tar.gz", archive)]), 400)
    assert result["member"] == "../x"
    assert h.storage.job_ids() == []


def test_an_archive_that_is_not_one_is_400_naming_the_upload(h: Harness) -> None:
    result = error(h.post_multipart(files=[("x.tar.gz", b"not a tarball")]), 400)
    assert result["member"] == "x.tar.gz"


def test_too_many_archive_members_is_400(h: Harness) -> None:
    archive = tar_bytes({f"f{i}": "" for i in range(60)})  # the harness allows 50
    result = error(h.post_multipart({"manifest": '{"entrypoint": "f0"}'},
                                    [("x.tar", archive)]), 400)
    assert "50" in result["details"]


def test_too_many_bytes_after_decompression_is_400(h: Harness) -> None:
    archive = tar_bytes({"a.py": "", "zeros": b"\0" * 400_000})  # small gzipped, 300 kB allowed
    assert len(archive) < 200_000
    result = error(h.post_multipart({"manifest": '{"entrypoint": "a.py"}'},
                                    [("x.tar.gz", archive)]), 400)
    assert result["member"] == "zeros"


# -- refused: capacity and quotas ----------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after_and_creates_no_job(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1, queue_size=2)
    for _ in range(3):  # one running, two queued
        h.submit()
    reply = h.post_json({"files": {"a.py": ""}})
    body = error(reply, 503)
    assert body["retry_after"] > 0
    assert reply.header("retry-after") == str(body["retry_after"])
    assert len(h.manager.jobs) == 3 and len(h.storage.job_ids()) == 3


def test_a_full_storage_is_503_with_retry_after(h: Harness) -> None:
    h.storage.full = True
    reply = h.post_json({"files": {"a.py": ""}})
    assert error(reply, 503)["retry_after"] > 0
    assert reply.header("retry-after") is not None


def test_a_third_active_job_from_one_client_is_429_with_the_contract_body(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), quotas=QuotaConfig(cpu_seconds_per_minute=10, max_active_jobs=2,
                                                  jobs_per_hour=20))
    h.submit()
    h.submit()
    reply = h.post_json({"files": {"a.py": ""}})
    body = error(reply, 429)
    assert body["error"] == "Rate limit exceeded"
    assert "2 of 2" in body["reason"]
    assert body["retry_after"] >= 1 and reply.header("retry-after") == str(body["retry_after"])
    assert body["cpu_available"] == 10 and body["active_jobs"] == 2
    assert len(h.manager.jobs) == 2 and len(h.storage.job_ids()) == 2


def test_the_hourly_limit_is_429_until_retry_after_has_passed(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), quotas=QuotaConfig(cpu_seconds_per_minute=10, max_active_jobs=5,
                                                  jobs_per_hour=2))
    for _ in range(2):
        h.run_of(h.submit()).finish()
    body = error(h.post_json({"files": {"a.py": ""}}), 429)
    assert "Hourly" in body["reason"]
    h.clock.advance(body["retry_after"] - 1)
    assert h.post_json({"files": {"a.py": ""}}).status == 429
    h.clock.advance(1)
    assert h.post_json({"files": {"a.py": ""}}).status == 200


def test_a_forwarded_address_counts_only_from_a_trusted_proxy(tmp_path: Any) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=10, max_active_jobs=1, jobs_per_hour=20)
    untrusted = Harness(str(tmp_path / "u"), quotas=quotas)
    forwarded = {"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.9"}
    doc = json.dumps({"files": {"a.py": ""}}).encode()
    assert untrusted.request("POST", "/submit", doc, forwarded).status == 200
    forwarded["X-Forwarded-For"] = "203.0.113.10"  # a forged new identity changes nothing
    assert untrusted.request("POST", "/submit", doc, forwarded).status == 429

    trusted = Harness(str(tmp_path / "t"), quotas=quotas, trusted_proxies=("127.0.0.1",))
    for client in ("203.0.113.9", "203.0.113.10"):
        forwarded["X-Forwarded-For"] = client
        assert trusted.request("POST", "/submit", doc, forwarded).status == 200
    assert {j.client for j in trusted.manager.jobs.values()} == {"203.0.113.9", "203.0.113.10"}
    assert trusted.request("POST", "/submit", doc, forwarded).status == 429


def test_every_forwarded_for_line_counts_from_a_trusted_proxy(tmp_path: Any) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=10, max_active_jobs=1, jobs_per_hour=20)
    h = Harness(str(tmp_path), quotas=quotas, trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    doc = json.dumps({"files": {"a.py": ""}}).encode()
    d = h.stub.request(  # type: ignore[attr-defined]
        "POST", "http://worker.test/submit", data=doc,
        headers={"Content-Type": ["application/json"],
                 "X-Forwarded-For": ["198.51.100.1, 203.0.113.5", "10.1.2.3"]})
    assert h._settle(d).code == 200
    # Lines join with "," (RFC 9110): the right-most untrusted address over all of them.
    assert [j.client for j in h.manager.jobs.values()] == ["203.0.113.5"]


def test_job_ids_carry_at_least_96_random_bits(h: Harness) -> None:
    h.sandbox.script = lambda run: run.finish()
    ids = {h.submit() for _ in range(20)}
    assert len(ids) == 20
    for job_id in ids:
        assert job_id.startswith("job-")
        raw = base64.urlsafe_b64decode(job_id[4:] + "=" * (-len(job_id[4:]) % 4))
        assert len(raw) * 8 >= 96


def test_the_manifest_the_job_runs_with_is_the_parsed_one(h: Harness) -> None:
    h.submit({"a.py": ""}, {"timeout": 7, "memory_mb": 64, "cpu_seconds": 1.5})
    job = only_job(h)
    assert isinstance(job.manifest, Manifest)
    policy = h.run_of(job.id).policy
    assert (policy.timeout_seconds, policy.memory_bytes, policy.cpu_seconds) == \
        (7.0, 64 * 1024 * 1024, 1.5)


# -- what can run ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [("x.txt", b"hello"), ("notes", b"just words"),
                                          ("data.bin", b"\x00\x01\x02")])
def test_a_file_with_no_known_extension_that_cannot_run_by_itself_is_400_naming_interpreter(
        h: Harness, name: str, content: bytes) -> None:
    body = error(h.post_multipart(files=[(name, content)]), 400)
    assert body["field"] == "interpreter"
    assert name in body["details"] and ".py" in body["details"] and "#!" in body["details"]
    assert h.manager.jobs == {}


def test_an_executable_with_a_shebang_or_an_elf_header_runs_directly(h: Harness) -> None:
    script = h.post_multipart(files=[("run", b"#!/bin/sh\necho hi\n")])
    assert script.status == 200, script.body
    assert h.run_of(script.json()["job_id"]).argv == ("./run",)
    elf = tar_bytes({"job.json": '{"entrypoint": "bin/tool"}', "bin/tool": b"\x7fELF" + b"\0" * 60},
                    executable=("bin/tool",))
    assert h.post_multipart(files=[("t.tar.gz", elf)]).status == 200


def test_a_shebang_file_that_is_not_executable_is_400(h: Harness) -> None:
    archive = tar_bytes({"job.json": '{"entrypoint": "run"}', "run": "#!/bin/sh\necho hi\n"})
    assert error(h.post_multipart(files=[("t.tar.gz", archive)]), 400)["field"] == "interpreter"
    # ... unless an interpreter is named.
    named = h.post_multipart({"manifest": '{"entrypoint": "run", "interpreter": "bash"}'},
                             [("t.tar.gz", archive)])
    assert named.status == 200, named.body
