"""Which CUDA devices an instance actor's ranks bind (pure logic; the GPU path runs in the GPU benchmarks)."""
from __future__ import annotations

import pytest

from cluster.config import ConfigError, RunnerConfig
from cluster.runtime.instance import local_device_ids


def test_masked_by_ray_the_assigned_gpus_are_the_first_ones():
    assert local_device_ids(["5"], num_visible=1) == (0,)
    assert local_device_ids([2, 3], num_visible=2) == (0, 1)


def test_with_every_gpu_visible_the_assigned_ids_are_the_indices():
    assert local_device_ids(["1"], num_visible=2) == (1,)
    assert local_device_ids([6, 7], num_visible=8) == (6, 7)


def test_device_ids_are_validated_by_name():
    assert RunnerConfig(device_ids=(1, 0)).device_ids == (1, 0)
    with pytest.raises((ConfigError, ValueError), match="device_ids"):
        RunnerConfig(device_ids=(-1,))
