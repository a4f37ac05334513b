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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tile_schedule
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


# ------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------


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

      empty = l_i == 0.0
      inv = 1.0 / jnp.where(empty, 1.0, l_i)
      acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(empty, -jnp.inf, m_i * _LN2 + jnp.log(jnp.where(empty, 1.0, l_i)))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(q0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, h, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

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


# ------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------


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
  consumed = plgpu.Barrier(num_arrivals=cw, num_barriers=msteps)
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
  )
  bars = (
    plgpu.Barrier(num_barriers=cw * n_row_copies),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps),
    plgpu.Barrier(num_barriers=msteps) if has_seg else None,
  )
  consumed = plgpu.Barrier(num_arrivals=cw, num_barriers=msteps)
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
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf).astype(jnp.float32)
  if segment_ids is not None:
    segment_ids = (segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32))
  dout = dout.astype(q.dtype)
  kw = dict(mask=mask, scale=scale, cfg=cfg, interpret=interpret)
  dq = _dq_call(q, k, v, dout, lse2, delta, segment_ids, **kw)
  if cfg.split_dkv:
    dk = _dkv_call(q, k, v, dout, lse2, delta, segment_ids, parts=("dk",), **kw)["dk"]
    dv = _dkv_call(q, k, v, dout, lse2, delta, segment_ids, parts=("dv",), **kw)["dv"]
  else:
    r = _dkv_call(q, k, v, dout, lse2, delta, segment_ids, **kw)
    dk, dv = r["dk"], r["dv"]
  return dq, dk, dv


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
