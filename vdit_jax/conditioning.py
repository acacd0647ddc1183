"""What each video is conditioned on: one pytree, carried whole from the pipeline's batch through
the train step, the model and the sampler.

``Conditioning`` holds per-video fields, each ``[B, S, ...]`` and indexed by segment id - 1
like the rest of a packed batch:

- ``label`` int ``[B, S]``: the class (``model.num_classes`` is the null label);
- ``caption`` int ``[B, S, C]`` word ids (``model.caption.mode = "tokens"``) or float
  ``[B, S, C, E]`` precomputed embeddings (``"embeddings"``), with ``caption_mask`` bool
  ``[B, S, C]`` marking real caption tokens; an all-False mask is the null caption;
- ``frames`` int ``[B, S]``: how many leading grid frames of the video are given clean
  (image-to-video and continuation). Those tokens carry timestep 0 and no loss, and the sampler
  returns them unchanged.

Fields a run does not use are None (no array, nothing traced). ``null()`` replaces every
guidance-droppable field by its null value (label and caption; the given frames stay, they are
content, not a prompt); classifier-free guidance runs the model on both. A new kind of
conditioning is a new field here, its batch key in ``BATCH_KEYS`` and its use in the model: no
call signature changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from vdit_jax import tokens as tokens_lib

# Field -> key of the packed batch that holds it.
BATCH_KEYS = {"label": "seg_label", "caption": "seg_caption", "caption_mask": "seg_caption_mask",
              "frames": "seg_frames"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
  label: jax.Array
  caption: jax.Array | None = None
  caption_mask: jax.Array | None = None
  frames: jax.Array | None = None

  def null(self, null_label: int) -> "Conditioning":
    """The unconditional counterpart: null label and null caption, the same given frames."""
    return dataclasses.replace(
        self, label=jnp.full_like(self.label, null_label),
        caption=None if self.caption is None else jnp.zeros_like(self.caption),
        caption_mask=None if self.caption_mask is None else jnp.zeros_like(self.caption_mask))


def label_digit(label: jax.Array, digit: int, sizes: tuple[int, ...]) -> jax.Array:
  """Digit ``digit`` of labels written in the mixed radix ``sizes`` (the last digit varies
  fastest: with sizes (3, 6), label = d0 * 6 + d1)."""
  return (label // math.prod(sizes[digit + 1:])) % sizes[digit]


def as_conditioning(cond: Any) -> Conditioning:
  """``cond`` itself, or a bare label array ``[B, S]`` as ``Conditioning(label=...)``."""
  return cond if isinstance(cond, Conditioning) else Conditioning(label=cond)


def from_batch(batch: dict[str, Any]) -> Conditioning:
  """The conditioning of a packed batch: the ``BATCH_KEYS`` it has."""
  return Conditioning(**{f: batch[k] for f, k in BATCH_KEYS.items() if k in batch})


def stack(a: Conditioning, b: Conditioning) -> Conditioning:
  """Rows of ``a`` then rows of ``b`` (guidance's conditional and unconditional halves)."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def given_tokens(cond: Conditioning, segment_ids_BL: jax.Array,
                 coords_BL3: jax.Array) -> jax.Array | None:
  """``[B, L]`` bool: tokens in a video's given leading frames (None when no frames are given)."""
  if cond.frames is None:
    return None
  frames_BL = tokens_lib.per_token(cond.frames.astype(jnp.int32), segment_ids_BL)
  return (coords_BL3[..., 0] < frames_BL) & (segment_ids_BL > 0)
