"""Per-client quotas, driven with explicit ``now`` values (no clock, no sleeping)."""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import pytest

from sandrun.config import QuotaConfig
from sandrun.jobs.ratelimit import (
    CONCURRENCY_RETRY_AFTER,
    Decision,
    RateLimiter,
    _hourly_usage,
)
from sandrun.netaddr import client_key

KEY = "198.51.100.7"


def submit(limiter: RateLimiter, job_id: str, now: float, key: str = KEY) -> Decision:
    decision = limiter.try_acquire(key, job_id, now)
    assert decision.allowed, decision.reason
    return decision


def run_job(limiter: RateLimiter, job_id: str, start: float, cpu: float, key: str = KEY) -> None:
    """A job accepted at *start* that used *cpu* CPU-seconds and ended at once."""
    submit(limiter, job_id, start, key)
    limiter.release(key, job_id, start, cpu_seconds_total=cpu)


def assert_retry_after_exact(limiter: RateLimiter, now: float, key: str = KEY) -> Decision:
    refused = limiter.check(key, now)
    assert not refused.allowed
    assert refused.retry_after >= 1
    assert not limiter.check(key, now + refused.retry_after - 1).allowed
    assert limiter.check(key, now + refused.retry_after).allowed
    return refused


# -- Decision fields --------------------------------------------------------------------------


def test_a_new_client_is_allowed_with_its_whole_quota() -> None:
    decision = RateLimiter().check(KEY, 1000.0)

    assert decision == Decision(
        allowed=True,
        reason=None,
        retry_after=0,
        cpu_used=0.0,
        cpu_limit=10.0,
        cpu_available=10.0,
        active_jobs=0,
        max_concurrent=2,
        jobs_this_hour=0,
        hourly_limit=20,
    )


def test_a_decision_cannot_be_changed_after_it_is_made() -> None:
    decision = RateLimiter().check(KEY, 0.0)

    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]


def test_the_decision_reports_usage_as_it_stood_before_the_submission() -> None:
    limiter = RateLimiter()
    run_job(limiter, "a", 0.0, cpu=3.25)

    decision = limiter.try_acquire(KEY, "b", 1.0)

    assert decision.allowed
    assert (decision.cpu_used, decision.cpu_available) == (3.25, 6.75)
    assert (decision.active_jobs, decision.jobs_this_hour) == (0, 1)
    assert limiter.check(KEY, 1.0).active_jobs == 1


def test_quota_for_stats_has_the_documented_keys_and_values() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 2.5, 1.0)

    assert limiter.quota(KEY, 2.0) == {
        "used": 2.5,
        "limit": 10.0,
        "available": 7.5,
        "active_jobs": 1,
        "max_concurrent": 2,
        "jobs_this_hour": 1,
        "hourly_limit": 20,
        "can_submit": True,
        "reason": None,
        "retry_after": 0,
    }


def test_quota_of_a_refused_client_says_why_and_when() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 0.0)

    quota = limiter.quota(KEY, 1.0)

    assert quota["can_submit"] is False
    assert quota["retry_after"] == CONCURRENCY_RETRY_AFTER
    assert quota["reason"] == (
        "Too many active jobs: 2 of 2 jobs queued or running; retry when one ends"
    )


def test_a_configuration_with_a_zero_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(QuotaConfig(jobs_per_hour=0))
    with pytest.raises(ValueError):
        RateLimiter(QuotaConfig(cpu_seconds_per_minute=0))


# -- concurrency ------------------------------------------------------------------------------


def test_two_active_jobs_then_a_third_submission_is_refused() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 1.0)

    third = limiter.try_acquire(KEY, "c", 2.0)

    assert not third.allowed
    assert third.active_jobs == 2
    assert third.retry_after == CONCURRENCY_RETRY_AFTER
    assert third.reason is not None and "2 of 2 jobs queued or running" in third.reason
    # A refused try_acquire records nothing.
    assert limiter.check(KEY, 2.0).jobs_this_hour == 2


def test_releasing_a_job_frees_its_slot() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 0.0)

    limiter.release(KEY, "a", 5.0)

    assert limiter.try_acquire(KEY, "c", 5.0).allowed
    assert limiter.check(KEY, 5.0).active_jobs == 2


