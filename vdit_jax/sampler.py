"""Sampling videos from a trained model: restore EMA params, pack noise, integrate, unpack.

Several requested shapes share one packed row and one compiled call (``row_plan``: any mix that
fits a training row shares one compiled sampler); shapes, captions and given frames are checked
before anything is compiled.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vdit_jax import checkpoint as ckpt_lib
from vdit_jax import conditioning as cond_lib
from vdit_jax import config as config_lib
from vdit_jax import diffusion
from vdit_jax import model as model_lib
from vdit_jax import text
from vdit_jax import tokens as tokens_lib

# Rows of shapes no training row holds are padded to a multiple of this, so nearby shape mixes
# reuse one compiled sampler.
_ROW_QUANTUM = 128


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  """``"16x32x32,8x32x48"`` -> ``[(16, 32, 32), (8, 32, 48)]`` (T x H x W in pixels/frames)."""
  shapes = []
  for part in [p.strip() for p in text.split(",") if p.strip()]:
    dims = part.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise ValueError(f"shape {part!r} is not TxHxW with positive integers, e.g. 16x32x32")
    shapes.append(tuple(int(d) for d in dims))
  if not shapes:
    raise ValueError(f"no shapes in {text!r}: pass e.g. --shapes 16x32x32,8x32x48")
  return shapes


def parse_labels(text: str, count: int, num_classes: int,
                 parse: Callable[[str], int] = int) -> list[int]:
  """Labels for ``count`` videos: ``""`` -> 0, 1, 2, ...; one label is repeated for all.

  A label is an int in [0, num_classes] (num_classes = unconditional), or whatever ``parse``
  turns into one (the run's data source's names: ``data.labels.label_set(config).parse``).
  """
  if not text.strip():
    return [i % num_classes for i in range(count)]
  labels = [parse(x.strip()) for x in text.split(",")]
  if len(labels) == 1:
    labels = labels * count
  if len(labels) != count:
    raise ValueError(f"{len(labels)} labels for {count} shapes: give one label, or one per shape")
  for lab in labels:
    if not 0 <= lab <= num_classes:
      raise ValueError(f"label {lab} is out of range: use 0..{num_classes - 1}, or "
                       f"{num_classes} for unconditional")
  return labels


def check_shapes(shapes, patch) -> list[tuple[int, int, int]]:
  """Token grids of the requested shapes; raises (naming valid sizes) before any compile."""
  grids = []
  for shape in shapes:
    grids.append(tokens_lib.grid_shape(shape, patch))
  return grids


def check_captions(config: ml_collections.ConfigDict, count: int, captions,
                   tokenizer: text.Tokenizer | None) -> list[Any] | None:
  """The captions of ``count`` videos for this run's ``model.caption.mode`` (one repeated for
  all, or one each), checked before any compile: every video of a captioned run needs a
  non-empty caption (text in ``tokens`` mode, an ``[n, E]`` array in ``embeddings`` mode);
  a run without captions takes none."""
  mode = config.model.caption.mode
  if mode == "none":
    if captions:
      raise ValueError("this run was trained without captions (model.caption.mode=none): drop "
                       "--captions, or condition on labels")
    return None
  captions = list(captions or [])
  if len(captions) == 1:
    captions = captions * count
  if len(captions) != count:
    raise ValueError(f"{len(captions)} captions for {count} shapes: give one caption, or one per "
                     "shape (--captions 'a red circle moving left;...' or --prompts_file)")
  for i, cap in enumerate(captions):
    if mode == "tokens":
      if not isinstance(cap, str) or not text.words_of(cap):
        raise ValueError(f"caption {i} is empty: this run was trained with captions "
                         f"(model.caption.mode=tokens); give each video a caption")
      if tokenizer is None:
        raise ValueError("captions need the run's tokenizer (text.Tokenizer.load(workdir))")
      tokenizer.encode(cap, int(config.model.caption.length))  # raises on unknown words
    else:
      arr = np.asarray(cap)
      c = config.model.caption
      if arr.ndim != 2 or arr.shape[1] != c.embed_dim or not 0 < len(arr) <= c.length:
        raise ValueError(f"caption embedding {i} has shape {arr.shape}: this run needs "
                         f"[tokens, {c.embed_dim}] with 1 to {c.length} tokens "
                         "(model.caption.embed_dim, model.caption.length)")
  return captions


def check_init_videos(config: ml_collections.ConfigDict, init_videos, grids) -> list[int]:
  """Given grid frames per video from ``init_videos`` (None entries: none), checked against the
  run and the requested grids before any compile: a run trained with given frames, videos of
  the same H, W and channels, whole temporal patches, at least one frame left to generate."""
  pt, ph, pw = (int(p) for p in config.model.patch)
  channels = int(config.data.channels)
  if init_videos is None or all(v is None for v in init_videos):
    return [0] * len(grids)
  if config.data.cond_frames_prob <= 0:
    raise ValueError("this run never trained with given frames (data.cond_frames_prob=0), so it "
                     "cannot continue a video: drop --init_video, or train with "
                     "--config.data.cond_frames_prob=0.25 (configs/captions.py does)")
  if len(init_videos) != len(grids):
    raise ValueError(f"{len(init_videos)} init videos for {len(grids)} shapes: give one per shape "
                     "(None for none)")
  frames = []
  for i, (init, grid) in enumerate(zip(init_videos, grids)):
    if init is None:
      frames.append(0)
      continue
    if np.ndim(init) != 4:
      raise ValueError(f"init video {i} has shape {np.shape(init)}: give frames [T, H, W, C]")
    T0, H0, W0, C0 = np.shape(init)
    want = (grid[1] * ph, grid[2] * pw)
    if (H0, W0) != want or C0 != channels:
      raise ValueError(f"init video {i} is {H0}x{W0} with {C0} channels, but its shape asks for "
                       f"{want[0]}x{want[1]} with {channels}: resize it or request that size")
    if T0 % pt or T0 // pt >= grid[0]:
      raise ValueError(f"init video {i} has {T0} frames: give a multiple of the temporal patch "
                       f"{pt} below the requested {grid[0] * pt} frames, so some are generated")
    frames.append(T0 // pt)
  return frames


class Row(NamedTuple):
  """The one packed row of a sampling call: its length and video slots, and how its attention
  layouts are sized (``backends.Backend.prepare``'s grids, max_segments and exact)."""
  length: int
  segments: int
  layout_grids: list
  layout_segments: int | None
  exact: bool


def row_plan(config: ml_collections.ConfigDict, grids: list[tuple[int, int, int]]) -> Row:
  """The packed row a sampling call of videos of ``grids`` uses.

  Videos that fit a training row (``data.seq_len`` tokens, ``data.max_segments`` videos) of grids
  the training data can draw get the training row's shapes and layout bounds, so one compiled
  sampler serves every such mix of shapes. Others (longer, larger, unseen sizes) get a row sized
  for exactly them, rounded up to ``_ROW_QUANTUM`` tokens, and compile for it.
  """
  d = config.data
  n_total = sum(math.prod(g) for g in grids)
  if n_total <= d.seq_len and len(grids) <= d.max_segments:
    if d.source in ("synthetic_shapes", "moving_digits"):  # they draw exactly these grids
      possible = config_lib.possible_grids(config)
      if all(tuple(g) in possible for g in grids):
        return Row(int(d.seq_len), int(d.max_segments), possible, int(d.max_segments), False)
    else:  # files: any size up to the largest, with the any-placement bound, as in training
      largest = config_lib.largest_grids(config)
      if all(any(all(a <= b for a, b in zip(g, big)) for big in largest) for g in grids):
        return Row(int(d.seq_len), int(d.max_segments), largest, None, False)
  quantum = max(_ROW_QUANTUM, int(config.model.attention_block))
  return Row(-(-n_total // quantum) * quantum, len(grids), list(grids), None, True)


def sample(model: model_lib.VideoDiT, config: ml_collections.ConfigDict,
           shapes: list[tuple[int, int, int]], labels: list[int], cfg_scale: float = 3.0,
           num_steps: int = 30, seed: int = 0, method: str = "euler", captions=None,
           tokenizer: text.Tokenizer | None = None, init_videos=None,
           progress: bool = False, caption_cfg: float | None = None,
           eta: float = 1.0) -> list[np.ndarray]:
  """Videos ``[T, H, W, C]`` in [-1, 1], one per requested shape, from one packed call,
  integrated with ``method`` (``diffusion.SAMPLERS``).

  ``captions``: for a captioned run, one per video (``check_captions``); ``init_videos``: per
  video None or its first frames ``[T0, H, W, C]`` in [-1, 1] (image-to-video, continuation),
  which come back unchanged. ``caption_cfg``: the caption's own guidance scale, ``cfg_scale``
  then guiding the label alone (``diffusion.guided``). ``progress``: a bar over the steps on
  stderr. ``eta``: the noise of the ``stochastic`` sampler (``diffusion.integrate``).
  Deterministic for a fixed ``seed``.
  """
  diffusion.check_sampler(method, eta)  # before anything compiles
  if caption_cfg is not None and config.model.caption.mode == "none":
    raise ValueError("a caption guidance scale (--cfg_caption) needs a run trained with captions "
                     "(model.caption.mode): use --cfg alone")
  row = pack_request(model, config, shapes, labels, seed, captions, tokenizer, init_videos)
  with _progress_bar(int(num_steps), progress):
    out = _integrate(model, row.noise, row.segment_ids, row.coords, row.cond, row.shift,
                     row.layouts, config.model.num_classes, float(cfg_scale), int(num_steps),
                     method, bool(progress),
                     None if caption_cfg is None else float(caption_cfg), float(eta),
                     jax.random.key(seed))
    return row.videos(out, config)  # waits for the last step while the bar is open


class Request(NamedTuple):
  """A sampling call's packed row: the model's inputs at t = 1 (``noise`` holds the given
  frames' tokens where there are any), and the host batch and grids to unpack the result."""
  noise: jax.Array
  segment_ids: jax.Array
  coords: jax.Array
  cond: cond_lib.Conditioning
  shift: jax.Array
  layouts: Any
  batch: dict
  grids: list

  def videos(self, out_BLP: jax.Array, config: ml_collections.ConfigDict) -> list[np.ndarray]:
    """The sampled row ``out_BLP`` as one ``[T, H, W, C]`` video per request, in order."""
    out = np.asarray(jax.device_get(out_BLP))
    toks = tokens_lib.unpack_row(out[0], self.batch["segment_ids"][0], self.batch["seg_grid"][0])
    return [tokens_lib.unpatchify_np(x, g, tuple(config.model.patch), config.data.channels)
            for x, g in zip(toks, self.grids)]


def pack_request(model: model_lib.VideoDiT, config: ml_collections.ConfigDict,
                 shapes: list[tuple[int, int, int]], labels: list[int], seed: int = 0,
                 captions=None, tokenizer: text.Tokenizer | None = None,
                 init_videos=None) -> Request:
  """Checks a sampling request (raising before any compile) and packs it into its row."""
  patch = tuple(config.model.patch)
  C = config.data.channels
  grids = check_shapes(shapes, patch)
  captions = check_captions(config, len(grids), captions, tokenizer)
  frames = check_init_videos(config, init_videos, grids)
  P = tokens_lib.token_dim(patch, C)
  row = row_plan(config, grids)
  rng = np.random.default_rng(seed)
  items = []
  for i, (g, lab) in enumerate(zip(grids, labels)):
    toks = rng.standard_normal((math.prod(g), P)).astype(np.float32)
    if frames[i]:
      given = tokens_lib.patchify_np(np.asarray(init_videos[i], np.float32), patch)
      toks[:len(given)] = given  # t-major: the first frames' tokens lead
    items.append({"tokens": toks, "grid": g, "label": lab, "frames": frames[i]})
  fields = {"label": (np.int32, config.model.num_classes)}
  if any(frames):
    fields["frames"] = (np.int32, 0)
  if captions is not None:
    coder = text.CaptionCoder.from_config(config, tokenizer)
    for item, c in zip(items, captions):
      item["caption"], item["caption_mask"] = coder(c)
    fields.update(coder.seg_fields())
  batch = tokens_lib.pack_rows([items], row.length, row.segments, P, seg_fields=fields)
  cond = cond_lib.from_batch({k: jnp.asarray(v) for k, v in batch.items()})
  layouts = model.backend.prepare(batch["segment_ids"], batch["coords"], row.layout_grids,
                                  max_segments=row.layout_segments, exact=row.exact)
  shift = diffusion.video_shift(jnp.asarray(batch["seg_grid"]), config.diffusion)
  return Request(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                 jnp.asarray(batch["coords"]), cond, shift, layouts, batch, grids)


# The bar of the sampling call in progress: one fixed callback (so the compiled sampler does not
# depend on the bar) moves whichever bar is open.
_BAR: list = []


def _tick(i) -> None:
  del i
  if _BAR:
    _BAR[0].update(1)


@contextlib.contextmanager
def _progress_bar(total: int, show: bool):
  if not show:
    yield
    return
  from tqdm import tqdm
  bar = tqdm(total=total, desc="sampling", unit="step", leave=False)
  _BAR[:] = [bar]
  try:
    yield
  finally:
    _BAR.clear()
    bar.close()


@nnx.jit(static_argnums=(7, 8, 9, 10, 11, 12, 13))
def _integrate(model, noise, segment_ids, coords, cond, shift, layouts, null_label, cfg_scale,
               num_steps, method, progress, caption_cfg, eta, key, start=None):
  velocity = diffusion.guided(model, cond, segment_ids, coords, null_label, cfg_scale,
                              layouts=layouts, caption_scale=caption_cfg)
  given = cond_lib.given_tokens(cond, segment_ids, coords)
  return diffusion.integrate(velocity, noise, segment_ids, shift, num_steps, method, given,
                             on_step=_tick if progress else None, start_BS=start, eta=eta,
                             key=key)


def redraw(model: model_lib.VideoDiT, config: ml_collections.ConfigDict,
           videos: list[np.ndarray], labels: list[int], t: float, cfg_scale: float = 3.0,
           num_steps: int = 30, seed: int = 0, method: str = "euler", captions=None,
           tokenizer: text.Tokenizer | None = None, eta: float = 1.0) -> list[np.ndarray]:
  """``videos`` ``[T, H, W, C]`` in [-1, 1] noised to ``t`` (the same noise ``sample`` draws for
  their shapes and ``seed``) and denoised back by the model: the part of ``sample``'s path below
  ``t``, started from real videos. ``t = 1`` is ``sample`` itself; a small ``t`` gives the videos
  back nearly unchanged. The row takes as many of ``num_steps`` as ``sample``'s shifted grid
  has below ``t`` (for its largest video; at least one)."""
  diffusion.check_sampler(method, eta)
  if not 0.0 < t <= 1.0:
    raise ValueError(f"redraw t={t} must be in (0, 1]")
  shapes = [tuple(int(d) for d in v.shape[:3]) for v in videos]
  row = pack_request(model, config, shapes, labels, seed, captions, tokenizer)
  patch = tuple(config.model.patch)
  seg = np.asarray(row.batch["segment_ids"][0])
  x0 = np.zeros(row.noise.shape, np.float32)
  for s, video in enumerate(videos):
    x0[0, seg == s + 1] = tokens_lib.patchify_np(np.asarray(video, np.float32), patch)
  start = diffusion.unshift_t(jnp.float32(t), row.shift)  # [1, S]: each video's own u
  real = np.prod(np.asarray(row.batch["seg_grid"]), axis=-1) > 0
  steps = max(1, int(round(num_steps * float(np.asarray(start)[real].max()))))
  x_t = (1.0 - t) * jnp.asarray(x0) + t * row.noise
  out = _integrate(model, x_t, row.segment_ids, row.coords, row.cond, row.shift, row.layouts,
                   config.model.num_classes, float(cfg_scale), steps, method, False, None,
                   float(eta), jax.random.key(seed), start)
  return row.videos(out, config)


def load_model(workdir: str, step: int | None = None,
               ) -> tuple[model_lib.VideoDiT, ml_collections.ConfigDict, int]:
  """The EMA model of a checkpoint in ``workdir`` (newest if ``step`` is None), its config and step.

  Only the EMA params are read from disk; the optimizer state and raw params stay there.
  """
  mngr = ckpt_lib.manager(workdir, read_only=True)
  step = ckpt_lib.saved_step(mngr, workdir, step)
  config = ckpt_lib.read_config(mngr, step)
  abstract_model = nnx.eval_shape(lambda: model_lib.build_model(config))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_params)
  ema = ckpt_lib.restore_subtree(mngr, step, "ema", target)
  mngr.close()
  return nnx.merge(graphdef, ema), config, step
