"""Training: ``train(config, workdir)`` and the pure, module-level ``train_step``.

The train state is a plain pytree ``{params, ema, opt, step, key, nonfinite}`` whose leaves
carry their logical axis names (NNX metadata), so its shardings come from the config's rules
table and it checkpoints as it is. ``train_step`` is jitted once per run with explicit shardings
and donated state; the batch shapes are static per config, so it compiles exactly once.

A step whose loss or gradient is not finite is skipped on device (``apply_grads``): the state
keeps its params, EMA and optimizer state, counts the step in ``nonfinite``, and the host reads
the counts at log lines only, stopping the run after ``train.max_nonfinite_in_a_row`` in a row.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from vdit_jax import backends as backends_lib
from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import conditioning as cond_lib
from vdit_jax import config as config_lib
from vdit_jax import diffusion
from vdit_jax import hostmem
from vdit_jax import kernels as kernels_lib
from vdit_jax import metrics as metrics_lib
from vdit_jax import model as model_lib
from vdit_jax import sharding as shard_lib
from vdit_jax import text as text_lib
from vdit_jax import tokens as tokens_lib

State = dict[str, Any]

# Batch keys and their logical axes; the leading axis is always the batch. The conditioning's
# optional keys are in a run's batches when its config uses them (batch_keys).
BATCH_AXES = {
    "tokens": ("batch", "length", None),
    "segment_ids": ("batch", "length"),
    "coords": ("batch", "length", None),
    "seg_grid": ("batch", None, None),
    "seg_label": ("batch", None),
    "seg_caption": ("batch", None, None),  # [B, S, C] ids or [B, S, C, E]: a prefix spec
    "seg_caption_mask": ("batch", None, None),
    "seg_frames": ("batch", None),
}


def batch_keys(config) -> list[str]:
  """The keys of ``BATCH_AXES`` a batch of this config holds."""
  keys = ["tokens", "segment_ids", "coords", "seg_grid", "seg_label"]
  if config.model.caption.mode != "none":
    keys += ["seg_caption", "seg_caption_mask"]
  if config.data.cond_frames_prob > 0:
    keys.append("seg_frames")
  return keys


# ----------------------------------------------------------------------------- optimiser


def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = max(1, min(cfg.warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  # Decay matrices only: norms' scales and biases are not weights to shrink.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  parts.append(optax.adamw(lr_schedule(o, config.train.steps), b1=o.b1, b2=o.b2,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with warm-up: the average forgets its random init within the first steps.

  ``(1 + s) / (10 + s)`` caps the decay until it reaches ``decay`` (at step 8990 for 0.999):
  before that the EMA averages about the last ninth of the steps taken, whatever ``decay`` is."""
  s = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


# ----------------------------------------------------------------------------- state

# The state's counts of skipped steps (apply_grads): ``total`` in the run, the current ``run`` of
# consecutive ones, and ``max_run``, the longest run since the last log line: the host reads the
# counts only there, and a run that ended between two log lines would otherwise go unseen.
NONFINITE_COUNTS = ("total", "run", "max_run")


def init_state(config: ml_collections.ConfigDict, backend: backends_lib.Backend | None = None,
               ) -> tuple[nnx.GraphDef, State]:
  """Model graph and a fresh train state (unsharded; use ``create_sharded_state`` in runs).
  ``backend``: the run's attention backend (default: ``backends.resolve``)."""
  model = model_lib.build_model(config, backend=backend)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError("the model holds non-Param variables; the train state handles only Params")
  tx = make_optimizer(config)
  return graphdef, {
      "params": params,
      "ema": jax.tree.map(jnp.copy, params),
      "opt": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "key": jax.random.key_data(jax.random.key(config.seed)),
      # Saved with the rest: a resumed run reports and stops as the uninterrupted one would.
      "nonfinite": {name: jnp.zeros((), jnp.int32) for name in NONFINITE_COUNTS},
  }


