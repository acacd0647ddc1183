"""Sampling: sample.py end to end, early shape errors, EMA restore, packed == alone."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from vdit_jax import config as config_lib
from vdit_jax import sampler, video_io

UPSCALE = 4  # video_io.write_video's default, which sample.py uses


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.shared_runs(tmp_path_factory)["straight"]


def run_sample(workdir, out, shapes, *extra, steps="2"):
  env = dict(os.environ, JAX_LOG_COMPILES="1")
  return subprocess.run(
      [sys.executable, "sample.py", "--workdir", workdir, "--shapes", shapes,
       *(("--steps", steps) if steps else ()), "--out", str(out), *extra],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sample_script_writes_mp4_and_gif(workdir, tmp_path):
  out = tmp_path / "videos"
  # Labels by the run's source's name (synthetic_shapes) and by id: 0 and 1; the steps and
  # guidance are the run's (fewer steps than the base config's).
  proc = run_sample(workdir, out, "2x8x8,4x8x12", "--labels", "Red Circle,1", steps=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "_integrate" in proc.stderr  # the compile log works (see the bad-shape test)
  printed = proc.stdout.split()
  assert sorted(printed) == sorted(str(p) for p in out.iterdir())
  sheet = imageio.imread(out / "step5_sheet.png")  # frames across, videos down
  assert sheet.shape == (8 * UPSCALE * 2 + 2, 4 * (12 * UPSCALE + 2) - 2, 3)
  with open(out / "step5_settings.json") as f:
    settings = json.load(f)
  assert settings["command"][1:] == ["sample.py", "--workdir", workdir, "--shapes",
                                     "2x8x8,4x8x12", "--out", str(out),
                                     "--labels", "Red Circle,1"]
  with open(os.path.join(workdir, "config.json")) as f:
    run_sample_config = json.load(f)["sample"]
  assert run_sample_config["steps"] != config_lib.get_base_config().sample.steps
  assert (settings["steps"], settings["cfg"]) == (run_sample_config["steps"],
                                                  run_sample_config["cfg"])
  assert (settings["labels"], settings["sampler"], settings["step"]) == ([0, 1], "euler", 5)
  for i, (t, h, w) in enumerate([(2, 8, 8), (4, 8, 12)]):
    stem = out / f"step5_{i:02d}_{t}x{h}x{w}_label{i}"
    for ext in ("mp4", "gif"):
      frames = video_io.read_video(f"{stem}.{ext}")
      assert frames.shape == (t, h * UPSCALE, w * UPSCALE, 3), (ext, frames.shape)
      assert frames.dtype == np.uint8 and frames.std() > 0  # not one flat colour
    # nearest-neighbour upscaling: each UPSCALE x UPSCALE block of the gif is one pixel
    gif = video_io.read_video(f"{stem}.gif").astype(np.int32)
    assert np.array_equal(gif, gif[:, ::UPSCALE, ::UPSCALE].repeat(UPSCALE, 1).repeat(UPSCALE, 2))


def test_sample_script_rejects_a_bad_shape_before_compiling(workdir, tmp_path):
  out = tmp_path / "videos"
  proc = run_sample(workdir, out, "2x8x8,2x9x8")
  assert proc.returncode != 0
  assert "H=9" in proc.stderr and "8 or 12" in proc.stderr, proc.stderr[-3000:]
  assert "_integrate" not in proc.stderr  # failed before the sampler compiled
  assert not out.exists()


def test_contact_sheet_puts_frames_across_and_videos_down():
  a = np.full((2, 3, 4, 3), -1.0, np.float32)
  a[1] = 1.0  # frame 1 white
  b = np.zeros((3, 2, 2, 1), np.float32)  # grey, one channel
  sheet = video_io.contact_sheet([a, b], upscale=2, gap=1)
  assert sheet.shape == (6 + 1 + 4, 2 * (8 + 1) - 1, 3)  # a's 2 frames are the widest row
  assert (sheet[:6, :8] == 0).all() and (sheet[:6, 9:17] == 255).all()  # video a, frames 0, 1
  assert (sheet[:6, 8] == 0).all() and (sheet[6] == 0).all()  # the gaps
  assert (sheet[7:, :4] == 128).all() and (sheet[7:, 10:14] == 128).all()  # video b
  assert (sheet[7:, 14:] == 0).all()  # b's row beyond its 3 frames


def test_sample_script_rejects_an_unknown_sampler_before_compiling(workdir, tmp_path):
  out = tmp_path / "videos"
  proc = run_sample(workdir, out, "2x8x8", "--sampler", "rk4")
  assert proc.returncode != 0
  assert "sampler 'rk4' is unknown" in proc.stderr and "heun" in proc.stderr, proc.stderr[-3000:]
  assert "_integrate" not in proc.stderr and not out.exists()


def test_heun_samples_a_video_deterministically(workdir):
  model, config, _ = sampler.load_model(workdir)
  one = sampler.sample(model, config, [(2, 8, 8)], [3], num_steps=2, seed=7, method="heun")
  two = sampler.sample(model, config, [(2, 8, 8)], [3], num_steps=2, seed=7, method="heun")
  euler = sampler.sample(model, config, [(2, 8, 8)], [3], num_steps=2, seed=7)
  assert np.isfinite(one[0]).all() and np.array_equal(one[0], two[0])
  assert not np.allclose(one[0], euler[0])  # the corrector changes the path


def test_stochastic_sampler_is_seeded_and_euler_without_noise(workdir):
  model, config, _ = sampler.load_model(workdir)
  draw = lambda seed, eta: sampler.sample(model, config, [(2, 8, 8)], [3], num_steps=3, seed=seed,
                                          method="stochastic", eta=eta)[0]
  euler = sampler.sample(model, config, [(2, 8, 8)], [3], num_steps=3, seed=7)[0]
  one, two, other = draw(7, 1.0), draw(7, 1.0), draw(8, 1.0)
  assert np.isfinite(one).all() and np.array_equal(one, two)
  assert not np.allclose(one, other) and not np.allclose(one, euler)
  np.testing.assert_allclose(draw(7, 0.0), euler, atol=1e-4)


def test_load_model_restores_the_ema_params(workdir):
  state = helpers.restore_state(workdir, 5)
  model, config, step = sampler.load_model(workdir)
  assert step == 5 and config.train.steps == 5
  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  ema, params = jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])
  assert len(got) == len(ema) == len(params)
  for g, e in zip(got, ema):
    assert np.array_equal(np.asarray(g), e)
  assert any(not np.array_equal(e, p) for e, p in zip(ema, params))  # EMA != raw params here
  model3, _, step3 = sampler.load_model(workdir, step=3)
  assert step3 == 3
  ema3 = jax.tree.leaves(helpers.restore_state(workdir, 3)["ema"])
  for g, e in zip(jax.tree.leaves(nnx.state(model3, nnx.Param)), ema3):
    assert np.array_equal(np.asarray(g), e)
  with pytest.raises(ValueError, match=r"available steps \[3, 5\]"):
    sampler.load_model(workdir, step=4)


def test_load_model_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    sampler.load_model(str(tmp_path))


def test_packed_sampling_equals_sampling_alone(workdir):
  """Shapes sampled together give the same videos as each sampled alone (same noise)."""
  model, config, _ = sampler.load_model(workdir)
  shapes = [(2, 8, 8), (4, 8, 12)]
  together = sampler.sample(model, config, shapes, [3, 5], cfg_scale=3.0, num_steps=2, seed=7)
  alone = sampler.sample(model, config, shapes[:1], [3], cfg_scale=3.0, num_steps=2, seed=7)
  assert [v.shape for v in together] == [s + (config.data.channels,) for s in shapes]
  np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
  other = sampler.sample(model, config, shapes[:1], [4], cfg_scale=3.0, num_steps=2, seed=7)
  assert not np.allclose(other[0], alone[0], atol=1e-5)  # the label reaches the video


def test_redraw_from_noise_is_sampling_and_from_little_noise_keeps_the_video(workdir):
  """sampler.redraw: from t = 1 the same videos as sample (same seed and noise); from a small t
  the given videos back nearly unchanged, from a large one redrawn."""
  model, config, _ = sampler.load_model(workdir)
  shapes = [(2, 8, 8), (4, 8, 12)]
  sampled = sampler.sample(model, config, shapes, [3, 5], num_steps=2, seed=7)
  rng = np.random.default_rng(0)
  real = [rng.uniform(-1, 1, s + (config.data.channels,)).astype(np.float32) for s in shapes]
  from_noise = sampler.redraw(model, config, real, [3, 5], 1.0, num_steps=2, seed=7)
  for got, want in zip(from_noise, sampled):
    np.testing.assert_allclose(got, want, atol=1e-5)
  near = sampler.redraw(model, config, real, [3, 5], 0.01, num_steps=2, seed=7)
  far = sampler.redraw(model, config, real, [3, 5], 0.6, num_steps=2, seed=7)
  for r, n, f in zip(real, near, far):
    assert np.abs(n - r).max() < 0.1 < np.abs(f - r).max()
  with pytest.raises(ValueError, match="redraw t=0.0"):
    sampler.redraw(model, config, real, [3, 5], 0.0)


def test_parse_shapes_and_labels_errors():
  assert sampler.parse_shapes("2x8x8, 4x8x12") == [(2, 8, 8), (4, 8, 12)]
  for bad in ("2x8", "2x8x-8", "axbxc", ""):
    with pytest.raises(ValueError):
      sampler.parse_shapes(bad)
  assert sampler.parse_labels("", 3, 18) == [0, 1, 2]
  assert sampler.parse_labels("4", 2, 18) == [4, 4]
  with pytest.raises(ValueError, match="0..17"):
    sampler.parse_labels("19", 1, 18)
  with pytest.raises(ValueError, match="2 labels for 3 shapes"):
    sampler.parse_labels("1,2", 3, 18)
  with pytest.raises(ValueError, match="8 or 12"):
    sampler.check_shapes([(2, 9, 8)], (1, 4, 4))
