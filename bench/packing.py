"""Packing and loading speed of the data pipeline, side by side with the train step they feed.

  python bench/packing.py [--quick] [--batches 50] [--repeats 3]

Two mixes of video sizes, both on the default model (configs/default.py):
  default  the default config's mix: 8 frames, side 32, aspect 0.75 / 1 / 1.33 (252-256 tokens
           per video, so there is almost nothing for packing to gain over padding);
  mixed    frames 4-16, side 16-48, aspect 0.5 / 0.75 / 1 / 1.33 / 2 (32-1152 tokens per video),
           4 rows of 2304 tokens, at most 8 videos per row.

Prints, per mix: packing efficiency (real tokens / all tokens) and videos per row over
``--batches`` batches; host time per batch to plan (draw + best-fit on sizes), render, and pack
(patchify + rows, and block layouts for blocksparse); the train step's time (jitted
``trainer.train_step``: forward, backward, AdamW, EMA) and useful (non-pad) tokens per second
with packing, against the same videos each padded to the mix's largest video in a row of its
own. The packed step uses the blocksparse backend where it matters (its cost follows the
allowed pairs; dense pays for every pair in a row, across videos too); the padded baseline is
timed with both backends and the faster one counts. Then the batches/s a grain loader with 2
worker processes delivers for the default mix, against the batches/s the step consumes.

Targets: packing efficiency, host packing time (plan + pack) per batch / train step and loader
rate / step rate on the default mix; useful tokens/s packed / padded on the mixed mix (on the
default mix the two are equal by construction, which the table shows).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from data import packing, pipeline  # noqa: E402
import common  # noqa: E402  (bench/common.py)
from vdit_jax import config as config_lib  # noqa: E402
from vdit_jax import backends, trainer  # noqa: E402
from vdit_jax import tokens as tok  # noqa: E402


def mix_configs(quick: bool) -> dict:
  """The default config's mix and a genuinely mixed one, on the default model."""
  base = default.get_config()
  base.unlock()
  mixed = default.get_config()
  mixed.unlock()
  mixed.data.frames, mixed.data.side = (4, 16), (16.0, 48.0)
  mixed.data.aspect_ratios = (0.5, 0.75, 1.0, 1.33, 2.0)
  mixed.data.seq_len, mixed.data.max_segments = 2304, 8
  mixed.model.attention_backend = "blocksparse"
  if quick:  # reduced sizes and a 1-block model: a smoke run, not the targets' sizes
    for c in (base, mixed):
      c.model.depth = 1
    mixed.data.frames, mixed.data.side, mixed.data.seq_len = (2, 8), (16.0, 32.0), 512
  return {"default": base, "mixed": mixed}


def _time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def host_stats(config, batches: int) -> dict:
  """Packing efficiency, videos per row, and host milliseconds per batch by stage."""
  maker = pipeline.BatchMaker(config)
  out = {"plan": [], "render": [], "pack": [], "eff": [], "per_row": [], "tokens": []}
  patch = maker.patch
  for step in range(batches):
    t0 = time.perf_counter()
    rows, _ = maker.plan(step)
    t1 = time.perf_counter()
    items = [[maker.source[i] for i in row] for row in rows]
    t2 = time.perf_counter()
    batch = packing.pack_videos(items, patch, maker.seq_len, maker.max_segments, maker.channels,
                                maker.null_label)
    maker.backend.prepare(batch["segment_ids"], batch["coords"], maker.layout_grids,
                          max_segments=maker.layout_segments)
    t3 = time.perf_counter()
    out["plan"].append(t1 - t0)
    out["render"].append(t2 - t1)
    out["pack"].append(t3 - t2)
    out["eff"].append(packing.packing_efficiency(batch))
    out["per_row"].append(np.mean([len(r) for r in rows]))
    out["tokens"] += [tok.num_tokens(tok.grid_shape(it["video"].shape[:3], patch))
                      for row in items for it in row]
  drawn = [tok.num_tokens(tok.grid_shape(maker.source.video_size(i), patch)) for i in range(2000)]
  stats = {k: float(np.mean(v)) for k, v in out.items()}
  stats["source_tokens"] = float(np.mean(drawn))
  return stats


def step_batches(config) -> tuple[dict, dict, int]:
  """Step 0's packed batch, and the same videos one per row, padded to the mix's largest."""
  maker = pipeline.BatchMaker(config)
  rows, _ = maker.plan(0)
  items = [[maker.source[i] for i in row] for row in rows]
  packed = packing.pack_videos(items, maker.patch, maker.seq_len, maker.max_segments,
                               maker.channels, maker.null_label)
  pad_len = tok.num_tokens(tok.grid_shape(maker.source.largest_video(), maker.patch))
  padded = packing.pack_videos([[it] for row in items for it in row], maker.patch, pad_len, 1,
                               maker.channels, maker.null_label)
  return packed, padded, pad_len


