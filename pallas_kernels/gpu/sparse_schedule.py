"""Block lists of the Mosaic GPU block-sparse kernels, built on device from a `BlockLayout` and the `MaskSpec`.

One job: turn the layout's per-q-block kv lists into what the kernels walk.

  forward / dQ (q-major): per (layout batch, layout head, q block) the listed kv blocks with the duplicates,
    the out-of-range entries and the tiles the mask makes EMPTY removed, FULL tiles first (no mask math in the
    kernel) then PARTIAL ones, each part ascending: idx int32[nb, nh, nQ, W], count and n_full int32[nb, nh, nQ].
  dK/dV (kv-major): the transpose of those lists (`layout.transpose_block_lists`, CSR): q_idx
    int32[nb, nh, nQ * W], start int32[nb, nh, nK + 1], mid int32[nb, nh, nK] (FULL pairs in [start, mid),
    PARTIAL ones in [mid, next start)).

nb / nh are the layout's own batch / head extents (1 = shared). Memory: O(nb * nh * nQ * W), what the layout
lists; nothing of size nQ * nK or T * S. Everything is jittable device work (two sorts per row, one per layout
head for the transpose); the kernels read the scalars straight from GMEM.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation, transpose_block_lists

_EMPTY, _FULL = int(TileRelation.EMPTY), int(TileRelation.FULL)
SPARSE_BLOCK_Q = 128  # the forward / dQ CTA: two consumer warpgroups of 64 rows each
SPARSE_BLOCKS_KV = (64, 128)  # one forward tile; 1 or 2 sub-tiles of 64 in dQ, 1 or 2 dK/dV warpgroups


@dataclasses.dataclass(frozen=True)
class SparseShape:
  """Static extents of a layout as the kernels see it."""

  nb: int  # layout batch extent (1 = shared by the batch)
  nh: int  # layout head extent (1 = shared by the heads, else Hq)
  n_q: int
  n_k: int
  width: int  # W: entries per forward list
  block_q: int
  block_kv: int

  def rows(self, bi, h):
    """Layout (batch, head) indices for a kernel's (batch, query head) (traced ints)."""
    return (bi if self.nb > 1 else 0), (h if self.nh > 1 else 0)


def layout_reason(layout: BlockLayout, b: int, hq: int, t: int, s: int, head_dim: int) -> str | None:
  """Why the GPU block-sparse kernels cannot run this layout (shapes only), or None."""
  idx, cnt = layout.kv_indices, layout.kv_counts
  if layout.block_q != SPARSE_BLOCK_Q or layout.block_kv not in SPARSE_BLOCKS_KV:
    return (
      f"BlockLayout blocks ({layout.block_q}, {layout.block_kv}) (the GPU block-sparse kernels take block_q="
      f"{SPARSE_BLOCK_Q}, block_kv in {SPARSE_BLOCKS_KV}: set attention.sparsity.block_q/block_kv)"
    )
  if head_dim not in (64, 128):
    return f"head_dim={head_dim} with a BlockLayout (the GPU block-sparse kernels take 64 or 128)"
  if t % layout.block_q or s % layout.block_kv:
    return f"lengths T={t}, S={s} are not multiples of the BlockLayout blocks ({layout.block_q}, {layout.block_kv})"
  if len(idx.shape) != 4 or tuple(cnt.shape) != tuple(idx.shape[:3]) or idx.shape[2] != t // layout.block_q:
    return f"BlockLayout kv_indices {tuple(idx.shape)} / kv_counts {tuple(cnt.shape)} are not [B, H, nQ={t // layout.block_q}, W] / [B, H, nQ]"
  if idx.shape[0] not in (1, b) or idx.shape[1] not in (1, hq):
    return f"BlockLayout leading dims {tuple(idx.shape[:2])} must be (1 or B={b}, 1 or Hq={hq})"
  return None


def shape_of(layout: BlockLayout, s: int) -> SparseShape:
  nb, nh, n_q, w = layout.kv_indices.shape
  return SparseShape(nb, nh, n_q, s // layout.block_kv, max(w, 1), layout.block_q, layout.block_kv)


def forward_lists(mask: MaskSpec, layout: BlockLayout, shp: SparseShape):
  """(idx [nb, nh, nQ, W], count [nb, nh, nQ], n_full [nb, nh, nQ]) int32: FULL tiles first, then PARTIAL."""
  n_k, w = shp.n_k, layout.kv_indices.shape[-1]
  idx = layout.kv_indices.astype(jnp.int32)
  cnt = layout.kv_counts.astype(jnp.int32)
  if w == 0:
    z = jnp.zeros(cnt.shape, jnp.int32)
    return jnp.zeros((*cnt.shape, 1), jnp.int32), z, z
  safe = jnp.clip(idx, 0, n_k - 1)
  qi = jnp.arange(shp.n_q, dtype=jnp.int32)[:, None]
  rel = jnp.broadcast_to(
    mask.tile_relation(qi * shp.block_q, safe * shp.block_kv, shp.block_q, shp.block_kv), idx.shape
  )
  valid = (jnp.arange(w) < cnt[..., None]) & (idx >= 0) & (idx < n_k) & (rel != _EMPTY)
  sentinel = 2 * n_k
  key = jnp.sort(jnp.where(valid, safe + n_k * (rel != _FULL), sentinel), axis=-1)  # FULL keys < nK <= PARTIAL
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
  key = jnp.sort(jnp.where(dup, sentinel, key), axis=-1)
  count = (key < sentinel).sum(-1).astype(jnp.int32)
  n_full = (key < n_k).sum(-1).astype(jnp.int32)
  out = jnp.where(key < sentinel, jnp.where(key >= n_k, key - n_k, key), 0).astype(jnp.int32)
  return out, count, n_full


def backward_lists(fwd, shp: SparseShape):
  """Transposed lists for dK/dV: (q_idx [nb, nh, nQ*W], start [nb, nh, nK+1], mid [nb, nh, nK]) int32."""
  idx, count, n_full = fwd
  tags = (jnp.arange(idx.shape[-1], dtype=jnp.int32) >= n_full[..., None]).astype(jnp.int32)
  return transpose_block_lists(idx, count, shp.n_k, tags)


def build(mask: MaskSpec, layout: BlockLayout, s: int):
  """(SparseShape, forward lists, backward lists) for the kernels; see the module docstring."""
  shp = shape_of(layout, s)
  fwd = forward_lists(mask, layout, shp)
  return shp, fwd, backward_lists(fwd, shp)


__all__ = [
  "SPARSE_BLOCKS_KV",
  "SPARSE_BLOCK_Q",
  "SparseShape",
  "backward_lists",
  "build",
  "forward_lists",
  "layout_reason",
]
