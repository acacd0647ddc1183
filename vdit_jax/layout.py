"""Host-side block layouts for the ``blocksparse`` attention backend (numpy only, no device).

A layout says, for one packed batch and one pattern, which (query block, key block) pairs hold at
least one allowed (query, key) pair, so the backend computes only those. Tokens are first put in
an order where every group of the pattern is a contiguous run:

| pattern    | group                   | order inside a video (stable sort) |
| ---------- | ----------------------- | ---------------------------------- |
| `full`     | one video               | unchanged                          |
| `spatial`  | one frame of one video  | (t, h, w)                          |
| `temporal` | one (h, w) of one video | (h, w, t)                          |

Windowed patterns (``window``, ``local``, ``cross``: see ``vdit_jax.attention``) have no groups:
each token sees a box around itself. Their tokens keep the t-major order, where a token's keys
lie within ``kt H W + kh W + kw`` positions of it: that distance grows with every grid side, so
the largest grids give a static bound that holds for every smaller video and any packing
(``windowed_bound``); when the packer's sizes are known, ``packed_kv_blocks_bound`` tightens it
from each position's window box (``_key_range``). Their lists come from an exact block-pair test
(bounding boxes of blocks first, then every token pair of the candidate block pairs), so a block
pair within that distance is listed only if it holds an allowed pair. (Tile-major orders list
fewer blocks for some videos alone, but their need is not monotone in the grid: measured on
random packings, smaller videos needed 32 key blocks where the largest grids needed 13, so no
static bound followed.)

Videos are ordered by segment id, and each run of padding stays right after the video it follows
(leading padding first). So ``full``, ``spatial`` and windowed orders are the identity on any row
of contiguous t-major videos (``tokens.pack_rows``, with or without gaps between videos), and
``temporal`` moves tokens only inside each video. The one exception: ``full`` may move the
padding between videos so that each starts on a block boundary (``aligned_order``, chosen by
``batch_layouts`` when every row the packer can make allows it).

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

from vdit_jax import tokens

PATTERNS = ("full", "spatial", "temporal")
# Windowed patterns take integer parameters, written as a call: name -> number of parameters.
# ``window(kt,kh,kw)``; ``local(kt,r)`` and ``cross(kt,r)`` (per-head sparse sub-patterns).
WINDOWED = {"window": 3, "local": 2, "cross": 2}
# Attention backends that read layouts from the batch: the pipeline makes them for these
# (``auto`` may resolve to one of them; when it does not, the model ignores them).
LAYOUT_BACKENDS = ("blocksparse", "pallas", "auto")
# What make_layout returns; blocksparse_attention reads these and nothing else.
LAYOUT_KEYS = ("perm", "inv_perm", "perm_segment", "perm_coords", "kv_blocks", "kv_valid",
               "kv_readers", "kv_readers_valid")

# Coordinates (t, h, w) that decide a pattern's group besides the segment, in sort priority.
GROUP_AXES = {"full": (), "spatial": (0,), "temporal": (1, 2)}
# Full sort order inside a segment: group axes first, then the rest so the order is canonical.
_ORDER_AXES = {"full": (), "spatial": (0, 1, 2), "temporal": (1, 2, 0)}


@functools.lru_cache(maxsize=256)
def parse_pattern(pattern: str) -> tuple[str, tuple[int, ...]]:
  """``"window(1,2,2)"`` -> ``("window", (1, 2, 2))``; ``"full"`` -> ``("full", ())``."""
  if pattern in PATTERNS:
    return pattern, ()
  name, _, rest = str(pattern).partition("(")
  if name in WINDOWED and rest.endswith(")"):
    try:
      args = tuple(int(a) for a in rest[:-1].split(","))
    except ValueError:
      args = ()
    if len(args) == WINDOWED[name] and min(args) >= 0:
      return name, args
  raise ValueError(f"unknown attention pattern {pattern!r}: use one of {PATTERNS}, "
                   "window(kt,kh,kw), local(kt,r) or cross(kt,r) with integers >= 0")


def window_pattern(kt: int, kh: int, kw: int) -> str:
  """The ``window`` pattern with these reaches (checked), e.g. ``"window(1,2,2)"``."""
  pattern = f"window({int(kt)},{int(kh)},{int(kw)})"
  parse_pattern(pattern)
  return pattern


def _check_pattern(pattern: str) -> None:
  parse_pattern(pattern)


def is_windowed(pattern: str) -> bool:
  return parse_pattern(pattern)[0] in WINDOWED


def window_reach(pattern: str) -> tuple[int, int, int]:
  """Largest (|dt|, |dh|, |dw|) a windowed pattern allows."""
  name, args = parse_pattern(pattern)
  if name == "window":
    return args
  kt, r = args
  return kt, r, r


def spatial_reach(r, dt, xp=np):
  """Reach of ``local``/``cross`` at frame distance ``dt``: ``r`` halved per frame, rounded
  down (``r >> dt``; shifts capped at 30 so large ``dt`` give 0, not undefined bits)."""
  return xp.right_shift(r, xp.minimum(dt, 30))


def allowed(pattern: str, seg_q, c_q, seg_k, c_k, xp=np):
  """The predicate of ``pattern`` on broadcastable operands, in numpy or ``xp=jax.numpy``.

  ``seg_*`` are segment ids (padding may be split into chunks by the caller), ``c_*`` the
  coordinates with a trailing axis of 3. Symmetric in (query, key) for every pattern.
  """
  name, args = parse_pattern(pattern)
  mask = seg_q == seg_k
  same = lambda a: c_q[..., a] == c_k[..., a]
  if name == "full":
    return mask
  if name == "spatial":
    return mask & same(0)
  if name == "temporal":
    return mask & same(1) & same(2)
  dt, dh, dw = (xp.abs(c_q[..., a] - c_k[..., a]) for a in range(3))
  if name == "window":
    kt, kh, kw = args
    return mask & (dt <= kt) & (dh <= kh) & (dw <= kw)
  kt, r = args
  reach = spatial_reach(r, dt, xp)
  if name == "local":
    return mask & (dt <= kt) & (dh <= reach) & (dw <= reach)
  return mask & (dt <= kt) & (((dh == 0) & (dw <= reach)) | ((dw == 0) & (dh <= reach)))


def _order_axes(pattern: str) -> tuple[int, ...]:
  return (0, 1, 2) if is_windowed(pattern) else _ORDER_AXES[pattern]


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
  keys = [coords[..., a] for a in reversed(_order_axes(pattern))] + [is_pad, owner]
  return np.lexsort(keys, axis=-1).astype(np.int32)


def _video_sizes(seg_row: np.ndarray) -> np.ndarray:
  """Token counts of the videos of one row, in segment-id order (``full``'s order)."""
  counts = np.bincount(seg_row[seg_row > 0])
  return counts[counts > 0]


def alignable(segment_ids_BL, block: int) -> bool:
  """Whether every row's videos, each rounded up to whole blocks of ``block``, fit in its L
  positions: what ``aligned_order`` needs."""
  seg = np.asarray(segment_ids_BL)
  L = seg.shape[1]
  return all(int((-(-_video_sizes(row) // block) * block).sum()) <= L for row in seg)


def aligned_order(segment_ids_BL, coords_BL3, block: int) -> np.ndarray:
  """``full``'s order (``pattern_order``) with every video moved to start at a multiple of
  ``block``, and the row's padding tokens (in their order) filling the gaps and the tail.

  A block then never holds two videos, so with blocks at least as large as the largest video
  every list is one block: block-diagonal attention over whole blocks, where back to back
  videos straddle blocks and make every query block see its neighbour's keys. Raises a
  ValueError naming the row unless its videos, each rounded up to whole blocks, fit in L.
  """
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  B, L = seg.shape
  base = pattern_order("full", seg, coords)
  perm = np.empty_like(base)
  for b in range(B):
    order = base[b]
    real = seg[b, order] > 0
    sizes = _video_sizes(seg[b])
    rounded = -(-sizes // block) * block
    if rounded.sum() > L:
      raise ValueError(f"row {b}: videos of {sizes.tolist()} tokens, each rounded up to whole "
                       f"blocks of {block}, need {int(rounded.sum())} > L={L} positions: build "
                       "this layout unaligned (align=False), or use a smaller block")
    # Destination of the i-th real token: its video's aligned start plus its offset inside.
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    dest = np.repeat(np.r_[0, np.cumsum(rounded)[:-1]] - first, sizes) + np.arange(sizes.sum())
    row = np.empty(L, perm.dtype)
    free = np.ones(L, bool)
    row[dest], free[dest] = order[real], False
    row[free] = order[~real]
    perm[b] = row
  return perm


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
  cols = [is_pad, seg_BL, chunk] + [coords_BL3[..., a] for a in GROUP_AXES[pattern]]
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
  if is_windowed(pattern):
    return _list_span(_block_pairs(pattern, seg_p, coords_p, block_q, block_k))
  first, last = _block_ranges(pattern, seg_p, coords_p, block_q, block_k)
  return int((last - first).max()) + 1


def make_layout(pattern: str, segment_ids_BL, coords_BL3, block_q: int, block_k: int,
                max_kv_blocks: int | None = None, align: bool = False) -> dict[str, np.ndarray]:
  """The block layout of one packed batch for ``pattern``.

  Args:
    pattern: one of ``PATTERNS``.
    segment_ids_BL: i32 ``[B, L]``, 1..S per video, 0 for padding.
    coords_BL3: i32 ``[B, L, 3]``, (t, h, w) of each token inside its video.
    block_q, block_k: query / key block sizes; both must divide L.
    max_kv_blocks: key blocks listed per query block (static). ``None`` uses what this batch
      needs, which changes shapes between batches: use ``max_kv_blocks_bound`` for training.
    align: ``full`` only, equal blocks: order the tokens by ``aligned_order`` (every video
      starting on a block boundary, padding moved into the gaps), so a block never holds two
      videos; raises if a row's videos do not fit that way (``alignable``).

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
  if align and (pattern != "full" or block_q != block_k):
    raise ValueError(f"align=True needs pattern 'full' and equal blocks, got {pattern!r} with "
                     f"block_q={block_q}, block_k={block_k}: other patterns' groups do not "
                     "start at video starts, so aligning videos does not align them")
  perm = aligned_order(seg, coords, block_q) if align else pattern_order(pattern, seg, coords)
  seg_p = np.take_along_axis(seg, perm, axis=1)
  coords_p = np.take_along_axis(coords, perm[..., None], axis=1)
  if is_windowed(pattern):
    return _windowed_layout(pattern, perm, seg_p, coords_p, block_q, block_k, max_kv_blocks)
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
  return {
      "perm": perm,
      "inv_perm": _inverse(perm),
      "perm_segment": _attention_segments(seg_p, block_q),
      "perm_coords": coords_p.astype(np.int32),
      "kv_blocks": np.minimum(kv, last[..., None]).astype(np.int32),
      "kv_valid": kv <= last[..., None],
      "kv_readers": (i * max_kv_blocks + slot).astype(np.int32),
      "kv_readers_valid": i_lo[..., None] + np.arange(max_readers) <= i_hi[..., None],
  }


def _attention_segments(seg_p: np.ndarray, block_q: int) -> np.ndarray:
  """Segment ids of permuted rows with padding split per query block: ``-1 - chunk``."""
  chunk = np.arange(seg_p.shape[1], dtype=np.int32) // block_q
  return np.where(seg_p == 0, -1 - chunk, seg_p).astype(np.int32)


def _block_pairs(pattern: str, seg_p: np.ndarray, coords_p: np.ndarray, block_q: int,
                 block_k: int) -> np.ndarray:
  """``[B, nQ, nK]`` bool: whether (query block, key block) holds an allowed pair, exactly.

  Candidates first, at block level: blocks whose bounding boxes of (segment, t, h, w) over real
  tokens come within the pattern's reach, plus the key blocks overlapping a query block's own
  positions when both hold padding. Only candidates get the token-pair test, and ``window``
  candidates whose boxes lie wholly within reach of each other need none. So host cost follows
  the listed pairs, not L^2.
  """
  B, L = seg_p.shape
  nQ, nK = L // block_q, L // block_k
  real = seg_p > 0
  att = _attention_segments(seg_p, block_q)
  big = np.int32(2**30)  # far beyond any coordinate plus reach, and no overflow

  def boxes(block):
    vals = np.concatenate([seg_p[..., None], coords_p], -1).astype(np.int32)
    vals = vals.reshape(B, L // block, block, 4)
    r = real.reshape(B, L // block, block, 1)
    return np.where(r, vals, big).min(2), np.where(r, vals, -big).max(2)  # [B, n, 4]

  (q_lo, q_hi), (k_lo, k_hi) = boxes(block_q), boxes(block_k)
  reach = (0,) + tuple(window_reach(pattern))
  q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
  k_lo, k_hi = k_lo[:, None], k_hi[:, None]
  cand = np.ones((B, nQ, nK), bool)
  for a in range(4):  # one axis at a time: [B, nQ, nK] temporaries only
    cand &= (q_lo[..., a] - reach[a] <= k_hi[..., a]) & (k_lo[..., a] <= q_hi[..., a] + reach[a])
  i, j = np.arange(nQ)[:, None], np.arange(nK)[None, :]
  own = (j * block_k < (i + 1) * block_q) & (i * block_q < (j + 1) * block_k)
  pad_q = (~real).reshape(B, nQ, block_q).any(-1)[:, :, None]
  pad_k = (~real).reshape(B, nK, block_k).any(-1)[:, None, :]
  cand |= own & pad_q & pad_k
  sure = np.zeros_like(cand)
  if parse_pattern(pattern)[0] == "window":
    one_video = ((q_lo[..., 0] == q_hi[..., 0]) & (k_lo[..., 0] == k_hi[..., 0])
                 & (q_lo[..., 0] == k_lo[..., 0]))
    sure = cand & one_video
    for a in (1, 2, 3):
      sure &= np.maximum(q_hi[..., a] - k_lo[..., a], k_hi[..., a] - q_lo[..., a]) <= reach[a]
  pairs = sure.copy()
  b, i, j = np.nonzero(cand & ~sure)
  att_q, att_k = att.reshape(B, nQ, block_q), att.reshape(B, nK, block_k)
  c_q, c_k = coords_p.reshape(B, nQ, block_q, 3), coords_p.reshape(B, nK, block_k, 3)
  step = max(1, 2**21 // (block_q * block_k))
  for s in range(0, len(b), step):
    bb, ii, jj = b[s:s + step], i[s:s + step], j[s:s + step]
    hit = allowed(pattern, att_q[bb, ii][:, :, None], c_q[bb, ii][:, :, None, :],
                  att_k[bb, jj][:, None, :], c_k[bb, jj][:, None, :, :]).any(axis=(1, 2))
    pairs[bb[hit], ii[hit], jj[hit]] = True
  return pairs


def _windowed_layout(pattern, perm, seg_p, coords_p, block_q, block_k, max_kv_blocks):
  """``make_layout`` for windowed patterns: lists from the exact block-pair test."""
  B, L = seg_p.shape
  nQ, nK = L // block_q, L // block_k
  pairs = _block_pairs(pattern, seg_p, coords_p, block_q, block_k)
  count = pairs.sum(-1)
  needed = _list_span(pairs)
  if max_kv_blocks is None:
    max_kv_blocks = needed
  if needed > max_kv_blocks:
    raise ValueError(f"pattern {pattern!r} needs max_kv_blocks >= {needed} for this batch "
                     f"(block_q={block_q}, block_k={block_k}) but got {max_kv_blocks}: raise it "
                     f"to {needed}, or to windowed_bound(...) so every batch fits")
  J = int(max_kv_blocks)
  # Listed blocks first, ascending (a stable sort of "not listed").
  order = np.argsort(~pairs, axis=-1, kind="stable")
  if J > nK:
    order = np.concatenate([order, np.repeat(order[..., -1:], J - nK, -1)], -1)
  order = order[..., :J]
  valid = np.arange(J) < count[..., None]
  last = np.take_along_axis(order, np.maximum(count - 1, 0)[..., None], -1)
  kv = np.where(valid, order, last)
  # Transposed list: slots n * J + j sorted by the key block they read (unused slots last).
  key = np.where(valid, kv, nK).reshape(B, nQ * J)
  by_key = np.argsort(key, axis=-1, kind="stable")
  n_read = np.stack([np.bincount(k, minlength=nK + 1)[:nK] for k in key])
  start = np.cumsum(n_read, -1) - n_read
  # The block-pair matrix is symmetric with equal block sizes (so R = J); otherwise a key block
  # meets at most w query blocks' worth of positions, each reading at most w * J blocks.
  w = _window_blocks(block_k, block_q, 0)
  R = min(nQ, w * w * J)
  if int(n_read.max()) > R:  # cannot happen: R is a bound (see above)
    raise AssertionError(f"key block read by {int(n_read.max())} query blocks > {R}")
  r = np.arange(R)
  idx = np.minimum(start[..., None] + np.minimum(r, np.maximum(n_read[..., None] - 1, 0)),
                   nQ * J - 1)
  readers = np.take_along_axis(by_key, idx.reshape(B, -1), -1).reshape(B, nK, R)
  return {
      "perm": perm,
      "inv_perm": _inverse(perm),
      "perm_segment": _attention_segments(seg_p, block_q),
      "perm_coords": coords_p.astype(np.int32),
      "kv_blocks": kv.astype(np.int32),
      "kv_valid": valid,
      "kv_readers": readers.astype(np.int32),
      "kv_readers_valid": r < n_read[..., None],
  }


def _list_span(pairs_BNM: np.ndarray) -> int:
  """Most key blocks from a query block's first listed block to its last, both included.

  The lists themselves hold only blocks with an allowed pair, but ``blocksparse`` computes each
  query block against the ``max_kv_blocks`` consecutive blocks from its first listed one (a
  slice, not a gather), so they must fit there.
  """
  M = pairs_BNM.shape[-1]
  first = np.argmax(pairs_BNM, axis=-1)
  last = M - 1 - np.argmax(pairs_BNM[..., ::-1], axis=-1)
  return int((last - first).max()) + 1


def _inverse(perm: np.ndarray) -> np.ndarray:
  inv = np.empty_like(perm)
  B, L = perm.shape
  np.put_along_axis(inv, perm, np.broadcast_to(np.arange(L, dtype=perm.dtype), (B, L)), axis=1)
  return inv


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
  if is_windowed(pattern):
    raise ValueError(f"pattern {pattern!r} has no groups: use windowed_bound for its "
                     "max_kv_blocks")
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


# Largest block batch_layouts grows to when that makes every list one block (groups aligned to
# blocks): block-diagonal attention, whose large blocks blocksparse computes query-chunked.
_MAX_BLOCK = 4096


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


def window_distance(pattern: str, grid) -> int:
  """How far apart, in a video's t-major order, two tokens that ``pattern`` lets attend can be:
  ``dt H W + dh W + dw`` at its largest over the allowed offsets of a video of token grid
  ``grid`` (``kt H W + kh W + kw`` for ``window``, reaches clipped to the grid)."""
  name, args = parse_pattern(pattern)
  t, h, w = (int(g) for g in grid)
  if name == "window":
    kt, kh, kw = args
    return min(kt, t - 1) * h * w + min(kh, h - 1) * w + min(kw, w - 1)
  kt, r = args
  far = 0
  for dt in range(min(kt, t - 1) + 1):
    dh, dw = min(int(spatial_reach(r, dt)), h - 1), min(int(spatial_reach(r, dt)), w - 1)
    far = max(far, dt * h * w + (dh * w + dw if name == "local" else max(dh * w, dw)))
  return far


def windowed_bound(pattern: str, seq_len: int, block_q: int, block_k: int, grids) -> int:
  """A ``max_kv_blocks`` for a windowed pattern that fits every row of videos within ``grids``.

  Every key a query block may see lies within ``window_distance`` positions of it (padding
  keys within its own positions), whichever videos share the block, so the bound is the key
  blocks overlapping that window at the worst alignment. The distance grows with each grid
  side, so the config's largest grids bound every video it can draw.
  """
  _check_pattern(pattern)
  check_blocks(seq_len, block_q, block_k)
  reach = max(window_distance(pattern, g) for g in grids)
  return min(_window_blocks(block_q, block_k, reach), seq_len // block_k)


# Which patterns each block type applies, one per sublayer, in order (the model, the data
# pipeline and the FLOP counter read this). ``window`` stands for model.window; ``sparse`` for
# one sub-pattern per head group (model.sparse_heads, model.sparse_window).
BLOCK_PATTERNS = {
    "full3d": ("full",),
    "factorized": ("spatial", "temporal"),
    "spatial_only": ("spatial",),
    "temporal_only": ("temporal",),
    "window": ("window",),
    "sparse": ("sparse",),
}
# ``alternating`` is a schedule over depth, not a block: these two, in turn.
ALTERNATING = ("spatial_only", "temporal_only")
BLOCK_TYPES = tuple(BLOCK_PATTERNS) + ("alternating",)
SPARSE_HEADS = ("local", "cross", "global")


def layer_blocks(block: str, depth: int) -> tuple[str, ...]:
  """Block type of each layer: ``model.block`` is one type for every layer, ``alternating``,
  or a comma list with one type per layer."""
  names = [b.strip() for b in str(block).split(",")]
  if len(names) == 1 and names[0] == "alternating":
    return tuple(ALTERNATING[i % 2] for i in range(depth))
  bad = [b for b in names if b not in BLOCK_PATTERNS]
  if bad:
    raise ValueError(f"model.block={block!r} names unknown block types {bad}: use one of "
                     f"{BLOCK_TYPES}, or a comma list of {tuple(BLOCK_PATTERNS)} with one "
                     "entry per layer")
  if len(names) == 1:
    return tuple(names) * depth
  if len(names) != depth:
    raise ValueError(f"model.block={block!r} lists {len(names)} block types but model.depth="
                     f"{depth}: give exactly one per layer, or a single type for all")
  return tuple(names)


def sparse_head_patterns(model_cfg) -> tuple[str, ...]:
  """Pattern of each head of a ``sparse`` sublayer, from ``model.sparse_heads`` (sub-patterns of
  equal contiguous head groups) and ``model.sparse_window = (kt, local reach, cross reach)``."""
  names = [n.strip() for n in str(model_cfg.sparse_heads).split(",")]
  heads = int(model_cfg.num_heads)
  bad = [n for n in names if n not in SPARSE_HEADS]
  if bad or heads % len(names):
    raise ValueError(f"model.sparse_heads={model_cfg.sparse_heads!r} must be a comma list of "
                     f"{SPARSE_HEADS} whose length divides model.num_heads={heads} (each entry "
                     "is one equal group of heads)")
  window = tuple(int(v) for v in model_cfg.sparse_window)
  if len(window) != 3 or min(window) < 0:
    raise ValueError(f"model.sparse_window={tuple(model_cfg.sparse_window)} must be three "
                     "integers >= 0: (kt, local reach, cross reach)")
  kt, r_local, r_cross = window
  spec = {"local": f"local({kt},{r_local})", "cross": f"cross({kt},{r_cross})",
          "global": "full"}
  per = heads // len(names)
  return tuple(spec[n] for n in names for _ in range(per))


def layer_patterns(model_cfg) -> tuple[tuple, ...]:
  """Per layer, per sublayer: a pattern, or (``sparse``) a tuple of one pattern per head."""
  window = tuple(int(v) for v in model_cfg.window)
  out = []
  for block in layer_blocks(model_cfg.block, int(model_cfg.depth)):
    subs = []
    for p in BLOCK_PATTERNS[block]:
      if p == "window":
        if len(window) != 3 or min(window) < 0:
          raise ValueError(f"model.window={tuple(model_cfg.window)} must be three integers "
                           ">= 0: (kt, kh, kw)")
        p = window_pattern(*window)
      elif p == "sparse":
        p = sparse_head_patterns(model_cfg)
      subs.append(p)
    out.append(tuple(subs))
  return tuple(out)


def config_patterns(model_cfg) -> tuple[str, ...]:
  """Every pattern the model's layers use (per head included), each once, in order of use:
  the masks (``dense``) or layouts (``blocksparse``) a batch needs."""
  seen = []
  for layer in layer_patterns(model_cfg):
    for sub in layer:
      for p in (sub if isinstance(sub, tuple) else (sub,)):
        if p not in seen:
          seen.append(p)
  return tuple(seen)


def group_tokens(pattern: str, grid) -> int:
  """Tokens in one group of ``pattern`` for a video of token grid ``(T', H', W')``."""
  if is_windowed(pattern):
    raise ValueError(f"pattern {pattern!r} has no groups: a windowed pattern's layouts are "
                     "sized by windowed_bound")
  t, h, w = (int(g) for g in grid)
  return {"full": t * h * w, "spatial": h * w, "temporal": t}[pattern]


@functools.lru_cache(maxsize=1024)
def _key_range(pattern: str, kind: tuple) -> tuple[np.ndarray, np.ndarray]:
  """Per position of one video in ``pattern``'s order: a lower bound on its first allowed key
  and an upper bound on its last (exclusive), both non-decreasing, video-relative.

  ``kind`` is ``(tokens, group tokens)`` for grouped patterns (exact: the group's ends) and the
  token grid for windowed ones: the t-major positions of the window box's corners clipped to the
  grid (the box of reaches (kt, r, r) for ``local`` and ``cross``, which allow a subset of it),
  made monotone by a suffix minimum and a prefix maximum.
  """
  if not is_windowed(pattern):
    n, g = kind
    p = np.arange(n)
    return p // g * g, (p // g + 1) * g
  size = np.asarray(kind)
  c = tokens.grid_coords(kind)
  reach = np.asarray(window_reach(pattern))
  pos = lambda x: (x[:, 0] * size[1] + x[:, 1]) * size[2] + x[:, 2]
  key_lo = pos(np.maximum(c - reach, 0))
  key_hi = pos(np.minimum(c + reach, size - 1)) + 1
  return (np.minimum.accumulate(key_lo[::-1])[::-1], np.maximum.accumulate(key_hi))


def packed_kv_blocks_bound(pattern: str, seq_len: int, block: int, grids,
                           max_segments: int) -> int:
  """A ``max_kv_blocks`` (equal query and key blocks) that fits every row packed the way
  ``tokens.pack_rows`` packs: videos back to back from position 0, at most ``max_segments`` of
  them, each of one of ``grids`` (every grid the data can produce; a superset is fine).

  Such rows can start a video only at sums of up to ``max_segments - 1`` video sizes, and inside
  a video the groups (windowed patterns: each token's window) sit at fixed offsets, so for each
  query block position this finds the first allowed key (the start of the group holding the
  block's first token, over every video that can cover it) and the last (the end of the group
  holding its last token) and counts the key blocks between (``_key_range``). Far tighter than
  ``max_kv_blocks_bound`` when sizes are few: P0's one 8x16x16 video per row needs 1 block of
  256 for ``spatial``, not 3. Returns ``None`` when the
  enumeration would be too large to be worth it (many sizes: use ``max_kv_blocks_bound``).
  """
  _check_pattern(pattern)
  check_blocks(seq_len, block, block)
  L, b = int(seq_len), int(block)
  sizes = sorted({tokens.num_tokens(g) for g in grids})
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
  kinds = sorted(_grids_key(grids) if is_windowed(pattern) else
                 {(tokens.num_tokens(g), group_tokens(pattern, g)) for g in grids})
  if len(kinds) * offsets.size * (L // b) > 2e7:
    return None
  first = np.arange(0, L, b)  # first position of each query block
  last = first + b - 1
  lo, hi = first.copy(), first + b  # padding queries see their own block only
  for kind in kinds:
    key_lo, key_hi = _key_range(pattern, kind)
    n = key_lo.size
    o = offsets[offsets + n <= L][:, None]
    covers_first = (o <= first) & (first < o + n)
    at = np.clip(first - o, 0, n - 1)
    lo = np.minimum(lo, np.where(covers_first, o + key_lo[at], L).min(0))
    covers_last = (o <= last) & (last < o + n)
    at = np.clip(last - o, 0, n - 1)
    hi = np.maximum(hi, np.where(covers_last, o + key_hi[at], 0).max(0))
  return int(((hi - 1) // b - lo // b + 1).max())


def batch_layouts(patterns, segment_ids_BL, coords_BL3, grids, block: int = 0,
                  exact: bool = False, max_segments: int | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
  """Layouts of one packed batch for each pattern, sized for every video of ``grids``.

  ``grids`` fix the static ``max_kv_blocks`` bound, so every training batch has the same shapes
  and the step compiles once. Without ``max_segments`` only the largest group of ``grids``
  matters (e.g. the config's largest video per aspect ratio) and videos may sit anywhere. With
  it, ``grids`` must be every grid the data can produce and rows must be packed back to back
  (``tokens.pack_rows``, as the pipeline does): the bound of the grouped patterns is then
  ``packed_kv_blocks_bound``, and their default block grows if that makes every list one block
  (P0: 256-token frames in blocks of 256); ``full`` aligns its videos to blocks when every such
  row allows it (``aligned_block``). ``exact=True`` sizes the lists for this batch alone (shapes
  then depend on the batch: for one-off calls such as sampling).
  ``block=0`` picks ``default_block`` per pattern (for windowed ones from the window's box
  volume).
  """
  seq_len = np.shape(segment_ids_BL)[1]
  out = {}
  for p in patterns:
    if is_windowed(p):
      b = int(block) or default_block(seq_len, math.prod(2 * k + 1 for k in window_reach(p)))
      bound = windowed_bound(p, seq_len, b, b, grids)
      if max_segments is not None:
        packed = _packed_bound(p, seq_len, b, grids, max_segments)
        bound = bound if packed is None else min(bound, packed)
    else:
      a = aligned_block(p, seq_len, grids, block, max_segments)
      if a is not None and (not exact or alignable(segment_ids_BL, a)):
        out[p] = make_layout(p, segment_ids_BL, coords_BL3, a, a, None if exact else 1,
                             align=True)
        continue
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
  # A larger block that makes every list a single block (groups aligned to blocks) takes the
  # block-diagonal path, which gathers nothing: P0's 256-token frames in blocks of 256, a row of
  # four 4096-token videos in blocks of 4096. Larger blocks that still list several measured no
  # faster (that row: 1.5 s in blocks of 128 against 1.5-3.4 s in blocks of 256,
  # forward+backward), so the block grows only when it reaches one block per list.
  grow = b
  while not block and max_segments is not None and j > 1 and 2 * grow <= _MAX_BLOCK \
      and seq_len % (2 * grow) == 0:
    grow *= 2
    if bound(grow) == 1:
      return grow, 1
  return b, j


@functools.lru_cache(maxsize=256)
def _always_alignable(seq_len: int, block: int, sizes: tuple[int, ...], max_segments: int) -> bool:
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


def aligned_block(pattern: str, seq_len: int, grids, block: int = 0,
                  max_segments: int | None = None) -> int | None:
  """The block size at which ``batch_layouts`` aligns ``full``'s videos (``aligned_order``), or
  None when it does not.

  Only for the default block, rows packed by ``tokens.pack_rows`` (``max_segments`` given) and
  ``full``: the smallest power of two dividing ``seq_len`` that holds the largest video of
  ``grids``, when every row the packer can make fits with its videos rounded up to it, and it
  beats the unaligned plan (``block_and_bound``: several key blocks per list, or a larger
  block). The default config's rows of two 252- or 256-token videos in 512 then attend in
  blocks of 256, not one block of 512: half the pairs, 2.5x faster per layer on CPU.
  """
  if pattern != "full" or block or max_segments is None:
    return None
  return _aligned_block(int(seq_len), _grids_key(grids), int(max_segments))


@functools.lru_cache(maxsize=256)
def _aligned_block(seq_len: int, grids: tuple, max_segments: int) -> int | None:
  """``aligned_block`` for ``full`` with the default block, cached: ``batch_layouts`` asks for
  every batch."""
  sizes = tuple(sorted({tokens.num_tokens(g) for g in grids}))
  a = 16
  while a < sizes[-1]:
    a *= 2
  if a > min(seq_len, _MAX_BLOCK) or seq_len % a:
    return None
  b, j = _block_and_bound("full", seq_len, grids, 0, max_segments)
  if (j == 1 and b <= a) or not _always_alignable(seq_len, a, sizes, max_segments):
    return None
  return a


def _grids_key(grids) -> tuple[tuple[int, ...], ...]:
  """``grids`` as a sorted tuple of distinct int tuples: hashable, for the caches here."""
  return tuple(sorted({tuple(int(x) for x in g) for g in grids}))


def _packed_bound(pattern, seq_len, block, grids, max_segments):
  return _packed_bound_cached(pattern, int(seq_len), int(block), _grids_key(grids),
                              int(max_segments))


@functools.lru_cache(maxsize=256)
def _packed_bound_cached(pattern, seq_len, block, grids, max_segments):
  return packed_kv_blocks_bound(pattern, seq_len, block, grids, max_segments)


def block_and_bound(pattern: str, seq_len: int, grids, block: int = 0,
                    max_segments: int | None = None) -> tuple[int, int]:
  """The block size and static ``max_kv_blocks`` that ``batch_layouts`` uses for ``pattern``."""
  return _block_and_bound(pattern, int(seq_len), _grids_key(grids), int(block),
                          None if max_segments is None else int(max_segments))
