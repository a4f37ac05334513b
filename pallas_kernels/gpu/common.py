"""What the Mosaic GPU flash kernels share: the tile config, the support check, and the small in-kernel helpers
(per-element mask of a PARTIAL tile, register-accumulating matmul, compiler params). The kernels themselves:
`forward.py` (out, lse) and `backward.py` (dQ, dK/dV); `flash.py` is the entry point and documents the design.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.layout import MaskSpec

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Block sizes of the three kernels. None picks a default for the head dim (see `default_config`)."""

  block_q: int = 64  # rows per consumer warpgroup (forward); the CTA covers 2 * block_q rows
  block_kv: int = 128
  max_concurrent_steps: int = 2
  use_schedule_barrier: bool = True
  # backward
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  compute_wgs_bwd: int = 2
  split_dkv: bool = False  # hd256: dK and dV in two passes to fit registers/SMEM

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"):
      if getattr(self, name) % 64:
        raise ValueError(f"FlashConfig.{name}={getattr(self, name)} must be a multiple of 64")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"FlashConfig.max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
    if self.compute_wgs_bwd not in (1, 2):
      raise ValueError(f"FlashConfig.compute_wgs_bwd={self.compute_wgs_bwd} must be 1 or 2")


def default_config(head_dim: int) -> FlashConfig:
  """Block sizes that fit SMEM (~227 KB) and registers for each supported head dim."""
  if head_dim <= 64:
    return FlashConfig(block_q=64, block_kv=128)
  if head_dim <= 128:
    return FlashConfig(block_q=64, block_kv=128)
  return FlashConfig(block_q=64, block_kv=64, compute_wgs_bwd=1, split_dkv=True)


# ------------------------------------------------------------------------------------------------------
# Per-element mask of a PARTIAL tile (tile ranges: pallas_kernels.tile_schedule)
# ------------------------------------------------------------------------------------------------------


def _element_mask(mask: MaskSpec, transposed: bool, row_pos, col_pos):
  """Per-element visibility of one tile (the `MaskSpec.tile_allowed` predicate, in the kernel's layout)."""
  if transposed:
    return mask.allowed(col_pos, row_pos)
  return mask.allowed(row_pos, col_pos)


# ------------------------------------------------------------------------------------------------------
# Support check
# ------------------------------------------------------------------------------------------------------


def _resolve_config(config: FlashConfig | None, head_dim: int) -> FlashConfig:
  return default_config(head_dim) if config is None else config


def supports(q, k, v, segment_ids, mask: MaskSpec, config: FlashConfig | None = None) -> bool:
  """Whether these kernels handle the inputs (shapes, dtypes, head dims, block divisibility)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
    return False
  b, t, hq, d = q.shape
  _, s, hkv, dk = k.shape
  if dk != d or k.shape[0] != b or hkv == 0 or hq % hkv:
    return False
  if jnp.dtype(q.dtype) not in _DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
    return False
  if d not in _HEAD_DIMS:
    return False
  if mask.q_offset < 0 or mask.kv_offset < 0:
    return False
  if mask.kind == "window" and any(w is not None and w < 0 for w in (mask.left, mask.right)):
    return False
  cfg = _resolve_config(config, d)
  cw = cfg.compute_wgs_bwd
  if t % (2 * cfg.block_q) or s % cfg.block_kv:
    return False
  if t % (cw * cfg.block_q_dq) or s % cfg.block_kv_dq:
    return False
  if s % (cw * cfg.block_kv_dkv) or t % cfg.block_q_dkv:
    return False
  if segment_ids is not None:
    qs, ks = segment_ids
    if qs.shape != (b, t) or ks.shape != (b, s):
      return False
  return True


def _check(q, k, v, segment_ids, mask, cfg):
  if not supports(q, k, v, segment_ids, mask, cfg):
    raise ValueError(
      f"pallas_kernels.gpu.flash: unsupported inputs q{q.shape} {q.dtype}, k{k.shape} {k.dtype}, mask={mask}, "
      f"config={cfg}; need bf16/fp16, head dim in {_HEAD_DIMS}, T % (2*block_q) == 0, S % block_kv == 0 "
      "(call supports() first)"
    )


def _tiling(dtype):
  # 128-byte swizzle: one 64-element bf16/fp16 row segment per swizzle atom
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def _acc_mm(acc, a, b_ref, interpret: bool, after=None):
  """acc += a @ b with `a` in registers (wgmma's register-A form, accumulating in place).

  GPU interpret mode (0.11.2) implements neither register operands of wgmma nor `pl.run_state`, so there
  the product is a plain dot of the SMEM contents; everything around it (TMA, barriers, masks) still runs.
  """
  if interpret:
    out = acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)
    if after is not None:
      after()
    return out

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    if after is not None:
      after()

  return pl.run_state(body)(plgpu.ACC.init(acc))


def _params(interpret):
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret if interpret else None
