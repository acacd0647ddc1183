"""Shared pieces of the tests: small configs, packed batches, and one set of shared tiny runs.

The tiny training runs are the slowest thing in the suite, so they are made once per session
and shared by every test (and every pytest-xdist worker) that needs a trained workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import metrics
from vdit_jax import sharding as shard_lib
from vdit_jax import tokens as tok
from vdit_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """The suite's XLA_FLAGS (conftest.py) with ``devices`` simulated CPU devices, for a child
  process."""
  return re.sub(r"--xla_force_host_platform_device_count=\d+",
                f"--xla_force_host_platform_device_count={devices}", os.environ["XLA_FLAGS"])


def tiny_config(block: str | None = None, **fields):
  """configs/tiny.py, unlocked, with dotted overrides: ``tiny_config(**{"train.steps": 3})``."""
  c = tiny.get_config(block)
  c.unlock()
  for key, value in fields.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def random_params_like(params, seed: int, scale: float = 0.1):
  """Every parameter replaced by ``scale * N(0, 1)``: zero-initialised layers become non-zero.

  Drawn with numpy: eager jax.random would compile once per parameter shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      params)


def videos_for(grids, patch, channels: int, rng: np.random.Generator) -> list[dict]:
  """Random token items ``{"tokens", "grid"}`` for pack_rows, one per token grid."""
  P = tok.token_dim(patch, channels)
  return [{"tokens": rng.standard_normal((tok.num_tokens(g), P)).astype(np.float32),
           "grid": tuple(g)} for g in grids]


def leaves(tree) -> dict[str, np.ndarray]:
  """Every leaf of ``tree`` as numpy, by its path (``"['params']['final']..."``)."""
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def read_metrics(workdir: str) -> list[dict]:
  """The lines of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- shared runs

# Mesh for train() on the 8 test devices: all three axes are used, and batch_rows=4 divides
# data x fsdp = 4 (tiny's batch_rows=2 does not divide over 8 data-parallel devices).
RUN_FIELDS = {
    "data.batch_rows": 4,
    # Two packing streams, as two processes make them: test_multihost compares against these runs.
    "data.shards": 2,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    # 8 heads (and tiny's MLP of 128) split over tensor=8: the checkpoints restore on (1, 1, 8).
    "model.num_heads": 8, "model.head_dim": 8,
    # Warm-up ends before step 3, so the lr of steps 0..2 is the same whether train.steps is
    # 3 or 5 (test_train checks this): the 3-then-5 run must equal the straight 5-step run.
    "optim.warmup_steps": 2,
    "train.log_every": 1,
    "train.ckpt_every": 3,  # checkpoints at 3 and 5; keep_ckpts=2 keeps both
    "train.keep_ckpts": 2,
    "train.sample_every": 0,
    "sample.steps": 1,  # train() always samples at the end; keep that cheap
}


def run_config(steps: int, **fields):
  return tiny_config(**{**RUN_FIELDS, "train.steps": steps, **fields})


@contextlib.contextmanager
def _session_dir(tmp_path_factory, name: str):
  """A directory shared by all xdist workers of this pytest run, held under an exclusive lock."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the session's root, shared by the workers (fresh per session)
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield base / name
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


_RUNS: dict[str, str] = {}


def shared_runs(tmp_path_factory) -> dict[str, str]:
  """Two tiny runs, made once per session: ``resumed`` trains 3 steps, then the same workdir
  is continued to 5; ``straight`` trains 5 steps in one go. Both keep checkpoints 3 and 5.
  """
  if _RUNS:
    return _RUNS
  with _session_dir(tmp_path_factory, "runs") as root:
    runs = {name: str(root / name) for name in ("resumed", "straight")}
    if not (root / "done").exists():
      shutil.rmtree(root, ignore_errors=True)
      with pytest.MonkeyPatch.context() as mp:
        # MFU's CPU peak is a multi-second matmul benchmark; its value does not matter here.
        mp.setattr(metrics, "measured_peak_flops", lambda: 1e12)
        trainer.train(run_config(3), runs["resumed"])
        trainer.train(run_config(5), runs["resumed"])
        trainer.train(run_config(5), runs["straight"])
      (root / "done").touch()
  _RUNS.update(runs)
  return _RUNS


def at_step_3(tmp_path_factory, dest) -> str:
  """A copy of the shared ``resumed`` run as it was after its first 3 steps (checkpoint 5
  removed), to continue to step 5 with another config and compare with ``straight``."""
  shutil.copytree(shared_runs(tmp_path_factory)["resumed"], dest)
  shutil.rmtree(os.path.join(dest, "checkpoints", "5"))
  return str(dest)


def restore_state(workdir: str, step: int) -> dict:
  """The full train state {params, ema, opt, step, key, nonfinite} of a checkpoint, as numpy."""
  mngr = ckpt_lib.manager(workdir, read_only=True)
  try:
    config = ckpt_lib.read_config(mngr, step)
    mesh = shard_lib.make_mesh(config.mesh)
    _, target, _ = trainer.abstract_state(config, mesh)
    state, _, _ = ckpt_lib.restore(mngr, step, target)
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, jax.device_get(state))
