"""Tiled orders against t-major spans, side by side: what ``patterns.RUN_FACTOR`` stands for.

  python bench/tiles.py [--quick] [--repeats 3] [--patterns "local(2,4);cross(2,8)"]

For each pattern, on one video (16x32x32 tokens, L=16384; 2 heads x 64, f32, forward+backward,
medians of ``--repeats`` rounds with every variant taking turns), two layouts as the training
pipeline plans them: one with ``patterns.RUN_FACTOR = 1`` (3D tiles and run lists wherever they
visit fewer keys) and one with a factor so large that every pattern keeps t-major order and
spans. Dense full attention is timed in the same rounds. Prints the keys each visits per query
(computed / L^2), the times, and per pattern the time per visited key of runs over that of
spans: the factor runs must beat in keys before ``bounds.plan`` takes them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attention as bench_attention  # noqa: E402  (bench/attention.py)
from vdit_jax import bounds, tokens  # noqa: E402
from vdit_jax import patterns as pat  # noqa: E402

SIZES = {"default": ((16, 32, 32), "local(2,4);cross(2,8);causal_window(2,4,4);window(4,9,9)"),
         "quick": ((4, 8, 16), "local(1,2);window(1,2,2)")}
# A factor no run list beats: t-major order and spans everywhere.
SPANS_ONLY = 1e9
DEFAULT_FACTOR = pat.RUN_FACTOR


def planned(p: str, grid, factor: float):
  """The pipeline's layouts of one video of ``grid`` for ``p`` planned with RUN_FACTOR
  ``factor`` (the plan caches are cleared around it)."""
  pat.RUN_FACTOR = factor
  for cached in (pat.choose_tile, bounds._t_major, bounds._video_lists, bounds._tiled_bounds,
                 bounds._block_and_bound, bounds._plan):  # all that depend on the tiles
    cached.cache_clear()
  backend = bench_attention.make_backend("blocksparse", (p,))
  seq_len = tokens.num_tokens(grid)
  seg, coords = bench_attention.make_row([grid], seq_len)
  lays = bench_attention.pipeline_layouts(backend, seg, coords, [grid])
  args = (*bench_attention.qkvg(seq_len), jnp.asarray(seg), jnp.asarray(coords),
          jax.tree.map(jnp.asarray, lays))
  return bench_attention.grad_fn(backend), args, lays[p]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--patterns", default="", help="';'-separated patterns (default: the sparse "
                  "block's local and cross heads, a causal box and a box)")
  args = ap.parse_args()
  grid, default_patterns = SIZES["quick" if args.quick else "default"]
  patterns = [p for p in (args.patterns or default_patterns).split(";") if p]
  seq_len = tokens.num_tokens(grid)
  seg, coords = bench_attention.make_row([grid], seq_len)
  dense = bench_attention.make_backend("dense", ("full",))
  cases = {"dense full": (bench_attention.grad_fn(dense),
                          (*bench_attention.qkvg(seq_len), jnp.asarray(seg), jnp.asarray(coords),
                           None))}
  keys, visits = {}, {}
  for p in patterns:
    for label, factor in (("tiles", 1.0), ("t-major", SPANS_ONLY)):
      fn, fn_args, lay = planned(p, grid, factor)
      name = f"{p}, {label}"
      cases[name] = (fn, fn_args)
      keys[name] = bench_attention.computed_fraction(lay, seq_len)
      visits[name] = bench_attention.visit(lay, seq_len)
  sec = bench_attention.time_side_by_side(cases, args.repeats)
  dense_sec = sec.pop("dense full")
  print(f"\nf32 forward+backward, one {'x'.join(map(str, grid))} video (L={seq_len}), "
        f"{bench_attention.HEADS} heads x {bench_attention.HEAD_DIM}; medians of {args.repeats}; "
        f"dense full {1e3 * dense_sec:.1f} ms")
  print(f"{'variant':34s} {'keys/L':>8s} {'ms':>9s} {'/ dense':>8s}  visit")
  for name, s in sec.items():
    print(f"{name:34s} {keys[name]:8.4f} {1e3 * s:9.1f} {s / dense_sec:8.3f}  {visits[name]}")
  print("\ntime per visited key, tiles over t-major (what patterns.RUN_FACTOR stands for; "
        f"the code's is {DEFAULT_FACTOR}):")
  for p in patterns:
    tiled, spans = f"{p}, tiles", f"{p}, t-major"
    if visits[tiled] == visits[spans]:
      print(f"  {p:30s} same layout either way")
      continue
    per_key = (sec[tiled] / keys[tiled]) / (sec[spans] / keys[spans])
    print(f"  {p:30s} {per_key:.2f}")


if __name__ == "__main__":
  main()
