"""Model invariants: packed == alone, padding is inert, attention patterns, zero init."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from vdit_jax import attention as attn_lib
from vdit_jax import backends as backends_lib
from vdit_jax import diffusion
from vdit_jax import model as model_lib
from vdit_jax import schedule
from vdit_jax import tokens as tok

BLOCKS = ("full3d", "factorized")
# Every block type: alternating is spatial_only then temporal_only over tiny's two layers, and
# a per-layer schedule gives one window and one sparse block; causal3d is frame_causal(-1).
ALL_BLOCKS = BLOCKS + ("alternating", "window,sparse", "causal3d")

# Three videos of different grids (12, 6 and 12 tokens) for a tiny model with patch (1, 4, 4).
GRIDS = [(2, 2, 3), (1, 3, 2), (3, 2, 2)]
L_PACKED = 40  # row 0: all three + 10 padding tokens; row 1: videos 2 and 0 + 16 padding
L_ALONE = 12  # one video per row (video 1 has 6 padding tokens)
S = 4  # slots per row; the last is always empty


@functools.cache
def _model(block: str) -> tuple[nnx.GraphDef, nnx.State, int]:
  """The freshly initialised tiny model of a block type: graph, params, token size."""
  model = model_lib.build_model(helpers.tiny_config(block), seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, model.token_size


@functools.cache
def _forward(block: str):
  """One jitted forward per block type, shared by its tests (same shapes: one compile each)."""
  graphdef = _model(block)[0]

  def fwd(params, tokens, t, label, seg, coords):
    return nnx.merge(graphdef, params)(tokens, t, label, seg, coords)
  return jax.jit(fwd)


@functools.cache
def packed_case(block: str):
  """The random model, the three videos, a packed batch of them and a batch of each alone."""
  _, params, P = _model(block)
  params = helpers.random_params_like(params, seed=1, scale=0.1)
  rng = np.random.default_rng(0)
  items = helpers.videos_for(GRIDS, (1, 4, 4), 3, rng)
  t_video = np.array([0.2, 0.55, 0.9], np.float32)
  label_video = np.array([3, 7, 18], np.int32)  # 18 is the null label of tiny (num_classes=18)
  for i, item in enumerate(items):
    item["t"], item["label"] = t_video[i], label_video[i]
  fields = {"t": (np.float32, 0.5), "label": (np.int32, 18)}
  order = [[0, 1, 2], [2, 0]]
  packed = tok.pack_rows([[items[i] for i in row] for row in order], L_PACKED, S, P, fields)
  alone = tok.pack_rows([[item] for item in items], L_ALONE, 1, P, fields)
  return block, params, items, order, packed, alone


def _run(block, params, batch):
  fn = _forward(block)
  return np.asarray(fn(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["seg_t"]),
                       jnp.asarray(batch["seg_label"]), jnp.asarray(batch["segment_ids"]),
                       jnp.asarray(batch["coords"])))


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_packed_equals_alone(block):
  _, params, items, order, packed, alone = packed_case(block)
  out_packed = _run(block, params, packed)
  out_alone = _run(block, params, alone)
  scale = np.abs(out_alone).max()
  assert scale > 0.1  # the random model's output is far from trivial
  for v in range(len(items)):
    ref = out_alone[v][alone["segment_ids"][v] == 1]
    assert ref.shape == items[v]["tokens"].shape
    for b, row in enumerate(order):
      if v not in row:
        continue
      got = out_packed[b][packed["segment_ids"][b] == row.index(v) + 1]
      np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"video {v}, row {b}")
  # the comparison can fail: videos' outputs differ from each other, and a video run with another
  # video's t gives a different output (so conditioning reaches tokens per video)
  assert not np.allclose(out_alone[0][:12], out_alone[2][:12], atol=1e-3)
  other_t = dict(alone, seg_t=alone["seg_t"][::-1].copy())
  assert not np.allclose(_run(block, params, other_t)[0], out_alone[0], atol=1e-3)


def test_fractional_positions_are_per_video():
  """Each token's patch centre as a fraction of its own video's grid; padding sits at 0.5."""
  seg = np.array([[1] * 12 + [2] * 4 + [0] * 2])
  coords = np.concatenate([tok.grid_coords((2, 2, 3)), tok.grid_coords((1, 2, 2)),
                           np.array([[3, 3, 3], [0, 0, 0]])])[None]
  frac = np.asarray(model_lib.fractional_positions(jnp.asarray(coords), jnp.asarray(seg), 3))
  np.testing.assert_allclose(frac[0, 0], [0.25, 0.25, 1 / 6])
  np.testing.assert_allclose(frac[0, 11], [0.75, 0.75, 5 / 6])
  np.testing.assert_allclose(frac[0, 15], [0.5, 0.75, 0.75])  # the same coords, a smaller grid
  np.testing.assert_allclose(frac[0, 16:], 0.5)


def test_position_features_keep_videos_apart():
  """model.frac_pos keeps packed == alone, and its features reach the output (the zero
  projection it is initialised with gives another output)."""
  _, _, items, order, packed, alone = packed_case("full3d")
  config = helpers.tiny_config("full3d", **{"model.frac_pos": 3})
  graphdef, params = nnx.split(model_lib.build_model(config, seed=0), nnx.Param)
  params = helpers.random_params_like(params, seed=1, scale=0.1)
  fwd = jax.jit(lambda p, b: nnx.merge(graphdef, p)(
      *(jnp.asarray(b[k]) for k in ("tokens", "seg_t", "seg_label", "segment_ids", "coords"))))
  out_packed, out_alone = np.asarray(fwd(params, packed)), np.asarray(fwd(params, alone))
  for v in range(len(items)):
    ref = out_alone[v][alone["segment_ids"][v] == 1]
    for b, row in enumerate(order):
      if v in row:
        got = out_packed[b][packed["segment_ids"][b] == row.index(v) + 1]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"video {v}, row {b}")
  no_pos = jax.tree.map(lambda x: x, params)
  no_pos["pos_embed"]["kernel"] = nnx.Param(jnp.zeros_like(params["pos_embed"]["kernel"][...]))
  assert not np.allclose(np.asarray(fwd(no_pos, alone)), out_alone, atol=1e-3)


def test_other_predictions_are_the_same_network_read_as_x0():
  """model.prediction=clean and edm: the same parameters give the velocity of the x0 that
  their output stands for, each token at its own video's t, where the velocity model gives
  the output itself."""
  _, _, _, _, packed, _ = packed_case("full3d")
  outs = {}
  for prediction in ("velocity", "clean", "edm"):
    config = helpers.tiny_config("full3d", **{"model.prediction": prediction,
                                              "model.prediction_sigma_data": 0.7})
    graphdef, params = nnx.split(model_lib.build_model(config, seed=0), nnx.Param)
    params = helpers.random_params_like(params, seed=1, scale=0.1)
    outs[prediction] = np.asarray(nnx.merge(graphdef, params)(
        *(jnp.asarray(packed[k]) for k in ("tokens", "seg_t", "seg_label", "segment_ids",
                                           "coords"))))
  seg = jnp.asarray(packed["segment_ids"])
  t_BL = tok.per_token(jnp.asarray(packed["seg_t"]), seg)
  real = packed["segment_ids"] > 0
  assert len(set(np.round(np.asarray(t_BL)[real], 4))) > 1  # videos at different t
  x_t, out = jnp.asarray(packed["tokens"]), jnp.asarray(outs["velocity"])
  want = {"clean": diffusion.velocity_from_clean(x_t, out, t_BL, 0.05),
          "edm": diffusion.velocity_from_edm(x_t, out, t_BL, 0.7)}
  for prediction, v in want.items():
    np.testing.assert_allclose(outs[prediction][real], np.asarray(v)[real], rtol=1e-4,
                               atol=1e-4, err_msg=prediction)
    assert not np.allclose(outs[prediction][real], outs["velocity"][real], atol=1e-2)


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_padding_does_not_change_real_tokens(block):
  _, params, _, _, packed, _ = packed_case(block)
  out = _run(block, params, packed)
  pad = packed["segment_ids"] == 0
  rng = np.random.default_rng(1)
  noisy = dict(packed)
  noisy["tokens"] = packed["tokens"].copy()
  noisy["tokens"][pad] = 100.0 * rng.standard_normal(noisy["tokens"][pad].shape)
  noisy["coords"] = packed["coords"].copy()
  noisy["coords"][pad] = rng.integers(0, 4, size=noisy["coords"][pad].shape)
  # the empty slot's conditioning must not matter either
  noisy["seg_t"] = packed["seg_t"].copy()
  noisy["seg_t"][:, -1] = 0.01
  noisy["seg_label"] = packed["seg_label"].copy()
  noisy["seg_label"][:, -1] = 1
  out_noisy = _run(block, params, noisy)
  np.testing.assert_allclose(out_noisy[~pad], out[~pad], atol=1e-6, rtol=0)
  assert not np.allclose(out_noisy[pad], out[pad])  # padding itself did see the change


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_gradients_stay_inside_each_video(block):
  """A loss on one video's outputs has zero gradient w.r.t. padding and the other videos."""
  _, params, _, _, packed, _ = packed_case(block)
  seg = jnp.asarray(packed["segment_ids"])
  w = jnp.asarray(np.random.default_rng(2).standard_normal(packed["tokens"].shape), jnp.float32)
  graphdef = _model(block)[0]

  @functools.partial(jax.jit, static_argnums=0)
  def grads(video_slot, params, tokens, t):
    def loss(tokens, t):
      out = nnx.merge(graphdef, params)(tokens, t, jnp.asarray(packed["seg_label"]), seg,
                                        jnp.asarray(packed["coords"]))
      return jnp.sum(jnp.where((seg == video_slot)[..., None], out * w, 0.0))
    return jax.grad(loss, argnums=(0, 1))(tokens, t)

  tokens, t = jnp.asarray(packed["tokens"]), jnp.asarray(packed["seg_t"])
  g_tok, g_t = (np.asarray(g) for g in grads(1, params, tokens, t))
  own = packed["segment_ids"] == 1
  assert np.abs(g_tok[own]).max() > 1e-3
  assert np.all(g_tok[~own] == 0)  # padding and every other video
  assert np.all(g_t[:, 1:] == 0) and np.all(g_t[:, 0] != 0)  # only slot 1's t matters


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_fresh_model_outputs_exact_zeros(block):
  _, params, _ = _model(block)
  packed = packed_case(block)[4]
  out = _run(block, params, packed)
  assert out.shape == packed["tokens"].shape
  assert np.all(out == 0.0)
  # ... because of the zero-initialised final layers only: the rest is a real random init
  hidden = [np.abs(np.asarray(p)).max() for path, p in jax.tree.leaves_with_path(params)
            if "final" not in jax.tree_util.keystr(path)]
  assert max(hidden) > 0.1


