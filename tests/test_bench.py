"""Benchmarks stay runnable: --quick runs end to end and prints one parseable line per target."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = re.compile(r"^target [\w.-]+: [-\d.e+]+ \(goal (<=|>=) [-\d.e+]+\) (PASS|FAIL)$")


def test_step_bench_quick_prints_targets():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "bench/step.py", "--quick", "--repeats", "1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith("target ")]
  assert len(lines) == 7, out.stdout
  for line in lines:
    assert TARGET.match(line), line
