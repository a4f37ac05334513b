"""The Mosaic GPU block-sparse forward kernel: out [B, T, Hq, D], lse [B, Hq, T], walking a BlockLayout's lists.

Same pipeline as the dense forward (`forward.py`: two consumer warpgroups of 64 rows ping-ponging on a schedule
barrier, one TMA producer warpgroup, a ring of K/V slots), but one CTA is one layout q block (128 rows) and it
visits exactly the kv blocks its list names (`sparse_schedule.forward_lists`: deduplicated, mask-EMPTY tiles
dropped, FULL tiles first). The producer reads each index from GMEM and TMAs that tile; the consumers run the
FULL tiles without mask math and the PARTIAL ones with `MaskSpec.allowed` (+ segment ids). Unlisted and EMPTY
tiles cost nothing: no load, no step. Both warpgroups walk the same list, so the ping-pong needs no skip steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import sparse_schedule
from pallas_kernels.gpu.common import _LOG2E, _acc_mm, _element_mask, _params, _tiling
from pallas_kernels.gpu.forward import write_out_lse
from pallas_kernels.layout import BlockLayout, MaskSpec

_BQ = sparse_schedule.SPARSE_BLOCK_Q // 2  # rows per consumer warpgroup
_SMEM_LIMIT = 227 * 1024  # H100 / H200 opt-in shared memory per block


def _ring_slots(bk: int, d: int, itemsize: int, has_seg: bool) -> int:
  """K/V ring depth: 3 where it fits shared memory, else 2.

  A listed tile at low density often comes from HBM (few concurrent CTAs share it in L2); a 3-slot ring keeps
  two loads in flight ahead of the consumers instead of one. Bytes as Mosaic allocates them (each buffer
  aligned to 1 KiB; no reduction scratch: see `reduction_scratch_bytes` below); at hd128 / block_kv 128 without
  segment ids: 32 KiB Q + 3 x 64 KiB K/V + 1 KiB lse = 225 KiB.
  """

  def al(n):
    return -(-n // 1024) * 1024

  for slots in (3, 2):
    need = al(2 * _BQ * d * itemsize) + 2 * slots * al(bk * d * itemsize) + al(2 * _BQ * 4) + 256
    if has_seg:
      need += al(2 * _BQ * 4) + al(slots * bk * 4)
    if need <= _SMEM_LIMIT:
      return slots
  return 2


def sparse_forward(q, k, v, segment_ids, layout: BlockLayout, *, mask: MaskSpec, scale: float, interpret=False,
                   return_lists: bool = False):
  """out [B, T, Hq, D] (q.dtype), lse [B, Hq, T] float32 (natural log; -inf for rows that see nothing).

  return_lists: also return the forward lists it built ((out, lse), lists), for `sparse_backward(fwd_lists=)`:
  the backward then does not build them again.
  """
  b, t, hq, d = q.shape
  _, s, hkv, _ = k.shape
  reason = sparse_schedule.layout_reason(layout, b, hq, t, s, d)
  if reason is not None:
    raise ValueError(f"pallas_kernels.gpu.sparse_forward: {reason}")
  shp = sparse_schedule.shape_of(layout, s)
  lists = sparse_schedule.forward_lists(mask, layout, shp)
  res = forward_call(lists, shp, q, k, v, segment_ids, mask=mask, scale=scale, interpret=interpret)
  return (res, lists) if return_lists else res


def forward_call(lists, shp: sparse_schedule.SparseShape, q, k, v, segment_ids, *, mask: MaskSpec, scale: float,
                 interpret=False):
  """The forward kernel alone on lists already built by `sparse_schedule.forward_lists` (what `sparse_forward`
  does after building them; `vidlm.bench.sparse_breakdown` times the two apart). Shapes are not re-checked."""
  fidx, fcnt, ffull = lists
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  bq, bk = _BQ, shp.block_kv
  has_seg = segment_ids is not None
  msteps = _ring_slots(bk, d, jnp.dtype(dtype).itemsize, has_seg)
  c = float(scale) * _LOG2E
  interp = bool(interpret)

  def kernel(*refs):
    if has_seg:
      idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, out_ref, lse_ref, smem, bars, consumed, sched = (
        refs
      )
    else:
      idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, smem, bars, consumed, sched = refs
      qs_ref = ks_ref = None
    qo_smem2, k_smem, v_smem, lse_smem2, qs_smem2, ks_smem = smem
    k_bar, v_bar, q_bar, qs_bar, ks_bar = bars
    k_cons, v_cons = consumed
    bi = lax.axis_index("batch")
    h = lax.axis_index("heads")
    qt = lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    kv_h = lax.div(h, jnp.int32(group))
    lb, lh = shp.rows(bi, h)
    n_steps = cnt_ref[lb, lh, qt]
    cta_q0 = qt * (2 * bq)

    def tile(i):
      return idx_ref[lb, lh, qt, i]

    def slot_of(i):
      return lax.rem(i, jnp.int32(msteps))

    def sched_sync():
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
      n_full = jnp.int32(0) if has_seg else full_ref[lb, lh, qt]  # segment ids can mask inside any tile
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

      def wait_next_k(i):
        @pl.when(i + 1 < n_steps)
        def _():
          plgpu.barrier_wait(k_bar.at[slot_of(i + 1)])

      def step(i, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = slot_of(i)

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          sched_sync()
          return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), jnp.float32))
        if masked:
          rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _element_mask(mask, False, rows + (mask.q_offset + q0), cols + (mask.kv_offset + tile(i) * bk))
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
            kv_seg = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            ok = ok & (lax.broadcast_in_dim(q_seg, (bq, bk), [0]) == lax.broadcast_in_dim(kv_seg, (bq, bk), [1]))
          qk = jnp.where(ok, qk, -jnp.inf)
        plgpu.barrier_arrive(k_cons.at[slot])

        m_ij = jnp.maximum(m_i, qk.max(axis=1) * c)
        # a row with nothing visible so far keeps m = -inf: subtract 0 instead (p = 0, no NaN)
        m_use = jnp.where(m_ij == -jnp.inf, 0.0, m_ij) if masked else m_ij
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_use, qk.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha
        p16 = p.astype(dtype)
        l_i = l_i + p.sum(axis=1)
        acc, l_i, m_ij, p16 = lax.optimization_barrier((acc, l_i, m_ij, p16))
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)
        acc = _acc_mm(acc, p16, v_smem.at[slot], interp, after=lambda: wait_next_k(i))
        plgpu.barrier_arrive(v_cons.at[slot])
        return acc, m_ij, l_i

      carry = (acc, m_i, l_i)
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
      acc, m_i, l_i = carry
      pl.when(wg == 0)(sched_sync)

      write_out_lse(acc, m_i, l_i, qo_smem, lse_smem, out_ref.at[bi, pl.ds(q0, bq), h],
                    lse_ref.at[bi, h, pl.ds(q0, bq)], dtype)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def issue_k(i, slot):
        j = tile(i)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(j * bk, bk), kv_h], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(j * bk, bk)], ks_smem.at[slot], ks_bar.at[slot])

      def issue_v(i, slot):
        plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(tile(i) * bk, bk), kv_h], v_smem.at[slot], v_bar.at[slot])

      for i in range(msteps):

        def first(i=i):
          issue_k(jnp.int32(i), i)
          issue_v(jnp.int32(i), i)

        pl.when(i < n_steps)(first)

      @pl.loop(msteps, jnp.maximum(n_steps, msteps))
      def _(i):
        slot = slot_of(i)
        plgpu.barrier_wait(k_cons.at[slot])
        issue_k(i, slot)
        plgpu.barrier_wait(v_cons.at[slot])
        issue_v(i, slot)

      # Drain: observe the consumers' last releases (keeps every barrier phase accounted for).
      @pl.loop(jnp.maximum(n_steps - msteps, 0), n_steps)
      def _(i):
        plgpu.barrier_wait(k_cons.at[slot_of(i)])
        plgpu.barrier_wait(v_cons.at[slot_of(i)])

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
  seg = (segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32)) if has_seg else ()
  out, lse = plgpu.kernel(
    kernel,
    out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
    scratch_types=(smem, bars, consumed, sched),
    grid=(hq, shp.n_q, b),
    grid_names=("heads", "q_seq", "batch"),
    num_threads=3,
    thread_name="wg",
    # the row max / sum of a WGMMA-layout tile stay inside a warp: no cross-warp reduction scratch is needed,
    # and its default 2 KiB would not leave room for the third ring slot
    compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    interpret=_params(interpret),
  )(fidx, fcnt, ffull, q, k, v, *seg)
  return out, lse
