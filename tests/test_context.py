"""Context parallelism (mesh.context): rows split along their tokens, attention on whole rows
with the heads split instead; equal to one device, on packed rows whose videos cross shards."""

import jax
import numpy as np
import pytest

from data import pipeline
from tests import helpers
from vdit_jax import metrics, trainer
from vdit_jax import sharding as shard_lib

MESHES = {  # (data, fsdp, context, tensor)
    "context2": (1, 1, 2, 1),
    "context8": (1, 1, 8, 1),
    "data2_context4": (2, 1, 4, 1),
    "fsdp2_context2_tensor2": (1, 2, 2, 2),
}


def config(block, backend, sizes):
  # 8 heads: whole rows of some heads on each of up to 8 devices; two rows per batch.
  return helpers.tiny_config(block, **{
      "model.num_heads": 8, "model.head_dim": 8, "model.attention_backend": backend,
      "data.batch_rows": 2, **dict(zip(("mesh.data", "mesh.fsdp", "mesh.context", "mesh.tensor"),
                                       sizes))})


def three_steps(c):
  """Params and the three losses of three train steps on the first ``prod(mesh)`` devices."""
  mesh = shard_lib.make_mesh(c.mesh, jax.devices()[:int(np.prod([c.mesh[a] for a in
                                                                  shard_lib.MESH_AXES]))])
  with jax.set_mesh(mesh), shard_lib.axis_rules(c.mesh.rules):
    graphdef, state, shardings = trainer.create_sharded_state(c, mesh)
    step = trainer.jit_train_step(c, graphdef, shardings, mesh)
    b_shardings = trainer.batch_shardings(c, mesh)
    losses = []
    for i in range(3):
      batch = pipeline.make_batch(c, i)
      state, m = step(state, trainer._device_batch(batch, b_shardings))
      losses.append(float(m["loss"]))
    return jax.device_get(state["params"]), losses, batch


@pytest.mark.parametrize("block,backend,mesh", [
    ("full3d", "dense", "context2"),
    ("full3d", "dense", "context8"),
    ("factorized", "blocksparse", "data2_context4"),
    ("window", "blocksparse", "fsdp2_context2_tensor2"),
])
def test_three_steps_equal_one_device(block, backend, mesh):
  want_params, want_losses, batch = three_steps(config(block, backend, (1, 1, 1, 1)))
  got_params, got_losses, _ = three_steps(config(block, backend, MESHES[mesh]))
  # Videos cross the shard boundaries: some segment spans two context shards of a row.
  shard = batch["segment_ids"].shape[1] // MESHES[mesh][2]
  seg = batch["segment_ids"]
  crossing = (seg[:, shard - 1::shard][:, :-1] == seg[:, shard::shard]) & (seg[:, shard::shard] > 0)
  assert crossing.any()
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(want_params)[0],
                               jax.tree.leaves(got_params)):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_activations_are_split_along_tokens():
  """Under mesh.context=8 a block's output holds an eighth of each row's tokens per device."""
  c = config("full3d", "dense", (1, 1, 8, 1))
  mesh = shard_lib.make_mesh(c.mesh)
  spec = shard_lib.logical_to_spec(("batch", "length", "embed"), c.mesh.rules)
  rows = ("data", "fsdp")
  assert spec == jax.sharding.PartitionSpec(rows, "context", None)
  qkv = shard_lib.logical_to_spec(shard_lib.ATTENTION_QKV, c.mesh.rules)
  assert qkv == jax.sharding.PartitionSpec(rows, None, ("tensor", "context"), None)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  assert sharding.shard_shape((2, 64, 32)) == (2, 8, 32)


def test_heads_must_split_over_tensor_times_context():
  c = config("full3d", "dense", (1, 1, 8, 1))
  c.model.num_heads, c.model.head_dim = 4, 16
  with pytest.raises(ValueError, match="num_heads=4 cannot be split over mesh.tensor x "
                                       "mesh.context = 1 x 8"):
    trainer.validate(c)


def test_a_checkpoint_restores_onto_another_context_size(tmp_path, tmp_path_factory,
                                                          monkeypatch):
  """The shared run's step-3 checkpoint (data 2, fsdp 2, tensor 2: context 1), continued for 2
  steps with context 4, equals 5 straight steps (float tolerance: another summation order)."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  straight = helpers.shared_runs(tmp_path_factory)["straight"]
  work = helpers.at_step_3(tmp_path_factory, tmp_path / "context")
  trainer.train(helpers.run_config(5, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.context": 4,
                                         "mesh.tensor": 2}), work)
  got, want = helpers.leaves(helpers.restore_state(work, 5)), helpers.leaves(
      helpers.restore_state(straight, 5))
  assert got.keys() == want.keys()
  for name in got:
    np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-4, err_msg=name)
