"""Per-hop attention kernels of ring attention: what one hop computes on one (q rows x kv block) sub-block.

One job: the `HopKernel` contract the caller hands to the ring (the ring never picks a kernel, so it does not
depend on the dispatcher in layers/attention.py), the cuDNN and dense (XLA) hop functions that
`layers.attention.hop_kernel` wires into it, and the forward / backward of one hop call.

Backward of one hop with the GLOBAL (out, lse) and upstream (dO, dL) (dL is the cotangent of lse when it is
returned): with delta = rowsum(dO * out) - dL and P_t = exp(s_t - lse),

    dV_t = P_t^T dO,   dS_t = P_t * (dO V_t^T - delta),   dQ += scale dS_t K_t,   dK_t = scale dS_t^T Q.

That is exactly a flash-attention backward fed with the global (out, lse): hop kernels with a `backward`
(xla, cudnn, flash) do this (no forward recomputation). Where no such backward is given (the reference
kernel) `local_backward` uses the vjp of the hop's forward instead: out = sum_t w_t o_t with
w_t = exp(lse_t - lse), so

    d o_t = w_t dO,    d lse_t = w_t (rowsum(dO * o_t) - rowsum(dO * out) + dL) = w_t (rowsum(dO * o_t) - delta),

and jax.vjp of the hop's (o_t, lse_t) with those cotangents gives the hop's (dq, dk, dv) exactly (at the
price of recomputing the hop's forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.layout import MaskSpec


@dataclasses.dataclass(frozen=True)
class HopKernel:
  """The attention a ring hop runs, handed in by the caller (`layers.attention.hop_kernel`): the ring never
  picks a kernel itself, so it does not depend on the dispatcher in layers/attention.py.

  forward(q, k, v, *, mask, segment_ids, scale) -> (o [B, tq, Hq, D] q.dtype, lse [B, Hq, tq] fp32).
  backward(q, k, v, mask, segment_ids, out, lse, do, delta, dlse, scale) -> (dq, dk, dv) fp32, fed with the
    GLOBAL out/lse rows and delta = rowsum(dO * out) - dL; None: the vjp of `forward` (recomputes the hop).
  whole(q, k, v, *, mask, segment_ids, scale, return_lse): differentiable attention for a ring of one device.
  check(mask, tq, tk, has_segments): raise on a hop mask the kernel cannot run (before tracing), or None.
  sparse: forward, backward and whole also take `layout=` (a local `BlockLayout`, block-sparse hops); only
    passed when there is one, so kernels without it (cuDNN) keep their signatures.
  """

  name: str
  forward: Callable
  whole: Callable
  backward: Callable | None = None
  check: Callable | None = None
  sparse: bool = False


def _cudnn_check(spec: MaskSpec, tq: int, tk: int, has_segments: bool) -> None:
  square_causal = spec.kind == "causal" and spec.q_offset == 0 and spec.kv_offset == 0 and tq == tk
  if has_segments or not (spec.kind == "bidirectional" or square_causal):
    raise ValueError(
      f"ring kernel='cudnn' handles hop masks that are plain causal (square, no offsets) or bidirectional "
      f"and no segment ids; this hop needs {spec} on a [{tq}, {tk}] block"
      f"{' with segment ids' if has_segments else ''}: use kernel='flash' or 'xla'"
    )


def _cudnn_args(q, spec):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415  (private: only API with fp32 lse)

  nu = jnp.zeros(0, q.dtype)
  kw = dict(
    seed=0,
    dropout_rate=0.0,
    variadic_args=(False, False),
    mask_type=fa.MaskType.CAUSAL if spec.kind == "causal" else fa.MaskType.NO_MASK,
    layout=fa.AttentionLayout.BTNH.value,
    sliding_window_length=None,
  )
  return fa, (nu,) * 7, kw


def _cudnn_fwd(q, k, v, spec, scale):
  """cuDNN flash forward returning the fp32 softmax statistics (= lse [B, H, T]) the public API rounds."""
  fa, nus, kw = _cudnn_args(q, spec)
  out, lse = fa._dot_product_attention_fwd_impl(q, k, v, *nus, scale=scale, is_training=True, **kw)
  return out, lse


def _cudnn_bwd(q, k, v, spec, scale, out, lse, do):
  """cuDNN flash backward fed with the GLOBAL (out, lse): exactly the hop's share of the gradient."""
  fa, nus, kw = _cudnn_args(q, spec)
  dq, dk, dv = fa._dot_product_attention_bwd_impl(q, k, v, *nus, lse, out, do, scale=scale, **kw)[:3]
  return dq, dk, dv


