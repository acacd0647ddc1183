"""Attention patterns: one type per kind, in one registry.

A pattern is a predicate over a (query, key) token pair. Every pattern also requires both tokens
to be in the same segment; padding (segment 0) forms a segment of its own, so a padding query
attends only to padding and no real token ever sees padding, while no softmax row is empty.
With ``dt, dh, dw`` the coordinate differences key minus query and ``reach(dt) = r >> |dt|``
(``r`` halved per frame of distance, rounded down):

| pattern                   | attend when (and same video)                                     |
| ------------------------- | ---------------------------------------------------------------- |
| `full`                    | always                                                           |
| `spatial`                 | dt = 0                                                           |
| `temporal`                | dh = 0 and dw = 0                                                |
| `window(kt,kh,kw)`        | abs(dt) <= kt, abs(dh) <= kh, abs(dw) <= kw                      |
| `local(kt,r)`             | abs(dt) <= kt, abs(dh) <= reach(dt), abs(dw) <= reach(dt)        |
| `cross(kt,r)`             | abs(dt) <= kt, and either dh = 0, abs(dw) <= reach(dt)           |
|                           | or dw = 0, abs(dh) <= reach(dt)                                  |
| `frame_causal(kt)`        | -kt <= dt <= 0 (kt = -1: every earlier frame and its own)        |
| `causal_window(kt,kh,kw)` | -kt <= dt <= 0 (kt = -1: no limit), abs(dh) <= kh, abs(dw) <= kw |

Each type answers every question the rest of the code asks of a pattern: its predicate (numpy or
``jax.numpy``), the token order inside a video that makes it cheap, whether it is a group
relation (``group_axes``: the kernels' segment-id form, exact block ranges), the box of
key-minus-query offsets it allows (``offset_box``), how far apart in t-major order a query and
its keys can be (``max_distance``), the first and last key of each position (``key_range``),
and its exact pair count for FLOPs (``pairs``). Nothing assumes a pattern is symmetric: offset
boxes and key ranges have a lower and an upper side. ``parse`` turns config strings into these
objects once; adding a pattern means adding one type here and its tests.

Token orders. Group relations sort a video's tokens by ``order_axes``, which makes every group
one contiguous run. The others are *tiled* (``tile``): a video is cut into boxes of
``(tt, th, tw)`` tokens, one attention block each, ordered tile by tile (t-major over tiles,
t-major inside one). A 3D neighbourhood then touches a few whole tiles of the frames in reach,
where in t-major order it spans whole rows of every frame in reach. The tile's shape is the
one whose key tiles hold the fewest keys for the pattern's offset box (``choose_tile``); for
``frame_causal`` that is whole rows of frames, i.e. t-major order.

Numpy only (and ``xp=jax.numpy`` for the predicate): the data pipeline plans layouts with it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import ClassVar

import numpy as np

from vdit_jax import tokens

# Stands for "no bound" in offset boxes: far beyond any coordinate, with no int32 overflow.
UNBOUNDED = 2**20


def _pairs_1d(n: int, k: int) -> int:
  """Ordered pairs (i, j) in range(n) with abs(i - j) <= k."""
  k = min(k, n - 1)
  return n + 2 * (k * n - k * (k + 1) // 2)


def _causal_pairs_1d(n: int, k: int) -> int:
  """Ordered pairs (i, j) in range(n) with -k <= j - i <= 0 (k = -1: every j <= i)."""
  k = n - 1 if k < 0 else min(k, n - 1)
  return sum(n - d for d in range(k + 1))


def _position(c, size):
  """t-major position of coordinates ``c [..., 3]`` in a video of token grid ``size``."""
  return (c[..., 0] * size[1] + c[..., 1]) * size[2] + c[..., 2]


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Base type; the subclasses below are the pattern kinds (``KINDS``)."""

  kind: ClassVar[str]
  # (t, h, w) axes a token's group is made of, for group relations (attend iff same group);
  # None for the others.
  group_axes: ClassVar[tuple[int, ...] | None] = None
  # Sort order of a video's tokens (most significant first) that keeps each query's keys close.
  order_axes: ClassVar[tuple[int, ...]] = (0, 1, 2)
  # Whether the predicate is exactly "the offset lies in offset_box" (then block pairs whose
  # offsets all lie in the box need no token-pair test).
  is_box: ClassVar[bool] = False

  def __str__(self) -> str:
    args = dataclasses.astuple(self)
    return f"{self.kind}({','.join(map(str, args))})" if args else self.kind

  @property
  def grouped(self) -> bool:
    return self.group_axes is not None

  @property
  def tiled(self) -> bool:
    """Whether layouts order this pattern's tokens in 3D tiles (every pattern but the group
    relations)."""
    return not self.grouped

  def tile(self, grid, block: int) -> tuple[int, int, int] | None:
    """The ``(tt, th, tw)`` tile of ``block`` tokens this pattern's layouts cut a video of token
    grid ``grid`` into (``choose_tile``); None for group relations, which keep ``order_axes``."""
    if not self.tiled:
      return None
    grid = tuple(int(g) for g in grid)
    return choose_tile(self.offset_box(), grid, int(block), self.t_major_span(grid, block))

  def t_major_span(self, grid, block: int) -> int:
    """Most positions from the first key to the last of ``block`` consecutive queries of a
    video of token grid ``grid`` in t-major order (``key_range``): what a span visits."""
    lo, hi = _box_key_range(self, tuple(int(g) for g in grid))
    b = min(int(block), lo.size)
    return int((hi[b - 1:] - lo[:lo.size - b + 1]).max())

  def relation(self, c_q, c_k, xp=np):
    """The predicate without the segment test, on coordinates ``[..., 3]``."""
    raise NotImplementedError

  def allowed(self, seg_q, c_q, seg_k, c_k, xp=np):
    """Whether a query may attend to a key, on broadcastable operands: ``seg_*`` segment ids
    (padding may be split into chunks by the caller), ``c_*`` coordinates ``[..., 3]``."""
    return (seg_q == seg_k) & self.relation(c_q, c_k, xp)

  def offset_box(self) -> tuple[tuple[int, int], ...]:
    """Per axis (t, h, w), bounds ``(lo, hi)`` on key minus query that hold for every allowed
    pair (``UNBOUNDED`` where there is none)."""
    raise NotImplementedError

  def group_tokens(self, grid) -> int:
    """Tokens in one group of a video of token grid ``grid`` (group relations only)."""
    raise ValueError(f"pattern {self} has no groups: size its layouts by its distance")

  def neighbourhood(self, grid) -> int:
    """About how many keys a query of a video of token grid ``grid`` sees: what the default
    block size follows (the offset box's volume for patterns without groups)."""
    return math.prod(hi - lo + 1 for lo, hi in self.offset_box())

  def max_distance(self, grid) -> int:
    """Largest ``abs(key - query)`` position, in ``order_axes`` order, over the allowed pairs of
    a video of token grid ``grid``."""
    size = [int(g) for g in grid]
    clip = [(max(lo, 1 - g), min(hi, g - 1)) for (lo, hi), g in zip(self.offset_box(), size)]
    far = lambda pick: abs(_position(np.asarray([pick(b) for b in clip]), size))
    return int(max(far(lambda b: b[0]), far(lambda b: b[1])))

  def key_range(self, grid) -> tuple[np.ndarray, np.ndarray]:
    """Per position of one video in this pattern's order: a lower bound on its first allowed
    key and an upper bound on its last (exclusive), both non-decreasing, video-relative."""
    return _box_key_range(self, tuple(int(g) for g in grid))

  def range_kind(self, grid):
    """What ``key_range`` depends on (videos of equal kind have equal ranges)."""
    return tuple(int(g) for g in grid)

  def pairs(self, grid) -> int:
    """Allowed (query, key) pairs within one video of token grid ``grid``, exactly."""
    raise NotImplementedError


