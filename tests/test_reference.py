"""Every backend and every pattern against an independent reference.

The reference shares no code with the library's attention: its predicates are written out here
from the pattern table (vdit_jax/patterns.py's docstring), parsed from the config strings by this
file, and attention is one einsum, a ``where`` on the mask, a softmax and one einsum, in float32
at the highest matmul precision, differentiated by JAX. Rows are packed from odd grids with
padding; outputs are compared on real tokens and gradients of a loss that reads real outputs
only (padding outputs are not part of the contract, see vdit_jax/layout.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import attention, backends, layout, tokens

# Odd grids, several videos per row, padding after each row's videos (L = 128).
ROWS = [[(3, 5, 2), (2, 3, 7)], [(2, 3, 7), (1, 4, 4), (3, 2, 3)]]
L, H, K = 128, 2, 8
PATTERNS = ("full", "spatial", "temporal", "window(1,1,2)", "local(1,3)", "cross(1,4)",
            "frame_causal(-1)", "frame_causal(1)")
# Per-head patterns (the ``sparse`` block type): one per head.
HEADS = ("local(1,3)", "frame_causal(0)")
# blocksparse twice: the training layouts (spans of key blocks) and lists flattened into pairs.
BACKENDS = ("dense", "sdpa", "blocksparse", "blocksparse_pairs", "pallas")


def reference_allowed(pattern: str, c_q: np.ndarray, c_k: np.ndarray) -> bool:
  """Whether a query at ``c_q`` may attend to a key at ``c_k`` of the same video."""
  name, _, rest = pattern.partition("(")
  args = [int(a) for a in rest.rstrip(")").split(",")] if rest else []
  dt, dh, dw = (int(k) - int(q) for q, k in zip(c_q, c_k))
  if name == "full":
    return True
  if name == "spatial":
    return dt == 0
  if name == "temporal":
    return dh == 0 and dw == 0
  if name == "window":
    return abs(dt) <= args[0] and abs(dh) <= args[1] and abs(dw) <= args[2]
  if name == "frame_causal":
    return dt <= 0 and (args[0] == -1 or -dt <= args[0])
  kt, r = args
  reach = r // 2 ** abs(dt)
  if abs(dt) > kt:
    return False
  if name == "local":
    return abs(dh) <= reach and abs(dw) <= reach
  assert name == "cross", name
  return (dh == 0 and abs(dw) <= reach) or (dw == 0 and abs(dh) <= reach)


def reference_mask(pattern: str, seg_L: np.ndarray, coords_L3: np.ndarray) -> np.ndarray:
  """``[L, L]``: same segment (padding with padding) and the pattern's predicate."""
  n = len(seg_L)
  mask = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      if seg_L[q] == seg_L[k]:
        mask[q, k] = seg_L[q] == 0 or reference_allowed(pattern, coords_L3[q], coords_L3[k])
  return mask


def reference_attention(q_BLHK, k_BLHK, v_BLHK, mask_BHLL):
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("blhk,bmhk->bhlm", q_BLHK, k_BLHK, precision=hi) / np.sqrt(K)
  p = jax.nn.softmax(jnp.where(mask_BHLL, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhlm,bmhk->blhk", p, v_BLHK, precision=hi)


def packed_rows():
  seg = np.zeros((len(ROWS), L), np.int32)
  coords = np.zeros((len(ROWS), L, 3), np.int32)
  for b, row in enumerate(ROWS):
    pos = 0
    for s, grid in enumerate(row, 1):
      n = tokens.num_tokens(grid)
      seg[b, pos:pos + n], coords[b, pos:pos + n] = s, tokens.grid_coords(grid)
      pos += n
  return seg, coords


def inputs(seg, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, w = (jax.random.normal(key, seg.shape + (H, K)) for key in keys)
  return q, k, v, w * (seg > 0)[:, :, None, None]


def head_masks(head_patterns, seg, coords):
  return np.stack([np.stack([reference_mask(p, seg[b], coords[b]) for p in head_patterns])
                   for b in range(len(seg))])


@pytest.fixture(scope="module")
def rows():
  seg, coords = packed_rows()
  masks = {p: head_masks((p,) * H, seg, coords) for p in PATTERNS}
  masks[HEADS] = head_masks(HEADS, seg, coords)
  return seg, coords, masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS + (HEADS,))
def test_backend_matches_the_reference(backend, pattern, rows):
  seg, coords, masks = rows
  heads = pattern if isinstance(pattern, tuple) else (pattern,)
  # pallas runs its GPU kernel in Pallas interpret mode here; blocks of 16 so that lists are
  # neither one block nor the whole row.
  name = backend.removesuffix("_pairs")
  be = backends.Backend(name, heads, block=16,
                        kernel=("triton", True) if name == "pallas" else None)
  # The layouts training makes: static bounds for rows packed from these grids.
  grids = sorted({g for row in ROWS for g in row})
  layouts = be.prepare(seg, coords, grids, max_segments=3)
  if backend.endswith("_pairs"):
    layouts = {p: layout.make_layout(p, seg, coords, 16, 16, max_pairs=None) for p in layouts}
    assert all(lay.max_pairs for lay in layouts.values())
  q, k, v, w = inputs(seg)
  real = (seg > 0)[:, :, None, None]

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * w), out

  def under_test(q, k, v):
    ctx = attention.AttentionContext(be, jnp.asarray(seg), jnp.asarray(coords), layouts)
    return ctx.attend(pattern, q, k, v)

  mask = jnp.asarray(masks[pattern])
  reference = lambda q, k, v: reference_attention(q, k, v, mask)
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
  (_, out), g = grad(under_test)
  (_, out_ref), g_ref = grad(reference)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, out_ref, 0), atol=2e-5)
  for name, a, b in zip("qkv", g, g_ref):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d loss / d {name}")


def test_reference_masks_are_neither_empty_nor_full(rows):
  """Each pattern on these rows allows some pairs of a video and forbids others, so the
  comparisons above can tell patterns apart; no real row is empty."""
  seg, _, masks = rows
  real = seg > 0
  same_video = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
  for pattern, m in masks.items():
    if pattern != "full":
      assert (same_video[:, None] & ~m).any(), pattern
    assert m.any(-1).all(), pattern  # every query sees at least itself
  np.testing.assert_array_equal(masks["full"][:, 0], same_video | (~real[:, :, None]
                                                                   & ~real[:, None, :]))
  # frame_causal is not symmetric: some pair is allowed one way only.
  m = masks["frame_causal(-1)"]
  assert (m & ~np.swapaxes(m, -1, -2)).any()
