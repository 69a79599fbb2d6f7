"""StepMeter: the figures an instance's heartbeat reports, from steps with known times."""
from __future__ import annotations

import pytest

from cluster.runtime.step_meter import StepMeter


def test_rates_and_means_over_a_saturated_window():
    meter = StepMeter()
    meter.window_start_s = 100.0
    meter.record(100.0, 100.2, num_prefilled=2048, ran_model=True, prompts_queued=True, busy=True)
    meter.record(100.2, 100.3, num_prefilled=0, ran_model=True, prompts_queued=True, busy=True)
    meter.record(100.3, 100.5, num_prefilled=2048, ran_model=True, prompts_queued=True, busy=True)
    stats = meter.drain(now_s=101.0)
    assert stats["num_steps"] == 3
    assert stats["prefill_tokens_per_s"] == pytest.approx(4096 / 1.0)
    assert stats["mean_step_ms"] == pytest.approx(500 / 3)
    assert stats["mean_decode_step_ms"] == pytest.approx(100)
    assert stats["max_step_ms"] == pytest.approx(200) and stats["max_step_gap_ms"] == pytest.approx(0)
    # drained: the next window starts empty
    empty = meter.drain(now_s=102.0)
    assert empty["mean_step_ms"] is None and empty["prefill_tokens_per_s"] is None and empty["max_step_ms"] == 0


def test_a_window_whose_queue_ran_dry_has_no_rate():
    meter = StepMeter()
    meter.window_start_s = 0.0
    meter.record(0.0, 0.1, num_prefilled=100, ran_model=True, prompts_queued=False, busy=True)  # a lone prompt
    meter.record(0.1, 0.2, num_prefilled=100, ran_model=True, prompts_queued=True, busy=True)
    assert meter.drain(now_s=1.0)["prefill_tokens_per_s"] is None


def test_idle_time_is_not_a_stall_but_a_wait_between_busy_steps_is():
    meter = StepMeter()
    meter.record(0.0, 0.01, num_prefilled=0, ran_model=True, prompts_queued=False, busy=False)
    meter.idle()  # nothing to run for a second
    meter.record(1.0, 1.01, num_prefilled=0, ran_model=True, prompts_queued=False, busy=True)
    meter.record(1.05, 1.06, num_prefilled=0, ran_model=True, prompts_queued=False, busy=True)
    meter.add_commands(0.003)
    stats = meter.drain(now_s=2.0)
    assert stats["max_step_gap_ms"] == pytest.approx(40)  # 1.01 -> 1.05, not the idle second
    assert stats["commands_ms"] == pytest.approx(3)


def test_a_transfer_poll_that_ran_no_model_ends_the_gap_once_idle():
    meter = StepMeter()
    meter.record(0.0, 0.01, num_prefilled=0, ran_model=True, prompts_queued=False, busy=True)
    meter.record(0.02, 0.021, num_prefilled=0, ran_model=False, prompts_queued=False, busy=False)
    meter.record(5.0, 5.01, num_prefilled=0, ran_model=True, prompts_queued=False, busy=True)
    assert meter.drain(now_s=6.0)["max_step_gap_ms"] == 0


def test_queue_time_ends_at_the_first_step_that_schedules_the_request():
    from cluster.runtime.step_meter import QueueTimes

    times = QueueTimes()
    times.submitted("a", 10.0)
    times.submitted("b", 10.5)
    times.submitted("gone", 10.0)
    requests = {"a": object(), "b": object()}  # "gone" was aborted while queued
    times.check([], 11.0, requests)
    assert times.drain() == [] and set(times.since) == {"a", "b", "gone"}
    times.check(["a", "a"], 12.0, requests)  # n > 1: each sequence of "a" admitted; the first one counts
    times.check(["b"], 12.5, {})  # prefilled and ended within the step that admitted it: gone already
    assert times.drain() == [pytest.approx(2.0), pytest.approx(2.0)] and set(times.since) == {"gone"}
    assert times.drain() == []
    times.check(["preempted-and-readmitted"], 13.0, requests)  # never submitted here: nothing to count
    for _ in range(QueueTimes.PRUNE_EVERY):
        times.check([], 14.0, requests)
    assert times.since == {} and times.drain() == []  # the aborted one is dropped, never counted
