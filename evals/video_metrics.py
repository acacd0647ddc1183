"""Temporal-consistency metrics of synthetic_shapes videos, read from the pixels alone.

A generated video of the synthetic_shapes source should show one coloured shape on black that
keeps its colour, shape and size and moves at constant velocity, bouncing off the edges. Each
metric measures one way a sample can break that, from the video only (no ground truth, so model
samples are scored the way real videos are); ``tests/test_video_metrics.py`` validates each one
against real videos and corrupted ones (``evals.corrupt``).

Foreground is every pixel whose brightest channel is above the middle of the range (0 in the
video's ``[-1, 1]``): the background is black (-1) and every palette colour has a channel at 1,
so this is the half-coverage edge of an anti-aliased or blurred shape. Only connected blobs of
at least ``_MIN_BLOB_FRACTION`` of the frame count as objects, so specks of sampling noise do
not. A frame with no object is "vanished"; metrics that need the object skip it (or count it as
a full failure where the metric's definition says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data import motion, synthetic_shapes

# Metric name -> which direction is better; the order is the order of tables and plots.
METRICS: dict[str, str] = {
    "colour_flicker": "lower",   # mean change of the object's mean colour between frames
    "vbench_flicker": "higher",  # VBench temporal flickering: 1 - mean |frame difference|
    "shape_drift": "lower",      # 1 - IoU of consecutive masks aligned on their centroids
    "area_variation": "lower",   # std / mean of the object's area over frames
    "vanish": "lower",           # fraction of frames where the object is missing or split
    "motion_jerk": "lower",      # mean |acceleration| of the centroid away from bounces
    "stall": "lower",            # how far the centroid's step falls short of the slowest speed
    "label_ok": "higher",        # 1 if the video shows the requested colour and shape
}

_FOREGROUND = 0.0  # brightest channel above this is foreground (half way from black to full)
# Smallest object blob as a fraction of the frame: 4 pixels at 32x32, while the smallest real
# object (object_size 0.35 of the short side, a triangle) covers about 40.
_MIN_BLOB_FRACTION = 0.004
_VANISH_BAND = (0.5, 1.5)  # an area outside this times the video's median area counts as vanished
# A frame is next to a bounce when the box of the object's light is this close (pixels) to an
# edge: at the fastest configured speed (0.08 of the side per frame, 2.6 pixels at 32) one of the
# two frames around a bounce is within half a step of the edge, plus a pixel of rasterisation.
_EDGE_MARGIN = 2
# The slowest speed the source draws (``config.data.speed``'s default minimum), as a fraction of
# the short side per frame: every object of a real video moves at least this far between two
# frames away from a bounce. Shape drift alone would reward a sampler that slows objects down
# (a still object's mask never changes, while a moving one's outline is rasterised anew at each
# sub-pixel offset), so ``stall`` measures the speed that drift is compared at.
_SLOWEST_SPEED = 0.03
# Shape from the object's light (brightness over its grown mask), through two normalised moments
# about its centroid, both unchanged by a symmetric blur of the shape's outline to first order.
# The vertical skewness is -0.57 for a triangle (always point up in this source; y grows down)
# and 0 for the symmetric circle and square (-0.63..-0.51 and within 0.02 of 0 on real videos;
# -0.28 and 0.05 under a 1-pixel blur plus noise of std 0.15). The ratio E[dx^2 dy^2] /
# (E[dx^2] E[dy^2]) is 1 for a square, whose coordinates are independent, and 2/3 for a circle
# (1.00..1.03 and 0.66..0.69 real; 0.93 and 0.80 blurred and noisy). A box's fill ratio would
# part circles from triangles on clean masks by only 0.67 against 0.66 and fails under blur.
_TRIANGLE_SKEW = -0.2
_SQUARE_CROSS = 0.86
_PALETTE_C3 = np.array(list(synthetic_shapes.COLORS.values()), np.float32)


@dataclass(frozen=True)
class _Frames:
  """Per-frame measurements of the object (union of the blobs big enough to count)."""
  mask_THW: np.ndarray     # bool
  count_T: np.ndarray      # number of blobs
  area_T: np.ndarray       # pixels in the mask
  center_T2: np.ndarray    # brightness-weighted centroid (y, x) in pixels; nan where empty
  mask_center_T2: np.ndarray  # the mask's own centroid, to align masks; nan where empty
  light_box_T4: np.ndarray  # first and last lit row and column (y0, x0, y1, x1); -1 if empty
  skew_T: np.ndarray       # vertical skewness of the light; nan where empty
  cross_T: np.ndarray      # E[dx^2 dy^2] / (E[dx^2] E[dy^2]) of the light; nan where empty
  colour_T3: np.ndarray    # mean colour inside the mask; nan where the frame is empty

  @property
  def present_T(self) -> np.ndarray:
    return self.area_T > 0


def _check_video(video_THWC: np.ndarray) -> np.ndarray:
  video_THWC = np.asarray(video_THWC, np.float32)
  if video_THWC.ndim != 4 or video_THWC.shape[-1] != 3 or video_THWC.shape[0] < 2:
    raise ValueError(f"video shape {video_THWC.shape} is not [T, H, W, 3] with T >= 2: pass one "
                     f"RGB video in [-1, 1] of at least two frames (frames first)")
  return video_THWC


def _box(mask_THW: np.ndarray) -> np.ndarray:
  """First and last occupied row and column per frame, ``(y0, x0, y1, x1)``; -1 where empty."""
  _, H, W = mask_THW.shape
  rows_TH = mask_THW.any(2)
  cols_TW = mask_THW.any(1)
  box_T4 = np.stack([rows_TH.argmax(1), cols_TW.argmax(1),
                     H - 1 - rows_TH[:, ::-1].argmax(1), W - 1 - cols_TW[:, ::-1].argmax(1)], -1)
  box_T4[~rows_TH.any(1)] = -1
  return box_T4


def _measure(video_THWC: np.ndarray) -> _Frames:
  T, H, W, _ = video_THWC.shape
  bright_THW = video_THWC.max(-1) > _FOREGROUND
  # Blobs are found in each frame separately: the structure connects pixels within a frame
  # (8-neighbourhood) and never across frames.
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = True
  blobs_THW, n = ndimage.label(bright_THW, structure)
  sizes = np.bincount(blobs_THW.ravel(), minlength=n + 1)
  keep = sizes >= max(1.0, _MIN_BLOB_FRACTION * H * W)
  keep[0] = False
  mask_THW = keep[blobs_THW]
  # Labels are numbered in scan order, so a blob's first pixel tells its frame.
  _, first = np.unique(blobs_THW.ravel(), return_index=True)
  kept_ids = np.flatnonzero(keep)
  count_T = np.bincount(first[kept_ids] // (H * W), minlength=T)

  area_T = mask_THW.sum((1, 2))
  empty_T = area_T == 0
  y_H = np.arange(H, dtype=np.float64) + 0.5
  x_W = np.arange(W, dtype=np.float64) + 0.5
  safe_T = np.maximum(area_T, 1)
  mask_center_T2 = np.stack([mask_THW.sum(2) @ y_H / safe_T,
                             mask_THW.sum(1) @ x_W / safe_T], -1)
  mask_center_T2[empty_T] = np.nan
  # The centroid weighs pixels by brightness over the mask grown by a pixel: an anti-aliased or
  # blurred edge then places it to a fraction of a pixel, where the hard mask moves in whole
  # pixel steps (a 1-pixel jerk on a smooth track).
  weight_THW = np.clip(0.5 * (video_THWC.max(-1) + 1.0), 0.0, 1.0)
  weight_THW *= ndimage.binary_dilation(mask_THW, structure)
  total_T = np.maximum(weight_THW.sum((1, 2)), 1e-6)
  # A triangle's sharp corners fall short of the mask by up to a pixel and a half; its light
  # reaches the frame's edge when it bounces.
  light_box_T4 = _box(weight_THW > 0.05)
  center_T2 = np.stack([weight_THW.sum(2) @ y_H / total_T, weight_THW.sum(1) @ x_W / total_T], -1)
  center_T2[empty_T] = np.nan
  dy_TH = y_H[None, :] - center_T2[:, :1]
  dx_TW = x_W[None, :] - center_T2[:, 1:]
  row_TH = weight_THW.sum(2) / total_T[:, None]
  col_TW = weight_THW.sum(1) / total_T[:, None]
  var_y_T = np.maximum((row_TH * dy_TH**2).sum(1), 1e-6)
  var_x_T = np.maximum((col_TW * dx_TW**2).sum(1), 1e-6)
  skew_T = (row_TH * dy_TH**3).sum(1) / var_y_T**1.5
  cross_T = (np.einsum("thw,th,tw->t", weight_THW, dy_TH**2, dx_TW**2) / total_T
             / (var_y_T * var_x_T))
  # The colour is the mean over the mask's interior (less its one-pixel rim), where the object
  # is not mixed with the background: the rim's share changes as the object moves over the pixel
  # grid. A blob too thin to have an interior uses all of its pixels.
  inner_THW = ndimage.binary_erosion(mask_THW, structure)
  thin_T = ~inner_THW.any((1, 2))
  inner_THW[thin_T] = mask_THW[thin_T]
  colour_T3 = (np.einsum("thwc,thw->tc", video_THWC, inner_THW.astype(np.float32))
               / np.maximum(inner_THW.sum((1, 2)), 1)[:, None])
  colour_T3[empty_T] = np.nan
  return _Frames(mask_THW, count_T, area_T, center_T2, mask_center_T2, light_box_T4, skew_T,
                 cross_T, colour_T3)


def _nanmean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _colour_flicker(f: _Frames) -> float:
  # Pairs with an empty frame have no colour change to measure (vanish counts those).
  return _nanmean(np.linalg.norm(np.diff(f.colour_T3, axis=0), axis=-1))


def _vbench_flicker(video_THWC: np.ndarray) -> float:
  # VBench's model-free temporal flickering score, on 0..255 pixel values (not rounded to
  # integers: samples are floats, and rounding would only add quantisation noise).
  pixels_THWC = (np.clip(video_THWC, -1.0, 1.0) + 1.0) * 127.5
  mean_abs_diff = np.abs(np.diff(pixels_THWC, axis=0)).mean()
  return float((255.0 - mean_abs_diff) / 255.0)


def _shifted_iou(a_HW: np.ndarray, b_HW: np.ndarray, dy: int, dx: int) -> float:
  """IoU of ``a`` with ``b`` moved by ``(dy, dx)`` pixels (what leaves the frame is dropped)."""
  H, W = a_HW.shape
  if abs(dy) >= H or abs(dx) >= W:
    inter = 0
  else:
    a_win = a_HW[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)]
    b_win = b_HW[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    inter = int(np.count_nonzero(a_win & b_win))
  union = int(a_HW.sum()) + int(b_HW.sum()) - inter
  return inter / union


def _shape_drift(f: _Frames) -> float:
  drift = np.ones(len(f.area_T) - 1)  # a pair with an empty frame has nothing of its shape left
  for t in np.flatnonzero(f.present_T[:-1] & f.present_T[1:]):
    dy, dx = np.rint(f.mask_center_T2[t] - f.mask_center_T2[t + 1]).astype(int)
    drift[t] = 1.0 - _shifted_iou(f.mask_THW[t], f.mask_THW[t + 1], int(dy), int(dx))
  return float(drift.mean())


def _area_variation(f: _Frames) -> float:
  mean = f.area_T.mean()
  return float(f.area_T.std() / mean) if mean > 0 else float("nan")


def _vanish(f: _Frames) -> float:
  present_T = f.present_T
  if not present_T.any():
    return 1.0
  # The reference is the object as it usually looks when it is there: medians over the frames
  # that show something, so a mostly empty video still scores as mostly vanished.
  count = np.median(f.count_T[present_T])
  area = np.median(f.area_T[present_T])
  lo, hi = _VANISH_BAND
  ok_T = present_T & (f.count_T == count) & (f.area_T >= lo * area) & (f.area_T <= hi * area)
  return float(1.0 - ok_T.mean())


def _inside(f: _Frames, H: int, W: int) -> np.ndarray:
  """Frames whose object's light keeps ``_EDGE_MARGIN`` pixels from every edge (no bounce)."""
  y0_T, x0_T, y1_T, x1_T = f.light_box_T4.T
  return (f.present_T & (y0_T >= _EDGE_MARGIN) & (x0_T >= _EDGE_MARGIN)
          & (y1_T <= H - 1 - _EDGE_MARGIN) & (x1_T <= W - 1 - _EDGE_MARGIN))


