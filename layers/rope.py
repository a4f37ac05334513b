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


def frame_positions(frame_t, hw: tuple[int, int], text_len: int) -> jax.Array:
  """Position triples [..., N, 3] of a video whose frame (tubelet-row) i sits at time position frame_t[..., i]
  (int or float [..., gt]; h, w in raster order as usual), followed by `text_len` text tokens.

  Text starts after the largest video coordinate, the rule `video_text_positions` follows: at
  max(floor(max t) + 1, gh, gw). With frame_t = arange(gt) this is exactly `video_text_positions` (int32); the
  trained-length tricks (`random_frame_t`, `shifted_frame_t`, `interpolated_frame_t`) only move frame_t.
  Float frame_t (interpolation) gives float32 positions; RoPE (`tables`) takes fractional positions."""
  frame_t = jnp.asarray(frame_t)
  gh, gw = hw
  gt = frame_t.shape[-1]
  lead = frame_t.shape[:-1]
  t = jnp.broadcast_to(frame_t[..., :, None], (*lead, gt, gh * gw)).reshape(*lead, gt * gh * gw)
  hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  h = jnp.broadcast_to(jnp.asarray(np.tile(hh.reshape(-1), gt), t.dtype), t.shape)
  w = jnp.broadcast_to(jnp.asarray(np.tile(ww.reshape(-1), gt), t.dtype), t.shape)
  video = jnp.stack([t, h, w], axis=-1)  # [..., gt*gh*gw, 3]
  last = jnp.floor(frame_t.max(axis=-1)).astype(jnp.int32) if gt else jnp.zeros(lead, jnp.int32)
  start = jnp.maximum(last + 1 if gt else last, max(gh, gw) if gt else 0)  # [...]
  text = text_positions(start, text_len).astype(t.dtype)  # [..., text_len, 3]
  return jnp.concatenate([video, text], axis=-2)


def random_frame_t(key: jax.Array, num_frames: int, max_position: int) -> jax.Array:
  """Randomised positions (Ruoss et al. 2023, arXiv:2305.16843): int32 [num_frames], a sorted random subset of
  [0, max_position) without repeats, so training sees every position and every frame gap up to max_position
  while the frames keep their order."""
  if max_position < num_frames:
    raise ValueError(f"random_frame_t: max_position={max_position} < num_frames={num_frames}")
  return jnp.sort(jax.random.choice(key, max_position, (num_frames,), replace=False)).astype(jnp.int32)


def shifted_frame_t(key: jax.Array, num_frames: int, max_position: int) -> jax.Array:
  """A random shift: int32 [num_frames] = o + arange(num_frames), o uniform in [0, max_position - num_frames], so
  the frames stay contiguous (gaps of 1) but land anywhere in [0, max_position)."""
  if max_position < num_frames:
    raise ValueError(f"shifted_frame_t: max_position={max_position} < num_frames={num_frames}")
  offset = jax.random.randint(key, (), 0, max_position - num_frames + 1)
  return (offset + jnp.arange(num_frames)).astype(jnp.int32)


def interpolated_frame_t(num_frames: int, trained_range: int) -> np.ndarray:
  """Frame-position interpolation (Chen et al. 2023, arXiv:2306.15595, on the time axis only): float32
  [num_frames] = i * trained_range / num_frames when the video is longer than the trained range, so every frame
  position stays inside [0, trained_range); shorter videos keep arange(num_frames)."""
  t = np.arange(num_frames, dtype=np.float32)
  if num_frames > trained_range:
    t = t * np.float32(trained_range / num_frames)
  return t
