"""Flash attention (forward with lse, backward dQ and dK/dV) for TPU as `pl.pallas_call` kernels.

One kernel family serves dense masks and block-sparse layouts. The kv blocks that a q block visits (and, for
dK/dV, the q blocks that a kv block visits) form a *schedule* handed to the kernel by scalar prefetch:

  range schedule  (no layout)  per major block a contiguous [start, start + count) run of minor blocks,
                  computed on the host by `pallas_kernels.tile_schedule.range_table` (the mask -> tile
                  schedule the GPU kernels share). Every mask kind is a band, so the non-empty tiles of a
                  row (and of a column) are contiguous; the grid's minor extent is the longest run (grid
                  shrinking), so EMPTY tiles are neither computed nor DMA'd. Metadata and host work are
                  O(T / block), fine at a million tokens.
  list schedule   (BlockLayout) per (batch, head, major block) the listed minor blocks, compacted on device
                  (unlisted, duplicate and mask-EMPTY entries dropped, ascending order); padding repeats the
                  last valid entry so the pipeline sees an unchanged block index and issues no DMA.
                  Limits: the whole list is scalar-prefetched, so it must fit SMEM (shard heads, or share the
                  layout across heads, at long lengths); the transposed dK/dV lists are built through an
                  [nQ, nK] block mask and padded to nQ entries, since a traced layout gives no tighter static
                  bound: O(nQ * nK) metadata and grid steps per layout head.

Inside a tile the mask is evaluated from the MaskSpec (`tile_relation` picks the unmasked path for FULL tiles)
plus segment ids; nothing dense is ever built. GQA never repeats K/V: the forward and dQ programs take all G
query heads of a kv head at once (a [G * block_q, D] q tile against one K/V tile, so each K/V tile is fetched
once per group and the MXU sees G times more rows), unless a per-head layout gives each head its own
schedule; dK/dV loop over the group's q heads inside one kv-head program, so the reduction over the group
happens in VMEM and is deterministic.

Shapes follow the attention contract: q [B, T, Hq, D], k/v [B, S, Hkv, D], out [B, T, Hq, D], lse [B, Hq, T]
fp32 (fully-masked rows: out 0, lse -inf). The kernels work in [B, H, T, D] (sequence x head_dim tiles are
what the TPU vector unit wants), so the wrappers transpose once on the way in and out.

On CPU pass `interpret=True` (JAX's grid interpreter: a jitted loop over grid steps that fills outputs with
NaN before running, so an unwritten element cannot pass a test) or a `pltpu.InterpretParams()`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import ManualAxisType

from pallas_kernels import tile_schedule
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


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sched:
  """Static description of a schedule; its two int32 arrays travel by scalar prefetch (flattened to 1D).

  For the range kind the arrays are (start[n_major], count[n_major]); for the list kind they are
  (idx[nb * nh * n_major * width], count[nb * nh * n_major]) where nb / nh are 1 when the layout is shared.
  """

  kind: str  # "range" | "list"
  n_major: int
  width: int  # grid extent of the minor axis
  nb: int = 1
  nh: int = 1

  def _row(self, b, h, i):
    if self.kind == "range":
      return i
    bb = 0 if self.nb == 1 else b
    hh = 0 if self.nh == 1 else h
    return (bb * self.nh + hh) * self.n_major + i

  def count(self, b, h, i, arr_ref, cnt_ref):
    del arr_ref
    return cnt_ref[self._row(b, h, i)]

  def block(self, b, h, i, j, arr_ref, cnt_ref):
    row = self._row(b, h, i)
    if self.kind == "range":
      last = jnp.maximum(cnt_ref[row] - 1, 0)
      return arr_ref[row] + jnp.minimum(j, last)
    return arr_ref[row * self.width + j]


def _range_sched(mask: MaskSpec, n_rows, n_cols, b_row, b_col, transposed):
  start, count = tile_schedule.range_table(mask, n_rows, n_cols, b_row, b_col, transposed)
  width = max(int(count.max()) if n_rows else 1, 1)
  return _Sched("range", n_rows, width), (jnp.asarray(start), jnp.asarray(count))


def _compact(valid, idx, fill_default):
  """Move entries with `valid` to the front (ascending idx), pad with the last valid one. [..., W] each."""
  w = idx.shape[-1]
  big = jnp.iinfo(jnp.int32).max
  key = jnp.sort(jnp.where(valid, idx, big), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
  keep = (key != big) & ~dup
  key = jnp.sort(jnp.where(keep, key, big), axis=-1)
  cnt = keep.sum(-1).astype(jnp.int32)
  last = jnp.take_along_axis(key, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
  last = jnp.where(cnt[..., None] > 0, last, fill_default)
  pos = jnp.arange(w, dtype=jnp.int32)
  out = jnp.where(pos < cnt[..., None], key, last).astype(jnp.int32)
  return out, cnt


def _list_scheds(mask: MaskSpec, layout: BlockLayout, b: int, hq: int, n_q: int, n_k: int):
  """Forward/dQ (q-major) and dK/dV (kv-major) list schedules from a layout, restricted by the mask."""
  idx, cnt = layout.kv_indices.astype(jnp.int32), layout.kv_counts.astype(jnp.int32)
  if idx.ndim != 4 or idx.shape[2] != n_q or cnt.shape != idx.shape[:3]:
    raise ValueError(
      f"BlockLayout: kv_indices {idx.shape} / kv_counts {cnt.shape} must be [B, H, nQ={n_q}, max_kv] / [B, H, nQ]"
    )
  nb, nh = idx.shape[:2]
  if nb not in (1, b) or nh not in (1, hq):
    raise ValueError(f"BlockLayout: leading dims {(nb, nh)} must be (1 or B={b}, 1 or Hq={hq})")
  bq, bk = layout.block_q, layout.block_kv
  w = idx.shape[-1]
  qi = jnp.arange(n_q, dtype=jnp.int32)[:, None]
  rel = mask.tile_relation(qi * bq, jnp.clip(idx, 0, n_k - 1) * bk, bq, bk)
  valid = (jnp.arange(w) < cnt[..., None]) & (rel != _EMPTY) & (idx >= 0) & (idx < n_k)
  fidx, fcnt = _compact(valid, idx, 0)
  # transposed lists: kv block -> q blocks, via the [nQ, nK] block mask (O(nQ * nK) per layout head)
  onehot = jax.nn.one_hot(fidx, n_k, dtype=jnp.bool_) & (jnp.arange(w) < fcnt[..., None])[..., None]
  bm_t = jnp.swapaxes(onehot.any(axis=-2), -1, -2)  # [nb, nh, nK, nQ]
  qidx = jnp.broadcast_to(jnp.arange(n_q, dtype=jnp.int32), bm_t.shape)
  tidx, tcnt = _compact(bm_t, qidx, 0)
  fwd = _Sched("list", n_q, max(w, 1), nb, nh)
  bwd = _Sched("list", n_k, max(n_q, 1), nb, nh)
  return (fwd, (fidx.reshape(-1), fcnt.reshape(-1))), (bwd, (tidx.reshape(-1), tcnt.reshape(-1)))


def _schedules(mask, layout, b, hq, t, s, bq, bk, bq2, bk2):
  if layout is None:
    fwd = _range_sched(mask, t // bq, s // bk, bq, bk, transposed=False)
    bwd = _range_sched(mask, s // bk2, t // bq2, bk2, bq2, transposed=True)
    return fwd, bwd
  return _list_scheds(mask, layout, b, hq, t // bq, s // bk)


# ---------------------------------------------------------------------------------------------------------------
# Kernel helpers
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------


def _fwd_kernel(arr_ref, cnt_ref, *refs, sched: _Sched, heads: _Heads, mask, scale, bq, bk, has_seg):
  if has_seg:
    q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  b, hp, i, j = (pl.program_id(a) for a in range(4))
  h = heads.q_head(hp)
  rows = heads.rows

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  kvb = sched.block(b, h, i, j, arr_ref, cnt_ref)
  q_start, kv_start = i * bq, kvb * bk
  rel = mask.tile_relation(q_start, kv_start, bq, bk)

  def body(masked: bool):
    q, k, v = q_ref[...].reshape(rows * bq, -1), k_ref[...], v_ref[...]
    s = _dot(q, k, 1, 1) * scale  # [rows * bq, bk]
    if masked:
      ids = (_col(qs_ref), ks_ref[...]) if has_seg else (None, None)
      s = _rows_where(_visible(mask, q_start, kv_start, (bq, bk), False, *ids), s, -jnp.inf, rows)
    m_prev = m_sc[...][:, :1]
    l_prev = l_sc[...][:, :1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at exactly 0
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_sc[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_sc.shape)
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, 1, 0)

  @pl.when(j < sched.count(b, h, i, arr_ref, cnt_ref))
  def _compute():
    _branch(mask, has_seg, rel, body)

  @pl.when(j == sched.width - 1)
  def _finish():
    l = l_sc[...][:, :1]
    m = m_sc[...][:, :1]
    seen = l > 0
    out = jnp.where(seen, acc_sc[...] / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)  # [rows * bq, 1]
    for g in range(rows):
      lse_ref[g] = _row(lse[g * bq : (g + 1) * bq])


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


def flash_forward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: tuple[jax.Array, jax.Array] | None,
  *,
  mask: MaskSpec,
  scale: float,
  layout: BlockLayout | None = None,
  interpret: Any = False,
  config: TpuFlashConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
  """q [B, T, Hq, D], k/v [B, S, Hkv, D] -> out [B, T, Hq, D] (q.dtype), lse [B, Hq, T] fp32."""
  cfg = _resolve(config)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  bq, bk, bq2, bk2 = _blocks(t, s, cfg, layout)
  _check_blocks(t, s, bq, bk, bq2, bk2)
  (sched, arrs), _ = _schedules(mask, layout, b, hq, t, s, bq, bk, bq2, bk2)
  has_seg = segment_ids is not None
  hd = _heads(cfg, group, layout)
  r = hd.rows

  def q_map(bi, hp, i, j, arr, cnt):
    return bi, hd.kv_head(hp), hd.g_block(hp), i, 0

  def kvb(bi, hp, i, j, arr, cnt):
    return sched.block(bi, hd.q_head(hp), i, j, arr, cnt)

  def kv_map(bi, hp, i, j, arr, cnt):
    return bi, hd.kv_head(hp), kvb(bi, hp, i, j, arr, cnt), 0

  in_specs = [
    pl.BlockSpec((None, None, r, bq, d), q_map),
    pl.BlockSpec((None, None, bk, d), kv_map),
    pl.BlockSpec((None, None, bk, d), kv_map),
  ]
  args = [jnp.swapaxes(q, 1, 2).reshape(b, hkv, group, t, d), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, 1, bq), lambda bi, hp, i, j, arr, cnt: (bi, 0, i)),
      pl.BlockSpec((None, 1, bk), lambda bi, hp, i, j, arr, cnt: (bi, 0, kvb(bi, hp, i, j, arr, cnt))),
    ]
    args += list(_seg_rows(segment_ids))
  out_specs = [
    pl.BlockSpec((None, None, r, bq, d), q_map),
    pl.BlockSpec((None, None, r, 1, bq), lambda bi, hp, i, j, arr, cnt: (bi, hd.kv_head(hp), hd.g_block(hp), 0, i)),
  ]
  like = (q, k, v, *(segment_ids or ()), *(jax.tree.leaves(layout)))
  out_shape = [
    _out_struct((b, hkv, group, t, d), q.dtype, *like),
    _out_struct((b, hkv, group, 1, t), jnp.float32, *like),
  ]
  scratch = [
    pltpu.VMEM((r * bq, LANES), jnp.float32),
    pltpu.VMEM((r * bq, LANES), jnp.float32),
    pltpu.VMEM((r * bq, d), jnp.float32),
  ]
  kernel = functools.partial(_fwd_kernel, sched=sched, heads=hd, mask=mask, scale=scale, bq=bq, bk=bk, has_seg=has_seg)
  out, lse = _call(
    kernel,
    grid=(b, hkv * hd.per_kv, t // bq, sched.width),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch=scratch,
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    name="vidlm_flash_fwd",
  )(*arrs, *args)
  return jnp.swapaxes(out.reshape(b, hq, t, d), 1, 2), lse.reshape(b, hq, t)


# ---------------------------------------------------------------------------------------------------------------
# Backward: dQ (q-major, same schedule as forward) and dK/dV (kv-major, transposed schedule)
# ---------------------------------------------------------------------------------------------------------------


def _dq_kernel(arr_ref, cnt_ref, *refs, sched: _Sched, heads: _Heads, mask, scale, bq, bk, has_seg):
  if has_seg:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, acc_sc = refs
  b, hp, i, j = (pl.program_id(a) for a in range(4))
  h = heads.q_head(hp)
  rows = heads.rows

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  kvb = sched.block(b, h, i, j, arr_ref, cnt_ref)
  q_start, kv_start = i * bq, kvb * bk
  rel = mask.tile_relation(q_start, kv_start, bq, bk)

  def body(masked: bool):
    q, k, v = q_ref[...].reshape(rows * bq, -1), k_ref[...], v_ref[...]
    do = do_ref[...].reshape(rows * bq, -1)
    lse = _stack_cols(lse_ref, rows)  # [rows * bq, 1]
    di = _stack_cols(di_ref, rows)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    s = _dot(q, k, 1, 1) * scale
    p = jnp.exp(s - lse)
    if masked:
      ids = (_col(qs_ref), ks_ref[...]) if has_seg else (None, None)
      p = _rows_where(_visible(mask, q_start, kv_start, (bq, bk), False, *ids), p, 0.0, rows)
    dp = _dot(do, v, 1, 1)  # [rows * bq, bk]
    ds = p * (dp - di)
    acc_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

  @pl.when(j < sched.count(b, h, i, arr_ref, cnt_ref))
  def _compute():
    _branch(mask, has_seg, rel, body)

  @pl.when(j == sched.width - 1)
  def _finish():
    dq_ref[...] = (acc_sc[...] * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(arr_ref, cnt_ref, *refs, sched: _Sched, mask, scale, bq, bk, group, has_seg):
  if has_seg:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  b, hk, i, st = (pl.program_id(a) for a in range(4))
  g, j = st // sched.width, st % sched.width
  h = hk * group + g

  @pl.when(st == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  qb = sched.block(b, h, i, j, arr_ref, cnt_ref)
  q_start, kv_start = qb * bq, i * bk
  rel = mask.tile_relation(q_start, kv_start, bq, bk)

  def body(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    lse = lse_ref[...]  # [1, bq]
    di = di_ref[...]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    st_ = _dot(k, q, 1, 1) * scale  # S^T: [bk, bq]
    pt = jnp.exp(st_ - lse)
    if masked:
      ids = (qs_ref[...], _col(ks_ref)) if has_seg else (None, None)
      pt = jnp.where(_visible(mask, q_start, kv_start, st_.shape, True, *ids), pt, 0.0)
    dv_sc[...] += _dot(pt.astype(do.dtype), do, 1, 0)
    dpt = _dot(v, do, 1, 1)  # dP^T: [bk, bq]
    dst = pt * (dpt - di)
    dk_sc[...] += _dot(dst.astype(q.dtype), q, 1, 0)

  @pl.when(j < sched.count(b, h, i, arr_ref, cnt_ref))
  def _compute():
    _branch(mask, has_seg, rel, body)

  @pl.when(st == group * sched.width - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def flash_backward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: tuple[jax.Array, jax.Array] | None,
  out: jax.Array,
  lse: jax.Array,
  dout: jax.Array,
  *,
  mask: MaskSpec,
  scale: float,
  layout: BlockLayout | None = None,
  dlse: jax.Array | None = None,
  interpret: Any = False,
  config: TpuFlashConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients (dq [B, T, Hq, D], dk/dv [B, S, Hkv, D]) of out (and of lse when `dlse` [B, Hq, T] is given).

  dS = P * (dP - delta + dlse) with delta = rowsum(out * dout): the lse cotangent only shifts delta, so it
  is folded into the `di` row vector computed here in XLA and the kernels do not know about it.
  """
  cfg = _resolve(config)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  bq, bk, bq2, bk2 = _blocks(t, s, cfg, layout)
  _check_blocks(t, s, bq, bk, bq2, bk2)
  (fs, farr), (bs, barr) = _schedules(mask, layout, b, hq, t, s, bq, bk, bq2, bk2)
  has_seg = segment_ids is not None

  like = (q, k, v, out, lse, dout, dlse, *(segment_ids or ()), *(jax.tree.leaves(layout)))
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  di = delta if dlse is None else delta - dlse.astype(jnp.float32)
  lse = lse.astype(jnp.float32)
  qt, kt, vt, dot_ = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, dout))
  seg = _seg_rows(segment_ids) if has_seg else ()
  lse_r, di_r = lse[:, :, None, :], di[:, :, None, :]  # [B, Hq, 1, T]

  # ---- dQ ----
  hd = _heads(cfg, group, layout)
  r = hd.rows

  def q_map(bi, hp, i, j, arr, cnt):
    return bi, hd.kv_head(hp), hd.g_block(hp), i, 0

  def row_map_q(bi, hp, i, j, arr, cnt):
    return bi, hd.kv_head(hp), hd.g_block(hp), 0, i

  def kvb(bi, hp, i, j, arr, cnt):
    return fs.block(bi, hd.q_head(hp), i, j, arr, cnt)

  def kv_map(bi, hp, i, j, arr, cnt):
    return bi, hd.kv_head(hp), kvb(bi, hp, i, j, arr, cnt), 0

  in_specs = [
    pl.BlockSpec((None, None, r, bq, d), q_map),
    pl.BlockSpec((None, None, bk, d), kv_map),
    pl.BlockSpec((None, None, bk, d), kv_map),
    pl.BlockSpec((None, None, r, bq, d), q_map),
    pl.BlockSpec((None, None, r, 1, bq), row_map_q),
    pl.BlockSpec((None, None, r, 1, bq), row_map_q),
  ]
  grouped = lambda x: x.reshape(b, hkv, group, *x.shape[2:])  # [B, Hq, ...] -> [B, Hkv, G, ...]
  args = [grouped(qt), kt, vt, grouped(dot_), grouped(lse_r), grouped(di_r)]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, 1, bq), lambda bi, hp, i, j, arr, cnt: (bi, 0, i)),
      pl.BlockSpec((None, 1, bk), lambda bi, hp, i, j, arr, cnt: (bi, 0, kvb(bi, hp, i, j, arr, cnt))),
    ]
    args += list(seg)
  dq = _call(
    functools.partial(_dq_kernel, sched=fs, heads=hd, mask=mask, scale=scale, bq=bq, bk=bk, has_seg=has_seg),
    grid=(b, hkv * hd.per_kv, t // bq, fs.width),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, None, r, bq, d), q_map),
    out_shape=_out_struct((b, hkv, group, t, d), q.dtype, *like),
    scratch=[pltpu.VMEM((r * bq, d), jnp.float32)],
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    name="vidlm_flash_dq",
  )(*farr, *args)

  # ---- dK / dV ----
  def qb_of(bi, hk, i, st, arr, cnt):
    h = hk * group + st // bs.width
    return h, bs.block(bi, h, i, st % bs.width, arr, cnt)

  def qd_map(bi, hk, i, st, arr, cnt):
    h, qb = qb_of(bi, hk, i, st, arr, cnt)
    return bi, h, qb, 0

  def row_map(bi, hk, i, st, arr, cnt):
    h, qb = qb_of(bi, hk, i, st, arr, cnt)
    return bi, h, 0, qb

  def kvd_map(bi, hk, i, st, arr, cnt):
    return bi, hk, i, 0

  in_specs = [
    pl.BlockSpec((None, None, bq2, d), qd_map),
    pl.BlockSpec((None, None, bk2, d), kvd_map),
    pl.BlockSpec((None, None, bk2, d), kvd_map),
    pl.BlockSpec((None, None, bq2, d), qd_map),
    pl.BlockSpec((None, None, 1, bq2), row_map),
    pl.BlockSpec((None, None, 1, bq2), row_map),
  ]
  args = [qt, kt, vt, dot_, lse_r, di_r]
  if has_seg:
    in_specs += [
      pl.BlockSpec((None, 1, bq2), lambda bi, hk, i, st, arr, cnt: (bi, 0, qb_of(bi, hk, i, st, arr, cnt)[1])),
      pl.BlockSpec((None, 1, bk2), lambda bi, hk, i, st, arr, cnt: (bi, 0, i)),
    ]
    args += list(seg)
  dk, dv = _call(
    functools.partial(_dkv_kernel, sched=bs, mask=mask, scale=scale, bq=bq2, bk=bk2, group=group, has_seg=has_seg),
    grid=(b, hkv, s // bk2, group * bs.width),
    in_specs=in_specs,
    out_specs=[pl.BlockSpec((None, None, bk2, d), kvd_map), pl.BlockSpec((None, None, bk2, d), kvd_map)],
    out_shape=[_out_struct((b, hkv, s, d), k.dtype, *like), _out_struct((b, hkv, s, d), v.dtype, *like)],
    scratch=[pltpu.VMEM((bk2, d), jnp.float32), pltpu.VMEM((bk2, d), jnp.float32)],
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    name="vidlm_flash_dkv",
  )(*barr, *args)
  return jnp.swapaxes(dq.reshape(b, hq, t, d), 1, 2), jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2)
