"""Attention ablation: the default run's data and model, one run per attention variant.

  python ablate.py --config configs/ablate.py --workdir runs/ablate [--seeds 2]
  python ablate.py --config configs/ablate.py --workdir runs/ablate --config.arms=full3d,window

Every arm trains with the same seed, data order and steps, then is scored by the held-out loss
and the temporal-consistency evaluators. Expected on a 2-core CPU: about 5 minutes per arm and
spatial_only clearly behind full3d on motion and flicker (README, "Attention ablation").
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
  run = default.get_config()
  run.train.steps = 1000
  # The lr its README table was trained with (the default run's is 2e-3).
  run.optim.lr = 1e-3
  run.model.label_factors = ()  # one embedding per label, as its README table was trained
  run.model.prediction = "velocity"  # as its README table was trained, and its guidance:
  run.sample.cfg = run.evals.temporal.cfg = run.evals.redraw.cfg = 3.0
  # Euler's 30 steps, as its README table was sampled (the default's sampler differs)
  run.sample.sampler = run.evals.temporal.sampler = run.evals.redraw.sampler = "euler"
  run.sample.steps = run.evals.temporal.steps = run.evals.redraw.steps = 30
  run.train.ckpt_every = 250
  run.train.progress = False
  run.sample.shapes = "8x32x32"  # one sample video per arm; the evaluators sample the rest
  c = ml_collections.ConfigDict()
  c.run = run  # the config every arm starts from; an arm sets run.model.block
  c.arms = ("full3d,factorized,alternating,window,sparse,causal3d,spatial_only,temporal_only"
            if not arg else arg)
  c.seeds = 1  # repeats of every arm, with seeds run.seed, run.seed + 1, ...
  # Arms whose blocks hold more attention weights than full3d's (factorized: two attention
  # sublayers per block) get a narrower MLP, so every arm has about full3d's parameter count.
  c.match_params = True
  c.lock()
  return c
