"""vdit-jax against PyTorch on the P0 train step: the same model in both, timed side by side.

  pip install -r requirements-bench.txt     # torch 2.13.0, the CPU wheel
  python bench/torch_ref.py [--quick] [--processes 3] [--steps 5]
  python bench/torch_ref.py --profile full|alternating [--quick] [--steps 5] [--ops 15]

P0 (configs/p0.py): 4 blocks, width 256, 4 heads x 64, MLP 1024 (GELU tanh); two rows, each one
8x32x32 video with 4 channels, patch (1, 2, 2): 2048 tokens per row; fp32 forward + backward of
the rectified-flow loss (gradients of every parameter, no optimizer). The PyTorch model
(bench/torch_dit.py) has vdit_jax/model.py's layers, shapes and parameter count, and its
forward FLOPs (torch.utils.flop_counter, attention counted through SDPA's math backend) equal
``model.forward_flops`` up to the adaLN and timestep layers on ``[B, D]``, which that count
leaves out; both are printed.

Two variants, each in both frameworks:
- ``full``: every block attends over all 2048 tokens of its row; vdit ``full3d`` with the dense
  backend, torch ``scaled_dot_product_attention`` on ``[B, H, L, K]``;
- ``alternating``: spatial blocks (the tokens of one frame: ``[B*T, H, H'W', K]``) and temporal
  blocks (one position across the 8 frames: ``[B*H'W', H, T, K]``) in turn; vdit
  ``alternating`` with the blocksparse backend. The vdit variants are bench/step.py's
  (``P0_VARIANTS``), built by its helpers, so the two benches time the same thing.

Every measurement runs in a process of its own (this script with ``--one``): it builds its
model, takes one warm-up step (JAX compiles there), times ``--steps`` steps and prints their
median. The processes run in turns, ``--processes`` rounds of (vdit full, torch full, vdit
alternating, torch alternating), so that load from other jobs spreads over all four alike. The
table gives the median of the processes' medians and their range. torch runs
``torch.set_num_threads`` = the CPUs this process may use; XLA uses them all by itself. The
vdit processes apply ``vdit_jax.hostmem``'s allocator settings, as bench/step.py and training
do (``VDIT_JAX_MALLOC=system`` turns them off); the torch processes keep glibc's defaults, as
PyTorch runs anywhere else. torch's OpenMP threads spin at every barrier, so while another job
holds a core its steps can take many times as long, from one step to the next: time on an idle
machine, and read the min..max column.

``--profile VARIANT`` accounts for where one step's time goes, in both frameworks at the same
shapes: the attention sublayer's core (``q, k, v [B, L, H, K]`` in, output out, the layout
changes each framework makes included) forward and forward+backward, one block's dense
matmuls (QKV, output projection, MLP; forward+backward), one block's elementwise work
(LayerNorm and adaLN modulation, gated residuals, QK RMSNorm, RoPE, GELU; forward+backward),
each timed alone in a process per framework and multiplied by its uses per step, next to the
whole step; then torch.profiler's operator table (self CPU time) of one torch step and XLA's
per-operation self times from a JAX profiler trace of one vdit step, grouped by operation kind
(dot, copy/transpose, elementwise fusion, ...). Profile times sum over threads (both cores);
the category table is wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import timed_steps  # noqa: E402  (bench/common.py)
from vdit_jax import hostmem  # noqa: E402  (standard library only)

INSTALL_HINT = ("bench/torch_ref.py needs PyTorch, which is not installed: "
                "pip install -r requirements-bench.txt (torch==2.13.0, the CPU wheel)")

# P0 and the quick sizes (bench/step.py's p0_config: configs/p0.py, --quick as there). The vdit
# processes check that their config agrees, so the torch model cannot drift from it unseen.
P0 = {"frames": 8, "side": 32, "channels": 4, "patch": (1, 2, 2), "rows": 2, "width": 256,
      "depth": 4, "num_heads": 4, "head_dim": 64, "mlp_ratio": 4.0, "num_classes": 18,
      "qk_norm": True, "rope_theta": 10000.0}
QUICK = {"frames": 4, "side": 16}

# Variant -> bench/step.py's P0_VARIANTS entry.
VDIT_VARIANTS = {"full": "vdit full3d", "alternating": "vdit alternating bsparse"}
LABELS = {("vdit", "full"): "vdit full3d (dense)", ("torch", "full"): "torch full (SDPA)",
          ("vdit", "alternating"): "vdit alternating (bsparse)",
          ("torch", "alternating"): "torch alternating (SDPA)"}
ORDER = (("vdit", "full"), ("torch", "full"), ("vdit", "alternating"), ("torch", "alternating"))


def sizes(quick: bool) -> dict:
  return dict(P0, **QUICK) if quick else dict(P0)


def grid_of(s: dict) -> tuple[int, int, int]:
  pt, ph, pw = s["patch"]
  return s["frames"] // pt, s["side"] // ph, s["side"] // pw


def cpu_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
  """The CPU's model name and whether it has AVX-512 (which decides much of XLA:CPU's and
  torch's matmul speed), from ``/proc/cpuinfo`` where there is one."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "unknown (no /proc/cpuinfo)"
  name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
  flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
  avx512 = bool(flags) and "avx512f" in flags.group(1).split()
  return (f"{name.group(1).strip() if name else 'unknown model'}, {cpu_threads()} usable, "
          f"AVX-512 {'yes' if avx512 else 'no'}")


