"""bench/xla_cpu_flags.py: one row per XLA:CPU option set, relative to the default, and a set
this jaxlib rejects is reported in its row instead of stopping the sweep."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import xla_cpu_flags  # noqa: E402  (bench/xla_cpu_flags.py)


def test_sweep_prints_each_set_against_the_default():
  out = subprocess.run([sys.executable, "bench/xla_cpu_flags.py", "--quick", "--processes", "1",
                        "--steps", "1", "--variants", "alternating", "--sets", "fast math"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
          for m in re.finditer(r"^(default|fast math)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)}
  assert set(rows) == {"default", "fast math"}, out.stdout
  assert rows["default"][1] == 1.0
  for sec, rel in rows.values():
    assert sec > 0
    assert abs(rel - sec / rows["default"][0]) < 5e-3  # both printed rounded


def test_a_rejected_flag_is_reported_not_raised():
  got = xla_cpu_flags.one("alternating", "--xla_cpu_no_such_option=true", 1, quick=True)
  assert isinstance(got, str) and got.startswith("failed:"), got
  assert "xla_cpu_no_such_option" in got


def test_unknown_set_name_names_the_known_ones():
  out = subprocess.run([sys.executable, "bench/xla_cpu_flags.py", "--sets", "turbo"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "turbo" in out.stderr and "oneDNN dot" in out.stderr
