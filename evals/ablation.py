"""Attention ablations: one training run per attention variant ("arm") under identical
conditions, and the table and plots that compare them (``ablate.py`` is the command).

Each arm x seed trains in its own process (so its peak memory is its own) in
``workdir/<arm>/seed_<k>``, from ``arm_config``: the ablation's run config with ``model.block``
set to the arm and, with ``match_params``, the MLP narrowed where the arm's blocks carry more
attention weights than full3d's. An arm is finished when its evaluation of the last step is on
disk; an interrupted arm resumes from its last checkpoint (the trainer does that by itself).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from evals import registry, video_metrics
from vdit_jax import config as config_lib
from vdit_jax import model as model_lib

REFERENCE_ARM = "full3d"


def arms(config: ml_collections.ConfigDict) -> list[str]:
  from vdit_jax import schedule
  out = [a.strip() for a in str(config.arms).split(",") if a.strip()]
  bad = [a for a in out if a not in schedule.BLOCK_TYPES]
  if not out or bad:
    raise ValueError(f"arms={config.arms!r}: name block types from {schedule.BLOCK_TYPES}, "
                     "comma separated")
  if len(set(out)) != len(out):
    raise ValueError(f"arms={config.arms!r} names an arm twice")
  return out


def param_count(run: ml_collections.ConfigDict) -> int:
  abstract = nnx.eval_shape(lambda: model_lib.build_model(run))
  return model_lib.count_params(abstract)


def _with(run: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of ``run`` with dotted ``fields`` (``model__block="x"``) set."""
  raw = json.loads(run.to_json())
  for key, value in fields.items():
    section, name = key.split("__")
    raw[section][name] = value
  return config_lib.from_dict(raw)


def arm_config(config: ml_collections.ConfigDict, arm: str, seed_index: int,
               ) -> ml_collections.ConfigDict:
  """The run config of one arm and repeat (see the module docstring)."""
  raw = json.loads(config.run.to_json())
  raw["model"]["block"] = arm
  raw["seed"] = int(config.run.seed) + int(seed_index)
  run = config_lib.from_dict(raw)
  if config.match_params and arm != REFERENCE_ARM:
    target = param_count(_with(run, model__block=REFERENCE_ARM))
    if param_count(run) > target * 1.01:
      raw["model"]["mlp_ratio"] = matched_mlp_ratio(run, target)
      run = config_lib.from_dict(raw)
  return run


def matched_mlp_ratio(run: ml_collections.ConfigDict, target: int) -> float:
  """The MLP ratio (hidden a multiple of 8) whose parameter count is nearest ``target``.
  Parameters are linear in the MLP's hidden width, so two counts give the line."""
  D = int(run.model.width)
  lo = param_count(_with(run, model__mlp_ratio=1.0))
  hi = param_count(_with(run, model__mlp_ratio=2.0))
  per_hidden = (hi - lo) / D
  hidden = D + (target - lo) / per_hidden
  hidden = max(8, int(round(hidden / 8)) * 8)
  return hidden / D


def run_dir(workdir: str, arm: str, seed_index: int) -> str:
  return os.path.join(workdir, arm, f"seed_{seed_index}")


def finished(run: ml_collections.ConfigDict, directory: str) -> bool:
  return os.path.exists(registry.result_path(directory, int(run.train.steps)))


def train_arm(run: ml_collections.ConfigDict, directory: str) -> None:
  """Trains one arm in a child process (``ablate.py --run_arm``), its output in ``train.log``."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "arm_config.json"), "w") as f:
    f.write(run.to_json(indent=2))
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ablate.py")
  with open(os.path.join(directory, "train.log"), "a") as log:
    code = subprocess.call([sys.executable, script, f"--run_arm={directory}"], stdout=log,
                           stderr=subprocess.STDOUT)
  if code:
    raise RuntimeError(f"the arm in {directory} failed (exit status {code}): see "
                       f"{os.path.join(directory, 'train.log')}; rerun the same command to "
                       "resume it")


def run_arm_here(directory: str) -> None:
  """The child process's side of ``train_arm``."""
  from vdit_jax import trainer
  with open(os.path.join(directory, "arm_config.json")) as f:
    run = config_lib.from_dict(json.load(f))
  trainer.train(run, directory)


