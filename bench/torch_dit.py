"""vdit-jax's video DiT written in PyTorch, for bench/torch_ref.py: the same layers, shapes and
FLOPs as ``vdit_jax/model.py``, for rows that each hold one video (no packing, so per-video
conditioning broadcasts over the row instead of being gathered per token).

Layers, as in model.py: token embedding ``Linear(P, D)``; sinusoidal timestep features (256,
t scaled by 1000, cos then sin) through ``Linear -> SiLU -> Linear``, plus a label embedding
(``num_classes + 1`` rows, the last the null label); per block adaLN-Zero (``Linear(SiLU(c))``
gives shift, scale and gate per sublayer), affine-free LayerNorm (eps 1e-6), fused QKV without
bias, QK RMSNorm with a learned scale, 3D RoPE (head-dim pairs split over t, h, w as
``model.rope_split``, rotate-half as ``model.apply_rope``), ``scaled_dot_product_attention``,
an output projection without bias, and a GELU (tanh) MLP; a final adaLN (shift, scale) and
``Linear(D, P)``. Attention patterns per block: ``full`` (all tokens of the row), ``spatial``
(the tokens of one frame) and ``temporal`` (one position across the frames), each run as plain
batched SDPA on a reshaped layout, as a PyTorch video DiT would write them.

Imports torch at the top: bench/torch_ref.py imports this module only where torch runs, so
its JAX processes never load torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PATTERNS = ("full", "spatial", "temporal")


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Rotary frequency pairs per axis (t, h, w), as vdit_jax.model.rope_split."""
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
  pairs = head_dim // 2
  t = pairs // 3
  h = (pairs - t) // 2
  return t, h, pairs - t - h


def grid_coords(grid: Sequence[int]) -> torch.Tensor:
  """``(t, h, w)`` of every token of a ``grid``, t-major (the token order of vdit_jax.tokens)."""
  axes = [torch.arange(int(n)) for n in grid]
  return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_cos_sin(grid: Sequence[int], head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
  """cos and sin of the rotation angles, ``[L, 1, K/2]`` (broadcast over rows and heads)."""
  coords = grid_coords(grid).to(torch.float32)
  parts = []
  for axis, n in enumerate(rope_split(head_dim)):
    if n:
      freqs = theta ** (-torch.arange(n, dtype=torch.float32) / n)
      parts.append(coords[:, axis:axis + 1] * freqs)
  angles = torch.cat(parts, dim=-1)[:, None, :]
  return torch.cos(angles), torch.sin(angles)


def apply_rope(x_BLHK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """Rotate-half RoPE: the first and second halves of the head dim are the pairs."""
  x1, x2 = x_BLHK.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(pattern: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           grid: Sequence[int]) -> torch.Tensor:
  """Attention of ``q, k, v [B, L, H, K]`` (one video of token grid ``grid`` per row) under
  ``pattern``; returns ``[B, L, H*K]``."""
  B, L, H, K = q.shape
  T, S = int(grid[0]), int(grid[1]) * int(grid[2])
  if pattern == "full":  # [B, H, L, K]
    def to(a): return a.transpose(1, 2)
    def back(o): return o.transpose(1, 2)
  elif pattern == "spatial":  # one frame per batch entry: [B*T, H, S, K]
    def to(a): return a.reshape(B * T, S, H, K).transpose(1, 2)
    def back(o): return o.transpose(1, 2)
  elif pattern == "temporal":  # one position per batch entry: [B*S, H, T, K]
    def to(a): return a.reshape(B, T, S, H, K).permute(0, 2, 3, 1, 4).reshape(B * S, H, T, K)
    def back(o): return o.reshape(B, S, H, T, K).permute(0, 3, 1, 2, 4)
  else:
    raise ValueError(f"pattern {pattern!r} is unknown: use one of {PATTERNS}")
  o = F.scaled_dot_product_attention(to(q), to(k), to(v))
  return back(o).reshape(B, L, H * K)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
  """Affine-free LayerNorm (adaLN supplies scale and shift)."""
  return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  return layer_norm(x) * (1 + scale) + shift


class Attention(nn.Module):
  def __init__(self, width: int, num_heads: int, head_dim: int, qk_norm: bool):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, head_dim
    self.qkv = nn.Linear(width, 3 * num_heads * head_dim, bias=False)
    self.out = nn.Linear(num_heads * head_dim, width, bias=False)
    self.q_scale = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
    self.k_scale = nn.Parameter(torch.ones(head_dim)) if qk_norm else None

  def forward(self, x: torch.Tensor, pattern: str, grid, cos, sin) -> torch.Tensor:
    B, L, _ = x.shape
    q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).unbind(2)
    if self.q_scale is not None:
      q = F.rms_norm(q, (self.head_dim,), self.q_scale, eps=1e-6)
      k = F.rms_norm(k, (self.head_dim,), self.k_scale, eps=1e-6)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return self.out(attend(pattern, q, k, v, grid))


class Block(nn.Module):
  """adaLN-Zero-modulated attention sublayer and GELU (tanh) MLP."""

  def __init__(self, width: int, num_heads: int, head_dim: int, hidden: int, pattern: str,
               qk_norm: bool):
    super().__init__()
    if pattern not in PATTERNS:
      raise ValueError(f"pattern {pattern!r} is unknown: use one of {PATTERNS}")
    self.pattern = pattern
    self.attn = Attention(width, num_heads, head_dim, qk_norm)
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)
    self.ada = nn.Linear(width, 6 * width)  # (shift, scale, gate) per sublayer

  def forward(self, x, c, grid, cos, sin):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
    x = x + gate1 * self.attn(modulate(x, shift1, scale1), self.pattern, grid, cos, sin)
    h = F.gelu(self.fc1(modulate(x, shift2, scale2)), approximate="tanh")
    return x + gate2 * self.fc2(h)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = (t.to(torch.float32) * 1000.0)[:, None] * freqs
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def block_patterns(variant: str, depth: int) -> tuple[str, ...]:
  """``full``: full attention in every block; ``alternating``: spatial and temporal blocks in
  turn, spatial first (vdit's ``alternating`` schedule)."""
  if variant == "full":
    return ("full",) * depth
  if variant == "alternating":
    return tuple(("spatial", "temporal")[i % 2] for i in range(depth))
  raise ValueError(f"variant {variant!r} is unknown: use full or alternating")


