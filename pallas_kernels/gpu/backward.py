"""The Mosaic GPU flash-attention backward kernels: dQ, and dK/dV from the same recomputed P (design: `flash.py`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tile_schedule
from pallas_kernels.gpu.common import (
  _LOG2E,
  _acc_mm,
  _check,
  _element_mask,
  _params,
  _resolve_config,
  _tiling,
)
from pallas_kernels.layout import MaskSpec


def _produce(n_steps, msteps: int, issue, consumed):
  """Producer warpgroup loop: fill the ring, then refill each slot once both consumers released it."""
  for i in range(msteps):
    pl.when(i < n_steps)(functools.partial(issue, i, i))

  @pl.loop(0, jnp.maximum(n_steps - msteps, 0))
  def _(i):
    slot = lax.rem(i, jnp.int32(msteps))
    plgpu.barrier_wait(consumed.at[slot])
    issue(i + msteps, slot)

  @pl.loop(jnp.maximum(n_steps - msteps, 0), n_steps)
  def _(i):
    plgpu.barrier_wait(consumed.at[lax.rem(i, jnp.int32(msteps))])


def dq_scratch(dtype, *, cw, bq, bk, d, msteps, has_seg, n_row_copies):
  """Scratch of a dQ kernel (dense or block-sparse): per consumer its q / dO rows, lse, delta (+ q segment ids),
  an `msteps`-slot K / V ring (+ kv segment ids), their barriers and the ring's "consumed" barrier."""
  tiling = _tiling(dtype)
  smem = (
    plgpu.SMEM((cw, bq, d), dtype, transforms=tiling),
    plgpu.SMEM((cw, bq, d), dtype, transforms=tiling),
    plgpu.SMEM((cw, bq), jnp.float32),
    plgpu.SMEM((cw, bq), jnp.float32),
    plgpu.SMEM((cw, bq), jnp.int32) if has_seg else None,
    plgpu.SMEM((msteps, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bk), jnp.int32) if has_seg else None,
  )
  bars = (
    plgpu.Barrier(num_barriers=cw * n_row_copies),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps) if has_seg else None,
  )
  return smem, bars, plgpu.Barrier(num_arrivals=cw, num_barriers=msteps)


