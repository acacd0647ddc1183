"""Rectified flow, as pure functions on packed batches.

``x_t = (1 - t) x0 + t eps``; the model predicts ``v = eps - x0``; t = 1 is pure noise. Each video
draws its own t from a logit-normal, shifted towards noise by its token count (a big video keeps
more of its structure at a given t, so it needs more noise to be equally hard).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vdit_jax import conditioning as cond_lib
from vdit_jax import tokens


def tokens_per_video(seg_grid_BS3: jax.Array) -> jax.Array:
  return jnp.prod(seg_grid_BS3, axis=-1).astype(jnp.float32)


def shift_t(t: jax.Array, shift: jax.Array) -> jax.Array:
  """Maps t in [0, 1] to ``shift t / (1 + (shift - 1) t)``: same end points, more noise if shift > 1."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_t(t: jax.Array, shift: jax.Array) -> jax.Array:
  """The inverse of ``shift_t``: the u with ``shift_t(u, shift) == t``."""
  return t / (shift - (shift - 1.0) * t)


def video_shift(seg_grid_BS3: jax.Array, cfg) -> jax.Array:
  """The timestep shift of each video from its token count (``config.diffusion``)."""
  return (jnp.maximum(tokens_per_video(seg_grid_BS3), 1.0) / cfg.shift_base_tokens) ** cfg.shift_power


def sample_t(key: jax.Array, seg_grid_BS3: jax.Array, cfg) -> jax.Array:
  """Per-video training t ``[B, S]``: logit-normal (a ``t_uniform`` share uniform), then shifted.

  The sampler visits the shifted uniform grid, so a uniform share trains every sampling step
  with some weight: the logit-normal alone puts almost no mass near t = 0, where the last steps
  remove the remaining noise and sharpen edges (about 0.04% of its draws land in the last of
  30 steps, 0.7% with a 0.2 uniform share).
  """
  shape = seg_grid_BS3.shape[:2]
  u = jax.nn.sigmoid(cfg.t_mean + cfg.t_std * jax.random.normal(key, shape))
  share = cfg.get("t_uniform", 0.0)
  if share > 0:
    k_u, k_pick = jax.random.split(jax.random.fold_in(key, 1))
    u = jnp.where(jax.random.uniform(k_pick, shape) < share, jax.random.uniform(k_u, shape), u)
  return shift_t(u, video_shift(seg_grid_BS3, cfg))


def add_noise(x0_BLP: jax.Array, eps_BLP: jax.Array, t_BL: jax.Array) -> jax.Array:
  t = t_BL[..., None]
  return (1.0 - t) * x0_BLP + t * eps_BLP


def velocity_target(x0_BLP: jax.Array, eps_BLP: jax.Array) -> jax.Array:
  return eps_BLP - x0_BLP


def velocity_from_clean(x_t_BLP: jax.Array, x0_BLP: jax.Array, t_BL: jax.Array,
                        t_min: float) -> jax.Array:
  """The velocity ``(x_t - x0) / t`` of a predicted clean ``x0`` (``model.prediction=clean``).

  ``x_t = (1 - t) x0 + t eps`` gives ``eps - x0 = (x_t - x0) / t`` exactly; t is held at
  ``t_min`` or more so the last steps and given tokens (t = 0) stay finite.
  """
  return (x_t_BLP - x0_BLP) / jnp.maximum(t_BL, t_min)[..., None]


def velocity_from_edm(x_t_BLP: jax.Array, out_BLP: jax.Array, t_BL: jax.Array,
                      sigma_data: float) -> jax.Array:
  """The velocity of ``x0 = c_skip(t) x_t + c_out(t) out`` (``model.prediction=edm``).

  Karras et al.'s preconditioning on this path: with data of root mean square ``s``,
  ``E[x_t^2] = (1 - t)^2 s^2 + t^2 =: d``; ``c_skip = (1 - t) s^2 / d`` is the best linear guess
  of x0 from x_t and ``c_out = s t / sqrt(d)`` scales the network's target to unit mean square.
  Near t = 1 the network predicts the clean video (x0 = s out), near t = 0 the velocity
  (v = -x_t - out), so neither end amplifies its error. ``(x_t - x0) / t`` is written out so that
  t = 0 divides nothing: ``v = x_t (t - (1 - t) s^2) / d - s out / sqrt(d)``.
  """
  t = t_BL[..., None]
  s2 = sigma_data * sigma_data
  d = (1.0 - t) ** 2 * s2 + t * t
  return x_t_BLP * (t - (1.0 - t) * s2) / d - sigma_data * out_BLP * jax.lax.rsqrt(d)


