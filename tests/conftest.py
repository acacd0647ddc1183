"""Test setup, before jax loads: 8 simulated CPU devices, the persistent compilation cache, and
the host allocator settings the entry points apply (vdit_jax.hostmem)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # as train.py and sample.py do (VDIT_JAX_MALLOC=system opts out)
