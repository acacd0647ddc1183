"""Held-out loss: the rectified-flow loss of the EMA model on videos never trained on, at a
fixed grid of t with fixed noise.

Training loss is a noisy estimate (random t, random noise, random videos); two runs compared
on it differ mostly by that noise. Here every call sees the same videos (the source's first
``evals.heldout.videos`` held-out indices, packed the same way), the same t values and the same
noise, so the only thing that changes between calls and between runs of the same data config
is the model. Reported per t (``loss_t0.3``: the t-bin), per video size (``loss_8x32x32``) and
overall (``loss``: the mean over videos and t values).

With ``evals.heldout.label_t`` > 0 it also measures how much the model uses its label: the loss
at that t with each digit of every video's label changed to the next value (``label_digits``:
shape and colour for ``synthetic_shapes``, else ``model.label_factors``) and with the null label,
minus the loss with the true label (``label_gap_shape``, ``label_gap_colour``,
``label_gap_null``). A gap near 0 means the model draws the same thing whatever that part of
the label says. A captioned run gets the same for its captions: ``caption_gap_null`` (every
caption nulled) and, for text captions, ``caption_gap_<class>`` for each class of words the
source names (``caption_word_classes``: colour, shape, direction for ``synthetic_shapes``), each
word of the class swapped for the next one, over the videos whose caption has such a word.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from evals.registry import EvalContext, EvalResult
from vdit_jax import conditioning as cond_lib
from vdit_jax import diffusion
from vdit_jax import tokens as tokens_lib
from vdit_jax import trainer


def per_video_losses(params, graphdef, batch, t, eps_BLP) -> jax.Array:
  """Mean squared velocity error of each video ``[B, S]`` at the same ``t`` for every video
  (0 for empty slots), conditioned on what the batch holds (label, caption)."""
  seg_BL = batch["segment_ids"]
  x0 = batch["tokens"]
  t_BS = jnp.full(batch["seg_grid"].shape[:2], t, jnp.float32)
  x_t = diffusion.add_noise(x0, eps_BLP, tokens_lib.per_token(t_BS, seg_BL))
  model = nnx.merge(graphdef, params)
  v = model(x_t, t_BS, cond_lib.from_batch(batch), seg_BL, batch["coords"],
            layouts=batch.get("layouts"))
  per_tok_BL = jnp.mean(jnp.square(v - diffusion.velocity_target(x0, eps_BLP)), axis=-1)
  S = batch["seg_grid"].shape[1]
  onehot_BLS = (seg_BL[:, :, None] == jnp.arange(1, S + 1)).astype(jnp.float32)
  sums_BS = jnp.einsum("bl,bls->bs", per_tok_BL, onehot_BLS)
  return sums_BS / jnp.maximum(jnp.sum(onehot_BLS, axis=1), 1.0)


def _on_host(x: jax.Array) -> np.ndarray:
  """A global array whole on every process's host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
                    else jax.device_get(x))


def label_digits(config) -> list[tuple[str, int]]:
  """``(name, size)`` of each digit of a label (the last varies fastest): ``synthetic_shapes``'
  shape and colour whatever the model embeds, else ``model.label_factors`` (none: [])."""
  if config.data.source == "synthetic_shapes":
    from data import synthetic_shapes
    return [("shape", len(synthetic_shapes.SHAPES)), ("colour", len(synthetic_shapes.COLORS))]
  return [(f"factor{i}", int(f)) for i, f in enumerate(config.model.label_factors)]


def change_label(label_BS: jax.Array, digit: int, sizes: tuple[int, ...],
                 num_classes: int) -> jax.Array:
  """Every real label with digit ``digit`` moved to its next value (-1: the null label);
  the null label of empty slots stays."""
  if digit < 0:
    new = jnp.full_like(label_BS, num_classes)
  else:
    value = cond_lib.label_digit(label_BS, digit, sizes)
    new = label_BS + ((value + 1) % sizes[digit] - value) * math.prod(sizes[digit + 1:])
  return jnp.where(label_BS < num_classes, new, label_BS)


