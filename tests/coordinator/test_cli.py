"""The command line: arguments into a frozen config; bad input refused before start-up."""

from __future__ import annotations

import argparse

import pytest

from coordinator.cli import build_parser, config_from, listen_description, main


def test_defaults_are_the_documented_ones() -> None:
    config = config_from(build_parser().parse_args([]))
    assert config.listen == "tcp:9000:interface=127.0.0.1"
    assert config.workers_path == "workers.json"
    assert config.health_interval == 5.0 and config.health_timeout == 2.0
    assert (config.quotas.max_active_jobs, config.quotas.jobs_per_hour) == (2, 20)


def test_every_flag_reaches_the_config() -> None:
    config = config_from(build_parser().parse_args([
        "--workers", "/etc/w.json", "--listen", "0.0.0.0:9100", "--health-interval", "1.5",
        "--health-timeout", "0.5", "--max-upload-mb", "7", "--trusted-proxy", "10.0.0.0/8",
        "--max-active-per-ip", "3", "--jobs-per-hour", "40", "--cpu-quota", "20",
        "--spool-dir", "/run/spool", "--drain-seconds", "60"]))
    assert config.workers_path == "/etc/w.json"
    assert config.listen == "tcp:9100:interface=0.0.0.0"
    assert (config.health_interval, config.health_timeout) == (1.5, 0.5)
    assert config.max_upload_bytes == 7_000_000 and config.spool_dir == "/run/spool"
    assert config.trusted_proxies == ("10.0.0.0/8",) and config.drain_seconds == 60
    assert (config.quotas.max_active_jobs, config.quotas.jobs_per_hour,
            config.quotas.cpu_seconds_per_minute) == (3, 40, 20.0)


def test_help_shows_the_defaults_of_draining_replicas_and_enrollment(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stays reachable (default 3600)" in text
    assert "(default 3)" in text and "(default off)" in text


def test_pool_flags_reach_the_config() -> None:
    config = config_from(build_parser().parse_args([
        "--max-replicas", "5", "--max-disagreements", "2", "--open-enrollment",
        "--max-open-workers", "4"]))
    assert (config.max_replicas, config.max_disagreements) == (5, 2)
    assert config.open_enrollment is True and config.max_open_workers == 4
    assert config_from(build_parser().parse_args([])).open_enrollment is False


def test_listen_takes_host_port_ipv6_or_an_endpoint_string() -> None:
    assert listen_description("[::1]:9000") == "tcp:9000:interface=\\:\\:1"
    assert listen_description("unix:/run/c.sock") == "unix:/run/c.sock"
    with pytest.raises(argparse.ArgumentTypeError):
        listen_description("localhost")


@pytest.mark.parametrize("argv", [["--health-interval", "0"], ["--max-active-per-ip", "-1"]])
def test_non_positive_numbers_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_a_bad_workers_file_stops_the_start_with_its_message(tmp_path: object,
                                                             capsys: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "workers.json"
    path.write_text('[{"worker_id": "x", "endpoint": "http://a:1", "name": "bad"}]')
    with pytest.raises(SystemExit) as exit_:
        main(["--workers", str(path)])
    assert "entry 0 (bad): worker_id" in str(exit_.value)


def test_a_bad_trusted_proxy_is_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--trusted-proxy", "not-an-address"])
    assert "--trusted-proxy" in str(exit_.value)


def test_quota_exempt_reaches_the_config_and_a_bad_entry_is_refused() -> None:
    config = config_from(build_parser().parse_args(
        ["--quota-exempt", "10.0.0.0/8", "--quota-exempt", "::1"]))
    assert config.quotas.exempt == ("10.0.0.0/8", "::1")
    assert config_from(build_parser().parse_args([])).quotas.exempt == ()
    with pytest.raises(SystemExit) as exit_:
        main(["--quota-exempt", "nowhere"])
    assert "bad --quota-exempt" in str(exit_.value)


def test_version_is_printed_like_the_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("sandrun-coordinator ")


def test_every_flag_says_what_it_does_and_its_default() -> None:
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert action.help and "default" in action.help, (action.dest, action.help)
