"""The ring itself: the custom_vjp forward and backward loops that rotate K/V around the `seq` axis.

One job: given a static `RingCfg` (hop plans, hop kernel, ring size), run inside `shard_map` on per-device
shards. Each of the N devices keeps its c = T / N query tokens and sees every other device's keys/values once
as they travel around the ring: at hop t = 0..N-1 device r holds the K/V block of source src = (r - t) mod N.
Hop t+1's block is sent (`lax.ppermute`, K and V stacked in ONE buffer so it is one collective) before hop
t's attention is computed, so the transfer hides behind the kernel.

Merge (forward). A hop's local attention returns a normalised partial output o_t and its fp32
log-sum-exp lse_t = log sum_j exp(s_ij) over the keys it saw. Softmax over the union of key sets is

    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.

We evaluate it in fp32 as m = max(lse_a, lse_b); w_a = exp(lse_a - m); w_b = exp(lse_b - m); s = w_a + w_b;
lse = m + log s; o = (w_a o_a + w_b o_b) / s. All exponents are <= 0 (no overflow, unlike the naive
lse_a + log1p(exp(lse_b - lse_a))). A row that no key reaches has lse = -inf in both (the reference's
convention); m is then replaced by 0, s = 0, and the row stays (o = 0, lse = -inf) instead of NaN.

Backward (custom_vjp; a ring again). With the final (out, lse) each hop's gradient share comes from the hop
kernel (`hops.local_backward`, which documents the math). dQ stays local and accumulates in fp32. dK/dV
accumulate in fp32 in a buffer that travels with the block, one hop behind K/V: at the top of hop t we send the
dK/dV accumulated for hop t-1's block (which overlaps hop t's compute), bit-cast into the same buffer as the
next K/V so a backward hop is one collective too; after the last hop one more send brings every block's dK/dV
home.

Dispatch. A hop whose plan is the same on every device runs statically; a uniform hop (see `plans`) slices at
per-device offsets; otherwise `lax.switch` over the distinct plans. The permute is never inside a conditional.

Block-sparse (`RingCfg.sparse`): the global layout arrays ride along as operands; each hop call cuts its local
layout (`sparse.local_layout`) and runs under `lax.cond(any block listed on this device)`, forward and backward,
so a hop call with nothing listed costs the layout arithmetic only.

Segment ids (packing): the kv segment ids of the whole sequence are all-gathered once by the caller (int32
[B, T] per device: negligible) and each hop slices the source's part; this is equivalent to rotating them with
K/V and saves a collective per hop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from layers.ring.hops import HopKernel, local_backward, local_forward
from layers.ring.plans import Call, Plan, UniformCall
from layers.ring.sparse import RingSparse, local_layout


@dataclasses.dataclass(frozen=True)
class RingCfg:
  """Everything static about one ring_attention call (hashable: a custom_vjp nondiff argument)."""

  axis_name: str
  ring_size: int
  plans: tuple[Plan, ...]  # distinct plans
  table: tuple[tuple[int, ...], ...]  # table[t][r] = index into plans for hop t on device r
  uniform: tuple[tuple[UniformCall, ...] | None, ...]  # per hop: conditional-free form, if any
  hop: HopKernel
  scale: float
  permute: bool = True  # False: benchmark-only "ring without communication" (wrong numbers, same compute)
  barrier: bool = True  # optimization barriers pin each permute to one hop (see the note after _ring_fwd_impl)
  sparse: RingSparse | None = None  # block-sparse: tables cutting the global BlockLayout into hop layouts


def _merge(o, lse, o_t, lse_t):
  """Stable fp32 merge of two normalised partials (see module docstring); -inf rows stay (0, -inf)."""
  m = jnp.maximum(lse, lse_t)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse - m), jnp.exp(lse_t - m)
  s = wa + wb
  safe = jnp.where(s > 0, s, 1.0)
  new_lse = jnp.where(s > 0, m + jnp.log(safe), -jnp.inf)
  rows = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # [B, H, t] -> [B, t, H, 1]
  new_o = (rows(wa) * o + rows(wb) * o_t.astype(jnp.float32)) / rows(safe)
  return new_o, new_lse


def _slice(x, lo, size: int, axis: int):
  """x[..., lo:lo+size, ...] on `axis`; lo is a Python int (static) or a traced int32 (per device)."""
  if isinstance(lo, int):
    return lax.slice_in_dim(x, lo, lo + size, axis=axis)
  return lax.dynamic_slice_in_dim(x, lo, size, axis)


def _put(x, lo, size: int, axis: int, val):
  """x with x[..., lo:lo+size, ...] (on `axis`) replaced by val.

  Not `x.at[...].set`: XLA:CPU (jaxlib 0.11.2) segfaults compiling that scatter next to a collective-permute.
  """
  if isinstance(lo, int) and lo == 0 and size == x.shape[axis]:
    return val
  return lax.dynamic_update_slice_in_dim(x, val, lo, axis)


def _resolve(cfg: RingCfg, calls) -> list[tuple]:
  """(q_lo, tq, kv_lo, tk, mask) per call; offsets of uniform calls become this device's (traced) value."""
  out = []
  for c in calls:
    if isinstance(c, Call):
      out.append((c.q_lo, c.q_hi - c.q_lo, c.kv_lo, c.kv_hi - c.kv_lo, c.mask))
      continue
    r = lax.axis_index(cfg.axis_name)
    pick = lambda tab, r=r: tab[0] if len(set(tab)) == 1 else jnp.asarray(tab, jnp.int32)[r]
    out.append((pick(c.q_lo), c.tq, pick(c.kv_lo), c.tk, c.mask))
  return out


