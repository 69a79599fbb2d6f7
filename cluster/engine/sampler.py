"""The sampler: turns each sequence's last-position logits into its next token.

The model runner calls `Sampler()(logits, batch)` once per step, row i of
`logits` [num_rows, vocab] being the sequence described by row i of `batch`.
Every row goes through, in vLLM's order:

  1. Penalties, on a float32 copy of the logits: repetition (tokens seen in the
     prompt or the output: positive logits / r, negative ones * r), then
     frequency (- f * count in the output) and presence (- p * [count > 0]).
  2. min_tokens: while len(output) < min_tokens, the row's stop_token_ids and
     (unless ignore_eos) the model's eos ids get -inf.
  3. Greedy rows (temperature < 1e-5) take the argmax of these logits.
  4. Random rows: / temperature; top-k keeps exactly k tokens; top-p keeps the
     smallest highest-probability prefix of the (renormalised) top-k
     distribution whose mass is >= top_p; min-p drops probs < min_p * max prob;
     then an exponential race, argmax(probs / E) with E ~ Exponential(1).
     A row with a generator draws its E from it alone, so a seeded request gets
     the same tokens whatever its neighbours or its row index.
  5. Logprobs, for rows that ask: log_softmax of the logits of steps 1-2 (not
     of 4), read at the sampled token and at the top N.

Fast path: a batch of greedy rows with nothing to do in 1, 2 and 5 is one argmax.

Two phases, so an engine can queue the next step before this one's tokens reach the host
(async scheduling, engine.py): `on_device` queues every kernel and returns a `DeviceSample`
without waiting for the device (its host-to-device copies go through pinned memory; a pageable
copy would wait for all queued work), and `DeviceSample.to_host` waits for it and reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.platform import to_device_async
from cluster.types import SamplingParams, TokenLogprob


@dataclass
class SamplingBatch:
    """What the sampler needs to know about the rows of one step (row i is logits[i])."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # seeded per request, on the logits' device; None: global RNG
    prompt_token_ids: list[list[int]]  # read by repetition_penalty only
    output_token_ids: list[list[int]]  # generated so far: all penalties and min_tokens
    eos_token_ids: frozenset[int] = frozenset()
    # async scheduling: an output may end in a placeholder -(1 + r) for a token still on the device,
    # row r of these (the previous step's sampled tokens); the penalties count it from there
    pending_tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        num_rows = len(self.params)
        for name in ("generators", "prompt_token_ids", "output_token_ids"):
            num_given = len(getattr(self, name))
            if num_given != num_rows:
                raise ValueError(f"SamplingBatch.{name} has {num_given} rows, params has {num_rows}")

    @property
    def num_rows(self) -> int:
        return len(self.params)

    def blocked_token_ids(self, row: int) -> frozenset[int]:
        """Token ids that min_tokens forbids for this row now (empty once it has enough output)."""
        params = self.params[row]
        if len(self.output_token_ids[row]) >= params.min_tokens:
            return frozenset()
        stop_ids = frozenset(params.stop_token_ids)
        return stop_ids if params.ignore_eos else stop_ids | self.eos_token_ids


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where params.logprobs is None; `top` holds exactly N entries


