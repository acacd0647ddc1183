"""What a run does when things go wrong: non-finite steps are skipped and counted and too many in
a row stop the run without saving; a checkpoint of another model or config is refused, naming
what differs; a checkpoint that cannot be written stops the run and leaves the previous one."""

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from data import pipeline
from tests import helpers
from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import config as config_lib
from vdit_jax import metrics
from vdit_jax import sharding as shard_lib
from vdit_jax import trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return helpers.shared_runs(tmp_path_factory)


def learned(state) -> dict[str, np.ndarray]:
  """The leaves a skipped step must leave as they were: params, EMA and optimizer state."""
  return helpers.leaves({k: state[k] for k in ("params", "ema", "opt")})


def counts(state) -> dict[str, int]:
  return {k: int(v) for k, v in state["nonfinite"].items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)  # bit for bit (NaN == NaN)


# ----------------------------------------------------------------------------- the step


def test_a_nan_batch_is_skipped_and_counted_then_training_goes_on():
  """Two steps on a batch with one NaN row change nothing but the step and the counts; the good
  step after them makes the update it would have made had they never been."""
  config = helpers.tiny_config()  # log_every=2: a step with an even index starts a log interval
  graphdef, state = trainer.init_state(config)
  step_fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef,
                                      tx=trainer.make_optimizer(config), config=config))
  good = pipeline.make_batch(config, step=0)
  bad = dict(good, tokens=good["tokens"].copy())
  bad["tokens"][1] = np.nan
  good, bad = jax.tree.map(jnp.asarray, good), jax.tree.map(jnp.asarray, bad)
  # The first update has lr 0 (warm-up); the schedule counts applied updates, so the next good
  # step is the first to move the params.
  s1, _ = step_fn(state, good)
  s2, m2 = step_fn(s1, bad)
  s3, m3 = step_fn(s2, bad)
  assert np.isnan(float(m2["loss"])) and np.isnan(float(m3["loss"]))
  assert int(s3["step"]) == 3
  assert_same(learned(s3), learned(s1))
  assert counts(s2) == {"total": 1, "run": 1, "max_run": 1}
  # step 2 starts a log interval; the run goes on, so the longest since the last log is it
  assert counts(s3) == {"total": 2, "run": 2, "max_run": 2}

  s4, m4 = step_fn(s3, good)
  unskipped, m_unskipped = step_fn(dict(s1, step=s3["step"]), good)  # same step: same noise
  assert np.isfinite(float(m4["loss"])) and float(m4["loss"]) == float(m_unskipped["loss"])
  assert float(m4["lr"]) == float(trainer.lr_schedule(config.optim, config.train.steps)(1)) > 0
  assert_same(learned(s4), learned(unskipped))
  moved = [p for p, v in learned(s4).items()
           if p.startswith("['params']") and not np.array_equal(learned(s1)[p], v)]
  assert moved
  assert counts(s4) == {"total": 2, "run": 0, "max_run": 2}  # step 3 is in step 2's interval
  s5, _ = step_fn(s4, good)
  assert counts(s5) == {"total": 2, "run": 0, "max_run": 0}  # step 4 starts an interval
  assert step_fn._cache_size() == 1


def test_an_infinite_gradient_with_a_finite_loss_is_skipped():
  """A gradient that overflows while the loss does not (what no small batch reproduces on
  demand) goes through the same check: it is skipped, and a finite one is applied."""
  config = helpers.tiny_config()
  _, state = trainer.init_state(config)
  apply = jax.jit(functools.partial(trainer.apply_grads, tx=trainer.make_optimizer(config),
                                    config=config))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), state["params"])
  first, *_ = jax.tree.leaves(grads)
  inf_grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf) if g is first else g,
                           grads)
  s1, _ = apply(state, jnp.float32(0.5), grads)  # lr 0: past it, an update moves every param
  before = learned(s1)

  skipped, m = apply(s1, jnp.float32(0.5), inf_grads)
  assert float(m["loss"]) == 0.5 and not np.isfinite(float(m["grad_norm"]))
  assert_same(learned(skipped), before)
  assert int(skipped["step"]) == 2 and counts(skipped) == {"total": 1, "run": 1, "max_run": 1}

  nan_loss, _ = apply(s1, jnp.float32(np.nan), grads)
  assert_same(learned(nan_loss), before)
  assert counts(nan_loss)["total"] == 1

  applied, m = apply(skipped, jnp.float32(0.5), grads)
  after = learned(applied)
  assert all(not np.array_equal(before[p], after[p]) for p in before
             if p.startswith("['params']"))
  assert float(m["lr"]) == float(trainer.lr_schedule(config.optim, config.train.steps)(1))
  assert counts(applied)["run"] == 0 and counts(applied)["total"] == 1