class _Group(Pattern):
  """Group relations: a query attends to every key of its group (same video, same group axes)."""

  def allowed(self, seg_q, c_q, seg_k, c_k, xp=np):
    mask = seg_q == seg_k
    for a in self.group_axes:
      mask = mask & (c_q[..., a] == c_k[..., a])
    return mask

  def offset_box(self):
    return tuple((0, 0) if a in self.group_axes else (-UNBOUNDED, UNBOUNDED) for a in range(3))

  def group_tokens(self, grid) -> int:
    return math.prod(int(g) for a, g in enumerate(grid) if a not in self.group_axes)

  def neighbourhood(self, grid) -> int:
    return self.group_tokens(grid)

  def max_distance(self, grid) -> int:
    return self.group_tokens(grid) - 1

  def key_range(self, grid):
    return _group_key_range(tokens.num_tokens(grid), self.group_tokens(grid))

  def range_kind(self, grid):
    return tokens.num_tokens(grid), self.group_tokens(grid)

  def pairs(self, grid) -> int:
    return tokens.num_tokens(grid) * self.group_tokens(grid)


@dataclasses.dataclass(frozen=True)
class Full(_Group):
  kind: ClassVar[str] = "full"
  group_axes: ClassVar[tuple[int, ...]] = ()
  order_axes: ClassVar[tuple[int, ...]] = ()