def masked_loss(err_BLP: jax.Array, segment_ids_BL: jax.Array, num_segments: int,
                weighting: str = "video") -> jax.Array:
  """Mean squared error over real tokens.

  ``video``: mean per video, then mean over the videos of the batch (every video counts the
  same, whatever its size); ``token``: mean over all real tokens.
  """
  total, count = masked_loss_terms(err_BLP, segment_ids_BL, num_segments, weighting)
  return total / jnp.maximum(count, 1.0)


def masked_loss_terms(err_BLP: jax.Array, segment_ids_BL: jax.Array, num_segments: int,
                      weighting: str = "video") -> tuple[jax.Array, jax.Array]:
  """``masked_loss`` as (sum, count): sums over micro-batches give the big batch's loss exactly."""
  per_tok_BL = jnp.mean(jnp.square(err_BLP.astype(jnp.float32)), axis=-1)
  real_BL = segment_ids_BL > 0
  if weighting == "token":
    return jnp.sum(jnp.where(real_BL, per_tok_BL, 0.0)), jnp.sum(real_BL).astype(jnp.float32)
  if weighting != "video":
    raise ValueError(f"diffusion.loss_weighting={weighting!r} is unknown: use video or token")
  onehot_BLS = (segment_ids_BL[:, :, None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
  sums_BS = jnp.einsum("bl,bls->bs", per_tok_BL, onehot_BLS)
  counts_BS = jnp.sum(onehot_BLS, axis=1)
  present_BS = counts_BS > 0
  means_BS = sums_BS / jnp.maximum(counts_BS, 1.0)
  return jnp.sum(jnp.where(present_BS, means_BS, 0.0)), jnp.sum(present_BS).astype(jnp.float32)


SAMPLERS = ("euler", "heun", "stochastic")


def check_sampler(method: str, eta: float = 1.0) -> str:
  """Raises (naming the choices) unless ``method`` is one of ``SAMPLERS`` and ``eta`` is in
  [0, 1]."""
  if method not in SAMPLERS:
    raise ValueError(f"sampler {method!r} is unknown: use one of {SAMPLERS}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"sampler eta={eta} must be in [0, 1]: 0 adds no noise (Euler), 1 adds "
                     "DDPM's")
  return method


def sample_euler(velocity: Callable[[jax.Array, jax.Array], jax.Array], noise_BLP: jax.Array,
                 segment_ids_BL: jax.Array, shift_BS: jax.Array, num_steps: int) -> jax.Array:
  """Integrates ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 with Euler steps."""
  return integrate(velocity, noise_BLP, segment_ids_BL, shift_BS, num_steps, "euler")


def integrate(velocity: Callable[[jax.Array, jax.Array], jax.Array], noise_BLP: jax.Array,
              segment_ids_BL: jax.Array, shift_BS: jax.Array, num_steps: int,
              method: str = "euler", given_BL: jax.Array | None = None,
              on_step: Callable[[jax.Array], None] | None = None,
              start_BS: jax.Array | None = None, eta: float = 1.0,
              key: jax.Array | None = None) -> jax.Array:
  """Integrates ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 in ``num_steps`` steps.

  Every video follows the uniform grid shifted by its own ``shift`` (the schedule training
  draws t from); ``velocity(x_BLP, t_BS)`` is the (guided) model. ``euler``: one model call per
  step, error O(1/n). ``heun``: Euler's prediction corrected by the velocity at its end (the
  trapezoid rule), error O(1/n^2), two calls per step, the last one's at t = 0 too (the flow's
  velocity is defined there; skipping that correction leaves a first-order error).
  ``stochastic``: one call per step, which gives the clean video ``x0 = x - t v`` and the noise
  ``eps = x + (1 - t) v`` the model sees in ``x``; the step to t' lands on
  ``(1 - t') x0 + sqrt(t'^2 - s^2) eps + s z`` with fresh noise z of ``s = eta * s_ddpm``, where
  ``s_ddpm`` is the spread of DDPM's posterior q(x_t' | x_t, x0) on this path (DDIM's family:
  ``eta = 0`` is Euler exactly, 1 DDPM's ancestral sampler; every eta in [0, 1] keeps the
  marginals of the exact flow as the steps grow, while drawing all of t' fresh does not: it
  narrows the videos towards their mean). The fresh noise lets later steps undo what earlier
  ones got wrong, which an ODE cannot; ``key`` draws it (required).
  A ``fori_loop``, so the compile cost does not grow with ``num_steps``.

  ``given_BL``: tokens that are given (clean conditioning frames, already in ``noise_BLP``):
  their velocity is taken as zero, so they come back exactly as they went in. ``on_step(i)``
  runs on the host after step i (a progress bar), through ``jax.debug.callback``.
  ``start_BS``: where on the unshifted grid each video starts (``unshift_t`` of its t; None: 1,
  pure noise), for ``noise_BLP`` already noised to that t; the steps then cover the rest.
  """
  check_sampler(method, eta)
  if method == "stochastic" and key is None:
    raise ValueError("the stochastic sampler draws noise: pass key=jax.random.key(seed)")
  if given_BL is not None:
    inner = velocity
    velocity = lambda x, t: jnp.where(given_BL[..., None], 0.0, inner(x, t))

  u0_BS = jnp.ones(shift_BS.shape, jnp.float32) if start_BS is None else start_BS

  def t_at(i):
    return shift_t(u0_BS * (1.0 - i / num_steps), shift_BS)

  def body(i, x_BLP):
    t_now, t_next = t_at(i), t_at(i + 1)
    v_BLP = velocity(x_BLP, t_now)
    if method == "stochastic":
      x_next = _stochastic_step(x_BLP, v_BLP, tokens.per_token(t_now, segment_ids_BL)[..., None],
                                tokens.per_token(t_next, segment_ids_BL)[..., None], eta,
                                jax.random.fold_in(key, i))
      if given_BL is not None:
        x_next = jnp.where(given_BL[..., None], x_BLP, x_next)
    else:
      dt_BL = tokens.per_token(t_next - t_now, segment_ids_BL)[..., None]
      x_next = x_BLP + dt_BL * v_BLP
    if method == "heun":
      x_next = x_BLP + dt_BL * 0.5 * (v_BLP + velocity(x_next, t_next))
    if on_step is not None:
      jax.debug.callback(on_step, i)
    return x_next

  return jax.lax.fori_loop(0, num_steps, body, noise_BLP)


def _stochastic_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array, eta: float,
                     key: jax.Array) -> jax.Array:
  """One step of ``integrate``'s ``stochastic`` sampler from t to t_next (< t), per token."""
  x0 = x - t * v
  eps = x + (1.0 - t) * v
  # x_t = a x_t' + noise of variance t^2 - a^2 t'^2 given x_t', with a = (1 - t) / (1 - t');
  # DDPM's posterior spread of x_t' given x_t and x0 is t' sqrt(that) / t.
  a = (1.0 - t) / jnp.maximum(1.0 - t_next, 1e-6)
  var_up = jnp.maximum(t * t - a * a * t_next * t_next, 0.0)
  s = eta * t_next * jnp.sqrt(var_up) / jnp.maximum(t, 1e-6)
  z = jax.random.normal(key, x.shape, x.dtype)
  return (1.0 - t_next) * x0 + jnp.sqrt(jnp.maximum(t_next * t_next - s * s, 0.0)) * eps + s * z


def guided(model_fn: Callable[..., jax.Array], cond: Any, segment_ids_BL: jax.Array,
           coords_BL3: jax.Array, null_label: int, scale: float, layouts: Any = None,
           caption_scale: float | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Classifier-free guidance, every pass of a step in one batched call.

  ``model_fn(x_BLP, t_BS, cond, segment_ids_BL, coords_BL3[, layouts=...])`` is the denoiser;
  ``cond`` a ``conditioning.Conditioning`` (or a bare label array), whose ``null()`` is the
  unconditional half; ``layouts`` (rows first, like the rest of the batch) are passed on when
  given.

  With one scale: ``v_u + scale (v_c - v_u)`` (label and caption guided together). With
  ``caption_scale`` too (a run with captions), the label and the caption get their own scales,
  from three passes: ``v_u + scale (v_l - v_u) + caption_scale (v_c - v_l)``, where ``v_l`` has
  the label and the null caption; equal scales give the one-scale result.
  """
  def call(x, t, c, seg, coords, lay):
    if lay is None:
      return model_fn(x, t, c, seg, coords)
    return model_fn(x, t, c, seg, coords, layouts=lay)

  cond = cond_lib.as_conditioning(cond)
  if caption_scale is not None and cond.caption is None:
    raise ValueError("a caption guidance scale needs a run with captions (model.caption.mode)")
  if caption_scale is None or caption_scale == scale:
    if scale == 1.0:
      return lambda x, t: call(x, t, cond, segment_ids_BL, coords_BL3, layouts)
    halves = [cond, cond.null(null_label)]
    weights = [scale, 1.0 - scale]
  else:
    null = cond.null(null_label)
    label_only = dataclasses.replace(cond, caption=null.caption, caption_mask=null.caption_mask)
    halves = [cond, label_only, null]
    weights = [caption_scale, scale - caption_scale, 1.0 - scale]
  n = len(halves)
  times = lambda tree: jax.tree.map(lambda a: jnp.concatenate([a] * n), tree)
  seg_n, coords_n, layouts_n = times(segment_ids_BL), times(coords_BL3), times(layouts)
  cond_n = functools.reduce(cond_lib.stack, halves)

  def velocity(x_BLP, t_BS):
    parts = jnp.split(call(times(x_BLP), times(t_BS), cond_n, seg_n, coords_n, layouts_n), n)
    return sum(w * v for w, v in zip(weights, parts))

  return velocity
