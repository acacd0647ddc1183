"""Sizes and motion shared by the sources: one size rule, one bouncing-track rule.

Every source draws a video's size the same way (frames in ``data.frames``, ``sqrt(H*W)`` in
``data.side``, W/H from ``data.aspect_ratios``, all on the patch grid through
``tokens.video_size``), so one config bounds the token counts and attention layouts of any source.
The procedural sources (synthetic_shapes, moving_digits) move their objects with ``draw_track``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vdit_jax import tokens as tok

DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")


def caption(names: Sequence[str]) -> str:
  """``["red circle moving left", ...]`` -> ``"a red circle moving left and a ..."``: the caption
  of a procedural video from its objects' descriptions, first object first."""
  return "a " + " and a ".join(names)


def check_range(name: str, value: Sequence[float]) -> None:
  """Raises unless ``data.<name>`` is ``(min, max)`` with ``0 < min <= max``."""
  if len(value) != 2 or value[0] > value[1] or value[0] <= 0:
    raise ValueError(f"data.{name}={tuple(value)} must be (min, max) with 0 < min <= max")


def check_aspect_ratios(aspect_ratios: Sequence[float]) -> None:
  if not aspect_ratios or min(aspect_ratios) <= 0:
    raise ValueError(f"data.aspect_ratios={tuple(aspect_ratios)} must be positive W/H ratios")


def draw_size(rng: np.random.Generator, frames: Sequence[int], side: Sequence[float],
              aspect_ratios: Sequence[float], patch: Sequence[int]) -> tuple[int, int, int]:
  """``(T, H, W)``: frames, side and aspect ratio drawn uniformly from their configured ranges."""
  t = int(rng.integers(frames[0], frames[1] + 1))
  s = rng.uniform(*side)
  aspect = aspect_ratios[int(rng.integers(len(aspect_ratios)))]
  return tok.video_size(t, s, aspect, patch)


def largest_size(frames: Sequence[int], side: Sequence[float], aspect_ratios: Sequence[float],
                 patch: Sequence[int]) -> tuple[int, int, int]:
  """The ``(T, H, W)`` with the most pixels ``draw_size`` can return, to check a token budget."""
  # Sizes grow with frames and side, so the largest uses both maxima; only the aspect varies.
  return max((tok.video_size(frames[1], side[1], a, patch) for a in aspect_ratios),
             key=lambda thw: thw[0] * thw[1] * thw[2])


