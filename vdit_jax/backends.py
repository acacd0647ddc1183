"""Which attention backend a run uses, decided once, and what a batch needs for it.

``resolve(model_cfg, max_segments)`` turns ``model.attention_backend`` and the platform into one
concrete ``Backend``: the trainer resolves it at start-up and hands it to the model and the data
pipeline; the sampler and the benches do the same. ``Backend.prepare`` makes what a batch
needs for it (block layouts for ``blocksparse`` and ``pallas``, nothing for ``dense`` and
``sdpa``) and ``Backend.batch_sharding`` says how that shards. No other module knows which
backends need layouts.

Host-level (numpy; jax is asked only for the default platform), so data pipelines in worker
processes can call ``prepare``. The computation itself is ``vdit_jax.attention``.
"""

from __future__ import annotations

import dataclasses

from vdit_jax import layout
from vdit_jax import patterns as pat
from vdit_jax import schedule

# What config.model.attention_backend may name; a Backend holds one of the concrete ones.
BACKENDS = ("auto", "dense", "blocksparse", "sdpa", "pallas")
CONCRETE = BACKENDS[1:]
_LAYOUT_BACKENDS = ("blocksparse", "pallas")
# The Pallas kernel of each platform that has one: splash attention on TPU, Triton on GPU.
PLATFORM_KERNELS = {"tpu": "splash", "gpu": "triton"}


@dataclasses.dataclass(frozen=True)
class Backend:
  """A concrete attention backend and its settings; hashable, so it is static under ``jit``.

  ``patterns``: every pattern the model uses (``schedule.config_patterns``). ``block``:
  ``model.attention_block`` (0 = ``bounds`` picks). ``kv_chunk``: blocksparse's key-block chunk
  (None = all at once). ``kernel``: ``pallas``'s ``(kernel, interpret)``.
  """

  name: str
  patterns: tuple[pat.Pattern, ...]
  block: int = 0
  kv_chunk: int | None = None
  kernel: tuple[str, bool] | None = None

  def __post_init__(self):
    if self.name not in CONCRETE:
      raise ValueError(f"attention backend {self.name!r} is not a concrete one: use one of "
                       f"{CONCRETE}, or resolve 'auto' with backends.resolve")
    object.__setattr__(self, "patterns", tuple(pat.parse(p) for p in self.patterns))
    if self.name == "pallas" and self.kernel is None:
      raise ValueError("the pallas backend needs kernel=(name, interpret): backends.resolve "
                       "picks the platform's")

  @property
  def needs_layouts(self) -> bool:
    return self.name in _LAYOUT_BACKENDS

  def prepare(self, segment_ids_BL, coords_BL3, grids, *, max_segments: int | None = None,
              exact: bool = False) -> dict[str, layout.Layout] | None:
    """What a packed batch needs for this backend: per-pattern layouts, or None.

    ``grids``, ``max_segments`` and ``exact`` size the layouts (``layout.batch_layouts``):
    training passes every grid its data can draw and ``data.max_segments``, so shapes are static
    and the step compiles once; one-off calls (sampling) pass ``exact=True``.
    """
    if not self.needs_layouts:
      return None
    return layout.batch_layouts(self.patterns, segment_ids_BL, coords_BL3, grids,
                                block=self.block, exact=exact, max_segments=max_segments)

  def batch_sharding(self, rows):
    """Sharding of ``prepare``'s output as a pytree prefix: every layout array is split by rows
    like the batch (``rows``), or None when there is nothing to shard."""
    return {str(p): rows for p in self.patterns} if self.needs_layouts else None


def platform_kernel(platform: str) -> tuple[str, bool]:
  """``(kernel, interpret)`` for ``platform``; raises where no Pallas kernel runs."""
  if platform not in PLATFORM_KERNELS:
    raise ValueError(f"attention_backend='pallas' runs Pallas kernels on TPU (splash attention) "
                     f"or GPU (Triton flash attention), and this platform is {platform!r}: use "
                     "'blocksparse' (or 'auto', which picks it here)")
  return PLATFORM_KERNELS[platform], False


def check_name(name: str) -> None:
  if name not in BACKENDS:
    raise ValueError(f"model.attention_backend={name!r} is unknown: use one of {BACKENDS}")


def concrete_name(name: str, patterns, max_segments: int | None, platform: str) -> str:
  """The concrete backend ``name`` stands for on ``platform``.

  ``auto``: on GPU, ``sdpa`` (cuDNN) when every pattern is ``full`` and a row holds one video
  (nothing to skip, and cuDNN takes no segment ids), else ``pallas`` (Triton); on TPU,
  ``pallas`` (splash attention); on CPU, ``blocksparse`` (bench/README.md compares it with
  ``dense``). The GPU and TPU choices are unmeasured.
  """
  check_name(name)
  if name != "auto":
    return name
  if platform == "gpu" and set(patterns) == {pat.Full()} and max_segments == 1:
    return "sdpa"
  if platform in PLATFORM_KERNELS:
    return "pallas"
  return "blocksparse"


def resolve(model_cfg, max_segments: int | None, platform: str | None = None) -> Backend:
  """The concrete backend of ``model_cfg`` on ``platform`` (default: JAX's), for rows of at
  most ``max_segments`` videos (None: unknown). Raises for ``pallas`` where no kernel runs."""
  if platform is None:
    import jax  # only here: asking for the platform starts JAX's backend
    platform = jax.default_backend()
  patterns = schedule.config_patterns(model_cfg)
  name = concrete_name(model_cfg.attention_backend, patterns, max_segments, platform)
  return Backend(name, patterns, block=int(model_cfg.attention_block),
                 kv_chunk=int(model_cfg.attention_kv_chunk) or None,
                 kernel=platform_kernel(platform) if name == "pallas" else None)