def state_specs(state: State, rules) -> Any:
  """PartitionSpec per leaf, from the logical names each Variable carries."""
  def spec(x):
    if isinstance(x, nnx.Variable):
      return shard_lib.logical_to_spec(x.get_metadata().get("out_sharding"), rules)
    return P()
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_shardable(abstract: State, specs: Any, mesh) -> None:
  """Raises, naming the parameter and the fix, if a mesh axis does not divide the dim it shards."""
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for (path, leaf), spec in zip(flat, flat_specs):
    for dim, axes in zip(leaf.shape, spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = math.prod(mesh.shape[a] for a in names)
      if dim % size:
        where = jax.tree_util.keystr(path)
        raise ValueError(f"{where} has shape {tuple(leaf.shape)}: a dim of {dim} cannot be split "
                         f"over mesh axes {names} of total size {size}; change config.mesh "
                         f"(e.g. mesh.{names[0]} to a divisor of {dim}) or config.mesh.rules")


def create_sharded_state(config, mesh, backend=None) -> tuple[nnx.GraphDef, State, Any]:
  """Initialises the state directly into its shardings (no full copy on one device)."""
  graphdef, abstract = jax.eval_shape(lambda: init_state(config, backend))
  specs = state_specs(abstract, config.mesh.rules)
  check_shardable(abstract, specs, mesh)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  state = jax.jit(lambda: init_state(config, backend)[1], out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_state(config, mesh, backend=None) -> tuple[nnx.GraphDef, State, Any]:
  """ShapeDtypeStructs with shardings: the restore target (nothing is allocated)."""
  graphdef, abstract = jax.eval_shape(lambda: init_state(config, backend))
  specs = state_specs(abstract, config.mesh.rules)
  check_shardable(abstract, specs, mesh)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  # ``shardings`` is a prefix of ``abstract`` (one sharding per Variable, whose value is a child
  # node), so map over it and reach into each Variable to keep its wrapper and metadata.
  target = jax.tree.map(
      lambda s, x: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x),
      shardings, abstract)
  return graphdef, target, shardings


def batch_shardings(config, mesh, backend=None) -> dict[str, Any]:
  """Shardings of every batch entry, split over rows: a pytree prefix of the batch."""
  rules = config.mesh.rules
  out: dict[str, Any] = {k: NamedSharding(mesh, shard_lib.logical_to_spec(BATCH_AXES[k], rules))
                         for k in batch_keys(config)}
  backend = backend or backends_lib.resolve(config.model, config.data.max_segments)
  rows = NamedSharding(mesh, shard_lib.logical_to_spec(("batch",), rules))
  layouts = backend.batch_sharding(rows)
  if layouts is not None:
    out["layouts"] = layouts
  return out


# ----------------------------------------------------------------------------- the step


def noise_batch(key: jax.Array, batch: dict[str, Any], config) -> tuple[jax.Array, jax.Array]:
  """Per-video t ``[B, S]`` and noise ``[B, L, P]`` of a whole batch, from ``key`` only."""
  k_t, k_eps = jax.random.split(key)
  t_BS = diffusion.sample_t(k_t, batch["seg_grid"], config.diffusion)
  eps = jax.random.normal(k_eps, batch["tokens"].shape, batch["tokens"].dtype)
  return t_BS, eps


def loss_terms(params, graphdef, batch, t_BS, eps, config) -> tuple[jax.Array, jax.Array]:
  """Rectified-flow loss of a packed batch as (sum, count), for the given t and noise.

  Tokens of given frames (``Conditioning.frames``) stay clean and carry no loss."""
  seg = batch["segment_ids"]
  x0 = batch["tokens"]
  cond = cond_lib.from_batch(batch)
  x_t = diffusion.add_noise(x0, eps, tokens_lib.per_token(t_BS, seg))
  given = cond_lib.given_tokens(cond, seg, batch["coords"])
  if given is not None:
    x_t = jnp.where(given[..., None], x0, x_t)
  model = nnx.merge(graphdef, params)
  v = model(x_t, t_BS, cond, seg, batch["coords"], layouts=batch.get("layouts"))
  err = v - diffusion.velocity_target(x0, eps)
  loss_seg = seg if given is None else jnp.where(given, 0, seg)
  return diffusion.masked_loss_terms(err, loss_seg, batch["seg_grid"].shape[1],
                                     config.diffusion.loss_weighting)


def loss_fn(params, graphdef, batch, key, config) -> tuple[jax.Array, dict]:
  """Rectified-flow loss of one packed batch; randomness from ``key`` only."""
  t_BS, eps = noise_batch(key, batch, config)
  total, count = loss_terms(params, graphdef, batch, t_BS, eps, config)
  loss = total / jnp.maximum(count, 1.0)
  return loss, {"loss": loss}


def accumulated_grads(params, graphdef, batch, key, config, micro_batches: int):
  """Loss and gradient of the whole batch, computed over ``micro_batches`` slices of its rows.

  t and noise are drawn for the whole batch first and the loss is accumulated as (sum, count),
  so the result equals one pass over the whole batch (up to float summation order), for any k.
  """
  t_BS, eps = noise_batch(key, batch, config)
  if micro_batches == 1:
    (total, count), grads = _grads_of_sum(params, graphdef, batch, t_BS, eps, config)
  else:
    split = lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:])
    micro = jax.tree.map(split, {"batch": batch, "t": t_BS, "eps": eps})

    def body(carry, mb):
      total, count, grads = carry
      (t_mb, c_mb), g_mb = _grads_of_sum(params, graphdef, mb["batch"], mb["t"], mb["eps"],
                                         config)
      return (total + t_mb, count + c_mb, jax.tree.map(jnp.add, grads, g_mb)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), micro)
  denom = jnp.maximum(count, 1.0)
  return total / denom, jax.tree.map(lambda g: g / denom, grads)


