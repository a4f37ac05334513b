"""The TPU flash-attention forward kernel: out and lse over a range or list schedule (design: `flash.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.layout import BlockLayout, MaskSpec
from pallas_kernels.tpu.common import (
  LANES,
  TpuFlashConfig,
  _blocks,
  _branch,
  _call,
  _check_blocks,
  _col,
  _dot,
  _Heads,
  _heads,
  _out_struct,
  _resolve,
  _row,
  _rows_where,
  _seg_rows,
  _visible,
)
from pallas_kernels.tpu.schedule import (
  _Sched,
  _schedules,
)


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
