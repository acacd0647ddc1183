"""Every config field of vdit-jax, declared once, with what it means.

Other configs start from ``get_base_config()`` and change values only; the config is locked, so a
misspelt override (``--config.model.widht=8``) fails at once instead of being ignored.
"""

import json
import math
import os

import ml_collections

from vdit_jax import backends, diffusion, schedule, tokens


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, data order, noise and dropout

  # ---- data: what a training batch is made of ----
  d = c.data = ml_collections.ConfigDict()
  # synthetic_shapes | moving_digits (both embedded) | video_folder | latents (files in data.path)
  d.source = "synthetic_shapes"
  d.path = ""  # video_folder: mp4/webm/gif/npy files; latents: npy/npz arrays [T, H, W, C]
  d.manifest = ""  # optional JSONL of {"path", "caption", "label", "label_name"}, relative paths
  d.frame_stride = 1  # file sources: take every k-th stored frame
  d.channels = 3  # C of the videos (3 for pixels, the VAE's latent channels for latents)
  d.frames = (8, 8)  # (min, max) frames per video, rounded down to the temporal patch
  d.side = (32, 32)  # (min, max) sqrt(H*W) in pixels; H and W follow from the aspect ratio
  d.aspect_ratios = (1.0,)  # W/H ratios to draw from
  d.num_objects = (1, 1)  # (min, max) moving shapes or digits per video; the first sets the label
  d.object_size = (0.25, 0.45)  # (min, max) shape or digit size as a fraction of the shorter side
  d.speed = (0.03, 0.08)  # (min, max) pixels per frame as a fraction of the side it moves along
  d.num_videos = 1_000_000  # size of the (procedural) source; indices are drawn from it
  # the source's last `heldout` indices are never trained on: the evaluators draw from them
  d.heldout = 0
  d.batch_rows = 4  # B: packed rows per global batch
  d.seq_len = 512  # L: tokens per row
  d.max_segments = 4  # S: videos per row at most
  d.label_dropout = 0.1  # fraction of videos trained with the null label (for guidance)
  d.caption_dropout = 0.1  # fraction trained with the null caption (model.caption), drawn apart
  # Image-to-video and continuation: the fraction of videos trained with their first k grid
  # frames given clean (timestep 0, no loss), k uniform in 1..cond_frames (and below the video's
  # grid frames). 0 = never; sample.py --init_video needs a run trained with it.
  d.cond_frames_prob = 0.0
  d.cond_frames = 1
  d.shards = 0  # packing streams per batch (0 = one per process; fixed: same batch on any hosts)
  d.worker_count = 0  # grain worker processes (0 = in the main process)
  d.prefetch = 2  # batches buffered per worker

  # ---- model ----
  m = c.model = ml_collections.ConfigDict()
  m.patch = (1, 4, 4)  # (pt, ph, pw)
  m.width = 128  # D
  m.depth = 4  # transformer blocks
  m.num_heads = 4  # H
  m.head_dim = 32  # K
  m.mlp_ratio = 4.0  # MLP hidden = mlp_ratio * D
  # full3d | factorized | alternating | window | sparse | causal3d | spatial_only |
  # temporal_only, or a comma list of the single-layer types with one entry per layer (e.g.
  # "window,window,full3d"); what each attends to: vdit_jax/schedule.py and patterns.py
  m.block = "full3d"
  m.window = (1, 2, 2)  # window blocks: (kt, kh, kw), attend where |dt|<=kt, |dh|<=kh, |dw|<=kw
  # sparse blocks: one sub-pattern (local | cross | global) per equal group of heads, in order
  m.sparse_heads = "local,local,cross,global"
  m.sparse_window = (2, 4, 8)  # sparse: (kt, local reach, cross reach); reach halves per frame
  m.causal_frames = -1  # causal3d: earlier frames a token sees besides its own (-1 = all)
  m.causal_window = ()  # causal3d: (kh, kw) reach in rows and columns; () = whole frames
  # dense | auto | blocksparse | sdpa | pallas (backends.resolve)
  m.attention_backend = "dense"
  m.attention_block = 0  # blocksparse block size (0 = bounds.default_block per pattern)
  m.attention_kv_chunk = 0  # blocksparse: key blocks per online-softmax step (0 = all at once)
  m.qk_norm = True  # RMS-normalise queries and keys (stabilises attention logits)
  m.rope_theta = 10000.0  # base of the 3D rotary frequencies
  m.num_classes = 18  # labels are 0..num_classes-1; num_classes itself is the null label
  # () = one embedding per label. (a, b, ...) = the label is a mixed-radix number with these
  # digits (product num_classes), each digit its own embedding table, summed: labels that share
  # a digit share its embedding. synthetic_shapes: (3, 6), its label is shape * 6 + colour.
  m.label_factors = ()
  # k > 0: tokens also see where they sit in their video as a fraction of its extent (sin and
  # cos of pi * 1..k * fraction per axis); RoPE alone gives only relative positions
  m.frac_pos = 0
  # What the last layer predicts; the model turns it into a velocity, so every caller (loss,
  # guidance, samplers) sees one, and the loss stays the velocity's. velocity: v = eps - x0.
  # clean: the clean video x0, v = (x_t - x0) / max(t, prediction_t_min); a video of flat
  # shapes lies on a far smaller manifold than noise, and a network that outputs it need not
  # carry the noise through, but its error is divided by t at low noise. edm: Karras et al.'s
  # preconditioning, x0 = c_skip(t) x_t + c_out(t) out: the clean video near t = 1, the
  # velocity near t = 0 (diffusion.velocity_from_edm).
  m.prediction = "velocity"
  m.prediction_t_min = 0.05  # clean: the least t the velocity divides by
  # edm: the data's root mean square (about 1 for videos on black, near -1; 0.5 for natural
  # images in [-1, 1])
  m.prediction_sigma_data = 1.0
  # Captions, read by a cross-attention sublayer from each video's tokens to its own caption
  mc = m.caption = ml_collections.ConfigDict()
  # none | tokens (the source's caption text; a word tokenizer from the training captions, saved
  # in the workdir, and a small text encoder trained with the model) | embeddings (precomputed
  # caption embeddings of width embed_dim from the data source, through a learned projection)
  mc.mode = "none"
  mc.length = 16  # C: caption tokens per video (words, or embedding rows)
  mc.vocab = 64  # tokens: embedding rows, at least the vocabulary's words + 1 (padding)
  mc.embed_dim = 0  # embeddings: E, the width of the supplied embeddings
  # Transformer layers over the caption before the cross-attention. 0: the word (or supplied)
  # embeddings with learned positions and a norm. One layer trained with the synthetic captions
  # learned to wash the words out (bench/README.md, "Training runs").
  mc.encoder_depth = 0
  mc.every = 1  # a cross-attention sublayer in every k-th block (from the first)
  mc.pooled = False  # also add the caption's mean token to adaLN's conditioning vector
  m.dtype = "float32"  # compute dtype (bfloat16 for mixed precision); params stay float32
  # Run the blocks as a scan over depth (where the block schedule repeats): one block's step
  # compiles instead of every block, so deep models compile in seconds. Parameters gain a
  # leading "layers" axis; checkpoints convert on resume (model.convert_layers).
  m.scan_layers = False
  m.remat = False  # rematerialise each block in the backward pass
  # with remat, what a block keeps for the backward pass (a jax.checkpoint_policies name):
  # nothing_saveable (least memory) | dots_with_no_batch_dims_saveable (keep the weight matmuls'
  # outputs, recompute attention and elementwise work) | dots_saveable | everything_saveable
  m.remat_policy = "nothing_saveable"

  # ---- diffusion (rectified flow) ----
  f = c.diffusion = ml_collections.ConfigDict()
  f.t_mean = 0.0  # logit-normal location of the training t
  f.t_std = 1.0  # logit-normal scale
  f.t_uniform = 0.0  # share of videos whose t (before the shift) is uniform, not logit-normal
  f.shift_base_tokens = 256  # token count at which the timestep shift is 1
  f.shift_power = 0.5  # shift = (tokens / shift_base_tokens) ** shift_power
  f.loss_weighting = "video"  # video: mean per video then over videos; token: mean over all tokens

  # ---- optimisation ----
  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3  # peak learning rate
  o.warmup_steps = 100  # linear warmup
  o.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
  o.weight_decay = 0.0  # AdamW decoupled weight decay
  o.b1 = 0.9
  o.b2 = 0.99
  o.grad_clip = 1.0  # global-norm clipping (0 = off)
  # EMA of params, used for sampling (0 = EMA equals params). The decay at step s is
  # min(ema_decay, (1 + s) / (10 + s)) (trainer.ema_decay_at): until that reaches ema_decay
  # (step 8990 for 0.999) the average spans about the last ninth of the steps so far, and
  # ema_decay itself changes nothing.
  o.ema_decay = 0.999

  # ---- the run ----
  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000  # total optimisation steps
  t.grad_accum = 1  # micro-batches per step (rows split k ways; same update, k x less memory)
  t.log_every = 20  # steps between metric lines
  t.ckpt_every = 250  # steps between checkpoints (a final one is always written)
  t.keep_ckpts = 2  # checkpoints kept in workdir
  t.sample_every = 0  # steps between sample videos written to workdir (0 = only at the end)
  t.progress = True  # progress bar on the terminal
  # A step with a NaN/inf loss or gradient is skipped (no update, its batch passed over) and
  # counted; this many in a row stop the run at the next log line or checkpoint, without saving
  # (0 = never stop). Checked when the host reads the metrics, so no step waits for it.
  t.max_nonfinite_in_a_row = 20
  # Resume a workdir whose checkpoint was trained with other values of fields outside
  # RESUME_SAFE (model, data, diffusion, optimiser, seed); without it such a resume is refused.
  t.allow_config_change = False

  # ---- the device mesh ----
  h = c.mesh = ml_collections.ConfigDict()
  h.data = -1  # data-parallel axis size (-1 = all remaining devices)
  h.fsdp = 1  # parameter-sharding axis size
  h.context = 1  # context-parallel axis size: splits each row's tokens (long videos)
  h.tensor = 1  # tensor-parallel axis size
  # logical axis name -> mesh axes; the only place that says how things are sharded
  h.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("attn_heads", ("tensor", "context")),  # heads inside attention (whole rows)
      ("kv", None),
      ("length", "context"),
      ("token", None),
      ("vocab", None),
      ("layers", None),
  )

  # ---- multi-host (jax.distributed); a single process needs none of it ----
  p = c.distributed = ml_collections.ConfigDict()
  p.coordinator_address = ""  # process 0's host:port ("" = $JAX_COORDINATOR_ADDRESS; "auto" =
  # jax's cluster detection on TPU pods, SLURM, Open MPI)
  p.num_processes = 0  # processes in the run (0 = $JAX_NUM_PROCESSES, else 1)
  p.process_id = -1  # this process's index (-1 = $JAX_PROCESS_ID)

  # ---- sampling ----
  s = c.sample = ml_collections.ConfigDict()
  s.shapes = "8x32x32,8x32x48"  # TxHxW of the videos sampled during/after training
  s.labels = ""  # comma-separated ids or names (data.labels), one per shape (empty = 0, 1, 2, ...)
  # captioned runs: ";"-separated captions, one per shape or one for all (empty = the captions
  # of the source's first videos)
  s.captions = ""
  s.steps = 30  # integration steps
  s.cfg = 3.0  # classifier-free guidance scale (1 = no guidance)
  s.sampler = "euler"  # euler | heun | stochastic (diffusion.SAMPLERS)
  s.eta = 1.0  # stochastic: fresh noise per step, in units of DDPM's (0 = Euler)
  s.fps = 8  # frames per second of written videos

  # ---- evaluation (evals/): evaluators run during and after training, process 0 writes ----
  e = c.evals = ml_collections.ConfigDict()
  e.names = ""  # comma list of evaluators to run (evals.registry.EVALUATORS), "" = none
  e.heldout = ml_collections.ConfigDict()  # rectified-flow loss on held-out videos
  e.heldout.every = 0  # steps between runs (0 = only after the last step)
  e.heldout.videos = 64  # held-out videos scored (the first of the data.heldout indices)
  e.heldout.t_values = (0.1, 0.3, 0.5, 0.7, 0.9)  # the fixed grid of t (each a t-bin)
  # > 0: also the loss at this t with each part of the label changed and with the null label,
  # less the true label's (label_gap_shape, _colour, _null): how much the model uses each part;
  # with captions, the same per class of caption words swapped (caption_gap_colour, _shape,
  # _direction) and with every caption nulled (caption_gap_null)
  e.heldout.label_t = 0.0
  e.temporal = ml_collections.ConfigDict()  # temporal consistency of sampled videos
  e.temporal.every = 0  # steps between runs (0 = only after the last step)
  e.temporal.videos = 36  # videos sampled, with the sizes and labels of as many held-out ones
  e.temporal.steps = 30  # sampling steps
  e.temporal.cfg = 3.0  # guidance scale
  e.temporal.sampler = "euler"  # euler | heun | stochastic (diffusion.SAMPLERS)
  e.temporal.eta = 1.0  # stochastic: fresh noise per step, in units of DDPM's
  e.temporal.fd = True  # also the Frechet distance to real videos (evals.features' network)
  # held-out real videos noised to each t and denoised back, scored like temporal's samples:
  # at which noise levels the model breaks outlines, colours or objects it is given
  e.redraw = ml_collections.ConfigDict()
  e.redraw.every = 0  # steps between runs (0 = only after the last step)
  e.redraw.videos = 24  # held-out videos redrawn, with their labels (and captions)
  e.redraw.t_values = (0.25, 0.5, 0.75, 1.0)  # t the videos are noised to (1: plain sampling)
  e.redraw.steps = 30  # sampling steps of the whole grid from t = 1 (those below t are taken)
  e.redraw.cfg = 3.0  # guidance scale
  e.redraw.sampler = "euler"  # euler | heun | stochastic (diffusion.SAMPLERS)
  e.redraw.eta = 1.0  # stochastic: fresh noise per step, in units of DDPM's

  return c


