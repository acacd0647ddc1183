"""The `sdpa` backend against dense, and how `auto` resolves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_blocksparse import ROWS, WINDOWED, packed, random_qkv
from vdit_jax import attention, backends, patterns, schedule
from tests import helpers


def attend_and_grads(backend, pattern, seg, coords, dtype=jnp.float32):
  """Outputs and gradients of q, k, v of a weighted sum over real outputs, jitted."""
  q, k, v, w = (x.astype(dtype) for x in random_qkv(seg))

  def loss(q, k, v):
    ctx = attention.AttentionContext(backends.Backend(backend, (pattern,)), jnp.asarray(seg),
                                     jnp.asarray(coords))
    out = ctx.attend(pattern, q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("pattern", ("full", "spatial", "temporal") + WINDOWED)
def test_sdpa_xla_matches_dense(pattern):
  """Packed rows of odd grids with padding: outputs (padding included) and gradients."""
  seg, coords = packed()
  out_d, g_d = attend_and_grads("dense", pattern, seg, coords)
  out_s, g_s = attend_and_grads("sdpa", pattern, seg, coords)
  np.testing.assert_allclose(out_s, out_d, atol=1e-5)
  for name, gd, gs in zip("qkv", g_d, g_s):
    assert float(jnp.abs(gd).max()) > 0
    np.testing.assert_allclose(gs, gd, atol=1e-5, err_msg=f"d loss / d {name}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_sdpa_cudnn_matches_dense_on_gpu():
  """Full attention, one video per row, bf16 (what cuDNN takes): real outputs and gradients."""
  seg, coords = packed([[g] for g in ROWS[1]], seq_len=64)
  real = (seg > 0)[:, :, None, None]
  out_d, g_d = attend_and_grads("dense", "full", seg, coords, jnp.bfloat16)
  out_s, g_s = attend_and_grads("sdpa", "full", seg, coords, jnp.bfloat16)
  np.testing.assert_allclose(np.where(real, out_s, 0).astype(np.float32),
                             np.where(real, out_d, 0).astype(np.float32), atol=2e-2)
  for gd, gs in zip(g_d, g_s):
    np.testing.assert_allclose(np.asarray(gs, np.float32), np.asarray(gd, np.float32),
                               atol=5e-2)


def test_auto_resolves_per_platform():
  full, fact = ("full",), schedule.BLOCK_PATTERNS["factorized"]
  full, fact = [tuple(map(patterns.parse, x)) for x in (full, fact)]
  resolve = backends.concrete_name
  assert resolve("auto", full, 1, "gpu") == "sdpa"  # unpacked full attention: cuDNN
  assert resolve("auto", full, 4, "gpu") == "pallas"  # packed rows: Triton with segment ids
  assert resolve("auto", fact, 1, "gpu") == "pallas"
  assert resolve("auto", full, 1, "tpu") == "pallas"  # splash attention
  assert resolve("auto", full, 1, "cpu") == "blocksparse"
  assert resolve("dense", full, 4, "gpu") == "dense"  # a named backend stays
  with pytest.raises(ValueError, match="attention_backend='flash' is unknown"):
    resolve("flash", full, 1, "cpu")
  cfg = helpers.tiny_config("factorized", **{"model.attention_backend": "auto"}).model
  here = backends.resolve(cfg, 2)  # this machine's
  assert here.name in ("sdpa", "pallas", "blocksparse")
  assert here.patterns == fact and here.needs_layouts == (here.name != "sdpa")
  with pytest.raises(ValueError, match="resolve 'auto'"):
    backends.Backend("auto", full)
