"""Flash attention for Hopper written in Pallas Mosaic GPU (`plgpu.kernel`): forward, dQ and dK/dV kernels.

Design (FlashAttention-3 style, arXiv 2407.08608):
  * Each CTA runs `compute_wgs` consumer warpgroups plus one producer warpgroup. The producer only issues TMA
    copies (GMEM -> SMEM) into a ring of `max_concurrent_steps` slots, waiting on "consumed" barriers before it
    reuses a slot; consumers wait on "loaded" barriers, run wgmma from SMEM, and arrive on "consumed".
  * The forward ping-pongs its two consumer warpgroups on a schedule barrier so that one's softmax (exp) runs
    while the other's GEMM occupies the tensor cores.
  * Masks are never materialised. Every `MaskSpec` kind is a band `lower(q) <= k <= upper(q)` with
    non-decreasing bounds, so for a block of rows the visible kv tiles form one contiguous range, and the tiles
    that are FULL (no mask math) form a contiguous sub-range. `pallas_kernels.tile_schedule.tile_bounds`
    (shared with the TPU kernels) computes those ranges with scalar arithmetic inside the kernel; its
    classification equals `MaskSpec.tile_relation` (checked exhaustively in tests). EMPTY tiles are never loaded or computed; PARTIAL tiles evaluate
    `MaskSpec.allowed` on the tile's positions (the `tile_allowed` predicate) plus segment-id equality.
  * GQA: K/V are indexed by `q_head // group`; the dK/dV kernel loops over the group's query heads and
    reduces in registers, so neither K/V nor dK/dV are ever repeated per query head.
  * Fully masked rows give out = 0 and lse = -inf (ring attention merges hops with it).

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D], lse [B, Hq, T] float32 (natural log, sequence-minor so that a
row block is one contiguous TMA).

Modules: `common.py` (FlashConfig, `supports`, in-kernel helpers), `forward.py`, `backward.py`; this module is
the entry point (`flash_forward`, `flash_backward`, `supports`, and a differentiable `flash_attention`).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.gpu.backward import flash_backward
from pallas_kernels.gpu.common import FlashConfig, default_config, supports
from pallas_kernels.gpu.forward import flash_forward
from pallas_kernels.layout import MaskSpec

__all__ = ["FlashConfig", "default_config", "flash_attention", "flash_backward", "flash_forward", "supports"]


# ------------------------------------------------------------------------------------------------------
# Differentiable wrapper (benchmarks and tests; `pallas_kernels.ops` has the dispatching one)
# ------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(q, k, v, segment_ids, mask: MaskSpec, scale: float, config=None, interpret=False):
  """out [B, T, Hq, D] with these kernels for forward and backward."""
  return flash_forward(q, k, v, segment_ids, mask=mask, scale=scale, interpret=interpret, config=config)[0]


def _fa_fwd(q, k, v, segment_ids, mask, scale, config, interpret):
  out, lse = flash_forward(q, k, v, segment_ids, mask=mask, scale=scale, interpret=interpret, config=config)
  return out, (q, k, v, segment_ids, out, lse)


def _fa_bwd(mask, scale, config, interpret, res, dout):
  q, k, v, segment_ids, out, lse = res
  dq, dk, dv = flash_backward(
    q, k, v, segment_ids, out, lse, dout, mask=mask, scale=scale, interpret=interpret, config=config
  )
  return dq, dk, dv, None


flash_attention.defvjp(_fa_fwd, _fa_bwd)
