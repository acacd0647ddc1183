"""Every check only an accelerator can make, in one command (under 8 minutes on one GPU or TPU
host): the Pallas and cuDNN paths against dense, attention speed against the device's peak,
windowed against full attention, train-step MFU at 16k tokens, and peak memory.

  python bench/accelerator.py            # on a GPU or TPU
  python bench/accelerator.py --quick    # tiny sizes: runs anywhere (the tests run it on CPU)

1. Equality: on packed rows of several videos with odd grids and padding, each fast path this
   platform has (``pallas``: Triton flash attention on GPU, splash attention on TPU, both in
   Pallas interpret mode on CPU; ``sdpa``: cuDNN on GPU, XLA elsewhere) against ``dense`` in
   f32, for full, window, spatial and temporal patterns: inputs in bf16, forward and the
   query gradient. Target lines ``accel_<backend>_<pattern>`` (largest error relative to the
   reference's largest value, goal <= 0.02).
2. Attention forward+backward on one 16x32x32-token video (L = 16,384; --quick: 4x8x16),
   bf16, 8 heads of 128: TFLOP/s of full attention (3x the forward's 4 K flops per pair and
   head) on the platform's fastest backend, against the device's bf16 matmul peak
   (``metrics.measured_peak_flops``: a table for accelerators, measured on CPU). Target line
   ``accel_attention_full_fraction_of_peak`` (goal >= 0.5).
3. ``window`` at about 12.5% of the pairs against full, the same video and backend. Target
   line ``accel_window_12pct_speedup`` (goal >= 5).
4. The jitted train step of a 16k-token config (one 16x32x32-token video per row, width 1024,
   16 heads of 64, 8 blocks, bf16; --quick: 256 tokens, width 64) for ``full3d`` and
   ``factorized``: MFU from the analytic FLOP count. Target lines ``accel_mfu_full3d`` (goal
   >= 0.4) and ``accel_mfu_factorized`` (goal >= 0.3).
5. Peak device memory of the run (where the platform reports it).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  (bench/common.py)
from configs import p0  # noqa: E402
from data import pipeline  # noqa: E402
from vdit_jax import attention, backends, metrics, trainer  # noqa: E402
from vdit_jax import patterns as pat  # noqa: E402
from vdit_jax import model as model_lib  # noqa: E402
from vdit_jax import sharding as shard_lib  # noqa: E402
from vdit_jax import tokens as tok  # noqa: E402

TOLERANCE = 0.02  # bf16 inputs: 8 mantissa bits, errors of a few parts in a thousand per value


def fast_backends(platform: str) -> list:
  """``(name, Backend factory)`` of each fast path to check on this platform."""
  out = []
  kernels = ([backends.PLATFORM_KERNELS[platform]] if platform in backends.PLATFORM_KERNELS
             else sorted(backends.PLATFORM_KERNELS.values()))
  for kernel in kernels:
    out.append(("pallas_" + kernel, lambda ps, k=kernel: backends.Backend(
        "pallas", ps, kernel=(k, platform not in backends.PLATFORM_KERNELS))))
  out.append(("sdpa", lambda ps: backends.Backend("sdpa", ps)))
  return out


def packed_row(grids, seq_len: int):
  """segment ids and coords of one row holding videos of ``grids`` back to back, padded."""
  items = [{"tokens": np.zeros((tok.num_tokens(g), 1), np.float32), "grid": g} for g in grids]
  batch = tok.pack_rows([items], seq_len, len(grids), 1)
  return batch["segment_ids"], batch["coords"]


def check_equal(quick: bool) -> None:
  grids = [(3, 5, 7), (2, 6, 5), (4, 3, 3)] if quick else [(8, 17, 19), (5, 24, 30), (12, 9, 11)]
  L = 256 if quick else 8192
  seg, coords = packed_row(grids, L)
  H, K = 4, 64
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, L, H, K)), jnp.bfloat16) for _ in range(3))
  for pattern in ("full", "window(1,2,2)", "spatial", "temporal"):
    p = pat.parse(pattern)
    mask = attention.pattern_mask(p, jnp.asarray(seg), jnp.asarray(coords))
    f32 = lambda x: x.astype(jnp.float32)

    def ref(q):
      return attention.dense_attention(f32(q), f32(k), f32(v), mask)

    want, want_vjp = jax.vjp(ref, q)
    real = (seg > 0)[..., None, None]
    want_g = want_vjp(jnp.where(real, 1.0, 0.0) * jnp.ones_like(want))[0]
    for name, make in fast_backends(jax.default_backend()):
      backend = make((p,))
      try:
        layouts = backend.prepare(seg, coords, grids, exact=True)
        ctx = attention.AttentionContext(backend, jnp.asarray(seg), jnp.asarray(coords), layouts)
        run = lambda q: ctx.attend(p, q, k, v).astype(jnp.float32)
        got, got_vjp = jax.vjp(run, q)
        got_g = got_vjp(jnp.where(real, 1.0, 0.0) * jnp.ones_like(got))[0]
      except Exception as e:  # noqa: BLE001 - a path this platform cannot run is a result too
        print(f"{name} {pattern}: cannot run here ({type(e).__name__}: {str(e)[:120]})")
        continue
      rel = lambda a, b: float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
      err = max(rel(jnp.where(real, got, 0), jnp.where(real, want, 0)),
                rel(f32(got_g), f32(want_g)))
      common.target(f"accel_{name}_{pattern.split('(')[0]}", err, "<=", TOLERANCE)


def best_backend_name() -> str:
  return "pallas" if jax.default_backend() in backends.PLATFORM_KERNELS else "blocksparse"


def attention_speed(quick: bool, repeats: int) -> None:
  grid = (4, 8, 16) if quick else (16, 32, 32)
  L = tok.num_tokens(grid)
  seg, coords = packed_row([grid], L)
  H, K = (2, 64) if quick else (8, 128)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, L, H, K)), jnp.bfloat16) for _ in range(3))
  name = best_backend_name()
  peak = metrics.measured_peak_flops()
  seconds = {}
  # About 1/8 of the pairs: a box of 3 x 11 x 11 around each token of 16 x 32 x 32.
  for pattern in ("full", "window(1,2,2)" if quick else "window(1,5,5)"):
    p = pat.parse(pattern)
    backend = (backends.Backend("pallas", (p,), kernel=backends.platform_kernel(
        jax.default_backend())) if name == "pallas" else backends.Backend(name, (p,)))
    layouts = backend.prepare(seg, coords, [grid], exact=True)

    @jax.jit
    def fwd_bwd(q, k, v, layouts):
      ctx = attention.AttentionContext(backend, jnp.asarray(seg), jnp.asarray(coords), layouts)
      loss = lambda q, k, v: jnp.sum(ctx.attend(p, q, k, v).astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    seconds[pattern] = common.median_seconds(
        lambda: jax.block_until_ready(fwd_bwd(q, k, v, layouts)), repeats)
    flops = 3 * 4 * K * H * p.pairs(grid)
    print(f"{name} {pattern}: {p.pairs(grid) / L**2:.3f} of the pairs, "
          f"{seconds[pattern] * 1e3:.1f} ms fwd+bwd, {flops / seconds[pattern] / 1e12:.3f} TFLOP/s")
    if pattern == "full":
      common.target("accel_attention_full_fraction_of_peak",
                    flops / seconds[pattern] / peak, ">=", 0.5)
  window = [p for p in seconds if p != "full"][0]
  common.target("accel_window_12pct_speedup", seconds["full"] / seconds[window], ">=", 5)


def train_mfu(quick: bool, repeats: int) -> None:
  for block, goal in (("full3d", 0.4), ("factorized", 0.3)):
    c = p0.get_config(block)
    c.unlock()
    c.data.batch_rows = 1
    if quick:
      c.data.frames, c.data.side, c.data.seq_len = (4, 4), (16, 16), 256
      c.model.width, c.model.num_heads, c.model.head_dim, c.model.depth = 64, 2, 32, 2
    else:
      c.data.frames, c.data.side, c.data.seq_len = (16, 16), (64, 64), 16384
      c.model.width, c.model.num_heads, c.model.head_dim, c.model.depth = 1024, 16, 64, 8
      c.model.dtype = "bfloat16"
    c.model.attention_backend = best_backend_name()
    c.mesh.data = 1
    c.lock()
    mesh = shard_lib.make_mesh(c.mesh, jax.devices()[:1])
    backend = backends.resolve(c.model, c.data.max_segments)
    batch = pipeline.BatchMaker(c, backend=backend).pack([[{
        "video": np.random.default_rng(2).uniform(-1, 1, (c.data.frames[1], c.data.side[1],
                                                            c.data.side[1], c.data.channels))
        .astype(np.float32), "label": 0}]])
    with jax.set_mesh(mesh), shard_lib.axis_rules(c.mesh.rules):
      graphdef, state, shardings = trainer.create_sharded_state(c, mesh, backend)
      step = trainer.jit_train_step(c, graphdef, shardings, mesh, backend)
      feed = trainer._device_batch(batch, trainer.batch_shardings(c, mesh, backend))
      holder = {"state": state}

      def run():
        holder["state"], m = step(holder["state"], feed)
        jax.block_until_ready(m["loss"])

      seconds = common.median_seconds(run, repeats)
    flops = 3 * model_lib.forward_flops(c.model, batch["seg_grid"][0], c.data.seq_len,
                                        batch["tokens"].shape[-1])
    mfu = flops / seconds / metrics.measured_peak_flops()
    print(f"train step {block}, {c.data.seq_len} tokens, width {c.model.width}, "
          f"{c.model.dtype}: {seconds:.3f} s, MFU {mfu:.3f}")
    common.target(f"accel_mfu_{block}", mfu, ">=", goal)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  dev = jax.devices()[0]
  print(f"platform {jax.default_backend()}, {dev.device_kind}, {jax.device_count()} devices")
  check_equal(args.quick)
  attention_speed(args.quick, args.repeats)
  train_mfu(args.quick, args.repeats)
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  print(f"peak device memory: {peak / 2**30:.2f} GiB" if peak else
        "peak device memory: not reported by this platform")


if __name__ == "__main__":
  main()
