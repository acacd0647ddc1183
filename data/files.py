"""File sources: ``video_folder`` (mp4 / webm / gif / npy) and ``latents`` (npy / npz arrays).

Both read a folder (or a JSONL manifest of ``{"path", "caption", "label", "label_name"}`` lines,
paths relative to the folder) and share one scan, one size rule and one way of skipping bad files.
A label is an id ``0..model.num_classes - 1`` (none: the null label, unconditional); the
optional ``label_name`` names it, so ``sample.py --labels`` takes the name as well as the id
(``data.labels``): one name per id, one id per name, and no name that is a number.

Scan (once, at start-up): each file's header is probed for ``(frames, H, W)`` without decoding
(npy/npz array headers, mp4/webm/gif container headers through PyAV). A file that cannot be
used is kept in the index with the reason, so the pipeline counts it each time it is drawn and
reports it with the batch, and the run goes on: ``unreadable``, ``empty`` (0 bytes),
``truncated`` (less data than the header promises; for mp4 and webm, a file the decoder
rejects whose container declares more bytes than it holds), ``no_frames``, ``too_small`` (under
``_MIN_SIDE`` pixels, or under one patch for latents), ``absurd_size`` (a header over
``_MAX_PIXELS`` per frame or ``_MAX_FRAMES``), ``too_short`` (fewer than ``data.frames[0]``
frames at ``data.frame_stride``), ``bad_shape`` (an array that is not ``[T, H, W, C]``),
``bad_dtype`` (an array neither uint8 pixels nor floats).

Precomputed caption embeddings (``model.caption.mode = "embeddings"``): an entry's
``"caption_embedding"`` (a path relative to the folder) or, without one, the file beside the
video named ``<video name without extension>.caption.npy``, a float array ``[n, E]`` (one row per
caption token, from any text encoder). Such side files are never taken for videos or latents.
A video without one trains with the null caption; one that cannot be used (not a finite
float array of width ``model.caption.embed_dim``, or more rows than ``model.caption.length``)
is skipped as ``bad_caption``.
Loading can still find ``not_finite`` (NaN or inf values), ``truncated`` (fewer frames decode
than the header said) and ``unreadable``; those raise ``Skip`` and the pipeline drops the video
from its batch. A channel count other than ``data.channels`` is a config mistake, not a bad
file: it raises.

Size (NaViT style, the rule of ``data.motion``): per index, frames are drawn from
``data.frames`` (at most what the file has), ``sqrt(H*W)`` from ``data.side``, and the file's
W/H is snapped to the nearest of ``data.aspect_ratios``, so every video stays inside the
config's token budget and attention layouts. ``video_folder`` resizes to cover that size
(antialiased linear filter, aspect kept) and centre-crops the sliver the snapping leaves;
``latents`` never resample (values of a VAE's latent space do not interpolate meaningfully):
they are randomly cropped, and shrink to the stored size when that is smaller. Item ``i`` is a
pure function of ``(seed, i)``: the frame window and crop are drawn from
``np.random.default_rng([seed, i])``.

Threads: an item is decoded (PyAV, one decoder thread) and resized (gathered taps, elementwise
numpy, no BLAS) in the calling thread, on one core and without starting a process, so items can
be read from several threads at once (grain's prefetch thread, the scan's pool).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import zipfile
from collections import Counter
from typing import Any

import numpy as np

from data import motion
from vdit_jax import tokens as tok
from vdit_jax import video_io

SKIP_REASONS = ("unreadable", "empty", "truncated", "no_frames", "too_small", "absurd_size",
                "too_short", "bad_shape", "bad_dtype", "not_finite", "bad_caption")
CAPTION_SUFFIX = ".caption.npy"
VIDEO_EXTS = (".mp4", ".webm", ".gif", ".npy")
LATENT_EXTS = (".npy", ".npz")
_MIN_SIDE = 4  # pixels: smaller videos hold nothing worth upscaling
_MAX_PIXELS = 1 << 28  # per frame (16384 x 16384): larger headers are corrupt or not videos
_MAX_FRAMES = 10_000_000
_LISTED_SKIPS = 20  # unusable files named on stderr at start-up; skipped.jsonl has every one
_SCAN_THREADS = 8


class Skip(Exception):
  """A file that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# ----------------------------------------------------------------------------- probing


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read(f)
  if fortran:
    raise Skip("bad_shape", "Fortran-ordered array")
  return tuple(int(s) for s in shape), dtype