def test_releasing_twice_or_an_unknown_job_is_harmless() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 0.0)

    limiter.release(KEY, "a", 1.0)
    limiter.release(KEY, "a", 2.0)
    limiter.release(KEY, "never-submitted", 2.0)
    limiter.release("203.0.113.99", "a", 2.0)

    assert limiter.check(KEY, 2.0).active_jobs == 1
    assert limiter.tracked_keys() == 1


def test_acquiring_the_same_job_twice_counts_it_once() -> None:
    limiter = RateLimiter()
    limiter.acquire(KEY, "a", 0.0)
    limiter.acquire(KEY, "a", 1.0)

    decision = limiter.check(KEY, 1.0)

    assert (decision.active_jobs, decision.jobs_this_hour) == (1, 1)


def test_clients_do_not_share_slots() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 0.0)

    assert limiter.try_acquire("203.0.113.1", "c", 0.0).allowed


# -- hourly -----------------------------------------------------------------------------------


def test_twenty_jobs_in_an_hour_then_the_twenty_first_is_refused_until_the_first_leaves() -> None:
    limiter = RateLimiter()
    for i in range(20):
        run_job(limiter, f"job-{i}", 10.0 * i, cpu=0.1)

    refused = limiter.try_acquire(KEY, "job-20", 500.5)

    assert not refused.allowed
    assert refused.jobs_this_hour == 20
    assert refused.reason == (
        "Hourly job limit reached: 20 of 20 jobs submitted in the last 3600 s"
    )
    # The job submitted at 0.0 leaves the window at 3600.0.
    assert refused.retry_after == 3100
    assert not limiter.check(KEY, 500.5 + 3100 - 1).allowed
    assert limiter.try_acquire(KEY, "job-20", 500.5 + 3100).allowed


def test_hourly_retry_after_is_exact_at_a_whole_second_boundary() -> None:
    limiter = RateLimiter()
    for i in range(20):
        run_job(limiter, f"job-{i}", 100.0 + i, cpu=0.0)

    refused = assert_retry_after_exact(limiter, 200.0)

    assert refused.retry_after == 3500


def test_the_hourly_window_found_by_bisection_is_the_one_found_by_sorting() -> None:
    rng = random.Random(14)
    for _ in range(300):
        times, t = [], rng.uniform(0, 10)
        for _ in range(rng.randrange(0, 60)):
            t += rng.choice((0.0, 0.5, rng.uniform(0, 200)))  # ties and whole-second steps
            times.append(t)
        submissions = deque(times)
        limit = rng.randrange(1, 30)
        probes = [rng.uniform(0, t + 4000)] + [x + 3600.0 for x in times[:3]]
        for now in probes:  # including the exact instant a submission leaves the window
            assert _hourly_usage(submissions, now, limit, in_order=True) == \
                _hourly_usage(submissions, now, limit), (times, now, limit)


def test_after_the_clock_went_backwards_the_hourly_count_is_still_exact() -> None:
    limiter = RateLimiter(dataclasses.replace(QuotaConfig(), jobs_per_hour=3))
    for job_id, now in (("a", 1000.0), ("b", 500.0), ("c", 2000.0)):
        run_job(limiter, job_id, now, cpu=0.0)
    refused = limiter.check(KEY, 2001.0)
    assert not refused.allowed and refused.jobs_this_hour == 3
    assert refused.retry_after == 4100 - 2001  # the one at 500 leaves first, at 4100
    assert limiter.check(KEY, 4100.0).jobs_this_hour == 2


# -- CPU --------------------------------------------------------------------------------------


def test_cpu_charged_by_a_running_job_blocks_new_submissions_before_it_ends() -> None:
    limiter = RateLimiter()
    submit(limiter, "long", 0.0)

    assert limiter.charge_cpu(KEY, "long", 4.0, 1.0) == 4.0
    assert limiter.charge_cpu(KEY, "long", 9.5, 2.0) == 5.5
    assert limiter.check(KEY, 2.0).allowed
    assert limiter.charge_cpu(KEY, "long", 10.5, 3.0) == 1.0

    refused = limiter.check(KEY, 3.0)

    assert not refused.allowed
    assert refused.active_jobs == 1  # the job is still running: only CPU refuses
    assert refused.reason == "CPU quota exceeded: 10.5 of 10 CPU-seconds used in the last 60 s"
    assert refused.cpu_available == 0.0


