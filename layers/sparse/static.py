"""`static`: a fixed, video-aware pattern: attention sinks + a local window + per-frame global blocks.

Each q block keeps
  * the first `sinks` kv blocks (attention sinks: the start of the sequence collects mass in trained models),
  * its own kv blocks and `window` kv blocks on each side of them (local detail; the mask drops the future side
    under causal masks),
  * the first `frame_globals` kv blocks of every video frame (a coarse view of the whole video; each frame's
    leading block stands for the frame).
The pattern does not depend on q or k, so one list serves every batch row and head (layout H = 1: the kernels
then share the schedule over each GQA group). Width: sinks + own + 2 * window + frames * frame_globals.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from layers.sparse import common
from pallas_kernels.layout import MaskSpec


@dataclasses.dataclass(frozen=True)
class StaticSelector(common.Selector):
  sinks: int = 1  # kv blocks at the start of the sequence
  window: int = 1  # kv blocks on each side of a q block's own blocks
  frame_globals: int = 1  # leading kv blocks of every frame (0 = none)
  video_grid: tuple[int, int, int] | None = None  # (frames, height, width) in tokens

  def lists(self, q, k, mask: MaskSpec, layer_index) -> tuple[jax.Array, jax.Array]:
    del layer_index
    bq, bk = self.block_q, self.block_kv
    n_q, n_k = q.shape[1] // bq, k.shape[1] // bk
    first, nd = common.diagonal_span(n_q, bq, bk)
    parts = [np.broadcast_to(np.arange(min(self.sinks, n_k)), (n_q, min(self.sinks, n_k)))]
    parts.append(first[:, None] - self.window + np.arange(nd + 2 * self.window)[None, :])
    extent = common.video_extent(mask, self.video_grid, k.shape[1])
    if extent is not None and self.frame_globals > 0:
      tpf, n_video = extent
      starts = (np.arange(n_video // tpf) * tpf) // bk  # kv block holding each frame's first token
      glob = (starts[:, None] + np.arange(self.frame_globals)[None, :]).reshape(-1)
      parts.append(np.broadcast_to(glob, (n_q, glob.size)))
    cand = np.concatenate(parts, axis=1).astype(np.int64)  # [nQ, W] host ints: static structure only
    in_range = (cand >= 0) & (cand < n_k)
    idx = jnp.asarray(np.clip(cand, 0, n_k - 1), jnp.int32)
    qi = jnp.arange(n_q, dtype=jnp.int32)[:, None]
    ok = jnp.asarray(in_range) & common.tile_visible(mask, qi, idx, bq, bk)
    idx, cnt = common.compact(idx, ok, n_k)
    return idx[None, None], cnt[None, None]
