"""Scanned layers (model.scan_layers): the same model as the unscanned one, and checkpoints that
move between the two."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from vdit_jax import metrics, schedule, trainer
from vdit_jax import model as model_lib
from vdit_jax import tokens as tok

GRIDS = [(2, 2, 3), (3, 2, 2)]


def test_repeat_period():
  assert schedule.repeat_period("aaaa") == 1
  assert schedule.repeat_period("abab") == 2
  assert schedule.repeat_period("abcabc") == 3
  assert schedule.repeat_period("aab") == 3  # no repeat: one step of the scan runs every block
  layers = schedule.layer_patterns(helpers.tiny_config("alternating", **{"model.depth": 6}).model)
  assert schedule.repeat_period(layers) == 2


def pair(block, **fields):
  """An unscanned and a scanned model of one config, with the same random parameters."""
  fields = {"model.depth": 4, **fields}
  models = [model_lib.build_model(helpers.tiny_config(block, **{**fields,
                                                                "model.scan_layers": scan}))
            for scan in (False, True)]
  (g0, p0), (g1, p1) = (nnx.split(m, nnx.Param) for m in models)
  p0 = helpers.random_params_like(p0, seed=1, scale=0.2)
  return g0, p0, g1, model_lib.convert_layers(p0, p1)


@pytest.mark.parametrize("block,fields", [
    ("full3d", {}),
    ("alternating", {"model.remat": True}),
    ("factorized,window,factorized,window", {"model.caption.mode": "tokens",
                                             "model.caption.length": 3,
                                             "model.caption.every": 2}),
])
def test_scanned_equals_unscanned_forward_and_gradients(block, fields):
  g0, p0, g1, p1 = pair(block, **fields)
  c = helpers.tiny_config(block)
  rng = np.random.default_rng(0)
  items = helpers.videos_for(GRIDS, c.model.patch, 3, rng)
  batch = tok.pack_rows([items], c.data.seq_len, 2, tok.token_dim(c.model.patch, 3))
  x, seg, coords = (jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "coords"))
  cond = jnp.asarray([[1, 2]])
  if "model.caption.mode" in fields:
    from vdit_jax import conditioning
    cond = conditioning.Conditioning(cond, jnp.asarray(rng.integers(1, 9, (1, 2, 3))),
                                     jnp.ones((1, 2, 3), bool))
  t = jnp.asarray([[0.3, 0.7]])

  def loss(graphdef, params):
    out = nnx.merge(graphdef, params)(x, t, cond, seg, coords)
    return jnp.sum(out ** 2), out

  (l0, out0), grad0 = jax.value_and_grad(loss, argnums=1, has_aux=True)(g0, p0)
  (l1, out1), grad1 = jax.value_and_grad(loss, argnums=1, has_aux=True)(g1, p1)
  assert np.abs(np.asarray(out0)).max() > 0.1
  np.testing.assert_allclose(out1, out0, atol=2e-5, rtol=1e-5)
  back = model_lib.convert_layers(grad1, grad0)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grad0)[0], jax.tree.leaves(back)):
    # float summation order differs: a tolerance relative to each gradient's scale
    np.testing.assert_allclose(b, a, atol=1e-5 * float(np.abs(a).max()) + 1e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_params_have_a_layers_axis_and_convert_both_ways():
  g0, p0, g1, p1 = pair("alternating")
  stack = p1["blocks"]["stack"]
  assert len(stack) == 2  # spatial and temporal blocks in turn
  qkv = stack[1]["attn"]["qkv"]
  assert qkv.shape == (2,) + p0["blocks"][0]["attn"]["qkv"].shape
  assert qkv.get_metadata()["out_sharding"][0] == "layers"
  np.testing.assert_array_equal(qkv[...][1], p0["blocks"][3]["attn"]["qkv"][...])  # 3 = 2 * 1 + 1
  back = model_lib.convert_layers(p1, p0)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p0)))
  deeper = nnx.split(model_lib.build_model(helpers.tiny_config("alternating", **{
      "model.depth": 6, "model.scan_layers": True})), nnx.Param)[1]
  with pytest.raises(ValueError, match="the source has no .*\\['blocks'\\]\\[4\\]"):
    model_lib.convert_layers(p0, deeper)


def test_a_run_resumes_across_scanned_and_unscanned(tmp_path, tmp_path_factory, monkeypatch):
  """3 steps unscanned (the shared run's), then 2 more with scanned blocks, equals 5 straight
  unscanned steps (up to float summation order), params, EMA and optimizer state."""
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  straight = helpers.shared_runs(tmp_path_factory)["straight"]
  work = helpers.at_step_3(tmp_path_factory, tmp_path / "switched")
  trainer.train(helpers.run_config(5, **{"model.scan_layers": True}), work)
  got = helpers.restore_state(work, 5)
  want = helpers.restore_state(straight, 5)
  _, abstract = jax.eval_shape(lambda: trainer.init_state(helpers.run_config(5)))
  unscanned = model_lib.convert_layers(got, abstract)
  flat_want = helpers.leaves(want)
  for name, value in helpers.leaves(unscanned).items():
    np.testing.assert_allclose(value, flat_want[name], atol=1e-5, rtol=1e-4, err_msg=name)
