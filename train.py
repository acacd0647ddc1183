"""Trains a video DiT from a config file.

  python train.py --config configs/default.py --workdir runs/default [--config.train.steps=100]

Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

from vdit_jax import hostmem

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

from absl import app, flags, logging  # noqa: E402

from vdit_jax import cli, trainer  # noqa: E402

_CONFIG = cli.define_config_file("config", "configs/default.py", "config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
