"""Scores a saved checkpoint with the run's evaluators, with other evaluator settings if asked:
another sampler, step count or guidance for ``temporal``, more videos, the label use of
``heldout``, other evaluators.

The results go to ``<out>/evals/step_<N>.json`` (default ``out``: ``workdir/rescored/<settings>``),
never over what the training run wrote, so one checkpoint can be compared under several
settings. ``evaluate.py`` is the command line.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from evals import registry
from vdit_jax import backends as backends_lib
from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import sharding as shard_lib
from vdit_jax import trainer

# ``rescore``'s keyword -> the evaluator and the field of its ``config.evals.<name>`` it sets.
FIELDS = {"sampler": ("temporal", "sampler"), "steps": ("temporal", "steps"),
          "cfg": ("temporal", "cfg"), "eta": ("temporal", "eta"),
          "videos": ("temporal", "videos"),
          "label_t": ("heldout", "label_t")}


def settings_name(names: str, **settings: Any) -> str:
  """The default output folder's name: ``"temporal_sampler-heun_steps-60"``."""
  given = "_".join(f"{k}-{v}" for k, v in sorted(settings.items()) if v is not None)
  return "_".join(n.strip() for n in names.split(",") if n.strip()) + (f"_{given}" if given else "")


def rescore(workdir: str, step: int | None = None, names: str | None = None,
            out: str | None = None, **settings: Any) -> tuple[str, dict[str, float]]:
  """Runs the evaluators ``names`` (default: the run's ``evals.names``) on checkpoint ``step``
  (default: the newest) of ``workdir``; ``settings``: ``sampler``, ``steps``, ``cfg``, ``eta``,
  ``videos`` for ``temporal``, ``label_t`` for ``heldout`` (None keeps the run's). Returns the
  result file's path and its scalars. Bad settings fail before anything is restored or
  compiled."""
  unknown = set(settings) - set(FIELDS)
  if unknown:
    raise TypeError(f"rescore() got unknown settings {sorted(unknown)}: use {list(FIELDS)}")
  mngr = ckpt_lib.manager(workdir, read_only=True)
  try:
    step = ckpt_lib.saved_step(mngr, workdir, step)
    config = ckpt_lib.read_config(mngr, step)
    config.unlock()
    # read_config builds on the base config, so evaluators and fields newer than the run are
    # there with their defaults.
    if names is not None:
      config.evals.names = names
    for key, value in settings.items():
      if value is not None:
        group = config.evals[FIELDS[key][0]]
        field = FIELDS[key][1]
        group[field] = type(group[field])(value)
    registry.validate(config)  # names, video counts, the sampler
    chosen = registry.names(config)
    if not chosen:
      raise ValueError(f"the run at {workdir} names no evaluators: pass some, e.g. "
                       "heldout,temporal")
    out = out or os.path.join(workdir, "rescored", settings_name(",".join(chosen), **settings))
    mesh = shard_lib.make_mesh(config.mesh)
    backend = backends_lib.resolve(config.model, config.data.max_segments)
    with jax.set_mesh(mesh), shard_lib.axis_rules(config.mesh.rules):
      graphdef, target, _ = trainer.abstract_state(config, mesh, backend)
      # The evaluators read only the EMA params; the rest of the state stays on disk.
      state = {"ema": ckpt_lib.restore_subtree(mngr, step, "ema", target["ema"])}
      ctx = registry.EvalContext(config, graphdef, backend, mesh)
      scalars = registry.Evaluators(ctx, out, jax.process_index() == 0).run(step, step, state)
  finally:
    mngr.close()
  return registry.result_path(out, step), scalars