class VideoDiT(nn.Module):
  """Denoiser ``v = f(x_t, t, label)`` on rows of one video's patch tokens each."""

  def __init__(self, token_size: int, width: int, depth: int, num_heads: int, head_dim: int,
               mlp_ratio: float, num_classes: int, patterns: Sequence[str],
               qk_norm: bool = True, rope_theta: float = 10000.0):
    super().__init__()
    if len(patterns) != depth:
      raise ValueError(f"{len(patterns)} block patterns for depth {depth}")
    self.head_dim, self.rope_theta = head_dim, rope_theta
    self.t_freq_dim = 256
    self.embed = nn.Linear(token_size, width)
    self.t_mlp1 = nn.Linear(self.t_freq_dim, width)
    self.t_mlp2 = nn.Linear(width, width)
    self.label_embed = nn.Embedding(num_classes + 1, width)
    self.blocks = nn.ModuleList(
        Block(width, num_heads, head_dim, int(mlp_ratio * width), p, qk_norm) for p in patterns)
    self.final_ada = nn.Linear(width, 2 * width)
    self.final = nn.Linear(width, token_size)

  def forward(self, x_BLP: torch.Tensor, t_B: torch.Tensor, label_B: torch.Tensor,
              grid: Sequence[int]) -> torch.Tensor:
    if math.prod(int(g) for g in grid) != x_BLP.shape[1]:
      raise ValueError(f"rows of {x_BLP.shape[1]} tokens do not hold one video of grid {grid}")
    cos, sin = rope_cos_sin(grid, self.head_dim, self.rope_theta)
    x = self.embed(x_BLP)
    c = self.t_mlp2(F.silu(self.t_mlp1(timestep_embedding(t_B, self.t_freq_dim))))
    c = c + self.label_embed(label_B)
    for block in self.blocks:
      x = block(x, c, grid, cos, sin)
    shift, scale = self.final_ada(F.silu(c))[:, None].chunk(2, dim=-1)
    return self.final(modulate(x, shift, scale))

  def loss(self, x0_BLP: torch.Tensor, label_B: torch.Tensor, grid: Sequence[int],
           shift_base_tokens: int = 256) -> torch.Tensor:
    """Rectified-flow loss: ``x_t = (1 - t) x0 + t eps``, MSE of ``v`` against ``eps - x0``;
    t logit-normal, shifted towards noise by the token count (vdit_jax.diffusion's rule)."""
    B, L, _ = x0_BLP.shape
    u = torch.sigmoid(torch.randn(B))
    shift = math.sqrt(L / shift_base_tokens)
    t = shift * u / (1 + (shift - 1) * u)
    eps = torch.randn_like(x0_BLP)
    x_t = (1 - t)[:, None, None] * x0_BLP + t[:, None, None] * eps
    return F.mse_loss(self(x_t, t, label_B, grid), eps - x0_BLP)


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
