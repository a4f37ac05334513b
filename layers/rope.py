"""Rotary position embeddings: 3D (t, h, w) for video tokens and 1D for text, in one table.

Every token carries a position triple. Frequencies are dealt to the three axes interleaved (frequency i
rotates by axis i % 3), so each axis gets high and low frequencies. A text token at 1D position p uses
(p, p, p), which makes its rotation exactly standard 1D RoPE; text positions start after the largest
video coordinate (as in M-RoPE), so text is ordered after the whole video.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RopeTables:
  """cos/sin of the rotation angles, float32 [N, D/2] (shared across the batch) or [B, N, D/2] (per example:
  caches, offsets and dropped tokens give each row its own positions); shared across heads."""

  cos: jax.Array
  sin: jax.Array

  def take(self, perm) -> RopeTables:
    """Tables for tokens stored in another order (ring layouts): token i describes token perm[i]."""
    return RopeTables(self.cos[..., perm, :], self.sin[..., perm, :])


def video_text_positions(grid: tuple[int, int, int], text_len: int) -> np.ndarray:
  """int32 [N, 3] position triples: video tokens in (t, h, w) raster order, then text tokens."""
  gt, gh, gw = grid
  t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
  video = np.stack([t, h, w], axis=-1).reshape(-1, 3)
  start = max(gt, gh, gw) if gt * gh * gw else 0
  text = np.repeat(start + np.arange(text_len)[:, None], 3, axis=1)
  return np.concatenate([video, text], axis=0).astype(np.int32)


def text_positions(start, length: int) -> jax.Array:
  """int32 [..., length, 3] triples of 1D text positions start, start+1, ... (`start` int or int [...]): the
  positions of text appended after a cache whose last text position is start - 1."""
  p = jnp.asarray(start, jnp.int32)[..., None] + jnp.arange(length, dtype=jnp.int32)  # [..., length]
  return jnp.repeat(p[..., None], 3, axis=-1)


def tables(positions, head_dim: int, theta: float = 10_000.0) -> RopeTables:
  """Rotation tables for int [N, 3] / [B, N, 3] position triples (or [N] 1D positions): [N | B,N, D/2]."""
  if head_dim % 2:
    raise ValueError(f"rope: head_dim must be even, got {head_dim}")
  positions = jnp.asarray(positions, jnp.float32)
  if positions.ndim == 1:
    positions = jnp.repeat(positions[:, None], 3, axis=1)
  if positions.shape[-1] != 3:
    raise ValueError(f"rope: positions must be [N, 3] or [B, N, 3] (t, h, w) triples, got {positions.shape}")
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  axis_of_freq = jnp.arange(half) % 3
  pos_per_freq = jnp.take(positions, axis_of_freq, axis=-1)  # [..., N, half]
  angles = pos_per_freq * inv_freq
  return RopeTables(jnp.cos(angles), jnp.sin(angles))


def apply(x: jax.Array, rope: RopeTables) -> jax.Array:
  """Rotate x [B, N, H, D] (rotate-half convention) by tables [N, D/2] or [B, N, D/2]; math in fp32, result in
  x.dtype."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  lead = (None,) if rope.cos.ndim == 2 else ()
  cos = rope.cos[(*lead, ..., None, slice(None))]
  sin = rope.sin[(*lead, ..., None, slice(None))]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
