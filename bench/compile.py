"""Compile time of a deep model: the train step of 28 blocks, scanned against unscanned.

  python bench/compile.py [--quick] [--depth 28]

The default config (configs/default.py: width 256, 4 heads of 64, blocksparse attention) at
``--depth`` blocks, for ``full3d`` and ``alternating`` blocks: seconds to trace, lower and
compile the whole jitted train step (forward, backward, AdamW, EMA) with ``model.scan_layers``
off and on, each in a process of its own (XLA caches nothing between them; the persistent
compilation cache is off), and the ratio. Target line ``compile_scanned_vs_unscanned`` (the
larger ratio of the two block types, goal <= 0.3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (bench/common.py)


def compile_seconds(block: str, depth: int, scan: bool, quick: bool) -> float:
  """Seconds to lower and compile the train step, in this process."""
  import jax
  import numpy as np

  from configs import default, tiny
  from data import pipeline
  from vdit_jax import sharding as shard_lib
  from vdit_jax import trainer

  config = (tiny if quick else default).get_config(block)
  config.unlock()
  config.model.depth, config.model.scan_layers = depth, scan
  config.mesh.data = 1
  config.data.batch_rows = 1 if quick else config.data.batch_rows
  config.lock()
  mesh = shard_lib.make_mesh(config.mesh)
  with jax.set_mesh(mesh), shard_lib.axis_rules(config.mesh.rules):
    graphdef, state, shardings = trainer.create_sharded_state(config, mesh)
    batch = pipeline.make_batch(config, 0)
    keys = list(trainer.batch_shardings(config, mesh))
    feed = jax.tree.map(np.asarray, {k: batch[k] for k in keys})
    step = trainer.jit_train_step(config, graphdef, shardings, mesh)
    t0 = time.perf_counter()
    step.lower(state, feed).compile()
    return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
  parser.add_argument("--depth", type=int, default=28)
  parser.add_argument("--one", help=argparse.SUPPRESS)  # block,scan: measure in this process
  args = parser.parse_args()
  if args.one:
    block, scan = args.one.split(",")
    print(json.dumps(compile_seconds(block, args.depth, scan == "1", args.quick)))
    return
  depth = 2 if args.quick else args.depth
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  print(f"{'block':12s} {'depth':>5s} {'unscanned s':>11s} {'scanned s':>9s} {'ratio':>6s}")
  ratios = []
  for block in ("full3d",) if args.quick else ("full3d", "alternating"):
    secs = []
    for scan in (0, 1):
      cmd = [sys.executable, __file__, "--one", f"{block},{scan}", "--depth", str(depth)]
      out = subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, check=True,
                           capture_output=True, text=True)
      secs.append(float(out.stdout.strip().splitlines()[-1]))
    ratios.append(secs[1] / secs[0])
    print(f"{block:12s} {depth:5d} {secs[0]:11.1f} {secs[1]:9.1f} {ratios[-1]:6.3f}")
  common.target("compile_scanned_vs_unscanned", max(ratios), "<=", 0.3)


if __name__ == "__main__":
  main()
