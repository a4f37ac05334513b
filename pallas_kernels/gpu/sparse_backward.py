"""The Mosaic GPU block-sparse backward kernels: dQ walks the forward lists, dK/dV the transposed ones.

Same pipelines as the dense backward (`backward.py`: one TMA producer warpgroup, consumer warpgroups of 64 rows,
a ring of `_MSTEPS` slots released on "consumed" barriers), driven by `sparse_schedule`'s lists instead of tile
ranges:
  * dQ: one CTA per (q head, layout q block = 2 x 64 rows, batch); each listed kv block is 1 or 2 sub-tiles of
    64 keys. FULL tiles (listed first) skip the mask math.
  * dK/dV: one CTA per (kv head, work item, batch). An item is a layout kv block (1 or 2 x 64 rows) and a range
    of its run: the concatenation, over the query heads of the GQA group, of each head's transposed list (the q
    blocks that list this kv block, built on device by `layout.transpose_block_lists`), each q block as 2
    sub-tiles of 64 queries, reduced over the group in the accumulators. A run longer than a chunk is split
    over several items (`sparse_schedule.dkv_items`), each writing fp32 partials that `merge_partials` sums:
    a hot kv column (a sink listed by every q block) no longer serialises on one SM. Unlisted and EMPTY tiles
    are never loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import sparse_schedule
from pallas_kernels.gpu.backward import _produce, backward_inputs, dkv_scratch, dq_scratch
from pallas_kernels.gpu.common import _LOG2E, _acc_mm, _element_mask, _params
from pallas_kernels.layout import BlockLayout, MaskSpec

_T = 64  # rows of every sub-tile (q and kv) in the backward kernels
_MSTEPS = 2


def _dq_call(lists, shp, q, k, v, do, lse2, delta, segment_ids, *, mask, scale, interpret):
  """dQ [B, T, Hq, D]."""
  fidx, fcnt, ffull = lists
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  cw = shp.block_q // _T  # 2 consumer warpgroups
  bq = bk = _T
  r = shp.block_kv // _T  # sub-tiles per listed kv block
  msteps = _MSTEPS
  has_seg = segment_ids is not None
  n_row_copies = 5 if has_seg else 4
  c = float(scale) * _LOG2E
  interp = bool(interpret)
  red1, red0 = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if has_seg:
      idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref = refs[:12]
    else:
      idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref = refs[:10]
      qs_ref = ks_ref = None
    smem, bars, consumed = refs[-3:]
    q_smem2, do_smem2, lse_smem2, dl_smem2, qs_smem2, k_smem, v_smem, ks_smem = smem
    row_bar, k_bar, v_bar, ks_bar = bars
    bi = lax.axis_index("batch")
    h = lax.axis_index("heads")
    qt = lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    kv_h = lax.div(h, jnp.int32(group))
    lb, lh = shp.rows(bi, h)
    n_entries = cnt_ref[lb, lh, qt]

    def kv_row(i):  # first key of step i (entry i // r, sub-tile i % r)
      return idx_ref[lb, lh, qt, lax.div(i, jnp.int32(r))] * shp.block_kv + lax.rem(i, jnp.int32(r)) * bk

    @pl.when(wg < cw)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q0 = qt * shp.block_q + wg * bq
      rbars = [row_bar.at[wg * n_row_copies + i] for i in range(n_row_copies)]
      rows = (bi, pl.ds(q0, bq), h)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, rbars[0])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, rbars[1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(q0, bq)], lse_smem2.at[wg], rbars[2])
      plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(q0, bq)], dl_smem2.at[wg], rbars[3])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qs_smem2.at[wg], rbars[4])
      n_full = jnp.int32(0) if has_seg else full_ref[lb, lh, qt]
      for rb in rbars:
        plgpu.barrier_wait(rb)
      lse2 = plgpu.load(lse_smem2.at[wg], layout=red1)
      delta = plgpu.load(dl_smem2.at[wg], layout=red1)
      q_seg = plgpu.load(qs_smem2.at[wg], layout=red1) if has_seg else None
      dq = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def sub_step(i, dq, masked: bool):
        slot = lax.rem(i, jnp.int32(msteps))
        plgpu.barrier_wait(k_bar.at[slot])

        def compute_s(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        sc = pl.run_scoped(compute_s, plgpu.ACC((bq, bk), jnp.float32))
        p = jnp.exp2(sc * c - lax.broadcast_in_dim(lse2, sc.shape, [0]))
        if masked:
          ri = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
          ci = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _element_mask(mask, False, ri + (mask.q_offset + q0), ci + (mask.kv_offset + kv_row(i)))
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
            kv_seg = plgpu.load(ks_smem.at[slot], layout=red0)
            ok = ok & (lax.broadcast_in_dim(q_seg, (bq, bk), [0]) == lax.broadcast_in_dim(kv_seg, (bq, bk), [1]))
          p = jnp.where(ok, p, 0.0)
        plgpu.barrier_wait(v_bar.at[slot])

        def compute_dp(acc_ref):
          plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        dp = pl.run_scoped(compute_dp, plgpu.ACC((bq, bk), jnp.float32))
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        dq = _acc_mm(dq, ds.astype(dtype), k_smem.at[slot], interp)
        plgpu.barrier_arrive(consumed.at[slot])
        return dq

      def entry(e, dq, masked: bool):
        for sub in range(r):
          dq = sub_step(e * r + sub, dq, masked)
        return dq

      dq = lax.fori_loop(0, n_full, functools.partial(entry, masked=False), dq)
      dq = lax.fori_loop(n_full, n_entries, functools.partial(entry, masked=True), dq)
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == cw)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):
        sl = (bi, pl.ds(kv_row(jnp.int32(i)), bk), kv_h)
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[bi, sl[1]], ks_smem.at[slot], ks_bar.at[slot])

      _produce(n_entries * r, msteps, issue, consumed)

  smem, bars, consumed = dq_scratch(dtype, cw=cw, bq=bq, bk=bk, d=d, msteps=msteps, has_seg=has_seg,
                                    n_row_copies=n_row_copies)
  args = (fidx, fcnt, ffull, q, k, v, do, lse2, delta) + (tuple(segment_ids) if has_seg else ())
  return plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct(q.shape, dtype),
    scratch_types=(smem, bars, consumed),
    grid=(hq, shp.n_q, b),
    grid_names=("heads", "q_seq", "batch"),
    num_threads=cw + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_params(interpret),
  )(*args)


def _dkv_call(lists, items, shp, q, k, v, do, lse2, delta, segment_ids, *, mask, scale, interpret):
  """(dK, dV) [B, S, Hkv, D] for unsplit kv blocks, (pK, pV) [B, Hkv, P, block_kv, D] fp32 partials."""
  tidx, tstart, tmid = lists
  n_items = items.shape[-1]
  n_slots = n_items - shp.n_k
  nbr, nhr = items.shape[:2]
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  cw = shp.block_kv // _T  # consumer warpgroups: one per 64 keys of the layout kv block
  bq = bk = _T
  rq = shp.block_q // _T  # sub-tiles per listed q block
  msteps = _MSTEPS
  has_seg = segment_ids is not None
  n_row_copies = 3 if has_seg else 2
  c = float(scale) * _LOG2E
  interp = bool(interpret)
  red1, red0 = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if has_seg:
      it_ref, tidx_ref, st_ref, mid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref = refs[:12]
    else:
      it_ref, tidx_ref, st_ref, mid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref = refs[:10]
      qs_ref = ks_ref = None
    dk_ref, dv_ref, pk_ref, pv_ref, smem, bars, consumed = refs[-7:]
    k_smem2, v_smem2, ks_smem2, q_smem, do_smem, lse_smem, dl_smem, qs_smem, stage2 = smem
    row_bar, q_bar, do_bar, lse_bar, dl_bar, qs_bar = bars
    bi = lax.axis_index("batch")
    kv_h = lax.axis_index("heads")
    item = lax.axis_index("item")
    wg = lax.axis_index("wg")
    rb_, rh_ = (bi if nbr > 1 else 0), (kv_h if nhr > 1 else 0)
    kt = it_ref[rb_, rh_, 0, item]  # this item's kv block
    lo, hi, slot = it_ref[rb_, rh_, 1, item], it_ref[rb_, rh_, 2, item], it_ref[rb_, rh_, 3, item]
    live = slot >= -1

    def run_of(g, off):
      """(layout batch, layout head, start, mid, end) of query head g's part of this item's range.

      off = entries of the heads before g in the group's concatenated run; the item covers [lo, hi) of it.
      """
      lb, lh = shp.rows(bi, kv_h * group + g)
      st, en = st_ref[lb, lh, kt], st_ref[lb, lh, kt + 1]
      n = en - st
      a = st + jnp.clip(lo - off, 0, n)
      e = st + jnp.clip(hi - off, 0, n)
      return lb, lh, a, jnp.clip(mid_ref[lb, lh, kt], a, e), e, off + n

    @pl.when(live & (wg < cw))
    def _consumer():
      if cw == 2:  # 2 * 232 + 40 registers per thread x 128 threads fits the 64K register file
        plgpu.set_max_registers(232, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k0 = kt * shp.block_kv + wg * bk
      rbars = [row_bar.at[wg * n_row_copies + i] for i in range(n_row_copies)]
      rows = (bi, pl.ds(k0, bk), kv_h)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, rbars[0])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, rbars[1])
      if has_seg:
        plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(k0, bk)], ks_smem2.at[wg], rbars[2])
      for rb in rbars:
        plgpu.barrier_wait(rb)
      kv_seg = plgpu.load(ks_smem2.at[wg], layout=red1) if has_seg else None
      zeros = plgpu.layout_cast(jnp.full((bk, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def sub_step(q_row, i, carry, masked: bool):
        dk, dv = carry
        slot = lax.rem(i, jnp.int32(msteps))
        plgpu.barrier_wait(q_bar.at[slot])

        def compute_st(acc_ref):
          plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        st = pl.run_scoped(compute_st, plgpu.ACC((bk, bq), jnp.float32))
        plgpu.barrier_wait(lse_bar.at[slot])
        lse2 = plgpu.load(lse_smem.at[slot], layout=red0)
        pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse2, st.shape, [1]))
        if masked:
          ri = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA)
          ci = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=plgpu.Layout.WGMMA)
          ok = _element_mask(mask, True, ri + (mask.kv_offset + k0), ci + (mask.q_offset + q_row))
          if has_seg:
            plgpu.barrier_wait(qs_bar.at[slot])
            q_seg = plgpu.load(qs_smem.at[slot], layout=red0)
            ok = ok & (lax.broadcast_in_dim(kv_seg, (bk, bq), [0]) == lax.broadcast_in_dim(q_seg, (bk, bq), [1]))
          pt = jnp.where(ok, pt, 0.0)
        elif has_seg:
          plgpu.barrier_wait(qs_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        plgpu.barrier_wait(dl_bar.at[slot])
        dv = _acc_mm(dv, pt.astype(dtype), do_smem.at[slot], interp)

        def compute_dpt(acc_ref):
          plgpu.wgmma(acc_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        dpt = pl.run_scoped(compute_dpt, plgpu.ACC((bk, bq), jnp.float32))
        dlt = plgpu.load(dl_smem.at[slot], layout=red0)
        dst = pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))
        dk = _acc_mm(dk, dst.astype(dtype), q_smem.at[slot], interp)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      def entry(lb, lh, e, carry, masked: bool):
        dk, dv, i = carry
        q_blk = tidx_ref[lb, lh, e] if masked else None
        for sub in range(rq):
          q_row = None if q_blk is None else q_blk * shp.block_q + sub * bq
          dk, dv = sub_step(q_row, i, (dk, dv), masked)
          i = i + 1
        return dk, dv, i

      def head(g, carry):
        dk, dv, i, off = carry
        lb, lh, st, mid, en, off = run_of(g, off)
        if has_seg:  # segment ids can mask inside any tile
          mid = st
        c3 = lax.fori_loop(st, mid, functools.partial(entry, lb, lh, masked=False), (dk, dv, i))
        return (*lax.fori_loop(mid, en, functools.partial(entry, lb, lh, masked=True), c3), off)

      dk, dv, _, _ = lax.fori_loop(0, group, head, (zeros, zeros, jnp.int32(0), jnp.int32(0)))

      @pl.when(slot < 0)
      def _whole():  # the item is the kv block's whole run: write dK / dV
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

      @pl.when(slot >= 0)
      def _part():  # one chunk of a split run: fp32 partials into its slot, summed by merge_partials
        stage = stage2.at[wg]
        prow = (bi, kv_h, slot, pl.ds(wg * bk, bk))
        stage[...] = dk * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, pk_ref.at[prow])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage[...] = dv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, pv_ref.at[prow])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(live & (wg == cw))
    def _producer():
      if cw == 2:
        plgpu.set_max_registers(40, action="decrease")

      def issue(h, q_row, slot):
        sl = (bi, pl.ds(q_row, bq), h)
        plgpu.copy_gmem_to_smem(q_ref.at[sl], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(q_row, bq)], lse_smem.at[slot], lse_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q_row, bq)], qs_smem.at[slot], qs_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[sl], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(q_row, bq)], dl_smem.at[slot], dl_bar.at[slot])

      def head(g, carry):
        i, off = carry
        lb, lh, st, _, en, off = run_of(g, off)
        h = kv_h * group + g

        def entry(e, i):
          q_blk = tidx_ref[lb, lh, e]
          for sub in range(rq):
            slot = lax.rem(i, jnp.int32(msteps))

            pl.when(i >= msteps)(functools.partial(plgpu.barrier_wait, consumed.at[slot]))

            issue(h, q_blk * shp.block_q + sub * bq, slot)
            i = i + 1
          return i

        return lax.fori_loop(st, en, entry, i), off

      n_steps, _ = lax.fori_loop(0, group, head, (jnp.int32(0), jnp.int32(0)))

      # Drain: observe the consumers' last releases (keeps every barrier phase accounted for).
      @pl.loop(jnp.maximum(n_steps - msteps, 0), n_steps)
      def _(i):
        plgpu.barrier_wait(consumed.at[lax.rem(i, jnp.int32(msteps))])

  smem, bars, consumed = dkv_scratch(
    dtype, cw=cw, bq=bq, bk=bk, d=d, msteps=msteps, has_seg=has_seg, n_row_copies=n_row_copies,
    extra_smem=(plgpu.SMEM((cw, bk, d), jnp.float32),),  # fp32 staging of a split item's partials
  )
  args = (items, tidx, tstart, tmid, q, k, v, do, lse2, delta) + (tuple(segment_ids) if has_seg else ())
  part = jax.ShapeDtypeStruct((b, hkv, n_slots, shp.block_kv, d), jnp.float32)
  return plgpu.kernel(
    kernel,
    out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(k.shape, dtype), part, part),
    scratch_types=(smem, bars, consumed),
    grid=(hkv, n_items, b),
    grid_names=("heads", "item", "batch"),
    num_threads=cw + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_params(interpret),
  )(*args)


def sparse_backward(
  q,
  k,
  v,
  segment_ids,
  layout: BlockLayout,
  out,
  lse,
  dout,
  *,
  mask: MaskSpec,
  scale: float,
  interpret=False,
  dlse=None,
  fwd_lists=None,
):
  """(dq [B, T, Hq, D], dk [B, S, Hkv, D], dv [B, S, Hkv, D]) in the input dtypes, over the listed tiles only.

  delta = rowsum(out * dout) (- dlse) in XLA, lse = -inf rows mapped to +inf in log2 units (P = 0 there), as in
  the dense `flash_backward`. fwd_lists: the forward's `sparse_schedule.forward_lists` of this (mask, layout)
  (`sparse_forward(..., return_lists=True)`; `ops` keeps them as custom_vjp residuals), else rebuilt here.
  """
  b, t, hq, d = q.shape
  s = k.shape[1]
  reason = sparse_schedule.layout_reason(layout, b, hq, t, s, d)
  if reason is not None:
    raise ValueError(f"pallas_kernels.gpu.sparse_backward: {reason}")
  shp = sparse_schedule.shape_of(layout, s)
  if fwd_lists is None:
    fwd_lists = sparse_schedule.forward_lists(mask, layout, shp)
  bwd_lists = sparse_schedule.backward_lists(fwd_lists, shp)
  delta, lse2 = backward_inputs(out, lse, dout, dlse)
  if segment_ids is not None:
    segment_ids = (segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32))
  dout = dout.astype(q.dtype)
  args = (q, k, v, dout, lse2, delta, segment_ids)
  kw = dict(mask=mask, scale=scale, interpret=interpret)
  dq = _dq_call(fwd_lists, shp, *args, **kw)
  items, slot_run, run_block = sparse_schedule.dkv_items(bwd_lists, shp, hq, k.shape[2])
  dk, dv, pk, pv = _dkv_call(bwd_lists, items, shp, *args, **kw)
  dk, dv = sparse_schedule.merge_partials(dk, dv, pk, pv, slot_run, run_block)
  return dq, dk, dv