def run(config: ml_collections.ConfigDict, workdir: str, log=print) -> list[dict[str, Any]]:
  """Trains every unfinished arm x seed, then writes the table and plots; returns the rows."""
  names = arms(config)
  seeds = int(config.seeds)
  if seeds < 1:
    raise ValueError(f"seeds={seeds} must be >= 1")
  # Every arm's config is checked before the first one trains for minutes.
  runs = {(a, s): arm_config(config, a, s) for a in names for s in range(seeds)}
  for run_cfg in runs.values():
    config_lib.validate(run_cfg)
    registry.validate(run_cfg)
  os.makedirs(workdir, exist_ok=True)
  total = len(runs)
  for i, ((arm, s), run_cfg) in enumerate(runs.items(), 1):
    directory = run_dir(workdir, arm, s)
    if finished(run_cfg, directory):
      log(f"[{i}/{total}] {arm} seed {s}: finished earlier")
      continue
    log(f"[{i}/{total}] {arm} seed {s}: training {run_cfg.train.steps} steps in {directory}")
    t0 = time.perf_counter()
    train_arm(run_cfg, directory)
    rows = summarize_arm(runs, arm, [s], workdir)
    log(f"[{i}/{total}] {arm} seed {s}: done in {time.perf_counter() - t0:.0f} s; held-out "
        f"loss {rows['heldout_loss']:.4f}, motion_jerk {rows.get('motion_jerk', math.nan):.4f}")
  rows = [summarize_arm(runs, a, list(range(seeds)), workdir) for a in names]
  rows.append(real_row(runs, names[0], list(range(seeds)), workdir))
  write_results(rows, workdir)
  plot_results(rows, {a: [run_dir(workdir, a, s) for s in range(seeds)] for a in names}, workdir)
  return rows


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _final_eval(run_cfg, directory: str) -> dict:
  with open(registry.result_path(directory, int(run_cfg.train.steps))) as f:
    return json.load(f)


def summarize_arm(runs, arm: str, seeds: list[int], workdir: str) -> dict[str, Any]:
  """One table row: cost from the training logs, quality from the final evaluations, with
  95% confidence intervals over the sampled videos of all seeds."""
  run_cfg = runs[(arm, seeds[0])]
  evals = [_final_eval(runs[(arm, s)], run_dir(workdir, arm, s)) for s in seeds]
  lines = [m for s in seeds for m in _read_jsonl(os.path.join(run_dir(workdir, arm, s),
                                                              "metrics.jsonl"))
           if "step_time" in m]
  # The first log line holds the compile: timings from the others where there are any.
  timed = [m for m in lines if m["step"] > run_cfg.train.log_every] or lines
  memory = [m.get("peak_device_memory_gb", m.get("peak_host_rss_gb", math.nan)) for m in lines]
  row: dict[str, Any] = {
      "arm": arm,
      "params": param_count(run_cfg),
      "mlp_ratio": float(run_cfg.model.mlp_ratio),
      "gflops_per_step": step_gflops(run_cfg),
      "step_time_s": statistics.median(m["step_time"] for m in timed),
      "useful_tokens_per_s": statistics.median(m["useful_tokens_per_s"] for m in timed),
      "peak_memory_gb": max(memory),
  }
  losses = [v for e in evals for v in e["per_video"].get("heldout/loss", [])]
  row["heldout_loss"], row["heldout_loss_ci"] = video_metrics.summarize(np.asarray(losses))
  t_keys = sorted({k for e in evals for k in e["scalars"] if k.startswith("heldout/loss_t")},
                  key=lambda k: float(k.split("_t")[1]))
  for k in t_keys:
    row[k.replace("heldout/", "heldout_")] = float(np.mean([e["scalars"][k] for e in evals]))
  for name in video_metrics.METRICS:
    values = [v for e in evals for v in e["per_video"].get(f"temporal/{name}", [])]
    if values:
      row[name], row[f"{name}_ci"] = video_metrics.summarize(np.asarray(values))
  fds = [e["scalars"]["temporal/fd"] for e in evals if "temporal/fd" in e["scalars"]]
  if fds:
    row["fd"] = float(np.mean(fds))
  return row


def real_row(runs, arm: str, seeds: list[int], workdir: str) -> dict[str, Any]:
  """The temporal metrics of the real held-out videos, as every arm's evaluation recorded them."""
  evals = [_final_eval(runs[(arm, s)], run_dir(workdir, arm, s)) for s in seeds]
  row: dict[str, Any] = {"arm": "real videos"}
  for name in video_metrics.METRICS:
    key = f"temporal/real_{name}"
    if key in evals[0]["scalars"]:
      row[name] = float(np.mean([e["scalars"][key] for e in evals]))
  fds = [e["scalars"].get("temporal/fd_real", math.nan) for e in evals]
  if fds and not all(math.isnan(f) for f in fds):
    row["fd"] = float(np.nanmean(fds))
  return row


