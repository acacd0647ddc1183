"""The blocksparse backend and its host-side layouts against the dense reference, and the
patterns themselves (predicates, pair counts).

Padding outputs of ``blocksparse`` differ from ``dense`` by design (a padding query sees only its
own block's padding, see vdit_jax/layout.py), so outputs are compared on real tokens and
gradients of losses that read only real tokens' outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import (attention, backends, blocksparse, bounds, flash, layout, patterns, schedule,
                      tokens)

PATTERNS = ("full", "spatial", "temporal")


# Patterns that are not group relations, sized so that on ROWS' small grids they are neither
# empty nor everything (frame_causal is not symmetric).
WINDOWED = ("window(1,1,2)", "local(1,3)", "cross(1,4)", "frame_causal(1)", "frame_causal(-1)")
# Odd grids, several videos per row, padding at the end of both rows (72 and 76 of 128 tokens).
ROWS = [[(3, 5, 2), (2, 3, 7)], [(2, 3, 7), (1, 4, 4), (3, 2, 3)]]
L, H, K = 128, 2, 8


def packed(rows=ROWS, seq_len=L):
  items = [[{"tokens": np.zeros((tokens.num_tokens(g), 1), np.float32), "grid": g} for g in row]
           for row in rows]
  b = tokens.pack_rows(items, seq_len, max_segments=4, token_size=1)
  return b["segment_ids"], b["coords"]


def shuffled(seg, coords, seed=0):
  """Rows in a random token order: videos no longer contiguous nor t-major."""
  rng = np.random.default_rng(seed)
  perm = np.stack([rng.permutation(seg.shape[1]) for _ in range(seg.shape[0])])
  return np.take_along_axis(seg, perm, 1), np.take_along_axis(coords, perm[..., None], 1)


def with_gaps(rows=ROWS, gap=5, seq_len=L):
  """Like ``packed`` but with padding before and between videos, as an aligning packer makes."""
  seg = np.zeros((len(rows), seq_len), np.int32)
  coords = np.zeros((len(rows), seq_len, 3), np.int32)
  for b, row in enumerate(rows):
    pos = gap
    for s, grid in enumerate(row):
      n = tokens.num_tokens(grid)
      seg[b, pos:pos + n] = s + 1
      coords[b, pos:pos + n] = tokens.grid_coords(grid)
      pos += n + gap
  return seg, coords


def random_qkv(seg, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, w = (jax.random.normal(key, seg.shape + (H, K)) for key in keys)
  # Loss weights on real tokens only: padding outputs are not part of the contract.
  return q, k, v, w * (seg > 0)[:, :, None, None]


def allowed_np(pattern, seg_BL, coords_BL3):
  return np.asarray(attention.pattern_mask(pattern, jnp.asarray(seg_BL), jnp.asarray(coords_BL3)))


def layout_pairs_np(pattern, seg, coords, lay, block_q):
  """[B, L, L] pairs blocksparse allows, in the permuted order: dense's, with padding queries
  limited to their own query block."""
  perm = lay.perm
  seg_p = np.take_along_axis(seg, perm, 1)
  allowed = allowed_np(pattern, seg_p, np.take_along_axis(coords, perm[..., None], 1))
  chunk = np.arange(seg.shape[1]) // block_q
  pad_pair = (seg_p == 0)[:, :, None] & (seg_p == 0)[:, None, :]
  return allowed & (~pad_pair | (chunk[:, None] == chunk[None, :]))


def listed_blocks(lay, nK):
  B, nQ, _ = lay.kv_blocks.shape
  listed = np.zeros((B, nQ, nK), bool)
  b, n, j = np.nonzero(lay.kv_valid)
  listed[b, n, lay.kv_blocks[b, n, j]] = True
  return listed


def bs_fn(pattern, kv_chunk=None):
  return lambda q, k, v, lay: blocksparse.blocksparse_attention(q, k, v, pattern, lay,
                                                                kv_chunk=kv_chunk)


def dense_fn(pattern, seg, coords):
  mask = attention.pattern_mask(pattern, jnp.asarray(seg), jnp.asarray(coords))
  return lambda q, k, v: attention.dense_attention(q, k, v, mask)


def assert_matches_dense(pattern, seg, coords, lay, kv_chunk=None, dense_pattern=None):
  """blocksparse ``pattern`` == dense ``dense_pattern`` (default: the same) on real tokens."""
  q, k, v, w = random_qkv(seg)
  real = (seg > 0)[:, :, None, None]
  dense, sparse = dense_fn(dense_pattern or pattern, seg, coords), bs_fn(pattern, kv_chunk)
  lay = jax.tree.map(jnp.asarray, lay)
  o_dense = dense(q, k, v)
  o_sparse = jax.jit(sparse)(q, k, v, lay)
  assert bool(jnp.all(jnp.isfinite(o_sparse)))
  np.testing.assert_allclose(np.where(real, o_sparse, 0), np.where(real, o_dense, 0), atol=1e-5)
  g_dense = jax.grad(lambda q, k, v: jnp.sum(dense(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
  g_sparse = jax.jit(jax.grad(lambda q, k, v, lay: jnp.sum(sparse(q, k, v, lay) * w),
                              argnums=(0, 1, 2)))(q, k, v, lay)
  # Padding never reaches a real output in either backend, so padding gradients are 0 in both
  # and the whole arrays can be compared.
  for name, gd, gs in zip("qkv", g_dense, g_sparse):
    np.testing.assert_allclose(gs, gd, atol=1e-5, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("block_q,block_k,max_kv_blocks,kv_chunk", [
    (16, 16, None, None),   # exactly the blocks this batch needs
    (32, 32, 4, None),      # spare slots (kv_valid False)
    (16, 32, None, None),   # unequal blocks: the transposed list is not the same size
    (16, 16, 8, None),      # every key block: the one-matmul path
    (16, 16, 6, 4),         # online softmax in chunks, last chunk padded
])
def test_matches_dense(pattern, block_q, block_k, max_kv_blocks, kv_chunk):
  seg, coords = packed()
  lay = layout.make_layout(pattern, seg, coords, block_q, block_k, max_kv_blocks)
  assert_matches_dense(pattern, seg, coords, lay, kv_chunk)


def test_lists_of_every_block_take_the_whole_row_path():
  """A list that may hold every key block is one masked attention over the row ([L, L] mask);
  shorter lists attend to spans of max_kv_blocks blocks (no [L, L] anywhere)."""
  seg, coords = packed()
  q, k, v, _ = random_qkv(seg)
  for J, whole in ((8, True), (5, False)):
    lay = layout.make_layout("full", seg, coords, 16, 16, max_kv_blocks=J)
    jaxpr = str(jax.make_jaxpr(functools.partial(
        blocksparse.blocksparse_attention, pattern="full", layout=lay))(q, k, v))
    assert (f"{L},{L}]" in jaxpr) == whole
    assert (f"16,{J * 16}]" in jaxpr) == (not whole)  # one query block's span mask
    assert_matches_dense("full", seg, coords, lay)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_dense_block_diagonal(pattern):
  """Videos and groups that never straddle a 16-block: one listed block each, no gathers."""
  seg, coords = packed([[(1, 4, 4), (4, 2, 2)], [(2, 2, 4), (1, 4, 4), (4, 1, 4)]])
  lay = layout.make_layout(pattern, seg, coords, 16, 16)
  assert lay.kv_blocks.shape[-1] == 1
  assert_matches_dense(pattern, seg, coords, lay)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_large_block_diagonal_blocks_are_query_chunked(monkeypatch, pattern):
  """Blocks above BLOCK_DIAGONAL_WHOLE go through flash.attend_chunked (here: 32-blocks in
  16-query chunks), with the same result."""
  monkeypatch.setattr(blocksparse, "BLOCK_DIAGONAL_WHOLE", 16)
  monkeypatch.setattr(flash, "query_chunk", lambda *args, **kwargs: 16)
  seg, coords = packed([[(2, 4, 4), (4, 2, 4), (1, 4, 8)], [(2, 2, 8), (8, 2, 2), (1, 2, 16)]])
  lay = layout.make_layout(pattern, seg, coords, 32, 32)
  assert lay.kv_blocks.shape[-1] == 1
  q, k, v, _ = random_qkv(seg)
  jaxpr = str(jax.make_jaxpr(functools.partial(
      blocksparse.blocksparse_attention, pattern=pattern, layout=lay))(q, k, v))
  assert "scan" in jaxpr and ",16,32]" in jaxpr  # one chunk's [.., 16 queries, 32 keys] logits
  assert_matches_dense(pattern, seg, coords, lay)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", ["shuffled", "gaps"])
def test_matches_dense_on_other_row_orders(pattern, rows):
  """Orders are made by the layout, so any token order works, not only pack_rows'."""
  seg, coords = shuffled(*packed()) if rows == "shuffled" else with_gaps()
  lay = layout.make_layout(pattern, seg, coords, 16, 16)
  assert_matches_dense(pattern, seg, coords, lay)