def _stall(f: _Frames, H: int, W: int) -> float:
  # Per pair of frames away from the edges (a bounce turns the object round in between, so its
  # step there can be short): max(0, 1 - step / slowest step), 0 at any speed the source draws
  # and 1 for an object that stands still.
  inside_T = _inside(f, H, W)
  ok_T = inside_T[:-1] & inside_T[1:]
  if not ok_T.any():
    return float("nan")
  step_T = np.linalg.norm(np.diff(f.center_T2, axis=0), axis=-1)[ok_T]
  return float(np.maximum(0.0, 1.0 - step_T / (_SLOWEST_SPEED * min(H, W))).mean())


def _motion_jerk(f: _Frames, H: int, W: int) -> float:
  inside_T = _inside(f, H, W)
  # A bounce reverses the velocity between two frames, one of which is at the edge: the
  # acceleration at t qualifies only when frames t-1, t and t+1 are all away from the edges.
  ok_T = inside_T[:-2] & inside_T[1:-1] & inside_T[2:]
  if not ok_T.any():
    return float("nan")
  c_T2 = f.center_T2
  accel_T2 = c_T2[2:] - 2.0 * c_T2[1:-1] + c_T2[:-2]
  return float(np.linalg.norm(accel_T2[ok_T], axis=-1).mean() / np.sqrt(H * W))


