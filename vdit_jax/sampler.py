"""Sampling videos from a trained model: restore EMA params, pack noise, integrate, unpack.

Several requested shapes share one packed row and one compiled call; shapes are checked against
the patch size before anything is compiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import diffusion
from vdit_jax import model as model_lib
from vdit_jax import tokens as tokens_lib

# Rows are padded to a multiple of this, so nearby shape mixes reuse one compiled sampler.
_ROW_QUANTUM = 128


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  """``"16x32x32,8x32x48"`` -> ``[(16, 32, 32), (8, 32, 48)]`` (T x H x W in pixels/frames)."""
  shapes = []
  for part in [p.strip() for p in text.split(",") if p.strip()]:
    dims = part.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise ValueError(f"shape {part!r} is not TxHxW with positive integers, e.g. 16x32x32")
    shapes.append(tuple(int(d) for d in dims))
  if not shapes:
    raise ValueError(f"no shapes in {text!r}: pass e.g. --shapes 16x32x32,8x32x48")
  return shapes


def parse_labels(text: str, count: int, num_classes: int,
                 parse: Callable[[str], int] = int) -> list[int]:
  """Labels for ``count`` videos: ``""`` -> 0, 1, 2, ...; one label is repeated for all.

  A label is an int in [0, num_classes] (num_classes = unconditional), or whatever ``parse``
  turns into one (the run's data source's names: ``data.labels.label_set(config).parse``).
  """
  if not text.strip():
    return [i % num_classes for i in range(count)]
  labels = [parse(x.strip()) for x in text.split(",")]
  if len(labels) == 1:
    labels = labels * count
  if len(labels) != count:
    raise ValueError(f"{len(labels)} labels for {count} shapes: give one label, or one per shape")
  for lab in labels:
    if not 0 <= lab <= num_classes:
      raise ValueError(f"label {lab} is out of range: use 0..{num_classes - 1}, or "
                       f"{num_classes} for unconditional")
  return labels


def check_shapes(shapes, patch) -> list[tuple[int, int, int]]:
  """Token grids of the requested shapes; raises (naming valid sizes) before any compile."""
  grids = []
  for shape in shapes:
    grids.append(tokens_lib.grid_shape(shape, patch))
  return grids


def sample(model: model_lib.VideoDiT, config: ml_collections.ConfigDict,
           shapes: list[tuple[int, int, int]], labels: list[int], cfg_scale: float = 3.0,
           num_steps: int = 30, seed: int = 0, method: str = "euler") -> list[np.ndarray]:
  """Videos ``[T, H, W, C]`` in [-1, 1], one per requested shape, from one packed call,
  integrated with ``method`` (``diffusion.SAMPLERS``)."""
  diffusion.check_sampler(method)  # before anything compiles
  patch = tuple(config.model.patch)
  C = config.data.channels
  grids = check_shapes(shapes, patch)
  P = tokens_lib.token_dim(patch, C)
  n_total = sum(math.prod(g) for g in grids)
  quantum = max(_ROW_QUANTUM, int(config.model.attention_block))
  L = -(-n_total // quantum) * quantum
  rng = np.random.default_rng(seed)
  items = [{"tokens": rng.standard_normal((math.prod(g), P)).astype(np.float32), "grid": g,
            "label": lab} for g, lab in zip(grids, labels)]
  batch = tokens_lib.pack_rows([items], L, len(items), P,
                               seg_fields={"label": (np.int32, config.model.num_classes)})
  # Sized for exactly this row: sampling compiles per call anyway.
  layouts = model.backend.prepare(batch["segment_ids"], batch["coords"], grids, exact=True)
  shift = diffusion.video_shift(jnp.asarray(batch["seg_grid"]), config.diffusion)
  out = _integrate(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                   jnp.asarray(batch["coords"]), jnp.asarray(batch["seg_label"]), shift,
                   layouts, config.model.num_classes, float(cfg_scale), int(num_steps),
                   method)
  out = np.asarray(jax.device_get(out))
  row = tokens_lib.unpack_row(out[0], batch["segment_ids"][0], batch["seg_grid"][0])
  return [tokens_lib.unpatchify_np(toks, g, patch, C) for toks, g in zip(row, grids)]


@nnx.jit(static_argnums=(7, 8, 9, 10))
def _integrate(model, noise, segment_ids, coords, labels, shift, layouts, null_label, cfg_scale,
               num_steps, method):
  velocity = diffusion.guided(model, labels, segment_ids, coords, null_label, cfg_scale,
                              layouts=layouts)
  return diffusion.integrate(velocity, noise, segment_ids, shift, num_steps, method)


def load_model(workdir: str, step: int | None = None,
               ) -> tuple[model_lib.VideoDiT, ml_collections.ConfigDict, int]:
  """The EMA model of a checkpoint in ``workdir`` (newest if ``step`` is None), its config and step.

  Only the EMA params are read from disk; the optimizer state and raw params stay there.
  """
  mngr = ckpt_lib.manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_lib.checkpoint_dir(workdir)}: train first "
                            f"(python train.py --workdir {workdir})")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {workdir}: available steps {sorted(steps)}")
  config = ckpt_lib.read_config(mngr, step)
  abstract_model = nnx.eval_shape(lambda: model_lib.build_model(config))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_params)
  ema = ckpt_lib.restore_subtree(mngr, step, "ema", target)
  mngr.close()
  return nnx.merge(graphdef, ema), config, step
