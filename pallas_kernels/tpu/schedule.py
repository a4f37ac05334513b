"""Scalar-prefetched schedules of the TPU flash kernels: which minor blocks each major block visits, as
contiguous ranges (dense masks, `tile_schedule.range_table`) or compacted lists (BlockLayout). See `flash.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import tile_schedule
from pallas_kernels.layout import BlockLayout, MaskSpec
from pallas_kernels.tpu.common import (
  _EMPTY,
)


@dataclasses.dataclass(frozen=True)
class _Sched:
  """Static description of a schedule; its two int32 arrays travel by scalar prefetch (flattened to 1D).

  For the range kind the arrays are (start[n_major], count[n_major]); for the list kind they are
  (idx[nb * nh * n_major * width], count[nb * nh * n_major]) where nb / nh are 1 when the layout is shared.
  """

  kind: str  # "range" | "list"
  n_major: int
  width: int  # grid extent of the minor axis
  nb: int = 1
  nh: int = 1

  def _row(self, b, h, i):
    if self.kind == "range":
      return i
    bb = 0 if self.nb == 1 else b
    hh = 0 if self.nh == 1 else h
    return (bb * self.nh + hh) * self.n_major + i

  def count(self, b, h, i, arr_ref, cnt_ref):
    del arr_ref
    return cnt_ref[self._row(b, h, i)]

  def block(self, b, h, i, j, arr_ref, cnt_ref):
    row = self._row(b, h, i)
    if self.kind == "range":
      last = jnp.maximum(cnt_ref[row] - 1, 0)
      return arr_ref[row] + jnp.minimum(j, last)
    return arr_ref[row * self.width + j]


def _range_sched(mask: MaskSpec, n_rows, n_cols, b_row, b_col, transposed):
  start, count = tile_schedule.range_table(mask, n_rows, n_cols, b_row, b_col, transposed)
  width = max(int(count.max()) if n_rows else 1, 1)
  return _Sched("range", n_rows, width), (jnp.asarray(start), jnp.asarray(count))


def _compact(valid, idx, fill_default):
  """Move entries with `valid` to the front (ascending idx), pad with the last valid one. [..., W] each."""
  w = idx.shape[-1]
  big = jnp.iinfo(jnp.int32).max
  key = jnp.sort(jnp.where(valid, idx, big), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
  keep = (key != big) & ~dup
  key = jnp.sort(jnp.where(keep, key, big), axis=-1)
  cnt = keep.sum(-1).astype(jnp.int32)
  last = jnp.take_along_axis(key, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
  last = jnp.where(cnt[..., None] > 0, last, fill_default)
  pos = jnp.arange(w, dtype=jnp.int32)
  out = jnp.where(pos < cnt[..., None], key, last).astype(jnp.int32)
  return out, cnt


def _list_scheds(mask: MaskSpec, layout: BlockLayout, b: int, hq: int, n_q: int, n_k: int):
  """Forward/dQ (q-major) and dK/dV (kv-major) list schedules from a layout, restricted by the mask."""
  idx, cnt = layout.kv_indices.astype(jnp.int32), layout.kv_counts.astype(jnp.int32)
  if idx.ndim != 4 or idx.shape[2] != n_q or cnt.shape != idx.shape[:3]:
    raise ValueError(
      f"BlockLayout: kv_indices {idx.shape} / kv_counts {cnt.shape} must be [B, H, nQ={n_q}, max_kv] / [B, H, nQ]"
    )
  nb, nh = idx.shape[:2]
  if nb not in (1, b) or nh not in (1, hq):
    raise ValueError(f"BlockLayout: leading dims {(nb, nh)} must be (1 or B={b}, 1 or Hq={hq})")
  bq, bk = layout.block_q, layout.block_kv
  w = idx.shape[-1]
  qi = jnp.arange(n_q, dtype=jnp.int32)[:, None]
  rel = mask.tile_relation(qi * bq, jnp.clip(idx, 0, n_k - 1) * bk, bq, bk)
  valid = (jnp.arange(w) < cnt[..., None]) & (rel != _EMPTY) & (idx >= 0) & (idx < n_k)
  fidx, fcnt = _compact(valid, idx, 0)
  # transposed lists: kv block -> q blocks, via the [nQ, nK] block mask (O(nQ * nK) per layout head)
  onehot = jax.nn.one_hot(fidx, n_k, dtype=jnp.bool_) & (jnp.arange(w) < fcnt[..., None])[..., None]
  bm_t = jnp.swapaxes(onehot.any(axis=-2), -1, -2)  # [nb, nh, nK, nQ]
  qidx = jnp.broadcast_to(jnp.arange(n_q, dtype=jnp.int32), bm_t.shape)
  tidx, tcnt = _compact(bm_t, qidx, 0)
  fwd = _Sched("list", n_q, max(w, 1), nb, nh)
  bwd = _Sched("list", n_k, max(n_q, 1), nb, nh)
  return (fwd, (fidx.reshape(-1), fcnt.reshape(-1))), (bwd, (tidx.reshape(-1), tcnt.reshape(-1)))


def _schedules(mask, layout, b, hq, t, s, bq, bk, bq2, bk2):
  if layout is None:
    fwd = _range_sched(mask, t // bq, s // bk, bq, bk, transposed=False)
    bwd = _range_sched(mask, s // bk2, t // bq2, bk2, bq2, transposed=True)
    return fwd, bwd
  return _list_scheds(mask, layout, b, hq, t // bq, s // bk)
