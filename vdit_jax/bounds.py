"""Static sizes of block layouts: block sizes and ``max_kv_blocks`` bounds that fit every batch.

A run compiles its step once, so a layout's shapes must not depend on the batch: the number of
key blocks listed per query block (``max_kv_blocks``) is a bound over every row the data can
make. Three bounds, tightest last:

- any placement (``distance_bound``): a query's keys lie within ``pattern.max_distance`` of it
  in the pattern's order (padding keys within its own block), so a query block's keys lie in
  the key blocks overlapping that window, at the worst alignment;
- rows packed back to back (``packed_kv_blocks_bound``): videos can start only at sums of
  video sizes, and each position's keys sit at fixed offsets inside its video
  (``pattern.key_range``), so every reachable query block position is checked;
- aligned videos (``aligned_block``): ``full`` with every video starting on a block boundary
  needs one key block per list when blocks hold the largest video.

Those hold in the orders where a query's keys lie within a distance of it (groups, t-major).
Patterns put in 3D tiles (``patterns.Pattern.tile``) have lists that jump between tile rows;
they are visited as pairs and bounded per video instead (``tiled_bounds``): the exact lists of
one video of each grid at each offset from a block boundary it can start at, summed over the
videos a row can hold.

Numpy only, cached: the pipeline asks for every batch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from vdit_jax import patterns as pat
from vdit_jax import tokens

# Largest block a layout grows to when that makes every list one block (groups aligned to
# blocks): block-diagonal attention, whose large blocks blocksparse computes query-chunked.
MAX_BLOCK = 4096


def check_blocks(seq_len: int, block_q: int, block_k: int) -> None:
  """Raises a ValueError naming valid sizes unless both block sizes divide ``seq_len``."""
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if int(b) < 1 or seq_len % int(b):
      divisors = [d for d in (16, 32, 64, 128, 256, 512) if d <= seq_len and seq_len % d == 0]
      raise ValueError(f"seq_len={seq_len} is not divisible by {name}={b}: use a {name} that "
                       f"divides it (e.g. {divisors or [seq_len]}) or pad rows to a multiple "
                       f"of {b}")


def window_blocks(size_a: int, size_b: int, reach: int) -> int:
  """Most blocks of ``size_b`` overlapping ``reach`` positions either side of a block of
  ``size_a`` (blocks of each size tile positions from 0), over all alignments."""
  worst = 0
  for start in range(0, math.lcm(size_a, size_b), size_a):
    lo, hi = start - reach, start + size_a + reach  # window [lo, hi)
    worst = max(worst, (hi - 1) // size_b - lo // size_b + 1)
  return worst


def max_kv_blocks_bound(pattern, seq_len: int, block_q: int, block_k: int,
                        max_group_tokens: int, video_align: int | None = None) -> int:
  """A ``max_kv_blocks`` that fits every batch whose largest group has ``max_group_tokens``
  (group relations only: ``full``, ``spatial``, ``temporal``).

  A query block sees the union of the groups it touches, which lies within
  ``max_group_tokens - 1`` positions on each side of it. ``video_align``: if the packer starts
  every video at a multiple of it (a multiple of both block sizes), no query block holds two
  videos, which tightens the bound for ``full`` to the key blocks of one video.
  """
  p = pat.parse(pattern)
  if not p.grouped:
    raise ValueError(f"pattern {p} has no groups: use distance_bound for its max_kv_blocks")
  check_blocks(seq_len, block_q, block_k)
  bound = window_blocks(block_q, block_k, max(int(max_group_tokens), 1) - 1)
  if video_align is not None:
    if int(video_align) % math.lcm(block_q, block_k):
      raise ValueError(f"video_align={video_align} must be a multiple of both block sizes "
                       f"({block_q}, {block_k}): use {math.lcm(block_q, block_k)} or a multiple")
    if p == pat.Full():
      # A query block lies in [start, start + G rounded up to block_q) of one video, plus
      # padding of its own chunk; the video start is a key-block boundary.
      video = -(-(-(-int(max_group_tokens) // block_q) * block_q) // block_k)
      bound = min(bound, max(video, window_blocks(block_q, block_k, 0)))
  return min(bound, seq_len // block_k)


def distance_bound(pattern, seq_len: int, block_q: int, block_k: int, grids) -> int:
  """A ``max_kv_blocks`` that fits every row of videos within ``grids``, placed anywhere.

  The distance grows with each grid side, so the config's largest grids bound every video it
  can draw. Tiled orders (``distance_ordered`` false): ``tiled_bounds``, whose ``grids`` must
  list every grid.
  """
  p = pat.parse(pattern)
  check_blocks(seq_len, block_q, block_k)
  if not distance_ordered(p, grids, block_q):
    return tiled_bounds(p, seq_len, block_q, block_k, grids)[0]
  reach = max(p.max_distance(g) for g in grids)
  return min(window_blocks(block_q, block_k, reach), seq_len // block_k)


def distance_ordered(pattern, grids, block: int) -> bool:
  """Whether the distance bounds hold for ``pattern``'s layouts of videos of ``grids`` at query
  blocks of ``block``: group relations, and tiled patterns whose tiles are whole rows of a
  frame, which leaves the order t-major."""
  p = pat.parse(pattern)
  return p.grouped or all(_t_major(p, g, int(block)) for g in grids_key(grids))


@functools.lru_cache(maxsize=4096)
def _t_major(p: pat.Pattern, grid: tuple, block: int) -> bool:
  return pat.is_t_major(p.tile(grid, block), grid)


# Offsets from a block boundary up to which ``tiled_bounds`` enumerates a video's lists; with
# more, it bounds them from offset 0 (see there).
EXACT_OFFSETS = 8


def _runs_by_width(pairs_NM: np.ndarray) -> tuple[int, ...]:
  """For run widths W = 1, 2, ... up to the longest list: the most runs of at most W consecutive
  key blocks any query block's list is cut into (``layout.make_layout``'s ``runs``)."""
  edges = np.diff(np.pad(pairs_NM.astype(np.int8), ((0, 0), (1, 1))), axis=1)
  rows_s, starts = np.nonzero(edges == 1)
  ends = np.nonzero(edges == -1)[1]  # row-major, so the i-th end closes the i-th start
  lengths = ends - starts
  longest = int(pairs_NM.sum(-1).max())
  out = []
  for W in range(1, max(longest, 1) + 1):
    out.append(int(np.bincount(rows_s, -(-lengths // W), pairs_NM.shape[0]).max()))
  return tuple(out)


class VideoLists(NamedTuple):
  """The lists of one video's query blocks (``_video_lists``): listed pairs, the longest list
  and ``_runs_by_width``, over all its query blocks and over its first and last one (the
  blocks it may share with another video)."""
  pairs: int
  longest: int
  runs: tuple[int, ...]
  edge_longest: int
  edge_runs: tuple[int, ...]


@functools.lru_cache(maxsize=4096)
def _video_lists(p: pat.Pattern, grid: tuple, block_q: int, block_k: int,
                 offset: int) -> VideoLists:
  """``VideoLists`` of one video of ``grid`` starting ``offset`` positions into a block (padding
  around it, whose own blocks count too)."""
  from vdit_jax import layout  # layout imports this module
  n = tokens.num_tokens(grid)
  step = math.lcm(block_q, block_k)
  L = -(-(offset + n) // step) * step
  seg = np.zeros((1, L), np.int32)
  coords = np.zeros((1, L, 3), np.int32)
  seg[0, offset:offset + n] = 1
  coords[0, offset:offset + n] = tokens.grid_coords(grid)
  pairs = layout.block_pairs(p, seg, coords, block_q, block_k)[0]
  edge = pairs[[offset // block_q, (offset + n - 1) // block_q]]
  return VideoLists(int(pairs.sum()), int(pairs.sum(-1).max()), _runs_by_width(pairs),
                    int(edge.sum(-1).max()), _runs_by_width(edge))


def _video_bound(p, grid, block_q, block_k, offsets) -> VideoLists:
  """``_video_lists`` of one video of ``grid`` at the worst of ``offsets``.

  With more than ``EXACT_OFFSETS`` offsets: from offset 0, times 4, and runs of one block.
  Shifted by any offset, a query block overlaps at most two offset-0 query blocks, so its keys
  lie in their lists' key blocks, each of which overlaps at most two shifted key blocks; and
  each listed shifted pair holds an allowed pair that lies in a listed offset-0 pair, which at
  most 2 x 2 shifted pairs overlap.
  """
  if len(offsets) > EXACT_OFFSETS:
    zero = _video_lists(p, grid, block_q, block_k, 0)
    most = 4 * zero.longest
    return VideoLists(4 * zero.pairs, most, (most,), most, (most,))
  found = [_video_lists(p, grid, block_q, block_k, int(o)) for o in offsets]
  worst = lambda tables: tuple(max(_at_width(t, W) for t in tables)
                               for W in range(1, max(len(t) for t in tables) + 1))
  return VideoLists(max(f.pairs for f in found), max(f.longest for f in found),
                    worst([f.runs for f in found]), max(f.edge_longest for f in found),
                    worst([f.edge_runs for f in found]))


def _at_width(runs: tuple[int, ...], W: int) -> int:
  """Runs at width ``W`` of a ``_runs_by_width`` table (wider than its longest list: its last)."""
  return runs[min(W, len(runs)) - 1]


def tiled_bounds(pattern, seq_len: int, block_q: int, block_k: int, grids,
                 max_segments: int | None = None) -> tuple[int, int, tuple[int, ...]]:
  """``(max_kv_blocks, max_pairs, runs)`` of listed-block layouts of a pattern that is not a
  group relation, for every row of videos of ``grids`` (every grid the data can draw): packed
  back to back with at most ``max_segments`` videos, or placed anywhere (``None``). ``runs[W -
  1]`` bounds the runs of at most W key blocks a list is cut into (``make_layout``'s
  ``runs``), for W up to ``len(runs)``.

  Per grid, the exact lists of one video at every offset from a block boundary it can start
  at (``_video_bound``). A query block inside one video lists at most that video's longest
  list. One shared by several videos (at most ``block_q // smallest video + 2``, and
  ``max_segments``) holds the last query block of one and the first of the next, or all of a
  small one, so it lists at most their first and last blocks' lists together. Either may add
  its own padding keys. A row lists at most the sum of its videos' pairs plus the padding's
  own blocks: the most over every way to fill a row (dynamic programming over the videos'
  token counts), or, placed anywhere, every query block's longest list.
  """
  return _tiled_bounds(pat.parse(pattern), int(seq_len), int(block_q), int(block_k),
                       grids_key(grids), None if max_segments is None else int(max_segments))


@functools.lru_cache(maxsize=256)
def _tiled_bounds(p: pat.Pattern, L: int, bq: int, bk: int, grids: tuple,
                  max_segments: int | None) -> tuple[int, int, tuple[int, ...]]:
  check_blocks(L, bq, bk)
  if p.grouped:
    raise ValueError(f"pattern {p} is a group relation: use block_and_bound for its bounds")
  step = math.lcm(bq, bk)
  sizes = {g: tokens.num_tokens(g) for g in grids}
  if not sizes or max(sizes.values()) > L:
    raise ValueError(f"grids {list(grids)} hold a video longer than seq_len={L}")
  starts = None
  if max_segments is not None:
    starts = _video_starts(L, sorted(set(sizes.values())), max_segments)
  lists = []
  for g, n in sizes.items():
    offsets = range(step) if starts is None else sorted({int(s) % step for s in starts
                                                          if s + n <= L})
    lists.append(_video_bound(p, g, bq, bk, offsets))
  nQ, nK = L // bq, L // bk
  own = window_blocks(bq, bk, 0)  # a padding query's keys: its own chunk's key blocks
  videos = (bq - 2) // min(sizes.values()) + 2
  if max_segments is not None:
    videos = min(videos, max_segments)
  # A query block holding a real token lists its own key block through that token when blocks
  # are equal (every pattern lets a token attend to itself), so its padding keys add nothing;
  # a query block of padding alone lists just its own.
  extra = lambda x: 0 if bq == bk else x

  def most(one, shared, pad):
    inside = max(one(v) for v in lists)
    if videos > 1:
      inside = max(inside, videos * max(shared(v) for v in lists))
    return max(inside + extra(pad), pad)

  J = min(nK, most(lambda v: v.longest, lambda v: v.edge_longest, own))
  width = max(len(v.runs) for v in lists)
  runs = tuple(min(J, most(lambda v: _at_width(v.runs, W), lambda v: _at_width(v.edge_runs, W),
                           -(-own // W))) for W in range(1, width + 1))
  if max_segments is None:
    return J, nQ * J, runs
  # Most pairs over rows of at most max_segments videos: best[used tokens] per video count.
  gain = {}
  for (g, n), v in zip(sizes.items(), lists):
    gain[n] = max(gain.get(n, 0), v.pairs)
  best = np.full(L + 1, -1, np.int64)
  best[0] = 0
  frontier = best.copy()
  for _ in range(max_segments):
    nxt = np.full(L + 1, -1, np.int64)
    for n, w in gain.items():
      prev = frontier[:L + 1 - n]
      nxt[n:] = np.maximum(nxt[n:], np.where(prev >= 0, prev + w, -1))
    best = np.maximum(best, nxt)
    frontier = nxt
  used = np.arange(L + 1)
  padding = (-(-(L - used) // bq) + 1) * own  # query blocks holding padding, each its own keys
  rows = np.where(best >= 0, best + padding, -1)
  return J, int(min(rows.max(), nQ * J)), runs


def default_block(seq_len: int, neighbourhood: int) -> int:
  """A block size (for queries and keys alike) that measured well on CPU, dividing ``seq_len``:
  the largest power of two within [16, 128] not above ``neighbourhood`` (a group's tokens, or a
  window's volume). Per-block overhead dominates below 16; above 128 blocks win only when
  groups start on block boundaries, which ``block_and_bound`` grows blocks for."""
  block = 16
  while block * 2 <= min(int(neighbourhood), 128):
    block *= 2
  while block > 1 and seq_len % block:
    block //= 2
  return block


def grids_key(grids) -> tuple[tuple[int, ...], ...]:
  """``grids`` as a sorted tuple of distinct int tuples: hashable, for the caches here."""
  return tuple(sorted({tuple(int(x) for x in g) for g in grids}))


def _video_starts(seq_len: int, sizes, max_segments: int) -> np.ndarray:
  """Positions where a video can start in rows packed back to back from position 0."""
  starts = np.zeros(seq_len + 1, bool)
  starts[0] = True
  frontier = starts.copy()
  for _ in range(int(max_segments) - 1):
    nxt = np.zeros(seq_len + 1, bool)
    for n in sizes:
      nxt[n:] |= frontier[:seq_len + 1 - n]
    starts |= nxt
    frontier = nxt
  return np.flatnonzero(starts[:seq_len])


def packed_kv_blocks_bound(pattern, seq_len: int, block: int, grids,
                           max_segments: int) -> int | None:
  """A ``max_kv_blocks`` (equal query and key blocks) that fits every row packed the way
  ``tokens.pack_rows`` packs: videos back to back from position 0, at most ``max_segments`` of
  them, each of one of ``grids`` (every grid the data can produce; a superset is fine). Tiled
  orders: ``tiled_bounds``.

  For each query block position: the first key any video covering its first token may see,
  and the last key any video covering its last token may see. Far tighter than the other
  bounds when sizes are few (one 8x16x16 video per row needs 1 block of 256 for ``spatial``,
  not 3). ``None`` when the enumeration would be too large to be worth it.
  """
  p = pat.parse(pattern)
  if not distance_ordered(p, grids, block):
    return tiled_bounds(p, seq_len, block, block, grids, max_segments)[0]
  return _packed_bound(p, int(seq_len), int(block), grids_key(grids), int(max_segments))


@functools.lru_cache(maxsize=256)
def _packed_spans(p: pat.Pattern, L: int, b: int, grids: tuple,
                  max_segments: int) -> np.ndarray | None:
  """Per query block position of packed rows: the most key blocks its list can span."""
  check_blocks(L, b, b)
  sizes = sorted({tokens.num_tokens(g) for g in grids})
  if not sizes or sizes[-1] > L:
    raise ValueError(f"grids {list(grids)} hold a video longer than seq_len={L}")
  offsets = _video_starts(L, sizes, max_segments)
  kinds = {p.range_kind(g): g for g in grids}
  if len(kinds) * offsets.size * (L // b) > 2e7:
    return None
  first = np.arange(0, L, b)  # first position of each query block
  last = first + b - 1
  lo, hi = first.copy(), first + b  # padding queries see their own block only
  for kind in sorted(kinds):
    key_lo, key_hi = p.key_range(kinds[kind])
    n = key_lo.size
    o = offsets[offsets + n <= L][:, None]
    covers_first = (o <= first) & (first < o + n)
    at = np.clip(first - o, 0, n - 1)
    lo = np.minimum(lo, np.where(covers_first, o + key_lo[at], L).min(0))
    covers_last = (o <= last) & (last < o + n)
    at = np.clip(last - o, 0, n - 1)
    hi = np.maximum(hi, np.where(covers_last, o + key_hi[at], 0).max(0))
  return (hi - 1) // b - lo // b + 1


def pair_bound(pattern, seq_len: int, block: int, grids, max_segments: int | None,
               max_kv_blocks: int) -> int:
  """Listed (query block, key block) pairs a row can hold: the sum over query blocks of their
  most key blocks (packed rows), else ``max_kv_blocks`` per query block. Tiled orders:
  ``tiled_bounds``."""
  p = pat.parse(pattern)
  if not distance_ordered(p, grids, block):
    return min(tiled_bounds(p, seq_len, block, block, grids, max_segments)[1],
               seq_len // block * max_kv_blocks)
  spans = None
  if max_segments is not None:
    spans = _packed_spans(pat.parse(pattern), int(seq_len), int(block), grids_key(grids),
                          int(max_segments))
  if spans is None:
    return seq_len // block * max_kv_blocks
  return int(np.minimum(spans, max_kv_blocks).sum())


def _packed_bound(p: pat.Pattern, seq_len: int, block: int, grids: tuple,
                  max_segments: int | None) -> int | None:
  if max_segments is None:
    return None
  spans = _packed_spans(p, seq_len, block, grids, max_segments)
  return None if spans is None else int(spans.max())


def _bound(p: pat.Pattern, seq_len: int, block: int, grids: tuple,
           max_segments: int | None) -> int:
  window = distance_bound(p, seq_len, block, block, grids)
  packed = _packed_bound(p, seq_len, block, grids, max_segments)
  return window if packed is None else min(window, packed)


@functools.lru_cache(maxsize=256)
def _block_and_bound(p: pat.Pattern, seq_len: int, grids: tuple, block: int,
                     max_segments: int | None) -> tuple[int, int]:
  b = int(block) or default_block(seq_len, max(p.neighbourhood(g) for g in grids))
  j = _bound(p, seq_len, b, grids, max_segments)
  # A larger block that makes every list a single block (groups aligned to blocks) takes the
  # block-diagonal path, which gathers nothing (frames of 256 tokens in blocks of 256). Larger
  # blocks that still list several measured no faster, so the block grows only when that
  # reaches one block per list.
  grow = b
  while p.grouped and not block and max_segments is not None and j > 1 \
      and 2 * grow <= MAX_BLOCK and seq_len % (2 * grow) == 0:
    grow *= 2
    if _bound(p, seq_len, grow, grids, max_segments) == 1:
      return grow, 1
  return b, j


# Lists are flattened into pairs (``layout.Layout.pair_q``) when the pairs a row can list are at
# most this fraction of the spans' query blocks x max_kv_blocks: spans then mostly compute
# blocks no list names (lists whose lengths vary along the row, as frame_causal's do).
PAIR_FRACTION = 0.6
# Pair layouts grow their default block up to this size while the area their pairs cover grows
# by at most PAIR_AREA_SLACK: XLA:CPU runs a few large block products much faster than many
# small ones (bench/README.md).
PAIR_BLOCK = 512
PAIR_AREA_SLACK = 1.15


def _max_pairs(p: pat.Pattern, seq_len: int, block: int, grids: tuple,
               max_segments: int | None, max_kv_blocks: int) -> int:
  if max_kv_blocks <= 1:
    return 0
  bound = pair_bound(p, seq_len, block, grids, max_segments, max_kv_blocks)
  return bound if bound <= PAIR_FRACTION * (seq_len // block) * max_kv_blocks else 0


class Plan(NamedTuple):
  """Static sizes of one pattern's unaligned layouts (``plan``)."""
  block: int
  max_kv_blocks: int
  max_pairs: int  # 0: no pair lists
  runs: tuple[int, int] | None  # (max_runs, run_blocks) of run lists, or None


# Run layouts pick the block in [RUN_MIN_BLOCK, RUN_BLOCK] whose runs cost the least
# (``_runs_cost``; bench/README.md, "Tiled orders").
RUN_MIN_BLOCK = 64
RUN_BLOCK = 512


def _runs_cost(p: pat.Pattern, seq_len: int, grids: tuple, b: int,
               max_segments: int | None) -> tuple[float, int, tuple[int, int]]:
  """Cost of run lists at block ``b`` with the best run width, in keys per query as a span
  would visit them (``patterns.RUN_FACTOR``, ``RUN_COST``): ``(cost, max_kv_blocks,
  (max_runs, run_blocks))``."""
  j, _, runs = _tiled_bounds(p, seq_len, b, b, grids, max_segments)
  best = min((r * (w * b + pat.RUN_COST), -w, r) for w, r in enumerate(runs, 1))
  # One run is a span: sliced, not copied.
  factor = pat.RUN_FACTOR if best[2] > 1 else 1.0
  return factor * best[0], j, (best[2], -best[1])


@functools.lru_cache(maxsize=256)
def _plan(p: pat.Pattern, seq_len: int, grids: tuple, block: int,
          max_segments: int | None) -> Plan:
  if not p.grouped:
    b0 = int(block) or default_block(seq_len, max(p.neighbourhood(g) for g in grids))
    sizes = [b for b in (2**i for i in range(4, 10))
             if RUN_MIN_BLOCK <= b <= RUN_BLOCK and seq_len % b == 0]
    sizes = [b0] if block or not sizes else sizes
    # Larger blocks win ties: fewer query blocks to loop over.
    cost, b, j, runs = min((cost, -s, j, runs) for s in sizes
                           for cost, j, runs in [_runs_cost(p, seq_len, grids, s, max_segments)])
    b = -b
    if not distance_ordered(p, grids, b0):
      return Plan(b, j, 0, runs)
    spans = _spans_plan(p, seq_len, grids, block, max_segments)
    # Spans (and pairs, for lists whose lengths vary along the row) unless runs visit enough
    # fewer keys to pay for their copies (``cost`` counts patterns.RUN_FACTOR).
    if spans.max_pairs or cost >= spans.max_kv_blocks * spans.block:
      return spans
    return Plan(b, j, 0, runs)
  return _spans_plan(p, seq_len, grids, block, max_segments)


def _spans_plan(p: pat.Pattern, seq_len: int, grids: tuple, block: int,
                max_segments: int | None) -> Plan:
  """Lists as spans, flattened into pairs where those pay (``PAIR_FRACTION``): group relations,
  and patterns whose order at the default block is t-major."""
  b, j = _block_and_bound(p, seq_len, grids, block, max_segments)
  pairs = _max_pairs(p, seq_len, b, grids, max_segments, j)
  grow = b
  while pairs and not block and 2 * grow <= PAIR_BLOCK and seq_len % (2 * grow) == 0:
    grow *= 2
    if not distance_ordered(p, grids, grow):  # tiles at this block: these bounds do not hold
      break
    j_grow = _bound(p, seq_len, grow, grids, max_segments)
    pairs_grow = _max_pairs(p, seq_len, grow, grids, max_segments, j_grow)
    if not pairs_grow or pairs_grow * grow**2 > PAIR_AREA_SLACK * pairs * b**2:
      break
    b, j, pairs = grow, j_grow, pairs_grow
  return Plan(b, j, pairs, None)


def plan(pattern, seq_len: int, grids, block: int = 0, max_segments: int | None = None) -> Plan:
  """The static sizes of ``pattern``'s unaligned layouts (``layout.batch_layouts``).

  ``block=0`` picks the block: ``default_block``, grown where that makes lists one block or
  where pairs pay. ``max_segments`` (rows packed back to back, ``grids`` every grid the data
  can produce) enables the packed bounds. Lists are visited as spans; flattened into pairs
  (``max_pairs`` > 0) when spans mostly compute blocks no list names (``PAIR_FRACTION``); or,
  for patterns that are not group relations, cut into runs (``runs``) when those visit fewer
  keys per query (counting ``patterns.RUN_FACTOR``), always in tiled orders
  (``distance_ordered`` false), where spans would cover whole rows of tiles. Run layouts try
  every block from ``RUN_MIN_BLOCK`` to ``RUN_BLOCK`` unless ``block`` is given.
  """
  return _plan(pat.parse(pattern), int(seq_len), grids_key(grids), int(block),
               None if max_segments is None else int(max_segments))


def block_and_bound(pattern, seq_len: int, grids, block: int = 0,
                    max_segments: int | None = None) -> tuple[int, int]:
  """The block size and static ``max_kv_blocks`` of ``plan``."""
  return tuple(plan(pattern, seq_len, grids, block, max_segments)[:2])


@functools.lru_cache(maxsize=256)
def always_alignable(seq_len: int, block: int, sizes: tuple[int, ...], max_segments: int) -> bool:
  """Whether every row of at most ``max_segments`` videos of token counts ``sizes`` (repeats
  allowed) that fits in ``seq_len`` also fits with each video rounded up to whole blocks.

  Over every reachable raw total, the largest rounded total (dynamic programming over the
  number of videos): the packer fills rows by raw counts, so any of them can occur.
  """
  L = int(seq_len)
  best = np.full(L + 1, -1, np.int64)  # largest rounded total per raw total, -1: unreachable
  best[0] = 0
  frontier = best.copy()
  for _ in range(int(max_segments)):
    nxt = np.full(L + 1, -1, np.int64)
    for n in sizes:
      if n > L:
        continue
      prev = frontier[:L + 1 - n]
      nxt[n:] = np.maximum(nxt[n:], np.where(prev >= 0, prev + -(-n // block) * block, -1))
    best = np.maximum(best, nxt)
    frontier = nxt
  return int(best.max()) <= L


def aligned_block(pattern, seq_len: int, grids, block: int = 0,
                  max_segments: int | None = None) -> int | None:
  """The block size at which ``layout.batch_layouts`` aligns ``full``'s videos
  (``layout.aligned_order``), or None when it does not.

  Only for the default block, rows packed by ``tokens.pack_rows`` (``max_segments`` given) and
  ``full``: the smallest power of two dividing ``seq_len`` that holds the largest video of
  ``grids``, when every row the packer can make fits with its videos rounded up to it, and it
  beats the unaligned plan (several key blocks per list, or a larger block). Rows of two
  252- or 256-token videos in 512 then attend in blocks of 256 rather than one block of 512:
  half the pairs.
  """
  if pat.parse(pattern) != pat.Full() or block or max_segments is None:
    return None
  return _aligned_block(int(seq_len), grids_key(grids), int(max_segments))


@functools.lru_cache(maxsize=256)
def _aligned_block(seq_len: int, grids: tuple, max_segments: int) -> int | None:
  sizes = tuple(sorted({tokens.num_tokens(g) for g in grids}))
  a = 16
  while a < sizes[-1]:
    a *= 2
  if a > min(seq_len, MAX_BLOCK) or seq_len % a:
    return None
  b, j = _block_and_bound(pat.Full(), seq_len, grids, 0, max_segments)
  if (j == 1 and b <= a) or not always_alignable(seq_len, a, sizes, max_segments):
    return None
  return a
