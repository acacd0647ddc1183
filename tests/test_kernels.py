"""The pallas backend (vdit_jax.kernels) against dense, with its kernels in Pallas interpret mode.

Splash attention (TPU) and the Triton flash kernel (GPU) cannot run natively here; interpret
mode runs the same kernel code on CPU, so what is checked is the mapping (permuted rows, group
labels as segment ids, block-diagonal rows, sharding), not the kernels' speed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.test_blocksparse import PATTERNS, ROWS, allowed_np, packed, random_qkv
from vdit_jax import attention, backends, blocksparse, kernels, layout
from vdit_jax import patterns
from vdit_jax import sharding as shard_lib
from tests import helpers

# One row of two odd videos and padding (70 of 128 tokens); one of three whose groups never
# straddle a 16-block, so every list is one block (block-diagonal rows, in runs of 128).
WHOLE_ROWS = [ROWS[0]]
ALIGNED_ROWS = [[(1, 4, 4), (4, 2, 2), (2, 2, 4)]]


def kernel_fn(pattern, kernel):
  return lambda q, k, v, lay: kernels.pallas_attention(q, k, v, pattern, lay, kernel=kernel,
                                                       interpret=True)


def assert_kernel_matches_dense(pattern, kernel, rows, block, max_kv_blocks=None):
  seg, coords = packed(rows)
  lay = layout.make_layout(pattern, seg, coords, block, block, max_kv_blocks)
  lay = jax.tree.map(jnp.asarray, lay)
  assert kernels.runs_kernel(pattern, lay, seg.shape[1])
  q, k, v, w = random_qkv(seg)
  mask = attention.pattern_mask(pattern, jnp.asarray(seg), jnp.asarray(coords))
  dense = lambda q, k, v: attention.dense_attention(q, k, v, mask)
  fn = kernel_fn(pattern, kernel)
  real = (seg > 0)[:, :, None, None]
  o = jax.jit(fn)(q, k, v, lay)
  np.testing.assert_allclose(np.where(real, o, 0), np.where(real, dense(q, k, v), 0), atol=2e-5)
  g_dense = jax.grad(lambda q, k, v: jnp.sum(dense(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
  g = jax.jit(jax.grad(lambda q, k, v, lay: jnp.sum(fn(q, k, v, lay) * w),
                       argnums=(0, 1, 2)))(q, k, v, lay)
  for name, gd, gk in zip("qkv", g_dense, g):
    np.testing.assert_allclose(gk, gd, atol=2e-5, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("kernel", kernels.KERNELS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_whole_row_matches_dense(kernel, pattern):
  """Lists that may hold every block: the kernel runs on the whole permuted row."""
  assert_kernel_matches_dense(pattern, kernel, WHOLE_ROWS, 32, max_kv_blocks=4)


@pytest.mark.parametrize("kernel", kernels.KERNELS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_block_diagonal_matches_dense(kernel, pattern):
  """Lists of one block: the kernel runs on runs of 16-token blocks (rows of 128)."""
  seg, coords = packed(ALIGNED_ROWS)
  assert layout.make_layout(pattern, seg, coords, 16, 16).kv_blocks.shape[-1] == 1
  assert_kernel_matches_dense(pattern, kernel, ALIGNED_ROWS, 16)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_group_labels_are_the_pattern(pattern):
  """Equal labels exactly where the pattern allows the pair, among real tokens."""
  seg, coords = packed()
  lay = layout.make_layout(pattern, seg, coords, 16, 16)
  labels = np.asarray(layout.group_labels(patterns.parse(pattern), jnp.asarray(lay.perm_segment),
                                          jnp.asarray(lay.perm_coords), xp=jnp))
  seg_p = np.take_along_axis(seg, lay.perm, 1)
  allowed = allowed_np(pattern, seg_p, np.take_along_axis(coords, lay.perm[..., None], 1))
  real = (seg_p > 0)[:, :, None] & (seg_p > 0)[:, None, :]
  same = labels[:, :, None] == labels[:, None, :]
  np.testing.assert_array_equal(same & real, allowed & real)


def test_other_lists_and_windows_go_to_blocksparse():
  """Lists between one block and the whole row, and windowed patterns, are blocksparse's."""
  seg, coords = packed()
  partial = layout.make_layout("full", seg, coords, 16, 16, 5)
  assert not kernels.runs_kernel("full", partial, seg.shape[1])
  window = layout.make_layout("window(1,1,2)", seg, coords, 16, 16, 8)
  assert not kernels.runs_kernel("window(1,1,2)", window, seg.shape[1])
  # Not a group relation, whatever its lists: no segment-id form for the kernels.
  causal = layout.make_layout("frame_causal(-1)", seg, coords, 16, 16, 8)
  assert causal.whole_row(seg.shape[1])
  assert not kernels.runs_kernel("frame_causal(-1)", causal, seg.shape[1])
  q, k, v, _ = random_qkv(seg)
  for pattern, lay in (("full", partial), ("window(1,1,2)", window)):
    np.testing.assert_array_equal(
        kernels.pallas_attention(q, k, v, pattern, lay, kernel="triton", interpret=True),
        blocksparse.blocksparse_attention(q, k, v, pattern, lay))