def cudnn_hop_forward(q, k, v, *, mask: MaskSpec, segment_ids, scale: float):
  """(o, lse) of one sub-block with cuDNN; the hop mask must pass `cudnn_hop_check`."""
  _cudnn_check(mask, q.shape[1], k.shape[1], segment_ids is not None)
  return _cudnn_fwd(q, k, v, mask, scale)


def cudnn_hop_backward(q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float):
  """cuDNN backward of one sub-block fed with the global (out, lse) (no lse cotangent)."""
  del seg, delta
  if dlse is not None:
    raise ValueError("ring with kernel='cudnn' cannot differentiate through the returned lse; use 'xla' or 'flash'")
  dq, dk, dv = _cudnn_bwd(q, k, v, spec, scale, out.astype(q.dtype), lse, do.astype(q.dtype))
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


cudnn_hop_check = _cudnn_check


def _layout_kw(layout) -> dict:
  return {} if layout is None else {"layout": layout}


def local_forward(hop: HopKernel, q, k, v, spec: MaskSpec, seg, scale: float, layout=None):
  """(o [B, tq, Hq, D] q.dtype, lse [B, Hq, tq] fp32) of one sub-block (restricted to `layout`'s blocks)."""
  return hop.forward(q, k, v, mask=spec, segment_ids=seg, scale=scale, **_layout_kw(layout))


def dense_hop_backward(q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float, layout=None):
  """Direct hop backward with the global lse (dense; the "xla" hop kernel). GQA without repeating K/V.
  `layout` (a local BlockLayout, heads 1 or Hq) restricts the visible tiles as in the forward."""
  del out, dlse  # delta already holds the lse cotangent
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, tq, hkv, g, d)
  dog = do.reshape(b, tq, hkv, g, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  vis = spec.tile_allowed(0, 0, tq, tk)[None, None, None]
  if seg is not None:
    vis = vis & (seg[0][:, None, None, :, None] == seg[1][:, None, None, None, :])
  if layout is not None:
    lv = layout.dense(tq, tk)  # [B or 1, 1 or Hq, tq, tk]
    lv = lv[:, :, None] if lv.shape[1] == 1 else lv.reshape(lv.shape[0], hkv, g, tq, tk)
    vis = vis & lv
  lse_g = lse.reshape(b, hkv, g, tq, 1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
  dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
  dp = jnp.einsum("btkgd,bskd->bkgts", dog, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta.reshape(b, hkv, g, tq, 1))
  dq = jnp.einsum("bkgts,bskd->btkgd", ds.astype(q.dtype), k, preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), qg, preferred_element_type=jnp.float32) * scale
  return dq.reshape(b, tq, hq, d), dk, dv


def local_backward(hop: HopKernel, q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float, layout=None):
  """(dq, dk, dv) fp32 of one sub-block given the global out/lse rows and delta = rowsum(dO*out) - dL."""
  if hop.backward is not None:
    return hop.backward(q, k, v, spec, seg, out, lse, do, delta, dlse, scale, **_layout_kw(layout))
  # Generic: vjp of the local attention with d o_t = w_t dO and d lse_t = w_t (rowsum(dO o_t) - delta).
  do = do.astype(jnp.float32)
  (o_t, lse_t), vjp = jax.vjp(lambda q_, k_, v_: local_forward(hop, q_, k_, v_, spec, seg, scale, layout), q, k, v)
  finite = jnp.isfinite(lse_t)
  w = jnp.where(finite, jnp.exp(jnp.where(finite, lse_t, 0.0) - jnp.where(finite, lse, 0.0)), 0.0)  # [B,H,t]
  w_rows = jnp.swapaxes(w, 1, 2)[..., None]  # [B, t, H, 1]
  do_t = (w_rows * do).astype(o_t.dtype)
  dlse_t = w * (jnp.einsum("bthd,bthd->bht", do, o_t.astype(jnp.float32)) - delta)
  dq, dk, dv = vjp((do_t, dlse_t))
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


__all__ = [
  "HopKernel",
  "cudnn_hop_backward",
  "cudnn_hop_check",
  "cudnn_hop_forward",
  "dense_hop_backward",
  "local_backward",
  "local_forward",
]
