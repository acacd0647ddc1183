"""Invariants of the data side: the synthetic source, packing, and the resumable pipeline."""

import time

import jax
import numpy as np
import pytest

from vdit_jax import config as base
from data import packing, pipeline
from data.synthetic_shapes import COLORS, NUM_CLASSES, SyntheticShapes, label_name, render
from vdit_jax import tokens as tok
from vdit_jax import schedule


def tiny_config(**data):
  c = base.get_base_config()
  c.data.frames = (2, 4)
  c.data.side = (8, 16)
  c.data.aspect_ratios = (0.75, 1.0, 1.33)  # largest video: 4x16x16 = 64 tokens = seq_len
  c.data.num_objects = (1, 2)
  c.data.seq_len = 64
  c.data.batch_rows = 2
  c.data.max_segments = 4
  c.data.prefetch = 1
  c.model.patch = (1, 4, 4)
  for k, v in data.items():
    c.data[k] = v
  return c


def motion_config(**data):
  # Big enough that shapes span many pixels and move a few pixels per frame.
  return tiny_config(frames=(8, 8), side=(32, 40), aspect_ratios=(0.5, 1.0, 2.0),
                     speed=(0.05, 0.1), seq_len=1024, **data)


def assert_batches_equal(a, b):
  """Equal batches: the same keys (layouts per pattern, skipped files per reason), dtypes and
  values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), path


def concat_rows(parts):
  """Processes' batches as one global batch: row arrays (and layouts) concatenated."""
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


# ---- the source ----

def test_source_is_deterministic_per_index():
  src = SyntheticShapes.from_config(tiny_config())
  a, b, other = src[5], src[5], src[6]
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  assert not np.array_equal(a["video"], other["video"])  # False as well when shapes differ
  c = tiny_config()
  c.seed = 1
  assert not np.array_equal(SyntheticShapes.from_config(c)[5]["video"], a["video"])


def test_source_sizes_values_and_labels():
  c = tiny_config()
  src = SyntheticShapes.from_config(c)
  pt, ph, pw = c.model.patch
  largest = tok.num_tokens(tok.grid_shape(src.largest_video(), c.model.patch))
  seen_t, seen_hw = set(), set()
  for i in range(60):
    item = src[i]
    v = item["video"]
    T, H, W, C = v.shape
    assert (T, H, W) == src.video_size(i)
    assert C == 3 and v.dtype == np.float32
    assert c.data.frames[0] <= T <= c.data.frames[1] and T % pt == 0
    assert H % ph == 0 and W % pw == 0 and H >= ph and W >= pw
    # H, W are rounded to the nearest patch multiple, so the side is off by at most half a patch.
    assert c.data.side[0] - ph <= np.sqrt(H * W) <= c.data.side[1] + ph
    assert tok.num_tokens(tok.grid_shape((T, H, W), c.model.patch)) <= largest
    assert v.min() >= -1.0 and v.max() <= 1.0 and v.min() == -1.0
    k = len(item["gt_shapes"])
    assert c.data.num_objects[0] <= k <= c.data.num_objects[1]
    assert item["gt_masks"].shape == (k, T, H, W) and item["gt_masks"].dtype == bool
    assert item["gt_boxes"].shape == (k, T, 4) and item["gt_colors"].shape == (k, 3)
    color = list(COLORS.values()).index(tuple(item["gt_colors"][0]))
    assert item["label"] == item["gt_shapes"][0] * len(COLORS) + color
    assert item["caption"].startswith("a " + label_name(item["label"]) + " moving ")
    seen_t.add(T)
    seen_hw.add((H, W))
  assert len(seen_t) > 1 and len(seen_hw) > 1, "sizes should vary across videos"


def test_objects_move_and_stay_inside():
  c = motion_config(num_objects=(1, 3))
  src = SyntheticShapes.from_config(c)
  for i in range(20):
    item = src[i]
    T, H, W, _ = item["video"].shape
    for mask_THW, box_T4 in zip(item["gt_masks"], item["gt_boxes"]):
      assert mask_THW.sum(axis=(1, 2)).min() > 0, "an object vanished"
      assert box_T4[:, :2].min() >= -1e-4 and np.all(box_T4[:, 2] <= H + 1e-4) \
          and np.all(box_T4[:, 3] <= W + 1e-4), f"box leaves the {H}x{W} frame"
      t, y, x = np.nonzero(mask_THW)
      assert np.all(y + 0.5 >= box_T4[t, 0]) and np.all(y + 0.5 <= box_T4[t, 2])
      assert np.all(x + 0.5 >= box_T4[t, 1]) and np.all(x + 0.5 <= box_T4[t, 3])
      # The mask moves with the box (up to pixel quantisation), and the box really moves.
      yy, xx = np.mgrid[:H, :W] + 0.5
      area_T = mask_THW.sum(axis=(1, 2))
      centroid_T2 = np.stack([(mask_THW * yy).sum((1, 2)), (mask_THW * xx).sum((1, 2))], -1)
      centroid_T2 /= area_T[:, None]
      centre_T2 = 0.5 * (box_T4[:, :2] + box_T4[:, 2:])
      drift = (centroid_T2 - centroid_T2[0]) - (centre_T2 - centre_T2[0])
      assert np.abs(drift).max() < 1.0
      path = np.linalg.norm(np.diff(centre_T2, axis=0), axis=-1).sum()
      assert path >= 0.5 * (T - 1) * c.data.speed[0] * min(H, W)
      assert np.linalg.norm(np.diff(centroid_T2, axis=0), axis=-1).sum() > 0