def test_sharded_matches_unsharded():
  """Under a mesh the kernel runs per shard (rows over data x fsdp, heads over tensor)."""
  rows = ALIGNED_ROWS * 4
  seg, coords = packed(rows)
  lay = jax.tree.map(jnp.asarray, layout.make_layout("spatial", seg, coords, 16, 16))
  q, k, v, _ = random_qkv(seg)
  fn = jax.jit(kernel_fn("spatial", "triton"))
  expected = fn(q, k, v, lay)
  # As the trainer makes it (automatic axes): shard_map inside jit reshards its inputs.
  mesh = shard_lib.make_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("attn_heads", ("tensor", "context")),
           ("length", None), ("kv", None))
  with jax.set_mesh(mesh), shard_lib.axis_rules(rules):
    spec = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    got = fn(*(jax.device_put(x, spec) for x in (q, k, v)), lay)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_pallas_only_where_a_kernel_runs():
  """(``auto``'s choices per platform: tests/test_attention.py.)"""
  cfg = helpers.tiny_config(**{"model.attention_backend": "pallas"}).model
  assert backends.resolve(cfg, 4, platform="gpu").kernel == ("triton", False)
  assert backends.platform_kernel("tpu") == ("splash", False)
  with pytest.raises(ValueError, match="'pallas'.*'cpu'.*use 'blocksparse'"):
    backends.resolve(cfg, 4, platform="cpu")
  with pytest.raises(ValueError, match="unknown attention kernel"):
    seg, coords = packed()
    lay = layout.make_layout("full", seg, coords, 16, 16)
    kernels.pallas_attention(*random_qkv(seg)[:3], "full", lay, kernel="cuda")


def test_splash_refuses_rows_it_cannot_tile_naming_the_fix():
  """Splash's blocks must be multiples of 128 tokens: a 400-token row (a temporal layout keeps
  16-token blocks there) is refused before the kernel is built, naming the seq_len to use; a
  384-token row of the same blocks runs, in runs of blocks of 128, equal to dense."""
  with pytest.raises(ValueError, match=r"data.seq_len=400: use 512"):
    kernels.check_seq_len("splash", 400)
  kernels.check_seq_len("triton", 400)  # Triton tiles any power-of-two divisor
  rows = [[(4, 2, 2), (4, 4, 4), (4, 2, 4)]]  # tracks of 4 in 16-blocks: block-diagonal
  for seq_len, ok in ((400, False), (384, True)):
    seg, coords = packed(rows, seq_len)
    lay = jax.tree.map(jnp.asarray, layout.make_layout("temporal", seg, coords, 16, 16))
    assert kernels.runs_kernel("temporal", lay, seq_len) and lay.block_diagonal
    q, k, v, _ = random_qkv(seg)
    fn = jax.jit(kernel_fn("temporal", "splash"))
    if not ok:
      with pytest.raises(ValueError, match="multiples of 128"):
        fn(q, k, v, lay)
      continue
    mask = attention.pattern_mask("temporal", jnp.asarray(seg), jnp.asarray(coords))
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, fn(q, k, v, lay), 0),
                               np.where(real, attention.dense_attention(q, k, v, mask), 0),
                               atol=2e-5)
