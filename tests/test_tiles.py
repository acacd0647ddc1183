"""3D tile orders and run lists: patterns that are not group relations, put in tiles so a local
neighbourhood is a few runs of key tiles, against the dense reference and brute force."""

import itertools

import jax
import numpy as np
import pytest

from vdit_jax import backends, blocksparse, bounds, layout, patterns, tokens
from test_blocksparse import (assert_matches_dense, dense_fn, layout_pairs_np, listed_blocks,
                              packed, random_packing, random_qkv, shuffled, with_gaps)

# Odd grids that tiles do not divide, one or several videos per row, padding at each row's end.
TILED_ROWS = [[(3, 11, 13)], [(2, 9, 14), (2, 6, 7), (1, 2, 3)]]
TILED_L = 512
TILED = ("window(1,2,2)", "local(1,1)", "cross(1,2)", "causal_window(1,2,1)",
         "causal_window(-1,1,2)", "frame_causal(1)")


@pytest.fixture(params=["chosen", "forced"])
def tiles(request, monkeypatch):
  """The tiles ``choose_tile`` picks, or the same small tile for every video and pattern: the
  layouts must be right for any tile. Forced tiles never reach ``bounds``' caches: the tests
  using this fixture build layouts directly."""
  if request.param == "forced":
    monkeypatch.setattr(patterns, "choose_tile", lambda box, grid, block, span: (2, 2, 4))
  return request.param


def tiled_rows(kind: str):
  seg, coords = packed(TILED_ROWS, TILED_L)
  if kind == "shuffled":
    return shuffled(seg, coords, seed=3)
  if kind == "gaps":
    return with_gaps(TILED_ROWS, gap=7, seq_len=TILED_L)
  return seg, coords


def test_axis_reach_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(200):
    size, tile = int(rng.integers(1, 20)), int(2 ** rng.integers(0, 5))
    lo, hi = -int(rng.integers(0, 8)), int(rng.integers(0, 8))
    most = 0
    for start in range(0, size, tile):
      keys = {k // tile for q in range(start, min(size, start + tile))
              for k in range(max(0, q + lo), min(size, q + hi + 1))}
      most = max(most, len(keys))
    assert patterns.axis_reach(size, tile, lo, hi) == most, (size, tile, lo, hi)