def _hop_layout(cfg: RingCfg, t: int, lay, q_lo, tq: int, kv_lo, tk: int):
  """(local BlockLayout, any listed) of one hop call on this device, or (None, None) when dense."""
  if lay is None:
    return None, None
  r = lax.axis_index(cfg.axis_name)
  src = (r - t) % cfg.ring_size
  return local_layout(cfg.sparse, lay[0], lay[1], r, src, q_lo, tq, kv_lo, tk)


def _skip_unless(listed, compute: Callable, *state):
  """compute(*state) where some block is listed on this device (lax.cond), else the state unchanged."""
  if listed is None:
    return compute(*state)
  return lax.cond(listed, compute, lambda *s: s, *state)


def _fwd_branch(cfg: RingCfg, t: int, calls) -> Callable:
  def branch(o, lse, q, kv, seg_q, seg_kv, lay):
    for q_lo, tq, kv_lo, tk, mask in _resolve(cfg, calls):
      layout, listed = _hop_layout(cfg, t, lay, q_lo, tq, kv_lo, tk)

      def compute(o, lse, q_lo=q_lo, tq=tq, kv_lo=kv_lo, tk=tk, mask=mask, layout=layout):
        kvb = _slice(kv, kv_lo, tk, 2)
        seg = None if seg_q is None else (_slice(seg_q, q_lo, tq, 1), _slice(seg_kv, kv_lo, tk, 1))
        o_t, lse_t = local_forward(cfg.hop, _slice(q, q_lo, tq, 1), kvb[0], kvb[1], mask, seg, cfg.scale, layout)
        if o is None:  # first hop, one call covering every row: nothing to merge with
          return o_t.astype(jnp.float32), lse_t
        o_new, lse_new = _merge(_slice(o, q_lo, tq, 1), _slice(lse, q_lo, tq, 2), o_t, lse_t)
        return _put(o, q_lo, tq, 1, o_new), _put(lse, q_lo, tq, 2, lse_new)

      o, lse = _skip_unless(listed, compute, o, lse)
    return o, lse

  return branch


def _bwd_branch(cfg: RingCfg, t: int, calls) -> Callable:
  def branch(dq, dkv, q, kv, seg_q, seg_kv, lay, out, lse, do, delta, dlse):
    for q_lo, tq, kv_lo, tk, mask in _resolve(cfg, calls):
      layout, listed = _hop_layout(cfg, t, lay, q_lo, tq, kv_lo, tk)

      def compute(dq, dkv, q_lo=q_lo, tq=tq, kv_lo=kv_lo, tk=tk, mask=mask, layout=layout):
        kvb = _slice(kv, kv_lo, tk, 2)
        seg = None if seg_q is None else (_slice(seg_q, q_lo, tq, 1), _slice(seg_kv, kv_lo, tk, 1))
        rows = lambda x, axis=1: _slice(x, q_lo, tq, axis)
        dq_t, dk_t, dv_t = local_backward(
          cfg.hop,
          rows(q),
          kvb[0],
          kvb[1],
          mask,
          seg,
          rows(out),
          rows(lse, 2),
          rows(do),
          rows(delta, 2),
          None if dlse is None else rows(dlse, 2),
          cfg.scale,
          layout,
        )
        dq = _put(dq, q_lo, tq, 1, rows(dq) + dq_t)
        dkv = _put(dkv, kv_lo, tk, 2, _slice(dkv, kv_lo, tk, 2) + jnp.stack([dk_t, dv_t]))
        return dq, dkv

      dq, dkv = _skip_unless(listed, compute, dq, dkv)
    return dq, dkv

  return branch