def test_masks_match_rendered_colours():
  src = SyntheticShapes.from_config(motion_config(num_objects=(1, 3)))
  for i in range(20):
    item = src[i]
    v = item["video"]
    mask_THW, color = item["gt_masks"][0], item["gt_colors"][0]
    # Object 0 is on top, so inside its mask every channel leans towards its colour...
    inside_N3 = v[mask_THW]
    assert np.all(inside_N3 * color >= 0)
    assert np.abs(inside_N3 - color).mean() < 0.25
    # ...and with a single object, every pixel outside its mask leans towards the background.
    if len(item["gt_shapes"]) == 1:
      assert np.all(v[~mask_THW] < 0)


def test_render_redraws_items_exactly():
  # Evaluations re-render items with one thing changed; unchanged, they must get the item back.
  src = SyntheticShapes.from_config(motion_config(num_objects=(1, 3)))
  for i in range(10):
    item = src[i]
    T, H, W, _ = item["video"].shape
    cy_KT, cx_KT = item["gt_centers"][..., 0], item["gt_centers"][..., 1]
    for shapes in (item["gt_shapes"], np.repeat(item["gt_shapes"][:, None], T, axis=1)):
      video, masks, boxes = render(shapes, item["gt_colors"], cy_KT, cx_KT, item["gt_radius"], H, W)
      assert np.array_equal(video, item["video"]) and np.array_equal(masks, item["gt_masks"])
      assert np.array_equal(boxes, item["gt_boxes"])
  # A shape per frame: frame 1 alone drawn as a square.
  shapes_KT = np.repeat(item["gt_shapes"][:, None], T, axis=1)
  shapes_KT[0, 1] = 1
  _, masks, _ = render(shapes_KT, item["gt_colors"], cy_KT, cx_KT, item["gt_radius"], H, W)
  assert np.array_equal(masks[0, 2:], item["gt_masks"][0, 2:])
  assert np.array_equal(masks[0, 1], render([1], item["gt_colors"][:1], cy_KT[:1, 1:2],
                                            cx_KT[:1, 1:2], item["gt_radius"][:1], H, W)[1][0, 0])


def test_render_is_fast():
  src = SyntheticShapes(frames=(16, 16), side=(64, 64), aspect_ratios=(1.0,), num_objects=(1, 1),
                        object_size=(0.25, 0.45), speed=(0.03, 0.08), patch=(1, 4, 4),
                        num_videos=100, seed=0)
  src[0]
  start = time.perf_counter()
  for i in range(10):
    src[i]
  # The goal is well under 5 ms; the bound is loose so a busy CI machine does not flake.
  assert (time.perf_counter() - start) / 10 < 0.025


def test_label_names_and_num_classes_error():
  # Parsing labels by name is data.labels' (tests/test_labels.py).
  assert [label_name(i) for i in (0, 7, NUM_CLASSES - 1)] == [
      "red circle", "green square", "magenta triangle"]
  with pytest.raises(ValueError, match="0..17"):
    label_name(NUM_CLASSES)
  c = tiny_config()
  c.model.num_classes = 10
  with pytest.raises(ValueError, match="num_classes=18"):
    SyntheticShapes.from_config(c)


# ---- packing ----

def test_pack_greedy_invariants():
  rng = np.random.default_rng(0)
  for trial in range(50):
    counts = rng.integers(1, 65, size=int(rng.integers(1, 30))).tolist()
    rows, leftovers = packing.pack_greedy(counts, 3, 64, 4)
    placed = [i for row in rows for i in row]
    consumed = sorted(placed + leftovers)
    assert consumed == list(range(len(consumed))), "each consumed video is placed or left once"
    assert all(row == sorted(row) for row in rows)
    free = [64 - sum(counts[i] for i in row) for row in rows]
    assert min(free) >= 0 and max(len(row) for row in rows) <= 4
    for i in leftovers:  # a leftover fits in no row that can still take a video
      assert all(f < counts[i] or len(row) == 4 for f, row in zip(free, rows))
    if len(consumed) < len(counts):  # stopped early only because every row was full
      assert all(f == 0 or len(row) == 4 for f, row in zip(free, rows))


