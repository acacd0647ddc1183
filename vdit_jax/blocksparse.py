"""Block-sparse attention in portable XLA: cost follows the allowed (query, key) pairs, not L^2.

Computes the function of ``attention.dense_attention(q, k, v, pattern_mask(pattern, ...))`` for
every real token, from a host-side layout made by ``vdit_jax.layout.make_layout``:

1. tokens are permuted (``layout.perm``) into the pattern's order;
2. the rows are cut into query blocks of ``block_q`` and key blocks of ``block_k`` tokens;
3. each query block attends to the key blocks its list names (``kv_blocks``), with
   the exact per-pair predicate of ``pattern_mask`` rebuilt from the permuted segment ids and
   coordinates (``perm_segment``, ``perm_coords``);
4. the output is permuted back.

When the list may hold every key block (``Layout.whole_row``, e.g. ``full`` on one long video)
nothing can be skipped, and one dense masked matmul is used instead of blocks.

Padding queries attend to the padding keys of their own query block only (see ``layout``), so
padding outputs differ from ``dense``; real outputs and all gradients reaching real tokens'
outputs do not.

How the listed blocks are visited: each query block attends to the ``max_kv_blocks`` consecutive
key blocks from its first listed one (a slice of the keys, which every list fits in), one query
block at a time with the logits recomputed in the backward pass; a list of one block is
block-diagonal attention (no slicing at all); with ``kv_chunk``, listed blocks are gathered a
chunk at a time under an online softmax, to bound memory.

Backward pass, by custom VJPs measured faster on XLA:CPU than autodiff: the permutation's
transpose is the inverse permutation (a gather where autodiff makes a scatter-add), the key
spans' gradients are added in place, and the softmax attention backward reuses the forward
probabilities or the saved log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdit_jax import blockpairs, flash
from vdit_jax import patterns as pat
from vdit_jax.layout import Layout

# Same finite "minus infinity" as attention.dense_attention, so masked entries match exactly.
_MASK_VALUE = -1e30
# Block-diagonal blocks up to this size attend whole; larger ones (layouts grow blocks up to
# ``bounds.MAX_BLOCK`` when that makes every list one block) go query-chunked through
# ``flash.attend_chunked``.
BLOCK_DIAGONAL_WHOLE = 256
# Segment id of unused key-block slots: matches no query (real ids are > 0, padding's < 0).
_NO_SEGMENT = jnp.iinfo(jnp.int32).min
_F32 = jnp.float32


def _take_rows(x: jax.Array, idx_BL: jax.Array) -> jax.Array:
  """``x[b, idx[b, l]]`` along axis 1."""
  return jnp.take_along_axis(x, idx_BL.reshape(idx_BL.shape + (1,) * (x.ndim - 2)), axis=1)


@jax.custom_vjp
def permute(x_BL: jax.Array, perm_BL: jax.Array, inv_perm_BL: jax.Array) -> jax.Array:
  """``x[b, perm[b, i]]`` along axis 1, whose transpose is the inverse permutation (a gather)."""
  return _take_rows(x_BL, perm_BL)


permute.defvjp(lambda x, perm, inv: (_take_rows(x, perm), inv),
               lambda inv, g: (_take_rows(g, inv), None, None))


@jax.custom_vjp
def _permute_to_heads(x_BLHK: jax.Array, perm_BL: jax.Array, inv_perm_BL: jax.Array) -> jax.Array:
  """``[B, L, H, K]`` -> permuted ``[B, H, L, K]``; the transpose is again a gather."""
  return jnp.swapaxes(_take_rows(x_BLHK, perm_BL), 1, 2)


_permute_to_heads.defvjp(
    lambda x, perm, inv: (jnp.swapaxes(_take_rows(x, perm), 1, 2), inv),
    lambda inv, g: (_take_rows(jnp.swapaxes(g, 1, 2), inv), None, None))


@jax.custom_vjp
def _unpermute_from_heads(x_BHLK: jax.Array, perm_BL: jax.Array,
                          inv_perm_BL: jax.Array) -> jax.Array:
  """Inverse of ``_permute_to_heads``: permuted ``[B, H, L, K]`` -> ``[B, L, H, K]``."""
  return _take_rows(jnp.swapaxes(x_BHLK, 1, 2), inv_perm_BL)


_unpermute_from_heads.defvjp(
    lambda x, perm, inv: (_take_rows(jnp.swapaxes(x, 1, 2), inv), perm),
    lambda perm, g: (jnp.swapaxes(_take_rows(g, perm), 1, 2), None, None))


def _gather_blocks_plain(x_BHMbK: jax.Array, kv_blocks_BNJ: jax.Array) -> jax.Array:
  """Key blocks listed per query block: ``[B, H, M, bk, K]`` -> ``[B, H, N, J, bk, K]``."""
  return jax.vmap(lambda x, idx: x[:, idx])(x_BHMbK, kv_blocks_BNJ)


def _attend_fwd(specs, q, k, v, mask):
  qs, ks, ls = specs
  logits = jnp.einsum(f"{qs},{ks}->{ls}", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum(f"{ls},{ks}->{qs}", probs, v)
  return o, (q, k, v, probs, o)


def _attend_bwd(specs, res, do):
  qs, ks, ls = specs
  q, k, v, probs, o = res
  f32 = jnp.float32
  dv = jnp.einsum(f"{ls},{qs}->{ks}", probs, do.astype(probs.dtype))
  dprobs = jnp.einsum(f"{qs},{ks}->{ls}", do, v, preferred_element_type=f32)
  # Softmax backward: dlogits = p * (dp - sum_m p dp), and sum_m p dp = <do, o> per query.
  # Masked entries have p = 0 exactly, so they need no mask here.
  delta = jnp.einsum(f"{qs},{qs}->{ls[:-1]}", do.astype(f32), o.astype(f32))
  dlogits = (probs.astype(f32) * (dprobs - delta[..., None])).astype(q.dtype)
  dq = jnp.einsum(f"{ls},{ks}->{qs}", dlogits, k)
  dk = jnp.einsum(f"{ls},{qs}->{ks}", dlogits, q)
  return dq, dk, dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend_masked(specs: tuple[str, str, str], q: jax.Array, k: jax.Array, v: jax.Array,
            mask: jax.Array) -> jax.Array:
  """Masked softmax attention with einsum ``specs`` (q, k, logits), e.g. ``("bqhk", "bmhk",
  "bhqm")``; v is laid out like k, the output like q, ``mask`` broadcasts to the logits, whose
  last letter must be the key axis ``m``.

  Logits and softmax are f32. The backward pass is written out: it reuses the forward
  probabilities and makes one elementwise pass over the logits' shape, where autodiff of
  softmax makes several (most of the cost on CPU). ``q`` comes scaled.
  """
  return _attend_fwd(specs, q, k, v, mask)[0]


attend_masked.defvjp(_attend_fwd, _attend_bwd)


def pair_mask(pattern: pat.Pattern, seg_q: jax.Array, c_q: jax.Array, seg_k: jax.Array,
              c_k: jax.Array) -> jax.Array:
  """``pattern.allowed`` in jax: segments (here with padding split per block) and coordinates."""
  return pattern.allowed(seg_q, c_q, seg_k, c_k, xp=jnp)


def check_layout(lay: Layout, B: int, L: int) -> None:
  """Raises a ValueError unless ``lay`` is a layout of a ``[B, L]`` batch."""
  if not isinstance(lay, Layout):
    raise ValueError(f"expected a vdit_jax.layout.Layout, got {type(lay).__name__}: build it "
                     "with layout.make_layout or backend.prepare")
  if lay.perm.shape != (B, L) or L % lay.block_q or L % lay.block_k:
    raise ValueError(f"layout perm has shape {lay.perm.shape} (blocks {lay.block_q}, "
                     f"{lay.block_k}) but q is [B={B}, L={L}, ...]: build the layout from this "
                     "batch's segment_ids and coords")


def blocksparse_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, pattern,
                          layout: Layout, *, kv_chunk: int | None = None) -> jax.Array:
  """Masked softmax attention over the pairs ``pattern`` allows, visiting only listed blocks.

  Args:
    q_BLHK, k_BLHK, v_BLHK: queries, keys, values ``[B, L, H, K]`` in the batch's token order.
    pattern: one pattern (or its string); must be the one ``layout`` was built for.
    layout: ``layout.make_layout(pattern, segment_ids, coords, ...)`` of this batch (numpy or
      jax arrays). It carries the segment ids and coordinates (permuted), so they are not
      arguments here; its block sizes are static fields.
    kv_chunk: ``None`` visits all listed key blocks at once (fastest; memory grows with
      ``L * max_kv_blocks * block_k`` per head). An int visits them ``kv_chunk`` blocks at a time
      with an online softmax in a rematerialised ``lax.scan``, so memory grows with
      ``L * kv_chunk * block_k``; use it when ``max_kv_blocks * block_k`` is large.

  Returns:
    ``[B, L, H, K]`` in the input order and ``v``'s dtype. Logits and softmax are f32.
  """
  B, L, H, K = q_BLHK.shape
  pattern = pat.parse(pattern)
  check_layout(layout, B, L)
  if kv_chunk is not None and int(kv_chunk) < 1:
    raise ValueError(f"kv_chunk={kv_chunk} must be >= 1, or None to visit all key blocks at once")
  if kv_chunk is not None and kv_chunk >= layout.max_kv_blocks:
    kv_chunk = None  # one chunk holds every listed block
  q_BLHK = q_BLHK * jnp.asarray(K ** -0.5, q_BLHK.dtype)
  if kv_chunk is not None:
    return _chunked(pattern, layout, q_BLHK, k_BLHK, v_BLHK, int(kv_chunk))
  if layout.max_runs:
    return _visit_runs(pattern, layout, q_BLHK, k_BLHK, v_BLHK)
  if layout.max_pairs:
    return _visit_pairs(pattern, layout, q_BLHK, k_BLHK, v_BLHK)
  if layout.whole_row(L):
    return _visit_whole_row(pattern, layout, q_BLHK, k_BLHK, v_BLHK)
  if layout.block_diagonal:
    return _visit_block_diagonal(pattern, layout, q_BLHK, k_BLHK, v_BLHK)
  return _visit_spans(pattern, layout, q_BLHK, k_BLHK, v_BLHK)


# Each visit takes ``q`` scaled, in the batch's order, and returns the output in that order.
# Attention segments (padding split into one chunk per query block) and coordinates, in the
# permuted order, come precomputed in the layout: computed in the step, XLA:CPU fuses their
# gathers and index arithmetic into the pair-sized select and redoes them for every pair.


def _heads_major(lay: Layout, *xs):
  """Permuted, heads-major ``[B, H, L, K]`` copies of token-major inputs."""
  return tuple(_permute_to_heads(x, lay.perm, lay.inv_perm) for x in xs)


def _visit_pairs(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK):
  """Lists flattened into block pairs: each listed pair once (``blockpairs``)."""
  B, L, H, _ = q_BLHK.shape
  bq, bk = lay.block_q, lay.block_k
  q_BHLK, k_BHLK, v_BHLK = _heads_major(lay, q_BLHK, k_BLHK, v_BLHK)
  chunk = blockpairs.pair_chunk(B, H, bq, bk, lay.max_pairs)
  mask_BPqk = blockpairs.pair_masks(pattern, lay.perm_segment, lay.perm_coords, bq, bk,
                                    (lay.pair_q, lay.pair_k, lay.pair_valid))
  o_BHLK = blockpairs.attend_pairs(bq, bk, chunk, q_BHLK, k_BHLK, v_BHLK, lay.pair_q, lay.pair_k,
                                   mask_BPqk)
  return _unpermute_from_heads(o_BHLK, lay.perm, lay.inv_perm)


def _visit_whole_row(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK):
  """Every key block may be listed, so nothing can be skipped: one masked attention over the
  row, as in dense. Unlisted blocks hold no allowed pair, so the predicate alone gives the same
  mask. Token-major einsums here, as in dense, measured faster than heads-major ones."""
  B, L, H, _ = q_BLHK.shape
  seg_BL, c_BL3 = lay.perm_segment, lay.perm_coords
  mask_B1LL = pair_mask(pattern, seg_BL[:, None, :, None], c_BL3[:, None, :, None, :],
                        seg_BL[:, None, None, :], c_BL3[:, None, None, :, :])
  q_p, k_p, v_p = (permute(x, lay.perm, lay.inv_perm) for x in (q_BLHK, k_BLHK, v_BLHK))
  chunk = flash.query_chunk(B, H, L, L)
  if chunk is not None:
    o_BLHK = flash.attend_chunked(chunk, q_p, k_p, v_p, mask_B1LL)
  else:
    o_BLHK = attend_masked(("bqhk", "bmhk", "bhqm"), q_p, k_p, v_p, mask_B1LL)
  return permute(o_BLHK, lay.inv_perm, lay.perm)


def _visit_block_diagonal(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK):
  """A query block always lists its own block (every query may attend to itself, padding to
  its own chunk), so with one slot that is the only one: no gathers."""
  B, L, H, K = q_BLHK.shape
  b = lay.block_q
  N = L // b
  seg_BNb, c_BNb3 = lay.perm_segment.reshape(B, N, b), lay.perm_coords.reshape(B, N, b, 3)
  mask_BNqm = pair_mask(pattern, seg_BNb[..., None], c_BNb3[:, :, :, None],
                        seg_BNb[:, :, None, :], c_BNb3[:, :, None, :, :])
  chunk = flash.query_chunk(B * N, H, b, b) if b > BLOCK_DIAGONAL_WHOLE else None
  if chunk is not None:
    # Large blocks (e.g. whole 4096-token videos): query-chunked like dense, so the logits
    # of one chunk stay in cache and memory stays O(L * chunk), not O(L * block).
    q_p, k_p, v_p = (permute(x, lay.perm, lay.inv_perm).reshape(B * N, b, H, K)
                     for x in (q_BLHK, k_BLHK, v_BLHK))
    o = flash.attend_chunked(chunk, q_p, k_p, v_p, mask_BNqm.reshape(B * N, 1, b, b))
    return permute(o.reshape(B, L, H, K), lay.inv_perm, lay.perm)
  # Heads-major for blocks: the batched block matmuls then need no transposes (measured faster).
  q, k, v = (x.reshape(B, H, N, b, K) for x in _heads_major(lay, q_BLHK, k_BLHK, v_BLHK))
  o_BHNqK = attend_masked(("bhnqk", "bhnmk", "bhnqm"), q, k, v, mask_BNqm[:, None])
  return _unpermute_from_heads(o_BHNqK.reshape(B, H, L, K), lay.perm, lay.inv_perm)


def _visit_spans(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK):
  """Every listed block lies in the ``max_kv_blocks`` blocks from the first listed one (layouts
  guarantee it), so each query block attends to that span of keys: a slice, where gathering
  the listed blocks per query block measured several times slower (bench/README.md). The pair
  mask is computed once for all spans: inside the loops XLA:CPU recomputes the windows'
  coordinate tests per pair, at a few GOP/s."""
  L = q_BLHK.shape[1]
  span = lay.max_kv_blocks * lay.block_k
  start_BNR = jnp.minimum(lay.kv_blocks[..., :1] * lay.block_k, L - span)
  mask_SqM = _span_masks(pattern, span, lay.perm_segment, lay.perm_coords, start_BNR)
  o_BHLK = _ranged(span, *_heads_major(lay, q_BLHK, k_BLHK, v_BLHK), mask_SqM, start_BNR)
  return _unpermute_from_heads(o_BHLK, lay.perm, lay.inv_perm)


def _visit_runs(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK):
  """Lists cut into runs of consecutive key blocks (``Layout.run_start``): each query block
  attends to ``max_runs`` slices of ``run_blocks`` blocks, as spans do with one. Tiled orders
  need this: a query tile's keys are a few runs of tiles, one per tile row in reach, far apart
  in the row. A slice reaching past its run (runs shorter than ``run_blocks``, or moved back to
  stay inside the row) is masked to the run, so no key is counted twice."""
  L = q_BLHK.shape[1]
  bk = lay.block_k
  span = lay.run_blocks * bk
  first_BNR = lay.run_start * bk
  start_BNR = jnp.clip(first_BNR, 0, L - span)
  in_run = (first_BNR, first_BNR + lay.run_len * bk)
  mask_SqM = _span_masks(pattern, span, lay.perm_segment, lay.perm_coords, start_BNR, in_run)
  o_BHLK = _ranged(span, *_heads_major(lay, q_BLHK, k_BLHK, v_BLHK), mask_SqM, start_BNR)
  return _unpermute_from_heads(o_BHLK, lay.perm, lay.inv_perm)


def _chunked(pattern, lay: Layout, q_BLHK, k_BLHK, v_BLHK, chunk: int):
  """Online softmax over the listed key blocks, ``chunk`` blocks per ``lax.scan`` step.

  Built for memory, not speed: the listed blocks are gathered, and their gradients go back by
  the gather's transpose, a scatter-add. Memory is O(L * chunk * block_k) per head, forward and
  backward (``_online``).
  """
  B, L, H, K = q_BLHK.shape
  bq, bk = lay.block_q, lay.block_k
  N, M = L // bq, L // bk
  q_BHLK, k_BHLK, v_BHLK = _heads_major(lay, q_BLHK, k_BLHK, v_BLHK)
  kv_blocks_BNJ, kv_valid_BNJ = lay.kv_blocks, lay.kv_valid
  J = kv_blocks_BNJ.shape[-1]
  steps = -(-J // chunk)
  pad = steps * chunk - J
  if pad:  # extra slots repeat the last block and are marked unused, so they add nothing
    kv_blocks_BNJ = jnp.concatenate([kv_blocks_BNJ, kv_blocks_BNJ[..., -1:].repeat(pad, -1)], -1)
    kv_valid_BNJ = jnp.concatenate([kv_valid_BNJ, jnp.zeros_like(kv_valid_BNJ[..., :pad])], -1)
  tokens = (lay.perm_segment.reshape(B, N, bq), lay.perm_coords.reshape(B, N, bq, 3),
            lay.perm_segment.reshape(B, M, bk), lay.perm_coords.reshape(B, M, bk, 3),
            jnp.moveaxis(kv_blocks_BNJ.reshape(B, N, steps, chunk), 2, 0),
            jnp.moveaxis(kv_valid_BNJ.reshape(B, N, steps, chunk), 2, 0))
  o_BHNqK = _online(pattern, q_BHLK.reshape(B, H, N, bq, K), k_BHLK.reshape(B, H, M, bk, K),
                    v_BHLK.reshape(B, H, M, bk, K), tokens)
  return _unpermute_from_heads(o_BHNqK.reshape(B, H, N * bq, K), lay.perm, lay.inv_perm)


def _online_keys(pattern, k_BHMbK, v_BHMbK, tokens, blocks_BNc, valid_BNc):
  """The keys and values of one step's listed blocks ``[B, H, N, c*bk, K]`` and their pair mask
  with the query blocks ``[B, 1, N, bq, c*bk]``."""
  seg_q_BNq, c_q_BNq3, seg_BMb, c_BMb3 = tokens[:4]
  B, H, _, bk, K = k_BHMbK.shape
  N, c = blocks_BNc.shape[1:]
  take_blocks = jax.vmap(lambda x, idx: x[idx])
  k_g = _gather_blocks_plain(k_BHMbK, blocks_BNc).reshape(B, H, N, c * bk, K)
  v_g = _gather_blocks_plain(v_BHMbK, blocks_BNc).reshape(B, H, N, c * bk, K)
  seg_k = jnp.where(valid_BNc[..., None], take_blocks(seg_BMb, blocks_BNc), _NO_SEGMENT)
  c_k = take_blocks(c_BMb3, blocks_BNc)
  mask = pair_mask(pattern, seg_q_BNq[..., None], c_q_BNq3[:, :, :, None],
                   seg_k.reshape(B, N, 1, c * bk), c_k.reshape(B, N, 1, c * bk, 3))
  return k_g, v_g, mask[:, None]


def _online_fwd(pattern, q_BHNqK, k_BHMbK, v_BHMbK, tokens):
  B, H, N, bq, K = q_BHNqK.shape

  # Checkpointed although nothing differentiates this scan: under a remat'd block in scanned
  # layers, JAX splits the scan's body into what depends on the layer's input and what does not
  # (the pair masks, from the layout alone) and computes the latter for every step at once,
  # outside the layers' loop: a [steps, B, H, N, bq, chunk*bk] mask, O(L^2) per device. The
  # checkpoint keeps the body whole (bench/context.py measures the memory this saves).
  @jax.checkpoint
  def step(carry, xs):
    m_BHNq, l_BHNq, acc_BHNqK = carry
    k_g, v_g, mask = _online_keys(pattern, k_BHMbK, v_BHMbK, tokens, *xs)
    logits = jnp.einsum("bhnqk,bhnmk->bhnqm", q_BHNqK, k_g, preferred_element_type=_F32)
    logits = jnp.where(mask, logits, _MASK_VALUE)
    m_new = jnp.maximum(m_BHNq, logits.max(axis=-1))
    # Explicit zeros where masked: a row whose keys so far are all masked has m_new equal to the
    # mask value, and exp(mask - m_new) would be 1, not 0.
    p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
    corr = jnp.exp(m_BHNq - m_new)
    l_new = l_BHNq * corr + p.sum(axis=-1)
    acc_new = acc_BHNqK * corr[..., None] + jnp.einsum(
        "bhnqm,bhnmk->bhnqk", p.astype(v_g.dtype), v_g, preferred_element_type=_F32)
    return (m_new, l_new, acc_new), None

  init = (jnp.full((B, H, N, bq), _MASK_VALUE, _F32), jnp.zeros((B, H, N, bq), _F32),
          jnp.zeros((B, H, N, bq, K), _F32))
  (m_BHNq, l_BHNq, acc_BHNqK), _ = jax.lax.scan(step, init, tokens[4:])
  # Every query attends at least to itself, so l > 0.
  o_BHNqK = (acc_BHNqK / l_BHNq[..., None]).astype(v_BHMbK.dtype)
  lse_BHNq = m_BHNq + jnp.log(l_BHNq)
  return o_BHNqK, (q_BHNqK, k_BHMbK, v_BHMbK, tokens, o_BHNqK, lse_BHNq)


def _online_bwd(pattern, res, do_BHNqK):
  """Flash-attention's backward pass over the same steps: each step's probabilities are
  recomputed from the saved log-sum-exp, so nothing per step is kept from the forward pass (a
  scan differentiated by autodiff keeps every step's carries: O(L^2) per head)."""
  q_BHNqK, k_BHMbK, v_BHMbK, tokens, o_BHNqK, lse_BHNq = res
  do_BHNqK = do_BHNqK.astype(q_BHNqK.dtype)
  delta_BHNq = jnp.einsum("bhnqk,bhnqk->bhnq", do_BHNqK.astype(_F32), o_BHNqK.astype(_F32))
  add_blocks = jax.vmap(lambda acc, idx, x: acc.at[:, idx].add(x))  # the gather's transpose

  def step(carry, xs):
    dq_BHNqK, dk_BHMbK, dv_BHMbK = carry
    blocks_BNc = xs[0]
    k_g, v_g, mask = _online_keys(pattern, k_BHMbK, v_BHMbK, tokens, *xs)
    logits = jnp.einsum("bhnqk,bhnmk->bhnqm", q_BHNqK, k_g, preferred_element_type=_F32)
    p = jnp.where(mask, jnp.exp(logits - lse_BHNq[..., None]), 0.0)
    dv_g = jnp.einsum("bhnqm,bhnqk->bhnmk", p.astype(do_BHNqK.dtype), do_BHNqK,
                      preferred_element_type=_F32)
    dp = jnp.einsum("bhnqk,bhnmk->bhnqm", do_BHNqK, v_g, preferred_element_type=_F32)
    ds = (p * (dp - delta_BHNq[..., None])).astype(q_BHNqK.dtype)
    dq_BHNqK = dq_BHNqK + jnp.einsum("bhnqm,bhnmk->bhnqk", ds, k_g, preferred_element_type=_F32)
    dk_g = jnp.einsum("bhnqm,bhnqk->bhnmk", ds, q_BHNqK, preferred_element_type=_F32)
    B, H, N, _, K = dk_g.shape
    shape = (B, H, N, blocks_BNc.shape[-1], -1, K)
    dk_BHMbK = add_blocks(dk_BHMbK, blocks_BNc, dk_g.reshape(shape))
    dv_BHMbK = add_blocks(dv_BHMbK, blocks_BNc, dv_g.reshape(shape))
    return (dq_BHNqK, dk_BHMbK, dv_BHMbK), None

  init = (jnp.zeros(q_BHNqK.shape, _F32), jnp.zeros(k_BHMbK.shape, _F32),
          jnp.zeros(v_BHMbK.shape, _F32))
  (dq, dk, dv), _ = jax.lax.scan(step, init, tokens[4:])
  return (dq.astype(q_BHNqK.dtype), dk.astype(k_BHMbK.dtype), dv.astype(v_BHMbK.dtype),
          jax.tree.map(lambda _: None, tokens))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _online(pattern, q_BHNqK, k_BHMbK, v_BHMbK, tokens):
  """Query blocks ``[B, H, N, bq, K]`` (``q`` scaled) against the key blocks ``[B, H, M, bk,
  K]`` listed per step in ``tokens`` (the permuted segment ids and coordinates of query and key
  blocks, then the per-step block lists and their validity ``[S, B, N, c]``)."""
  return _online_fwd(pattern, q_BHNqK, k_BHMbK, v_BHMbK, tokens)[0]


_online.defvjp(_online_fwd, _online_bwd)


def _span_slices(span, x, b, start_R, axis: int = 2):
  """Row ``b`` of ``x`` at ``[start, start + span)`` along ``axis`` for each start, in order,
  concatenated: ``[B, H, L, K]`` -> ``[1, H, R * span, K]`` (or ``[B, H, K, L]`` -> ``[1, H, K,
  R * span]`` with ``axis=3``)."""
  size = (1,) + x.shape[1:axis] + (span,) + x.shape[axis + 1:]
  at = lambda start: (b,) + (0,) * (axis - 1) + (start,) + (0,) * (x.ndim - axis - 1)
  parts = [jax.lax.dynamic_slice(x, at(start_R[r]), size) for r in range(start_R.shape[0])]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _span_masks(pattern: str, span: int, seg_BL, c_BL3, start_BNR, in_run=None) -> jax.Array:
  """``[B * N, bq, R * span]``: which keys at ``[start, start + span)`` (each of the R starts of
  a query block) each query may attend; with ``in_run = (first, end)`` ``[B, N, R]``, only keys
  in ``[first, end)`` of their slice."""
  B, L = seg_BL.shape
  N, R = start_BNR.shape[1:]
  pos = start_BNR[..., None] + jnp.arange(span)  # [B, N, R, span]
  seg_k = _take_rows(seg_BL, pos.reshape(B, -1)).reshape(B * N, 1, R * span)
  c_k = _take_rows(c_BL3, pos.reshape(B, -1)).reshape(B * N, 1, R * span, 3)
  seg_q, c_q = seg_BL.reshape(B * N, -1, 1), c_BL3.reshape(B * N, -1, 1, 3)
  mask = pair_mask(pattern, seg_q, c_q, seg_k, c_k)
  if in_run is not None:
    first, end = (x[..., None] for x in in_run)
    mask &= ((pos >= first) & (pos < end)).reshape(B * N, 1, R * span)
  return mask


def _to_query_blocks(x, B, N):
  """``[B, H, L, ...]`` -> ``[B * N, H, bq, ...]``: one entry per (row, query block)."""
  x = x.reshape((B, x.shape[1], N, -1) + x.shape[3:])
  return jnp.swapaxes(x, 1, 2).reshape((B * N, x.shape[1], -1) + x.shape[4:])


def _from_query_blocks(x, B):
  """Inverse of ``_to_query_blocks``."""
  x = x.reshape((B, -1) + x.shape[1:])
  return jnp.swapaxes(x, 1, 2).reshape((B, x.shape[2], -1) + x.shape[4:])


def _ranged_fwd(span, q_BHLK, k_BHLK, v_BHLK, mask_SqM, start_BNR):
  B, H, L, K = q_BHLK.shape
  N, R = start_BNR.shape[1:]
  xs = (_to_query_blocks(q_BHLK, B, N), mask_SqM, jnp.repeat(jnp.arange(B), N),
        start_BNR.reshape(-1, R))

  def one(xs):
    q, mask, b, start_R = xs
    k, v = (_span_slices(span, x, b, start_R) for x in (k_BHLK, v_BHLK))
    o, lse = flash.chunk_forward(q[None], k, v, mask[None, None])
    return o[0], lse[0]

  o_SHqK, lse_SHq = jax.lax.map(one, xs)
  o = _from_query_blocks(o_SHqK, B)
  return o, (q_BHLK, k_BHLK, v_BHLK, mask_SqM, start_BNR, o, _from_query_blocks(lse_SHq, B))


def _ranged_bwd(span, res, do_BHLK):
  q_BHLK, k_BHLK, v_BHLK, mask_SqM, start_BNR, o_BHLK, lse_BHL = res
  B, H, L, K = q_BHLK.shape
  N, R = start_BNR.shape[1:]
  f32 = jnp.float32
  do_BHLK = do_BHLK.astype(q_BHLK.dtype)
  delta_BHL = jnp.einsum("bhlk,bhlk->bhl", do_BHLK.astype(f32), o_BHLK.astype(f32))
  xs = (_to_query_blocks(q_BHLK, B, N), _to_query_blocks(do_BHLK, B, N),
        _to_query_blocks(lse_BHL, B, N), _to_query_blocks(delta_BHL, B, N),
        jnp.swapaxes(mask_SqM, 1, 2), jnp.repeat(jnp.arange(B), N), start_BNR.reshape(-1, R))
  kT_BHKL = jnp.swapaxes(k_BHLK, 2, 3)  # once, outside the loop (see flash.chunk_backward)

  def add_spans(acc, b, start_R, x):
    for r in range(R):  # in order: overlapping slices add masked zeros, never lose a sum
      at = (b, 0, start_R[r], 0)
      old = jax.lax.dynamic_slice(acc, at, (1, H, span, K))
      acc = jax.lax.dynamic_update_slice(acc, old + x[:, :, r * span:(r + 1) * span], at)
    return acc

  def body(carry, xs):
    dk, dv = carry
    q, do, lse, delta, maskT, b, start_R = xs
    k, v = (_span_slices(span, x, b, start_R) for x in (k_BHLK, v_BHLK))
    kT = _span_slices(span, kT_BHKL, b, start_R, axis=3)
    dqT, dk_span, dv_span = flash.chunk_backward(q[None], k, v, do[None], maskT[None, None],
                                                 lse[None], delta[None], kT)
    return (add_spans(dk, b, start_R, dk_span), add_spans(dv, b, start_R, dv_span)), dqT[0]

  zeros = jnp.zeros(k_BHLK.shape, f32)
  (dk, dv), dqT_SHKq = jax.lax.scan(body, (zeros, zeros), xs)
  return (_from_query_blocks(jnp.swapaxes(dqT_SHKq, 2, 3), B), dk.astype(k_BHLK.dtype),
          dv.astype(v_BHLK.dtype), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ranged(span: int, q_BHLK, k_BHLK, v_BHLK, mask_SqM, start_BNR):
  """Each query block against the ``span`` keys from each of its R starts ``[B, N, R]``
  (heads-major, permuted, ``q`` scaled), one query block at a time: keys are sliced, not
  gathered, and the backward pass adds key and value gradients into their slices in place."""
  return _ranged_fwd(span, q_BHLK, k_BHLK, v_BHLK, mask_SqM, start_BNR)[0]


_ranged.defvjp(_ranged_fwd, _ranged_bwd)
