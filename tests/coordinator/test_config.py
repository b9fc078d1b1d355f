"""workers.json: what is accepted, and that a bad file names the bad entry."""

from __future__ import annotations

import json

import pytest

from coordinator.config import WorkerEntry, WorkersFileError, load_workers, parse_workers
from sandrun.identity import WorkerIdentity

KEY_A = WorkerIdentity.from_seed(b"a" * 32).worker_id
KEY_B = WorkerIdentity.from_seed(b"b" * 32).worker_id


def entry(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"worker_id": KEY_A, "endpoint": "http://10.0.0.1:8443",
                               "max_concurrent_jobs": 4}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refused(document: object) -> str:
    with pytest.raises(WorkersFileError) as caught:
        parse_workers(json.dumps(document))
    return str(caught.value)


def test_a_valid_file_gives_normalised_entries_with_defaults() -> None:
    entries = parse_workers(json.dumps([
        entry(name="rack1"),
        {"worker_id": KEY_B, "endpoint": "https://w2.example/", "comment": "spare"},
    ]))
    assert entries == (
        WorkerEntry(KEY_A, "http://10.0.0.1:8443", 4, "rack1"),
        WorkerEntry(KEY_B, "https://w2.example:443", None, None),
    )


def test_an_ipv6_endpoint_keeps_its_brackets() -> None:
    (only,) = parse_workers(json.dumps([entry(endpoint="http://[::1]:9001")]))
    assert only.endpoint == "http://[::1]:9001"


def test_an_empty_list_is_a_valid_pool_of_no_workers() -> None:
    assert parse_workers("[]") == ()


@pytest.mark.parametrize(("bad", "words"), [
    (entry(worker_id="not-a-key"), "worker_id"),
    (entry(worker_id=KEY_A[:-4]), "worker_id"),
    (entry(endpoint="ftp://10.0.0.1"), "endpoint"),
    (entry(endpoint="http://10.0.0.1:8443/api"), "endpoint"),
    (entry(endpoint="http://user:pw@10.0.0.1"), "endpoint"),
    (entry(endpoint="http://10.0.0.1:99999"), "endpoint"),
    (entry(endpoint=None), "endpoint is required"),
    (entry(max_concurrent_jobs=0), "max_concurrent_jobs"),
    (entry(max_concurrent_jobs=True), "max_concurrent_jobs"),
    (entry(max_concurrent_jobs="4"), "max_concurrent_jobs"),
    (entry(maxConcurrentJobs=4), "unknown key(s) 'maxConcurrentJobs'"),
    (entry(name=""), "name"),
    ("http://10.0.0.1:8443", "must be an object"),
])
def test_a_bad_entry_is_refused_naming_its_index_and_what_is_wrong(bad: object,
                                                                  words: str) -> None:
    message = refused([entry(worker_id=KEY_B, endpoint="http://10.0.0.9:1"), bad])
    assert "entry 1" in message
    assert words in message


def test_the_message_names_the_entry_by_its_name_when_it_has_one() -> None:
    message = refused([entry(name="rack7", endpoint="nope")])
    assert message.startswith("entry 0 (rack7):")


def test_a_repeated_worker_id_is_refused_naming_both_entries() -> None:
    message = refused([entry(), entry(endpoint="http://10.0.0.2:8443")])
    assert "entry 1" in message and "already used by entry 0" in message


def test_a_repeated_endpoint_is_refused() -> None:
    message = refused([entry(), entry(worker_id=KEY_B, endpoint="http://10.0.0.1:8443/")])
    assert "endpoint" in message and "entry 0" in message


@pytest.mark.parametrize("text", ["{", '{"worker_id": "x"}', "null"])
def test_a_file_that_is_not_a_json_list_is_refused(text: str) -> None:
    with pytest.raises(WorkersFileError):
        parse_workers(text)


def test_load_names_the_file_and_a_missing_file_is_an_error(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "workers.json"
    with pytest.raises(WorkersFileError, match="cannot read"):
        load_workers(str(path))
    path.write_text(json.dumps([entry(endpoint="bad")]))
    with pytest.raises(WorkersFileError, match=r"^workers.json: entry 0"):
        load_workers(str(path))
    path.write_text(json.dumps([entry()]))
    assert load_workers(str(path))[0].worker_id == KEY_A


def test_the_example_file_in_the_repository_is_valid() -> None:
    import pathlib

    example = pathlib.Path(__file__).resolve().parents[2] / "workers.json.example"
    entries = load_workers(str(example))
    assert len(entries) >= 2