def test_pack_greedy_stops_after_misses_on_endless_input():
  def endless():
    while True:
      yield 40
  rows, leftovers = packing.pack_greedy(endless(), 2, 64, 4, max_misses=3)
  assert rows == [[0], [1]] and leftovers == [2, 3, 4]


def test_pack_greedy_is_best_fit():
  # 10 fits both rows; best-fit puts it in the fuller one, keeping room for a later 24.
  rows, leftovers = packing.pack_greedy([40, 50, 10, 24], 2, 64, 4)
  assert rows == [[0, 3], [1, 2]] and leftovers == []


def test_oversize_video_raises_with_fix():
  with pytest.raises(ValueError, match=r"100 tokens.*data.seq_len=64.*raise data.seq_len"):
    packing.pack_greedy([10, 100], 2, 64, 4)
  with pytest.raises(ValueError, match=r"4x16x16 = 64 tokens.*at least 64"):
    pipeline.make_batch(tiny_config(seq_len=59), 0)


def check_packed_batch(batch, rows_items, c):
  """Every video of ``rows_items`` sits, whole and once, in its row; the rest is padding."""
  B, L, P = batch["tokens"].shape
  S = c.data.max_segments
  patch = c.model.patch
  assert (B, L, P) == (len(rows_items), c.data.seq_len, tok.token_dim(patch, 3))
  assert batch["seg_grid"].shape == (B, S, 3) and batch["seg_label"].shape == (B, S)
  for key, dtype in (("tokens", np.float32), ("segment_ids", np.int32), ("coords", np.int32),
                     ("seg_grid", np.int32), ("seg_label", np.int32)):
    assert batch[key].dtype == dtype, key
  for b, items in enumerate(rows_items):
    seg = batch["segment_ids"][b]
    n_real = sum(tok.num_tokens(tok.grid_shape(it["video"].shape[:3], patch)) for it in items)
    # Segments are 1..n in order, contiguous, then padding zeros.
    expected = np.concatenate(
        [np.full(tok.num_tokens(tok.grid_shape(it["video"].shape[:3], patch)), s + 1)
         for s, it in enumerate(items)] + [np.zeros(L - n_real)])
    assert np.array_equal(seg, expected)
    assert not batch["tokens"][b, n_real:].any() and not batch["coords"][b, n_real:].any()
    videos = tok.unpack_row(batch["tokens"][b], seg, batch["seg_grid"][b])
    assert len(videos) == len(items)
    for s, (toks, it) in enumerate(zip(videos, items)):
      grid = tok.grid_shape(it["video"].shape[:3], patch)
      assert tuple(batch["seg_grid"][b, s]) == grid
      assert np.array_equal(batch["coords"][b][seg == s + 1], tok.grid_coords(grid))
      assert np.array_equal(tok.unpatchify_np(toks, grid, patch, 3), it["video"])
      assert batch["seg_label"][b, s] == it["label"]
    assert not batch["seg_grid"][b, len(items):].any()
    assert np.all(batch["seg_label"][b, len(items):] == c.model.num_classes)


def test_pack_videos_round_trips_every_video():
  c = tiny_config(num_objects=(1, 1))
  src = SyntheticShapes.from_config(c)
  items = [src[i] for i in range(12)]
  counts = [tok.num_tokens(tok.grid_shape(it["video"].shape[:3], c.model.patch)) for it in items]
  rows, _ = packing.pack_greedy(counts, c.data.batch_rows, c.data.seq_len, c.data.max_segments)
  rows_items = [[items[i] for i in row] for row in rows]
  batch = packing.pack_videos(rows_items, c.model.patch, c.data.seq_len, c.data.max_segments, 3,
                              c.model.num_classes)
  check_packed_batch(batch, rows_items, c)
  assert 0 < packing.packing_efficiency(batch) <= 1


# ---- the pipeline ----

@pytest.mark.parametrize("step", [0, 1, 7])
def test_make_batch_holds_exactly_its_planned_videos(step):
  c = tiny_config(label_dropout=0.5)
  maker = pipeline.BatchMaker(c)
  rows, draws = maker.plan(step)
  assert sum(map(len, rows)) > 0
  rows_items = [[dict(maker.source[i]) for i in row] for row in rows]
  for items, row_draws in zip(rows_items, draws):
    for it, draw in zip(items, row_draws):
      assert not draw.drop_caption and draw.frames == 0  # neither is on in this config
      if draw.drop_label:
        it["label"] = c.model.num_classes
  check_packed_batch(pipeline.make_batch(c, step), rows_items, c)


