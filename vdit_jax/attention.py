"""Spatiotemporal attention patterns on packed rows, and the backends that compute them.

A pattern is a predicate over a (query, key) token pair. Every pattern also requires both tokens
to be in the same segment; padding (segment 0) forms a segment of its own, so a padding query
attends only to padding and no real token ever sees padding, while no softmax row is empty.

| pattern    | attend when                             |
| ---------- | --------------------------------------- |
| `full`     | same video                              |
| `spatial`  | same video, same t                      |
| `temporal` | same video, same (h, w)                 |

Backends compute the same function; `dense` is the reference (an explicit ``[B, L, L]`` mask).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

PATTERNS = ("full", "spatial", "temporal")
BACKENDS = ("dense",)

# A finite "minus infinity": keeps softmax NaN-free in f32 and bf16.
_MASK_VALUE = -1e30


def pattern_mask(pattern: str, segment_ids_BL: jax.Array, coords_BL3: jax.Array) -> jax.Array:
  """Boolean ``[B, L, L]`` mask: True where query l may attend to key m."""
  seg = segment_ids_BL
  mask = seg[:, :, None] == seg[:, None, :]
  if pattern == "full":
    return mask
  same = coords_BL3[:, :, None, :] == coords_BL3[:, None, :, :]  # [B, L, L, 3]
  if pattern == "spatial":
    return mask & same[..., 0]
  if pattern == "temporal":
    return mask & same[..., 1] & same[..., 2]
  raise ValueError(f"unknown attention pattern {pattern!r}: use one of {PATTERNS}")


def dense_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                    mask_BLL: jax.Array) -> jax.Array:
  """Masked softmax attention; logits and softmax in f32 whatever the input dtype.

  The backward pass is written out (``jax.custom_vjp``): it keeps the probabilities from the
  forward pass and needs one elementwise pass over ``[B, H, L, L]`` instead of the several that
  autodiff of softmax makes, which is most of the cost at these sizes on CPU.
  """
  return _dense_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL)


def _dense_fwd(q_BLHK, k_BLHK, v_BLHK, mask_BLL):
  scale = q_BLHK.shape[-1] ** -0.5
  logits_BHLL = jnp.einsum("blhk,bmhk->bhlm", q_BLHK * jnp.asarray(scale, q_BLHK.dtype), k_BLHK,
                           preferred_element_type=jnp.float32)
  logits_BHLL = jnp.where(mask_BLL[:, None], logits_BHLL, _MASK_VALUE)
  probs_BHLL = jax.nn.softmax(logits_BHLL, axis=-1).astype(v_BLHK.dtype)
  o_BLHK = jnp.einsum("bhlm,bmhk->blhk", probs_BHLL, v_BLHK)
  return o_BLHK, (q_BLHK, k_BLHK, v_BLHK, probs_BHLL, o_BLHK)


def _dense_bwd(res, do_BLHK):
  q_BLHK, k_BLHK, v_BLHK, probs_BHLL, o_BLHK = res
  scale = q_BLHK.shape[-1] ** -0.5
  f32 = jnp.float32
  dv_BLHK = jnp.einsum("bhlm,blhk->bmhk", probs_BHLL, do_BLHK.astype(probs_BHLL.dtype))
  dprobs_BHLL = jnp.einsum("blhk,bmhk->bhlm", do_BLHK, v_BLHK, preferred_element_type=f32)
  # softmax backward: dlogits = p * (dp - sum_m p dp), and sum_m p dp = <do, o> per query.
  delta_BHL = jnp.einsum("blhk,blhk->bhl", do_BLHK.astype(f32), o_BLHK.astype(f32))
  dlogits_BHLL = (probs_BHLL.astype(f32) * (dprobs_BHLL - delta_BHL[..., None])).astype(
      q_BLHK.dtype)
  dq_BLHK = jnp.einsum("bhlm,bmhk->blhk", dlogits_BHLL, k_BLHK) * jnp.asarray(scale, q_BLHK.dtype)
  dk_BLHK = jnp.einsum("bhlm,blhk->bmhk", dlogits_BHLL, q_BLHK) * jnp.asarray(scale, q_BLHK.dtype)
  return dq_BLHK, dk_BLHK, dv_BLHK.astype(v_BLHK.dtype), None


@jax.custom_vjp
def _dense_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL):
  return _dense_fwd(q_BLHK, k_BLHK, v_BLHK, mask_BLL)[0]


_dense_attention.defvjp(_dense_fwd, _dense_bwd)


class AttentionContext:
  """What a block needs to run a pattern on one packed batch, built once per forward pass.

  For the dense backend that is one mask per pattern (shared by all blocks that use it).
  """

  def __init__(self, backend: str, segment_ids_BL: jax.Array, coords_BL3: jax.Array,
               patterns: tuple[str, ...]):
    if backend not in BACKENDS:
      raise ValueError(f"unknown attention backend {backend!r}: use one of {BACKENDS}")
    self.backend = backend
    self._masks = {p: pattern_mask(p, segment_ids_BL, coords_BL3) for p in patterns}

  def attend(self, pattern: str, q_BLHK: jax.Array, k_BLHK: jax.Array,
             v_BLHK: jax.Array) -> jax.Array:
    return dense_attention(q_BLHK, k_BLHK, v_BLHK, self._masks[pattern])


def attention_fn(backend: str) -> Callable[..., jax.Array]:
  """The function computing attention for ``backend``, for callers that build their own masks."""
  if backend == "dense":
    return dense_attention
  raise ValueError(f"unknown attention backend {backend!r}: use one of {BACKENDS}")


def pattern_pairs(pattern: str, grid: tuple[int, int, int]) -> int:
  """Number of allowed (query, key) pairs of ``pattern`` within one video of token grid ``grid``.

  Used for analytic FLOP counts: attention costs 4*K FLOPs per pair and head, forward.
  """
  t, h, w = (int(g) for g in grid)
  n = t * h * w
  if pattern == "full":
    return n * n
  if pattern == "spatial":
    return n * h * w
  if pattern == "temporal":
    return n * t
  raise ValueError(f"unknown attention pattern {pattern!r}: use one of {PATTERNS}")
