"""Validation of evals.video_metrics: real synthetic_shapes videos score near each metric's ideal,
each corruption of evals.corrupt moves the metrics meant to catch it the bad way (further at a
higher strength), and the definitions hold on videos drawn by hand."""

import time
import warnings

import numpy as np
import pytest

from data.synthetic_shapes import COLORS, SHAPES, SyntheticShapes
from evals import corrupt, video_metrics
from evals.video_metrics import METRICS, score_video, score_videos, summarize
from vdit_jax import config as config_lib

# As configs/default.py draws them: 8 frames of 32x32, 28x36 or 36x28, one object.
SOURCE = SyntheticShapes(frames=(8, 8), side=(32, 32), aspect_ratios=(0.75, 1.0, 1.33),
                         num_objects=(1, 1), object_size=(0.35, 0.55), speed=(0.03, 0.08),
                         patch=(2, 4, 4), num_videos=1000, seed=0)
NUM_ITEMS = 24
STRENGTHS = (0.5, 1.0)

# Corruption -> the metrics it must move. Each metric is caught by at least one corruption.
CAUGHT_BY = {
    "shuffle_frames": ("motion_jerk", "vbench_flicker"),
    "colour_jitter": ("colour_flicker", "label_ok"),
    "remove_object": ("vanish", "area_variation", "shape_drift"),
    "swap_shape": ("shape_drift", "label_ok"),
    "independent_positions": ("motion_jerk", "vbench_flicker"),
    # Slowing the object improves VBench's flicker score and leaves shape drift near real
    # (fewer sub-pixel offsets to rasterise): stall is what sees it.
    "slow_motion": ("stall",),
}
# Corruption -> metrics it must leave as they were (up to a pixel flipping on a rounding), so a
# metric measures its own failure and not the others'.
LEAVES = {
    "shuffle_frames": ("colour_flicker", "area_variation", "vanish", "label_ok"),
    "colour_jitter": ("shape_drift", "area_variation", "vanish", "motion_jerk"),
    "independent_positions": ("colour_flicker", "vanish", "label_ok"),
    "slow_motion": ("colour_flicker", "vanish", "label_ok"),
}


@pytest.fixture(scope="module")
def items():
  return [SOURCE[i] for i in range(NUM_ITEMS)]


@pytest.fixture(scope="module")
def real(items):
  return score_videos([it["video"] for it in items], [it["label"] for it in items])


@pytest.fixture(scope="module")
def corrupted(items):
  """(corruption, strength) -> scores of every item corrupted (one rng stream per item)."""
  labels = [it["label"] for it in items]
  out = {}
  for name, fn in corrupt.CORRUPTIONS.items():
    for strength in STRENGTHS:
      videos = [fn(it, strength, np.random.default_rng([7, i])) for i, it in enumerate(items)]
      out[name, strength] = score_videos(videos, labels)
  return out


def badness(metric, values):
  """Higher is worse, whichever way the metric points."""
  return np.asarray(values) if METRICS[metric] == "lower" else -np.asarray(values)


def square_video(T=8, H=32, W=32, colour="green", step=(1, 1), side=8):
  """A square of ``side`` pixels moving ``step`` pixels per frame from (8, 6), on whole pixels."""
  video = np.full((T, H, W, 3), -1.0, np.float32)
  for t in range(T):
    y, x = 8 + step[0] * t, 6 + step[1] * t
    video[t, y:y + side, x:x + side] = COLORS[colour]
  return video


# ---- real videos ----

def test_items_cover_every_size_and_shape(items):
  assert {it["video"].shape[:3] for it in items} == {(8, 32, 32), (8, 28, 36), (8, 36, 28)}
  assert {int(it["gt_shapes"][0]) for it in items} == set(range(len(SHAPES)))


