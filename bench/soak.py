"""Soak: a long tiny run with frequent checkpoints keeps host memory and disk flat.

  python bench/soak.py [--quick] [--steps 3000] [--ckpt-every 5] [--keep 2] [--log-every 20]
                       [--workers 0]

Runs ``train.py --config configs/tiny.py`` in a child process for ``--steps`` steps, saving a
checkpoint every ``--ckpt-every`` steps and keeping ``--keep``, and samples the child's resident
memory (VmRSS) and the checkpoint directory's size twice a second. Prints the peak RSS over
the tenth of the run that follows warm-up (its first tenth) and over the last tenth of training,
the largest checkpoint footprint after the first ``--keep`` saves against the last, and the
number of checkpoints left, with target lines. Peaks of windows, not single samples: the
trainer hands freed heap pages back at every checkpoint (vdit_jax/hostmem.py), so RSS swings
within a save cycle by what a step allocates and frees, and a single sample lands anywhere in
that swing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common  # bench/common.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RSS may grow by this much per step after warm-up: 80 MB over 10k steps.
RSS_GROWTH_KB_PER_STEP = 8


def rss_mb(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def dir_mb(path: str) -> float:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # a file orbax just moved or deleted
        pass
  return total / 2**20


def last_step(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().strip().splitlines()
  except OSError:
    return 0
  return json.loads(lines[-1])["step"] if lines else 0


def window(samples, start: int, span: int) -> list[tuple]:
  """The samples taken from step ``start`` for ``span`` steps (at least the nearest one)."""
  inside = [s for s in samples if start <= s[0] < start + span]
  return inside or [min(samples, key=lambda s: abs(s[0] - start))]


def peak(samples) -> float:
  return max(s[1] for s in samples)


def middle(samples) -> float:
  return 0.5 * (samples[0][0] + samples[-1][0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a short run, for smoke tests")
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--ckpt-every", type=int, default=5)
  ap.add_argument("--keep", type=int, default=2)
  ap.add_argument("--workers", type=int, default=0, help="data.worker_count of the run")
  ap.add_argument("--log-every", type=int, default=20, help="train.log_every of the run")
  args = ap.parse_args()
  steps = 40 if args.quick else args.steps
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", workdir,
           f"--config.train.steps={steps}", f"--config.train.ckpt_every={args.ckpt_every}",
           f"--config.train.keep_ckpts={args.keep}", f"--config.train.log_every={args.log_every}",
           "--config.train.sample_every=0", f"--config.data.worker_count={args.workers}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    samples = []  # (step, rss MB, checkpoint MB)
    ckpts = os.path.join(workdir, "checkpoints")
    while proc.poll() is None:
      rss = rss_mb(proc.pid)
      if rss is not None:
        samples.append((last_step(workdir), rss, dir_mb(ckpts)))
      time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode:
      sys.exit(f"the soak run failed ({proc.returncode}):\n{err[-3000:]}")
    seconds = time.monotonic() - start
    kept = sorted(n for n in os.listdir(ckpts) if n.isdigit())
  # Training only: from the last metrics line (step == steps) on, the run writes its final
  # checkpoint and compiles the sampler for its end-of-run videos, which is not growth.
  tenth = steps // 10
  warm = [s for s in samples if tenth <= s[0] < steps] or samples
  first, last = window(warm, warm[0][0], tenth), window(warm, warm[-1][0] - tenth, steps)
  rss_warm, rss_end = peak(first), peak(last)
  full = [s[2] for s in samples if s[0] >= args.keep * args.ckpt_every] or [0.0]
  growth = rss_end - rss_warm
  # Per step between the windows' middles.
  per_step = 1024 * growth / max(middle(last) - middle(first), 1)
  print(f"tiny config, {steps} steps in {seconds:.0f} s, a checkpoint every {args.ckpt_every} "
        f"steps, keep {args.keep}, a metrics line every {args.log_every}, data workers "
        f"{args.workers}")
  print(f"peak RSS after warm-up (steps {first[0][0]}-{first[-1][0]}): {rss_warm:.0f} MB; at the "
        f"end (steps {last[0][0]}-{last[-1][0]}): {rss_end:.0f} MB; growth {growth:+.1f} MB "
        f"({per_step:+.2f} KB/step)")
  one = full[-1] / max(len(kept), 1)  # one checkpoint's size
  print(f"checkpoints: {max(full):.1f} MB at most once {args.keep} were kept "
        f"({max(full) / max(one, 1e-9):.2f} checkpoints' worth), {full[-1]:.1f} MB at the end; "
        f"left: {kept}")
  common.target("soak_rss_growth_kb_per_step", per_step, "<=", RSS_GROWTH_KB_PER_STEP)
  # While a save is written the previous ones are still there: keep + 1 at most, and a little
  # for orbax's metadata files.
  common.target("soak_checkpoint_footprint_in_checkpoints", max(full) / max(one, 1e-9), "<=",
                args.keep + 1.25)
  common.target("soak_checkpoints_left", len(kept), "<=", args.keep)


if __name__ == "__main__":
  main()
