"""The video DiT (Flax NNX) on packed token rows.

Inputs follow the token contract: ``tokens [B, L, P]``, ``segment_ids [B, L]``, ``coords [B, L, 3]``
and per-video ``t [B, S]`` and ``label [B, S]``. Everything per video (timestep, label) is embedded
per slot and reaches tokens by a gather with ``segment_ids``, so one video's output never depends
on what else shares its row.

Block types (``schedule.BLOCK_PATTERNS``; ``model.block`` may also give one per layer):
- ``full3d``: one attention sublayer with the ``full`` pattern, then the MLP;
- ``factorized``: a ``spatial`` sublayer, then a ``temporal`` sublayer, then the MLP;
- ``alternating``: ``spatial_only`` and ``temporal_only`` blocks in turn over depth;
- ``window``: one sublayer with ``window(model.window)``;
- ``sparse``: one sublayer whose heads use per-group sub-patterns (``model.sparse_heads``);
- ``causal3d``: one sublayer with ``frame_causal(model.causal_frames)``, or with
  ``causal_window(model.causal_frames, *model.causal_window)`` when that is set;
- ``spatial_only``, ``temporal_only``: one sublayer, the ablation controls.
All keep the same parameter names for what they share (``attn``, ``mlp``, ``ada``), so ablations
compare like with like; ``factorized`` adds ``attn_t``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vdit_jax import attention as attn_lib
from vdit_jax import backends as backends_lib
from vdit_jax import conditioning as cond_lib
from vdit_jax import diffusion
from vdit_jax import schedule
from vdit_jax import tokens as tokens_lib
from vdit_jax.sharding import ATTENTION_QKV, constrain

_ACT = ("batch", "length", "embed")


def _init(logical: tuple[str | None, ...], init=nnx.initializers.xavier_uniform()):
  return nnx.with_partitioning(init, logical)


_ZEROS = nnx.initializers.zeros_init()


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"model.dtype={name!r} is not a dtype: use float32 or bfloat16") from e


# ----------------------------------------------------------------------------- 3D RoPE


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Rotary frequency pairs per axis (t, h, w); together they cover the whole head dim."""
  if head_dim % 2:
    raise ValueError(f"model.head_dim={head_dim} must be even for rotary embeddings")
  pairs = head_dim // 2
  t = pairs // 3
  h = (pairs - t) // 2
  return t, h, pairs - t - h