def _dispatch(cfg: RingCfg, t: int, make_branch: Callable, *operands):
  """Run hop t's plan for this device.

  Static when every device has the same plan; per-device slot offsets when the hop is uniform (see
  `_uniform_hop`); otherwise `lax.switch` over the distinct plans (an empty plan is a skipped hop).
  """
  ids = cfg.table[t]
  distinct = sorted(set(ids))
  if len(distinct) == 1:
    return make_branch(cfg.plans[distinct[0]])(*operands)
  if cfg.uniform[t] is not None:
    return make_branch(cfg.uniform[t])(*operands)
  branches = [make_branch(cfg.plans[i]) for i in distinct]
  which = jnp.asarray([distinct.index(i) for i in ids], jnp.int32)[lax.axis_index(cfg.axis_name)]
  return lax.switch(which, branches, *operands)


def _shift(cfg: RingCfg, x):
  """Send to the next device on the ring (device r receives from r - 1)."""
  if not cfg.permute:
    return x
  n = cfg.ring_size
  return lax.ppermute(x, cfg.axis_name, perm=[(i, (i + 1) % n) for i in range(n)])


def _src_segments(cfg: RingCfg, seg_kv_all, t: int):
  if seg_kv_all is None:
    return None
  src = (lax.axis_index(cfg.axis_name) - t) % cfg.ring_size
  return lax.dynamic_index_in_dim(seg_kv_all, src, axis=0, keepdims=False)


def _ring_fwd_impl(cfg: RingCfg, q, k, v, seg_q, seg_kv_all, lay):
  b, c, hq, d = q.shape
  kv = jnp.stack([k, v])  # ONE buffer: one collective-permute per hop
  first = cfg.plans[cfg.table[0][0]]
  if lay is None and len(set(cfg.table[0])) == 1 and len(first) == 1 and (first[0].q_lo, first[0].q_hi) == (0, c):
    o = lse = None  # hop 0 writes every row directly (no merge with zeros)
  else:
    o = jnp.zeros((b, c, hq, d), jnp.float32)
    lse = jnp.full((b, hq, c), -jnp.inf, jnp.float32)
  for t in range(cfg.ring_size):
    kv_next = _shift(cfg, kv) if t < cfg.ring_size - 1 else None  # issued before this hop's compute
    o, lse = _dispatch(
      cfg, t, functools.partial(_fwd_branch, cfg, t), o, lse, q, kv, seg_q, _src_segments(cfg, seg_kv_all, t), lay
    )
    if kv_next is not None and cfg.barrier:
      kv_next, o, lse = lax.optimization_barrier((kv_next, o, lse))
    kv = kv_next
  return o.astype(q.dtype), lse


# Why the optimization barriers: XLA's latency-hiding scheduler sees the hop kernels (cuDNN / Pallas custom
# calls) as free and, with one collective-permute in flight at a time, stretches the LAST permute over all hops
# and runs the earlier ones synchronously up front (seen in the optimised HLO on 4 H200s). Tying each hop's
# received block to that hop's result makes permute t+1 start only after hop t, so each transfer overlaps
# exactly one hop's compute.


def _packable(kv) -> bool:
  return jnp.dtype(kv.dtype).itemsize in (2, 4) and (jnp.dtype(kv.dtype).itemsize == 4 or kv.shape[-1] % 2 == 0)


