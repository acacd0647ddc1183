"""Corruptions of real synthetic_shapes videos, each breaking one thing a metric should see.

``tests/test_video_metrics.py`` validates ``evals.video_metrics`` with them: a metric should score
real videos near its ideal, move the bad way under the corruptions it is meant to catch, and move
further at a higher ``strength`` (0 leaves the video unchanged, 1 is the strongest). Every
corruption is deterministic given its ``np.random.Generator``. The ones that change the scene
(position, shape, presence) redraw the item with ``synthetic_shapes.render`` from its ground
truth, so everything else stays exactly as it was; they change object 0, the labelled one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from data import synthetic_shapes

Corruption = Callable[[dict[str, Any], float, np.random.Generator], np.ndarray]

_PALETTE_C3 = np.array(list(synthetic_shapes.COLORS.values()), np.float32)


def _check_strength(strength: float) -> float:
  strength = float(strength)
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength} is outside [0, 1]: 0 leaves the video unchanged, 1 is "
                     f"the strongest corruption")
  return strength


def _how_many(strength: float, n: int) -> int:
  """``strength * n`` rounded half up (Python's ``round`` goes to even: 3.5 -> 4 but 4.5 -> 4)."""
  return int(np.floor(strength * n + 0.5))


def _redraw(item: dict[str, Any], shapes_KT: np.ndarray, centers_KT2: np.ndarray,
            first: int = 0) -> np.ndarray:
  """The item's video with its objects ``first:`` given these shapes and centres."""
  _, H, W, _ = item["video"].shape
  video_THWC, _, _ = synthetic_shapes.render(
      shapes_KT, item["gt_colors"][first:], centers_KT2[..., 0], centers_KT2[..., 1],
      item["gt_radius"][first:], H, W)
  return video_THWC


def shuffle_frames(video_THWC: np.ndarray, strength: float,
                   rng: np.random.Generator) -> np.ndarray:
  """A fraction ``strength`` of the frames, chosen at random, trade places among themselves.

  The chosen frames move along one cycle, so every one of them lands somewhere else (a plain
  random permutation leaves some in place and would make the strength a loose promise).
  """
  strength = _check_strength(strength)
  video_THWC = np.array(video_THWC, np.float32)
  chosen = rng.permutation(len(video_THWC))[:_how_many(strength, len(video_THWC))]
  if len(chosen) > 1:
    video_THWC[chosen] = video_THWC[np.roll(chosen, 1)]
  return video_THWC


def colour_jitter(video_THWC: np.ndarray, strength: float,
                  rng: np.random.Generator) -> np.ndarray:
  """Each frame's colour blended a fraction ``strength`` towards a random other palette colour.

  Works on the pixels alone: over black, a pixel is ``-1 + coverage * (colour + 1)`` and every
  palette colour has a channel at 1, so the brightest channel gives the coverage and the rest the
  colour. The blended colour is brightened until its brightest channel is at 1 again, so the
  object keeps its coverage and stays visible: this breaks colour, not presence.
  """
  strength = _check_strength(strength)
  video_THWC = np.array(video_THWC, np.float32)
  if strength == 0.0:
    return video_THWC
  coverage_THW = np.clip(0.5 * (video_THWC.max(-1) + 1.0), 0.0, 1.0)
  lit_THW = coverage_THW > 0
  colour_N3 = -1.0 + (video_THWC[lit_THW] + 1.0) / coverage_THW[lit_THW][:, None]
  if not len(colour_N3):
    return video_THWC
  # Away from the video's own colour (the palette colour nearest its solid pixels), so at
  # strength 1 no frame keeps it.
  solid_N3 = colour_N3[coverage_THW[lit_THW] > 0.5]
  own = int(np.argmin(np.linalg.norm(_PALETTE_C3 - np.median(solid_N3, 0), axis=-1)))
  others = np.array([c for c in range(len(_PALETTE_C3)) if c != own])
  target_T3 = _PALETTE_C3[rng.choice(others, size=len(video_THWC))]
  frame_N = np.nonzero(lit_THW)[0]
  blend_N3 = (1.0 - strength) * colour_N3 + strength * target_T3[frame_N]
  blend_N3 += 1.0 - blend_N3.max(-1, keepdims=True)
  video_THWC[lit_THW] = -1.0 + coverage_THW[lit_THW][:, None] * (blend_N3 + 1.0)
  return video_THWC


def remove_object(item: dict[str, Any], strength: float, rng: np.random.Generator) -> np.ndarray:
  """Object 0 erased from ``strength * (T - 1)`` random frames (what was behind it shows).

  At most ``T - 1``: a video whose object never appears has no area or motion left to vary, and
  its metrics would be undefined rather than bad.
  """
  strength = _check_strength(strength)
  video_THWC = np.array(item["video"], np.float32)
  T = len(video_THWC)
  erased = rng.permutation(T)[:_how_many(strength, T - 1)]
  if len(erased):
    without_THWC = _redraw(item, item["gt_shapes"][1:], item["gt_centers"][1:], first=1)
    video_THWC[erased] = without_THWC[erased]
  return video_THWC


def swap_shape(item: dict[str, Any], strength: float, rng: np.random.Generator) -> np.ndarray:
  """Object 0 drawn with a wrong shape in each frame with probability ``strength``.

  The wrong frames take the two other shapes in turn, so a run of wrong frames keeps changing
  shape too: a stronger corruption means both more frames showing a wrong shape and more shape
  changes between frames (strength 1 never shows the right shape, and changes it every frame).
  """
  strength = _check_strength(strength)
  if strength == 0.0:
    return np.array(item["video"], np.float32)
  T = len(item["video"])
  shapes_KT = np.repeat(np.asarray(item["gt_shapes"])[:, None], T, axis=1)
  right = int(shapes_KT[0, 0])
  wrong = [s for s in range(len(synthetic_shapes.SHAPES)) if s != right]
  frames = np.flatnonzero(rng.random(T) < strength)
  first = int(rng.integers(len(wrong)))
  shapes_KT[0, frames] = [wrong[(first + i) % len(wrong)] for i in range(len(frames))]
  return _redraw(item, shapes_KT, item["gt_centers"])


def independent_positions(item: dict[str, Any], strength: float,
                          rng: np.random.Generator) -> np.ndarray:
  """Object 0 placed anywhere in the frame (uniformly, fully inside) in ``strength * T`` random
  frames, independently of its track."""
  strength = _check_strength(strength)
  if strength == 0.0:
    return np.array(item["video"], np.float32)
  _, H, W, _ = item["video"].shape
  T = len(item["video"])
  centers_KT2 = np.array(item["gt_centers"], np.float32)
  frames = rng.permutation(T)[:_how_many(strength, T)]
  box_F4 = item["gt_boxes"][0, frames]
  half_y_F = 0.5 * (box_F4[:, 2] - box_F4[:, 0])
  half_x_F = 0.5 * (box_F4[:, 3] - box_F4[:, 1])
  centers_KT2[0, frames, 0] = rng.uniform(half_y_F, np.maximum(H - half_y_F, half_y_F))
  centers_KT2[0, frames, 1] = rng.uniform(half_x_F, np.maximum(W - half_x_F, half_x_F))
  return _redraw(item, item["gt_shapes"], centers_KT2)


def slow_motion(item: dict[str, Any], strength: float,
                rng: np.random.Generator) -> np.ndarray:
  """Object 0's track drawn ``strength`` of the way back to its first position: its speed times
  ``1 - strength`` (standing still at 1), its bounces shrunk the same way."""
  del rng  # deterministic
  strength = _check_strength(strength)
  centers_KT2 = np.array(item["gt_centers"], np.float32)
  centers_KT2[0] = centers_KT2[0, :1] + (1.0 - strength) * (centers_KT2[0] - centers_KT2[0, :1])
  return _redraw(item, item["gt_shapes"], centers_KT2)


def _on_video(corrupt: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]) -> Corruption:
  def on_item(item: dict[str, Any], strength: float, rng: np.random.Generator) -> np.ndarray:
    return corrupt(item["video"], strength, rng)
  on_item.__name__ = corrupt.__name__
  on_item.__doc__ = corrupt.__doc__
  return on_item


# Name -> corruption, all called as ``(item, strength, rng) -> video``.
CORRUPTIONS: dict[str, Corruption] = {
    "shuffle_frames": _on_video(shuffle_frames),
    "colour_jitter": _on_video(colour_jitter),
    "remove_object": remove_object,
    "swap_shape": swap_shape,
    "independent_positions": independent_positions,
    "slow_motion": slow_motion,
}