def rope_angles(coords_BL3: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles ``[B, L, K/2]``: each axis's coordinate times its own frequency ladder."""
  parts = []
  for axis, n in enumerate(rope_split(head_dim)):
    if n == 0:
      continue
    freqs = theta ** (-jnp.arange(n, dtype=jnp.float32) / n)
    parts.append(coords_BL3[..., axis:axis + 1].astype(jnp.float32) * freqs)
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x_BLHK: jax.Array, cos_BL1k: jax.Array, sin_BL1k: jax.Array) -> jax.Array:
  half = x_BLHK.shape[-1] // 2
  x1, x2 = x_BLHK[..., :half], x_BLHK[..., half:]
  cos, sin = cos_BL1k.astype(x_BLHK.dtype), sin_BL1k.astype(x_BLHK.dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(_init(("kv",), nnx.initializers.ones_init())(jax.random.key(0), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * self.scale[...]).astype(x.dtype)


def layer_norm(x: jax.Array) -> jax.Array:
  """Affine-free LayerNorm (adaLN supplies scale and shift), statistics in f32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum(spec, x, w)``: activations ``x`` mapped by weights ``w``, with the weight gradient
  computed as ``einsum(x, dy)``, activations on the left.

  XLA:CPU's matmul wants its left operand's contracted axis last, so a weight gradient
  (contracted over tokens) transposes one operand first. With autodiff's operand order that is
  the output gradient ``dy``; where ``dy`` is the residual stream's gradient (the attention
  output projection, the token embedding), XLA fuses the elementwise chain that makes it (the
  norm backward passes of every later block) into that transposing copy and recomputes it
  there, element by element, a large share of a small model's step. Here the stored
  activations are transposed instead (bench/README.md has the step times).
  """
  return jnp.einsum(spec, x, w)


def _project_fwd(spec, x, w):
  return project(spec, x, w), (x, w)


def _project_bwd(spec, res, dy):
  x, w = res
  ins, ys = spec.split("->")
  xs, ws = ins.split(",")
  return jnp.einsum(f"{ys},{ws}->{xs}", dy, w), jnp.einsum(f"{xs},{ys}->{ws}", x, dy)


project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def _split_qkv(qkv_BL3HK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v of the fused projection. Autodiff would transpose each slice into a zero-padded
  full-size array and add the three (a visible share of a step on CPU); the written-out
  backward stacks the three gradients once."""
  return qkv_BL3HK[:, :, 0], qkv_BL3HK[:, :, 1], qkv_BL3HK[:, :, 2]


# Each gradient goes back to token shards before the stack (with mesh.context > 1 they arrive
# split by heads from attention; XLA's partitioner cannot move the stacked array efficiently).
_split_qkv.defvjp(lambda qkv: (_split_qkv(qkv), None),
                  lambda _, g: (jnp.stack([constrain(x, ("batch", "length", "heads", "kv"))
                                           for x in g], axis=2),))


class Attention(nnx.Module):
  """Multi-head self-attention with fused QKV, optional QK-norm and 3D RoPE."""

  def __init__(self, width: int, num_heads: int, head_dim: int, qk_norm: bool, dtype,
               *, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0,
                                             out_axis=(1, 2, 3))
    self.qkv = nnx.Param(_init(("embed", None, "heads", "kv"), init)(
        rngs.params(), (width, 3, num_heads, head_dim)))
    out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=(0, 1),
                                                 out_axis=2)
    self.out = nnx.Param(_init(("heads", "kv", "embed"), out_init)(
        rngs.params(), (num_heads, head_dim, width)))
    self.q_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None

  def __call__(self, x_BLD: jax.Array, pattern: str, ctx: attn_lib.AttentionContext,
               cos: jax.Array, sin: jax.Array) -> jax.Array:
    qkv = jnp.einsum("bld,dthk->blthk", x_BLD, self.qkv[...].astype(self.dtype))
    q_BLHK, k_BLHK, v_BLHK = _split_qkv(qkv)
    if self.q_norm is not None:
      q_BLHK, k_BLHK = self.q_norm(q_BLHK), self.k_norm(k_BLHK)
    q_BLHK, k_BLHK = apply_rope(q_BLHK, cos, sin), apply_rope(k_BLHK, cos, sin)
    # Whole rows for attention, heads split instead (an all-to-all where mesh.context > 1).
    q_BLHK, k_BLHK, v_BLHK = (constrain(x, ATTENTION_QKV) for x in (q_BLHK, k_BLHK, v_BLHK))
    o_BLHK = constrain(ctx.attend(pattern, q_BLHK, k_BLHK, v_BLHK), ATTENTION_QKV)
    o_BLHK = constrain(o_BLHK, ("batch", "length", "heads", "kv"))  # back to token shards
    return project("blhk,hkd->bld", o_BLHK, self.out[...].astype(self.dtype))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, hidden, kernel_init=_init(("embed", "mlp")),
                          bias_init=_init(("mlp",), _ZEROS), dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, kernel_init=_init(("mlp", "embed")),
                          bias_init=_init(("embed",), _ZEROS), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def masked_attention(q_BLHK: jax.Array, k_BMHK: jax.Array, v_BMHK: jax.Array,
                     mask_BLM: jax.Array) -> jax.Array:
  """Dense softmax attention where ``mask_BLM`` allows; a query allowed nothing gets zeros.

  For the short key sets of captions (tens of keys per video), where one dense product over
  every caption of the row costs less than gathering each video's own.
  """
  K = q_BLHK.shape[-1]
  logits = jnp.einsum("blhk,bmhk->bhlm", q_BLHK, k_BMHK).astype(jnp.float32) / math.sqrt(K)
  logits = jnp.where(mask_BLM[:, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BMHK.dtype)
  out = jnp.einsum("bhlm,bmhk->blhk", probs, v_BMHK)
  return jnp.where(jnp.any(mask_BLM, axis=-1)[:, :, None, None], out, 0)


class CrossAttention(nnx.Module):
  """Video tokens attend to the caption tokens of their own video (``CaptionContext``).

  Its output projection starts at zero, so a block with it starts as the block without it.
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, qk_norm: bool, dtype,
               *, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0,
                                             out_axis=(-2, -1))
    self.q = nnx.Param(_init(("embed", "heads", "kv"), init)(
        rngs.params(), (width, num_heads, head_dim)))
    self.kv = nnx.Param(_init(("embed", None, "heads", "kv"), init)(
        rngs.params(), (width, 2, num_heads, head_dim)))
    self.out = nnx.Param(_init(("heads", "kv", "embed"), _ZEROS)(
        rngs.params(), (num_heads, head_dim, width)))
    self.q_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None

  def __call__(self, x_BLD: jax.Array, captions: "CaptionContext") -> jax.Array:
    q = jnp.einsum("bld,dhk->blhk", x_BLD, self.q[...].astype(self.dtype))
    kv = jnp.einsum("bmd,dthk->bmthk", captions.x_BMD.astype(self.dtype),
                    self.kv[...].astype(self.dtype))
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    o = masked_attention(q, k, v, captions.mask_BLM)
    return project("blhk,hkd->bld", o, self.out[...].astype(self.dtype))


class CaptionContext(NamedTuple):
  """What the cross-attention sublayers read: caption tokens ``x_BMD`` (every video's captions of
  a row, back to back, each led by the model's null token) and which of them each video token
  may see, ``mask_BLM`` (its own video's)."""
  x_BMD: jax.Array
  mask_BLM: jax.Array


class TextLayer(nnx.Module):
  """A pre-norm transformer layer over one caption's tokens (padding masked out)."""

  def __init__(self, width: int, num_heads: int, dtype, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.dtype = dtype
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_init(("embed", "mlp")),
                          bias_init=_init(("mlp",), _ZEROS), dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=_init(("mlp", "embed")),
                          bias_init=_init(("embed",), _ZEROS), dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, 4 * width, dtype, rngs=rngs)
    self.norm1 = RMSNorm(width, rngs=rngs)
    self.norm2 = RMSNorm(width, rngs=rngs)

  def __call__(self, x_NCD: jax.Array, mask_NC: jax.Array) -> jax.Array:
    N, C, D = x_NCD.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x_NCD)).reshape(N, C, 3 * self.num_heads, -1), 3,
                        axis=2)
    o = masked_attention(q, k, v, jnp.broadcast_to(mask_NC[:, None, :], (N, C, C)))
    x_NCD = x_NCD + self.out(o.reshape(N, C, D))
    return x_NCD + self.mlp(self.norm2(x_NCD))


