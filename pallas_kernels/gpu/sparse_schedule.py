"""Block lists of the Mosaic GPU block-sparse kernels, built on device from a `BlockLayout` and the `MaskSpec`.

One job: turn the layout's per-q-block kv lists into what the kernels walk.

  forward / dQ (q-major): per (layout batch, layout head, q block) the listed kv blocks with the duplicates,
    the out-of-range entries and the tiles the mask makes EMPTY removed, FULL tiles first (no mask math in the
    kernel) then PARTIAL ones, each part ascending: idx int32[nb, nh, nQ, W], count and n_full int32[nb, nh, nQ].
  dK/dV (kv-major): the transpose of those lists (`layout.transpose_block_lists`, CSR): q_idx
    int32[nb, nh, nQ * W], start int32[nb, nh, nK + 1], mid int32[nb, nh, nK] (FULL pairs in [start, mid),
    PARTIAL ones in [mid, next start)).
  dK/dV work items (`dkv_items`): the kernel's grid walks items, not kv blocks. A kv block whose run (summed
    over the query heads of a GQA group) is longer than a chunk C is cut into chunks, each one CTA that writes
    an fp32 partial dK/dV to its own slot; `merge_partials` sums them per kv block after the kernel. Hot kv
    columns (sinks, per-frame globals, listed by nearly every q block) would otherwise be one CTA's serial walk.
    The chunks of split runs run first (longest first), so they do not form the tail of the launch; the other
    items keep ascending kv order, the order the first version's (kv block) grid had: neighbouring kv blocks of
    a selector's layout are listed by nearly the same q blocks, and CTAs that run together then share Q / dO in
    L2 (the first device run of this scheme sorted every item by length and lost 0.2-1.6 ms of backward on
    layouts with no split at all).

nb / nh are the layout's own batch / head extents (1 = shared). Memory: O(nb * nh * nQ * W), what the layout
lists; nothing of size nQ * nK or T * S. Everything is jittable device work (two sorts per row, one per layout
head for the transpose); the kernels read the scalars straight from GMEM.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation, transpose_block_lists

_EMPTY, _FULL = int(TileRelation.EMPTY), int(TileRelation.FULL)
DKV_MIN_CHUNK = 16  # no dK/dV chunk shorter than this many listed q blocks (tests lower it to force splits)
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


def dkv_slots(shp: SparseShape) -> int:
  """P: static number of fp32 partial dK/dV slots per (batch, kv head); the grid has nK + P items."""
  return max(8, shp.n_k // 4)


def dkv_items(bwd, shp: SparseShape, hq: int, hkv: int, min_chunk: int | None = None):
  """Work items of the dK/dV kernel and what `merge_partials` needs, all int32, built on device.

  Rows r = (layout batch, kv head if the layout is per head else 0). The run of kv block j over a GQA group
  is the concatenation of its query heads' transposed runs, length L_j. With total = sum_j L_j and P slots,
  the chunk is C = max(min_chunk, ceil(2 total / P)); a run with L_j > C becomes ceil(L_j / C) items of the
  ranges [c C, min((c + 1) C, L_j)), every other kv block one item [0, L_j) (L_j = 0 too: it writes zeros).
  Bound: split runs have L_j > C, so their chunks number < 2 L_j / C and in all < 2 total / C <= P; the items
  number at most nK + P. Returns
    items [nbr, nhr, 4, nK + P]: (kv block, lo, hi, slot), split chunks first by hi - lo descending, then the
      other items in kv order; slot -1 = write dK/dV
      directly, >= 0 = write the fp32 partial there, -2 = no item (the CTA exits);
    slot_run [nbr, nhr, P]: the split run (rank) each slot adds into, R = P // 2 for unused slots;
    run_block [nbr, nhr, R]: the kv block of each split run, nK for unused ranks (dropped by the scatter).
  """
  _, start, _ = bwd
  nb, nh, n_k = shp.nb, shp.nh, shp.n_k
  group = hq // hkv
  p = dkv_slots(shp)
  r = p // 2
  n = start[..., 1:] - start[..., :-1]  # [nb, nh, nK]
  lens = n.reshape(nb, hkv, group, n_k).sum(2) if nh > 1 else n * group  # [nbr, nhr, nK]
  total = lens.sum(-1, keepdims=True)
  c = jnp.maximum(jnp.int32(min_chunk or DKV_MIN_CHUNK), (2 * total + p - 1) // p)  # [nbr, nhr, 1]
  split = lens > c
  nch = jnp.where(split, (lens + c - 1) // c, 1)
  csum = jnp.cumsum(nch, axis=-1)  # [nbr, nhr, nK]
  it = jnp.arange(n_k + p, dtype=jnp.int32)
  flat = csum.reshape(-1, n_k)
  search = lambda cs: jnp.searchsorted(cs, it, side="right", method="scan_unrolled")  # noqa: E731  (no while loop)
  j = jax.vmap(search)(flat).reshape(*csum.shape[:-1], n_k + p)
  valid = it < csum[..., -1:]
  j = jnp.minimum(j, n_k - 1).astype(jnp.int32)
  take = lambda a: jnp.take_along_axis(a, j, axis=-1)  # noqa: E731
  chunk = it - (take(csum) - take(nch))
  sp = take(split) & valid
  lo = jnp.where(sp, chunk * c, 0)
  hi = jnp.where(sp, jnp.minimum(lo + c, take(lens)), take(lens))
  slot = jnp.where(sp, jnp.cumsum(sp, axis=-1) - 1, -1)
  slot = jnp.where(valid, slot, -2).astype(jnp.int32)
  work = jnp.where(sp, hi - lo, jnp.where(valid, 0, -1))  # sort key: split chunks by length, then kv order
  cols = [x.astype(jnp.int32).reshape(-1, n_k + p) for x in (-work, j, lo, hi, slot)]
  _, j_s, lo_s, hi_s, slot_s = jax.lax.sort(cols, dimension=1, num_keys=1, is_stable=True)
  items = jnp.stack([j_s, lo_s, hi_s, slot_s], axis=1).reshape(*csum.shape[:-1], 4, n_k + p)
  # merge metadata, in the unsorted item order where a run's slots are contiguous
  rank = jnp.cumsum(split, axis=-1) - 1  # [nbr, nhr, nK]: rank of each split run
  sl = slot.reshape(-1, n_k + p)
  run_of_item = jnp.where(sp, take(rank), r).reshape(-1, n_k + p)
  slot_run = jax.vmap(lambda s, ro: jnp.full((p,), r, jnp.int32).at[s].set(ro, mode="drop"))(sl, run_of_item)
  blocks = jnp.broadcast_to(jnp.arange(n_k, dtype=jnp.int32), split.shape).reshape(-1, n_k)
  rk = jnp.where(split, rank, r).reshape(-1, n_k)
  run_block = jax.vmap(lambda k_, b_: jnp.full((r,), n_k, jnp.int32).at[k_].set(b_, mode="drop"))(rk, blocks)
  lead = csum.shape[:-1]
  return items, slot_run.reshape(*lead, p), run_block.reshape(*lead, r)


def merge_partials(dk, dv, pk, pv, slot_run, run_block):
  """(dk, dv) [B, S, Hkv, D] with the rows of split kv blocks replaced by the sums of their fp32 partials.

  pk / pv [B, Hkv, P, block_kv, D] float32 (unwritten slots hold anything: they add into the dropped rank R);
  slot_run [nbr, nhr, P], run_block [nbr, nhr, R] from `dkv_items` (broadcast over batch / kv heads).
  Both under ONE `lax.cond`, skipped when nothing was split (most layouts): a GPU conditional reads its
  predicate on the host, so one cond instead of one per tensor halves those reads.
  """
  b, s, hkv, d = dk.shape
  _, _, p, bk, _ = pk.shape
  r = run_block.shape[-1]
  n_k = s // bk

  def merge(dkv):
    sr = jnp.broadcast_to(slot_run, (b, hkv, p))
    rb = jnp.broadcast_to(run_block, (b, hkv, r))
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hkv)[None, :, None]

    def one(x, part):
      sums = jnp.zeros((b, hkv, r + 1, bk, d), jnp.float32).at[bi, hi, sr].add(part)[:, :, :r]
      x5 = x.reshape(b, n_k, bk, hkv, d)
      x5 = x5.at[bi, rb, :, hi, :].set(sums.astype(x.dtype), mode="drop")
      return x5.reshape(b, s, hkv, d)

    return one(dkv[0], pk), one(dkv[1], pv)

  return jax.lax.cond(jnp.any(run_block < n_k), merge, lambda x: x, (dk, dv))


def build(mask: MaskSpec, layout: BlockLayout, s: int):
  """(SparseShape, forward lists, backward lists) for the kernels; see the module docstring."""
  shp = shape_of(layout, s)
  fwd = forward_lists(mask, layout, shp)
  return shp, fwd, backward_lists(fwd, shp)


__all__ = [
  "SPARSE_BLOCKS_KV",
  "SPARSE_BLOCK_Q",
  "SparseShape",
  "DKV_MIN_CHUNK",
  "backward_lists",
  "build",
  "dkv_items",
  "dkv_slots",
  "forward_lists",
  "layout_reason",
  "merge_partials",
]
