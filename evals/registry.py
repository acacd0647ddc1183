"""Evaluators: named in ``config.evals.names``, run by the trainer every ``config.evals.<name>.
every`` steps and after the last step, writing to the run's metrics (process 0).

Each evaluator is one type in ``EVALUATORS``: built once per run from an ``EvalContext``, then
called with the train state and the step, it returns an ``EvalResult``: scalars for the metric
log (names prefixed by the evaluator's name) and, where the scalars are means over videos, the
per-video values they average (``ablate.py`` pools them over seeds for confidence intervals).
Every result of a step also goes to ``workdir/evals/step_<N>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from vdit_jax import backends as backends_lib
from vdit_jax import diffusion


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every evaluator is built from: the run's config, model graph, attention backend and
  device mesh."""
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  backend: backends_lib.Backend
  mesh: Any


@dataclasses.dataclass
class EvalResult:
  scalars: dict[str, float]
  per_video: dict[str, list[float]] = dataclasses.field(default_factory=dict)


class Evaluator(Protocol):
  def __call__(self, state: dict[str, Any], step: int) -> EvalResult: ...


def _heldout(ctx: EvalContext) -> Evaluator:
  from evals import heldout
  return heldout.HeldoutLoss(ctx)


def _temporal(ctx: EvalContext) -> Evaluator:
  from evals import temporal
  return temporal.TemporalConsistency(ctx)


def _redraw(ctx: EvalContext) -> Evaluator:
  from evals import redraw
  return redraw.Redraw(ctx)


# name -> constructor; each name has its settings in ``config.evals.<name>`` (``every`` at least).
EVALUATORS: dict[str, Callable[[EvalContext], Evaluator]] = {
    "heldout": _heldout,
    "temporal": _temporal,
    "redraw": _redraw,
}


def names(config: ml_collections.ConfigDict) -> list[str]:
  """``config.evals.names`` as a list; raises on an unknown name or a bad setting."""
  out = [n.strip() for n in str(config.evals.names).split(",") if n.strip()]
  bad = [n for n in out if n not in EVALUATORS]
  if bad:
    raise ValueError(f"evals.names={config.evals.names!r} names unknown evaluators {bad}: use "
                     f"a comma list of {tuple(EVALUATORS)}")
  for n in out:
    every = int(config.evals[n].every)
    if every < 0:
      raise ValueError(f"evals.{n}.every={every} must be >= 0 (0 = only after the last step)")
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails before anything is compiled if the evaluators cannot run on this config."""
  chosen = names(config)
  held = int(config.data.heldout)
  for n in chosen:
    need = int(config.evals[n].videos)
    if need < 1 or need > held:
      raise ValueError(f"evals.{n}.videos={need} must be between 1 and data.heldout={held} "
                       f"(the indices never trained on): set data.heldout >= {max(need, 1)}")
  if "heldout" in chosen:
    label_t = float(config.evals.heldout.get("label_t", 0.0))
    if not 0.0 <= label_t < 1.0:
      raise ValueError(f"evals.heldout.label_t={label_t} must be in (0, 1), or 0 for none")
  for n in ("temporal", "redraw"):
    if n not in chosen:
      continue
    diffusion.check_sampler(config.evals[n].get("sampler", "euler"),
                            float(config.evals[n].get("eta", 1.0)))
    if config.data.source != "synthetic_shapes":
      raise ValueError(f"the {n} evaluator scores synthetic_shapes videos (their colours "
                       f"and shapes), not data.source={config.data.source!r}: drop it from "
                       "evals.names")
  if "redraw" in chosen:
    ts = tuple(config.evals.redraw.t_values)
    if not ts or not all(0.0 < float(t) <= 1.0 for t in ts):
      raise ValueError(f"evals.redraw.t_values={ts} must be values in (0, 1]")


def result_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "evals", f"step_{step:07d}.json")


class Evaluators:
  """The run's evaluators, built lazily (only when first due) and run when due."""

  def __init__(self, ctx: EvalContext, workdir: str, is_main: bool):
    self.ctx = ctx
    self.workdir = workdir
    self.is_main = is_main
    self.names = names(ctx.config)
    self._built: dict[str, Evaluator] = {}

  def due(self, step: int, total: int) -> list[str]:
    cfg = self.ctx.config.evals
    return [n for n in self.names
            if step == total or (cfg[n].every and step % int(cfg[n].every) == 0)]

  def written(self, step: int) -> bool:
    """Whether process 0 has the results of ``step`` (every process gets the same answer, so
    all of them run, or skip, the collective evaluation together)."""
    found = os.path.exists(result_path(self.workdir, step))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      found = bool(multihost_utils.broadcast_one_to_all(np.asarray(found)))
    return found

  def run(self, step: int, total: int, state: dict[str, Any], writer=None,
          ) -> dict[str, float]:
    """Runs the evaluators due at ``step``; returns their scalars (and writes them, with the
    per-video values, on process 0)."""
    scalars: dict[str, float] = {}
    per_video: dict[str, list[float]] = {}
    for n in self.due(step, total):
      if n not in self._built:
        t0 = time.perf_counter()
        self._built[n] = EVALUATORS[n](self.ctx)
        scalars[f"{n}/setup_seconds"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      result = self._built[n](state, step)
      scalars.update({f"{n}/{k}": float(v) for k, v in result.scalars.items()})
      scalars[f"{n}/seconds"] = time.perf_counter() - t0
      per_video.update({f"{n}/{k}": [float(x) for x in v] for k, v in result.per_video.items()})
    if scalars and self.is_main:
      if writer is not None:
        writer.write(step, scalars)
      path = result_path(self.workdir, step)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "scalars": scalars, "per_video": per_video}, f)
      os.replace(path + ".tmp", path)  # whole or absent: ablate.py trusts what it finds
    return scalars
