"""Host allocator settings that keep XLA:CPU's large buffers from costing page faults.

XLA:CPU's dot kernels (YNNPACK) allocate scratch buffers of about the output's size with
``malloc`` on every call, from a worker thread. glibc serves a request that large from a fresh
``mmap`` (worker threads' arenas cannot grow past 64 MiB, and then map memory whatever
``M_MMAP_MAX`` says) and unmaps it on ``free``, so every call touches new pages: one minor page
fault per 4 KiB, a large share of a CPU train step's time (bench/README.md has the numbers).

``keep_freed_memory`` has every thread allocate from glibc's main arena (the one heap that grows
in place), never map single allocations, and keep freed memory (up to 2 GiB free at the top of
the heap) for reuse instead of returning it to the system. The process then holds on to about
its peak host memory until it exits, which a training or sampling process would reach again
at its next step anyway.

It changes the whole process, so a library import never calls it: the entry points do
(``train.py``, ``sample.py``, ``bench/*.py``, and ``tests/conftest.py`` so the tests run as
they do), first thing, unless the environment sets ``VDIT_JAX_MALLOC=system``. It must run
before JAX starts its thread pools (before the first computation): threads that have already
allocated keep their own arenas. This module imports nothing but the standard library (no jax),
so calling it at the top of a script is early enough.

The price of keeping freed memory is that glibc never gives back what bursts of small
allocations leave behind: a checkpoint save (orbax and tensorstore, in several threads) frees
most of what it allocates, but the freed chunks stay scattered in the one heap, the next save
finds no hole in the right place, and the heap grows by some KB per save. ``release_free_memory``
(``malloc_trim``: merge the free chunks, hand their pages back) undoes that. The trainer calls it
once per checkpoint, so the page faults of touching the released memory again come once per
``train.ckpt_every`` steps, not every step (bench/README.md, ``bench/soak.py``).
"""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))


def keep_freed_memory() -> bool:
  """Applies the settings above to this process; returns whether they apply (Linux with glibc
  only, and not opted out). Calling it again changes nothing."""
  if os.environ.get("VDIT_JAX_MALLOC", "").lower() == "system":
    return False
  if not _is_glibc():
    return False
  # The process's own symbols, libc's among them (find_library would run ldconfig: 12 ms).
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def release_free_memory() -> bool:
  """Merges glibc's free chunks and returns their pages to the system (``malloc_trim(0)``);
  returns whether it could (Linux with glibc only). Safe to call at any time from any thread."""
  if not _is_glibc():
    return False
  trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
  if trim is None:
    return False
  trim.argtypes = (ctypes.c_size_t,)
  trim(0)
  return True


def _is_glibc() -> bool:
  # confstr answers at once (platform.libc_ver() scans the Python binary: 6 ms per import); only
  # glibc knows the name, elsewhere (macOS, musl, Windows) it is missing or raises.
  if not hasattr(os, "confstr"):
    return False
  try:
    return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
  except (ValueError, OSError):  # the name or the value is unknown to this libc
    return False

