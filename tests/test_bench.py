"""Benchmarks stay runnable: --quick runs end to end and prints one parseable line per target."""

import os
import re
import subprocess
import sys

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = re.compile(r"^target [\w.-]+: [-\d.e+]+ \(goal (<=|>=) [-\d.e+]+\) (PASS|FAIL)$")


def quick_targets(script: str, args=("--quick", "--repeats", "1")) -> list[str]:
  """The target lines of ``script --quick --repeats 1`` (or ``args``), each checked against
  the format."""
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1))
  out = subprocess.run([sys.executable, script, *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith("target ")]
  for line in lines:
    assert TARGET.match(line), line
  return lines


def test_step_bench_quick_prints_targets():
  names = [line.split(":")[0] for line in quick_targets("bench/step.py")]
  assert names == ["target p0_full3d_vs_plain_einsum_same_run",
                   "target default_step_mfu_vs_measured_peak",
                   "target default_step_1dev_mesh_vs_plain_jit"]


def test_attention_bench_quick_prints_targets():
  lines = quick_targets("bench/attention.py")
  assert len(lines) == 14, lines
  # One box per row length, and the sparse block at both.
  names = [line.split(":")[0][len("target "):] for line in lines]
  assert sum(n.startswith("box_") for n in names) == 2
  assert sum(n.startswith("sparse_block_") for n in names) == 2
  # The model's FLOP counter and the bench's analytic count are the same numbers.
  assert lines[-1].startswith("target model_flops_attention_rel_diff: 0 ") and "PASS" in lines[-1]


def test_packing_bench_quick_prints_targets():
  assert len(quick_targets("bench/packing.py")) == 4


def test_decode_bench_quick_prints_targets():
  assert len(quick_targets("bench/decode.py")) == 3


def test_tiles_bench_quick_compares_tiles_with_spans():
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1))
  out = subprocess.run([sys.executable, "bench/tiles.py", "--quick", "--repeats", "1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith(("local(1,2), ", "window(1,2,2), "))]
  assert len(rows) == 4, out.stdout
  # The tiled plan of local(1,2) takes run lists, the other t-major spans.
  assert "runs" in rows[0] and "span" in rows[1], rows


def test_soak_bench_quick_prints_targets():
  assert len(quick_targets("bench/soak.py", ("--quick",))) == 3


def test_sample_bench_quick_prints_targets():
  lines = quick_targets("bench/sample.py")
  assert [line.split(":")[0] for line in lines] == ["target sample_overhead",
                                                    "target sample_compiles_for_mixes"]


def test_compile_bench_quick_prints_targets():
  lines = quick_targets("bench/compile.py", ("--quick",))
  assert [line.split(":")[0] for line in lines] == ["target compile_scanned_vs_unscanned"]


def test_context_bench_quick_prints_targets():
  lines = quick_targets("bench/context.py", ("--quick",))
  assert [line.split(":")[0] for line in lines] == ["target context_memory_per_device",
                                                    "target context_longest_video"]


def test_accelerator_bench_quick_runs_every_check_here():
  """On CPU the kernels run in Pallas interpret mode: the equality checks hold; the speed
  targets are for accelerators and only have to print."""
  lines = quick_targets("bench/accelerator.py")
  names = [line.split(":")[0].split()[1] for line in lines]
  assert len(names) == 16 and names[-4:] == [
      "accel_attention_full_fraction_of_peak", "accel_window_12pct_speedup",
      "accel_mfu_full3d", "accel_mfu_factorized"]
  assert all(line.endswith("PASS") for line in lines[:12])  # the 12 equality checks
