"""Measurements shared by the bench scripts (imported from their own folder, which Python puts
first on ``sys.path`` when a script runs). Nothing here changes the process."""

from __future__ import annotations

import statistics
import time


def target(name: str, value: float, op: str, goal: float) -> None:
  """Prints a target line: ``target <name>: <value> (goal <op> <goal>) PASS|FAIL``."""
  ok = value <= goal if op == "<=" else value >= goal
  print(f"target {name}: {value:.4g} (goal {op} {goal:.4g}) {'PASS' if ok else 'FAIL'}")


def loader_rate(config, workers: int, batches: int) -> float:
  """Batches per second from the training iterator with ``workers`` processes (0: one prefetch
  thread), after the first batch."""
  from data import pipeline  # here: the other scripts need no data pipeline

  c = config.copy_and_resolve_references()
  c.data.worker_count = workers
  with pipeline.make_train_iterator(c) as it:
    next(it)  # workers start and fill their buffers
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches / (time.perf_counter() - t0)


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones (the
  compile). ``fn()`` must return only once its work is done (``jax.block_until_ready``)."""
  return timed_steps(fn, repeats, warmup)[0]


def timed_steps(fn, steps: int, warmup: int = 1) -> tuple[float, list[float], float]:
  """``(median seconds, each step's seconds, cores busy)`` of ``fn()`` after ``warmup`` calls.

  Cores busy: the process's CPU time over the wall time of the timed steps, so 2.0 on two
  cores means neither idled. A profiler trace cannot tell this: the workers of XLA:CPU's
  library matmuls (its ``ynn_fusion`` operations) record no events, so their operations look
  single-threaded there.
  """
  for _ in range(warmup):
    fn()
  times = []
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  return float(statistics.median(times)), times, cores
