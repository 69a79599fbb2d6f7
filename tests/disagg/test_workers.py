"""Prefill and decode workers in one process over the loopback transport: same tokens as one engine."""
from __future__ import annotations

import random

import pytest
import torch

from cluster.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.disagg.decode import DecodeWorker
from cluster.disagg.prefill import PrefillWorker
from cluster.disagg.roles import EventKind, InstanceEvent, RequestSpec
from cluster.disagg.transfer.loopback import LoopbackHub, LoopbackTransport
from cluster.engine.engine import Engine
from cluster.types import Role, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _engine(model_dir, role, budget=8192):
    cfg = EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=200),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    return Engine(cfg, role=role, progress=False)


def _pair(model_dir, cfg=DisaggConfig(transport="loopback"), budget=8192, prefill_engine=None, decode_engine=None):
    """A prefill and a decode worker over one loopback link (engines made here unless given)."""
    hub = LoopbackHub()
    p_t, d_t = LoopbackTransport(hub), LoopbackTransport(hub)
    p_t.connect("D", d_t.listen(), False)
    d_t.connect("P", p_t.listen(), True)
    return (PrefillWorker(prefill_engine or _engine(model_dir, Role.PREFILL, budget), p_t, cfg),
            DecodeWorker(decode_engine or _engine(model_dir, Role.DECODE), d_t, cfg))


def _serve(prefill, decode, prompts) -> dict:
    """Reserve on decode, prefill, stream, land, decode; confirm so prefill frees its copy."""
    got: dict = {}
    for i, p in enumerate(prompts):
        assert decode.reserve(RequestSpec(str(i), p, PARAMS), "P", i)
        prefill.submit_prefill(RequestSpec(str(i), p, PARAMS), "D", i)
    for _ in range(500):
        for d in prefill.step() + decode.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
        for rid in list(prefill.plans):
            if rid not in decode.pending:
                prefill.confirm(rid)
        prefill.poll()
        if not (prefill.engine.has_unfinished() or decode.engine.has_unfinished() or decode.pending or prefill.plans):
            break
    return got


def run_to_end(engine, prompts, params) -> dict[str, list[int]]:
    """Request id (the prompt's index) -> every token `engine` generates for it, run to the end."""
    out = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


def _expected(model_dir, prompts):
    return run_to_end(_engine(model_dir, Role.MIXED), prompts, PARAMS)