ROW_KINDS = {"packed": packed, "shuffled": lambda: shuffled(*packed(), seed=1), "gaps": with_gaps}


@pytest.mark.parametrize("pattern,rows,block_q,block_k,max_kv_blocks,kv_chunk", [
    ("window(1,1,2)", "packed", 16, 16, None, None),
    ("window(1,1,2)", "shuffled", 16, 32, None, None),
    ("window(1,1,2)", "gaps", 16, 16, 6, 4),     # online softmax in chunks
    ("window(1,1,2)", "shuffled", 16, 32, None, 1),  # in chunks, with unequal blocks
    ("local(1,3)", "packed", 16, 16, None, None),
    ("local(1,3)", "gaps", 32, 16, None, None),
    ("cross(1,4)", "packed", 16, 16, None, None),
    ("cross(1,4)", "shuffled", 16, 16, 8, None),  # every key block: the one-matmul path
    ("frame_causal(1)", "packed", 16, 16, None, None),
    ("frame_causal(-1)", "gaps", 16, 32, None, None),
    ("frame_causal(0)", "shuffled", 16, 16, None, 2),
])
def test_windowed_matches_dense(pattern, rows, block_q, block_k, max_kv_blocks, kv_chunk):
  seg, coords = ROW_KINDS[rows]()
  lay = layout.make_layout(pattern, seg, coords, block_q, block_k, max_kv_blocks)
  assert_matches_dense(pattern, seg, coords, lay, kv_chunk)


