"""Scores a checkpoint with the run's evaluators, with other settings if asked.

  python evaluate.py --workdir runs/default
  python evaluate.py --workdir runs/default --evals temporal --sampler heun --steps 60 --cfg 4.5
  python evaluate.py --workdir runs/default --evals heldout --label_t 0.7

Restores the EMA params of a checkpoint (the newest unless --step), runs the evaluators named
by --evals (default: the run's config.evals.names) and prints their scores; the results, with
the per-video values, go to OUT/evals/step_<N>.json (default OUT: WORKDIR/rescored/<settings>),
never over the training run's own.
"""

from vdit_jax import hostmem

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory to restore from", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
_EVALS = flags.DEFINE_string("evals", None, "comma list of evaluators (default: the run's)")
_SAMPLER = flags.DEFINE_string("sampler", None, "temporal: euler, heun or stochastic (default: "
                               "the run's)")
_STEPS = flags.DEFINE_integer("steps", None, "temporal: sampling steps (default: the run's)")
_CFG = flags.DEFINE_float("cfg", None, "temporal: guidance scale (default: the run's)")
_ETA = flags.DEFINE_float("eta", None, "temporal: the stochastic sampler's noise (default: the "
                          "run's)")
_VIDEOS = flags.DEFINE_integer("videos", None, "temporal: videos sampled (default: the run's)")
_LABEL_T = flags.DEFINE_float("label_t", None, "heldout: also the loss with each part of the "
                              "label changed, at this t (default: the run's)")
_OUT = flags.DEFINE_string("out", None, "output folder (default: WORKDIR/rescored/<settings>)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  from evals import rescore

  path, scalars = rescore.rescore(_WORKDIR.value, _STEP.value, _EVALS.value, _OUT.value,
                                  sampler=_SAMPLER.value, steps=_STEPS.value, cfg=_CFG.value,
                                  eta=_ETA.value, videos=_VIDEOS.value, label_t=_LABEL_T.value)
  for name, value in sorted(scalars.items()):
    print(f"{name:40s} {value:.4g}")
  print(path)


if __name__ == "__main__":
  app.run(main)
