"""Flash attention for Hopper written in Pallas Mosaic GPU (`plgpu.kernel`): forward, dQ and dK/dV kernels.

Design (FlashAttention-3 style, arXiv 2407.08608):
  * Each CTA runs `compute_wgs` consumer warpgroups plus one producer warpgroup. The producer only issues TMA
    copies (GMEM -> SMEM) into a ring of `max_concurrent_steps` slots, waiting on "consumed" barriers before it
    reuses a slot; consumers wait on "loaded" barriers, run wgmma from SMEM, and arrive on "consumed".
  * The forward ping-pongs its two consumer warpgroups on a schedule barrier so that one's softmax (exp) runs
    while the other's GEMM occupies the tensor cores.
  * Masks are never materialised. Every `MaskSpec` kind is a band `lower(q) <= k <= upper(q)` with
    non-decreasing bounds, so for a block of rows the visible kv tiles form one contiguous range, and the tiles
    that are FULL (no mask math) form a contiguous sub-range. `_tile_bounds` computes those ranges with
    scalar arithmetic inside the kernel; its classification equals `MaskSpec.tile_relation` (checked
    exhaustively in tests). EMPTY tiles are never loaded or computed; PARTIAL tiles evaluate
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

from pallas_kernels.layout import MaskSpec

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_BIG = 1 << 30  # stands in for +-infinity in integer position arithmetic
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
# Mask bands and tile ranges
# ------------------------------------------------------------------------------------------------------


def _div(a, b: int):
  """Floor division for non-negative int32 scalars (lax.div truncates, equal here)."""
  return lax.div(a, jnp.int32(b))


def _band(mask: MaskSpec, transposed: bool):
  """(lower, upper) position functions: row r sees columns c with lower(r) <= c <= upper(r).

  Rows are query positions (forward, dQ) or key positions (`transposed`, dK/dV). Both functions are
  non-decreasing, which is what makes visible tiles contiguous. Positions are absolute (offsets added).
  """
  big = jnp.int32(_BIG)
  neg = jnp.int32(-_BIG)
  kind = mask.kind
  if kind == "bidirectional":
    return (lambda r: neg), (lambda r: big)
  if kind == "causal":
    if transposed:  # key k is seen by queries q >= k
      return (lambda r: r), (lambda r: big)
    return (lambda r: neg), (lambda r: r)
  if kind == "frame_causal":
    tpf, nv = mask.tokens_per_frame, mask.video_tokens

    def frame_start(p):
      s = _div(p, tpf) * tpf
      return s if nv is None else jnp.where(p < nv, s, p)

    def frame_last(p):
      e = (_div(p, tpf) + 1) * tpf - 1
      return e if nv is None else jnp.where(p < nv, e, p)

    if transposed:  # key k is seen by every query from the start of k's frame on
      return frame_start, (lambda r: big)
    return (lambda r: neg), frame_last
  # window: q - left <= k <= q + right  <=>  k - right <= q <= k + left
  lo_w, hi_w = (mask.right, mask.left) if transposed else (mask.left, mask.right)
  lower = (lambda r: neg) if lo_w is None else (lambda r: r - lo_w)
  upper = (lambda r: big) if hi_w is None else (lambda r: r + hi_w)
  return lower, upper


def _tile_bounds(mask: MaskSpec, transposed: bool, row_lo, row_hi, col_offset: int, block_col: int, n_col: int):
  """Column-tile ranges for rows [row_lo, row_hi] (absolute positions, inclusive).

  Returns int32 scalars (lo, full_lo, full_hi, hi) with lo <= full_lo <= full_hi <= hi: tiles in [lo, hi) are
  not EMPTY, tiles in [full_lo, full_hi) are FULL. Column tile j covers positions col_offset + j*block_col + [0,
  block_col). Works on traced scalars (inside kernels) and on concrete arrays (tests).
  """
  lower, upper = _band(mask, transposed)
  zero = jnp.int32(0)
  a_lo = lower(row_lo) - col_offset  # first visible column of the first row
  a_hi = lower(row_hi) - col_offset
  b_lo = upper(row_lo) - col_offset
  b_hi = upper(row_hi) - col_offset  # last visible column of the last row
  lo = jnp.minimum(_div(jnp.maximum(a_lo, zero), block_col), n_col)
  hi = jnp.where(b_hi < 0, zero, jnp.minimum(_div(jnp.maximum(b_hi, zero), block_col) + 1, n_col))
  hi = jnp.maximum(hi, lo)
  full_lo = _div(jnp.maximum(a_hi, zero) + block_col - 1, block_col)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.where(b_lo + 1 < 0, zero, _div(jnp.maximum(b_lo + 1, zero), block_col))
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _nest(bounds, outer):
  """Clamp a warpgroup's ranges into the CTA's [LO, HI) so the skip regions are well formed."""
  lo_o, hi_o = outer
  lo, flo, fhi, hi = bounds
  lo = jnp.clip(lo, lo_o, hi_o)
  hi = jnp.clip(hi, lo, hi_o)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi


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
  if t % (2 * cfg.block_q_dq) or s % cfg.block_kv_dq:
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
    u_lo, _, _, u_hi = _tile_bounds(
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
      lo, flo, fhi, hi = _tile_bounds(
        mask, False, mask.q_offset + q0, mask.q_offset + q0 + bq - 1, mask.kv_offset, bk, nk
      )
      if has_seg:  # segment ids can mask inside any tile
        flo = fhi = hi
      lo, flo, fhi, hi = _nest((lo, flo, fhi, hi), (u_lo, u_hi))
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
