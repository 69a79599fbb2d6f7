"""The SLO and the autoscaler's knobs (`slo:` and `autoscale:` in the cluster YAML).

One `slo:` block feeds the autoscaler's targets, and (through the Helm chart) the dashboards and the
alert rules alike. Pool sizes: each pool's `min_instances`/`max_instances` here bound what the
autoscaler may do; the pool's `instances` (config/cluster.py) is how many start.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config.fields import _is_positive_number, _require

MODES = ("act", "advisory")


@dataclass(frozen=True)
class SloConfig:
    """Latency targets a deployment is held to."""

    ttft_s: float = 2.0  # time to first token, at `percentile`
    itl_s: float = 0.1  # inter-token latency, at `percentile`
    percentile: float = 95.0  # share of requests (and of tokens, for ITL) that must meet each target, in %
    # the SLO's objective for burn-rate alerts: share of requests meeting both targets over 30 days, in %
    objective_percent: float = 99.0

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            _require(_is_positive_number(getattr(self, name)), "SloConfig", name, getattr(self, name), "must be > 0 seconds")
        _require(_is_positive_number(self.percentile) and self.percentile < 100, "SloConfig", "percentile",
                 self.percentile, "must be in (0, 100)")
        _require(_is_positive_number(self.objective_percent) and self.objective_percent < 100, "SloConfig",
                 "objective_percent", self.objective_percent, "must be in (0, 100)")


@dataclass(frozen=True)
class PoolLimits:
    """How small and how large the autoscaler may make one pool."""

    min_instances: int = 1
    max_instances: int = 4

    def __post_init__(self) -> None:
        _require(isinstance(self.min_instances, int) and not isinstance(self.min_instances, bool)
                 and self.min_instances >= 0, "PoolLimits", "min_instances", self.min_instances, "must be an integer >= 0")
        _require(isinstance(self.max_instances, int) and not isinstance(self.max_instances, bool)
                 and self.max_instances >= max(1, self.min_instances), "PoolLimits", "max_instances",
                 self.max_instances, "must be an integer >= max(1, min_instances)")


@dataclass(frozen=True)
class AutoscaleConfig:
    """The SLO-driven autoscaler (autoscale/): off unless `enabled`."""

    enabled: bool = False
    mode: str = "act"  # act: scale the pools | advisory: decide and report (metrics, /admin/autoscaler) only
    interval_s: float = 5.0  # one decision per pool this often
    max_gpus: float | None = None  # accelerators all pools may hold together (None: the pools' max_instances only)
    prefill: PoolLimits = field(default_factory=PoolLimits)
    decode: PoolLimits = field(default_factory=PoolLimits)
    mixed: PoolLimits = field(default_factory=PoolLimits)
    upscale_headroom: float = 0.9  # scale up when a pool is predicted above this share of its SLO target
    downscale_margin: float = 0.6  # scale down only to a size predicted under this share of the target (and of KV)
    # scale down only after this long without a scale-up or over-target sign, to a size that holds its highest load
    stable_window_s: float = 60.0
    pending_timeout_s: float = 300.0  # a scale-up not serving by then is withdrawn (its placement group removed)
    drain_timeout_s: float = 120.0  # a draining instance's requests get this long to finish, then move or end
    role_flip: bool = True  # a pool short of capacity may take another pool's idle instance when no GPU is free
    min_samples: int = 3  # observations a pool's model needs before it predicts (until then: observed latency only)
    backlog_drain_s: float = 15.0  # a prompt queue built up (a burst while instances start) should be gone within this

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "AutoscaleConfig", "mode", self.mode, f"must be one of {', '.join(MODES)}")
        for name in ("interval_s", "stable_window_s", "pending_timeout_s", "drain_timeout_s", "backlog_drain_s"):
            _require(_is_positive_number(getattr(self, name)), "AutoscaleConfig", name, getattr(self, name),
                     "must be > 0 seconds")
        _require(self.max_gpus is None or _is_positive_number(self.max_gpus), "AutoscaleConfig", "max_gpus",
                 self.max_gpus, "must be > 0 (or unset)")
        _require(_is_positive_number(self.upscale_headroom) and self.upscale_headroom <= 1, "AutoscaleConfig",
                 "upscale_headroom", self.upscale_headroom, "must be in (0, 1]")
        _require(_is_positive_number(self.downscale_margin) and self.downscale_margin < self.upscale_headroom,
                 "AutoscaleConfig", "downscale_margin", self.downscale_margin, "must be in (0, upscale_headroom)")
        _require(isinstance(self.min_samples, int) and self.min_samples >= 1, "AutoscaleConfig", "min_samples",
                 self.min_samples, "must be an integer >= 1")
