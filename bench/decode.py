"""Decoding speed of the video_folder source, read from one thread and from several at once.

  python bench/decode.py [--quick] [--items 200] [--repeats 3] [--budget 60] [--folder DIR]

Writes (or, with ``--folder``, reads what is already in DIR) clips of 24 frames of 32x48 pixels
in mp4 (H.264), webm (VP9), gif and npy, and reads them with ``configs/folder.py``'s settings
(8 frames at stride 2, about 32x32 pixels, three aspect ratios). Prints:

- per format, decoding the 8 frames an item needs, as stored (``files._read_frames``): ms per
  clip from one thread (median over the clips and ``--repeats`` rounds), and clips/s from 1 and
  from 4 threads at once;
- source items/s (decode, resize, crop: ``FolderSource.__getitem__``, all formats in turn) from
  1 thread and from 4 threads at once, on an otherwise idle process and with a jitted JAX
  computation running beside them on XLA's threads (as in training, where grain's prefetch
  thread reads items while the step runs);
- batches/s of the training iterator with 2 grain worker processes (``data.worker_count=2``)
  and with one prefetch thread (``worker_count=0``).

Readers start nothing new after ``--budget`` seconds; one still busy a budget later is reported
as stuck (deadlocked or crawling), and the measurements after it are skipped.

Targets: 4-thread / 1-thread source items/s, idle and with JAX computing beside (reading from
several threads must not be much slower than from one), and ms per item from one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import folder  # noqa: E402
from data import files  # noqa: E402
import common  # noqa: E402  (bench/common.py)

FORMATS = ("mp4", "webm", "gif", "npy")
CLIPS_PER_FORMAT = 8
CLIP_SHAPE = (24, 32, 48, 3)  # frames, H, W, C
THREADS = (1, 4)


def write_clips(root: str, clips: int) -> None:
  """``clips`` smooth moving clips per format (codecs need realistic content to be realistic)."""
  import imageio.v2 as imageio

  from vdit_jax import video_io

  t, y, x = np.meshgrid(*(np.arange(n) for n in CLIP_SHAPE[:3]), indexing="ij")
  for i in range(clips):
    wave = np.sin((x + 2 * t + 3 * i) / 5.0) + np.cos((y - t + i) / 4.0)
    v = np.stack([wave, wave[:, ::-1], wave[:, :, ::-1]], -1) * 60 + 128
    v = v.clip(0, 255).astype(np.uint8)
    stem = os.path.join(root, f"clip{i:02d}")
    video_io.encode(f"{stem}.mp4", v, 8, "libx264")
    video_io.encode(f"{stem}.webm", v, 8, "libvpx-vp9", {"crf": "30", "b": "0"})
    imageio.mimwrite(f"{stem}.gif", list(v), duration=125, loop=0)
    np.save(f"{stem}.npy", v)


def folder_config(root: str, quick: bool):
  c = folder.get_config()
  c.unlock()
  c.data.path = root
  if quick:
    c.model.depth = 1
  return c


def read_clip(path: str) -> np.ndarray:
  """The 8 frames at stride 2 that an item of configs/folder.py reads, as stored."""
  return files._read_frames(path, 0, 8, 2)


def decode_ms(paths: list[str], repeats: int) -> float:
  """Median ms of ``read_clip`` over ``paths``, ``repeats`` rounds, one thread."""
  times = []
  for _ in range(repeats):
    for p in paths:
      t0 = time.perf_counter()
      read_clip(p)
      times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def rate(fn: Callable[[Any], Any], jobs: list, threads: int,
         budget_s: float) -> tuple[float, int, int]:
  """``(jobs/s, jobs done, readers stuck)``: ``threads`` threads call ``fn`` on ``jobs`` at
  once. Readers take no new job after ``budget_s``; a reader still busy ``budget_s`` after that
  is counted as stuck and left behind (daemon threads)."""
  lock = threading.Lock()
  queue = list(reversed(jobs))
  deadline = time.perf_counter() + budget_s
  done = [0]

  def reader():
    while time.perf_counter() < deadline:
      with lock:
        if not queue:
          return
        job = queue.pop()
      fn(job)
      with lock:
        done[0] += 1

  t0 = time.perf_counter()
  readers = [threading.Thread(target=reader, daemon=True) for _ in range(threads)]
  for r in readers:
    r.start()
  for r in readers:
    r.join(timeout=max(0.0, deadline + budget_s - time.perf_counter()))
  return done[0] / (time.perf_counter() - t0), done[0], sum(r.is_alive() for r in readers)


class JaxBeside:
  """A jitted computation (matmul + tanh on XLA's threads) run in a loop by a background
  thread while the block is open."""

  def __enter__(self):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.tanh(a @ a) * 0.5)
    a = jnp.ones((384, 384), jnp.float32)
    f(a).block_until_ready()
    self._stop = threading.Event()

    def loop():
      x = a
      while not self._stop.is_set():
        x = f(x).block_until_ready()

    self._thread = threading.Thread(target=loop, name="jax-beside")
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def row(label: str, rates: dict, jobs: int, extra: str = "") -> str:
  """A table row: jobs/s from each thread count, their ratio, ``extra``, and how many jobs were
  done where not all."""
  cells = "".join(f"{rates[t][0]:10.1f}" if t in rates else f"{'-':>10s}" for t in THREADS)
  ratio = rates[4][0] / rates[1][0] if len(rates) == 2 else float("nan")
  done = [rates[t][1] for t in THREADS if t in rates]
  note = "" if all(n == jobs for n in done) else f"  (done {' / '.join(map(str, done))} of {jobs})"
  return f"{label:14s}{cells} {ratio:7.2f}{extra}{note}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer items, for smoke tests")
  ap.add_argument("--items", type=int, default=200, help="items (and clips) per rate")
  ap.add_argument("--repeats", type=int, default=3, help="rounds of the per-clip decode timing")
  ap.add_argument("--budget", type=float, default=60.0, help="seconds at most per rate")
  ap.add_argument("--folder", default="", help="read the clips in this folder (written there "
                  "first if it holds no video files)")
  args = ap.parse_args()
  items = 16 if args.quick else args.items
  repeats = 1 if args.quick else args.repeats
  budget = min(args.budget, 20.0) if args.quick else args.budget
  stuck = 0

  def measure(fn, jobs) -> dict:
    nonlocal stuck
    out = {}
    for threads in THREADS:
      if not stuck:
        out[threads] = rate(fn, jobs, threads, budget)
        stuck = out[threads][2]
    return out

  header = f"{'':14s}" + "".join(f"{f'{t} thread' + 's' * (t > 1):>10s}" for t in THREADS)
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.abspath(args.folder or tmp)
    os.makedirs(root, exist_ok=True)
    if not any(n.endswith(files.VIDEO_EXTS) for n in os.listdir(root)):
      write_clips(root, 2 if args.quick else CLIPS_PER_FORMAT)
    paths = {fmt: sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(fmt))
             for fmt in FORMATS}
    print(f"\nDecoding the 8 frames of an item (of {CLIP_SHAPE[0]} frames of "
          f"{CLIP_SHAPE[1]}x{CLIP_SHAPE[2]}, stride 2): ms per clip from one thread; clips/s")
    print(f"{header} {'4 / 1':>7s} {'ms/clip':>8s}")
    for fmt, p in paths.items():
      ms = decode_ms(p, repeats)
      rates = measure(read_clip, [p[i % len(p)] for i in range(items)])
      print(row(fmt, rates, items, f" {ms:8.2f}"), flush=True)

    config = folder_config(root, args.quick)
    source = files.FolderSource.from_config(config, "video_folder")
    usable = [i for i, e in enumerate(source.entries) if not e["skip"]]
    indices = [usable[i % len(usable)] for i in range(items)]
    source[indices[0]]  # imports and first-call costs out of the timings
    print(f"\nSource items/s ({items} items, the formats in turn: decode + resize to about "
          "32x32)")
    print(f"{header} {'4 / 1':>7s}")
    items_rates = {}
    for beside in (False, True):
      if stuck:
        break
      with JaxBeside() if beside else contextlib.nullcontext():
        items_rates[beside] = measure(source.__getitem__, indices)
      print(row("jax computing" if beside else "idle", items_rates[beside], items), flush=True)
    if stuck:
      # Whatever holds the stuck readers (a lock) would hold the next readers too.
      print(f"{stuck} reader(s) still busy {budget:.0f} s after the budget: the measurements "
            "after them are skipped")
    else:
      loader = {w: common.loader_rate(config, w, 4 if args.quick else 30) for w in (2, 0)}
      print(f"\nTraining iterator, configs/folder.py: {loader[2]:.1f} batches/s with 2 worker "
            f"processes, {loader[0]:.1f} with one prefetch thread")
  print()

  def ratio(beside):
    r = items_rates.get(beside, {})
    return r[4][0] / r[1][0] if len(r) == 2 else 0.0

  # Small clips' items are mostly GIL-bound work (PyAV's per-frame calls, small numpy ops), so 4
  # readers are about as fast as one; the goal catches readers that slow each other down.
  common.target("items_per_s_4_threads_vs_1_thread", ratio(False), ">=", 0.8)
  common.target("items_per_s_4_threads_vs_1_thread_jax_beside", ratio(True), ">=", 0.8)
  one = items_rates.get(False, {}).get(1, (0.0,))[0]
  common.target("ms_per_item_1_thread", 1e3 / max(one, 1e-9), "<=", 20.0)
  if stuck:
    sys.stdout.flush()
    os._exit(0)  # the stuck readers would hold the interpreter's exit


if __name__ == "__main__":
  main()
