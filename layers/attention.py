"""The one attention entry point (`attention()`) and the NNX `Attention` layer that calls it.

Every model calls `attention()`; which backend runs is a config string, so a new kernel plugs in here
without touching any caller. Shapes (DESIGN section 3):
  q: [B, T, Hq, D]   k, v: [B, S, Hkv, D]   out: [B, T, Hq, D]   lse: [B, Hq, T] float32
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from layers import rope as rope_lib
from pallas_kernels import reference
from pallas_kernels.layout import BlockLayout, MaskSpec

Impl = Literal["reference", "xla", "cudnn", "flash", "ring", "block_sparse", "auto"]
IMPLS: tuple[str, ...] = ("reference", "xla", "cudnn", "flash", "ring", "block_sparse", "auto")


def _xla_attention(q, k, v, *, mask, segment_ids, layout, scale, return_lse):
  """Dense attention in the input dtype with fp32 logits/softmax: the XLA anchor.

  Unlike `reference`, matmul inputs stay in bf16 (as a real model would run), and the mask is built from
  iotas inside the jit so XLA can fuse it.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  scale = d**-0.5 if scale is None else scale
  logits = jnp.einsum(
    "btkgd,bskd->bkgts", q.reshape(b, t, hkv, g, d), k, preferred_element_type=jnp.float32
  ).reshape(b, hq, t, s)
  logits = logits * scale
  vis = mask.tile_allowed(0, 0, t, s)[None, None]
  if segment_ids is not None:
    vis = vis & (segment_ids[0][:, None, :, None] == segment_ids[1][:, None, None, :])
  if layout is not None:
    vis = vis & layout.dense(t, s)
  logits = jnp.where(vis, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum(
    "bkgts,bskd->btkgd", (p / safe).astype(v.dtype).reshape(b, hkv, g, t, s), v, preferred_element_type=jnp.float32
  ).reshape(b, t, hq, d)
  out = out.astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom[..., 0] > 0, jnp.log(safe[..., 0]) + row_max[..., 0], -jnp.inf)
  return out, lse


def _cudnn_attention(q, k, v, *, mask, segment_ids, layout, scale, return_lse):
  if segment_ids is not None or layout is not None or return_lse:
    raise ValueError("attention(impl='cudnn'): segment_ids, layout and return_lse are not supported by cuDNN")
  if mask.kind not in ("causal", "bidirectional") or mask.q_offset or mask.kv_offset:
    raise ValueError(f"attention(impl='cudnn'): mask kind {mask.kind!r} with offsets is not supported by cuDNN")
  return jax.nn.dot_product_attention(
    q, k, v, scale=scale, is_causal=mask.kind == "causal", implementation="cudnn"
  )


def _auto_impl(q, mask, segment_ids, layout, return_lse) -> str:
  """Fastest correct impl for the platform.

  GPU: cuDNN where it can express the call (plain causal / bidirectional, no segment ids, no lse), because on
  H200 its forward+backward measured 1.10-1.15x ours (BENCHMARKS.md, "Attention kernels"); our flash kernel
  everywhere else (frame-causal, windows, offsets, packing, lse for ring merges). TPU: our flash kernel.
  CPU: dense XLA (the Pallas kernels only run interpreted there).
  """
  platform = jax.devices()[0].platform
  if layout is not None:
    return "block_sparse"
  if platform == "gpu":
    cudnn_ok = (
      mask.kind in ("causal", "bidirectional")
      and not mask.q_offset
      and not mask.kv_offset
      and segment_ids is None
      and not return_lse
      and q.dtype in (jnp.bfloat16, jnp.float16)
    )
    return "cudnn" if cudnn_ok else "flash"
  if platform == "tpu":
    return "flash"
  return "xla"


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  impl: Impl = "auto",
  layout: BlockLayout | None = None,
  return_lse: bool = False,
  scale: float | None = None,
  ring_layout: str = "contiguous",
):
  """Attention over [B, T, Hq, D] queries and [B, S, Hkv, D] keys/values (GQA when Hq > Hkv).

  Args:
    mask: a `MaskSpec`; never materialised densely by the kernels.
    segment_ids: ([B, T], [B, S]) int32: tokens attend only within equal ids (packing).
    impl: backend name, see `IMPLS`. "auto" picks the fastest correct one for the platform.
    layout: optional `BlockLayout` restricting which kv blocks each q block computes.
    return_lse: also return the fp32 log-sum-exp [B, Hq, T] (ring merges and evaluation use it).
    scale: softmax scale, default 1/sqrt(D).
    ring_layout: token order of the sequence when impl="ring" (contiguous | zigzag | frame_striped).
  """
  reference.check_shapes(q, k, v, segment_ids)
  if impl not in IMPLS:
    raise ValueError(f"attention.impl: unknown attention impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    impl = _auto_impl(q, mask, segment_ids, layout, return_lse)
  kw = dict(mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=return_lse)
  if impl == "reference":
    return reference.attention(q, k, v, **kw)
  if impl == "xla":
    return _xla_attention(q, k, v, **kw)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, **kw)
  if impl in ("flash", "block_sparse"):
    from pallas_kernels import ops  # noqa: PLC0415  (kernels are heavy; import on first use)

    fn = ops.flash_attention if impl == "flash" else ops.block_sparse_attention
    return fn(q, k, v, **kw)
  from layers import ring  # noqa: PLC0415

  return ring.ring_attention(q, k, v, token_layout=ring_layout, **kw)


class Attention(nnx.Module):
  """Multi-head attention with GQA and RoPE; the mask and impl are given per call.

  Weights carry logical axis names (vidlm/sharding.py maps them to mesh axes).
  """

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    impl: Impl = "auto",
    ring_layout: str = "contiguous",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"model.num_heads={num_heads} must be a multiple of model.num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.impl, self.ring_layout, self.dtype = impl, ring_layout, dtype
    init = nnx.initializers.lecun_normal()

    def dense(din, dout, names):
      return nnx.LinearGeneral(
        din,
        dout,
        axis=-1 if isinstance(din, int) else (-2, -1),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(init, names),
        rngs=rngs,
      )

    self.q_proj = dense(embed_dim, (num_heads, head_dim), ("embed", "heads", "head_dim"))
    self.k_proj = dense(embed_dim, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.v_proj = dense(embed_dim, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.o_proj = dense((num_heads, head_dim), embed_dim, ("heads", "head_dim", "embed"))

  def __call__(
    self,
    x: jax.Array,
    rope: rope_lib.RopeTables,
    *,
    mask: MaskSpec,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """x: [B, N, E] -> [B, N, E]. `rope` holds the per-token rotation tables for this sequence."""
    q = rope_lib.apply(self.q_proj(x), rope)
    k = rope_lib.apply(self.k_proj(x), rope)
    v = self.v_proj(x)
    out = attention(q, k, v, mask=mask, segment_ids=segment_ids, impl=self.impl, ring_layout=self.ring_layout)
    return self.o_proj(out)
