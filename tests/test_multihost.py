"""Multi-host: two local CPU processes (4 devices each) train on one global (2, 2, 2) mesh and
match the single-process run on 8 devices (tests/helpers.py's shared ``straight`` run).

Run as a script, this file is one of the two processes: ``test_multihost.py WORKDIR ADDRESS``
with ``JAX_PROCESS_ID`` in the environment (the config carries the address and process count,
so both ways of joining a run are used).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from tests import helpers
  return helpers.shared_runs(tmp_path_factory)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(runs, tmp_path):
  from tests import helpers
  workdir = str(tmp_path / "two")
  address = f"127.0.0.1:{_free_port()}"
  # The compilation cache settings come from conftest through os.environ.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=helpers.xla_flags(4))
  procs = [subprocess.Popen([sys.executable, __file__, workdir, address], cwd=ROOT,
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]

  # Process 0 alone writes metrics and draws the progress bar (with loss, tokens/s and MFU).
  assert all(k in outs[0][1] for k in ("loss=", "tok_s=", "mfu=")), outs[0][1][-2000:]
  assert "tok_s=" not in outs[1][1]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    two = [json.loads(line) for line in f]
  with open(os.path.join(runs["straight"], "metrics.jsonl")) as f:
    one = [json.loads(line) for line in f][:STEPS]
  assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, STEPS + 1))
  for a, b in zip(two, one):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    assert a["packing"] == b["packing"]  # tokens counted over both processes' rows

  # The checkpoint both processes wrote equals the single-process one, leaf by leaf.
  got = helpers.restore_state(workdir, STEPS)
  want = helpers.restore_state(runs["straight"], STEPS)
  assert int(got["step"]) == STEPS
  for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _worker(workdir: str, address: str) -> None:
  from tests import helpers
  from vdit_jax import metrics, trainer
  metrics.measured_peak_flops = lambda: 1e12  # MFU's value does not matter here
  config = helpers.run_config(STEPS, **{
      "distributed.coordinator_address": address, "distributed.num_processes": 2,
      "data.shards": 0,  # one stream per process: the default way of splitting the batch
      "train.progress": True})
  trainer.train(config, workdir)
  assert jax.process_count() == 2 and jax.device_count() == 8


if __name__ == "__main__":
  _worker(*sys.argv[1:])
