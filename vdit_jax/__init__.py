"""vdit-jax: video diffusion transformers in JAX/Flax NNX.

One file per concept: ``tokens`` (the token contract), ``attention`` (patterns and backends),
``model`` (the DiT), ``diffusion`` (rectified flow), ``trainer``, ``checkpoint``, ``sampler``,
``sharding``, ``config`` (every config field), ``video_io``, ``hostmem`` (the host allocator
settings that the entry points apply first thing; importing the package changes nothing).
"""