class CaptionEncoder(nnx.Module):
  """Caption -> tokens of width D: word ids through an embedding table (``mode = "tokens"``: a
  small text encoder trained with the model) or precomputed embeddings of width E through a
  learned projection (``"embeddings"``), then learned positions and ``encoder_depth`` layers."""

  def __init__(self, cfg, width: int, dtype, *, rngs: nnx.Rngs):
    c = cfg.caption
    self.mode = c.mode
    if c.mode == "tokens":
      self.inp = nnx.Embed(c.vocab, width, embedding_init=_init(("vocab", "embed"),
                                                               nnx.initializers.normal(1.0)),
                           rngs=rngs)
    else:
      self.inp = nnx.Linear(c.embed_dim, width, kernel_init=_init((None, "embed")),
                            bias_init=_init(("embed",), _ZEROS), rngs=rngs)
    self.pos = nnx.Param(_init((None, "embed"), nnx.initializers.normal(0.02))(
        rngs.params(), (c.length, width)))
    self.layers = nnx.List([TextLayer(width, cfg.num_heads, dtype, rngs=rngs)
                            for _ in range(c.encoder_depth)])
    self.norm = RMSNorm(width, rngs=rngs)
    # One learned token leads every video's caption: a null caption (all padding) still has a
    # key to attend to, and any caption can say "nothing here".
    self.null = nnx.Param(_init(("embed",), nnx.initializers.normal(1.0))(
        rngs.params(), (width,)))

  def __call__(self, caption: jax.Array, mask_BSC: jax.Array) -> jax.Array:
    """``[B, S, C(, E)]`` -> ``[B, S, C, D]``."""
    B, S, C = mask_BSC.shape
    x = self.inp(caption) if self.mode == "tokens" else self.inp(caption.astype(jnp.float32))
    x = x.reshape(B * S, C, -1) + self.pos[...]
    mask = mask_BSC.reshape(B * S, C)
    for layer in self.layers:
      x = layer(x, mask)
    return self.norm(x).reshape(B, S, C, -1)

  def context(self, enc_BSCD: jax.Array, mask_BSC: jax.Array,
              segment_ids_BL: jax.Array) -> CaptionContext:
    """The cross-attention keys of a row and which video token may see which."""
    B, S, C, D = enc_BSCD.shape
    null = jnp.broadcast_to(self.null[...].astype(enc_BSCD.dtype), (B, S, 1, D))
    x_BMD = jnp.concatenate([null, enc_BSCD], axis=2).reshape(B, S * (C + 1), D)
    valid_BSM = jnp.concatenate([jnp.ones((B, S, 1), bool), mask_BSC], axis=2)
    # Key m belongs to video m // (C + 1) + 1; padding keys to none.
    key_seg_BM = jnp.where(valid_BSM, jnp.arange(1, S + 1)[None, :, None], -1).reshape(B, -1)
    return CaptionContext(x_BMD, segment_ids_BL[:, :, None] == key_seg_BM[:, None, :])


