"""Rectified flow: noising identities, the timestep shift, the loss, and the samplers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit_jax import conditioning
from vdit_jax import diffusion
from vdit_jax import tokens as tok


def diffusion_cfg(**kw):
  c = ml_collections.ConfigDict(dict(t_mean=0.0, t_std=1.0, shift_base_tokens=256,
                                     shift_power=0.5, loss_weighting="video"))
  c.update(kw)
  return c


def packed(grids_per_row, L, S, P=3, seed=0):
  rng = np.random.default_rng(seed)
  rows = [[{"tokens": rng.standard_normal((tok.num_tokens(g), P)).astype(np.float32),
            "grid": g} for g in row] for row in grids_per_row]
  return tok.pack_rows(rows, L, S, P)


def test_add_noise_endpoints_and_velocity_identities():
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((2, 16, 5)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((2, 16, 5)), jnp.float32)
  ones = jnp.ones((2, 16))
  assert np.array_equal(diffusion.add_noise(x0, eps, 0 * ones), x0)
  assert np.array_equal(diffusion.add_noise(x0, eps, ones), eps)
  t = jnp.asarray(rng.uniform(size=(2, 16)), jnp.float32)
  x_t = diffusion.add_noise(x0, eps, t)
  v = diffusion.velocity_target(x0, eps)
  np.testing.assert_allclose(x_t + (1 - t)[..., None] * v, eps, atol=1e-6)
  np.testing.assert_allclose(x_t - t[..., None] * v, x0, atol=1e-6)
  # t is per token: a token at t=0 next to one at t=1 each hit their own end point
  mixed = jnp.asarray(np.tile([0.0, 1.0], 8)[None].repeat(2, 0), jnp.float32)
  x_m = np.asarray(diffusion.add_noise(x0, eps, mixed))
  assert np.array_equal(x_m[:, ::2], np.asarray(x0)[:, ::2])
  assert np.array_equal(x_m[:, 1::2], np.asarray(eps)[:, 1::2])


def test_velocity_from_clean_is_the_velocity_of_the_true_clean_video():
  """The true x0 gives eps - x0 wherever t >= t_min; below it the division is held at t_min,
  so t = 0 (given tokens, the last step) stays finite."""
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.standard_normal((2, 16, 5)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((2, 16, 5)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.05, 1.0, size=(2, 16)), jnp.float32)
  x_t = diffusion.add_noise(x0, eps, t)
  np.testing.assert_allclose(diffusion.velocity_from_clean(x_t, x0, t, 0.05),
                             diffusion.velocity_target(x0, eps), atol=1e-5)
  wrong = x0 + 0.1
  assert not np.allclose(diffusion.velocity_from_clean(x_t, wrong, t, 0.05),
                         diffusion.velocity_target(x0, eps), atol=1e-3)
  zero_t = jnp.zeros((2, 16))
  v0 = diffusion.velocity_from_clean(x0, wrong, zero_t, 0.05)
  np.testing.assert_allclose(v0, -0.1 / 0.05, rtol=1e-5)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_velocity_from_edm_is_exact_at_every_t_and_finite_at_both_ends(sigma_data):
  """The output that makes c_skip x_t + c_out out equal the true x0 gives eps - x0 at every t,
  t = 0 and t = 1 included (at t = 0, where c_out is 0, the limit: out = -(v + x0))."""
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.standard_normal((1, 6, 4)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((1, 6, 4)), jnp.float32)
  v = diffusion.velocity_target(x0, eps)
  s2 = sigma_data ** 2
  for t_value in (0.0, 1e-3, 0.3, 0.8, 1.0):
    t = jnp.full((1, 6), t_value, jnp.float32)
    x_t = diffusion.add_noise(x0, eps, t)
    d = (1 - t_value) ** 2 * s2 + t_value ** 2
    if t_value == 0.0:
      out = -(v + x0)
    else:
      c_skip, c_out = (1 - t_value) * s2 / d, sigma_data * t_value / np.sqrt(d)
      out = (x0 - c_skip * x_t) / c_out
    got = diffusion.velocity_from_edm(x_t, out, t, sigma_data)
    np.testing.assert_allclose(got, v, atol=2e-4, err_msg=f"t={t_value}")
    assert not np.allclose(diffusion.velocity_from_edm(x_t, out + 0.1, t, sigma_data), v,
                           atol=1e-2)


def test_uniform_share_of_training_t_reaches_the_low_noise_end():
  """A t_uniform share draws t uniformly (before the shift), so the last sampling steps near
  t = 0 get trained; share 0 is the plain logit-normal, draw for draw."""
  key = jax.random.key(3)
  grid = jnp.tile(jnp.array([4, 8, 8], jnp.int32), (1, 20000, 1))  # 256 tokens: shift 1
  plain = np.asarray(diffusion.sample_t(key, grid, diffusion_cfg()))
  np.testing.assert_allclose(plain, jax.nn.sigmoid(jax.random.normal(key, (1, 20000))), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(diffusion.sample_t(key, grid, diffusion_cfg(
      t_uniform=0.0))), plain)
  low = lambda share: float(np.mean(np.asarray(diffusion.sample_t(
      key, grid, diffusion_cfg(t_uniform=share))) < 1 / 30))
  assert low(0.0) < 0.002  # logit-normal: 0.04% of draws in the last of 30 steps
  assert abs(low(1.0) - 1 / 30) < 0.006
  assert abs(low(0.3) - (0.3 / 30 + 0.7 * 0.0004)) < 0.004


def test_shift_t_end_points_monotone_and_direction():
  t = jnp.linspace(0.0, 1.0, 101)
  for shift in (0.25, 0.5, 1.0, 2.0, 4.0):
    s = np.asarray(diffusion.shift_t(t, jnp.float32(shift)))
    assert s[0] == 0.0 and s[-1] == pytest.approx(1.0, abs=1e-7)
    assert np.all(np.diff(s) > 0)
    inner, t_in = s[1:-1], np.asarray(t)[1:-1]
    if shift > 1:
      assert np.all(inner > t_in)
    elif shift < 1:
      assert np.all(inner < t_in)
    else:
      np.testing.assert_allclose(s, t, atol=1e-7)
  # a bigger shift is noisier everywhere
  assert np.all(np.asarray(diffusion.shift_t(t[1:-1], 4.0)) >
                np.asarray(diffusion.shift_t(t[1:-1], 2.0)))


def test_video_shift_grows_with_token_count():
  cfg = diffusion_cfg()
  grids = jnp.asarray([[[1, 4, 4], [4, 8, 8], [8, 8, 8], [0, 0, 0]]], jnp.int32)
  shift = np.asarray(diffusion.video_shift(grids, cfg))[0]
  assert shift[2] == pytest.approx(np.sqrt(512 / 256))  # (tokens / base) ** power
  assert shift[0] < shift[1] < shift[2] and np.isfinite(shift[3])


def test_sample_t_in_open_unit_interval_and_larger_videos_noisier():
  cfg = diffusion_cfg()
  B = 512
  small = jnp.broadcast_to(jnp.asarray([1, 2, 2], jnp.int32), (B, 2, 3))  # 4 tokens
  large = jnp.broadcast_to(jnp.asarray([8, 8, 8], jnp.int32), (B, 2, 3))  # 512 tokens
  key = jax.random.key(0)
  t_small = np.asarray(diffusion.sample_t(key, small, cfg))
  t_large = np.asarray(diffusion.sample_t(key, large, cfg))
  for t in (t_small, t_large):
    assert t.shape == (B, 2) and np.all((t > 0) & (t < 1))
  # the same draws, shifted by token count: larger video, larger t, each and on average
  assert np.all(t_large > t_small)
  assert t_large.mean() > t_small.mean() + 0.1
  # mixed in one batch, per slot
  mixed = jnp.concatenate([small[:, :1], large[:, :1]], axis=1)
  t_mixed = np.asarray(diffusion.sample_t(jax.random.key(1), mixed, cfg))
  assert t_mixed[:, 1].mean() > t_mixed[:, 0].mean() + 0.1
  # the draws are per slot, not shared
  assert not np.allclose(t_mixed[:, 0], t_mixed[:, 1])


def per_video_mse_np(err, seg, S):
  """The 'video' weighting by hand: MSE per video, then the mean over present videos."""
  means = []
  for b in range(err.shape[0]):
    for s in range(1, S + 1):
      sel = seg[b] == s
      if sel.any():
        means.append(np.mean(err[b][sel] ** 2))
  return float(np.mean(means))


def test_masked_loss_video_and_token_weighting():
  # row 0: videos of 4 and 12 tokens + padding; row 1: one video of 2 tokens + padding + empty slots
  batch = packed([[(1, 2, 2), (3, 2, 2)], [(1, 1, 2)]], L=20, S=3, P=3)
  seg = batch["segment_ids"]
  rng = np.random.default_rng(1)
  err = rng.standard_normal((2, 20, 3)).astype(np.float32)
  err[1] *= 5.0  # the small video has a much larger error: weighting matters
  err[seg == 0] = 1e3  # padding errors must be ignored
  got_video = float(diffusion.masked_loss(jnp.asarray(err), jnp.asarray(seg), 3, "video"))
  got_token = float(diffusion.masked_loss(jnp.asarray(err), jnp.asarray(seg), 3, "token"))
  want_video = per_video_mse_np(err, seg, 3)
  want_token = float(np.mean(err[seg > 0] ** 2))
  assert got_video == pytest.approx(want_video, rel=1e-5)
  assert got_token == pytest.approx(want_token, rel=1e-5)
  assert abs(want_video - want_token) > 0.1 * want_token  # the two weightings differ here
  with pytest.raises(ValueError, match="loss_weighting"):
    diffusion.masked_loss(jnp.asarray(err), jnp.asarray(seg), 3, "pixel")


def test_masked_loss_of_an_all_padding_batch_is_finite_zero():
  seg = jnp.zeros((2, 8), jnp.int32)
  err = jnp.ones((2, 8, 3))
  for w in ("video", "token"):
    assert float(diffusion.masked_loss(err, seg, 2, w)) == 0.0


def test_per_token_gathers_each_videos_value():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [3, 3, 1, 0, 0, 0]], jnp.int32)
  x = jnp.asarray([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
  got = np.asarray(tok.per_token(x, seg))
  assert np.array_equal(got[0, :5], [10, 10, 20, 20, 20])
  assert np.array_equal(got[1, :3], [60, 60, 40])
  assert got[0, 5] == 0 and np.all(got[1, 3:] == 0)  # padding gets zeros


# ----------------------------------------------------------------------------- sampling


def _sampling_case():
  batch = packed([[(1, 2, 2), (2, 2, 1)], [(1, 1, 3)]], L=10, S=2, P=4, seed=2)
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32)
  shift = jnp.asarray([[0.5, 3.0], [1.7, 1.0]], jnp.float32)  # a different shift per video
  return jnp.asarray(batch["segment_ids"]), x0, eps, shift


@pytest.mark.parametrize("method", diffusion.SAMPLERS)
@pytest.mark.parametrize("num_steps", [1, 3, 8])
def test_samplers_integrate_a_straight_path_exactly(num_steps, method):
  seg, x0, eps, shift = _sampling_case()
  if method == "stochastic":
    # Fresh noise leaves the straight line; the velocity of data that is all x0 (a point mass)
    # still names x0 from anywhere off it.
    velocity = lambda x, t_BS: (x - x0) / tok.per_token(t_BS, seg)[..., None]
  else:
    velocity = lambda x, t_BS: eps - x0
  out = diffusion.integrate(velocity, eps, seg, shift, num_steps, method, key=jax.random.key(0))
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(x0)[real], atol=1e-5)


def test_heun_is_closer_than_euler_to_a_curved_flow():
  """dx/dt = cos(3 t) x on each video's shifted grid: x(0) = x(1) exp(-sin(3) / 3) exactly.
  Heun's error falls as 1/n^2, Euler's as 1/n."""
  seg, _, x1, shift = _sampling_case()
  real = np.asarray(seg) > 0
  exact = np.asarray(x1)[real] * np.exp(-np.sin(3.0) / 3.0)
  calls = []

  def velocity(x, t_BS):
    calls.append(1)
    return jnp.cos(3.0 * tok.per_token(t_BS, seg))[..., None] * x

  errors = {}
  for method in ("euler", "heun"):
    for n in (16, 32):
      calls.clear()
      out = diffusion.integrate(velocity, x1, seg, shift, n, method)
      errors[method, n] = float(np.abs(np.asarray(out)[real] - exact).max())
      assert len(calls) == {"euler": 1, "heun": 2}[method]  # traced once per loop body
  for n in (16, 32):
    assert errors["heun", n] < errors["euler", n] / 4, errors
  # Halving the step halves Euler's error and quarters Heun's.
  assert errors["euler", 16] / errors["euler", 32] == pytest.approx(2, rel=0.3), errors
  assert errors["heun", 16] / errors["heun", 32] == pytest.approx(4, rel=0.3), errors
  with pytest.raises(ValueError, match="sampler 'rk4' is unknown"):
    diffusion.integrate(velocity, x1, seg, shift, 4, "rk4")


def _gaussian_velocity(sigma):
  """The exact velocity of data N(0, sigma^2): x0's posterior mean is linear in x_t."""
  def velocity(x, t_BS):
    t = t_BS[0, 0]
    x0 = (1 - t) * sigma**2 / ((1 - t) ** 2 * sigma**2 + t**2) * x
    return (x - x0) / t
  return velocity


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_sampler_draws_the_data_distribution(eta):
  """With the exact velocity of Gaussian data, every eta ends at the data's spread (to the
  steps' discretisation error, 2% at 200 steps): the fresh noise is balanced by keeping less of
  the predicted noise. Keeping all of it, or drawing the fresh noise at another scale, widens
  or narrows the result (all of t' fresh: 0.31 of 0.4)."""
  sigma = 0.4
  x1 = jax.random.normal(jax.random.key(1), (1, 8192, 1))
  seg = jnp.ones((1, 8192), jnp.int32)
  shift = jnp.ones((1, 1))
  out = diffusion.integrate(_gaussian_velocity(sigma), x1, seg, shift, 200, "stochastic",
                            eta=eta, key=jax.random.key(2))
  assert float(jnp.std(out)) == pytest.approx(sigma, rel=0.03)
  assert abs(float(jnp.mean(out))) < 0.02


