"""Moving digits: scikit-learn's bundled 8x8 handwritten digits, upscaled and bouncing on black.

Why this source: real handwriting (1797 scans shipped inside scikit-learn, so nothing is
downloaded) in the same procedural motion as synthetic_shapes: a harder appearance to learn with
the same exact ground truth. Sizes, durations and aspect ratios are drawn from the same
``data.frames`` / ``data.side`` / ``data.aspect_ratios`` ranges (``data.motion``); a digit's box
side is ``data.object_size`` times the shorter side, its speed ``data.speed``.

Item ``i`` is a pure function of ``(seed, i)``. Each digit is placed with sub-pixel precision by
bilinear resampling (separable: a ``[H, 8]`` and a ``[W, 8]`` weight matrix per frame), so motion
is smooth rather than stepping by whole pixels. Digits are drawn back to front, so digit 0 (the
label) is on top. ``data.channels`` may be 1 (grey) or 3 (the grey copied to RGB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data import motion

NUM_CLASSES = 10


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Images in [0, 1] ``[N, 8, 8]`` and their digits ``[N]``."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def _place_weights(centre_T: np.ndarray, size: float, n: int) -> np.ndarray:
  """``[T, n, 8]`` bilinear weights that put an 8-pixel axis of ``size`` pixels at ``centre_T``.

  Outside the digit's box the weights fall to zero, so the canvas stays black there.
  """
  pix_N = np.arange(n, dtype=np.float32) + 0.5  # pixel centres
  u_TN = (pix_N[None, :] - centre_T[:, None]) / size * 8.0 + 3.5  # digit pixel coordinate
  return np.maximum(0.0, 1.0 - np.abs(u_TN[..., None] - np.arange(8, dtype=np.float32)))


class MovingDigits(motion.MovingSource):
  """Random-access source of moving-digit videos; see the module docstring.

  Each item is a dict: ``video`` f32 ``[T, H, W, C]`` in ``[-1, 1]``, ``label`` (the first digit),
  ``caption`` str, and ground truth ``gt_digits`` int ``[K]``, ``gt_index`` int ``[K]`` (which
  scan of ``load_digits``), ``gt_boxes`` f32 ``[K, T, 4]`` (``(y0, x0, y1, x1)`` of each digit's
  box per frame) for its ``K`` digits.
  """

  def __init__(self, *, channels: int = 1, num_classes: int = NUM_CLASSES, **ranges):
    """``ranges``: ``motion.MovingSource``'s arguments (sizes, motion, patch, count, seed)."""
    if int(num_classes) != NUM_CLASSES:
      raise ValueError(f"model.num_classes={num_classes} but moving_digits has {NUM_CLASSES} "
                       f"labels (the digits 0-9): set model.num_classes={NUM_CLASSES}")
    if int(channels) not in (1, 3):
      raise ValueError(f"data.channels={channels}: moving_digits renders grey (1) or RGB (3)")
    super().__init__(**ranges)
    self.channels = int(channels)
    self.images, self.digits = _load_digits()

  OBJECT_WORDS = tuple(str(d) for d in range(NUM_CLASSES))
  OBJECT_WORD_CLASSES = {"digit": OBJECT_WORDS}

  @classmethod
  def from_config(cls, config) -> "MovingDigits":
    return cls(channels=config.data.channels, num_classes=config.model.num_classes,
               **cls.config_fields(config))

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = self._rng(index)
    T, H, W = self._draw_size(rng)
    k = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
    which_K = rng.integers(len(self.images), size=k)
    t_T = np.arange(T, dtype=np.float32)
    ink_THW = np.zeros((T, H, W), np.float32)
    boxes_KT4 = np.zeros((k, T, 4), np.float32)
    directions = []
    for j in range(k):
      size = rng.uniform(*self.object_size) * min(H, W)
      cy_T, cx_T, direction = motion.draw_track(rng, H, W, size / 2, size / 2, self.speed, t_T)
      directions.append(direction)
      boxes_KT4[j] = np.stack([cy_T - size / 2, cx_T - size / 2, cy_T + size / 2,
                               cx_T + size / 2], -1)
      wy_THi = _place_weights(cy_T, size, H)
      wx_TWj = _place_weights(cx_T, size, W)
      digit_THW = np.einsum("thi,ij,twj->thw", wy_THi, self.images[which_K[j]], wx_TWj)
      # White ink over what is there: 1 - prod(1 - ink), the same in any drawing order.
      ink_THW += np.clip(digit_THW, 0.0, 1.0) * (1.0 - ink_THW)
    video_THWC = np.repeat((2.0 * ink_THW - 1.0)[..., None], self.channels, -1)
    digits_K = self.digits[which_K]
    names = [f"{d} moving {m}" for d, m in zip(digits_K, directions)]
    return {
        "video": video_THWC.astype(np.float32),
        "label": int(digits_K[0]),
        "caption": motion.caption(names),
        "gt_digits": digits_K.astype(np.int32),
        "gt_index": which_K.astype(np.int32),
        "gt_boxes": boxes_KT4,
    }
