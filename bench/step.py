"""Train-step speed of the reference config P0, side by side in one process.

P0: 4 blocks, width 256, 4 heads x 64, MLP 1024; two videos of 8x32x32 with 4 channels and
patch (1, 2, 2), i.e. 2048 tokens each, one per row; fp32; forward + backward.

  python bench/step.py [--quick] [--repeats 5]

Then the whole train step (optimizer and EMA included) of the default config
(configs/default.py) on one device: its MFU against the matmul peak measured in the same run, the
step jitted with the trainer's mesh shardings against plain ``jax.jit`` without sharding, bf16
against f32 compute, and the compiled temporary memory with and without remat, with the bytes
the forward pass keeps for the backward pass (what remat saves, on any platform).

Prints seconds per forward+backward for full3d, factorized (a spatial and a temporal attention
sublayer in every block) and alternating (spatial blocks and temporal blocks in turn, one
attention sublayer each: how Latte and Open-Sora's STDiT3 factorize, about half the FLOPs of
full3d; factorized's extra sublayers cost more), window and sparse (the base config's
``model.window`` box and ``model.sparse_heads`` mix), a plain einsum DiT written the obvious way
(the "plain JAX" reference, measured in the same run), achieved GFLOP/s from the analytic FLOP
count, and the fraction of this machine's measured f32 matmul peak. The plain einsum DiT is the one peer
timed here; ``bench/torch_ref.py`` times the same model in PyTorch, in turns with vdit-jax.
``--quick`` times only the variants its target lines compare.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default, p0  # noqa: E402
from data import pipeline  # noqa: E402
from vdit_jax import config as config_lib  # noqa: E402
from vdit_jax import backends, metrics, trainer, tokens  # noqa: E402
import common  # noqa: E402  (bench/common.py)
from vdit_jax import model as model_lib  # noqa: E402
from vdit_jax import sharding as shard_lib  # noqa: E402

# The P0 variants timed: name -> (model.block, model.attention_backend, exact layouts).
# bench/torch_ref.py times "vdit full3d" and "vdit alternating bsparse" from here too.
P0_VARIANTS = {
    "vdit full3d": ("full3d", "dense", False),
    "vdit factorized dense": ("factorized", "dense", False),
    "vdit factorized bsparse": ("factorized", "blocksparse", False),
    "  (exact layouts)": ("factorized", "blocksparse", True),
    "vdit alternating bsparse": ("alternating", "blocksparse", False),
    "vdit window bsparse": ("window", "blocksparse", False),
    "vdit sparse bsparse": ("sparse", "blocksparse", False),
    "plain einsum full": ("full3d", "dense", False),
}


# What --quick times: the variants the target lines compare.
QUICK_VARIANTS = ("vdit full3d", "plain einsum full")


def p0_config(block: str, quick: bool, backend: str = "dense"):
  c = p0.get_config(block)
  c.unlock()
  if quick:
    c.data.frames, c.data.side, c.data.seq_len = (4, 4), (16, 16), 256
  c.model.attention_backend = backend
  return c


def p0_batch(config, exact_layouts: bool = False) -> dict:
  rng = np.random.default_rng(0)
  T, S = config.data.frames[0], config.data.side[0]
  P = tokens.token_dim(config.model.patch, config.data.channels)
  items = []
  for _ in range(config.data.batch_rows):
    video = rng.uniform(-1, 1, (T, S, S, config.data.channels)).astype(np.float32)
    items.append([{"tokens": tokens.patchify_np(video, config.model.patch),
                   "grid": tokens.grid_shape((T, S, S), config.model.patch), "label": 1}])
  batch = tokens.pack_rows(items, config.data.seq_len, config.data.max_segments, P,
                           seg_fields={"label": (np.int32, config.model.num_classes)})
  # As the training pipeline makes them: the static bound for this data config (or exact).
  layouts = backends.resolve(config.model, config.data.max_segments).prepare(
      batch["segment_ids"], batch["coords"], config_lib.possible_grids(config),
      max_segments=config.data.max_segments, exact=exact_layouts)
  if layouts is not None:
    batch["layouts"] = layouts
  return batch


def p0_forward_flops(config, batch) -> float:
  """Analytic forward FLOPs of a P0 batch (``model.forward_flops`` summed over its rows)."""
  return sum(model_lib.forward_flops(config.model, [g for g in row if g.prod() > 0],
                                     config.data.seq_len, batch["tokens"].shape[-1])
             for row in np.asarray(batch["seg_grid"]))


def time_fn(fn, args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def vdit_grad_fn(config):
  graphdef, state = trainer.init_state(config)
  # Non-zero weights everywhere, so no branch of the computation is trivially zero.
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape),
                        state["params"])
  key = jax.random.key(0)
  fn = jax.jit(jax.value_and_grad(
      lambda p, b: trainer.loss_fn(p, graphdef, b, key, config)[0]))
  return fn, params


def plain_einsum_grad_fn(config):
  """A plain JAX DiT: the same layers, written as einsums with autodiff'd softmax attention."""
  m = config.model
  D, H, K, F = m.width, m.num_heads, m.head_dim, int(m.mlp_ratio * m.width)
  P = tokens.token_dim(m.patch, config.data.channels)
  keys = iter(jax.random.split(jax.random.key(0), 64))
  w = lambda *s: 0.02 * jax.random.normal(next(keys), s)
  params = {"embed": w(P, D), "out": w(D, P), "ada": w(D, 6 * D),
            "blocks": [{"qkv": w(D, 3 * H * K), "o": w(H * K, D), "fc1": w(D, F),
                        "fc2": w(F, D)} for _ in range(m.depth)]}

  def ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  def loss(p, b):
    x = b["tokens"] @ p["embed"]
    cond = jax.nn.silu(jnp.ones((x.shape[0], 1, D))) @ p["ada"]
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(cond, 6, -1)
    mask = b["segment_ids"][:, :, None] == b["segment_ids"][:, None, :]
    for blk in p["blocks"]:
      qkv = (ln(x) * (1 + sc1) + sh1) @ blk["qkv"]
      q, k, v = jnp.split(qkv.reshape(*x.shape[:2], 3 * H, K), 3, axis=2)
      s = jnp.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(K)
      a = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), -1)
      o = jnp.einsum("bhlm,bmhk->blhk", a, v).reshape(*x.shape[:2], H * K)
      x = x + g1 * (o @ blk["o"])
      x = x + g2 * (jax.nn.gelu((ln(x) * (1 + sc2) + sh2) @ blk["fc1"]) @ blk["fc2"])
    return jnp.mean((ln(x) @ p["out"] - b["tokens"]) ** 2)

  return jax.jit(jax.value_and_grad(loss)), params


