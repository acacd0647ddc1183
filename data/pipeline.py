"""The training input pipeline: step -> packed batch, served by a grain iterator.

A global batch is ``data.shards`` independent packing streams of ``data.batch_rows // shards``
rows each (0 shards = one per process); a process makes the streams of its share of the rows, in
order. Stream ``s`` of a step is a pure function of ``(config.seed, step, s)``: its videos are
drawn with ``np.random.default_rng([seed, step, s, 1])`` (the trailing 1 keeps this stream apart
from the sources' per-index ``[seed, index]`` streams; numpy pads seeds with zeros, so ``[s, i]``
and ``[s, i, 0]`` would be the same stream). With a fixed ``data.shards`` the global batch is
the same on any number of processes that divides it. Resuming at step k therefore needs nothing
but k, and grain's iterator state (which records it) round-trips exactly, in process or with
worker processes.

Per step and stream: draw video indices (below the ``data.heldout`` indices the evaluators
keep), ask the source for their sizes only, best-fit them into
the stream's rows of ``data.seq_len`` tokens with at most ``data.max_segments`` videos each
(stopping after ``_MAX_MISSES`` consecutive videos that fit nowhere), render and patchify only
the placed videos, and draw each video's conditioning (``Draw``): its label dropped to the null
id (``model.num_classes``) with probability ``data.label_dropout``, its caption to the null
caption with ``data.caption_dropout`` (drawn apart, so guidance can use either), and with
``data.cond_frames_prob`` its first frames given clean (image-to-video). File sources pass over
unusable files (see ``data.files``); the batch counts them per reason in ``batch["skipped"]``.

Videos that fit nowhere are discarded, so with mixed sizes batches hold slightly smaller videos
than the source: frames (4, 16), side (16, 48), five aspect ratios, L=2304, S=4: the source
averages 697 tokens per video, packed batches 611, with 91% real tokens (stopping at the first
miss instead: about 665 tokens, 85% real). Fixed-size configs are unaffected.

Nothing here touches a device: batches are made in grain worker processes that must not (jax's
pytree functions walk batches on the host; importing jax initialises no backend).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

import grain

from data import captions as captions_lib
from data import files, packing
from data.moving_digits import MovingDigits
from data.synthetic_shapes import SyntheticShapes
from vdit_jax import backends
from vdit_jax import tokens as tok

# Stop filling a batch after this many consecutive drawn videos fit in no row. Larger packs
# tighter but biases the batch further towards small videos.
_MAX_MISSES = 8
_BATCH_STREAM = 1  # see the module docstring
_END_STEP = 2**62  # the iterator is endless in practice; grain needs a finite range

SOURCES = {
    "synthetic_shapes": SyntheticShapes.from_config,
    "moving_digits": MovingDigits.from_config,
    "video_folder": functools.partial(files.FolderSource.from_config, kind="video_folder"),
    "latents": functools.partial(files.FolderSource.from_config, kind="latents"),
}


class Draw(NamedTuple):
  """A video's conditioning draws for one step (``BatchMaker.plan``)."""
  drop_label: bool
  drop_caption: bool = False
  frames: int = 0  # leading grid frames given clean (0 = none)


def make_source(config):
  """The random-access source named by ``config.data.source``."""
  name = config.data.source
  if name not in SOURCES:
    raise ValueError(f"unknown data.source={name!r}: use one of {', '.join(sorted(SOURCES))}")
  return SOURCES[name](config)


