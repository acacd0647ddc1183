"""Seconds-long config for tests and smoke runs (the numbers it produces mean nothing).

  python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

from vdit_jax.config import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.frames = (2, 4)
  c.data.side = (8, 12)
  c.data.aspect_ratios = (0.5, 1.0, 2.0)
  c.data.seq_len = 64
  c.data.batch_rows = 8  # one row per device of the 8-device test mesh
  c.data.max_segments = 4
  c.model.patch = (1, 4, 4)
  c.model.width = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.head_dim = 16
  # The reference backend: tests compare against it and call the model without layouts.
  c.model.attention_backend = "dense"
  c.model.window = (1, 1, 1)  # smaller than the videos (up to 4 x 3 x 3 tokens)
  c.model.sparse_heads = "local,cross"
  c.model.sparse_window = (1, 1, 2)
  c.optim.warmup_steps = 2
  c.train.steps = 4
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.train.progress = False
  c.sample.shapes = "2x8x8,4x8x12"
  c.sample.steps = 3
  if arg:
    c.model.block = arg
  c.lock()
  return c
