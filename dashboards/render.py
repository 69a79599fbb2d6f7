"""A dashboard's panels drawn from Prometheus with matplotlib: what Grafana would show, as one PNG.

  1. for every panel, every query is asked over a time range (`fetch(expr) -> [(labels, times, values)]`,
     e.g. Prometheus' /api/v1/query_range with Grafana's variables set), and each series is named by
     its target's legend format (`{{pool}} {{instance}}`) as Grafana names it;
  2. the panels are drawn in the dashboard's order on a grid of `columns`, stat panels as their last
     value, time series as lines (the row titles become section labels);
  3. the figure is written to `path` (docs/img/ holds one from a real run: tests/dashboards/test_live.py).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

Series = tuple[dict, Sequence[float], Sequence[float]]  # labels, unix times, values


def render_png(board: dict, fetch: Callable[[str], list[Series]], path: str, columns: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in board["panels"] if p["type"] != "row"]
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    fig.suptitle(board["title"], fontsize=14, fontweight="bold")
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=9)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        series = [(_legend(target["legendFormat"], labels), times, values)
                  for target in panel["targets"] for labels, times, values in fetch(target["expr"])]
        if panel["type"] == "stat":
            text = "\n".join(f"{legend}: {_fmt(values[-1], unit)}" for legend, _, values in series if values)
            ax.text(0.5, 0.5, text or "no data", ha="center", va="center", fontsize=11, transform=ax.transAxes)
            ax.set_axis_off()
            continue
        start = min((t[0] for _, t, _ in series if len(t)), default=0)
        for legend, times, values in series:
            ax.plot([t - start for t in times], values, label=legend, linewidth=1.2,
                    linestyle="--" if legend in ("target", "objective", "percentile target") else "-")
        for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
            ax.axhline(step["value"], color=step["color"], linewidth=0.8, linestyle=":")
        ax.set_xlabel("s", fontsize=7)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(labelsize=7)
        if series:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _legend(legend_format: str, labels: dict) -> str:
    if legend_format == "__auto":
        return " ".join(v for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format).strip()


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1%}" if unit == "percentunit" else f"{value:.3g} {unit}"