def median_time(fn, steps: int, warmup: int = 1) -> tuple[float, list[float]]:
  """``fn()`` must return only once its work is done."""
  return timed_steps(fn, steps, warmup)[:2]


# ----------------------------------------------------------------------------- torch side


def import_torch():
  """``(torch, torch_dit)``; exits with status 2 and the install hint if torch is missing."""
  try:
    import torch
    import torch_dit  # bench/torch_dit.py
  except ImportError:
    print(INSTALL_HINT, file=sys.stderr)
    sys.exit(2)
  return torch, torch_dit


def torch_setup(variant: str, quick: bool):
  """``(model, x0, label, grid)``: the torch model of a variant and a batch of random tokens."""
  torch, torch_dit = import_torch()
  torch.set_num_threads(cpu_threads())
  torch.manual_seed(0)
  s = sizes(quick)
  grid = grid_of(s)
  token_size = math.prod(s["patch"]) * s["channels"]
  model = torch_dit.VideoDiT(token_size, s["width"], s["depth"], s["num_heads"], s["head_dim"],
                             s["mlp_ratio"], s["num_classes"],
                             torch_dit.block_patterns(variant, s["depth"]), s["qk_norm"],
                             s["rope_theta"])
  x0 = torch.rand(s["rows"], math.prod(grid), token_size) * 2 - 1
  label = torch.ones(s["rows"], dtype=torch.long)
  return model, x0, label, grid


