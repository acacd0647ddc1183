"""Long videos over many devices: 64 frames of 64x64 (latent-sized) at patch 1x2x2, one video of
65,536 tokens per row, its tokens split over 8 devices by context parallelism.

  python train.py --config configs/long.py --workdir runs/long

Sized for accelerators: 8 devices along ``mesh.context`` (each holds 8,192 tokens of every
activation; attention gathers whole rows of one of the 8 heads), blocks rematerialised and
scanned. Its budget is 4 GiB per device, which it fits only with the context axis
(``python bench/context.py`` measures the compiled step's per-device memory with context 8 and
with 1; bench/README.md).
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.unlock()
  c.data.frames = (64, 64)
  c.data.side = (64, 64)
  c.data.aspect_ratios = (1.0,)
  c.data.object_size = (0.2, 0.4)
  c.data.seq_len = 65536
  c.data.max_segments = 1
  c.data.batch_rows = 1
  c.data.heldout = 0
  c.model.patch = (1, 2, 2)
  c.model.num_heads = 8  # a whole-row head per device along mesh.context
  c.model.head_dim = 32
  # Key blocks visited 4 at a time (online softmax): whole-row attention's temporaries stay
  # O(L x 4 blocks) per head instead of O(L^2).
  c.model.attention_kv_chunk = 4
  c.model.remat = True
  c.model.scan_layers = True
  c.mesh.data = 1
  c.mesh.context = 8
  c.evals.names = ""
  c.sample.shapes = "16x64x64"
  c.lock()
  return c