def step_time(config, batch: dict, backend: str, repeats: int) -> float:
  """Median seconds of the jitted train step (after one compile+run) on ``batch``."""
  c = config.copy_and_resolve_references()
  c.model.attention_backend = backend
  c.data.seq_len = batch["tokens"].shape[1]
  c.data.max_segments = batch["seg_grid"].shape[1]
  c.data.batch_rows = batch["tokens"].shape[0]
  feed = {k: batch[k] for k in trainer.batch_keys(c)}
  resolved = backends.resolve(c.model, c.data.max_segments)
  layouts = resolved.prepare(batch["segment_ids"], batch["coords"], config_lib.possible_grids(c),
                             max_segments=c.data.max_segments)  # as the pipeline makes them
  if layouts is not None:
    feed["layouts"] = layouts
  feed = jax.device_put(feed)
  graphdef, state = trainer.init_state(c)
  fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef,
                                 tx=trainer.make_optimizer(c), config=c), donate_argnums=0)
  holder = {"state": state}

  def run():
    holder["state"], metrics = fn(holder["state"], feed)
    jax.block_until_ready(metrics)

  run()  # compile
  return _time(run, repeats)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
  ap.add_argument("--batches", type=int, default=50, help="batches for the packing statistics")
  ap.add_argument("--repeats", type=int, default=3, help="timed train steps per variant")
  args = ap.parse_args()
  batches = 8 if args.quick else args.batches
  repeats = 1 if args.quick else args.repeats

  mixes = mix_configs(args.quick)
  host = {name: host_stats(c, batches) for name, c in mixes.items()}
  steps = {}
  for name, c in mixes.items():
    packed, padded, pad_len = step_batches(c)
    real = int((packed["segment_ids"] > 0).sum())
    assert real == int((padded["segment_ids"] > 0).sum())
    variants = {"packed": (packed, c.model.attention_backend)}
    # --quick times only what its target lines need: fewer compiles.
    backends = ("dense", "blocksparse") if not args.quick else \
        (c.model.attention_backend,) if name == "mixed" else ()
    for backend in backends:
      variants[f"padded {backend}"] = (padded, backend)
    steps[name] = {"real": real, "pad_len": pad_len,
                   "rows": {v: (b["tokens"].shape[:2], backend,
                                step_time(c, b, backend, repeats))
                            for v, (b, backend) in variants.items()}}
  loader = common.loader_rate(mixes["default"], 2, 10 if args.quick else 60)

  size = "quick sizes (1-block model)" if args.quick else "default model"
  print(f"\nPacking, {batches} batches per mix ({size}); host ms per batch")
  print(f"{'mix':8s} {'tok/video drawn':>15s} {'tok/video packed':>16s} {'videos/row':>10s} "
        f"{'real/all':>8s} {'plan':>7s} {'render':>7s} {'pack':>7s}")
  for name, h in host.items():
    print(f"{name:8s} {h['source_tokens']:15.0f} {h['tokens']:16.0f} {h['per_row']:10.2f} "
          f"{h['eff']:8.3f} {1e3 * h['plan']:7.2f} {1e3 * h['render']:7.2f} "
          f"{1e3 * h['pack']:7.2f}")
  print("(pack includes blocksparse layouts for the mixed mix; render is the source's work)")

  print("\nTrain step on step 0's videos: packed rows vs each video padded to the mix's largest")
  print(f"{'mix':8s} {'variant':22s} {'rows x L':>10s} {'s/step':>8s} {'useful tok/s':>12s} "
        f"{'vs padded':>9s}")
  ratios = {}
  for name, s in steps.items():
    best_pad = min((t for v, (_, _, t) in s["rows"].items() if v.startswith("padded")),
                   default=float("nan"))
    for v, (shape, backend, t) in s["rows"].items():
      label = f"{v} ({backend})" if v == "packed" else v
      vs = f"{best_pad / t:9.2f}" if np.isfinite(best_pad) else f"{'-':>9s}"
      print(f"{name:8s} {label:22s} {shape[0]:>4d} x {shape[1]:<4d} {t:8.3f} "
            f"{s['real'] / t:12.0f} {vs}")
    ratios[name] = best_pad / s["rows"]["packed"][2]
  default_step = steps["default"]["rows"]["packed"][2]
  print(f"\nLoader, default mix, 2 grain worker processes: {loader:.1f} batches/s; the step "
        f"consumes {1 / default_step:.2f} batches/s")
  print()

  d = host["default"]
  common.target("packing_efficiency_default_mix", d["eff"], ">=", 0.98)
  common.target("host_packing_time_per_step_default_mix", (d["plan"] + d["pack"]) / default_step,
         "<=", 0.05)
  common.target("loader_2_workers_vs_step_rate_default_mix", loader * default_step, ">=", 3.0)
  common.target("useful_tokens_per_s_packed_vs_padded_mixed_mix", ratios["mixed"], ">=", 1.8)


if __name__ == "__main__":
  main()