class DeviceSample:
    """One step's sampled tokens (and asked-for logprobs) still on the device. `start_copy` queues
    their copy to pinned host memory; `to_host` waits for it (only for it) and reads them."""

    def __init__(self, token_ids: torch.Tensor, logprob_rows: list[int], wanted: list[int],
                 logprob_tensors: tuple[torch.Tensor, ...] = ()):
        self.token_ids = token_ids  # int64 [rows]
        self.logprob_rows = logprob_rows  # rows that asked for logprobs
        self.wanted = wanted  # how many top entries each of those rows asked for
        self._tensors = (token_ids, *logprob_tensors)  # + sampled logprob [k], top values [k, N], top ids [k, N]
        self._host: tuple[torch.Tensor, ...] | None = None
        self._ready = None

    def start_copy(self) -> "DeviceSample":
        if self._host is None and self.token_ids.is_cuda:
            self._host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                               for t in self._tensors)
            self._ready = torch.cuda.Event()
            self._ready.record()
        return self

    def to_host(self) -> SamplerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        tensors = self._host or self._tensors
        token_ids = tensors[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if self.logprob_rows:
            sampled, top_values, top_ids = (t.tolist() for t in tensors[1:])
            for j, row in enumerate(self.logprob_rows):
                top = dict(zip(top_ids[j][: self.wanted[j]], top_values[j][: self.wanted[j]]))
                logprobs[row] = TokenLogprob(token_id=token_ids[row], logprob=sampled[j], top=top)
        return SamplerOutput(token_ids, logprobs)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.on_device(logits, batch).to_host()

    def on_device(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """Queue the sampling of every row; nothing here waits for the device."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match a batch of {batch.num_rows} rows")
        if _is_plain_greedy(batch):
            return DeviceSample(logits.argmax(dim=-1), [], [])
        processed = self.process_logits(logits, batch)
        token_ids = _pick_tokens(processed, batch)
        return _logprobs_on_device(processed, token_ids, batch)

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Steps 1-2: a float32 copy of `logits` with penalties and min_tokens masks applied."""
        processed = logits.to(torch.float32, copy=True)
        if any(p.needs_penalties for p in batch.params):
            processed = _apply_penalties(processed, batch)
        _mask_min_tokens(processed, batch)
        return processed


def _is_plain_greedy(batch: SamplingBatch) -> bool:
    return all(
        p.greedy and not p.needs_penalties and p.logprobs is None and not batch.blocked_token_ids(i)
        for i, p in enumerate(batch.params)
    )


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    params = batch.params
    device = logits.device
    output_ids = [ids if p.needs_penalties else [] for p, ids in zip(params, batch.output_token_ids)]
    output_counts = _token_counts(output_ids, logits.shape[1], device)
    _count_pending(output_counts, output_ids, batch.pending_tokens)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_ids = [ids if p.repetition_penalty != 1.0 else [] for p, ids in zip(params, batch.prompt_token_ids)]
        seen = (_token_counts(prompt_ids, logits.shape[1], device) > 0) | (output_counts > 0)
        penalty = _column([p.repetition_penalty for p in params], device)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if any(p.frequency_penalty != 0 for p in params):
        logits = logits - _column([p.frequency_penalty for p in params], device) * output_counts
    if any(p.presence_penalty != 0 for p in params):
        logits = logits - _column([p.presence_penalty for p in params], device) * (output_counts > 0)
    return logits


def _token_counts(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """float32 [num_rows, vocab_size]: how often each token id occurs in each row.

    Rows are padded with the id `vocab_size`, which counts into a spare last
    column that is cut off; ids outside the logits land there too.
    """
    width = max((len(ids) for ids in rows), default=0)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = _device_tensor([ids + [vocab_size] * (width - len(ids)) for ids in rows], torch.long, device)
    padded = padded.masked_fill((padded < 0) | (padded > vocab_size), vocab_size)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def _count_pending(counts: torch.Tensor, rows: list[list[int]], pending_tokens: torch.Tensor | None) -> None:
    """Count each row's placeholder (its last output token, not on the host yet) at the token it
    stands for, read on the device: a step with penalties need not wait for the last one's tokens."""
    pending = [(row, -ids[-1] - 1) for row, ids in enumerate(rows) if ids and ids[-1] < 0]
    if not pending:
        return
    if pending_tokens is None:
        raise RuntimeError("an output ends in a placeholder but the sampler was given no pending tokens")
    device = counts.device
    row_index = _device_tensor([row for row, _ in pending], torch.long, device)
    tokens = pending_tokens[_device_tensor([src for _, src in pending], torch.long, device)].to(device)
    counts.index_put_((row_index, tokens), torch.ones(len(pending), device=device), accumulate=True)


def _mask_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> None:
    rows: list[int] = []
    cols: list[int] = []
    for row in range(batch.num_rows):
        for token_id in batch.blocked_token_ids(row):
            if token_id < logits.shape[1]:
                rows.append(row)
                cols.append(token_id)
    if rows:
        index = (_device_tensor(rows, torch.long, logits.device), _device_tensor(cols, torch.long, logits.device))
        logits.index_put_(index, torch.full((), float("-inf"), device=logits.device))


def _pick_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 3-4: int64 [num_rows] token ids; greedy rows argmax, the others sample."""
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(batch.params) if not p.greedy]
    if not random_rows:
        return token_ids
    if len(random_rows) == batch.num_rows:
        return _sample(logits, batch.params, batch.generators)
    index = _device_tensor(random_rows, torch.long, logits.device)
    params = [batch.params[i] for i in random_rows]
    generators = [batch.generators[i] for i in random_rows]
    token_ids[index] = _sample(logits[index], params, generators)
    return token_ids


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    device = logits.device
    vocab_size = logits.shape[1]
    logits = logits / _column([p.temperature for p in params], device)
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    if any(k < vocab_size for k in top_k) or any(p.top_p < 1 for p in params):
        top_p = _column([p.top_p for p in params], device)
        logits = _apply_top_k_top_p(logits, _column(top_k, device, torch.long), top_p)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        threshold = _column([p.min_p for p in params], device) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return _exponential_race(probs, generators)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k then top-p set; top_k [rows, 1] (vocab: off), top_p [rows, 1] (1: off).

    In sorted order (stable, so tied logits rank by token id and the k kept are
    always the same k):

        rank:        0     1     2     3  ...
        prob:       .40   .25   .15   .10
        mass_before: 0    .40   .65   .80      top_p = .7 keeps ranks 0..2

    Rank 0 has mass_before 0 < top_p, so at least one token always survives.
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    sorted_logits.masked_fill_(ranks >= top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 rows are left alone: a float32 cumsum can reach 1 before the tail.
    sorted_logits.masked_fill_((mass_before >= top_p) & (top_p < 1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """argmax(probs / E), E ~ Exponential(1): a draw from probs (unnormalised is fine), batched.

    The noise is indexed by token id, never by sorted rank, so a seeded row's
    draw does not depend on how a sort ordered ties in this batch.
    """
    noise = torch.empty_like(probs)
    unseeded_rows = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded_rows) == len(generators):
        noise.exponential_()
    else:
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        if unseeded_rows:
            index = _device_tensor(unseeded_rows, torch.long, probs.device)
            noise[index] = torch.empty(len(unseeded_rows), probs.shape[1], device=probs.device).exponential_()
    # E == 0 is possible in principle; 0 / 0 would be NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return probs.div_(noise).argmax(dim=-1)


def _logprobs_on_device(logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
    """Step 5: log_softmax of the processed logits at the sampled token and the top N, left on the device."""
    rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
    if not rows:
        return DeviceSample(token_ids, [], [])
    index = _device_tensor(rows, torch.long, logits.device)
    logprobs = logits[index].log_softmax(dim=-1)
    sampled = logprobs.gather(1, token_ids[index][:, None]).squeeze(1)
    num_top = min(max(batch.params[i].logprobs for i in rows), logits.shape[1])
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return DeviceSample(token_ids, rows, [batch.params[i].logprobs for i in rows], (sampled, top_values, top_ids))


def _device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` on `device` without waiting for the device."""
    return to_device_async(torch.tensor(values, dtype=dtype), device)


def _column(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [rows, 1] tensor to broadcast one per-row parameter over the vocabulary."""
    return _device_tensor(values, dtype, device)[:, None]
