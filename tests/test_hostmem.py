"""The host allocator settings (vdit_jax.hostmem): large XLA:CPU buffers are reused, not mapped
afresh on every call, in a process that applies them; importing vdit_jax applies nothing."""

import os
import subprocess
import sys

import pytest

from vdit_jax import hostmem

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A dot whose [64, 256, 2048] f32 output (128 MiB) XLA:CPU's dot kernel also allocates as
# scratch; prints whether importing hostmem imported jax, then the minor page faults of one call
# after warm-up. {apply} is where an entry point calls hostmem.keep_freed_memory().
_PROBE = """
import resource, sys
from vdit_jax import hostmem
jax_on_import = "jax" in sys.modules
{apply}
import vdit_jax.trainer  # everything train.py imports, before JAX starts its threads
import jax, jax.numpy as jnp
q, k = jnp.ones((64, 256, 64)), jnp.ones((64, 2048, 64))
f = jax.jit(lambda q, k: jnp.einsum("bqk,bmk->bqm", q, k).sum(-1))
jax.block_until_ready(f(q, k))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(f(q, k))
print(jax_on_import, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(apply: bool, malloc: str = "") -> int:
  env = dict(os.environ, VDIT_JAX_MALLOC=malloc, PYTHONPATH=_ROOT)
  code = _PROBE.format(apply="hostmem.keep_freed_memory()" if apply else "")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  jax_on_import, faults = out.stdout.split()[-2:]
  assert jax_on_import == "False", "importing vdit_jax.hostmem must not import jax"
  return int(faults)


# The suite's own process has them applied by conftest.py, unless the environment opts out.
@pytest.mark.skipif(not hostmem.keep_freed_memory(), reason="glibc malloc settings (Linux only)")
def test_large_buffers_are_reused_only_where_an_entry_point_applies_the_settings():
  pages = 128 * 2**20 // 4096
  # Opted out: every call faults the whole scratch buffer in again.
  if _faults(apply=True, malloc="system") < pages // 2:
    pytest.skip("this jaxlib's dot does not map its scratch afresh: nothing to compare")
  # Importing vdit_jax (trainer and all) changes nothing...
  assert _faults(apply=False) >= pages // 2
  # ...and applied first thing, as train.py does, the buffer is reused.
  assert _faults(apply=True) < pages // 20


_RELEASE_PROBE = """
from vdit_jax import hostmem
def rss_mb():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
applied = hostmem.keep_freed_memory()
import numpy as np
start = rss_mb()
blocks = [np.ones(2**20, np.uint8) for _ in range(200)]  # 200 MiB in 1 MiB mallocs
del blocks
kept = rss_mb()
released = hostmem.release_free_memory()
print(applied, released, kept - start, rss_mb() - start)
"""


@pytest.mark.skipif(not hostmem.keep_freed_memory(), reason="glibc malloc settings (Linux only)")
def test_freed_memory_is_kept_until_released():
  """With the settings applied, 200 MiB freed stays resident; release_free_memory (which the
  trainer calls at every checkpoint) hands it back."""
  env = dict(os.environ, VDIT_JAX_MALLOC="", PYTHONPATH=_ROOT)
  out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  applied, released, kept, left = out.stdout.split()[-4:]
  assert applied == released == "True"
  assert float(kept) > 150, f"only {kept} MiB of 200 freed stayed resident"
  assert float(left) < 50, f"{left} MiB of 200 freed still resident after release_free_memory"
