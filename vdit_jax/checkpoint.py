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

import functools
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


# What orbax appends to a step's directory name while writing it (renamed away when complete).
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def incomplete(mngr: ocp.CheckpointManager) -> list[str]:
  """Checkpoint directories whose save never finished (the process was killed while orbax
  wrote them): its temporary directories, which the manager's steps leave out."""
  root = str(mngr.directory)
  if not os.path.isdir(root):
    return []
  return sorted(os.path.join(root, n) for n in os.listdir(root) if _TMP_SUFFIX in n)


def _write_arrays_whole_in_one_process() -> None:
  """With one process, each array is written from one replica of each shard. Orbax's default
  (outside GPU platforms) splits replicated shards into a slice per replica, so that several
  hosts share the writing; in one process that only adds a sliced copy per replica: many small
  device programs, compiled at a run's first save (bench/README.md, the test suite's time).
  Several processes keep the split."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
      override=True)


class _KvStoreSpecs:
  """``tensorstore.KvStore`` as orbax's ``tensorstore_utils`` sees it (``_TensorstoreForOrbax``):
  the spec of a local directory converts to JSON as itself, without tensorstore."""

  def __init__(self, kvstore):
    self._kvstore = kvstore

  def __getattr__(self, name):
    return getattr(self._kvstore, name)

  def Spec(self, spec):  # noqa: N802 - tensorstore's name
    if isinstance(spec, dict) and spec.keys() == {"driver", "path"} and spec["driver"] == "file":
      return _FileSpec(spec)
    return self._kvstore.Spec(spec)

  def open(self, spec, *args, **kwargs):
    if isinstance(spec, _FileSpec):  # orbax's open_kv_store builds its spec with Spec above
      spec = self._kvstore.Spec(spec.to_json())
    return self._kvstore.open(spec, *args, **kwargs)


class _FileSpec:
  def __init__(self, spec: dict):
    self._spec = spec

  def to_json(self) -> dict:
    return dict(self._spec)  # what tensorstore returns for it (checked in tests/test_reliability)


class _TensorstoreForOrbax:
  """Host memory of a run that saves often. tensorstore's Python bindings (0.1.71 to 0.1.86)
  never free the Python objects they build from JSON, as ``KvStore.Spec(...).to_json()`` and
  ``experimental_collect_matching_metrics`` return them (bench/README.md, ``bench/soak.py``).
  Orbax calls the first for every array of every save (to normalise the spec of a local
  directory, which it already is) and the second twice per save (for a log line of raw write
  throughput), so the process grew with every checkpoint. This stands in for the tensorstore
  module inside orbax's ``tensorstore_utils`` only: local directory specs pass through as they
  are, and the byte counters read 0, which makes orbax leave out that log line."""

  def __init__(self, ts):
    self._ts = ts
    self.KvStore = _KvStoreSpecs(ts.KvStore)  # noqa: N815 - tensorstore's name

  def __getattr__(self, name):
    return getattr(self._ts, name)

  def experimental_collect_matching_metrics(self, prefix, *args, **kwargs):
    del prefix, args, kwargs
    return []


def _no_leaking_tensorstore_calls() -> None:
  from orbax.checkpoint._src.serialization import tensorstore_utils
  if not isinstance(tensorstore_utils.ts, _TensorstoreForOrbax):
    tensorstore_utils.ts = _TensorstoreForOrbax(tensorstore_utils.ts)


@functools.cache
def _set_up_orbax() -> None:
  """How this process writes checkpoints; once (orbax warns at each type handler override)."""
  _write_arrays_whole_in_one_process()
  _no_leaking_tensorstore_calls()


def manager(workdir: str, keep: int | None = None, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  _set_up_orbax()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
  """Starts writing checkpoint ``step`` (the manager writes it in the background). A write that
  fails, this one or the previous one in the background, raises an OSError that names the
  workdir and the newest complete checkpoint."""
  try:
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))), force=force)
  except OSError as err:
    raise _write_error(mngr, err) from err


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; a failed write raises as in ``save``."""
  try:
    mngr.wait_until_finished()
  except OSError as err:
    raise _write_error(mngr, err) from err


def _write_error(mngr: ocp.CheckpointManager, err: OSError) -> OSError:
  # The manager counts a step from the start of its write; the directory has only complete
  # ones (orbax renames a step's temporary directory when it is done).
  mngr.reload()
  last = mngr.latest_step()
  kept = (f"the newest complete checkpoint, step {last} at {step_dir(mngr, last)}, is intact"
          if last is not None else "no checkpoint was completed before it")
  return OSError(f"cannot write a checkpoint in {mngr.directory} ({type(err).__name__}: {err}); "
                 f"{kept}: make the workdir writable (permissions, free disk space) and rerun "
                 "the same command to resume")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            ) -> tuple[Any, dict, dict]:
  """Restores ``state`` onto the shardings of ``abstract_state`` (ShapeDtypeStructs)."""
  check_fits(mngr, step, abstract_state)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return out["state"], out["data"], out["config"]


# Arrays a mismatch lists by name, the params' first (the EMA and optimizer state repeat them).
_SHOWN = 12


def check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises, naming each array and both shapes, if checkpoint ``step``'s state does not have
  the shapes of ``abstract_state`` (a checkpoint of another model): orbax's own error names
  neither. Reads the checkpoint's metadata only."""
  directory = step_dir(mngr, step)
  metadata = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "state")
  saved = _shapes(metadata)
  wanted = _shapes(abstract_state)
  diffs = [f"{n}: saved {saved[n]}, expected {shape}" for n, shape in wanted.items()
           if n in saved and saved[n] != shape]
  diffs += [f"{n}: not in the checkpoint, expected {shape}" for n, shape in wanted.items()
            if n not in saved]
  diffs += [f"{n}: saved {shape}, not in this model" for n, shape in saved.items()
            if n not in wanted]
  if diffs:
    diffs.sort(key=lambda line: not line.startswith("params."))  # stable: EMA and opt after
    more = [f"... and {len(diffs) - _SHOWN} more"] if len(diffs) > _SHOWN else []
    listed = "\n  ".join(diffs[:_SHOWN] + more)
    raise ValueError(f"checkpoint {directory} does not fit this config's train state: "
                     f"{len(diffs)} arrays differ\n  {listed}\nrestore it with the config it "
                     f"was trained with (saved with it, in {os.path.join(directory, 'config')}), "
                     "or train this config in a new workdir")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes by name, the same for a restore target and a checkpoint's metadata: the
  metadata keys list items and Variable values as strings (``'0'``, ``'value'``) where the
  target has indices and attributes, so every key becomes its text; ``.value`` is left out."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)
    out[name.removesuffix(".value")] = tuple(leaf.shape)
  return out


def saved_step(mngr: ocp.CheckpointManager, workdir: str, step: int | None = None) -> int:
  """``step`` if ``workdir`` has a checkpoint of it, the newest if ``step`` is None; raises
  naming what is there otherwise."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                            f"(python train.py --workdir {workdir})")
  if step is None:
    return max(steps)
  if int(step) not in steps:
    raise ValueError(f"no checkpoint for step {step} in {workdir}: available steps {sorted(steps)}")
  return int(step)


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
