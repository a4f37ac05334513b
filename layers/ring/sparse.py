"""Block-sparse layouts inside ring attention: the global `BlockLayout` cut into each hop's local layout.

One job: a sparsity selector lists kv blocks per (batch, head, q block) over the GLOBAL sequence in ORIGINAL
positions (like the mask). Under a ring, device r stores its q rows and source src's K/V in slot order
(`layouts.device_chunks`: under zigzag and frame_striped neither is a contiguous range of original positions).
When the layout's blocks divide every stored run, each slot block of a device is exactly one global block, so
two static tables translate between the orders:

  q_glob[r, j]   global q block held by device r's q slot block j                 int32 [N, c / block_q]
  kv_owner[g]    device storing global kv block g;  kv_slot[g]: its slot block  int32 [nK] each

A hop call covering q slots [q_lo, q_lo + tq) x kv slots [kv_lo, kv_lo + tk) of source src then keeps, for each
of its q blocks, the listed global kv blocks g with kv_owner[g] == src and kv_slot[g] inside the call's kv slot
blocks, renumbered from the call's first kv block and compacted to the front of the list (padding repeats the
last kept index, as `BlockLayout` asks). Memory stays O(heads x q blocks x listed) per call: no [T, S] array.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from layers.ring.layouts import device_chunks
from pallas_kernels.layout import BlockLayout


@dataclasses.dataclass(frozen=True)
class RingSparse:
  """Static tables (hashable tuples) translating a global BlockLayout into per-hop local layouts."""

  block_q: int
  block_kv: int
  q_glob: tuple[tuple[int, ...], ...]  # [N][c / block_q] global q block of each q slot block
  kv_owner: tuple[int, ...]  # [nK] device storing global kv block g
  kv_slot: tuple[int, ...]  # [nK] slot block of g on its owner


def _slot_blocks(chunks, block: int) -> list[list[int]]:
  """Per device, the global block index of each of its slot blocks (runs must be whole blocks)."""
  return [[s // block + i for s, ln in dev for i in range(ln // block)] for dev in chunks]


def build_ring_sparse(
  layout: BlockLayout, num_tokens: int, ring_size: int, token_layout: str, tokens_per_frame: int
) -> RingSparse:
  """Check that the layout tiles the ring's storage and build the translation tables.

  Raises ValueError (one line) when a block does not divide the runs each device stores or the layout's
  q-block count does not match the sequence.
  """
  chunks = device_chunks(num_tokens, ring_size, token_layout, tokens_per_frame)
  bq, bkv = layout.block_q, layout.block_kv
  run = min(ln for dev in chunks for _, ln in dev)
  for name, blk in (("block_q", bq), ("block_kv", bkv)):
    if any(ln % blk or s % blk for dev in chunks for s, ln in dev):
      raise ValueError(
        f"ring_attention: the BlockLayout's {name}={blk} does not divide the {token_layout} ring's stored runs of "
        f"{run} tokens ({num_tokens} tokens over {ring_size} devices); use a sparsity block that divides {run}"
      )
  n_q = layout.kv_indices.shape[2]
  if n_q * bq != num_tokens:
    raise ValueError(
      f"ring_attention: the BlockLayout has {n_q} q blocks of {bq} tokens for a sequence of {num_tokens} tokens"
    )
  q_glob = _slot_blocks(chunks, bq)
  kv_blocks = _slot_blocks(chunks, bkv)
  owner = np.zeros(num_tokens // bkv, np.int32)
  slot = np.zeros(num_tokens // bkv, np.int32)
  for r, blocks in enumerate(kv_blocks):
    for j, g in enumerate(blocks):
      owner[g], slot[g] = r, j
  return RingSparse(bq, bkv, tuple(tuple(x) for x in q_glob), tuple(int(x) for x in owner), tuple(int(x) for x in slot))


def local_layout(
  sp: RingSparse, kv_indices: jax.Array, kv_counts: jax.Array, r, src, q_lo, tq: int, kv_lo, tk: int
) -> tuple[BlockLayout, jax.Array]:
  """(the hop call's local BlockLayout, bool scalar "any block listed on this device").

  kv_indices [B, H, nQ, max_kv] / kv_counts [B, H, nQ]: this device's batch/head shard of the GLOBAL layout
  (all q blocks). r, src: this device and the K/V source (traced); q_lo, kv_lo: slot offsets of the call
  (int or traced), multiples of the blocks.
  """
  bq, bkv = sp.block_q, sp.block_kv
  nqb, nkb = tq // bq, tk // bkv
  rows = jax.lax.dynamic_slice_in_dim(jnp.asarray(sp.q_glob, jnp.int32)[r], q_lo // bq, nqb)  # [nqb]
  idx = jnp.take(kv_indices, rows, axis=2)  # [B, H, nqb, max_kv] global kv blocks
  cnt = jnp.take(kv_counts, rows, axis=2)  # [B, H, nqb]
  max_kv = idx.shape[-1]
  valid = jnp.arange(max_kv) < cnt[..., None]
  loc = jnp.asarray(sp.kv_slot, jnp.int32)[idx] - kv_lo // bkv
  keep = valid & (jnp.asarray(sp.kv_owner, jnp.int32)[idx] == src) & (loc >= 0) & (loc < nkb)
  width = min(max_kv, nkb)  # listed blocks are distinct, so at most nkb of them are kept
  srt = jnp.sort(jnp.where(keep, loc, nkb), axis=-1)[..., :width]  # kept local indices first, ascending
  n_keep = jnp.minimum(keep.sum(-1), width).astype(jnp.int32)
  last = jnp.take_along_axis(srt, jnp.maximum(n_keep - 1, 0)[..., None], axis=-1)
  pad = jnp.where(n_keep[..., None] > 0, last, 0)
  local_idx = jnp.where(jnp.arange(width) < n_keep[..., None], srt, pad).astype(jnp.int32)
  return BlockLayout(local_idx, n_keep, bq, bkv), jnp.any(n_keep > 0)


__all__ = ["RingSparse", "build_ring_sparse", "local_layout"]
