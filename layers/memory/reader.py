"""The decoder's read of the memory bank: cross-attention from text tokens onto every segment's memory tokens.

Length-free by construction: the bank's keys carry no position (no segment index, no time), so a longer video only
adds keys; an unused slot is masked through segment ids (its contents, even NaN, never matter).

Sharpness with more keys: a needle memory that wins the softmax over the ~K x M keys of a training video must also
win it over 32x more keys of the same kind at evaluation. With `length_scaling` the query is multiplied by
log(n) / log(n_ref), n the row's valid keys and n_ref the keys of a training video (scalable softmax, Nakanishi
2025): a margin that beat n_ref keys keeps beating n keys, since n x exp(-margin log n / log n_ref) shrinks with n
once margin > log n_ref. At n = n_ref the factor is 1, so training at the reference length is unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Kernel, attention
from layers.memory.bridge import cross_attention_projections
from pallas_kernels.layout import MaskSpec


class MemoryReader(nnx.Module):
  """x [B, T, E] (queries), bank [B, S, E], bank_valid [B, S] bool -> [B, T, E] (no residual, no norm: the
  caller's block adds them). Multi-head, no RoPE on either side (order-free over the bank)."""

  def __init__(
    self, embed_dim: int, num_heads: int, head_dim: int, *, kernel: Kernel = "auto", length_scaling: bool = True,
    reference_keys: int = 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    self.kernel, self.dtype, self.length_scaling = kernel, dtype, length_scaling
    self.log_ref = math.log(max(int(reference_keys), 2))
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = cross_attention_projections(
      embed_dim, num_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, bank: jax.Array, bank_valid: jax.Array) -> jax.Array:
    bank = jnp.where(bank_valid[..., None], bank, 0).astype(self.dtype)
    q = self.q_proj(x.astype(self.dtype))  # [B, T, H, D]
    if self.length_scaling:
      n = jnp.maximum(jnp.sum(bank_valid, axis=1), 2).astype(jnp.float32)  # [B] valid keys per row
      q = (q.astype(jnp.float32) * (jnp.log(n) / self.log_ref)[:, None, None, None]).astype(q.dtype)
    seg = (jnp.ones(x.shape[:2], jnp.int32), bank_valid.astype(jnp.int32))
    out = attention(q, self.k_proj(bank), self.v_proj(bank), mask=MaskSpec.bidirectional(), segment_ids=seg,
                    kernel=self.kernel)
    return self.o_proj(out)