def test_block_types_share_parameter_names():
  names = {}
  for block in BLOCKS:
    params = _model(block)[1]
    names[block] = {jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(params)}
  extra = names["factorized"] - names["full3d"]
  assert names["full3d"] <= names["factorized"]
  assert extra and all("attn_t" in n for n in extra)
  for block in ALL_BLOCKS[len(BLOCKS):]:  # one-sublayer blocks: exactly full3d's parameters
    params = _model(block)[1]
    assert {jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(params)} == names[
        "full3d"], block


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_flop_counter_counts_the_masks_pairs(block):
  """Attention FLOPs are 4 K per allowed pair, head and layer, pairs counted on the masks."""
  m = helpers.tiny_config(block).model
  packed = packed_case(block)[4]
  seg, coords = packed["segment_ids"], packed["coords"]
  real = seg > 0
  pairs = 0
  for layer in schedule.layer_patterns(m):
    for sub in layer:
      for p in (sub if isinstance(sub, tuple) else (sub,) * m.num_heads):
        mask = p.allowed(seg[:, :, None], coords[:, :, None], seg[:, None], coords[:, None])
        pairs += int(mask[real].sum())
  P = _model(block)[2]
  attn = sum(model_lib.forward_flops(m, packed["seg_grid"][b], L_PACKED, P)
             - model_lib.forward_flops(m, [], L_PACKED, P) for b in range(len(seg)))
  assert attn == 4 * m.head_dim * pairs > 0


