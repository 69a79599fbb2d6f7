"""Sampler tests: exact supports of top-k / top-p / min-p on handcrafted
distributions, seeded reproducibility across batch layouts, penalties and
min_tokens against hand-computed logits, logprobs, and a support property."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.sampler import Sampler, SamplingBatch
from cluster.types import SamplingParams

NEG_INF = float("-inf")

# A handcrafted distribution over 8 tokens. Rank r (0 = most likely) sits at
# token id TOKEN_AT_RANK[r], so a sampler that forgets to map sorted ranks
# back to token ids fails.
PROBS_BY_RANK = [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005]
TOKEN_AT_RANK = [5, 2, 7, 0, 3, 6, 1, 4]
NUM_DRAWS = 4000


def _handcrafted_logits() -> torch.Tensor:
    logits = torch.empty(len(PROBS_BY_RANK))
    for rank, token_id in enumerate(TOKEN_AT_RANK):
        logits[token_id] = math.log(PROBS_BY_RANK[rank])
    return logits


def _batch(params, num_rows=None, prompt=None, output=None, eos=frozenset(), generators=None) -> SamplingBatch:
    """A batch; `params` is one SamplingParams repeated num_rows times, or a list."""
    if isinstance(params, SamplingParams):
        params = [params] * (num_rows or 1)
    num_rows = len(params)
    return SamplingBatch(
        params=list(params),
        generators=generators or [None] * num_rows,
        prompt_token_ids=prompt or [[] for _ in range(num_rows)],
        output_token_ids=output or [[] for _ in range(num_rows)],
        eos_token_ids=frozenset(eos),
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(params: SamplingParams, logits: torch.Tensor, num_draws: int = NUM_DRAWS) -> list[int]:
    torch.manual_seed(1234)
    return Sampler()(logits.expand(num_draws, -1).clone(), _batch(params, num_draws)).token_ids


# (params, ranks kept, worked out by hand on PROBS_BY_RANK)
SUPPORT_CASES = [
    (SamplingParams(), range(8)),
    (SamplingParams(top_k=1), [0]),
    (SamplingParams(top_k=3), [0, 1, 2]),
    (SamplingParams(top_p=0.3), [0]),  # .40 >= .3 already
    (SamplingParams(top_p=0.6), [0, 1]),  # .40, .65
    (SamplingParams(top_p=0.85), [0, 1, 2, 3]),  # .40, .65, .80, .90
    (SamplingParams(min_p=0.3), [0, 1, 2]),  # drop p < .12
    (SamplingParams(min_p=0.11), [0, 1, 2, 3, 4]),  # drop p < .044
    # top-p reads the renormalised top-4: .444, .278, .167, .111 -> mass before .722 < .8 <= .889
    (SamplingParams(top_k=4, top_p=0.8), [0, 1, 2]),
    (SamplingParams(top_k=5, min_p=0.3), [0, 1, 2]),
    (SamplingParams(top_p=0.85, min_p=0.3), [0, 1, 2]),
    # T=2: probs ~ sqrt(p) = .261 .206 .160 .130 ... -> mass before .467 < .6 <= .627
    (SamplingParams(temperature=2.0, top_p=0.6), [0, 1, 2]),
    (SamplingParams(temperature=0.5, top_k=3), [0, 1, 2]),  # probs ~ p^2 on the top 3
]


def _expected_freqs(params: SamplingParams, ranks) -> dict[int, float]:
    weights = {TOKEN_AT_RANK[r]: PROBS_BY_RANK[r] ** (1 / params.temperature) for r in ranks}
    total = sum(weights.values())
    return {token_id: w / total for token_id, w in weights.items()}


@pytest.mark.parametrize(("params", "ranks"), SUPPORT_CASES)
def test_truncation_keeps_exactly_the_support(params, ranks):
    token_ids = _draw(params, _handcrafted_logits())
    expected = _expected_freqs(params, ranks)
    assert set(token_ids) == set(expected)
    for token_id, freq in expected.items():
        assert token_ids.count(token_id) / NUM_DRAWS == pytest.approx(freq, abs=0.03)


def test_top_k_ties_keep_exactly_k_lowest_ids():
    token_ids = _draw(SamplingParams(top_k=2), torch.tensor([0.0, 1.0, 1.0, 1.0, -1.0]), num_draws=500)
    assert set(token_ids) == {1, 2}


def test_greedy_is_argmax_on_the_fast_path():
    logits = torch.randn(6, 100, generator=_generator(0))
    batch = _batch(SamplingParams(temperature=0.0, top_k=3, top_p=0.5), 6)
    out = Sampler()(logits.to(torch.bfloat16), batch)
    assert out.token_ids == logits.to(torch.bfloat16).argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_rows_mixed_with_random_rows_take_the_argmax():
    logits = torch.randn(4, 50, generator=_generator(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0, logprobs=2), SamplingParams()]
    out = Sampler()(logits, _batch(params))
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[2] == argmax[2]


def test_sampler_leaves_the_callers_logits_alone():
    logits = torch.randn(3, 20, generator=_generator(2))
    before = logits.clone()
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, min_tokens=3, stop_token_ids=(1,), logprobs=2)
    Sampler()(logits, _batch(params, 3, prompt=[[0, 4]] * 3, output=[[4, 5]] * 3))
    assert torch.equal(logits, before)


def _seeded_run(logits: torch.Tensor, params: SamplingParams, seed: int, neighbours, row: int, num_steps: int = 12):
    """The tokens a seeded row samples over num_steps, sitting at index `row` among `neighbours`."""
    generator = _generator(seed)
    tokens = []
    for _ in range(num_steps):
        batch_params = list(neighbours)
        batch_params.insert(row, params)
        generators = [_generator(99) if p.seed is not None else None for p in neighbours]
        generators.insert(row, generator)
        rows = logits.expand(len(batch_params), -1).clone()
        tokens.append(Sampler()(rows, _batch(batch_params, generators=generators)).token_ids[row])
    return tokens


@pytest.mark.parametrize("params", [SamplingParams(seed=7), SamplingParams(seed=7, temperature=0.8, top_p=0.95)])
def test_seeded_rows_reproduce_whatever_the_batch(params):
    logits = torch.randn(1000, generator=_generator(3)) * 0.1
    alone = _seeded_run(logits, params, seed=7, neighbours=[], row=0)
    neighbours = [SamplingParams(top_k=5), SamplingParams(temperature=0.0), SamplingParams(seed=3, min_p=0.2),
                  SamplingParams(presence_penalty=1.0, logprobs=3)]
    torch.manual_seed(0)
    crowded_middle = _seeded_run(logits, params, seed=7, neighbours=neighbours, row=2)
    torch.manual_seed(1)
    crowded_last = _seeded_run(logits, params, seed=7, neighbours=neighbours[:3], row=3)
    assert alone == crowded_middle == crowded_last
    assert alone != _seeded_run(logits, params, seed=8, neighbours=[], row=0)


def test_each_penalty_matches_hand_computed_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0]).expand(5, -1)
    prompt = [[0, 1]] * 5
    output = [[2, 2, 3, 1]] * 5  # counts: token 1 x1, 2 x2, 3 x1; prompt tokens 0, 1
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    processed = Sampler().process_logits(logits, _batch(params, prompt=prompt, output=output))
    expected = torch.tensor([
        [1.0, -2.0, 0.25, -1.0, 3.0, 0.0],  # seen {0,1,2,3}: positive / 2, negative * 2
        [2.0, -1.5, -0.5, -1.0, 3.0, 0.0],  # - 0.5 * count in output only
        [2.0, -1.5, 0.0, -1.0, 3.0, 0.0],  # - 0.5 where count > 0
        [1.0, -2.75, -1.0, -1.75, 3.0, 0.0],  # repetition, then frequency, then presence
        [2.0, -1.0, 0.5, -0.5, 3.0, 0.0],
    ])
    torch.testing.assert_close(processed, expected)


def test_penalties_ignore_ids_outside_the_vocabulary():
    processed = Sampler().process_logits(
        torch.ones(1, 4), _batch(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt=[[9]], output=[[1, 7]])
    )
    torch.testing.assert_close(processed, torch.tensor([[1.0, -0.5, 1.0, 1.0]]))


def test_penalty_changes_the_greedy_choice():
    out = Sampler()(torch.tensor([[3.0, 2.9]]), _batch(SamplingParams(temperature=0.0, presence_penalty=0.5), output=[[0]]))
    assert out.token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=(3,)),  # 1 output token: blocked
        SamplingParams(min_tokens=2, stop_token_ids=(3,)),  # 2 output tokens: free
        SamplingParams(min_tokens=2, stop_token_ids=(3,), ignore_eos=True),  # eos is no stop token then
    ]
    batch = _batch(params, output=[[0], [0, 1], [0]], eos={5, 40})
    processed = Sampler().process_logits(torch.zeros(3, 6), batch)
    expected = torch.zeros(3, 6)
    expected[0, [3, 5]] = NEG_INF
    expected[2, 3] = NEG_INF
    assert torch.equal(processed, expected)


def test_min_tokens_never_samples_eos():
    logits = torch.zeros(1, 8)
    logits[0, 2] = 5.0  # eos is the argmax
    params = [SamplingParams(min_tokens=1), SamplingParams(min_tokens=1, temperature=0.0)]
    batch = _batch([params[0]] * 500 + [params[1]], eos={2})
    token_ids = Sampler()(logits.expand(501, -1), batch).token_ids
    assert 2 not in token_ids


def test_logprobs_are_log_softmax_of_processed_logits_before_temperature():
    logits = torch.randn(4, 50, generator=_generator(4))
    params = [
        SamplingParams(logprobs=5, temperature=0.7, top_k=3),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(logprobs=20, temperature=0.0, frequency_penalty=1.0),
    ]
    batch = _batch(params, output=[[], [], [], [1, 1, 2]])
    out = Sampler()(logits, batch)
    expected = Sampler().process_logits(logits, batch).log_softmax(dim=-1)
    assert out.logprobs[2] is None
    assert out.logprobs[1].top == {}
    for row, num_top in [(0, 5), (1, 0), (3, 20)]:
        entry = out.logprobs[row]
        assert entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(expected[row, entry.token_id].item(), abs=1e-5)
        values, ids = expected[row].topk(num_top)
        assert list(entry.top) == ids.tolist()  # ordered best first
        assert list(entry.top.values()) == pytest.approx(values.tolist(), abs=1e-5)


def test_batch_shapes_are_checked():
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch([SamplingParams()], [], [[]], [[]])
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 4), _batch(SamplingParams()))


def _allowed_token_ids(logits: list[float], params: SamplingParams) -> set[int]:
    """The support, computed independently in float64 and loosened slightly at float boundaries."""
    vocab_size = len(logits)
    order = sorted(range(vocab_size), key=lambda i: -logits[i])
    if params.greedy:
        return {order[0]}
    num_kept = min(params.top_k, vocab_size) if params.top_k > 0 else vocab_size
    kept = order[:num_kept]
    weights = [math.exp((logits[i] - logits[order[0]]) / params.temperature) for i in kept]
    if params.top_p < 1:
        total, mass_before, num_top_p = sum(weights), 0.0, 0
        while num_top_p < len(kept) and mass_before < params.top_p + 1e-4:
            mass_before += weights[num_top_p] / total
            num_top_p += 1
        kept, weights = kept[:num_top_p], weights[:num_top_p]
    return {i for i, w in zip(kept, weights) if w >= params.min_p * max(weights) * (1 - 1e-4)}


_row_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    top_k=st.integers(-1, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)


@settings(max_examples=150, deadline=None)
@given(
    vocab_size=st.integers(2, 40),
    row_params=st.lists(_row_params, min_size=1, max_size=4),
    data=st.data(),
)
def test_sampled_token_is_always_in_the_allowed_support(vocab_size, row_params, data):
    rows = [
        data.draw(st.lists(st.integers(-200, 200), min_size=vocab_size, max_size=vocab_size, unique=True))
        for _ in row_params
    ]
    logits = [[v * 0.05 for v in row] for row in rows]  # distinct, so no ties to break
    generators = [_generator(p.seed) if p.seed is not None else None for p in row_params]
    torch.manual_seed(0)
    out = Sampler()(torch.tensor(logits), _batch(row_params, generators=generators))
    for row, params in enumerate(row_params):
        assert out.token_ids[row] in _allowed_token_ids(logits[row], params)
