"""Pallas attention kernels for the group patterns: splash attention (TPU), Triton flash (GPU).

``full``, ``spatial`` and ``temporal`` let a query attend to a key exactly when both are in the
same group: the same video, the same frame of a video, the same pixel track of a video. On the
rows a layout permutes (``layout.make_layout``: each group contiguous), a label per position
that changes where the group does turns each of them into plain segment-id attention, which the
kernels of ``jax.experimental.pallas.ops`` compute: ``splash`` (TPU splash attention, with a
full static mask) and ``triton`` (the GPU flash-attention kernel).

The kernels skip work by a static mask only, and a row's packing changes with every batch, so
the layout's shape decides what they run on:

- lists of one block (block-diagonal: every group inside one block, as P0's frames, short pixel
  tracks, or whole videos in blocks grown to fit them): each block is a row of its own, so the
  cost follows the blocks (blocks shorter than the kernels' tile of 128 go in runs of blocks);
- lists that may hold every block: the whole row;
- lists in between: ``blocksparse``'s spans, in XLA, which skip by data.

Patterns that are not group relations (``window``, ``local``, ``cross``, ``frame_causal``):
``blocksparse`` computes them. Padding queries attend to the padding of their own query block, as in
``blocksparse``, so real outputs and every gradient reaching them equal ``dense``'s.

Neither kernel runs on CPU except in Pallas interpret mode, which the tests use; their speed on
TPU and GPU is not measured in this repository yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdit_jax import backends, blocksparse, layout
from vdit_jax import patterns as pat
from vdit_jax import sharding as shard_lib

KERNELS = tuple(backends.PLATFORM_KERNELS.values())
# Block-diagonal rows shorter than this are batched in runs of blocks: both kernels tile by 128.
_MIN_ROW = 128
# Splash attention's blocks (and so its rows) must be multiples of this many tokens.
SPLASH_ROW = 128


def check_seq_len(kernel: str, seq_len: int) -> None:
  """Raises, naming the setting to change, unless ``kernel`` can run rows of ``seq_len``: splash
  needs a multiple of ``SPLASH_ROW`` (then every row the layouts make is one)."""
  if kernel == "splash" and seq_len % SPLASH_ROW:
    raise ValueError(f"attention_backend='pallas' runs splash attention on TPU, whose rows must "
                     f"be multiples of {SPLASH_ROW} tokens, but data.seq_len={seq_len}: use "
                     f"{-(-seq_len // SPLASH_ROW) * SPLASH_ROW}, or attention_backend="
                     "'blocksparse'")


def runs_kernel(pattern, lay: layout.Layout, seq_len: int) -> bool:
  """Whether ``pallas_attention`` hands ``pattern`` on ``lay`` to a kernel (else blocksparse):
  group relations whose lists are block-diagonal or the whole row."""
  return pat.parse(pattern).grouped and (lay.block_diagonal or lay.whole_row(seq_len))


def pallas_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, pattern,
                     lay: layout.Layout, *, kernel: str, interpret: bool = False,
                     kv_chunk: int | None = None) -> jax.Array:
  """``blocksparse.blocksparse_attention``'s function, through ``kernel`` where it can run.

  Args:
    q_BLHK, k_BLHK, v_BLHK: ``[B, L, H, K]`` in the batch's token order.
    pattern, lay: as for ``blocksparse.blocksparse_attention``.
    kernel: ``splash`` or ``triton`` (``backends.platform_kernel`` names the platform's).
    interpret: run the kernel in Pallas interpret mode (any platform; for tests).
    kv_chunk: passed to ``blocksparse`` where it computes the pattern.
  """
  if kernel not in KERNELS:
    raise ValueError(f"unknown attention kernel {kernel!r}: use one of {KERNELS}")
  B, L, H, K = q_BLHK.shape
  p = pat.parse(pattern)
  blocksparse.check_layout(lay, B, L)
  if not runs_kernel(p, lay, L):
    return blocksparse.blocksparse_attention(q_BLHK, k_BLHK, v_BLHK, p, lay, kv_chunk=kv_chunk)
  check_seq_len(kernel, L)
  row = L
  if not lay.whole_row(L):  # block-diagonal: rows of one block, or of a run of blocks up to
    row = lay.block_q       # the kernel tile (with L a multiple of 128, runs reach 128)
    while row < _MIN_ROW and L % (2 * row) == 0:
      row *= 2
  perm_BL, inv_perm_BL = lay.perm, lay.inv_perm
  labels_BL = layout.group_labels(p, lay.perm_segment, lay.perm_coords, xp=jnp)
  labels_RT = labels_BL.reshape(-1, row)
  q_RTHK, k_RTHK, v_RTHK = (blocksparse.permute(x, perm_BL, inv_perm_BL).reshape(-1, row, H, K)
                            for x in (q_BLHK, k_BLHK, v_BLHK))
  run = functools.partial(_KERNELS[kernel], interpret=interpret)
  o_RTHK = _sharded(run)(q_RTHK, k_RTHK, v_RTHK, labels_RT)
  return blocksparse.permute(o_RTHK.reshape(B, L, H, K), inv_perm_BL, perm_BL)


def _sharded(run):
  """``run`` per shard under the active mesh and axis rules (Pallas calls cannot be
  partitioned by XLA): rows split like the batch and whole, heads like ``attn_heads``
  (``sharding.ATTENTION_QKV``); ``run`` itself outside a mesh."""
  rules = shard_lib.current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty or mesh.size == 1:
    return run
  qkv = shard_lib.logical_to_spec(shard_lib.ATTENTION_QKV, rules)
  labels = shard_lib.logical_to_spec(shard_lib.ATTENTION_QKV[:2], rules)
  return jax.shard_map(run, in_specs=(qkv, qkv, qkv, labels), out_specs=qkv, check_vma=False)


def _tile(n: int, cap: int) -> int:
  """The largest power of two up to ``cap`` that divides ``n`` (``n`` itself if none above 1)."""
  tile = cap
  while tile > 1 and n % tile:
    tile //= 2
  return tile if tile > 1 else n


# The Pallas kernels are imported where they run: importing them costs every process about
# 0.1 s, and on CPU (no kernel) nothing uses them.


def _splash_kernel(row: int, heads: int, interpret: bool):
  """Made per trace: the kernel holds arrays of the trace that builds it."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  t = _tile(row, 512)
  sizes = splash.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t,
                            block_kv_dkv=t, block_kv_dkv_compute=t, block_q_dq=t, block_kv_dq=t)
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((row, row))] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _run_splash(q_RTHK, k_RTHK, v_RTHK, labels_RT, *, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
  _, T, H, K = q_RTHK.shape
  kernel = _splash_kernel(T, H, interpret)
  q_RTHK = q_RTHK * jnp.asarray(K ** -0.5, q_RTHK.dtype)  # splash does not scale the logits

  def one(q_THK, k_THK, v_THK, labels_T):
    heads_major = lambda x: jnp.swapaxes(x, 0, 1)
    o_HTK = kernel(heads_major(q_THK), heads_major(k_THK), heads_major(v_THK),
                   segment_ids=SegmentIds(q=labels_T, kv=labels_T))
    return heads_major(o_HTK)

  return jax.vmap(one)(q_RTHK, k_RTHK, v_RTHK, labels_RT)


def _run_triton(q_RTHK, k_RTHK, v_RTHK, labels_RT, *, interpret):
  from jax.experimental.pallas.ops.gpu import attention as triton_attention
  T, K = q_RTHK.shape[1], q_RTHK.shape[3]
  t, tb = _tile(T, 128), _tile(T, 32)
  sizes = triton_attention.BlockSizes(block_q=t, block_k=t, block_q_dkv=tb, block_kv_dkv=tb,
                                      block_q_dq=tb, block_kv_dq=tb)
  return triton_attention.mha(q_RTHK, k_RTHK, v_RTHK, labels_RT, sm_scale=K ** -0.5,
                              block_sizes=sizes, interpret=interpret)


_KERNELS = {"splash": _run_splash, "triton": _run_triton}
