"""The memory bridge layer and the memory retriever (VideoLLaMB's two recurrent parts, reference section 2).

Bridge: one post-LN transformer layer over [memory (M) ; segment tokens (N)]:
  a = LN(attn(h) + h);  out = LN(W2 gelu(W1 a) + a);  new memory = out[:M], segment outputs = out[M:].
Retriever: the new memory reads the cache of all memories so far (the current one included) by cross-attention:
  m_read = LN(W_o MHA(q = m_new, kv = cache) + m_new).
Both mask padding by segment ids through `layers.attention.attention()` (VideoLLaMB has no mask, wrong for
padded batches) and zero padded inputs first, so padding (even NaN) never changes a valid output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention, Kernel, attention
from pallas_kernels.layout import MaskSpec


def _kv_ids(valid: jax.Array, q_len: int) -> tuple[jax.Array, jax.Array]:
  """Segment ids that let every query (id 1) see exactly the valid keys: (ones [B, T], valid as int32 [B, S])."""
  return jnp.ones((valid.shape[0], q_len), jnp.int32), valid.astype(jnp.int32)


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # fp32 statistics and parameters whatever the activation dtype
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class BridgeLayer(nnx.Module):
  """Encodes one segment with the memory: (memory [B, M, E], tokens [B, N, E], token mask [B, N]) ->
  (new memory [B, M, E], segment outputs [B, N, E]).

  Every token (memory and segment) attends to the memory and the valid segment tokens. Positions: optional
  (t, h, w) triples [B, N, 3] of the segment tokens for RoPE (frame index within the segment: unlike VideoLLaMB
  the bridge knows frame order); memory tokens sit at (0, 0, 0). Outputs at masked tokens are zero.
  """

  def __init__(
    self, embed_dim: int, num_heads: int, head_dim: int, mlp_dim: int, *, kernel: Kernel = "auto",
    ln_eps: float = 1e-6, rope_theta: float = 10_000.0, dtype=jnp.float32, param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.attn = Attention(
      embed_dim, num_heads, num_heads, head_dim, kernel=kernel, rope_theta=rope_theta, dtype=dtype,
      param_dtype=param_dtype, rngs=rngs,
    )
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(
      embed_dim, mlp_dim, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs,
    )
    self.down = nnx.Linear(
      mlp_dim, embed_dim, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs,
    )
    self.attn_norm = _layer_norm(embed_dim, ln_eps, rngs)
    self.mlp_norm = _layer_norm(embed_dim, ln_eps, rngs)

  def __call__(
    self, memory: jax.Array, tokens: jax.Array, token_mask: jax.Array, positions: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    bsz, m = memory.shape[:2]
    n = tokens.shape[1]
    tokens = jnp.where(token_mask[..., None], tokens, 0).astype(memory.dtype)
    h = jnp.concatenate([memory, tokens], axis=1).astype(self.dtype)  # [B, M+N, E]
    valid = jnp.concatenate([jnp.ones((bsz, m), bool), token_mask], axis=1)
    if positions is None:
      pos = jnp.zeros((bsz, m + n, 3), jnp.int32)
    else:
      pos = jnp.concatenate([jnp.zeros((bsz, m, 3), jnp.int32), positions.astype(jnp.int32)], axis=1)
    a = self.attn(h, pos, mask=MaskSpec.bidirectional(), segment_ids=_kv_ids(valid, m + n))
    a = self.attn_norm(a.astype(jnp.float32) + h.astype(jnp.float32)).astype(self.dtype)
    f = self.down(jax.nn.gelu(self.up(a), approximate=False))
    out = self.mlp_norm(f.astype(jnp.float32) + a.astype(jnp.float32)).astype(memory.dtype)
    out = jnp.where(valid[..., None], out, 0)
    return out[:, :m], out[:, m:]


def cross_attention_projections(embed_dim, num_heads, head_dim, *, dtype, param_dtype, rngs: nnx.Rngs):
  """The q, k, v ([E] -> [H, D]) and o ([H, D] -> [E]) projections of a cross-attention without bias or RoPE
  (the retriever and the decoder's bank reader), sharded by the rules table's embed / heads / head_dim names."""
  init = nnx.initializers.lecun_normal()

  def dense(din, dout, names):
    return nnx.LinearGeneral(
      din, dout, axis=-1 if isinstance(din, int) else (-2, -1), use_bias=False, dtype=dtype,
      param_dtype=param_dtype, kernel_init=nnx.with_partitioning(init, names), rngs=rngs,
    )

  qkv = [dense(embed_dim, (num_heads, head_dim), ("embed", "heads", "head_dim")) for _ in range(3)]
  return (*qkv, dense((num_heads, head_dim), embed_dim, ("heads", "head_dim", "embed")))


class Retriever(nnx.Module):
  """Cross-attention of the memory onto the cache of memories: (memory [B, M, E], cache [B, S, M, E], count [B])
  -> [B, M, E]. Slots >= count are masked (static S; their contents never matter). No positions: the read is
  order-free over slots, so it does not depend on how many segments the training videos had."""

  def __init__(
    self, embed_dim: int, num_heads: int, head_dim: int, *, kernel: Kernel = "auto", ln_eps: float = 1e-6,
    dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    self.kernel, self.dtype = kernel, dtype
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = cross_attention_projections(
      embed_dim, num_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.norm = _layer_norm(embed_dim, ln_eps, rngs)

  def __call__(self, memory: jax.Array, cache: jax.Array, count: jax.Array) -> jax.Array:
    bsz, s, m, e = cache.shape
    slot_valid = jnp.arange(s)[None, :] < count[:, None]  # [B, S]
    kv = jnp.where(slot_valid[..., None, None], cache, 0).reshape(bsz, s * m, e).astype(self.dtype)
    x = memory.astype(self.dtype)
    out = attention(
      self.q_proj(x), self.k_proj(kv), self.v_proj(kv), mask=MaskSpec.bidirectional(),
      segment_ids=_kv_ids(jnp.repeat(slot_valid, m, axis=1), m), kernel=self.kernel,
    )
    out = self.o_proj(out)
    return self.norm(out.astype(jnp.float32) + memory.astype(jnp.float32)).astype(memory.dtype)


def write_cache(cache: jax.Array, count: jax.Array, memory: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Append memory [B, M, E] at slot count[b] of cache [B, S, M, E] where valid[b]; returns (cache, count + valid).
  A one-hot select rather than a scatter: rows write different slots, and the cost is that of reading the cache,
  which the retriever does anyway. A full cache (count == S) is left unchanged."""
  slot = jnp.arange(cache.shape[1])[None, :] == count[:, None]  # [B, S]
  hit = slot & valid[:, None]
  cache = jnp.where(hit[..., None, None], memory[:, None].astype(cache.dtype), cache)
  return cache, count + valid.astype(count.dtype)
