"""Host-side block layouts for the ``blocksparse`` attention backend (numpy only, no device).

A layout says, for one packed batch and one pattern, which (query block, key block) pairs hold at
least one allowed (query, key) pair, so the backend computes only those. Tokens are first put in
an order where every group of the pattern is a contiguous run:

| pattern    | group                   | order inside a video (stable sort) |
| ---------- | ----------------------- | ---------------------------------- |
| `full`     | one video               | unchanged                          |
| `spatial`  | one frame of one video  | (t, h, w)                          |
| `temporal` | one (h, w) of one video | (h, w, t)                          |

Videos are ordered by segment id, and each run of padding stays right after the video it follows
(leading padding first). So ``full`` and ``spatial`` orders are the identity on any row of
contiguous t-major videos (``tokens.pack_rows``, with or without gaps between videos), and
``temporal`` moves tokens only inside each video.

Padding. In ``dense`` a padding token (segment 0) attends to every padding token, which would
make a query block of padding need every padding key block (up to L/block_k of them) and blow up
the static bound. Here a padding query attends only to the padding keys of its own *chunk*: the
``block_q`` positions (in the permuted order) of its query block. Padding outputs are therefore not
those of ``dense``, but they stay finite, and real tokens never see padding nor padding real tokens
in either backend, so real outputs, and gradients of anything that reads only real outputs, are
identical. Everything downstream ignores padding outputs (loss masks, unpacking), which is why this
is acceptable. ``blocksparse.blocksparse_attention`` applies the same rule.

Everything returned has a leading batch axis and static shapes, so a layout travels in the batch
dict, shards like the rest of the batch, and a run compiles once.
"""

from __future__ import annotations

import functools
import math

import numpy as np

PATTERNS = ("full", "spatial", "temporal")
# Attention backends that read layouts from the batch: the pipeline makes them for these
# (``auto`` may resolve to blocksparse; when it does not, the model ignores them).
LAYOUT_BACKENDS = ("blocksparse", "auto")
# What make_layout returns; blocksparse_attention reads these and nothing else.
LAYOUT_KEYS = ("perm", "inv_perm", "perm_segment", "perm_coords", "kv_blocks", "kv_valid",
               "kv_readers", "kv_readers_valid")

# Coordinates (t, h, w) that decide a pattern's group besides the segment, in sort priority.
_GROUP_AXES = {"full": (), "spatial": (0,), "temporal": (1, 2)}
# Full sort order inside a segment: group axes first, then the rest so the order is canonical.
_ORDER_AXES = {"full": (), "spatial": (0, 1, 2), "temporal": (1, 2, 0)}


def _check_pattern(pattern: str) -> None:
  if pattern not in PATTERNS:
    raise ValueError(f"unknown attention pattern {pattern!r}: use one of {PATTERNS}")


def _check_inputs(segment_ids_BL, coords_BL3) -> tuple[np.ndarray, np.ndarray]:
  seg = np.asarray(segment_ids_BL)
  coords = np.asarray(coords_BL3)
  if seg.ndim != 2 or coords.shape != seg.shape + (3,):
    raise ValueError(f"expected segment_ids [B, L] and coords [B, L, 3], got {seg.shape} and "
                     f"{coords.shape}")
  return seg, coords


def check_blocks(seq_len: int, block_q: int, block_k: int) -> None:
  """Raises a ValueError naming valid sizes unless both block sizes divide ``seq_len``."""
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if int(b) < 1 or seq_len % int(b):
      divisors = [d for d in (16, 32, 64, 128, 256, 512) if d <= seq_len and seq_len % d == 0]
      raise ValueError(f"seq_len={seq_len} is not divisible by {name}={b}: use a {name} that "
                       f"divides it (e.g. {divisors or [seq_len]}) or pad rows to a multiple "
                       f"of {b}")


