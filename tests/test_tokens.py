"""The token contract: patchify round trips, size errors, packing and grid order."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import tokens as tok


def random_case(rng):
  patch = tuple(int(p) for p in rng.integers(1, 5, size=3))
  grid = tuple(int(g) for g in rng.integers(1, 5, size=3))
  thw = tuple(g * p for g, p in zip(grid, patch))
  channels = int(rng.integers(1, 5))
  return thw, patch, grid, channels


def test_patchify_np_round_trips_exactly():
  rng = np.random.default_rng(0)
  seen_pt, seen_nonsquare = False, False
  for _ in range(40):
    thw, patch, grid, C = random_case(rng)
    seen_pt |= patch[0] > 1
    seen_nonsquare |= patch[1] != patch[2] and thw[1] != thw[2]
    video = rng.standard_normal(thw + (C,)).astype(np.float32)
    toks = tok.patchify_np(video, patch)
    assert toks.shape == (tok.num_tokens(grid), tok.token_dim(patch, C))
    assert np.array_equal(tok.unpatchify_np(toks, grid, patch, C), video)
    # and the other way round: any token array is the patchified form of its unpatchify
    toks2 = rng.standard_normal(toks.shape).astype(np.float32)
    assert np.array_equal(tok.patchify_np(tok.unpatchify_np(toks2, grid, patch, C), patch), toks2)
  assert seen_pt and seen_nonsquare  # the random cases covered what the contract is about


def test_token_layout_is_t_major_patches_ordered_pt_ph_pw_c():
  rng = np.random.default_rng(1)
  thw, patch, C = (4, 6, 8), (2, 3, 2), 2
  video = rng.standard_normal(thw + (C,)).astype(np.float32)
  grid = tok.grid_shape(thw, patch)
  toks = tok.patchify_np(video, patch)
  pt, ph, pw = patch
  for n, (t, h, w) in enumerate(tok.grid_coords(grid)):
    block = video[t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
    assert np.array_equal(toks[n], block.reshape(-1)), n


def test_jax_patchify_equals_numpy():
  rng = np.random.default_rng(2)
  for _ in range(6):
    thw, patch, grid, C = random_case(rng)
    video = rng.standard_normal(thw + (C,)).astype(np.float32)
    toks = np.asarray(tok.patchify(jnp.asarray(video), patch))
    assert np.array_equal(toks, tok.patchify_np(video, patch))
    back = np.asarray(tok.unpatchify(jnp.asarray(toks), grid, patch, C))
    assert np.array_equal(back, tok.unpatchify_np(toks, grid, patch, C))


@pytest.mark.parametrize("thw, patch, named", [
    ((4, 9, 8), (1, 4, 4), ["H=9", "8 or 12"]),
    ((3, 8, 8), (2, 4, 4), ["T=3", "2 or 4"]),
    ((2, 8, 14), (1, 4, 4), ["W=14", "12 or 16"]),
    ((2, 8, 2), (1, 4, 4), ["W=2", "use 4"]),  # rounding down would give 0: only 4 is named
    ((2, 9, 7), (1, 4, 4), ["H=9", "8 or 12", "W=7", "4 or 8"]),  # every bad axis is named
])
def test_bad_sizes_name_the_nearest_valid_ones(thw, patch, named):
  for fn in (lambda: tok.grid_shape(thw, patch),
             lambda: tok.patchify_np(np.zeros(thw + (3,), np.float32), patch)):
    with pytest.raises(ValueError) as e:
      fn()
    for part in named:
      assert part in str(e.value), (part, str(e.value))
  if "use 4" in named:
    assert not re.search(r"\b0 or\b", str(e.value))


def test_unpatchify_rejects_tokens_that_do_not_match_the_grid():
  toks = np.zeros((12, 48), np.float32)
  with pytest.raises(ValueError, match="expected"):
    tok.unpatchify_np(toks, (1, 3, 3), (1, 4, 4), 3)
  with pytest.raises(ValueError, match="expected"):
    tok.unpatchify_np(toks, (1, 3, 4), (1, 4, 4), 4)


def test_grid_coords_is_t_major():
  grid = (3, 4, 5)
  coords = tok.grid_coords(grid)
  assert coords.dtype == np.int32 and coords.shape == (60, 3)
  for n, (t, h, w) in enumerate(coords):
    assert n == (t * grid[1] + h) * grid[2] + w
  # t changes slowest, w fastest
  assert np.all(np.diff(coords[:, 0]) >= 0)
  assert np.array_equal(coords[:5, 2], np.arange(5)) and np.all(coords[:5, :2] == 0)


def test_pack_rows_unpack_row_round_trip():
  rng = np.random.default_rng(3)
  patch, C = (1, 2, 2), 3
  P = tok.token_dim(patch, C)
  L, S = 40, 3
  rows = []
  for b in range(4):
    n_videos = int(rng.integers(0, S + 1))  # includes an empty row
    row, used = [], 0
    for s in range(n_videos):
      grid = tuple(int(g) for g in rng.integers(1, 4, size=3))
      if used + tok.num_tokens(grid) > L:
        break
      used += tok.num_tokens(grid)
      row.append({"tokens": rng.standard_normal((tok.num_tokens(grid), P)).astype(np.float32),
                  "grid": grid, "label": 10 * b + s})
    rows.append(row)
  batch = tok.pack_rows(rows, L, S, P, seg_fields={"label": (np.int32, 99)})
  assert batch["tokens"].shape == (4, L, P) and batch["segment_ids"].shape == (4, L)
  assert batch["coords"].shape == (4, L, 3) and batch["seg_grid"].shape == (4, S, 3)
  for b, row in enumerate(rows):
    out = tok.unpack_row(batch["tokens"][b], batch["segment_ids"][b], batch["seg_grid"][b])
    assert len(out) == len(row)
    for item, toks in zip(row, out):
      assert np.array_equal(toks, item["tokens"])
    seg = batch["segment_ids"][b]
    n_real = sum(tok.num_tokens(item["grid"]) for item in row)
    # videos are contiguous from the start of the row, in slot order; padding at the end
    expected = np.concatenate([np.full(tok.num_tokens(it["grid"]), s + 1)
                               for s, it in enumerate(row)] + [np.zeros(L - n_real)])
    assert np.array_equal(seg, expected)
    assert np.all(batch["tokens"][b, n_real:] == 0) and np.all(batch["coords"][b, n_real:] == 0)
    for s, item in enumerate(row):
      assert np.array_equal(batch["coords"][b][seg == s + 1], tok.grid_coords(item["grid"]))
      assert tuple(batch["seg_grid"][b, s]) == item["grid"]
      assert batch["seg_label"][b, s] == item["label"]
    assert np.all(batch["seg_grid"][b, len(row):] == 0)
    assert np.all(batch["seg_label"][b, len(row):] == 99)  # empty slots hold the fill


def test_pack_rows_raises_on_overflow():
  P = 4
  item = lambda grid: {"tokens": np.zeros((tok.num_tokens(grid), P), np.float32), "grid": grid}
  # exactly full is fine
  tok.pack_rows([[item((1, 2, 4)), item((2, 2, 2))]], 16, 2, P)
  with pytest.raises(ValueError, match="seq_len=15"):
    tok.pack_rows([[item((1, 2, 4)), item((2, 2, 2))]], 15, 2, P)
  with pytest.raises(ValueError, match="max_segments=2"):
    tok.pack_rows([[item((1, 1, 1))] * 3], 16, 2, P)
  with pytest.raises(ValueError, match="do not match"):
    tok.pack_rows([[{"tokens": np.zeros((3, P), np.float32), "grid": (1, 2, 2)}]], 16, 2, P)