def test_layer_schedule():
  as_str = lambda x: tuple(map(as_str, x)) if isinstance(x, tuple) else str(x)
  patterns = lambda block, **kw: as_str(schedule.layer_patterns(
      helpers.tiny_config(block, **{"model.depth": 4, "model.num_heads": 4, **kw}).model))
  assert patterns("alternating") == (("spatial",), ("temporal",)) * 2
  assert patterns("full3d,window,factorized,sparse") == (
      ("full",), ("window(1,1,1)",), ("spatial", "temporal"),
      (("local(1,1)",) * 2 + ("cross(1,2)",) * 2,))
  assert patterns("sparse", **{"model.sparse_heads": "global,local,local,cross"})[0][0] == (
      "full", "local(1,1)", "local(1,1)", "cross(1,2)")
  assert as_str(schedule.config_patterns(helpers.tiny_config("window,sparse").model)) == (
      "window(1,1,1)", "local(1,1)", "cross(1,2)")
  assert patterns("causal3d", **{"model.causal_frames": 2})[0] == ("frame_causal(2)",)
  for block, kw, match in [
      ("full3d,window", {}, "lists 2 block types but model.depth=4"),
      ("full3d,alternating,window,sparse", {}, "unknown block types"),
      ("diagonal", {}, "unknown block types"),
      ("sparse", {"model.sparse_heads": "local,cross,global"}, "divides model.num_heads=4"),
      ("sparse", {"model.sparse_heads": "local,ring"}, "must be a comma list"),
      ("sparse", {"model.sparse_window": (1, 2)}, "must be three integers"),
      ("window", {"model.window": (1, -1, 1)}, "must be three integers"),
      ("causal3d", {"model.causal_frames": -2}, "model.causal_frames=-2"),
  ]:
    with pytest.raises(ValueError, match=match):
      patterns(block, **kw)