def test_stochastic_sampler_is_euler_at_eta_0_and_seeded_otherwise():
  seg, _, x1, shift = _sampling_case()
  velocity = lambda x, t_BS: jnp.cos(3.0 * tok.per_token(t_BS, seg))[..., None] * x
  run = lambda eta, key, method="stochastic": np.asarray(
      diffusion.integrate(velocity, x1, seg, shift, 8, method, eta=eta, key=key))
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(run(0.0, jax.random.key(0))[real],
                             run(0.0, None, "euler")[real], rtol=1e-5, atol=1e-5)
  one, again, other = (run(1.0, jax.random.key(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(one, again)
  assert np.abs(one - other)[real].max() > 1e-3
  # Given tokens (clean conditioning frames) come back exactly as they went in.
  given = jnp.asarray(np.arange(10)[None, :] < 2).repeat(2, 0)
  out = np.asarray(diffusion.integrate(velocity, x1, seg, shift, 8, "stochastic", given,
                                       key=jax.random.key(0)))
  np.testing.assert_array_equal(out[:, :2], np.asarray(x1)[:, :2])
  with pytest.raises(ValueError, match="pass key="):
    diffusion.integrate(velocity, x1, seg, shift, 8, "stochastic")
  for eta in (-1.0, 1.5):
    with pytest.raises(ValueError, match=f"eta={eta} must be in \\[0, 1\\]"):
      diffusion.integrate(velocity, x1, seg, shift, 8, "stochastic", eta=eta,
                          key=jax.random.key(0))


def test_sample_euler_follows_each_videos_shifted_grid():
  """With v = t (per video), Euler's sum is sum_i t_i (t_{i+1} - t_i) on the shifted grid."""
  seg, _, _, shift = _sampling_case()
  n = 4
  x1 = jnp.zeros((2, 10, 4))
  seen = []

  def velocity(x, t_BS):
    seen.append(t_BS.shape)
    return jnp.broadcast_to(tok.per_token(t_BS, seg)[..., None], x.shape)

  out = np.asarray(diffusion.sample_euler(velocity, x1, seg, shift, n))
  assert seen and all(s == shift.shape for s in seen)
  shift_np = np.asarray(shift, np.float64)
  u = 1.0 - np.arange(n + 1) / n
  grid = shift_np[..., None] * u / (1 + (shift_np[..., None] - 1) * u)  # [B, S, n+1]
  want_BS = np.sum(grid[..., :-1] * np.diff(grid, axis=-1), axis=-1)
  seg_np = np.asarray(seg)
  for b in range(2):
    for s in range(2):
      sel = seg_np[b] == s + 1
      if sel.any():
        np.testing.assert_allclose(out[b][sel], want_BS[b, s], rtol=1e-5)
  # the per-video shift matters: videos 1 and 2 of row 0 end in different places
  assert abs(want_BS[0, 0] - want_BS[0, 1]) > 1e-2


def test_guided_combines_conditional_and_unconditional():
  seg, x0, _, _ = _sampling_case()
  coords = jnp.zeros(seg.shape + (3,), jnp.int32)
  labels = jnp.asarray([[2, 5], [7, 9]], jnp.int32)
  null = 9
  calls = []

  def model_fn(x, t, cond, segment_ids, coords):
    calls.append(x.shape[0])
    label = conditioning.as_conditioning(cond).label
    lab = tok.per_token(label.astype(jnp.float32), segment_ids)
    return 0.5 * x + (lab * 2.0 + t[:, :1])[..., None]

  t = jnp.full((2, 2), 0.3)
  v_c = model_fn(x0, t, labels, seg, coords)
  v_u = model_fn(x0, t, jnp.full_like(labels, null), seg, coords)
  calls.clear()
  for scale in (0.0, 2.5, 4.0):
    v = diffusion.guided(model_fn, labels, seg, coords, null, scale)(x0, t)
    np.testing.assert_allclose(v, v_u + scale * (v_c - v_u), rtol=1e-5, atol=1e-5)
  assert calls == [4, 4, 4]  # both halves in one batched call
  v1 = diffusion.guided(model_fn, labels, seg, coords, null, 1.0)(x0, t)
  np.testing.assert_allclose(v1, v_c, atol=1e-6)
  assert not np.allclose(v_c, v_u)