class BatchMaker:
  """``step -> packed batch`` for one process; picklable, so grain workers can run it."""

  def __init__(self, config, process_index: int = 0, process_count: int = 1,
               backend: backends.Backend | None = None):
    """``backend``: the run's attention backend, whose ``prepare`` makes what each batch needs
    (default: ``backends.resolve`` on this platform)."""
    d = config.data
    shards = int(d.shards) or process_count
    if shards < 0 or shards % process_count:
      raise ValueError(f"data.shards={d.shards} does not split over {process_count} processes: "
                       f"use 0 (one per process) or a multiple of {process_count}")
    if d.batch_rows % shards:
      raise ValueError(f"data.batch_rows={d.batch_rows} does not split into {shards} packing "
                       f"streams ({process_count} processes, data.shards={d.shards}): use a "
                       f"multiple of {shards}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    for name in ("label_dropout", "caption_dropout", "cond_frames_prob"):
      if not 0.0 <= d[name] <= 1.0:
        raise ValueError(f"data.{name}={d[name]} must be a probability in [0, 1]")
    self.source = make_source(config)
    # The source's last data.heldout indices belong to the evaluators (BatchMaker.heldout_batches).
    self.train_videos = len(self.source) - int(d.heldout)
    if int(d.heldout) < 0 or self.train_videos < 1:
      raise ValueError(f"data.heldout={d.heldout} leaves no videos to train on: the source has "
                       f"{len(self.source)}; hold out fewer (0 <= data.heldout < "
                       f"{len(self.source)})")
    self.skip_reasons = tuple(getattr(self.source, "skip_reasons", ()))
    self.seed = int(config.seed)
    mine = shards // process_count
    self.shards = range(process_index * mine, (process_index + 1) * mine)
    self.rows_per_shard = d.batch_rows // shards
    self.seq_len = int(d.seq_len)
    self.max_segments = int(d.max_segments)
    self.channels = int(d.channels)
    self.label_dropout = float(d.label_dropout)
    self.caption_dropout = float(d.caption_dropout)
    self.cond_frames_prob, self.cond_frames = float(d.cond_frames_prob), int(d.cond_frames)
    # The run's captions: word ids from the source's own vocabulary (model.caption.mode).
    self.captions = captions_lib.Captions(config, self.source)
    self.patch = tuple(int(p) for p in config.model.patch)
    self.null_label = int(config.model.num_classes)
    self.backend = backend or backends.resolve(config.model, self.max_segments)
    # Fail at start-up, not at the first unlucky step thousands of steps in.
    largest = self.source.largest_video()
    # Every grid the source can produce lets the layouts use the bound for rows packed back to
    # back (tight when sizes are few); sources that cannot say get the any-placement bound.
    possible = getattr(self.source, "possible_grids", None)
    if possible is not None:
      self.layout_grids, self.layout_segments = possible(), self.max_segments
    else:
      self.layout_grids = tok.largest_grids(d.frames[1], d.side[1], d.aspect_ratios, self.patch)
      self.layout_segments = None
    n = tok.num_tokens(tok.grid_shape(largest, self.patch))
    if n > self.seq_len:
      raise ValueError(
          f"data.seq_len={self.seq_len} is too small for the largest video this config can draw "
          f"({'x'.join(map(str, largest))} = {n} tokens with patch {self.patch}): raise "
          f"data.seq_len to at least {n} or lower data.side/data.frames")

  def plan(self, step: int, skipped: dict[str, int] | None = None,
           ) -> tuple[list[list[int]], list[list[Draw]]]:
    """Which source videos go into which row at ``step``, and each one's conditioning draws.

    Drawn files that the source's scan found unusable are passed over and counted by reason
    in ``skipped``.
    """
    rows: list[list[int]] = []
    dropped: list[list[bool]] = []
    for shard in self.shards:
      shard_rows, shard_dropped = self._plan_shard(step, shard, skipped)
      rows += shard_rows
      dropped += shard_dropped
    return rows, dropped

  def _plan_shard(self, step: int, shard: int, skipped: dict[str, int] | None,
                  ) -> tuple[list[list[int]], list[list[Draw]]]:
    rng = np.random.default_rng([self.seed, int(step), shard, _BATCH_STREAM])
    indices: list[int] = []
    grid_frames: list[int] = []

    def token_counts():
      while True:
        index = int(rng.integers(self.train_videos))
        try:
          size = self.source.video_size(index)
        except files.Skip as e:
          if skipped is not None:
            skipped[e.reason] += 1
          continue
        indices.append(index)
        grid = tok.grid_shape(size, self.patch)
        grid_frames.append(grid[0])
        yield tok.num_tokens(grid)

    rows, _ = packing.pack_greedy(token_counts(), self.rows_per_shard, self.seq_len,
                                  self.max_segments, max_misses=_MAX_MISSES)
    # Each kind of draw only when the run uses it, after the label draws of every row: adding
    # one leaves the others' streams as they were.
    draws = [[[bool(x)] for x in rng.random(len(row)) < self.label_dropout] for row in rows]
    if self.captions.mode != "none":
      for row, row_draws in zip(rows, draws):
        for d, x in zip(row_draws, rng.random(len(row))):
          d.append(bool(x < self.caption_dropout))
    if self.cond_frames_prob > 0:
      for row, row_draws in zip(rows, draws):
        for i, d, x in zip(row, row_draws, rng.random(len(row))):
          most = min(self.cond_frames, grid_frames[i] - 1)  # at least one frame to generate
          k = int(rng.integers(1, most + 1)) if x < self.cond_frames_prob and most >= 1 else 0
          d += [False] * (2 - len(d)) + [k]
    rows = [[indices[i] for i in row] for row in rows]
    return rows, [[Draw(*d) for d in row_draws] for row_draws in draws]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    skipped = dict.fromkeys(self.skip_reasons, 0)
    rows, draws = self.plan(step, skipped)
    items = []
    for row, row_draws in zip(rows, draws):
      items.append([])
      for index, draw in zip(row, row_draws):
        try:
          item = self.source[index]
        except files.Skip as e:  # found only when loading: the video leaves a gap in its row
          skipped[e.reason] += 1
          continue
        if draw.drop_label:
          item["label"] = self.null_label
        if draw.drop_caption:
          item["caption"] = ""
          item.pop("caption_embedding", None)
        item["frames"] = draw.frames
        items[-1].append(item)
    batch = self.pack(items)
    if self.skip_reasons:  # host-side: the trainer reports them as skipped_<reason> metrics
      batch["skipped"] = {r: np.int64(n) for r, n in skipped.items()}
    return batch

  def pack(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The packed batch of items already placed in rows, with the layouts its backend needs."""
    fields = self.captions.fields(rows)
    if self.cond_frames_prob > 0:
      fields["frames"] = ((np.int32, 0), [[int(it.get("frames", 0)) for it in row]
                                          for row in rows])
    batch = packing.pack_videos(rows, self.patch, self.seq_len, self.max_segments,
                                self.channels, self.null_label, fields)
    # Made here, on the host (in grain's workers when there are any), with static shapes.
    layouts = self.backend.prepare(batch["segment_ids"], batch["coords"], self.layout_grids,
                                   max_segments=self.layout_segments)
    if layouts is not None:
      batch["layouts"] = layouts
    return batch

  def heldout_indices(self, count: int) -> list[int]:
    """The first ``count`` of the source's held-out indices (the last ``data.heldout``)."""
    held = len(self.source) - self.train_videos
    if not 0 < count <= held:
      raise ValueError(f"{count} held-out videos asked for, but data.heldout={held}: set "
                       f"data.heldout >= {max(count, 1)} (indices never trained on)")
    return list(range(self.train_videos, self.train_videos + count))

  def heldout_batches(self, count: int) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The first ``count`` held-out videos packed into whole batches of ``data.batch_rows``
    rows (the last padded with empty rows), and the source index of each row's videos, in
    order. The same for every run of the same data config: evaluations compare across runs.
    Skipped files leave their slot empty."""
    indices = self.heldout_indices(count)
    counts = [tok.num_tokens(tok.grid_shape(self.source.video_size(i), self.patch))
              for i in indices]
    rows, _ = packing.pack_greedy(counts, len(indices), self.seq_len, self.max_segments)
    rows = [[indices[j] for j in row] for row in rows if row]
    rows_per_batch = self.rows_per_shard * len(self.shards)
    rows += [[] for _ in range(-len(rows) % rows_per_batch)]
    loaded = [[(i, self._load(i)) for i in row] for row in rows]
    loaded = [[(i, item) for i, item in row if item is not None] for row in loaded]
    batches = [self.pack([[item for _, item in row] for row in loaded[b:b + rows_per_batch]])
               for b in range(0, len(loaded), rows_per_batch)]
    return batches, [[i for i, _ in row] for row in loaded]

  def _load(self, index: int) -> dict[str, Any] | None:
    try:
      return self.source[index]
    except files.Skip:
      return None


def make_batch(config, step: int, process_index: int = 0, process_count: int = 1,
               backend: backends.Backend | None = None) -> dict[str, np.ndarray]:
  """This process's share of the packed batch of ``step`` (see the module docstring).

  Returns ``tokens f32 [B, L, P]``, ``segment_ids i32 [B, L]``, ``coords i32 [B, L, 3]``,
  ``seg_grid i32 [B, S, 3]`` and ``seg_label i32 [B, S]`` with ``B = data.batch_rows //
  process_count`` (rows ``process_index * B`` onwards of the global batch); empty slots hold the
  null label ``model.num_classes``.
  """
  return BatchMaker(config, process_index, process_count, backend)(step)


def _mark_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; when the caller never ran absl.app (tests, notebooks)
  # they fail with UnparsedFlagAccessError. Marking them parsed keeps their defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """grain's iterator over the batches of ``make_train_iterator``, with every array owned by the
  caller; ``with`` closes it.

  Worker processes hand batches over in shared memory, which grain frees from a background
  thread pool when the array is dropped; a batch still held at interpreter exit is never freed
  (the pool stops first: "resource_tracker: ... leaked shared_memory objects"). Each batch is
  therefore copied out of shared memory as it arrives, so the shared memory is freed while the
  step runs, whatever the caller keeps.
  """

  def __init__(self, iterator: grain.DatasetIterator, skipped: list[dict[str, str]],
               tokenizer=None):
    self._it: grain.DatasetIterator | None = iterator
    # The files the source's scan found unusable (``FolderSource.skipped``; none for the
    # synthetic sources), for the trainer's skipped.jsonl.
    self.skipped = skipped
    # The caption tokenizer the batches were encoded with (None without text captions), which
    # the trainer saves beside the checkpoints.
    self.tokenizer = tokenizer

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    return _owned(next(self._open()))

  def get_state(self) -> dict[str, Any]:
    return self._open().get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._open().set_state(state)

  def close(self) -> None:
    """Stops the worker processes (freeing the batches they had ready) or joins the prefetch
    thread after the batch it is making; idempotent."""
    # Not kept once closed: grain's iterators close again when collected, which fails noisily at
    # interpreter exit (say, a module-level TrainIterator), when their modules are gone.
    it, self._it = self._it, None
    if it is not None:
      it.close()

  def _open(self) -> grain.DatasetIterator:
    if self._it is None:
      raise ValueError("the train iterator is closed: make a new one with make_train_iterator")
    return self._it

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _owned(tree: Any) -> Any:
  """The batch with every array in shared memory copied out (layouts included: a pytree)."""
  shared = grain.multiprocessing.SharedMemoryArray
  return jax.tree.map(lambda x: np.array(x) if isinstance(x, shared) else x, tree)


def make_train_iterator(config, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1, backend: backends.Backend | None = None,
                        ) -> TrainIterator:
  """An endless iterator over ``make_batch(config, step, ...)`` for step = start_step, ...

  ``get_state()`` / ``set_state()`` round-trip exactly. A state must be restored into an
  iterator built with the same ``start_step`` and ``data.worker_count`` (the state counts
  batches from ``start_step``); since batches depend only on the step, resuming by building the
  iterator with ``start_step=<restored step>`` is equivalent.

  With ``data.worker_count > 0`` batches are made in that many worker processes, each keeping
  ``data.prefetch`` batches ready; otherwise one background thread keeps ``data.prefetch`` ready.
  Close it when done, also on errors (``with make_train_iterator(...) as it:``): closing stops
  the workers and frees the batches they had ready, or joins the thread once the batch it is
  making is done, so nothing is left reading at exit.
  """
  d = config.data
  maker = BatchMaker(config, process_index, process_count, backend)
  ds = grain.MapDataset.range(int(start_step), _END_STEP).map(maker)
  if d.worker_count > 0:
    _mark_absl_flags_parsed()
    # Inside a worker the batch is made inline; mp_prefetch's buffer does the prefetching.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(d.worker_count), per_worker_buffer_size=max(1, int(d.prefetch))))
  else:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if d.prefetch > 0:
      # This prefetch thread's close() joins it. (ReadOptions' thread pool would leave the batch
      # it is making running after close(), and interpreter exit would wait for it.) The state
      # is the inner iterator's, {"next_index": n}, as with ReadOptions' prefetching.
      it_ds = grain.experimental.ThreadPrefetchIterDataset(
          it_ds, prefetch_buffer_size=int(d.prefetch))
  skipped = maker.source.skipped() if hasattr(maker.source, "skipped") else []
  return TrainIterator(iter(it_ds), skipped, maker.captions.tokenizer)
