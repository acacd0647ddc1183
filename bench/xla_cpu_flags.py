"""XLA:CPU options of the pinned jaxlib on vdit-jax's P0 step: does any make it faster?

  python bench/xla_cpu_flags.py [--processes 2] [--steps 3] [--quick] [--variants full,alternating]

Times bench/torch_ref.py's vdit variants (fp32 forward+backward of P0: ``full`` is full3d with the
dense backend, ``alternating`` the blocksparse backend) once per set of ``XLA_FLAGS`` below, each
measurement in a process of its own (``XLA_FLAGS`` is read once, when XLA starts), the sets in
turns for ``--processes`` rounds so that load from other jobs spreads over all alike. Prints one
row per set: the median over processes of each process's median step, and its time over the
default's. The sets are the library paths this jaxlib offers for the dot, elementwise and reduce
operations (oneDNN, XNNPACK, YNNPACK and XNNPACK's whole-graph fusion) and fast math; a set
this jaxlib does not know makes its process fail, which is reported in its row.

The default stays what training uses: a set that wins here on CPU would become a CPU-only
default in ``vdit_jax`` (XLA_FLAGS set before JAX starts, on the CPU platform only), which none
of them earns (bench/README.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAG_SETS = (
    ("default", ""),
    ("oneDNN dot", "--xla_cpu_experimental_onednn_fusion_type=dot"),
    ("oneDNN dot,eltwise,reduce",
     "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    ("XNNPACK dot", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("XNNPACK dot,eltwise,reduce", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    ("YNNPACK dot", "--xla_cpu_experimental_ynn_fusion_type=dot"),
    ("XNNPACK graph fusion", "--xla_cpu_experimental_xnn_graph_fusion_mode="
     "XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
)


def one(variant: str, flags: str, steps: int, quick: bool) -> float | str:
  """Median step seconds of one process, or the reason it failed."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
  cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_ref.py"), "--one",
         f"vdit:{variant}", "--steps", str(steps)] + (["--quick"] if quick else [])
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    # XLA's own reason (e.g. "Unknown flag in XLA_FLAGS: ..."), without its log prefix.
    said = [l.split("] ", 1)[-1] for l in lines if "XLA_FLAGS" in l] or lines[-1:]
    return f"failed: {said[0][:160] if said else f'exit status {out.returncode}'}"
  last = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
  return float(json.loads(last)["median"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--processes", type=int, default=2)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="torch_ref.py's small sizes: a smoke test")
  ap.add_argument("--variants", default="full,alternating")
  ap.add_argument("--sets", default=None,
                  help="comma-separated names from FLAG_SETS (default: all)")
  args = ap.parse_args()
  variants = args.variants.split(",")
  sets = FLAG_SETS
  if args.sets:
    names = args.sets.split(",")
    unknown = sorted(set(names) - {n for n, _ in FLAG_SETS})
    if unknown:
      raise SystemExit(f"--sets: unknown {unknown}; known: {[n for n, _ in FLAG_SETS]}")
    sets = [s for s in FLAG_SETS if s[0] in names or s[0] == "default"]

  runs = collections.defaultdict(list)
  for _ in range(args.processes):
    for name, flags in sets:
      for variant in variants:
        runs[name, variant].append(one(variant, flags, args.steps, args.quick))

  print(f"vdit-jax P0{' (quick sizes)' if args.quick else ''}, fp32 forward+backward: median "
        f"over {args.processes} processes of each one's median of {args.steps} steps")
  head = "".join(f" {v + ' s/step':>18s} {'/ default':>9s}" for v in variants)
  print(f"{'XLA:CPU option':28s}{head}")
  base = {}
  for name, flags in sets:
    row = f"{name:28s}"
    for variant in variants:
      got = runs[name, variant]
      bad = [g for g in got if isinstance(g, str)]
      if bad:
        row += f" {bad[0]}"
        continue
      med = statistics.median(got)
      base.setdefault(variant, med)
      row += f" {med:18.4f} {med / base[variant]:9.3f}"
    print(row)


if __name__ == "__main__":
  main()