def torch_forward_flops(model, x0, label, grid) -> float:
  """Forward FLOPs from torch's own counter (SDPA through its math backend, which it counts)."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode

  t = torch.full((x0.shape[0],), 0.5)
  with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
    model(x0, t, label, grid)
  return float(counter.get_total_flops())


def torch_step_fn(model, x0, label, grid):
  def step():
    for p in model.parameters():
      p.grad = None
    model.loss(x0, label, grid).backward()
  return step


def one_torch(variant: str, quick: bool, steps: int) -> dict:
  torch, torch_dit = import_torch()
  model, x0, label, grid = torch_setup(variant, quick)
  med, times, cores = timed_steps(torch_step_fn(model, x0, label, grid), steps)
  return {"params": torch_dit.count_params(model),
          "fwd_flops": torch_forward_flops(model, x0, label, grid), "median": med,
          "times": times, "cores": cores, "threads": torch.get_num_threads(),
          "version": torch.__version__}


# ----------------------------------------------------------------------------- vdit side


def vdit_setup(variant: str, quick: bool):
  """``(step module, config, batch)`` of a vdit variant, as bench/step.py builds them."""
  import jax
  import jax.numpy as jnp

  import step  # bench/step.py

  block, backend, exact = step.P0_VARIANTS[VDIT_VARIANTS[variant]]
  config = step.p0_config(block, quick, backend)
  s, m, d = sizes(quick), config.model, config.data
  theirs = {"frames": d.frames[1], "side": d.side[1], "channels": d.channels,
            "patch": tuple(m.patch), "rows": d.batch_rows, "width": m.width, "depth": m.depth,
            "num_heads": m.num_heads, "head_dim": m.head_dim, "mlp_ratio": m.mlp_ratio,
            "num_classes": m.num_classes, "qk_norm": m.qk_norm, "rope_theta": m.rope_theta}
  if theirs != s or d.frames[0] != d.frames[1] or d.seq_len != math.prod(grid_of(s)):
    raise SystemExit(f"bench/step.py's P0 config {theirs} (seq_len {d.seq_len}) differs from "
                     f"the torch model's sizes {s}: update P0 in bench/torch_ref.py")
  batch = jax.tree.map(jnp.asarray, step.p0_batch(config, exact))
  return step, config, batch


def one_vdit(variant: str, quick: bool, steps: int) -> dict:
  hostmem.keep_freed_memory()  # before JAX starts its threads
  import jax

  step, config, batch = vdit_setup(variant, quick)
  fn, params = step.vdit_grad_fn(config)
  med, times, cores = timed_steps(lambda: jax.block_until_ready(fn(params, batch)), steps)
  return {"params": int(sum(x.size for x in jax.tree.leaves(params))),
          "fwd_flops": float(step.p0_forward_flops(config, batch)), "median": med,
          "times": times, "cores": cores, "threads": cpu_threads(), "version": jax.__version__,
          "backend": config.model.attention_backend}


# ----------------------------------------------------------------------------- the comparison


def run_child(flags: list[str]) -> tuple[dict, str]:
  """Runs this script with ``flags``; returns its last JSON line and the text printed before."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], cwd=ROOT,
                       capture_output=True, text=True)
  if out.returncode != 0:
    sys.stderr.write(out.stderr[-4000:])
    raise SystemExit(f"bench/torch_ref.py {' '.join(flags)} exited with {out.returncode}")
  lines = out.stdout.splitlines()
  last = max(i for i, line in enumerate(lines) if line.startswith("{"))
  return json.loads(lines[last]), "\n".join(lines[:last])


