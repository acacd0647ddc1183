"""Host-side block layouts for the ``blocksparse`` and ``pallas`` attention backends (numpy).

A layout says, for one packed batch and one pattern, which (query block, key block) pairs hold at
least one allowed (query, key) pair, so the backend computes only those. Tokens are first put in
the pattern's order (``Pattern.order_axes``, a stable sort inside each video):

- group relations (``full``, ``spatial``, ``temporal``): every group becomes a contiguous run,
  so a query block's keys are one contiguous range, found exactly from group labels;
- the others (``window``, ``local``, ``cross``, ``frame_causal``, ``causal_window``) are put in
  3D tiles of ``block_q`` tokens (``Pattern.tile``), so a query block is a compact box and its
  keys are the few tiles its neighbourhood touches; their lists come from an exact block-pair
  test (bounding boxes of blocks against the pattern's offset box first, then every token pair
  of the candidate block pairs). Where the tile is whole rows of a frame (``frame_causal``,
  boxes reaching across most of the frame) the order is plain t-major and the lists are
  contiguous enough for spans; otherwise ``bounds.plan`` has them visited as runs of
  consecutive key blocks (``Layout.run_start``).

Videos are ordered by segment id, and each run of padding stays right after the video it follows
(leading padding first), so t-major orders (and tiles of whole rows) are the identity on rows of
contiguous t-major videos (``tokens.pack_rows``). The one exception: ``full`` may move the
padding between videos so that each starts on a block boundary (``aligned_order``, chosen by
``batch_layouts`` when every row the packer can make allows it).

Padding. In ``dense`` a padding token (segment 0) attends to every padding token, which would
make a query block of padding need every padding key block and blow up the static bound. Here a
padding query attends only to the padding keys of its own *chunk*: the ``block_q`` positions (in
the permuted order) of its query block. Padding outputs are therefore not those of ``dense``, but
they stay finite, and real tokens never see padding nor padding real tokens in either backend,
so real outputs, and gradients of anything that reads only real outputs, are identical.

Static sizes come from ``vdit_jax.bounds``; a ``Layout`` carries them as static fields, so it
travels in the batch, shards like the rest of the batch (rows first), and a run compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from vdit_jax import bounds
from vdit_jax import patterns as pat


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("perm", "inv_perm", "perm_segment", "perm_coords", "kv_blocks",
                                "kv_valid", "pair_q", "pair_k", "pair_valid", "run_start",
                                "run_len"),
                   meta_fields=("block_q", "block_k", "max_kv_blocks", "max_pairs", "max_runs",
                                "run_blocks"))
@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """The block layout of one packed batch ``[B, L]`` for one pattern (numpy or jax arrays).

  ``perm [B, L]`` i32: permuted position -> original token; ``inv_perm``: its inverse.
  ``perm_segment [B, L]`` i32: the segment id at each permuted position, except that padding
    gets ``-1 - chunk`` (chunk = position // block_q), so equal values = may attend.
  ``perm_coords [B, L, 3]`` i32: the coordinates at each permuted position.
  ``kv_blocks [B, L / block_q, max_kv_blocks]`` i32: key blocks (in the permuted order) holding
    an allowed pair of each query block, ascending; unused slots repeat the last used block.
    Without pair lists, every list fits in the ``max_kv_blocks`` blocks from its first one
    (``blocksparse`` slices that span); with them, ``max_kv_blocks`` bounds the list's length.
  ``kv_valid``: like ``kv_blocks``, False on the unused slots.
  ``pair_q``, ``pair_k`` ``[B, max_pairs]`` i32 and ``pair_valid``: the same lists flattened into
    (query block, key block) pairs, sorted, padded with invalid copies; None when
    ``max_pairs == 0``. When present, ``blocksparse`` visits the pairs (``blockpairs``) instead
    of spans: lists whose lengths vary along the row (``frame_causal``) then cost their pairs.
  ``run_start``, ``run_len`` ``[B, L / block_q, max_runs]`` i32: the same lists cut into runs of
    consecutive key blocks, at most ``run_blocks`` each (first block, length; length 0 on unused
    slots); None when ``max_runs == 0``. When present, ``blocksparse`` visits the runs: a
    tiled order's lists are a few runs of tiles far apart.
  """

  perm: np.ndarray
  inv_perm: np.ndarray
  perm_segment: np.ndarray
  perm_coords: np.ndarray
  kv_blocks: np.ndarray
  kv_valid: np.ndarray
  block_q: int
  block_k: int
  max_kv_blocks: int
  pair_q: np.ndarray | None = None
  pair_k: np.ndarray | None = None
  pair_valid: np.ndarray | None = None
  max_pairs: int = 0
  run_start: np.ndarray | None = None
  run_len: np.ndarray | None = None
  max_runs: int = 0
  run_blocks: int = 0

  @property
  def block_diagonal(self) -> bool:
    """One key block per list, equal blocks: each block attends only to itself."""
    return self.max_kv_blocks == 1 and self.block_q == self.block_k

  def whole_row(self, seq_len: int) -> bool:
    """Lists that may hold every key block: nothing can be skipped."""
    return self.max_kv_blocks >= seq_len // self.block_k


def _check_inputs(segment_ids_BL, coords_BL3) -> tuple[np.ndarray, np.ndarray]:
  seg = np.asarray(segment_ids_BL)
  coords = np.asarray(coords_BL3)
  if seg.ndim != 2 or coords.shape != seg.shape + (3,):
    raise ValueError(f"expected segment_ids [B, L] and coords [B, L, 3], got {seg.shape} and "
                     f"{coords.shape}")
  return seg, coords


def video_grids(segment_ids_BL, coords_BL3) -> np.ndarray:
  """``[B, S + 1, 3]``: the token grid of each segment id of each row (its largest coordinates
  plus one), 0 for ids a row does not hold."""
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  B = seg.shape[0]
  grids = np.zeros((B, int(seg.max(initial=0)) + 1, 3), np.int64)
  rows = np.broadcast_to(np.arange(B)[:, None], seg.shape)
  real = seg > 0
  np.maximum.at(grids, (rows[real], seg[real]), coords[real].astype(np.int64) + 1)
  return grids


def tile_sizes(pattern, segment_ids_BL, coords_BL3, block: int) -> np.ndarray:
  """``[B, L, 3]``: the tile ``pattern.tile(grid, block)`` of each token's video (1s on
  padding), for a tiled pattern."""
  p = pat.parse(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  grids = video_grids(seg, coords)
  tiles = np.ones(grids.shape, np.int64)
  for b, s in zip(*np.nonzero(grids[..., 0])):
    tiles[b, s] = p.tile(tuple(grids[b, s]), block)
  return np.take_along_axis(tiles, seg[..., None].astype(np.int64), 1)


def pattern_order(pattern, segment_ids_BL, coords_BL3, block: int | None = None) -> np.ndarray:
  """Permutation ``perm [B, L]`` (int32) into ``pattern``'s order.

  Position ``i`` of the permuted row holds original token ``perm[b, i]``. Tokens are sorted by
  (owner segment, padding after real, the pattern's order inside a video), stably; a padding
  token's owner is the video before it, so padding keeps its place and videos keep their
  extent. Inside a video: the coordinates in ``pattern.order_axes`` order, or, for a tiled
  pattern given ``block``, tile by tile (``pattern.tile(grid, block)``; t-major over tiles and
  inside each). ``block=None`` gives tiled patterns plain t-major order.
  """
  p = pat.parse(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  is_pad = seg == 0
  L = seg.shape[1]
  last_real = np.maximum.accumulate(np.where(is_pad, -1, np.arange(L)), axis=1)
  owner = np.where(last_real >= 0, np.take_along_axis(seg, np.maximum(last_real, 0), 1), 0)
  # np.lexsort sorts by the last key first and is stable.
  if p.tiled and block is not None:
    tile = tile_sizes(p, seg, coords, block)
    within = [coords[..., a] % tile[..., a] for a in (2, 1, 0)]
    keys = within + [coords[..., a] // tile[..., a] for a in (2, 1, 0)]
  else:
    keys = [coords[..., a] for a in reversed(p.order_axes)]
  return np.lexsort(keys + [is_pad, owner], axis=-1).astype(np.int32)


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
  base = pattern_order(pat.Full(), seg, coords)
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


def attention_segments(seg_p: np.ndarray, block_q: int) -> np.ndarray:
  """Segment ids of permuted rows with padding split per query block: ``-1 - chunk``."""
  chunk = np.arange(seg_p.shape[1], dtype=np.int32) // block_q
  return np.where(seg_p == 0, -1 - chunk, seg_p).astype(np.int32)


def group_labels(p: pat.Pattern, att_BL, coords_BL3, xp=np):
  """Non-decreasing group label per position of *permuted* rows of a group relation: equal
  label = may attend, in numpy or ``xp=jax.numpy``. ``att_BL`` are the rows' attention
  segments (``attention_segments``: padding split into per-query-block chunks).

  A group is a maximal run of positions sharing (attention segment, group coords). The order
  sorts real tokens by segment and group coords, so a real group is one run. A padding class
  may be cut into several runs, but all of them lie inside one query block, whose overlapping
  key blocks are listed anyway.
  """
  att = att_BL
  changed = att[:, 1:] != att[:, :-1]
  for a in p.group_axes:
    changed = changed | (coords_BL3[:, 1:, a] != coords_BL3[:, :-1, a])
  first = xp.zeros_like(att[:, :1])
  return xp.concatenate([first, xp.cumsum(changed, axis=1, dtype=att.dtype)], axis=1)


def _block_ranges(p, seg_BL, coords_BL3, block_q, block_k) -> tuple[np.ndarray, np.ndarray]:
  """First and last key block ``[B, nQ]`` holding an allowed pair of each query block of a
  group relation: a query block's keys are the union of the groups it touches, one contiguous
  range, so the key blocks overlapping it are a contiguous range too."""
  B = seg_BL.shape[0]
  label = group_labels(p, attention_segments(seg_BL, block_q), coords_BL3)
  q_lo, q_hi = label[:, ::block_q], label[:, block_q - 1::block_q]  # [B, nQ]
  k_lo, k_hi = label[:, ::block_k], label[:, block_k - 1::block_k]  # [B, nK]
  first = np.stack([np.searchsorted(k_hi[b], q_lo[b], side="left") for b in range(B)])
  last = np.stack([np.searchsorted(k_lo[b], q_hi[b], side="right") - 1 for b in range(B)])
  return first.astype(np.int32), last.astype(np.int32)


def _block_pairs(p: pat.Pattern, seg_p: np.ndarray, coords_p: np.ndarray, block_q: int,
                 block_k: int) -> np.ndarray:
  """``[B, nQ, nK]`` bool: whether (query block, key block) holds an allowed pair, exactly.

  Candidates first, at block level: blocks whose bounding boxes of (segment, t, h, w) over real
  tokens can hold an offset inside the pattern's offset box, plus the key blocks overlapping a
  query block's own positions when both hold padding. Only candidates get the token-pair test,
  and for box patterns, candidates whose offsets all lie inside the box need none. So host cost
  follows the listed pairs, not L^2.
  """
  B, L = seg_p.shape
  nQ, nK = L // block_q, L // block_k
  real = seg_p > 0
  att = attention_segments(seg_p, block_q)
  big = np.int32(2**30)  # far beyond any coordinate plus offset, and no overflow

  def boxes(block):
    vals = np.concatenate([seg_p[..., None], coords_p], -1).astype(np.int32)
    vals = vals.reshape(B, L // block, block, 4)
    r = real.reshape(B, L // block, block, 1)
    return np.where(r, vals, big).min(2), np.where(r, vals, -big).max(2)  # [B, n, 4]

  (q_lo, q_hi), (k_lo, k_hi) = boxes(block_q), boxes(block_k)
  box = ((0, 0),) + tuple(p.offset_box())  # the segment must match exactly
  q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
  k_lo, k_hi = k_lo[:, None], k_hi[:, None]
  cand = np.ones((B, nQ, nK), bool)
  sure = np.full((B, nQ, nK), p.is_box)
  for a, (lo, hi) in enumerate(box):  # one axis at a time: [B, nQ, nK] temporaries only
    cand &= (k_lo[..., a] - q_hi[..., a] <= hi) & (k_hi[..., a] - q_lo[..., a] >= lo)
    if p.is_box:
      sure &= (k_hi[..., a] - q_lo[..., a] <= hi) & (k_lo[..., a] - q_hi[..., a] >= lo)
  i, j = np.arange(nQ)[:, None], np.arange(nK)[None, :]
  own = (j * block_k < (i + 1) * block_q) & (i * block_q < (j + 1) * block_k)
  pad_q = (~real).reshape(B, nQ, block_q).any(-1)[:, :, None]
  pad_k = (~real).reshape(B, nK, block_k).any(-1)[:, None, :]
  cand |= own & pad_q & pad_k
  sure &= cand  # the segment axis's box (0, 0) holds only where both blocks hold one video
  pairs = sure.copy()
  b, i, j = np.nonzero(cand & ~sure)
  att_q, att_k = att.reshape(B, nQ, block_q), att.reshape(B, nK, block_k)
  c_q, c_k = coords_p.reshape(B, nQ, block_q, 3), coords_p.reshape(B, nK, block_k, 3)
  step = max(1, 2**21 // (block_q * block_k))
  for s in range(0, len(b), step):
    bb, ii, jj = b[s:s + step], i[s:s + step], j[s:s + step]
    hit = p.allowed(att_q[bb, ii][:, :, None], c_q[bb, ii][:, :, None, :],
                    att_k[bb, jj][:, None, :], c_k[bb, jj][:, None, :, :]).any(axis=(1, 2))
    pairs[bb[hit], ii[hit], jj[hit]] = True
  return pairs


def _lists_from_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """First and last listed key block ``[B, nQ]`` of a block-pair matrix, and the span needed."""
  M = pairs.shape[-1]
  first = np.argmax(pairs, axis=-1)
  last = M - 1 - np.argmax(pairs[..., ::-1], axis=-1)
  return first, last, int((last - first).max()) + 1


def _permuted(p, seg, coords, block_q, block_k, align, tiled=True):
  """The permutation, permuted segments and coordinates, block-pair matrix (None for group
  relations), first and last listed key blocks, the most key blocks from a list's first to its
  last (what spans need) and the longest list (what pair lists need)."""
  perm = (aligned_order(seg, coords, block_q) if align else
          pattern_order(p, seg, coords, block_q if tiled else None))
  seg_p = np.take_along_axis(seg, perm, axis=1)
  coords_p = np.take_along_axis(coords, perm[..., None], axis=1)
  if p.grouped:
    first, last = _block_ranges(p, seg_p, coords_p, block_q, block_k)
    span = int((last - first).max()) + 1
    return perm, seg_p, coords_p, None, first, last, span, span
  pairs = _block_pairs(p, seg_p, coords_p, block_q, block_k)
  return (perm, seg_p, coords_p, pairs) + _lists_from_pairs(pairs) + (int(pairs.sum(-1).max()),)


def block_pairs(pattern, segment_ids_BL, coords_BL3, block_q: int, block_k: int) -> np.ndarray:
  """``[B, nQ, nK]`` bool: the (query block, key block) pairs ``make_layout`` lists for a
  pattern that is not a group relation."""
  p = pat.parse(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  bounds.check_blocks(seg.shape[1], block_q, block_k)
  if p.grouped:
    raise ValueError(f"pattern {p} is a group relation: its lists are ranges (make_layout)")
  return _permuted(p, seg, coords, block_q, block_k, False)[3]


def needed_kv_blocks(pattern, segment_ids_BL, coords_BL3, block_q: int, block_k: int,
                     pairs: bool = False) -> int:
  """The smallest ``max_kv_blocks`` that ``make_layout`` accepts for this batch: with spans,
  or (``pairs``) with pair lists."""
  p = pat.parse(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  bounds.check_blocks(seg.shape[1], block_q, block_k)
  return _permuted(p, seg, coords, block_q, block_k, False)[-1 if pairs else -2]


def make_layout(pattern, segment_ids_BL, coords_BL3, block_q: int, block_k: int,
                max_kv_blocks: int | None = None, align: bool = False,
                max_pairs: int | None = 0, runs: tuple[int | None, int] | None = None,
                tiled: bool = True) -> Layout:
  """The block layout of one packed batch for ``pattern``.

  Args:
    pattern: a ``patterns.Pattern`` or its config string.
    segment_ids_BL: i32 ``[B, L]``, 1..S per video, 0 for padding.
    coords_BL3: i32 ``[B, L, 3]``, (t, h, w) of each token inside its video.
    block_q, block_k: query / key block sizes; both must divide L.
    max_kv_blocks: key blocks listed per query block (static). ``None`` uses what this batch
      needs, which changes shapes between batches: use a ``vdit_jax.bounds`` bound for training.
    align: ``full`` only, equal blocks: order the tokens by ``aligned_order`` (every video
      starting on a block boundary, padding moved into the gaps), so a block never holds two
      videos; raises if a row's videos do not fit that way (``alignable``).
    max_pairs: also list the pairs flattened (``Layout.pair_q``), this many per row (static;
      ``None``: what this batch needs; 0: no pair lists).
    runs: ``(max_runs, run_blocks)``: also cut the lists into runs (``Layout.run_start``) of at
      most ``run_blocks`` key blocks, ``max_runs`` per query block (static; ``None``: what this
      batch needs). ``max_kv_blocks`` then bounds the lists' lengths, as with pairs.
    tiled: ``False`` keeps patterns that are not group relations in plain t-major order instead
      of their tiles (comparisons; the bounds assume tiles).
  """
  p = pat.parse(pattern)
  seg, coords = _check_inputs(segment_ids_BL, coords_BL3)
  bounds.check_blocks(seg.shape[1], block_q, block_k)
  if align and (p != pat.Full() or block_q != block_k):
    raise ValueError(f"align=True needs pattern 'full' and equal blocks, got {p} with "
                     f"block_q={block_q}, block_k={block_k}: other patterns' groups do not "
                     "start at video starts, so aligning videos does not align them")
  perm, seg_p, coords_p, pairs, first, last, span, longest = _permuted(p, seg, coords, block_q,
                                                                       block_k, align, tiled)
  # Pairs and runs visit the listed blocks themselves; spans, every block from a list's first.
  needed = span if max_pairs == 0 and runs is None else longest
  J = needed if max_kv_blocks is None else int(max_kv_blocks)
  if needed > J:
    raise ValueError(f"pattern {p} needs max_kv_blocks >= {needed} for this batch "
                     f"(block_q={block_q}, block_k={block_k}) but got {J}: raise it to "
                     f"{needed}, or to a vdit_jax.bounds bound so every batch fits")
  if pairs is None:  # group relations: every block of the range holds an allowed pair
    kv = first[..., None] + np.arange(J)
    valid = kv <= last[..., None]
    kv = np.minimum(kv, last[..., None])
  else:  # listed blocks first, ascending (a stable sort of "not listed")
    nK = pairs.shape[-1]
    order = np.argsort(~pairs, axis=-1, kind="stable")
    if J > nK:
      order = np.concatenate([order, np.repeat(order[..., -1:], J - nK, -1)], -1)
    count = pairs.sum(-1)
    valid = np.arange(J) < count[..., None]
    last_listed = np.take_along_axis(order, np.maximum(count - 1, 0)[..., None], -1)
    kv = np.where(valid, order[..., :J], last_listed)
  kv = kv.astype(np.int32)
  pair_lists = {} if max_pairs == 0 else _pair_lists(p, kv, valid, max_pairs)
  run_lists = {} if runs is None else _run_lists(p, kv, valid, *runs)
  return Layout(perm=perm, inv_perm=_inverse(perm),
                perm_segment=attention_segments(seg_p, block_q),
                perm_coords=coords_p.astype(np.int32), kv_blocks=kv, kv_valid=valid,
                block_q=int(block_q), block_k=int(block_k), max_kv_blocks=J, **pair_lists,
                **run_lists)


def _run_lists(p, kv_BNJ: np.ndarray, valid_BNJ: np.ndarray, max_runs: int | None,
               run_blocks: int) -> dict:
  """Each query block's list (ascending, listed slots first) cut into runs of consecutive key
  blocks of at most ``run_blocks``: first block and length per slot, padded to ``max_runs``."""
  W = int(run_blocks)
  if W < 1:
    raise ValueError(f"run_blocks={run_blocks} must be >= 1")
  j = np.arange(kv_BNJ.shape[-1])
  prev = np.concatenate([np.full(kv_BNJ.shape[:-1] + (1,), -2), kv_BNJ[..., :-1]], -1)
  first = np.maximum.accumulate(np.where(valid_BNJ & (kv_BNJ != prev + 1), j, 0), axis=-1)
  piece = valid_BNJ & ((j - first) % W == 0)  # a run starts, or a long run is cut
  count = piece.sum(-1)
  R = int(count.max()) if max_runs is None else int(max_runs)
  if int(count.max()) > R:
    raise ValueError(f"pattern {p} needs {int(count.max())} runs of at most {W} key blocks for "
                     f"a query block of this batch but max_runs={R}: raise it, or use a "
                     "vdit_jax.bounds bound so every batch fits")
  slot = np.cumsum(piece, -1) - 1
  start = np.zeros(kv_BNJ.shape[:-1] + (R,), np.int32)
  length = np.zeros_like(start)
  b, n, at = np.nonzero(piece)
  start[b, n, slot[b, n, at]] = kv_BNJ[b, n, at]
  b, n, at = np.nonzero(valid_BNJ)
  np.add.at(length, (b, n, slot[b, n, at]), 1)
  return {"run_start": start, "run_len": length, "max_runs": R, "run_blocks": W}


def _pair_lists(p, kv_BNJ: np.ndarray, valid_BNJ: np.ndarray, max_pairs: int | None) -> dict:
  """The listed (query block, key block) pairs of each row, sorted, padded to ``max_pairs``
  with copies of the row's last pair marked invalid."""
  count = valid_BNJ.sum((1, 2))
  P = int(count.max()) if max_pairs is None else int(max_pairs)
  if int(count.max()) > P:
    raise ValueError(f"pattern {p} lists {int(count.max())} block pairs in a row of this batch "
                     f"but max_pairs={P}: raise it, or to a vdit_jax.bounds bound so every "
                     "batch fits")
  B = kv_BNJ.shape[0]
  out = {"pair_q": np.zeros((B, P), np.int32), "pair_k": np.zeros((B, P), np.int32),
         "pair_valid": np.arange(P) < count[:, None]}
  for b in range(B):
    n, j = np.nonzero(valid_BNJ[b])  # row-major: by query block, then ascending key block
    fill = np.minimum(np.arange(P), count[b] - 1)
    out["pair_q"][b], out["pair_k"][b] = n[fill], kv_BNJ[b, n, j][fill]
  return {**out, "max_pairs": P}


def _inverse(perm: np.ndarray) -> np.ndarray:
  inv = np.empty_like(perm)
  B, L = perm.shape
  np.put_along_axis(inv, perm, np.broadcast_to(np.arange(L, dtype=perm.dtype), (B, L)), axis=1)
  return inv


def batch_layouts(patterns, segment_ids_BL, coords_BL3, grids, block: int = 0,
                  exact: bool = False, max_segments: int | None = None) -> dict[str, Layout]:
  """Layouts of one packed batch for each pattern, keyed by the pattern's string, sized for
  every video of ``grids``.

  ``grids`` fix the static ``max_kv_blocks`` bound, so every training batch has the same shapes
  and the step compiles once. Without ``max_segments`` only the largest of ``grids`` matter and
  videos may sit anywhere. With it, ``grids`` must be every grid the data can produce and rows
  must be packed back to back (``tokens.pack_rows``, as the pipeline does): the bounds are then
  ``bounds.packed_kv_blocks_bound``, blocks of group relations grow if that makes every list
  one block, and ``full`` aligns its videos to blocks when every such row allows it
  (``bounds.aligned_block``). ``exact=True`` sizes the lists for this batch alone (shapes then
  depend on the batch: for one-off calls such as sampling). ``block=0``: ``bounds`` picks.
  """
  seq_len = np.shape(segment_ids_BL)[1]
  out = {}
  for p in map(pat.parse, patterns):
    a = bounds.aligned_block(p, seq_len, grids, block, max_segments)
    if a is not None and (not exact or alignable(segment_ids_BL, a)):
      out[str(p)] = make_layout(p, segment_ids_BL, coords_BL3, a, a, None if exact else 1,
                                align=True)
      continue
    b, bound, pairs, runs = bounds.plan(p, seq_len, grids, block, max_segments)
    if runs is not None and exact:
      runs = (None, runs[1])
    out[str(p)] = make_layout(p, segment_ids_BL, coords_BL3, b, b, None if exact else bound,
                              max_pairs=(None if exact else pairs) if pairs else 0, runs=runs)
  return out