def step_gflops(run_cfg: ml_collections.ConfigDict) -> float:
  """Analytic GFLOPs of one train step on the first batch of the run."""
  from data import pipeline
  from vdit_jax import metrics as metrics_lib
  batch = pipeline.make_batch(run_cfg, 0)
  return metrics_lib.step_flops(run_cfg, batch) / 1e9


COST_COLUMNS = ("params", "mlp_ratio", "gflops_per_step", "step_time_s", "useful_tokens_per_s",
                "peak_memory_gb")


def columns(rows: list[dict[str, Any]]) -> list[str]:
  cols = ["arm", *COST_COLUMNS, "heldout_loss", "heldout_loss_ci"]
  cols += sorted({k for r in rows for k in r if k.startswith("heldout_loss_t")},
                 key=lambda k: float(k.split("_t")[1]))
  for name in video_metrics.METRICS:
    cols += [name, f"{name}_ci"]
  cols.append("fd")
  return [c for c in cols if any(c in r for r in rows)]


def write_results(rows: list[dict[str, Any]], workdir: str) -> None:
  cols = columns(rows)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=cols, restval="")
    writer.writeheader()
    for r in rows:
      writer.writerow({k: r[k] for k in cols if k in r})
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(rows))


def _fmt(value: Any) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return f"{value:,}"
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return f"{value:.4g}"


def markdown(rows: list[dict[str, Any]]) -> str:
  """Two tables: cost, then quality (mean ± 95% CI half-width); arrows say which way is better."""
  cost = ["arm", *COST_COLUMNS]
  out = ["| " + " | ".join(cost) + " |", "|" + " --- |" * len(cost)]
  for r in rows:
    if "params" in r:
      out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cost) + " |")
  quality = ["heldout_loss"] + [k for k in columns(rows) if k.startswith("heldout_loss_t")]
  quality += [n for n in video_metrics.METRICS if any(n in r for r in rows)]
  quality += ["fd"] if any("fd" in r for r in rows) else []
  arrow = {n: (" ↓" if video_metrics.METRICS.get(n, "lower") == "lower" else " ↑")
           for n in quality}
  out += ["", "| arm | " + " | ".join(q + arrow[q] for q in quality) + " |",
          "|" + " --- |" * (len(quality) + 1)]
  for r in rows:
    cells = []
    for q in quality:
      if q not in r:
        cells.append("")
      elif f"{q}_ci" in r:
        cells.append(f"{_fmt(r[q])} ± {_fmt(r[q + '_ci'])}")
      else:
        cells.append(_fmt(r[q]))
    out.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def plot_results(rows: list[dict[str, Any]], dirs: dict[str, list[str]], workdir: str) -> None:
  """``loss_curves.png`` (training loss of every arm) and ``metrics_vs_flops.png`` (each
  quality metric against GFLOPs per step, with its 95% interval and the real videos' value)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for arm, paths in dirs.items():
    lines = [_read_jsonl(os.path.join(p, "metrics.jsonl")) for p in paths]
    steps = sorted({m["step"] for ls in lines for m in ls if "loss" in m})
    by_step = {s: [m["loss"] for ls in lines for m in ls if m.get("step") == s and "loss" in m]
               for s in steps}
    ax.plot(steps, [np.mean(by_step[s]) for s in steps], label=arm)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "loss_curves.png"), dpi=110)
  plt.close(fig)

  real = next((r for r in rows if "params" not in r), {})
  arms_rows = [r for r in rows if "params" in r]
  metrics = ["heldout_loss"] + [n for n in video_metrics.METRICS if n in arms_rows[0]]
  metrics += ["fd"] if "fd" in arms_rows[0] else []
  cols = 4
  fig, axes = plt.subplots(-(-len(metrics) // cols), cols,
                           figsize=(3.6 * cols, 3.0 * -(-len(metrics) // cols)), squeeze=False)
  for ax, name in zip(axes.flat, metrics):
    for r in arms_rows:
      ax.errorbar(r["gflops_per_step"], r[name], yerr=r.get(f"{name}_ci", 0.0), fmt="o",
                  capsize=3)
      ax.annotate(r["arm"], (r["gflops_per_step"], r[name]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
    if name in real:
      ax.axhline(real[name], color="grey", linestyle="--", linewidth=1, label="real videos")
      ax.legend(fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("GFLOPs per step", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "metrics_vs_flops.png"), dpi=110)
  plt.close(fig)
