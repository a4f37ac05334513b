"""The Mosaic GPU flash-attention forward kernel: out [B, T, Hq, D] and lse [B, Hq, T] (design: `flash.py`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tile_schedule
from pallas_kernels.gpu.common import (
  _LN2,
  _LOG2E,
  _acc_mm,
  _check,
  _element_mask,
  _params,
  _resolve_config,
  _tiling,
)
from pallas_kernels.layout import MaskSpec


def write_out_lse(acc, m_i, l_i, qo_smem, lse_smem, out_gmem, lse_gmem, dtype):
  """Forward epilogue (dense and block-sparse kernels): normalise the fp32 accumulator by the row sums, write the
  output rows and their lse (base e; -inf and zeros for a row that saw no key) through SMEM to GMEM."""
  empty = l_i == 0.0
  inv = 1.0 / jnp.where(empty, 1.0, l_i)
  acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
  qo_smem[...] = acc.astype(dtype)
  lse_smem[...] = jnp.where(empty, -jnp.inf, m_i * _LN2 + jnp.log(jnp.where(empty, 1.0, l_i)))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qo_smem, out_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
  plgpu.wait_smem_to_gmem(0)


def flash_forward(q, k, v, segment_ids, *, mask: MaskSpec, scale: float, interpret=False, config=None):
  """out [B, T, Hq, D] (q.dtype), lse [B, Hq, T] float32 (natural log; -inf for fully masked rows)."""
  b, t, hq, d = q.shape
  _, s, hkv, _ = k.shape
  cfg = _resolve_config(config, d)
  _check(q, k, v, segment_ids, mask, cfg)
  group = hq // hkv
  dtype = q.dtype
  bq, bk = cfg.block_q, cfg.block_kv
  nk = s // bk
  n_q2 = t // (2 * bq)
  msteps = max(2, min(cfg.max_concurrent_steps, nk))
  has_seg = segment_ids is not None
  use_sched = cfg.use_schedule_barrier
  c = float(scale) * _LOG2E  # logits in log2 units: exp2(qk*c - m) is one FMA + exp2
  interp = bool(interpret)

  def kernel(*refs):
    if has_seg:
      q_ref, k_ref, v_ref, qs_ref, ks_ref, out_ref, lse_ref, smem, bars, consumed, sched = refs
    else:
      q_ref, k_ref, v_ref, out_ref, lse_ref, smem, bars, consumed, sched = refs
      qs_ref = ks_ref = None
    qo_smem2, k_smem, v_smem, lse_smem2, qs_smem2, ks_smem = smem
    k_bar, v_bar, q_bar, qs_bar, ks_bar = bars
    k_cons, v_cons = consumed
    bi = lax.axis_index("batch")
    h = lax.axis_index("heads")
    # causal-like masks: heavy (late) q tiles first for a better tail
    qt = n_q2 - 1 - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    kv_h = lax.div(h, jnp.int32(group))
    cta_q0 = qt * (2 * bq)
    # CTA-wide visible range: the producer loads exactly these tiles
    u_lo, _, _, u_hi = tile_schedule.tile_bounds(
      mask, False, mask.q_offset + cta_q0, mask.q_offset + cta_q0 + 2 * bq - 1, mask.kv_offset, bk, nk
    )
    n_steps = u_hi - u_lo

    def sched_sync():
      if use_sched:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      q0 = cta_q0 + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), h], qo_smem, q_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qs_smem2.at[wg], qs_bar.at[wg])
      lo, flo, fhi, hi = tile_schedule.tile_bounds(
        mask, False, mask.q_offset + q0, mask.q_offset + q0 + bq - 1, mask.kv_offset, bk, nk
      )
      if has_seg:  # segment ids can mask inside any tile
        flo = fhi = hi
      lo, flo, fhi, hi = tile_schedule.nest((lo, flo, fhi, hi), (u_lo, u_hi))
      plgpu.barrier_wait(q_bar.at[wg])
      q_seg = None
      if has_seg:
        plgpu.barrier_wait(qs_bar.at[wg])
        q_seg = plgpu.load(qs_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(n_steps > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(sched_sync)

      def slot_of(j):
        return lax.rem(j - u_lo, jnp.int32(msteps))

      def wait_next_k(j):
        nxt = j + 1

        @pl.when(nxt < u_hi)
        def _():
          plgpu.barrier_wait(k_bar.at[slot_of(nxt)])

      def skip_step(j, carry):
        # Tile visible to the other warpgroup only: keep barrier phases and the ping-pong in step.
        slot = slot_of(j)
        sched_sync()
        plgpu.barrier_arrive(k_cons.at[slot])
        if has_seg:
          plgpu.barrier_wait(ks_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        sched_sync()
        wait_next_k(j)
        plgpu.barrier_arrive(v_cons.at[slot])
        return carry

      def step(j, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = slot_of(j)

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          sched_sync()
          return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), jnp.float32))
        if masked:
          rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _element_mask(mask, False, rows + (mask.q_offset + q0), cols + (mask.kv_offset + j * bk))
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
            kv_seg = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            ok = ok & (lax.broadcast_in_dim(q_seg, (bq, bk), [0]) == lax.broadcast_in_dim(kv_seg, (bq, bk), [1]))
          qk = jnp.where(ok, qk, -jnp.inf)
        plgpu.barrier_arrive(k_cons.at[slot])

        m_ij = jnp.maximum(m_i, qk.max(axis=1) * c)
        if masked:  # a row with nothing visible so far keeps m = -inf: subtract 0 instead (p = 0, no NaN)
          m_use = jnp.where(m_ij == -jnp.inf, 0.0, m_ij)
        else:
          m_use = m_ij
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_use, qk.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha
        p16 = p.astype(dtype)

        def end_softmax_barriers():
          if use_sched:
            plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_bar.at[slot])
          if use_sched:
            plgpu.barrier_wait(sched)

        if d <= 128:
          l_i = l_i + p.sum(axis=1)
          acc, l_i, m_ij, p16 = lax.optimization_barrier((acc, l_i, m_ij, p16))
          end_softmax_barriers()
        else:
          end_softmax_barriers()
          l_i = l_i + p.sum(axis=1)

        acc = _acc_mm(acc, p16, v_smem.at[slot], interp, after=lambda: wait_next_k(j))
        plgpu.barrier_arrive(v_cons.at[slot])
        return acc, m_ij, l_i

      carry = (acc, m_i, l_i)
      lax.fori_loop(u_lo, lo, skip_step, None)
      carry = lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
      carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)
      lax.fori_loop(hi, u_hi, skip_step, None)
      acc, m_i, l_i = carry
      pl.when(wg == 0)(sched_sync)

      write_out_lse(acc, m_i, l_i, qo_smem, lse_smem, out_ref.at[bi, pl.ds(q0, bq), h],
                    lse_ref.at[bi, h, pl.ds(q0, bq)], dtype)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def issue(j, slot):
        sl = (bi, pl.ds(j * bk, bk), kv_h)
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(j * bk, bk)], ks_smem.at[slot], ks_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

      for i in range(msteps):
        pl.when(i < n_steps)(functools.partial(issue, u_lo + i, i))

      @pl.loop(0, jnp.maximum(n_steps - msteps, 0))
      def _(i):
        slot = lax.rem(i, jnp.int32(msteps))
        j = u_lo + i + msteps
        sl = (bi, pl.ds(j * bk, bk), kv_h)
        plgpu.barrier_wait(k_cons.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(j * bk, bk)], ks_smem.at[slot], ks_bar.at[slot])
        plgpu.barrier_wait(v_cons.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

      # Drain: observe the consumers' last releases (keeps every barrier phase accounted for).
      @pl.loop(jnp.maximum(n_steps - msteps, 0), n_steps)
      def _(i):
        slot = lax.rem(i, jnp.int32(msteps))
        plgpu.barrier_wait(k_cons.at[slot])
        plgpu.barrier_wait(v_cons.at[slot])

  tiling = _tiling(dtype)
  smem = (
    plgpu.SMEM((2, bq, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((msteps, bk, d), dtype, transforms=tiling),
    plgpu.SMEM((2, bq), jnp.float32),
    plgpu.SMEM((2, bq), jnp.int32) if has_seg else None,
    plgpu.SMEM((msteps, bk), jnp.int32) if has_seg else None,
  )
  bars = (
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=2),
    plgpu.Barrier(num_barriers=2) if has_seg else None,
    plgpu.Barrier(num_barriers=msteps) if has_seg else None,
  )
  consumed = (plgpu.Barrier(num_arrivals=2, num_barriers=msteps),) * 2
  sched = plgpu.Barrier(num_arrivals=2)
  args = (q, k, v) + ((segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32)) if has_seg else ())
  out, lse = plgpu.kernel(
    kernel,
    out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
    scratch_types=(smem, bars, consumed, sched),
    grid=(hq, n_q2, b),
    grid_names=("heads", "q_seq", "batch"),
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_params(interpret),
  )(*args)
  return out, lse