def _npz_key(names: list[str]) -> str:
  """The array of an npz to use: its only one, or the one named ``latents``."""
  if len(names) == 1:
    return names[0]
  if "latents" in names:
    return "latents"
  raise Skip("bad_shape", f"an npz needs one array or one named 'latents', found {names}")


def _probe_array(path: str) -> tuple[int, int, int, int]:
  """``(frames, H, W, C)`` from an npy/npz header; raises Skip for broken or truncated files."""
  if path.endswith(".npz"):
    with zipfile.ZipFile(path) as z:
      key = _npz_key([n[:-4] for n in z.namelist() if n.endswith(".npy")])
      info = z.getinfo(key + ".npy")
      with z.open(info) as f:
        shape, dtype = _npy_header(f)
        header = f.tell()
      expected, stored = header + math.prod(shape) * dtype.itemsize, info.file_size
  else:
    with open(path, "rb") as f:
      shape, dtype = _npy_header(f)
      header = f.tell()
    expected, stored = header + math.prod(shape) * dtype.itemsize, os.path.getsize(path)
  if len(shape) != 4:
    raise Skip("bad_shape", f"shape {shape} is not [T, H, W, C]")
  # Pixels are uint8 (0..255), values floats; anything else (bool, other integers, complex,
  # objects) would be cast into numbers that mean something else.
  if dtype != np.uint8 and dtype.kind != "f":
    raise Skip("bad_dtype", f"dtype {dtype} is neither uint8 pixels nor floats")
  _check_dims(*shape[:3])
  if stored < expected:
    raise Skip("truncated", f"{stored} bytes, the header needs {expected}")
  return shape  # type: ignore[return-value]


def _probe_video(path: str) -> tuple[int, int, int, int]:
  """``(frames, H, W, 3)`` of an mp4/webm/gif from its container's header."""
  n, h, w = video_io.probe(path)  # loading checks that this many frames really decode
  _check_dims(n, h, w)
  return n, h, w, 3


def _check_dims(n: int, h: int, w: int) -> None:
  if n > _MAX_FRAMES or h * w > _MAX_PIXELS or min(n, h, w) < 0:
    raise Skip("absurd_size", f"header says {n} frames of {h}x{w}")
  if n == 0:
    raise Skip("no_frames")
  if min(h, w) < 1:
    raise Skip("too_small", f"{h}x{w} pixels")


