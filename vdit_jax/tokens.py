"""The token contract: videos <-> spatiotemporal patch tokens, and packed rows.

A video ``[T, H, W, C]`` with patch ``(pt, ph, pw)`` becomes ``N = (T/pt)(H/ph)(W/pw)`` tokens
of size ``P = pt*ph*pw*C`` in t-major order; token ``n`` sits at grid coordinate ``(t, h, w)``
with ``n = (t*H' + h)*W' + w``. Inside a token the values are ordered ``(pt, ph, pw, C)``.

Packed batches hold several videos per fixed-length row of ``L`` tokens, back to back from
position 0: ``segment_ids [B, L]`` numbers each row's videos 1..S (0 = padding), ``coords
[B, L, 3]`` gives each token's ``(t, h, w)`` inside its own video, and per-video arrays
``seg_* [B, S, ...]`` (grid, label) are indexed by segment id - 1 (``pack_rows``). Attention
masks and RoPE are built from segment ids and coords alone, so the videos of a row never see
each other and any mix of sizes shares one compiled step.

Everything here is numpy (host side) except ``patchify``/``unpatchify``, which also have jax
versions for use inside jitted code. The data pipeline and the sampler both build packed
batches with ``pack_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Patch = tuple[int, int, int]
Grid = tuple[int, int, int]

_AXES = ("T", "H", "W")


def _nearest_valid(n: int, p: int) -> list[int]:
  lower = (n // p) * p
  upper = lower + p
  return [v for v in (lower, upper) if v > 0]


def check_patchable(thw: Sequence[int], patch: Sequence[int]) -> None:
  """Raises a ValueError naming the nearest valid sizes if ``thw`` does not divide by ``patch``."""
  if len(thw) != 3 or len(patch) != 3:
    raise ValueError(f"expected (T, H, W) and patch (pt, ph, pw), got {tuple(thw)} and {tuple(patch)}")
  for p in patch:
    if int(p) < 1:
      raise ValueError(f"patch sizes must be >= 1, got patch={tuple(patch)}")
  problems = []
  for name, n, p in zip(_AXES, thw, patch):
    if int(n) < 1 or int(n) % int(p):
      valid = " or ".join(str(v) for v in _nearest_valid(int(n), int(p)))
      problems.append(f"{name}={n} is not divisible by patch {p}: use {valid}")
  if problems:
    raise ValueError(f"video size {tuple(int(v) for v in thw)} does not fit patch "
                     f"{tuple(int(p) for p in patch)}: " + "; ".join(problems))


def grid_shape(thw: Sequence[int], patch: Sequence[int]) -> Grid:
  """The token grid ``(T', H', W')`` of a video of size ``thw``; raises if it does not divide."""
  check_patchable(thw, patch)
  return tuple(int(n) // int(p) for n, p in zip(thw, patch))  # type: ignore[return-value]


def video_size(frames: int, side: float, aspect: float, patch: Sequence[int]) -> tuple[int, int, int]:
  """``(T, H, W)`` of a video with ``sqrt(H*W) = side`` and ``W/H = aspect``, on the patch grid.

  T is rounded down to the temporal patch, H and W to the nearest patch multiple; each is at
  least one patch. Data sources and config checks share this rule, so budgets agree.
  """
  pt, ph, pw = (int(p) for p in patch)
  h = side / math.sqrt(aspect)
  w = side * math.sqrt(aspect)
  return (max(pt, int(frames) // pt * pt), max(ph, int(math.floor(h / ph + 0.5)) * ph),
          max(pw, int(math.floor(w / pw + 0.5)) * pw))


def largest_grids(max_frames: int, max_side: float, aspect_ratios: Sequence[float],
                  patch: Sequence[int]) -> list[Grid]:
  """Token grid of the largest video per aspect ratio that a data config can draw.

  Sizes grow with frames and side, so these bound every group size (video, frame, track).
  """
  return [grid_shape(video_size(max_frames, max_side, a, patch), patch) for a in aspect_ratios]


def possible_grids(frames: Sequence[int], side: Sequence[float], aspect_ratios: Sequence[float],
                   patch: Sequence[int]) -> list[Grid]:
  """Every token grid ``video_size`` gives for frames in ``[frames[0], frames[1]]`` (integers),
  ``side`` anywhere in ``[side[0], side[1]]`` and one of ``aspect_ratios``, sorted.

  H and W change only where ``side`` crosses a rounding point of either, so evaluating at those
  points, between consecutive ones and at both ends finds every (H, W) exactly.
  """
  pt, ph, pw = (int(p) for p in patch)
  lo, hi = float(side[0]), float(side[1])
  out = set()
  for a in aspect_ratios:
    r = math.sqrt(float(a))
    # h = side / r crosses k + 0.5 patches at side = (k + 0.5) * ph * r; likewise w.
    cuts = {lo, hi}
    for step in (ph * r, pw / r):
      k = math.floor(lo / step - 0.5)
      while (k + 0.5) * step <= hi:
        if (k + 0.5) * step >= lo:
          cuts.add((k + 0.5) * step)
        k += 1
    cuts = sorted(cuts)
    sides = cuts + [(x + y) / 2 for x, y in zip(cuts, cuts[1:])]
    hw = {video_size(pt, s, a, patch)[1:] for s in sides}
    for t in range(int(frames[0]), int(frames[1]) + 1):
      tt = max(pt, t // pt * pt)
      out.update(grid_shape((tt, h, w), patch) for h, w in hw)
  return sorted(out)


def token_dim(patch: Sequence[int], channels: int) -> int:
  return int(np.prod(patch)) * int(channels)


def _patchify(xp, video, patch):
  T, H, W, C = video.shape
  pt, ph, pw = patch
  gt, gh, gw = grid_shape((T, H, W), patch)
  x = video.reshape(gt, pt, gh, ph, gw, pw, C)
  x = xp.transpose(x, (0, 2, 4, 1, 3, 5, 6))
  return x.reshape(gt * gh * gw, pt * ph * pw * C)


def _unpatchify(xp, tokens, grid, patch, channels):
  gt, gh, gw = (int(g) for g in grid)
  pt, ph, pw = patch
  n, p = tokens.shape
  if n != gt * gh * gw or p != pt * ph * pw * channels:
    raise ValueError(f"tokens of shape {tokens.shape} do not match grid {tuple(grid)}, patch "
                     f"{tuple(patch)} and {channels} channels: expected "
                     f"({gt * gh * gw}, {pt * ph * pw * channels})")
  x = tokens.reshape(gt, gh, gw, pt, ph, pw, channels)
  x = xp.transpose(x, (0, 3, 1, 4, 2, 5, 6))
  return x.reshape(gt * pt, gh * ph, gw * pw, channels)


def patchify_np(video: np.ndarray, patch: Patch) -> np.ndarray:
  """``[T, H, W, C]`` -> ``[N, P]`` tokens, t-major."""
  return _patchify(np, np.asarray(video), patch)


def unpatchify_np(tokens: np.ndarray, grid: Grid, patch: Patch, channels: int) -> np.ndarray:
  """``[N, P]`` tokens -> ``[T, H, W, C]``; exact inverse of ``patchify_np``."""
  return _unpatchify(np, np.asarray(tokens), grid, patch, channels)


def patchify(video, patch: Patch):
  """jax version of ``patchify_np`` (shapes are static, so it works under jit)."""
  import jax.numpy as jnp
  return _patchify(jnp, video, patch)


def unpatchify(tokens, grid: Grid, patch: Patch, channels: int):
  """jax version of ``unpatchify_np``."""
  import jax.numpy as jnp
  return _unpatchify(jnp, tokens, grid, patch, channels)


def per_token(x_BS, segment_ids_BL):
  """Per-video values ``[B, S, ...]`` -> per-token ``[B, L, ...]`` by segment id (jax).

  Padding tokens get zeros. A one-hot matmul rather than a gather: S is small, and its gradient
  is a matmul too, where a gather's is a scatter-add (slow on CPU).
  """
  import jax.numpy as jnp
  onehot_BLS = (segment_ids_BL[:, :, None] == jnp.arange(1, x_BS.shape[1] + 1)).astype(x_BS.dtype)
  return jnp.einsum("bls,bs...->bl...", onehot_BLS, x_BS)


def grid_coords(grid: Sequence[int]) -> np.ndarray:
  """``[N, 3]`` int32 ``(t, h, w)`` of every token of a grid, in t-major order."""
  gt, gh, gw = (int(g) for g in grid)
  t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
  return np.stack([t, h, w], axis=-1).reshape(-1, 3).astype(np.int32)


def num_tokens(grid: Sequence[int]) -> int:
  return int(np.prod([int(g) for g in grid]))


def pack_rows(rows: Sequence[Sequence[Mapping[str, Any]]], seq_len: int, max_segments: int,
              token_size: int, seg_fields: Mapping[str, tuple[Any, Any]] | None = None,
              ) -> dict[str, np.ndarray]:
  """Builds a packed batch from an assignment of videos to rows.

  Args:
    rows: one list per row of items ``{"tokens": [N, P], "grid": (T', H', W'), <field>: ...}``.
    seq_len: L, tokens per row.
    max_segments: S, videos per row at most.
    token_size: P.
    seg_fields: per-video fields to copy into ``seg_<field>`` arrays of shape ``[B, S, ...]``,
      as ``{field: (dtype, fill)}``; ``fill`` goes into empty slots (use the null id for labels).

  Returns:
    ``tokens [B, L, P]``, ``segment_ids [B, L]`` (1..S, 0 = padding), ``coords [B, L, 3]``,
    ``seg_grid [B, S, 3]`` and one ``seg_<field>`` per requested field.
  """
  seg_fields = dict(seg_fields or {})
  B = len(rows)
  out = {
      "tokens": np.zeros((B, seq_len, token_size), np.float32),
      "segment_ids": np.zeros((B, seq_len), np.int32),
      "coords": np.zeros((B, seq_len, 3), np.int32),
      "seg_grid": np.zeros((B, max_segments, 3), np.int32),
  }
  for name, (dtype, fill) in seg_fields.items():
    shape = np.shape(fill)
    out[f"seg_{name}"] = np.full((B, max_segments) + shape, fill, dtype=dtype)
  for b, row in enumerate(rows):
    if len(row) > max_segments:
      raise ValueError(f"row {b} holds {len(row)} videos but max_segments={max_segments}: "
                       "raise data.max_segments or pack fewer videos per row")
    pos = 0
    for s, item in enumerate(row):
      grid = tuple(int(g) for g in item["grid"])
      toks = np.asarray(item["tokens"], np.float32)
      n = num_tokens(grid)
      if toks.shape != (n, token_size):
        raise ValueError(f"video {s} of row {b}: tokens {toks.shape} do not match grid {grid} "
                         f"and token size {token_size}")
      if pos + n > seq_len:
        raise ValueError(f"row {b} needs {pos + n} tokens but seq_len={seq_len}: raise "
                         "data.seq_len or pack fewer/smaller videos per row")
      out["tokens"][b, pos:pos + n] = toks
      out["segment_ids"][b, pos:pos + n] = s + 1
      out["coords"][b, pos:pos + n] = grid_coords(grid)
      out["seg_grid"][b, s] = grid
      for name in seg_fields:
        if name in item:
          out[f"seg_{name}"][b, s] = item[name]
      pos += n
  return out


def unpack_row(tokens_LP: np.ndarray, segment_ids_L: np.ndarray,
               seg_grid_S3: np.ndarray) -> list[np.ndarray]:
  """The ``[N_s, P]`` tokens of each video in one packed row, in slot order."""
  out = []
  for s, grid in enumerate(np.asarray(seg_grid_S3)):
    if num_tokens(grid) == 0:
      continue
    sel = np.asarray(segment_ids_L) == s + 1
    toks = np.asarray(tokens_LP)[sel]
    if toks.shape[0] != num_tokens(grid):
      raise ValueError(f"segment {s + 1} has {toks.shape[0]} tokens but grid {tuple(grid)}")
    out.append(toks)
  return out
