"""Ground truth for every attention kernel: fp32 math from the dense mask, any shape, any mask.

Shapes (the attention contract, DESIGN section 3):
  q: [B, T, Hq, D]   k, v: [B, S, Hkv, D]   Hq % Hkv == 0 (GQA: kv head = q head // (Hq // Hkv))
  segment_ids: ([B, T], [B, S]) int32 or None
  out: [B, T, Hq, D] in q.dtype;  lse: [B, Hq, T] float32

A row whose every key is masked returns out = 0 and lse = -inf: ring attention relies on this to merge
hops that see nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout, MaskSpec


def check_shapes(q, k, v, segment_ids=None) -> None:
  """One-line errors for malformed attention inputs (shared by every impl)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention: q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
  b, _, hq, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"attention: k and v shapes differ: {k.shape} vs {v.shape}")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"attention: batch/head_dim of k {k.shape} do not match q {q.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"attention: query heads {hq} not a multiple of kv heads {k.shape[2]} (GQA)")
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
      raise ValueError(
        f"attention: segment_ids shapes {q_seg.shape}, {kv_seg.shape} must be [B, T]={q.shape[:2]}, [B, S]={k.shape[:2]}"
      )


def visibility(
  t: int,
  s: int,
  *,
  mask: MaskSpec,
  segment_ids=None,
  layout: BlockLayout | None = None,
) -> jax.Array:
  """bool[B or 1, H or 1, T, S] dense visibility from mask spec, segment ids and block layout."""
  vis = jnp.asarray(mask.dense(t, s))[None, None]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    vis = vis & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  if layout is not None:
    vis = vis & layout.dense(t, s)
  return vis


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  scale: float | None = None,
  return_lse: bool = False,
):
  """fp32 dense attention. Returns out [B, T, Hq, D] (q.dtype) and optionally lse [B, Hq, T] fp32."""
  check_shapes(q, k, v, segment_ids)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  scale = d**-0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, t, hkv, group, d)
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
  logits = logits.reshape(b, hq, t, s)
  vis = visibility(t, s, mask=mask, segment_ids=segment_ids, layout=layout)
  logits = jnp.where(vis, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - safe_max)  # masked entries: exp(-inf) = 0
  denom = jnp.sum(p, axis=-1, keepdims=True)
  lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom > 0, denom, 1.0))[..., 0] + safe_max[..., 0], -jnp.inf)
  p = p / jnp.where(denom > 0, denom, 1.0)
  p = p.reshape(b, hkv, group, t, s)
  out = jnp.einsum("bkgts,bskd->btkgd", p, vf, precision=jax.lax.Precision.HIGHEST).reshape(b, t, hq, d)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out
