"""Ring attention over the `seq` mesh axis (context parallelism).

Each of the N devices on the `seq` axis keeps its c = T / N query tokens and sees every other device's
keys/values once as they travel around a ring: at hop t = 0..N-1 device r holds the K/V block of source
src = (r - t) mod N. Hop t+1's block is sent (`lax.ppermute`, K and V stacked in ONE buffer so it is one
collective) before hop t's attention is computed, so the transfer hides behind the kernel.

Merge (forward). A hop's local attention returns a normalised partial output o_t and its fp32
log-sum-exp lse_t = log sum_j exp(s_ij) over the keys it saw. Softmax over the union of key sets is

    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.

We evaluate it in fp32 as m = max(lse_a, lse_b); w_a = exp(lse_a - m); w_b = exp(lse_b - m); s = w_a + w_b;
lse = m + log s; o = (w_a o_a + w_b o_b) / s. All exponents are <= 0 (no overflow, unlike the naive
lse_a + log1p(exp(lse_b - lse_a))). A row that no key reaches has lse = -inf in both (the reference's
convention); m is then replaced by 0, s = 0, and the row stays (o = 0, lse = -inf) instead of NaN.

Backward (custom_vjp; a ring again). With the final (out, lse) and upstream (dO, dL) (dL is the cotangent
of lse when it is returned), define delta = rowsum(dO * out) - dL. For the keys of hop t with the GLOBAL
lse, P_t = exp(s_t - lse) and

    dV_t = P_t^T dO,   dS_t = P_t * (dO V_t^T - delta),   dQ += scale dS_t K_t,   dK_t = scale dS_t^T Q.

That is exactly a flash-attention backward fed with the global (out, lse): hop kernels with a `backward`
(xla, cudnn, flash; see `HopKernel`) do this (no forward recomputation). Where no such backward is given (the
reference kernel) we use the vjp of the hop's forward instead:
out = sum_t w_t o_t with w_t = exp(lse_t - lse), so

    d o_t = w_t dO,    d lse_t = w_t (rowsum(dO * o_t) - rowsum(dO * out) + dL) = w_t (rowsum(dO * o_t) - delta),

and jax.vjp of the hop's (o_t, lse_t) with those cotangents gives the hop's (dq, dk, dv) exactly (at the
price of recomputing the hop's forward). dQ stays local and accumulates in fp32. dK/dV accumulate in fp32
in a buffer that travels with the block, one hop behind K/V: at the top of hop t we send the dK/dV
accumulated for hop t-1's block (which overlaps hop t's compute), bit-cast into the same buffer as the next
K/V so a backward hop is one collective too; after the last hop one more send brings every block's dK/dV home.

Token layouts. The global sequence is stored in a permuted order (`token_permutation`) so that causal
work is balanced over the ring; the mask spec stays in ORIGINAL positions:
  contiguous     device r holds chunk r.                          Causal: hop work is a triangle, then full
                                                                  or empty (device N-1 does N-1 full hops).
  zigzag         2N chunks; device r holds chunks r and 2N-1-r.   Causal: every hop is half a block.
  frame_striped  whole frames dealt round robin: device r holds  Causal and frame-causal: every hop is about
                 frames r, r+N, r+2N, ...                         half a block, frames stay intact.
For each (device, source) pair we know which original positions the Q and K/V slots hold, so each hop's
mask is a static `MaskSpec` with offsets (`mask.shifted`), possibly on sub-blocks. The device index is only
known at run time, so a hop whose plan differs between devices is dispatched either without a conditional,
when every device runs the same shapes and masks at different slot offsets (zigzag: two unmasked
[c/2, c/2] blocks per hop, sliced at per-device offsets), or by `lax.switch` over the distinct plans (fully
masked hops are an empty branch: skipped). The permute itself is never inside a conditional.

Segment ids (packing): the kv segment ids of the whole sequence are all-gathered once (int32 [B, T] per
device: negligible) and each hop slices the source's part; this is equivalent to rotating them with K/V
and saves a collective per hop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation

TOKEN_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "frame_striped")
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


# ---------------------------------------------------------------------------------------------------------
# Token layouts
# ---------------------------------------------------------------------------------------------------------
def _device_chunks(num_tokens: int, ring_size: int, token_layout: str, tokens_per_frame: int = 1) -> list:
  """Per device, the list of (original_start, length) runs it stores, in slot order."""
  n, tpf = num_tokens, tokens_per_frame
  if token_layout not in TOKEN_LAYOUTS:
    raise ValueError(f"ring token_layout {token_layout!r} is not one of {TOKEN_LAYOUTS}")
  if ring_size < 1 or tpf < 1:
    raise ValueError(f"ring: ring_size={ring_size} and tokens_per_frame={tpf} must be >= 1")
  if token_layout == "contiguous":
    if n % ring_size or (n // ring_size) % tpf:
      raise ValueError(
        f"ring token_layout='contiguous': {n} tokens must split into {ring_size} chunks of whole frames "
        f"(tokens_per_frame={tpf})"
      )
    c = n // ring_size
    return [[(r * c, c)] for r in range(ring_size)]
  if token_layout == "zigzag":
    if n % (2 * ring_size) or (n // (2 * ring_size)) % tpf:
      raise ValueError(
        f"ring token_layout='zigzag': {n} tokens must split into 2*{ring_size} chunks of whole frames "
        f"(tokens_per_frame={tpf}); pad the sequence to a multiple of {2 * ring_size * tpf}"
      )
    h = n // (2 * ring_size)
    return [[(r * h, h), ((2 * ring_size - 1 - r) * h, h)] for r in range(ring_size)]
  if n % (tpf * ring_size):
    raise ValueError(
      f"ring token_layout='frame_striped': {n} tokens are not a whole number of frames of {tpf} tokens per "
      f"device ({ring_size} devices); pad to a multiple of {tpf * ring_size}"
    )
  frames_per_device = n // (tpf * ring_size)
  return [[((m * ring_size + r) * tpf, tpf) for m in range(frames_per_device)] for r in range(ring_size)]


def token_permutation(num_tokens: int, ring_size: int, token_layout: str, tokens_per_frame: int = 1) -> np.ndarray:
  """int32 [N]: perm[i] = original position of the token stored at slot i (device r owns slots r*c..(r+1)*c).

  A model applies it once: `x = x[:, perm]`, RoPE positions `positions[perm]`; masks stay in original
  positions (ring_attention knows the layout). Invert outputs with `np.argsort(perm)`.
  Example (MaxText's reorder): 8 tokens, ring 2, zigzag -> [0, 1, 6, 7, 2, 3, 4, 5].
  """
  chunks = _device_chunks(num_tokens, ring_size, token_layout, tokens_per_frame)
  return np.concatenate([np.arange(s, s + ln) for dev in chunks for (s, ln) in dev]).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Per-hop plans: which sub-blocks to compute with which (static) mask
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Call:
  """One local attention call of a hop: Q slots [q_lo, q_hi) x K/V slots [kv_lo, kv_hi) under `mask`."""

  q_lo: int
  q_hi: int
  kv_lo: int
  kv_hi: int
  mask: MaskSpec


_Plan = tuple[_Call, ...]
_FULL = MaskSpec.bidirectional()


def _normalize(spec: MaskSpec, tq: int, tk: int) -> MaskSpec:
  """An equivalent spec on a [tq, tk] block with canonical offsets, so equal masks compare equal.

  Causal/window depend only on kv_offset - q_offset. Frame-causal inside the video region depends on that
  difference and on q_offset mod tokens_per_frame; past the video region it is plain causal.
  """
  rel = int(spec.tile_relation(0, 0, tq, tk))
  if rel == TileRelation.FULL:
    return _FULL
  qo, ko = spec.q_offset, spec.kv_offset
  if spec.kind in ("causal", "window"):
    return dataclasses.replace(spec, q_offset=0, kv_offset=ko - qo)
  if spec.kind == "frame_causal":
    tpf, vt = spec.tokens_per_frame, spec.video_tokens
    if vt is None or (qo + tq - 1 < vt and ko + tk - 1 < vt):
      base = (qo // tpf) * tpf
      return MaskSpec("frame_causal", tokens_per_frame=tpf, q_offset=qo - base, kv_offset=ko - base)
    if qo >= vt and ko >= vt:
      return MaskSpec("causal", q_offset=0, kv_offset=ko - qo)
  return spec


def _canon(spec: MaskSpec, tq: int, tk: int):
  """Hashable key; equal keys mean identical dense masks on a [tq, tk] block."""
  rel = int(spec.tile_relation(0, 0, tq, tk))
  if rel == TileRelation.EMPTY:
    return "empty"
  if rel == TileRelation.FULL:
    return "full"
  return _normalize(spec, tq, tk)


def _coalesce(mask: MaskSpec, qchunks, kvchunks, rows: Sequence[int], cols: Sequence[int], keys) -> MaskSpec | None:
  """One spec for the rectangle rows x cols (consecutive chunk indices) that reproduces every cell's mask.

  Tries plain bidirectional (all cells fully visible), then "fake coordinates": take one partially masked
  cell's true offsets as anchor and pretend the rectangle's slots are contiguous positions around it. E.g.
  zigzag causal at hop 0 becomes plain causal on slot coordinates. Verified cell by cell with `_canon`.
  """
  cells = [(i, j) for i in rows for j in cols]
  tq = sum(qchunks[i][1] for i in rows)
  tk = sum(kvchunks[j][1] for j in cols)
  if all(keys[c] == "full" for c in cells):
    return _FULL
  q_slot = {i: sum(qchunks[x][1] for x in rows if x < i) for i in rows}
  k_slot = {j: sum(kvchunks[x][1] for x in cols if x < j) for j in cols}
  for ai, aj in cells:
    if keys[(ai, aj)] in ("full", "empty"):
      continue
    fake = mask.shifted(mask.q_offset + qchunks[ai][0] - q_slot[ai], mask.kv_offset + kvchunks[aj][0] - k_slot[aj])
    ok = all(
      _canon(fake.shifted(fake.q_offset + q_slot[i], fake.kv_offset + k_slot[j]), qchunks[i][1], kvchunks[j][1])
      == keys[(i, j)]
      for (i, j) in cells
    )
    if ok:
      return _normalize(fake, tq, tk)
  return None


def _chunk_plan(mask: MaskSpec, qchunks, kvchunks) -> _Plan:
  """Plan for Q chunks x K/V chunks given as (original_start, length) runs in slot order (exact, any mask)."""
  keys = {}
  for i, (qs, ql) in enumerate(qchunks):
    for j, (ks, kl) in enumerate(kvchunks):
      keys[(i, j)] = _canon(mask.shifted(mask.q_offset + qs, mask.kv_offset + ks), ql, kl)
  live = [c for c, k in keys.items() if k != "empty"]
  if not live:
    return ()
  qstart = np.cumsum([0] + [ln for _, ln in qchunks])
  kstart = np.cumsum([0] + [ln for _, ln in kvchunks])

  def call(rows, cols, spec):
    return _Call(int(qstart[rows[0]]), int(qstart[rows[-1] + 1]), int(kstart[cols[0]]), int(kstart[cols[-1] + 1]), spec)

  rows = list(range(min(i for i, _ in live), max(i for i, _ in live) + 1))
  cols = list(range(min(j for _, j in live), max(j for _, j in live) + 1))
  spec = _coalesce(mask, qchunks, kvchunks, rows, cols, keys)
  if spec is not None:
    return (call(rows, cols, spec),)
  calls = []
  for i in rows:
    js = [j for (ii, j) in live if ii == i]
    if not js:
      continue
    cols_i = list(range(min(js), max(js) + 1))
    spec = _coalesce(mask, qchunks, kvchunks, [i], cols_i, keys)
    if spec is not None:
      calls.append(call([i], cols_i, spec))
      continue
    for j in js:
      cell = mask.shifted(mask.q_offset + qchunks[i][0], mask.kv_offset + kvchunks[j][0])
      calls.append(call([i], [j], _normalize(cell, qchunks[i][1], kvchunks[j][1])))
  return tuple(calls)


def _striped_plan(mask: MaskSpec, r: int, src: int, c: int, tpf: int, num_tokens: int) -> _Plan:
  """Frame-striped hop plan. Device r holds frames m*N + r (m = 0, 1, ...) at compacted frame m.

  Query frame m*N + r sees key frame m'*N + src under frame-causal iff m'*N + src <= m*N + r, i.e.
  m' <= m when src <= r and m' <= m - 1 when src > r: frame-causal on compacted frames, keys shifted by one
  frame (kv_offset = tpf) when src > r. Under token-causal the diagonal frame needs the token order too:
  src == r is plain causal on compacted positions, src < r frame-causal, src > r frame-causal shifted.
  """
  if mask.q_offset or mask.kv_offset:
    raise ValueError("ring token_layout='frame_striped' needs a mask without q_offset/kv_offset")
  if mask.kind == "bidirectional":
    return (_Call(0, c, 0, c, _FULL),)
  fc = MaskSpec.frame_causal(tpf)
  shifted = fc.shifted(0, tpf)
  if mask.kind == "frame_causal":
    vt = mask.video_tokens
    if mask.tokens_per_frame != tpf or (vt is not None and vt < num_tokens):
      raise ValueError(
        f"ring token_layout='frame_striped' with a frame_causal mask needs mask.tokens_per_frame == the layout's "
        f"tokens_per_frame ({mask.tokens_per_frame} vs {tpf}) and no text after the video (video_tokens={vt}); "
        "use token_layout='zigzag' for video+text sequences"
      )
    spec = fc if src <= r else shifted
  elif mask.kind == "causal":
    spec = MaskSpec.causal() if src == r else (fc if src < r else shifted)
  else:
    raise ValueError(
      f"ring token_layout='frame_striped' cannot express a {mask.kind!r} mask with offsets; "
      "use token_layout='contiguous' or 'zigzag'"
    )
  return (_Call(0, c, 0, c, _normalize(spec, c, c)),)


@dataclasses.dataclass(frozen=True)
class _UniformCall:
  """A call of the same shape and mask on every device, at per-device slot offsets (indexed by device)."""

  tq: int
  tk: int
  mask: MaskSpec
  q_lo: tuple[int, ...]
  kv_lo: tuple[int, ...]


def _cell_calls(mask: MaskSpec, qchunks, kvchunks) -> list[_Call]:
  """One call per non-empty (Q chunk, K/V chunk) cell, masks normalised."""
  calls = []
  q0 = np.cumsum([0] + [ln for _, ln in qchunks])
  k0 = np.cumsum([0] + [ln for _, ln in kvchunks])
  for i, (qs, ql) in enumerate(qchunks):
    for j, (ks, kl) in enumerate(kvchunks):
      cell = mask.shifted(mask.q_offset + qs, mask.kv_offset + ks)
      if int(cell.tile_relation(0, 0, ql, kl)) != TileRelation.EMPTY:
        calls.append(_Call(int(q0[i]), int(q0[i] + ql), int(k0[j]), int(k0[j] + kl), _normalize(cell, ql, kl)))
  return sorted(calls, key=lambda c: (c.q_hi - c.q_lo, c.kv_hi - c.kv_lo, repr(c.mask), c.q_lo, c.kv_lo))


def _uniform_hop(mask: MaskSpec, chunks, n: int, t: int) -> tuple[_UniformCall, ...] | None:
  """Hop t as calls that have the same shapes and masks on every device, if the cells allow it.

  Zigzag under causal is the case this exists for: at hop t >= 1 device r computes either (all Q x first K/V
  half) or (second Q half x all K/V); cell by cell both are two unmasked [c/2, c/2] blocks, only at different
  slots. Slicing at per-device offsets then replaces `lax.switch`, whose predicate XLA:GPU reads back to the
  host every hop (a sync that stalls the launch queue).
  """
  per_dev = [_cell_calls(mask, chunks[r], chunks[(r - t) % n]) for r in range(n)]
  sig = [[(c.q_hi - c.q_lo, c.kv_hi - c.kv_lo, c.mask) for c in calls] for calls in per_dev]
  if not sig[0] or any(x != sig[0] for x in sig):
    return None
  return tuple(
    _UniformCall(tq, tk, m, tuple(d[i].q_lo for d in per_dev), tuple(d[i].kv_lo for d in per_dev))
    for i, (tq, tk, m) in enumerate(sig[0])
  )


@dataclasses.dataclass(frozen=True)
class _RingCfg:
  """Everything static about one ring_attention call (hashable: a custom_vjp nondiff argument)."""

  axis_name: str
  ring_size: int
  plans: tuple[_Plan, ...]  # distinct plans
  table: tuple[tuple[int, ...], ...]  # table[t][r] = index into plans for hop t on device r
  uniform: tuple[tuple[_UniformCall, ...] | None, ...]  # per hop: conditional-free form, if any
  hop: HopKernel
  scale: float
  permute: bool = True  # False: benchmark-only "ring without communication" (wrong numbers, same compute)
  barrier: bool = True  # optimization barriers pin each permute to one hop (see _ring_fwd_impl)


def _build_plans(mask: MaskSpec, num_tokens: int, ring_size: int, token_layout: str, tpf: int, uniform: bool = True):
  """(distinct plans, table[t][r] -> plan index, per-hop uniform calls or None)."""
  n = ring_size
  c = num_tokens // n
  chunks = None if token_layout == "frame_striped" else _device_chunks(num_tokens, n, token_layout)
  plans: list[_Plan] = []
  index: dict[_Plan, int] = {}
  table, uniform_hops = [], []
  for t in range(n):
    row = []
    for r in range(n):
      src = (r - t) % n
      if chunks is None:
        plan = _striped_plan(mask, r, src, c, tpf, num_tokens)
      else:
        plan = _chunk_plan(mask, chunks[r], chunks[src])
      if plan not in index:
        index[plan] = len(plans)
        plans.append(plan)
      row.append(index[plan])
    table.append(tuple(row))
    same = len(set(row)) == 1
    uniform_hops.append(None if (same or chunks is None or not uniform) else _uniform_hop(mask, chunks, n, t))
  return tuple(plans), tuple(table), tuple(uniform_hops)


# ---------------------------------------------------------------------------------------------------------
# Local (per-hop) attention backends
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HopKernel:
  """The attention a ring hop runs, handed in by the caller (`layers.attention.hop_kernel`): the ring never
  picks a kernel itself, so it does not depend on the dispatcher in layers/attention.py.

  forward(q, k, v, *, mask, segment_ids, scale) -> (o [B, tq, Hq, D] q.dtype, lse [B, Hq, tq] fp32).
  backward(q, k, v, mask, segment_ids, out, lse, do, delta, dlse, scale) -> (dq, dk, dv) fp32, fed with the
    GLOBAL out/lse rows and delta = rowsum(dO * out) - dL; None: the vjp of `forward` (recomputes the hop).
  whole(q, k, v, *, mask, segment_ids, scale, return_lse): differentiable attention for a ring of one device.
  check(mask, tq, tk, has_segments): raise on a hop mask the kernel cannot run (before tracing), or None.
  """

  name: str
  forward: Callable
  whole: Callable
  backward: Callable | None = None
  check: Callable | None = None


def _cudnn_check(spec: MaskSpec, tq: int, tk: int, has_segments: bool) -> None:
  square_causal = spec.kind == "causal" and spec.q_offset == 0 and spec.kv_offset == 0 and tq == tk
  if has_segments or not (spec.kind == "bidirectional" or square_causal):
    raise ValueError(
      f"ring kernel='cudnn' handles hop masks that are plain causal (square, no offsets) or bidirectional "
      f"and no segment ids; this hop needs {spec} on a [{tq}, {tk}] block"
      f"{' with segment ids' if has_segments else ''}: use kernel='flash' or 'xla'"
    )


def _cudnn_args(q, spec):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415  (private: only API with fp32 lse)

  nu = jnp.zeros(0, q.dtype)
  kw = dict(
    seed=0,
    dropout_rate=0.0,
    variadic_args=(False, False),
    mask_type=fa.MaskType.CAUSAL if spec.kind == "causal" else fa.MaskType.NO_MASK,
    layout=fa.AttentionLayout.BTNH.value,
    sliding_window_length=None,
  )
  return fa, (nu,) * 7, kw


def _cudnn_fwd(q, k, v, spec, scale):
  """cuDNN flash forward returning the fp32 softmax statistics (= lse [B, H, T]) the public API rounds."""
  fa, nus, kw = _cudnn_args(q, spec)
  out, lse = fa._dot_product_attention_fwd_impl(q, k, v, *nus, scale=scale, is_training=True, **kw)
  return out, lse


def _cudnn_bwd(q, k, v, spec, scale, out, lse, do):
  """cuDNN flash backward fed with the GLOBAL (out, lse): exactly the hop's share of the gradient."""
  fa, nus, kw = _cudnn_args(q, spec)
  dq, dk, dv = fa._dot_product_attention_bwd_impl(q, k, v, *nus, lse, out, do, scale=scale, **kw)[:3]
  return dq, dk, dv


def cudnn_hop_forward(q, k, v, *, mask: MaskSpec, segment_ids, scale: float):
  """(o, lse) of one sub-block with cuDNN; the hop mask must pass `cudnn_hop_check`."""
  _cudnn_check(mask, q.shape[1], k.shape[1], segment_ids is not None)
  return _cudnn_fwd(q, k, v, mask, scale)


def cudnn_hop_backward(q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float):
  """cuDNN backward of one sub-block fed with the global (out, lse) (no lse cotangent)."""
  del seg, delta
  if dlse is not None:
    raise ValueError("ring with kernel='cudnn' cannot differentiate through the returned lse; use 'xla' or 'flash'")
  dq, dk, dv = _cudnn_bwd(q, k, v, spec, scale, out.astype(q.dtype), lse, do.astype(q.dtype))
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


cudnn_hop_check = _cudnn_check


def _local_fwd(hop: HopKernel, q, k, v, spec: MaskSpec, seg, scale: float):
  """(o [B, tq, Hq, D] q.dtype, lse [B, Hq, tq] fp32) of one sub-block."""
  return hop.forward(q, k, v, mask=spec, segment_ids=seg, scale=scale)


def dense_hop_backward(q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float):
  """Direct hop backward with the global lse (dense; the "xla" hop kernel). GQA without repeating K/V."""
  del out, dlse  # delta already holds the lse cotangent
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, tq, hkv, g, d)
  dog = do.reshape(b, tq, hkv, g, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  vis = spec.tile_allowed(0, 0, tq, tk)[None, None, None]
  if seg is not None:
    vis = vis & (seg[0][:, None, None, :, None] == seg[1][:, None, None, None, :])
  lse_g = lse.reshape(b, hkv, g, tq, 1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
  dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
  dp = jnp.einsum("btkgd,bskd->bkgts", dog, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta.reshape(b, hkv, g, tq, 1))
  dq = jnp.einsum("bkgts,bskd->btkgd", ds.astype(q.dtype), k, preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), qg, preferred_element_type=jnp.float32) * scale
  return dq.reshape(b, tq, hq, d), dk, dv


def _local_bwd(hop: HopKernel, q, k, v, spec: MaskSpec, seg, out, lse, do, delta, dlse, scale: float):
  """(dq, dk, dv) fp32 of one sub-block given the global out/lse rows and delta = rowsum(dO*out) - dL."""
  if hop.backward is not None:
    return hop.backward(q, k, v, spec, seg, out, lse, do, delta, dlse, scale)
  # Generic: vjp of the local attention with d o_t = w_t dO and d lse_t = w_t (rowsum(dO o_t) - delta).
  do = do.astype(jnp.float32)
  (o_t, lse_t), vjp = jax.vjp(lambda q_, k_, v_: _local_fwd(hop, q_, k_, v_, spec, seg, scale), q, k, v)
  finite = jnp.isfinite(lse_t)
  w = jnp.where(finite, jnp.exp(jnp.where(finite, lse_t, 0.0) - jnp.where(finite, lse, 0.0)), 0.0)  # [B,H,t]
  w_rows = jnp.swapaxes(w, 1, 2)[..., None]  # [B, t, H, 1]
  do_t = (w_rows * do).astype(o_t.dtype)
  dlse_t = w * (jnp.einsum("bthd,bthd->bht", do, o_t.astype(jnp.float32)) - delta)
  dq, dk, dv = vjp((do_t, dlse_t))
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# The ring (runs inside shard_map; arrays are per-device shards)
# ---------------------------------------------------------------------------------------------------------
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


def _resolve(cfg: _RingCfg, calls) -> list[tuple]:
  """(q_lo, tq, kv_lo, tk, mask) per call; offsets of uniform calls become this device's (traced) value."""
  out = []
  for c in calls:
    if isinstance(c, _Call):
      out.append((c.q_lo, c.q_hi - c.q_lo, c.kv_lo, c.kv_hi - c.kv_lo, c.mask))
      continue
    r = lax.axis_index(cfg.axis_name)
    pick = lambda tab, r=r: tab[0] if len(set(tab)) == 1 else jnp.asarray(tab, jnp.int32)[r]
    out.append((pick(c.q_lo), c.tq, pick(c.kv_lo), c.tk, c.mask))
  return out


def _fwd_branch(cfg: _RingCfg, calls) -> Callable:
  def branch(o, lse, q, kv, seg_q, seg_kv):
    for q_lo, tq, kv_lo, tk, mask in _resolve(cfg, calls):
      kvb = _slice(kv, kv_lo, tk, 2)
      seg = None if seg_q is None else (_slice(seg_q, q_lo, tq, 1), _slice(seg_kv, kv_lo, tk, 1))
      o_t, lse_t = _local_fwd(cfg.hop, _slice(q, q_lo, tq, 1), kvb[0], kvb[1], mask, seg, cfg.scale)
      if o is None:  # first hop, one call covering every row: nothing to merge with
        o, lse = o_t.astype(jnp.float32), lse_t
        continue
      o_new, lse_new = _merge(_slice(o, q_lo, tq, 1), _slice(lse, q_lo, tq, 2), o_t, lse_t)
      o, lse = _put(o, q_lo, tq, 1, o_new), _put(lse, q_lo, tq, 2, lse_new)
    return o, lse

  return branch


def _bwd_branch(cfg: _RingCfg, calls) -> Callable:
  def branch(dq, dkv, q, kv, seg_q, seg_kv, out, lse, do, delta, dlse):
    for q_lo, tq, kv_lo, tk, mask in _resolve(cfg, calls):
      kvb = _slice(kv, kv_lo, tk, 2)
      seg = None if seg_q is None else (_slice(seg_q, q_lo, tq, 1), _slice(seg_kv, kv_lo, tk, 1))
      rows = lambda x, axis=1, lo=q_lo, size=tq: _slice(x, lo, size, axis)
      dq_t, dk_t, dv_t = _local_bwd(
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
      )
      dq = _put(dq, q_lo, tq, 1, rows(dq) + dq_t)
      dkv = _put(dkv, kv_lo, tk, 2, _slice(dkv, kv_lo, tk, 2) + jnp.stack([dk_t, dv_t]))
    return dq, dkv

  return branch


def _dispatch(cfg: _RingCfg, t: int, make_branch: Callable, *operands):
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


def _shift(cfg: _RingCfg, x):
  """Send to the next device on the ring (device r receives from r - 1)."""
  if not cfg.permute:
    return x
  n = cfg.ring_size
  return lax.ppermute(x, cfg.axis_name, perm=[(i, (i + 1) % n) for i in range(n)])


def _src_segments(cfg: _RingCfg, seg_kv_all, t: int):
  if seg_kv_all is None:
    return None
  src = (lax.axis_index(cfg.axis_name) - t) % cfg.ring_size
  return lax.dynamic_index_in_dim(seg_kv_all, src, axis=0, keepdims=False)


def _ring_fwd_impl(cfg: _RingCfg, q, k, v, seg_q, seg_kv_all):
  b, c, hq, d = q.shape
  kv = jnp.stack([k, v])  # ONE buffer: one collective-permute per hop
  first = cfg.plans[cfg.table[0][0]]
  if len(set(cfg.table[0])) == 1 and len(first) == 1 and (first[0].q_lo, first[0].q_hi) == (0, c):
    o = lse = None  # hop 0 writes every row directly (no merge with zeros)
  else:
    o = jnp.zeros((b, c, hq, d), jnp.float32)
    lse = jnp.full((b, hq, c), -jnp.inf, jnp.float32)
  for t in range(cfg.ring_size):
    kv_next = _shift(cfg, kv) if t < cfg.ring_size - 1 else None  # issued before this hop's compute
    o, lse = _dispatch(
      cfg, t, functools.partial(_fwd_branch, cfg), o, lse, q, kv, seg_q, _src_segments(cfg, seg_kv_all, t)
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


def _ring_bwd_impl(cfg: _RingCfg, res, do, dlse):
  q, k, v, seg_q, seg_kv_all, out, lse = res
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
  if dlse is not None:
    dlse = jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)  # rows that saw no key
    delta = delta - dlse
  kv = jnp.stack([k, v])
  dq = jnp.zeros(q.shape, jnp.float32)
  dkv = jnp.zeros(kv.shape, jnp.float32)
  make = functools.partial(_bwd_branch, cfg)
  for t in range(cfg.ring_size):
    send_kv, send_dkv = t < cfg.ring_size - 1, t > 0  # dkv: hop t-1's block accumulator, one hop behind K/V
    if send_kv and send_dkv and _packable(kv):
      kv_next, dkv = _unpack(_shift(cfg, _pack(kv, dkv)), kv.dtype)
    else:
      kv_next = _shift(cfg, kv) if send_kv else None
      dkv = _shift(cfg, dkv) if send_dkv else dkv
    segs = _src_segments(cfg, seg_kv_all, t)
    dq, dkv = _dispatch(cfg, t, make, dq, dkv, q, kv, seg_q, segs, out, lse, do, delta, dlse)
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
def _ring_out(cfg, q, k, v, seg_q, seg_kv_all):
  return _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all)[0]


