"""Train in an external video VAE's latent space: a folder of npy / npz arrays [T, H, W, C].

  python train.py --config configs/latents.py --workdir runs/latents \
      --config.data.path=/data/latents --config.data.channels=16

Every array must have data.channels channels (a mismatch stops the run with the file's count).
Arrays are cropped, never resampled: a random window of up to 8 latent frames and a crop of
about 16x16 latent pixels (smaller when the stored latents are smaller); patch 1x2x2, so a
16x16x8 latent video is 512 tokens. An npz holds one array, or one named `latents`. Sampled
videos are latents too: sample.py writes them as npy (and previews of the first three
channels as mp4/gif) for the same VAE to decode.
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.unlock()
  c.data.source = "latents"
  c.data.path = ""  # required: --config.data.path=/your/latents
  c.data.channels = 4
  c.data.frames = (4, 8)
  c.data.side = (12, 16)
  c.data.aspect_ratios = (0.5, 0.75, 1.0, 1.33, 2.0)
  c.data.seq_len = 1024
  c.data.max_segments = 4
  c.model.patch = (1, 2, 2)
  c.model.num_classes = 18
  c.model.label_factors = ()  # the default's (3, 6) is synthetic_shapes' shape x colour
  c.sample.shapes = "8x16x16,8x12x20"
  # The evaluators score synthetic_shapes; this source keeps every video for training.
  c.data.heldout = 0
  c.evals.names = ""
  c.lock()
  return c
