"""Mask specs and block layouts shared by the kernels, the reference and the layers.

A `MaskSpec` is a small, hashable description of an attention mask. Nothing ever builds the dense
[T, S] mask at long length: kernels evaluate `MaskSpec.allowed` on one tile of positions at a time and
use `tile_relation` to skip tiles that are fully masked (and to drop the mask math on tiles that are
fully visible). Only `reference.py` and tests call `dense()`.

Positions. Query row i sits at position `q_offset + i`, key column j at `kv_offset + j`. A ring hop
expresses its shifted mask purely through these offsets (see layers/ring/plans.py).

Kinds:
  causal          kv_pos <= q_pos
  bidirectional   everything visible
  frame_causal    frame(kv_pos) <= frame(q_pos). Positions below `video_tokens` are grouped into frames
                  of `tokens_per_frame`; positions at or after it (the text that follows the video) are
                  frames of one token each, i.e. plain causal. `video_tokens=None` means all positions are
                  video.
  window          q_pos - left <= kv_pos <= q_pos + right  (left/right None = unbounded on that side)
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

MaskKind = Literal["causal", "bidirectional", "frame_causal", "window"]
_KINDS = ("causal", "bidirectional", "frame_causal", "window")


class TileRelation(enum.IntEnum):
  """How a [q-tile x kv-tile] block relates to the mask."""

  EMPTY = 0  # every element masked: skip the tile
  PARTIAL = 1  # some masked: compute with the per-element mask
  FULL = 2  # nothing masked: compute without mask math


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static, hashable attention-mask description. See the module docstring for semantics."""

  kind: MaskKind = "causal"
  tokens_per_frame: int = 1
  video_tokens: int | None = None
  left: int | None = None
  right: int | None = None
  q_offset: int = 0
  kv_offset: int = 0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"MaskSpec.kind: unknown mask kind {self.kind!r}; expected one of {_KINDS}")
    if self.tokens_per_frame < 1:
      raise ValueError(f"MaskSpec.tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
    if self.video_tokens is not None and self.video_tokens % self.tokens_per_frame:
      raise ValueError(
        f"MaskSpec.video_tokens={self.video_tokens} is not a multiple of tokens_per_frame={self.tokens_per_frame}"
      )

  # ---- constructors -------------------------------------------------------------------------
  @staticmethod
  def causal() -> MaskSpec:
    return MaskSpec("causal")

  @staticmethod
  def bidirectional() -> MaskSpec:
    return MaskSpec("bidirectional")

  @staticmethod
  def frame_causal(tokens_per_frame: int, video_tokens: int | None = None) -> MaskSpec:
    return MaskSpec("frame_causal", tokens_per_frame=tokens_per_frame, video_tokens=video_tokens)

  @staticmethod
  def window(left: int | None, right: int | None = 0) -> MaskSpec:
    return MaskSpec("window", left=left, right=right)

  def shifted(self, q_offset: int = 0, kv_offset: int = 0) -> MaskSpec:
    """The same mask seen from a sub-block whose rows/cols start at the given positions."""
    return dataclasses.replace(self, q_offset=q_offset, kv_offset=kv_offset)

  # ---- element-wise predicate (works on numpy and jax arrays, traced or not) -----------------
  def frame_of(self, pos):
    """Monotone map position -> frame id used by frame_causal."""
    tpf = self.tokens_per_frame
    if self.video_tokens is None:
      return pos // tpf
    nv = self.video_tokens
    xp = jnp if isinstance(pos, jax.Array) else np
    return xp.where(pos < nv, pos // tpf, nv // tpf + (pos - nv))

  def allowed(self, q_pos, kv_pos):
    """Boolean mask for broadcastable absolute positions (offsets NOT added here)."""
    # all-True of the broadcast shape, for numpy and jax alike
    everything = (q_pos - q_pos) == (kv_pos - kv_pos)
    if self.kind == "bidirectional":
      return everything
    if self.kind == "causal":
      return kv_pos <= q_pos
    if self.kind == "frame_causal":
      return self.frame_of(kv_pos) <= self.frame_of(q_pos)
    ok = everything
    if self.left is not None:
      ok = ok & (kv_pos >= q_pos - self.left)
    if self.right is not None:
      ok = ok & (kv_pos <= q_pos + self.right)
    return ok

  def tile_allowed(self, q_start, kv_start, block_q: int, block_kv: int):
    """[block_q, block_kv] bool mask of one tile whose local rows/cols start at q_start/kv_start."""
    qp = self.q_offset + q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
    kp = self.kv_offset + kv_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
    return self.allowed(qp, kp)

  def dense(self, t: int, s: int) -> np.ndarray:
    """Dense [T, S] bool mask: reference and tests only."""
    qp = self.q_offset + np.arange(t)[:, None]
    kp = self.kv_offset + np.arange(s)[None, :]
    return np.broadcast_to(np.asarray(self.allowed(qp, kp)), (t, s))

  # ---- tile classification (conservative, traced-safe) ---------------------------------------
  def tile_relation(self, q_start, kv_start, block_q: int, block_kv: int):
    """Classify a tile as EMPTY / PARTIAL / FULL (int32, traced-safe).

    Every kind here is monotone in the sense that "visible" is a band between two non-decreasing
    functions of q_pos, so checking the tile's corners is exact.
    """
    q_lo = self.q_offset + q_start
    q_hi = q_lo + block_q - 1
    k_lo = self.kv_offset + kv_start
    k_hi = k_lo + block_kv - 1
    xp = jnp if any(isinstance(x, jax.Array) for x in (q_lo, k_lo)) else np
    if self.kind == "bidirectional":
      return xp.int32(TileRelation.FULL)
    if self.kind in ("causal", "frame_causal"):
      f = self.frame_of if self.kind == "frame_causal" else (lambda p: p)
      empty = f(k_lo) > f(q_hi)
      full = f(k_hi) <= f(q_lo)
    else:
      empty = xp.bool_(False)
      full = xp.bool_(True)
      if self.left is not None:
        empty = empty | (k_hi < q_lo - self.left)
        full = full & (k_lo >= q_hi - self.left)
      if self.right is not None:
        empty = empty | (k_lo > q_hi + self.right)
        full = full & (k_hi <= q_lo + self.right)
    return xp.where(empty, xp.int32(TileRelation.EMPTY), xp.where(full, xp.int32(TileRelation.FULL), xp.int32(1)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Block-sparse layout: for each (batch, head, q-block) the kv blocks to compute.

  kv_indices: int32[B, H, nQ, max_kv]; entries past `kv_counts` are padding (any valid index).
  kv_counts:  int32[B, H, nQ].
  H may be 1 (shared by all heads) or equal to the number of query heads.
  The layout only *restricts* the mask spec: an element is visible iff its tile is listed AND the mask
  spec allows it.
  """

  kv_indices: jax.Array
  kv_counts: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
  block_kv: int = dataclasses.field(metadata=dict(static=True), default=128)

  def dense_block_mask(self, num_kv_blocks: int) -> jax.Array:
    """bool[B, H, nQ, nK]: True where the tile is listed."""
    max_kv = self.kv_indices.shape[-1]
    valid = jnp.arange(max_kv) < self.kv_counts[..., None]
    onehot = jax.nn.one_hot(self.kv_indices, num_kv_blocks, dtype=jnp.bool_) & valid[..., None]
    return onehot.any(axis=-2)

  def dense(self, t: int, s: int) -> jax.Array:
    """bool[B, H, T, S] element mask from the block list: reference and tests only."""
    if t % self.block_q or s % self.block_kv:
      raise ValueError(f"BlockLayout: lengths ({t}, {s}) must be multiples of blocks ({self.block_q}, {self.block_kv})")
    bm = self.dense_block_mask(s // self.block_kv)
    bm = jnp.repeat(bm, self.block_q, axis=-2)
    return jnp.repeat(bm, self.block_kv, axis=-1)

  @staticmethod
  def from_block_mask(block_mask, block_q: int, block_kv: int) -> BlockLayout:
    """Build a layout from a bool[B, H, nQ, nK] block mask (host-side helper)."""
    bm = np.asarray(block_mask, dtype=bool)
    counts = bm.sum(-1).astype(np.int32)
    max_kv = max(int(counts.max()), 1)
    # stable argsort puts listed blocks first in ascending index order
    order = np.argsort(~bm, axis=-1, kind="stable")[..., :max_kv].astype(np.int32)
    return BlockLayout(jnp.asarray(order), jnp.asarray(counts), block_q, block_kv)


def transpose_block_lists(
  kv_indices: jax.Array, kv_counts: jax.Array, num_kv_blocks: int, tags: jax.Array | None = None
):
  """Per-kv-block lists of the q blocks that list it (CSR), built on device: what dK/dV kernels iterate.

  kv_indices int32[..., nQ, W], kv_counts int32[..., nQ]: entries [0, count) of a row are its kv blocks
  (expected unique per row: a duplicate appears twice in the result); entries past the count and entries
  outside [0, num_kv_blocks) are ignored. `tags` int32[..., nQ, W] in {0, 1} (optional) orders each kv
  block's run: tag-0 entries first (the GPU kernels put FULL tiles before PARTIAL ones this way).

  Returns (q_indices int32[..., nQ * W], starts int32[..., nK + 1], tag_starts int32[..., nK]): kv block j is
  listed by q blocks q_indices[..., starts[j]:starts[j + 1]], ascending within each tag, and the tag-1 ones
  begin at tag_starts[j]. Entries past starts[nK] are 0.

  Memory bound: the result has exactly as many entries as the input lists (nQ * W per leading index), since
  every listed (q, kv) pair appears once in each direction; no [nQ, nK] array is built. One stable sort of
  nQ * W keys per leading index plus a binary search (unrolled: no while loop) of the 2 * nK + 1 run boundaries:
  jittable, no host work.
  """
  *lead, n_q, w = kv_indices.shape
  nk = int(num_kv_blocks)
  idx = kv_indices.astype(jnp.int32)
  valid = (jnp.arange(w, dtype=jnp.int32) < kv_counts.astype(jnp.int32)[..., None]) & (idx >= 0) & (idx < nk)
  tag = jnp.zeros_like(idx) if tags is None else jnp.clip(tags.astype(jnp.int32), 0, 1)
  key = jnp.where(valid, 2 * idx + tag, 2 * nk).reshape(-1, n_q * w)  # [L, nQ * W]
  qv = jnp.broadcast_to(jnp.arange(n_q, dtype=jnp.int32)[:, None], (n_q, w)).reshape(1, n_q * w)
  key_s, q_s = jax.lax.sort((key, jnp.broadcast_to(qv, key.shape)), dimension=1, num_keys=1, is_stable=True)
  bounds = jnp.arange(2 * nk + 1, dtype=jnp.int32)
  # scan_unrolled: the default `scan` is a while loop, one iteration per level (16 at 128k, 5 %: ~0.5 ms on an
  # H200, gpu/NOTES.md fifth round); unrolled, the levels fuse into one gather kernel. Same results.
  search = lambda ks: jnp.searchsorted(ks, bounds, side="left", method="scan_unrolled")  # noqa: E731
  off = jax.vmap(search)(key_s).astype(jnp.int32)  # [L, 2nK+1]
  starts, tag_starts = off[:, 0::2], off[:, 1::2]
  q_s = jnp.where(jnp.arange(n_q * w, dtype=jnp.int32) < starts[:, -1:], q_s, 0)
  return q_s.reshape(*lead, n_q * w), starts.reshape(*lead, nk + 1), tag_starts.reshape(*lead, nk)
