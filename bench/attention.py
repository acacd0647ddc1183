"""Attention backends side by side: time, analytic FLOPs and memory, forward + backward.

  python bench/attention.py [--quick] [--repeats 3]

Default sizes: one 16x32x32-token video (L=16384), attended with factorized and with windows of
about 1/2, 1/4 and 1/8 of its pairs (bands of frames and rows, the targets; and boxes) and with
``frame_causal(-1)`` (a target: its layouts list block pairs); a row of 4 videos of 16x16x16
(L=16384); one 16x16x16 video alone (L=4096) for the comparison with
``jax.nn.dot_product_attention`` and ``frame_causal(-1)`` at the blocks ``--causal-blocks`` names.
One row, 2 heads x 64, f32 (``--dtype bfloat16`` for accelerators); each time is the median over
``--repeats`` rounds of forward + backward (gradients of q, k, v), the variants taking turns
within a round; TFLOP/s counts the allowed pairs only. Blocksparse uses the
layouts the training pipeline makes for data of exactly the row's video sizes, packed back to
back (``Backend.prepare`` with ``max_segments``: static block size, ``max_kv_blocks`` and pairs);
rows marked "exact" use layouts sized for this very row.
``dense`` on these rows goes through ``flash.attend_chunked`` (64-query chunks), since the whole
``[L, L]`` f32 logits would be 2 GiB per head.

Memory: the largest L (doubling, one video of 16 frames, so a frame holds L/16 tokens) whose
compiled forward + backward fits 16 GiB by XLA's ``memory_analysis()`` (arguments + outputs +
temporaries), compiled only, never run. Analytic FLOPs: 4 K per allowed pair and head, forward
(``attention.pattern_pairs``), the numbers ``model.forward_flops`` counts. On GPU and TPU the
``pallas`` backend's kernels are timed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vdit_jax import attention, backends, bounds, layout, schedule, tokens  # noqa: E402
from vdit_jax import patterns as pat  # noqa: E402
import common  # noqa: E402  (bench/common.py)
from vdit_jax import config as config_lib  # noqa: E402
from vdit_jax import model as model_lib  # noqa: E402

HEADS, HEAD_DIM = 2, 64
MEMORY_BUDGET = 16 * 2**30
SIZES = {
    # video alone, 4 equal videos packed in one row, video for the sdpa comparison, memory L
    # range; windows covering about 1/2, 1/4 and 1/8 of the video's pairs, as bands of frames
    # and rows (the targets) and as boxes (timed, no target: see bench/README.md)
    "default": {"video": (16, 32, 32), "packed": (16, 16, 16), "sdpa": (16, 16, 16),
                "memory": (4096, 2**21),
                "windows": ("window(4,31,31)", "window(2,31,31)", "window(1,16,31)"),
                "boxes": ("window(11,15,15)", "window(7,11,11)", "window(4,9,9)"),
                # boxes of about 1/2, 1/4 and 1/8 of the pairs of the 16x16x16 video
                "small_boxes": ("window(6,10,10)", "window(4,7,7)", "window(3,5,5)")},
    "quick": {"video": (4, 8, 16), "packed": (4, 4, 8), "sdpa": (4, 8, 8),
              "memory": (512, 2048), "windows": ("window(1,7,15)", "window(0,7,15)",
                                                  "window(0,3,15)"),
              "boxes": ("window(2,2,2)",), "small_boxes": ("window(1,2,2)",)},
}
GROUPED = ("full", "spatial", "temporal")


class PerHead(tuple):
  """A sublayer giving each head its own pattern (the ``sparse`` block)."""


def sparse_block() -> PerHead:
  """The heads of a ``sparse`` block as ``configs/ablate.py`` trains it (its run config's
  ``sparse_heads``, ``sparse_window`` and head count)."""
  from configs import ablate  # noqa: PLC0415 (the repo root is on sys.path above)
  return PerHead(schedule.sparse_head_patterns(ablate.get_config().run.model))


def visit(lay: layout.Layout, seq_len: int) -> str:
  """How blocksparse visits a layout's lists: block, then spans, runs, pairs, diagonal or row."""
  kind = (f"runs {lay.max_runs}x{lay.run_blocks}" if lay.max_runs else
          f"pairs {lay.max_pairs}" if lay.max_pairs else "row" if lay.whole_row(seq_len) else
          "diag" if lay.block_diagonal else f"span {lay.max_kv_blocks}")
  return f"{lay.block_q}:{kind}"
