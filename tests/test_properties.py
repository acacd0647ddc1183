"""Property-based tests of bad input (hypothesis): whatever a data file holds (npy, mp4, webm),
or however it is cut, reading it gives a clean video, or a skip counted under a known reason,
never a crash or a silent wrong array; any manifest builds its source or fails naming its line
or field; and malformed video shapes for sample.py are refused by name.
``VDIT_JAX_PROPERTY_EXAMPLES`` sets the examples per property (40 here, as in CI)."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.files import SKIP_REASONS, FolderSource, Skip
from tests.test_data import tiny_config
from vdit_jax import sampler

PROPERTY = settings(max_examples=int(os.environ.get("VDIT_JAX_PROPERTY_EXAMPLES", 40)),
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["uint8", "int16", "float16", "float32", "float64", "bool", "complex64"]


@st.composite
def arrays(draw):
  """Arrays of any rank 0-5 and small sides (channels 3 or not), of many dtypes, with NaN or
  inf sprinkled into float ones."""
  shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=5)))
  if len(shape) == 4 and draw(st.booleans()):
    shape = shape[:3] + (3,)
  dtype = np.dtype(draw(st.sampled_from(DTYPES)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  a = (rng.uniform(-1.5, 1.5, shape) * (255 if dtype.kind in "ui" else 1)).astype(dtype)
  if dtype.kind == "f" and a.size and draw(st.booleans()):
    a.flat[rng.integers(a.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  return a


def check_file(folder: str, name: str) -> None:
  """The scan's verdict on ``name`` and, if usable, reading every item: clean or a Skip."""
  src = FolderSource.from_config(tiny_config(source="video_folder", path=folder),
                                 "video_folder")
  (i,) = [k for k, e in enumerate(src.entries) if e["path"].endswith(name)]
  entry = src.entries[i]
  if entry["skip"]:
    assert entry["skip"] in SKIP_REASONS
    return
  try:
    item = src[i]
  except Skip as e:
    assert e.reason in SKIP_REASONS
    return
  video = item["video"]
  assert video.ndim == 4 and video.shape[-1] == 3 and video.dtype == np.float32
  assert np.isfinite(video).all()


def good_folder() -> str:
  """A folder with one usable video, so the source always builds."""
  folder = tempfile.mkdtemp()
  rng = np.random.default_rng(0)
  np.save(os.path.join(folder, "good.npy"), rng.integers(0, 256, (4, 16, 16, 3), np.uint8))
  return folder


@PROPERTY
@given(a=arrays())
def test_any_npy_is_read_clean_or_skipped_by_reason(a):
  folder = good_folder()
  np.save(os.path.join(folder, "x.npy"), a, allow_pickle=False)
  try:
    check_file(folder, "x.npy")
  except ValueError as e:  # a clean file of another channel count: a config mistake
    assert a.ndim == 4 and a.shape[-1] != 3 and "channels" in str(e), e


@PROPERTY
@given(cut=st.floats(0.0, 1.0), garbage=st.binary(max_size=64), at=st.floats(0.0, 1.0))
def test_cut_or_overwritten_files_are_skipped_by_reason(cut, garbage, at):
  folder = good_folder()
  data = open(os.path.join(folder, "good.npy"), "rb").read()
  n = int(cut * len(data))
  pos = int(at * n)
  with open(os.path.join(folder, "x.npy"), "wb") as f:
    f.write((data[:pos] + garbage + data[pos + len(garbage):])[:n])
  check_file(folder, "x.npy")


def test_an_object_array_is_never_unpickled():
  folder = good_folder()
  np.save(os.path.join(folder, "x.npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
  src = FolderSource.from_config(tiny_config(source="video_folder", path=folder),
                                 "video_folder")
  (entry,) = [e for e in src.entries if e["path"].endswith("x.npy")]
  assert entry["skip"] == "bad_shape"  # rank 1, before its dtype is looked at


@pytest.mark.parametrize("dtype", ["bool", "int16", "complex64", "object"])
def test_arrays_that_are_not_pixels_or_floats_are_bad_dtype(dtype):
  """Cast to floats they would be other numbers (complex loses its imaginary part, int16 is not
  0..255 pixels): skipped as bad_dtype, never read."""
  folder = good_folder()
  a = np.ones((4, 16, 16, 3), dtype)
  np.save(os.path.join(folder, "x.npy"), a, allow_pickle=dtype == "object")
  src = FolderSource.from_config(tiny_config(source="video_folder", path=folder),
                                 "video_folder")
  (entry,) = [e for e in src.entries if e["path"].endswith("x.npy")]
  assert entry["skip"] == "bad_dtype", entry


@PROPERTY
@given(text=st.text(alphabet="0123456789x, -.", max_size=30))
def test_malformed_sample_shapes_are_refused_by_name(text):
  """Any --shapes text parses into positive T x H x W triples the patch checks, or is refused
  with an error that quotes it, before anything compiles."""
  try:
    grids = sampler.check_shapes(sampler.parse_shapes(text), (1, 4, 4))
  except ValueError as e:  # names what is wrong and what to use
    assert ("shape" in str(e) or "size" in str(e)) and ("use" in str(e) or "e.g." in str(e)), e
    return
  assert grids and all(min(g) > 0 for g in grids)


_MP4 = {}


def good_video_bytes(ext: str) -> bytes:
  """A small valid mp4 or webm, encoded once per process."""
  if ext not in _MP4:
    from vdit_jax import video_io
    path = os.path.join(tempfile.mkdtemp(), f"v.{ext}")
    frames = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), np.uint8)
    video_io.encode(path, frames, 8, codec="libx264" if ext == "mp4" else "libvpx-vp9")
    _MP4[ext] = open(path, "rb").read()
  return _MP4[ext]


@PROPERTY
@given(ext=st.sampled_from(["mp4", "webm"]), cut=st.floats(0.0, 1.0),
       garbage=st.binary(max_size=64), at=st.floats(0.0, 1.0))
def test_cut_or_overwritten_containers_are_read_or_skipped_by_reason(ext, cut, garbage, at):
  """An mp4 or webm cut short or overwritten anywhere (header, index or frames) decodes to a
  clean video or is skipped under a known reason: never a crash, a hang or NaN pixels."""
  data = good_video_bytes(ext)
  folder = good_folder()
  n = int(cut * len(data))
  pos = int(at * n)
  with open(os.path.join(folder, f"x.{ext}"), "wb") as f:
    f.write((data[:pos] + garbage + data[pos + len(garbage):])[:n])
  check_file(folder, f"x.{ext}")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)


@PROPERTY
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"path": st.sampled_from(["good.npy", "missing.npy", "good"]) | JSON},
                          optional={"caption": JSON, "label": JSON, "label_name": JSON}),
    JSON, st.text(max_size=12)), min_size=1, max_size=4))
def test_malformed_manifests_build_or_fail_by_name(lines):
  """Any manifest: the source builds (its entries usable or skipped by reason), or a
  ValueError names the manifest line or field and what to write instead."""
  import json

  from data import labels
  folder = good_folder()
  manifest = os.path.join(folder, "m.jsonl")
  with open(manifest, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)).replace("\n", " ") + "\n")
  config = tiny_config(source="video_folder", path=folder, manifest=manifest)
  try:
    src = FolderSource.from_config(config, "video_folder")
    labels.label_set(config)
  except ValueError as e:
    message = str(e)
    assert ("manifest" in message or "label" in message or "path" in message
            or "usable" in message), message
    return
  assert all(e["skip"] in ("",) + SKIP_REASONS for e in src.entries)
  assert all(isinstance(e["caption"], str) for e in src.entries)
