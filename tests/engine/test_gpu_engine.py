"""GPU engine (Triton attention + CUDA graphs) against transformers: run with `make test-gpu`."""
from __future__ import annotations

import random

import pytest
import torch

from tests.engine.test_parity import _hf_greedy

pytestmark = pytest.mark.gpu
MAX_DRIFT = 0.25  # nats: how far a bf16 MoE engine's logprobs may move with rounding alone (4 bf16 spacings at 8-16)


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("GPU TESTS NOT RUN: no CUDA device; run `make test-gpu` on the GPU machine")


@pytest.mark.parametrize("name", ["llama", "llama_head_dim", "qwen3_moe"])
def test_cuda_graph_engine_matches_transformers(checkpoint_dir, name):
    from cluster import LLM, SamplingParams

    model_dir = checkpoint_dir(name)
    rng = random.Random(2)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (1, 7, 33, 120, 250)]
    expected = _hf_greedy(model_dir, prompts)
    llm = LLM(model=model_dir, device="cuda", dtype="float32", progress=False)
    assert (llm.engine.runner.graphs is not None) == (not llm.engine.arch.is_moe)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32))
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_moe_decode_runs_as_cuda_graphs_with_the_grouped_gemm(checkpoint_dir):
    """bf16 on Hopper: the MoE layers' grouped GEMM never waits for the host, so decode is captured.
    The captured engine counts exactly the eager engine's expert load (a bucket's padded rows are
    not counted: every layer sees top_k x the tokens the steps ran), and gives the eager engine's
    tokens except where bf16 rounding may part them: the captured step splits attention for the
    bucket's upper-bound context (the eager one for the batch's real one) and may pad the experts'
    GEMMs, so a greedy path may turn only at a near-tie of the eager engine's top two tokens (on
    2026-11-30's H200 one of four prompts turned at its 4th token, twice)."""
    from cluster import LLM, SamplingParams
    from cluster.parallel.experts import grouped_mm_runs

    if not grouped_mm_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("GPU TESTS NOT RUN: torch._grouped_mm needs bf16 on a Hopper-class GPU")
    model_dir = checkpoint_dir("qwen3_moe")
    rng = random.Random(4)
    lens = (3, 17, 64, 130)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in lens]
    max_tokens = 24
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    outputs, loads = [], []
    for graphs in (False, True):
        llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", enable_cuda_graphs=graphs, progress=False)
        assert (llm.engine.runner.graphs is not None) == graphs
        outputs.append([o.outputs[0] for o in llm.generate(prompts, params)])
        experts = [layer.mlp.experts for layer in llm.engine.model.model.layers.values()]
        top_k = llm.engine.model.cfg.num_experts_per_tok
        loads.append([e.tokens_per_expert.sum().item() for e in experts])
        del llm
        torch.cuda.empty_cache()
    ran = sum(lens) + len(prompts) * (max_tokens - 1)  # each prompt, then each sampled token but the last
    assert loads[0] == loads[1] == [top_k * ran] * len(loads[0])
    # Up to and including a turn the two engines ran on the same tokens, so their logprobs differ only
    # by how each rounds: bf16 logits (a 0.0625 spacing at this model's logit size), attention split
    # for another context length, GEMM tilings for padded rows, and through those a router's choice
    # between two near-tied experts. That stays within MAX_DRIFT nats; a real fault (a wrong expert
    # for a row, stale KV, padded rows leaking in) moves logprobs by whole nats. A turn is then a
    # near-tie the rounding flipped. 2026-11-30's H200: a turn at the 4th token at an eager top-2 gap of
    # 0.19 (3 spacings), after a drift of 0.046 on the steps before it.
    for eager, graphed in zip(*outputs):
        turn = next((i for i, (a, b) in enumerate(zip(eager.token_ids, graphed.token_ids)) if a != b), None)
        steps = len(eager.token_ids) if turn is None else turn + 1
        drift = max((abs(e.top[t] - g.top[t]) for e, g in zip(eager.logprobs[:steps], graphed.logprobs[:steps])
                     for t in e.top.keys() & g.top.keys()), default=0.0)
        assert drift <= MAX_DRIFT, dict(turn=turn, drift=drift, eager_tops=[e.top for e in eager.logprobs[:steps]],
                                        graphed_tops=[g.top for g in graphed.logprobs[:steps]])
        if turn is not None:
            top = eager.logprobs[turn].top
            gap = top[eager.token_ids[turn]] - top.get(graphed.token_ids[turn], float("-inf"))
            assert gap <= 2 * MAX_DRIFT, dict(turn=turn, gap=gap, eager_top=top, graphed_top=graphed.logprobs[turn].top)


def test_async_scheduling_on_cuda_gives_the_synchronous_engines_outputs(checkpoint_dir):
    """Async scheduling on the GPU path (CUDA graphs, pinned copies, events): placeholders filled on
    the device, tokens read back a step late. The workload of test_async_scheduling.py (stops while
    the next step runs, seeds, n=2, logprobs, penalties, the context limit) gives the tokens and
    finish reasons of the synchronous engine on the same GPU (float32)."""
    from tests.engine.test_async_scheduling import _engine, _run, _workload

    model_dir = checkpoint_dir("qwen2")
    requests = _workload(model_dir)

    def tokens(async_scheduling: bool) -> dict:
        engine = _engine(model_dir, async_scheduling=async_scheduling, device="cuda")
        assert engine.runner.graphs is not None
        return {key: (rec["ids"], rec["end"]) for key, rec in _run(engine, requests).items()}

    assert tokens(True) == tokens(False)


def _compiled_triton_variants() -> int:
    """How many compiled variants our Triton kernels hold in this process, all devices together."""
    from triton.runtime.jit import JITFunction

    from cluster.engine.attention import triton as triton_attention, triton_store
    from cluster.ops import fused_triton

    kernels = [v for m in (triton_attention, triton_store, fused_triton) for v in vars(m).values()
               if isinstance(v, JITFunction)]
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


@pytest.mark.parametrize("graphs", [False, True])
def test_no_triton_kernel_compiles_once_the_engine_serves(checkpoint_dir, graphs):
    """The runner's warm-up runs every kernel variant before the engine serves: batches of 1 to 40,
    prompts of 1 to 300 tokens, decodes split over 1 to many KV ranges, then compile nothing new (a
    compile mid-serving stalls a step for a second or more: on 2026-11-30's fresh 2xH200 the first
    1P1D requests waited 2.4-3.8 s for their first token)."""
    from cluster import LLM, SamplingParams

    llm = LLM(model=checkpoint_dir("llama"), device="cuda", dtype="bfloat16", enable_cuda_graphs=graphs,
              max_model_len=512, progress=False)
    before = _compiled_triton_variants()
    assert before > 0
    rng = random.Random(5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for batch in (1, 3, 17, 40):
        prompts = [[rng.randrange(900) for _ in range(rng.choice((1, 2, 16, 17, 63, 129, 300)))] for _ in range(batch)]
        llm.generate(prompts, params)
    runner = llm.engine.runner  # the KV hand-over's block copy: groups of layers and one, any block count
    for num_blocks in (1, 3, 17):
        index = runner.block_index(list(range(num_blocks)))
        runner.write_kv_layers(0, index, runner.read_kv_layers(0, 2, index))  # the same bytes back
        runner.write_kv(1, index, runner.read_kv(1, index))
    torch.cuda.synchronize()
    assert _compiled_triton_variants() == before