def test_real_videos_score_near_ideal(real):
  assert list(real) == list(METRICS)
  assert np.all(real["label_ok"] == 1.0)
  assert np.all(real["vanish"] == 0.0)
  # The interior's colour is exact in every frame; only the anti-aliased rim varies.
  assert np.all(real["colour_flicker"] < 0.01)
  # Moving objects change some pixels between frames: about 2% of the range on average.
  assert np.all(real["vbench_flicker"] > 0.92) and real["vbench_flicker"].mean() > 0.96
  # Rasterisation at sub-pixel offsets, with integer alignment: up to 0.17 over 1000 videos.
  assert np.all(real["shape_drift"] < 0.2) and real["shape_drift"].mean() < 0.1
  assert np.all(real["area_variation"] < 0.1)
  # Constant velocity: the brightness-weighted centroid follows it to a fraction of a pixel
  # (0.005 of the side is 0.16 pixels at 32x32).
  jerk = real["motion_jerk"][~np.isnan(real["motion_jerk"])]
  assert len(jerk) >= NUM_ITEMS // 2  # the others spend every frame near a bounce
  assert np.all(jerk < 0.005)
  # Every object moves at the source's slowest speed or faster; the centroid's error of a
  # fraction of a pixel may make the slowest fall short by a little.
  stall = real["stall"][~np.isnan(real["stall"])]
  assert len(stall) >= NUM_ITEMS // 2 and np.all(stall < 0.1) and stall.mean() < 0.02


@pytest.mark.parametrize("name, metric", [(c, m) for c, ms in CAUGHT_BY.items() for m in ms])
def test_corruption_moves_its_metrics_the_bad_way(real, corrupted, name, metric):
  base, half, full = (badness(metric, s[metric]) for s in (
      real, corrupted[name, 0.5], corrupted[name, 1.0]))
  # Paired over the same items: at half strength the mean gets worse by more than the 95%
  # interval of the change, and at full strength worse again.
  change, interval = summarize(half - base)
  assert change > interval > 0 or (change > 0 and interval == 0), (change, interval)
  assert summarize(full)[0] > summarize(half)[0]


@pytest.mark.parametrize("name, metric", [(c, m) for c, ms in LEAVES.items() for m in ms])
def test_corruption_leaves_other_metrics(real, corrupted, name, metric):
  for strength in STRENGTHS:
    scores = corrupted[name, strength][metric]
    assert np.array_equal(np.isnan(scores), np.isnan(real[metric]))
    assert np.nanmean(np.abs(scores - real[metric])) < 0.01, strength


def test_every_metric_is_validated():
  assert set(METRICS) == {m for ms in CAUGHT_BY.values() for m in ms}
  assert set(CAUGHT_BY) == set(corrupt.CORRUPTIONS)


# ---- the definitions, on videos drawn by hand ----

def test_a_square_at_constant_velocity_scores_ideally():
  video = square_video()
  s = score_video(video, label=SHAPES.index("square") * len(COLORS) + list(COLORS).index("green"))
  assert s == {"colour_flicker": 0.0, "vbench_flicker": s["vbench_flicker"], "shape_drift": 0.0,
               "area_variation": 0.0, "vanish": 0.0, "motion_jerk": 0.0, "stall": 0.0,
               "label_ok": 1.0}
  # Each step uncovers 15 and covers 15 pixels of 1024, each by |colour - black| summed over
  # channels: green changes one channel by 2 (255 levels).
  assert s["vbench_flicker"] == pytest.approx(1 - 30 * 255 / 3 / 1024 / 255)
  for wrong in ("green circle", "green triangle", "red square", "yellow square"):
    shape, colour = wrong.split()[::-1]
    label = SHAPES.index(shape) * len(COLORS) + list(COLORS).index(colour)
    assert score_video(video, label)["label_ok"] == 0.0, wrong


