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


def render(shapes_K: np.ndarray, rgb_K3: np.ndarray, cy_KT: np.ndarray, cx_KT: np.ndarray,
           r_K: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws ``K`` objects on black: ``(video_THWC, masks_KTHW, boxes_KT4)`` as in the items.

  ``shapes_K`` int ``[K]`` (indices into ``SHAPES``), or ``[K, T]`` for a shape per frame;
  ``rgb_K3`` colours in ``[-1, 1]``; ``cy_KT, cx_KT`` f32 centres in pixels (``T`` frames);
  ``r_K`` object radii in pixels. Object 0 is drawn last, so it is on top. Rendering an item's
  ``gt_shapes, gt_colors, gt_centers[..., 0], gt_centers[..., 1], gt_radius`` gives back its
  video bit for bit, which is what lets evaluations re-render an item with one thing changed.
  """
  cy_KT = np.asarray(cy_KT, np.float32)
  cx_KT = np.asarray(cx_KT, np.float32)
  k, T = cy_KT.shape
  shapes_KT = np.asarray(shapes_K)
  if shapes_KT.ndim == 1:
    shapes_KT = np.repeat(shapes_KT[:, None], T, axis=1)
  if shapes_KT.shape != (k, T) or cx_KT.shape != (k, T) or len(r_K) != k or len(rgb_K3) != k:
    raise ValueError(f"render got shapes {np.shape(shapes_K)}, colours {np.shape(rgb_K3)}, centres "
                     f"{cy_KT.shape} and {cx_KT.shape}, radii {np.shape(r_K)}: pass [K] or [K, T] "
                     f"shapes, [K, 3] colours, [K, T] centres and [K] radii for the same K and T")
  rgb_K3 = np.asarray(rgb_K3, np.float32)
  y_H = np.arange(H, dtype=np.float32) + 0.5  # pixel centres
  x_W = np.arange(W, dtype=np.float32) + 0.5
  video_THWC = np.full((T, H, W, 3), -1.0, np.float32)
  masks_KTHW = np.zeros((k, T, H, W), bool)
  boxes_KT4 = np.zeros((k, T, 4), np.float32)
  alphas = []
  for j in range(k):
    # A Python float radius, as the items were first drawn with: it keeps the float32 arithmetic
    # below identical to theirs.
    r = float(r_K[j])
    cy_T, cx_T = cy_KT[j], cx_KT[j]
    dist_THW = np.empty((T, H, W), np.float32)
    for shape in np.unique(shapes_KT[j]):
      frames = shapes_KT[j] == shape
      dist_THW[frames] = _signed_distance(int(shape), y_H[None, :, None] - cy_T[frames, None, None],
                                          x_W[None, None, :] - cx_T[frames, None, None], r)
      half_y, half_x = (f * r for f in _HALF_EXTENT[int(shape)])
      boxes_KT4[j, frames] = np.stack([cy_T[frames] - half_y, cx_T[frames] - half_x,
                                       cy_T[frames] + half_y, cx_T[frames] + half_x], -1)
    masks_KTHW[j] = dist_THW <= 0
    # Coverage ramps linearly over one pixel across the edge: cheap anti-aliasing, and
    # coverage >= 0.5 exactly where the mask is set.
    alphas.append(np.clip(0.5 - dist_THW, 0.0, 1.0))
  for j in reversed(range(k)):  # back to front, so object 0 ends on top
    video_THWC += alphas[j][..., None] * (rgb_K3[j] - video_THWC)
  return video_THWC, masks_KTHW, boxes_KT4


class SyntheticShapes(motion.MovingSource):
  """Random-access source of moving-shape videos; see the module docstring.

  Each item is a dict: ``video`` f32 ``[T, H, W, 3]`` in ``[-1, 1]``, ``label`` int, ``caption``
  str, and ground truth ``gt_masks`` bool ``[K, T, H, W]``, ``gt_boxes`` f32 ``[K, T, 4]``,
  ``gt_colors`` f32 ``[K, 3]``, ``gt_shapes`` int ``[K]``, ``gt_centers`` f32 ``[K, T, 2]``
  (y, x) and ``gt_radius`` f64 ``[K]`` for its ``K`` objects (``render`` redraws the video from
  them).
  """

  def __init__(self, *, num_classes: int = NUM_CLASSES, **ranges):
    """``ranges``: ``motion.MovingSource``'s arguments (sizes, motion, patch, count, seed)."""
    if int(num_classes) != NUM_CLASSES:
      raise ValueError(f"model.num_classes={num_classes} but synthetic_shapes has {NUM_CLASSES} "
                       f"labels ({len(SHAPES)} shapes x {len(COLORS)} colours): set "
                       f"model.num_classes={NUM_CLASSES}")
    super().__init__(**ranges)

  OBJECT_WORDS = (*COLOR_NAMES, *SHAPES)
  OBJECT_NAME_WORDS = 2  # colour and shape
  OBJECT_WORD_CLASSES = {"colour": COLOR_NAMES, "shape": SHAPES}

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
    # float64: the radius is drawn and used in double precision, and keeping it so lets
    # ``render`` reproduce the video exactly.
    r_K = np.zeros(k, np.float64)
    cy_KT = np.zeros((k, T), np.float32)
    cx_KT = np.zeros((k, T), np.float32)
    directions = []
    for j in range(k):  # radius then track per object: the order the stream is drawn in
      r_K[j] = 0.5 * rng.uniform(*self.object_size) * min(H, W)
      half_y, half_x = (f * r_K[j] for f in _HALF_EXTENT[int(shapes_K[j])])
      cy_KT[j], cx_KT[j], direction = motion.draw_track(rng, H, W, float(half_y), float(half_x),
                                                        self.speed, t_T)
      directions.append(direction)
    video_THWC, masks_KTHW, boxes_KT4 = render(shapes_K, _RGB[colors_K], cy_KT, cx_KT, r_K, H, W)
    names = [f"{COLOR_NAMES[c]} {SHAPES[s]} moving {d}"
             for s, c, d in zip(shapes_K, colors_K, directions)]
    return {
        "video": video_THWC,
        "label": int(shapes_K[0]) * len(COLORS) + int(colors_K[0]),
        "caption": motion.caption(names),
        "gt_masks": masks_KTHW,
        "gt_boxes": boxes_KT4,
        "gt_colors": _RGB[colors_K].copy(),
        "gt_shapes": shapes_K.astype(np.int32),
        "gt_centers": np.stack([cy_KT, cx_KT], -1),
        "gt_radius": r_K,
    }