# What model.remat_policy may name: policies of jax.checkpoint_policies that take no arguments.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
                  "everything_saveable")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a config for mistakes that would otherwise surface mid-compile or mid-run.

  Checks that need the device count (mesh sizes, rows per data-parallel shard) are in
  ``trainer.validate``.
  """
  m, d = config.model, config.data
  diffusion.check_sampler(config.sample.sampler, float(config.sample.eta))
  schedule.layer_patterns(m)  # block types, per-layer schedule, window and sparse heads
  backends.check_name(m.attention_backend)
  if m.attention_block and d.seq_len % m.attention_block:
    raise ValueError(f"data.seq_len={d.seq_len} is not a multiple of model.attention_block="
                     f"{m.attention_block}: use a divisor of seq_len, or 0 for the default")
  if len(m.patch) != 3 or any(int(p) < 1 for p in m.patch):
    raise ValueError(f"model.patch={tuple(m.patch)} must be three positive sizes (pt, ph, pw)")
  factors = tuple(m.label_factors)
  if factors and (any(int(f) < 2 for f in factors) or math.prod(factors) != m.num_classes):
    raise ValueError(f"model.label_factors={factors} must be sizes >= 2 whose product is "
                     f"model.num_classes={m.num_classes}, or () for one embedding per label")
  if m.head_dim % 2:
    raise ValueError(f"model.head_dim={m.head_dim} must be even (rotary pairs)")
  if int(m.frac_pos) != m.frac_pos or m.frac_pos < 0:
    raise ValueError(f"model.frac_pos={m.frac_pos} must be a whole number of frequencies >= 0 "
                     "(0 = no fractional position features)")
  if m.prediction not in PREDICTIONS:
    raise ValueError(f"model.prediction={m.prediction!r} is unknown: use one of {PREDICTIONS}")
  if not 0 < m.prediction_t_min < 1:
    raise ValueError(f"model.prediction_t_min={m.prediction_t_min} must lie in (0, 1): the "
                     "velocity of a clean prediction divides by max(t, prediction_t_min)")
  if not m.prediction_sigma_data > 0:
    raise ValueError(f"model.prediction_sigma_data={m.prediction_sigma_data} must be > 0: the "
                     "root mean square of the data")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype={m.dtype!r}: use float32 or bfloat16")
  if m.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={m.remat_policy!r} is unknown: use one of "
                     f"{REMAT_POLICIES}")
  for name in ("frames", "side", "num_objects", "object_size", "speed"):
    lo, hi = d[name]
    if lo > hi or lo <= 0:
      raise ValueError(f"data.{name}={tuple(d[name])} must be (min, max) with 0 < min <= max")
  pt, ph, pw = m.patch
  if d.frames[0] < pt:
    raise ValueError(f"data.frames={tuple(d.frames)} is shorter than the temporal patch {pt}: "
                     f"use frames >= {pt}")
  biggest = max(tokens.num_tokens(g) for g in largest_grids(config))
  if biggest > d.seq_len:
    raise ValueError(f"data.seq_len={d.seq_len} is too short for the largest video the data "
                     f"config allows ({biggest} tokens): raise data.seq_len to "
                     f"{-(-biggest // 128) * 128} or lower data.side/data.frames")
  if d.max_segments < 1 or d.batch_rows < 1:
    raise ValueError(f"data.max_segments={d.max_segments} and data.batch_rows={d.batch_rows} "
                     "must be >= 1 (videos per row, rows per batch)")
  if config.train.grad_accum < 1 or d.batch_rows % config.train.grad_accum:
    raise ValueError(f"train.grad_accum={config.train.grad_accum} must be >= 1 and divide "
                     f"data.batch_rows={d.batch_rows}")
  for name in ("label_dropout", "caption_dropout", "cond_frames_prob"):
    if not 0.0 <= d[name] <= 1.0:
      raise ValueError(f"data.{name}={d[name]} must be a probability in [0, 1]")
  if d.cond_frames_prob > 0 and d.cond_frames < 1:
    raise ValueError(f"data.cond_frames={d.cond_frames} must be >= 1 (grid frames given) when "
                     f"data.cond_frames_prob={d.cond_frames_prob} > 0")
  _validate_caption(m.caption)
  if d.source in ("video_folder", "latents"):
    if not d.path or not os.path.isdir(d.path):
      raise ValueError(f"data.source={d.source} reads files, but data.path={d.path!r} is not a "
                       "directory: set --config.data.path=/path/to/folder")
    if d.manifest and not os.path.isfile(d.manifest):
      raise ValueError(f"data.manifest={d.manifest!r} is not a file: give a JSONL path, or leave "
                       "it empty to use every file in data.path")
  if d.frame_stride < 1:
    raise ValueError(f"data.frame_stride={d.frame_stride} must be >= 1 (1 = every frame)")
  if d.heldout < 0 or d.heldout >= d.num_videos and d.source in ("synthetic_shapes",
                                                                "moving_digits"):
    raise ValueError(f"data.heldout={d.heldout} must be >= 0 and leave videos to train on "
                     f"(data.num_videos={d.num_videos})")
  if config.train.max_nonfinite_in_a_row < 0:
    raise ValueError(f"train.max_nonfinite_in_a_row={config.train.max_nonfinite_in_a_row} must "
                     "be >= 0 (0 = never stop on non-finite steps)")
  if config.optim.lr <= 0 or config.train.steps < 1:
    raise ValueError(f"optim.lr={config.optim.lr} and train.steps={config.train.steps} must be "
                     "positive")


CAPTION_MODES = ("none", "tokens", "embeddings")
PREDICTIONS = ("velocity", "clean", "edm")  # model.prediction


def _validate_caption(c: ml_collections.ConfigDict) -> None:
  if c.mode not in CAPTION_MODES:
    raise ValueError(f"model.caption.mode={c.mode!r} is unknown: use one of {CAPTION_MODES}")
  if c.mode == "none":
    return
  for name in ("length", "every"):
    if c[name] < 1:
      raise ValueError(f"model.caption.{name}={c[name]} must be >= 1")
  if c.encoder_depth < 0:
    raise ValueError(f"model.caption.encoder_depth={c.encoder_depth} must be >= 0")
  if c.mode == "tokens" and c.vocab < 2:
    raise ValueError(f"model.caption.vocab={c.vocab} must be >= 2 (padding and one word)")
  if c.mode == "embeddings" and c.embed_dim < 1:
    raise ValueError(f"model.caption.mode=embeddings needs model.caption.embed_dim={c.embed_dim} "
                     "set to the width of the supplied caption embeddings (e.g. 768)")


# Fields a resumed run may change without train.allow_config_change: how long it runs, what it
# reports, and how it computes the same update from the same parameters (mesh, processes, data
# workers, micro-batches, attention kernels, rematerialisation, scanned layers: equal up to
# float summation order; scanned and unscanned blocks convert on restore). Every other field
# changes the parameters' shapes or what they are trained on or towards (model, data,
# diffusion, optimiser, seed). A name ending in "." covers its group.
RESUME_SAFE = (
    "train.steps", "train.grad_accum", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
    "train.sample_every", "train.progress", "train.max_nonfinite_in_a_row",
    "train.allow_config_change",
    "data.worker_count", "data.prefetch",
    "model.attention_backend", "model.attention_block", "model.attention_kv_chunk",
    "model.remat", "model.remat_policy", "model.scan_layers",
    "mesh.", "distributed.", "sample.", "evals.",
)


def resume_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                   ) -> list[str]:
  """``field: saved -> new`` for each field outside ``RESUME_SAFE`` that ``config`` changes
  from ``saved``, the config of the checkpoint it would resume."""
  # Both through JSON onto the base: a list and a tuple of the same values compare equal.
  old, new = (_flat(from_dict(json.loads(c.to_json()))) for c in (saved, config))
  return [f"{name}: {old[name]!r} -> {new[name]!r}" for name in sorted(old)
          if old[name] != new[name] and not _resume_safe(name)]


def _resume_safe(name: str) -> bool:
  return any(name == safe or safe.endswith(".") and name.startswith(safe)
             for safe in RESUME_SAFE)


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def largest_grids(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """Token grids of the largest videos the data config can draw, one per aspect ratio."""
  d = config.data
  return tokens.largest_grids(d.frames[1], d.side[1], d.aspect_ratios, config.model.patch)


def possible_grids(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """Every token grid the procedural sources (synthetic_shapes) can draw under this config."""
  d = config.data
  return tokens.possible_grids(d.frames, d.side, d.aspect_ratios, config.model.patch)


def from_dict(raw: dict) -> ml_collections.ConfigDict:
  """A locked config equal to a saved one, built on the base so every field keeps its type."""
  config = get_base_config()
  _merge(config, raw, "")
  config.lock()
  return config


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str) -> None:
  for key, value in src.items():
    if key not in dst:
      raise ValueError(f"saved config has field {prefix}{key} that this version does not "
                       "know: use the vdit-jax version that wrote it")
    if isinstance(dst[key], ml_collections.ConfigDict):
      _merge(dst[key], value, f"{prefix}{key}.")
    else:
      dst[key] = _to_tuples(value) if isinstance(dst[key], tuple) else value


def _to_tuples(x):
  return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