def test_cpu_used_exactly_up_to_the_limit_refuses() -> None:
    limiter = RateLimiter()
    run_job(limiter, "a", 0.0, cpu=10.0)

    decision = limiter.check(KEY, 30.0)

    assert not decision.allowed
    assert decision.reason is not None and decision.reason.startswith("CPU quota exceeded")


def test_the_cpu_window_rolls_after_sixty_seconds() -> None:
    limiter = RateLimiter()
    run_job(limiter, "a", 0.0, cpu=12.0)

    assert not limiter.check(KEY, 59.99).allowed
    assert limiter.check(KEY, 60.0).allowed
    assert limiter.check(KEY, 60.0).cpu_used == 0.0


def test_cpu_retry_after_is_when_enough_old_samples_have_left() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 1.0, 0.25)
    limiter.charge_cpu(KEY, "a", 2.0, 5.5)
    limiter.charge_cpu(KEY, "a", 11.0, 20.75)
    limiter.release(KEY, "a", 21.0)

    # 11 used; the first sample leaving (at 60.25) leaves 10, still not below the limit;
    # the second leaving (at 65.5) leaves 9.
    refused = assert_retry_after_exact(limiter, 21.0)

    assert refused.retry_after == 45


def test_cpu_retry_after_is_exact_when_the_sample_leaves_on_a_whole_second() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 8.0, 3.0)
    limiter.release(KEY, "a", 4.5, cpu_seconds_total=10.0)

    refused = assert_retry_after_exact(limiter, 4.5)

    assert refused.retry_after == 59  # the 8 CPU-seconds at 3.0 leave at 63.0


def test_cpu_reported_in_the_same_second_is_merged_and_leaves_with_the_latest_part() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 5.0, 10.1)
    limiter.charge_cpu(KEY, "a", 10.0, 10.9)
    limiter.release(KEY, "a", 11.0)

    assert not limiter.check(KEY, 70.5).allowed
    assert limiter.check(KEY, 70.9).allowed


def test_a_job_reporting_cpu_many_times_a_second_keeps_few_samples() -> None:
    limiter = RateLimiter(QuotaConfig(cpu_seconds_per_minute=1e9))
    submit(limiter, "a", 0.0)
    for tick in range(1, 3001):  # ten reports a second for five minutes
        limiter.charge_cpu(KEY, "a", tick * 0.05, tick / 10)

    samples = limiter._clients[KEY].samples

    assert len(samples) <= 61
    assert limiter.check(KEY, 300.0).cpu_used == pytest.approx(60 * 0.5, abs=0.5)


def test_releasing_charges_the_final_cpu_and_later_reports_are_ignored() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 3.0, 1.0)

    limiter.release(KEY, "a", 2.0, cpu_seconds_total=7.0)

    assert limiter.charge_cpu(KEY, "a", 20.0, 3.0) == 0.0
    assert limiter.check(KEY, 3.0).cpu_used == 7.0


def test_a_lower_cumulative_cpu_report_charges_nothing() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    limiter.charge_cpu(KEY, "a", 5.0, 1.0)

    assert limiter.charge_cpu(KEY, "a", 4.0, 2.0) == 0.0
    assert limiter.charge_cpu(KEY, "a", 6.0, 3.0) == 1.0
    assert limiter.check(KEY, 3.0).cpu_used == 6.0


def test_cpu_for_a_job_never_acquired_is_not_charged() -> None:
    limiter = RateLimiter()

    assert limiter.charge_cpu(KEY, "ghost", 50.0, 1.0) == 0.0
    assert limiter.check(KEY, 1.0).allowed
    assert limiter.tracked_keys() == 0


# -- several rules ----------------------------------------------------------------------------


def test_when_several_rules_refuse_the_longest_wait_is_reported() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0)
    submit(limiter, "b", 0.0)
    limiter.charge_cpu(KEY, "a", 10.0, 1.0)

    refused = limiter.check(KEY, 2.0)

    assert refused.reason is not None and refused.reason.startswith("CPU quota exceeded")
    assert refused.retry_after == 59

    later = limiter.check(KEY, 59.5)  # CPU frees at 61.0, in 2 s; concurrency says 5 s

    assert later.reason is not None and later.reason.startswith("Too many active jobs")
    assert later.retry_after == CONCURRENCY_RETRY_AFTER


# -- idle reset and bounded state -------------------------------------------------------------