def pattern_order(pattern: str, segment_ids_BL, coords_BL3) -> np.ndarray:
  """Permutation ``perm [B, L]`` (int32) making every group of ``pattern`` contiguous.

  Position ``i`` of the permuted row holds original token ``perm[b, i]``. Tokens are sorted by
  (owner segment, padding after real, the pattern's coordinate order), stably; a padding token's
  owner is the video before it, so padding keeps its place and videos keep their extent.
  """
  _check_pattern(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  is_pad = seg == 0
  L = seg.shape[1]
  last_real = np.maximum.accumulate(np.where(is_pad, -1, np.arange(L)), axis=1)
  owner = np.where(last_real >= 0, np.take_along_axis(seg, np.maximum(last_real, 0), 1), 0)
  # np.lexsort sorts by the last key first and is stable.
  keys = [coords[..., a] for a in reversed(_ORDER_AXES[pattern])] + [is_pad, owner]
  return np.lexsort(keys, axis=-1).astype(np.int32)


def _group_labels(pattern: str, seg_BL: np.ndarray, coords_BL3: np.ndarray,
                  block_q: int) -> np.ndarray:
  """Non-decreasing group label per position of *permuted* rows; equal label = may attend.

  A group is a maximal run of positions sharing (padding?, segment, group coords, padding chunk).
  The order sorts real tokens by segment and group coords, so a real group is one run. A padding
  class (same chunk, same coords) may be cut into several runs, but all of them lie inside one
  query block, whose overlapping key blocks are listed anyway, so the lists stay exact.
  """
  B, L = seg_BL.shape
  is_pad = seg_BL == 0
  chunk = np.where(is_pad, np.arange(L)[None, :] // block_q, -1)
  cols = [is_pad, seg_BL, chunk] + [coords_BL3[..., a] for a in _GROUP_AXES[pattern]]
  changed = np.zeros((B, L), bool)
  for c in cols:
    changed[:, 1:] |= c[:, 1:] != c[:, :-1]
  return np.cumsum(changed, axis=1)


def _block_ranges(pattern: str, seg_BL: np.ndarray, coords_BL3: np.ndarray, block_q: int,
                  block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """First and last key block ``[B, nQ]`` holding an allowed pair of each query block.

  Groups are contiguous runs with non-decreasing labels, so the keys a query block may see are
  one contiguous range of positions (the union of the groups it touches), and the key blocks
  that overlap it are a contiguous range too: every one of them holds an allowed pair.
  """
  B, L = seg_BL.shape
  label = _group_labels(pattern, seg_BL, coords_BL3, block_q)
  q_lo, q_hi = label[:, ::block_q], label[:, block_q - 1::block_q]  # [B, nQ]
  k_lo, k_hi = label[:, ::block_k], label[:, block_k - 1::block_k]  # [B, nK]
  first = np.stack([np.searchsorted(k_hi[b], q_lo[b], side="left") for b in range(B)])
  last = np.stack([np.searchsorted(k_lo[b], q_hi[b], side="right") - 1 for b in range(B)])
  return first.astype(np.int32), last.astype(np.int32)


def needed_kv_blocks(pattern: str, segment_ids_BL, coords_BL3, block_q: int,
                     block_k: int) -> int:
  """The smallest ``max_kv_blocks`` that ``make_layout`` accepts for this batch."""
  _check_pattern(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  check_blocks(seg.shape[1], block_q, block_k)
  perm = pattern_order(pattern, seg, coords)
  seg_p = np.take_along_axis(seg, perm, axis=1)
  coords_p = np.take_along_axis(coords, perm[..., None], axis=1)
  first, last = _block_ranges(pattern, seg_p, coords_p, block_q, block_k)
  return int((last - first).max()) + 1


def make_layout(pattern: str, segment_ids_BL, coords_BL3, block_q: int, block_k: int,
                max_kv_blocks: int | None = None) -> dict[str, np.ndarray]:
  """The block layout of one packed batch for ``pattern``.

  Args:
    pattern: one of ``PATTERNS``.
    segment_ids_BL: i32 ``[B, L]``, 1..S per video, 0 for padding.
    coords_BL3: i32 ``[B, L, 3]``, (t, h, w) of each token inside its video.
    block_q, block_k: query / key block sizes; both must divide L.
    max_kv_blocks: key blocks listed per query block (static). ``None`` uses what this batch
      needs, which changes shapes between batches: use ``max_kv_blocks_bound`` for training.

  Returns:
    ``perm [B, L]`` i32: permuted position -> original token; ``inv_perm [B, L]`` i32: its inverse.
    ``perm_segment [B, L]`` i32: the segment id at each permuted position, except that padding
      gets ``-1 - chunk`` (chunk = position // block_q), so equal values = may attend.
    ``perm_coords [B, L, 3]`` i32: the coordinates at each permuted position.
    ``kv_blocks [B, nQ, max_kv_blocks]`` i32: key blocks (in the permuted order) holding an
      allowed pair of each query block, ascending; unused slots repeat the last used block.
    ``kv_valid [B, nQ, max_kv_blocks]`` bool: False on those unused slots.
    ``kv_readers [B, nK, R]`` i32 and ``kv_readers_valid [B, nK, R]`` bool: the transposed list,
      every ``n * max_kv_blocks + j`` whose slot ``kv_blocks[b, n, j]`` is key block ``m``. The
      backward pass sums key/value gradients with it (a gather) instead of a scatter-add, which
      is several times slower on CPU. ``R = max_kv_blocks`` when ``block_q == block_k``.
  """
  _check_pattern(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  B, L = seg.shape
  check_blocks(L, block_q, block_k)
  perm = pattern_order(pattern, seg, coords)
  seg_p = np.take_along_axis(seg, perm, axis=1)
  coords_p = np.take_along_axis(coords, perm[..., None], axis=1)
  first, last = _block_ranges(pattern, seg_p, coords_p, block_q, block_k)
  needed = int((last - first).max()) + 1
  if max_kv_blocks is None:
    max_kv_blocks = needed
  if needed > max_kv_blocks:
    raise ValueError(f"pattern {pattern!r} needs max_kv_blocks >= {needed} for this batch "
                     f"(block_q={block_q}, block_k={block_k}) but got {max_kv_blocks}: raise it "
                     f"to {needed}, or to max_kv_blocks_bound(...) so every batch fits")
  nQ, nK = L // block_q, L // block_k
  max_readers = _max_readers(L, block_q, block_k, max_kv_blocks)
  j = np.arange(max_kv_blocks, dtype=np.int32)
  kv = first[..., None] + j
  # The query blocks reading key block m are a contiguous range too (first/last grow with the
  # query block), found by binary search; slot of (i, m) in query block i's list is m - first[i].
  m = np.arange(nK)
  i_lo = np.stack([np.searchsorted(last[b], m, side="left") for b in range(B)])
  i_hi = np.stack([np.searchsorted(first[b], m, side="right") - 1 for b in range(B)])
  readers_needed = int((i_hi - i_lo).max()) + 1
  if readers_needed > max_readers:  # cannot happen: _max_readers is a proven bound
    raise AssertionError(f"key block read by {readers_needed} query blocks > {max_readers}")
  i = np.minimum(i_lo[..., None] + np.arange(max_readers), i_hi[..., None])
  slot = m[None, :, None] - np.take_along_axis(first, i.reshape(B, -1), axis=1).reshape(i.shape)
  inv_perm = np.empty_like(perm)
  np.put_along_axis(inv_perm, perm, np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)), axis=1)
  chunk = np.arange(L, dtype=np.int32) // block_q
  return {
      "perm": perm,
      "inv_perm": inv_perm,
      "perm_segment": np.where(seg_p == 0, -1 - chunk, seg_p).astype(np.int32),
      "perm_coords": coords_p.astype(np.int32),
      "kv_blocks": np.minimum(kv, last[..., None]).astype(np.int32),
      "kv_valid": kv <= last[..., None],
      "kv_readers": (i * max_kv_blocks + slot).astype(np.int32),
      "kv_readers_valid": i_lo[..., None] + np.arange(max_readers) <= i_hi[..., None],
  }


def _window_blocks(size_a: int, size_b: int, reach: int) -> int:
  """Most blocks of ``size_b`` overlapping ``reach`` positions either side of a block of
  ``size_a`` (blocks of each size tile positions from 0), over all alignments."""
  worst = 0
  for start in range(0, math.lcm(size_a, size_b), size_a):
    lo, hi = start - reach, start + size_a + reach  # window [lo, hi)
    worst = max(worst, (hi - 1) // size_b - lo // size_b + 1)
  return worst


def _max_readers(seq_len: int, block_q: int, block_k: int, max_kv_blocks: int) -> int:
  """Static bound on how many query blocks list one key block.

  With equal block sizes the block-pair matrix is symmetric (the predicate is, and padding chunks
  coincide with blocks), so it is ``max_kv_blocks``. Otherwise: a group inside a query block's
  range spans at most ``max_kv_blocks`` key blocks, so groups have at most
  ``max_kv_blocks * block_k`` tokens, which bounds how far a key block's readers reach.
  """
  if block_q == block_k:
    return max_kv_blocks
  reach = max_kv_blocks * block_k - 1
  return min(_window_blocks(block_k, block_q, reach), seq_len // block_q)


def max_kv_blocks_bound(pattern: str, seq_len: int, block_q: int, block_k: int,
                        max_group_tokens: int, video_align: int | None = None) -> int:
  """A ``max_kv_blocks`` that fits every batch whose largest group has ``max_group_tokens``.

  The group size of a video of token grid (T', H', W') is T'H'W' for ``full``, H'W' for
  ``spatial`` and T' for ``temporal``. A query block sees the union of the groups it touches,
  which lies within ``max_group_tokens - 1`` positions on each side of it (padding chunks never
  leave their query block), so the bound is the number of key blocks overlapping that window,
  at the worst alignment of the query block against key blocks.

  ``video_align``: if the packer starts every video at a multiple of it (a multiple of both
  block sizes, padding in between), no query block holds two videos, which tightens the bound
  for ``full`` to the key blocks of one video (e.g. 2 instead of 5 for 512-token videos in
  256-token blocks). It does not help the other patterns, whose groups are not aligned.
  """
  _check_pattern(pattern)
  check_blocks(seq_len, block_q, block_k)
  reach = max(int(max_group_tokens), 1) - 1
  bound = _window_blocks(block_q, block_k, reach)
  if video_align is not None:
    if int(video_align) % math.lcm(block_q, block_k):
      raise ValueError(f"video_align={video_align} must be a multiple of both block sizes "
                       f"({block_q}, {block_k}): use {math.lcm(block_q, block_k)} or a multiple")
    if pattern == "full":
      # A query block lies in [start, start + G rounded up to block_q) of one video, plus
      # padding of its own chunk; the video start is a key-block boundary.
      video = -(-(-(-int(max_group_tokens) // block_q) * block_q) // block_k)
      bound = min(bound, max(video, _window_blocks(block_q, block_k, 0)))
  return min(bound, seq_len // block_k)


_MAX_BLOCK = 256  # largest block batch_layouts grows to when groups are aligned


def default_block(seq_len: int, max_group_tokens: int) -> int:
  """A block size (for queries and keys alike) that measured well on CPU, dividing ``seq_len``.

  The largest power of two within [16, 128] not above the largest group. Measured (f32, XLA:CPU,
  forward + backward, L=2048): 16 is best for ``temporal`` with T'=8 (8 is no faster, per-block
  overhead dominates); 128 is best for 256-token frames or videos under the static bound (256
  wins only when every group starts on a block boundary; 64 loses to overhead).
  """
  block = 16
  while block * 2 <= min(int(max_group_tokens), 128):
    block *= 2
  while block > 1 and seq_len % block:
    block //= 2
  return block


# Which patterns each block type applies, in order (the model and the data pipeline agree here).
BLOCK_PATTERNS = {
    "full3d": ("full",),
    "factorized": ("spatial", "temporal"),
}


def group_tokens(pattern: str, grid) -> int:
  """Tokens in one group of ``pattern`` for a video of token grid ``(T', H', W')``."""
  _check_pattern(pattern)
  t, h, w = (int(g) for g in grid)
  return {"full": t * h * w, "spatial": h * w, "temporal": t}[pattern]


def packed_kv_blocks_bound(pattern: str, seq_len: int, block: int, grids,
                           max_segments: int) -> int:
  """A ``max_kv_blocks`` (equal query and key blocks) that fits every row packed the way
  ``tokens.pack_rows`` packs: videos back to back from position 0, at most ``max_segments`` of
  them, each of one of ``grids`` (every grid the data can produce; a superset is fine).

  Such rows can start a video only at sums of up to ``max_segments - 1`` video sizes, and inside
  a video the groups sit at fixed offsets, so for each query block position this finds the
  first allowed key (the start of the group holding the block's first token, over every video
  that can cover it) and the last (the end of the group holding its last token) and counts the
  key blocks between. Far tighter than ``max_kv_blocks_bound`` when sizes are few: P0's one
  8x16x16 video per row needs 1 block of 256 for ``spatial``, not 3. Returns ``None`` when the
  enumeration would be too large to be worth it (many sizes: use ``max_kv_blocks_bound``).
  """
  _check_pattern(pattern)
  check_blocks(seq_len, block, block)
  L, b = int(seq_len), int(block)
  sizes = sorted({_num_tokens(g) for g in grids})
  if not sizes or sizes[-1] > L:
    raise ValueError(f"grids {list(grids)} hold a video longer than seq_len={L}")
  starts = np.zeros(L + 1, bool)
  starts[0] = True
  frontier = starts.copy()
  for _ in range(int(max_segments) - 1):
    nxt = np.zeros(L + 1, bool)
    for n in sizes:
      nxt[n:] |= frontier[:L + 1 - n]
    starts |= nxt
    frontier = nxt
  offsets = np.flatnonzero(starts[:L])
  kinds = sorted({(_num_tokens(g), group_tokens(pattern, g)) for g in grids})
  if len(kinds) * offsets.size * (L // b) > 2e7:
    return None
  first = np.arange(0, L, b)  # first position of each query block
  last = first + b - 1
  lo, hi = first.copy(), first + b  # padding queries see their own block only
  for n, g in kinds:
    o = offsets[offsets + n <= L][:, None]
    covers_first = (o <= first) & (first < o + n)
    lo = np.minimum(lo, np.where(covers_first, o + (first - o) // g * g, L).min(0))
    covers_last = (o <= last) & (last < o + n)
    hi = np.maximum(hi, np.where(covers_last, o + ((last - o) // g + 1) * g, 0).max(0))
  return int(((hi - 1) // b - lo // b + 1).max())


def _num_tokens(grid) -> int:
  return int(np.prod([int(g) for g in grid]))


def batch_layouts(patterns, segment_ids_BL, coords_BL3, grids, block: int = 0,
                  exact: bool = False, max_segments: int | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
  """Layouts of one packed batch for each pattern, sized for every video of ``grids``.

  ``grids`` fix the static ``max_kv_blocks`` bound, so every training batch has the same shapes
  and the step compiles once. Without ``max_segments`` only the largest group of ``grids``
  matters (e.g. the config's largest video per aspect ratio) and videos may sit anywhere. With
  it, ``grids`` must be every grid the data can produce and rows must be packed back to back
  (``tokens.pack_rows``, as the pipeline does): the bound is then ``packed_kv_blocks_bound``, and
  the default block grows while that lists no more keys per query (P0: 256-token frames in
  blocks of 256, one block each). ``exact=True`` sizes the lists for this batch alone (shapes
  then depend on the batch: for one-off calls such as sampling). ``block=0`` picks
  ``default_block`` per pattern.
  """
  seq_len = np.shape(segment_ids_BL)[1]
  out = {}
  for p in patterns:
    b, bound = block_and_bound(p, seq_len, grids, block, max_segments)
    out[p] = make_layout(p, segment_ids_BL, coords_BL3, b, b, None if exact else bound)
  return out


@functools.lru_cache(maxsize=256)
def _block_and_bound(pattern: str, seq_len: int, grids: tuple, block: int,
                     max_segments: int | None) -> tuple[int, int]:
  biggest = max(group_tokens(pattern, g) for g in grids)

  def bound(b):
    window = max_kv_blocks_bound(pattern, seq_len, b, b, biggest)
    if max_segments is None:
      return window
    packed = packed_kv_blocks_bound(pattern, seq_len, b, grids, max_segments)
    return window if packed is None else min(window, packed)

  b = int(block) or default_block(seq_len, biggest)
  j = bound(b)
  # Fewer, larger blocks cost less per pair; take them while they list no more keys per query.
  while not block and max_segments is not None and 2 * b <= _MAX_BLOCK and seq_len % (2 * b) == 0:
    j2 = bound(2 * b)
    if j2 * 2 * b > j * b:
      break
    b, j = 2 * b, j2
  return b, j


def block_and_bound(pattern: str, seq_len: int, grids, block: int = 0,
                    max_segments: int | None = None) -> tuple[int, int]:
  """The block size and static ``max_kv_blocks`` that ``batch_layouts`` uses for ``pattern``."""
  key = tuple(sorted({tuple(int(x) for x in g) for g in grids}))
  return _block_and_bound(pattern, int(seq_len), key, int(block),
                          None if max_segments is None else int(max_segments))
