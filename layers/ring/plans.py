"""Static hop plans of ring attention: which sub-blocks each hop computes, under which (static) mask.

One job: for a mask in ORIGINAL positions, a token layout and a ring size, decide at trace time what every
(hop, device) pair computes. At hop t device r holds the K/V of source src = (r - t) mod N. For each (device,
source) pair we know which original positions the Q and K/V slots hold (`layouts.device_chunks`), so each
hop's mask is a static `MaskSpec` with offsets (`mask.shifted`), possibly on sub-blocks. The device index is
only known at run time, so a hop whose plan differs between devices is dispatched either without a
conditional, when every device runs the same shapes and masks at different slot offsets (`UniformCall`;
zigzag: two unmasked [c/2, c/2] blocks per hop, sliced at per-device offsets), or by `lax.switch` over the
distinct plans (fully masked hops are an empty plan: skipped). `vidlm.attention_calls` lists these calls to
check, before any device work, that the hop kernel can run each of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from layers.ring.layouts import device_chunks
from pallas_kernels.layout import MaskSpec, TileRelation


@dataclasses.dataclass(frozen=True)
class Call:
  """One local attention call of a hop: Q slots [q_lo, q_hi) x K/V slots [kv_lo, kv_hi) under `mask`."""

  q_lo: int
  q_hi: int
  kv_lo: int
  kv_hi: int
  mask: MaskSpec


Plan = tuple[Call, ...]
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


def _chunk_plan(mask: MaskSpec, qchunks, kvchunks) -> Plan:
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
    return Call(int(qstart[rows[0]]), int(qstart[rows[-1] + 1]), int(kstart[cols[0]]), int(kstart[cols[-1] + 1]), spec)

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


def _striped_plan(mask: MaskSpec, r: int, src: int, c: int, tpf: int, num_tokens: int) -> Plan:
  """Frame-striped hop plan. Device r holds frames m*N + r (m = 0, 1, ...) at compacted frame m.

  Query frame m*N + r sees key frame m'*N + src under frame-causal iff m'*N + src <= m*N + r, i.e.
  m' <= m when src <= r and m' <= m - 1 when src > r: frame-causal on compacted frames, keys shifted by one
  frame (kv_offset = tpf) when src > r. Under token-causal the diagonal frame needs the token order too:
  src == r is plain causal on compacted positions, src < r frame-causal, src > r frame-causal shifted.
  """
  if mask.q_offset or mask.kv_offset:
    raise ValueError("ring token_layout='frame_striped' needs a mask without q_offset/kv_offset")
  if mask.kind == "bidirectional":
    return (Call(0, c, 0, c, _FULL),)
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
  return (Call(0, c, 0, c, _normalize(spec, c, c)),)


@dataclasses.dataclass(frozen=True)
class UniformCall:
  """A call of the same shape and mask on every device, at per-device slot offsets (indexed by device)."""

  tq: int
  tk: int
  mask: MaskSpec
  q_lo: tuple[int, ...]
  kv_lo: tuple[int, ...]


def _cell_calls(mask: MaskSpec, qchunks, kvchunks) -> list[Call]:
  """One call per non-empty (Q chunk, K/V chunk) cell, masks normalised."""
  calls = []
  q0 = np.cumsum([0] + [ln for _, ln in qchunks])
  k0 = np.cumsum([0] + [ln for _, ln in kvchunks])
  for i, (qs, ql) in enumerate(qchunks):
    for j, (ks, kl) in enumerate(kvchunks):
      cell = mask.shifted(mask.q_offset + qs, mask.kv_offset + ks)
      if int(cell.tile_relation(0, 0, ql, kl)) != TileRelation.EMPTY:
        calls.append(Call(int(q0[i]), int(q0[i] + ql), int(k0[j]), int(k0[j] + kl), _normalize(cell, ql, kl)))
  return sorted(calls, key=lambda c: (c.q_hi - c.q_lo, c.kv_hi - c.kv_lo, repr(c.mask), c.q_lo, c.kv_lo))


def _uniform_hop(mask: MaskSpec, chunks, n: int, t: int) -> tuple[UniformCall, ...] | None:
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
    UniformCall(tq, tk, m, tuple(d[i].q_lo for d in per_dev), tuple(d[i].kv_lo for d in per_dev))
    for i, (tq, tk, m) in enumerate(sig[0])
  )


def build_plans(
  mask: MaskSpec, num_tokens: int, ring_size: int, token_layout: str, tpf: int, uniform: bool = True
) -> tuple[tuple[Plan, ...], tuple[tuple[int, ...], ...], tuple[tuple[UniformCall, ...] | None, ...]]:
  """(distinct plans, table[t][r] -> plan index, per-hop uniform calls or None).

  `tpf` is the frame size of the frame_striped layout (1 otherwise); `uniform=False` never builds uniform
  calls, so every hop whose plans differ between devices goes through `lax.switch` (benchmarks, tests).
  """
  n = ring_size
  c = num_tokens // n
  chunks = None if token_layout == "frame_striped" else device_chunks(num_tokens, n, token_layout)
  plans: list[Plan] = []
  index: dict[Plan, int] = {}
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


__all__ = ["Call", "Plan", "UniformCall", "build_plans"]
