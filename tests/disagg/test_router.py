"""The router's view of an instance: how long a prompt sent now would queue there."""
from cluster.disagg.router import InstanceView
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
