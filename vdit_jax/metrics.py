"""Run bookkeeping: what a run writes about itself (config, versions, metrics) and the numbers
its log lines report (throughput, packing, MFU against a measured peak, memory, compiles).

Process 0 writes; every process computes the same numbers from its own rows.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax import model as model_lib


@functools.cache
def git_revision() -> str:
  # subprocess without preexec_fn runs no Python in the child between fork and exec: safe
  # beside jax's threads.
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def write_run_info(config, workdir: str) -> None:
  """Resolved config, package versions and git revision: the run is reproducible from workdir."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  rev = git_revision()
  versions = {"python": platform.python_version(), "git_revision": rev,
              "argv": sys.argv, "devices": [str(d) for d in jax.devices()]}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
    try:
      from importlib.metadata import version
      versions[pkg] = version(pkg)
    except Exception:  # noqa: BLE001 - a missing version is not worth failing a run
      versions[pkg] = None
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(versions, f, indent=2)


class MetricWriter:
  """JSONL + TensorBoard on process 0; other processes write nothing."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._f.write(json.dumps({"step": step, **metrics}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self.enabled = False  # closes once
      self._f.close()
      if self._tb is not None:
        self._tb.close()


class Throughput:
  """Accumulates what the next log line reports: tokens (padding included), real tokens,
  steps, wall time and the files the data source passed over, per reason."""

  def __init__(self, config):
    self.config = config
    self.flops_per_step: float | None = None
    self.skipped: dict[str, int] = {}
    self._reset()

  def _reset(self) -> None:
    self.t0, self.tokens, self.real, self.steps = time.perf_counter(), 0, [], 0
    self.skipped = dict.fromkeys(self.skipped, 0)

  def add(self, host_batch: dict[str, Any], metrics: dict[str, jax.Array]) -> None:
    """Counts one step; takes its ``real_tokens`` out of ``metrics`` (fetched at the next log
    line, not now, so the host does not wait for the step)."""
    if self.flops_per_step is None:
      self.flops_per_step = step_flops(self.config, host_batch)
    self.tokens += host_batch["segment_ids"].size * jax.process_count()
    self.real.append(metrics.pop("real_tokens"))
    for reason, n in host_batch.get("skipped", {}).items():
      self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
    self.steps += 1

  def line(self, metrics: dict[str, jax.Array], step_fn) -> dict[str, float]:
    """The log line of the steps since the last one, with the step's own ``metrics``."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    real = float(sum(jax.device_get(self.real)))
    dt = time.perf_counter() - self.t0
    m.update(step_time=dt / self.steps, tokens_per_s=self.tokens / dt,
             useful_tokens_per_s=real / dt, packing=real / max(self.tokens, 1),
             mfu=self.flops_per_step * self.steps / dt / measured_peak_flops(),
             compiles=cache_size(step_fn), **peak_memory())
    m.update({f"skipped_{r}": n for r, n in self.skipped.items()})
    self._reset()
    return m


def warn_on_recompile(compiles: int, step: int) -> bool:
  """Warns (and says so) if the step compiled more than once: shapes must be static per run."""
  if compiles <= 1:
    return False
  print(f"warning: the train step compiled {compiles} times by step {step}; batch shapes or "
        "dtypes changed between steps (each compile costs seconds to minutes)", file=sys.stderr)
  return True


def peak_memory() -> dict[str, float]:
  """Peak device memory (GB, largest local device) where the platform reports it (GPU, TPU);
  elsewhere (CPU) the peak resident memory of this host process, named as such."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return {"peak_device_memory_gb": max(s["peak_bytes_in_use"] for s in stats) / 1e9}
  kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
  return {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e9}


def cache_size(fn) -> int:
  try:
    return int(fn._cache_size())
  except AttributeError:
    return -1


def progress(start: int, total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True,
              desc="train", file=sys.stderr)


def step_flops(config, host_batch: dict[str, np.ndarray]) -> float:
  """Analytic FLOPs of one train step (forward + backward = 3x forward), from this process's
  rows times the process count."""
  token_size = host_batch["tokens"].shape[-1]
  L = host_batch["tokens"].shape[1]
  fwd = sum(model_lib.forward_flops(config.model, [g for g in grids if np.prod(g) > 0], L,
                                    token_size)
            for grids in host_batch["seg_grid"])
  return 3.0 * fwd * jax.process_count()


@functools.cache
def measured_peak_flops() -> float:
  """Matmul FLOP/s of this machine's devices: CPU peak is measured, accelerators from a table."""
  dev = jax.devices()[0]
  table = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
           "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
  for name, flops in table.items():
    if dev.device_kind.startswith(name):
      return flops * jax.device_count()
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  # Host devices share the same cores: the CPU peak is one device's, whatever the mesh.
  return 2.0 * n**3 / best