@pytest.mark.parametrize("group_bytes", [None, 1, 10000])
def test_layerwise_streaming_gives_the_same_tokens(checkpoint_dir, monkeypatch, group_bytes):
    """A request's layers leave in groups of up to GROUP_BYTES, each once its last layer is written:
    the default (the tiny model's KV is one group), one layer a message, and groups that cut the
    prompts' layers differently per request (the messages of a step interleave across requests)."""
    import cluster.disagg.prefill as prefill_module

    if group_bytes is not None:
        monkeypatch.setattr(prefill_module, "GROUP_BYTES", group_bytes)
    model_dir = checkpoint_dir("qwen2")
    rng = random.Random(5)
    lens = (3, 17, 64, 150)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in lens]
    expected = _expected(model_dir, prompts)
    # a small budget chunks the long prompts: KV of earlier chunks is streamed with the last one
    prefill, decode = _pair(model_dir, budget=48)
    posted: dict[int, list] = {}
    announced_order, posted_order = [], []
    send, announce = prefill.transport.send_layer, prefill.transport.announce

    def recording_send(peer_id, transfer_id, index, count, kv):  # what goes on the link, then sent as is
        posted.setdefault(transfer_id, []).append((index, count, kv.shape[0]))
        posted_order.append((transfer_id, index))
        send(peer_id, transfer_id, index, count, kv)

    def recording_announce(peer_id, messages):
        announced_order.extend((m[0], m[1]) for m in messages)
        announce(peer_id, messages)

    prefill.transport.send_layer, prefill.transport.announce = recording_send, recording_announce
    got = _serve(prefill, decode, prompts)
    assert got == expected
    assert prefill.stats()["kv_bytes_sent"] > 0
    assert posted_order == announced_order  # a real link checks each message against the next header
    num_layers = prefill.engine.arch.num_layers
    engine = prefill.engine
    layer_bytes = [2 * -(-n // engine.kv.block_size) * engine.kv.block_size * engine.arch.num_kv_heads
                   * engine.arch.head_dim * 4 for n in lens]
    per_group = [num_layers if group_bytes is None else max(1, group_bytes // b) for b in layer_bytes]
    for i, group in enumerate(per_group):
        count = -(-num_layers // group) + 1
        assert [index for index, _, _ in posted[i]] == list(range(count))
        assert all(c == count for _, c, _ in posted[i])
        assert sum(layers for _, _, layers in posted[i][:-1]) == num_layers  # then the first token
    if group_bytes == 10000:
        assert len(set(per_group)) > 1 and min(per_group) < num_layers
    for engine in (prefill.engine, decode.engine):
        assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV leaked"


def test_failed_transfer_is_recomputed_on_decode_at_once(checkpoint_dir):
    """The link is gone: the decode instance recomputes the prompt itself as soon as the transfer
    fails, with no word from the router, samples the first token itself (the same as the prefill's,
    which the router checks) and says so in an event. The prefill side frees its copy."""
    model_dir = checkpoint_dir("qwen2")
    prompt = list(range(40, 90))
    expected = _expected(model_dir, [prompt])["0"]
    prefill, decode = _pair(model_dir, DisaggConfig(transport="loopback", transfer_timeout_s=0.2))
    assert decode.reserve(RequestSpec("0", prompt, PARAMS), "P", 1)
    prefill.transport.links.clear()  # the link is gone: every send fails
    prefill.submit_prefill(RequestSpec("0", prompt, PARAMS), "D", 1)
    first = prefill.step()[0]
    assert first.token_ids == expected[:1]
    import time

    got, events = [], []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not events or decode.engine.has_unfinished()):
        for d in decode.step():
            got.extend(d.token_ids)
        events += decode.take_events()
        time.sleep(0.01)
    assert events == [InstanceEvent(EventKind.RECOMPUTING, "0")]
    assert decode.num_recomputed == 1
    assert got == expected  # its own first token, then the rest
    prefill.poll()
    assert prefill.engine.kv.num_free_blocks == prefill.engine.kv.num_blocks
    assert decode.engine.kv.num_free_blocks == decode.engine.kv.num_blocks


def test_a_prefill_aborted_between_its_chunks_leaves_the_engine_clean(checkpoint_dir):
    """The router aborts a started prefill when decode refuses the request (CI caught this race): the
    abort lands between two chunks of the prompt. The sequence must leave the scheduler with its
    blocks, not stay scheduled on freed blocks (the next step raised KeyError), and the instance
    serves the next request unchanged."""
    model_dir = checkpoint_dir("qwen2")
    prompts = [list(range(100, 250)), list(range(20, 60))]
    expected = _expected(model_dir, prompts[1:])["0"]
    prefill, decode = _pair(model_dir, budget=48)  # 150 tokens: 4 chunks
    prefill.submit_prefill(RequestSpec("big", prompts[0], PARAMS), "D", 7)
    assert prefill.step() == []  # the first chunk ran; no token yet
    assert prefill.engine.kv.num_free_blocks < prefill.engine.kv.num_blocks
    prefill.abort("big")
    assert not prefill.engine.has_unfinished() and not prefill.plans
    assert prefill.step() == []
    assert prefill.engine.kv.num_free_blocks == prefill.engine.kv.num_blocks, "the aborted prompt's KV leaked"
    assert _serve(prefill, decode, prompts[1:])["0"] == expected


def test_a_request_that_ends_at_its_first_token_frees_the_prefill_copy_unconfirmed(checkpoint_dir):
    """max_tokens=1: prefill's first token is the last; the router stops decode rather than confirming,
    so prefill frees its copy once its sends are done, not after release_timeout_s."""
    model_dir = checkpoint_dir("qwen2")
    prefill, decode = _pair(model_dir, DisaggConfig(transport="loopback", release_timeout_s=600))
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    assert decode.reserve(RequestSpec("0", list(range(40, 90)), one), "P", 1)
    prefill.submit_prefill(RequestSpec("0", list(range(40, 90)), one), "D", 1)
    first = prefill.step()[0]
    assert len(first.token_ids) == 1 and first.finish_reason is not None
    for _ in range(100):
        decode.step()  # lands the transfer: the sends are done
        prefill.poll()
        if not prefill.plans:
            break
    assert not prefill.plans and prefill.engine.kv.num_free_blocks == prefill.engine.kv.num_blocks


def test_prefill_tp2_to_decode_tp1_reshards_kv_heads(checkpoint_dir):
    """A 2-rank prefill instance (real processes, gloo) gathers its KV head shards for a 1-rank decode."""
    from cluster.config import ParallelConfig

    model_dir = checkpoint_dir("qwen2")
    rng = random.Random(9)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (5, 40, 90)]
    expected = _expected(model_dir, prompts)
    cfg = EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=200),
                       parallel=ParallelConfig(tensor_parallel_size=2))
    tp2 = Engine(cfg, role=Role.PREFILL, progress=False)
    try:
        prefill, decode = _pair(model_dir, prefill_engine=tp2)
        got = _serve(prefill, decode, prompts)
        assert got == expected
    finally:
        tp2.executor.shutdown()


