"""Conditioning: captions by cross-attention, given frames (image-to-video), guidance, sampling."""

import functools
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import captions as captions_lib
from data import pipeline
from tests import helpers
from vdit_jax import conditioning as cond_lib
from vdit_jax import config as config_lib
from vdit_jax import diffusion, metrics, model as model_lib, sampler, text, trainer
from vdit_jax import tokens as tok

GRIDS = [(2, 2, 3), (3, 2, 2), (1, 3, 3)]
C = 5  # caption tokens per video


def caption_config(backend="dense", mode="tokens", **fields):
  return helpers.tiny_config(**{"model.caption.mode": mode, "model.caption.length": C,
                                "model.caption.embed_dim": 6 if mode == "embeddings" else 0,
                                "model.caption.pooled": True,
                                "model.caption.encoder_depth": 1,  # the layers' masks too
                                "model.attention_backend": backend, **fields})


def case(backend="dense", mode="tokens", seed=0):
  """A random captioned model (every parameter non-zero) and one row of three videos."""
  c = caption_config(backend, mode)
  model = model_lib.build_model(c)
  graphdef, params = nnx.split(model, nnx.Param)
  params = helpers.random_params_like(params, seed=1, scale=0.2)
  rng = np.random.default_rng(seed)
  items = helpers.videos_for(GRIDS, c.model.patch, 3, rng)
  S = c.data.max_segments
  batch = tok.pack_rows([items], c.data.seq_len, S, tok.token_dim(c.model.patch, 3))
  if mode == "tokens":
    caption = rng.integers(1, 20, (1, S, C)).astype(np.int32)
  else:
    caption = rng.standard_normal((1, S, C, 6)).astype(np.float32)
  mask = np.zeros((1, S, C), bool)
  mask[0, 0, :3] = mask[0, 1, :5] = mask[0, 2, :1] = True
  cond = cond_lib.Conditioning(label=jnp.asarray([[1, 2, 3, 18]]), caption=jnp.asarray(caption),
                               caption_mask=jnp.asarray(mask))
  t = jnp.asarray([[0.3, 0.6, 0.8, 0.5]], jnp.float32)
  grids = [tuple(g) for g in batch["seg_grid"][0]]
  layouts = model.backend.prepare(batch["segment_ids"], batch["coords"],
                                  [g for g in grids if g[0]], exact=True)
  return c, graphdef, params, batch, cond, t, layouts


def forward(graphdef, params, batch, cond, t, layouts):
  return nnx.merge(graphdef, params)(jnp.asarray(batch["tokens"]), t, cond,
                                     jnp.asarray(batch["segment_ids"]),
                                     jnp.asarray(batch["coords"]), layouts=layouts)


@pytest.mark.parametrize("backend", ["dense", "blocksparse"])
def test_another_videos_caption_changes_nothing_in_this_video(backend):
  c, graphdef, params, batch, cond, t, layouts = case(backend)
  out = np.asarray(forward(graphdef, params, batch, cond, t, layouts))
  seg = batch["segment_ids"][0]
  other = cond.caption.at[0, 1].set((cond.caption[0, 1] + 3) % 20 + 1)
  other_cond = cond_lib.Conditioning(cond.label, other, cond.caption_mask)
  out2 = np.asarray(forward(graphdef, params, batch, other_cond, t, layouts))
  np.testing.assert_array_equal(out2[0][seg != 2], out[0][seg != 2])
  assert np.abs(out2[0][seg == 2] - out[0][seg == 2]).max() > 1e-3  # video 2 reads its caption
  # Padding words of a caption are not read either.
  padded = cond.caption.at[0, 0, 3:].set(7)
  out3 = np.asarray(forward(graphdef, params, batch,
                            cond_lib.Conditioning(cond.label, padded, cond.caption_mask), t,
                            layouts))
  np.testing.assert_allclose(out3, out, atol=1e-6, rtol=0)