def _box_sizes_exceed(path: str) -> str | None:
  """Why ``path`` is cut short, from its container's own sizes, or None: an mp4 (ISO BMFF)
  whose top-level boxes declare more bytes than the file has, or a webm (EBML) whose Segment
  does. Consulted only after the decoder failed, to tell a cut file from a corrupt one."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(64)
    if head[4:8] == b"ftyp":
      pos = 0
      while pos + 8 <= size:
        f.seek(pos)
        box = f.read(16)
        n = int.from_bytes(box[:4], "big")
        if n == 1 and len(box) == 16:  # a 64-bit size follows the type
          n = int.from_bytes(box[8:16], "big")
        if n == 0:  # the box runs to the end of the file
          return None
        if n < 8 or not all(0x20 <= c < 0x7F for c in box[4:8]):
          return None  # not a box (sizes are >= 8, types four printable characters): corrupt
        if pos + n > size:
          return f"box {box[4:8]!r} at byte {pos} needs {n} bytes, the file has {size - pos}"
        pos += n
      return None
    if head[:4] == b"\x1a\x45\xdf\xa3":
      pos = 0
      for expected in (b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67"):  # EBML header, Segment
        f.seek(pos)
        ident = f.read(4)
        if ident != expected:
          return None
        first = f.read(1)
        if not first or first[0] == 0:
          return None
        width = 9 - first[0].bit_length()  # EBML's variable-length size
        value = first[0] & (0xFF >> width)
        for b in f.read(width - 1):
          value = (value << 8) | b
        if value == (1 << (7 * width)) - 1:  # "unknown size" (a live stream)
          return None
        pos = pos + 4 + width + value
        if pos > size:
          return f"element {ident.hex()} ends at byte {pos}, the file has {size}"
  return None


def _unreadable_or_truncated(path: str, e: Exception) -> Skip:
  """The Skip for a file its decoder rejected: ``truncated`` if the container says it was cut."""
  try:
    cut = _box_sizes_exceed(path)
  except OSError:
    cut = None
  if cut:
    return Skip("truncated", f"{cut} ({type(e).__name__}: {e})")
  return Skip("unreadable", f"{type(e).__name__}: {e}")


def probe(path: str) -> tuple[int, int, int, int]:
  """``(frames, H, W, C)`` of a file from its header; raises Skip(reason) if it is unusable."""
  try:
    if os.path.getsize(path) == 0:
      raise Skip("empty")
    if path.endswith((".npy", ".npz")):
      return _probe_array(path)
    return _probe_video(path)
  except Skip:
    raise
  except Exception as e:  # noqa: BLE001 - any decoder error: cut short, or unreadable
    raise _unreadable_or_truncated(path, e) from e


# ----------------------------------------------------------------------------- loading


def _read_frames(path: str, start: int, count: int, stride: int) -> np.ndarray:
  """Frames ``start, start + stride, ...`` (``count`` of them) as stored: uint8 or float."""
  last = start + (count - 1) * stride
  if path.endswith(".npy"):
    return np.array(np.load(path, mmap_mode="r")[start:last + 1:stride])
  if path.endswith(".npz"):
    with np.load(path) as z:
      return np.asarray(z[_npz_key(z.files)][start:last + 1:stride])
  return video_io.read_frames(path, start, count, stride)  # mp4, webm, gif: RGB


def _resample_taps(n_in: int, n_out: int, scale: float,
                   offset: float) -> tuple[np.ndarray, np.ndarray]:
  """An antialiased linear resize by ``scale`` along one axis, output shifted by ``offset`` output
  pixels (a crop), as ``(index [n_out, K], weight [n_out, K])``: output pixel ``o`` is
  ``sum_k weight[o, k] * input[index[o, k]]``. Weights sum to 1 over k.

  The tent reaches one input pixel to either side when enlarging and ``1 / scale`` when
  shrinking, so no input pixel is skipped; K is the most input pixels one tent covers.
  """
  u_O = (np.arange(n_out) + 0.5 + offset) / scale - 0.5  # input coordinate of each output pixel
  radius = max(1.0, 1.0 / scale)
  # The tent is non-zero on the open interval (u - radius, u + radius): at most ceil(2 radius)
  # integers, the first of them floor(u - radius) + 1; one more covers rounding.
  first_O = np.floor(u_O - radius).astype(np.int64) + 1
  i_OK = first_O[:, None] + np.arange(int(math.ceil(2 * radius)) + 1)
  w_OK = np.maximum(0.0, 1.0 - np.abs(u_O[:, None] - i_OK) / radius)
  w_OK[(i_OK < 0) | (i_OK >= n_in)] = 0.0
  keep = w_OK.any(0)  # drops the taps that are zero for every output pixel
  i_OK, w_OK = np.clip(i_OK[:, keep], 0, n_in - 1), w_OK[:, keep]
  return i_OK, (w_OK / w_OK.sum(1, keepdims=True)).astype(np.float32)


def _resample_axis(x: np.ndarray, axis: int, index_OK: np.ndarray,
                   weight_OK: np.ndarray) -> np.ndarray:
  """``x`` resampled along ``axis`` by ``_resample_taps``'s taps, as float32.

  Elementwise numpy and unoptimised ``np.einsum`` (its own loops), all in the calling thread. A
  resampling matrix would be a BLAS matmul: BLAS runs it on its own thread pool, and several
  threads calling it at once make the pools fight over the cores (and the matrix is mostly zeros
  when shrinking). Python loops over the taps or over the outputs, whichever are fewer.
  """
  n_out, K = index_OK.shape
  if K <= n_out:  # narrow tents (enlarging, mild shrinking): a weighted sum of K gathered slices
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.take(x, index_OK[:, 0], axis=axis) * weight_OK[:, 0].reshape(shape)
    for k in range(1, K):
      out += np.take(x, index_OK[:, k], axis=axis) * weight_OK[:, k].reshape(shape)
    return out
  # Wide tents (shrinking a lot): each output is a contraction of its K input slices.
  x_I = np.moveaxis(x, axis, 0)
  out_O = np.empty((n_out,) + x_I.shape[1:], np.float32)
  for o in range(n_out):
    out_O[o] = np.einsum("k,k...->...", weight_OK[o], x_I[index_OK[o]])
  return np.moveaxis(out_O, 0, axis)


def resize_cover(video_THWC: np.ndarray, H: int, W: int) -> np.ndarray:
  """Resizes to cover ``H x W`` with the aspect ratio kept, then crops the centre (float32).

  Separable: rows first (contiguous slices of the input), then columns on the H rows left.
  """
  _, h, w, _ = video_THWC.shape
  scale = max(H / h, W / w)
  rows = _resample_taps(h, H, scale, 0.5 * (h * scale - H))
  cols = _resample_taps(w, W, scale, 0.5 * (w * scale - W))
  return np.ascontiguousarray(_resample_axis(_resample_axis(video_THWC, 1, *rows), 2, *cols))


# ----------------------------------------------------------------------------- the source


def read_manifest(folder: str, manifest: str) -> list[dict[str, Any]]:
  """Entries ``{"path", "caption", "label", "label_name"}``: the manifest's lines, or the folder's
  files. Only the manifest is read."""
  if not manifest:
    return [{"path": os.path.join(folder, n)} for n in sorted(os.listdir(folder))]
  entries = []
  with open(manifest) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        path = entry["path"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest} line {line_no}: {line.strip()[:80]!r} is not a JSON object "
                         'with a "path" (and optional "caption", "label", "label_name")') from e
      for field in ("path", "caption_embedding"):
        value = entry.get(field)
        if field in entry and not (isinstance(value, str) and value.strip()):
          raise ValueError(f"{manifest} line {line_no}: \"{field}\" is {value!r}; give a file "
                           "path relative to the folder, as a string")
      entries.append({**entry, "path": os.path.join(folder, path)})
  return entries


def label_names(entries: list[dict[str, Any]], num_classes: int) -> dict[int, str]:
  """``{label: name}`` from the entries' ``label_name`` fields; raises on a label out of range,
  a name that is a number, two names for one label or one name for two labels."""
  names: dict[int, str] = {}
  owners: dict[str, int] = {}
  for e in entries:
    label = _label_id(e, num_classes)
    if "label_name" not in e:
      continue
    name = " ".join(str(e["label_name"]).split())
    if label == num_classes or not name or name.isdigit() or name.lower() == "unconditional":
      raise ValueError(f"{e['path']}: label_name {e['label_name']!r} needs a \"label\" id and a "
                       "name that is not empty, a number or 'unconditional'")
    if names.setdefault(label, name) != name:
      raise ValueError(f"{e['path']}: label {label} is named {name!r} here and {names[label]!r} "
                       "elsewhere in the manifest: give each label one name")
    if owners.setdefault(name.lower(), label) != label:
      raise ValueError(f"{e['path']}: label_name {name!r} names labels {owners[name.lower()]} and "
                       f"{label}: give each label its own name")
  return names


def _label_id(entry: dict[str, Any], num_classes: int) -> int:
  """The entry's label id, ``num_classes`` (the null label) when it gives none."""
  label = entry.get("label")
  if label is None:
    return num_classes
  try:
    value = int(label)
    whole = not isinstance(label, bool) and value == float(label)
  except (TypeError, ValueError):
    whole = False
  if not whole or not 0 <= value <= num_classes:
    raise ValueError(f"{entry['path']}: label {label!r} is out of range: use an id "
                     f"0..{num_classes - 1} (a name goes in \"label_name\"; leave both out for "
                     "unconditional) or raise model.num_classes")
  return value