def dkv_scratch(dtype, *, cw, bq, bk, d, msteps, has_seg, n_row_copies, extra_smem=()):
  """Scratch of a dK/dV kernel (dense or block-sparse): per consumer its K / V rows (+ kv segment ids), an
  `msteps`-slot ring of q / dO / lse / delta (+ q segment ids), their barriers and the ring's "consumed" barrier.
  `extra_smem` is appended to the SMEM tuple (the sparse kernel's fp32 staging of split partials)."""
  tiling = _tiling(dtype)
  smem = (
    plgpu.SMEM((cw, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((cw, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((cw, bk), jnp.int32) if has_seg else None,
    plgpu.SMEM((msteps, bq, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bq, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bq), jnp.float32),
    plgpu.SMEM((msteps, bq), jnp.float32),
    plgpu.SMEM((msteps, bq), jnp.int32) if has_seg else None,
    *extra_smem,
  )
  bars = (
    plgpu.Barrier(num_barriers=cw * n_row_copies),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps) if has_seg else None,
  )
  return smem, bars, plgpu.Barrier(num_arrivals=cw, num_barriers=msteps)


def _dq_call(q, k, v, do, lse2, delta, segment_ids, *, mask, scale, cfg, interpret):
  """dQ [B, T, Hq, D]: one CTA per (head, cw*block_q rows, batch); the producer streams K/V tiles."""
  b, t, hq, d = q.shape
  _, s, hkv, _ = k.shape
  group = hq // hkv
  dtype = q.dtype
  cw = cfg.compute_wgs_bwd
  bq, bk = cfg.block_q_dq, cfg.block_kv_dq
  nk = s // bk
  n_qc = t // (cw * bq)
  msteps = max(2, min(cfg.max_concurrent_steps, nk))
  has_seg = segment_ids is not None
  n_row_copies = 5 if has_seg else 4
  c = float(scale) * _LOG2E
  interp = bool(interpret)
  red1 = plgpu.Layout.WGMMA.reduce(1)
  red0 = plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if has_seg:
      q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, smem, bars, consumed = refs
    else:
      q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, smem, bars, consumed = refs
      qs_ref = ks_ref = None
    q_smem2, do_smem2, lse_smem2, dl_smem2, qs_smem2, k_smem, v_smem, ks_smem = smem
    row_bar, k_bar, v_bar, ks_bar = bars
    bi = lax.axis_index("batch")
    h = lax.axis_index("heads")
    qt = n_qc - 1 - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    kv_h = lax.div(h, jnp.int32(group))
    cta_q0 = qt * (cw * bq)
    u_lo, _, _, u_hi = tile_schedule.tile_bounds(
      mask, False, mask.q_offset + cta_q0, mask.q_offset + cta_q0 + cw * bq - 1, mask.kv_offset, bk, nk
    )
    n_steps = u_hi - u_lo

    @pl.when(wg < cw)
    def _consumer():
      if cw == 2:  # 2 * 232 + 40 registers per thread x 128 threads fits the 64K register file
        plgpu.set_max_registers(232, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q0 = cta_q0 + wg * bq
      rbars = [row_bar.at[wg * n_row_copies + i] for i in range(n_row_copies)]
      rows = (bi, pl.ds(q0, bq), h)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, rbars[0])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, rbars[1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(q0, bq)], lse_smem2.at[wg], rbars[2])
      plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(q0, bq)], dl_smem2.at[wg], rbars[3])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qs_smem2.at[wg], rbars[4])
      lo, flo, fhi, hi = tile_schedule.tile_bounds(
        mask, False, mask.q_offset + q0, mask.q_offset + q0 + bq - 1, mask.kv_offset, bk, nk
      )
      if has_seg:
        flo = fhi = hi
      lo, flo, fhi, hi = tile_schedule.nest((lo, flo, fhi, hi), (u_lo, u_hi))
      for rb in rbars:
        plgpu.barrier_wait(rb)
      lse2 = plgpu.load(lse_smem2.at[wg], layout=red1)
      delta = plgpu.load(dl_smem2.at[wg], layout=red1)
      q_seg = plgpu.load(qs_smem2.at[wg], layout=red1) if has_seg else None
      dq = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def slot_of(j):
        return lax.rem(j - u_lo, jnp.int32(msteps))

      def skip_step(j, carry):
        slot = slot_of(j)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        if has_seg:
          plgpu.barrier_wait(ks_bar.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

      def step(j, dq, masked: bool):
        slot = slot_of(j)
        plgpu.barrier_wait(k_bar.at[slot])

        def compute_s(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        sc = pl.run_scoped(compute_s, plgpu.ACC((bq, bk), jnp.float32))
        p = jnp.exp2(sc * c - lax.broadcast_in_dim(lse2, sc.shape, [0]))
        if masked:
          ri = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
          ci = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _element_mask(mask, False, ri + (mask.q_offset + q0), ci + (mask.kv_offset + j * bk))
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

      lax.fori_loop(u_lo, lo, skip_step, None)
      dq = lax.fori_loop(lo, flo, functools.partial(step, masked=True), dq)
      dq = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), dq)
      lax.fori_loop(hi, u_hi, skip_step, None)

      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == cw)
    def _producer():
      if cw == 2:
        plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):
        j = u_lo + i
        sl = (bi, pl.ds(j * bk, bk), kv_h)
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(j * bk, bk)], ks_smem.at[slot], ks_bar.at[slot])

      _produce(n_steps, msteps, issue, consumed)

  smem, bars, consumed = dq_scratch(dtype, cw=cw, bq=bq, bk=bk, d=d, msteps=msteps, has_seg=has_seg,
                                    n_row_copies=n_row_copies)
  args = (q, k, v, do, lse2, delta) + (tuple(segment_ids) if has_seg else ())
  return plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct(q.shape, dtype),
    scratch_types=(smem, bars, consumed),
    grid=(hq, n_qc, b),
    grid_names=("heads", "q_seq", "batch"),
    num_threads=cw + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_params(interpret),
  )(*args)


