"""The host allocator settings (vdit_jax.hostmem): large XLA:CPU buffers are reused, not mapped
afresh on every call."""

import os
import subprocess
import sys

import pytest

from vdit_jax import hostmem

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A dot whose [64, 256, 2048] f32 output (128 MiB) XLA:CPU's dot kernel also allocates as
# scratch; prints the minor page faults of one call after warm-up.
_PROBE = """
import resource
import vdit_jax.trainer  # everything train.py imports, before JAX starts its threads
import jax, jax.numpy as jnp
q, k = jnp.ones((64, 256, 64)), jnp.ones((64, 2048, 64))
f = jax.jit(lambda q, k: jnp.einsum("bqk,bmk->bqm", q, k).sum(-1))
jax.block_until_ready(f(q, k))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(f(q, k))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str) -> int:
  env = dict(os.environ, VDIT_JAX_MALLOC=malloc, PYTHONPATH=_ROOT)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not hostmem.APPLIED, reason="glibc malloc settings (Linux only)")
def test_large_buffers_are_reused_not_faulted_in_again():
  pages = 128 * 2**20 // 4096
  if _faults("system") < pages // 2:
    pytest.skip("this jaxlib's dot no longer maps its scratch afresh: nothing to compare")
  # Without the settings every call faults the whole scratch buffer in again; with them (the
  # default on import) it is reused.
  assert _faults("") < pages // 20