# ----------------------------------------------------------------------------- the run


def nan_batches_from(monkeypatch, first_bad: int) -> None:
  """Every batch from the ``first_bad``-th (1-based) on has NaN tokens."""
  device_batch, calls = trainer._device_batch, []

  def poisoned(batch, shardings):
    calls.append(1)
    if len(calls) >= first_bad:
      batch = dict(batch, tokens=np.full_like(batch["tokens"], np.nan))
    return device_batch(batch, shardings)

  monkeypatch.setattr(trainer, "_device_batch", poisoned)


@pytest.mark.parametrize("log_every", [1, 5])
def test_a_run_stops_after_k_nonfinite_steps_in_a_row(tmp_path, monkeypatch, capsys, log_every):
  """Steps 3 and 4 are NaN and train.max_nonfinite_in_a_row=2: the run stops at step 4 (a log
  line and a checkpoint with log_every=1, a checkpoint only with 5) without saving it, and the
  error names checkpoint 2, which holds the state of step 2."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  nan_batches_from(monkeypatch, first_bad=3)
  workdir = tmp_path / "run"
  config = helpers.run_config(5, **{"train.max_nonfinite_in_a_row": 2, "train.ckpt_every": 2,
                                    "train.log_every": log_every})
  step2 = str(workdir / "checkpoints" / "2")
  message = (re.escape("2 steps in a row had a non-finite loss or gradient by step 4") + ".*" +
             re.escape(f"the last good checkpoint is step 2 at {step2}."))
  with pytest.raises(FloatingPointError, match=message):
    trainer.train(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  if log_every == 1:
    lines = helpers.read_metrics(workdir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["nonfinite_steps"] for m in lines] == [0, 0, 1, 2]
    assert [m["nonfinite_in_a_row"] for m in lines] == [0, 0, 1, 2]
    assert np.isfinite(lines[1]["loss"]) and np.isnan(lines[3]["loss"])
    assert "non-finite steps by step 3: 1 since the last log line" in capsys.readouterr().err
  state = helpers.restore_state(str(workdir), 2)
  assert int(state["step"]) == 2 and all(int(v) == 0 for v in state["nonfinite"].values())


# ----------------------------------------------------------------------------- the workdir


def restore_into(workdir: str, step: int, config):
  mngr = ckpt_lib.manager(workdir, read_only=True)
  try:
    _, target, _ = trainer.abstract_state(config, shard_lib.make_mesh(config.mesh))
    return ckpt_lib.restore(mngr, step, target)
  finally:
    mngr.close()


@pytest.mark.parametrize("fields, listed", [
    ({"model.width": 64},  # 104 arrays: the first 12 are listed, the params' first
     ["params.blocks.0.ada.kernel: saved (32, 192), expected (64, 384)",
      "params.blocks.0.mlp.fc1.kernel: saved (32, 128), expected (64, 256)", "... and 92 more"]),
    ({"model.depth": 3},
     ["params.blocks.2.mlp.fc2.kernel: not in the checkpoint, expected (128, 32)"]),
    ({"model.depth": 1},
     ["params.blocks.1.attn.qkv: saved (32, 3, 8, 8), not in this model"]),
])
def test_restoring_another_models_checkpoint_names_the_arrays_and_shapes(runs, fields, listed):
  with pytest.raises(ValueError, match="does not fit this config's train state") as error:
    restore_into(runs["straight"], 3, helpers.run_config(5, **fields))
  message = str(error.value)
  for line in listed:
    assert f"\n  {line}" in message, message
  assert f"{runs['straight']}/checkpoints/3" in message


def test_resume_changes_lists_the_fields_that_are_not_safe_to_change():
  saved = helpers.run_config(5)
  safe = {"train.steps": 9, "train.log_every": 2, "train.ckpt_every": 4, "train.grad_accum": 2,
          "train.max_nonfinite_in_a_row": 0, "mesh.data": 1, "mesh.tensor": 8,
          "data.worker_count": 2, "model.attention_backend": "blocksparse", "model.remat": True,
          "sample.steps": 30, "sample.shapes": "8x32x32", "evals.names": "heldout",
          "evals.heldout.every": 7}
  assert config_lib.resume_changes(saved, helpers.run_config(5, **safe)) == []
  changed = helpers.run_config(5, **safe, **{"model.width": 64, "model.patch": (2, 4, 4),
                                             "data.channels": 4, "optim.lr": 5e-4, "seed": 1})
  assert config_lib.resume_changes(saved, changed) == [
      "data.channels: 3 -> 4", "model.patch: (1, 4, 4) -> (2, 4, 4)", "model.width: 32 -> 64",
      "optim.lr: 0.001 -> 0.0005", "seed: 0 -> 1"]
  # a list where the config has a tuple is the same value
  assert config_lib.resume_changes(saved, helpers.run_config(5, **{"data.frames": [2, 4]})) == []


def test_resuming_with_another_model_is_refused_unless_allowed(runs, tmp_path, monkeypatch):
  """Refused, naming the change, before anything in the workdir is written; allowed, the restore
  fails on the shapes instead; a change of safe fields only resumes (here with nothing left to
  train: restored, nothing written but config.json)."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  workdir = tmp_path / "run"
  shutil.copytree(runs["straight"], workdir)
  with open(workdir / "config.json") as f:
    config_json = f.read()
  with pytest.raises(ValueError, match=re.escape(
      f"checkpoint {workdir}/checkpoints/5 was trained with another config; this one changes\n"
      "  model.width: 32 -> 64\nresume with")):
    trainer.train(helpers.run_config(5, **{"model.width": 64}), str(workdir))
  with open(workdir / "config.json") as f:
    assert f.read() == config_json
  with pytest.raises(ValueError, match="does not fit this config's train state"):
    trainer.train(helpers.run_config(5, **{"model.width": 64, "train.allow_config_change": True}),
                  str(workdir))
  safe = {"train.log_every": 2, "train.ckpt_every": 1, "sample.cfg": 2.0, "mesh.data": 1,
          "mesh.fsdp": 1, "mesh.tensor": 8}
  state = trainer.train(helpers.run_config(5, **safe), str(workdir))
  assert int(state["step"]) == 5
  with open(workdir / "config.json") as f:
    assert config_lib.from_dict(json.load(f)).to_dict() == helpers.run_config(5, **safe).to_dict()


