"""The worker's and coordinator's log lines when not under systemd (``sandrun.daemon``)."""

from __future__ import annotations

import io

from twisted.logger import LogLevel, textFileLogObserver

from sandrun.daemon import text_observer


def test_lines_are_those_of_twisteds_text_observer_with_the_time_formatted_once_a_second(
        ) -> None:
    times: list[float | None] = [1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0,
                                 1_700_000_000.5, 1_700_003_600.25, None]
    ours, theirs = io.StringIO(), io.StringIO()
    for observer in (text_observer(ours), textFileLogObserver(theirs)):
        for when in times:
            observer({"log_format": "job {job_id} queued", "job_id": "job-x",
                      "log_level": LogLevel.info, "log_namespace": "sandrun.jobs.manager",
                      "log_source": None, "log_time": when})
    assert ours.getvalue() == theirs.getvalue()
    written = ours.getvalue().splitlines()
    assert len(written) == len(times) and len(set(written)) == 4  # 3 seconds, and no time
    assert written[0].endswith(" [sandrun.jobs.manager#info] job job-x queued")
