"""Train on your own videos: a folder of mp4 / webm / gif / npy files (optional JSONL manifest).

  python train.py --config configs/folder.py --workdir runs/folder \
      --config.data.path=/data/clips [--config.data.manifest=/data/clips.jsonl]

The manifest's lines are {"path": "clip.mp4", "caption": "...", "label": 3, "label_name": "dog"}
with paths relative to data.path (label_name is optional: sample.py --labels then takes "dog" as
well as 3); without a manifest every video file in the folder is used, unconditionally (the
null label). Each video is resized (aspect ratio kept, snapped to the nearest of
data.aspect_ratios) to 8 frames at about 32x32 pixels, every second stored frame; files that
cannot be used are skipped and counted per reason as skipped_<reason> in the metrics; those
the start-up scan finds are named with their reason on stderr and in workdir/skipped.jsonl.
The model is the default one; set model.num_classes to your manifest's label count.
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.unlock()
  c.data.source = "video_folder"
  c.model.label_factors = ()  # the default's (3, 6) is synthetic_shapes' shape x colour
  c.data.path = ""  # required: --config.data.path=/your/folder
  c.data.frame_stride = 2
  c.data.worker_count = 2  # decoding is slower than rendering: keep two processes on it
  # The evaluators score synthetic_shapes; this source keeps every video for training.
  c.data.heldout = 0
  c.evals.names = ""
  c.lock()
  return c
