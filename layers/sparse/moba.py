"""`moba`: Mixture of Block Attention (MoonshotAI/MoBA) at kernel-block granularity.

Gate key of a kv block = mean of its keys; gate of (q block, kv block) = mean query of the q block . gate key, in
fp32, averaged over the query heads of a GQA group (one selection per kv head, so the group shares its kv
tiles). Each q block keeps its `top_k` best-gated kv blocks among those the mask does not make EMPTY (causal:
never a future block) plus its own blocks, always (MoBA forces the current chunk; causality inside it is the
mask's job). No threshold, no softmax, as in MoBA. Width: top_k + own blocks. The gate matrix is block level,
[B, Hkv, nQ, nK]; the top-k is `lax.top_k` over it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from layers.sparse import common
from pallas_kernels.layout import MaskSpec


@dataclasses.dataclass(frozen=True)
class MobaSelector(common.Selector):
  top_k: int = 4  # gated kv blocks per q block, besides its own

  def lists(self, q, k, mask: MaskSpec, layer_index) -> tuple[jax.Array, jax.Array]:
    del layer_index
    bq, bk = self.block_q, self.block_kv
    n_q, n_k = q.shape[1] // bq, k.shape[1] // bk
    q_pool = common.group_mean(common.block_means(q, bq), k.shape[2])  # [B, Hkv, nQ, D]
    k_pool = common.block_means(k, bk)  # [B, Hkv, nK, D]
    gate = jnp.einsum("bhqd,bhkd->bhqk", q_pool, k_pool, precision=jax.lax.Precision.HIGHEST)
    own_idx, own_ok = common.diagonal_candidates(n_q, n_k, bq, bk)  # [nQ, w]
    visible = common.block_relation(mask, n_q, n_k, bq, bk) != common.EMPTY  # [nQ, nK]
    is_own = jnp.zeros((n_q, n_k), bool).at[jnp.arange(n_q)[:, None], own_idx].max(own_ok)
    gate = jnp.where(visible & ~is_own, gate, -jnp.inf)
    kk = min(self.top_k, n_k)
    top_val, top_idx = jax.lax.top_k(gate, kk)  # [B, Hkv, nQ, kk]
    own = jnp.broadcast_to(own_idx, (*top_idx.shape[:2], *own_idx.shape))
    own_ok = own_ok & common.tile_visible(mask, jnp.arange(n_q)[:, None], own_idx, bq, bk)
    idx = jnp.concatenate([top_idx, own], axis=-1)
    ok = jnp.concatenate([jnp.isfinite(top_val), jnp.broadcast_to(own_ok, own.shape)], axis=-1)
    return common.compact(idx, ok, n_k)
