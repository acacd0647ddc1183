"""Attention on packed rows: the backends that compute a pattern, behind one context.

Patterns (what may attend to what) are ``vdit_jax.patterns``; which backend runs is decided once
(``vdit_jax.backends.resolve``). Backends compute the same function: ``dense`` applies an
explicit ``[B, L, L]`` mask (chunked over queries on long rows, ``flash``); ``blocksparse``
computes only the key blocks a host-side layout lists (``vdit_jax.layout``); ``sdpa`` hands the
mask to ``jax.nn.dot_product_attention`` (XLA off GPU, cuDNN on GPU); ``pallas`` runs group
relations on the same layouts through Pallas kernels with segment ids (splash attention on TPU,
Triton flash attention on GPU; ``vdit_jax.kernels``) and the rest through blocksparse.

A sublayer's pattern may be a tuple of one pattern per head (block type ``sparse``, in the spirit
of Compact Attention): each group of heads sharing a pattern is computed with that pattern's
mask or layout (``AttentionContext.attend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit_jax import backends, blocksparse, flash, kernels
from vdit_jax import patterns as pat


def pattern_mask(pattern, segment_ids_BL: jax.Array, coords_BL3: jax.Array) -> jax.Array:
  """Boolean ``[B, L, L]`` mask: True where query l may attend to key m."""
  seg, c = segment_ids_BL, coords_BL3
  return pat.parse(pattern).allowed(seg[:, :, None], c[:, :, None, :], seg[:, None, :],
                                    c[:, None, :, :], xp=jnp)


def dense_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                    mask_BLL: jax.Array) -> jax.Array:
  """Masked softmax attention; logits and softmax in f32 whatever the input dtype.

  Long rows go through ``flash.attend_chunked`` (a few hundred queries at a time, so the
  ``[L, L]`` logits never exist at once); short ones through ``blocksparse.attend_masked`` (a
  written-out backward pass that reuses the forward probabilities).
  """
  B, L, H, K = q_BLHK.shape
  q_BLHK = q_BLHK * jnp.asarray(K ** -0.5, q_BLHK.dtype)
  chunk = flash.query_chunk(B, H, L, L)
  if chunk is not None:
    return flash.attend_chunked(chunk, q_BLHK, k_BLHK, v_BLHK, mask_BLL[:, None])
  return blocksparse.attend_masked(("blhk", "bmhk", "bhlm"), q_BLHK, k_BLHK, v_BLHK,
                                   mask_BLL[:, None])


def sdpa_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, mask_BLL: jax.Array,
                   implementation: str | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` with the pattern's mask.

  ``implementation``: ``"xla"`` or ``"cudnn"``; None picks cuDNN on GPU and XLA elsewhere. XLA
  materialises the ``[B, H, L, L]`` logits (no chunking), so it is a second reference rather than
  a fast path on CPU; cuDNN needs a GPU and bf16/fp16 inputs and is untested here.
  """
  if implementation is None:
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, mask=mask_BLL[:, None],
                                      implementation=implementation)


def _attend_dense(ctx, p, q, k, v):
  return dense_attention(q, k, v, ctx.masks[p])


def _attend_sdpa(ctx, p, q, k, v):
  return sdpa_attention(q, k, v, ctx.masks[p])


def _attend_blocksparse(ctx, p, q, k, v):
  return blocksparse.blocksparse_attention(q, k, v, p, ctx.layouts[str(p)],
                                           kv_chunk=ctx.backend.kv_chunk)


def _attend_pallas(ctx, p, q, k, v):
  name, interpret = ctx.backend.kernel
  return kernels.pallas_attention(q, k, v, p, ctx.layouts[str(p)], kernel=name,
                                  interpret=interpret, kv_chunk=ctx.backend.kv_chunk)


# One attend function per concrete backend (backends.CONCRETE).
_ATTEND = {"dense": _attend_dense, "sdpa": _attend_sdpa, "blocksparse": _attend_blocksparse,
           "pallas": _attend_pallas}


class AttentionContext:
  """What a block needs to run a pattern on one packed batch, built once per forward pass.

  ``dense`` and ``sdpa``: one mask per pattern, shared by every block that uses it. The others:
  the per-pattern layouts that travel in the batch (``backend.prepare``).
  """

  def __init__(self, backend: backends.Backend, segment_ids_BL: jax.Array,
               coords_BL3: jax.Array, layouts: dict | None = None):
    self.backend = backend
    self.masks, self.layouts = {}, {}
    if backend.needs_layouts:
      missing = [str(p) for p in backend.patterns if str(p) not in (layouts or {})]
      if missing:
        raise ValueError(f"attention_backend={backend.name!r} needs layouts for {missing}: "
                         "make them with backend.prepare (the data pipeline does)")
      self.layouts = {str(p): layouts[str(p)] for p in backend.patterns}
    else:
      self.masks = {p: pattern_mask(p, segment_ids_BL, coords_BL3) for p in backend.patterns}

  def attend(self, pattern, q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array
             ) -> jax.Array:
    """Attention under ``pattern``, or under ``pattern[h]`` for head h when it is a tuple."""
    if isinstance(pattern, tuple):
      return self._attend_per_head(pattern, q_BLHK, k_BLHK, v_BLHK)
    return _ATTEND[self.backend.name](self, pat.parse(pattern), q_BLHK, k_BLHK, v_BLHK)

  def _attend_per_head(self, head_patterns, q_BLHK, k_BLHK, v_BLHK):
    """Heads grouped by pattern, each group attended once, outputs put back in head order."""
    H = q_BLHK.shape[2]
    if len(head_patterns) != H:
      raise ValueError(f"{len(head_patterns)} head patterns for {H} heads: give one per head")
    groups = {}
    for h, p in enumerate(head_patterns):
      groups.setdefault(p, []).append(h)
    outs, order = [], []
    for p, heads in groups.items():
      outs.append(self.attend(p, *(_take_heads(x, heads) for x in (q_BLHK, k_BLHK, v_BLHK))))
      order += heads
    o_BLHK = jnp.concatenate(outs, axis=2)
    if order == list(range(H)):
      return o_BLHK
    inverse = [order.index(h) for h in range(H)]
    return o_BLHK[:, :, inverse]


def _take_heads(x_BLHK: jax.Array, heads: list[int]) -> jax.Array:
  """Heads ``heads`` of ``x``: a slice when they are contiguous (sparse's groups are)."""
  if heads == list(range(heads[0], heads[-1] + 1)):
    return x_BLHK[:, :, heads[0]:heads[-1] + 1]
  return x_BLHK[:, :, jnp.asarray(heads)]
