"""Redraw: held-out real videos noised to t and denoised back by the EMA model, scored by the
temporal-consistency metrics, per t. Where ``temporal`` says that samples morph or vanish, this
says at which noise levels the model breaks what it is given: a model that keeps a real video's
outline when redrawing from t = 0.3 but not from t = 0.6 draws outlines badly between those.

For each t in ``evals.redraw.t_values`` the source's first ``evals.redraw.videos`` held-out
videos (with their labels and captions) are noised with fixed noise and integrated from t to 0
by the run's sampler on the steps of ``sample``'s grid below t. Scalars ``<metric>_t<t>``
(``shape_drift_t0.5``), next to the real videos' own scores (``real_<metric>``).
"""

from __future__ import annotations

from typing import Any

from evals import temporal, video_metrics
from evals.registry import EvalContext, EvalResult


class Redraw:
  """``evals.redraw``: see the module docstring."""

  def __init__(self, ctx: EvalContext):
    self.config = ctx.config
    self.graphdef = ctx.graphdef
    cfg = ctx.config.evals.redraw
    self.t_values = tuple(float(t) for t in cfg.t_values)
    self.real = temporal.held_out(ctx, int(cfg.videos))
    self.real_scores = video_metrics.score_videos(self.real.videos, self.real.labels)

  def __call__(self, state: dict[str, Any], step: int) -> EvalResult:
    del step
    from vdit_jax import sampler
    cfg = self.config.evals.redraw
    model = temporal.ema_model(self.graphdef, state)
    real = self.real
    scalars: dict[str, float] = {}
    per_video: dict[str, list[float]] = {}
    for t in self.t_values:
      videos = sampler.redraw(model, self.config, real.videos, real.labels, t,
                              cfg_scale=float(cfg.cfg), num_steps=int(cfg.steps),
                              seed=int(self.config.seed), method=cfg.sampler,
                              eta=float(cfg.get("eta", 1.0)),
                              captions=real.captions, tokenizer=real.tokenizer)
      for name, values in video_metrics.score_videos(videos, real.labels).items():
        mean, half = video_metrics.summarize(values)
        scalars[f"{name}_t{t:g}"] = mean
        scalars[f"{name}_t{t:g}_ci"] = half
        per_video[f"{name}_t{t:g}"] = [float(v) for v in values]
    for name, values in self.real_scores.items():
      scalars[f"real_{name}"] = video_metrics.summarize(values)[0]
    return EvalResult(scalars, per_video)
