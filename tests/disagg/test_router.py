"""The router's view of an instance: how long a prompt sent now would queue there, how fast it steps."""
from cluster.disagg.router import InstanceView, Router
from cluster.types import Role


def test_estimated_wait_is_the_queue_ahead_over_the_measured_prefill_rate_drained_since_the_heartbeat():
    view = InstanceView("prefill-0", Role.PREFILL, handle=None)
    assert view.estimated_wait_s(0.0) is None  # nothing measured yet: admission cannot judge
    view.refresh({"num_queued_prefill_tokens": 900, "prefill_tokens_per_s": 1000.0}, now_s=100.0)
    assert view.estimated_wait_s(100.0) == 0.9
    view.dispatched(500)  # sent since the heartbeat: ahead of the next prompt too
    assert view.estimated_wait_s(100.0) == 1.4
    assert abs(view.estimated_wait_s(100.5) - 0.9) < 1e-9  # half a second of prefill at 1000 tokens/s has run since
    assert view.estimated_wait_s(103.0) == 0.0  # drained, as far as the model knows
    view.refresh({"num_queued_prefill_tokens": 0, "prefill_tokens_per_s": 3000.0}, now_s=104.0)  # (1000 + 3000) / 2
    assert view.prefill_rate == 2000.0 and view.estimated_wait_s(104.0) == 0.0
    view.refresh({"num_queued_prefill_tokens": 100, "prefill_tokens_per_s": None}, now_s=105.0)  # no prefill since
    assert view.prefill_rate == 2000.0 and view.estimated_wait_s(105.0) == 0.05


def test_queue_wait_is_the_shortest_over_the_pool_and_unknown_while_an_instance_is_unmeasured():
    a, b = InstanceView("p0", Role.PREFILL, None), InstanceView("p1", Role.PREFILL, None)
    a.refresh({"num_queued_prefill_tokens": 4000, "prefill_tokens_per_s": 1000.0}, now_s=0.0)
    assert Router.queue_wait_s([a, b], now_s=0.0) is None  # b may take the prompt: admission cannot refuse yet
    b.refresh({"num_queued_prefill_tokens": 1000, "prefill_tokens_per_s": 2000.0}, now_s=0.0)
    assert Router.queue_wait_s([a, b], now_s=0.0) == 0.5
    b.alive = False
    assert Router.queue_wait_s([a, b], now_s=0.0) == 4.0 and Router.queue_wait_s([]) is None


def test_decode_step_is_the_fastest_over_the_pool_and_zero_for_an_idle_instance():
    a, b = InstanceView("d0", Role.DECODE, None), InstanceView("d1", Role.DECODE, None)
    a.refresh({"mean_step_ms": 30.0})
    b.refresh({"mean_step_ms": 45.0})
    assert Router.decode_step_ms([a, b]) == 30.0
    b.refresh({"mean_step_ms": None})  # no step since its last heartbeat: idle, a stream starts at once
    assert Router.decode_step_ms([a, b]) == 0.0 and Router.decode_step_ms([]) is None
