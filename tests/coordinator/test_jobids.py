"""Coordinator job ids: which worker, when, and the worker's secret id."""

from __future__ import annotations

import pytest

from coordinator.jobids import JobRef, decode_job_id, encode_job_id, worker_tag
from sandrun.identity import WorkerIdentity

WORKER_JOB = "job-hv5ur-G4Ha5KdCVQU-3hxVAF"


def test_an_id_round_trips_to_its_worker_time_and_worker_job_id() -> None:
    tag = worker_tag(WorkerIdentity.from_seed(b"k" * 32).worker_id)
    job_id = encode_job_id(tag, 1_700_000_123.9, WORKER_JOB)
    assert decode_job_id(job_id) == JobRef(tag, 1_700_000_123, WORKER_JOB)
    assert job_id.startswith(tag + ".") and job_id.endswith("." + WORKER_JOB)


def test_the_tag_depends_only_on_the_public_key() -> None:
    a = WorkerIdentity.from_seed(b"a" * 32).worker_id
    b = WorkerIdentity.from_seed(b"b" * 32).worker_id
    assert worker_tag(a) == worker_tag(a)
    assert worker_tag(a) != worker_tag(b)
    assert len(worker_tag(a)) == 8


@pytest.mark.parametrize("job_id", [
    WORKER_JOB,  # a worker's own id is not a coordinator id
    "abcdefgh.1." + WORKER_JOB + ".x",
    "ABCDEFGH.1." + WORKER_JOB,
    "abcdefgh.-1." + WORKER_JOB,
    "abcdefgh.1.job/../x",
    "abcdefgh.1.short",
    "",
])
def test_anything_else_is_not_a_job_id(job_id: str) -> None:
    assert decode_job_id(job_id) is None


def test_a_worker_job_id_that_is_not_a_url_safe_token_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_job_id("abcdefgh", 1, "job-../../etc")
