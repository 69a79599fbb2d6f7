"""CUDA graphs for pure-decode steps.

A decode step of a large model is hundreds of small kernels; launching them
one by one costs more than running them at small batch. We capture the whole
forward once per batch-size bucket into static buffers and replay it:

    bucket sizes: 1 2 4 8 16 24 32 40 ... max_batch
    a batch of 5 runs the graph of 8; rows 5..7 are padding
    (slot -1: their KV is not written; seq_len 1: they read one harmless entry;
     MoE layers leave them out of their expert load through `real_rows`)

The attention backend must be capturable (no host sync, no `*_cpu` fields), which
the Triton backend is; the graph's metadata uses the model's maximum context as
an upper bound for the kernel grid.

A pipeline stage other than the first captures its share of the layers from a static
buffer of incoming activations (`replay(inputs, hidden)` copies them in). The output
is a static buffer too: the next replay of the same size overwrites it, so a caller
that keeps it past that (a stage sending it on) copies it first.
"""
from __future__ import annotations

import torch

from cluster.engine.attention.base import AttentionMetadata, AttnInputs
from cluster.models.moe import StackedExperts


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 8))
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        dev, n = runner.device, self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.real_rows = torch.zeros(n, dtype=torch.int64, device=dev)  # 1 for a step's rows, 0 for padding
        self.load_counters = [m for m in runner.model.modules() if isinstance(m, StackedExperts)]
        self.hidden = None  # a later pipeline stage's input: the previous stage's activations
        if not getattr(runner.model, "is_first_stage", True):
            self.hidden = torch.zeros(n, runner.model.cfg.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        max_len = self.runner.max_blocks_per_seq * self.runner.block_size
        return AttentionMetadata(self.query_start_loc[: bs + 1], self.seq_lens[:bs], self.block_tables[:bs],
                                 self.slot_mapping[:bs], 1, max_len, [], [])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        try:
            self._capture_buckets()
        finally:  # eager steps count every row they run
            for counter in self.load_counters:
                counter.row_mask = None

    def _capture_buckets(self) -> None:
        pool = None
        for bs in reversed(self.sizes):
            for counter in self.load_counters:  # the warm-up and the capture count nothing (all zeros)
                counter.row_mask = self.real_rows[:bs]
            attn = AttnInputs(self.runner.backend, self._meta(bs), self.runner.kv_caches)
            hidden = self.hidden[:bs] if self.hidden is not None else None
            run = lambda: self.runner.model(self.input_ids[:bs], self.positions[:bs], attn, hidden)  # noqa: E731
            run()  # warm up (Triton compiles, cuBLAS picks kernels) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = run()
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, inputs) -> bool:
        return inputs.meta.num_seqs <= self.max_batch

    def replay(self, inputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        num = inputs.meta.num_seqs
        bs = next(b for b in self.sizes if b >= num)
        meta = inputs.meta
        if self.hidden is not None:
            self.hidden[:num].copy_(hidden)
        self.input_ids[:num].copy_(inputs.input_ids)
        self.positions[:num].copy_(inputs.positions)
        self.slot_mapping[:num].copy_(meta.slot_mapping)
        self.slot_mapping[num:bs].fill_(-1)
        self.seq_lens[:num].copy_(meta.seq_lens)
        self.seq_lens[num:bs].fill_(1)
        self.real_rows[:num].fill_(1)
        self.real_rows[num:bs].fill_(0)
        self.block_tables[:num, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.outputs[bs][:num]
