"""Device, dtype and collective backend for the machine we run on.

Everything else asks this module instead of testing `torch.cuda.is_available()`
itself, so CPU (gloo, float32) and GPU (NCCL, bf16) share one code path and a
third platform (an NPU with its own collective library) is one new entry here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Platform:
    device_type: str  # cpu | cuda
    dist_backend: str  # gloo | nccl
    default_dtype: torch.dtype

    def device(self, index: int | None = None) -> torch.device:
        """This process's device: the current CUDA device unless an index is given (Ray shows each
        actor its own GPU as cuda:0; a multi-GPU process picks one with torch.cuda.set_device)."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, torch.cuda.current_device() if index is None else index)

    def resolve_dtype(self, name: str) -> torch.dtype:
        return self.default_dtype if name == "auto" else _DTYPES[name]

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def bind(self, local_rank: int, num_local_ranks: int = 1, device_ids: tuple[int, ...] = ()) -> torch.device:
        """The device rank `local_rank` of a one-host instance runs on (`device_ids[local_rank]`, or
        device `local_rank`), made current (collectives use it).

        On CPU the ranks share the cores: each gets its share of intra-op threads, since
        idle OpenMP threads spin and starve the rank a collective is waiting for.
        """
        index = device_ids[local_rank] if device_ids else local_rank
        device = self.device(index)
        if self.device_type == "cpu" and num_local_ranks > 1:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // num_local_ranks))
        if self.device_type == "cuda":
            if index >= torch.cuda.device_count():
                raise ValueError(f"rank {local_rank} needs GPU {index} but only {torch.cuda.device_count()} are visible")
            torch.cuda.set_device(device)
        return device


def bind_thread(device: torch.device) -> None:
    """Make `device` current on the calling thread. The current CUDA device is per thread and a new
    thread starts on GPU 0; Triton kernels and NCCL communicators use it, so an engine on GPU 1
    driven from a fresh thread would launch its kernels on GPU 0 (peer reads, or a crash)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: through pinned memory and an
    asynchronous copy on CUDA (a pageable copy synchronises with everything queued so far)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def current_platform(device: str = "auto") -> Platform:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("RunnerConfig.device='cuda' but no CUDA device is visible")
        return Platform("cuda", "nccl", torch.bfloat16)
    if device == "cpu":
        return Platform("cpu", "gloo", torch.float32)
    raise ValueError(f"RunnerConfig.device={device!r} is not supported (auto, cpu, cuda)")