def _pack(kv, dkv):
  """K/V (bf16 or fp32) and the fp32 dK/dV accumulator as ONE uint32 buffer [..., D/2 + D] (or [..., 2D]).

  XLA:GPU keeps one collective-permute in flight: sent separately, the dK/dV permute of a backward hop waits
  for the K/V one and ends up synchronous (seen in the optimised HLO). Bit-casting both into one buffer makes
  it one transfer per hop that overlaps the hop's kernels; the copy costs ~2x the bytes in HBM traffic.
  """
  if jnp.dtype(kv.dtype).itemsize == 2:
    kvu = lax.bitcast_convert_type(kv.reshape(*kv.shape[:-1], kv.shape[-1] // 2, 2), jnp.uint32)
  else:
    kvu = lax.bitcast_convert_type(kv, jnp.uint32)
  return jnp.concatenate([kvu, lax.bitcast_convert_type(dkv, jnp.uint32)], axis=-1)


def _unpack(buf, kv_dtype):
  """Inverse of `_pack`: (K/V in kv_dtype, fp32 dK/dV)."""
  wide = jnp.dtype(kv_dtype).itemsize == 4
  d = buf.shape[-1] // 2 if wide else buf.shape[-1] * 2 // 3
  kvu, dkvu = buf[..., : buf.shape[-1] - d], buf[..., buf.shape[-1] - d :]
  kv = lax.bitcast_convert_type(kvu, kv_dtype)
  if not wide:
    kv = kv.reshape(*kv.shape[:-2], d)
  return kv, lax.bitcast_convert_type(dkvu, jnp.float32)


def _ring_bwd_impl(cfg: RingCfg, res, do, dlse):
  q, k, v, seg_q, seg_kv_all, lay, out, lse = res
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
  if dlse is not None:
    dlse = jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)  # rows that saw no key
    delta = delta - dlse
  kv = jnp.stack([k, v])
  dq = jnp.zeros(q.shape, jnp.float32)
  dkv = jnp.zeros(kv.shape, jnp.float32)
  for t in range(cfg.ring_size):
    make = functools.partial(_bwd_branch, cfg, t)
    send_kv, send_dkv = t < cfg.ring_size - 1, t > 0  # dkv: hop t-1's block accumulator, one hop behind K/V
    if send_kv and send_dkv and _packable(kv):
      kv_next, dkv = _unpack(_shift(cfg, _pack(kv, dkv)), kv.dtype)
    else:
      kv_next = _shift(cfg, kv) if send_kv else None
      dkv = _shift(cfg, dkv) if send_dkv else dkv
    segs = _src_segments(cfg, seg_kv_all, t)
    dq, dkv = _dispatch(cfg, t, make, dq, dkv, q, kv, seg_q, segs, lay, out, lse, do, delta, dlse)
    if kv_next is not None and cfg.barrier:
      kv_next, dq, dkv = lax.optimization_barrier((kv_next, dq, dkv))
    kv = kv_next
  # Home: block r's dK/dV end where they started. This last send cannot overlap anything, so it goes in the
  # output dtype: rounding before or after the transfer is the same operation, the bytes halve for bf16.
  if k.dtype == v.dtype:
    dkv = _shift(cfg, dkv.astype(k.dtype))
    return dq.astype(q.dtype), dkv[0], dkv[1]
  dkv = _shift(cfg, dkv)
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_out(cfg, q, k, v, seg_q, seg_kv_all, lay):
  return _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all, lay)[0]


def _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all, lay):
  """Forward plus residuals; out/lse are named so a remat policy can keep them
  (`jax.checkpoint_policies.save_only_these_names("ring_out", "ring_lse")`)."""
  out, lse = _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all, lay)
  out, lse = checkpoint_name(out, "ring_out"), checkpoint_name(lse, "ring_lse")
  return out, lse, (q, k, v, seg_q, seg_kv_all, lay, out, lse)


def _ring_out_fwd(cfg, q, k, v, seg_q, seg_kv_all, lay):
  out, _, res = _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all, lay)
  return out, res


def _ring_out_bwd(cfg, res, do):
  return (*_ring_bwd_impl(cfg, res, do, None), None, None, None)


ring_out.defvjp(_ring_out_fwd, _ring_out_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_out_lse(cfg, q, k, v, seg_q, seg_kv_all, lay):
  return _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all, lay)


def _ring_out_lse_fwd(cfg, q, k, v, seg_q, seg_kv_all, lay):
  out, lse, res = _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all, lay)
  return (out, lse), res


def _ring_out_lse_bwd(cfg, res, g):
  do, dlse = g
  return (*_ring_bwd_impl(cfg, res, do, dlse), None, None, None)


ring_out_lse.defvjp(_ring_out_lse_fwd, _ring_out_lse_bwd)


__all__ = ["RingCfg", "ring_out", "ring_out_lse"]
