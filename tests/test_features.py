"""evals/features.py: the Fréchet distance against its closed form, and the feature network's
training, cache and features on a tiny recipe."""

import dataclasses
import os

import numpy as np
import pytest

from evals import features as F

# One aspect ratio, so the tiny run compiles its step for one shape only.
TINY = F.Recipe(frames=(4, 4), side=(16.0, 16.0), aspect_ratios=(1.0,), train_videos=24,
                eval_videos=8, batch_size=8, steps=3, widths=(4, 8), feature_dim=8)


def _gaussian(rng, mean_F, std_F, n):
  return mean_F + std_F * rng.standard_normal((n, len(mean_F)))


def test_frechet_distance_is_zero_for_identical_sets():
  a = np.random.default_rng(0).standard_normal((300, 6))
  assert F.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
  # and not for a shifted copy: the mean term counts
  assert F.frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-6)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
  rng = np.random.default_rng(1)
  mu_a, mu_b = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 0.0, -1.0, 3.0])
  std_a, std_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
  a = _gaussian(rng, mu_a, std_a, 200_000)
  b = _gaussian(rng, mu_b, std_b, 200_000)
  # Diagonal covariances: Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) = sum (std_a - std_b)^2.
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((std_a - std_b) ** 2)
  assert expected == pytest.approx(8.25)
  # 200k draws estimate it to about +-0.03 (one sigma); a wrong term would be off by >= 1.
  assert F.frechet_distance(a, b) == pytest.approx(expected, abs=0.15)


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(2)
  # Covariances that do not commute, so S_a S_b and S_b S_a differ and symmetry is not free.
  a = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5))
  b = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 1.0
  d_ab, d_ba = F.frechet_distance(a, b), F.frechet_distance(b, a)
  assert d_ab > 1.0
  assert d_ab == pytest.approx(d_ba, rel=1e-9)


def test_frechet_distance_names_bad_shapes():
  with pytest.raises(ValueError, match="same F"):
    F.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


def test_training_is_reproducible():
  net_a, _ = F.train(TINY)
  net_b, _ = F.train(TINY)
  params_a, params_b = F._flat_params(net_a), F._flat_params(net_b)
  assert params_a.keys() == params_b.keys()
  for k in params_a:
    np.testing.assert_array_equal(params_a[k], params_b[k], err_msg=k)
  # and training changed them (3 steps from the same init)
  init = F._flat_params(F.build(TINY))
  assert any(not np.array_equal(init[k], params_a[k]) for k in init)


def test_load_or_train_writes_then_reloads_without_training(tmp_path, monkeypatch):
  calls = []
  real_train = F.train

  def counting_train(recipe, log_every=0):
    calls.append(recipe)
    return real_train(recipe, log_every)

  monkeypatch.setattr(F, "train", counting_train)
  first = F.load_or_train(str(tmp_path), TINY)
  assert len(calls) == 1
  entry = F.entry_dir(str(tmp_path), TINY)
  assert os.path.exists(os.path.join(entry, F.WEIGHTS_FILE))
  assert os.path.exists(os.path.join(entry, F.RECIPE_FILE))

  def no_train(recipe, log_every=0):
    raise AssertionError("load_or_train trained although the cache holds the recipe's weights")

  monkeypatch.setattr(F, "train", no_train)
  second = F.load_or_train(str(tmp_path), TINY)
  params_1, params_2 = F._flat_params(first), F._flat_params(second)
  for k in params_1:
    np.testing.assert_array_equal(params_1[k], params_2[k], err_msg=k)
  # a fresh network of the recipe differs: the weights did come from the file
  fresh = F._flat_params(F.build(TINY))
  assert any(not np.array_equal(fresh[k], params_2[k]) for k in fresh)


def test_recipe_key_changes_with_every_hyperparameter_and_the_architecture(monkeypatch):
  base = F.Recipe()
  assert base.key() == F.Recipe().key()
  for change in (dict(lr=base.lr * 2), dict(steps=base.steps + 1), dict(seed=1),
                 dict(widths=(8, 16, 32)), dict(speed=(0.03, 0.09))):
    assert dataclasses.replace(base, **change).key() != base.key(), change
  key = base.key()
  monkeypatch.setattr(F, "ARCH_VERSION", F.ARCH_VERSION + 1)
  assert base.key() != key


def test_features_keep_order_across_shapes_and_padding():
  net = F.build(TINY)
  rng = np.random.default_rng(3)
  videos = [rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32) for _ in range(3)]
  videos.insert(1, rng.uniform(-1, 1, (4, 12, 20, 3)).astype(np.float32))
  feats_NF = F.features(net, videos)
  assert feats_NF.shape == (4, TINY.feature_dim)
  for i, v in enumerate(videos):  # one at a time: a batch of one plus padding
    np.testing.assert_allclose(F.features(net, [v])[0], feats_NF[i], rtol=1e-5, atol=1e-6)
  assert not np.allclose(feats_NF[0], feats_NF[2])