@dataclasses.dataclass(frozen=True)
class Spatial(_Group):
  kind: ClassVar[str] = "spatial"
  group_axes: ClassVar[tuple[int, ...]] = (0,)


@dataclasses.dataclass(frozen=True)
class Temporal(_Group):
  kind: ClassVar[str] = "temporal"
  group_axes: ClassVar[tuple[int, ...]] = (1, 2)
  order_axes: ClassVar[tuple[int, ...]] = (1, 2, 0)


@dataclasses.dataclass(frozen=True)
class Window(Pattern):
  kt: int
  kh: int
  kw: int
  kind: ClassVar[str] = "window"
  is_box: ClassVar[bool] = True

  def relation(self, c_q, c_k, xp=np):
    d = [xp.abs(c_q[..., a] - c_k[..., a]) for a in range(3)]
    return (d[0] <= self.kt) & (d[1] <= self.kh) & (d[2] <= self.kw)

  def offset_box(self):
    return tuple((-k, k) for k in (self.kt, self.kh, self.kw))

  def pairs(self, grid) -> int:
    t, h, w = (int(g) for g in grid)
    return _pairs_1d(t, self.kt) * _pairs_1d(h, self.kh) * _pairs_1d(w, self.kw)


def spatial_reach(r, dt, xp=np):
  """Reach of ``local``/``cross`` at frame distance ``abs(dt)``: ``r`` halved per frame,
  rounded down (``r >> dt``; shifts capped at 30 so large ``dt`` give 0, not undefined bits)."""
  return xp.right_shift(r, xp.minimum(dt, 30))


@dataclasses.dataclass(frozen=True)
class _Shrinking(Pattern):
  """Per-head sparse sub-patterns whose spatial reach halves per frame of distance."""
  kt: int
  r: int

  def _plane(self, dh, dw, reach, xp):
    raise NotImplementedError

  def relation(self, c_q, c_k, xp=np):
    dt, dh, dw = (xp.abs(c_q[..., a] - c_k[..., a]) for a in range(3))
    return (dt <= self.kt) & self._plane(dh, dw, spatial_reach(self.r, dt, xp), xp)

  def offset_box(self):
    return ((-self.kt, self.kt), (-self.r, self.r), (-self.r, self.r))

  def max_distance(self, grid) -> int:
    t, h, w = (int(g) for g in grid)
    far = 0
    for dt in range(min(self.kt, t - 1) + 1):
      reach = int(spatial_reach(self.r, dt))
      dh, dw = min(reach, h - 1), min(reach, w - 1)
      far = max(far, dt * h * w + self._plane_distance(dh, dw, w))
    return far

  def _plane_distance(self, dh: int, dw: int, w: int) -> int:
    raise NotImplementedError

  def _plane_pairs(self, h: int, w: int, reach: int) -> int:
    raise NotImplementedError

  def pairs(self, grid) -> int:
    t, h, w = (int(g) for g in grid)
    k = min(self.kt, t - 1)
    return sum((t - abs(dt)) * self._plane_pairs(h, w, int(spatial_reach(self.r, abs(dt))))
               for dt in range(-k, k + 1))


@dataclasses.dataclass(frozen=True)
class Local(_Shrinking):
  kind: ClassVar[str] = "local"

  def _plane(self, dh, dw, reach, xp):
    return (dh <= reach) & (dw <= reach)

  def _plane_distance(self, dh, dw, w):
    return dh * w + dw

  def _plane_pairs(self, h, w, reach):
    return _pairs_1d(h, reach) * _pairs_1d(w, reach)


@dataclasses.dataclass(frozen=True)
class Cross(_Shrinking):
  kind: ClassVar[str] = "cross"

  def _plane(self, dh, dw, reach, xp):
    return ((dh == 0) & (dw <= reach)) | ((dw == 0) & (dh <= reach))

  def _plane_distance(self, dh, dw, w):
    return max(dh * w, dw)

  def _plane_pairs(self, h, w, reach):
    # The row and the column through each query, the query counted once.
    return h * _pairs_1d(w, reach) + w * _pairs_1d(h, reach) - h * w


