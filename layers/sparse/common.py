"""Helpers every selector shares: block pooling, block-level mask relations, list compaction, the layer schedule.

Memory rule (DESIGN section 6): nothing here builds a [T, S] array. The largest objects are block-level
([nQ, nK] relations and gate scores, i.e. T * S / (block_q * block_kv)) and the output lists
[B, H, nQ, width] with a static `width` each selector bounds from its parameters.

Layout conventions produced here (what `BlockLayout` and the kernels understand):
  * entries [0, count) are sorted ascending, unique, in range, and never a tile the mask makes EMPTY;
  * entries past `count` repeat the last valid entry (a valid index: the TPU pipeline sees an unchanged block and
    issues no DMA; every consumer ignores them through `kv_counts`);
  * H is 1 (pattern shared by all heads) or Hq: a selection shared by a GQA group is repeated over its G query
    heads, because the kernels take a layout head axis of 1 or Hq (pallas_kernels/tpu/schedule.py `_list_scheds`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation

EMPTY = int(TileRelation.EMPTY)


def is_static_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def check_lengths(t: int, s: int, block_q: int, block_kv: int) -> None:
  """One-line error when the sequence cannot be cut into selection blocks."""
  if t % block_q or s % block_kv:
    raise ValueError(
      f"block-sparse selection: lengths T={t}, S={s} are not multiples of attention.sparsity.block_q={block_q} / "
      f"block_kv={block_kv}; pick blocks that divide the sequence length"
    )


def block_means(x: jax.Array, block: int) -> jax.Array:
  """x [B, N, H, D] -> fp32 mean over each run of `block` tokens: [B, H, N / block, D]."""
  b, n, h, d = x.shape
  pooled = x.astype(jnp.float32).reshape(b, n // block, block, h, d).mean(axis=2)
  return jnp.swapaxes(pooled, 1, 2)


def group_mean(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, Hq, ...] -> [B, Hkv, ...]: mean over the query heads of each GQA group (selection shared by the group)."""
  b, hq = x.shape[:2]
  return x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(axis=2)


def block_relation(mask: MaskSpec, n_q: int, n_k: int, block_q: int, block_kv: int) -> jax.Array:
  """int32 [nQ, nK] TileRelation of every (q block, kv block) pair (block level: T * S / (bq * bk) entries)."""
  qi = jnp.arange(n_q, dtype=jnp.int32)[:, None] * block_q
  kj = jnp.arange(n_k, dtype=jnp.int32)[None, :] * block_kv
  return jnp.broadcast_to(mask.tile_relation(qi, kj, block_q, block_kv), (n_q, n_k))


def tile_visible(mask: MaskSpec, q_block: jax.Array, kv_block: jax.Array, block_q: int, block_kv: int) -> jax.Array:
  """bool, broadcast of the inputs: the tile (q_block, kv_block) is not EMPTY under the mask."""
  shape = jnp.broadcast_shapes(jnp.shape(q_block), jnp.shape(kv_block))
  rel = mask.tile_relation(q_block * block_q, kv_block * block_kv, block_q, block_kv)
  return jnp.broadcast_to(rel != EMPTY, shape)  # bidirectional masks answer with a scalar


def diagonal_span(n_q: int, block_q: int, block_kv: int) -> tuple[np.ndarray, int]:
  """The kv blocks overlapping each q block's own positions: (first int32[nQ], width), static (host ints only).

  These are the 'own' blocks MoBA forces and the 'diagonal' XAttention forces: under a causal or frame-causal
  mask they hold the row's most recent keys, so keeping them means every row sees at least itself.
  """
  i = np.arange(n_q)
  first = (i * block_q) // block_kv
  last = ((i + 1) * block_q - 1) // block_kv
  return first.astype(np.int32), int((last - first).max()) + 1


def diagonal_candidates(n_q: int, n_k: int, block_q: int, block_kv: int) -> tuple[jax.Array, jax.Array]:
  """(idx int32 [nQ, w], ok bool [nQ, w]): each q block's own kv blocks (see `diagonal_span`)."""
  first, w = diagonal_span(n_q, block_q, block_kv)
  idx = first[:, None] + np.arange(w)[None, :]
  last = ((np.arange(n_q) + 1) * block_q - 1) // block_kv
  ok = (idx <= last[:, None]) & (idx < n_k)
  return jnp.asarray(np.minimum(idx, n_k - 1), jnp.int32), jnp.asarray(ok)