def _grads_of_sum(params, graphdef, batch, t_BS, eps, config):
  """``((sum, count), d sum / d params)``; the count does not depend on the params."""
  return jax.value_and_grad(lambda p: loss_terms(p, graphdef, batch, t_BS, eps, config),
                            has_aux=True)(params)


def train_step(state: State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               ) -> tuple[State, dict[str, jax.Array]]:
  """One optimisation step. Pure: jit it with shardings and ``donate_argnums=0``.

  With ``train.grad_accum = k`` the batch's rows are processed in k slices (k times less
  activation memory) and the update equals the one from the whole batch at once.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
  loss, grads = accumulated_grads(state["params"], graphdef, batch, key, config,
                                  config.train.grad_accum)
  new_state, metrics = apply_grads(state, loss, grads, tx=tx, config=config)
  metrics["real_tokens"] = jnp.sum(batch["segment_ids"] > 0)
  return new_state, metrics


def apply_grads(state: State, loss: jax.Array, grads: Any, *,
                tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                ) -> tuple[State, dict[str, jax.Array]]:
  """The update of a step from its loss and gradient, or none if either is not finite.

  A non-finite step keeps params, EMA and optimizer state bit for bit (so the learning-rate
  schedule, which counts applied updates, waits too) and adds to the ``nonfinite`` counts; the
  step advances either way, so its batch is skipped. Decided on device: the host never waits for
  a step to learn whether it was finite.
  """
  grad_norm = optax.tree.norm(grads)
  # The global norm is finite iff every gradient is (or their squares' sum overflows, from about
  # 1e19: no gradient to apply either), so one reduction the metrics need anyway decides.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  decay = ema_decay_at(state["step"], config.optim.ema_decay)
  ema = jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), state["ema"], params)
  # A select per element, which XLA fuses into the update's own elementwise work.
  learned = optax.tree.where(ok, {"params": params, "ema": ema, "opt": opt},
                             {k: state[k] for k in ("params", "ema", "opt")})
  counts = state["nonfinite"]
  run = jnp.where(ok, 0, counts["run"] + 1)
  # A step right after a log line (step % log_every == 0) starts the longest-run count afresh.
  since_log = jnp.where(state["step"] % config.train.log_every == 0, 0, counts["max_run"])
  nonfinite = {"total": counts["total"] + (~ok).astype(jnp.int32), "run": run,
               "max_run": jnp.maximum(since_log, run)}
  # The optimizer's schedule counts the updates it applied (a skipped step keeps its count too):
  # the steps so far less the skipped ones.
  applied = state["step"] - counts["total"]
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "lr": lr_schedule(config.optim, config.train.steps)(applied)}
  return {**learned, "step": state["step"] + 1, "key": state["key"],
          "nonfinite": nonfinite}, metrics


def jit_train_step(config, graphdef, state_shardings, mesh, backend=None):
  tx = make_optimizer(config)
  step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings(config, mesh, backend)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


# ----------------------------------------------------------------------------- the run


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run described by ``config.distributed`` (else the ``JAX_COORDINATOR_
  ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` env vars); one process does nothing.

  Runs before anything touches a device: the global device list depends on it.
  """
  if jax.distributed.is_initialized():
    return
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address == "auto":
    jax.distributed.initialize()
    return
  count = int(cfg.num_processes or os.environ.get("JAX_NUM_PROCESSES", 1))
  index = int(cfg.process_id if cfg.process_id >= 0 else os.environ.get("JAX_PROCESS_ID", -1))
  if count == 1:
    return
  if not address or not 0 <= index < count:
    raise ValueError(f"a run of {count} processes needs distributed.coordinator_address (got "
                     f"{address!r}) and distributed.process_id in [0, {count}) (got {index}): set "
                     "them in the config or as JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID")
  jax.distributed.initialize(address, count, index)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on a bad config before anything is compiled or written (joins a multi-process run
  first, since the device count depends on it)."""
  config_lib.validate(config)
  initialize_distributed(config.distributed)
  # After joining: asking for the platform starts the backend, which must come after that.
  backend = backends_lib.resolve(config.model, config.data.max_segments)  # one this platform has
  if backend.kernel is not None:
    kernels_lib.check_seq_len(backend.kernel[0], config.data.seq_len)
  # config_lib cannot resolve a -1 mesh axis (it knows no device count); here we can.
  sizes = dict(zip(shard_lib.MESH_AXES, shard_lib.mesh_shape(
      {a: config.mesh[a] for a in shard_lib.MESH_AXES}, jax.device_count())))
  if config.model.num_heads % sizes["tensor"]:
    raise ValueError(f"model.num_heads={config.model.num_heads} cannot be split over "
                     f"mesh.tensor={sizes['tensor']}: use a tensor size that divides the heads "
                     "(or 1), or more heads")
  # Attention gathers whole rows and splits the heads over tensor x context instead.
  if config.model.num_heads % (sizes["tensor"] * sizes["context"]):
    raise ValueError(f"model.num_heads={config.model.num_heads} cannot be split over mesh.tensor "
                     f"x mesh.context = {sizes['tensor']} x {sizes['context']}: context "
                     "parallelism gives each device whole rows of some heads for attention; use "
                     "a context size that divides num_heads / tensor, or more heads")
  dp = sizes["data"] * sizes["fsdp"]
  if config.data.batch_rows % dp:
    raise ValueError(f"data.batch_rows={config.data.batch_rows} must divide over the "
                     f"data-parallel mesh axes (data x fsdp = {dp} on {jax.device_count()} "
                     f"devices): use a multiple of {dp} or set mesh.data/mesh.fsdp")


def check_process_rows(config, mesh) -> None:
  """The pipeline gives process p rows ``[p B/n, (p+1) B/n)`` of the global batch; raises if
  the mesh places other rows on p's devices."""
  n, p = jax.process_count(), jax.process_index()
  rows = config.data.batch_rows
  sharding = batch_shardings(config, mesh)["segment_ids"]
  placed = set()
  for index in sharding.addressable_devices_indices_map((rows, config.data.seq_len)).values():
    placed.update(range(*index[0].indices(rows)))
  share = rows // n
  if placed != set(range(p * share, (p + 1) * share)):
    raise ValueError(f"mesh {dict(mesh.shape)} puts batch rows {sorted(placed)} on process {p}, "
                     f"whose pipeline makes rows {p * share}..{(p + 1) * share - 1}: make "
                     f"mesh.data x mesh.fsdp a multiple of the process count ({n})")


