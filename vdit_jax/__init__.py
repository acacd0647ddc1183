"""vdit-jax: video diffusion transformers in JAX/Flax NNX.

One file per concept: ``tokens`` (the token contract); ``patterns`` (what may attend to what),
``schedule`` (patterns per layer), ``bounds`` and ``layout`` (host-side block layouts),
``backends`` (which backend runs, and what a batch needs for it), ``attention`` (the backends'
computation, with ``flash``, ``blocksparse``, ``blockpairs`` and ``kernels``); ``model`` (the
DiT), ``diffusion`` (rectified flow), ``trainer``, ``checkpoint``, ``sampler``, ``sharding``,
``config`` (every config field), ``video_io``, ``hostmem`` (the host allocator
settings that the entry points apply first thing; importing the package changes nothing).
"""