def compare(args) -> None:
  import_torch()  # fail early, with the hint, before any process starts
  common_flags = ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])
  runs = collections.defaultdict(list)
  for _ in range(args.processes):
    for fw, variant in ORDER:
      runs[fw, variant].append(run_child(["--one", f"{fw}:{variant}"] + common_flags)[0])

  s = sizes(args.quick)
  size = "quick sizes" if args.quick else "P0"
  first = {key: r[0] for key, r in runs.items()}
  print(f"\nfp32 forward+backward, {size}: {s['rows']} rows of one {s['frames']}x{s['side']}x"
        f"{s['side']} video ({math.prod(grid_of(s))} tokens); {args.processes} "
        f"process{'es' if args.processes != 1 else ''} per model, each the median of "
        f"{args.steps} steps after a warm-up step")
  print(f"torch {first['torch', 'full']['version']} with {first['torch', 'full']['threads']} "
        f"threads; jax {first['vdit', 'full']['version']} on {first['vdit', 'full']['threads']} "
        "CPUs")
  print(f"CPU: {cpu_model()}")
  print(f"{'model':28s} {'s/step':>8s} {'min..max':>15s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
        f"{'cores':>6s}")
  medians = {}
  for key in ORDER:
    sec = [r["median"] for r in runs[key]]
    medians[key] = statistics.median(sec)
    # The analytic count (model.forward_flops), the same for both frameworks: 3x the forward.
    gflop = 3 * first["vdit", key[1]]["fwd_flops"] / 1e9
    cores = statistics.mean(r.get("cores", float("nan")) for r in runs[key])
    print(f"{LABELS[key]:28s} {medians[key]:8.3f} {min(sec):7.3f}..{max(sec):<7.3f} "
          f"{gflop:8.1f} {gflop / medians[key]:8.1f} {cores:6.2f}")
  print("cores: CPU time over wall time in the timed steps (mean over the processes)")
  print("\nparameters and forward GFLOP (vdit: model.forward_flops; torch: "
        "torch.utils.flop_counter, which also counts the adaLN and timestep layers on [B, D]):")
  for variant in ("full", "alternating"):
    v, t = first["vdit", variant], first["torch", variant]
    same = "equal" if v["params"] == t["params"] else "DIFFER"
    rel = t["fwd_flops"] / v["fwd_flops"] - 1
    print(f"  {variant:12s} params vdit {v['params']:,} torch {t['params']:,} ({same}); "
          f"forward GFLOP vdit {v['fwd_flops'] / 1e9:.3f} torch {t['fwd_flops'] / 1e9:.3f} "
          f"({rel:+.2e})")
  print()
  import common  # bench/common.py

  common.target("torch_full3d_vs_pytorch_sdpa",
                medians["vdit", "full"] / medians["torch", "full"], "<=", 1.0)
  common.target("torch_alternating_vs_pytorch_alternating",
                medians["vdit", "alternating"] / medians["torch", "alternating"], "<=", 1.0)


# ----------------------------------------------------------------------------- --profile

CATEGORIES = (
    ("attn_fwd", "attention forward"),
    ("attn_fwd_bwd", "attention forward+backward"),
    ("matmuls", "dense matmuls f+b (QKV, out, MLP)"),
    ("elementwise", "LN/adaLN, gates, QK-norm, RoPE, GELU f+b"),
)