def test_a_client_idle_for_an_hour_is_forgotten_and_starts_fresh() -> None:
    limiter = RateLimiter()
    for i in range(20):
        run_job(limiter, f"job-{i}", float(i), cpu=0.5)
    assert limiter.tracked_keys() == 1

    assert limiter.expire(19.0 + 3599.9) == 0
    assert limiter.tracked_keys() == 1
    assert limiter.expire(19.0 + 3600.0) == 1
    assert limiter.tracked_keys() == 0

    fresh = limiter.check(KEY, 3620.0)
    assert (fresh.allowed, fresh.jobs_this_hour, fresh.cpu_used) == (True, 0, 0.0)


def test_a_client_with_a_running_job_is_never_forgotten() -> None:
    limiter = RateLimiter()
    submit(limiter, "forever", 0.0)

    assert limiter.expire(100_000.0) == 0
    assert limiter.check(KEY, 100_000.0).active_jobs == 1


def test_idle_clients_are_swept_by_later_checks_without_a_timer() -> None:
    limiter = RateLimiter(sweep_interval=60.0)
    for n in range(5):
        run_job(limiter, "a", 0.0, cpu=1.0, key=f"192.0.2.{n}")
    limiter.check("203.0.113.1", 3600.0)  # sweeps
    assert limiter.tracked_keys() == 0

    run_job(limiter, "b", 3601.0, cpu=1.0, key="192.0.2.9")  # idle from 7201.0
    limiter.check("203.0.113.1", 7150.0)  # sweeps, too early for this key
    limiter.check("203.0.113.1", 7201.0)  # less than 60 s since the last sweep: none
    assert limiter.tracked_keys() == 1
    limiter.check("203.0.113.1", 7210.0)
    assert limiter.tracked_keys() == 0


def test_checking_and_reading_quotas_create_no_state() -> None:
    limiter = RateLimiter()

    for n in range(100):
        limiter.check(f"192.0.2.{n}", float(n))
        limiter.quota(f"192.0.2.{n}", float(n))

    assert limiter.tracked_keys() == 0


def test_an_idle_client_is_fresh_even_before_any_sweep() -> None:
    limiter = RateLimiter(sweep_interval=1e9)
    limiter.check(KEY, 0.0)  # the one sweep
    for i in range(20):
        run_job(limiter, f"job-{i}", 1.0, cpu=0.0)
    assert not limiter.check(KEY, 2.0).allowed

    assert limiter.try_acquire(KEY, "again", 1.0 + 3600.0).allowed


# -- client keys ------------------------------------------------------------------------------


def test_ipv6_clients_in_one_slash_64_share_their_quota() -> None:
    limiter = RateLimiter()
    submit(limiter, "a", 0.0, key=client_key("2001:db8:1:2::1"))
    submit(limiter, "b", 0.0, key=client_key("2001:db8:1:2::2"))

    assert not limiter.check(client_key("2001:db8:1:2::3"), 0.0).allowed
    assert limiter.check(client_key("2001:db8:1:3::1"), 0.0).allowed


# -- property: retry_after is exact -----------------------------------------------------------


def test_retry_after_is_exact_for_random_charge_patterns() -> None:
    rng = random.Random(1)
    refusals_checked = 0
    for _ in range(300):
        limiter = RateLimiter(QuotaConfig(cpu_seconds_per_minute=rng.choice([1.0, 2.5, 10.0])))
        now = rng.uniform(0, 1000)
        for job in range(rng.randint(1, 6)):
            limiter.acquire(KEY, f"job-{job}", now)
            total = 0.0
            for _ in range(rng.randint(1, 8)):
                now += rng.choice([0.001, 0.1, 0.5, 1.0, rng.uniform(0, 20)])
                total += rng.choice([0.0, 0.01, 0.3, rng.uniform(0, 4)])
                limiter.charge_cpu(KEY, f"job-{job}", total, now)
            limiter.release(KEY, f"job-{job}", now)
        now += rng.uniform(0, 70)
        decision = limiter.check(KEY, now)
        if decision.allowed:
            assert decision.retry_after == 0
            continue
        refusals_checked += 1
        later = now + decision.retry_after
        assert not limiter.check(KEY, later - 1).allowed, (now, decision)
        assert limiter.check(KEY, later).allowed, (now, decision)
    assert refusals_checked > 50