# ----------------------------------------------------------------------------- attention


def brute_force_mask(pattern, seg, coords):
  """The predicate table of vdit_jax/attention.py, one (query, key) pair at a time."""
  L = len(seg)
  mask = np.zeros((L, L), bool)
  for l, m in itertools.product(range(L), range(L)):
    (tl, hl, wl), (tm, hm, wm) = coords[l], coords[m]
    same_video = seg[l] == seg[m]
    mask[l, m] = same_video and {"full": True, "spatial": tl == tm,
                                 "temporal": (hl, wl) == (hm, wm)}[pattern]
  return mask


@pytest.mark.parametrize("pattern", ("full", "spatial", "temporal"))
def test_pattern_mask_matches_the_predicate_table(pattern):
  rng = np.random.default_rng(4)
  items = helpers.videos_for([(2, 2, 3), (3, 1, 2)], (1, 1, 1), 1, rng)
  batch = tok.pack_rows([items, items[::-1]], 24, 3, 1)
  coords = batch["coords"].copy()
  pad = batch["segment_ids"] == 0
  coords[pad] = rng.integers(0, 3, size=coords[pad].shape)  # padding coords may be anything
  got = np.asarray(attn_lib.pattern_mask(pattern, jnp.asarray(batch["segment_ids"]),
                                         jnp.asarray(coords)))
  for b in range(2):
    want = brute_force_mask(pattern, batch["segment_ids"][b], coords[b])
    assert np.array_equal(got[b], want)
    assert np.all(got[b].any(axis=-1))  # no empty softmax row, padding included
    real = ~pad[b]
    assert not got[b][np.ix_(real, pad[b])].any()  # no real token sees padding