def fail_checkpoint_writes(monkeypatch, where: str) -> None:
  """``save``: the manager's save raises at once. ``background``: the write of the config item
  fails while the manager finishes the step in the background (as a full disk would), so the
  error comes out of the wait after the last step."""
  if where == "save":
    def failing(self, step, *args, **kwargs):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
  else:
    async def failing_write(self, item, directory):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing_write)


@pytest.mark.parametrize("where", ["save", "background"])
def test_a_checkpoint_that_cannot_be_written_fails_naming_the_workdir(runs, tmp_path, monkeypatch,
                                                                      where):
  """Steps 3 -> 5 whose checkpoint 5 cannot be written: the error names the workdir and the
  checkpoint that is left, 3, which a resume would take and restores as it was saved."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  workdir = tmp_path / "run"
  shutil.copytree(runs["resumed"], workdir)
  shutil.rmtree(workdir / "checkpoints" / "5")
  fail_checkpoint_writes(monkeypatch, where)
  with pytest.raises(OSError, match=re.escape(
      f"cannot write a checkpoint in {workdir}/checkpoints (OSError: [Errno 28] No space left on "
      f"device); the newest complete checkpoint, step 3 at {workdir}/checkpoints/3, is intact")):
    trainer.train(helpers.run_config(5), str(workdir))
  monkeypatch.undo()
  mngr = ckpt_lib.manager(str(workdir), read_only=True)
  try:
    assert mngr.latest_step() == 3
  finally:
    mngr.close()
  assert_same(helpers.leaves(helpers.restore_state(str(workdir), 3)),
              helpers.leaves(helpers.restore_state(runs["resumed"], 3)))


# ----------------------------------------------------------------------------- preemption


# What Python's multiprocessing resource tracker prints at exit when shared memory blocks (grain
# passes batches from its worker processes in them) were never unlinked.
SHARED_MEMORY_LEAK = "leaked shared_memory"


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
  """A real train.py process with a data worker: SIGTERM once it has logged a step makes it save
  the step it is at (the only checkpoint, one that restores) and exit 0, leaving no shared
  memory behind."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.ckpt_every=100000", "--config.data.worker_count=1"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 300
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      assert time.monotonic() < deadline, "no step logged in 300 s"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  assert SHARED_MEMORY_LEAK not in err, err[-2000:]
  saved = re.search(r"SIGTERM: saved step (\d+)", err)
  assert saved, err[-2000:]
  step = int(saved.group(1))
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [step]
  state = helpers.restore_state(str(workdir), step)
  assert int(np.asarray(state["step"])) == step


