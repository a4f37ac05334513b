"""Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.rope import RopeTables
from pallas_kernels.layout import MaskSpec


class DecoderBlock(nnx.Module):
  def __init__(
    self,
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_impl: str = "auto",
    ring_layout: str = "contiguous",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.attn = Attention(
      embed_dim, num_heads, num_kv_heads, head_dim, impl=attention_impl, ring_layout=ring_layout,
      dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.mlp_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.mlp = SwiGLU(embed_dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rope: RopeTables, *, mask: MaskSpec, segment_ids=None, constrain=None) -> jax.Array:
    """x: [B, N, E] -> [B, N, E]. `constrain` pins the residual stream's sharding between sub-layers."""
    constrain = constrain or (lambda y: y)
    x = constrain(x + self.attn(self.attn_norm(x), rope, mask=mask, segment_ids=segment_ids))
    return constrain(x + self.mlp(self.mlp_norm(x)))
