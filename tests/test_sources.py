"""The sources beyond synthetic_shapes: moving_digits, video_folder and latents."""

import concurrent.futures
import os
import threading
import time

import numpy as np
import pytest

from data import pipeline
from data.files import SKIP_REASONS, FolderSource, Skip, resize_cover
from data.moving_digits import MovingDigits, _load_digits
from tests.test_data import tiny_config
from vdit_jax import config as base
from vdit_jax import tokens as tok
from vdit_jax import video_io


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
  # W/H is a configured ratio up to the rounding of H and W to the patch grid.
  slack = np.log(1 + 2 * pw / W + 2 * ph / H)
  assert min(abs(np.log(W / H / a)) for a in c.data.aspect_ratios) < slack


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


# ---- video_folder and latents ----

def _write_npy_header(path, shape, dtype="<f4", payload=b"\0" * 64):
  """An npy whose header claims ``shape`` followed by only ``payload``."""
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False,
                                             "shape": tuple(shape)})
    f.write(payload)


def make_video_folder(root, rng):
  """Tiny good files of every kind, and bad files for every skip reason.

  Returns ``{file name: skip reason or ""}``.
  """
  import imageio.v2 as imageio

  root.mkdir(exist_ok=True)
  pixels = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
  video_io.encode(str(root / "a.mp4"), pixels(6, 16, 24, 3), 8, "libx264")
  video_io.encode(str(root / "b.webm"), pixels(6, 24, 16, 3), 8, "libvpx-vp9",
                  {"crf": "30", "b": "0"})
  imageio.mimwrite(root / "c.gif", list(pixels(5, 16, 16, 3)), duration=125, loop=0)
  np.save(root / "d.npy", pixels(7, 20, 20, 3))
  np.save(root / "e.npy", rng.uniform(-1, 1, (4, 12, 16, 3)).astype(np.float32))
  (root / "empty.mp4").write_bytes(b"")
  (root / "garbage.webm").write_bytes(rng.bytes(300))
  mp4 = (root / "a.mp4").read_bytes()
  (root / "cut.mp4").write_bytes(mp4[:len(mp4) // 2])
  np.save(root / "cut.npy", pixels(6, 16, 16, 3))
  (root / "cut.npy").write_bytes((root / "cut.npy").read_bytes()[:400])
  np.save(root / "zero_frames.npy", pixels(0, 16, 16, 3))
  np.save(root / "one_pixel.npy", pixels(4, 1, 1, 3))
  _write_npy_header(root / "huge.npy", (4, 100_000, 100_000, 3), "|u1")
  np.save(root / "short.npy", pixels(1, 16, 16, 3))
  np.save(root / "flat.npy", pixels(16, 16))
  nan = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  nan[2, 3, 4, 1] = np.nan
  np.save(root / "nan.npy", nan)
  (root / "notes.txt").write_text("not a video")
  return {"a.mp4": "", "b.webm": "", "c.gif": "", "d.npy": "", "e.npy": "",
          "empty.mp4": "empty", "garbage.webm": "unreadable", "cut.mp4": "truncated",
          "cut.npy": "truncated", "zero_frames.npy": "no_frames", "one_pixel.npy": "too_small",
          "huge.npy": "absurd_size", "short.npy": "too_short", "flat.npy": "bad_shape",
          "nan.npy": ""}  # nan.npy passes the scan; loading finds not_finite


def test_video_io_encodes_probes_and_reads_windows(tmp_path):
  """PyAV round trip: the header's frame count and size, the frames close to what was written
  (lossy codecs, smooth content), and a window equal to slicing every frame; gifs as Pillow
  decodes them."""
  t, y, x = np.meshgrid(np.arange(9), np.arange(18), np.arange(26), indexing="ij")
  smooth = (np.stack([x * 9, y * 13, (t * 20 + x * 4) % 256], -1) % 256).astype(np.uint8)
  for name, codec, options, shape in (("even.mp4", "libx264", {"crf": "10"}, (18, 26)),
                                      ("odd.mp4", "libx264", {"crf": "10"}, (17, 25)),
                                      ("v.webm", "libvpx-vp9", {"crf": "10", "b": "0"}, (18, 26))):
    path = str(tmp_path / name)
    source = np.ascontiguousarray(smooth[:, :shape[0], :shape[1]])
    video_io.encode(path, source, 8, codec, options)
    assert video_io.probe(path) == (9, *shape)
    every = video_io.read_frames(path)
    assert every.shape == (9, *shape, 3) and every.dtype == np.uint8
    assert np.abs(every.astype(int) - source).mean() < 6, name
    assert np.array_equal(video_io.read_frames(path, 2, 3, 3), every[2:9:3])
    assert np.array_equal(video_io.read_frames(path, 5, 10, 1), every[5:])  # fewer decode
  # gif: PyAV decodes what Pillow (imageio) decodes, colour and grey.
  import imageio.v2 as imageio
  import imageio.v3 as iio
  for name, frames in (("rgb.gif", smooth), ("grey.gif", smooth[..., 2])):
    path = str(tmp_path / name)
    imageio.mimwrite(path, list(frames), duration=125, loop=0)
    pillow = np.asarray(iio.imread(path, index=None))
    pillow = np.repeat(pillow[..., None], 3, -1) if pillow.ndim == 3 else pillow[..., :3]
    assert video_io.probe(path) == (9, 18, 26)
    assert np.array_equal(video_io.read_frames(path), pillow), name
  with pytest.raises(ValueError, match="uint8 RGB frames"):
    video_io.encode(str(tmp_path / "f.mp4"), smooth.astype(np.float32), 8)


def folder_config(path, source="video_folder", **data):
  """test_data's tiny sizes, reading ``path`` with ``source``."""
  return tiny_config(source=source, path=str(path), **data)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  return root, make_video_folder(root, np.random.default_rng(0))


def test_folder_scan_skips_every_bad_kind_by_reason(video_folder):
  root, expected = video_folder
  src = FolderSource.from_config(folder_config(root), "video_folder")
  names = {os.path.basename(e["path"]): e["skip"] for e in src.entries}
  # notes.txt is not a video: not listed at all. On a mismatch, show what each probe said.
  assert names == expected, {os.path.basename(e["path"]): e["skip_detail"] for e in src.entries}
  flat = next(e for e in src.entries if e["path"].endswith("flat.npy"))
  assert "is not [T, H, W, C]" in flat["skip_detail"]
  for i, e in enumerate(src.entries):
    name = os.path.basename(e["path"])
    if expected[name]:
      with pytest.raises(Skip) as info:
        src[i]
      assert info.value.reason == expected[name]
  (nan,) = [i for i, e in enumerate(src.entries) if e["path"].endswith("nan.npy")]
  with pytest.raises(Skip, match="not_finite"):
    src[nan]


def test_cut_containers_are_truncated_and_corrupt_ones_unreadable(tmp_path):
  """A file the decoder rejects is ``truncated`` when its container (mp4 boxes, webm Segment)
  declares more bytes than it holds, at the scan or, where the header survives, at loading;
  the same bytes scrambled inside are ``unreadable``."""
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (6, 24, 16, 3), dtype=np.uint8)
  video_io.encode(str(tmp_path / "v.webm"), pixels, 8, "libvpx-vp9", {"crf": "30", "b": "0"})
  video_io.encode(str(tmp_path / "v.mp4"), pixels, 8, "libx264")
  mp4, webm = (tmp_path / "v.mp4").read_bytes(), (tmp_path / "v.webm").read_bytes()
  root = tmp_path / "videos"
  root.mkdir()
  (root / "tail_cut.mp4").write_bytes(mp4[:-300])
  (root / "cut.webm").write_bytes(webm[:len(webm) // 2])
  # Box sizes intact, the box contents after the ftyp overwritten: corrupt, not cut.
  (root / "scrambled.mp4").write_bytes(mp4[:32] + rng.bytes(len(mp4) - 32))
  src = FolderSource.from_config(folder_config(root), "video_folder")
  skips = {os.path.basename(e["path"]): (e["skip"], e["skip_detail"]) for e in src.entries}
  assert skips["tail_cut.mp4"][0] == "truncated", skips
  assert "the file has" in skips["tail_cut.mp4"][1]
  assert skips["scrambled.mp4"][0] in ("unreadable", "no_frames"), skips
  (cut,) = [i for i, e in enumerate(src.entries) if e["path"].endswith("cut.webm")]
  if not src.entries[cut]["skip"]:  # its header is at the front: loading finds the cut
    with pytest.raises(Skip) as info:
      src[cut]
    assert info.value.reason == "truncated", info.value
  else:
    assert src.entries[cut]["skip"] == "truncated"


def test_scan_names_each_skipped_file_on_stderr(video_folder, capsys):
  root, expected = video_folder
  FolderSource.from_config(folder_config(root), "video_folder")
  err = capsys.readouterr().err
  for name, reason in expected.items():
    named = [l for l in err.splitlines() if l.startswith("  skipped ") and f"/{name} (" in l]
    assert len(named) == (1 if reason else 0), (name, err)
    if reason:
      assert f"/{name} ({reason}): " in named[0]


def test_folder_items_are_deterministic_and_in_range(video_folder):
  root, expected = video_folder
  c = folder_config(root)
  src = FolderSource.from_config(c, "video_folder")
  good = [i for i, e in enumerate(src.entries) if not e["skip"] and "nan" not in e["path"]]
  assert len(good) == 5
  for i in good:
    a, b = src[i], src[i]
    assert np.array_equal(a["video"], b["video"])
    v = a["video"]
    assert v.dtype == np.float32 and v.shape[-1] == 3 and v.shape[:3] == src.video_size(i)
    check_size_in_ranges(v.shape[:3], c)
    assert -1.0 <= v.min() and v.max() <= 1.0
    assert a["label"] == c.model.num_classes  # no manifest: unconditional
  c.seed = 1
  other = FolderSource.from_config(c, "video_folder")
  assert any(other.video_size(i) != src.video_size(i) for i in good)


def test_folder_npy_at_its_own_size_is_a_window_of_the_file(tmp_path):
  """No resampling when the drawn size equals the stored one: the video is the file's frames
  (stride 2 from a seeded start), mapped from uint8 to [-1, 1]."""
  raw = np.random.default_rng(1).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
  np.save(tmp_path / "v.npy", raw)
  c = folder_config(tmp_path, frames=(3, 3), side=(16, 16), aspect_ratios=(1.0,),
                    frame_stride=2, seq_len=48)
  starts = set()
  for seed in range(6):
    c.seed = seed
    v = FolderSource.from_config(c, "video_folder")[0]["video"]
    matches = [s for s in range(9 - 4) if np.allclose(v, raw[s:s + 5:2] / 127.5 - 1, atol=1e-6)]
    assert len(matches) == 1
    starts.add(matches[0])
  assert len(starts) > 1, "the frame window should move with the seed"


def test_resize_keeps_aspect_and_smooth_content():
  # A horizontal ramp of a 2:1 frame resized into a square keeps its centre part, still a ramp.
  x = np.linspace(-1, 1, 64, dtype=np.float32)
  video = np.broadcast_to(x[None, None, :, None], (2, 32, 64, 1))
  out = resize_cover(video, 16, 16)
  assert out.shape == (2, 16, 16, 1)
  assert np.allclose(out[0, 0, :, 0], out[1, 8, :, 0])
  assert np.all(np.diff(out[0, 0, :, 0]) > 0)
  assert -0.6 < out.min() < -0.4 and 0.4 < out.max() < 0.6  # the middle half of the ramp
  assert np.allclose(resize_cover(video, 32, 64), video, atol=1e-6)  # same size: identity


def _resize_cover_by_matrices(video, H, W):
  """resize_cover as two dense resampling matrices (the filter written out in full)."""
  _, h, w, _ = video.shape
  scale = max(H / h, W / w)

  def matrix(n_in, n_out, offset):
    u = (np.arange(n_out) + 0.5 + offset) / scale - 0.5
    radius = max(1.0, 1.0 / scale)
    m = np.maximum(0.0, 1.0 - np.abs(u[:, None] - np.arange(n_in)) / radius)
    return m / m.sum(1, keepdims=True)

  my = matrix(h, H, 0.5 * (h * scale - H))
  mx = matrix(w, W, 0.5 * (w * scale - W))
  return np.einsum("yh,thwc,xw->tyxc", my, video.astype(np.float64), mx)


@pytest.mark.parametrize("h, w, H, W", [
    (16, 24, 16, 24),    # same size
    (9, 13, 32, 32),     # enlarge, crop the sides
    (32, 48, 24, 16),    # shrink, crop the top and bottom
    (240, 320, 16, 24),  # shrink 15x: wide tents
    (101, 37, 20, 12),   # odd sizes, fractional offsets
    (5, 300, 8, 8),      # enlarge one axis, crop most of the other
])
def test_resize_taps_equal_the_matrix_form(h, w, H, W):
  rng = np.random.default_rng(h * w)
  for video in (rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8),
                rng.uniform(-1, 1, (2, h, w, 1)).astype(np.float32)):
    out = resize_cover(video, H, W)
    assert out.dtype == np.float32 and out.shape == (2, H, W, video.shape[-1])
    scale = 255.0 if video.dtype == np.uint8 else 1.0
    np.testing.assert_allclose(out, _resize_cover_by_matrices(video, H, W), rtol=0,
                               atol=2e-6 * scale)


def test_manifest_labels_captions_and_errors(video_folder, tmp_path):
  root, _ = video_folder
  manifest = tmp_path / "m.jsonl"
  manifest.write_text('{"path": "d.npy", "caption": "noise", "label": 3}\n\n'
                      '{"path": "a.mp4"}\n{"path": "missing.npy", "label": 1}\n')
  c = folder_config(root, manifest=str(manifest))
  src = FolderSource.from_config(c, "video_folder")
  assert [os.path.basename(e["path"]) for e in src.entries] == ["d.npy", "a.mp4", "missing.npy"]
  assert (src[0]["label"], src[0]["caption"]) == (3, "noise")
  assert src[1]["label"] == c.model.num_classes
  assert src.entries[2]["skip"] == "unreadable"
  manifest.write_text('{"path": "d.npy", "label": 99}\n')
  with pytest.raises(ValueError, match="label 99 is out of range"):
    FolderSource.from_config(c, "video_folder")
  manifest.write_text("d.npy\n")
  with pytest.raises(ValueError, match="line 1"):
    FolderSource.from_config(c, "video_folder")


def test_folder_config_errors(video_folder, tmp_path):
  root, _ = video_folder
  with pytest.raises(ValueError, match="data.path='/nowhere' is not a directory"):
    base.validate(folder_config("/nowhere"))
  with pytest.raises(ValueError, match="data.manifest='/nowhere.jsonl' is not a file"):
    base.validate(folder_config(root, manifest="/nowhere.jsonl"))
  with pytest.raises(ValueError, match="data.frame_stride=0"):
    base.validate(folder_config(root, frame_stride=0))
  with pytest.raises(ValueError, match="set data.channels=3"):
    FolderSource.from_config(folder_config(root, channels=4), "video_folder")
  (tmp_path / "bad.npy").write_bytes(b"")
  with pytest.raises(ValueError, match=r"no usable video_folder files among 1.*empty"):
    FolderSource.from_config(folder_config(tmp_path), "video_folder")


def test_pipeline_counts_every_skipped_draw_and_packs_only_good_videos(video_folder):
  """batch["skipped"] counts, per reason, exactly the Skips the source raised for that batch
  (at scan for sizes, at load for NaN), and every packed video is a good file's item."""
  root, expected = video_folder
  maker = pipeline.BatchMaker(folder_config(root, batch_rows=2, label_dropout=0.0))
  raised = []

  class Counting:  # the source, recording every Skip it raises
    def __init__(self, src):
      self.src = src

    def __len__(self):
      return len(self.src)

    def video_size(self, index):
      return self._count(self.src.video_size, index)

    def __getitem__(self, index):
      return self._count(self.src.__getitem__, index)

    def _count(self, fn, index):
      try:
        return fn(index)
      except Skip as e:
        raised.append(e.reason)
        raise

  maker.source = Counting(maker.source)
  totals = dict.fromkeys(maker.skip_reasons, 0)
  for step in range(12):
    raised.clear()
    batch = maker(step)
    assert sorted(batch["skipped"]) == sorted(maker.skip_reasons)
    assert {r: int(n) for r, n in batch["skipped"].items() if n} == \
        {r: raised.count(r) for r in set(raised)}
    for r, n in batch["skipped"].items():
      totals[r] += int(n)
    real = batch["segment_ids"] > 0
    assert real.any() and np.isfinite(batch["tokens"]).all()
  seen = {r for r, n in totals.items() if n}
  assert seen == set(filter(None, expected.values())) | {"not_finite"}


def test_latents_any_channels_crop_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  lat = rng.standard_normal((6, 5, 7, 8)).astype(np.float32)
  np.save(tmp_path / "a.npy", lat)
  np.savez(tmp_path / "b.npz", latents=lat[:, :4, :4], other=np.zeros(3))
  lat_nan = lat.copy()
  lat_nan[0, 0, 0, 0] = np.nan
  np.savez(tmp_path / "c.npz", lat_nan)
  np.savez(tmp_path / "d.npz", x=lat, y=lat)  # which array? neither is named latents
  c = folder_config(tmp_path, "latents", channels=8, frames=(2, 4), side=(4, 8),
                    aspect_ratios=(1.0,), seq_len=64)
  c.model.patch = (1, 2, 2)
  src = FolderSource.from_config(c, "latents")
  assert [e["skip"] for e in src.entries] == ["", "", "", "bad_shape"]
  for i, stored in ((0, lat), (1, lat[:, :4, :4])):
    v = src[i]["video"]
    T, H, W = src.video_size(i)
    assert v.shape == (T, H, W, 8) and 2 <= T <= 4 and H <= 4 and W <= 6
    # A crop of the stored values, never resampled.
    hits = [(t, y, x) for t in range(stored.shape[0] - T + 1)
            for y in range(stored.shape[1] - H + 1) for x in range(stored.shape[2] - W + 1)
            if np.array_equal(v, stored[t:t + T, y:y + H, x:x + W])]
    assert len(hits) == 1
  with pytest.raises(Skip, match="not_finite"):
    src[2]
  c.data.channels = 4
  with pytest.raises(ValueError, match="has 8 channels but data.channels=4: set data.channels=8"):
    FolderSource.from_config(c, "latents")
  c.data.channels = 8
  batch = pipeline.make_batch(c, 0)
  assert batch["tokens"].shape == (2, 64, tok.token_dim(c.model.patch, 8))
  assert batch["skipped"]["bad_shape"] + batch["skipped"]["not_finite"] > 0


def test_two_step_train_on_a_folder_reports_skips(video_folder, tmp_path, monkeypatch):
  import json

  from helpers import run_config
  from vdit_jax import metrics, trainer

  root, expected = video_folder
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda: 1e12)
  c = run_config(2, **{"data.source": "video_folder", "data.path": str(root),
                       "train.ckpt_every": 2})
  trainer.train(c, str(tmp_path / "run"))
  # Every file the scan could not use is named once, with its reason, in the workdir.
  listed = [json.loads(l) for l in open(tmp_path / "run" / "skipped.jsonl")]
  assert {os.path.basename(e["path"]): e["reason"] for e in listed} == \
      {name: reason for name, reason in expected.items() if reason}
  assert all(e["detail"] and os.path.isabs(e["path"]) for e in listed)
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in lines)
  skipped = {k: sum(m[k] for m in lines) for k in lines[0] if k.startswith("skipped_")}
  assert sorted(skipped) == sorted(f"skipped_{r}" for r in SKIP_REASONS)
  assert sum(skipped.values()) > 0