def test_metric_values_follow_their_definitions():
  video = square_video(step=(1, 1))
  video[4:] = square_video(step=(1, 1), colour="yellow")[4:]  # green -> yellow: red moves by 2
  assert score_video(video)["colour_flicker"] == pytest.approx(2 / 7)
  # Accelerating by one pixel per frame along x: second difference 1 pixel, over the side 32.
  video = np.full((6, 32, 32, 3), -1.0, np.float32)
  for t in range(6):
    x = 4 + t * (t + 1) // 2
    video[t, 10:18, x:x + 4] = COLORS["red"]
  jerk = score_video(video)["motion_jerk"]
  assert jerk == pytest.approx(1 / 32)
  # The slowest speed at 32x32 is 0.03 * 32 = 0.96 pixels per frame: a still square falls
  # short by all of it in every pair, one that moves a pixel every other frame in the 4 pairs
  # of 7 where it stands, and one moving a pixel a frame never.
  assert score_video(square_video(step=(0, 0)))["stall"] == 1.0
  still = square_video(T=1, step=(0, 0))[0]
  video = np.stack([np.roll(still, t // 2, axis=1) for t in range(8)])
  assert score_video(video)["stall"] == pytest.approx(4 / 7)
  assert score_video(square_video(step=(0, 1)))["stall"] == 0.0
  # The metric's slowest speed is the source's (its default config's) lower bound.
  assert video_metrics._SLOWEST_SPEED == config_lib.get_base_config().data.speed[0]
  # A square that grows by half its side in one frame: IoU 8*8/(12*12) once in 7 pairs (aligned
  # on the centroid, by a whole pixel here), and its area varies.
  video = square_video(step=(0, 0))
  video[5:, 6:18, 4:16] = COLORS["green"]
  s = score_video(video)
  assert s["shape_drift"] == pytest.approx((1 - 64 / 144) / 7)
  areas = np.array([64] * 5 + [144] * 3)
  assert s["area_variation"] == pytest.approx(areas.std() / areas.mean())
  # More than 1.5x the median area (64) counts as a different object.
  assert s["vanish"] == 3 / 8


def test_empty_frames_count_as_vanished_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    s = score_video(np.full((8, 32, 32, 3), -1.0, np.float32), label=0)
    assert (s["vanish"], s["shape_drift"], s["label_ok"]) == (1.0, 1.0, 0.0)
    assert all(np.isnan(s[m]) for m in (
        "colour_flicker", "area_variation", "motion_jerk", "stall"))
    video = square_video()
    video[3] = -1.0
    s = score_video(video)
  assert s["vanish"] == 1 / 8
  assert s["shape_drift"] == pytest.approx(2 / 7)  # the two pairs with frame 3
  assert s["colour_flicker"] == 0.0


def test_specks_are_not_objects_and_splits_are():
  video = square_video()
  video[:, 28:30, 28] = COLORS["red"]  # 2 pixels: sampling noise, not an object
  s = score_video(video)
  assert (s["vanish"], s["area_variation"], s["colour_flicker"]) == (0.0, 0.0, 0.0)
  video[2, :, 8 + 2:8 + 4] = -1.0  # cuts frame 2's square in two
  assert score_video(video)["vanish"] == 1 / 8


def test_bad_inputs_raise_with_the_fix():
  with pytest.raises(ValueError, match="at least two frames"):
    score_video(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
    score_video(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="0..17"):
    score_video(square_video(), label=18)
  with pytest.raises(ValueError, match="one label per video"):
    score_videos([square_video()], labels=[0, 1])


def test_score_videos_and_summarize():
  videos = [square_video(), square_video(H=28, W=36), square_video(T=3)]
  scores = score_videos(videos)
  assert list(scores) == list(METRICS)
  assert all(v.shape == (3,) and v.dtype == np.float64 for v in scores.values())
  assert np.all(np.isnan(scores["label_ok"]))
  assert score_videos(videos, labels=[7, 7, 7])["label_ok"].tolist() == [1.0, 1.0, 1.0]
  values = np.array([1.0, np.nan, 2.0, 3.0, np.nan])
  mean, half = summarize(values)
  assert mean == 2.0 and half == pytest.approx(1.96 * 1.0 / np.sqrt(3))
  assert summarize(np.array([5.0, np.nan]))[0] == 5.0 and np.isnan(summarize(np.array([5.0]))[1])
  assert all(np.isnan(summarize(np.array([np.nan]))))


def test_scoring_is_fast():
  video = SOURCE[0]["video"]
  assert video.shape == (8, 32, 32, 3)
  score_video(video, 0)
  start = time.perf_counter()
  for _ in range(20):
    score_video(video, 0)
  # About 3 ms on a 2-core CPU; the bound is loose so a busy machine does not flake.
  assert (time.perf_counter() - start) / 20 < 0.03


# ---- the corruptions ----

@pytest.mark.parametrize("name", list(corrupt.CORRUPTIONS))
def test_corruptions_are_deterministic_and_zero_strength_is_identity(items, name):
  fn = corrupt.CORRUPTIONS[name]
  item = items[3]
  assert np.array_equal(fn(item, 0.0, np.random.default_rng(0)), item["video"])
  a, b = (fn(item, 1.0, np.random.default_rng(1)) for _ in range(2))
  assert np.array_equal(a, b) and not np.array_equal(a, item["video"])
  assert a.shape == item["video"].shape and a.dtype == np.float32
  assert np.all((a >= -1) & (a <= 1))
  with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
    fn(item, 1.5, np.random.default_rng(0))


def test_corruptions_change_what_they_say(items):
  item, rng = items[0], np.random.default_rng(0)
  video = item["video"]
  moved = corrupt.shuffle_frames(video, 0.5, rng)
  assert sum(not np.array_equal(a, b) for a, b in zip(moved, video)) == 4
  assert sorted(map(bytes, moved)) == sorted(map(bytes, video))  # the same frames, reordered
  for strength, erased in ((0.5, 4), (1.0, 7)):
    gone = corrupt.remove_object(item, strength, rng)
    assert sum(bool(np.all(f == -1.0)) for f in gone) == erased
  # Jitter keeps every pixel's coverage (its brightest channel) and changes colours.
  jittered = corrupt.colour_jitter(video, 1.0, rng)
  np.testing.assert_allclose(jittered.max(-1), video.max(-1), atol=1e-6)
  assert not np.allclose(jittered, video)


def test_direction_ok_reads_the_captions_direction(items):
  """Real videos set off the way their captions say; played backwards, with positions drawn
  independently per frame, or with their first two pairs of frames swapped (each pair moving
  the right way, the step between them backwards: what a model whose temporal patches are two
  frames deep does when only the inside of a patch follows the caption), they mostly do not; a
  hand-drawn square moving up-right does."""
  from evals.video_metrics import caption_direction, direction_ok
  want = [caption_direction(it["caption"]) for it in items]
  real = np.mean([direction_ok(it["video"], d) for it, d in zip(items, want)])
  backwards = np.mean([direction_ok(it["video"][::-1], d) for it, d in zip(items, want)])
  scattered = np.mean([
      direction_ok(corrupt.CORRUPTIONS["independent_positions"](it, 1.0,
                                                                np.random.default_rng([7, i])), d)
      for i, (it, d) in enumerate(zip(items, want))])
  swapped = [it["video"][[2, 3, 0, 1, *range(4, len(it["video"]))]] for it in items]
  pairs_swapped = np.mean([direction_ok(v, d) for v, d in zip(swapped, want)])
  # Two frames alone score the swapped pairs as real: the four frames are what see them.
  assert np.mean([direction_ok(v, d, frames=2) for v, d in zip(swapped, want)]) >= 0.75
  # Over four frames some real objects bounce before the end (0.84 of a larger sample).
  assert real >= 0.75, real
  assert backwards <= 0.35 and scattered <= 0.6 and pairs_swapped <= 0.35, (
      backwards, scattered, pairs_swapped)
  up_right = square_video(step=(-1, 1))  # (dy, dx): y grows downwards
  assert direction_ok(up_right, "up-right") == 1.0 and direction_ok(up_right, "down-left") == 0.0
  assert caption_direction("a red circle moving up-left and a blue square moving up") == "up-left"
  with pytest.raises(ValueError, match="'sideways' is not one of"):
    direction_ok(up_right, "sideways")
  with pytest.raises(ValueError, match="frames >= 2"):
    direction_ok(up_right, "up-right", frames=1)
