"""The one attention entry point (`attention()`) and the NNX `Attention` layer that calls it.

Three independent choices (DESIGN section 3), three arguments:
  kernel            "auto" | "xla" | "cudnn" | "flash" | "reference": the math on one block of q x kv
  context_parallel  None | `Ring(layout=...)`: split the sequence over the `seq` mesh axis (ring attention,
                    which receives the per-hop kernel from here as a `ring.HopKernel`)
  layout            None | a `BlockLayout` from a sparsity selector (`Attention(selector=...)`)
Shapes: q: [B, T, Hq, D]   k, v: [B, S, Hkv, D]   out: [B, T, Hq, D]   lse: [B, Hq, T] float32

No silent fallback: a kernel that cannot run a call raises a one-line error naming why, unless
`allow_reference_fallback=True`. `unsupported()` is the same check on shapes alone, for config validation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import ring
from layers import rope as rope_lib
from layers.cache import KVCache
from pallas_kernels import reference
from pallas_kernels.layout import BlockLayout, MaskSpec

Kernel = Literal["auto", "xla", "cudnn", "flash", "reference"]
KERNELS: tuple[str, ...] = ("auto", "xla", "cudnn", "flash", "reference")
CONTEXT_PARALLEL: tuple[str, ...] = ("none", "ring")
# select(q [B, T, Hq, D], k [B, S, Hkv, D], mask, layer_index) -> BlockLayout | None (None = dense)
Selector = Callable[[jax.Array, jax.Array, MaskSpec, "int | jax.Array"], "BlockLayout | None"]
_OPS_BACKEND = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Ring:
  """context_parallel=Ring(...): ring attention over mesh axis `axis_name`, tokens stored in `layout` order
  (contiguous | zigzag | frame_striped, see `layers.ring.token_permutation`)."""

  layout: str = "contiguous"
  axis_name: str = "seq"
  tokens_per_frame: int | None = None  # frame size of the frame_striped layout (default: the mask's)


def dense_selector(q, k, mask, layer_index) -> None:
  """The default selector: every layer dense (no BlockLayout)."""
  del q, k, mask, layer_index
  return None


def _platform(platform: str | None) -> str:
  return jax.default_backend() if platform is None else platform


def resolve_kernel(
  kernel: str, *, platform: str | None = None, dtype=jnp.bfloat16, mask: MaskSpec = MaskSpec(),
  has_segments: bool = False, has_layout: bool = False, return_lse: bool = False, ring_hop: bool = False,
) -> str:
  """The concrete kernel "auto" stands for (other names are returned as they are).

  GPU: cuDNN where it can express the call (plain causal / bidirectional, no segment ids, no lse, bf16/fp16),
  because on H200 its forward+backward measured 1.10-1.15x ours (BENCHMARKS.md, "Attention kernels"); our flash
  kernel everywhere else (frame-causal, windows, offsets, packing, lse, layouts, ring hops). TPU: flash. CPU:
  dense XLA (the Pallas kernels only run interpreted there), except with a layout (the block-sparse kernel).
  "auto" never means the reference: when the flash kernel cannot run a call, that is an error, not a choice.
  """
  if kernel not in KERNELS:
    raise ValueError(_unknown_kernel(kernel))
  if kernel != "auto":
    return kernel
  platform = _OPS_BACKEND.get(_platform(platform), "cpu")
  if ring_hop:
    return "flash" if platform in ("gpu", "tpu") else "xla"
  if has_layout:
    return "flash"
  if platform == "gpu":
    cudnn_ok = (
      mask.kind in ("causal", "bidirectional")
      and not mask.q_offset
      and not mask.kv_offset
      and not has_segments
      and not return_lse
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )
    return "cudnn" if cudnn_ok else "flash"
  return "flash" if platform == "tpu" else "xla"


def _unknown_kernel(kernel) -> str:
  if kernel == "ring":
    return "attention: kernel='ring' is context parallelism now: kernel='auto', context_parallel=Ring(layout)"
  if kernel == "block_sparse":
    return "attention: kernel='block_sparse' is kernel='flash' with layout=BlockLayout(...) (a sparsity selector)"
  return f"attention: unknown kernel {kernel!r}; expected one of {' | '.join(KERNELS)}"


def unsupported(
  kernel: str, q, k, v, *, mask: MaskSpec, has_segments: bool = False, layout: BlockLayout | None = None,
  return_lse: bool = False, platform: str | None = None, allow_reference_fallback: bool = False,
) -> str | None:
  """Why the concrete `kernel` cannot run this call on `platform`, or None. Pure: q/k/v may be
  `jax.ShapeDtypeStruct`s, nothing runs on a device (config validation calls it for every attention call)."""
  platform = _platform(platform)
  if kernel in ("xla", "reference"):
    return None
  if kernel == "cudnn":
    if _OPS_BACKEND.get(platform) != "gpu":
      return f"kernel=cudnn needs a GPU (platform is {platform})"
    if layout is not None or has_segments or return_lse:
      what = "a BlockLayout" if layout is not None else "segment ids" if has_segments else "return_lse"
      return f"kernel=cudnn cannot take {what}; use kernel=flash"
    if mask.kind not in ("causal", "bidirectional") or mask.q_offset or mask.kv_offset:
      return (
        f"kernel=cudnn runs plain causal or bidirectional masks only, not {mask.kind!r} with offsets "
        f"({mask.q_offset}, {mask.kv_offset}); use kernel=flash or xla"
      )
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"kernel=cudnn takes bfloat16/float16, not {jnp.dtype(q.dtype).name} (model.dtype)"
    return None
  if kernel == "flash":
    if allow_reference_fallback:
      return None
    from pallas_kernels import ops  # noqa: PLC0415  (kernels are heavy; import on first use)

    seg = None
    if has_segments:
      seg = (jax.ShapeDtypeStruct(q.shape[:2], jnp.int32), jax.ShapeDtypeStruct(k.shape[:2], jnp.int32))
    reason = ops.unsupported_reason(
      q, k, v, mask=mask, segment_ids=seg, layout=layout, backend=_OPS_BACKEND.get(platform, "interpret")
    )
    return None if reason is None else f"kernel=flash on {platform}: {reason}"
  raise ValueError(_unknown_kernel(kernel))


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
  reason = unsupported(
    "cudnn", q, k, v, mask=mask, has_segments=segment_ids is not None, layout=layout, return_lse=return_lse
  )
  if reason is not None:
    raise ValueError(f"attention: {reason}")
  return jax.nn.dot_product_attention(
    q, k, v, scale=scale, is_causal=mask.kind == "causal", implementation="cudnn"
  )


def _run_kernel(kernel: str, q, k, v, *, mask, segment_ids, layout, scale, return_lse, allow_reference_fallback):
  """One concrete kernel on the whole (local) sequence."""
  kw = dict(mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=return_lse)
  if kernel == "reference":
    return reference.attention(q, k, v, **kw)
  if kernel == "xla":
    return _xla_attention(q, k, v, **kw)
  if kernel == "cudnn":
    return _cudnn_attention(q, k, v, **kw)
  from pallas_kernels import ops  # noqa: PLC0415

  return ops.flash_attention(q, k, v, allow_reference_fallback=allow_reference_fallback, **kw)


def _flash_hop_backward(allow_reference_fallback, q, k, v, spec, seg, out, lse, do, delta, dlse, scale, layout=None):
  """The flash backward kernels fed with the global (out, lse[, dlse]): no per-hop forward recompute."""
  del delta  # the kernels recompute it from out, do and dlse
  from pallas_kernels import ops  # noqa: PLC0415

  dq, dk, dv = ops.attention_backward(
    q, k, v, out.astype(q.dtype), lse, do.astype(q.dtype), mask=spec, segment_ids=seg, layout=layout, dlse=dlse,
    scale=scale, allow_reference_fallback=allow_reference_fallback,
  )
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def _hop_forward(kernel, allow_reference_fallback, q, k, v, *, mask, segment_ids, scale, layout=None):
  return _run_kernel(
    kernel, q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=True,
    allow_reference_fallback=allow_reference_fallback,
  )


def _whole(kernel, allow_reference_fallback, q, k, v, *, mask, segment_ids, scale, return_lse, layout=None):
  return _run_kernel(
    kernel, q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=return_lse,
    allow_reference_fallback=allow_reference_fallback,
  )


@functools.cache
def hop_kernel(kernel: str, *, allow_reference_fallback: bool = False, platform: str | None = None) -> ring.HopKernel:
  """The per-hop kernel ring attention runs for `kernel` ("auto": flash on GPU/TPU, XLA on CPU)."""
  name = resolve_kernel(kernel, platform=platform, ring_hop=True)
  whole = functools.partial(_whole, name, allow_reference_fallback)
  if name == "cudnn":
    return ring.HopKernel(
      "cudnn", ring.cudnn_hop_forward, whole, backward=ring.cudnn_hop_backward, check=ring.cudnn_hop_check
    )
  forward = functools.partial(_hop_forward, name, allow_reference_fallback)
  backward = {
    "xla": ring.dense_hop_backward,
    "flash": functools.partial(_flash_hop_backward, allow_reference_fallback),
    "reference": None,  # the vjp of the reference forward
  }[name]
  return ring.HopKernel(name, forward, whole, backward=backward, sparse=True)  # hops take the layout's blocks


def _as_ring(context_parallel) -> Ring | None:
  if context_parallel is None or context_parallel == "none":
    return None
  if context_parallel == "ring":
    return Ring()
  if isinstance(context_parallel, Ring):
    return context_parallel
  raise ValueError(f"attention: context_parallel must be None, 'ring' or Ring(...), got {context_parallel!r}")


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  kernel: Kernel = "auto",
  context_parallel: Ring | str | None = None,
  return_lse: bool = False,
  scale: float | None = None,
  allow_reference_fallback: bool = False,
):
  """Attention over [B, T, Hq, D] queries and [B, S, Hkv, D] keys/values (GQA when Hq > Hkv).

  Args:
    mask: a `MaskSpec`; never materialised densely by the kernels.
    segment_ids: ([B, T], [B, S]) int32: tokens attend only within equal ids (packing).
    layout: optional `BlockLayout` restricting which kv blocks each q block computes (block-sparse).
    kernel: see `KERNELS`; "auto" picks the fastest kernel for the platform that can express the call.
    context_parallel: None, or `Ring(layout=...)` (or "ring" = Ring()): ring attention over the `seq` axis,
      each hop on `kernel` (q, k, v are then GLOBAL arrays in the ring layout's token order).
    return_lse: also return the fp32 log-sum-exp [B, Hq, T] (ring merges and evaluation use it).
    scale: softmax scale, default 1/sqrt(D).
    allow_reference_fallback: where the flash kernel cannot run the call, run the dense fp32 reference
      (with a warning) instead of raising.
  """
  reference.check_shapes(q, k, v, segment_ids)
  if kernel not in KERNELS:
    raise ValueError(_unknown_kernel(kernel))
  cp = _as_ring(context_parallel)
  if cp is not None:
    hop = hop_kernel(kernel, allow_reference_fallback=allow_reference_fallback)
    return ring.ring_attention(
      q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=return_lse, hop=hop,
      token_layout=cp.layout, axis_name=cp.axis_name, tokens_per_frame=cp.tokens_per_frame,
    )
  name = resolve_kernel(
    kernel, dtype=q.dtype, mask=mask, has_segments=segment_ids is not None, has_layout=layout is not None,
    return_lse=return_lse,
  )
  return _run_kernel(
    name, q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=return_lse,
    allow_reference_fallback=allow_reference_fallback,
  )


def storage_order(cp: Ring | None, num_tokens: int, mask: MaskSpec) -> np.ndarray | None:
  """int32 [N]: the original position of the token at each storage slot under ring `cp` on the ambient mesh, the
  order ring attention reads q/k/v in (`ring.token_permutation`); None when storage is the original order (no
  ring, contiguous, a ring of one device, or no mesh axis, where `ring_attention` raises its own error).

  A sparse `Attention` layer under a zigzag / frame_striped ring gathers q and k back to original order with its
  inverse before the selector sees them: a static-index gather of the whole sequence per sparse layer (with the
  tokens split over `seq`, an all-gather of q and k), forward and backward. The attention itself stays in
  storage order; only the selector's scoring pays it.
  """
  if cp is None or cp.layout == "contiguous":
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or cp.axis_name not in mesh.axis_names:
    return None
  ring_size = dict(mesh.shape)[cp.axis_name]
  if ring_size == 1:
    return None
  tpf = 1
  if cp.layout == "frame_striped":  # the frame size ring_attention deals by (same default as there)
    tpf = cp.tokens_per_frame or (mask.tokens_per_frame if mask.kind == "frame_causal" else 1)
  return ring.token_permutation(num_tokens, ring_size, cp.layout, tpf)


class Attention(nnx.Module):
  """Multi-head attention with GQA and RoPE; the mask is given per call, the kernel choices at construction.

  After the projections and RoPE the layer asks `selector(q, k, mask, layer_index)` for a `BlockLayout`
  (None = dense; the default `dense_selector` always says dense), so block-sparse methods only add selectors.
  The selector always sees q/k in ORIGINAL token order: under a zigzag / frame_striped ring the layer gathers them
  back from storage order first (`storage_order`; a global gather of q and k per sparse layer).
  Weights carry logical axis names (vidlm/sharding.py maps them to mesh axes).
  """

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    kernel: Kernel = "auto",
    context_parallel: Ring | None = None,
    selector: Selector | None = None,
    allow_reference_fallback: bool = False,
    rope_theta: float = 10_000.0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"model.num_heads={num_heads} must be a multiple of model.num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    if kernel not in KERNELS:
      raise ValueError(_unknown_kernel(kernel))
    self.kernel, self.context_parallel = kernel, _as_ring(context_parallel)
    self.selector = dense_selector if selector is None else selector
    self.allow_reference_fallback, self.dtype, self.rope_theta = allow_reference_fallback, dtype, rope_theta
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
    positions: jax.Array | rope_lib.RopeTables,
    *,
    mask: MaskSpec,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    layer_index: int | jax.Array = 0,
    cache: KVCache | None = None,
    decode: bool = False,
    cache_slots: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """x: [B, N, E] -> [B, N, E] (and the updated cache when one is given).

    positions: the tokens' true positions, int [N, 3] / [B, N, 3] (t, h, w) triples (text: (p, p, p)), or the
      `RopeTables` of them (a model computes the tables once for all its layers); RoPE rotates by exactly these.
    layer_index: an int, or the traced int32 of a scanned stack; passed to the selector.
    cache: a per-layer `KVCache` whose positions / seq_index the model has recorded for these tokens.
      decode=False (prefill of a full cache): attention over this call's tokens exactly as without a cache, then
        their k/v are written to slots [0, N) (or to `cache_slots` [N] when the tokens arrive in another order).
      decode=True (an append to any cache kind: a video chunk, a question, one decoded token): the queries attend
        the cache's context (`KVCache.context`) and each other under `mask` (the chunk's own causal or
        frame_causal rule), then k/v are written (`KVCache.append`); see `_cached`.
    """
    rope = positions if isinstance(positions, rope_lib.RopeTables) else rope_lib.tables(
      positions, self.head_dim, self.rope_theta
    )
    q = rope_lib.apply(self.q_proj(x), rope)
    k = rope_lib.apply(self.k_proj(x), rope)
    v = self.v_proj(x)
    if cache is not None and decode:
      out, cache = self._cached(q, k, v, cache, mask)
      return self.o_proj(out), cache
    layout = None
    if self.selector is not dense_selector:
      order = storage_order(self.context_parallel, q.shape[1], mask)
      if order is None:
        layout = self.selector(q, k, mask, layer_index)
      else:  # the selector scores tokens in ORIGINAL order, which its layout (like the mask) is indexed by
        inv = np.argsort(order)
        layout = self.selector(q[:, inv], k[:, inv], mask, layer_index)
    out = attention(
      q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, kernel=self.kernel,
      context_parallel=self.context_parallel, allow_reference_fallback=self.allow_reference_fallback,
    )
    if cache is None:
      return self.o_proj(out)
    return self.o_proj(out), cache.write_prefix(k, v, cache_slots)

  def decode_kernel(self, q, k, v, mask: MaskSpec = MaskSpec.bidirectional()) -> str:
    """The kernel a cached call (decode or an appended chunk) runs: the configured one where it can express the call
    (the chunk's queries against [cache context; chunk] with segment ids marking the visible slots and the chunk's
    mask shifted behind the context), else XLA's dense path, which computes the same fp32-softmax attention (the GPU
    flash and cuDNN kernels need long query blocks or take no segment ids; a decode step is one matrix-vector
    product per head, memory-bound, where a dense read of the cache is the norm). Never context parallel: appends
    read the cache whole (a ring prefill leaves it gathered in sequence order)."""
    name = resolve_kernel(self.kernel, dtype=q.dtype, mask=mask, has_segments=True)
    why = unsupported(name, q, k, v, mask=mask, has_segments=True, allow_reference_fallback=self.allow_reference_fallback)
    return name if why is None else "xla"

  def _cached(self, q, k, v, cache: KVCache, mask: MaskSpec) -> tuple[jax.Array, KVCache]:
    """q, k, v [B, N, H, D] of an append (N = 1: a decoded token): attend q to the cache's context
    (`KVCache.context`: the visible buffer slots, plus retrieved store blocks) and to the chunk itself under `mask`
    (causal, or frame_causal for a video chunk: the chunk's own token indices), then write k/v (`KVCache.append`).

    The context is laid out before the chunk and every visible context slot is in the past of every chunk token,
    so one kernel call does it: the chunk's mask shifted by the context length (rounded up to whole frames) and
    segment ids (1 = visible). With per-kv-head retrieval the kv heads are folded into the batch (each head sees
    its own blocks)."""
    if self.selector is not dense_selector:
      raise ValueError(
        "Attention: decoding with a KV cache is dense and this layer has a sparsity selector "
        "(attention.sparsity.method); block-sparse decode is not built yet: decode with method=none"
      )
    if mask.kind not in ("causal", "frame_causal") or mask.q_offset or mask.kv_offset:
      raise ValueError(f"Attention: a cached append takes a causal or frame_causal chunk mask, got {mask}")
    k_ctx, v_ctx, visible, cache = cache.context(q)
    b, n, hq, d = q.shape
    c, hkv = k_ctx.shape[1], k_ctx.shape[2]
    tpf = mask.tokens_per_frame if mask.kind == "frame_causal" else 1
    pad = -c % tpf  # the chunk starts on a frame boundary of the shifted mask
    nv = None if mask.video_tokens is None else mask.video_tokens + c + pad
    shifted = dataclasses.replace(mask, video_tokens=nv, q_offset=c + pad, kv_offset=pad)
    k_all = jnp.concatenate([k_ctx, k.astype(k_ctx.dtype)], axis=1)  # [B, C + N, Hkv, D]
    v_all = jnp.concatenate([v_ctx, v.astype(v_ctx.dtype)], axis=1)
    if visible.ndim == 3:  # per-kv-head context: heads into the batch, [B*Hkv, ., G, D] against one kv head
      g = hq // hkv
      q_f = q.reshape(b, n, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, n, g, d)
      k_f, v_f = (x.transpose(0, 2, 1, 3).reshape(b * hkv, c + n, 1, d) for x in (k_all, v_all))
      vis = jnp.concatenate([visible, jnp.ones((b, n, hkv), bool)], axis=1).transpose(0, 2, 1).reshape(b * hkv, -1)
      seg = (jnp.ones((b * hkv, n), jnp.int32), vis.astype(jnp.int32))
      out = attention(
        q_f, k_f, v_f, mask=shifted, segment_ids=seg, kernel=self.decode_kernel(q_f, k_f, v_f, shifted),
        allow_reference_fallback=self.allow_reference_fallback,
      )
      out = out.reshape(b, hkv, n, g, d).transpose(0, 2, 1, 3, 4).reshape(b, n, hq, d)
    else:
      vis = jnp.concatenate([visible, jnp.ones((b, n), bool)], axis=1)
      seg = (jnp.ones((b, n), jnp.int32), vis.astype(jnp.int32))  # q id 1 meets kv id 1 = visible
      out = attention(
        q, k_all, v_all, mask=shifted, segment_ids=seg, kernel=self.decode_kernel(q, k_all, v_all, shifted),
        allow_reference_fallback=self.allow_reference_fallback,
      )
    return out, cache.append(k, v)