def test_window_covering_every_video_equals_full():
  seg, coords = packed()
  big = "window(5,7,7)"  # ROWS' grids are at most 3 x 5 x 7
  np.testing.assert_array_equal(allowed_np(big, seg, coords), allowed_np("full", seg, coords))
  lay = layout.make_layout(big, seg, coords, 16, 16)
  assert_matches_dense(big, seg, coords, lay, dense_pattern="full")


@pytest.mark.parametrize("pattern", PATTERNS + WINDOWED)
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("rows", ["packed", "shuffled", "gaps"])
def test_layout_lists_exactly_the_nonempty_blocks(pattern, block_q, block_k, rows):
  seg, coords = ROW_KINDS[rows]()
  lay = layout.make_layout(pattern, seg, coords, block_q, block_k, max_kv_blocks=7)
  B = seg.shape[0]
  nQ, nK = L // block_q, L // block_k
  pairs = layout_pairs_np(pattern, seg, coords, lay, block_q)
  nonempty = pairs.reshape(B, nQ, block_q, nK, block_k).any(axis=(2, 4))
  listed = listed_blocks(lay, nK)
  np.testing.assert_array_equal(listed, nonempty)  # misses none, lists no empty one
  # No real query loses a pair dense allows (padding queries may, by design).
  perm = lay.perm
  dense_pairs = allowed_np(pattern, np.take_along_axis(seg, perm, 1),
                           np.take_along_axis(coords, perm[..., None], 1))
  real_q = (np.take_along_axis(seg, perm, 1) > 0)[:, :, None]
  np.testing.assert_array_equal(pairs & real_q, dense_pairs & real_q)
  # Every listed pair is non-empty under dense's own mask too.
  dense_blocks = dense_pairs.reshape(B, nQ, block_q, nK, block_k).any(axis=(2, 4))
  assert not (listed & ~dense_blocks).any()
  # Unused slots repeat a listed block, so gathers never read out of range.
  assert ((lay.kv_blocks >= 0) & (lay.kv_blocks < nK)).all()
  # Every list fits in the max_kv_blocks blocks from its first one (blocksparse's key span).
  assert (lay.kv_blocks - lay.kv_blocks[..., :1] < lay.kv_blocks.shape[-1]).all()
  # The static fields say what the arrays hold.
  assert (lay.block_q, lay.block_k, lay.max_kv_blocks) == (block_q, block_k,
                                                           lay.kv_blocks.shape[-1])


@pytest.mark.parametrize("rows", ["packed", "gaps"])
def test_pattern_order(rows):
  seg, coords = packed() if rows == "packed" else with_gaps()
  ident = np.broadcast_to(np.arange(L), seg.shape)
  for pattern in ("full", "spatial") + WINDOWED:  # videos are contiguous and t-major already
    np.testing.assert_array_equal(layout.pattern_order(pattern, seg, coords), ident)
  perm = layout.pattern_order("temporal", seg, coords)
  assert (np.sort(perm, axis=1) == ident).all()
  pad = seg == 0
  np.testing.assert_array_equal(perm[pad], ident[pad])  # padding stays where it was
  seg_p = np.take_along_axis(seg, perm, 1)
  coords_p = np.take_along_axis(coords, perm[..., None], 1)
  for b in range(seg.shape[0]):
    real = seg_p[b] > 0
    key = [tuple(x) for x in np.concatenate([seg_p[b, real, None], coords_p[b, real]], 1)]
    assert key == sorted(key, key=lambda x: (x[0], x[2], x[3], x[1]))  # (segment, h, w, t)


def test_max_kv_blocks_too_small_raises():
  seg, coords = packed()
  needed = layout.needed_kv_blocks("full", seg, coords, 16, 16)
  assert needed == layout.make_layout("full", seg, coords, 16, 16).kv_blocks.shape[-1]
  with pytest.raises(ValueError, match=f"max_kv_blocks >= {needed}"):
    layout.make_layout("full", seg, coords, 16, 16, max_kv_blocks=needed - 1)


def test_bad_kv_chunk_raises():
  seg, coords = packed()
  lay = layout.make_layout("full", seg, coords, 16, 16)
  q, k, v, _ = random_qkv(seg)
  with pytest.raises(ValueError, match="kv_chunk=0 must be >= 1"):
    blocksparse.blocksparse_attention(q, k, v, "full", lay, kv_chunk=0)


