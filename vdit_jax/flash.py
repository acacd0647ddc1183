"""Masked softmax attention computed ``chunk`` queries at a time, flash-attention style.

Why: on CPU the cost of dense attention at a few thousand tokens is not its FLOPs but its passes
over ``[B, H, L, L]`` f32 tensors (134 MB each at P0: B=2, H=4, L=2048): the logits, the mask
select, the softmax, and in the backward pass the probabilities, their gradient and the logits'
gradient each go through memory. Taking ``chunk`` queries at a time keeps one chunk's
``[B, H, chunk, L]`` logits (about 16 MB, ``target_logits`` floats) in the last-level cache from
the QK matmul to the PV matmul, and the backward pass recomputes them from the saved
log-sum-exp instead of storing probabilities: faster on CPU than ``blocksparse.attend_masked``
on the whole ``[L, L]`` (bench/README.md), with memory O(B H chunk L) instead of O(B H L^2).

Same function as ``blocksparse.attend_masked`` for every query with at least one allowed key
(in vdit-jax every query may attend to itself). Token-major layouts: ``q [B, L, H, K]``,
``k, v [B, M, H, K]``, ``mask`` broadcastable to ``[B, H, L, M]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Same finite "minus infinity" as blocksparse, so masked logits match the reference exactly.
_MASK_VALUE = -1e30
_F32 = jnp.float32


def query_chunk(batch: int, heads: int, q_len: int, k_len: int,
                target_logits: int = 4 * 2**20) -> int | None:
  """Queries per chunk so one chunk's logits hold about ``target_logits`` floats, or None.

  A power of two in [64, 512] dividing ``q_len``; None (attend to everything at once) when the
  queries would fit in fewer than two chunks, where chunking only adds loop overhead.
  """
  chunk = 512
  while chunk > 64 and chunk * batch * heads * k_len > target_logits:
    chunk //= 2
  while chunk >= 64 and q_len % chunk:
    chunk //= 2
  if chunk < 64 or q_len < 2 * chunk:
    return None
  return chunk


def _to_chunks(x: jax.Array, axis: int, chunk: int) -> jax.Array:
  """Moves ``x``'s ``axis`` (length n*chunk) to a leading axis of n chunks."""
  x = x.reshape(x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _from_chunks(x: jax.Array, axis: int) -> jax.Array:
  """Inverse of ``_to_chunks``."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _heads_major(x_BLHK: jax.Array) -> jax.Array:
  return jnp.swapaxes(x_BLHK, 1, 2)


def chunk_forward(q_BHcK, k_BHMK, v_BHMK, mask_BhcM):
  """One chunk of queries against all of ``k``/``v``: output and log-sum-exp per query."""
  logits = jnp.einsum("bhqk,bhmk->bhqm", q_BHcK, k_BHMK, preferred_element_type=_F32)
  logits = jnp.where(mask_BhcM, logits, _MASK_VALUE)
  m_BHc = logits.max(axis=-1)
  p = jnp.exp(logits - m_BHc[..., None])
  l_BHc = p.sum(axis=-1)
  # Normalised after the PV matmul: a pass over [c, K] outputs instead of [c, M] probabilities.
  o = jnp.einsum("bhqm,bhmk->bhqk", p.astype(v_BHMK.dtype), v_BHMK, preferred_element_type=_F32)
  o = (o / l_BHc[..., None]).astype(v_BHMK.dtype)
  return o, m_BHc + jnp.log(l_BHc)


def _forward(chunk, q_BHLK, k_BHMK, v_BHMK, mask):
  """Heads-major inside (``[B, H, L, K]``): every einsum then has its batch axes leading, which
  XLA:CPU's dots want; token-major chunks make it transpose each chunk's operands and outputs."""
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_BHLK.shape[2], k_BHMK.shape[2]))
  o_chunks, lse_chunks = jax.lax.map(
      lambda xs: chunk_forward(xs[0], k_BHMK, v_BHMK, xs[1]),
      (_to_chunks(q_BHLK, 2, chunk), _to_chunks(mask, 2, chunk)))
  return _from_chunks(o_chunks, 2), _from_chunks(lse_chunks, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend_chunked(chunk: int, q_BLHK: jax.Array, k_BMHK: jax.Array, v_BMHK: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """Masked softmax attention, ``chunk`` queries at a time; ``q`` comes scaled.

  ``chunk`` must divide L (``query_chunk`` picks one). Logits, softmax and the key/value
  gradient sums are f32 whatever the input dtype; the output has ``v``'s dtype.
  """
  if q_BLHK.shape[1] % chunk:
    raise ValueError(f"chunk={chunk} does not divide the {q_BLHK.shape[1]} queries: use "
                     "flash.query_chunk to pick one")
  return _fwd(chunk, q_BLHK, k_BMHK, v_BMHK, mask)[0]


def _fwd(chunk, q, k, v, mask):
  q, k, v = _heads_major(q), _heads_major(k), _heads_major(v)
  o, lse = _forward(chunk, q, k, v, mask)
  return _heads_major(o), (q, k, v, mask, o, lse)


def chunk_backward(q_BHcK, k_BHMK, v_BHMK, do_BHcK, maskT_BhMc, lse_BHc, delta_BHc,
                   kT_BHKM=None):
  """Gradients of one chunk of queries: its ``dq`` (transposed, ``[B, H, K, c]``) and its f32
  terms of ``dk`` and ``dv``.

  Recomputes the chunk's probabilities from the forward log-sum-exp; ``delta`` is ``<do, o>``
  per query (softmax backward needs ``sum_m p dp``, which equals it). Works on the transposed
  logits ``[M, c]`` (``maskT`` is the mask transposed the same way, ``kT`` the keys transposed,
  made once outside the loop when the caller can): then the ``dv`` and ``dk`` matmuls contract
  the chunk's queries as the last axis of one operand and the first of the other, the layout
  XLA:CPU's fast dot path takes, where ``p^T do`` and ``ds^T q`` on ``[c, M]`` logits fall back
  to a path about half as fast.
  """
  logits_T = jnp.einsum("bhmk,bhqk->bhmq", k_BHMK, q_BHcK, preferred_element_type=_F32)
  # Masked pairs get exactly zero probability, as in the forward pass.
  p_T = jnp.where(maskT_BhMc, jnp.exp(logits_T - lse_BHc[:, :, None, :]), 0.0)
  dv = jnp.einsum("bhmq,bhqk->bhmk", p_T.astype(v_BHMK.dtype), do_BHcK,
                  preferred_element_type=_F32)
  dp_T = jnp.einsum("bhmk,bhqk->bhmq", v_BHMK, do_BHcK, preferred_element_type=_F32)
  ds_T = (p_T * (dp_T - delta_BHc[:, :, None, :])).astype(q_BHcK.dtype)
  dk = jnp.einsum("bhmq,bhqk->bhmk", ds_T, q_BHcK, preferred_element_type=_F32)
  if kT_BHKM is None:
    kT_BHKM = jnp.swapaxes(k_BHMK, 2, 3)
  dqT = jnp.einsum("bhkm,bhmq->bhkq", kT_BHKM, ds_T)
  return dqT, dk, dv


def _bwd(chunk, res, do_BLHK):
  q, k, v, mask, o, lse_BHL = res  # heads-major
  do = _heads_major(do_BLHK).astype(q.dtype)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[2], k.shape[2]))
  # Softmax backward needs sum_m p dp per query, which equals <do, o>.
  delta_BHL = jnp.einsum("bhlk,bhlk->bhl", do.astype(_F32), o.astype(_F32))
  k_T = jnp.swapaxes(k, 2, 3)  # once, outside the loop (see chunk_backward)

  def body(carry, xs):
    dk, dv = carry
    q_c, do_c, maskT_c, lse_c, delta_c = xs
    dqT_c, dk_c, dv_c = chunk_backward(q_c, k, v, do_c, maskT_c, lse_c, delta_c, k_T)
    return (dk + dk_c, dv + dv_c), dqT_c

  zeros = jnp.zeros(k.shape, _F32)
  xs = (_to_chunks(q, 2, chunk), _to_chunks(do, 2, chunk),
        _to_chunks(jnp.swapaxes(mask, 2, 3), 3, chunk),
        _to_chunks(lse_BHL, 2, chunk), _to_chunks(delta_BHL, 2, chunk))
  (dk, dv), dqT_chunks = jax.lax.scan(body, (zeros, zeros), xs)
  dq = jnp.swapaxes(_from_chunks(dqT_chunks, 3), 2, 3)
  return (_heads_major(dq), _heads_major(dk.astype(k.dtype)), _heads_major(dv.astype(v.dtype)),
          None)


attend_chunked.defvjp(_fwd, _bwd)