def test_sigkill_during_saves_leaves_the_last_complete_checkpoint(tmp_path):
  """A real train.py process saving every step is killed with SIGKILL: each complete
  checkpoint restores, and the next start resumes from the newest one, naming the incomplete
  ones it passes over. Should the kill land between saves, an interrupted write is left in
  orbax's form (the next step's temporary directory, holding part of a step) to pass over.
  Dropping old checkpoints (keep 2 of one per step) deletes nothing outside the workdir, not
  even what is named like a checkpoint next to it."""
  workdir = tmp_path / "run"
  beside = [tmp_path / "1", tmp_path / "checkpoints" / "1" / "x",
            tmp_path / "run2" / "checkpoints" / "1" / "x"]
  for path in beside:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not the run's")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         "--config.train.log_every=1", "--config.train.ckpt_every=1"]
  ckpts = workdir / "checkpoints"
  steps = lambda: sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if ckpts.exists() else []
  proc = subprocess.Popen(cmd + ["--config.train.steps=100000"], cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while len(steps()) < 2:
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      assert time.monotonic() < deadline, "no two checkpoints in 300 s"
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.communicate()
  done = steps()
  for step in done[-2:]:
    assert int(np.asarray(helpers.restore_state(str(workdir), step)["step"])) == step
  partial = [n for n in os.listdir(ckpts) if ".orbax-checkpoint-tmp" in n]
  if not partial:
    fake = ckpts / f"{done[-1] + 1}.orbax-checkpoint-tmp-0"
    shutil.copytree(ckpts / str(done[-1]) / "config", fake / "config")
    partial = [fake.name]
  out = subprocess.run(cmd + [f"--config.train.steps={done[-1] + 1}"], cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "passing over" in out.stderr and f"resuming from step {done[-1]}" in out.stderr
  assert all(name in out.stderr for name in partial), out.stderr[-2000:]
  assert helpers.read_metrics(str(workdir))[-1]["step"] == done[-1] + 1
  assert all(path.read_text() == "not the run's" for path in beside)


def test_resume_across_processes_with_data_workers_is_exact(tmp_path):
  """train.py with grain worker processes: 3 steps, exit, resume to 5 in a new process, against
  5 steps in one process: the same state at step 5, bit for bit on CPU, and the same losses.
  Resumed on another mesh (data 2 x fsdp 2 x context 2 instead of data 8), in a new process:
  the same within float tolerance (another summation order). No run leaves shared memory
  behind."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(workdir, steps, *extra):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
           f"--config.train.steps={steps}", "--config.train.log_every=1",
           "--config.data.worker_count=1", *extra]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert SHARED_MEMORY_LEAK not in out.stderr, out.stderr[-3000:]

  run(tmp_path / "resumed", 3)
  # The same 3-step checkpoint, to resume on another mesh below.
  shutil.copytree(tmp_path / "resumed", tmp_path / "other_mesh")
  run(tmp_path / "resumed", 5)
  run(tmp_path / "straight", 5)
  a = helpers.leaves(helpers.restore_state(str(tmp_path / "resumed"), 5))
  b = helpers.leaves(helpers.restore_state(str(tmp_path / "straight"), 5))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  losses = lambda name: [m["loss"] for m in helpers.read_metrics(str(tmp_path / name))]
  assert losses("resumed") == losses("straight")
  run(tmp_path / "other_mesh", 5, "--config.mesh.data=2", "--config.mesh.fsdp=2",
      "--config.mesh.context=2")
  c = helpers.leaves(helpers.restore_state(str(tmp_path / "other_mesh"), 5))
  assert c.keys() == b.keys()
  for path in c:
    np.testing.assert_allclose(c[path], b[path], atol=2e-5, rtol=1e-4, err_msg=path)
  np.testing.assert_allclose(losses("other_mesh"), losses("straight"), rtol=1e-5)


# ----------------------------------------------------------------------------- host memory


def test_saves_leave_no_python_objects_behind_in_orbax_tensorstore_calls(tmp_path):
  """Orbax's tensorstore_utils calls two tensorstore functions that never free what they return
  (vdit_jax.checkpoint._TensorstoreForOrbax): with the checkpoint module's stand-in, repeated
  saves of 40 arrays leave nothing allocated on those lines; the stand-in's spec of a local
  directory is tensorstore's own."""
  import tracemalloc

  import asyncio
  import linecache

  import tensorstore
  from orbax.checkpoint._src.serialization import tensorstore_utils
  spec = {"driver": "file", "path": str(tmp_path) + "/a b/"}
  assert ckpt_lib._FileSpec(spec).to_json() == tensorstore.KvStore.Spec(spec).to_json()
  ckpt_lib.manager(str(tmp_path / "setup")).close()  # sets orbax up
  # orbax opens a local directory's store through the stand-in too
  store = asyncio.run(tensorstore_utils.open_kv_store(spec, tensorstore.Context()))
  assert isinstance(store, tensorstore.KvStore)

  state = {f"w{i}": jnp.full((8, i + 1), i, jnp.float32) for i in range(40)}
  config = helpers.tiny_config()
  mngr = ckpt_lib.manager(str(tmp_path / "run"), keep=1)
  try:
    ckpt_lib.save(mngr, 1, state, {}, config)  # warm-up: imports, caches, thread pools
    ckpt_lib.wait(mngr)
    tracemalloc.start()
    try:
      before = tracemalloc.take_snapshot()
      for step in range(2, 12):
        ckpt_lib.save(mngr, step, state, {}, config)
        ckpt_lib.wait(mngr)
      after = tracemalloc.take_snapshot()
    finally:
      tracemalloc.stop()
  finally:
    mngr.close()
  def calls_in_question(stat) -> bool:  # a line of orbax that makes one of the two calls
    frame = stat.traceback[0]
    line = linecache.getline(frame.filename, frame.lineno)
    return "to_json()" in line or "collect_matching_metrics" in line

  kept = [s for s in after.compare_to(before, "lineno") if calls_in_question(s)]
  grown = sum(s.size_diff for s in kept)
  # Without the stand-in: about 250 bytes per array and save, and 5 KB per save.
  assert grown < 4 * 1024, [str(s) for s in kept[:3]]