class FolderSource:
  """Random-access source over the files of a folder; see the module docstring.

  Items: ``video`` f32 ``[T, H, W, C]`` (uint8 files are mapped from 0..255 to [-1, 1]; float
  arrays are taken as stored, so npy videos should already be in [-1, 1]), ``label`` int
  (``model.num_classes``, the null label, when the manifest gives none), ``caption`` str and
  ``path``.
  """

  def __init__(self, *, kind: str, path: str, manifest: str, frames, side, aspect_ratios,
               frame_stride: int, patch, channels: int, seed: int, num_classes: int,
               caption_embed_dim: int = 0, caption_length: int = 0, verbose: bool = True):
    """``caption_embed_dim``: E of the caption embeddings items carry (0 = none are read);
    ``caption_length``: the most rows one may have (``model.caption.length``)."""
    if kind not in ("video_folder", "latents"):
      raise ValueError(f"unknown file source kind {kind!r}: use video_folder or latents")
    if not path or not os.path.isdir(path):
      raise ValueError(f"data.path={path!r} is not a directory: point it at the folder of "
                       f"{'videos' if kind == 'video_folder' else 'npy/npz arrays'}")
    if kind == "video_folder" and int(channels) != 3:
      raise ValueError(f"data.channels={channels}: video_folder decodes RGB, so set "
                       "data.channels=3 (use data.source=latents for other channel counts)")
    if int(frame_stride) < 1:
      raise ValueError(f"data.frame_stride={frame_stride} must be >= 1")
    motion.check_range("frames", frames)
    motion.check_range("side", side)
    motion.check_aspect_ratios(aspect_ratios)
    self.kind = kind
    self.frames = tuple(int(v) for v in frames)
    self.side = tuple(float(v) for v in side)
    self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
    self.stride = int(frame_stride)
    self.patch = tuple(int(p) for p in patch)
    self.channels = int(channels)
    self.seed = int(seed)
    self.null_label = int(num_classes)
    self.skip_reasons = SKIP_REASONS
    exts = VIDEO_EXTS if kind == "video_folder" else LATENT_EXTS
    self.caption_embed_dim = int(caption_embed_dim)
    self.caption_length = int(caption_length)
    self.entries = [e for e in read_manifest(path, manifest)
                    if e["path"].lower().endswith(exts)
                    and not e["path"].lower().endswith(CAPTION_SUFFIX)]
    for e in self.entries:
      e["path"] = os.path.abspath(e["path"])
      e["label"] = _label_id(e, self.null_label)
      e["caption"] = str(e.get("caption", ""))
      if e.get("caption_embedding"):
        e["caption_embedding"] = os.path.join(path, str(e["caption_embedding"]))
      else:
        side = os.path.splitext(e["path"])[0] + CAPTION_SUFFIX
        e["caption_embedding"] = side if os.path.isfile(side) else ""
    label_names(self.entries, self.null_label)  # checked at start-up, used by data.labels
    # Probes mostly wait on file reads, so threads overlap them.
    with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
      scans = list(pool.map(self._scan, [e["path"] for e in self.entries]))
    for e, (shape, skip, detail) in zip(self.entries, scans):
      # The reason counts; the detail (the probe's message) says what exactly went wrong.
      e["shape"], e["skip"], e["skip_detail"] = shape, skip, detail
    counts = Counter(e["skip"] for e in self.entries if e["skip"])
    usable = len(self.entries) - sum(counts.values())
    if not usable:
      raise ValueError(f"no usable {kind} files among {len(self.entries)} in {path}"
                       f"{' (manifest ' + manifest + ')' if manifest else ''} with extensions "
                       f"{', '.join(exts)}; skipped: {dict(counts) or 'none'}")
    if counts and verbose:
      print(f"{kind}: {usable} of {len(self.entries)} files in {path} are usable; skipped: "
            + ", ".join(f"{r} {n}" for r, n in sorted(counts.items())), file=sys.stderr)
      skipped = self.skipped()
      for e in skipped[:_LISTED_SKIPS]:
        print(f"  skipped {e['path']} ({e['reason']}): {e['detail']}", file=sys.stderr)
      if len(skipped) > _LISTED_SKIPS:
        print(f"  ... and {len(skipped) - _LISTED_SKIPS} more (a training run lists them all in "
              "skipped.jsonl in its workdir)", file=sys.stderr)

  def skipped(self) -> list[dict[str, str]]:
    """``{"path", "reason", "detail"}`` of each file the scan found unusable, in index order.
    (Files that fail only when loaded are counted per batch, not listed here.)"""
    return [{"path": e["path"], "reason": e["skip"], "detail": e["skip_detail"]}
            for e in self.entries if e["skip"]]

  @classmethod
  def from_config(cls, config, kind: str) -> "FolderSource":
    d = config.data
    return cls(kind=kind, path=d.path, manifest=d.manifest, frames=d.frames, side=d.side,
               aspect_ratios=d.aspect_ratios, frame_stride=d.frame_stride,
               patch=config.model.patch, channels=d.channels, seed=config.seed,
               num_classes=config.model.num_classes,
               caption_embed_dim=(config.model.caption.embed_dim
                                  if config.model.caption.mode == "embeddings" else 0),
               caption_length=config.model.caption.length)

  def _scan(self, path: str) -> tuple[tuple[int, int, int] | None, str, str]:
    """``(size, skip reason, detail)``: the reason is empty for a usable file."""
    try:
      n, h, w, c = probe(path)
    except Skip as e:
      return None, e.reason, str(e)
    if c != self.channels:
      raise ValueError(f"{path} has {c} channels but data.channels={self.channels}: set "
                       f"data.channels={c}, or keep one channel count per folder")
    if self.kind == "video_folder" and min(h, w) < _MIN_SIDE:
      return None, "too_small", f"{h}x{w} pixels, under {_MIN_SIDE}"
    if self.kind == "latents" and (h < self.patch[1] or w < self.patch[2]):
      return None, "too_small", f"{h}x{w} latents, under the patch {self.patch[1:]}"
    if (n - 1) // self.stride + 1 < self.frames[0]:
      return None, "too_short", f"{n} frames at stride {self.stride}"
    return (n, h, w), "", ""

  def __len__(self) -> int:
    return len(self.entries)

  def caption_vocabulary(self) -> tuple[list[str], int]:
    """Every word of the entries' captions and the most words one has (data.captions)."""
    from vdit_jax import text
    words = [text.words_of(e["caption"]) for e in self.entries if not e["skip"]]
    return sorted({w for ws in words for w in ws}), max(map(len, words), default=0)

  def _caption_embedding(self, entry: dict[str, Any]) -> np.ndarray | None:
    """The entry's caption embedding ``[n, E]`` float32, None without one; Skip if unusable."""
    path = entry["caption_embedding"]
    if not path:
      return None
    try:
      emb = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - missing, truncated or not an npy file
      raise Skip("bad_caption", f"{path}: {type(e).__name__}: {e}") from e
    if (emb.ndim != 2 or emb.shape[1] != self.caption_embed_dim or emb.dtype.kind != "f"
        or not np.isfinite(emb).all()):
      raise Skip("bad_caption", f"{path}: {emb.dtype} array of shape {emb.shape}, expected "
                 f"finite floats [tokens, {self.caption_embed_dim}] (model.caption.embed_dim)")
    if self.caption_length and len(emb) > self.caption_length:
      raise Skip("bad_caption", f"{path}: {len(emb)} caption tokens but model.caption.length="
                 f"{self.caption_length}: raise it to {len(emb)}, or store the caption without "
                 "its padding rows")
    return emb.astype(np.float32)

  def largest_video(self) -> tuple[int, int, int]:
    """An upper bound of every ``video_size``: sizes follow the config's ranges."""
    return motion.largest_size(self.frames, self.side, self.aspect_ratios, self.patch)

  def _plan(self, index: int) -> tuple[tuple[int, int, int], int, tuple[int, int]]:
    """``((T, H, W), first frame, (y, x) crop offset for latents)`` of item ``index``."""
    entry = self.entries[int(index)]
    if entry["skip"]:
      raise Skip(entry["skip"], f"{entry['path']}: {entry['skip_detail']}")
    n, h, w = entry["shape"]
    rng = np.random.default_rng([self.seed, int(index)])
    available = (n - 1) // self.stride + 1
    t = min(int(rng.integers(self.frames[0], self.frames[1] + 1)), available)
    aspect = motion.nearest_aspect(w / h, self.aspect_ratios)
    T, H, W = tok.video_size(t, rng.uniform(*self.side), aspect, self.patch)
    if self.kind == "latents":  # crop, never upsample: at most the stored size
      H = min(H, h // self.patch[1] * self.patch[1])
      W = min(W, w // self.patch[2] * self.patch[2])
    start = int(rng.integers(0, n - (T - 1) * self.stride))
    crop = (int(rng.integers(0, h - H + 1)), int(rng.integers(0, w - W + 1))) \
        if self.kind == "latents" else (0, 0)
    return (T, H, W), start, crop

  def video_size(self, index: int) -> tuple[int, int, int]:
    """``(T, H, W)`` of item ``index`` from the scan alone; raises Skip for unusable files."""
    return self._plan(index)[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    (T, H, W), start, (y, x) = self._plan(index)
    entry = self.entries[int(index)]
    try:
      raw = _read_frames(entry["path"], start, T, self.stride)
    except Exception as e:  # noqa: BLE001 - a file that changed or lied about its contents
      skip = _unreadable_or_truncated(entry["path"], e)
      raise Skip(skip.reason, f"{entry['path']}: {skip.detail}") from e
    if raw.shape[0] < T:
      raise Skip("truncated", f"{entry['path']}: {raw.shape[0]} of {T} frames decode")
    if raw.dtype != np.uint8:
      raw = raw.astype(np.float32, copy=False)
      if not np.isfinite(raw).all():
        raise Skip("not_finite", entry["path"])
    if self.kind == "latents":
      video = raw[:, y:y + H, x:x + W]
    else:
      # Resized as stored (uint8 stays uint8 until the weighted sum); the resize's weights sum
      # to 1, so mapping 0..255 to [-1, 1] afterwards gives the same values on fewer pixels.
      video = resize_cover(raw, H, W)
    if raw.dtype == np.uint8:
      video = video / np.float32(127.5) - np.float32(1.0)
    item = {"video": video, "label": entry["label"], "caption": entry["caption"],
            "path": entry["path"]}
    if self.caption_embed_dim:
      emb = self._caption_embedding(entry)
      if emb is not None:
        item["caption_embedding"] = emb
    return item
