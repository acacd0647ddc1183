"""Trains one config per attention variant and compares them in one table with plots.

  python ablate.py --config configs/ablate.py --workdir runs/ablate [--seeds 2]

Writes ``results.csv``, ``results.md``, ``loss_curves.png`` and ``metrics_vs_flops.png`` in the
workdir. Rerunning the same command skips finished arms and resumes an interrupted one.
"""

from vdit_jax import hostmem

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

from absl import app, flags, logging  # noqa: E402

from vdit_jax import cli  # noqa: E402

_CONFIG = cli.define_config_file("config", "configs/ablate.py", "ablation config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "ablation directory (one run per arm and seed)")
_SEEDS = flags.DEFINE_integer("seeds", None, "repeats of every arm (default: the config's)")
_RUN_ARM = flags.DEFINE_string("run_arm", None, "internal: train the arm whose directory this is")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from evals import ablation
  if _RUN_ARM.value:
    ablation.run_arm_here(_RUN_ARM.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if _SEEDS.value is not None:
    config.seeds = _SEEDS.value
  ablation.run(config, _WORKDIR.value, log=lambda line: print(line, flush=True))
  print(f"wrote {_WORKDIR.value}/results.md, results.csv, loss_curves.png, metrics_vs_flops.png")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
