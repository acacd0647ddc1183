"""Spatiotemporal attention patterns on packed rows, and the backends that compute them.

A pattern is a predicate over a (query, key) token pair. Every pattern also requires both tokens
to be in the same segment; padding (segment 0) forms a segment of its own, so a padding query
attends only to padding and no real token ever sees padding, while no softmax row is empty.
With ``dt, dh, dw`` the absolute coordinate differences and ``reach(dt) = r >> dt`` (``r``
halved per frame of distance, rounded down):

| pattern             | attend when (and same video)                                        |
| ------------------- | ------------------------------------------------------------------- |
| `full`              | always                                                              |
| `spatial`           | dt = 0                                                              |
| `temporal`          | dh = 0 and dw = 0                                                   |
| `window(kt,kh,kw)`  | dt <= kt, dh <= kh, dw <= kw                                        |
| `local(kt,r)`       | dt <= kt, dh <= reach(dt), dw <= reach(dt)                          |
| `cross(kt,r)`       | dt <= kt, and (dh = 0, dw <= reach(dt)) or (dw = 0, dh <= reach(dt)) |

The per-head sparse pattern (block type ``sparse``, in the spirit of Compact Attention) gives
each equal group of heads one of ``local``, ``cross`` (same row or column) or ``global``
(``full``), the first two with a spatial reach that halves per frame of distance; a sublayer
pattern is then a tuple of one pattern per head, and each group of heads sharing a pattern is
computed with that pattern's mask or layout (``AttentionContext.attend``).

Backends compute the same function: `dense` is the reference (an explicit ``[B, L, L]`` mask);
`blocksparse` computes only the key blocks a host-side layout lists (``vdit_jax.layout``); `sdpa`
hands the mask to ``jax.nn.dot_product_attention`` (XLA off GPU, cuDNN on GPU); `pallas` runs
``full``, ``spatial`` and ``temporal`` on the same layouts through Pallas kernels with segment ids
(splash attention on TPU, Triton flash attention on GPU; ``vdit_jax.kernels``) and the rest
through blocksparse. `auto` stands for one of them per platform and row shape
(``resolve_backend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit_jax import blocksparse, flash, kernels, layout

PATTERNS = layout.PATTERNS
# What config.model.attention_backend may name; AttentionContext takes the concrete ones.
BACKENDS = ("auto", "dense", "blocksparse", "sdpa", "pallas")


def resolve_backend(backend: str, patterns: tuple[str, ...], max_segments: int,
                    platform: str | None = None) -> str:
  """The concrete backend that ``backend`` stands for on ``platform`` (default: JAX's).

  ``auto``: on GPU, ``sdpa`` (cuDNN) when every pattern is ``full`` and a row holds one video
  (nothing to skip, and cuDNN has no segment ids), else ``pallas`` (Triton); on TPU, ``pallas``
  (splash attention); on CPU, ``blocksparse``. On CPU blocksparse measured faster than dense on
  the default config's rows (aligned blocks of 256: the width-128 step 0.85x dense's) and with
  factorized (bench/README.md); the GPU and TPU choices are unmeasured. ``pallas`` on CPU raises
  (its kernels run there only in interpret mode, for tests). Other names come back unchanged.
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}: use one of {BACKENDS}")
  platform = platform or jax.default_backend()
  if backend == "pallas":
    kernels.platform_kernel(platform)  # raises where no kernel runs
  if backend != "auto":
    return backend
  if platform == "gpu" and set(patterns) == {"full"} and max_segments == 1:
    return "sdpa"
  if platform in ("gpu", "tpu"):
    return "pallas"
  return "blocksparse"


def pattern_mask(pattern: str, segment_ids_BL: jax.Array, coords_BL3: jax.Array) -> jax.Array:
  """Boolean ``[B, L, L]`` mask: True where query l may attend to key m.

  The predicate is ``blocksparse.pair_mask``, the one the blocksparse backend applies per block.
  """
  seg, c = segment_ids_BL, coords_BL3
  return blocksparse.pair_mask(pattern, seg[:, :, None], c[:, :, None, :], seg[:, None, :],
                               c[:, None, :, :])


