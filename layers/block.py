"""Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention, Ring, Selector
from layers.cache import KVCache
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
    attention_kernel: str = "auto",
    context_parallel: Ring | None = None,
    attention_selector: Selector | None = None,
    allow_reference_fallback: bool = False,
    rope_theta: float = 10_000.0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.attn = Attention(
      embed_dim, num_heads, num_kv_heads, head_dim, kernel=attention_kernel, context_parallel=context_parallel,
      selector=attention_selector, allow_reference_fallback=allow_reference_fallback,
      rope_theta=rope_theta, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.mlp_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.mlp = SwiGLU(embed_dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(
    self, x: jax.Array, rope: RopeTables | jax.Array, *, mask: MaskSpec, segment_ids=None, constrain=None,
    layer_index=0, cache: KVCache | None = None, decode: bool = False, cache_slots=None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """x: [B, N, E] -> [B, N, E] (and the layer's updated cache when `cache` is given: see `Attention`).
    `rope`: the tokens' positions or their RoPE tables; `constrain` pins the residual stream's sharding between
    sub-layers; `layer_index` (int or traced int32 inside a scan) reaches the attention selector."""
    constrain = constrain or (lambda y: y)
    attn = self.attn(
      self.attn_norm(x), rope, mask=mask, segment_ids=segment_ids, layer_index=layer_index, cache=cache,
      decode=decode, cache_slots=cache_slots,
    )
    if cache is not None:
      attn, cache = attn
    x = constrain(x + attn)
    x = constrain(x + self.mlp(self.mlp_norm(x)))
    return x if cache is None else (x, cache)