def pattern_uses(variant: str, depth: int) -> dict[str, int]:
  """Attention pattern -> blocks that use it, for a variant."""
  if variant == "full":
    return {"full": depth}
  if variant == "alternating":
    return {"spatial": (depth + 1) // 2, "temporal": depth // 2}
  raise SystemExit(f"variant {variant!r} is unknown: use full or alternating")


def profile_torch(variant: str, quick: bool, steps: int, ops: int) -> dict:
  """Category times (seconds per step) of the torch model, and its operator table."""
  torch, torch_dit = import_torch()
  import torch.nn.functional as F

  model, x0, label, grid = torch_setup(variant, quick)
  s = sizes(quick)
  B, L = x0.shape[:2]
  D, H, K = s["width"], s["num_heads"], s["head_dim"]
  Fh = int(s["mlp_ratio"] * D)
  gen = torch.Generator().manual_seed(1)
  rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731

  def fwd_bwd(fn, inputs):
    inputs = [x.detach().requires_grad_() for x in inputs]
    cts = [torch.randn(o.shape, generator=gen) for o in fn(*inputs)]
    return lambda: torch.autograd.grad(fn(*inputs), inputs, cts)

  out = {}
  qkv = [rand(B, L, H, K) for _ in range(3)]
  for pattern, uses in pattern_uses(variant, s["depth"]).items():
    attn = lambda q, k, v, p=pattern: (torch_dit.attend(p, q, k, v, grid),)  # noqa: E731

    def fwd(attn=attn):
      with torch.no_grad():
        attn(*qkv)
    out[f"attn_fwd:{pattern}"] = (median_time(fwd, steps)[0], uses)
    out[f"attn_fwd_bwd:{pattern}"] = (median_time(fwd_bwd(attn, qkv), steps)[0], uses)

  def matmuls(x, o, h, u, w_qkv, w_out, w1, b1, w2, b2):
    return (F.linear(x, w_qkv), F.linear(o, w_out), F.linear(h, w1, b1), F.linear(u, w2, b2))
  mm_in = [rand(B, L, D), rand(B, L, H * K), rand(B, L, D), rand(B, L, Fh), rand(3 * H * K, D),
           rand(D, H * K), rand(Fh, D), rand(Fh), rand(D, Fh), rand(D)]
  out["matmuls"] = (median_time(fwd_bwd(matmuls, mm_in), steps)[0], s["depth"])

  cos, sin = torch_dit.rope_cos_sin(grid, K, s["rope_theta"])

  def elementwise(x, a, m, u, q, k, mods, q_scale, k_scale):
    shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
    h1 = torch_dit.modulate(x, shift1, scale1)
    x1 = x + gate1 * a
    h2 = torch_dit.modulate(x1, shift2, scale2)
    x2 = x1 + gate2 * m
    g = F.gelu(u, approximate="tanh")
    qn = torch_dit.apply_rope(F.rms_norm(q, (K,), q_scale, eps=1e-6), cos, sin)
    kn = torch_dit.apply_rope(F.rms_norm(k, (K,), k_scale, eps=1e-6), cos, sin)
    return h1, h2, x2, g, qn, kn
  ew_in = [rand(B, L, D), rand(B, L, D), rand(B, L, D), rand(B, L, Fh), rand(B, L, H, K),
           rand(B, L, H, K), rand(B, 1, 6 * D), rand(K), rand(K)]
  out["elementwise"] = (median_time(fwd_bwd(elementwise, ew_in), steps)[0], s["depth"])

  step = torch_step_fn(model, x0, label, grid)
  out["step"] = (median_time(step, steps)[0], 1)

  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
  print(f"torch.profiler, one {variant} step ({torch.get_num_threads()} threads), top {ops} "
        "operators by self CPU time:")
  print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops))
  return out


