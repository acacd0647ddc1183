"""Context parallelism's memory: per-device train-step memory with mesh.context = 8 against 1,
and the longest video each fits in a fixed per-device budget (8 simulated devices).

  python bench/context.py [--quick] [--budget-gib 16]

configs/long.py (one 64x64-latent video per row, patch 1x2x2: 1,024 tokens per frame, 8 heads,
remat, scanned blocks). For each context size the jitted train step is compiled (not run) for
the shapes of a video of T frames, and XLA's memory analysis gives each device's bytes
(temporaries plus arguments). First at 64 frames, context 8 over context 1; then, by bisection
over T, the most frames whose step fits ``--budget-gib`` per device. Target lines
``context_memory_per_device`` (8 over 1, goal <= 0.2) and ``context_longest_video`` (the tokens
that fit with 8 over those with 1, goal >= 4).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402  (bench/common.py)
from configs import long as long_config  # noqa: E402
from vdit_jax import backends, trainer  # noqa: E402
from vdit_jax import sharding as shard_lib  # noqa: E402
from vdit_jax import tokens as tok  # noqa: E402

GIB = 1 << 30


def step_bytes(frames: int, context: int, quick: bool) -> int:
  """Per-device bytes (temporaries + arguments) of the compiled train step for one video of
  ``frames`` frames, on ``context`` devices along mesh.context."""
  c = long_config.get_config()
  c.unlock()
  if quick:
    c.model.width, c.model.depth, c.data.side = 64, 2, (16, 16)
  side = int(c.data.side[0])
  c.data.frames = (frames, frames)
  grid = tok.grid_shape((frames, side, side), c.model.patch)
  c.data.seq_len = tok.num_tokens(grid)
  c.mesh.context = context
  c.lock()
  mesh = shard_lib.make_mesh(c.mesh, jax.devices()[:context])
  backend = backends.resolve(c.model, c.data.max_segments)
  with jax.set_mesh(mesh), shard_lib.axis_rules(c.mesh.rules):
    graphdef, state, state_shardings = trainer.abstract_state(c, mesh, backend)
    L, P = c.data.seq_len, tok.token_dim(c.model.patch, c.data.channels)
    coords = jnp.asarray(tok.grid_coords(grid))[None]
    segment_ids = jnp.ones((1, L), jnp.int32)
    layouts = backend.prepare(segment_ids, coords, [grid], max_segments=1)
    batch = {"tokens": jax.ShapeDtypeStruct((1, L, P), jnp.float32),
             "segment_ids": segment_ids, "coords": coords,
             "seg_grid": jnp.asarray([[grid]], jnp.int32),
             "seg_label": jnp.zeros((1, 1), jnp.int32)}
    if layouts is not None:
      batch["layouts"] = layouts
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)  # shapes only
    step = trainer.jit_train_step(c, graphdef, state_shardings, mesh, backend)
    memory = step.lower(state, batch).compile().memory_analysis()
  return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes)


def longest(context: int, budget: int, lo: int, hi: int, quick: bool) -> int:
  """The most frames in [lo, hi] whose step fits ``budget`` bytes per device (0 if none)."""
  best = 0
  while lo <= hi:
    mid = (lo + hi) // 2
    if step_bytes(mid, context, quick) <= budget:
      best, lo = mid, mid + 1
    else:
      hi = mid - 1
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
  parser.add_argument("--budget-gib", type=float, default=16.0)
  args = parser.parse_args()
  frames = 8 if args.quick else 64
  one, eight = (step_bytes(frames, n, args.quick) for n in (1, 8))
  print(f"{frames} frames: per-device bytes {one / GIB:.3f} GiB with context 1, "
        f"{eight / GIB:.3f} GiB with context 8")
  common.target("context_memory_per_device", eight / one, "<=", 0.2)
  budget = int((0.01 if args.quick else args.budget_gib) * GIB)
  lo, hi = (8, 10) if args.quick else (8, 4096)
  fit = {n: longest(n, budget, lo, hi, args.quick) for n in (1, 8)}
  per_frame = 64 if args.quick else 1024
  for n, t in fit.items():
    capped = " (the most this bench tries: a lower bound)" if t == hi else ""
    print(f"context {n}: longest video within {budget / GIB:.2f} GiB per device: {t} frames "
          f"({t * per_frame} tokens){capped}")
  common.target("context_longest_video", fit[8] / max(fit[1], 1), ">=", 4)


if __name__ == "__main__":
  main()