class _StopFlag:
  """Turns SIGTERM into a checkpoint at the next step boundary instead of lost work."""

  def __init__(self):
    self.stop = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.stop = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def check_resume(config, mngr) -> None:
  """Refuses to resume the newest checkpoint if it was trained with other values of fields
  outside ``config_lib.RESUME_SAFE``, listing them, unless ``train.allow_config_change``."""
  latest = mngr.latest_step()
  if latest is None:
    return
  changes = config_lib.resume_changes(ckpt_lib.read_config(mngr, latest), config)
  if not changes:
    return
  where, listed = ckpt_lib.step_dir(mngr, latest), "\n  ".join(changes)
  if config.train.allow_config_change:
    print(f"warning: resuming checkpoint {where} with train.allow_config_change, which "
          f"changes\n  {listed}", file=sys.stderr)
    return
  raise ValueError(f"checkpoint {where} was trained with another config; this one changes\n"
                   f"  {listed}\nresume with the config it was trained with (saved with it, in "
                   f"{os.path.join(where, 'config')}), train this one in a new workdir, or set "
                   "--config.train.allow_config_change=True to resume with the changes")


def _init_or_restore(config, mesh, mngr, backend):
  """``(graphdef, state, shardings, data iterator state)``: the newest checkpoint's, or fresh
  (no iterator state)."""
  latest = mngr.latest_step()
  passed = ckpt_lib.incomplete(mngr)
  if passed:
    start = (f"resuming from step {latest} at {ckpt_lib.step_dir(mngr, latest)}"
             if latest is not None else "starting afresh: no checkpoint was completed")
    print(f"passing over {len(passed)} incomplete checkpoint(s), saves that never finished: "
          f"{', '.join(passed)}; {start}", file=sys.stderr)
  if latest is None:
    return create_sharded_state(config, mesh, backend) + (None,)
  graphdef, target, shardings = abstract_state(config, mesh, backend)
  saved_scan = ckpt_lib.read_config(mngr, latest).model.scan_layers
  if saved_scan == config.model.scan_layers:
    state, data_state, _ = ckpt_lib.restore(mngr, latest, target)
    return graphdef, state, shardings, data_state
  # Saved with the blocks scanned and resumed unscanned, or the other way: restore as saved,
  # then move every block's arrays (params, EMA, optimizer moments) into this layout.
  saved = config.copy_and_resolve_references()
  saved.model.scan_layers = saved_scan
  state, data_state, _ = ckpt_lib.restore(mngr, latest, abstract_state(saved, mesh, backend)[1])
  state = jax.device_put(model_lib.convert_layers(state, target), shardings)
  return graphdef, state, shardings, data_state