# ----------------------------------------------------------------------------- default train step


def default_config(quick: bool, **fields):
  """configs/default.py on one device (quick: 4x16x16 videos in 128-token rows)."""
  c = default.get_config()
  c.unlock()
  c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
  if quick:
    c.data.frames, c.data.side, c.data.seq_len = (4, 4), (16, 16), 128
  for key, value in fields.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def train_steps(config, sharded: bool):
  """``(step, state, batch)`` of the trainer's train step: jitted with the run's mesh shardings
  (as train() does, on a 1-device mesh), or plain ``jax.jit`` with no sharding at all."""
  host_batch = pipeline.make_batch(config, 0)
  if not sharded:
    graphdef, state = trainer.init_state(config)
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef,
                                     tx=trainer.make_optimizer(config), config=config),
                   donate_argnums=0)
    return step, state, jax.tree.map(jnp.asarray, host_batch), host_batch
  mesh = shard_lib.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), shard_lib.axis_rules(config.mesh.rules):
    graphdef, state, shardings = trainer.create_sharded_state(config, mesh)
    step = trainer.jit_train_step(config, graphdef, shardings, mesh)
    batch = trainer._device_batch(host_batch, trainer.batch_shardings(config, mesh))
  return step, state, batch, host_batch


def time_steps(variants: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each ``(fn, state, batch, ...)``, run in turns (A, B, C, A, B,
  C, ...) so that load from other processes spreads over all of them alike; ``fn(state, batch)``
  returns the next state first (train steps donate it)."""
  states = {}
  for name, (fn, state, batch, _) in variants.items():
    states[name] = jax.block_until_ready(fn(state, batch))[0]  # compile + one warm-up call
  times: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(repeats):
    for name, (fn, _, batch, _) in variants.items():
      t0 = time.perf_counter()
      states[name] = jax.block_until_ready(fn(states[name], batch))[0]
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def matmul_variant(n: int = 2048):
  """An f32 ``n x n`` matmul (as metrics.measured_peak_flops times it) and its FLOPs, to time
  in turns with the steps: a peak measured under the same load as they are."""
  a = jnp.ones((n, n), jnp.float32)
  return (jax.jit(lambda x, y: (x, x @ y)), a, a, None), 2.0 * n**3


def temp_bytes(config) -> int:
  """Temporary (activation) memory of the compiled train step, from XLA's memory analysis."""
  step, state, batch, _ = train_steps(config, sharded=False)
  return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def kept_bytes(config) -> int:
  """Bytes the forward pass keeps for the backward pass (``model.residual_bytes`` of the loss)."""
  graphdef, state = trainer.init_state(config)
  batch = jax.tree.map(jnp.asarray, pipeline.make_batch(config, 0))
  key = jax.random.key(0)
  return model_lib.residual_bytes(
      lambda p: trainer.loss_fn(p, graphdef, batch, key, config)[0], state["params"])


def default_step_bench(quick: bool, repeats: int) -> dict[str, float]:
  """The default config's train step: MFU, sharding overhead, bf16 and remat, side by side."""
  f32 = default_config(quick)
  matmul, matmul_flops = matmul_variant()
  variants = {"sharded f32": train_steps(f32, sharded=True),
              "plain jit f32": train_steps(f32, sharded=False),
              "sharded bf16": train_steps(default_config(quick, **{"model.dtype": "bfloat16"}),
                                          sharded=True),
              "f32 matmul 2048": matmul}
  sec = time_steps(variants, repeats)
  peak = matmul_flops / sec.pop("f32 matmul 2048")
  flops = metrics.step_flops(f32, variants["sharded f32"][3])
  remat = {"model.remat": True}
  dots = {"model.remat": True, "model.remat_policy": "dots_with_no_batch_dims_saveable"}
  mem = {"no remat": temp_bytes(f32), "remat": temp_bytes(default_config(quick, **remat))}
  kept = {"no remat": kept_bytes(f32), "remat": kept_bytes(default_config(quick, **remat)),
          "remat, dots kept": kept_bytes(default_config(quick, **dots))}
  size = "quick sizes" if quick else "configs/default.py"
  print(f"\ntrain step (forward, backward, AdamW, EMA) of {size} on one device, "
        f"{flops / 1e9:.1f} GFLOP analytic; f32 matmul peak timed in turns with the steps: "
        f"{peak / 1e9:.0f} GFLOP/s")
  print(f"{'variant':24s} {'s/step':>8s} {'GFLOP/s':>8s} {'MFU':>8s}")
  for name, t in sec.items():
    print(f"{name:24s} {t:8.3f} {flops / t / 1e9:8.1f} {flops / t / peak:8.1%}")
  print(f"compiled temp memory: {mem['no remat'] / 2**20:.1f} MiB without remat, "
        f"{mem['remat'] / 2**20:.1f} MiB with remat per block (XLA:CPU's buffer assignment)")
  print("kept from the forward for the backward pass (residuals): "
        + ", ".join(f"{name} {b / 2**20:.1f} MiB" for name, b in kept.items()))
  out = {"mfu": flops / sec["sharded f32"] / peak,
         "mesh_vs_plain": sec["sharded f32"] / sec["plain jit f32"],
         "bf16_vs_f32": sec["sharded bf16"] / sec["sharded f32"],
         "remat_vs_no_remat_temp_bytes": mem["remat"] / mem["no remat"],
         "remat_vs_no_remat_kept_bytes": kept["remat"] / kept["no remat"]}
  print(f"ratios: bf16/f32 step time {out['bf16_vs_f32']:.3f}, remat/no-remat temp memory "
        f"{out['remat_vs_no_remat_temp_bytes']:.3f}, remat/no-remat residuals "
        f"{out['remat_vs_no_remat_kept_bytes']:.3f}")
  return out


def default_step_targets(results: dict[str, float]) -> None:
  common.target("default_step_mfu_vs_measured_peak", results["mfu"], ">=", 0.35)
  common.target("default_step_1dev_mesh_vs_plain_jit", results["mesh_vs_plain"], "<=", 1.05)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  peak = metrics.measured_peak_flops()
  rows = []
  results = {}
  for name, (block, backend, exact) in P0_VARIANTS.items():
    if args.quick and name not in QUICK_VARIANTS:
      continue
    config = p0_config(block, args.quick, backend)
    batch = jax.tree.map(jnp.asarray, p0_batch(config, exact))
    if name.startswith("plain"):
      fn, params = plain_einsum_grad_fn(config)
    else:
      fn, params = vdit_grad_fn(config)
    sec = time_fn(fn, (params, batch), args.repeats)
    flops = 3 * p0_forward_flops(config, batch)
    results[name] = sec
    rows.append((name, sec, flops / 1e9, flops / sec / 1e9, flops / sec / peak))

  size = "quick sizes" if args.quick else "P0"
  print(f"\nfp32 forward+backward, {size}; measured f32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(f"{'variant':24s} {'s/step':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
  for name, sec, gfl, gfls, frac in rows:
    print(f"{name:24s} {sec:8.3f} {gfl:8.1f} {gfls:8.1f} {frac:8.1%}")
  print()
  scale = default_step_bench(args.quick, args.repeats)
  print()
  common.target("p0_full3d_vs_plain_einsum_same_run",
                results["vdit full3d"] / results["plain einsum full"], "<=", 1.0)
  default_step_targets(scale)


if __name__ == "__main__":
  main()
