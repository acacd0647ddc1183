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
  """Masked softmax attention; logits and softmax in f32 whatever the input dtype."""
  scale = q_BLHK.shape[-1] ** -0.5
  logits_BHLL = jnp.einsum("blhk,bmhk->bhlm", q_BLHK * jnp.asarray(scale, q_BLHK.dtype), k_BLHK,
                           preferred_element_type=jnp.float32)
  logits_BHLL = jnp.where(mask_BLL[:, None], logits_BHLL, _MASK_VALUE)
  probs_BHLL = jax.nn.softmax(logits_BHLL, axis=-1).astype(v_BLHK.dtype)
  return jnp.einsum("bhlm,bmhk->blhk", probs_BHLL, v_BLHK)


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