def _shape_of(f: _Frames) -> np.ndarray:
  """Shape index per frame (``synthetic_shapes.SHAPES``) from the light's moments; -1 if empty."""
  shape_T = np.where(f.skew_T < _TRIANGLE_SKEW, 2, np.where(f.cross_T > _SQUARE_CROSS, 1, 0))
  return np.where(f.present_T, shape_T, -1)


def _label_ok(f: _Frames, label: int) -> float:
  want_shape, want_colour = divmod(int(label), len(synthetic_shapes.COLORS))
  present_T = f.present_T
  if not present_T.any():
    return 0.0
  colour_3 = np.median(f.colour_T3[present_T], axis=0)
  colour = int(np.argmin(np.linalg.norm(_PALETTE_C3 - colour_3, axis=-1)))
  # The requested shape must be what more than half of the frames with an object show: a video
  # that is half circle, half square shows neither.
  shape_votes = np.count_nonzero(_shape_of(f)[present_T] == want_shape)
  return float(colour == want_colour and 2 * shape_votes > np.count_nonzero(present_T))


def score_video(video_THWC: np.ndarray, label: int | None = None) -> dict[str, float]:
  """Every metric of ``METRICS`` for one video f32 ``[T, H, W, 3]`` in ``[-1, 1]`` (T >= 2).

  ``label`` is the class the video was asked for (``shape_idx * 6 + colour_idx``); without it
  ``label_ok`` is nan. Metrics that have nothing to measure (no object in any frame, no frame
  away from the edges) are nan.
  """
  video_THWC = _check_video(video_THWC)
  if label is not None and not 0 <= int(label) < synthetic_shapes.NUM_CLASSES:
    raise ValueError(f"label {label} is out of range: synthetic_shapes labels are "
                     f"0..{synthetic_shapes.NUM_CLASSES - 1}, or None to skip label_ok")
  _, H, W, _ = video_THWC.shape
  f = _measure(video_THWC)
  return {
      "colour_flicker": _colour_flicker(f),
      "vbench_flicker": _vbench_flicker(video_THWC),
      "shape_drift": _shape_drift(f),
      "area_variation": _area_variation(f),
      "vanish": _vanish(f),
      "motion_jerk": _motion_jerk(f, H, W),
      "stall": _stall(f, H, W),
      "label_ok": float("nan") if label is None else _label_ok(f, label),
  }