def profile_vdit(variant: str, quick: bool, steps: int, ops: int) -> dict:
  """Category times (seconds per step) of vdit-jax, and XLA's per-operation times."""
  hostmem.keep_freed_memory()  # before JAX starts its threads
  import jax
  import jax.numpy as jnp

  from vdit_jax import attention as attn_lib
  from vdit_jax import backends
  from vdit_jax import model as model_lib
  from vdit_jax import tokens as tokens_lib

  step, config, batch = vdit_setup(variant, quick)
  s, m = sizes(quick), config.model
  B, L = batch["tokens"].shape[:2]
  D, H, K = m.width, m.num_heads, m.head_dim
  Fh = int(m.mlp_ratio * D)
  seg, coords = batch["segment_ids"], batch["coords"]
  backend = backends.resolve(m, config.data.max_segments)
  keys = iter(jax.random.split(jax.random.key(1), 128))
  rand = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731

  class Context(attn_lib.AttentionContext):
    """Masks or layouts made once, outside the timed functions, as the model makes them once
    per step rather than once per block (``AttentionContext.__init__`` would make them)."""

    def __init__(self, masks, layouts):  # pylint: disable=super-init-not-called
      self.backend = backend
      self.masks = dict(zip(backend.patterns, masks))
      self.layouts = layouts

  masks = ([] if backend.needs_layouts else
           [attn_lib.pattern_mask(p, seg, coords) for p in backend.patterns])
  layouts = ({str(p): batch["layouts"][str(p)] for p in backend.patterns}
             if backend.needs_layouts else {})

  def timed(fn, args):
    return median_time(lambda: jax.block_until_ready(fn(*args)), steps)[0]

  def fwd_bwd(fn, n_diff, *args):
    """Forward+backward of ``fn(*args)`` with respect to its first ``n_diff`` arguments (the
    rest held fixed), jitted, and the arguments to call it with: ``args`` and cotangents, random
    (constant ones would let XLA simplify the backward's matmuls)."""
    def f(cts, *args):
      outs, vjp = jax.vjp(lambda *d: fn(*d, *args[n_diff:]), *args[:n_diff])
      return vjp(cts)
    shapes = jax.eval_shape(lambda *a: fn(*a), *args)
    cts = jax.tree.map(lambda x: rand(*x.shape), shapes)
    return jax.jit(f), (cts, *args)

  out = {}
  qkv = [rand(B, L, H, K) for _ in range(3)]
  for pattern, uses in pattern_uses(variant, s["depth"]).items():
    def attn(q, k, v, masks, layouts, p=pattern):
      return (Context(masks, layouts).attend(p, q, k, v),)
    out[f"attn_fwd:{pattern}"] = (timed(jax.jit(attn), (*qkv, masks, layouts)), uses)
    f, f_args = fwd_bwd(attn, 3, *qkv, masks, layouts)
    out[f"attn_fwd_bwd:{pattern}"] = (timed(f, f_args), uses)

  def matmuls(x, o, h, u, w_qkv, w_out, w1, b1, w2, b2):  # as the model's layers compute them
    return (jnp.einsum("bld,dthk->blthk", x, w_qkv), model_lib.project("blhk,hkd->bld", o, w_out),
            h @ w1 + b1, u @ w2 + b2)
  mm_in = [rand(B, L, D), rand(B, L, H, K), rand(B, L, D), rand(B, L, Fh), rand(D, 3, H, K),
           rand(H, K, D), rand(D, Fh), rand(Fh), rand(Fh, D), rand(D)]
  out["matmuls"] = (timed(*fwd_bwd(matmuls, len(mm_in), *mm_in)), s["depth"])

  angles = model_lib.rope_angles(coords, K, m.rope_theta)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def rms(x, scale):  # model.RMSNorm
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale

  def elementwise(x, a, mo, u, q, k, mods_BSF, q_scale, k_scale, seg, cos, sin):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        tokens_lib.per_token(mods_BSF, seg), 6, axis=-1)
    h1 = model_lib.layer_norm(x) * (1 + scale1) + shift1
    x1 = x + gate1 * a
    h2 = model_lib.layer_norm(x1) * (1 + scale2) + shift2
    x2 = x1 + gate2 * mo
    g = jax.nn.gelu(u, approximate=True)
    qn = model_lib.apply_rope(rms(q, q_scale), cos, sin)
    kn = model_lib.apply_rope(rms(k, k_scale), cos, sin)
    return h1, h2, x2, g, qn, kn
  ew_in = [rand(B, L, D), rand(B, L, D), rand(B, L, D), rand(B, L, Fh), rand(B, L, H, K),
           rand(B, L, H, K), rand(B, batch["seg_grid"].shape[1], 6 * D),
           rand(K), rand(K)]
  out["elementwise"] = (timed(*fwd_bwd(elementwise, len(ew_in), *ew_in, seg, cos, sin)),
                        s["depth"])

  fn, params = step.vdit_grad_fn(config)
  out["step"] = (timed(fn, (params, batch)), 1)
  print_xla_ops(fn, (params, batch), variant, ops)
  return out


