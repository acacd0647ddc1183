"""A Fréchet video distance that needs no download: a small 3D-conv feature network trained on
the embedded synthetic shapes, and the Fréchet distance between Gaussians fitted to two sets of
its features.

  python -m evals.features --out ~/.cache/vdit_jax

trains the network of the default ``Recipe`` (about three minutes on 2 CPU cores) and writes it to
``<out>/features-<recipe hash>/``; ``load_or_train`` does the same on first use and loads the
cached weights afterwards. The network is trained to tell the first object's label (shape x
colour) and its initial direction of motion, so its features see appearance and motion, not
appearance only: shuffling a video's frames moves them.

Typical use::

  net = load_or_train()
  fvd = frechet_distance(features(net, real_videos), features(net, sampled_videos))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data import motion
from data import synthetic_shapes as shapes_lib

# Bump when FeatureNet's code changes in a way the recipe does not describe: the cache key
# includes it, so weights of an older network are never loaded into a newer one.
ARCH_VERSION = 1
NUM_DIRECTIONS = len(motion.DIRECTIONS)
# Videos per jitted call of ``features``: every call of one video shape has this batch, padded if
# need be, so each distinct shape compiles once.
FEATURE_BATCH = 32
WEIGHTS_FILE = "weights.npz"
RECIPE_FILE = "recipe.json"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything that decides the trained weights; its hash names the cache entry."""
  seed: int = 0  # seeds the source's items, the init and the data order
  # The source: configs/default.py's data, one object per video so the targets are unambiguous.
  frames: tuple[int, int] = (8, 8)
  side: tuple[float, float] = (32.0, 32.0)
  aspect_ratios: tuple[float, ...] = (0.75, 1.0, 1.33)
  object_size: tuple[float, float] = (0.35, 0.55)
  speed: tuple[float, float] = (0.03, 0.08)
  patch: tuple[int, int, int] = (2, 4, 4)
  train_videos: int = 4096  # items 0.. of the source, rendered once
  eval_videos: int = 512  # the items after them: held out, to report accuracies
  batch_size: int = 16  # videos per step, all of one shape
  steps: int = 1500
  lr: float = 1e-2  # peak of a linear warm-up and cosine decay
  widths: tuple[int, ...] = (16, 32, 64)  # channels of the 3D convolutions
  feature_dim: int = 64  # the features the distance compares

  def key(self) -> str:
    """A short hash of the recipe and ``ARCH_VERSION``: a changed recipe is a new cache entry."""
    blob = json.dumps({"arch_version": ARCH_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def source(self) -> shapes_lib.SyntheticShapes:
    return shapes_lib.SyntheticShapes(
        frames=self.frames, side=self.side, aspect_ratios=self.aspect_ratios,
        num_objects=(1, 1), object_size=self.object_size, speed=self.speed, patch=self.patch,
        num_videos=1_000_000, seed=self.seed)


# ----------------------------------------------------------------------------- the network


class Conv3d(nnx.Module):
  """A convolution with odd kernel sizes and zero "SAME" padding, as one matmul over the
  kernel's shifted copies of the input: on CPU, XLA runs this (forward and backward) several
  times faster than its own 3D convolution."""

  def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int],
               strides: tuple[int, int, int], *, rngs: nnx.Rngs):
    if any(k % 2 == 0 for k in kernel):
      raise ValueError(f"kernel={kernel}: sizes must be odd to pad symmetrically, e.g. (3, 3, 3)")
    self.kernel_size = tuple(kernel)
    self.strides = tuple(strides)
    fan_in = math.prod(kernel) * c_in
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (fan_in, c_out)))
    self.bias = nnx.Param(jnp.zeros((c_out,)))

  def __call__(self, x_BTHWC: jax.Array) -> jax.Array:
    _, T, H, W, _ = x_BTHWC.shape
    (kt, kh, kw), (st, sh, sw) = self.kernel_size, self.strides
    xp = jnp.pad(x_BTHWC, [(0, 0), (kt // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)])
    cols_BTHWK = jnp.concatenate([xp[:, a:a + T:st, b:b + H:sh, c:c + W:sw]
                                  for a in range(kt) for b in range(kh) for c in range(kw)], -1)
    return jnp.einsum("bthwk,ko->bthwo", cols_BTHWK, self.kernel[...]) + self.bias[...]


def _norm(x: jax.Array) -> jax.Array:
  """Parameter-free layer norm over channels: keeps every layer's scale fixed so a short run
  at a high learning rate stays stable."""
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


class FeatureNet(nnx.Module):
  """``[B, T, H, W, 3]`` videos in ``[-1, 1]`` -> features ``[B, F]``: 3D convolutions on the
  pixels, a mean over (T, H, W) so any size works, then the feature layer. Two linear heads
  (label, direction) train it."""

  def __init__(self, widths: Sequence[int], feature_dim: int, *, rngs: nnx.Rngs):
    if len(widths) < 2:
      raise ValueError(f"widths={tuple(widths)}: give at least two convolutions, e.g. (16, 32, 64)")
    # The first layer is spatial only, on each frame at full resolution (a frame blurred by
    # its neighbours hides the corners that tell squares from circles), and halves space. The
    # next sees frames (2t-1, 2t, 2t+1), where objects have moved 1 to 3 pixels a frame, and
    # halves time. Each later layer keeps its input's size and a 2x2 max pool halves space
    # after it: with strided convolutions instead, a short run tells circles from squares
    # barely better than chance.
    kernels = [(1, 3, 3)] + [(3, 3, 3)] * (len(widths) - 1)
    strides = [(1, 2, 2), (2, 1, 1)] + [(1, 1, 1)] * (len(widths) - 2)
    chans = [3, *widths]
    self.convs = nnx.List([Conv3d(c_in, c_out, k, s, rngs=rngs) for c_in, c_out, k, s
                           in zip(chans[:-1], chans[1:], kernels, strides)])
    self.feature = nnx.Linear(widths[-1], feature_dim, rngs=rngs)
    self.label_head = nnx.Linear(feature_dim, shapes_lib.NUM_CLASSES, rngs=rngs)
    self.direction_head = nnx.Linear(feature_dim, NUM_DIRECTIONS, rngs=rngs)

  def __call__(self, video_BTHWC: jax.Array) -> jax.Array:
    """Features ``[B, F]``."""
    x = video_BTHWC
    for i, conv in enumerate(self.convs):
      x = jax.nn.gelu(_norm(conv(x)))
      if i:
        x = nnx.max_pool(x, (1, 2, 2), strides=(1, 2, 2), padding="SAME")
    # Most positions are background: normalising the mean keeps the object's share of it from
    # being a small ripple on a large constant.
    return jax.nn.gelu(self.feature(_norm(x.mean(axis=(1, 2, 3)))))

  def heads(self, feats_BF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Label ``[B, 18]`` and direction ``[B, 8]`` logits."""
    return self.label_head(feats_BF), self.direction_head(feats_BF)


def build(recipe: Recipe) -> FeatureNet:
  return FeatureNet(recipe.widths, recipe.feature_dim, rngs=nnx.Rngs(recipe.seed))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Group:
  """Rendered videos of one shape and their targets."""
  video_NTHWC: np.ndarray
  label_N: np.ndarray
  direction_N: np.ndarray


def first_direction(caption: str) -> int:
  """Index in ``motion.DIRECTIONS`` of the first object's initial direction, read off its
  caption ("a red circle moving up-left and a ..."): the source's exact velocity, where boxes
  of frames 0 and 1 would give the direction after a bounce."""
  first = caption.split(" and a ")[0]
  _, sep, name = first.rpartition(" moving ")
  if not sep or name not in motion.DIRECTIONS:
    raise ValueError(f"caption {caption!r} names no direction of {motion.DIRECTIONS}: expected "
                     "synthetic_shapes captions ('a <colour> <shape> moving <direction>')")
  return motion.DIRECTIONS.index(name)


def render(recipe: Recipe, start: int, count: int) -> dict[tuple[int, int, int], Group]:
  """Items ``start .. start + count - 1`` of the recipe's source, grouped by ``(T, H, W)`` in
  index order."""
  source = recipe.source()
  by_shape: dict[tuple[int, int, int], list[dict]] = {}
  for i in range(start, start + count):
    item = source[i]
    by_shape.setdefault(item["video"].shape[:3], []).append(item)
  return {thw: Group(np.stack([it["video"] for it in items]),
                     np.array([it["label"] for it in items], np.int32),
                     np.array([first_direction(it["caption"]) for it in items], np.int32))
          for thw, items in sorted(by_shape.items())}


def batch_order(sizes: dict[tuple[int, int, int], int], batch_size: int, steps: int,
                seed: int) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
  """``steps`` batches ``(shape, indices into that shape's group)``: each epoch shuffles every
  group, cuts it into whole batches and shuffles the batches; a function of its arguments only."""
  if max(sizes.values(), default=0) < batch_size:
    raise ValueError(f"batch_size={batch_size} is larger than every shape's group {sizes}: "
                     "render more train_videos or lower batch_size")
  rng = np.random.default_rng([seed, 1])
  done = 0
  while True:
    epoch = []
    for thw, n in sizes.items():
      perm = rng.permutation(n)
      epoch += [(thw, perm[b:b + batch_size]) for b in range(0, n - batch_size + 1, batch_size)]
    for j in rng.permutation(len(epoch)):
      if done == steps:
        return
      yield epoch[j]
      done += 1


# ----------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=None)
def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
  """One object per recipe, so the jitted step (which takes it as a static argument) compiles
  once per recipe and shape."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, recipe.lr, warmup_steps=max(1, recipe.steps // 20), decay_steps=max(2, recipe.steps))
  return optax.adam(schedule)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, video_BTHWC: jax.Array,
            label_B: jax.Array, direction_B: jax.Array) -> tuple[jax.Array, dict]:
  net = nnx.merge(graphdef, params)
  label_logits, direction_logits = net.heads(net(video_BTHWC))
  label_loss = optax.softmax_cross_entropy_with_integer_labels(label_logits, label_B).mean()
  dir_loss = optax.softmax_cross_entropy_with_integer_labels(direction_logits, direction_B).mean()
  return label_loss + dir_loss, {"label_loss": label_loss, "direction_loss": dir_loss}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
               opt_state: optax.OptState, video_BTHWC: jax.Array, label_B: jax.Array,
               direction_B: jax.Array) -> tuple[nnx.State, optax.OptState, dict]:
  grads, metrics = jax.grad(loss_fn, has_aux=True)(params, graphdef, video_BTHWC, label_B,
                                                   direction_B)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef: nnx.GraphDef, params: nnx.State,
             video_BTHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
  net = nnx.merge(graphdef, params)
  label_logits, direction_logits = net.heads(net(video_BTHWC))
  return label_logits.argmax(-1), direction_logits.argmax(-1)


def accuracies(net: FeatureNet, groups: dict[tuple[int, int, int], Group]) -> dict[str, float]:
  """Label and direction accuracy of ``net``'s heads on ``groups``."""
  graphdef, params = nnx.split(net)
  hits = np.zeros(2)
  total = 0
  for g in groups.values():
    for b in range(0, len(g.label_N), FEATURE_BATCH):
      label_B, direction_B = _predict(graphdef, params, g.video_NTHWC[b:b + FEATURE_BATCH])
      hits += [np.sum(np.asarray(label_B) == g.label_N[b:b + FEATURE_BATCH]),
               np.sum(np.asarray(direction_B) == g.direction_N[b:b + FEATURE_BATCH])]
      total += len(label_B)
  return {"label_accuracy": float(hits[0] / total), "direction_accuracy": float(hits[1] / total)}


def train(recipe: Recipe, log_every: int = 0) -> tuple[FeatureNet, dict]:
  """The trained network and a report (held-out accuracies, seconds); the same recipe gives the
  same weights bit for bit on one machine (fixed seed, data order and reduction order)."""
  t0 = time.perf_counter()
  groups = render(recipe, 0, recipe.train_videos)
  net = build(recipe)
  graphdef, params = nnx.split(net, nnx.Param)
  tx = make_optimizer(recipe)
  opt_state = tx.init(params)
  sizes = {thw: len(g.label_N) for thw, g in groups.items()}
  for step, (thw, idx) in enumerate(batch_order(sizes, recipe.batch_size, recipe.steps,
                                                recipe.seed)):
    g = groups[thw]
    params, opt_state, metrics = train_step(graphdef, tx, params, opt_state, g.video_NTHWC[idx],
                                            g.label_N[idx], g.direction_N[idx])
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}: " + ", ".join(f"{k} {float(v):.3f}" for k, v in metrics.items()),
            flush=True)
  net = nnx.merge(graphdef, params)
  train_s = time.perf_counter() - t0
  report = accuracies(net, render(recipe, recipe.train_videos, recipe.eval_videos))
  report["train_s"] = round(train_s, 1)
  return net, report


# ----------------------------------------------------------------------------- the cache


def default_cache_dir() -> str:
  return os.environ.get("VDIT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "vdit_jax")


def entry_dir(cache_dir: str, recipe: Recipe) -> str:
  return os.path.join(cache_dir, f"features-{recipe.key()}")


def _flat_params(net: FeatureNet) -> dict[str, np.ndarray]:
  pure = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


def save(net: FeatureNet, recipe: Recipe, report: dict, cache_dir: str) -> str:
  """Writes the weights and ``recipe.json`` (recipe, key, report) under ``entry_dir``; the
  entry appears whole or not at all (written aside, then renamed)."""
  final = entry_dir(cache_dir, recipe)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".features-", dir=cache_dir)
  np.savez(os.path.join(tmp, WEIGHTS_FILE), **_flat_params(net))
  with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
    json.dump({"key": recipe.key(), "arch_version": ARCH_VERSION,
               "recipe": dataclasses.asdict(recipe), "report": report}, f, indent=2)
  try:
    os.rename(tmp, final)
  except OSError:  # another process wrote the same entry first: the same weights, keep theirs
    if not os.path.exists(os.path.join(final, WEIGHTS_FILE)):
      raise
  return final


def load(recipe: Recipe, cache_dir: str) -> FeatureNet:
  """The network saved under ``entry_dir(cache_dir, recipe)``."""
  path = os.path.join(entry_dir(cache_dir, recipe), WEIGHTS_FILE)
  net = build(recipe)
  state = nnx.state(net, nnx.Param)
  pure = nnx.to_pure_dict(state)
  with np.load(path) as saved:
    def restore(key_path, x):
      key = jax.tree_util.keystr(key_path)
      if key not in saved or saved[key].shape != x.shape:
        found = saved[key].shape if key in saved else "nothing"
        raise ValueError(f"{path}: parameter {key} of shape {x.shape} holds {found}: the cache "
                         "entry does not match FeatureNet; delete it to retrain, or bump "
                         "ARCH_VERSION if the network changed")
      return jnp.asarray(saved[key])
    pure = jax.tree_util.tree_map_with_path(restore, pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(net, state)
  return net


def load_or_train(cache_dir: str | None = None, recipe: Recipe = Recipe()) -> FeatureNet:
  """The cached network of ``recipe``, trained and written first if the cache has none.
  ``cache_dir``: default ``$VDIT_JAX_CACHE``, else ``~/.cache/vdit_jax``."""
  cache_dir = cache_dir or default_cache_dir()
  if not os.path.exists(os.path.join(entry_dir(cache_dir, recipe), WEIGHTS_FILE)):
    net, report = train(recipe)
    save(net, recipe, report, cache_dir)
  return load(recipe, cache_dir)


# ----------------------------------------------------------------------------- the distance


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: nnx.GraphDef, params: nnx.State, video_BTHWC: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, params)(video_BTHWC)


def features(net: FeatureNet, videos: Sequence[np.ndarray]) -> np.ndarray:
  """Features ``[N, F]`` of ``videos`` (each ``[T, H, W, 3]`` in ``[-1, 1]``, sizes may differ),
  in their order. Videos of one shape go through together, in padded batches of
  ``FEATURE_BATCH``, so each distinct shape compiles once."""
  graphdef, params = nnx.split(net)
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i, v in enumerate(videos):
    if v.ndim != 4 or v.shape[-1] != 3:
      raise ValueError(f"video {i} has shape {v.shape}: expected [T, H, W, 3] RGB in [-1, 1]")
    by_shape.setdefault(v.shape, []).append(i)
  out_NF = np.zeros((len(videos), net.feature.out_features), np.float32)
  for shape, idx in by_shape.items():
    for b in range(0, len(idx), FEATURE_BATCH):
      chunk = idx[b:b + FEATURE_BATCH]
      video_BTHWC = np.zeros((FEATURE_BATCH, *shape), np.float32)
      video_BTHWC[:len(chunk)] = np.stack([videos[i] for i in chunk])
      out_NF[chunk] = np.asarray(_embed(graphdef, params, video_BTHWC))[:len(chunk)]
  return out_NF


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets ``[N, F]``:
  ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, clamped at 0.

  ``Tr((S_a S_b)^(1/2))`` is the sum of square roots of the eigenvalues of the symmetric PSD
  ``sqrt(S_a) S_b sqrt(S_a)`` (similar to ``S_a S_b``): two symmetric eigendecompositions in
  float64, where a general matrix square root would give complex round-off to discard.
  """
  a = np.asarray(feats_a, np.float64)
  b = np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets of shapes {a.shape} and {b.shape}: expected [N, F] and "
                     "[M, F] with the same F")
  if min(len(a), len(b)) < 2:
    raise ValueError(f"feature sets of {len(a)} and {len(b)} rows: a covariance needs at least 2 "
                     "per set (use a few hundred for a stable distance)")
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
  cov_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
  eig_a, vec_a = np.linalg.eigh(cov_a)
  sqrt_a = (vec_a * np.sqrt(np.clip(eig_a, 0.0, None))) @ vec_a.T
  inner = sqrt_a @ cov_b @ sqrt_a
  inner = 0.5 * (inner + inner.T)  # symmetric up to round-off; eigvalsh wants it exactly
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum()
  d = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt
  return float(max(d, 0.0))


# ----------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Train and cache the feature network.")
  parser.add_argument("--out", default=None,
                      help="cache dir (default $VDIT_JAX_CACHE, else ~/.cache/vdit_jax)")
  parser.add_argument("--force", action="store_true", help="retrain even if cached")
  parser.add_argument("--log_every", type=int, default=100)
  args = parser.parse_args(argv)
  cache_dir = args.out or default_cache_dir()
  recipe = Recipe()
  final = entry_dir(cache_dir, recipe)
  if os.path.exists(os.path.join(final, WEIGHTS_FILE)) and not args.force:
    print(f"already cached: {final}")
    return
  net, report = train(recipe, log_every=args.log_every)
  if args.force and os.path.exists(final):
    shutil.rmtree(final)
  print(f"wrote {save(net, recipe, report, cache_dir)}: {json.dumps(report)}")


if __name__ == "__main__":
  main()
