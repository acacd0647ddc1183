"""vdit-jax: video diffusion transformers in JAX/Flax NNX.

One file per concept: ``tokens`` (the token contract), ``attention`` (patterns and backends),
``model`` (the DiT), ``diffusion`` (rectified flow), ``trainer``, ``checkpoint``, ``sampler``,
``sharding``, ``config`` (every config field), ``video_io``.
"""

# Before JAX starts its threads: large XLA:CPU buffers otherwise cost a page fault per 4 KiB
# on every step (see hostmem; VDIT_JAX_MALLOC=system opts out).
from vdit_jax import hostmem as _hostmem  # noqa: E402,F401