def test_new_configs_validate_and_make_batches(video_folder, tmp_path):
  from configs import digits, folder, latents

  root, _ = video_folder
  np.save(tmp_path / "l.npy", np.zeros((8, 16, 16, 4), np.float32))
  for module, path in ((digits, None), (folder, root), (latents, tmp_path)):
    c = module.get_config()
    if path is not None:
      c.data.path = str(path)
    base.validate(c)
    if module is not folder:  # folder's 8 frames at stride 2 are longer than the fixtures
      maker = pipeline.BatchMaker(c)
      a, b = maker(3), maker(3)
      assert a.keys() == b.keys() and np.array_equal(a["tokens"], b["tokens"])
      assert (a["segment_ids"] > 0).any()


# Forks of this process that run Python in the child before exec (os.fork, or subprocess with a
# preexec_fn): unsafe beside jax's threads. subprocess without preexec_fn runs none.
_FORKS = {"counting": False, "count": 0}


def _count_fork():
  if _FORKS["counting"]:
    _FORKS["count"] += 1


os.register_at_fork(before=_count_fork)


class JaxComputing:
  """A jitted computation run in a loop on a background thread (XLA's threads busy) while the
  block is open, as in training."""

  def __enter__(self):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.tanh(a @ a) * 0.5)  # 0.27 GFLOP: about 2 ms on XLA's threads
    x = jnp.ones((512, 512), jnp.float32)
    f(x).block_until_ready()
    self.stop, self.steps = threading.Event(), 0

    def loop():
      y = x
      while not self.stop.is_set():
        y = f(y).block_until_ready()
        self.steps += 1

    self.thread = threading.Thread(target=loop, name="jax-computing")
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.stop.set()
    self.thread.join()