def train(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint if there is one."""
  # Scripts' side of the arrow: only train() needs the data package and the evaluators.
  from data import pipeline
  from evals import registry as evals_lib

  metrics_lib.git_revision()
  validate(config)
  evals_lib.validate(config)
  _sample_labels(config)  # a bad sample.labels fails now, not at the first samples
  is_main = jax.process_index() == 0
  mesh = shard_lib.make_mesh(config.mesh)
  check_process_rows(config, mesh)
  rules = config.mesh.rules
  mngr = ckpt_lib.manager(workdir, keep=config.train.keep_ckpts)
  # Resolved once: the model computes with it and the pipeline prepares batches for it.
  backend = backends_lib.resolve(config.model, config.data.max_segments)
  # However the run ends (its last step, SIGTERM, an exception), ``cleanup`` closes what it
  # started: the data iterator's worker processes or prefetch thread, the metric writer, the
  # progress bar and the checkpoint manager.
  with (_StopFlag() as stop, contextlib.ExitStack() as cleanup, jax.set_mesh(mesh),
        shard_lib.axis_rules(rules)):
    cleanup.callback(mngr.close)
    check_resume(config, mngr)
    graphdef, state, shardings, data_state = _init_or_restore(config, mesh, mngr, backend)
    # After the checks of a resume: one refused leaves the workdir's config.json as it was.
    if is_main:
      metrics_lib.write_run_info(config, workdir)
    start = int(jax.device_get(state["step"]))
    step_fn = jit_train_step(config, graphdef, shardings, mesh, backend)
    evaluators = evals_lib.Evaluators(evals_lib.EvalContext(config, graphdef, backend, mesh),
                                      workdir, is_main)

    # The iterator always counts from step 0; a restored state moves it to where the run was.
    it = cleanup.enter_context(pipeline.make_train_iterator(
        config, start_step=0, process_index=jax.process_index(),
        process_count=jax.process_count(), backend=backend))
    if is_main:
      _write_skipped(workdir, it.skipped)
    if it.tokenizer is not None:
      text_lib.check_or_save(it.tokenizer, workdir, is_main)
    if data_state:
      it.set_state(data_state)
    elif start:
      raise ValueError(f"checkpoint step {start} in {workdir} has no data iterator state: it "
                       "cannot resume the same stream of batches")
    b_shardings = batch_shardings(config, mesh, backend)
    writer = cleanup.enter_context(contextlib.closing(metrics_lib.MetricWriter(workdir, is_main)))
    total = config.train.steps
    bar = cleanup.enter_context(contextlib.closing(
        metrics_lib.progress(start, total, config.train.progress and is_main)))
    meter = metrics_lib.Throughput(config)
    warned_recompile = False
    seen_nonfinite = _nonfinite_counts(state)["total"]
    for step in range(start, total):
      host_batch = next(it)
      state, metrics = step_fn(state, _device_batch(host_batch, b_shardings))
      meter.add(host_batch, metrics)
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        m = meter.line(metrics, step_fn)
        counts = _nonfinite_counts(state)
        m.update(nonfinite_steps=counts["total"], nonfinite_in_a_row=counts["run"],
                 nonfinite_max_in_a_row=counts["max_run"])
        writer.write(done, m)
        seen_nonfinite = _warn_on_nonfinite(counts, seen_nonfinite, done, config)
        _stop_if_diverged(counts, done, config, mngr)
        warned_recompile = warned_recompile or metrics_lib.warn_on_recompile(m["compiles"], done)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}",
                        mfu=f"{m['mfu']:.2f}", **({"nonfinite": counts["total"]}
                                                  if counts["total"] else {}))
      bar.update(1)
      if done % config.train.ckpt_every == 0 or done == total or stop.stop:
        # Saving waits for the state anyway, so reading its counts here costs nothing.
        _stop_if_diverged(_nonfinite_counts(state), done, config, mngr)
        # What the last save freed goes back to the system before the next one allocates:
        # without it the host heap creeps up by tens of KB per save (vdit_jax/hostmem.py).
        hostmem.release_free_memory()
        ckpt_lib.save(mngr, done, state, it.get_state(), config)
      if config.train.sample_every and done % config.train.sample_every == 0 and done < total:
        _write_samples(config, workdir, graphdef, state, done, is_main)
      if done < total and evaluators.due(done, total):
        evaluators.run(done, total, state, writer)
      if stop.stop:
        print(f"SIGTERM: saved step {done} in {workdir}; rerun the same command to resume",
              file=sys.stderr)
        break
    it.close()  # no more batches: the workers' memory is free before sampling
    bar.close()
    ckpt_lib.wait(mngr)
    final = int(jax.device_get(state["step"]))
    # After the last step, also when a run that ended before its evaluation is resumed.
    if final == total and evaluators.names and not evaluators.written(total):
      evaluators.run(total, total, state, writer)
    writer.close()
    if not stop.stop and (start < total or not os.path.isdir(_samples_dir(workdir, total))):
      _write_samples(config, workdir, graphdef, state, final, is_main)
  return state


def _write_skipped(workdir: str, skipped: list[dict[str, str]]) -> None:
  """``workdir/skipped.jsonl``: one line per unusable data file (path, reason, detail), written
  afresh at each start, so it lists what this run's scan found (none: no file)."""
  path = os.path.join(workdir, "skipped.jsonl")
  if not skipped:
    if os.path.exists(path):
      os.remove(path)  # an earlier start's list, of files since fixed or removed
    return
  with open(path + ".tmp", "w") as f:
    for entry in skipped:
      f.write(json.dumps(entry) + "\n")
  os.replace(path + ".tmp", path)


def _nonfinite_counts(state: State) -> dict[str, int]:
  """The state's counts of skipped steps (``NONFINITE_COUNTS``); waits for the last step."""
  return {k: int(v) for k, v in jax.device_get(state["nonfinite"]).items()}


def _warn_on_nonfinite(counts: dict[str, int], seen: int, step: int, config) -> int:
  """Warns if steps were skipped since the host last looked; returns the total it has seen."""
  if counts["total"] > seen:
    print(f"warning: non-finite steps by step {step}: {counts['total'] - seen} since the last "
          f"log line, {counts['total']} in the run, at most {counts['max_run']} in a row since "
          "the last log line; each had a NaN or inf loss or gradient and was skipped (no update, "
          f"its batch passed over); train.max_nonfinite_in_a_row="
          f"{config.train.max_nonfinite_in_a_row} in a row stop the run", file=sys.stderr)
  return counts["total"]


def _stop_if_diverged(counts: dict[str, int], step: int, config, mngr) -> None:
  """Raises once ``train.max_nonfinite_in_a_row`` steps in a row were non-finite, naming the
  newest checkpoint. Nothing is saved: the run no longer learns from this state, and a
  checkpoint of it would take the last good one's place among those kept."""
  limit = config.train.max_nonfinite_in_a_row
  if not limit or counts["max_run"] < limit:
    return
  ckpt_lib.wait(mngr)  # a save still being written is the last good one once complete
  last = mngr.latest_step()
  good = (f"the last good checkpoint is step {last} at {ckpt_lib.step_dir(mngr, last)}"
          if last is not None else f"no checkpoint was written before them in {mngr.directory}")
  raise FloatingPointError(
      f"{counts['max_run']} steps in a row had a non-finite loss or gradient by step {step} "
      f"(train.max_nonfinite_in_a_row={limit}); the run stops without saving, and {good}. "
      "Resuming from it repeats those steps: lower optim.lr (resuming with --config.train."
      "allow_config_change=True) or check the data of those steps")


def _device_batch(host_batch: dict[str, Any], shardings) -> dict[str, Any]:
  """This process's rows -> global arrays; entries the step does not use are left on the host.
  ``shardings`` is a prefix of the batch: a sharding stands for every array below it."""
  def place(sharding, subtree):
    return jax.tree.map(functools.partial(jax.make_array_from_process_local_data, sharding),
                        subtree)

  return jax.tree.map(place, shardings, {k: host_batch[k] for k in shardings})


def _samples_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "samples", f"step_{step:07d}")


