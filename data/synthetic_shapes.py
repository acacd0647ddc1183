"""Synthetic shapes: coloured shapes moving and bouncing on black, the embedded default data.

Why this source: it needs no download, renders in about a millisecond, and has just enough
structure for a small video DiT to learn in minutes on a CPU (shape, colour, constant motion,
bounces), with ground truth (masks, boxes, colours) to score what samples get right. Sizes,
durations and aspect ratios vary per video, which is what exercises packing and 3D RoPE.

Item ``i`` is a pure function of ``(seed, i)`` through ``np.random.default_rng([seed, i])``, so
the source is random-access and any worker can render any item (grain MapDataset source).

Conventions: pixel ``(y, x)`` covers ``[y, y + 1) x [x, x + 1)``; boxes are ``(y0, x0, y1, x1)``
in those pixel units. Objects are drawn in reverse order, so object 0 (the one that sets the
label) is on top and always fully visible; ``gt_masks`` are whole shapes (pixel centre inside
the shape), not the visible parts. Colours are in the video's range ``[-1, 1]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data import motion

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
}
COLOR_NAMES = tuple(COLORS)
NUM_CLASSES = len(SHAPES) * len(COLORS)  # label = shape_idx * 6 + colour_idx
_RGB = np.array(list(COLORS.values()), np.float32)

# A triangle's circumradius relative to the object radius r, and its half extents (y, x) in units
# of r. 1.15 makes it about as wide as the circle; its box is centred on the object position.
_TRI_R = 1.15
_HALF_EXTENT = {0: (1.0, 1.0), 1: (1.0, 1.0), 2: (0.75 * _TRI_R, 0.5 * math.sqrt(3) * _TRI_R)}


def label_name(label: int) -> str:
  """``7 -> "green square"``."""
  label = int(label)
  if not 0 <= label < NUM_CLASSES:
    raise ValueError(f"label {label} is out of range: synthetic_shapes labels are 0..{NUM_CLASSES - 1}")
  shape, color = divmod(label, len(COLORS))
  return f"{COLOR_NAMES[color]} {SHAPES[shape]}"


def _signed_distance(shape: int, dy_THW: np.ndarray, dx_THW: np.ndarray, r: float) -> np.ndarray:
  """Approximate signed distance in pixels (negative inside); exact near the edges."""
  if shape == 0:
    return np.sqrt(dy_THW * dy_THW + dx_THW * dx_THW) - r
  if shape == 1:
    return np.maximum(np.abs(dy_THW), np.abs(dx_THW)) - r
  # Upward equilateral triangle: max over its three edges' half-planes. Its centroid sits R/4 below
  # the box centre, so shift by that to keep the box centred on the object position.
  big_r = _TRI_R * r
  dy_THW = dy_THW - 0.25 * big_r
  s = 0.5 * math.sqrt(3)
  d_THW = np.maximum(dy_THW, -0.5 * dy_THW + s * np.abs(dx_THW))
  return d_THW - 0.5 * big_r


class SyntheticShapes(motion.MovingSource):
  """Random-access source of moving-shape videos; see the module docstring.

  Each item is a dict: ``video`` f32 ``[T, H, W, 3]`` in ``[-1, 1]``, ``label`` int, ``caption``
  str, and ground truth ``gt_masks`` bool ``[K, T, H, W]``, ``gt_boxes`` f32 ``[K, T, 4]``,
  ``gt_colors`` f32 ``[K, 3]``, ``gt_shapes`` int ``[K]`` for its ``K`` objects.
  """

  def __init__(self, *, num_classes: int = NUM_CLASSES, **ranges):
    """``ranges``: ``motion.MovingSource``'s arguments (sizes, motion, patch, count, seed)."""
    if int(num_classes) != NUM_CLASSES:
      raise ValueError(f"model.num_classes={num_classes} but synthetic_shapes has {NUM_CLASSES} "
                       f"labels ({len(SHAPES)} shapes x {len(COLORS)} colours): set "
                       f"model.num_classes={NUM_CLASSES}")
    super().__init__(**ranges)

  @classmethod
  def from_config(cls, config) -> "SyntheticShapes":
    return cls(num_classes=config.model.num_classes, **cls.config_fields(config))

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = self._rng(index)
    T, H, W = self._draw_size(rng)
    k = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
    shapes_K = rng.integers(len(SHAPES), size=k)
    colors_K = rng.integers(len(COLORS), size=k)
    t_T = np.arange(T, dtype=np.float32)
    y_H = np.arange(H, dtype=np.float32) + 0.5  # pixel centres
    x_W = np.arange(W, dtype=np.float32) + 0.5
    video_THWC = np.full((T, H, W, 3), -1.0, np.float32)
    masks_KTHW = np.zeros((k, T, H, W), bool)
    boxes_KT4 = np.zeros((k, T, 4), np.float32)
    directions, alphas = [], []
    for j in range(k):
      r = 0.5 * rng.uniform(*self.object_size) * min(H, W)
      half_y, half_x = (f * r for f in _HALF_EXTENT[int(shapes_K[j])])
      cy_T, cx_T, direction = motion.draw_track(rng, H, W, half_y, half_x, self.speed, t_T)
      directions.append(direction)
      dist_THW = _signed_distance(int(shapes_K[j]), y_H[None, :, None] - cy_T[:, None, None],
                                  x_W[None, None, :] - cx_T[:, None, None], r)
      masks_KTHW[j] = dist_THW <= 0
      boxes_KT4[j] = np.stack([cy_T - half_y, cx_T - half_x, cy_T + half_y, cx_T + half_x], -1)
      # Coverage ramps linearly over one pixel across the edge: cheap anti-aliasing, and
      # coverage >= 0.5 exactly where the mask is set.
      alphas.append(np.clip(0.5 - dist_THW, 0.0, 1.0))
    for j in reversed(range(k)):  # back to front, so object 0 ends on top
      video_THWC += alphas[j][..., None] * (_RGB[colors_K[j]] - video_THWC)
    names = [f"{COLOR_NAMES[c]} {SHAPES[s]} moving {d}"
             for s, c, d in zip(shapes_K, colors_K, directions)]
    return {
        "video": video_THWC,
        "label": int(shapes_K[0]) * len(COLORS) + int(colors_K[0]),
        "caption": "a " + " and a ".join(names),
        "gt_masks": masks_KTHW,
        "gt_boxes": boxes_KT4,
        "gt_colors": _RGB[colors_K].copy(),
        "gt_shapes": shapes_K.astype(np.int32),
    }
