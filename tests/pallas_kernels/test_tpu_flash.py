"""TPU kernel specifics: schedules (EMPTY tiles neither visited nor DMA'd), the Mosaic TPU interpreter, and
cross-lowering to Mosaic TPU on a machine without a TPU.

The numerical sweep lives in test_flash_ops.py (JAX's grid interpreter); here the same kernels also run under
`pltpu.InterpretParams()` (the Mosaic TPU interpreter, which simulates VMEM/SMEM, DMAs and semaphores and
raises on out-of-bounds reads), and lower to `tpu_custom_call` for a TPU v5e target, which checks block shapes
and every primitive inside the kernels against the Mosaic lowering rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from pallas_kernels import ops, reference
from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation
from pallas_kernels.tpu import flash, schedule

MASKS = [
  MaskSpec.causal(),
  MaskSpec.bidirectional(),
  MaskSpec.frame_causal(24, video_tokens=96).shifted(q_offset=50, kv_offset=7),
  MaskSpec.window(40, 9).shifted(q_offset=100),
  MaskSpec.window(None, 0).shifted(kv_offset=300),  # nothing visible at all
  MaskSpec.causal().shifted(q_offset=3, kv_offset=61),
]


def _rel_table(mask, n_rows, n_cols, b_row, b_col, transposed):
  rows = np.arange(n_rows)[:, None] * b_row
  cols = np.arange(n_cols)[None, :] * b_col
  rel = mask.tile_relation(cols, rows, b_col, b_row) if transposed else mask.tile_relation(rows, cols, b_row, b_col)
  return np.broadcast_to(np.asarray(rel), (n_rows, n_cols))


def _visits(sched, arrs, b, h, i):
  arr, cnt = (np.asarray(a) for a in arrs)
  steps = [int(sched.block(b, h, i, j, arr, cnt)) for j in range(sched.width)]
  return steps, int(sched.count(b, h, i, arr, cnt))


def _check_padding(steps, count):
  """Steps past the count repeat the last visited block: the pipeline sees no new block index, so no DMA."""
  if count:
    assert all(x == steps[count - 1] for x in steps[count:])
  else:
    assert len(set(steps)) == 1


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m.kind}-{m.q_offset}-{m.kv_offset}")
@pytest.mark.parametrize("transposed", [False, True])
def test_range_schedule_visits_exactly_the_nonempty_tiles(mask, transposed):
  t, s, bq, bk = 192, 224, 32, 16
  n_rows, n_cols, b_row, b_col = (s // bk, t // bq, bk, bq) if transposed else (t // bq, s // bk, bq, bk)
  sched, arrs = schedule._range_sched(mask, n_rows, n_cols, b_row, b_col, transposed)
  rel = _rel_table(mask, n_rows, n_cols, b_row, b_col, transposed)
  assert sched.width == max(1, int((rel != TileRelation.EMPTY).sum(1).max()))  # grid shrunk to the longest row
  for i in range(n_rows):
    steps, count = _visits(sched, arrs, 0, 0, i)
    assert steps[:count] == list(np.flatnonzero(rel[i] != TileRelation.EMPTY))
    _check_padding(steps, count)


def test_list_schedule_compacts_dedups_and_respects_mask():
  rng = np.random.default_rng(0)
  b, hq, nq, nk, bq, bk = 2, 4, 6, 7, 32, 32
  idx = rng.integers(0, nk, (b, 1, nq, 5)).astype(np.int32)  # duplicates likely, shared over heads
  cnt = rng.integers(0, 6, (b, 1, nq)).astype(np.int32)
  layout = BlockLayout(jnp.asarray(idx), jnp.asarray(cnt), bq, bk)
  mask = MaskSpec.causal().shifted(q_offset=40)
  (fs, farr), (bs, barr) = schedule._list_scheds(mask, layout, b, hq, nq, nk)
  rel = _rel_table(mask, nq, nk, bq, bk, False)
  expect = np.zeros((b, nq, nk), bool)
  for bi in range(b):
    for i in range(nq):
      want = sorted({int(x) for x in idx[bi, 0, i, : cnt[bi, 0, i]] if rel[i, x] != TileRelation.EMPTY})
      expect[bi, i, want] = True
      for h in range(hq):
        steps, count = _visits(fs, farr, bi, h, i)
        assert steps[:count] == want
        _check_padding(steps, count)
    for j in range(nk):  # transposed lists for dK/dV
      steps, count = _visits(bs, barr, bi, 0, j)
      assert steps[:count] == list(np.flatnonzero(expect[bi, :, j]))
      _check_padding(steps, count)


def _inputs(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  seg = (
    jnp.asarray(np.sort(rng.integers(0, 2, (b, t)), axis=1), jnp.int32),
    jnp.asarray(np.sort(rng.integers(0, 2, (b, s)), axis=1), jnp.int32),
  )
  return mk(b, t, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, t, hq, d), mk(b, hq, t), seg


def test_mosaic_tpu_interpreter_matches_reference():
  """Forward and backward (with an lse cotangent) under pltpu.InterpretParams: segments, GQA 2, a layout."""
  q, k, v, do, dl, seg = _inputs(1, 1, 64, 96, 2, 1, 32)
  rng = np.random.default_rng(1)
  layout = BlockLayout.from_block_mask(rng.random((1, 2, 2, 3)) < 0.7, 32, 32)
  mask = MaskSpec.causal().shifted(q_offset=40)
  kw = dict(mask=mask, scale=0.2, layout=layout, interpret=pltpu.InterpretParams(), config=None)
  out, lse = flash.flash_forward(q, k, v, seg, **kw)
  dq, dk, dv = flash.flash_backward(q, k, v, seg, out, lse, do, dlse=dl, **kw)

  def ref(q, k, v):
    return reference.attention(q, k, v, mask=mask, segment_ids=seg, layout=layout, scale=0.2, return_lse=True)

  (ref_out, ref_lse), vjp = jax.vjp(ref, q, k, v)
  ref_grads = vjp((do, jnp.where(jnp.isfinite(ref_lse), dl, 0.0)))
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(np.asarray(ref_lse))
  assert np.abs(np.asarray(lse)[fin] - np.asarray(ref_lse)[fin]).max() <= 1e-5
  for x, r in ((out, ref_out), (dq, ref_grads[0]), (dk, ref_grads[1]), (dv, ref_grads[2])):
    assert not np.isnan(np.asarray(x)).any()
    assert np.abs(np.asarray(x) - np.asarray(r)).max() <= 1e-5 * max(1.0, np.abs(np.asarray(r)).max())


TPU_V5E = AbstractMesh(
  (1,),
  ("x",),
  (AxisType.Explicit,),
  abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
)


@pytest.mark.parametrize(
  "mask,segments,layout_heads,dtype,group",
  [
    (MaskSpec.causal(), False, None, jnp.bfloat16, 1),
    (MaskSpec.frame_causal(64, video_tokens=256).shifted(q_offset=128), True, None, jnp.bfloat16, 4),
    (MaskSpec.window(100, 20).shifted(q_offset=512, kv_offset=17), True, None, jnp.float32, 2),
    (MaskSpec.bidirectional(), True, True, jnp.bfloat16, 2),
  ],
)
def test_cross_lowers_to_mosaic_tpu(mask, segments, layout_heads, dtype, group):
  """jit(grad(flash_attention(backend="tpu"))) lowers to three Mosaic kernels for a TPU target, on CPU."""
  b, t, s, hkv, d = 1, 512, 768, 2, 128
  hq = hkv * group
  q, k, v, do, dl, seg = _inputs(2, b, t, s, hq, hkv, d, dtype)
  layout = None
  if layout_heads:
    rng = np.random.default_rng(2)
    layout = BlockLayout.from_block_mask(rng.random((1, hq, t // 128, s // 128)) < 0.5, 128, 128)

  def loss(q, k, v):
    out, lse = ops.flash_attention(
      q, k, v, mask=mask, segment_ids=seg if segments else None, layout=layout, return_lse=True, backend="tpu"
    )
    return jnp.sum(out.astype(jnp.float32) * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * dl)

  with jax.sharding.use_abstract_mesh(TPU_V5E):
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV
  for name in ("vidlm_flash_fwd", "vidlm_flash_dq", "vidlm_flash_dkv"):
    assert name in text


def test_supports_requires_lane_sized_blocks_on_hardware():
  q = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  cfg = flash.TpuFlashConfig(block_q=64, block_kv=128)
  assert flash.supports(q, q, q, None, MaskSpec.causal(), config=cfg)
  assert not flash.supports(q, q, q, None, MaskSpec.causal(), config=cfg, hardware=True)
  assert flash.supports(q, q, q, None, MaskSpec.causal(), config=flash.TpuFlashConfig(256, 128), hardware=True)
  assert not flash.supports(q, q, q, None, MaskSpec.causal(), config=flash.TpuFlashConfig(96, 128))