@dataclasses.dataclass(frozen=True)
class FrameCausal(Pattern):
  """Keys of the query's own frame and the ``kt`` frames before it (all earlier ones for
  ``kt = -1``): the pattern of autoregressive and streaming video models. Not symmetric."""
  kt: int
  kind: ClassVar[str] = "frame_causal"
  is_box: ClassVar[bool] = True

  def relation(self, c_q, c_k, xp=np):
    dt = c_k[..., 0] - c_q[..., 0]
    ok = dt <= 0
    return ok if self.kt < 0 else ok & (dt >= -self.kt)

  def offset_box(self):
    back = UNBOUNDED if self.kt < 0 else self.kt
    return ((-back, 0), (-UNBOUNDED, UNBOUNDED), (-UNBOUNDED, UNBOUNDED))

  def pairs(self, grid) -> int:
    t, h, w = (int(g) for g in grid)
    return _causal_pairs_1d(t, self.kt) * (h * w) ** 2


@dataclasses.dataclass(frozen=True)
class CausalWindow(Pattern):
  """A local causal box: the query's own frame and the ``kt`` before it (all earlier ones for
  ``kt = -1``), within ``kh`` rows and ``kw`` columns. Not symmetric."""
  kt: int
  kh: int
  kw: int
  kind: ClassVar[str] = "causal_window"
  is_box: ClassVar[bool] = True

  def relation(self, c_q, c_k, xp=np):
    dt = c_k[..., 0] - c_q[..., 0]
    ok = (dt <= 0) & (xp.abs(c_q[..., 1] - c_k[..., 1]) <= self.kh) & (
        xp.abs(c_q[..., 2] - c_k[..., 2]) <= self.kw)
    return ok if self.kt < 0 else ok & (dt >= -self.kt)

  def offset_box(self):
    back = UNBOUNDED if self.kt < 0 else self.kt
    return ((-back, 0), (-self.kh, self.kh), (-self.kw, self.kw))

  def pairs(self, grid) -> int:
    t, h, w = (int(g) for g in grid)
    return _causal_pairs_1d(t, self.kt) * _pairs_1d(h, self.kh) * _pairs_1d(w, self.kw)


# Every pattern kind, by the name configs use.
KINDS: dict[str, type[Pattern]] = {
    cls.kind: cls
    for cls in (Full, Spatial, Temporal, Window, Local, Cross, FrameCausal, CausalWindow)}
# Smallest value of each integer argument where it is not 0 (-1: no limit on earlier frames).
_MIN_ARGS = {"frame_causal": (-1,), "causal_window": (-1, 0, 0)}


@functools.lru_cache(maxsize=512)
def _parse_text(text: str) -> Pattern:
  name, paren, rest = text.replace(" ", "").partition("(")
  cls = KINDS.get(name)
  nargs = len(dataclasses.fields(cls)) if cls is not None else -1
  if cls is not None and not paren and nargs == 0:
    return cls()
  if cls is not None and paren and rest.endswith(")") and nargs > 0:
    try:
      args = tuple(int(a) for a in rest[:-1].split(","))
    except ValueError:
      args = ()
    if len(args) == nargs and all(a >= m for a, m in zip(args, _MIN_ARGS.get(name, (0,) * nargs))):
      return cls(*args)
  raise ValueError(f"unknown attention pattern {text!r}: use full, spatial, temporal, "
                   "window(kt,kh,kw), local(kt,r) or cross(kt,r) with integers >= 0, or "
                   "frame_causal(kt) or causal_window(kt,kh,kw) with kt >= -1 and the "
                   "others >= 0")


def parse(pattern: str | Pattern) -> Pattern:
  """``"window(1,2,2)"`` -> ``Window(1, 2, 2)``; a Pattern comes back as it is."""
  if isinstance(pattern, Pattern):
    return pattern
  return _parse_text(str(pattern))


def window(kt: int, kh: int, kw: int) -> Window:
  """The ``window`` pattern with these reaches (checked)."""
  return parse(f"window({int(kt)},{int(kh)},{int(kw)})")


@functools.lru_cache(maxsize=1024)
def _group_key_range(n: int, g: int) -> tuple[np.ndarray, np.ndarray]:
  p = np.arange(n)
  return p // g * g, (p // g + 1) * g


