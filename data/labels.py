"""What a run's labels are called: one label set per data source, found from the config alone.

A run's labels are the ids ``0..model.num_classes - 1``; ``model.num_classes`` itself is the
null label (unconditional). Their names belong to the data source that trained the run:

- ``synthetic_shapes``: ``"red circle"`` ... ``"magenta triangle"`` (its ``label_name``);
- ``moving_digits``: the digit, ``"7"``, or its word, ``"seven"``;
- ``video_folder`` and ``latents``: the manifest's optional ``"label_name"`` field (one name per
  id, see ``data.files``); without it, ids only.

``label_set(config)`` builds the set from the config (and, for file sources, the manifest's
lines; no video file is opened), so ``sample.py`` and the trainer's periodic samples parse
labels the same way without scanning a folder. Every set parses an id (any int in
``0..num_classes``) or a name, case-insensitive, and errors name the bad label and the valid
choices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import ml_collections

from data import files, moving_digits, synthetic_shapes

UNCONDITIONAL = "unconditional"  # the null label's name in every set
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SHOWN_NAMES = 24  # errors list at most this many names


@dataclasses.dataclass(frozen=True)
class LabelSet:
  """The labels of one run: ids ``0..num_classes - 1`` (``num_classes`` = unconditional).

  ``names`` maps ids to their names (it may cover only some ids, or none); ``aliases`` are other
  accepted spellings (lowercase); ``no_names`` says why there are no names, for errors.
  """
  source: str
  num_classes: int
  names: dict[int, str] = dataclasses.field(default_factory=dict)
  aliases: dict[str, int] = dataclasses.field(default_factory=dict)
  no_names: str = ""

  def name(self, label: int) -> str:
    """``label``'s name: its source's name, ``"unconditional"``, or the id when it has none."""
    label = int(label)
    if label == self.num_classes:
      return UNCONDITIONAL
    if not 0 <= label < self.num_classes:
      raise ValueError(f"label {label} is out of range for this {self.source} run: "
                       f"{self._choices()}")
    return self.names.get(label, str(label))

  def parse(self, text: str | int) -> int:
    """The id of ``text``: an id such as ``"7"`` or a name such as ``"Red  Circle"``."""
    key = " ".join(str(text).lower().split())
    if re.fullmatch(r"[0-9]+", key):
      label = int(key)
      if label > self.num_classes:
        raise ValueError(f"label {label} is out of range for this {self.source} run: "
                         f"{self._choices()}")
      return label
    lookup = {n.lower(): i for i, n in self.names.items()}
    lookup.update(self.aliases)
    lookup[UNCONDITIONAL] = self.num_classes
    if key not in lookup:
      raise ValueError(f"unknown label {str(text)!r} for this {self.source} run: "
                       f"{self._choices()}")
    return lookup[key]

  def _choices(self) -> str:
    ids = (f"use an id 0..{self.num_classes - 1} ({self.num_classes} or "
           f"'{UNCONDITIONAL}' for unconditional)")
    if not self.names:
      return f"{ids}; {self.no_names or 'its labels have no names'}"
    shown = [repr(self.names[i]) for i in sorted(self.names)][:_SHOWN_NAMES]
    more = len(self.names) - len(shown)
    return f"{ids} or a name: {', '.join(shown)}{f' and {more} more' if more else ''}"


def _synthetic_shapes(config: ml_collections.ConfigDict) -> LabelSet:
  n = int(config.model.num_classes)
  names = {i: synthetic_shapes.label_name(i) for i in range(min(n, synthetic_shapes.NUM_CLASSES))}
  return LabelSet("synthetic_shapes", n, names)


def _moving_digits(config: ml_collections.ConfigDict) -> LabelSet:
  n = int(config.model.num_classes)
  digits = range(min(n, moving_digits.NUM_CLASSES))
  return LabelSet("moving_digits", n, {d: str(d) for d in digits},
                  aliases={_DIGIT_WORDS[d]: d for d in digits})


def _files(config: ml_collections.ConfigDict) -> LabelSet:
  d, n = config.data, int(config.model.num_classes)
  if not d.manifest:
    return LabelSet(d.source, n, no_names="the run had no manifest, so its labels have no names")
  if not os.path.isfile(d.manifest):
    return LabelSet(d.source, n, no_names=f"its manifest data.manifest={d.manifest!r} is not "
                    "readable here, so label names are unknown")
  names = files.label_names(files.read_manifest(d.path, d.manifest), n)
  return LabelSet(d.source, n, names, no_names=f"its manifest {d.manifest} has no \"label_name\"")


LABEL_SETS: dict[str, Callable[[ml_collections.ConfigDict], LabelSet]] = {
    "synthetic_shapes": _synthetic_shapes,
    "moving_digits": _moving_digits,
    "video_folder": _files,
    "latents": _files,
}


def label_set(config: ml_collections.ConfigDict) -> LabelSet:
  """The label set of the run ``config`` describes (the source named by ``config.data.source``)."""
  source = config.data.source
  if source not in LABEL_SETS:
    raise ValueError(f"unknown data.source={source!r}: use one of {', '.join(sorted(LABEL_SETS))}")
  return LABEL_SETS[source](config)
