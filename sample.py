"""Writes videos (mp4 + gif per video, + npy for latents) from any checkpoint of a run.

  python sample.py --workdir runs/default --shapes 8x32x32,8x24x40 --labels 0,7 --cfg 1.5 \
      --steps 30 --sampler euler --seed 0 --out runs/default/videos

A run trained with captions (``model.caption.mode=tokens``) takes them as text,
``--captions "a red circle moving left;a blue square moving up"`` (one per shape, or one for
all) or ``--prompts_file`` (one per line). A run trained with given frames
(``data.cond_frames_prob``) continues videos: ``--init_video first.png`` (or a video or npy
``[T, H, W, C]`` array; comma-separated, one per shape, or one for all) gives the first
``--init_frames`` frames (default: one temporal patch; an image is repeated to fill it), which
come back unchanged.

Guidance and steps are the run's own (``sample.cfg``, ``sample.steps``) unless given.
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
_CFG = flags.DEFINE_float("cfg", None, "classifier-free guidance scale (1 = none; default: the "
                          "run's sample.cfg)")
_CFG_CAPTION = flags.DEFINE_float("cfg_caption", None, "the caption's own guidance scale (runs "
                                  "with captions; --cfg then guides the label alone; default: "
                                  "one scale for both)")
_STEPS = flags.DEFINE_integer("steps", None, "integration steps (default: the run's "
                              "sample.steps)")
_SAMPLER = flags.DEFINE_string("sampler", None, "euler (one model call per step), heun (two; "
                               "closer to the exact flow at the same steps) or stochastic (one, "
                               "with fresh noise per step); default: the run's sample.sampler")
_ETA = flags.DEFINE_float("eta", None, "stochastic: fresh noise per step in units of DDPM's (0 = "
                          "Euler); default: the run's sample.eta")
_CAPTIONS = flags.DEFINE_string("captions", "", "';'-separated captions, one per shape or one "
                                "for all (runs trained with captions)")
_PROMPTS = flags.DEFINE_string("prompts_file", "", "text file of captions, one per line")
_INIT = flags.DEFINE_string("init_video", "", "comma-separated videos, npy arrays or images "
                            "whose first frames are given (one per shape, or one for all)")
_INIT_FRAMES = flags.DEFINE_integer("init_frames", 0, "frames given from --init_video "
                                    "(0 = one temporal patch)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_OUT = flags.DEFINE_string("out", None, "output folder (default: WORKDIR/videos)")
_FPS = flags.DEFINE_integer("fps", 8, "frames per second of the written videos")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from data import labels as labels_lib
  from vdit_jax import diffusion, sampler, text, video_io

  shapes = sampler.parse_shapes(_SHAPES.value)
  model, config, step = sampler.load_model(_WORKDIR.value, _STEP.value)
  # Everything below is checked before anything compiles.
  sampler.check_shapes(shapes, tuple(config.model.patch))
  # The run's own settings unless overridden: a recipe's guidance and sampler belong to it.
  method = config.sample.get("sampler", "euler") if _SAMPLER.value is None else _SAMPLER.value
  eta = float(config.sample.get("eta", 1.0)) if _ETA.value is None else _ETA.value
  diffusion.check_sampler(method, eta)
  # Names are the data source's that trained the run (data.labels).
  labels = sampler.parse_labels(_LABELS.value, len(shapes), config.model.num_classes,
                                parse=labels_lib.label_set(config).parse)
  captions = _captions()
  tokenizer = None
  if config.model.caption.mode == "tokens":
    tokenizer = text.Tokenizer.load(_WORKDIR.value)
  captions = sampler.check_captions(config, len(shapes), captions, tokenizer)
  init_videos = _init_videos(len(shapes), int(config.model.patch[0]))  # checked by sample()
  cfg = config.sample.cfg if _CFG.value is None else _CFG.value
  steps = config.sample.steps if _STEPS.value is None else _STEPS.value
  videos = sampler.sample(model, config, shapes, labels, cfg_scale=cfg,
                          num_steps=steps, seed=_SEED.value, method=method, eta=eta,
                          captions=captions, tokenizer=tokenizer, init_videos=init_videos,
                          progress=True, caption_cfg=_CFG_CAPTION.value)
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
              "captions": captions if config.model.caption.mode == "tokens" else None,
              "init_video": _INIT.value, "init_frames": _INIT_FRAMES.value,
              "cfg": cfg, "cfg_caption": _CFG_CAPTION.value, "steps": steps,
              "sampler": method, "eta": eta,
              "seed": _SEED.value, "fps": _FPS.value}
  path = os.path.join(out, f"step{step}_settings.json")
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)
  print(path)


def _captions() -> list[str] | None:
  if _CAPTIONS.value and _PROMPTS.value:
    raise app.UsageError("give --captions or --prompts_file, not both")
  if _PROMPTS.value:
    with open(_PROMPTS.value) as f:
      return [line.strip() for line in f if line.strip()]
  return [c.strip() for c in _CAPTIONS.value.split(";")] if _CAPTIONS.value.strip() else None


def _init_videos(count: int, pt: int) -> list | None:
  """``--init_video``'s frames per shape (None where none is given)."""
  from vdit_jax import video_io
  if not _INIT.value.strip():
    return None
  paths = [p.strip() for p in _INIT.value.split(",")]
  if len(paths) == 1:
    paths *= count
  if len(paths) != count:
    raise app.UsageError(f"{len(paths)} --init_video paths for {count} shapes: give one, or one "
                         "per shape (an empty entry for none)")
  frames = _INIT_FRAMES.value or pt
  loaded = {p: video_io.read_init(p, frames, repeat=pt) for p in set(paths) if p}
  return [loaded[p] if p else None for p in paths]


if __name__ == "__main__":
  app.run(main)