def _sample_captions(config, tokenizer) -> list | None:
  """``config.sample.captions`` (``;``-separated, one per shape or one for all) for a captioned
  run; empty: the captions of the source's first videos, one per shape."""
  if config.model.caption.mode == "none":
    return None
  from data import pipeline  # scripts' side of the arrow, as in train()
  from vdit_jax import sampler
  count = len(sampler.parse_shapes(config.sample.shapes))
  if config.sample.captions.strip():
    return [c.strip() for c in config.sample.captions.split(";")]
  source = pipeline.make_source(config)
  key = "caption" if config.model.caption.mode == "tokens" else "caption_embedding"
  return [source[i].get(key) for i in range(count)]


def _sample_labels(config) -> list[int]:
  """``config.sample.labels`` as ids: ids or the names of the run's data source (data.labels)."""
  from data import labels as labels_lib  # scripts' side of the arrow, as in train()
  from vdit_jax import sampler
  count = len(sampler.parse_shapes(config.sample.shapes))
  return sampler.parse_labels(config.sample.labels, count, config.model.num_classes,
                              parse=labels_lib.label_set(config).parse)


def _write_samples(config, workdir, graphdef, state, step, is_main) -> None:
  from vdit_jax import sampler, video_io
  ema = state["ema"]
  # Every process gathers the EMA (spread over all of them) and samples; process 0 writes.
  ema = multihost_utils.process_allgather(ema, tiled=True) if jax.process_count() > 1 else ema
  model = nnx.merge(graphdef, jax.device_get(ema))
  shapes = sampler.parse_shapes(config.sample.shapes)
  labels = _sample_labels(config)
  tokenizer = (text_lib.Tokenizer.load(workdir) if config.model.caption.mode == "tokens"
               else None)
  videos = sampler.sample(model, config, shapes, labels, cfg_scale=config.sample.cfg,
                          num_steps=config.sample.steps, seed=config.seed,
                          captions=_sample_captions(config, tokenizer), tokenizer=tokenizer)
  if is_main:
    out = _samples_dir(workdir, step)
    for i, (video, label) in enumerate(zip(videos, labels)):
      video_io.write_video(os.path.join(out, f"{i:02d}_label{label}"), video, config.sample.fps)
