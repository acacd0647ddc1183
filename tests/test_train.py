"""Training: the step learns, a resumed run equals an uninterrupted one, bad configs fail early."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import pipeline
from tests import helpers
from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import config as config_lib
from vdit_jax import metrics
from vdit_jax import sharding as shard_lib
from vdit_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return helpers.shared_runs(tmp_path_factory)


# ----------------------------------------------------------------------------- the step


def test_train_step_overfits_one_batch():
  steps = 60
  config = helpers.tiny_config(**{"train.steps": steps, "optim.lr": 3e-3,
                                  "optim.warmup_steps": 3, "optim.min_lr_ratio": 1.0,
                                  "data.label_dropout": 0.0})
  batch = {k: jnp.asarray(v) for k, v in pipeline.make_batch(config, step=0).items()}
  graphdef, state = trainer.init_state(config)
  step_fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef,
                                      tx=trainer.make_optimizer(config), config=config),
                    donate_argnums=0)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert step_fn._cache_size() == 1  # compiled once
  assert int(state["step"]) == steps
  assert all(math.isfinite(x) for x in losses)
  # t and noise are redrawn every step, so compare averages
  first, last = np.mean(losses[:3]), np.mean(losses[-5:])
  assert last < 0.7 * first, losses


def test_every_block_type_trains():
  """A schedule holding every one-layer block type (alternating is two of them in turn) passes
  validation and trains with blocksparse layouts from the pipeline: finite losses, and every
  layer's parameters move, in one compile. (The model tests check each block against dense.)"""
  config = helpers.tiny_config("full3d,factorized,spatial_only,temporal_only,window,sparse",
                               **{"model.depth": 6, "model.attention_backend": "blocksparse",
                                  "data.batch_rows": 2})
  config_lib.validate(config)
  batch = jax.tree.map(jnp.asarray, pipeline.make_batch(config, step=0))
  graphdef, state = trainer.init_state(config)
  before = jax.tree.map(np.asarray, state["params"])
  step_fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef,
                                      tx=trainer.make_optimizer(config), config=config))
  # Step 0 has lr 0 (warm-up); step 1 moves the zero-initialised final layer, through which
  # step 2 gives the blocks their first gradients.
  for _ in range(3):
    state, metrics = step_fn(state, batch)
    assert math.isfinite(float(metrics["loss"]))
  assert step_fn._cache_size() == 1
  for i in range(6):
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))),
                         before["blocks"][i], state["params"]["blocks"][i])
    assert any(jax.tree.leaves(moved)), f"layer {i} did not train"


def test_lr_schedule_of_the_first_three_steps_does_not_depend_on_train_steps():
  # What makes "3 steps, then resume to 5" comparable with a straight 5-step run.
  o = helpers.run_config(5).optim
  for s in range(3):
    assert trainer.lr_schedule(o, 3)(s) == trainer.lr_schedule(o, 5)(s)


# ----------------------------------------------------------------------------- train/resume


def test_ema_decay_is_capped_by_its_warm_up():
  """The decay is min(ema_decay, (1 + s) / (10 + s)): the configured decay applies only from
  the step where the warm-up reaches it (8990 for 0.999), as config.optim.ema_decay says."""
  at = lambda s, d: float(trainer.ema_decay_at(jnp.asarray(s, jnp.int32), d))
  assert at(0, 0.999) == pytest.approx(0.1)
  assert at(2500, 0.999) == pytest.approx(2501 / 2510) == at(2500, 0.9999)
  assert at(8989, 0.999) < 0.999
  assert at(8991, 0.999) == pytest.approx(0.999)
  assert at(100_000, 0.999) == pytest.approx(0.999)
  assert at(100_000, 0.9999) == pytest.approx(0.9999)


