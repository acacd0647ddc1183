"""Orbax checkpoints of a run: {train state, data iterator state, config} per step.

A checkpoint directory ``workdir/checkpoints/<step>`` holds three items:
- ``state``: params, EMA params, optimizer state, step, RNG key and the counts of skipped
  non-finite steps (a pytree of arrays);
- ``data``: the grain iterator state (JSON), so a resumed run sees the same batches;
- ``config``: the resolved config (JSON), so ``sample.py`` needs nothing but the workdir.
Orbax writes a step to a temporary directory and renames it when complete, so an interrupted
save never shadows the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vdit_jax import config as config_lib


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  """The directory of checkpoint ``step`` (the manager names them by the bare step number)."""
  return os.path.join(str(mngr.directory), str(step))


def manager(workdir: str, keep: int | None = None, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state or {}),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            ) -> tuple[Any, dict, dict]:
  """Restores ``state`` onto the shardings of ``abstract_state`` (ShapeDtypeStructs)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return out["state"], out["data"], out["config"]


def restore_subtree(mngr: ocp.CheckpointManager, step: int, name: str,
                    abstract_subtree: Any) -> Any:
  """Restores one top-level entry of ``state`` (e.g. ``ema``) without reading the others."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item={name: abstract_subtree}, partial_restore=True,
                                   restore_args=jax.tree.map(_restore_arg,
                                                             {name: abstract_subtree}))))
  return out["state"][name]


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)


def read_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return config_lib.from_dict(raw)
