"""A step as plain host data: what every rank needs to run it, and its wire form.

  (1) the driver flattens the scheduler's output into a `StepPlan` (`plan_step`):
      prefill chunks and decodes back to back, with positions, KV slots, block
      tables and the rows whose last position samples;
  (2) a multi-rank instance packs it into int64 tensors (`pack`): a fixed-size header,
      broadcast first so the other ranks know the sizes, then the payload;
  (3) every rank unpacks the same plan (`unpack`) and uploads it (`ModelRunner.upload`);
  (4) micro-batches are plans too (`split`). A cut may fall inside a sequence's chunk:
      its two pieces run as two chunks of that sequence, the first before the second
      at every layer, so the second finds the first's KV written:

          tokens   | s0 (5)        | s1 (1) | s2 (6)            |
          cut at 4 | s0[0:4] || s0[4:5]  s1  s2                 |
                     part 0     part 1 (s0 continues at position 4)

  (5) a prefill instance of several ranks also names the rows whose prompt KV leaves during
      the step (`streams`: row, prompt blocks, layers a message): every rank gathers those
      groups of layers to rank 0 as they are written (kv_handover.py, `stream_hook`).

Wire layout (all int64):
    header   [command, flags, num_tokens, num_seqs, table_width, num_sampling, num_microbatches, num_streams]
    payload  input_ids[T] positions[T] slot_mapping[T] query_start_loc[S+1] seq_lens[S]
             block_tables[S*W] logits_indices[N] streams[3*M]
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

HEADER_SIZE = 8


class Command(enum.IntEnum):
    STEP = 1  # run the plan in the payload
    STATS = 2  # send counters to the driver (no payload)
    SHUTDOWN = 3  # leave the loop
    GATHER_KV = 4  # send rank 0 every layer's KV of the blocks in the payload (KV hand-over)
    SCATTER_KV = 5  # take this rank's heads of every layer's KV of the blocks in the payload from rank 0
    FINISH = 6  # the oldest deferred step: wait for its returned rows, logits (stage 0), share its tokens


@dataclass
class StepPlan:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # context length of each sequence including this step's tokens
    block_tables: np.ndarray  # int32 [num_seqs, width]
    logits_indices: list[int]  # rows whose hidden state samples, in sampling order
    sampling_seqs: list = field(default_factory=list)  # the Sequences of those rows (driver only)
    # rows whose prompt KV streams out in this step: (row, prompt blocks, layers a message), in send order
    streams: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def max_query_len(self) -> int:
        starts = self.query_start_loc
        return max(b - a for a, b in zip(starts, starts[1:]))


def plan_step(sched, block_size: int) -> StepPlan:
    ids, positions, slots, query_start, seq_lens, logits_idx, sampling = [], [], [], [0], [], [], []
    width = max(len(item.seq.block_ids) for item in sched.scheduled)
    block_tables = np.zeros((len(sched.scheduled), width), dtype=np.int32)
    for row, item in enumerate(sched.scheduled):
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        blocks = seq.block_ids
        bs = block_size
        slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
        block_tables[row, : len(blocks)] = _block_row(seq)
        query_start.append(query_start[-1] + item.num_new_tokens)
        seq_lens.append(end)
        if item.samples:
            logits_idx.append(query_start[-1] - 1)
            sampling.append(seq)
    return StepPlan(ids, positions, slots, query_start, seq_lens, block_tables, logits_idx, sampling)


def _block_row(seq) -> np.ndarray:
    """`seq.block_ids` as an int32 array, kept between steps: converting a Python list of a long
    context's block ids for every sequence of every step was most of a batch-64 plan's host time.
    The KV manager only appends to the list or puts a new list in its place, so the list's identity
    and length say whether the copy is current."""
    blocks, cached = seq.block_ids, seq.block_row_cache
    if cached is None or cached[0] is not blocks or len(cached[1]) != len(blocks):
        cached = seq.block_row_cache = (blocks, np.asarray(blocks, dtype=np.int32))
    return cached[1]


def split(plan: StepPlan, num_parts: int) -> list[StepPlan]:
    """Cut the plan's tokens into up to `num_parts` near-equal runs (never an empty one)."""
    num_tokens = plan.num_tokens
    cuts = sorted({round(i * num_tokens / num_parts) for i in range(num_parts + 1)})
    return [_tokens(plan, lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def _tokens(plan: StepPlan, lo: int, hi: int) -> StepPlan:
    """The plan restricted to tokens [lo, hi)."""
    starts = plan.query_start_loc
    rows = [s for s in range(plan.num_seqs) if starts[s] < hi and starts[s + 1] > lo]
    query_start, seq_lens = [0], []
    for s in rows:
        a, b = max(starts[s], lo), min(starts[s + 1], hi)
        query_start.append(query_start[-1] + b - a)
        seq_lens.append(plan.seq_lens[s] - (starts[s + 1] - b))  # later tokens of s are not context yet
    logits = [i - lo for i in plan.logits_indices if lo <= i < hi]
    return StepPlan(plan.input_ids[lo:hi], plan.positions[lo:hi], plan.slot_mapping[lo:hi], query_start, seq_lens,
                    plan.block_tables[rows[0] : rows[-1] + 1], logits)


def pack(plan: StepPlan | None, command: Command, flags: int = 0, num_microbatches: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(header, payload) int64 CPU tensors; payload None for commands without a plan."""
    if plan is None:
        return torch.tensor([int(command), flags, 0, 0, 0, 0, num_microbatches, 0], dtype=torch.int64), None
    tables = plan.block_tables
    parts = [plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start_loc, plan.seq_lens]
    payload = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]
                             + [tables.astype(np.int64).ravel(), np.asarray(plan.logits_indices, dtype=np.int64),
                                np.asarray(plan.streams, dtype=np.int64).reshape(-1)])
    header = [int(command), flags, plan.num_tokens, plan.num_seqs, tables.shape[1], len(plan.logits_indices), num_microbatches,
              len(plan.streams)]
    return torch.tensor(header, dtype=torch.int64), torch.from_numpy(payload)


def payload_size(header: torch.Tensor) -> int:
    _, _, num_tokens, num_seqs, width, num_sampling, _, num_streams = header.tolist()
    return 3 * num_tokens + (num_seqs + 1) + num_seqs + num_seqs * width + num_sampling + 3 * num_streams if num_seqs else 0


def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
    _, _, num_tokens, num_seqs, width, num_sampling, _, num_streams = header.tolist()
    data = payload.numpy()
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width, num_sampling, 3 * num_streams]
    pieces, start = [], 0
    for size in sizes:
        pieces.append(data[start : start + size])
        start += size
    ids, positions, slots, query_start, seq_lens, tables, logits, streams = pieces
    return StepPlan(ids.tolist(), positions.tolist(), slots.tolist(), query_start.tolist(), seq_lens.tolist(),
                    tables.astype(np.int32).reshape(num_seqs, width), logits.tolist(),
                    streams=[tuple(row) for row in streams.reshape(-1, 3).tolist()])