def test_caption_gradients_stay_inside_their_video():
  """A loss on video 1's outputs has zero gradient w.r.t. the other videos' caption embeddings
  and its own caption's padding rows, and a non-zero one w.r.t. its own caption."""
  c, graphdef, params, batch, cond, t, layouts = case(mode="embeddings")
  seg = jnp.asarray(batch["segment_ids"])

  def loss(caption):
    out = forward(graphdef, params, batch, cond_lib.Conditioning(
        cond.label, caption, cond.caption_mask), t, layouts)
    return jnp.sum(jnp.where((seg == 1)[..., None], out, 0.0) ** 2)

  g = np.asarray(jax.grad(loss)(cond.caption))
  assert np.abs(g[0, 0, :3]).max() > 1e-4
  assert np.all(g[0, 1:] == 0) and np.all(g[0, 0, 3:] == 0)


def test_guidance_scale_one_is_the_conditional_prediction_and_others_mix_both():
  c, graphdef, params, batch, cond, t, _ = case()
  model = nnx.merge(graphdef, params)
  seg, coords = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["coords"])
  x = jnp.asarray(batch["tokens"])
  v_c = model(x, t, cond, seg, coords)
  v_u = model(x, t, cond.null(c.model.num_classes), seg, coords)
  np.testing.assert_array_equal(diffusion.guided(model, cond, seg, coords, 18, 1.0)(x, t), v_c)
  v = diffusion.guided(model, cond, seg, coords, 18, 2.5)(x, t)
  np.testing.assert_allclose(v, v_u + 2.5 * (v_c - v_u), atol=2e-5)
  assert np.abs(np.asarray(v_c - v_u)).max() > 1e-3  # the null caption and label differ
  # A scale each: the label's from the label-only pass, the caption's on top of it.
  null = cond.null(c.model.num_classes)
  v_l = model(x, t, cond_lib.Conditioning(cond.label, null.caption, null.caption_mask), seg,
              coords)
  v2 = diffusion.guided(model, cond, seg, coords, 18, 2.0, caption_scale=4.0)(x, t)
  np.testing.assert_allclose(v2, v_u + 2.0 * (v_l - v_u) + 4.0 * (v_c - v_l), atol=5e-5)
  assert np.abs(np.asarray(v_c - v_l)).max() > 1e-3 and np.abs(np.asarray(v_l - v_u)).max() > 1e-3
  same = diffusion.guided(model, cond, seg, coords, 18, 2.5, caption_scale=2.5)(x, t)
  np.testing.assert_array_equal(same, v)
  with pytest.raises(ValueError, match="caption guidance scale needs a run with captions"):
    diffusion.guided(model, cond.label, seg, coords, 18, 2.0, caption_scale=3.0)


def test_given_frames_carry_no_loss_and_stay_clean():
  """Noise on given tokens changes neither the loss nor the model's input there."""
  c = helpers.tiny_config(**{"data.cond_frames_prob": 1.0, "data.cond_frames": 2})
  batch = pipeline.BatchMaker(c)(0)
  assert np.all(batch["seg_frames"][batch["seg_grid"][..., 0] > 1] >= 1)
  graphdef, state = trainer.init_state(c)
  params = helpers.random_params_like(state["params"], seed=3)
  b = {k: jnp.asarray(v) for k, v in batch.items() if k in trainer.batch_keys(c)}
  t_BS, eps = trainer.noise_batch(jax.random.key(0), b, c)
  given = np.asarray(cond_lib.given_tokens(cond_lib.from_batch(b), b["segment_ids"],
                                           b["coords"]))
  assert given.sum() > 0 and (~given & (batch["segment_ids"] > 0)).sum() > 0
  terms = functools.partial(trainer.loss_terms, params, graphdef, b, t_BS, config=c)
  total, count = terms(eps=eps)
  total2, count2 = terms(eps=jnp.where(given[..., None], 100.0, eps))
  assert float(total2) == float(total) and float(count2) == float(count)
  total3, _ = terms(eps=jnp.where(given[..., None], eps, eps + 1.0))
  assert abs(float(total3) - float(total)) > 1e-3  # the others' noise does count