def print_xla_ops(fn, args, variant: str, ops: int) -> None:
  """XLA:CPU's per-operation self times in one call of jitted ``fn``, from a profiler trace: by
  kind of operation, by the source function each comes from (forward and backward apart), and
  the top ``ops`` operations."""
  import jax

  info = hlo_ops(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn(*args))
    paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
             if f.endswith(".xplane.pb")]
    data = jax.profiler.ProfileData.from_file(paths[0])
  self_ns = collections.Counter()
  calls = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      stack = []  # (end, name) of the operations open on this thread
      for ev in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
        op = dict(ev.stats).get("hlo_op")
        if op is None:
          continue
        while stack and stack[-1][0] <= ev.start_ns:
          stack.pop()
        if stack:  # inside an enclosing operation (a loop's body): not that one's own time
          self_ns[stack[-1][1]] -= ev.duration_ns
        self_ns[op] += ev.duration_ns
        calls[op] += 1
        stack.append((ev.start_ns + ev.duration_ns, op))
  total = sum(self_ns.values())
  unknown = ("other", "", "")
  by_kind, by_source = collections.Counter(), collections.Counter()
  for op, ns in self_ns.items():
    kind, source, direction = info.get(op, unknown)
    by_kind[kind] += ns
    by_source[source.split(" (")[0] or "(no source)", direction] += ns
  print(f"XLA:CPU, one vdit {variant} step from a jax.profiler trace: self time of its "
        f"operations summed over threads, {total / 1e6:.1f} ms")
  print("by kind of operation:")
  for kind, ns in by_kind.most_common():
    print(f"  {kind:40s} {ns / 1e6:9.1f} ms {ns / total:6.1%}")
  print(f"by the source function XLA records for each (top {ops}):")
  for (source, direction), ns in by_source.most_common(ops):
    print(f"  {source + ' ' + direction:40s} {ns / 1e6:9.1f} ms {ns / total:6.1%}")
  print(f"top {ops} operations:")
  for op, ns in self_ns.most_common(ops):
    kind, source, direction = info.get(op, unknown)
    print(f"  {op:22s} {ns / 1e6:7.1f} ms {calls[op]:4d}x  {kind}; {source} {direction}")


def hlo_ops(text: str) -> dict[str, tuple[str, str, str]]:
  """Operation name -> (kind, source, direction) from an optimized HLO module's text: a fusion's
  kind from what it computes; the source function and ``file:line`` of the op's innermost
  stack frame in XLA's metadata; ``bwd`` where JAX's op name says it is a transpose (autodiff's
  backward), else ``fwd``."""
  tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
  comps: dict[str, list[str]] = {}
  ops = []  # (name, opcode, rest of the line)
  table = computation = None
  for line in text.splitlines():
    if line in tables:
      table = tables[line]
      continue
    entry = re.match(r"^(\d+) (.*)$", line)
    if table is not None and entry:
      table[int(entry.group(1))] = entry.group(2).strip('"')
      continue
    table = None
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and " = " not in line:
      computation = comps.setdefault(head.group(1), [])
      continue
    instr = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$", line)
    if instr and computation is not None:
      computation.append(instr.group(2))
      ops.append(instr.groups())

  def field(text, key):
    m = re.search(key + r"=(\d+)", text or "")
    return int(m.group(1)) if m else None

  def source(frame_id):
    loc = tables["FileLocations"].get(field(tables["StackFrames"].get(frame_id), "file_location_id"))
    if loc is None:
      return ""
    path = tables["FileNames"].get(field(loc, "file_name_id"), "?")
    func = tables["FunctionNames"].get(field(loc, "function_name_id"), "?")
    short = os.path.relpath(path, ROOT) if path.startswith(ROOT) else os.path.basename(path)
    return f"{func} ({short}:{field(loc, 'line')})"

  skip = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
  moves = {"copy", "transpose", "reshape", "broadcast", "slice", "concatenate", "dynamic-slice",
           "dynamic-update-slice", "pad"}
  out = {}
  for name, opcode, rest in ops:
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if opcode == "fusion" and called:
      body = set(comps.get(called.group(1), ())) - skip
      if body & {"dot", "convolution"}:
        kind = "fusion with a dot (matmul)"
      elif body <= moves:
        kind = "fusion: copy/transpose/slice"
      elif body & {"reduce", "reduce-window"}:
        kind = "fusion with a reduce"
      else:
        kind = "fusion: elementwise"
    elif opcode in ("dot", "convolution"):
      kind = "dot (matmul)"
    elif opcode in ("copy", "transpose"):
      kind = "copy/transpose"
    elif opcode in ("while", "call", "conditional"):
      kind = f"{opcode} (own time)"
    else:
      kind = opcode
    op_name = re.search(r'op_name="([^"]*)"', rest)
    direction = "bwd" if op_name and "transpose(" in op_name.group(1) else "fwd"
    out[name] = (kind, source(field(rest, "stack_frame_id")), direction)
  return out


