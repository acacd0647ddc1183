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

Numpy only, cached: the pipeline asks for every batch.
"""

from __future__ import annotations

import functools
import math

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
  can draw.
  """
  p = pat.parse(pattern)
  check_blocks(seq_len, block_q, block_k)
  reach = max(p.max_distance(g) for g in grids)
  return min(window_blocks(block_q, block_k, reach), seq_len // block_k)


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
  them, each of one of ``grids`` (every grid the data can produce; a superset is fine).

  For each query block position: the first key any video covering its first token may see,
  and the last key any video covering its last token may see. Far tighter than the other
  bounds when sizes are few (one 8x16x16 video per row needs 1 block of 256 for ``spatial``,
  not 3). ``None`` when the enumeration would be too large to be worth it.
  """
  return _packed_bound(pat.parse(pattern), int(seq_len), int(block), grids_key(grids),
                       int(max_segments))


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
  most key blocks (packed rows), else ``max_kv_blocks`` per query block."""
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


@functools.lru_cache(maxsize=256)
def _plan(p: pat.Pattern, seq_len: int, grids: tuple, block: int,
          max_segments: int | None) -> tuple[int, int, int]:
  b, j = _block_and_bound(p, seq_len, grids, block, max_segments)
  pairs = _max_pairs(p, seq_len, b, grids, max_segments, j)
  grow = b
  while pairs and not block and 2 * grow <= PAIR_BLOCK and seq_len % (2 * grow) == 0:
    grow *= 2
    j_grow = _bound(p, seq_len, grow, grids, max_segments)
    pairs_grow = _max_pairs(p, seq_len, grow, grids, max_segments, j_grow)
    if not pairs_grow or pairs_grow * grow**2 > PAIR_AREA_SLACK * pairs * b**2:
      break
    b, j, pairs = grow, j_grow, pairs_grow
  return b, j, pairs


def plan(pattern, seq_len: int, grids, block: int = 0,
         max_segments: int | None = None) -> tuple[int, int, int]:
  """``(block, max_kv_blocks, max_pairs)`` of ``pattern``'s unaligned layouts
  (``layout.batch_layouts``): ``block=0`` picks ``default_block`` (grown where that makes
  lists one block, or where pairs pay); ``max_segments`` (rows packed back to back,
  ``grids`` every grid the data can produce) enables the packed bounds; ``max_pairs`` is 0
  unless the lists are flattened into pairs (``PAIR_FRACTION``)."""
  return _plan(pat.parse(pattern), int(seq_len), grids_key(grids), int(block),
               None if max_segments is None else int(max_segments))


def block_and_bound(pattern, seq_len: int, grids, block: int = 0,
                    max_segments: int | None = None) -> tuple[int, int]:
  """The block size and static ``max_kv_blocks`` of ``plan``."""
  return plan(pattern, seq_len, grids, block, max_segments)[:2]


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