class MovingSource:
  """What the procedural sources share: their configured ranges, ``len``, sizes drawn per index
  (``[seed, index]`` streams, so an item's size is known without rendering it) and the sizes'
  bounds. Subclasses render ``__getitem__`` from ``self._rng(index)``, drawing the size first."""

  def __init__(self, *, frames: Sequence[int], side: Sequence[float],
               aspect_ratios: Sequence[float], num_objects: Sequence[int],
               object_size: Sequence[float], speed: Sequence[float], patch: Sequence[int],
               num_videos: int, seed: int):
    for name, value in (("frames", frames), ("side", side), ("num_objects", num_objects),
                        ("object_size", object_size), ("speed", speed)):
      check_range(name, value)
    check_aspect_ratios(aspect_ratios)
    self.frames = tuple(int(v) for v in frames)
    self.side = tuple(float(v) for v in side)
    self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
    self.num_objects = tuple(int(v) for v in num_objects)
    self.object_size = tuple(float(v) for v in object_size)
    self.speed = tuple(float(v) for v in speed)
    self.patch = tuple(int(p) for p in patch)
    self.num_videos = int(num_videos)
    self.seed = int(seed)

  @staticmethod
  def config_fields(config) -> dict:
    """The constructor's arguments that come straight from a config."""
    d = config.data
    return dict(frames=d.frames, side=d.side, aspect_ratios=d.aspect_ratios,
                num_objects=d.num_objects, object_size=d.object_size, speed=d.speed,
                patch=config.model.patch, num_videos=d.num_videos, seed=config.seed)

  def __len__(self) -> int:
    return self.num_videos

  # The words naming one object in captions ("red circle", "7"): every word a subclass may use,
  # and how many of them name one object.
  OBJECT_WORDS: tuple[str, ...] = ()
  OBJECT_NAME_WORDS = 1
  # The object words by what they say, each a set of words one caption can swap for another
  # ("red" for "blue"): what ``caption_word_classes`` adds to the directions.
  OBJECT_WORD_CLASSES: dict[str, tuple[str, ...]] = {}

  def caption_vocabulary(self) -> tuple[list[str], int]:
    """Every word this source's captions use, and the most words a caption can have (``a
    <name> moving <direction>`` per object, joined by ``and``)."""
    words = ["a", "and", "moving", *DIRECTIONS, *self.OBJECT_WORDS]
    return sorted(set(words)), self.num_objects[1] * (self.OBJECT_NAME_WORDS + 4) - 1

  def caption_word_classes(self) -> dict[str, tuple[str, ...]]:
    """Caption words grouped by what they describe (``{"direction": DIRECTIONS, "colour":
    ...}``): swapping a word for another of its class changes that fact and nothing else, which
    is how the held-out evaluator measures what the model reads from its captions."""
    return {**self.OBJECT_WORD_CLASSES, "direction": DIRECTIONS}

  def largest_video(self) -> tuple[int, int, int]:
    """The ``(T, H, W)`` with the most pixels this source can draw, to check a token budget."""
    return largest_size(self.frames, self.side, self.aspect_ratios, self.patch)

  def possible_grids(self) -> list[tuple[int, int, int]]:
    """Every token grid this source can draw (the layouts' static bounds come from them)."""
    return tok.possible_grids(self.frames, self.side, self.aspect_ratios, self.patch)

  def video_size(self, index: int) -> tuple[int, int, int]:
    """``(T, H, W)`` of item ``index`` without rendering it (the packer only needs sizes)."""
    return self._draw_size(self._rng(index))

  def _draw_size(self, rng: np.random.Generator) -> tuple[int, int, int]:
    return draw_size(rng, self.frames, self.side, self.aspect_ratios, self.patch)

  def _rng(self, index: int) -> np.random.Generator:
    index = int(index)
    if not 0 <= index < self.num_videos:
      raise IndexError(f"index {index} out of range for {self.num_videos} videos (data.num_videos)")
    return np.random.default_rng([self.seed, index])


def nearest_aspect(aspect: float, aspect_ratios: Sequence[float]) -> float:
  """The configured W/H ratio closest to ``aspect`` (in log space: 2 and 1/2 are equally far)."""
  return min(aspect_ratios, key=lambda a: abs(math.log(a / aspect)))


def bounce(p0: float, v: float, lo: float, hi: float, t_T: np.ndarray) -> np.ndarray:
  """Positions of a point moving at constant speed ``v`` and reflecting off ``lo`` and ``hi``."""
  span = hi - lo
  if span <= 0:
    return np.full(t_T.shape, 0.5 * (lo + hi), np.float32)
  # Unfold the reflections: move freely on a circle of length 2*span, then fold back.
  u_T = np.mod(p0 - lo + v * t_T, 2 * span)
  return (lo + np.where(u_T > span, 2 * span - u_T, u_T)).astype(np.float32)


def direction_name(vy: float, vx: float) -> str:
  """``"up-left"`` etc. for a velocity; y grows downwards, so "up" is negative vy."""
  angle = math.atan2(-vy, vx)
  return DIRECTIONS[int(round(angle / (math.pi / 4))) % 8]


def draw_track(rng: np.random.Generator, H: int, W: int, half_y: float, half_x: float,
               speed: Sequence[float], t_T: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
  """Centre ``(cy_T, cx_T)`` of an object with half extents ``(half_y, half_x)`` moving in a
  random direction and bouncing off the frame's edges, and the name of its initial direction.

  The start is uniform over the positions that keep the object inside the frame; the speed is
  a fraction of the side it moves along, per frame.
  """
  y0 = rng.uniform(min(half_y, H / 2), max(H - half_y, H / 2))
  x0 = rng.uniform(min(half_x, W / 2), max(W - half_x, W / 2))
  angle = rng.uniform(0, 2 * math.pi)
  s = rng.uniform(*speed)
  vy, vx = s * H * math.sin(angle), s * W * math.cos(angle)
  cy_T = bounce(y0, vy, half_y, H - half_y, t_T)
  cx_T = bounce(x0, vx, half_x, W - half_x, t_T)
  return cy_T, cx_T, direction_name(vy, vx)