@pytest.mark.parametrize("block_q,block_k", [(48, 16), (16, 24)])
def test_blocks_must_divide_seq_len(block_q, block_k):
  seg, coords = packed()
  with pytest.raises(ValueError, match="seq_len=128 is not divisible"):
    layout.make_layout("spatial", seg, coords, block_q, block_k)
  with pytest.raises(ValueError, match="seq_len=128 is not divisible"):
    bounds.max_kv_blocks_bound("spatial", L, block_q, block_k, 10)


def test_bound_fits_random_packings():
  rng = np.random.default_rng(0)
  for _ in range(30):
    grids = [tuple(int(x) for x in rng.integers(1, 6, size=3)) for _ in range(8)]
    rows, B = [], 3
    for _ in range(B):
      row, used = [], 0
      for g in rng.permutation(len(grids))[:rng.integers(0, 5)]:
        if used + tokens.num_tokens(grids[g]) <= L:
          row.append(grids[g])
          used += tokens.num_tokens(grids[g])
      rows.append(row)
    seg, coords = packed(rows)
    largest = {"full": max(tokens.num_tokens(g) for g in grids),
               "spatial": max(g[1] * g[2] for g in grids),
               "temporal": max(g[0] for g in grids)}
    for pattern in PATTERNS:
      for bq, bk in [(16, 16), (32, 16), (16, 32), (8, 8)]:
        bound = bounds.max_kv_blocks_bound(pattern, L, bq, bk, largest[pattern])
        assert layout.needed_kv_blocks(pattern, seg, coords, bq, bk) <= bound


def random_packing(rng, num_rows: int, seq_len: int = L, max_side: int = 5):
  """A few random grids (sides up to ``max_side``), a random ``max_segments`` S, and
  ``num_rows`` rows of ``seq_len`` packed back to back from them: ``(grids, S, segment_ids,
  coords)``."""
  grids = sorted({tuple(int(x) for x in rng.integers(1, max_side + 1, size=3))
                  for _ in range(3)})
  S = int(rng.integers(1, 4))
  rows = []
  for _ in range(num_rows):
    row, used = [], 0
    for _ in range(S):
      g = grids[rng.integers(len(grids))]
      if used + tokens.num_tokens(g) <= seq_len:
        row.append(g)
        used += tokens.num_tokens(g)
    rows.append(row)
  return (grids, S) + packed(rows, seq_len)