# Block types whose attention term model.forward_flops is checked against here.
FLOP_BLOCKS = ("full3d", "factorized")


def make_row(grids, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``segment_ids [1, L]`` and ``coords [1, L, 3]`` of one row holding ``grids`` in order."""
  seg = np.zeros((1, seq_len), np.int32)
  coords = np.zeros((1, seq_len, 3), np.int32)
  start = 0
  for s, g in enumerate(grids, 1):
    n = tokens.num_tokens(g)
    seg[0, start:start + n] = s
    coords[0, start:start + n] = tokens.grid_coords(g)
    start += n
  if start > seq_len:
    raise ValueError(f"grids {grids} hold {start} tokens > seq_len={seq_len}")
  return seg, coords


def make_backend(name: str, patterns, kv_chunk: int | None = None,
                 block: int = 0) -> backends.Backend:
  kernel = backends.platform_kernel(jax.default_backend()) if name == "pallas" else None
  return backends.Backend(name, patterns, block=block, kv_chunk=kv_chunk, kernel=kernel)


def grad_fn(backend: backends.Backend, per_head: PerHead | None = None):
  """jitted (q, k, v, g, seg, coords, layouts) -> gradients in q, k, v of <sum of outputs, g>:
  the outputs of each of the backend's patterns, or of one ``per_head`` sublayer."""

  def loss(q, k, v, g, seg, coords, layouts):
    ctx = attention.AttentionContext(backend, seg, coords, layouts)
    if per_head is not None:
      return jnp.sum(ctx.attend(tuple(per_head), q, k, v) * g)
    out = sum(ctx.attend(p, q, k, v) for p in backend.patterns)
    return jnp.sum(out * g)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def qkvg(seq_len: int, seed: int = 0, dtype=jnp.float32, heads: int = HEADS) -> list[jax.Array]:
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (1, seq_len, heads, HEAD_DIM), dtype) for k in keys]