def test_make_batch_is_a_function_of_step_and_process():
  c = tiny_config()
  assert_batches_equal(pipeline.make_batch(c, 3), pipeline.make_batch(c, 3))
  assert not np.array_equal(pipeline.make_batch(c, 3)["tokens"], pipeline.make_batch(c, 4)["tokens"])
  c.data.batch_rows = 4
  p0, p1 = (pipeline.make_batch(c, 3, process_index=p, process_count=2) for p in (0, 1))
  assert p0["tokens"].shape[0] == p1["tokens"].shape[0] == 2
  assert not np.array_equal(p0["tokens"], p1["tokens"])
  plans = [pipeline.BatchMaker(c, p, 2).plan(3)[0] for p in (0, 1)]
  assert plans[0] != plans[1]
  with pytest.raises(ValueError, match="multiple of 3"):
    pipeline.make_batch(c, 0, process_index=0, process_count=3)


def test_fixed_shards_make_the_same_global_batch_on_any_process_count():
  """data.shards=2 on one process == the rows two processes make between them (one stream
  each), so a multi-host run can be compared with a single-process one."""
  c = tiny_config()
  c.data.batch_rows = 4
  parts = [pipeline.make_batch(c, 5, process_index=p, process_count=2) for p in (0, 1)]
  c.data.shards = 2
  one = pipeline.make_batch(c, 5)
  assert_batches_equal(one, concat_rows(parts))
  assert_batches_equal(pipeline.make_batch(c, 5, process_index=1, process_count=2), parts[1])
  with pytest.raises(ValueError, match="data.shards=2 does not split over 4 processes"):
    pipeline.make_batch(c, 5, process_index=0, process_count=4)


def test_label_dropout_rate():
  for rate in (0.0, 0.3, 1.0):
    c = tiny_config(label_dropout=rate)
    maker = pipeline.BatchMaker(c)
    null = filled = 0
    for step in range(150):
      batch = maker(step)
      real = batch["seg_grid"][..., 0] > 0
      null += int(np.sum(batch["seg_label"][real] == c.model.num_classes))
      filled += int(real.sum())
    assert filled > 300
    # 5 standard deviations of a binomial rate estimate: fails only if the rate is wrong.
    assert abs(null / filled - rate) <= 5 * np.sqrt(rate * (1 - rate) / filled) + 1e-9


def check_resume(c):
  with pipeline.make_train_iterator(c) as it:
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(2)]
  # Plain arrays the caller owns (worker batches are copied out of shared memory on arrival).
  assert {type(v) for v in first[0].values() if isinstance(v, np.ndarray)} == {np.ndarray}
  for step, batch in enumerate(first + after):  # the stream is make_batch over steps
    assert_batches_equal(batch, pipeline.make_batch(c, step))
  with pipeline.make_train_iterator(c) as restored:
    restored.set_state(state)
    for batch in after:
      assert_batches_equal(next(restored), batch)
  # Starting at a step gives the same stream without any saved state.
  with pipeline.make_train_iterator(c, start_step=3) as started:
    assert_batches_equal(next(started), after[0])


def test_iterator_resumes_exactly_in_process():
  check_resume(tiny_config(worker_count=0))


def test_iterator_resumes_exactly_with_worker_processes():
  start = time.perf_counter()
  check_resume(tiny_config(worker_count=1))
  assert time.perf_counter() - start < 20, "worker start-up is unexpectedly slow"


@pytest.mark.parametrize("backend", ["blocksparse", "auto"])
@pytest.mark.parametrize("block", ["full3d", "factorized", "window", "sparse"])
def test_blocksparse_batches_carry_complete_static_layouts(block, backend):
  """With the blocksparse backend (or auto, which may pick it) every batch carries one layout per
  pattern of the block type, with the same shapes at every step (one compile), listing every
  allowed pair of the batch."""
  from vdit_jax import layout

  c = tiny_config()
  c.model.block = block
  c.model.attention_backend = backend
  shapes = None
  for step in range(4):
    batch = pipeline.make_batch(c, step)
    patterns = [str(p) for p in schedule.config_patterns(c.model)]
    assert sorted(batch["layouts"]) == sorted(patterns)
    step_shapes = {p: jax.tree.map(np.shape, batch["layouts"][p]) for p in patterns}
    step_shapes = {p: (jax.tree.structure(s), jax.tree.leaves(s)) for p, s in step_shapes.items()}
    assert shapes is None or step_shapes == shapes
    shapes = step_shapes
    seg, coords = batch["segment_ids"], batch["coords"]
    for p in patterns:
      lay = batch["layouts"][p]
      size = seg.shape[1] // lay.kv_blocks.shape[1]
      assert layout.needed_kv_blocks(p, seg, coords, size, size) <= lay.kv_blocks.shape[2]
      assert np.array_equal(np.sort(lay.perm, axis=1),
                            np.broadcast_to(np.arange(seg.shape[1]), seg.shape))