def test_frames_draws_stay_below_each_videos_length():
  c = helpers.tiny_config(**{"data.cond_frames_prob": 0.5, "data.cond_frames": 3,
                             "data.frames": (2, 4)})
  maker = pipeline.BatchMaker(c)
  seen = []
  for step in range(20):
    rows, draws = maker.plan(step)
    for row, row_draws in zip(rows, draws):
      for index, d in zip(row, row_draws):
        frames = tok.grid_shape(maker.source.video_size(index), c.model.patch)[0]
        assert 0 <= d.frames <= min(3, frames - 1)
        seen.append(d.frames)
  assert 0.3 < np.mean(np.array(seen) > 0) < 0.7 and max(seen) >= 2


def test_batches_carry_each_videos_own_caption_and_drop_some():
  c = caption_config(**{"data.caption_dropout": 0.3, "model.caption.length": 12})
  maker = pipeline.BatchMaker(c)
  tokenizer = maker.captions.tokenizer
  dropped = kept = 0
  for step in range(12):
    rows, draws = maker.plan(step)
    batch = maker(step)
    for b, (row, row_draws) in enumerate(zip(rows, draws)):
      for s, (index, d) in enumerate(zip(row, row_draws)):
        ids, mask = batch["seg_caption"][b, s], batch["seg_caption_mask"][b, s]
        if d.drop_caption:
          assert not mask.any()
          dropped += 1
        else:
          assert tokenizer.decode(ids[mask]) == maker.source[index]["caption"]
          kept += 1
  assert dropped > 5 and kept > dropped