# Frames over which the direction an object sets off in is measured: four, so that at least two
# temporal patches of the default model (2 frames each) take part. Within one patch a model can
# move the object the caption's way while the next patches carry it elsewhere, which two frames
# would score as following the caption. More frames see more bounces: 300 real videos of 8 to 16
# frames at the default sizes and speeds score 0.95 over two frames, 0.84 over four, 0.78 over
# five. ``temporal`` passes two patches' worth when a model's patches are deeper.
DIRECTION_FRAMES = 4
_DIRECTION_TOLERANCE = math.pi / 4  # a direction names a 45-degree sector: its half plus margin


def direction_ok(video_THWC: np.ndarray, direction: str, frames: int = DIRECTION_FRAMES) -> float:
  """1 if the object sets off in ``direction`` (a ``data.motion.DIRECTIONS`` name, as captions
  give it), 0 if not or if it is missing from the first frames: the least-squares velocity of its
  centroid over the first ``frames`` frames within 45 degrees of the direction's angle, and
  faster than a tenth of a pixel per frame."""
  if direction not in motion.DIRECTIONS:
    raise ValueError(f"direction {direction!r} is not one of {motion.DIRECTIONS}")
  if frames < 2:
    raise ValueError(f"direction_ok(frames={frames}): a motion needs frames >= 2")
  f = _measure(_check_video(video_THWC))
  n = min(frames, len(f.area_T))
  if not f.present_T[:n].all():  # n >= 2: frames >= 2 and _check_video's T >= 2
    return 0.0
  # The slope of a line through the centroids: every frame counts, so a jump between two
  # frames cannot stand for the whole start of the path.
  t_N = np.arange(n) - (n - 1) / 2
  c_N2 = f.center_T2[:n] - f.center_T2[:n].mean(0)
  dy, dx = (t_N[:, None] * c_N2).sum(0) / (t_N ** 2).sum()
  want = motion.DIRECTIONS.index(direction) * math.pi / 4  # "right" = 0, counter-clockwise
  got = math.atan2(-dy, dx)  # y grows downwards
  diff = abs((got - want + math.pi) % (2 * math.pi) - math.pi)
  return float(diff <= _DIRECTION_TOLERANCE and math.hypot(dy, dx) > 0.1)


