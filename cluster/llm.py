"""`LLM`: the offline API, in the shape vLLM users know.

    llm = LLM(model="/path/to/hf_dir")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
    outs[0].outputs[0].token_ids, outs[0].outputs[0].text

    with LLM(model=path, tensor_parallel_size=2, pipeline_parallel_size=2) as llm:   # 4 ranks, one host
        ...
"""
from __future__ import annotations

import itertools
import os
from dataclasses import replace

from tqdm.auto import tqdm

from cluster.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig
from cluster.types import CompletionOutput, RequestOutput, SamplingParams, TokenDelta


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto", *,
                 max_model_len: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                 kv_memory_bytes: int | None = None, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, enable_chunked_prefill: bool = True,
                 attention_backend: str = "auto", enable_cuda_graphs: bool = True, async_scheduling: bool = True,
                 seed: int = 0,
                 tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None,
                 expert_parallel: bool | None = None, parallel_config: ParallelConfig | None = None,
                 progress: bool = True):
        """tensor_parallel_size x pipeline_parallel_size ranks serve the model: this process is rank 0
        and starts the others itself (one host). `expert_parallel` spreads MoE experts over the
        tensor-parallel ranks instead of splitting each. `parallel_config` sets the remaining
        knobs (overlap, addresses, timeouts); the three arguments above override its sizes."""
        from cluster.engine.engine import Engine
        from cluster.models.tokenizer import Tokenizer

        if model is None:
            from cluster.models.make import ensure_default_model

            model = ensure_default_model()
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model {model!r} is not a local checkpoint directory")
        config = EngineConfig(
            model=ModelConfig(path=model, dtype=dtype, max_model_len=max_model_len, seed=seed),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_budget_bytes=kv_memory_bytes,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill),
            runner=RunnerConfig(device=device, attention_backend=attention_backend, enable_cuda_graphs=enable_cuda_graphs,
                                async_scheduling=async_scheduling),
            parallel=_parallel(parallel_config, tensor_parallel_size, pipeline_parallel_size, expert_parallel),
        )
        tokenizer = Tokenizer.from_dir(model) if os.path.isfile(os.path.join(model, "tokenizer.json")) else None
        self.engine = Engine(config, tokenizer=tokenizer, progress=progress)
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt (text or token ids) to completion; outputs in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        for n, ((_, ids), p) in enumerate(zip(encoded, params_list)):  # validate all before queueing any
            self.engine.validate(f"check-{n}", ids, p)
        outputs: dict[str, RequestOutput] = {}
        order = []
        for (text, ids), p in zip(encoded, params_list):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, p, prompt=text)
            outputs[request_id] = RequestOutput(request_id, text, ids, [CompletionOutput(i, "", []) for i in range(p.n)], False)
            if p.logprobs is not None:
                for c in outputs[request_id].outputs:
                    c.logprobs = []
            order.append(request_id)
        bar = tqdm(total=len(order), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                if _accumulate(outputs[delta.request_id], delta):
                    bar.update(1)
        bar.close()
        return [outputs[r] for r in order]

    def shutdown(self) -> None:
        """Stop the instance's other ranks; a single-process LLM needs no call."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token id lists")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)


def _parallel(base: ParallelConfig | None, tp: int | None, pp: int | None, expert_parallel: bool | None) -> ParallelConfig:
    base = base or ParallelConfig()
    tp = base.tensor_parallel_size if tp is None else tp
    pp = base.pipeline_parallel_size if pp is None else pp
    ep = base.expert_parallel_size if expert_parallel is None else (tp if expert_parallel else 1)
    return replace(base, tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep)


def _accumulate(out: RequestOutput, delta: TokenDelta) -> bool:
    """Add a step's delta; True when this completes the request."""
    comp = out.outputs[delta.index]
    comp.token_ids.extend(delta.token_ids)
    comp.text += delta.text
    if delta.logprobs is not None and comp.logprobs is not None:
        comp.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        comp.finish_reason, comp.stop_reason = delta.finish_reason, delta.stop_reason
        out.num_cached_tokens = delta.num_cached_tokens
    out.finished = all(c.finished for c in out.outputs)
    return out.finished and delta.finish_reason is not None