def test_resumed_run_equals_uninterrupted_run(runs):
  resumed = helpers.restore_state(runs["resumed"], 5)
  straight = helpers.restore_state(runs["straight"], 5)
  a, b = helpers.leaves(resumed), helpers.leaves(straight)
  assert a.keys() == b.keys()
  for k in ("params", "ema", "opt", "step", "key", "nonfinite"):
    assert any(path.startswith(f"['{k}']") for path in a), k
  for path in a:
    assert a[path].dtype == b[path].dtype, path
    np.testing.assert_allclose(a[path], b[path], rtol=0, atol=1e-6, err_msg=path)
  assert int(a["['step']"]) == 5
  # the same batches in the same order: the logged losses agree step by step
  ma, mb = helpers.read_metrics(runs["resumed"]), helpers.read_metrics(runs["straight"])
  assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5]
  for x, y in zip(ma, mb):
    for key in ("loss", "grad_norm", "lr"):
      assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
  # and training did something in steps 4-5 (a resume that ignored them would be caught above)
  at3 = helpers.leaves(helpers.restore_state(runs["resumed"], 3))
  moved = [p for p in a if p.startswith("['params']") and not np.array_equal(a[p], at3[p])]
  assert moved


def test_checkpoint_holds_the_optimizer_state(runs):
  state = helpers.leaves(helpers.restore_state(runs["resumed"], 3))
  assert int(state["['step']"]) == 3
  counts = {p: v for p, v in state.items() if p.startswith("['opt']") and p.endswith("count")}
  mus = {p: v for p, v in state.items() if p.startswith("['opt']") and ".mu" in p}
  nus = {p: v for p, v in state.items() if p.startswith("['opt']") and ".nu" in p}
  assert counts and all(int(c) == 3 for c in counts.values()), counts
  n_params = sum(p.startswith("['params']") for p in state)
  assert len(mus) == len(nus) == n_params
  # adaLN-Zero: after 3 steps (the first at lr 0) gradients have reached the output layers and
  # the modulations, not yet the attention/MLP weights behind the zero gates
  nonzero = {p for p, v in mus.items() if np.any(v != 0)}
  assert any("['final']" in p for p in nonzero) and any("['ada']" in p for p in nonzero), nonzero
  assert all(np.all(v >= 0) for v in nus.values())
  assert {p.replace(".nu", ".mu", 1) for p, v in nus.items() if np.any(v > 0)} == nonzero
  # the EMA is its own average, not a copy of the params
  differ = [p for p in state if p.startswith("['params']")
            and not np.array_equal(state[p], state[p.replace("['params']", "['ema']", 1)])]
  assert differ


def test_run_writes_metrics_config_and_samples(runs):
  workdir = runs["straight"]
  metrics = helpers.read_metrics(workdir)
  for m in metrics:
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time"):
      assert key in m and math.isfinite(m[key]), (key, m)
    assert m["tokens_per_s"] > 0 and m["step_time"] > 0 and m["loss"] > 0
    assert m["compiles"] == 1
    assert m["nonfinite_steps"] == m["nonfinite_in_a_row"] == m["nonfinite_max_in_a_row"] == 0
    assert 0 < m["useful_tokens_per_s"] < m["tokens_per_s"] and 0 < m["packing"] < 1
    # CPU devices report no memory statistics: the host's peak RSS stands in, named as such
    assert m["peak_host_rss_gb"] > 0.1 and "peak_device_memory_gb" not in m
  with open(os.path.join(workdir, "config.json")) as f:
    saved = config_lib.from_dict(json.load(f))
  assert saved.to_dict() == helpers.run_config(5).to_dict()
  with open(os.path.join(workdir, "run_info.json")) as f:
    info = json.load(f)
  assert info["jax"] == jax.__version__
  samples = os.path.join(workdir, "samples", "step_0000005")
  names = sorted(os.listdir(samples))
  n_shapes = len(helpers.run_config(5).sample.shapes.split(","))
  assert len([n for n in names if n.endswith(".mp4")]) == n_shapes
  assert len([n for n in names if n.endswith(".gif")]) == n_shapes


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_that_fails_stops_its_data_workers(tmp_path, monkeypatch, workers):
  """An exception mid-run closes the data iterator on the way out: no prefetch thread or worker
  process is left making batches (the autouse fixture checks the same after every test)."""
  import multiprocessing
  import threading

  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  device_batch, calls = trainer._device_batch, []

  def failing(batch, shardings):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("step 2 fails")
    return device_batch(batch, shardings)

  monkeypatch.setattr(trainer, "_device_batch", failing)
  with pytest.raises(RuntimeError, match="step 2 fails"):
    trainer.train(helpers.run_config(4, **{"data.worker_count": workers}), str(tmp_path / "run"))
  assert not [t.name for t in threading.enumerate() if t.name.startswith("grain")]
  assert not multiprocessing.active_children()


