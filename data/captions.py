"""A run's captions as packed per-video fields, for ``model.caption.mode``.

- ``tokens``: the source's caption text as word ids (``vdit_jax.text.Tokenizer``) over the
  source's own vocabulary (``source.caption_vocabulary()``: the procedural sources know theirs,
  file sources read their manifest's captions), so the tokenizer needs nothing downloaded and
  is the same in every process and worker. Checked at start-up against ``model.caption.vocab``
  and ``model.caption.length``.
- ``embeddings``: the source's precomputed ``caption_embedding`` arrays ``[n, E]``, padded to
  ``model.caption.length`` rows (the sources skip longer ones as ``bad_caption``).

Both give ``seg_caption`` and ``seg_caption_mask`` (``vdit_jax.conditioning``); a video with an
empty or dropped caption has an all-False mask, the null caption.
"""

from __future__ import annotations

from typing import Any

from vdit_jax import text


class Captions:
  """Turns items' captions into packed fields; picklable (grain workers pack batches)."""

  def __init__(self, config, source):
    c = config.model.caption
    self.mode = c.mode
    self.tokenizer: text.Tokenizer | None = None
    if self.mode != "tokens":
      self.coder = text.CaptionCoder.from_config(config)
      return
    vocab = getattr(source, "caption_vocabulary", None)
    words, longest = vocab() if vocab is not None else ([], 0)
    if not words:
      raise ValueError(f"model.caption.mode=tokens, but data.source={config.data.source} gives no "
                       "caption text: use a manifest with \"caption\" fields, or set "
                       "model.caption.mode=none")
    self.tokenizer = text.Tokenizer(words)
    if self.tokenizer.vocab_size > c.vocab:
      raise ValueError(f"the captions of data.source={config.data.source} use "
                       f"{len(words)} words, but model.caption.vocab={c.vocab} holds "
                       f"{c.vocab - 1}: set model.caption.vocab >= {self.tokenizer.vocab_size}")
    if longest > c.length:
      raise ValueError(f"captions of data.source={config.data.source} have up to {longest} "
                       f"words, but model.caption.length={c.length}: set "
                       f"model.caption.length >= {longest}")
    self.coder = text.CaptionCoder.from_config(config, self.tokenizer)

  def fields(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """``data.packing.pack_videos``' fields for the items' captions (none without captions)."""
    if self.mode == "none":
      return {}
    key = "caption" if self.mode == "tokens" else "caption_embedding"
    coded = [[self.coder(it.get(key)) for it in row] for row in rows]
    specs = self.coder.seg_fields()
    return {"caption": (specs["caption"], [[c[0] for c in row] for row in coded]),
            "caption_mask": (specs["caption_mask"], [[c[1] for c in row] for row in coded])}