def relabeled_losses(params, graphdef, batch, t, eps_BLP, digit, sizes, num_classes):
  """``per_video_losses`` with ``change_label`` applied to the batch's labels."""
  batch = dict(batch, seg_label=change_label(batch["seg_label"], digit, sizes, num_classes))
  return per_video_losses(params, graphdef, batch, t, eps_BLP)


def caption_swaps(tokenizer, classes: dict[str, tuple[str, ...]],
                  vocab: int) -> dict[str, np.ndarray]:
  """Per class of caption words (``{"colour": ("red", "blue", ...)}``), an id map ``[vocab]``
  sending each of the class's words the tokenizer knows to the next of them and every other id
  to itself. Classes with fewer than two known words change nothing and are left out."""
  swaps = {}
  for name, words in classes.items():
    ids = [tokenizer.ids[w] for w in words if w in tokenizer.ids]
    if len(ids) < 2:
      continue
    id_map = np.arange(vocab, dtype=np.int32)
    id_map[ids] = np.roll(ids, -1)
    swaps[name] = id_map
  return swaps


def recaptioned_losses(params, graphdef, batch, t, eps_BLP, id_map):
  """``per_video_losses`` with the batch's caption word ids sent through ``id_map``, or with
  every caption nulled when ``id_map`` is None."""
  if id_map is None:
    batch = dict(batch, seg_caption_mask=jnp.zeros_like(batch["seg_caption_mask"]))
  else:
    batch = dict(batch, seg_caption=id_map[batch["seg_caption"]])
  return per_video_losses(params, graphdef, batch, t, eps_BLP)


