"""Real multi-rank instances on CPU (torch.multiprocessing spawn + gloo on 127.0.0.1), against one process.

Each instance runs the same workload twice: with its overlap switch off, then on (flipped
at run time, as a benchmark does). The workload has chunked prefill (a 29-token budget,
so long prompts are cut, and cut again into micro-batches) and two late prompts that hit
the prefix cache. Greedy tokens must equal the single-process engine's and the top-5
logprobs (the logits up to a shift) be allclose in float32. A killed rank must fail the
instance with a clear error within seconds.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from cluster.config import EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig
from cluster.engine.engine import Engine
from cluster.engine.executor import InstanceFailed
from cluster.models.hf_config import load_arch_config
from cluster.types import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
PROMPT_LENS = (1, 5, 17, 40, 70)
BUDGET_TOKENS = 29
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)


def _prompts(model_dir: str) -> list[list[int]]:
    rng = random.Random(7)
    vocab = load_arch_config(model_dir).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]
    shared = prompts[-1][:64]  # four full blocks of the 70-token prompt: prefix-cache hits for the late two
    return prompts + [shared + [rng.randrange(vocab) for _ in range(5)], shared + [rng.randrange(vocab) for _ in range(11)]]


def _engine(model_dir: str, device: str = "cpu", **parallel) -> Engine:
    cfg = EngineConfig(model=ModelConfig(path=model_dir, dtype="float32"), runner=RunnerConfig(device=device),
                       scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET_TOKENS),
                       parallel=ParallelConfig(overlap_min_tokens=2, **parallel))
    return Engine(cfg, progress=False)


def _run(engine: Engine, prompts: list[list[int]], tag: str) -> list[list]:
    """Greedy outputs [(token, logprob, sorted top-5 logprobs)] per prompt; the late two arrive at step 8."""
    late = len(prompts) - 2
    got: dict[str, list] = {f"{tag}{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts[:late]):
        engine.add_request(f"{tag}{i}", p, PARAMS)
    steps = 0
    while engine.has_unfinished() or steps <= 8:
        if steps == 8:
            for i in range(late, len(prompts)):
                engine.add_request(f"{tag}{i}", prompts[i], PARAMS)
        for delta in engine.step():
            lp = delta.logprobs[0]
            got[delta.request_id].append((delta.token_ids[0], lp.logprob, sorted(lp.top.values())))
        steps += 1
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return [got[f"{tag}{i}"] for i in range(len(prompts))]


def _assert_same(got: list[list], expected: list[list]) -> None:
    for out, ref in zip(got, expected):
        assert [t for t, _, _ in out] == [t for t, _, _ in ref]
        for (_, lp, top), (_, ref_lp, ref_top) in zip(out, ref):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert top == pytest.approx(ref_top, abs=1e-4)


def _expert_load(engine: Engine) -> list[list[int]]:
    layers = engine.model.model.layers.values()
    return [layer.mlp.experts.tokens_per_expert.tolist() for layer in layers]


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """Single-process results (and MoE expert loads) per checkpoint, computed once."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            model_dir = checkpoint_dir(name)
            engine = _engine(model_dir)
            outputs = _run(engine, _prompts(model_dir), "ref")
            assert engine.kv.prefix_hit_rate() > 0
            made[name] = (model_dir, outputs, _expert_load(engine) if engine.arch.is_moe else None)
        return made[name]

    return get


