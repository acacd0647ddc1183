"""bench/torch_ref.py: the PyTorch model is vdit-jax's model, and the script says how to get
torch where it is missing."""

import argparse
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TARGET = re.compile(r"^target [\w.-]+: [-\d.e+]+ \(goal (<=|>=) [-\d.e+]+\) (PASS|FAIL)$")


@pytest.mark.parametrize("flags", [["--quick"], ["--profile", "full", "--quick"],
                                   ["--one", "torch:full", "--quick"]])
def test_without_torch_exits_2_with_the_install_hint(tmp_path, flags):
  (tmp_path / "torch.py").write_text("raise ImportError('torch hidden by the test')\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  out = subprocess.run([sys.executable, "bench/torch_ref.py", *flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "pip install -r requirements-bench.txt" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def ref():
  pytest.importorskip("torch")
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  import torch_ref  # noqa: F401  (bench/torch_ref.py)

  return torch_ref


def test_rope_split_and_angles_match_vdit(ref):
  import torch_dit

  from vdit_jax import model as model_lib
  from vdit_jax import tokens

  for k in (2, 8, 32, 64, 66, 128):
    assert torch_dit.rope_split(k) == model_lib.rope_split(k)
  grid = (3, 4, 5)
  coords = tokens.grid_coords(grid)
  assert (torch_dit.grid_coords(grid).numpy() == coords).all()
  cos, sin = torch_dit.rope_cos_sin(grid, 64, 10000.0)
  angles = np.asarray(model_lib.rope_angles(coords, 64, 10000.0))
  np.testing.assert_allclose(cos[:, 0].numpy(), np.cos(angles), atol=1e-5)
  np.testing.assert_allclose(sin[:, 0].numpy(), np.sin(angles), atol=1e-5)


def _vdit_weights_into(torch_model, vdit_model):
  """Copies a vdit model's parameters into the torch model of the same config."""
  import torch

  def put(param, value, transpose=False):
    value = np.array(value[...])
    if transpose:
      value = value.reshape(-1, value.shape[-1]).T
    assert param.shape == value.shape, (param.shape, value.shape)
    with torch.no_grad():
      param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

  def linear(t, v):
    put(t.weight, v.kernel, transpose=True)
    put(t.bias, v.bias)

  for name in ("embed", "t_mlp1", "t_mlp2", "final_ada", "final"):
    linear(getattr(torch_model, name), getattr(vdit_model, name))
  put(torch_model.label_embed.weight, vdit_model.label_embed.embedding)
  for t, v in zip(torch_model.blocks, vdit_model.blocks):
    D = v.attn.qkv.shape[0]
    put(t.attn.qkv.weight, np.asarray(v.attn.qkv[...]).reshape(D, -1).T)
    put(t.attn.out.weight, v.attn.out, transpose=True)
    put(t.attn.q_scale, v.attn.q_norm.scale)
    put(t.attn.k_scale, v.attn.k_norm.scale)
    linear(t.fc1, v.mlp.fc1)
    linear(t.fc2, v.mlp.fc2)
    linear(t.ada, v.ada)


@pytest.mark.parametrize("variant", ["full", "alternating"])
def test_torch_model_is_vdits_model(ref, variant):
  """Same parameter count, same forward FLOPs (up to the [B, D] conditioning layers that
  model.forward_flops leaves out), and with vdit's weights the same output."""
  import jax
  import torch
  import torch_dit
  from flax import nnx

  from vdit_jax import model as model_lib

  model, x0, label, grid = ref.torch_setup(variant, quick=True)
  step, config, batch = ref.vdit_setup(variant, quick=True)
  # The structure alone, then random values everywhere (vdit's zero-initialised adaLN and
  # final layers would hide most of the model; eager initialisation takes seconds).
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.build_model(config)))
  rng = np.random.default_rng(3)
  state = jax.tree.map_with_path(  # QK-norm scales about 1, so attention is far from uniform
      lambda path, x: (rng.normal(0.0, 0.05, x.shape) + ("scale" in str(path))).astype(
          np.float32), abstract)
  vdit = nnx.merge(graphdef, state)
  assert torch_dit.count_params(model) == model_lib.count_params(vdit) == 5_006_864

  s = ref.sizes(True)
  D, B = s["width"], s["rows"]
  conditioning = 2 * B * (256 * D + D * D + s["depth"] * D * 6 * D + D * 2 * D)
  assert ref.torch_forward_flops(model, x0, label, grid) == (
      step.p0_forward_flops(config, batch) + conditioning)

  _vdit_weights_into(model, vdit)
  t_BS = np.full(batch["seg_label"].shape, 0.3, np.float32)
  forward = jax.jit(lambda st, *args, layouts: nnx.merge(graphdef, st)(*args, layouts=layouts))
  want = np.asarray(forward(state, batch["tokens"], t_BS, batch["seg_label"],
                            batch["segment_ids"], batch["coords"], layouts=batch.get("layouts")))
  with torch.no_grad():
    got = model(torch.from_numpy(np.array(batch["tokens"])), torch.from_numpy(t_BS[:, 0]),
                torch.from_numpy(np.array(batch["seg_label"])[:, 0]).long(), grid).numpy()
  assert got.shape == (B, math.prod(grid), x0.shape[-1]) and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_torch_timing_process_reports_json(ref):
  out = subprocess.run([sys.executable, "bench/torch_ref.py", "--one", "torch:alternating",
                        "--quick", "--steps", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  import json

  result = json.loads(out.stdout.splitlines()[-1])
  assert result["params"] == 5_006_864 and result["median"] > 0 and result["threads"] >= 1
  assert 0 < result["cores"] <= result["threads"] + 0.5  # CPU time over wall time


def test_compare_prints_the_table_and_both_targets(ref, monkeypatch, capsys):
  """The parent's table and target lines, from stand-in measurements (the real processes take
  a minute: `python bench/torch_ref.py --quick`)."""
  def fake_child(flags):
    fw, variant = flags[1].split(":")
    median = {"vdit": 2.0, "torch": 1.0}[fw] * {"full": 1.0, "alternating": 0.5}[variant]
    return {"params": 5_006_864, "fwd_flops": 3.7e9, "median": median, "times": [median],
            "cores": 1.5, "threads": 2, "version": "x"}, ""

  monkeypatch.setattr(ref, "run_child", fake_child)
  ref.compare(argparse.Namespace(quick=True, processes=2, steps=1))
  lines = capsys.readouterr().out.splitlines()
  targets = [line for line in lines if line.startswith("target ")]
  assert [line.split(":")[0] for line in targets] == [
      "target torch_full3d_vs_pytorch_sdpa", "target torch_alternating_vs_pytorch_alternating"]
  assert all(TARGET.match(line) for line in targets), targets
  assert all(": 2 (goal <= 1) FAIL" in line for line in targets), targets
  assert any(line.startswith("torch full (SDPA)") and line.endswith(" 1.50") for line in lines)
  assert any(line.startswith("CPU: ") for line in lines)
