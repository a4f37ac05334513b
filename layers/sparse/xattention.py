"""`xattention`: antidiagonal block scoring at stride S, cumulative threshold tau (mit-han-lab/x-attention).

Estimator: every S-th group of S keys is flattened into one wide key [S * D] and the queries likewise with their
phase reversed, so one product sums each S x S sub-tile of q.k along its antidiagonal (1/S of the logits'
FLOPs). A softmax over the strided logits (scale 1 / (sqrt(D) * S), masked at strided granularity) gives
probabilities that are summed per kv block and over the query heads of a GQA group: one score per
(q block, kv block) and kv head.
Selection per q-block row: blocks by descending score, keep the shortest prefix whose mass reaches tau of the
row's total, at most `max_kv_blocks` (static shapes); block 0 (sink) and the q block's own (diagonal) blocks are
always kept. Width: max_kv_blocks + 1 + own blocks.

Precision: the strided product takes its operands in the input dtype (bf16 stays bf16, fp32 stays fp32) and
accumulates in fp32 at the default precision. The selection is not differentiated and only ranks blocks, so it
needs no fp32 operands (XAttention's own implementation scores in half precision); fp32 operands at HIGHEST run
on an H100/H200's CUDA cores or as multi-pass emulation, ~10x slower than bf16 tensor cores.

Loop and memory: the estimator walks the q blocks G_q at a time (`lax.map(..., batch_size=G_q)`, vmapped body, nQ /
G_q sequential steps; one q block per step meant 1024 sequential steps of small kernels at 128k, where the selector
measured 7.6x the dense attention forward on an H200; this version 32-34 %, BENCHMARKS.md). A step's largest array
is its fp32 strided logits [G_q, B, Hkv, G, block_q / S, S_len / S]. `blocks_per_step` picks the largest G_q whose
logits fit both in SCORE_BUDGET_BYTES and in q's element count (static, from the shapes; the second cap keeps the
selectors' rule that no intermediate outgrows the inputs, and means G_q <= D * S^2 / block_q when T = S_len), so
nothing of size T x S_len, nor nQ x S_len / S beyond that budget, exists at once; the masked softmax and block sums
that follow are elementwise / reductions over the same array. At 128k tokens, Hq = 4, hd 128, block_q 128, S 8: one
q block's logits are 4 MiB, G_q = 64, 16 steps; at 1M tokens 32 MiB each, G_q = 8, 1024 steps of 8x the work. A
remainder (nQ not a multiple of G_q) runs as one more vmapped batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from layers.sparse import common
from pallas_kernels.layout import MaskSpec

SCORE_BUDGET_BYTES = 256 << 20  # cap on one loop step's fp32 strided logits [G_q, B, Hkv, G, block_q / S, S_len / S]


def blocks_per_step(n_q: int, block_logits: int, q_elements: int) -> int:
  """G_q: q blocks scored per loop step, so that G_q * block_logits (fp32 elements of one q block's strided
  logits) stays within SCORE_BUDGET_BYTES and within q's own element count; at least 1, at most nQ."""
  cap = min(SCORE_BUDGET_BYTES // 4, q_elements) // max(block_logits, 1)
  return max(1, min(n_q, cap))


@dataclasses.dataclass(frozen=True)
class XAttentionSelector(common.Selector):
  stride: int = 8  # S: antidiagonal sampling stride (divides block_q and block_kv)
  tau: float = 0.9  # cumulative mass kept per q-block row
  max_kv_blocks: int = 16  # static cap on the selected blocks per q block (besides sink and diagonal)

  def lists(self, q, k, mask: MaskSpec, layer_index) -> tuple[jax.Array, jax.Array]:
    del layer_index
    bq, bk, st = self.block_q, self.block_kv, self.stride
    if bq % st or bk % st:
      raise ValueError(
        f"attention.sparsity.stride={st} must divide block_q={bq} and block_kv={bk} (xattention scores S x S sub-tiles)"
      )
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g, n_q, n_k, r, c = hq // hkv, t // bq, s // bk, bq // st, s // st
    # wide queries (phase reversed) and keys, input dtype: [nQ, B, Hkv, G, r, S*D], [B, Hkv, S_len/S, S*D]
    q_w = q.reshape(b, n_q, r, st, hkv, g, d)[:, :, :, ::-1]
    q_w = jnp.transpose(q_w, (1, 0, 4, 5, 2, 3, 6)).reshape(n_q, b, hkv, g, r, st * d)
    k_w = jnp.transpose(k.reshape(b, c, st, hkv, d), (0, 3, 1, 2, 4)).reshape(b, hkv, c, st * d)
    scale = d**-0.5 / st
    diag_idx, diag_ok = common.diagonal_candidates(n_q, n_k, bq, bk)
    m = min(self.max_kv_blocks, n_k)
    col_first = jnp.arange(c, dtype=jnp.int32) * st

    def one_block(args):  # vmapped over the G_q q blocks of a step
      qi, qb = args  # q block index, its wide queries [B, Hkv, G, r, S*D]
      logits = jnp.einsum("bkgrx,bkcx->bkgrc", qb, k_w, preferred_element_type=jnp.float32) * scale
      row_last = qi * bq + jnp.arange(r, dtype=jnp.int32) * st + st - 1
      # a strided cell is visible when its most permissive element is (exact for the monotone mask kinds)
      vis = mask.allowed(mask.q_offset + row_last[:, None], mask.kv_offset + col_first[None, :])  # [r, c]
      logits = jnp.where(vis, logits, -jnp.inf)
      mx = jnp.max(logits, axis=-1, keepdims=True)
      p = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
      p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
      score = p.sum(axis=(2, 3)).reshape(b, hkv, n_k, bk // st).sum(-1)  # [B, Hkv, nK]
      visible = common.tile_visible(mask, qi, jnp.arange(n_k, dtype=jnp.int32), bq, bk)
      score = jnp.where(visible, score, -1.0)
      top_val, top_idx = jax.lax.top_k(score, m)  # descending
      total = jnp.sum(jnp.maximum(score, 0.0), axis=-1, keepdims=True)
      before = jnp.cumsum(jnp.maximum(top_val, 0.0), axis=-1) - jnp.maximum(top_val, 0.0)
      keep = (before < self.tau * total) & (top_val >= 0.0)
      forced = jnp.concatenate([jnp.zeros((1,), jnp.int32), diag_idx[qi]])
      forced_ok = jnp.concatenate([visible[0:1], diag_ok[qi]]) & common.tile_visible(mask, qi, forced, bq, bk)
      idx = jnp.concatenate([top_idx, jnp.broadcast_to(forced, (b, hkv, forced.size))], axis=-1)
      ok = jnp.concatenate([keep, jnp.broadcast_to(forced_ok, (b, hkv, forced.size))], axis=-1)
      return common.compact(idx, ok, n_k)

    g_q = blocks_per_step(n_q, b * hq * r * c, q.size)
    # [nQ, B, Hkv, W], [nQ, B, Hkv]; nQ / G_q sequential steps of G_q q blocks each
    idx, cnt = jax.lax.map(one_block, (jnp.arange(n_q, dtype=jnp.int32), q_w), batch_size=g_q)
    return jnp.moveaxis(idx, 0, 2), jnp.moveaxis(cnt, 0, 2)