def time_side_by_side(cases: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each ``name: (fn, args)``; the cases take turns each round."""
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def pairs_of(pattern: str, grids) -> int:
  return sum(pat.parse(pattern).pairs(g) for g in grids)


def model_attention_flops(block: str, grids, seq_len: int) -> float:
  """The attention term of ``model.forward_flops`` for one block of this head shape."""
  cfg = config_lib.get_base_config().model
  cfg.block, cfg.depth, cfg.num_heads, cfg.head_dim = block, 1, HEADS, HEAD_DIM
  return (model_lib.forward_flops(cfg, grids, seq_len, 16)
          - model_lib.forward_flops(cfg, [], seq_len, 16))


def video_grid(seq_len: int) -> tuple[int, int, int]:
  """A 16-frame token grid of exactly ``seq_len`` tokens (a power of two >= 64)."""
  k = int(math.log2(seq_len // 16))
  return (16, 2 ** (k // 2), 2 ** (k - k // 2))


def pipeline_layouts(backend: backends.Backend, seg, coords, grids, exact: bool = False):
  """What the pipeline prepares for data of exactly these grids, one row of them."""
  return backend.prepare(seg, coords, grids, exact=exact, max_segments=len(grids))


def computed_fraction(lay: layout.Layout, seq_len: int) -> float:
  """Fraction of the row's block pairs blocksparse computes for a layout."""
  n = seq_len // lay.block_q
  if lay.max_runs:
    return min(lay.max_runs * lay.run_blocks / n, 1.0)
  if lay.max_pairs:
    return lay.max_pairs / n**2
  return min(lay.max_kv_blocks / n, 1.0)


def box_floor(pattern: str, grid, block: int) -> tuple[float, tuple[int, int, int]]:
  """The fewest keys per query (over L^2) a box can be computed with when its queries go in
  tiles of ``block`` tokens, and the tile shape that reaches it: each tile attends to the union
  of its queries' boxes (keys taken exactly, as if gathered token by token), over every tile
  shape of ``block`` tokens. A block-sparse backend computes at least this, whatever its order."""
  p = pat.parse(pattern)
  reach = [hi for _, hi in p.offset_box()]
  shapes = [(a, b, block // (a * b)) for a in range(1, block + 1) for b in range(1, block + 1)
            if block % (a * b) == 0]
  shapes = [tile for tile in shapes if all(k <= n for k, n in zip(tile, grid))]
  best = (math.inf, (0, 0, 0))
  for tile in shapes:
    keys = 1.0
    for n, r, k in zip(grid, reach, tile):
      lo = np.arange(0, n, k)
      hi = np.minimum(lo + k, n) - 1
      keys *= float(np.sum((hi - lo + 1) * (np.minimum(hi + r, n - 1) - np.maximum(lo - r, 0) + 1)))
    best = min(best, (keys / math.prod(grid) ** 2, tile))
  return best


def layout_shapes(pattern: str, seq_len: int, grid) -> layout.Layout:
  """Shapes of ``pipeline_layouts(...)[pattern]`` for one video, without building it (huge L)."""
  block, J, P, runs = bounds.plan(pattern, seq_len, [grid], max_segments=1)
  N = seq_len // block
  i32, b8 = jnp.int32, jnp.bool_
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  pairs = ({"pair_q": sds((1, P), i32), "pair_k": sds((1, P), i32), "pair_valid": sds((1, P), b8)}
           if P else {})
  if runs is not None:
    R, W = runs
    pairs.update(run_start=sds((1, N, R), i32), run_len=sds((1, N, R), i32), max_runs=R,
                 run_blocks=W)
  return layout.Layout(perm=sds((1, seq_len), i32), inv_perm=sds((1, seq_len), i32),
                       perm_segment=sds((1, seq_len), i32), perm_coords=sds((1, seq_len, 3), i32),
                       kv_blocks=sds((1, N, J), i32), kv_valid=sds((1, N, J), b8),
                       block_q=block, block_k=block, max_kv_blocks=J, max_pairs=P, **pairs)


def compiled_bytes(backend: str, patterns, seq_len: int, kv_chunk: int | None) -> int:
  grid = video_grid(seq_len)
  x = jax.ShapeDtypeStruct((1, seq_len, HEADS, HEAD_DIM), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  coords = jax.ShapeDtypeStruct((1, seq_len, 3), jnp.int32)
  layouts = ({p: layout_shapes(p, seq_len, grid) for p in patterns}
             if backend == "blocksparse" else None)
  fn = grad_fn(make_backend(backend, patterns, kv_chunk))
  ma = fn.lower(x, x, x, x, seg, coords, layouts).compile().memory_analysis()
  return (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
          - ma.alias_size_in_bytes)


def largest_len(backend: str, patterns, lo: int, hi: int, kv_chunk: int | None = None):
  """Largest L in lo, 2 lo, ..., hi within MEMORY_BUDGET, and the bytes it needs (or None)."""
  best, best_bytes = None, None
  seq_len = lo
  while seq_len <= hi:
    need = compiled_bytes(backend, patterns, seq_len, kv_chunk)
    if need > MEMORY_BUDGET:
      break
    best, best_bytes = seq_len, need
    seq_len *= 2
  return best, best_bytes


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="q, k, v dtype of the timed rows (bfloat16 for accelerators)")
  ap.add_argument("--causal-blocks", default="",
                  help="comma list of block sizes: also time frame_causal(-1) on the 'alone' "
                       "video with each (its pair layouts' block; the default grows it)")
  ap.add_argument("--run-factor", type=float, default=pat.RUN_FACTOR,
                  help="patterns.RUN_FACTOR for this run's layout plans: the cost per key of "
                       "run lists relative to spans that tiles must beat (1 takes tiles and "
                       "runs wherever they visit fewer keys)")
  args = ap.parse_args()
  pat.RUN_FACTOR = args.run_factor  # before any plan is made (they are cached)
  dtype = jnp.dtype(args.dtype)
  size = SIZES["quick" if args.quick else "default"]
  video, packed, sdpa_video = size["video"], size["packed"], size["sdpa"]
  fact = schedule.BLOCK_PATTERNS["factorized"]
  causal = str(pat.FrameCausal(-1))
  sparse = sparse_block()

  # ---- timed variants: name -> (row, backend, patterns, layouts sized for this row?)
  L = tokens.num_tokens(video)
  L_sdpa = tokens.num_tokens(sdpa_video)
  rows = {
      "video": ([video], L),
      "packed": ([packed] * 4, L),
      "sdpa": ([sdpa_video], L_sdpa),
  }
  variants = {
      "video: dense full": ("video", "dense", ("full",), False),
      "video: blocksparse factorized": ("video", "blocksparse", fact, False),
      "video: blocksparse factorized, exact": ("video", "blocksparse", fact, True),
      **{f"video: blocksparse {w}": ("video", "blocksparse", (w,), False)
         for w in size["windows"] + size["boxes"] + (causal,)},
      "video: dense full, sparse's heads": ("video", "dense", PerHead(("full",) * len(sparse)),
                                            False),
      "video: blocksparse sparse block": ("video", "blocksparse", sparse, False),
      "packed: dense full": ("packed", "dense", ("full",), False),
      "packed: blocksparse full": ("packed", "blocksparse", ("full",), False),
      "packed: blocksparse full, exact": ("packed", "blocksparse", ("full",), True),
      "alone: dense full": ("sdpa", "dense", ("full",), False),
      "alone: sdpa (xla) full": ("sdpa", "sdpa", ("full",), False),
      "alone: blocksparse full": ("sdpa", "blocksparse", ("full",), False),
      "alone: blocksparse frame_causal(-1)": ("sdpa", "blocksparse", (causal,), False),
      **{f"alone: blocksparse {w}": ("sdpa", "blocksparse", (w,), False)
         for w in size["small_boxes"]},
      "alone: dense full, sparse's heads": ("sdpa", "dense", PerHead(("full",) * len(sparse)),
                                            False),
      "alone: blocksparse sparse block": ("sdpa", "blocksparse", sparse, False),
      **{f"alone: blocksparse frame_causal(-1), block {b}": ("sdpa", "blocksparse", (causal,),
                                                             False, int(b))
         for b in args.causal_blocks.split(",") if b},
  }
  if jax.default_backend() in ("gpu", "tpu"):  # the Pallas kernels (vdit_jax.kernels)
    variants.update({"video: pallas factorized": ("video", "pallas", fact, False),
                     "packed: pallas full": ("packed", "pallas", ("full",), False),
                     "alone: pallas full": ("sdpa", "pallas", ("full",), False)})
  cases, pair_ratio, computed, visits, heads = {}, {}, {}, {}, {}
  for name, (row, backend, patterns, exact, *block) in variants.items():
    grids, seq_len = rows[row]
    seg, coords = make_row(grids, seq_len)
    per_head = patterns if isinstance(patterns, PerHead) else None
    uses = tuple(dict.fromkeys(patterns))  # per-head patterns: each once
    be = make_backend(backend, uses, block=block[0] if block else 0)
    layouts = pipeline_layouts(be, seg, coords, grids, exact=exact)
    heads[name] = len(per_head) if per_head else HEADS
    # Computed and allowed pairs per head (per-head sublayers: averaged over heads).
    share = ({p: per_head.count(p) / len(per_head) for p in uses} if per_head else
             dict.fromkeys(uses, 1.0))
    computed[name] = sum(share.values())  # dense: every pair, per pattern
    visits[name] = "dense"
    if layouts is not None:
      # Keys each query block computes: its listed pairs, or its max_kv_blocks slots (or the
      # whole row).
      computed[name] = sum(share[p] * computed_fraction(layouts[str(p)], seq_len) for p in uses)
      visits[name] = " ".join(visit(layouts[str(p)], seq_len) for p in uses)
      layouts = jax.tree.map(jnp.asarray, layouts)
    cases[name] = (grad_fn(be, per_head),
                   (*qkvg(seq_len, dtype=dtype, heads=heads[name]), jnp.asarray(seg),
                    jnp.asarray(coords), layouts))
    pair_ratio[name] = sum(share[p] * pairs_of(p, grids) for p in uses) / seq_len ** 2
  sec = time_side_by_side(cases, args.repeats)

  print(f"\n{args.dtype} forward+backward, one row, {HEADS} heads x {HEAD_DIM}; medians of "
        f"{args.repeats}")
  print(f"video {'x'.join(map(str, video))} (L={L}); packed: 4 x {'x'.join(map(str, packed))} "
        f"(L={L}); alone: {'x'.join(map(str, sdpa_video))} (L={L_sdpa})")
  print("(computed/L^2: pairs the backend computes, max_kv_blocks slots per query block; "
        "TFLOP/s: 3x the analytic forward FLOPs of the allowed pairs per second; per head, "
        "averaged over the heads of the sparse block's rows, which have one head per entry of "
        f"{','.join(map(str, sparse))}; visit: block size, then the lists as spans of key "
        "blocks, runs (count x blocks), pairs, block-diagonal or the whole row)")
  print(f"{'variant':44s} {'pairs/L^2':>10s} {'computed/L^2':>13s} {'ms':>10s} {'TFLOP/s':>8s}"
        f"  visit")
  for name, (row, *_) in variants.items():
    seq_len = rows[row][1]
    tflops = 3 * 4 * heads[name] * HEAD_DIM * pair_ratio[name] * seq_len ** 2 / sec[name] / 1e12
    print(f"{name:44s} {pair_ratio[name]:10.4f} {computed[name]:13.4f} {1e3 * sec[name]:10.1f} "
          f"{tflops:8.3f}  {visits[name]}")

  # ---- analytic FLOPs per pattern, and the model's count of the same
  print(f"\nanalytic attention FLOPs, forward, {HEADS} heads x {HEAD_DIM} (4 K per pair and head)")
  print(f"{'pattern':18s} {'row':8s} {'pairs':>14s} {'pairs/L^2':>10s} {'GFLOP':>10s}")
  for row in ("video", "packed"):
    grids, seq_len = rows[row]
    for p in GROUPED + (size["windows"] + size["boxes"] + (causal,) if row == "video" else ()):
      pairs = pairs_of(p, grids)
      print(f"{p:18s} {row:8s} {pairs:14d} {pairs / seq_len**2:10.4f} "
            f"{4 * HEADS * HEAD_DIM * pairs / 1e9:10.3f}")
  model_diff = 0.0
  for block in FLOP_BLOCKS:
    block_patterns = schedule.BLOCK_PATTERNS[block]
    for row in ("video", "packed"):
      grids, seq_len = rows[row]
      ours = 4 * HEADS * HEAD_DIM * sum(pairs_of(p, grids) for p in block_patterns)
      model_diff = max(model_diff, abs(model_attention_flops(block, grids, seq_len) - ours) / ours)

  # ---- memory: largest L within 16 GiB, compiled only
  lo, hi = size["memory"]
  seg, coords = make_row([video_grid(lo)], lo)
  for p, lay in pipeline_layouts(make_backend("blocksparse", GROUPED + (causal,)), seg, coords,
                                 [video_grid(lo)]).items():
    shapes = layout_shapes(p, lo, video_grid(lo))
    if jax.tree.structure(shapes) != jax.tree.structure(lay) or \
        [x.shape for x in jax.tree.leaves(shapes)] != [x.shape for x in jax.tree.leaves(lay)]:
      raise AssertionError(f"layout_shapes({p!r}) {shapes} differ from pipeline_layouts")
  memory = {
      "dense full": largest_len("dense", ("full",), lo, hi),
      "sdpa (xla) full": largest_len("sdpa", ("full",), lo, hi),
      "blocksparse full": largest_len("blocksparse", ("full",), lo, hi),
      "blocksparse full, kv_chunk=8": largest_len("blocksparse", ("full",), lo, hi, 8),
      "blocksparse factorized": largest_len("blocksparse", fact, lo, hi),
      "blocksparse factorized, kv_chunk=8": largest_len("blocksparse", fact, lo, hi, 8),
      f"blocksparse {causal}": largest_len("blocksparse", (causal,), lo, hi),
  }
  print(f"\nlargest L (one 16-frame video, doubling from {lo} up to {hi}) whose forward+backward "
        f"compiles within {MEMORY_BUDGET / 2**30:.0f} GiB")
  print(f"{'variant':36s} {'largest L':>10s} {'GiB there':>10s}")
  for name, (best, need) in memory.items():
    shown = "none" if best is None else f"{best}{'+' if best == hi else ''}"
    print(f"{name:36s} {shown:>10s} {(need or 0) / 2**30:10.2f}")
  print("(+ = the largest L tried)\n")

  dense_video = sec["video: dense full"]
  ratio = sec["video: blocksparse factorized"] / dense_video
  common.target("video_factorized_blocksparse_over_full_dense", ratio, "<=",
         1.5 * pair_ratio["video: blocksparse factorized"])
  ratio = sec["packed: blocksparse full"] / sec["packed: dense full"]
  common.target("packed4_full_blocksparse_over_dense", ratio, "<=",
         1.3 * pair_ratio["packed: blocksparse full"])
  for w in size["windows"]:
    name = f"video: blocksparse {w}"
    args = "_".join(map(str, dataclasses.astuple(pat.parse(w))))
    common.target(f"video_window_{args}_blocksparse_over_full_dense",
           sec[name] / dense_video, "<=", 1.25 * pair_ratio[name] + 0.05)
  name = f"video: blocksparse {causal}"
  common.target("video_frame_causal_blocksparse_over_full_dense", sec[name] / dense_video, "<=",
         1.25 * pair_ratio[name] + 0.05)
  for row, dense, boxes in (("video", dense_video, size["boxes"]),
                            ("alone", sec["alone: dense full"], size["small_boxes"])):
    L_row = rows["video" if row == "video" else "sdpa"][1]
    for w in boxes:
      name = f"{row}: blocksparse {w}"
      args_ = "_".join(map(str, dataclasses.astuple(pat.parse(w))))
      # The least any block-sparse order can compute with query blocks of 32 to 128 tokens:
      # where it is above 1.25 x pairs + 0.05, no tiling meets the target at that block size.
      grid = rows["video" if row == "video" else "sdpa"][0][0]
      floors = ", ".join(f"{b}: {f:.4f} ({'x'.join(map(str, tile))})"
                         for b in (32, 64, 128) for f, tile in [box_floor(w, grid, b)])
      print(f"{w} (L={L_row}): pairs/L^2 {pair_ratio[name]:.4f}, target "
            f"{1.25 * pair_ratio[name] + 0.05:.4f}, least computed/L^2 by query tile size {floors}")
      common.target(f"box_{args_}_L{L_row}_blocksparse_over_full_dense", sec[name] / dense,
                    "<=", 1.25 * pair_ratio[name] + 0.05)
    name = f"{row}: blocksparse sparse block"
    print(f"sparse block, {row} (L={L_row}): pairs/L^2 {pair_ratio[name]:.4f} per head")
    common.target(f"sparse_block_L{L_row}_blocksparse_over_full_dense",
                  sec[name] / sec[f"{row}: dense full, sparse's heads"], "<=", 1 / 1.6)
  common.target("alone_full_blocksparse_over_sdpa_xla",
         sec["alone: blocksparse full"] / sec["alone: sdpa (xla) full"], "<=", 1.2)
  dense_len = memory["dense full"][0] or 0
  common.target("max_len_16gib_blocksparse_full_over_dense",
         (memory["blocksparse full"][0] or 0) / max(dense_len, 1), ">=", 1.0)
  common.target("max_len_16gib_blocksparse_factorized_over_dense_full",
         (memory["blocksparse factorized"][0] or 0) / max(dense_len, 1), ">=", 1.0)
  common.target("model_flops_attention_rel_diff", model_diff, "<=", 0.0)


if __name__ == "__main__":
  main()