def test_packed_bound_fits_random_packings_and_is_tight():
  """Rows packed back to back from a few sizes: the bound holds and some batch needs all of it."""
  rng = np.random.default_rng(2)
  for trial in range(12):
    grids, S, seg, coords = random_packing(rng, 200)  # many rows: some hit the worst alignments
    for pattern in PATTERNS:
      for b in (8, 16, 32):
        bound = bounds.packed_kv_blocks_bound(pattern, L, b, grids, S)
        needed = layout.needed_kv_blocks(pattern, seg, coords, b, b)
        assert needed <= bound, (trial, pattern, b, grids, S)
        largest = max(patterns.parse(pattern).group_tokens(g) for g in grids)
        assert bound <= bounds.max_kv_blocks_bound(pattern, L, b, b, largest)
        if S == 1:  # one video per row: every placement is seen, so the bound is exact
          assert needed == bound, (trial, pattern, b, grids)
    for pattern in WINDOWED + ("window(1,2,1)", "window(0,1,3)", "causal_window(1,1,2)"):
      for b in (8, 16):
        bound = bounds.packed_kv_blocks_bound(pattern, L, b, grids, S)
        if not bounds.distance_ordered(pattern, grids, b):  # tiles: lists bounded as pairs
          lay = layout.make_layout(pattern, seg, coords, b, b, bound, max_pairs=None)
          pair_bound = bounds.pair_bound(pattern, L, b, grids, S, bound)
          assert lay.max_pairs <= pair_bound < (L // b) ** 2, (trial, pattern, b, grids, S)
          continue
        needed = layout.needed_kv_blocks(pattern, seg, coords, b, b)
        assert needed <= bound, (trial, pattern, b, grids, S)
        if patterns.parse(pattern).is_box:  # local and cross use their box, a superset
          assert bound <= bounds.distance_bound(pattern, L, b, b, grids)
          if S == 1:  # the box's corners are allowed keys
            assert needed == bound, (trial, pattern, b, grids)


def test_batch_layouts_grow_blocks_when_groups_align():
  """P0's rows (one 8x16x16-token video): whole frames per 256-block, one block per list."""
  grid = (8, 16, 16)
  assert bounds.block_and_bound("spatial", 2048, [grid], 0, max_segments=1) == (256, 1)
  assert bounds.block_and_bound("temporal", 2048, [grid], 0, max_segments=1) == (16, 1)
  # Up to whole 1024-token frames and 4096-token videos (query-chunked inside).
  assert bounds.block_and_bound("spatial", 16384, [(16, 32, 32)], 0, max_segments=1) == (1024, 1)
  assert bounds.block_and_bound("full", 16384, [(16, 16, 16)], 0, max_segments=4) == (4096, 1)
  # Without knowing how rows are packed, any alignment must be allowed for.
  assert bounds.block_and_bound("spatial", 2048, [grid]) == (128, 5)


def test_possible_grids_lists_every_drawable_grid():
  rng = np.random.default_rng(3)
  patch, aspects = (2, 4, 4), (0.5, 0.75, 1.0, 1.33, 2.0)
  grids = set(tokens.possible_grids((3, 9), (10.0, 30.0), aspects, patch))
  drawn = {tokens.grid_shape(tokens.video_size(int(rng.integers(3, 10)), rng.uniform(10, 30),
                                               aspects[rng.integers(5)], patch), patch)
           for _ in range(20000)}
  # Random draws never hit the range's ends exactly; the ends are allowed sizes too.
  ends = {tokens.grid_shape(tokens.video_size(t, side, a, patch), patch)
          for t in range(3, 10) for side in (10.0, 30.0) for a in aspects}
  assert drawn | ends == grids


def test_aligned_bound_fits_aligned_packings():
  """Videos starting at multiples of the block: the ``full`` bound is one video's blocks."""
  rng = np.random.default_rng(1)
  for _ in range(30):
    seg = np.zeros((2, L), np.int32)
    coords = np.zeros((2, L, 3), np.int32)
    largest = 1
    for b in range(2):
      pos, s = 0, 1
      while True:
        grid = tuple(int(x) for x in rng.integers(1, 5, size=3))
        n = tokens.num_tokens(grid)
        if pos + n > L:
          break
        seg[b, pos:pos + n] = s
        coords[b, pos:pos + n] = tokens.grid_coords(grid)
        largest = max(largest, n)
        pos, s = -(-(pos + n) // 16) * 16, s + 1
    for bq, bk in [(16, 16), (16, 8), (8, 16)]:
      bound = bounds.max_kv_blocks_bound("full", L, bq, bk, largest, video_align=16)
      assert layout.needed_kv_blocks("full", seg, coords, bq, bk) <= bound
      assert bound <= -(-largest // 8) + 1
  with pytest.raises(ValueError, match="video_align=24 must be a multiple"):
    bounds.max_kv_blocks_bound("full", L, 16, 16, 10, video_align=24)


# Rows whose videos each fit in 64 tokens and fit L=128 rounded up to 64: alignable at 64.
ALIGNABLE_ROWS = [[(3, 5, 2), (2, 3, 7)], [(1, 4, 4), (3, 2, 3)]]


def test_aligned_layout_is_block_diagonal_and_matches_dense():
  """``full`` with every video moved to a block start: one block per list, same attention."""
  seg, coords = packed(ALIGNABLE_ROWS)
  assert layout.needed_kv_blocks("full", seg, coords, 64, 64) == 2  # back to back: straddles
  lay = layout.make_layout("full", seg, coords, 64, 64, align=True)
  assert lay.kv_blocks.shape[-1] == 1
  seg_p = np.take_along_axis(seg, lay.perm, 1)
  np.testing.assert_array_equal(seg_p[:, [0, 64]], [[1, 2], [1, 2]])  # videos start at 0, 64
  np.testing.assert_array_equal(np.sort(lay.perm, 1), np.broadcast_to(np.arange(L), seg.shape))
  assert_matches_dense("full", seg, coords, lay)


def test_aligned_order_keeps_each_video_in_order():
  seg, coords = packed(ALIGNABLE_ROWS)
  perm = layout.aligned_order(seg, coords, 64)
  seg_p = np.take_along_axis(seg, perm, 1)
  for b in range(seg.shape[0]):
    for s in (1, 2):
      where = np.flatnonzero(seg_p[b] == s)
      assert where[0] % 64 == 0 and np.all(np.diff(where) == 1)
      np.testing.assert_array_equal(perm[b, where], np.flatnonzero(seg[b] == s))


def test_aligned_layout_raises_when_a_row_does_not_fit():
  seg, coords = packed()  # row 1: 42 + 16 + 18 tokens, 3 blocks of 64 > 128
  assert layout.alignable(seg, 32) and not layout.alignable(seg, 64)
  with pytest.raises(ValueError, match=r"row 1: videos of \[42, 16, 18\] tokens.*align=False"):
    layout.make_layout("full", seg, coords, 64, 64, align=True)
  with pytest.raises(ValueError, match="align=True needs pattern 'full'"):
    layout.make_layout("spatial", seg, coords, 64, 64, align=True)


def test_always_alignable_matches_enumeration():
  """The dynamic program against every multiset of up to S sizes that fits a row."""
  import itertools
  rng = np.random.default_rng(5)
  for _ in range(40):
    seq_len = int(rng.choice([64, 128, 256]))
    block = int(rng.choice([16, 32, 64]))
    sizes = tuple(sorted({int(x) for x in rng.integers(1, block + 1, size=3)}))
    S = int(rng.integers(1, 5))
    worst = max(sum(-(-n // block) * block for n in combo)
                for k in range(S + 1) for combo in itertools.combinations_with_replacement(sizes, k)
                if sum(combo) <= seq_len)
    assert bounds.always_alignable(seq_len, block, sizes, S) == (worst <= seq_len), (
        seq_len, block, sizes, S, worst)


def test_batch_layouts_align_full_when_every_row_allows():
  default_grids = [(4, 7, 9), (4, 8, 8), (4, 9, 7)]  # configs/default.py: 252 or 256 tokens
  assert bounds.block_and_bound("full", 512, default_grids, 0, max_segments=4) == (512, 1)
  assert bounds.aligned_block("full", 512, default_grids, 0, max_segments=4) == 256
  assert bounds.aligned_block("spatial", 512, default_grids, 0, max_segments=4) is None
  assert bounds.aligned_block("full", 512, default_grids, 128, max_segments=4) is None
  assert bounds.aligned_block("full", 512, default_grids, 0) is None  # packing unknown
  # Three 170-token videos fit 512 back to back but not in three blocks of 256.
  assert bounds.aligned_block("full", 512, [(1, 10, 17)], 0, max_segments=3) is None
  assert bounds.aligned_block("full", 512, [(1, 10, 17)], 0, max_segments=2) == 256
  # One video per row is block-diagonal already: nothing to gain (P0).
  assert bounds.aligned_block("full", 2048, [(8, 16, 16)], 0, max_segments=1) is None
  rng = np.random.default_rng(6)
  rows = [[default_grids[i] for i in rng.integers(0, 3, size=2)] for _ in range(3)] + [
      [default_grids[0]]]
  items = [[{"tokens": np.zeros((tokens.num_tokens(g), 1), np.float32), "grid": g} for g in row]
           for row in rows]
  b = tokens.pack_rows(items, 512, max_segments=4, token_size=1)
  seg, coords = b["segment_ids"], b["coords"]
  lay = layout.batch_layouts(["full"], seg, coords, default_grids, max_segments=4)["full"]
  assert lay.kv_blocks.shape[1:] == (2, 1)
  assert_matches_dense("full", seg, coords, lay)


def test_real_outputs_ignore_padding_values():
  seg, coords = packed()
  lay = jax.tree.map(jnp.asarray, layout.make_layout("full", seg, coords, 16, 16))
  q, k, v, _ = random_qkv(seg)
  pad = (seg == 0)[:, :, None, None]
  noisy = [jnp.where(pad, 1e3 * x[::-1], x) for x in (q, k, v)]
  f = jax.jit(bs_fn("full"))
  o, o_noisy = f(q, k, v, lay), f(*noisy, lay)
  np.testing.assert_array_equal(np.where(pad, 0, o), np.where(pad, 0, o_noisy))
  assert bool(jnp.all(jnp.isfinite(o_noisy)))


def test_one_compile_serves_different_packings():
  """Layouts padded to the static bound have the same shapes for every batch: no recompile."""
  rows_a = ROWS
  rows_b = [[(1, 2, 9), (4, 3, 3), (2, 2, 2)], [(5, 5, 3)]]
  traces = []

  @jax.jit
  def f(q, k, v, lay):
    traces.append(1)
    return blocksparse.blocksparse_attention(q, k, v, "spatial", lay)

  for rows in (rows_a, rows_b):
    seg, coords = packed(rows)
    bound = bounds.max_kv_blocks_bound("spatial", L, 16, 16, max_group_tokens=25)
    lay = layout.make_layout("spatial", seg, coords, 16, 16, bound)
    q, k, v, _ = random_qkv(seg, seed=len(traces))
    o = f(q, k, v, lay)
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, o, 0),
                               np.where(real, dense_fn("spatial", seg, coords)(q, k, v), 0),
                               atol=1e-5)
  assert len(traces) == 1


def test_default_block():
  assert bounds.default_block(2048, 8) == 16
  assert bounds.default_block(2048, 256) == 128
  assert bounds.default_block(1024, 64) == 64
  assert bounds.default_block(64, 512) == 64
  assert bounds.default_block(96, 512) == 32


def predicate_np(pattern, c_q, c_k):
  """The table of vdit_jax/patterns.py for one pair of one video, written out."""
  name, _, rest = pattern.partition("(")
  args = [int(a) for a in rest.rstrip(")").split(",")]
  if name == "frame_causal":
    back = int(c_q[0]) - int(c_k[0])  # frames from the key forward to the query
    return 0 <= back and (args[0] < 0 or back <= args[0])
  dt, dh, dw = (abs(int(a) - int(b)) for a, b in zip(c_q, c_k))
  if name == "window":
    return dt <= args[0] and dh <= args[1] and dw <= args[2]
  kt, r = args
  reach = r // 2**dt
  if name == "local":
    return dt <= kt and dh <= reach and dw <= reach
  return dt <= kt and ((dh == 0 and dw <= reach) or (dw == 0 and dh <= reach))


@pytest.mark.parametrize("pattern", WINDOWED + ("local(3,9)", "cross(2,1)", "window(0,1,0)",
                                     "frame_causal(0)"))
def test_windowed_mask_matches_the_predicate_table(pattern):
  grid = (4, 5, 6)
  c = tokens.grid_coords(grid)
  want = np.array([[predicate_np(pattern, a, b) for b in c] for a in c])
  seg = np.ones((1, len(c)), np.int32)
  np.testing.assert_array_equal(allowed_np(pattern, seg, c[None])[0], want)
  assert want.any() and not want.all()


@pytest.mark.parametrize("pattern", PATTERNS + WINDOWED + ("local(3,9)", "window(2,0,5)"))
def test_pattern_pairs_counts_the_mask(pattern):
  """The FLOP counter's pair count is exact, windows clipped at the borders included."""
  for grid in [(3, 5, 2), (1, 4, 4), (5, 3, 7), (1, 1, 1)]:
    c = tokens.grid_coords(grid)
    one = np.ones(len(c), np.int32)
    p = patterns.parse(pattern)
    n = p.allowed(one[:, None], c[:, None], one[None], c[None]).sum()  # numpy
    assert p.pairs(grid) == n, grid
  heads = (p, patterns.Full())
  assert schedule.sublayer_pairs(heads, (3, 5, 2)) == p.pairs((3, 5, 2)) + 30 * 30


@pytest.mark.parametrize("bad", ["window", "window(1,2)", "window(1,-1,2)", "local(a,2)",
                                 "frame_causal", "frame_causal(-2)",
                                 "cross(1,2,3)", "full(1)"])
def test_bad_patterns_raise(bad):
  with pytest.raises(ValueError, match="unknown attention pattern"):
    patterns.parse(bad)
  assert str(patterns.window(1, 2, 3)) == "window(1,2,3)"
  assert patterns.parse("window(1,2,3)") == patterns.Window(1, 2, 3)
  with pytest.raises(ValueError, match="unknown attention pattern"):
    patterns.window(1, -2, 3)


@pytest.mark.parametrize("pattern", WINDOWED + ("window(0,2,1)", "window(2,9,0)", "local(3,9)",
                                     "cross(2,1)"))
def test_window_distance_bounds_allowed_pairs(pattern):
  """The farthest allowed pair in a video's t-major order is exactly that far apart."""
  for grid in [(3, 5, 2), (4, 3, 6), (1, 7, 2)]:
    c = tokens.grid_coords(grid)
    one = np.ones(len(c), np.int32)
    ok = patterns.parse(pattern).allowed(one[:, None], c[:, None], one[None], c[None])
    i, j = np.nonzero(ok)
    farthest, bound = int(np.abs(i - j).max()), patterns.parse(pattern).max_distance(grid)
    assert farthest == bound, grid


def test_windowed_bound_fits_random_packings():
  """The static bound fits rows of videos placed anywhere: from the largest grids in t-major
  orders (distances grow with the grid), from every grid in tiled ones."""
  rng = np.random.default_rng(2)
  largest = [(3, 6, 4), (2, 4, 7)]
  every = [(t, h, w) for t in range(1, 4) for h in range(1, 7) for w in range(1, 8)
           if any(t <= a and h <= b and w <= c for a, b, c in largest)]
  for pattern in ("window(1,1,2)", "local(1,1)", "cross(1,2)", "window(0,2,1)",
                  "frame_causal(0)", "causal_window(1,2,1)"):
    for bq, bk in [(8, 8), (8, 16)]:
      tiled = not bounds.distance_ordered(pattern, every, bq)
      bound = bounds.distance_bound(pattern, L, bq, bk, every if tiled else largest)
      # A real bound, not every key block (tiled: up to 8 one-token videos share a block here).
      assert tiled or bound < L // bk
      worst = 0
      for _ in range(12):
        rows = []
        for _ in range(3):
          row, used = [], 0
          while len(row) < 4:  # packed() allows 4 videos per row
            big = largest[rng.integers(len(largest))]
            g = tuple(int(rng.integers(1, x + 1)) for x in big)
            if used + tokens.num_tokens(g) > L:
              break
            row.append(g)
            used += tokens.num_tokens(g)
          rows.append(row)
        seg, coords = shuffled(*packed(rows), seed=int(rng.integers(99)))
        worst = max(worst, layout.needed_kv_blocks(pattern, seg, coords, bq, bk, pairs=tiled))
      assert worst <= bound, (pattern, bq, bk)


@pytest.mark.parametrize("backend", [b for b in backends.BACKENDS if b != "auto"])
def test_per_head_patterns_attend_each_head_with_its_own(backend):
  """A tuple pattern gives head h the pattern at h (groups need not be contiguous)."""
  seg, coords = packed()
  heads = ("local(1,3)", "full", "cross(1,4)", "local(1,3)")
  keys = jax.random.split(jax.random.key(5), 3)
  q, k, v = (jax.random.normal(key, seg.shape + (len(heads), K)) for key in keys)
  layouts = {p: layout.make_layout(p, seg, coords, 16, 16) for p in set(heads)}
  kernel = ("triton", True) if backend == "pallas" else None  # pallas: interpret mode
  ctx = attention.AttentionContext(backends.Backend(backend, heads, kernel=kernel),
                                   jnp.asarray(seg), jnp.asarray(coords), layouts)
  out = jax.jit(lambda q, k, v: ctx.attend(heads, q, k, v))(q, k, v)
  real = (seg > 0)[:, :, None]
  for h, p in enumerate(heads):
    want = dense_fn(p, seg, coords)(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1])[:, :, 0]
    np.testing.assert_allclose(np.where(real, out[:, :, h], 0), np.where(real, want, 0),
                               atol=1e-5, err_msg=f"head {h}")


# ----------------------------------------------------------------------------- pair lists


@pytest.mark.parametrize("pattern,rows", [("frame_causal(-1)", "packed"),
                                          ("frame_causal(1)", "gaps"),
                                          ("window(1,1,2)", "shuffled"), ("spatial", "packed")])
def test_pair_lists_are_the_span_lists_flattened(pattern, rows):
  seg, coords = ROW_KINDS[rows]()
  lay = layout.make_layout(pattern, seg, coords, 16, 16, max_pairs=None)
  spans = layout.make_layout(pattern, seg, coords, 16, 16)
  B, nQ, _ = spans.kv_blocks.shape
  listed = listed_blocks(spans, nQ)
  for b in range(B):
    got = list(zip(lay.pair_q[b][lay.pair_valid[b]], lay.pair_k[b][lay.pair_valid[b]]))
    assert got == sorted(zip(*np.nonzero(listed[b])))  # every listed pair once, in order
  padded = layout.make_layout(pattern, seg, coords, 16, 16, max_pairs=lay.max_pairs + 3)
  assert padded.pair_q.shape == (B, lay.max_pairs + 3) and not padded.pair_valid[:, -3:].any()
  with pytest.raises(ValueError, match="max_pairs="):
    layout.make_layout(pattern, seg, coords, 16, 16, max_pairs=lay.max_pairs - 1)


@pytest.mark.parametrize("pattern,rows,chunk", [("frame_causal(-1)", "packed", 3),
                                                ("frame_causal(0)", "shuffled", 5),
                                                ("cross(1,4)", "gaps", 2), ("full", "gaps", 4)])
def test_pairs_match_dense(pattern, rows, chunk, monkeypatch):
  """The pair path, over several chunks of pairs (repeated query and key blocks in a chunk)."""
  from vdit_jax import blockpairs
  monkeypatch.setattr(blockpairs, "pair_chunk", lambda *a, **k: chunk)
  seg, coords = ROW_KINDS[rows]()
  lay = layout.make_layout(pattern, seg, coords, 16, 16, max_pairs=None)
  assert lay.max_pairs > chunk
  assert_matches_dense(pattern, seg, coords, lay)


def test_frame_causal_layouts_list_pairs_and_about_half_of_full():
  """Packed rows of one long video: batch_layouts flattens frame_causal(-1) into pairs (its
  spans would cover the whole row), listing about half of full's blocks."""
  grid = (8, 8, 16)  # frames of 128 tokens, one video per row
  seg, coords = with_gaps([[grid]], gap=0, seq_len=1024)
  lays = layout.batch_layouts(["frame_causal(-1)", "full", "spatial"], seg, coords, [grid],
                              block=64, max_segments=1)
  causal, full = lays["frame_causal(-1)"], lays["full"]
  assert causal.max_pairs and not full.max_pairs and not lays["spatial"].max_pairs
  assert causal.pair_valid.sum() == causal.max_pairs  # the bound is exact for one video
  ratio = causal.max_pairs / (full.kv_valid.sum())
  assert ratio == (8 + 1) / (2 * 8) + 0.0  # frames of two blocks: (T + 1) / 2T of the blocks


def test_pair_bound_fits_random_packings():
  rng = np.random.default_rng(7)
  for trial in range(6):
    grids, S, seg, coords = random_packing(rng, 100)
    for pattern in ("frame_causal(-1)", "frame_causal(1)", "window(1,2,1)", "temporal"):
      J = bounds.packed_kv_blocks_bound(pattern, L, 16, grids, S)
      bound = bounds.pair_bound(pattern, L, 16, grids, S, J)
      lay = layout.make_layout(pattern, seg, coords, 16, 16, J, max_pairs=None)
      assert lay.max_pairs <= bound <= (L // 16) * J, (trial, pattern, grids, S)
