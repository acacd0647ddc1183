"""Moving handwritten digits (scikit-learn's bundled scans, no download), grey, default model.

  python train.py --config configs/digits.py --workdir runs/digits
  python sample.py --workdir runs/digits --shapes 8x32x32,8x28x36 --labels 3,7 \
      --out runs/digits/videos

The default model on one or two digits per video (label = the first digit; sample by "7" or
"seven") at three aspect ratios; one grey channel, so a token is 2x4x4x1 = 32 values. Settings
are the default run's, not tuned for digits: a short run draws white blobs in motion, not yet
legible digits (bench/README.md has the run).
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.unlock()
  c.data.source = "moving_digits"
  c.data.channels = 1
  c.data.num_objects = (1, 2)
  c.data.object_size = (0.5, 0.7)  # a digit's box as a fraction of the shorter side
  c.model.num_classes = 10
  c.model.label_factors = ()  # the default's (3, 6) is synthetic_shapes' shape x colour
  c.sample.labels = "3,7,0"
  # The evaluators score synthetic_shapes; this source keeps every video for training.
  c.data.heldout = 0
  c.evals.names = ""
  c.lock()
  return c