class HeldoutLoss:
  """``evals.heldout``: see the module docstring."""

  def __init__(self, ctx: EvalContext):
    from data import pipeline  # evaluators sit on the scripts' side of the arrow
    config = ctx.config
    cfg = config.evals.heldout
    self.t_values = tuple(float(t) for t in cfg.t_values)
    if not self.t_values or not all(0.0 < t < 1.0 for t in self.t_values):
      raise ValueError(f"evals.heldout.t_values={tuple(cfg.t_values)} must be values in (0, 1)")
    maker = pipeline.BatchMaker(config, backend=ctx.backend)
    batches, _ = maker.heldout_batches(int(cfg.videos))
    patch = tuple(int(p) for p in config.model.patch)
    n, p = jax.process_count(), jax.process_index()
    self.shardings = trainer.batch_shardings(config, ctx.mesh, ctx.backend)
    self.batches, self.noise, self.sizes = [], [], []
    for b, batch in enumerate(batches):
      rows = batch["segment_ids"].shape[0] // n
      mine = jax.tree.map(lambda x: x[p * rows:(p + 1) * rows], batch)
      self.batches.append(trainer._device_batch(mine, self.shardings))
      # Fixed noise per (batch, t): the same for every call and every run of this data config.
      self.noise.append([
          np.random.default_rng([int(config.seed), b, i]).standard_normal(
              batch["tokens"].shape, np.float32)[p * rows:(p + 1) * rows]
          for i in range(len(self.t_values))])
      self.sizes.append([[None if g.prod() == 0 else
                          "x".join(str(int(d) * q) for d, q in zip(g, patch)) for g in row]
                         for row in np.asarray(batch["seg_grid"])])
    self.noise_sharding = self.shardings["tokens"]
    self._fn = jax.jit(functools.partial(per_video_losses, graphdef=ctx.graphdef))
    self.label_t = float(cfg.get("label_t", 0.0))  # checked by registry.validate
    self.num_classes = int(config.model.num_classes)
    self.digits = label_digits(config)
    sizes = tuple(n for _, n in self.digits)
    # One compiled forward per change: -1 is the null label, then each digit in turn.
    self._changed = {
        d: jax.jit(functools.partial(relabeled_losses, graphdef=ctx.graphdef, digit=d,
                                     sizes=sizes, num_classes=self.num_classes))
        for d in range(-1, len(self.digits))} if self.label_t else {}
    # Caption gaps: the null caption, then each class of words the source can swap.
    self.caption_swaps: dict[str, np.ndarray | None] = {}
    if self.label_t and config.model.caption.mode != "none":
      self.caption_swaps["null"] = None
      classes = getattr(maker.source, "caption_word_classes", None)
      if maker.captions.tokenizer is not None and classes is not None:
        self.caption_swaps.update(caption_swaps(maker.captions.tokenizer, classes(),
                                                int(config.model.caption.vocab)))
      self._recaptioned = jax.jit(functools.partial(recaptioned_losses, graphdef=ctx.graphdef))

  def __call__(self, state: dict[str, Any], step: int) -> EvalResult:
    del step
    by_t: dict[float, list[float]] = defaultdict(list)
    by_size: dict[str, list[float]] = defaultdict(list)
    per_video: list[float] = []  # each video's mean over the t grid
    for batch, noises, sizes in zip(self.batches, self.noise, self.sizes):
      losses = []
      for t, eps in zip(self.t_values, noises):
        eps = jax.make_array_from_process_local_data(self.noise_sharding, eps)
        losses.append(_on_host(self._fn(state["ema"], batch=batch, t=t, eps_BLP=eps)))
      for r, row in enumerate(sizes):
        for s, size in enumerate(row):
          if size is None:
            continue
          values = [float(l[r, s]) for l in losses]
          for t, v in zip(self.t_values, values):
            by_t[t].append(v)
          by_size[size].append(float(np.mean(values)))
          per_video.append(float(np.mean(values)))
    scalars = {"loss": float(np.mean(per_video))}
    scalars.update({f"loss_t{t:g}": float(np.mean(v)) for t, v in by_t.items()})
    scalars.update({f"loss_{size}": float(np.mean(v)) for size, v in sorted(by_size.items())})
    out = EvalResult(scalars, {"loss": per_video})
    if self._changed or self.caption_swaps:
      self._gaps(state, out)
    return out

  def _gaps(self, state: dict[str, Any], out: EvalResult) -> None:
    """Adds ``label_gap_<part>``: the loss at ``label_t`` with that part of the label changed,
    minus with the true label, per video with a real label; and ``caption_gap_<class>``: the
    same with that class of caption words swapped (or every caption nulled), per video whose
    caption the change reaches. One true-label loss per batch serves both (with the noise of
    each batch's first t)."""
    names = {-1: "null", **{i: name for i, (name, _) in enumerate(self.digits)}}
    gaps: dict[str, list[float]] = defaultdict(list)
    for batch, noises in zip(self.batches, self.noise):
      eps = jax.make_array_from_process_local_data(self.noise_sharding, noises[0])
      loss = lambda fn, **kw: _on_host(fn(state["ema"], batch=batch, t=self.label_t,
                                          eps_BLP=eps, **kw))
      true = loss(self._fn)
      real = _on_host(batch["seg_label"]) < self.num_classes
      for d, fn in self._changed.items():
        gaps[f"label_gap_{names[d]}"] += [float(x) for x in (loss(fn) - true)[real]]
      if not self.caption_swaps:
        continue
      mask = _on_host(batch["seg_caption_mask"])
      words = _on_host(batch["seg_caption"]) if self.caption_swaps.keys() - {"null"} else None
      for name, id_map in self.caption_swaps.items():
        if id_map is None:
          reached = mask.any(-1)
        else:
          reached = ((id_map[words] != words) & mask).any(-1)
          id_map = jnp.asarray(id_map)
        changed = loss(self._recaptioned, id_map=id_map)
        gaps[f"caption_gap_{name}"] += [float(x) for x in (changed - true)[reached]]
    for key, values in gaps.items():
      out.scalars[key] = float(np.mean(values)) if values else float("nan")
      out.per_video[key] = values