def test_unknown_pattern_raises():
  with pytest.raises(ValueError, match="unknown attention pattern"):
    attn_lib.pattern_mask("diagonal", jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4, 3), jnp.int32))


def softmax_attention_np(q_NHK, k_NHK, v_NHK):
  logits = np.einsum("lhk,mhk->hlm", q_NHK, k_NHK) / np.sqrt(q_NHK.shape[-1])
  logits -= logits.max(axis=-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=-1, keepdims=True)
  return np.einsum("hlm,mhk->lhk", p, v_NHK)


def test_factorized_masks_equal_attention_by_reshape():
  """spatial == attention within each frame, temporal == attention along each (h, w) track."""
  gt, gh, gw, H, K = 3, 2, 4, 2, 8
  N = gt * gh * gw
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal((1, N, H, K)).astype(np.float32) for _ in range(3))
  seg = jnp.ones((1, N), jnp.int32)
  coords = jnp.asarray(tok.grid_coords((gt, gh, gw)))[None]

  def dense(pattern):
    mask = attn_lib.pattern_mask(pattern, seg, coords)
    return np.asarray(attn_lib.dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                               mask))[0]

  # t-major order: [T', H'W'] groups are frames
  frames = lambda x: x[0].reshape(gt, gh * gw, H, K)
  want_s = np.stack([softmax_attention_np(*(frames(x)[i] for x in (q, k, v)))
                     for i in range(gt)]).reshape(N, H, K)
  np.testing.assert_allclose(dense("spatial"), want_s, atol=1e-5)
  # the transpose [H'W', T'] groups are the per-position tracks through time
  tracks = lambda x: frames(x).transpose(1, 0, 2, 3)
  want_t = np.stack([softmax_attention_np(*(tracks(x)[j] for x in (q, k, v)))
                     for j in range(gh * gw)]).transpose(1, 0, 2, 3).reshape(N, H, K)
  np.testing.assert_allclose(dense("temporal"), want_t, atol=1e-5)
  np.testing.assert_allclose(dense("full"), softmax_attention_np(q[0], k[0], v[0]), atol=1e-5)
  assert not np.allclose(want_s, want_t, atol=1e-3)  # the patterns really differ


@pytest.mark.parametrize("block,backend", [(b, "blocksparse") for b in BLOCKS]
                         + [("window,sparse", "blocksparse"), ("causal3d", "blocksparse"),
                            ("full3d", "auto"),
                            ("full3d", "pallas"), ("factorized,window", "pallas")])
def test_blocksparse_model_equals_dense(block, backend, monkeypatch):
  """The whole model, on a packed batch with padding: blocksparse (also as ``auto`` picks it on
  CPU) and pallas (its GPU kernel in interpret mode) == dense for real tokens, in outputs and in
  parameter gradients, with the static (training) layout bound."""
  from vdit_jax import kernels
  from vdit_jax import layout as layout_lib

  monkeypatch.setattr(backends_lib, "platform_kernel", lambda platform: ("triton", True))

  _, params, items, order, packed, _ = packed_case(block)
  graphdef_dense = _model(block)[0]
  config = helpers.tiny_config(block)
  config.unlock()
  config.model.attention_backend = backend
  graphdef_bs = nnx.split(model_lib.build_model(config, seed=0), nnx.Param)[0]
  layouts = layout_lib.batch_layouts(schedule.config_patterns(config.model),
                                     packed["segment_ids"], packed["coords"], GRIDS)
  if backend == "pallas":  # full3d's lists hold every block (the kernel's whole rows); the
    # factorized and window layers' lists lie in between (blocksparse's spans)
    runs = [kernels.runs_kernel(p, lay, L_PACKED) for p, lay in layouts.items()]
    assert runs == [block == "full3d"] * len(layouts)
  args = [jnp.asarray(packed[k]) for k in ("tokens", "seg_t", "seg_label", "segment_ids",
                                            "coords")]
  real = jnp.asarray(packed["segment_ids"] > 0)[..., None]
  target = jnp.asarray(np.random.default_rng(3).normal(size=packed["tokens"].shape), jnp.float32)

  def grad_fn(graphdef):
    def loss(p, lay):
      out = nnx.merge(graphdef, p)(*args, layouts=lay)
      return jnp.sum(jnp.where(real, (out - target) ** 2, 0.0)), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (l_d, out_d), g_d = grad_fn(graphdef_dense)(params, None)
  (l_b, out_b), g_b = grad_fn(graphdef_bs)(params, layouts)
  mask = packed["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(out_b)[mask], np.asarray(out_d)[mask], atol=2e-5)
  np.testing.assert_allclose(float(l_b), float(l_d), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_d))


