"""Hardware limits measured in the same run as a benchmark: HBM bandwidth and bf16 matmul FLOP/s.

Figures in docs/benchmarks.md are always put beside these, measured on the
same device minutes apart, not beside a datasheet alone.
"""
from __future__ import annotations

import torch

SPEC = {  # datasheet figures, for reference beside the measured ones
    "H100": {"hbm_gb_s": 3350, "bf16_tflops": 989},
    "H200": {"hbm_gb_s": 4800, "bf16_tflops": 989},
}


def spec_for(name: str) -> dict:
    return next((v for k, v in SPEC.items() if k in name), {})


def time_cuda_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def hbm_bandwidth_gb_s(num_bytes: int = 4 << 30) -> float:
    """Device-to-device copy; counts bytes read + written."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), iters=10)
    return num_bytes / (ms / 1e3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_cuda_ms(lambda: a @ b, iters=10)
    return 2 * n**3 / (ms / 1e3) / 1e12


def measure() -> dict:
    name = torch.cuda.get_device_name()
    return {"device": name, "hbm_gb_s": hbm_bandwidth_gb_s(), "bf16_tflops": matmul_tflops(), "spec": spec_for(name)}
