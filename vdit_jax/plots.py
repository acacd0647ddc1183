"""Plots of a run's metrics (matplotlib, imported only when plotting: training never needs it)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, keys: Sequence[str] = ("loss",),
                 title: str | None = None) -> str:
  """Plots ``keys`` of a ``metrics.jsonl`` against step, one panel per key; returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(metrics_path)
  if not rows:
    raise ValueError(f"{metrics_path} has no metric lines: train for at least train.log_every "
                     "steps first")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