@pytest.mark.parametrize("spec,x_shape,w_shape", [("blhk,hkd->bld", (2, 6, 3, 4), (3, 4, 5)),
                                                   ("blp,pd->bld", (2, 6, 7), (7, 5))])
def test_project_equals_einsum_with_gradients(spec, x_shape, w_shape):
  """The written-out backward of ``model.project`` (weight gradient with the activations on the
  left) is the einsum's own, in value and both gradients."""
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  t = jax.random.normal(kt, jnp.einsum(spec, x, w).shape)
  mine = jax.value_and_grad(lambda x, w: jnp.sum(model_lib.project(spec, x, w) * t), (0, 1))
  ref = jax.value_and_grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * t), (0, 1))
  (v1, g1), (v2, g2) = mine(x, w), ref(x, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_label_embedding_is_not_swamped_by_the_timestep():
  """The label steers every modulation through ``c = t_emb + label_emb``; if the label table
  starts far smaller than the timestep embedding, short runs learn to ignore the label (seen:
  a 0.02-scale table left sampled colours independent of the requested class)."""
  config = helpers.tiny_config("full3d")
  model = model_lib.build_model(config, seed=0)
  t = jnp.linspace(0.02, 0.98, 16)[None]
  t_emb = model.t_mlp2(jax.nn.silu(model.t_mlp1(model_lib.timestep_embedding(
      t, model.t_freq_dim))))
  labels = jnp.arange(config.model.num_classes + 1)[None]
  label_emb = model.label_embed(labels)
  ratio = float(jnp.linalg.norm(label_emb, axis=-1).mean() / jnp.linalg.norm(t_emb, axis=-1).mean())
  assert 0.3 < ratio < 10, ratio


def test_factored_labels_share_each_digits_embedding():
  """With model.label_factors (3, 6) a label is shape * 6 + colour and its embedding the sum of
  a shape row and a colour row: swapping colours between two labels keeps their sum, labels
  differ only where a digit does, and the null label keeps a row of its own."""
  model = model_lib.build_model(helpers.tiny_config("full3d", **{"model.label_factors": (3, 6)}),
                                seed=0)
  assert model.label_embed.num_embeddings == 3 + 6 + 1
  e = lambda shape, colour: model.embed_label(jnp.array([[shape * 6 + colour]]))[0, 0]
  np.testing.assert_allclose(e(0, 1) + e(2, 4), e(0, 4) + e(2, 1), atol=1e-5)
  np.testing.assert_allclose(e(1, 5) - e(1, 2), e(0, 5) - e(0, 2), atol=1e-5)
  assert not np.allclose(e(0, 1), e(1, 1)) and not np.allclose(e(0, 1), e(0, 2))
  null = model.embed_label(jnp.array([[18]]))[0, 0]
  np.testing.assert_array_equal(null, model.label_embed.embedding[...][-1])
  # unit scale per label, as the one-row-per-label table: not swamped by the timestep
  norms = jnp.linalg.norm(model.embed_label(jnp.arange(18)[None]), axis=-1)
  assert 0.5 < float(norms.mean()) / np.sqrt(model.cfg.width) < 1.5


@pytest.mark.parametrize("block", BLOCKS)
def test_remat_changes_memory_not_values(block):
  """model.remat recomputes each block in the backward pass: same loss and gradients, and the
  forward pass keeps fewer bytes for the backward (least with ``nothing_saveable``)."""
  _, params, items, order, packed, _ = packed_case(block)
  args = [jnp.asarray(packed[k]) for k in ("tokens", "seg_t", "seg_label", "segment_ids",
                                            "coords")]
  grads, kept = {}, {}
  for remat, policy in ((False, "nothing_saveable"), (True, "nothing_saveable"),
                        (True, "dots_with_no_batch_dims_saveable")):
    config = helpers.tiny_config(block, **{"model.remat": remat, "model.remat_policy": policy})
    graphdef = nnx.split(model_lib.build_model(config, seed=0), nnx.Param)[0]
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(*args) ** 2)
    grads[remat, policy] = jax.jit(jax.grad(loss))(params)
    kept[remat, policy] = model_lib.residual_bytes(loss, params)
    # the switch really inserts rematerialisation into the backward pass
    assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == remat
  assert (kept[True, "nothing_saveable"] < kept[True, "dots_with_no_batch_dims_saveable"]
          < kept[False, "nothing_saveable"]), kept
  # Recomputation fuses differently, so f32 sums may round differently (seen: 1.4e-6 on 0.03).
  for key in ((True, "nothing_saveable"), (True, "dots_with_no_batch_dims_saveable")):
    for a, b in zip(jax.tree.leaves(grads[key]), jax.tree.leaves(grads[False, "nothing_saveable"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  """model.dtype=bfloat16 computes in bf16 with f32 params and f32 output, close to f32."""
  block = "full3d"
  _, params, items, order, packed, _ = packed_case(block)
  args = [jnp.asarray(packed[k]) for k in ("tokens", "seg_t", "seg_label", "segment_ids",
                                            "coords")]
  config = helpers.tiny_config(block, **{"model.dtype": "bfloat16"})
  model = model_lib.build_model(config, seed=0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  graphdef = nnx.split(model, nnx.Param)[0]
  out16 = jax.jit(lambda p: nnx.merge(graphdef, p)(*args))(params)
  out32 = _run(block, params, packed)
  real = packed["segment_ids"] > 0
  assert out16.dtype == jnp.float32
  err = np.abs(np.asarray(out16)[real] - out32[real]).max()
  scale = np.abs(out32[real]).max()
  assert 0 < err < 0.05 * scale, (err, scale)  # bf16 really ran, and stayed close


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_every_parameter_names_its_logical_axes(block):
  """Sharding is config-only because every parameter names one logical axis per dim; a new
  parameter created without names would silently be replicated everywhere, so it fails here."""
  from vdit_jax import sharding as shard_lib

  config = helpers.tiny_config(block)
  model = model_lib.build_model(config, seed=0)
  params = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  assert len(flat) > 10
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    where = jax.tree_util.keystr(path)
    assert names is not None, f"{where} has no logical axis names"
    assert len(names) == var[...].ndim, f"{where}: names {names} for shape {var[...].shape}"
    shard_lib.logical_to_spec(names, config.mesh.rules)  # every name has a rule


def test_qkv_split_backward_equals_autodiff():
  """The fused projection's split has a written-out backward; it must equal slicing's."""
  qkv = jax.random.normal(jax.random.key(0), (2, 5, 3, 2, 4))
  w = jax.random.normal(jax.random.key(1), (3, 2, 5, 2, 4))

  def loss(split, x):
    return sum(jnp.sum(part * w[i] ** (i + 1)) for i, part in enumerate(split(x)))

  sliced = lambda x: (x[:, :, 0], x[:, :, 1], x[:, :, 2])
  np.testing.assert_array_equal(jax.grad(functools.partial(loss, model_lib._split_qkv))(qkv),
                                jax.grad(functools.partial(loss, sliced))(qkv))
