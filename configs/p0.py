"""Reference config P0: the sizes `bench/step.py` times.

  python bench/step.py               # fp32 forward+backward of each block type and a plain DiT

4 blocks, width 256, 4 heads x 64, MLP 1024; one 8x32x32 video with 4 channels (latent-like)
per 2048-token row (patch 1x2x2), two rows per step. The bench feeds random 4-channel videos;
the synthetic source renders RGB, so to train these sizes on it add --config.data.channels=3.
"""

from vdit_jax.config import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.channels = 4
  c.data.frames = (8, 8)
  c.data.side = (32, 32)
  c.data.aspect_ratios = (1.0,)
  c.data.seq_len = 2048
  c.data.batch_rows = 2
  c.data.max_segments = 1
  c.model.patch = (1, 2, 2)
  c.model.width = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.mlp_ratio = 4.0
  if arg:
    c.model.block = arg
  c.lock()
  return c
