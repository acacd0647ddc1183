"""Temporal consistency of sampled videos: the failures attention across frames exists to
prevent (colour flicker, shapes morphing, objects vanishing, jerky motion), measured from the
pixels of videos the EMA model samples, next to the same measures on real videos.

The videos sampled have the sizes and labels (and, in a run with captions, the captions) of the
source's first ``evals.temporal.videos`` held-out videos, with fixed noise, so calls and runs
compare like with like; those real videos are scored once, as the reference (``real_<metric>``).
With text captions, ``direction_ok`` also scores whether each object sets off the way its
caption says. With ``evals.temporal.fd`` the Frechet
distance between features of the sampled and the real videos (``evals.features``' network,
trained on the source's own data) measures the distribution as a whole; ``fd_real`` is the same
distance between two disjoint real sets of the same size where ``data.heldout`` has room, the
floor a perfect model would reach.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from evals import video_metrics
from evals.registry import EvalContext, EvalResult


class HeldOut(NamedTuple):
  """The source's first held-out videos with what each is conditioned on, as the sampler takes
  it (``captions`` None without captions), and the batch maker that drew them."""
  videos: list[np.ndarray]
  labels: list[int]
  captions: list | None
  tokenizer: Any
  maker: Any


def held_out(ctx: EvalContext, count: int) -> HeldOut:
  from data import pipeline  # evaluators sit on the scripts' side of the arrow
  maker = pipeline.BatchMaker(ctx.config, backend=ctx.backend)
  real = [maker.source[i] for i in maker.heldout_indices(count)]
  mode = ctx.config.model.caption.mode
  captions = (None if mode == "none" else
              [item.get("caption" if mode == "tokens" else "caption_embedding") for item in real])
  return HeldOut([item["video"] for item in real], [int(item["label"]) for item in real],
                 captions, maker.captions.tokenizer, maker)


def ema_model(graphdef: nnx.GraphDef, state: dict[str, Any]) -> nnx.Module:
  """The EMA model on this host, whole (gathered from every process where it is spread)."""
  ema = state["ema"]
  ema = multihost_utils.process_allgather(ema, tiled=True) if jax.process_count() > 1 else ema
  return nnx.merge(graphdef, jax.device_get(ema))


class TemporalConsistency:
  """``evals.temporal``: see the module docstring."""

  def __init__(self, ctx: EvalContext):
    self.config = ctx.config
    self.graphdef = ctx.graphdef
    cfg = ctx.config.evals.temporal
    self.count = int(cfg.videos)
    real = held_out(ctx, self.count)
    maker = real.maker
    held = len(maker.source) - maker.train_videos
    videos, self.labels = real.videos, real.labels
    self.shapes = [tuple(int(d) for d in v.shape[:3]) for v in videos]
    mode = ctx.config.model.caption.mode
    self.tokenizer, self.captions = real.tokenizer, real.captions
    self.real_scores = video_metrics.score_videos(videos, self.labels)
    # With text captions the samples must also move the way their captions say.
    self.directions = ([video_metrics.caption_direction(c) for c in self.captions]
                       if mode == "tokens" else None)
    if self.directions is not None:
      self.real_scores["direction_ok"] = self._directions(videos)
    self.net = None
    self.fd_real = float("nan")
    if cfg.fd:
      from evals import features
      self.net = features.load_or_train()
      self.real_features = features.features(self.net, videos)
      if held >= 2 * self.count:
        other = [maker.source[i]["video"]
                 for i in maker.heldout_indices(2 * self.count)[self.count:]]
        self.fd_real = features.frechet_distance(self.real_features,
                                                 features.features(self.net, other))

  def sample(self, state: dict[str, Any]) -> list[np.ndarray]:
    """Videos ``[T, H, W, C]`` of the EMA model: one per held-out size and label."""
    from vdit_jax import sampler
    # Every process samples the same videos from the whole EMA.
    model = ema_model(self.graphdef, state)
    cfg = self.config.evals.temporal
    return sampler.sample(model, self.config, self.shapes, self.labels, cfg_scale=float(cfg.cfg),
                          num_steps=int(cfg.steps), seed=int(self.config.seed),
                          method=cfg.get("sampler", "euler"), eta=float(cfg.get("eta", 1.0)),
                          captions=self.captions, tokenizer=self.tokenizer)

  def _directions(self, videos: list[np.ndarray]) -> np.ndarray:
    # Two temporal patches at least, however deep the model's patches are (DIRECTION_FRAMES).
    frames = max(video_metrics.DIRECTION_FRAMES, 2 * int(self.config.model.patch[0]))
    return np.array([np.nan if d is None else video_metrics.direction_ok(v, d, frames)
                     for v, d in zip(videos, self.directions)])

  def __call__(self, state: dict[str, Any], step: int) -> EvalResult:
    del step
    videos = self.sample(state)
    scores = video_metrics.score_videos(videos, self.labels)
    if self.directions is not None:
      scores["direction_ok"] = self._directions(videos)
    scalars: dict[str, float] = {}
    for name, values in scores.items():
      mean, half = video_metrics.summarize(values)
      scalars[name] = mean
      scalars[f"{name}_ci"] = half
      scalars[f"real_{name}"] = video_metrics.summarize(self.real_scores[name])[0]
    if self.net is not None:
      from evals import features
      scalars["fd"] = features.frechet_distance(features.features(self.net, videos),
                                                self.real_features)
      scalars["fd_real"] = self.fd_real
    return EvalResult(scalars, {k: list(map(float, v)) for k, v in scores.items()})