def test_tokenizer_errors_name_the_word_and_the_fix(tmp_path):
  t = text.Tokenizer.from_captions(["a red circle moving up-left", "A blue square."])
  assert t.decode(t.encode("a Red square, moving up-left", 6)[0]) == "a red square moving up-left"
  with pytest.raises(ValueError, match="'purple'.*vocabulary is: a, blue"):
    t.encode("a purple circle", 6)
  with pytest.raises(ValueError, match="model.caption.length=2: .* raise .* to 3"):
    t.encode("a red circle", 2)
  t.save(str(tmp_path))
  assert text.Tokenizer.load(str(tmp_path)) == t
  assert len({text.Tokenizer.load(str(tmp_path)), t}) == 1  # hashable, as its vocabulary
  text.check_or_save(t, str(tmp_path), True)  # the same vocabulary resumes
  with pytest.raises(ValueError, match="another vocabulary.*new words \\['green'\\]"):
    text.check_or_save(text.Tokenizer(list(t.words) + ["green"]), str(tmp_path), True)
  with pytest.raises(ValueError, match="model.caption.vocab >= 21"):
    captions_lib.Captions(caption_config(**{"model.caption.vocab": 8,
                                            "model.caption.length": 16}),
                          pipeline.make_source(helpers.tiny_config()))
  with pytest.raises(ValueError, match="up to 5 words.*set model.caption.length >= 5"):
    captions_lib.Captions(caption_config(**{"model.caption.length": 4}),
                          pipeline.make_source(helpers.tiny_config()))


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A few steps of a captioned run that also trains given first frames."""
  workdir = str(tmp_path_factory.mktemp("captioned"))
  c = caption_config(**{"model.caption.length": 12, "data.cond_frames_prob": 0.5,
                        "train.steps": 3, "sample.steps": 1, "data.batch_rows": 8})
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(metrics, "measured_peak_flops", lambda: 1e12)
    trainer.train(c, workdir)
  return workdir


def test_sampling_is_deterministic_returns_given_frames_and_takes_unseen_shapes(run):
  model, config, _ = sampler.load_model(run)
  tokenizer = text.Tokenizer.load(run)
  # 6x20x12 tokens: longer and taller than any training video (at most 4 frames, side 12).
  shapes = [(3, 8, 8), (6, 20, 12)]
  init = np.random.default_rng(0).uniform(-1, 1, (2, 20, 12, 3)).astype(np.float32)
  go = functools.partial(sampler.sample, model, config, shapes, [0, 5], num_steps=2,
                         captions=["a red circle moving left", "a blue square moving up"],
                         tokenizer=tokenizer, init_videos=[None, init])
  a, b, other = go(seed=1), go(seed=1), go(seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(a[0], other[0])
  assert [v.shape for v in a] == [(3, 8, 8, 3), (6, 20, 12, 3)]
  assert all(np.isfinite(v).all() for v in a)
  np.testing.assert_array_equal(a[1][:2], init)  # the given frames come back unchanged
  assert not np.allclose(a[1][2:], init[:1])


def test_sampling_errors_come_before_compiling(run):
  model, config, _ = sampler.load_model(run)
  tokenizer = text.Tokenizer.load(run)
  go = functools.partial(sampler.sample, model, config, [(2, 8, 8)], [0], tokenizer=tokenizer)
  with pytest.raises(ValueError, match="caption 0 is empty"):
    go(captions=["  "])
  with pytest.raises(ValueError, match="'purple'"):
    go(captions=["a purple circle"])
  with pytest.raises(ValueError, match="2 captions for 1 shapes"):
    go(captions=["a red circle", "a red circle"])
  with pytest.raises(ValueError, match="init video 0 is 8x12 .* asks for 8x8"):
    go(captions=["a red circle"], init_videos=[np.zeros((1, 8, 12, 3), np.float32)])
  with pytest.raises(ValueError, match="init video 0 has 2 frames.*below the requested 2"):
    go(captions=["a red circle"], init_videos=[np.zeros((2, 8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="init video 0 has shape \\(8, 8, 3\\)"):
    go(captions=["a red circle"], init_videos=[np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="never trained with given frames.*cond_frames_prob"):
    sampler.check_init_videos(helpers.tiny_config(), [np.zeros((1, 8, 8, 3))], [(2, 2, 2)])


def test_sample_script_with_captions_and_an_init_image(run, tmp_path):
  image = (np.random.default_rng(0).uniform(0, 255, (8, 12, 3))).astype(np.uint8)
  iio.imwrite(tmp_path / "first.png", image)
  out = tmp_path / "videos"
  cmd = [sys.executable, "sample.py", "--workdir", run, "--shapes", "3x8x12,2x8x8",
         "--steps", "2", "--out", str(out), "--captions", "a green triangle moving down",
         "--init_video", f"{tmp_path / 'first.png'},"]
  env = dict(os.environ, JAX_LOG_COMPILES="1")
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "_integrate" in proc.stderr  # the compile log shows (the bad call's check below)
  with open(out / "step3_settings.json") as f:
    settings = json.load(f)
  assert settings["captions"] == ["a green triangle moving down"] * 2
  gif = iio.imread(out / "step3_00_3x8x12_label0.gif")  # frames x (H*4) x (W*4)
  assert gif.shape[:3] == (3, 32, 48)
  # The given first frame survives (up to the gif's palette): the image, upscaled 4x.
  want = np.repeat(np.repeat(image, 4, 0), 4, 1).astype(int)
  assert np.abs(gif[0][..., :3].astype(int) - want).mean() < 12
  bad = subprocess.run(cmd[:-4] + ["--captions", "a purple thing"], cwd=helpers.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "'purple'" in bad.stderr and "_integrate" not in bad.stderr


def test_one_compiled_sampler_serves_every_mix_that_fits_a_training_row():
  c = helpers.tiny_config(**{"model.attention_backend": "blocksparse"})
  model = model_lib.build_model(c)
  possible = config_lib.possible_grids(c)
  pixels = lambda g: tuple(int(a) * int(p) for a, p in zip(g, c.model.patch))
  mixes = [[possible[0], possible[-1]], [possible[1]] * 3, [possible[2], possible[0]]]
  compiled = sampler._integrate.jitted_fn._cache_size()
  for mix in mixes:
    videos = sampler.sample(model, c, [pixels(g) for g in mix], [0] * len(mix), num_steps=1)
    assert [v.shape[:3] for v in videos] == [pixels(g) for g in mix]
  assert sampler._integrate.jitted_fn._cache_size() == compiled + 1
  # A size the data never draws gets a row of its own.
  sampler.sample(model, c, [(5, 8, 8)], [0], num_steps=1)
  assert sampler._integrate.jitted_fn._cache_size() == compiled + 2


def test_precomputed_caption_embeddings_beside_the_files_and_in_the_manifest(tmp_path):
  rng = np.random.default_rng(0)
  for name in "abcde":
    np.save(tmp_path / f"{name}.npy", rng.standard_normal((4, 8, 8, 4)).astype(np.float32))
  emb = {k: rng.standard_normal((n, 6)).astype(np.float32) for k, n in (("a", 3), ("b", 5))}
  np.save(tmp_path / "a.caption.npy", emb["a"])  # beside its latents
  (tmp_path / "embs").mkdir()
  np.save(tmp_path / "embs" / "b.npy", emb["b"])  # named by the manifest
  np.save(tmp_path / "d.caption.npy", np.zeros((2, 5), np.float32))  # the wrong width
  np.save(tmp_path / "e.caption.npy", np.zeros((6, 6), np.float32))  # longer than C=5
  lines = [{"path": "a.npy"}, {"path": "b.npy", "caption_embedding": "embs/b.npy"},
           {"path": "c.npy"}, {"path": "d.npy"}, {"path": "e.npy"}, {"path": "a.caption.npy"}]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  c = caption_config(mode="embeddings", **{
      "data.source": "latents", "data.path": str(tmp_path),
      "data.manifest": str(tmp_path / "m.jsonl"), "data.channels": 4, "data.frames": (2, 4),
      "data.side": (8, 8), "data.aspect_ratios": (1.0,), "data.caption_dropout": 0.0})
  maker = pipeline.BatchMaker(c)
  src = maker.source
  assert [os.path.basename(e["path"]) for e in src.entries] == [f"{x}.npy" for x in "abcde"]
  with pytest.raises(Exception, match="bad_caption.*d.caption.npy.*\\[tokens, 6\\]"):
    src[3]
  with pytest.raises(Exception, match="bad_caption.*6 caption tokens but model.caption.length=5"):
    src[4]
  batch = maker.pack([[src[0], src[1], src[2]]])
  got, mask = batch["seg_caption"][0], batch["seg_caption_mask"][0]
  assert got.shape == (c.data.max_segments, C, 6) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0, :3], emb["a"])
  np.testing.assert_array_equal(got[1], emb["b"])
  assert mask[0].tolist() == [True] * 3 + [False] * 2 and mask[1].all() and not mask[2:].any()
  # The model takes them through its projection.
  graphdef, state = trainer.init_state(c)
  b = {k: jnp.asarray(v) for k, v in batch.items() if k in trainer.batch_keys(c)}
  total, count = trainer.loss_terms(state["params"], graphdef, b,
                                    jnp.full((1, c.data.max_segments), 0.5),
                                    jnp.zeros_like(b["tokens"]), c)
  assert np.isfinite(float(total)) and float(count) == 3


def test_flop_count_of_captions_matches_xlas():
  """The caption terms of ``model.forward_flops`` (text encoder, cross-attention) against XLA's
  count of the same model with and without captions: XLA also counts elementwise work (softmax,
  norms), which the analytic count leaves out, so it may be a little higher, never lower."""
  c, graphdef, params, batch, cond, t, _ = case()
  c0 = helpers.tiny_config(**{"model.attention_backend": "dense"})
  graphdef0, params0 = nnx.split(model_lib.build_model(c0), nnx.Param)
  args = [jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "coords")]

  def xla_flops(graphdef, params, cond):
    fn = jax.jit(lambda p: nnx.merge(graphdef, p)(args[0], t, cond, args[1], args[2]))
    return fn.lower(params).compile().cost_analysis()["flops"]

  measured = xla_flops(graphdef, params, cond) - xla_flops(graphdef0, params0, cond.label)
  L, P = batch["tokens"].shape[1:]
  counted = (model_lib.forward_flops(c.model, batch["seg_grid"][0], L, P)
             - model_lib.forward_flops(c0.model, batch["seg_grid"][0], L, P))
  assert 1.0 <= measured / counted <= 1.2, (measured, counted)
