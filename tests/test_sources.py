"""The sources beyond synthetic_shapes: moving_digits, video_folder and latents."""

import numpy as np
import pytest

from data import pipeline
from data.moving_digits import MovingDigits, _load_digits
from vdit_jax import config as base
from vdit_jax import tokens as tok


def digits_config(**data):
  c = base.get_base_config()
  c.data.source = "moving_digits"
  c.data.channels = 1
  c.data.frames = (2, 6)
  c.data.side = (16, 32)
  c.data.aspect_ratios = (0.5, 1.0, 2.0)
  c.data.num_objects = (1, 3)
  c.data.object_size = (0.5, 0.7)
  c.data.seq_len = 512
  c.model.patch = (1, 4, 4)
  c.model.num_classes = 10
  for k, v in data.items():
    c.data[k] = v
  return c


def assert_items_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k


def check_size_in_ranges(thw, c):
  T, H, W = thw
  pt, ph, pw = c.model.patch
  assert c.data.frames[0] // pt * pt <= T <= c.data.frames[1] and T % pt == 0
  assert H % ph == 0 and W % pw == 0
  # H and W are rounded to the nearest patch multiple: the side is off by at most half a patch.
  assert c.data.side[0] - ph <= np.sqrt(H * W) <= c.data.side[1] + ph
  assert min(abs(np.log(W / H / a)) for a in c.data.aspect_ratios) < np.log(1 + 2 * pw / W + 2 * ph / H)


# ---- moving_digits ----

def test_digits_are_deterministic_per_seed_and_index():
  src = MovingDigits.from_config(digits_config())
  assert_items_equal(src[4], src[4])
  assert not np.array_equal(src[4]["video"], src[5]["video"])
  c = digits_config()
  c.seed = 1
  assert not np.array_equal(MovingDigits.from_config(c)[4]["video"], src[4]["video"])


def test_digits_sizes_channels_and_ranges():
  for channels in (1, 3):
    c = digits_config(channels=channels)
    src = MovingDigits.from_config(c)
    seen = set()
    for i in range(40):
      item = src[i]
      v = item["video"]
      assert v.dtype == np.float32 and v.shape[-1] == channels
      assert v.shape[:3] == src.video_size(i)
      check_size_in_ranges(v.shape[:3], c)
      assert v.min() >= -1.0 and v.max() <= 1.0 and v.max() > 0.0  # some ink is visible
      k = len(item["gt_digits"])
      assert c.data.num_objects[0] <= k <= c.data.num_objects[1]
      assert item["gt_boxes"].shape == (k, v.shape[0], 4)
      assert item["label"] == item["gt_digits"][0]
      seen.add(v.shape[:3])
    assert len(seen) > 5, "sizes should vary"
  c = digits_config()
  c.model.num_classes = 18
  with pytest.raises(ValueError, match="num_classes=10"):
    MovingDigits.from_config(c)


def test_digit_label_is_the_drawn_first_digit():
  """The label is the class of the scan drawn first, and that scan is what the video shows:
  shrinking the first digit's box back to 8x8 gives the scan (single-digit videos)."""
  images, targets = _load_digits()
  c = digits_config(num_objects=(1, 1), frames=(2, 2), side=(48, 48), aspect_ratios=(1.0,))
  src = MovingDigits.from_config(c)
  labels = set()
  for i in range(20):
    item = src[i]
    (index,) = item["gt_index"]
    assert item["label"] == targets[index] == item["gt_digits"][0]
    assert item["caption"].startswith(f"a {item['label']} moving ")
    labels.add(item["label"])
    y0, x0, y1, x1 = item["gt_boxes"][0, 0]
    ink = (item["video"][0, ..., 0] + 1) / 2
    cell = (y1 - y0) / 8
    yy, xx = np.mgrid[:ink.shape[0], :ink.shape[1]] + 0.5
    iy = np.floor((yy - y0) / cell).astype(int)
    ix = np.floor((xx - x0) / cell).astype(int)
    inside = (iy >= 0) & (iy < 8) & (ix >= 0) & (ix < 8)
    small = np.zeros((8, 8))
    np.add.at(small, (iy[inside], ix[inside]), ink[inside])
    small /= np.maximum(np.bincount(iy[inside] * 8 + ix[inside], minlength=64).reshape(8, 8), 1)
    assert np.corrcoef(small.ravel(), images[index].ravel())[0, 1] > 0.9
    # Bilinear weights reach half a scan pixel beyond the box, and a pixel covers one more half.
    m = cell / 2 + 0.5
    outside = (yy < y0 - m) | (yy > y1 + m) | (xx < x0 - m) | (xx > x1 + m)
    assert outside.any() and ink[outside].max() == 0, "ink outside the digit's box"
  assert len(labels) > 3


def test_digits_pipeline_batches():
  c = digits_config(batch_rows=2)
  batch = pipeline.make_batch(c, 0)
  assert batch["tokens"].shape == (2, c.data.seq_len, tok.token_dim(c.model.patch, 1))
  real = batch["seg_grid"][..., 0] > 0
  assert real.sum() >= 2 and np.all(batch["seg_label"][real] <= 10)
