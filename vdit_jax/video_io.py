"""Writing videos for people to look at: mp4 (H.264 via imageio-ffmpeg) and gif."""

from __future__ import annotations

import os
import warnings

import numpy as np


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
  import imageio.v2 as imageio

  # imageio-ffmpeg starts ffmpeg with fork+exec; the child execs at once, so JAX's warning
  # about forking a multithreaded process does not apply.
  warnings.filterwarnings("ignore", message="os.fork\\(\\) was called")

  frames = to_uint8(video)
  if upscale > 1:
    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = []
  for fmt in formats:
    path = f"{stem}.{fmt}"
    if fmt == "mp4":
      imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1, codec="libx264",
                       quality=8, pixelformat="yuv420p" if _even(frames) else "yuv444p")
    elif fmt == "gif":
      imageio.mimwrite(path, list(frames), duration=1000.0 / fps, loop=0)
    elif fmt == "npy":
      np.save(path, np.asarray(video, np.float32))
    else:
      raise ValueError(f"unknown video format {fmt!r}: use mp4, gif or npy")
    paths.append(path)
  return paths


def _even(frames: np.ndarray) -> bool:
  return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0


def read_video(path: str) -> np.ndarray:
  """All frames of a video file as uint8 ``[T, H, W, 3]``."""
  import imageio.v3 as iio
  return np.asarray(iio.imread(path, index=None))[..., :3]