class Block(nnx.Module):
  """A DiT block: adaLN-Zero-modulated attention sublayer(s), an optional cross-attention
  sublayer to the video's caption, and the MLP."""

  def __init__(self, cfg, patterns: tuple, *, cross: bool = False, rngs: nnx.Rngs):
    """``patterns``: one per sublayer, each a pattern or a tuple of one per head; ``cross``:
    whether the block has the caption cross-attention sublayer."""
    dtype = _dtype(cfg.dtype)
    D = cfg.width
    self.patterns = patterns
    self.attn = Attention(D, cfg.num_heads, cfg.head_dim, cfg.qk_norm, dtype, rngs=rngs)
    self.attn_t = (Attention(D, cfg.num_heads, cfg.head_dim, cfg.qk_norm, dtype, rngs=rngs)
                   if len(self.patterns) == 2 else None)
    self.cross = (CrossAttention(D, cfg.num_heads, cfg.head_dim, cfg.qk_norm, dtype, rngs=rngs)
                  if cross else None)
    self.mlp = Mlp(D, int(cfg.mlp_ratio * D), dtype, rngs=rngs)
    # (shift, scale, gate) per sublayer; zero-init so every block starts as the identity.
    self.num_mods = 3 * (len(self.patterns) + 1)
    self.ada = nnx.Linear(D, self.num_mods * D, kernel_init=_init(("embed", "mlp"), _ZEROS),
                          bias_init=_init(("mlp",), _ZEROS), rngs=rngs)

  def __call__(self, x_BLD, c: "AdaInput", segment_ids_BL, ctx, cos, sin, captions=None):
    mods = jnp.split(c.per_token(self.ada, segment_ids_BL).astype(x_BLD.dtype), self.num_mods,
                     axis=-1)
    attns = [self.attn] + ([self.attn_t] if self.attn_t is not None else [])
    for i, (pattern, layer) in enumerate(zip(self.patterns, attns)):
      shift, scale, gate = mods[3 * i:3 * i + 3]
      h = layer_norm(x_BLD) * (1 + scale) + shift
      x_BLD = x_BLD + gate * layer(h, pattern, ctx, cos, sin)
    if self.cross is not None:
      x_BLD = x_BLD + self.cross(layer_norm(x_BLD), captions)
    shift, scale, gate = mods[-3:]
    x_BLD = x_BLD + gate * self.mlp(layer_norm(x_BLD) * (1 + scale) + shift)
    return constrain(x_BLD, _ACT)


