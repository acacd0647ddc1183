"""Which attention patterns each transformer layer applies: block types and per-layer schedules.

A block type names the patterns of its attention sublayers, in order. ``model.block`` is one
type for every layer, ``alternating`` (spatial and temporal blocks in turn over depth), or a
comma list with one type per layer. Patterns come back as ``vdit_jax.patterns`` objects; the
model, the data pipeline (which layouts a batch needs) and the FLOP count all read them here.
"""

from __future__ import annotations

from collections.abc import Sequence

from vdit_jax import patterns as pat

# Patterns per block type, one per sublayer. ``window`` stands for model.window, ``causal`` for
# frame_causal(model.causal_frames) (causal_window with model.causal_window), ``sparse`` for
# one sub-pattern per head group (model.sparse_heads, model.sparse_window).
BLOCK_PATTERNS = {
    "full3d": ("full",),
    "factorized": ("spatial", "temporal"),
    "spatial_only": ("spatial",),
    "temporal_only": ("temporal",),
    "window": ("window",),
    "sparse": ("sparse",),
    "causal3d": ("causal",),
}
# ``alternating`` is a schedule over depth, not a block: these two, in turn.
ALTERNATING = ("spatial_only", "temporal_only")
BLOCK_TYPES = tuple(BLOCK_PATTERNS) + ("alternating",)
SPARSE_HEADS = ("local", "cross", "global")

# A sublayer's pattern: one for every head, or a tuple of one per head.
Sublayer = pat.Pattern | tuple[pat.Pattern, ...]


def layer_blocks(block: str, depth: int) -> tuple[str, ...]:
  """Block type of each layer from ``model.block``."""
  names = [b.strip() for b in str(block).split(",")]
  if len(names) == 1 and names[0] == "alternating":
    return tuple(ALTERNATING[i % 2] for i in range(depth))
  bad = [b for b in names if b not in BLOCK_PATTERNS]
  if bad:
    raise ValueError(f"model.block={block!r} names unknown block types {bad}: use one of "
                     f"{BLOCK_TYPES}, or a comma list of {tuple(BLOCK_PATTERNS)} with one "
                     "entry per layer")
  if len(names) == 1:
    return tuple(names) * depth
  if len(names) != depth:
    raise ValueError(f"model.block={block!r} lists {len(names)} block types but model.depth="
                     f"{depth}: give exactly one per layer, or a single type for all")
  return tuple(names)


def sparse_head_patterns(model_cfg) -> tuple[pat.Pattern, ...]:
  """Pattern of each head of a ``sparse`` sublayer, from ``model.sparse_heads`` (sub-patterns of
  equal contiguous head groups) and ``model.sparse_window = (kt, local reach, cross reach)``."""
  names = [n.strip() for n in str(model_cfg.sparse_heads).split(",")]
  heads = int(model_cfg.num_heads)
  bad = [n for n in names if n not in SPARSE_HEADS]
  if bad or heads % len(names):
    raise ValueError(f"model.sparse_heads={model_cfg.sparse_heads!r} must be a comma list of "
                     f"{SPARSE_HEADS} whose length divides model.num_heads={heads} (each entry "
                     "is one equal group of heads)")
  window = tuple(int(v) for v in model_cfg.sparse_window)
  if len(window) != 3 or min(window) < 0:
    raise ValueError(f"model.sparse_window={tuple(model_cfg.sparse_window)} must be three "
                     "integers >= 0: (kt, local reach, cross reach)")
  kt, r_local, r_cross = window
  spec = {"local": pat.Local(kt, r_local), "cross": pat.Cross(kt, r_cross), "global": pat.Full()}
  per = heads // len(names)
  return tuple(spec[n] for n in names for _ in range(per))


def _sublayer(name: str, model_cfg) -> Sublayer:
  if name == "window":
    window = tuple(int(v) for v in model_cfg.window)
    if len(window) != 3 or min(window) < 0:
      raise ValueError(f"model.window={tuple(model_cfg.window)} must be three integers >= 0: "
                       "(kt, kh, kw)")
    return pat.window(*window)
  if name == "causal":
    kt = int(model_cfg.causal_frames)
    if kt < -1:
      raise ValueError(f"model.causal_frames={kt}: use the number of earlier frames a causal3d "
                       "block sees (>= 0), or -1 for all of them")
    reach = tuple(int(v) for v in model_cfg.causal_window)
    if not reach:
      return pat.FrameCausal(kt)
    if len(reach) != 2 or min(reach) < 0:
      raise ValueError(f"model.causal_window={reach} must be two integers >= 0, the rows and "
                       "columns a causal3d token sees either side, or () for whole frames")
    return pat.CausalWindow(kt, *reach)
  if name == "sparse":
    return sparse_head_patterns(model_cfg)
  return pat.parse(name)


def layer_patterns(model_cfg) -> tuple[tuple[Sublayer, ...], ...]:
  """Per layer, per sublayer: a pattern, or (``sparse``) a tuple of one pattern per head."""
  return tuple(tuple(_sublayer(name, model_cfg) for name in BLOCK_PATTERNS[block])
               for block in layer_blocks(model_cfg.block, int(model_cfg.depth)))


def config_patterns(model_cfg) -> tuple[pat.Pattern, ...]:
  """Every pattern the model's layers use (per head included), each once, in order of use:
  the masks or layouts a batch needs."""
  seen: list[pat.Pattern] = []
  for layer in layer_patterns(model_cfg):
    for sub in layer:
      for p in (sub if isinstance(sub, tuple) else (sub,)):
        if p not in seen:
          seen.append(p)
  return tuple(seen)


def sublayer_pairs(sublayer: Sublayer, grid) -> int:
  """Allowed (query, key) pairs of a sublayer within one video of token grid ``grid``, summed
  over heads for a per-head tuple (and for one head otherwise): analytic FLOP counts."""
  if isinstance(sublayer, tuple):
    return sum(p.pairs(grid) for p in sublayer)
  return sublayer.pairs(grid)


def repeat_period(layers: Sequence) -> int:
  """The smallest p that divides ``len(layers)`` with ``layers[i] == layers[i % p]`` for every i:
  how many consecutive layers one step of a scan over depth runs (``model.scan_layers``)."""
  n = len(layers)
  for p in range(1, n + 1):
    if n % p == 0 and all(layers[i] == layers[i % p] for i in range(n)):
      return p
  return n
