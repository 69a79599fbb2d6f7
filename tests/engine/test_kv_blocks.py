"""KV blocks move as wide words (`gather_blocks`, `scatter_blocks`): the same bytes as torch's
element-wise `index_select` / `index_copy_`, for every cache dtype, stacked layers or one, a source
that is not contiguous (a rank's narrowed heads), and block sizes no wide word divides."""
from __future__ import annotations

import pytest
import torch

from cluster.engine.kv_blocks import _as_words, gather_blocks, scatter_blocks

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU TESTS NOT RUN: no CUDA device; run `make test-gpu` on the GPU machine")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_blocks_move_bit_for_bit(device, dtype):
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 2, 40, 16, 4, 64, generator=gen).to(dtype).to(device)  # [layers, K/V, blocks, ...]
    index = torch.tensor([7, 0, 39, 12, 3], device=device)
    for cache, dim in ((stack[1:4], 2), (stack[2], 1)):  # a group of layers; one layer
        got = gather_blocks(cache, dim, index)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.view(torch.uint8), cache.index_select(dim, index).view(torch.uint8))
        src = torch.randn(got.shape, generator=gen).to(dtype).to(device)
        mine, theirs = cache.clone(), cache.clone()
        scatter_blocks(mine, dim, index, src)
        theirs.view(torch.uint8).index_copy_(dim, index, src.view(torch.uint8))  # torch's has no fp8 copy on CPU
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
    assert _as_words(stack[1:4].flatten(3)).dtype == torch.complex128  # 8x fewer elements for bf16


def test_a_narrowed_source_and_odd_block_sizes():
    cache = torch.randn(2, 9, 3, 1, 3)  # a block of 9 floats: 36 bytes, 4-byte words
    index = torch.tensor([8, 2])
    assert _as_words(cache.flatten(2)).dtype == torch.float32  # no wider word divides it: as it is
    assert torch.equal(gather_blocks(cache, 1, index), cache.index_select(1, index))
    wide = torch.randn(2, 2, 3, 2, 3)
    narrowed = wide.narrow(-2, 1, 1)  # a tp rank's share of the heads: not contiguous
    mine, theirs = cache.clone(), cache.clone()
    scatter_blocks(mine, 1, index, narrowed)
    theirs.index_copy_(1, index, narrowed)
    assert torch.equal(mine, theirs)
    assert torch.equal(cache, cache.clone())  # nothing else touched


def test_blocks_not_contiguous_are_written_in_place():
    """A cache whose blocks are not one run of memory (a view of every other head) is written where it
    lies: the copy path must never scatter into a flattened copy of it."""
    full = torch.zeros(2, 6, 4, 4, 8)
    cache = full[:, :, :, ::2]  # [2, blocks, 4, 2 heads, 8]: a block's values are strided
    index = torch.tensor([1, 4])
    src = torch.randn(2, 2, 4, 2, 8)
    scatter_blocks(cache, 1, index, src)
    assert torch.equal(full[:, index][:, :, :, ::2], src) and full[:, :, :, 1::2].abs().sum() == 0
    assert torch.equal(gather_blocks(cache, 1, index), src)


def test_no_blocks_at_all():
    """A gather or scatter of zero blocks is empty, not a crash (an empty block's view is ambiguous)."""
    cache = torch.randn(3, 2, 6, 4, 2, 8)
    index = torch.tensor([], dtype=torch.int64)
    assert gather_blocks(cache, 2, index).shape == (3, 2, 0, 4, 2, 8)
    before = cache.clone()
    scatter_blocks(cache, 2, index, torch.empty(3, 2, 0, 4, 2, 8))
    assert torch.equal(cache, before)
