"""The Triton block copy (kv_blocks_triton.py) under the Triton interpreter on CPU, or compiled where a
GPU runs real Triton: gather and scatter against torch's index kernels, bit for bit."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

try:
    import triton
except ImportError:
    pytest.skip("TRITON NOT INSTALLED: the Triton KV block copy is untested (pip install triton)", allow_module_level=True)

from cluster.engine import kv_blocks_triton  # noqa: E402
from cluster.engine.kv_blocks import _planes  # noqa: E402

pytestmark = pytest.mark.triton
_INTERPRETED = not isinstance(kv_blocks_triton._copy_blocks_kernel, triton.runtime.jit.JITFunction)
DEVICE = "cpu" if _INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU", pytrace=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_and_scatter_whole_blocks(dtype):
    gen = torch.Generator().manual_seed(1)
    # [layers, K/V, blocks, block_size, heads, dim]: a block of 4x2x160 values is more than one chunk
    # of 1024 words in float32 (a partial last chunk), and a group of layers is a slice of the stack
    stack = torch.randn(3, 2, 9, 4, 2, 160, generator=gen).to(dtype).to(DEVICE)
    cache = stack[1:3]
    index = torch.tensor([5, 0, 8, 2], device=DEVICE)
    packed = torch.empty(2, 2, 4, 4, 2, 160, dtype=dtype, device=DEVICE)
    kv_blocks_triton.copy_blocks(_planes(cache, 2), _planes(packed, 2), index, scatter=False)
    assert torch.equal(packed, cache.index_select(2, index))
    before = stack.clone()
    src = torch.randn(packed.shape, generator=gen).to(dtype).to(DEVICE)
    kv_blocks_triton.copy_blocks(_planes(src, 2), _planes(cache, 2), index, scatter=True)
    expect = before.clone()
    expect[1:3].index_copy_(2, index, src)
    assert torch.equal(stack, expect)  # the selected blocks of layers 1-2 and nothing else


def test_layouts_the_kernel_cannot_take_fall_back():
    odd = torch.zeros(2, 5, 3, device=DEVICE)  # a block of 12 bytes: no whole 8-byte words
    assert _planes(odd, 1) is None
    strided = torch.zeros(2, 5, 4, 4, device=DEVICE)[:, :, :, :2]  # blocks not back to back
    assert _planes(strided, 1) is None