def compact(idx: jax.Array, ok: jax.Array, n_k: int) -> tuple[jax.Array, jax.Array]:
  """Candidate lists -> sorted unique lists: (kv_indices int32 [..., W], kv_counts int32 [...]).

  idx / ok [..., W] (ok False drops the entry). Duplicates are dropped, survivors sorted ascending and moved to
  the front; the tail repeats the last valid entry (0 for an empty row). Two sorts of W, no [.., nK] one-hot.
  """
  key = jnp.sort(jnp.where(ok, idx, n_k).astype(jnp.int32), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
  key = jnp.sort(jnp.where(dup, n_k, key), axis=-1)
  count = jnp.sum(key < n_k, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(key, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  return jnp.where(key < n_k, key, last).astype(jnp.int32), count


def pad_width(idx: jax.Array, width: int) -> jax.Array:
  """Pad lists [..., w] to [..., width] by repeating their last column (padding is past the count anyway)."""
  w = idx.shape[-1]
  if w >= width:
    return idx
  return jnp.concatenate([idx, jnp.broadcast_to(idx[..., -1:], (*idx.shape[:-1], width - w))], axis=-1)


def to_layout(idx: jax.Array, count: jax.Array, num_q_heads: int, block_q: int, block_kv: int) -> BlockLayout:
  """[B, Hsel, nQ, W] lists -> a BlockLayout the kernels take (head axis 1 or Hq: GQA selections repeated)."""
  h = idx.shape[1]
  if h not in (1, num_q_heads):
    g = num_q_heads // h
    idx, count = jnp.repeat(idx, g, axis=1), jnp.repeat(count, g, axis=1)
  return BlockLayout(idx.astype(jnp.int32), count.astype(jnp.int32), block_q, block_kv)


def full_lists(mask: MaskSpec, n_q: int, n_k: int, block_q: int, block_kv: int) -> tuple[jax.Array, jax.Array]:
  """Every non-EMPTY kv block of each q block: ([1, 1, nQ, nK], [1, 1, nQ]) (a dense layer inside a scan)."""
  ok = block_relation(mask, n_q, n_k, block_q, block_kv) != EMPTY
  idx = jnp.broadcast_to(jnp.arange(n_k, dtype=jnp.int32), (n_q, n_k))
  idx, cnt = compact(idx, ok, n_k)
  return idx[None, None], cnt[None, None]


@dataclasses.dataclass(frozen=True)
class Selector:
  """Base of every selector: `select(q, k, mask, layer_index) -> BlockLayout | None` plus the layer schedule.

  Subclasses implement `lists(q, k, mask, layer_index) -> (idx [B, Hsel, nQ, W], count [B, Hsel, nQ])` with
  Hsel in {1, Hkv}. Layers in `dense_layers` run dense: with a Python layer index the selector returns None
  (no layout at all); with the traced index of a scanned stack the shapes of every layer must agree, so a dense
  layer gets the list of all its non-EMPTY blocks (same math as dense, but O(nQ * nK) metadata per layer: use
  model.scan_layers=false at long lengths when some layers are dense).
  Frozen and hashable: the `Attention` layer keeps it as a static attribute.
  """

  block_q: int = 128
  block_kv: int = 128
  dense_layers: frozenset[int] = frozenset()

  def lists(self, q, k, mask: MaskSpec, layer_index) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def __call__(self, q: jax.Array, k: jax.Array, mask: MaskSpec, layer_index=0) -> BlockLayout | None:
    """q [B, T, Hq, D], k [B, S, Hkv, D] -> BlockLayout (kv_indices [B|1, Hq|1, nQ, W]) or None (dense)."""
    t, s = q.shape[1], k.shape[1]
    check_lengths(t, s, self.block_q, self.block_kv)
    if is_static_int(layer_index) and int(layer_index) in self.dense_layers:
      return None
    idx, cnt = self.lists(q, k, mask, layer_index)
    if self.dense_layers and not is_static_int(layer_index):
      n_q, n_k = t // self.block_q, s // self.block_kv
      f_idx, f_cnt = full_lists(mask, n_q, n_k, self.block_q, self.block_kv)
      width = max(idx.shape[-1], n_k)
      idx, f_idx = pad_width(idx, width), pad_width(f_idx, width)
      shape = jnp.broadcast_shapes(idx.shape, f_idx.shape)
      dense = jnp.isin(layer_index, jnp.asarray(sorted(self.dense_layers), jnp.int32))
      idx = jnp.where(dense, jnp.broadcast_to(f_idx, shape), jnp.broadcast_to(idx, shape))
      cnt = jnp.where(dense, jnp.broadcast_to(f_cnt, shape[:-1]), jnp.broadcast_to(cnt, shape[:-1]))
    return to_layout(idx, cnt, q.shape[2], self.block_q, self.block_kv)


def video_extent(mask: MaskSpec, video_grid: tuple[int, int, int] | None, s: int) -> tuple[int, int] | None:
  """(tokens_per_frame, video tokens) of the keys, or None when nothing says where frames are.

  The selector's constructor grid (frames, height, width) in tokens gives the frame size; a frame-causal mask
  gives it too (and the video length of this call, which may differ from the training grid at evaluation).
  """
  if video_grid is not None:
    f, h, w = video_grid
    tpf = h * w
    if mask.kind == "frame_causal" and mask.tokens_per_frame != tpf:
      raise ValueError(
        f"block-sparse selection: the mask's frames have {mask.tokens_per_frame} tokens but the selector's video "
        f"grid {tuple(video_grid)} has {tpf} per frame"
      )
    if mask.kind == "frame_causal":
      return tpf, min(s, mask.video_tokens if mask.video_tokens is not None else s)
    return tpf, min(s, f * tpf)
  if mask.kind == "frame_causal":
    return mask.tokens_per_frame, min(s, mask.video_tokens if mask.video_tokens is not None else s)
  return None
