"""Writes videos (mp4 + gif per video, + npy for latents) from any checkpoint of a run.

  python sample.py --workdir runs/default --shapes 8x32x32,8x24x40 --labels 0,7 --cfg 3 \
      --steps 30 --sampler euler --seed 0 --out runs/default/videos

All requested shapes are packed into one call, which also writes one PNG contact sheet of every
video (frames across, videos down) and a JSON file of the exact command and its resolved
settings beside them. Labels are ids or the names the run's data source
gives them (``data.labels``): ``--labels "red circle,blue square"`` for synthetic_shapes,
``7`` or ``seven`` for moving_digits, a manifest's ``label_name`` for file sources; the id
``model.num_classes`` or ``unconditional`` samples without a label. Omit them for 0, 1, 2, ...
"""

import json
import os
import sys

from vdit_jax import hostmem

hostmem.keep_freed_memory()  # before JAX starts its threads (VDIT_JAX_MALLOC=system opts out)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory to restore from", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
_SHAPES = flags.DEFINE_string("shapes", "8x32x32", "comma-separated TxHxW of the videos")
_LABELS = flags.DEFINE_string("labels", "", "comma-separated labels (ids or names), one per shape")
_CFG = flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale (1 = none)")
_STEPS = flags.DEFINE_integer("steps", 30, "integration steps")
_SAMPLER = flags.DEFINE_string("sampler", "euler", "euler (one model call per step) or heun "
                               "(two; closer to the exact flow at the same steps)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_OUT = flags.DEFINE_string("out", None, "output folder (default: WORKDIR/videos)")
_FPS = flags.DEFINE_integer("fps", 8, "frames per second of the written videos")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from data import labels as labels_lib
  from vdit_jax import diffusion, sampler, video_io

  shapes = sampler.parse_shapes(_SHAPES.value)
  model, config, step = sampler.load_model(_WORKDIR.value, _STEP.value)
  sampler.check_shapes(shapes, tuple(config.model.patch))  # before anything compiles
  diffusion.check_sampler(_SAMPLER.value)
  # Names are the data source's that trained the run (data.labels).
  labels = sampler.parse_labels(_LABELS.value, len(shapes), config.model.num_classes,
                                parse=labels_lib.label_set(config).parse)
  videos = sampler.sample(model, config, shapes, labels, cfg_scale=_CFG.value,
                          num_steps=_STEPS.value, seed=_SEED.value, method=_SAMPLER.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "videos")
  # Latent videos are for an external VAE to decode: keep their values, not only a preview.
  formats = ("mp4", "gif", "npy") if config.data.source == "latents" else ("mp4", "gif")
  for i, (video, label) in enumerate(zip(videos, labels)):
    t, h, w = video.shape[:3]
    stem = os.path.join(out, f"step{step}_{i:02d}_{t}x{h}x{w}_label{label}")
    for path in video_io.write_video(stem, video, _FPS.value, formats=formats):
      print(path)
  # One picture of every video of the call (frames across, videos down), and how to remake it.
  print(video_io.write_image(os.path.join(out, f"step{step}_sheet.png"),
                             video_io.contact_sheet(videos)))
  settings = {"command": [sys.executable, *sys.argv], "workdir": os.path.abspath(_WORKDIR.value),
              "step": step, "shapes": [list(s) for s in shapes], "labels": labels,
              "cfg": _CFG.value, "steps": _STEPS.value, "sampler": _SAMPLER.value,
              "seed": _SEED.value, "fps": _FPS.value}
  path = os.path.join(out, f"step{step}_settings.json")
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)
  print(path)


if __name__ == "__main__":
  app.run(main)