def _dkv_call(q, k, v, do, lse2, delta, segment_ids, *, mask, scale, cfg, interpret, parts=("dk", "dv")):
  """dK, dV [B, S, Hkv, D]: one CTA per (kv head, cw*block_kv rows, batch).

  The producer streams (Q, dO, lse, delta) tiles of every query head of the GQA group, so the group sum
  happens in the accumulators. `parts` selects dK and/or dV (hd256 runs two passes to fit registers).
  """
  b, t, hq, d = q.shape
  _, s, hkv, _ = k.shape
  group = hq // hkv
  dtype = q.dtype
  cw = cfg.compute_wgs_bwd
  bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
  nq = t // bq
  n_kc = s // (cw * bk)
  msteps = max(2, min(cfg.max_concurrent_steps, nq))
  has_seg = segment_ids is not None
  want_dk, want_dv = "dk" in parts, "dv" in parts
  n_row_copies = 3 if has_seg else 2
  c = float(scale) * _LOG2E
  interp = bool(interpret)
  red1 = plgpu.Layout.WGMMA.reduce(1)
  red0 = plgpu.Layout.WGMMA.reduce(0)
  tmask_kv_off, tmask_q_off = mask.kv_offset, mask.q_offset

  def kernel(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref = refs[:6]
    del refs[:6]
    qs_ref = ks_ref = None
    if has_seg:
      qs_ref, ks_ref = refs[:2]
      del refs[:2]
    outs = refs[: len(parts)]
    smem, bars, consumed = refs[len(parts) :]
    dk_ref = outs[0] if want_dk else None
    dv_ref = outs[-1] if want_dv else None
    k_smem2, v_smem2, ks_smem2, q_smem, do_smem, lse_smem, dl_smem, qs_smem = smem
    row_bar, q_bar, do_bar, lse_bar, dl_bar, qs_bar = bars
    bi = lax.axis_index("batch")
    kv_h = lax.axis_index("heads")
    kt = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    cta_k0 = kt * (cw * bk)
    u_lo, _, _, u_hi = tile_schedule.tile_bounds(
      mask, True, tmask_kv_off + cta_k0, tmask_kv_off + cta_k0 + cw * bk - 1, tmask_q_off, bq, nq
    )
    n_t = u_hi - u_lo  # q tiles per head
    n_steps = group * n_t

    @pl.when(wg < cw)
    def _consumer():
      if cw == 2:  # 2 * 232 + 40 registers per thread x 128 threads fits the 64K register file
        plgpu.set_max_registers(232, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k0 = cta_k0 + wg * bk
      rbars = [row_bar.at[wg * n_row_copies + i] for i in range(n_row_copies)]
      rows = (bi, pl.ds(k0, bk), kv_h)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, rbars[0])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, rbars[1])
      if has_seg:
        plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(k0, bk)], ks_smem2.at[wg], rbars[2])
      lo, flo, fhi, hi = tile_schedule.tile_bounds(
        mask, True, tmask_kv_off + k0, tmask_kv_off + k0 + bk - 1, tmask_q_off, bq, nq
      )
      if has_seg:
        flo = fhi = hi
      lo, flo, fhi, hi = tile_schedule.nest((lo, flo, fhi, hi), (u_lo, u_hi))
      for rb in rbars:
        plgpu.barrier_wait(rb)
      kv_seg = plgpu.load(ks_smem2.at[wg], layout=red1) if has_seg else None
      zeros = plgpu.layout_cast(jnp.full((bk, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
      carry0 = (zeros if want_dk else None, zeros if want_dv else None)

      def slot_of(g, j):
        return lax.rem(g * n_t + (j - u_lo), jnp.int32(msteps))

      def skip_step(g, j, carry):
        slot = slot_of(g, j)
        for bar in (q_bar, do_bar, lse_bar, dl_bar) + ((qs_bar,) if has_seg else ()):
          plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

      def step(g, j, carry, masked: bool):
        dk, dv = carry
        slot = slot_of(g, j)
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
          ok = _element_mask(mask, True, ri + (tmask_kv_off + k0), ci + (tmask_q_off + j * bq))
          if has_seg:
            plgpu.barrier_wait(qs_bar.at[slot])
            q_seg = plgpu.load(qs_smem.at[slot], layout=red0)
            ok = ok & (lax.broadcast_in_dim(kv_seg, (bk, bq), [0]) == lax.broadcast_in_dim(q_seg, (bk, bq), [1]))
          pt = jnp.where(ok, pt, 0.0)
        elif has_seg:
          plgpu.barrier_wait(qs_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        plgpu.barrier_wait(dl_bar.at[slot])
        if want_dv:
          dv = _acc_mm(dv, pt.astype(dtype), do_smem.at[slot], interp)
        if want_dk:

          def compute_dpt(acc_ref):
            plgpu.wgmma(acc_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

          dpt = pl.run_scoped(compute_dpt, plgpu.ACC((bk, bq), jnp.float32))
          delta = plgpu.load(dl_smem.at[slot], layout=red0)
          dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
          dk = _acc_mm(dk, dst.astype(dtype), q_smem.at[slot], interp)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      def head_loop(g, carry):
        lax.fori_loop(u_lo, lo, functools.partial(skip_step, g), None)
        carry = lax.fori_loop(lo, flo, functools.partial(step, g, masked=True), carry)
        carry = lax.fori_loop(flo, fhi, functools.partial(step, g, masked=False), carry)
        carry = lax.fori_loop(fhi, hi, functools.partial(step, g, masked=True), carry)
        lax.fori_loop(hi, u_hi, functools.partial(skip_step, g), None)
        return carry

      dk, dv = lax.fori_loop(0, group, head_loop, carry0)
      if want_dk:
        k_smem[...] = (dk * scale).astype(dtype)
      if want_dv:
        v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      if want_dk:
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
      if want_dv:
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == cw)
    def _producer():
      if cw == 2:
        plgpu.set_max_registers(40, action="decrease")

      def issue(i, slot):
        g = lax.div(i, n_t)
        j = u_lo + lax.rem(i, n_t)
        h = kv_h * group + g
        sl = (bi, pl.ds(j * bq, bq), h)
        plgpu.copy_gmem_to_smem(q_ref.at[sl], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(j * bq, bq)], lse_smem.at[slot], lse_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(j * bq, bq)], qs_smem.at[slot], qs_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[sl], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(j * bq, bq)], dl_smem.at[slot], dl_bar.at[slot])

      _produce(n_steps, msteps, issue, consumed)

  smem, bars, consumed = dkv_scratch(dtype, cw=cw, bq=bq, bk=bk, d=d, msteps=msteps, has_seg=has_seg,
                                     n_row_copies=n_row_copies)
  args = (q, k, v, do, lse2, delta) + (tuple(segment_ids) if has_seg else ())
  out_type = tuple(jax.ShapeDtypeStruct(k.shape, dtype) for _ in parts)
  outs = plgpu.kernel(
    kernel,
    out_type=out_type,
    scratch_types=(smem, bars, consumed),
    grid=(hkv, n_kc, b),
    grid_names=("heads", "kv_seq", "batch"),
    num_threads=cw + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_params(interpret),
  )(*args)
  return dict(zip(parts, outs, strict=True))


def flash_backward(
  q, k, v, segment_ids, out, lse, dout, *, mask: MaskSpec, scale: float, interpret=False, config=None, dlse=None
):
  """(dq [B, T, Hq, D], dk [B, S, Hkv, D], dv [B, S, Hkv, D]) in the input dtypes.

  delta = rowsum(out * dout) is computed in XLA (one cheap pass). lse = -inf rows (nothing visible) are
  mapped to +inf in log2 units so that P = exp2(s - lse) is exactly 0 there.
  dlse [B, Hq, T] (optional): cotangent of the returned lse (ring attention merges hops with it). Since
  d lse / d s = P, it only shifts delta: dS = P * (dP - (delta - dlse)); the kernels are unchanged.
  """
  b, t, hq, d = q.shape
  cfg = _resolve_config(config, d)
  _check(q, k, v, segment_ids, mask, cfg)
  delta, lse2 = backward_inputs(out, lse, dout, dlse)
  if segment_ids is not None:
    segment_ids = (segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32))
  dout = dout.astype(q.dtype)
  kw = dict(mask=mask, scale=scale, cfg=cfg, interpret=interpret)
  dq = _dq_call(q, k, v, dout, lse2, delta, segment_ids, **kw)
  dk, dv = dkv_grads(q, k, v, dout, lse2, delta, segment_ids, **kw)
  return dq, dk, dv


