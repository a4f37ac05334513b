"""Mask -> tile schedule: which kv tiles a row block visits, and which of them need no mask math.

One job: turn a `MaskSpec` into tile ranges, for the GPU kernels (scalar arithmetic on traced positions inside
the kernel) and the TPU kernels (host-side [start, count) tables handed over by scalar prefetch) alike.

Every `MaskSpec` kind is a band: row r sees columns c with lower(r) <= c <= upper(r), both bounds
non-decreasing in r (`band`). Rows are query positions (forward, dQ) or key positions (`transposed`, dK/dV);
positions are absolute (offsets added). Monotone bounds make the non-EMPTY tiles of a block of rows one
contiguous range and its FULL tiles a contiguous sub-range, so a schedule is four integers per row block
(`tile_bounds`). For proper bands (a window with left + right >= 0, every other kind) the classification
equals `MaskSpec.tile_relation` tile by tile; a degenerate window (left + right < 0, nothing visible) gives a
conservative range (listed tiles may be empty, never a skipped visible element, never a false FULL).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.layout import MaskSpec

BIG = 1 << 30  # stands in for +-infinity in integer position arithmetic (int32-safe)


def _is_traced(*xs) -> bool:
  return any(isinstance(x, jax.Array) for x in xs)


def _div_nonneg(a, b: int):
  """a // b for a >= 0: `lax.div` (one instruction in a Mosaic kernel) on jax values, `//` on numpy."""
  if _is_traced(a):
    return lax.div(a, jnp.int32(b))
  return a // b


def _floor_div(a, b: int):
  """Floor division by b > 0, also for negative a (positions shifted by a negative kv_offset)."""
  if _is_traced(a):
    return lax.div(jnp.where(a < 0, a - (b - 1), a), jnp.int32(b))
  return a // b


def band(mask: MaskSpec, transposed: bool):
  """(lower, upper) position functions: row r sees columns c with lower(r) <= c <= upper(r).

  Both are non-decreasing (what makes visible tiles contiguous). They take numpy arrays or jax (traced)
  scalars; +-infinity is +-`BIG`.
  """
  kind = mask.kind
  if kind == "bidirectional":
    return (lambda r: -BIG), (lambda r: BIG)
  if kind == "causal":
    if transposed:  # key k is seen by queries q >= k
      return (lambda r: r), (lambda r: BIG)
    return (lambda r: -BIG), (lambda r: r)
  if kind == "frame_causal":
    tpf, nv = mask.tokens_per_frame, mask.video_tokens

    def where(c, a, b):
      return (jnp if _is_traced(c, a, b) else np).where(c, a, b)

    def frame_start(p):
      s = _floor_div(p, tpf) * tpf
      return s if nv is None else where(p < nv, s, p)

    def frame_last(p):
      e = (_floor_div(p, tpf) + 1) * tpf - 1
      return e if nv is None else where(p < nv, e, p)

    if transposed:  # key k is seen by every query from the start of k's frame on
      return frame_start, (lambda r: BIG)
    return (lambda r: -BIG), frame_last
  # window: q - left <= k <= q + right  <=>  k - right <= q <= k + left
  lo_w, hi_w = (mask.right, mask.left) if transposed else (mask.left, mask.right)
  lower = (lambda r: -BIG) if lo_w is None else (lambda r: r - lo_w)
  upper = (lambda r: BIG) if hi_w is None else (lambda r: r + hi_w)
  return lower, upper


def tile_bounds(mask: MaskSpec, transposed: bool, row_lo, row_hi, col_offset: int, block_col: int, n_col: int):
  """Column-tile ranges for rows [row_lo, row_hi] (absolute positions, inclusive).

  Returns (lo, full_lo, full_hi, hi) with lo <= full_lo <= full_hi <= hi: tiles in [lo, hi) are not EMPTY,
  tiles in [full_lo, full_hi) are FULL. Column tile j covers positions col_offset + j*block_col + [0,
  block_col). Traced int32 scalars inside kernels (GPU); numpy arrays of row blocks on the host (TPU, tests).
  """
  xp = jnp if _is_traced(row_lo, row_hi) else np
  lower, upper = band(mask, transposed)
  zero = xp.int32(0)
  a_lo = lower(row_lo) - col_offset  # first visible column of the first row
  a_hi = lower(row_hi) - col_offset
  b_lo = upper(row_lo) - col_offset
  b_hi = upper(row_hi) - col_offset  # last visible column of the last row
  lo = xp.minimum(_div_nonneg(xp.maximum(a_lo, zero), block_col), n_col)
  hi = xp.where(b_hi < 0, zero, xp.minimum(_div_nonneg(xp.maximum(b_hi, zero), block_col) + 1, n_col))
  hi = xp.maximum(hi, lo)
  full_lo = _div_nonneg(xp.maximum(a_hi, zero) + block_col - 1, block_col)
  full_lo = xp.clip(full_lo, lo, hi)
  full_hi = xp.where(b_lo + 1 < 0, zero, _div_nonneg(xp.maximum(b_lo + 1, zero), block_col))
  full_hi = xp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def nest(bounds, outer):
  """Clamp a sub-block's (lo, full_lo, full_hi, hi) into an enclosing [LO, HI) so skip regions are well formed."""
  lo_o, hi_o = outer
  lo, flo, fhi, hi = bounds
  lo = jnp.clip(lo, lo_o, hi_o)
  hi = jnp.clip(hi, lo, hi_o)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi


@functools.lru_cache(maxsize=256)
def range_table(mask: MaskSpec, n_rows: int, n_cols: int, b_row: int, b_col: int, transposed: bool):
  """Host-side int32 (start[n_rows], count[n_rows]): row block i visits column tiles [start, start + count).

  Rows are q blocks (kv blocks when `transposed`) of the [T, S] problem, offsets taken from `mask`. EMPTY rows
  get (0, 0). O(n_rows) and cached per (mask, shape); the arrays are read-only.
  """
  row_off, col_off = (mask.kv_offset, mask.q_offset) if transposed else (mask.q_offset, mask.kv_offset)
  starts = np.arange(n_rows, dtype=np.int64) * b_row + row_off
  lo, _, _, hi = (
    np.broadcast_to(np.asarray(x, np.int64), (n_rows,))
    for x in tile_bounds(mask, transposed, starts, starts + b_row - 1, col_off, b_col, n_cols)
  )
  count = (hi - lo).astype(np.int32)
  start = np.where(count > 0, lo, 0).astype(np.int32)
  start.setflags(write=False)
  count.setflags(write=False)
  return start, count


__all__ = ["BIG", "band", "nest", "range_table", "tile_bounds"]