class ScannedBlocks(nnx.Module):
  """``depth`` blocks as ``period`` stacks of ``depth / period`` blocks each, run by one scan over
  depth whose step applies one block of every stack in turn (``model.scan_layers``): the scan
  compiles one step, not every block. Parameters keep their names under ``stack/<j>`` with a
  leading ``layers`` axis: block ``i`` of the unscanned model is ``stack[i % period][i //
  period]`` (``convert_layers`` moves states between the two)."""

  def __init__(self, cfg, layers: list[tuple[tuple, bool]], period: int, *, rngs: nnx.Rngs):
    """``layers``: ``(patterns, cross)`` of each block; they repeat with ``period``."""
    repeats = len(layers) // period

    def stack(patterns, cross):
      @nnx.split_rngs(splits=repeats)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=repeats,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(rngs):
        return Block(cfg, patterns, cross=cross, rngs=rngs)
      return create(rngs)

    self.period = period
    self.stack = nnx.List([stack(*layers[j]) for j in range(period)])

  def __call__(self, x_BLD: jax.Array, run_block) -> jax.Array:
    """``run_block(block, x)``: one block's forward (remat applied by the caller)."""
    # A plain lax.scan over the stacks' states (merged back into blocks inside the step), not
    # nnx.scan: the model may be a value captured from an enclosing trace (the sampler's loop),
    # whose variables nnx's transforms refuse to lift.
    graphdefs, states = zip(*(nnx.split(stack) for stack in self.stack))

    def step(x, states):
      for graphdef, state in zip(graphdefs, states):
        x = run_block(nnx.merge(graphdef, state), x)
      return x, None

    return jax.lax.scan(step, x_BLD, states)[0]


class AdaInput(NamedTuple):
  """The per-video conditioning vectors adaLN reads: ``c_BSD`` at each video's timestep and,
  when some tokens are given clean (``Conditioning.frames``), ``c0_BSD`` at timestep 0 with the
  mask ``given_BL`` of those tokens: per-token timesteps at the cost of a second, per-video
  modulation."""
  c_BSD: jax.Array
  c0_BSD: jax.Array | None = None
  given_BL: jax.Array | None = None

  def per_token(self, layer, segment_ids_BL: jax.Array) -> jax.Array:
    """``layer(silu(c))`` of each token's video and timestep ``[B, L, F]``."""
    out = tokens_lib.per_token(layer(jax.nn.silu(self.c_BSD)), segment_ids_BL)
    if self.given_BL is None:
      return out
    out0 = tokens_lib.per_token(layer(jax.nn.silu(self.c0_BSD)), segment_ids_BL)
    return jnp.where(self.given_BL[..., None], out0, out)



