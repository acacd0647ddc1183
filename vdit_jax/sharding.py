"""Device mesh and logical-axis sharding.

Parameters and activations name their axes logically (``embed``, ``mlp``, ``heads``, ``kv``,
``batch``, ``length``, ...). One rules table in the config maps logical names to mesh axes
(``data``, ``fsdp``, ``context``, ``tensor``), so changing parallelism means editing the config
only.

Context parallelism: ``length`` maps to the ``context`` axis, so every activation of a row is
split along its tokens, and a video may cross shards. Attention alone needs whole rows: its
queries, keys and values are constrained to ``ATTENTION_QKV`` (rows whole, heads split over
``attn_heads``: the tensor and context axes), which XLA reaches with one all-to-all, and its
output goes back to token shards with another. Every pattern and backend, packed rows and
layouts included, then runs as on one device (Ulysses-style sequence parallelism).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical axes of attention's inputs and outputs: whole rows, heads split over every axis the
# rules give ``attn_heads`` (the module docstring).
ATTENTION_QKV = ("batch", None, "attn_heads", "kv")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("vdit_rules", default=None)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves config axis sizes (one may be -1 = the rest) into a shape using every device."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} do not divide {num_devices} "
                     "devices: make their product a divisor of the device count")
  if free:
    shape[free[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} of "
                     f"{num_devices} devices: set one axis to -1 or make the product "
                     f"{num_devices}")
  return tuple(shape)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape({a: mesh_config[a] for a in MESH_AXES}, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec; unknown names raise."""
  if logical is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule: add it to config.mesh.rules "
                       f"(known: {sorted(table)})")
    axes = table[name]
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis shards one dim at most
    used.update(axes_t)
    out.append(axes_t[0] if len(axes_t) == 1 else (axes_t or None))
  return P(*out)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Makes ``constrain`` active while tracing code (e.g. the train step) under a mesh."""
  token = _RULES.set(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> Rules | None:
  """The rules ``axis_rules`` made active, or None outside it."""
  return _RULES.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh or without rules."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))


def named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)
