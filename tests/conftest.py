"""Test setup, before jax loads: 8 simulated CPU devices, the persistent compilation cache, and
the host allocator settings the entry points apply (vdit_jax.hostmem); checks that each test
leaves no data thread or worker process running, and that the session's process exits by
itself."""

import faulthandler
import multiprocessing
import os
import sys
import threading

import pytest

# The suite's time is mostly XLA:CPU compiling hundreds of small programs, which LLVM at -O0
# compiles faster (bench/README.md, "The test suite's time"). What the tests check does not
# depend on it; the processes they start get the same flags (helpers.xla_flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from vdit_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # as train.py and sample.py do (VDIT_JAX_MALLOC=system opts out)

# Seconds the process may take to exit after the session ends (it takes a few). Past that, a
# thread that never ends (a prefetch thread stuck in a read, say) holds the interpreter's exit:
# every thread's stack is printed and the process exits with status 1.
_EXIT_LIMIT_S = 120


def pytest_unconfigure(config):
  del config
  faulthandler.dump_traceback_later(_EXIT_LIMIT_S, exit=True, file=sys.__stderr__)


@pytest.fixture(autouse=True)
def _nothing_left_running():
  """Fails a test that leaves a grain prefetch thread or a worker process running: close
  iterators (``contextlib.closing``, try/finally) in the test or its fixtures."""
  before = set(threading.enumerate())
  yield
  threads = [t.name for t in threading.enumerate()
             if t not in before and t.name.startswith("grain") and t.is_alive()]
  children = multiprocessing.active_children()
  assert not threads and not children, (
      f"the test left running: threads {threads}, processes {children}; close the iterators it "
      "opened (it.close())")
