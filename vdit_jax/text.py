"""A word-level tokenizer for captions, built from a run's own training captions.

Captions are lower-cased and split on white space (sentence punctuation is dropped, hyphenated
words such as ``up-left`` stay one word). Id 0 is padding; the words get 1..n in sorted order,
so the same vocabulary always gives the same ids. A run saves its tokenizer as
``workdir/tokenizer.json`` beside its checkpoints, and ``sample.py`` reads it from there, so a
caption is encoded the same way at sampling as in training, offline.

A word outside the vocabulary is an error that names it and the known words: a model that never
saw a word can only ignore it, which would be a silent wrong result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0
FILENAME = "tokenizer.json"
_PUNCT = ".,;:!?\"'()"
_SHOWN = 40  # errors list at most this many known words


def words_of(caption: str) -> list[str]:
  """``"A red circle, moving up-left."`` -> ``["a", "red", "circle", "moving", "up-left"]``."""
  out = []
  for raw in str(caption).lower().split():
    word = raw.strip(_PUNCT)
    if word:
      out.append(word)
  return out


class Tokenizer:
  """Words <-> ids; see the module docstring."""

  def __init__(self, words: Iterable[str]):
    self.words = tuple(sorted(set(words)))
    for w in self.words:
      if words_of(w) != [w]:
        raise ValueError(f"tokenizer word {w!r} is not one lower-case word without punctuation")
    self.ids = {w: i + 1 for i, w in enumerate(self.words)}

  @classmethod
  def from_captions(cls, captions: Iterable[str]) -> "Tokenizer":
    return cls(w for c in captions for w in words_of(c))

  @property
  def vocab_size(self) -> int:
    """Rows of an embedding table for these ids: the words and padding."""
    return len(self.words) + 1

  def encode(self, caption: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [length], mask bool [length])``; an empty caption is all padding (the null
    caption). Raises on an unknown word or a caption longer than ``length`` words."""
    words = words_of(caption)
    if len(words) > length:
      raise ValueError(f"caption {caption!r} has {len(words)} words but model.caption.length="
                       f"{length}: shorten it or raise model.caption.length to {len(words)}")
    unknown = [w for w in words if w not in self.ids]
    if unknown:
      known = ", ".join(self.words[:_SHOWN]) + (" ..." if len(self.words) > _SHOWN else "")
      raise ValueError(f"caption {caption!r} has words this run never trained on: "
                       f"{', '.join(map(repr, unknown))}; its vocabulary is: {known or '(empty)'}")
    ids = np.zeros(length, np.int32)
    ids[:len(words)] = [self.ids[w] for w in words]
    return ids, ids != PAD

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[int(i) - 1] for i in ids if int(i) != PAD)

  def save(self, workdir: str) -> str:
    path = os.path.join(workdir, FILENAME)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"words": list(self.words)}, f, indent=0)
    os.replace(path + ".tmp", path)
    return path

  @classmethod
  def load(cls, workdir: str) -> "Tokenizer":
    path = os.path.join(workdir, FILENAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: the run in {workdir} was trained without "
                              "captions (model.caption.mode), or its tokenizer was removed")
    with open(path) as f:
      raw = json.load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("words"), list):
      raise ValueError(f"{path} is not a tokenizer file: expected {{\"words\": [...]}}")
    return cls(raw["words"])

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and other.words == self.words

  def __hash__(self) -> int:  # equal vocabularies hash alike (__eq__ alone makes it unhashable)
    return hash(self.words)

  def __repr__(self) -> str:
    return f"Tokenizer({len(self.words)} words)"


class CaptionCoder:
  """A caption -> ``(values, mask)`` of one video's packed caption fields, for
  ``model.caption.mode``: ``tokens`` takes text (ids ``[C]`` from ``tokenizer``), ``embeddings``
  an ``[n, E]`` array with n <= C (rows ``[C, E]``). An empty caption or None is the null caption
  (an all-False mask). The pipeline and the sampler share it; both refuse longer captions
  before they get here (``Tokenizer.encode``, the sources' and the sampler's checks)."""

  def __init__(self, mode: str, length: int, embed_dim: int = 0,
               tokenizer: Tokenizer | None = None):
    if mode == "tokens" and tokenizer is None:
      raise ValueError("model.caption.mode=tokens needs the run's tokenizer")
    self.mode, self.length, self.embed_dim, self.tokenizer = mode, int(length), int(embed_dim), \
        tokenizer

  @classmethod
  def from_config(cls, config, tokenizer: Tokenizer | None = None) -> "CaptionCoder":
    c = config.model.caption
    return cls(c.mode, c.length, c.embed_dim, tokenizer)

  def __call__(self, caption) -> tuple[np.ndarray, np.ndarray]:
    if self.mode == "tokens":
      return self.tokenizer.encode("" if caption is None else caption, self.length)
    rows = np.zeros((self.length, self.embed_dim), np.float32)
    mask = np.zeros(self.length, bool)
    if caption is not None:
      n = len(caption)
      if n > self.length:
        raise ValueError(f"a caption embedding of {n} tokens does not fit model.caption.length="
                         f"{self.length}")
      rows[:n], mask[:n] = np.asarray(caption, np.float32), True
    return rows, mask

  def seg_fields(self) -> dict[str, tuple]:
    """``tokens.pack_rows``' ``seg_fields`` of the caption arrays (dtype, empty-slot fill)."""
    if self.mode == "tokens":
      values = (np.int32, np.zeros(self.length, np.int32))
    else:
      values = (np.float32, np.zeros((self.length, self.embed_dim), np.float32))
    return {"caption": values, "caption_mask": (bool, np.zeros(self.length, bool))}


def check_or_save(tokenizer: Tokenizer, workdir: str, write: bool) -> None:
  """Saves the run's tokenizer in ``workdir`` (when ``write``), or refuses to go on if the one
  saved there differs: the checkpoints' caption embeddings belong to its ids."""
  if os.path.isfile(os.path.join(workdir, FILENAME)):
    saved = Tokenizer.load(workdir)
    if saved != tokenizer:
      new = sorted(set(tokenizer.words) - set(saved.words))
      gone = sorted(set(saved.words) - set(tokenizer.words))
      raise ValueError(f"{os.path.join(workdir, FILENAME)} holds another vocabulary than this "
                       f"run's captions (new words {new}, missing {gone}): the checkpoints' "
                       "caption ids would change meaning; train with this data in a new workdir")
    return
  if write:
    tokenizer.save(workdir)
