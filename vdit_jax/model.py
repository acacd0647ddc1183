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

import jax
import jax.numpy as jnp
from flax import nnx

from vdit_jax import attention as attn_lib
from vdit_jax import backends as backends_lib
from vdit_jax import schedule
from vdit_jax import tokens as tokens_lib
from vdit_jax.sharding import constrain

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


_split_qkv.defvjp(lambda qkv: (_split_qkv(qkv), None),
                  lambda _, g: (jnp.stack(g, axis=2),))


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
    o_BLHK = ctx.attend(pattern, q_BLHK, k_BLHK, v_BLHK)
    return project("blhk,hkd->bld", o_BLHK, self.out[...].astype(self.dtype))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, hidden, kernel_init=_init(("embed", "mlp")),
                          bias_init=_init(("mlp",), _ZEROS), dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, kernel_init=_init(("mlp", "embed")),
                          bias_init=_init(("embed",), _ZEROS), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Block(nnx.Module):
  """A DiT block: adaLN-Zero-modulated attention sublayer(s) and MLP."""

  def __init__(self, cfg, patterns: tuple, *, rngs: nnx.Rngs):
    """``patterns``: one per sublayer, each a pattern or a tuple of one per head."""
    dtype = _dtype(cfg.dtype)
    D = cfg.width
    self.patterns = patterns
    self.attn = Attention(D, cfg.num_heads, cfg.head_dim, cfg.qk_norm, dtype, rngs=rngs)
    self.attn_t = (Attention(D, cfg.num_heads, cfg.head_dim, cfg.qk_norm, dtype, rngs=rngs)
                   if len(self.patterns) == 2 else None)
    self.mlp = Mlp(D, int(cfg.mlp_ratio * D), dtype, rngs=rngs)
    # (shift, scale, gate) per sublayer; zero-init so every block starts as the identity.
    self.num_mods = 3 * (len(self.patterns) + 1)
    self.ada = nnx.Linear(D, self.num_mods * D, kernel_init=_init(("embed", "mlp"), _ZEROS),
                          bias_init=_init(("mlp",), _ZEROS), rngs=rngs)

  def __call__(self, x_BLD, c_BSD, segment_ids_BL, ctx, cos, sin):
    mods_BSF = self.ada(jax.nn.silu(c_BSD))
    mods = jnp.split(tokens_lib.per_token(mods_BSF, segment_ids_BL).astype(x_BLD.dtype),
                     self.num_mods, axis=-1)
    attns = [self.attn] + ([self.attn_t] if self.attn_t is not None else [])
    for i, (pattern, layer) in enumerate(zip(self.patterns, attns)):
      shift, scale, gate = mods[3 * i:3 * i + 3]
      h = layer_norm(x_BLD) * (1 + scale) + shift
      x_BLD = x_BLD + gate * layer(h, pattern, ctx, cos, sin)
    shift, scale, gate = mods[-3:]
    x_BLD = x_BLD + gate * self.mlp(layer_norm(x_BLD) * (1 + scale) + shift)
    return constrain(x_BLD, _ACT)


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
    # num_classes + 1 rows: the last one is the null label used for guidance. Unit scale, like
    # the timestep features' MLP output: a 0.02-scale table stays swamped by the timestep
    # embedding for thousands of steps and the label is then all but ignored.
    self.label_embed = nnx.Embed(cfg.num_classes + 1, D,
                                 embedding_init=_init(("vocab", "embed"),
                                                      nnx.initializers.normal(1.0)),
                                 rngs=rngs)
    self.blocks = nnx.List([Block(cfg, p, rngs=rngs) for p in layer_patterns])
    self.final_ada = nnx.Linear(D, 2 * D, kernel_init=_init(("embed", "mlp"), _ZEROS),
                                bias_init=_init(("mlp",), _ZEROS), rngs=rngs)
    self.final = nnx.Linear(D, token_size, kernel_init=_init(("embed", "token"), _ZEROS),
                            bias_init=_init(("token",), _ZEROS), dtype=self.dtype, rngs=rngs)

  def __call__(self, tokens_BLP: jax.Array, t_BS: jax.Array, label_BS: jax.Array,
               segment_ids_BL: jax.Array, coords_BL3: jax.Array,
               layouts: dict | None = None) -> jax.Array:
    """``layouts``: what ``self.backend.prepare`` made for this batch (None for mask backends)."""
    cfg = self.cfg
    x_BLD = project("blp,pd->bld", tokens_BLP.astype(self.dtype),
                    self.embed.kernel[...].astype(self.dtype))
    x_BLD = constrain(x_BLD + self.embed.bias[...].astype(self.dtype), _ACT)
    c_BSD = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(t_BS, self.t_freq_dim))))
    c_BSD = c_BSD + self.label_embed(label_BS)
    angles = rope_angles(coords_BL3, cfg.head_dim, cfg.rope_theta)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    ctx = attn_lib.AttentionContext(self.backend, segment_ids_BL, coords_BL3, layouts)

    def run_block(block, x, c):
      return block(x, c, segment_ids_BL, ctx, cos, sin)

    if cfg.remat:
      run_block = nnx.remat(run_block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    for block in self.blocks:
      x_BLD = run_block(block, x_BLD, c_BSD)
    final_mods = tokens_lib.per_token(self.final_ada(jax.nn.silu(c_BSD)), segment_ids_BL)
    shift, scale = jnp.split(final_mods.astype(x_BLD.dtype), 2, axis=-1)
    out_BLP = self.final(layer_norm(x_BLD) * (1 + scale) + shift)
    return out_BLP.astype(jnp.float32)


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
  stays honest for sparse backends.
  """
  D, H, K = cfg.width, cfg.num_heads, cfg.head_dim
  hidden = int(cfg.mlp_ratio * D)
  grids = [tuple(g) for g in seg_grids if math.prod(int(v) for v in g) > 0]
  linear = attn = 0
  for layer in schedule.layer_patterns(cfg):
    linear += 2 * seq_len * (len(layer) * (D * 3 * H * K + H * K * D) + 2 * D * hidden)
    for p in layer:
      head_pairs = sum(schedule.sublayer_pairs(p, g) for g in grids)
      attn += 4 * K * (head_pairs if isinstance(p, tuple) else H * head_pairs)
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