@functools.lru_cache(maxsize=1024)
def _box_key_range(pattern: Pattern, grid: tuple[int, int, int]):
  """Key ranges of a t-major pattern: the positions of its offset box's corners clipped to the
  grid, made monotone by a suffix minimum and a prefix maximum."""
  size = np.asarray(grid)
  c = tokens.grid_coords(grid)
  lo = np.asarray([b[0] for b in pattern.offset_box()])
  hi = np.asarray([b[1] for b in pattern.offset_box()])
  key_lo = _position(np.clip(c + lo, 0, size - 1), size)
  key_hi = _position(np.clip(c + hi, 0, size - 1), size) + 1
  return np.minimum.accumulate(key_lo[::-1])[::-1], np.maximum.accumulate(key_hi)


def _pow2_ceil(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


# Visiting a list as several runs of key tiles (``blocksparse``'s run lists) costs about
# RUN_FACTOR times a contiguous span's time per key on XLA:CPU (the runs are copied together
# per query block; 1.8-2.3 measured, bench/README.md "Tiled orders"), plus RUN_COST keys per
# run; tiles are chosen over t-major order only where they visit that much fewer keys.
RUN_FACTOR = 2.0
RUN_COST = 32


def axis_reach(size: int, tile: int, lo: int, hi: int) -> int:
  """Along one axis of ``size`` tokens cut into tiles of ``tile``: the most tiles holding an
  offset in ``[lo, hi]`` from some query of one tile, over the tiles."""
  most = 0
  for start in range(0, size, tile):
    end = min(size, start + tile)
    first, last = max(0, start + lo), min(size - 1, end - 1 + hi)
    most = max(most, last // tile - first // tile + 1 if first <= last else 0)
  return most


def t_major_tile(grid, block: int) -> tuple[int, int, int]:
  """The tile of ``block`` tokens (at most the video, sides powers of two) that leaves a video
  of token grid ``grid`` in t-major order: part of a row, whole rows, or whole frames."""
  caps = [_pow2_ceil(g) for g in grid]
  tw = min(caps[2], block)
  th = min(caps[1], max(block // tw, 1))
  return min(caps[0], max(block // (tw * th), 1)), th, tw


def is_t_major(tile, grid) -> bool:
  """Whether tiles ``tile`` keep a video of token grid ``grid`` in t-major order: a tile one
  frame deep that is part of one row or whole rows, or whole frames."""
  tt, th, tw = tile
  t, h, w = grid
  return (tt == 1 and (th == 1 or tw >= w)) or (th >= h and tw >= w)


@functools.lru_cache(maxsize=4096)
def choose_tile(box, grid: tuple[int, int, int], block: int, span: int) -> tuple[int, int, int]:
  """The tile ``(tt, th, tw)`` for the offset box ``box`` on a video of token grid ``grid``:
  powers of two, as many tokens as fit ``block``, each side at most the grid's side rounded up
  to a power of two, visiting the fewest keys per query.

  A query tile's keys are the key tiles in reach along each axis (``axis_reach``), a box of
  tiles: ``RUN_FACTOR`` times its tokens plus ``RUN_COST`` per run of consecutive tiles (tiles
  are ordered t-major, so a run is a row of tiles along w, or whole planes where the box spans
  every tile of the later axes). Against that, t-major order (``t_major_tile``), where a query
  block's keys are one contiguous ``span`` (``Pattern.t_major_span``), visited in whole
  blocks. Ties go to fewer runs, then to the tile widest along w, then h.
  """
  caps = [_pow2_ceil(g) for g in grid]
  sides = [[1 << i for i in range(c.bit_length())] for c in caps]
  volume = math.prod(grid)
  rows = t_major_tile(grid, block)
  size = math.prod(rows)
  best = ((-size, min(volume, span + size), 1, 0, 0), rows)
  for tile in itertools.product(*sides):
    size = math.prod(tile)
    if size > block or size < -best[0][0] or is_t_major(tile, grid):
      continue
    reach = [axis_reach(g, t, max(lo, -g), min(hi, g)) for g, t, (lo, hi) in zip(grid, tile, box)]
    whole = [r == -(-g // t) for r, g, t in zip(reach, grid, tile)]
    runs = math.prod(reach[:2]) if not whole[2] else reach[0] if not whole[1] else 1
    keys = RUN_FACTOR * math.prod(reach) * size + RUN_COST * runs
    key = (-size, keys, runs, -tile[2], -tile[1])
    if key < best[0]:
      best = (key, tile)
  return best[1]