@pytest.mark.parametrize("model, group_bytes, overlap", [
    ("qwen2", None, False), ("qwen2", 1, False), ("qwen2", 1, True),
    ("llama_tied_mqa_rope3_sharded", 1, False),  # one KV head: both ranks hold it, rank 0 sends one copy
])
def test_prefill_tp2_streams_its_kv_groups_during_the_step(checkpoint_dir, monkeypatch, model, group_bytes, overlap):
    """A 2-rank prefill instance (real processes, gloo) streams: each group of layers is gathered from
    both ranks and posted while the step computes (inside the forward, its sink set), in the order
    announced, one layer a message or the whole KV in one; the tokens match one engine's. With the
    tp overlap on, the step runs as two micro-batches and the groups leave after both."""
    from cluster.config import ParallelConfig

    import cluster.disagg.prefill as prefill_module

    if group_bytes is not None:
        monkeypatch.setattr(prefill_module, "GROUP_BYTES", group_bytes)
    model_dir = checkpoint_dir(model)
    rng = random.Random(4)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (7, 33, 70)]
    expected = _expected(model_dir, prompts)
    parallel = ParallelConfig(tensor_parallel_size=2, overlap_tp_comm=overlap, overlap_min_tokens=2)
    tp2 = Engine(EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=200), parallel=parallel),
                 role=Role.PREFILL, progress=False)
    try:
        prefill, decode = _pair(model_dir, prefill_engine=tp2)
        send, announce = prefill.transport.send_layer, prefill.transport.announce
        posted, announced, during_step = [], [], []

        def recording_send(peer_id, transfer_id, index, count, kv):
            posted.append((transfer_id, index))
            during_step.append(getattr(tp2.executor.worker, "kv_sink", None) is not None or kv.dtype == torch.int64)
            return send(peer_id, transfer_id, index, count, kv)

        def recording_announce(peer_id, messages):
            announced.extend((m[0], m[1]) for m in messages)
            announce(peer_id, messages)

        prefill.transport.send_layer, prefill.transport.announce = recording_send, recording_announce
        assert _serve(prefill, decode, prompts) == expected
        assert posted == announced and all(during_step)  # KV from the forward's hook; the first token after
        num_layers = tp2.arch.num_layers
        per_transfer = 2 if group_bytes is None else num_layers + 1  # KV messages, then the first token
        assert len(posted) == len(prompts) * per_transfer
        assert (tp2.executor.worker.num_split_steps > 0) == overlap
    finally:
        tp2.executor.shutdown()


def _parallel_engine(model_dir, role, tp, pp=1):
    from cluster.config import ParallelConfig

    cfg = EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=200),
                       parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    return Engine(cfg, role=role, progress=False)


@pytest.mark.parametrize("model, prefill_layout, decode_layout", [
    ("qwen2", (1, 1), (2, 1)),  # KV heads split over the decode ranks
    ("qwen2", (2, 1), (2, 1)),  # the same tp on both sides (still all heads on the wire)
    ("llama_tied_mqa_rope3_sharded", (1, 1), (2, 1)),  # one KV head, replicated on both decode ranks
    ("qwen2", (1, 2), (1, 1)),  # a pipelined prefill: stage 1's layers reach rank 0 first
    ("qwen2", (1, 1), (1, 2)),  # a pipelined decode: rank 0 hands stage 1 its layers
    ("qwen2", (2, 2), (2, 2)),  # both hops on both sides: 4 ranks each
    ("llama_4_layers", (1, 2), (1, 2)),  # uneven stages (1 + 3 layers) on both sides
])
def test_kv_moves_between_instances_of_any_tp_x_pp(checkpoint_dir, model, prefill_layout, decode_layout):
    """Real rank processes (gloo): the prefill instance gathers every layer's heads to its rank 0,
    the decode instance scatters them to the ranks that hold those heads and layers."""
    model_dir = checkpoint_dir(model)
    rng = random.Random(11)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (5, 40, 90)]
    expected = _expected(model_dir, prompts)
    engines = []
    try:
        if prefill_layout != (1, 1):
            engines.append(_parallel_engine(model_dir, Role.PREFILL, *prefill_layout))
        prefill_engine = engines[0] if engines else _engine(model_dir, Role.PREFILL, 8192)
        decode_engine = _parallel_engine(model_dir, Role.DECODE, *decode_layout)
        engines.append(decode_engine)
        prefill, decode = _pair(model_dir, prefill_engine=prefill_engine, decode_engine=decode_engine)
        assert _serve(prefill, decode, prompts) == expected
        assert decode.engine.kv.num_free_blocks == decode.engine.kv.num_blocks
    finally:
        for engine in engines:
            engine.executor.shutdown()