def ratio(row: dict[str, float]) -> str:
  """vdit's seconds over torch's, where both are positive (a rest can come out negative)."""
  return f"{row['vdit'] / row['torch']:.2f}" if min(row.values()) > 0 else "-"


def profile(args) -> None:
  import_torch()
  flags = ["--steps", str(args.steps), "--ops", str(args.ops)] + (["--quick"] if args.quick
                                                                  else [])
  results = {}
  for fw in ("vdit", "torch"):
    results[fw], text = run_child(["--profile-one", f"{fw}:{args.profile}"] + flags)
    print(text, "\n")
  print(f"where one fp32 forward+backward {args.profile} step goes "
        f"({'quick sizes' if args.quick else 'P0'}): each piece timed alone at the model's "
        f"shapes (median of {args.steps}), times its uses per step, in seconds")
  print(f"{'piece':44s} {'uses':>4s} {'vdit-jax':>9s} {'torch':>9s} {'ratio':>7s}")
  sums = {fw: 0.0 for fw in results}
  for key, label in CATEGORIES:
    for name in sorted(k for k in results["vdit"] if k.split(":")[0] == key):
      pattern = name.split(":")[1] if ":" in name else ""
      row = {fw: results[fw][name][0] * results[fw][name][1] for fw in results}
      if key != "attn_fwd":
        for fw in results:
          sums[fw] += row[fw]
      title = f"{label} ({pattern})" if pattern else label
      print(f"{title:44s} {results['vdit'][name][1]:4d} {row['vdit']:9.3f} {row['torch']:9.3f} "
            f"{ratio(row):>7s}")
  step = {fw: results[fw]["step"][0] for fw in results}
  for title, row in (("sum of the forward+backward pieces", sums), ("whole step", step),
                     ("rest: embedding, loss, final layer, copies", {
                         fw: step[fw] - sums[fw] for fw in results})):
    print(f"{title:44s} {'':4s} {row['vdit']:9.3f} {row['torch']:9.3f} "
          f"{ratio(row):>7s}")


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="4x16x16 videos (256-token rows), 1 process x 2 steps: a smoke test")
  ap.add_argument("--processes", type=int, default=None,
                  help="processes per model, run in turns (default 3; 1 with --quick)")
  ap.add_argument("--steps", type=int, default=None,
                  help="timed steps per process after a warm-up (default 5; 2 with --quick)")
  ap.add_argument("--profile", choices=("full", "alternating"),
                  help="where one step's time goes, vdit-jax next to torch, for one variant")
  ap.add_argument("--ops", type=int, default=15, help="--profile: operations listed")
  ap.add_argument("--one", help=argparse.SUPPRESS)  # framework:variant, one timing process
  ap.add_argument("--profile-one", help=argparse.SUPPRESS)  # framework:variant, one profile
  args = ap.parse_args()
  args.processes = args.processes or (1 if args.quick else 3)
  args.steps = args.steps or (2 if args.quick else 5)

  for flag, fns in ((args.one, (one_vdit, one_torch)),
                    (args.profile_one, (profile_vdit, profile_torch))):
    if flag:
      fw, variant = flag.split(":")
      fn = fns[0] if fw == "vdit" else fns[1]
      extra = (args.ops,) if flag is args.profile_one else ()
      print(json.dumps(fn(variant, args.quick, args.steps, *extra)))
      return
  if args.profile:
    profile(args)
  else:
    compare(args)


if __name__ == "__main__":
  main()
