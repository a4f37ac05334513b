"""The TPU flash-attention backward kernels: dQ (q-major, the forward's schedule) and dK/dV (kv-major, the
transposed schedule; the GQA group reduced in VMEM). Design: `flash.py`.
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
  _rows_where,
  _seg_rows,
  _stack_cols,
  _visible,
)
from pallas_kernels.tpu.schedule import (
  _Sched,
  _schedules,
)


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
