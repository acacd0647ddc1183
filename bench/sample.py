"""Sampling cost: seconds per video against the model calls it makes, and compiles per mix.

  python bench/sample.py [--quick] [--repeats 3]

The captioned default model (configs/captions.py: the default run with caption cross-attention;
random weights, which cost what trained ones do) samples at the default shape, 8x32x32, and the
config's three sample shapes packed into one row, with ``--steps`` Euler steps (30) and
guidance on (scale 3: each step one forward of the conditional and unconditional rows batched).
Beside each call it times one such batched forward of the same row, in the same run, and prints
the call's time over ``steps`` x that forward: what the sampler adds to its model calls (the
integration loop, packing, unpacking, the transfer back). Then it samples three more mixes of
shapes the training data can draw and counts the sampler's compiles: one serves them all.

Target lines: ``sample_overhead`` (goal <= 1.15) and ``sample_compiles_for_mixes`` (goal <= 1).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402  (bench/common.py)
from configs import captions as captions_config  # noqa: E402
from data import pipeline  # noqa: E402
from vdit_jax import config as config_lib  # noqa: E402
from vdit_jax import diffusion, sampler  # noqa: E402
from vdit_jax import model as model_lib  # noqa: E402

CAPTION = "a red circle moving right"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  config = captions_config.get_config()
  config.unlock()
  if args.quick:
    config.model.width, config.model.depth, config.model.head_dim = 64, 2, 16
    config.data.frames, config.data.side, config.data.seq_len = (4, 4), (16, 16), 128
    config.data.aspect_ratios = (1.0,)
    config.sample.shapes = "4x16x16,4x16x16"
  config.lock()
  model = model_lib.build_model(config)
  tokenizer = pipeline.BatchMaker(config).captions.tokenizer
  shapes = sampler.parse_shapes(config.sample.shapes)
  steps, cfg = args.steps, float(config.sample.cfg)
  print(f"backend {jax.default_backend()}, {model_lib.count_params(model) / 1e6:.2f}M params, "
        f"{steps} Euler steps, guidance {cfg}, median of {args.repeats}")
  print(f"{'videos':28s} {'s/call':>8s} {'s/video':>8s} {'steps x fwd':>11s} {'ratio':>6s}")
  ratios = []
  for request in ([shapes[0]], shapes):
    labels = [config.model.num_classes] * len(request)
    captions = [CAPTION] * len(request)
    call = lambda: sampler.sample(model, config, request, labels, cfg_scale=cfg,
                                  num_steps=steps, captions=captions, tokenizer=tokenizer)
    row = sampler.pack_request(model, config, request, labels, captions=captions,
                               tokenizer=tokenizer)
    forward = nnx.jit(lambda m, x, t: diffusion.guided(
        m, row.cond, row.segment_ids, row.coords, config.model.num_classes, cfg,
        layouts=row.layouts)(x, t))
    t_BS = row.shift * 0 + 0.5
    fwd = common.median_seconds(lambda: jax.block_until_ready(forward(model, row.noise, t_BS)),
                                3 * args.repeats)
    total = common.median_seconds(call, args.repeats)
    ratio = total / (steps * fwd)
    ratios.append(ratio)
    name = ",".join("x".join(map(str, s)) for s in request)
    print(f"{name:28s} {total:8.3f} {total / len(request):8.3f} {steps * fwd:11.3f} "
          f"{ratio:6.3f}")
  common.target("sample_overhead", max(ratios), "<=", 1.15)

  # Three more mixes of sizes the data draws, each in one call: no new compile.
  possible = config_lib.possible_grids(config)
  pixels = lambda g: tuple(int(a) * int(p) for a, p in zip(g, config.model.patch))
  rng = np.random.default_rng(0)
  before = sampler._integrate.jitted_fn._cache_size()
  for n in (1, 2, 2):
    mix = [pixels(possible[int(i)]) for i in rng.integers(len(possible), size=n)]
    sampler.sample(model, config, mix, [config.model.num_classes] * n, cfg_scale=cfg,
                   num_steps=2, captions=[CAPTION], tokenizer=tokenizer)
  compiles = sampler._integrate.jitted_fn._cache_size() - before
  print(f"compiles for 3 more mixes of {len(possible)} possible sizes at 2 steps: {compiles} "
        "(the step count is static: a new count compiles once)")
  common.target("sample_compiles_for_mixes", compiles, "<=", 1)


if __name__ == "__main__":
  main()
