"""Query-chunked attention (vdit_jax/flash.py) computes the dense reference's function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import attention, blocksparse, flash, tokens

# Four videos of odd grids in one 256-token row and three in the other, with padding at the end:
# chunks of 64 queries cut through videos and frames.
ROWS = [[(3, 5, 7), (2, 6, 5), (1, 4, 4)], [(4, 3, 9), (2, 5, 5), (3, 3, 3), (1, 2, 7)]]
L, H, K = 256, 2, 16


def packed_masks():
  items = [[{"tokens": np.zeros((tokens.num_tokens(g), 1), np.float32), "grid": g} for g in row]
           for row in ROWS]
  b = tokens.pack_rows(items, L, max_segments=4, token_size=1)
  seg, coords = jnp.asarray(b["segment_ids"]), jnp.asarray(b["coords"])
  assert 0 < int((seg == 0).sum()) < seg.size  # both rows hold padding
  return seg, {p: attention.pattern_mask(p, seg, coords)[:, None]
               for p in ("full", "spatial", "temporal")}


def reference(q, k, v, mask):
  return blocksparse.attend_masked(("blhk", "bmhk", "bhlm"), q, k, v, mask)


@pytest.mark.parametrize("pattern", ["full", "spatial", "temporal"])
def test_chunked_equals_reference_forward_and_gradients(pattern):
  seg, masks = packed_masks()
  mask = masks[pattern]
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, w = (jax.random.normal(key, (2, L, H, K)) for key in keys)
  o_ref = reference(q, k, v, mask)
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, mask) * w))
  chunked = jax.jit(lambda q, k, v, m: flash.attend_chunked(64, q, k, v, m))
  np.testing.assert_allclose(chunked(q, k, v, mask), o_ref, atol=2e-6)
  g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  g_chunked = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_chunked, g_ref):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_chunked_bfloat16_tracks_float32():
  _, masks = packed_masks()
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (2, L, H, K)) for key in keys)
  o16 = flash.attend_chunked(128, *(x.astype(jnp.bfloat16) for x in (q, k, v)), masks["full"])
  assert o16.dtype == jnp.bfloat16
  err = float(jnp.abs(o16.astype(jnp.float32) - reference(q, k, v, masks["full"])).max())
  assert 0 < err < 0.05


def test_dense_attention_takes_the_chunked_path_on_long_rows():
  """At L=1024 dense_attention chunks its queries and still equals the whole-row softmax."""
  rng = np.random.default_rng(0)
  seg = jnp.asarray(np.repeat(np.arange(1, 5), 256)[None], jnp.int32)
  mask_BLL = seg[:, :, None] == seg[:, None, :]
  q, k, v = (jnp.asarray(rng.standard_normal((1, 1024, 2, 8)), jnp.float32) for _ in range(3))
  assert flash.query_chunk(1, 2, 1024, 1024) is not None
  jaxpr = str(jax.make_jaxpr(attention.dense_attention)(q, k, v, mask_BLL))
  assert "custom_vjp_call" in jaxpr and "scan" in jaxpr  # lax.map over query chunks
  o = attention.dense_attention(q, k, v, mask_BLL)
  np.testing.assert_allclose(o, reference(q * 8 ** -0.5, k, v, mask_BLL[:, None]), atol=2e-6)


def test_query_chunk_divides_and_bounds_the_logits():
  for B, H, L in [(2, 4, 2048), (1, 16, 8192), (8, 4, 1024), (2, 4, 1536)]:
    chunk = flash.query_chunk(B, H, L, L)
    assert chunk is not None and L % chunk == 0 and 64 <= chunk <= 512
    assert chunk * B * H * L <= 4 * 2**20 or chunk == 64
  assert flash.query_chunk(2, 4, 2048, 2048) == 256
  assert flash.query_chunk(2, 4, 96, 96) is None  # fewer than two chunks: no loop
  assert flash.query_chunk(1, 1, 1000, 1000) is None  # no power of two >= 64 divides 1000
  with pytest.raises(ValueError, match="does not divide"):
    flash.attend_chunked(64, *(jnp.zeros((1, 100, 1, 2)),) * 3, jnp.ones((1, 1, 100, 100), bool))
