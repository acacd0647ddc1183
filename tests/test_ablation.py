"""ablate.py's machinery: matched parameter counts, one table and plots from every arm's
training log and final evaluation, and resuming (finished arms are not rerun)."""

import csv
import json
import os

import ml_collections
import pytest

from evals import ablation, registry
from tests import helpers


def _ablation_config(arms: str) -> ml_collections.ConfigDict:
  run = helpers.tiny_config(**{
      "data.heldout": 8, "evals.names": "heldout,temporal", "evals.heldout.videos": 4,
      "evals.heldout.t_values": (0.5,), "evals.temporal.videos": 4, "evals.temporal.steps": 2,
      "evals.temporal.fd": False, "data.frames": (4, 4), "train.steps": 2,
      "train.log_every": 1, "sample.steps": 1, "sample.shapes": "4x8x8"})
  c = ml_collections.ConfigDict({"run": run, "arms": arms, "seeds": 1, "match_params": True})
  c.lock()
  return c


def test_arms_with_more_attention_weights_get_a_narrower_mlp_to_match_full3d():
  c = _ablation_config("full3d,factorized,window")
  full = ablation.param_count(ablation.arm_config(c, "full3d", 0))
  fact = ablation.arm_config(c, "factorized", 0)
  assert fact.model.mlp_ratio < c.run.model.mlp_ratio
  assert abs(ablation.param_count(fact) - full) / full < 0.02
  # same attention weights as full3d: nothing to match
  assert ablation.arm_config(c, "window", 0).model.mlp_ratio == c.run.model.mlp_ratio
  with c.unlocked():
    c.match_params = False
  assert ablation.arm_config(c, "factorized", 0).model.mlp_ratio == c.run.model.mlp_ratio


def test_arms_and_seeds_differ_only_in_what_they_vary():
  c = _ablation_config("full3d,spatial_only")
  a, b = ablation.arm_config(c, "full3d", 0), ablation.arm_config(c, "spatial_only", 1)
  assert (a.model.block, b.model.block) == ("full3d", "spatial_only")
  assert b.seed == a.seed + 1
  a_dict, b_dict = a.to_dict(), b.to_dict()
  for d in (a_dict, b_dict):
    d["model"].pop("block")
    d.pop("seed")
  assert a_dict == b_dict


def test_unknown_arms_fail_before_anything_trains(tmp_path):
  with pytest.raises(ValueError, match="block types"):
    ablation.run(_ablation_config("full3d,fancy"), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_an_ablation_writes_one_table_and_plots_and_resumes(tmp_path):
  workdir = str(tmp_path / "ablate")
  c = _ablation_config("full3d,spatial_only")
  log = []
  rows = ablation.run(c, workdir, log=log.append)
  assert [r["arm"] for r in rows] == ["full3d", "spatial_only", "real videos"]
  for name in ("results.csv", "results.md", "loss_curves.png", "metrics_vs_flops.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["arm"] for r in table] == ["full3d", "spatial_only", "real videos"]
  for r in table[:2]:
    assert int(r["params"]) > 0 and float(r["step_time_s"]) > 0
    assert float(r["gflops_per_step"]) > 0 and float(r["heldout_loss"]) > 0
    assert r["colour_flicker"] != "" and r["colour_flicker_ci"] != ""
  # spatial_only attends within frames only: fewer attention FLOPs than full3d
  assert float(table[1]["gflops_per_step"]) < float(table[0]["gflops_per_step"])
  assert table[2]["colour_flicker"] != "" and table[2]["params"] == ""
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| spatial_only |" in md and "±" in md
  assert sum("training" in line for line in log) == 2

  # Rerun: finished arms are skipped; an arm whose evaluation is missing resumes to it.
  os.remove(registry.result_path(ablation.run_dir(workdir, "spatial_only", 0), 2))
  log.clear()
  again = ablation.run(c, workdir, log=log.append)
  assert "full3d seed 0: finished earlier" in log[0]
  assert "spatial_only seed 0: training" in log[1]
  assert json.dumps(again[0]) == json.dumps(rows[0])  # the same row (NaN included)
  assert again[1]["heldout_loss"] == pytest.approx(rows[1]["heldout_loss"], rel=1e-6)