@pytest.mark.parametrize("grid", [(16, 32, 32), (5, 7, 9), (1, 3, 16)])
def test_is_t_major_matches_the_order(grid):
  """``is_t_major`` says exactly whether tiles leave the video's tokens in t-major order (for
  grids with every side above 1), and ``t_major_tile`` always does."""
  c = tokens.grid_coords(grid)[None]
  seg = np.ones(c.shape[:2], np.int32)
  caps = [1 << max(g - 1, 0).bit_length() for g in grid]
  for tile in itertools.product(*[[1 << i for i in range(c.bit_length())] for c in caps]):
    keys = [c[..., a] % tile[a] for a in (2, 1, 0)] + [c[..., a] // tile[a] for a in (2, 1, 0)]
    identity = (np.lexsort(keys, axis=-1) == np.arange(seg.shape[1])).all()
    if min(grid) > 1:
      assert patterns.is_t_major(tile, grid) == identity, tile
    elif patterns.is_t_major(tile, grid):
      assert identity, tile
  for block in (16, 64, 256):
    assert patterns.is_t_major(patterns.t_major_tile(grid, block), grid)


def test_tiles_follow_the_neighbourhood():
  """Small reaches on large frames get compact tiles; boxes unbounded in space, whole rows."""
  grid = (16, 32, 32)
  assert not patterns.is_t_major(patterns.parse("local(2,4)").tile(grid, 64), grid)
  assert not patterns.is_t_major(patterns.parse("causal_window(2,4,4)").tile(grid, 64), grid)
  for p in ("frame_causal(-1)", "frame_causal(2)", "window(1,16,31)"):
    assert patterns.is_t_major(patterns.parse(p).tile(grid, 128), grid), p
  assert patterns.parse("full").tile(grid, 64) is None


@pytest.mark.parametrize("rows", ["packed", "shuffled", "gaps"])
def test_tile_order_keeps_videos_and_makes_tiles_contiguous(rows):
  seg, coords = tiled_rows(rows)
  p, block = patterns.parse("local(1,1)"), 16
  perm = layout.pattern_order(p, seg, coords, block)
  seg_p = np.take_along_axis(seg, perm, 1)
  c_p = np.take_along_axis(coords, perm[..., None], 1)
  plain = layout.pattern_order(p, seg, coords)
  # The same positions hold each video (and each run of padding) as in t-major order.
  np.testing.assert_array_equal(seg_p, np.take_along_axis(seg, plain, 1))
  tiles = layout.tile_sizes(p, seg_p, c_p, block)
  assert any(not patterns.is_t_major(tuple(t), g) for row in TILED_ROWS for g in row
             for t in [p.tile(g, block)])
  for b in range(seg.shape[0]):
    real = seg_p[b] > 0
    tile_id = np.stack([seg_p[b], *(c_p[b, :, a] // tiles[b, :, a] for a in range(3))], -1)[real]
    # Tiles in t-major order of their index, each one contiguous run.
    changes = np.any(tile_id[1:] != tile_id[:-1], axis=-1)
    assert (np.lexsort(tile_id.T[::-1]) == np.arange(len(tile_id))).all()
    assert changes.sum() + 1 == len({tuple(t) for t in tile_id})


@pytest.mark.parametrize("pattern", TILED)
@pytest.mark.parametrize("rows", ["packed", "shuffled", "gaps"])
def test_tiled_runs_match_dense(pattern, rows, tiles):
  seg, coords = tiled_rows(rows)
  lay = layout.make_layout(pattern, seg, coords, 16, 16, None, runs=(None, 2))
  assert lay.max_runs > 1
  assert_matches_dense(pattern, seg, coords, lay)


@pytest.mark.parametrize("pattern,block_q,block_k,width", [
    ("window(1,2,2)", 32, 16, 3), ("cross(1,2)", 16, 32, 1), ("causal_window(1,2,1)", 16, 16, 5)])
def test_runs_with_other_blocks_and_widths_match_dense(pattern, block_q, block_k, width, tiles):
  seg, coords = tiled_rows("packed")
  lay = layout.make_layout(pattern, seg, coords, block_q, block_k, None, runs=(None, width))
  assert_matches_dense(pattern, seg, coords, lay)


@pytest.mark.parametrize("pattern", TILED)
@pytest.mark.parametrize("width", [1, 3, 8])
def test_runs_cover_exactly_the_listed_blocks(pattern, width, tiles):
  """Runs hold every listed key block once, never an unlisted one, each at most ``width``."""
  seg, coords = tiled_rows("gaps")
  lay = layout.make_layout(pattern, seg, coords, 16, 16, None, runs=(None, width))
  listed = layout.block_pairs(pattern, seg, coords, 16, 16)
  B, N, _ = listed.shape
  assert (lay.run_len <= width).all()
  for b, n in itertools.product(range(B), range(N)):
    got = [s + i for s, n_ in zip(lay.run_start[b, n], lay.run_len[b, n]) for i in range(n_)]
    assert sorted(got) == list(np.flatnonzero(listed[b, n])), (b, n)
  with pytest.raises(ValueError, match="max_runs="):
    layout.make_layout(pattern, seg, coords, 16, 16, None, runs=(lay.max_runs - 1, width))


@pytest.mark.parametrize("pattern", TILED)
@pytest.mark.parametrize("rows", ["packed", "shuffled", "gaps"])
def test_tiled_layouts_list_exactly_the_nonempty_tile_pairs(pattern, rows, tiles):
  """Against brute force over every token pair: no listed block pair is empty, none that holds
  an allowed pair is missing."""
  seg, coords = tiled_rows(rows)
  lay = layout.make_layout(pattern, seg, coords, 16, 16, None, runs=(None, 4))
  B, L = seg.shape
  pairs = layout_pairs_np(pattern, seg, coords, lay, 16)
  nonempty = pairs.reshape(B, L // 16, 16, L // 16, 16).any(axis=(2, 4))
  np.testing.assert_array_equal(listed_blocks(lay, L // 16), nonempty)


def test_tiled_bounds_fit_random_packings():
  """The static sizes of run and pair layouts fit every row packed from the grids."""
  rng = np.random.default_rng(4)
  for trial in range(8):
    grids, S, seg, coords = random_packing(rng, 60, TILED_L, max_side=7)
    for pattern in ("window(1,2,2)", "local(1,1)", "causal_window(1,1,2)"):
      for b in (16, 32):
        J, P, runs = bounds.tiled_bounds(pattern, TILED_L, b, b, grids, S)
        for W in (1, len(runs)):
          lay = layout.make_layout(pattern, seg, coords, b, b, J, runs=(runs[W - 1], W),
                                   max_pairs=P)
          assert lay.max_kv_blocks == J and lay.max_runs == runs[W - 1]
        if S == 1 and len(grids) == 1:  # one video per row, at offset 0: every list seen
          assert layout.needed_kv_blocks(pattern, seg, coords, b, b, pairs=True) == J


def test_batch_layouts_runs_compile_once_and_visit_fewer_keys():
  """Packed rows of one long video: ``local`` gets run lists in tiles, listing far fewer keys
  per query than t-major spans, with static shapes, so two different packings share one
  compile, and the same outputs as dense."""
  grid, small, L = (4, 32, 32), (2, 16, 16), 4096
  p = "local(1,2)"
  plan = bounds.plan(p, L, [grid, small], max_segments=3)
  assert plan.runs is not None
  # Keys per query block: runs of tiles against one t-major span, at a third or less.
  span = patterns.parse(p).t_major_span(grid, plan.block) + plan.block
  assert 3 * plan.runs[0] * plan.runs[1] * plan.block <= span
  backend = backends.Backend("blocksparse", (p,))
  traces = []

  @jax.jit
  def f(q, k, v, lay):
    traces.append(1)
    return blocksparse.blocksparse_attention(q, k, v, p, lay)

  for rows in ([[grid], [small, small]], [[small, small, small], [small, small]]):
    seg, coords = with_gaps(rows, gap=0, seq_len=L)
    lay = backend.prepare(seg, coords, [grid, small], max_segments=3)[p]
    assert (lay.block_q, lay.max_runs, lay.run_blocks) == (plan.block,) + plan.runs
    q, k, v, _ = random_qkv(seg)
    o = f(q, k, v, lay)
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, o, 0),
                               np.where(real, dense_fn(p, seg, coords)(q, k, v), 0), atol=1e-5)
  assert len(traces) == 1


def test_causal_window_is_a_local_causal_box():
  c = tokens.grid_coords((4, 5, 5))
  p = patterns.parse("causal_window(1,1,2)")
  d = c[None] - c[:, None]  # key minus query
  want = (d[..., 0] <= 0) & (d[..., 0] >= -1) & (abs(d[..., 1]) <= 1) & (abs(d[..., 2]) <= 2)
  one = np.ones(len(c), np.int32)
  np.testing.assert_array_equal(p.allowed(one[:, None], c[:, None], one[None], c[None]), want)
  assert p.pairs((4, 5, 5)) == want.sum()
  assert patterns.parse("causal_window(-1,1,2)").pairs((4, 5, 5)) == (
      (d[..., 0] <= 0) & (abs(d[..., 1]) <= 1) & (abs(d[..., 2]) <= 2)).sum()
  assert str(patterns.parse("causal_window(-1,0,3)")) == "causal_window(-1,0,3)"
  for bad in ("causal_window(1,-1,2)", "causal_window(-2,1,1)", "causal_window(1,1)"):
    with pytest.raises(ValueError, match="unknown attention pattern"):
      patterns.parse(bad)


def test_causal3d_blocks_take_a_causal_window_from_the_config():
  from vdit_jax import config as config_lib
  from vdit_jax import schedule
  m = config_lib.get_base_config().model
  m.block, m.causal_frames = "causal3d", 2
  assert schedule.config_patterns(m) == (patterns.FrameCausal(2),)
  m.causal_window = (3, 1)
  assert schedule.config_patterns(m) == (patterns.CausalWindow(2, 3, 1),)
  m.causal_window = (3,)
  with pytest.raises(ValueError, match="model.causal_window"):
    schedule.config_patterns(m)