def backward_inputs(out, lse, dout, dlse=None):
  """(delta [B, Hq, T], lse2 [B, Hq, T]) float32, the XLA pass before the dense and block-sparse backward kernels.

  delta = rowsum(out * dout) (- dlse where lse is finite); lse2 = lse in log2 units, -inf rows mapped to +inf so
  that P = exp2(s - lse2) is exactly 0 there. A function of its own so that `vidlm.bench.sparse_breakdown` can
  time it apart from the kernels.
  """
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf).astype(jnp.float32)
  return delta, lse2


def dkv_grads(q, k, v, do, lse2, delta, segment_ids, *, mask, scale, cfg, interpret):
  """(dk, dv) [B, S, Hkv, D] of the dense backward: one dK/dV kernel, or one per output when cfg.split_dkv."""
  kw = dict(mask=mask, scale=scale, cfg=cfg, interpret=interpret)
  if cfg.split_dkv:
    dk = _dkv_call(q, k, v, do, lse2, delta, segment_ids, parts=("dk",), **kw)["dk"]
    dv = _dkv_call(q, k, v, do, lse2, delta, segment_ids, parts=("dv",), **kw)["dv"]
    return dk, dv
  r = _dkv_call(q, k, v, do, lse2, delta, segment_ids, **kw)
  return r["dk"], r["dv"]
