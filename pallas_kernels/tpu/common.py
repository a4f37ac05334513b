"""What the TPU flash kernels share: the config and support check, and the in-kernel helpers (tile
visibility, FULL/PARTIAL branching, lane-replicated row statistics, the pallas_call wrapper). Design: `flash.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import ManualAxisType

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation

LANES = 128  # row statistics live lane-replicated in VMEM scratch, as the TPU vector layout wants
_EMPTY, _FULL = int(TileRelation.EMPTY), int(TileRelation.FULL)


@dataclasses.dataclass(frozen=True)
class TpuFlashConfig:
  """Block sizes (hashable: it is a static argument of the custom_vjp).

  With a `BlockLayout` the layout's own block sizes are used for every kernel (the layout is in their units).
  Blocks are clipped to the sequence length; lengths must be multiples of the blocks (see `supports`).
  On a real TPU every block must be a multiple of 128 or the whole sequence: lse, delta and segment-id blocks
  are rows with the block in the lane dimension (Mosaic rejects anything else at lowering).
  """

  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int | None = None  # defaults to block_q
  block_kv_dkv: int | None = None  # defaults to block_kv
  # forward / dQ: one program computes all G query heads of a kv head (rows = G * block_q), so each K/V tile
  # is fetched once per group instead of G times. Needs a schedule shared by the group (no per-head layout).
  group_heads: bool = True


def _blocks(t: int, s: int, cfg: TpuFlashConfig, layout: BlockLayout | None) -> tuple[int, int, int, int]:
  if layout is not None:
    return layout.block_q, layout.block_kv, layout.block_q, layout.block_kv
  bq, bk = min(cfg.block_q, t), min(cfg.block_kv, s)
  bq2, bk2 = min(cfg.block_q_dkv or cfg.block_q, t), min(cfg.block_kv_dkv or cfg.block_kv, s)
  return bq, bk, bq2, bk2


def supports(
  q, k, v, segment_ids, mask: MaskSpec, layout: BlockLayout | None = None, config=None, *, hardware: bool = False
) -> bool:
  """Whether these kernels handle the inputs: lengths must be multiples of the blocks, and on a real TPU
  (`hardware=True`) blocks must also be lane-sized (multiples of 128, or the whole sequence)."""
  del v, segment_ids, mask
  cfg = config or TpuFlashConfig()
  t, s = q.shape[1], k.shape[1]
  bq, bk, bq2, bk2 = _blocks(t, s, cfg, layout)
  if any(t % b for b in (bq, bq2)) or any(s % b for b in (bk, bk2)):
    return False
  if hardware:
    return all(b % 128 == 0 or b == n for b, n in ((bq, t), (bq2, t), (bk, s), (bk2, s)))
  return True


def _dot(a, b, contract_a: int, contract_b: int):
  """a @ b contracting the given dims, fp32 accumulation (fp32 inputs at full precision)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
    a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
  )


def _visible(mask: MaskSpec, q_start, kv_start, shape, transposed: bool, q_ids=None, kv_ids=None):
  """Element visibility of one tile; rows are q (or kv when transposed)."""
  q_dim, kv_dim = (1, 0) if transposed else (0, 1)
  qp = mask.q_offset + q_start + lax.broadcasted_iota(jnp.int32, shape, q_dim)
  kp = mask.kv_offset + kv_start + lax.broadcasted_iota(jnp.int32, shape, kv_dim)
  vis = mask.allowed(qp, kp)
  if q_ids is not None:
    vis = vis & (q_ids == kv_ids)
  return vis


def _branch(mask: MaskSpec, has_seg: bool, rel, body):
  """Run body(masked) on the unmasked path for FULL tiles (without segment ids) and masked path otherwise."""
  if not has_seg and mask.kind == "bidirectional":
    body(False)
    return
  if has_seg:
    body(True)
    return

  @pl.when(rel == _FULL)
  def _():
    body(False)

  @pl.when(rel != _FULL)
  def _():
    body(True)


def _params(interpret, semantics):
  del interpret
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, interpret, semantics, name):
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
    ),
    out_shape=out_shape,
    compiler_params=_params(interpret, semantics),
    interpret=interpret,
    name=name,
  )


def _out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """Output type varying over the union of the inputs' manual mesh axes (needed under shard_map check_vma)."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like if x is not None))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=varying))


@dataclasses.dataclass(frozen=True)
class _Heads:
  """Head programs of the q-major kernels: each covers `rows` consecutive q heads of one kv head's group."""

  group: int  # G = Hq // Hkv
  rows: int  # G (grouped) or 1

  @property
  def per_kv(self) -> int:
    return self.group // self.rows

  def kv_head(self, hp):
    return hp // self.per_kv

  def g_block(self, hp):
    return hp % self.per_kv

  def q_head(self, hp):
    """First q head of the program (the one whose layout row the schedule reads)."""
    return self.kv_head(hp) * self.group + self.g_block(hp) * self.rows


def _heads(cfg: TpuFlashConfig, group: int, layout: BlockLayout | None) -> _Heads:
  shared = layout is None or layout.kv_indices.shape[1] == 1
  return _Heads(group, group if (cfg.group_heads and shared) else 1)


def _rows_where(vis, x, fill, rows: int):
  """where(vis, x, fill) for x = [rows * bq, bk] stacked heads and a per-head [bq, bk] visibility."""
  if rows == 1:
    return jnp.where(vis, x, fill)
  bq = vis.shape[0]
  return jnp.where(vis[None], x.reshape(rows, bq, x.shape[1]), fill).reshape(x.shape)


def _seg_rows(segment_ids):
  """Segment ids as rows [B, 1, T], [B, 1, S]: O(T) memory; kernels turn a block into a column when needed."""
  return tuple(x.astype(jnp.int32)[:, None, :] for x in segment_ids)


def _col(ref):
  """A [1, n] row block read as an [n, 1] column."""
  return ref[0][:, None]


def _stack_cols(ref, rows: int):
  """[rows, 1, n] row blocks read as one [rows * n, 1] column (heads stacked like the q rows)."""
  cols = [ref[g][0][:, None] for g in range(rows)]
  return cols[0] if rows == 1 else jnp.concatenate(cols, axis=0)


def _row(x):
  """An [n, 1] column as a [1, n] row, through a lane-replicated 2D transpose (no 1D vector relayout)."""
  return jnp.transpose(jnp.broadcast_to(x, (x.shape[0], LANES)))[:1, :]


def _resolve(config) -> TpuFlashConfig:
  if config is None:
    return TpuFlashConfig()
  if not isinstance(config, TpuFlashConfig):
    raise TypeError(f"tpu flash: config must be a TpuFlashConfig, got {type(config).__name__}")
  return config


def _check_blocks(t, s, bq, bk, bq2, bk2):
  for name, n, blk in (("T", t, bq), ("S", s, bk), ("T", t, bq2), ("S", s, bk2)):
    if n % blk:
      raise ValueError(f"tpu flash: sequence length {name}={n} is not a multiple of the block size {blk}")
