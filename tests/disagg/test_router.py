"""The router's view of an instance: how long a prompt sent now would queue there."""
from cluster.disagg.router import InstanceView
from cluster.types import Role


def test_estimated_wait_is_the_queue_ahead_over_the_measured_prefill_rate_drained_since_the_heartbeat():
    view = InstanceView("prefill-0", Role.PREFILL, handle=None)
    assert view.estimated_wait_s(0.0) is None  # nothing measured yet: admission cannot judge
    view.refresh({"num_queued_prefill_tokens": 900, "prefill_tokens_per_s": 1000.0}, now_s=100.0)
    assert view.estimated_wait_s(100.0) == 0.9
    view.dispatched(500, now_s=100.0)  # sent since the heartbeat: ahead of the next prompt too
    assert view.estimated_wait_s(100.0) == 1.4
    assert abs(view.estimated_wait_s(100.5) - 0.9) < 1e-9  # half a second of prefill at 1000 tokens/s has run since
    assert view.estimated_wait_s(103.0) == 0.0  # drained, as far as the model knows
    view.refresh({"num_queued_prefill_tokens": 0, "prefill_tokens_per_s": 3000.0}, now_s=104.0)  # median of 1000, 3000
    assert view.prefill_rate == 2000.0 and view.estimated_wait_s(104.0) == 0.0
    view.refresh({"num_queued_prefill_tokens": 100, "prefill_tokens_per_s": None}, now_s=105.0)  # no prefill since
    assert view.prefill_rate == 2000.0 and view.estimated_wait_s(105.0) == 0.05


def test_one_slow_heartbeat_does_not_move_the_rate():
    """The rate is the median of the last heartbeats' rates: a window whose prefill waited on something
    else (a collection, a stall) does not halve it, as a running mean did (2xH200: admission then
    refused requests while the prefill instance sat idle)."""
    view = InstanceView("prefill-0", Role.PREFILL, handle=None)
    for i, rate in enumerate((40_000.0, 41_000.0, 39_000.0, 2_000.0, 40_500.0)):
        view.refresh({"num_queued_prefill_tokens": 4096, "prefill_tokens_per_s": rate}, now_s=float(i))
    assert view.prefill_rate == 40_000.0
    assert abs(view.estimated_wait_s(4.0) - 4096 / 40_000) < 1e-9
    for i in range(8):  # a lasting slowdown is followed once it holds most of the window
        view.refresh({"num_queued_prefill_tokens": 0, "prefill_tokens_per_s": 10_000.0}, now_s=5.0 + i)
    assert view.prefill_rate == 10_000.0


def test_a_dispatch_while_the_heartbeat_asked_stays_counted():
    """Stats asked for at t=10 and back at t=10.2: what was dispatched before t=10 is in them, what was
    dispatched while the request was on its way may not be, and stays counted (it was dropped, so a
    burst in that gap read as an idle instance)."""
    view = InstanceView("prefill-0", Role.PREFILL, handle=None)
    view.dispatched(300, now_s=9.9)
    view.dispatched(200, now_s=10.1)
    view.refresh({"num_queued_prefill_tokens": 300, "prefill_tokens_per_s": 1000.0}, now_s=10.2, asked_s=10.0)
    assert view.dispatched_tokens == 200 and view.dispatched_requests == 1
    assert view.queued_prefill_tokens() == 500
    view.refresh({"num_queued_prefill_tokens": 200, "prefill_tokens_per_s": 1000.0}, now_s=11.2, asked_s=11.0)
    assert view.dispatched_tokens == 0 and view.queued_prefill_tokens() == 200
