"""Mosaic GPU block-sparse kernels: list building, interpret-mode parity, CUDA cross-lowering, GPU parity.

* `transpose_block_lists` / `forward_lists` against a plain-Python construction of the same lists.
* Interpret mode (`plgpu.InterpretGPUParams`: uninitialised memory is NaN, out-of-bounds reads raise) runs the
  real kernels on CPU against `reference.attention(..., layout=...)` given the same layout: forward, lse and
  dq/dk/dv, fresh random inputs, garbage in the kv_indices entries past the counts, q blocks with nothing
  listed. The kernels take bf16/fp16 only, so the tolerance is the dense interpret tests' 1e-2 (relative L2).
* Cross-lowering to CUDA checks the real Mosaic GPU path (and that `ops` dispatches a layout to these kernels).
* `gpu`-marked tests compare against the fp32 reference on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops, reference
from pallas_kernels.gpu import sparse_schedule
from pallas_kernels.gpu.sparse_backward import sparse_backward
from pallas_kernels.gpu.sparse_forward import sparse_forward
from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation, transpose_block_lists


def _rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  assert not np.isnan(a).any(), "NaN in kernel output (an element was never written)"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _random_layout(rng, nb, nh, n_q, n_k, density, block_kv, *, empty_rows=(), poison=True, dup=False):
  """Random BlockLayout: unsorted lists, garbage past the counts, optional duplicates and empty rows."""
  w = max(1, int(round(density * n_k)) + 1)
  idx = np.zeros((nb, nh, n_q, w), np.int32)
  cnt = np.zeros((nb, nh, n_q), np.int32)
  for i in np.ndindex(nb, nh, n_q):
    c = int(rng.integers(1, w + 1))
    row = rng.permutation(n_k)[:c]
    if dup and c > 1:
      row[-1] = row[0]
    idx[i][:c] = row
    cnt[i] = c
    if poison:  # entries past the count must never be read as blocks
      idx[i][c:] = rng.choice([-(2**31), 2**31 - 1, -1, n_k, n_k + 7], size=w - c)
  for qi in empty_rows:
    cnt[:, :, qi] = 0
  return BlockLayout(jnp.asarray(idx), jnp.asarray(cnt), 128, block_kv)


def test_transpose_block_lists_matches_python():
  rng = np.random.default_rng(0)
  nb, nq, nk, w = 3, 6, 9, 5
  idx = np.stack([rng.permutation(nk)[:w] for _ in range(nb * nq)]).reshape(nb, nq, w).astype(np.int32)
  cnt = rng.integers(0, w + 1, (nb, nq)).astype(np.int32)
  idx[0, 0, 0], cnt[0, 0] = -3, max(cnt[0, 0], 1)  # out of range: ignored
  tags = rng.integers(0, 2, idx.shape).astype(np.int32)
  q_idx, start, mid = jax.jit(transpose_block_lists, static_argnums=2)(idx, cnt, nk, tags)
  assert q_idx.shape == (nb, nq * w) and start.shape == (nb, nk + 1) and mid.shape == (nb, nk)
  for b in range(nb):
    for j in range(nk):
      hits = [(tags[b, i, e], i) for i in range(nq) for e in range(cnt[b, i]) if idx[b, i, e] == j]
      want = [i for t, i in hits if t == 0] + [i for t, i in hits if t == 1]
      assert list(np.asarray(q_idx[b, start[b, j] : start[b, j + 1]])) == want
      assert int(mid[b, j] - start[b, j]) == sum(t == 0 for t, _ in hits)
    assert np.all(np.asarray(q_idx[b, start[b, -1] :]) == 0)


def test_forward_lists_dedupe_drop_empty_full_first():
  rng = np.random.default_rng(1)
  mask = MaskSpec.causal()
  lay = _random_layout(rng, 1, 2, 4, 8, 0.6, 64, dup=True)
  shp = sparse_schedule.shape_of(lay, 8 * 64)
  idx, cnt, n_full = (np.asarray(x) for x in sparse_schedule.forward_lists(mask, lay, shp))
  raw_idx, raw_cnt = np.asarray(lay.kv_indices), np.asarray(lay.kv_counts)
  for i in np.ndindex(1, 2, 4):
    listed = {int(j) for j in raw_idx[i][: raw_cnt[i]]}
    rel = {j: int(mask.tile_relation(i[2] * 128, j * 64, 128, 64)) for j in listed}
    full = sorted(j for j in listed if rel[j] == TileRelation.FULL)
    part = sorted(j for j in listed if rel[j] == TileRelation.PARTIAL)
    assert list(idx[i][: cnt[i]]) == full + part and n_full[i] == len(full)


def _sink_layout(rng, nb, nh, n_q, n_k, extra, block_kv, sink=0):
  """Every q block lists kv block `sink` (a hot column, as static / xattention layouts have) plus `extra` others."""
  w = extra + 1
  idx = np.zeros((nb, nh, n_q, w), np.int32)
  for i in np.ndindex(nb, nh, n_q):
    others = [j for j in rng.permutation(n_k) if j != sink][:extra]
    idx[i] = [*others[: w // 2], sink, *others[w // 2 :]]
  return BlockLayout(jnp.asarray(idx), jnp.full((nb, nh, n_q), w, jnp.int32), 128, block_kv)


@pytest.mark.parametrize("min_chunk", [1, 3])
def test_dkv_items_cover_every_run_once(min_chunk):
  """Items tile each kv block's group run exactly once, split runs obey the chunk and slot bounds, LPT order."""
  rng = np.random.default_rng(2)
  nb, hq, hkv, n_q, n_k = 2, 4, 2, 12, 10
  lay = _sink_layout(rng, nb, hq, n_q, n_k, 2, 128, sink=n_k - 1)
  shp = sparse_schedule.shape_of(lay, n_k * 128)

  def lists(lay):  # jitted whole, as ops runs them: one compile instead of dozens of eager ones
    bwd = sparse_schedule.backward_lists(sparse_schedule.forward_lists(MaskSpec.bidirectional(), lay, shp), shp)
    return bwd, sparse_schedule.dkv_items(bwd, shp, hq, hkv, min_chunk=min_chunk)

  bwd, dkv = jax.jit(lists)(lay)
  items, slot_run, run_block = (np.asarray(x) for x in dkv)
  p = sparse_schedule.dkv_slots(shp)
  start = np.asarray(bwd[1])
  assert items.shape == (nb, hkv, 4, n_k + p) and slot_run.shape == (nb, hkv, p) and run_block.shape == (nb, hkv, p // 2)
  n_split_total = 0
  for b in range(nb):
    for h in range(hkv):
      lens = sum(start[b, h * 2 + g, 1:] - start[b, h * 2 + g, :-1] for g in range(2))
      j, lo, hi, slot = items[b, h]
      live = slot >= -1
      n_sp = int(np.sum(slot >= 0))
      assert np.all(slot[:n_sp] >= 0) and np.all(np.diff((hi - lo)[:n_sp]) <= 0)  # split chunks first, longest first
      assert np.all(np.diff(j[n_sp : live.sum()]) > 0)  # then the other kv blocks in ascending order
      assert np.all(slot[~live] == -2) and np.all(~live[live.sum() :])
      for kb in range(n_k):
        mine = live & (j == kb)
        ranges = sorted(zip(lo[mine], hi[mine], slot[mine], strict=True))
        assert ranges[0][0] == 0 and ranges[-1][1] == lens[kb]
        assert all(a[1] == b_[0] for a, b_ in zip(ranges, ranges[1:], strict=False))  # contiguous, no overlap
        if len(ranges) == 1:
          assert ranges[0][2] == -1  # a whole run writes dK/dV directly
        else:
          n_split_total += 1
          slots = [r[2] for r in ranges]
          assert min(slots) >= 0 and len(set(slots)) == len(slots)
          runs = {int(slot_run[b, h, sl]) for sl in slots}
          assert len(runs) == 1 and run_block[b, h, runs.pop()] == kb
      assert np.sum(slot >= 0) <= p
  assert n_split_total > 0  # the hot column was split


def _inputs(key, b, t, s, hq, hkv, d, dtype, seg: bool):
  ks = jax.random.split(key, 7)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
  dlse = jax.random.normal(ks[6], (b, hq, t), jnp.float32)
  segment_ids = None
  if seg:
    qs = jnp.sort(jax.random.randint(ks[4], (b, t), 0, 3), axis=1).astype(jnp.int32)
    kvs = jnp.sort(jax.random.randint(ks[5], (b, s), 0, 3), axis=1).astype(jnp.int32)
    segment_ids = (qs, kvs)
  return q, k, v, do, dlse, segment_ids


def _kernel_and_reference(q, k, v, do, dlse, segment_ids, layout, *, mask, interpret, reuse_lists=True):
  """((out, lse, (dq, dk, dv)), (r_out, r_lse, r_grads)): a pure function, jitted whole in the `gpu` tests.

  reuse_lists: the backward walks the forward's lists (what `ops` does), else it builds them itself."""
  scale = q.shape[-1] ** -0.5
  (out, lse), fl = sparse_forward(
    q, k, v, segment_ids, layout, mask=mask, scale=scale, interpret=interpret, return_lists=True
  )
  g = sparse_backward(
    q, k, v, segment_ids, layout, out, lse, do, mask=mask, scale=scale, interpret=interpret, dlse=dlse,
    fwd_lists=fl if reuse_lists else None,
  )

  def ref(q, k, v):
    return reference.attention(q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, scale=scale, return_lse=True)

  (r_out, r_lse), vjp = jax.vjp(ref, q, k, v)
  return (out, lse, g), (r_out, r_lse, vjp((do, dlse)))


def _interpret(q, k, v, do, dlse, segment_ids, layout, *, mask, reuse_lists=True):
  """`_kernel_and_reference` in interpret mode, jitted whole: one XLA program instead of ~200 eager ones (the list
  building, the reference and its vjp op by op): a fifth to a third less CPU time on these tests."""
  run = jax.jit(functools.partial(_kernel_and_reference, mask=mask, interpret=True, reuse_lists=reuse_lists))
  return run(q, k, v, do, dlse, segment_ids, layout)


def _compare(q, kernel, ref, tol=1e-2, gtol=2e-2):
  (out, lse, grads), (r_out, r_lse, r_grads) = kernel, ref
  assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == r_lse.shape
  assert _rel_err(out, r_out) < tol
  lse, r_lse = np.asarray(lse), np.asarray(r_lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
  fin = np.isfinite(r_lse)
  np.testing.assert_allclose(lse[fin], r_lse[fin], atol=2e-2, rtol=1e-3)
  assert np.all(np.asarray(out, np.float32)[~fin.transpose(0, 2, 1)] == 0.0)  # rows that see nothing
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert _rel_err(g, r) < gtol, name


# (dtype, hq, hkv, layout heads "hq" | 1, t, s, block_kv, mask, segment ids, q blocks with nothing listed)
_INTERP_CASES = [
  (jnp.bfloat16, 2, 1, "hq", 256, 256, 128, MaskSpec.causal(), False, (1,)),  # GQA, per-head lists
  (
    jnp.float16,
    2,
    2,
    1,
    256,
    256,
    64,
    MaskSpec.frame_causal(96, 192),
    True,
    (),
  ),  # shared lists, block_kv 64 (one dK/dV warpgroup), segment ids
  (jnp.bfloat16, 2, 1, 1, 256, 384, 128, MaskSpec.causal().shifted(128, 0), False, (0,)),  # a ring-hop offset
  (jnp.bfloat16, 1, 1, "hq", 128, 256, 64, MaskSpec.bidirectional(), False, ()),
]


@pytest.mark.parametrize("case", range(len(_INTERP_CASES)))
def test_interpret_matches_reference(case):
  dtype, hq, hkv, nh, t, s, bk, mask, seg, empty = _INTERP_CASES[case]
  rng = np.random.default_rng(50 + case)
  lay = _random_layout(rng, 1, hq if nh == "hq" else 1, t // 128, s // bk, 0.5, bk, empty_rows=empty, dup=case == 3)
  q, k, v, do, dlse, segment_ids = _inputs(jax.random.key(100 + case), 1, t, s, hq, hkv, 64, dtype, seg)
  kernel, ref = _interpret(q, k, v, do, dlse, segment_ids, lay, mask=mask)
  _compare(q, kernel, ref)
  if empty:  # a q block with nothing listed: out 0, lse -inf, dq 0
    rows = slice(empty[0] * 128, empty[0] * 128 + 128)
    assert np.all(np.asarray(kernel[1])[:, :, rows] == -np.inf)
    assert np.all(np.asarray(kernel[2][0], np.float32)[:, rows] == 0.0)


@pytest.mark.parametrize("nh", ["hq", 1])
def test_interpret_hot_column_split(monkeypatch, nh):
  """A sink listed by every q block: its dK/dV run is split over several CTAs whose fp32 partials are summed."""
  monkeypatch.setattr(sparse_schedule, "DKV_MIN_CHUNK", 1)
  rng = np.random.default_rng(9)
  hq, hkv, t = 2, 1, 384
  lay = _sink_layout(rng, 1, hq if nh == "hq" else 1, t // 128, t // 128, 1, 128)
  shp = sparse_schedule.shape_of(lay, t)
  _, fwd, bwd = sparse_schedule.build(MaskSpec.bidirectional(), lay, t)
  items = np.asarray(sparse_schedule.dkv_items(bwd, shp, hq, hkv)[0])
  assert np.sum(items[0, 0, 3] >= 0) >= 2  # the sink's run is cut into chunks with partial slots
  q, k, v, do, dlse, _ = _inputs(jax.random.key(11), 1, t, t, hq, hkv, 64, jnp.bfloat16, False)
  kernel, ref = _interpret(q, k, v, do, dlse, None, lay, mask=MaskSpec.bidirectional(), reuse_lists=nh == 1)
  _compare(q, kernel, ref)


def test_layout_reasons():
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  lay = BlockLayout(jnp.zeros((1, 1, 2, 1), jnp.int32), jnp.ones((1, 1, 2), jnp.int32), 128, 128)
  assert ops.unsupported_reason(q, k, k, mask=MaskSpec.causal(), layout=lay, backend="gpu") is None
  lay64 = BlockLayout(jnp.zeros((1, 1, 4, 1), jnp.int32), jnp.ones((1, 1, 4), jnp.int32), 64, 128)
  assert "block_q=128" in ops.unsupported_reason(q, k, k, mask=MaskSpec.causal(), layout=lay64, backend="gpu")
  lay3 = BlockLayout(jnp.zeros((1, 3, 2, 1), jnp.int32), jnp.ones((1, 3, 2), jnp.int32), 128, 128)
  assert "leading dims" in ops.unsupported_reason(q, k, k, mask=MaskSpec.causal(), layout=lay3, backend="gpu")
  q256 = jax.ShapeDtypeStruct((1, 256, 4, 256), jnp.bfloat16)
  k256 = jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16)
  assert "head_dim=256" in ops.unsupported_reason(q256, k256, k256, mask=MaskSpec(), layout=lay, backend="gpu")
  with pytest.raises(ValueError, match="block_q=128"):
    sparse_forward(
      jnp.zeros(q.shape, q.dtype),
      jnp.zeros(k.shape, k.dtype),
      jnp.zeros(k.shape, k.dtype),
      None,
      lay64,
      mask=MaskSpec.causal(),
      scale=1.0,
    )


# Cross-lowering to CUDA on CPU: ops dispatches a layout to the three sparse kernels (forward, dQ, dK/dV).
_LOWER_CASES = [
  (jnp.bfloat16, 128, MaskSpec.causal(), False, 4, 2, "hq", 128),
  (jnp.float16, 64, MaskSpec.frame_causal(64, 256), True, 4, 1, 1, 64),
  (jnp.bfloat16, 128, MaskSpec.bidirectional(), False, 2, 2, 1, 64),
]


@pytest.mark.parametrize("case", range(len(_LOWER_CASES)))
@pytest.mark.parametrize("return_lse", [False, True])
def test_cuda_cross_lowering_through_ops(case, return_lse, monkeypatch):
  dtype, d, mask, seg, hq, hkv, nh, bk = _LOWER_CASES[case]
  b, t, s = 2, 512, 1024
  nh = hq if nh == "hq" else nh
  q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  sg = (jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)) if seg else None
  idx = jax.ShapeDtypeStruct((b, nh, t // 128, 3), jnp.int32)
  cnt = jax.ShapeDtypeStruct((b, nh, t // 128), jnp.int32)

  def loss(q, k, v, sg, idx, cnt):
    lay = BlockLayout(idx, cnt, 128, bk)
    r = ops.block_sparse_attention(q, k, v, mask=mask, layout=lay, segment_ids=sg, backend="gpu", return_lse=return_lse)
    out = r[0] if return_lse else r
    extra = jnp.sum(r[1]) if return_lse else 0.0
    return jnp.sum(out.astype(jnp.float32)) + extra

  built = []  # the forward lists are built once: the backward gets them as a custom_vjp residual
  fl = sparse_schedule.forward_lists
  monkeypatch.setattr(sparse_schedule, "forward_lists", lambda *a: built.append(1) or fl(*a))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, sg, idx, cnt).lower(lowering_platforms=("cuda",)).as_text()
  assert len(built) == 1
  assert text.count("mosaic_gpu_v2") == 3  # forward, dQ, dK/dV; no dense fallback (it would have no kernel)
  assert "sort" in text  # the lists (and their transpose) are built on device
  assert "stablehlo.while" not in text  # the binary searches are unrolled (a GPU while loop cost ~0.5 ms per call)


# ---------------------------------------------------------------------------------------------------
# On the device
# ---------------------------------------------------------------------------------------------------

_GPU_CASES = [
  # (dtype, d, hq, hkv, layout heads, t, s, block_kv, mask, seg, density)
  (jnp.bfloat16, 128, 4, 2, "hq", 2048, 2048, 128, MaskSpec.causal(), False, 0.3),
  (jnp.bfloat16, 128, 8, 2, 1, 1024, 2048, 64, MaskSpec.bidirectional(), False, 0.25),
  (jnp.float16, 64, 4, 1, "hq", 2048, 2048, 128, MaskSpec.frame_causal(256, 1536), True, 0.4),
  (jnp.bfloat16, 128, 2, 2, 1, 1024, 2048, 128, MaskSpec.causal().shifted(1024, 0), False, 0.5),
]
_NO_AUTOTUNE = {"xla_gpu_autotune_level": 0}  # see test_gpu_flash.py


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_GPU_CASES)))
def test_gpu_matches_reference(case):
  dtype, d, hq, hkv, nh, t, s, bk, mask, seg, dens = _GPU_CASES[case]
  rng = np.random.default_rng(300 + case)
  lay = _random_layout(rng, 2, hq if nh == "hq" else 1, t // 128, s // bk, dens, bk, empty_rows=(1,), dup=True)
  make = jax.jit(_inputs, static_argnums=range(1, 9))
  q, k, v, do, dlse, segment_ids = make(jax.random.key(400 + case), 2, t, s, hq, hkv, d, dtype, seg)
  run = jax.jit(functools.partial(_kernel_and_reference, mask=mask, interpret=False), compiler_options=_NO_AUTOTUNE)
  kernel, ref = run(q, k, v, do, dlse, segment_ids, lay)
  _compare(q, kernel, ref)


@pytest.mark.gpu
def test_gpu_hot_column_split():
  """A sink column long enough to be split with the default chunk (nQ = 64, GQA 2): fp32 partials merged."""
  rng = np.random.default_rng(17)
  hq, hkv, t, d = 4, 2, 8192, 128
  lay = _sink_layout(rng, 1, hq, t // 128, t // 128, 4, 128)
  shp = sparse_schedule.shape_of(lay, t)
  _, _, bwd = sparse_schedule.build(MaskSpec.causal(), lay, t)
  assert int(np.sum(np.asarray(sparse_schedule.dkv_items(bwd, shp, hq, hkv)[0])[..., 3, :] >= 0)) >= 2
  q, k, v, do, dlse, _ = jax.jit(_inputs, static_argnums=range(1, 9))(
    jax.random.key(21), 1, t, t, hq, hkv, d, jnp.bfloat16, False
  )
  run = jax.jit(
    functools.partial(_kernel_and_reference, mask=MaskSpec.causal(), interpret=False), compiler_options=_NO_AUTOTUNE
  )
  kernel, ref = run(q, k, v, do, dlse, None, lay)
  _compare(q, kernel, ref)


@pytest.mark.gpu
def test_gpu_grad_through_ops():
  rng = np.random.default_rng(7)
  b, t, hq, hkv, d = 1, 4096, 4, 1, 128
  lay = _random_layout(rng, 1, hq, t // 128, t // 128, 0.2, 128, poison=False)
  q, k, v, do, _, _ = jax.jit(_inputs, static_argnums=range(1, 9))(
    jax.random.key(3), b, t, t, hq, hkv, d, jnp.bfloat16, False
  )
  mask = MaskSpec.causal()

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  def both(q, k, v, lay):
    sparse = functools.partial(ops.block_sparse_attention, mask=mask, layout=lay, backend="gpu")
    g = jax.grad(loss(sparse), (0, 1, 2))(q, k, v)
    r = jax.grad(loss(lambda q, k, v: reference.attention(q, k, v, mask=mask, layout=lay)), (0, 1, 2))(q, k, v)
    return g, r

  g, r = jax.jit(both, compiler_options=_NO_AUTOTUNE)(q, k, v, lay)
  for a, b_ in zip(g, r, strict=True):
    assert _rel_err(a, b_) < 5e-2