def _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all):
  """Forward plus residuals; out/lse are named so a remat policy can keep them
  (`jax.checkpoint_policies.save_only_these_names("ring_out", "ring_lse")`)."""
  out, lse = _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all)
  out, lse = checkpoint_name(out, "ring_out"), checkpoint_name(lse, "ring_lse")
  return out, lse, (q, k, v, seg_q, seg_kv_all, out, lse)


def _ring_out_fwd(cfg, q, k, v, seg_q, seg_kv_all):
  out, _, res = _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all)
  return out, res


def _ring_out_bwd(cfg, res, do):
  return (*_ring_bwd_impl(cfg, res, do, None), None, None)


_ring_out.defvjp(_ring_out_fwd, _ring_out_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_out_lse(cfg, q, k, v, seg_q, seg_kv_all):
  return _ring_fwd_impl(cfg, q, k, v, seg_q, seg_kv_all)


def _ring_out_lse_fwd(cfg, q, k, v, seg_q, seg_kv_all):
  out, lse, res = _ring_residuals(cfg, q, k, v, seg_q, seg_kv_all)
  return (out, lse), res


def _ring_out_lse_bwd(cfg, res, g):
  do, dlse = g
  return (*_ring_bwd_impl(cfg, res, do, dlse), None, None)


_ring_out_lse.defvjp(_ring_out_lse_fwd, _ring_out_lse_bwd)


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------
def _mesh_axes(mesh, b: int, hq: int, hkv: int):
  """Mesh axes for the batch and head dims: as many of (data, fsdp) as divide B; tensor if it divides heads."""
  sizes = dict(mesh.shape)
  batch, prod = [], 1
  for a in _BATCH_AXES:
    if a in sizes and b % (prod * sizes[a]) == 0:
      batch.append(a)
      prod *= sizes[a]
  heads = _HEAD_AXIS if _HEAD_AXIS in sizes and hq % sizes[_HEAD_AXIS] == 0 and hkv % sizes[_HEAD_AXIS] == 0 else None
  return (tuple(batch) or None), heads


def ring_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  hop: HopKernel,
  token_layout: str = "contiguous",
  axis_name: str = "seq",
  tokens_per_frame: int | None = None,
  _permute: bool = True,
  _uniform: bool = True,
  _barrier: bool = True,
):
  """Ring attention of GLOBAL q [B, T, Hq, D], k/v [B, T, Hkv, D] sharded over `axis_name` on the token dim.

  Tokens are stored in `token_layout` order (see `token_permutation`); `mask` and `segment_ids` semantics are
  those of `layers.attention.attention` with the mask in ORIGINAL positions (segment ids in storage order,
  i.e. permuted like the tokens). The mesh is the ambient `jax.set_mesh` one; batch is split over
  (data, fsdp) and heads over tensor where they divide. Returns out [B, T, Hq, D] (and lse [B, Hq, T] fp32).

  Args:
    hop: the per-hop attention kernel (`layers.attention.hop_kernel("xla" | "flash" | "cudnn" | "reference")`).
    tokens_per_frame: frame size of the frame_striped layout; defaults to mask.tokens_per_frame.
    _permute: benchmark only. False skips the K/V transfers (wrong results) to time the compute alone.
    _uniform: False always dispatches hops with different per-device plans by `lax.switch` (benchmarks, tests).
    _barrier: False drops the optimization barriers that pin each transfer to one hop (benchmarks).
  """
  from pallas_kernels import reference  # noqa: PLC0415

  reference.check_shapes(q, k, v, segment_ids)
  if layout is not None:
    raise ValueError("ring_attention: a BlockLayout (block-sparse) is not supported with context_parallel=ring yet")
  b, t, hq, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"ring_attention: self-attention only; q has {t} tokens, k/v have {k.shape[1]}")
  scale = float(d**-0.5 if scale is None else scale)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names:
    raise ValueError(
      f"ring_attention: no mesh axis {axis_name!r} in the ambient mesh; wrap the call in `with jax.set_mesh(mesh):` "
      "with a mesh from vidlm.sharding (axes data, fsdp, seq, tensor)"
    )
  n = dict(mesh.shape)[axis_name]
  if token_layout == "frame_striped":
    tpf = tokens_per_frame or (mask.tokens_per_frame if mask.kind == "frame_causal" else None)
    if tpf is None:
      if mask.kind != "bidirectional":
        raise ValueError(
          f"ring_attention(token_layout='frame_striped', mask={mask.kind!r}) needs tokens_per_frame= (the layout's frame size)"
        )
      tpf = 1
  else:
    tpf = 1
  _device_chunks(t, n, token_layout, tpf)  # validates divisibility with a clear message
  if n == 1:
    return hop.whole(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, return_lse=return_lse)

  plans, table, uniform = _build_plans(mask, t, n, token_layout, tpf, _uniform)
  if hop.check is not None:  # fail before tracing, naming the hop mask the kernel cannot do
    for call in (c for plan in plans for c in plan):
      hop.check(call.mask, call.q_hi - call.q_lo, call.kv_hi - call.kv_lo, segment_ids is not None)
  cfg = _RingCfg(axis_name, n, plans, table, uniform, hop, scale, _permute, _barrier)
  batch, heads = _mesh_axes(mesh, b, hq, k.shape[2])
  qspec = P(batch, axis_name, heads, None)
  lse_spec = P(batch, heads, axis_name)
  seg_spec = P(batch, axis_name)

  def local(q, k, v, seg_q, seg_kv):
    seg_all = None if seg_kv is None else lax.all_gather(seg_kv, axis_name)  # [N, B, c]
    if return_lse:
      return _ring_out_lse(cfg, q, k, v, seg_q, seg_all)
    return _ring_out(cfg, q, k, v, seg_q, seg_all)

  seg_q, seg_kv = (None, None) if segment_ids is None else segment_ids
  fn = jax.shard_map(
    local,
    in_specs=(qspec, qspec, qspec, seg_spec, seg_spec),
    out_specs=(qspec, lse_spec) if return_lse else qspec,
    check_vma=False,
  )
  return fn(q, k, v, seg_q, seg_kv)


def ring_flops(num_tokens: int, num_heads: int, head_dim: int, *, causal: bool, backward: bool) -> float:
  """Attention matmul FLOPs (4 T^2 H D forward, 2.5x that backward; halved under a causal mask)."""
  f = 4.0 * num_tokens**2 * num_heads * head_dim * (0.5 if causal else 1.0)
  return f * (3.5 if backward else 1.0)


__all__ = ["TOKEN_LAYOUTS", "HopKernel", "ring_attention", "ring_flops", "token_permutation"]