def test_a_recompile_after_the_first_step_warns(capsys):
  """The compile count train() logs comes from the jitted step's cache; a second shape is a
  second compile, and the warning names it."""
  fn = jax.jit(lambda x: x * 2)
  fn(jnp.ones(2))
  assert metrics.cache_size(fn) == 1 and not metrics.warn_on_recompile(1, 1)
  fn(jnp.ones(3))
  assert metrics.cache_size(fn) == 2 and metrics.warn_on_recompile(2, 7)
  assert "compiled 2 times by step 7" in capsys.readouterr().err


def test_one_process_needs_no_distributed_setup(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("initialised"))
  trainer.initialize_distributed(helpers.run_config(3).distributed)
  config = helpers.run_config(3, **{"distributed.num_processes": 2})
  with pytest.raises(ValueError, match="needs distributed.coordinator_address"):
    trainer.initialize_distributed(config.distributed)


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("fields, message", [
    ({"model.block": "nope"}, "model.block"),
    ({"model.block": "full3d,window,sparse"}, "model.depth=2"),
    ({"model.block": "sparse", "model.sparse_heads": "local,cross,global"}, "sparse_heads"),
    ({"data.seq_len": 16}, "seq_len"),
    ({"data.batch_rows": 2, "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}, "batch_rows"),
    ({"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1}, "mesh"),
    ({"model.dtype": "float64"}, "dtype"),
    ({"model.attention_backend": "pallas"}, "'pallas' runs Pallas kernels on TPU"),  # on CPU
    ({"model.num_heads": 2, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8},
     "num_heads=2 cannot be split over mesh.tensor=8"),
    ({"data.max_segments": 0}, "max_segments"),
    ({"model.block": "window", "model.window": (1, -1, 2)}, "model.window"),
    ({"model.block": "causal3d", "model.causal_window": (2,)}, "model.causal_window"),
    ({"model.label_factors": (3, 5)}, "product is model.num_classes=18"),
    ({"model.frac_pos": -1}, "model.frac_pos=-1"),
    ({"model.prediction": "eps"}, "model.prediction='eps' is unknown"),
    ({"sample.sampler": "rk4"}, "sampler 'rk4' is unknown"),
    ({"sample.sampler": "stochastic", "sample.eta": 2.0}, r"eta=2.0 must be in \[0, 1\]"),
    ({"model.prediction": "clean", "model.prediction_t_min": 0.0}, "prediction_t_min=0.0"),
])
def test_bad_config_fails_before_anything_is_compiled_or_written(tmp_path, monkeypatch, fields,
                                                                 message):
  def reached(*args, **kwargs):
    raise AssertionError("train() got past validation")
  for name in ("create_sharded_state", "abstract_state", "jit_train_step"):
    monkeypatch.setattr(trainer, name, reached)
  monkeypatch.setattr(shard_lib, "make_mesh", reached)
  monkeypatch.setattr(jax, "jit", reached)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    trainer.train(helpers.run_config(3, **fields), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("mesh_sizes", [(4, 2, 1), (1, 4, 2), (1, 1, 8), "single"])
def test_checkpoint_restores_onto_another_mesh(runs, mesh_sizes):
  """A checkpoint written on mesh (2, 2, 2) restores on other meshes (and one device) with the
  same values, laid out by the new mesh's shardings."""
  workdir = runs["straight"]
  reference = helpers.restore_state(workdir, 3)
  config = helpers.run_config(5)
  if mesh_sizes == "single":
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    mesh = shard_lib.make_mesh(config.mesh, jax.devices()[:1])
  else:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_sizes
    mesh = shard_lib.make_mesh(config.mesh)
  mngr = ckpt_lib.manager(workdir, read_only=True)
  try:
    _, target, shardings = trainer.abstract_state(config, mesh)
    state, data_state, _ = ckpt_lib.restore(mngr, 3, target)
  finally:
    mngr.close()
  assert data_state  # the iterator state comes back too
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(jax.device_get(got)), want)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)
  assert len(jax.tree.leaves(state)[0].sharding.device_set) == (1 if mesh_sizes == "single"
                                                                else 8)


def test_a_mesh_that_cannot_split_a_parameter_fails_clearly():
  """2 heads: tensor=8 cannot shard them, and the error says which parameter and why."""
  config = helpers.run_config(5, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8,
                                    "model.num_heads": 2})
  mesh = shard_lib.make_mesh(config.mesh)
  with pytest.raises(ValueError, match=r"cannot be split over mesh axes \('tensor',\)"):
    trainer.abstract_state(config, mesh)


def test_training_continues_on_another_mesh(runs, tmp_path, tmp_path_factory, monkeypatch):
  """Steps 3 -> 5 on mesh (1, 1, 8) (tensor-parallel only) from a (2, 2, 2) checkpoint match
  the straight (2, 2, 2) run up to float reassociation (the reductions are split differently)."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  workdir = helpers.at_step_3(tmp_path_factory, tmp_path / "moved")
  trainer.train(helpers.run_config(5, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8}),
                workdir)
  moved = helpers.restore_state(workdir, 5)
  straight = helpers.restore_state(runs["straight"], 5)
  assert int(moved["step"]) == 5
  for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(straight)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["video", "token"])
def test_grad_accumulation_equals_one_big_batch(weighting):
  """k micro-batches give the loss and gradient of the whole batch, though rows hold different
  numbers of videos and tokens (a mean of micro-batch means would not)."""
  config = helpers.tiny_config(**{"data.batch_rows": 8, "diffusion.loss_weighting": weighting})
  batch = jax.tree.map(jnp.asarray, pipeline.make_batch(config, 0))
  videos_per_row = (np.asarray(batch["seg_grid"]).prod(-1) > 0).sum(-1)
  assert len(set(videos_per_row.tolist())) > 1  # micro-batches differ in video count
  graphdef, state = trainer.init_state(config)
  params = helpers.random_params_like(state["params"], seed=4, scale=0.1)
  key = jax.random.key(7)
  results = {}
  for k in (1, 2, 4):
    fn = jax.jit(functools.partial(trainer.accumulated_grads, graphdef=graphdef, config=config,
                                   micro_batches=k))
    results[k] = fn(params, batch=batch, key=key)
  loss1, grads1 = results[1]
  ref_loss, _ = trainer.loss_fn(params, graphdef, batch, key, config)
  np.testing.assert_allclose(float(loss1), float(ref_loss), rtol=1e-6)
  for k in (2, 4):
    loss_k, grads_k = results[k]
    np.testing.assert_allclose(float(loss_k), float(loss1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads1)) > 0


def test_sharded_training_equals_single_device_training():
  """Three steps on mesh (2, 2, 2) and on one device: same losses and params (up to float
  reassociation of the sharded reductions)."""
  config = helpers.run_config(3)
  batches = [pipeline.make_batch(config, step) for step in range(3)]
  results = {}
  for name, devices in (("mesh", jax.devices()), ("single", jax.devices()[:1])):
    c = helpers.run_config(3)
    if name == "single":
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    mesh = shard_lib.make_mesh(c.mesh, devices)
    with jax.set_mesh(mesh), shard_lib.axis_rules(c.mesh.rules):
      graphdef, state, shardings = trainer.create_sharded_state(c, mesh)
      step_fn = trainer.jit_train_step(c, graphdef, shardings, mesh)
      b_shardings = trainer.batch_shardings(c, mesh)
      losses = []
      for host_batch in batches:
        state, metrics = step_fn(state, trainer._device_batch(host_batch, b_shardings))
        losses.append(float(metrics["loss"]))
      n_devices = len(jax.tree.leaves(state["params"])[0].sharding.device_set)
      results[name] = (losses, jax.tree.map(np.asarray, jax.device_get(state)), n_devices)
  assert results["mesh"][2] == 8 and results["single"][2] == 1
  np.testing.assert_allclose(results["mesh"][0], results["single"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results["mesh"][1]), jax.tree.leaves(results["single"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("override, named", [("--config.model.nope=1", "'nope'"),
                                             ("--config.modl.depth=1", "Did you mean")])
def test_an_override_naming_no_config_field_exits_with_its_name(tmp_path, override, named):
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                        str(tmp_path / "run"), override], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  assert override.split("=")[0] in out.stderr and named in out.stderr, out.stderr
  assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
