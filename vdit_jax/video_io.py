"""Reading and writing video files through PyAV (FFmpeg's libraries, in process): mp4, webm and
gif are read the same way; mp4 is written with H.264, gif through imageio (Pillow).

Everything runs in the calling thread: no ffmpeg process is started, so nothing forks the
(multithreaded) JAX process, and each decoder and encoder uses one thread, so reading from
several threads at once keeps one core per reader. (Pillow's gif decoder read no more gifs per
second from several threads than from one: bench/README.md.)
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

# x264's constant rate factor for written samples: high quality (0 is lossless, 23 x264's
# default).
_X264_CRF = "10"


def to_uint8(video: np.ndarray) -> np.ndarray:
  """``[T, H, W, C]`` in [-1, 1] -> uint8 RGB (1 channel is shown as grey, >3 keeps the first 3)."""
  v = np.asarray(video, np.float32)
  if v.ndim != 4:
    raise ValueError(f"expected a video [T, H, W, C], got shape {v.shape}")
  if v.shape[-1] == 1:
    v = np.repeat(v, 3, axis=-1)
  v = v[..., :3]
  return np.clip(np.round((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_video(stem: str, video: np.ndarray, fps: int = 8, upscale: int = 4,
                formats: tuple[str, ...] = ("mp4", "gif")) -> list[str]:
  """Writes ``stem.mp4`` and ``stem.gif`` (nearest-neighbour upscaled so small videos are visible).

  Returns the written paths.
  """
  frames = to_uint8(video)
  if upscale > 1:
    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = []
  for fmt in formats:
    path = f"{stem}.{fmt}"
    if fmt == "mp4":
      encode(path, frames, fps, "libx264", {"crf": _X264_CRF})
    elif fmt == "gif":
      import imageio.v2 as imageio
      imageio.mimwrite(path, list(frames), duration=1000.0 / fps, loop=0)
    elif fmt == "npy":
      np.save(path, np.asarray(video, np.float32))
    else:
      raise ValueError(f"unknown video format {fmt!r}: use mp4, gif or npy")
    paths.append(path)
  return paths


def contact_sheet(videos: list[np.ndarray], upscale: int = 4, gap: int = 2) -> np.ndarray:
  """One uint8 RGB image of ``videos`` (each ``[T, H, W, C]`` in [-1, 1]): frames across, one
  video per row, nearest-neighbour upscaled, ``gap`` black pixels between frames and rows;
  shorter or smaller videos leave the rest of their row black."""
  if not videos:
    raise ValueError("no videos for a contact sheet")
  frames = [to_uint8(v).repeat(upscale, axis=1).repeat(upscale, axis=2) for v in videos]
  width = max(f.shape[0] * (f.shape[2] + gap) for f in frames) - gap
  height = sum(f.shape[1] + gap for f in frames) - gap
  sheet = np.zeros((height, width, 3), np.uint8)
  top = 0
  for f in frames:
    t, h, w = f.shape[:3]
    for i in range(t):
      sheet[top:top + h, i * (w + gap):i * (w + gap) + w] = f[i]
    top += h + gap
  return sheet


def write_image(path: str, image: np.ndarray) -> str:
  """Writes a uint8 image (PNG for ``.png``) and returns its path."""
  import imageio.v2 as imageio
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  imageio.imwrite(path, image)
  return path


def encode(path: str, frames: np.ndarray, fps: int, codec: str = "libx264",
           options: dict[str, str] | None = None) -> None:
  """Encodes uint8 RGB ``frames [T, H, W, 3]`` into ``path`` (container from the extension).

  Chroma is subsampled (yuv420p) when H and W are even, else kept whole (yuv444p). ``options``
  are the codec's own (``{"crf": "30", "b": "0"}`` for constant-quality vp9).
  """
  import av

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"encode takes uint8 RGB frames [T, H, W, 3], got {frames.dtype} "
                     f"{frames.shape}: convert with to_uint8")
  _, h, w, _ = frames.shape
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps), options=dict(options or {}))
    stream.width, stream.height = w, h
    stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    stream.codec_context.thread_count = 1
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())  # what the encoder still holds


def probe(path: str) -> tuple[int, int, int]:
  """``(frames, H, W)`` of a video file's first video stream, from its header (no decoding).

  The frame count is the container's (mp4's index, gif's frames), else duration x frame rate
  (webm); ``read_frames`` returns what really decodes.
  """
  import av

  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f"{path} has no video stream")
    stream = container.streams.video[0]
    n = int(stream.frames)
    if n <= 0:
      rate = stream.average_rate or stream.guessed_rate
      if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
      elif container.duration is not None:
        seconds = container.duration / av.time_base
      else:
        seconds = None
      if not rate or seconds is None:
        raise ValueError(f"{path}: the header gives neither a frame count nor a duration and "
                         "frame rate")
      n = int(math.floor(seconds * float(rate) + 1e-6))
    return n, int(stream.codec_context.height), int(stream.codec_context.width)


def read_frames(path: str, start: int = 0, count: int | None = None,
                stride: int = 1) -> np.ndarray:
  """Decoded frames ``start, start + stride, ...`` (``count`` of them, or to the end) of a video
  file's first video stream as uint8 RGB ``[n, H, W, 3]``; fewer when fewer decode.

  Decoding stops after the last frame asked for.
  """
  import av

  last = None if count is None else start + (count - 1) * stride
  out = []
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # one core per reader (callers run in parallel)
    for i, frame in enumerate(container.decode(stream)):
      if last is not None and i > last:
        break
      if i >= start and (i - start) % stride == 0:
        out.append(frame.to_ndarray(format="rgb24"))
    h, w = stream.codec_context.height, stream.codec_context.width
  return np.stack(out) if out else np.zeros((0, h, w, 3), np.uint8)


def read_video(path: str) -> np.ndarray:
  """All frames of a video file (mp4, webm, gif) as uint8 RGB ``[T, H, W, 3]``."""
  return read_frames(path)


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


def read_init(path: str, frames: int, repeat: int = 1) -> np.ndarray:
  """The first ``frames`` frames of a video (mp4, webm, gif), an npy array ``[T, H, W, C]``
  (taken as stored, in [-1, 1]) or an image (one frame, repeated ``repeat`` times: a still
  first temporal patch), as f32 ``[frames, H, W, C]`` in [-1, 1]: the given frames of
  image-to-video and continuation. Raises, naming the path, if it cannot be read or has fewer
  frames."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--init_video {path!r} is not a file: give a video, npy or image")
  low = path.lower()
  try:
    if low.endswith(".npy"):
      video = np.load(path, allow_pickle=False)
      if video.ndim != 4 or video.dtype.kind != "f":
        raise ValueError(f"{path}: an npy init video must be float [T, H, W, C] in [-1, 1], "
                         f"got {video.dtype} {video.shape}")
      video = video.astype(np.float32)
    else:
      if low.endswith(IMAGE_EXTS):
        import imageio.v3 as iio
        image = np.asarray(iio.imread(path))
        image = image[..., None] if image.ndim == 2 else image[..., :3]
        raw = np.repeat(image[None], repeat, axis=0)
      else:
        raw = read_frames(path, 0, frames)
      video = raw.astype(np.float32) / 127.5 - 1.0
  except (OSError, ValueError) as e:
    raise ValueError(f"--init_video {path!r} cannot be read: {e}") from e
  if len(video) < frames:
    raise ValueError(f"--init_video {path!r} has {len(video)} frames, fewer than the {frames} "
                     "to give (--init_frames)")
  return video[:frames]