def test_folder_items_from_threads_beside_jax_stay_fast(tmp_path):
  """Items read from 4 threads at once, while jax computes on its own threads, take at most a
  few times as long as the same items read from one thread (decode and resize use one core per
  item: no processes, no BLAS thread pools fighting over the cores), are the same items, and
  nothing forked the process. Four formats, 120 items per timing, two rounds."""
  t, y, x = np.meshgrid(np.arange(24), np.arange(32), np.arange(48), indexing="ij")
  root = tmp_path / "clips"
  root.mkdir()
  _FORKS.update(counting=True, count=0)
  try:
    import imageio.v2 as imageio
    for i in range(3):
      wave = np.sin((x + 2 * t + 3 * i) / 5.0) + np.cos((y - t + i) / 4.0)
      v = (np.stack([wave, wave[:, ::-1], wave[:, :, ::-1]], -1) * 60 + 128).astype(np.uint8)
      video_io.encode(str(root / f"{i}.mp4"), v, 8, "libx264")
      video_io.encode(str(root / f"{i}.webm"), v, 8, "libvpx-vp9", {"crf": "30", "b": "0"})
      imageio.mimwrite(root / f"{i}.gif", list(v), duration=125, loop=0)
      np.save(root / f"{i}.npy", v)
    from configs import folder
    c = folder.get_config()
    c.unlock()
    c.data.path = str(root)
    src = FolderSource.from_config(c, "video_folder")
    assert not any(e["skip"] for e in src.entries) and len(src) == 12
    indices = [i % len(src) for i in range(120)]
    alone = {i: src[i]["video"] for i in range(len(src))}

    def read(threads):
      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        items = list(pool.map(src.__getitem__, indices))
      return time.perf_counter() - t0, items

    times = {1: [], 4: []}
    with JaxComputing() as jax_loop:
      for _ in range(2):
        for threads in (1, 4):
          seconds, items = read(threads)
          times[threads].append(seconds)
          for i, item in zip(indices, items):
            assert np.array_equal(item["video"], alone[i])
    assert jax_loop.steps > 0
    video_io.write_video(str(tmp_path / "out" / "v"), alone[0])
  finally:
    _FORKS["counting"] = False
  assert _FORKS["count"] == 0, "reading or writing videos forked the process"
  assert min(times[4]) <= 3 * min(times[1]), times