def dense_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                    mask_BLL: jax.Array) -> jax.Array:
  """Masked softmax attention; logits and softmax in f32 whatever the input dtype.

  Long rows go through ``flash.attend_chunked`` (a few hundred queries at a time, so the
  ``[L, L]`` logits never exist at once); short ones through ``blocksparse.attend_masked`` (a
  written-out backward pass that reuses the forward probabilities), which the blocksparse
  backend shares, so the two differ only in which pairs they visit.
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


class AttentionContext:
  """What a block needs to run a pattern on one packed batch, built once per forward pass.

  ``dense`` and ``sdpa``: one mask per pattern, shared by every block that uses it.
  ``blocksparse`` and ``pallas``: the per-pattern layouts that travel in the batch
  (``layout.batch_layouts``). ``backend`` must be concrete: resolve ``auto`` with
  ``resolve_backend`` first. ``kernel``: ``pallas``'s ``(kernel, interpret)``, by default the
  platform's (``kernels.platform_kernel``).
  """

  def __init__(self, backend: str, segment_ids_BL: jax.Array, coords_BL3: jax.Array,
               patterns: tuple[str, ...], layouts: dict | None = None,
               kv_chunk: int | None = None, kernel: tuple[str, bool] | None = None):
    if backend not in BACKENDS[1:]:
      raise ValueError(f"attention backend {backend!r} is not a concrete one: use one of "
                       f"{BACKENDS[1:]}, or resolve 'auto' with resolve_backend")
    self.backend = backend
    if backend in ("blocksparse", "pallas"):
      missing = [p for p in patterns if p not in (layouts or {})]
      if missing:
        raise ValueError(f"attention_backend={backend!r} needs layouts for {missing}: build "
                         "them with vdit_jax.layout.batch_layouts (the data pipeline does)")
      self._layouts = {p: layouts[p] for p in patterns}
      self._kv_chunk = kv_chunk
      if backend == "pallas":
        self._kernel = kernel or kernels.platform_kernel()
    else:
      self._masks = {p: pattern_mask(p, segment_ids_BL, coords_BL3) for p in patterns}

  def attend(self, pattern: str | tuple[str, ...], q_BLHK: jax.Array, k_BLHK: jax.Array,
             v_BLHK: jax.Array) -> jax.Array:
    """Attention under ``pattern``, or under ``pattern[h]`` for head h when it is a tuple."""
    if isinstance(pattern, tuple):
      return self._attend_per_head(pattern, q_BLHK, k_BLHK, v_BLHK)
    if self.backend == "blocksparse":
      return blocksparse.blocksparse_attention(q_BLHK, k_BLHK, v_BLHK, pattern,
                                               self._layouts[pattern], kv_chunk=self._kv_chunk)
    if self.backend == "pallas":
      name, interpret = self._kernel
      return kernels.pallas_attention(q_BLHK, k_BLHK, v_BLHK, pattern, self._layouts[pattern],
                                      kernel=name, interpret=interpret, kv_chunk=self._kv_chunk)
    if self.backend == "sdpa":
      return sdpa_attention(q_BLHK, k_BLHK, v_BLHK, self._masks[pattern])
    return dense_attention(q_BLHK, k_BLHK, v_BLHK, self._masks[pattern])

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


def _pairs_1d(n: int, k: int) -> int:
  """Ordered pairs (i, j) in range(n) with abs(i - j) <= k."""
  k = min(k, n - 1)
  return n + 2 * (k * n - k * (k + 1) // 2)


def pattern_pairs(pattern: str | tuple[str, ...], grid: tuple[int, int, int]) -> int:
  """Allowed (query, key) pairs of ``pattern`` within one video of token grid ``grid``, exactly
  (windows clipped at the video's borders); for a per-head tuple, summed over its heads.

  Used for analytic FLOP counts: attention costs 4*K FLOPs per pair and head, forward.
  """
  if isinstance(pattern, tuple):
    return sum(pattern_pairs(p, grid) for p in pattern)
  t, h, w = (int(g) for g in grid)
  n = t * h * w
  name, args = layout.parse_pattern(pattern)
  if name == "full":
    return n * n
  if name == "spatial":
    return n * h * w
  if name == "temporal":
    return n * t
  if name == "window":
    kt, kh, kw = args
    return _pairs_1d(t, kt) * _pairs_1d(h, kh) * _pairs_1d(w, kw)
  kt, r = args
  total = 0
  for dt in range(-min(kt, t - 1), min(kt, t - 1) + 1):
    reach = int(layout.spatial_reach(r, abs(dt)))
    if name == "local":
      plane = _pairs_1d(h, reach) * _pairs_1d(w, reach)
    else:  # cross: the row and the column through each query, the query counted once
      plane = h * _pairs_1d(w, reach) + w * _pairs_1d(h, reach) - h * w
    total += (t - abs(dt)) * plane
  return total
