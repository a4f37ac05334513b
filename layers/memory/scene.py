"""Video segmentation for the memory bridge: SceneTiling on per-frame features, or fixed-length segments.

Everything is static-shape and jittable: a video of F frames (the first `num_frames[b]` of them valid) becomes a
segment id per frame [B, F] int32 plus a segment count [B] int32, with at most `max_segments` segments. Frames
past `num_frames` get segment id -1. `segment_frame_table` turns the ids into the [B, K_max, L] frame-index table
(+ mask) that the recurrence consumes, sub-sampling long segments at integer linspace like VideoLLaMB.

SceneTiling (TextTiling on frames, reference/memory_streaming.md section 2, VideoLLaMB self_segment.py):
  c_i = cos(f_i, f_{i+1}), i = 0..F-2   (similarity across the gap after frame i)
  L[i] = L[i-1] if c[i-1] >= c[i] else c[i]   (climb left while similarity does not fall)
  R[i] = R[i+1] if c[i+1] >= c[i] else c[i]   (mirrored)
  d_i = L[i] + R[i] - 2 c_i                     (the paper halves it: same ranking)
A boundary at i ends a segment at frame i (frame i + 1 starts the next one), so a hard cut starting a new scene at
frame t (procedural `cut_frames`) is the boundary t - 1.
Boundaries: "topk" takes the deepest gaps; "threshold" those with d > mean + 0.5 std (over the valid gaps); both
capped at max_segments - 1 and chosen greedily deepest-first so that every segment keeps >= min_length frames
(min_length = 1 is plain top-k, exactly the reference).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["topk", "threshold"]
MODES: tuple[str, ...] = ("topk", "threshold")


def adjacent_similarity(features: jax.Array, num_frames: jax.Array) -> jax.Array:
  """features [B, F, E], num_frames [B] int -> cosine similarity of frames i and i+1, [B, F-1] float32.
  Gaps touching a padding frame are set to -2 (below any cosine), so peaks never climb into padding."""
  f = features.astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-6)
  c = jnp.sum(f[:, :-1] * f[:, 1:], axis=-1)  # [B, F-1]
  gap = jnp.arange(c.shape[1])[None, :]
  return jnp.where(gap < num_frames[:, None] - 1, c, -2.0)


def depth_scores(similarity: jax.Array, num_frames: jax.Array) -> jax.Array:
  """similarity [B, G] (G = F-1 gaps) -> depth d = L + R - 2c, [B, G] float32; -inf at invalid gaps.
  The left/right peaks are two `lax.scan`s (static shapes, any G)."""
  c = jnp.swapaxes(similarity, 0, 1)  # [G, B]: scan over gaps

  def climb(peak_prev_c, ci):
    peak, prev = peak_prev_c
    peak = jnp.where(prev >= ci, peak, ci)
    return (peak, ci), peak

  init = (c[0], c[0])
  _, left = jax.lax.scan(climb, init, c)
  _, right = jax.lax.scan(climb, (c[-1], c[-1]), c, reverse=True)
  d = jnp.swapaxes(left + right - 2.0 * c, 0, 1)
  gap = jnp.arange(d.shape[1])[None, :]
  return jnp.where(gap < num_frames[:, None] - 1, d, -jnp.inf)


def pick_boundaries(
  depth: jax.Array, num_frames: jax.Array, *, max_segments: int, min_length: int = 1, mode: Mode = "topk",
  threshold_std: float = 0.5,
) -> jax.Array:
  """depth [B, G] -> boundary mask [B, G] bool (gap i ends a segment at frame i), <= max_segments - 1 per row.

  Greedy deepest-first: each pick suppresses the gaps within min_length - 1 of it, and gaps closer than
  min_length to either end of the video are never candidates, so every segment has >= min_length frames."""
  if mode not in MODES:
    raise ValueError(f"scene segmentation mode must be one of {MODES}, got {mode!r}")
  if max_segments < 1 or min_length < 1:
    raise ValueError(f"max_segments={max_segments} and min_length={min_length} must be >= 1")
  b, g = depth.shape
  gap = jnp.arange(g)[None, :]
  valid = jnp.isfinite(depth)
  cand = valid & (gap >= min_length - 1) & (gap <= num_frames[:, None] - 1 - min_length)
  if mode == "threshold":
    n = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    dz = jnp.where(valid, depth, 0.0)
    mean = jnp.sum(dz, axis=1, keepdims=True) / n
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (dz - mean) ** 2, 0.0), axis=1, keepdims=True) / n)
    cand = cand & (depth > mean + threshold_std * std)
  score = jnp.where(cand, depth, -jnp.inf)

  def pick(_, state):
    score, chosen = state
    i = jnp.argmax(score, axis=1)  # [B]
    ok = jnp.isfinite(jnp.take_along_axis(score, i[:, None], axis=1))  # [B, 1]
    chosen = chosen | (ok & (gap == i[:, None]))
    near = jnp.abs(gap - i[:, None]) < min_length
    return jnp.where(ok & near, -jnp.inf, score), chosen

  _, chosen = jax.lax.fori_loop(0, max_segments - 1, pick, (score, jnp.zeros((b, g), bool)))
  return chosen


def ids_from_boundaries(boundaries: jax.Array, num_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
  """boundaries [B, F-1] bool -> (segment id per frame [B, F] int32, -1 past num_frames; count [B] int32)."""
  b = boundaries.astype(jnp.int32)
  ids = jnp.concatenate([jnp.zeros((b.shape[0], 1), jnp.int32), jnp.cumsum(b, axis=1)], axis=1)
  frame = jnp.arange(ids.shape[1])[None, :]
  ids = jnp.where(frame < num_frames[:, None], ids, -1)
  count = jnp.where(num_frames > 0, jnp.max(ids, axis=1) + 1, 0).astype(jnp.int32)
  return ids, count


def scene_tiling(
  features: jax.Array, num_frames: jax.Array | None = None, *, max_segments: int, min_length: int = 1,
  mode: Mode = "topk", threshold_std: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """SceneTiling: per-frame features [B, F, E] (e.g. a frame's mean tubelet embedding) -> (segment ids [B, F]
  int32, -1 on padding frames; segment count [B] int32 <= max_segments). num_frames [B] defaults to F."""
  bsz, f = features.shape[:2]
  if num_frames is None:
    num_frames = jnp.full((bsz,), f, jnp.int32)
  if f < 2:
    return ids_from_boundaries(jnp.zeros((bsz, 0), bool), num_frames)
  depth = depth_scores(adjacent_similarity(features, num_frames), num_frames)
  bounds = pick_boundaries(
    depth, num_frames, max_segments=max_segments, min_length=min_length, mode=mode, threshold_std=threshold_std
  )
  return ids_from_boundaries(bounds, num_frames)


def fixed_segments(
  batch: int, frames: int, num_frames: jax.Array | None = None, *, segment_length: int, max_segments: int
) -> tuple[jax.Array, jax.Array]:
  """The fixed-length alternative: frame t is in segment t // segment_length. Returns the same (ids [B, F], count
  [B]) as `scene_tiling`. Raises when `max_segments` segments cannot hold `frames` (a static-shape contract)."""
  if segment_length < 1 or max_segments * segment_length < frames:
    raise ValueError(
      f"fixed segments: {max_segments} segments of {segment_length} frames cannot hold {frames} frames"
    )
  if num_frames is None:
    num_frames = jnp.full((batch,), frames, jnp.int32)
  t = jnp.arange(frames, dtype=jnp.int32)[None, :]
  ids = jnp.where(t < num_frames[:, None], t // segment_length, -1)
  count = ((num_frames + segment_length - 1) // segment_length).astype(jnp.int32)
  return jnp.broadcast_to(ids, (batch, frames)), count


def segment_frame_table(
  segment_ids: jax.Array, count: jax.Array, *, max_segments: int, frames_per_segment: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """segment ids [B, F] -> (frame index table [B, K, L] int32, frame mask [B, K, L] bool, segment valid [B, K]).

  Segment k of n frames starting at frame s keeps min(n, L) frames at integer linspace s + floor(j (n-1) /
  (m-1)) (both ends always kept, as VideoLLaMB); unused entries repeat the segment's first frame (or frame 0 for
  an unused segment) and are masked, so gathering with the table never reads out of range."""
  k_range = jnp.arange(max_segments, dtype=jnp.int32)
  onehot = segment_ids[:, None, :] == k_range[None, :, None]  # [B, K, F]
  length = jnp.sum(onehot, axis=2).astype(jnp.int32)  # [B, K]
  start = jnp.argmax(onehot, axis=2).astype(jnp.int32)  # first frame of each segment (0 when empty)
  m = jnp.minimum(length, frames_per_segment)  # frames kept
  j = jnp.arange(frames_per_segment, dtype=jnp.int32)[None, None, :]
  step = jnp.where(m > 1, (length - 1), 0)[..., None]
  offset = (j * step) // jnp.maximum(m - 1, 1)[..., None]
  mask = j < m[..., None]
  table = jnp.where(mask, start[..., None] + offset, start[..., None])
  valid = k_range[None, :] < count[:, None]
  return table, mask & valid[..., None], valid


def strided_segment_count(frames: int, segment_length: int, stride: int) -> int:
  """Segments of `segment_length` frames every `stride` frames that cover `frames` frames (the last may be short)."""
  if segment_length < 1 or not 1 <= stride <= segment_length:
    raise ValueError(f"strided segments: need 1 <= stride ({stride}) <= segment_length ({segment_length})")
  return 1 if frames <= segment_length else 1 + -(-(frames - segment_length) // stride)


def strided_frame_table(
  batch: int, frames: int, *, segment_length: int, stride: int, max_segments: int,
  num_frames: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fixed (optionally overlapping) segments: segment k holds frames k*stride .. k*stride + segment_length - 1.
  With stride <= segment_length - n + 1 every run of n consecutive frames lies whole inside some segment (a 3-frame
  motion needle is never cut in two). Same outputs as `segment_frame_table`: (table [B, K, L] int32, mask [B, K, L]
  bool, valid [B, K] bool) with K = max_segments >= the segments needed (the rest are padding).

  num_frames [B] int32 (default: all `frames`): each row's real frames, the rest padding; a row of n frames gets
  exactly the segments (and masks) an n-frame video gets, so the padding frames are never read."""
  need = strided_segment_count(frames, segment_length, stride)
  if max_segments < need:
    raise ValueError(f"strided segments: {max_segments} segments of {segment_length} frames every {stride} cannot "
                     f"hold {frames} frames (need {need})")
  k = jnp.arange(max_segments, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(segment_length, dtype=jnp.int32)[None, None, :]
  frame = k * stride + j  # [1, K, L]
  n = jnp.full((batch,), frames, jnp.int32) if num_frames is None else jnp.asarray(num_frames, jnp.int32)
  # strided_segment_count per row: 1 if n <= L else 1 + ceil((n - L) / stride); 0 for an empty row
  row_need = jnp.where(n <= segment_length, 1, 1 + (n - segment_length + stride - 1) // stride)
  row_need = jnp.where(n > 0, row_need, 0)
  valid = jnp.arange(max_segments)[None, :] < row_need[:, None]  # [B, K]
  mask = (frame < n[:, None, None]) & valid[..., None]  # [B, K, L]
  table = jnp.where(mask, frame, 0)
  return table, mask, valid
