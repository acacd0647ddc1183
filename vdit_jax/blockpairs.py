"""Block-sparse attention over an explicit list of (query block, key block) pairs.

``blocksparse`` visits, per query block, a span of ``max_kv_blocks`` key blocks: cheap when
every list is about as long as the longest (windows, groups), wasteful when lists grow along
the row. A pattern such as ``frame_causal(-1)`` lists one key block for the first query block of
a video and every earlier block for the last, so spans cost a whole row while the pairs are
about half of it. Here the listed pairs themselves are visited, ``chunk`` pairs at a time: each
chunk's logits ``[B, H, chunk, block_q, block_k]`` are combined into per-query running maxima,
sums and outputs (online softmax), so cost follows the listed pairs and memory the chunk.

Inputs are permuted, heads-major and ``q`` scaled (as ``blocksparse`` prepares them). The backward
pass recomputes each chunk's probabilities from the forward log-sum-exp and adds its gradients
into the query and key blocks it read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdit_jax import flash

_MASK_VALUE = -1e30  # blocksparse's and flash's finite "minus infinity"
_F32 = jnp.float32


def _rows_take(x, idx):
  """Per batch row b: ``x[b, :, idx[b]]`` (blocks of every head): ``[B, H, n, ...]`` ->
  ``[B, H, c, ...]``."""
  return jax.vmap(lambda xb, ib: xb[:, ib])(x, idx)


def _rows_add(acc, idx, x):
  """Per batch row b: ``acc[b, :, idx[b]] += x[b]``, repeated indices summed."""
  return jax.vmap(lambda ab, ib, xb: ab.at[:, ib].add(xb))(acc, idx, x)


def pair_masks(pattern, seg_BL, c_BL3, block_q: int, block_k: int, pairs) -> jax.Array:
  """``[B, P, block_q, block_k]``: the allowed (query, key) pairs of each listed block pair
  (none for invalid pairs). Computed once per call: inside the loops XLA:CPU recomputes the
  coordinate tests per pair in the forward and again in the backward pass."""
  pq, pk, pv = pairs
  B, L = seg_BL.shape
  take = jax.vmap(lambda x, i: x[i])
  seg_q, c_q = seg_BL.reshape(B, -1, block_q), c_BL3.reshape(B, -1, block_q, 3)
  seg_k, c_k = seg_BL.reshape(B, -1, block_k), c_BL3.reshape(B, -1, block_k, 3)
  mask = pattern.allowed(take(seg_q, pq)[..., :, None], take(c_q, pq)[..., :, None, :],
                         take(seg_k, pk)[..., None, :], take(c_k, pk)[..., None, :, :], xp=jnp)
  return mask & pv[..., None, None]


def _blocks(q, k, v, bq, bk):
  B, H, L, K = q.shape
  return (q.reshape(B, H, L // bq, bq, K), k.reshape(B, H, L // bk, bk, K),
          v.reshape(B, H, L // bk, bk, K))


def _steps(pq, pk, mask, chunk):
  """``[B, P, ...]`` pair arrays -> ``[steps, B, chunk, ...]``, padded with masked copies."""
  P = pq.shape[1]
  pad = -P % chunk
  if pad:
    rep = lambda x: jnp.concatenate([x, jnp.zeros(x.shape[:1] + (pad,) + x.shape[2:], x.dtype)],
                                    1)
    pq, pk, mask = rep(pq), rep(pk), rep(mask)
  split = lambda x: jnp.moveaxis(x.reshape((x.shape[0], -1, chunk) + x.shape[2:]), 1, 0)
  return split(pq), split(pk), split(mask)


def _gathered(x_b, idx):
  """Blocks ``idx`` of every row, heads and pairs merged into flash's batch-like head axis:
  ``[B, H, n, b, K]`` -> ``[B, H * c, b, K]``."""
  g = _rows_take(x_b, idx)
  return g.reshape((g.shape[0], -1) + g.shape[3:])


def _per_head(x, B, H):
  """``[B, c, ...]`` per pair -> ``[B, H * c, ...]``, the same for every head."""
  return jnp.broadcast_to(x[:, None], (B, H) + x.shape[1:]).reshape((B, -1) + x.shape[2:])


def _fwd(bq, bk, chunk, q, k, v, pq, pk, mask):
  q_b, k_b, v_b = _blocks(q, k, v, bq, bk)
  B, H, N, _, K = q_b.shape

  def step(carry, xs):
    m, l, acc = carry
    pq, pk, mask = xs
    c = pq.shape[1]
    # Each pair alone (flash's chunk forward), then combined per query block by log-sum-exp.
    o_p, lse_p = flash.chunk_forward(_gathered(q_b, pq), _gathered(k_b, pk),
                                     _gathered(v_b, pk), _per_head(mask, B, H))
    o_p, lse_p = o_p.reshape(B, H, c, bq, K), lse_p.reshape(B, H, c, bq)
    m_new = jax.vmap(lambda mb, ib, xb: mb.at[:, ib].max(xb))(m, pq, lse_p)
    w_p = jnp.exp(lse_p - _rows_take(m_new, pq))
    corr = jnp.exp(m - m_new)
    return (m_new, _rows_add(l * corr, pq, w_p),
            _rows_add(acc * corr[..., None], pq, o_p.astype(_F32) * w_p[..., None])), None

  init = (jnp.full((B, H, N, bq), _MASK_VALUE, _F32), jnp.zeros((B, H, N, bq), _F32),
          jnp.zeros((B, H, N, bq, K), _F32))
  (m, l, acc), _ = jax.lax.scan(step, init, _steps(pq, pk, mask, chunk))
  # Every query attends at least to itself (padding to its own block), so l > 0.
  o = (acc / l[..., None]).astype(v.dtype).reshape(q.shape)
  return o, (q, k, v, pq, pk, mask, o, (m + jnp.log(l)).reshape(q.shape[:3]))


def _bwd(bq, bk, chunk, res, do):
  q, k, v, pq, pk, mask, o, lse = res
  q_b, k_b, v_b = _blocks(q, k, v, bq, bk)
  B, H, N, _, K = q_b.shape
  do = do.astype(q.dtype)
  delta = jnp.einsum("bhlk,bhlk->bhl", do.astype(_F32), o.astype(_F32))
  do_b = do.reshape(q_b.shape)
  lse_b, delta_b = lse.reshape(B, H, N, bq), delta.reshape(B, H, N, bq)
  kT_b = jnp.swapaxes(k_b, -1, -2)  # once, outside the loop (see flash.chunk_backward)
  maskT = jnp.swapaxes(mask, -1, -2)

  def step(carry, xs):
    dq, dk, dv = carry
    pq, pk, maskT = xs
    c = pq.shape[1]
    flat = lambda x: x.reshape((B, H * c) + x.shape[3:])
    dqT, dk_p, dv_p = flash.chunk_backward(
        _gathered(q_b, pq), _gathered(k_b, pk), _gathered(v_b, pk), _gathered(do_b, pq),
        _per_head(maskT, B, H), flat(_rows_take(lse_b, pq)), flat(_rows_take(delta_b, pq)),
        _gathered(kT_b, pk))
    unflat = lambda x: x.reshape((B, H, c) + x.shape[2:])
    dq_p = jnp.swapaxes(unflat(dqT), -1, -2)
    return (_rows_add(dq, pq, dq_p), _rows_add(dk, pk, unflat(dk_p)),
            _rows_add(dv, pk, unflat(dv_p))), None

  zeros = lambda x: jnp.zeros(x.shape, _F32)
  (dq, dk, dv), _ = jax.lax.scan(step, (zeros(q_b), zeros(k_b), zeros(v_b)),
                                 _steps(pq, pk, maskT, chunk))
  return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
          dv.reshape(v.shape).astype(v.dtype), None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def attend_pairs(block_q: int, block_k: int, chunk: int, q_BHLK, k_BHLK, v_BHLK, pair_q_BP,
                 pair_k_BP, mask_BPqk):
  """Attention of permuted, heads-major ``[B, H, L, K]`` rows (``q`` scaled) over the listed
  block pairs ``pair_q``, ``pair_k`` ``[B, P]`` with their masks (``pair_masks``). Every
  query's own block must be listed (its diagonal pair)."""
  return _fwd(block_q, block_k, chunk, q_BHLK, k_BHLK, v_BHLK, pair_q_BP, pair_k_BP,
              mask_BPqk)[0]


attend_pairs.defvjp(_fwd, _bwd)


def pair_chunk(batch: int, heads: int, block_q: int, block_k: int, pairs: int,
               target_logits: int = 4 * 2**20) -> int:
  """Pairs per chunk so one chunk's logits hold about ``target_logits`` floats."""
  per_pair = batch * heads * block_q * block_k
  return max(1, min(pairs, target_logits // per_pair))
