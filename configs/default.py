"""Default run: a small full-3D video DiT on the embedded synthetic shapes, on CPU in minutes.

  python train.py --config configs/default.py --workdir runs/default
  python sample.py --workdir runs/default --shapes 8x32x32,8x24x40 --out runs/default/videos

Expected (measured on 2-core CPUs): 0.13 to 0.29 s per step by how fast their matmuls are,
2500 steps in 6 to 12 minutes; the loss falls from about 1.3 (step 25) to about 0.08, and the
sampled videos show objects of the requested colour and shape moving across the frames (label
fidelity 0.94 to 1.0 over three seeds; see the README); after the last step the held-out loss and
temporal-consistency evaluators score the run (README, "Evaluation"). Variants:
--config configs/default.py:factorized, or any field as --config.model.block=factorized.
"""

from vdit_jax.config import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.frames = (8, 8)
  c.data.side = (32, 32)
  c.data.aspect_ratios = (0.75, 1.0, 1.33)
  c.data.seq_len = 512
  c.data.batch_rows = 2
  c.data.max_segments = 4
  c.data.object_size = (0.35, 0.55)  # big enough to read the shape at 32 pixels
  c.model.patch = (2, 4, 4)
  # Shift t towards noise (about 2.8x for these 256-token videos): the layout of a video is
  # decided at high noise, which an unshifted logit-normal rarely trains in a short run.
  c.diffusion.shift_base_tokens = 32
  # Width 256 in 4 heads of 64 (5.0M parameters), two rows per step: its matmuls are wide enough
  # to run the step at a larger fraction of this CPU's matmul peak than width 128 in heads of 32,
  # and it reaches a lower loss at 1000 steps for a little more time (bench/README.md compares
  # the two). Heads of 64 also suit accelerator attention kernels.
  c.model.width = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.head_dim = 64
  # Blocksparse on every platform: these rows of two 252- or 256-token videos attend in aligned
  # blocks of 256 (bounds.aligned_block), half the pairs of dense's whole 512-token rows.
  c.model.attention_backend = "blocksparse"
  # Shapes are what a short run learns last (colour and position come first): peak lr 2e-3
  # reaches in 3200 steps the scores 1e-3 reaches in 4000 (bench/README.md, "Training runs"),
  # and 2500 steps keep the quickstart near its 15 minutes.
  c.optim.lr = 2e-3
  # A label is shape * 6 + colour: one embedding per shape and per colour, summed, so every
  # "triangle" video trains the same shape row. Over two seeds this lowered the held-out loss
  # (0.090 against 0.100) and vanishing, and raised label fidelity (0.53 against 0.40)
  # (bench/README.md, "Training runs").
  c.model.label_factors = (3, 6)
  # The network predicts the clean video and the model turns it into the velocity (the loss
  # stays the velocity's). Against predicting the velocity, over two seeds: label fidelity
  # 0.97 and 0.92 against 0.42 and 0.64, shape drift 0.19 against 0.24-0.27, FD 34.5 and 37.6
  # against 42.1 and 47.3; the held-out loss at t = 0.1 is 3-4 times higher, where the clean
  # video is nearly given (bench/README.md, "Training runs").
  c.model.prediction = "clean"
  c.optim.warmup_steps = 100
  c.train.steps = 2500
  c.train.log_every = 25
  c.train.ckpt_every = 500
  # Scored after the last step: held-out loss, and the temporal consistency of 36 sampled
  # videos next to real ones (evals/); the source's last 1024 indices are never trained on.
  c.data.heldout = 1024
  c.evals.names = "heldout,temporal"
  c.sample.shapes = "8x32x32,8x28x36,8x36x28"
  # Guidance 1.5 rather than 3 for the clean-video prediction, over two seeds: FD 24.9 and 35.0
  # against 34.5 and 37.6, shape drift 0.18 and 0.17 against 0.19, label fidelity 1.0 and 0.94
  # against 0.97 and 0.92; 1 loses the label (0.86), 5 the shape (drift 0.22).
  c.sample.cfg = c.evals.temporal.cfg = c.evals.redraw.cfg = 1.5
  # DDPM's ancestral steps (fresh noise in each; diffusion.integrate) rather than Euler's, at the
  # same model calls, over three seeds: shape drift 0.167, 0.144, 0.181 against 0.180, 0.171,
  # 0.207, motion jerk lower in all three, FD 27.0, 19.5, 22.5 against 24.9, 35.0, 37.5; label
  # fidelity and stall alike (bench/README.md, "Training runs").
  c.sample.sampler = c.evals.temporal.sampler = c.evals.redraw.sampler = "stochastic"
  c.sample.eta = c.evals.temporal.eta = c.evals.redraw.eta = 1.0
  # 100 of those steps rather than 30, over the same three seeds: shape drift 0.149, 0.127,
  # 0.170 against 0.167, 0.144, 0.181, label fidelity 1.0, 1.0, 0.94 against 0.97, 0.97, 0.78;
  # FD 22.4, 32.9, 23.7 against 27.0, 19.5, 22.5, and objects a little slower (stall 0.13, 0.10,
  # 0.14 against 0.08, 0.13, 0.12). 250 steps: shape drift 0.144, stall 0.17 (seed 0).
  c.sample.steps = c.evals.temporal.steps = c.evals.redraw.steps = 100
  if arg:
    c.model.block = arg
  c.lock()
  return c