def caption_direction(caption: str) -> str | None:
  """The direction of the first object a synthetic caption describes (``"... moving left"``)."""
  words = caption.split()
  if "moving" not in words or words.index("moving") + 1 >= len(words):
    return None
  return words[words.index("moving") + 1]


def score_videos(videos: Sequence[np.ndarray],
                 labels: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """``score_video`` over videos of any sizes: metric name -> f64 ``[N]``, in ``METRICS`` order."""
  if labels is not None and len(labels) != len(videos):
    raise ValueError(f"{len(labels)} labels for {len(videos)} videos: pass one label per video, "
                     f"or labels=None to skip label_ok")
  scores = [score_video(v, None if labels is None else labels[i]) for i, v in enumerate(videos)]
  return {name: np.array([s[name] for s in scores], np.float64) for name in METRICS}


def summarize(values: np.ndarray) -> tuple[float, float]:
  """``(mean, half-width of the 95% confidence interval)`` over the non-nan values.

  The half-width is ``1.96 * std / sqrt(n)`` with the sample standard deviation (``ddof=1``);
  it is nan below two values, where the spread is unknown.
  """
  values = np.asarray(values, np.float64).ravel()
  finite = values[~np.isnan(values)]
  n = finite.size
  if n == 0:
    return float("nan"), float("nan")
  if n == 1:
    return float(finite[0]), float("nan")
  return float(finite.mean()), float(1.96 * finite.std(ddof=1) / np.sqrt(n))
