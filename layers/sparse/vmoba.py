"""`vmoba`: video MoBA (KwaiVGI/VMoBA): gates over video chunks whose shape cycles 1D / 2D / 3D by layer.

The kernels compute contiguous kv blocks of `block_kv` tokens, so chunks are built from kv blocks: with the video
in raster order (t, h, w) and `block_kv` dividing the frame size, the video's kv blocks form a grid
[frames, P = tokens_per_frame / block_kv] (P horizontal bands of each frame). Layer l uses partition l % 3:
  0  1D temporal:        `chunk_frames` whole frames                       (chunk = chunk_frames x P blocks)
  1  2D spatial:         `chunk_bands` bands across all frames             (chunk = frames x chunk_bands)
  2  3D spatio-temporal: `chunk_bands` bands of `chunk_frames` frames      (chunk = chunk_frames x chunk_bands)
Kv blocks after the video (the text) are one chunk each. Chunk key = mean of its keys (the mean of its block
means); gate = mean query of the q block . chunk key (fp32, averaged over the GQA group); gates are min-max
normalised per q block over the chunks the mask leaves visible, and chunks with normalised gate >= `threshold`
are kept (important queries take more chunks), at most `top_k` of them (static shapes), best first. A q block's
own kv blocks are always kept (they hold its most recent keys). Blocks of a kept chunk that the mask makes EMPTY
(future frames) are dropped. Width: top_k * (largest chunk in blocks) + own blocks, padded to the widest
partition so every layer of a scanned stack has one shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from layers.sparse import common
from pallas_kernels.layout import MaskSpec

PARTITIONS = ("temporal", "spatial", "spatiotemporal")


def chunk_table(n_k: int, tpf: int, n_video: int, block_kv: int, partition: int, chunk_frames: int, chunk_bands: int):
  """Static chunk structure: (chunk id per kv block int[nK], blocks per chunk int[nC, maxb] padded with -1)."""
  if tpf % block_kv:
    raise ValueError(
      f"attention.sparsity.block_kv={block_kv} must divide the frame size ({tpf} tokens) for vmoba's video chunks"
    )
  p, frames = tpf // block_kv, n_video // tpf
  j = np.arange(n_k)
  f, band = j // p, j % p
  ft, fb = max(1, min(chunk_frames, frames)), max(1, min(chunk_bands, p))
  n_t, n_b = -(-frames // ft), -(-p // fb)
  if partition == 0:
    cid = f // ft
    n_vc = n_t
  elif partition == 1:
    cid = band // fb
    n_vc = n_b
  else:
    cid = (f // ft) * n_b + band // fb
    n_vc = n_t * n_b
  video = j < frames * p
  cid = np.where(video, cid, n_vc + (j - frames * p))  # text blocks: one chunk each
  n_c = int(cid.max()) + 1
  size = np.bincount(cid, minlength=n_c)
  table = np.full((n_c, int(size.max())), -1, np.int32)
  fill = np.zeros(n_c, np.int64)
  for block, chunk in enumerate(cid):
    table[chunk, fill[chunk]] = block
    fill[chunk] += 1
  return cid.astype(np.int32), table


@dataclasses.dataclass(frozen=True)
class VMobaSelector(common.Selector):
  video_grid: tuple[int, int, int] | None = None  # (frames, height, width) in tokens
  chunk_frames: int = 2
  chunk_bands: int = 1  # kv blocks per frame in a 2D / 3D chunk
  threshold: float = 0.25  # on min-max normalised gates
  top_k: int = 4  # static cap on the chunks kept per q block

  def _lists_for(self, partition: int, q_pool, k_pool, mask, n_q, n_k, tpf, n_video):
    bq, bk = self.block_q, self.block_kv
    cid, table = chunk_table(n_k, tpf, n_video, bk, partition, self.chunk_frames, self.chunk_bands)
    n_c = table.shape[0]
    counts = jnp.asarray(np.bincount(cid, minlength=n_c), jnp.float32)
    chunk_key = jax.ops.segment_sum(jnp.moveaxis(k_pool, 2, 0), jnp.asarray(cid), n_c)  # [nC, B, Hkv, D]
    chunk_key = jnp.moveaxis(chunk_key / counts[:, None, None, None], 0, 2)  # [B, Hkv, nC, D]
    gate = jnp.einsum("bhqd,bhcd->bhqc", q_pool, chunk_key, precision=jax.lax.Precision.HIGHEST)
    visible_blocks = common.block_relation(mask, n_q, n_k, bq, bk) != common.EMPTY  # [nQ, nK]
    chunk_visible = jax.ops.segment_max(visible_blocks.T.astype(jnp.int32), jnp.asarray(cid), n_c).T > 0  # [nQ, nC]
    lo = jnp.min(jnp.where(chunk_visible, gate, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(chunk_visible, gate, -jnp.inf), axis=-1, keepdims=True)
    # 1 for the best chunk, 0 for the worst; a row with one visible chunk (or equal gates) keeps it as the best
    norm = jnp.where(hi > lo, (gate - lo) / jnp.where(hi > lo, hi - lo, 1.0), 1.0)
    norm = jnp.where(chunk_visible, norm, -jnp.inf)
    kk = min(self.top_k, n_c)
    top_val, top_c = jax.lax.top_k(norm, kk)  # [B, Hkv, nQ, kk]
    keep = top_val >= self.threshold
    blocks = jnp.asarray(table)[top_c]  # [B, Hkv, nQ, kk, maxb]
    qi = jnp.arange(n_q, dtype=jnp.int32)[:, None, None]
    ok = keep[..., None] & (blocks >= 0) & common.tile_visible(mask, qi, jnp.maximum(blocks, 0), bq, bk)
    blocks = blocks.reshape(*blocks.shape[:3], -1)
    ok = ok.reshape(blocks.shape)
    own_idx, own_ok = common.diagonal_candidates(n_q, n_k, bq, bk)
    own_ok = own_ok & common.tile_visible(mask, jnp.arange(n_q)[:, None], own_idx, bq, bk)
    own = jnp.broadcast_to(own_idx, (*blocks.shape[:2], *own_idx.shape))
    idx = jnp.concatenate([jnp.maximum(blocks, 0), own], axis=-1)
    ok = jnp.concatenate([ok, jnp.broadcast_to(own_ok, own.shape)], axis=-1)
    return common.compact(idx, ok, n_k)

  def partition(self, layer_index):
    """Which chunk shape layer `layer_index` uses (0 temporal, 1 spatial, 2 spatio-temporal)."""
    return layer_index % len(PARTITIONS)

  def lists(self, q, k, mask: MaskSpec, layer_index) -> tuple[jax.Array, jax.Array]:
    bq, bk = self.block_q, self.block_kv
    n_q, n_k = q.shape[1] // bq, k.shape[1] // bk
    extent = common.video_extent(mask, self.video_grid, k.shape[1])
    if extent is None:
      raise ValueError("vmoba needs the video grid: pass video_grid=(frames, height, width) or a frame-causal mask")
    tpf, n_video = extent
    q_pool = common.group_mean(common.block_means(q, bq), k.shape[2])  # [B, Hkv, nQ, D]
    k_pool = common.block_means(k, bk)  # [B, Hkv, nK, D]
    args = (mask, n_q, n_k, tpf, n_video)
    if common.is_static_int(layer_index):
      return self._lists_for(int(self.partition(layer_index)), q_pool, k_pool, *args)
    # traced layer index (scanned stack): one branch per partition, padded to a common width
    _, nd = common.diagonal_span(n_q, bq, bk)
    tables = [chunk_table(n_k, tpf, n_video, bk, p, self.chunk_frames, self.chunk_bands)[1] for p in range(3)]
    width = max(min(self.top_k, t.shape[0]) * t.shape[1] + nd for t in tables)

    def branch(p, qp, kp):
      idx, cnt = self._lists_for(p, qp, kp, *args)
      return common.pad_width(idx, width), cnt

    branches = [functools.partial(branch, p) for p in range(len(PARTITIONS))]
    return jax.lax.switch(self.partition(layer_index), branches, q_pool, k_pool)