def fractional_positions(coords_BL3: jax.Array, segment_ids_BL: jax.Array,
                         num_segments: int) -> jax.Array:
  """``[B, L, 3]``: where each token's patch centre sits in its own video, as a fraction of the
  video's grid along (t, h, w) in (0, 1); padding gets 0.5. The grids are read off the coords
  (the largest coordinate of each segment, plus one: ``layout.video_grids``' rule, traced here
  since the model sees no grids), so nothing else need be passed."""
  onehot_BLS = segment_ids_BL[:, :, None] == jnp.arange(1, num_segments + 1)
  grid_BS3 = jnp.max(jnp.where(onehot_BLS[..., None], coords_BL3[:, :, None, :] + 1, 1), axis=1)
  grid_BL3 = tokens_lib.per_token(grid_BS3.astype(jnp.float32), segment_ids_BL)
  return jnp.where(segment_ids_BL[..., None] > 0,
                   (coords_BL3.astype(jnp.float32) + 0.5) / jnp.maximum(grid_BL3, 1.0), 0.5)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of ``t`` in [0, 1] (scaled by 1000 so the low frequencies matter)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class VideoDiT(nnx.Module):
  """Denoiser ``v = f(x_t, t, label)`` on packed rows of spatiotemporal patch tokens."""

  def __init__(self, cfg, token_size: int, backend: backends_lib.Backend, *, rngs: nnx.Rngs):
    """``cfg`` is ``config.model``; ``token_size`` is P = pt*ph*pw*C; ``backend`` computes the
    attention (``backends.resolve``)."""
    layer_patterns = schedule.layer_patterns(cfg)  # raises on a bad block schedule
    D = cfg.width
    self.backend = backend
    self.cfg = cfg
    self.dtype = _dtype(cfg.dtype)
    self.token_size = token_size
    self.embed = nnx.Linear(token_size, D, kernel_init=_init(("token", "embed")),
                            bias_init=_init(("embed",), _ZEROS), dtype=self.dtype, rngs=rngs)
    self.t_freq_dim = 256
    self.t_mlp1 = nnx.Linear(self.t_freq_dim, D, kernel_init=_init((None, "embed")),
                             bias_init=_init(("embed",), _ZEROS), rngs=rngs)
    self.t_mlp2 = nnx.Linear(D, D, kernel_init=_init(("embed", "mlp")),
                             bias_init=_init(("mlp",), _ZEROS), rngs=rngs)
    # model.frac_pos: each token also gets where it sits in its video as a fraction of the
    # video's extent (sin and cos of pi * k * fraction, k = 1..frac_pos, per axis), through a
    # zero-initialised projection. RoPE alone is relative: a token can only infer that it lies
    # near the frame's left edge or late in the clip through attention, which a prompt such as
    # "moving left" (the object ends up on the left) needs at high noise, where nothing else
    # says where anything is.
    self.frac_pos = int(cfg.frac_pos)
    self.pos_embed = (nnx.Linear(6 * self.frac_pos, D, kernel_init=_init((None, "embed"), _ZEROS),
                                 use_bias=False, rngs=rngs) if self.frac_pos else None)
    # num_classes + 1 rows: the last one is the null label used for guidance. Unit scale, like
    # the timestep features' MLP output: a 0.02-scale table stays swamped by the timestep
    # embedding for thousands of steps and the label is then all but ignored.
    # With model.label_factors the table holds one row per digit value instead (and the null).
    self.label_factors = tuple(int(f) for f in cfg.get("label_factors", ()))
    rows = sum(self.label_factors) if self.label_factors else cfg.num_classes
    self.label_embed = nnx.Embed(rows + 1, D,
                                 embedding_init=_init(("vocab", "embed"),
                                                      nnx.initializers.normal(1.0)),
                                 rngs=rngs)
    captions = cfg.caption.mode != "none"
    every = int(cfg.caption.every)
    self.caption_encoder = CaptionEncoder(cfg, D, self.dtype, rngs=rngs) if captions else None
    # The caption's mean token, added to the timestep and label embedding (adaLN's input).
    self.caption_pool = (nnx.Linear(D, D, kernel_init=_init(("embed", "mlp"), _ZEROS),
                                    bias_init=_init(("mlp",), _ZEROS), rngs=rngs)
                         if captions and cfg.caption.pooled else None)
    layers = [(p, captions and i % every == 0) for i, p in enumerate(layer_patterns)]
    if cfg.scan_layers:
      self.blocks = ScannedBlocks(cfg, layers, schedule.repeat_period(layers), rngs=rngs)
    else:
      self.blocks = nnx.List([Block(cfg, p, cross=cross, rngs=rngs) for p, cross in layers])
    self.final_ada = nnx.Linear(D, 2 * D, kernel_init=_init(("embed", "mlp"), _ZEROS),
                                bias_init=_init(("mlp",), _ZEROS), rngs=rngs)
    self.final = nnx.Linear(D, token_size, kernel_init=_init(("embed", "token"), _ZEROS),
                            bias_init=_init(("token",), _ZEROS), dtype=self.dtype, rngs=rngs)

  def embed_label(self, label_BS: jax.Array) -> jax.Array:
    """``[B, S, D]``: the label's row, or with ``label_factors`` its digits' rows summed (over
    the square root of their count, so every label's embedding keeps unit scale)."""
    if not self.label_factors:
      return self.label_embed(label_BS)
    null = self.label_embed.num_embeddings - 1
    factors = self.label_factors
    total = sum(self.label_embed(sum(factors[:i]) + cond_lib.label_digit(label_BS, i, factors))
                for i in range(len(factors))) / math.sqrt(len(factors))
    is_null = (label_BS == self.cfg.num_classes)[..., None]
    return jnp.where(is_null, self.label_embed(jnp.full_like(label_BS, null)), total)

  def __call__(self, tokens_BLP: jax.Array, t_BS: jax.Array,
               cond: cond_lib.Conditioning | jax.Array, segment_ids_BL: jax.Array,
               coords_BL3: jax.Array, layouts: dict | None = None) -> jax.Array:
    """``cond``: the videos' ``Conditioning`` (a bare label array ``[B, S]`` stands for
    ``Conditioning(label=...)``); ``layouts``: what ``self.backend.prepare`` made for this batch
    (None for mask backends)."""
    cfg = self.cfg
    cond = cond_lib.as_conditioning(cond)
    x_BLD = project("blp,pd->bld", tokens_BLP.astype(self.dtype),
                    self.embed.kernel[...].astype(self.dtype))
    x_BLD = x_BLD + self.embed.bias[...].astype(self.dtype)
    if self.pos_embed is not None:
      frac_BL3 = fractional_positions(coords_BL3, segment_ids_BL, cond.label.shape[1])
      args = jnp.pi * frac_BL3[..., None] * jnp.arange(1, self.frac_pos + 1, dtype=jnp.float32)
      feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1).reshape(*frac_BL3.shape[:2], -1)
      x_BLD = x_BLD + self.pos_embed(feats).astype(self.dtype)
    x_BLD = constrain(x_BLD, _ACT)
    extra_BSD = self.embed_label(cond.label)
    captions = None
    if self.caption_encoder is not None:
      if cond.caption is None or cond.caption_mask is None:
        raise ValueError(f"model.caption.mode={cfg.caption.mode!r} needs captions: pass "
                         "Conditioning(caption=..., caption_mask=...)")
      enc_BSCD = self.caption_encoder(cond.caption, cond.caption_mask)
      captions = self.caption_encoder.context(enc_BSCD, cond.caption_mask, segment_ids_BL)
      if self.caption_pool is not None:
        m = cond.caption_mask[..., None].astype(enc_BSCD.dtype)
        pooled = jnp.sum(enc_BSCD * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)
        extra_BSD = extra_BSD + self.caption_pool(pooled)
    embed_t = lambda t: self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(
        t, self.t_freq_dim)))) + extra_BSD
    given_BL = cond_lib.given_tokens(cond, segment_ids_BL, coords_BL3)
    ada = AdaInput(embed_t(t_BS), *((embed_t(jnp.zeros_like(t_BS)), given_BL)
                                    if given_BL is not None else ()))
    angles = rope_angles(coords_BL3, cfg.head_dim, cfg.rope_theta)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    ctx = attn_lib.AttentionContext(self.backend, segment_ids_BL, coords_BL3, layouts)

    def run_block(block, x, c, captions):
      return block(x, c, segment_ids_BL, ctx, cos, sin, captions)

    if cfg.remat:
      run_block = nnx.remat(run_block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    if isinstance(self.blocks, ScannedBlocks):
      x_BLD = self.blocks(x_BLD, lambda block, x: run_block(block, x, ada, captions))
    else:
      for block in self.blocks:
        x_BLD = run_block(block, x_BLD, ada, captions)
    final_mods = ada.per_token(self.final_ada, segment_ids_BL)
    shift, scale = jnp.split(final_mods.astype(x_BLD.dtype), 2, axis=-1)
    out_BLP = self.final(layer_norm(x_BLD) * (1 + scale) + shift).astype(jnp.float32)
    if cfg.prediction == "velocity":
      return out_BLP
    t_BL = tokens_lib.per_token(t_BS.astype(jnp.float32), segment_ids_BL)
    if given_BL is not None:
      t_BL = jnp.where(given_BL, 0.0, t_BL)
    x_t = tokens_BLP.astype(jnp.float32)
    if cfg.prediction == "clean":
      return diffusion.velocity_from_clean(x_t, out_BLP, t_BL, cfg.prediction_t_min)
    return diffusion.velocity_from_edm(x_t, out_BLP, t_BL, cfg.prediction_sigma_data)


_BLOCK = re.compile(r"\['blocks'\]\[(\d+)\]")
_STACK = re.compile(r"\['blocks'\]\['stack'\]\[(\d+)\]")


def convert_layers(source: Any, target: Any) -> Any:
  """``source``'s values in ``target``'s layout, between scanned (``model.scan_layers``) and
  unscanned blocks, for any pytree that holds model states (params, EMA, optimizer moments).

  ``target`` gives the structure (arrays or ShapeDtypeStructs); each leaf takes the source leaf
  of the same path, or, under ``blocks``, the unscanned blocks stacked (``blocks[i]`` is
  ``stack[i % period][i // period]``) or a scanned stack's slice. Raises, naming the path, for a
  leaf the source does not have.
  """
  src = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  keys = [jax.tree_util.keystr(path) for path, _ in leaves]
  # The period of a scanned layout: how many stacks its paths name (None: unscanned).
  periods = [len({m.group(1) for k in ks for m in [_STACK.search(k)] if m}) or None
             for ks in (src, keys)]
  period, target_period = periods
  out = []
  for key, (_, leaf) in zip(keys, leaves):
    stacked, single = _STACK.search(key), _BLOCK.search(key)
    if key in src:
      out.append(src[key])
    elif stacked:  # unscanned source: stack the blocks this stack holds
      j, repeats, p = int(stacked.group(1)), leaf.shape[0], target_period
      names = [f"{key[:stacked.start()]}['blocks'][{g * p + j}]{key[stacked.end():]}"
               for g in range(repeats)]
      missing = [n for n in names if n not in src]
      if missing:
        raise ValueError(f"{key}: the source has no {missing[0]} (another depth?)")
      out.append(jnp.stack([src[n] for n in names]))
    elif single and period:  # scanned source: a slice of its stack
      i = int(single.group(1))
      name = f"{key[:single.start()]}['blocks']['stack'][{i % period}]{key[single.end():]}"
      if name not in src or i // period >= src[name].shape[0]:
        raise ValueError(f"{key}: the source has no block {i} (another depth?)")
      out.append(src[name][i // period])
    else:
      raise ValueError(f"{key}: no such array in the source (another model?)")
  return jax.tree_util.tree_unflatten(treedef, out)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def residual_bytes(fn, *args) -> int:
  """Bytes the forward pass of ``fn(*args)`` keeps for its backward pass (the residuals of
  ``jax.vjp``, inputs included), from shapes alone: what remat trades for recomputation,
  on any platform."""
  leaves = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(fn, *a)[1]), *args)
  return sum(x.size * x.dtype.itemsize for x in leaves)


def forward_flops(cfg, seg_grids, seq_len: int, token_size: int) -> float:
  """Analytic forward FLOPs (2 per multiply-add) of one packed row.

  Dense matmuls are counted over all L tokens (padding is computed too); attention over each
  sublayer's allowed pairs of each real video (per head for per-head patterns), so the count
  stays honest for sparse backends. Captions (``model.caption``) are counted as computed: the
  text encoder over every slot of ``seg_grids`` (``[S, 3]``, empty ones included) and each
  cross-attention sublayer's dense product of all L tokens with the row's S (C + 1) keys.
  """
  D, H, K = cfg.width, cfg.num_heads, cfg.head_dim
  hidden = int(cfg.mlp_ratio * D)
  grids = [tuple(g) for g in seg_grids if math.prod(int(v) for v in g) > 0]
  linear = attn = 0
  cross_every = int(cfg.caption.every) if cfg.caption.mode != "none" else 0
  C, S = int(cfg.caption.length), len(seg_grids)
  M = S * (C + 1)
  for i, layer in enumerate(schedule.layer_patterns(cfg)):
    linear += 2 * seq_len * (len(layer) * (D * 3 * H * K + H * K * D) + 2 * D * hidden)
    for p in layer:
      head_pairs = sum(schedule.sublayer_pairs(p, g) for g in grids)
      attn += 4 * K * (head_pairs if isinstance(p, tuple) else H * head_pairs)
    if cross_every and i % cross_every == 0:
      linear += 2 * seq_len * 2 * D * H * K + 2 * M * D * 2 * H * K
      attn += 4 * K * H * seq_len * M
  if cross_every:  # the text encoder's layers (qkv, out, MLP of 4 D; attention over C)
    linear += 2 * S * C * cfg.caption.encoder_depth * (3 * D * D + D * D + 8 * D * D)
    attn += 4 * D * S * C * C * cfg.caption.encoder_depth
  io = 2 * seq_len * token_size * D * 2
  return float(linear + attn + io)


def build_model(config, seed: int | None = None,
                backend: backends_lib.Backend | None = None) -> VideoDiT:
  """The model of a full config, parameters on the default device (shard them afterwards).

  Parameters carry logical axis names as metadata; ``sharding.param_shardings`` turns them into
  mesh shardings, so creation itself needs no mesh. ``backend``: the run's resolved attention
  backend (default: ``backends.resolve`` of the config on this platform).
  """
  token_size = tokens_lib.token_dim(config.model.patch, config.data.channels)
  if backend is None:
    backend = backends_lib.resolve(config.model, config.data.max_segments)
  with nnx.use_eager_sharding(False):
    return VideoDiT(config.model, token_size, backend,
                    rngs=nnx.Rngs(config.seed if seed is None else seed))