CASES = {
    # name: (checkpoint, instance sizes, the flag flipped for the second run)
    "tp2": ("llama", dict(tensor_parallel_size=2), dict(overlap_tp=True)),
    "tp2-kv-replicated-tied": ("llama_tied_mqa_rope3_sharded", dict(tensor_parallel_size=2), dict(overlap_tp=True)),
    "pp2": ("qwen2", dict(pipeline_parallel_size=2), dict(async_pp=False, num_microbatches=3)),
    # balanced: stage 0 also reads the LM head (1.8 layers' worth here), so it runs 1 layer and stage 1 runs 3
    "pp2-uneven-stages": ("llama_4_layers", dict(pipeline_parallel_size=2), dict(async_pp=False)),
    # a batch more than the stages: stage 0 computes the third while the last stage returns the first's rows
    "pp2-three-batches": ("qwen2", dict(pipeline_parallel_size=2, pp_batches_in_flight=3), dict(async_pp=False)),
    "ep2": ("mixtral", dict(tensor_parallel_size=2, expert_parallel_size=2), dict(overlap_ep=True, overlap_tp=True)),
    "tp2-moe-shared-expert": ("qwen2_moe", dict(tensor_parallel_size=2), dict(overlap_tp=True)),
    "ep2-shared-expert": ("qwen2_moe", dict(tensor_parallel_size=2, expert_parallel_size=2), dict(overlap_ep=True)),
    # the attention's and the dense MLP's all-reduce left to the norm after them (one kernel on CUDA; here the
    # all-reduce and the add-and-norm); with overlap the split steps reduce in the layers as before
    "tp2-fused-norm": ("llama", dict(tensor_parallel_size=2, fuse_all_reduce_norm=True), dict(overlap_tp=True)),
    "tp2-moe-fused-norm": ("qwen2_moe", dict(tensor_parallel_size=2, fuse_all_reduce_norm=True), dict(overlap_tp=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_instance_matches_single_process(reference, case):
    name, sizes, flipped = CASES[case]
    model_dir, expected, expected_load = reference(name)
    prompts = _prompts(model_dir)
    engine = _engine(model_dir, **sizes)
    try:
        worker = engine.executor.worker
        if case == "pp2-uneven-stages":
            assert [list(r) for r in worker.stage_ranges] == [[0], [1, 2, 3]]
        layers = list(worker.model.model.layers.values())
        fused_norm = sizes.get("fuse_all_reduce_norm", False)
        assert all(layer.self_attn.o_proj.defers_to_norm == fused_norm for layer in layers)
        assert all(getattr(layer.mlp, "down_proj", None) is None or layer.mlp.down_proj.defers_to_norm == fused_norm
                   for layer in layers)  # (a MoE block reduces its own output)
        _assert_same(_run(engine, prompts, "off"), expected)
        if case == "pp2-three-batches":
            assert engine.executor.steps_in_flight == 3 and engine.max_steps_in_flight == 3
        split_before = worker.num_split_steps
        if expected_load is not None:  # every routed token counted once, on the rank that ran its expert
            assert engine.executor.stats(reset=True)["tokens_per_expert"] == expected_load
        engine.executor.set_flags(**flipped)
        _assert_same(_run(engine, prompts, "on"), expected)
        if "overlap_tp" in flipped or "overlap_ep" in flipped:
            assert worker.num_split_steps > split_before, "no step ran as two overlapping micro-batches"
        if "num_microbatches" in flipped:
            assert worker.num_split_steps > 0
        assert engine.kv.prefix_hit_rate() > 0
    finally:
        engine.shutdown()
    assert all(not proc.is_alive() for proc in engine.executor.procs)


def test_tp2_pp2_through_the_llm_api(checkpoint_dir):
    """Four processes, 2 stages x 2 tensor-parallel ranks, started by LLM itself."""
    from cluster import LLM

    model_dir = checkpoint_dir("qwen3")
    prompts = _prompts(model_dir)
    kwargs = dict(model=model_dir, device="cpu", max_num_batched_tokens=BUDGET_TOKENS, progress=False)

    def outputs(llm):
        return [[(t, lp.logprob, sorted(lp.top.values())) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                for o in llm.generate(prompts, PARAMS)]

    expected = outputs(LLM(**kwargs))
    # stage 0 hands stage 1 its hidden state with the last layer's all-reduce done (left to the norm
    # inside a stage: ParallelConfig.fuse_all_reduce_norm)
    with LLM(**kwargs, tensor_parallel_size=2, pipeline_parallel_size=2,
             parallel_config=ParallelConfig(fuse_all_reduce_norm=True)) as llm:
        _assert_same(outputs(llm), expected)
        llm.engine.executor.set_flags(num_microbatches=3, async_pp=False)
        _assert_same(outputs(llm), expected)  # the second time every shared prefix is cached
        assert llm.engine.kv.prefix_hit_rate() > 0


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_killed_rank_fails_the_instance_quickly(checkpoint_dir, layout):
    """pp2: with async scheduling two batches are in the stages, so the rank dies with a step
    launched whose rows stage 0 has yet to wait for."""
    engine = _engine(checkpoint_dir("llama"), **layout)
    try:
        for i in range(4):
            engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=10_000, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine.forwarded or "pipeline_parallel_size" not in layout  # a launched step in the stages
        victim = engine.executor.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(InstanceFailed, match=rf"rank 1 \(pid {victim.pid}\) was killed by SIGKILL"):
            for _ in range(100_000):
                engine.step()
        assert time.monotonic() - started < 5
        with pytest.raises(InstanceFailed, match="rank 1"):  # and every later step, at once
            engine.step()
    finally:
        engine.shutdown()
    assert not any(proc.is_alive() for proc in engine.executor.procs)
