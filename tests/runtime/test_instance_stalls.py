"""An instance actor's stall figures (worst step, worst wait between steps, command time), used
in-process as Ray would host it: they cover the steps since the last stats() call, then reset."""
from __future__ import annotations

import gc
import time

from cluster.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from cluster.runtime.gc_pauses import GcPauses, freeze_startup_objects
from cluster.runtime.instance import InstanceActor, RequestSpec
from cluster.types import Role, SamplingParams


def test_stall_figures_cover_the_steps_since_the_last_heartbeat(checkpoint_dir):
    cfg = EngineConfig(model=ModelConfig(path=checkpoint_dir("llama")), cache=CacheConfig(num_blocks=64))
    actor = InstanceActor("mixed-0", Role.MIXED, cfg, DisaggConfig())
    try:
        assert actor.num_frozen > 10_000  # torch's, the engine's: start-up's objects left the collector's walk
        actor.stats()  # start of the window
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        for i in range(3):
            actor.submit(RequestSpec(f"r{i}", [5, 6, 7, 8 + i], params))
        tokens, deadline = 0, time.monotonic() + 60
        while tokens < 3 * 24 and time.monotonic() < deadline:
            deltas, _, error = actor.next_deltas(0.5)
            assert error is None
            tokens += sum(len(d.token_ids) for d in deltas)
        assert tokens == 3 * 24
        stats = actor.stats()
        assert stats["max_step_ms"] > 0 and stats["max_step_ms"] >= stats["mean_step_ms"]
        # the decode-only steps (the streams' inter-token gaps) leave the prompt steps out
        assert 0 < stats["mean_decode_step_ms"] <= stats["max_step_ms"]
        assert stats["num_steps"] > 0
        assert 0 <= stats["max_step_gap_ms"] < 10_000
        assert stats["commands_ms"] > 0  # the three submits ran on the loop between steps
        assert stats["max_gc_ms"] >= 0
        again = actor.stats()
        assert again["max_step_ms"] == again["max_step_gap_ms"] == again["commands_ms"] == 0
        assert again["mean_step_ms"] is None and again["mean_decode_step_ms"] is None
    finally:
        actor.shutdown()
        actor.loop.join(10)
        gc.unfreeze()


def test_idle_time_between_two_bursts_is_not_a_stall(checkpoint_dir):
    """The wait between steps counts only while work is in hand: a request after a second of idleness
    is no 1 s stall (a one-GPU sweep read 2.0-2.4 s 'gaps' at each rate's start: the idle time before it)."""
    cfg = EngineConfig(model=ModelConfig(path=checkpoint_dir("llama")), cache=CacheConfig(num_blocks=64))
    actor = InstanceActor("mixed-0", Role.MIXED, cfg, DisaggConfig())
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def serve(request_id: str) -> None:
        actor.submit(RequestSpec(request_id, [5, 6, 7, 8], params))
        tokens, deadline = 0, time.monotonic() + 60
        while tokens < 4 and time.monotonic() < deadline:
            deltas, _, error = actor.next_deltas(0.5)
            assert error is None
            tokens += sum(len(d.token_ids) for d in deltas)

    try:
        serve("r0")
        actor.stats()
        time.sleep(1.0)  # idle
        serve("r1")
        assert actor.stats()["max_step_gap_ms"] < 500
    finally:
        actor.shutdown()
        actor.loop.join(10)
        gc.unfreeze()


def test_freezing_start_up_objects_shortens_full_collections():
    """A full collection walks every tracked object: in a process that imported torch that is most
    of the pause; frozen, they are not walked. GcPauses times each collection."""
    import torch  # noqa: F401  (the objects a serving process starts with)

    pauses = GcPauses()
    try:
        gc.collect()
        before = pauses.take_max_ms()
        assert before > 0 and pauses.take_max_ms() == 0
        assert freeze_startup_objects() > 10_000
        pauses.take_max_ms()
        gc.collect()
        after = pauses.take_max_ms()
        assert after < before / 3, (before, after)
    finally:
        pauses.close()
        gc.unfreeze()


def test_a_confirmation_does_not_wait_for_the_step_in_progress(checkpoint_dir):
    """The router's confirmation that the decode side has a request's KV is taken at once, on the Ray
    thread that brings it, not queued behind the prefill step in progress (on 2xH200 a step of four 2k
    prompts takes 0.2 s, and the router waited that long per confirmation while the streams stalled)."""
    import threading

    cfg = EngineConfig(model=ModelConfig(path=checkpoint_dir("llama")), cache=CacheConfig(num_blocks=64))
    actor = InstanceActor("prefill-0", Role.PREFILL, cfg, DisaggConfig())
    try:
        busy = threading.Thread(target=actor._call, args=(lambda: time.sleep(1.5),), daemon=True)
        busy.start()  # the loop thread is now inside a 1.5 s piece of work
        time.sleep(0.2)
        t0 = time.monotonic()
        actor.confirm("not-in-flight")  # a request it no longer holds: a no-op, but answered now
        assert time.monotonic() - t0 < 0.5
        busy.join(5)
    finally:
        actor.shutdown()
        actor.loop.join(10)


def test_a_prompt_the_loop_has_not_taken_yet_counts_as_queued(checkpoint_dir):
    """A prompt submitted during a long step waits in the instance's inbox until the step ends; the
    heartbeat counts it among the queued prompt tokens (the router forgets at each heartbeat what it
    dispatched since the last one, and admission would not see it anywhere)."""
    import threading

    cfg = EngineConfig(model=ModelConfig(path=checkpoint_dir("llama")), cache=CacheConfig(num_blocks=64))
    actor = InstanceActor("mixed-0", Role.MIXED, cfg, DisaggConfig())
    try:
        busy = threading.Thread(target=actor._call, args=(lambda: time.sleep(1.5),), daemon=True)
        busy.start()
        time.sleep(0.2)
        params = SamplingParams(temperature=0.0, max_tokens=2)
        submit = threading.Thread(target=actor.submit, args=(RequestSpec("r0", list(range(5, 45)), params),), daemon=True)
        submit.start()
        time.sleep(0.2)
        assert actor.stats()["num_queued_prefill_tokens"] == 40  # in the inbox, behind the busy loop
        busy.join(5)
        submit.join(5)
        deadline = time.monotonic() + 30
        while actor.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert actor.stats()["num_queued_prefill_tokens"] == 0 and actor.num_inbox_tokens == 0
    finally:
        actor.shutdown()
        actor.loop.join(10)
