"""Mosaic GPU flash attention: tile-range logic, interpret-mode parity, CUDA cross-lowering, GPU parity.

* Tile ranges: the kernels use pallas_kernels/tile_schedule.py, tested in test_tile_schedule.py.
* Interpret mode (`plgpu.InterpretGPUParams`) runs the real kernels (TMA, barriers, warpgroups) on CPU; only
  the register-operand wgmma is replaced by a dot there (see `pallas_kernels.gpu.common._acc_mm`). Tiny shapes: it is slow.
* Cross-lowering to CUDA on CPU catches layout/dtype/shape errors of the real Mosaic GPU path.
* `gpu`-marked tests compare against the fp32 reference on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.gpu import flash
from pallas_kernels.layout import MaskSpec


def _rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  assert not np.isnan(a).any(), "NaN in kernel output"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(key, b, t, s, hq, hkv, d, dtype, seg: bool):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
  segment_ids = None
  if seg:  # packed sequences: sorted ids, a few segments per row
    qs = jnp.sort(jax.random.randint(ks[4], (b, t), 0, 3), axis=1).astype(jnp.int32)
    kvs = jnp.sort(jax.random.randint(ks[5], (b, s), 0, 3), axis=1).astype(jnp.int32)
    segment_ids = (qs, kvs)
  return q, k, v, do, segment_ids


def _flash_and_reference(q, k, v, do, segment_ids, dlse, *, mask, cfg, interpret, grads: bool):
  """Kernel outputs and fp32 reference outputs for one case: ((out, lse, grads), (r_out, r_lse, r_grads)).

  Pure function of arrays, so the `gpu` tests run it under ONE jit: evaluated eagerly, the reference and its
  vjp are ~100 separate single-op XLA programs, each compiled (and its dots autotuned) on first use.
  """
  scale = q.shape[-1] ** -0.5
  out, lse = flash.flash_forward(q, k, v, segment_ids, mask=mask, scale=scale, interpret=interpret, config=cfg)

  def ref(q, k, v):
    return reference.attention(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, return_lse=True)

  if not grads:
    return (out, lse, None), (*ref(q, k, v), None)
  g = flash.flash_backward(
    q, k, v, segment_ids, out, lse, do, mask=mask, scale=scale, interpret=interpret, config=cfg, dlse=dlse
  )
  (r_out, r_lse), vjp = jax.vjp(ref, q, k, v)
  r_g = vjp((do, jnp.zeros(r_lse.shape, jnp.float32) if dlse is None else dlse))
  return (out, lse, g), (r_out, r_lse, r_g)


def _compare(q, kernel, ref, tol=1e-2):
  """Asserts kernel outputs match the reference: out/lse values, -inf pattern, zero dead rows, dq/dk/dv."""
  (out, lse, grads_k), (r_out, r_lse, r_grads) = kernel, ref
  assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == r_lse.shape
  assert _rel_err(out, r_out) < tol
  lse, r_lse = np.asarray(lse), np.asarray(r_lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
  fin = np.isfinite(r_lse)
  np.testing.assert_allclose(lse[fin], r_lse[fin], atol=2e-2, rtol=1e-3)
  # fully masked rows: exactly zero output
  dead = ~fin.transpose(0, 2, 1)  # [B, T, Hq]
  assert np.all(np.asarray(out, np.float32)[dead] == 0.0)
  if grads_k is None:
    return
  for name, g, r in zip(("dq", "dk", "dv"), grads_k, r_grads, strict=True):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert _rel_err(g, r) < 2e-2, name


def _check_against_reference(q, k, v, do, segment_ids, mask, cfg, interpret, grads=True, tol=1e-2, with_dlse=False):
  dlse = None
  if grads and with_dlse:  # cotangent of lse too (ring attention differentiates through it)
    dlse = jax.random.normal(jax.random.key(q.shape[1] + 17), (q.shape[0], q.shape[2], q.shape[1]))
  # jitted whole here too (interpret mode): one program instead of ~100 eagerly compiled ones
  run = jax.jit(functools.partial(_flash_and_reference, mask=mask, cfg=cfg, interpret=interpret, grads=grads))
  kernel, ref = run(q, k, v, do, segment_ids, dlse)
  _compare(q, kernel, ref, tol)


def test_supports():
  q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
  assert flash.supports(q, k, k, None, MaskSpec.causal())
  assert not flash.supports(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32), None, MaskSpec())
  assert not flash.supports(q[:, :100], k, k, None, MaskSpec())  # T not a multiple of 2*block_q
  assert not flash.supports(q[..., :96], k[..., :96], k[..., :96], None, MaskSpec())  # head dim 96
  assert not flash.supports(q, k[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2), None, MaskSpec())  # 4 % 3


# Interpret mode: the real kernels on CPU. Each case is a few seconds.
_INTERP_CASES = [
  # (dtype, d, hq, hkv, t, s, mask, seg)
  (jnp.bfloat16, 64, 2, 1, 128, 256, MaskSpec.causal(), False),
  (jnp.float16, 64, 2, 2, 128, 128, MaskSpec.window(40, 10).shifted(0, 0), True),
  (jnp.bfloat16, 64, 2, 1, 128, 256, MaskSpec.frame_causal(48, 96).shifted(64, 0), True),
  (jnp.bfloat16, 64, 1, 1, 128, 128, MaskSpec.causal().shifted(0, 64), False),  # fully masked rows
  (jnp.bfloat16, 64, 1, 1, 128, 128, MaskSpec.causal().shifted(0, 1000), False),  # a ring hop that sees nothing
]


@pytest.mark.parametrize("case", range(len(_INTERP_CASES)))
def test_interpret_matches_reference(case):
  dtype, d, hq, hkv, t, s, mask, seg = _INTERP_CASES[case]
  q, k, v, do, segment_ids = _inputs(jax.random.key(100 + case), 1, t, s, hq, hkv, d, dtype, seg)
  cfg = flash.FlashConfig(block_q=64, block_kv=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64)
  _check_against_reference(q, k, v, do, segment_ids, mask, cfg, interpret=True, with_dlse=case >= 2)


def test_interpret_hd256_forward():
  q, k, v, do, _ = _inputs(jax.random.key(7), 1, 128, 128, 1, 1, 256, jnp.bfloat16, False)
  _check_against_reference(q, k, v, do, None, MaskSpec.causal(), None, interpret=True, grads=False)


# Cross-lowering to CUDA on CPU: forward and backward through the custom_vjp.
_LOWER_CASES = [
  (jnp.bfloat16, 128, MaskSpec.causal(), False, 4, 2),
  (jnp.float16, 128, MaskSpec.bidirectional(), False, 2, 2),
  (jnp.bfloat16, 64, MaskSpec.frame_causal(64, 192), True, 4, 1),
  (jnp.float16, 64, MaskSpec.causal(), False, 2, 2),
  (jnp.bfloat16, 256, MaskSpec.bidirectional(), True, 2, 1),
  (jnp.float16, 256, MaskSpec.causal().shifted(128, 0), False, 2, 2),
]


@pytest.mark.parametrize("case", range(len(_LOWER_CASES)))
def test_cuda_cross_lowering(case):
  dtype, d, mask, seg, hq, hkv = _LOWER_CASES[case]
  b, t, s = 1, 256, 512
  q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  sg = (jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)) if seg else None

  def fwd_bwd(q, k, v, sg):
    out, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(q, k, v, sg, mask, d**-0.5), q, k, v)
    return out, vjp(out)

  text = jax.jit(fwd_bwd).trace(q, k, k, sg).lower(lowering_platforms=("cuda",)).as_text()
  # forward + dQ + dK/dV (hd256: separate dK and dV passes)
  n_kernels = 4 if flash.default_config(d).split_dkv else 3
  assert text.count("mosaic_gpu_v2") >= n_kernels


# ---------------------------------------------------------------------------------------------------
# On the device
# ---------------------------------------------------------------------------------------------------

_GPU_CASES = [
  (jnp.bfloat16, 128, 4, 4, 1024, 1024, MaskSpec.causal(), False),
  (jnp.bfloat16, 128, 8, 2, 1024, 2048, MaskSpec.bidirectional(), False),
  (jnp.float16, 64, 4, 2, 1024, 1024, MaskSpec.frame_causal(128, 768), True),
  (jnp.bfloat16, 64, 2, 1, 512, 1536, MaskSpec.window(300, 50).shifted(512, 0), True),
  (jnp.bfloat16, 256, 4, 2, 512, 1024, MaskSpec.causal(), False),
  (jnp.float16, 256, 2, 2, 512, 512, MaskSpec.bidirectional(), True),
  (jnp.bfloat16, 128, 2, 2, 512, 512, MaskSpec.causal().shifted(0, 256), False),
]


# One XLA program per test, GEMM autotuning off: the reference's fp32 dots are ground truth, not timed, and
# autotuning them (a fresh search for every shape) cost more than everything else in these tests. The Mosaic
# GPU kernels are custom calls and are not autotuned either way. Timings: pallas_kernels/gpu/NOTES.md.
_NO_AUTOTUNE = {"xla_gpu_autotune_level": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_GPU_CASES)))
def test_gpu_matches_reference(case):
  dtype, d, hq, hkv, t, s, mask, seg = _GPU_CASES[case]
  make = jax.jit(_inputs, static_argnums=range(1, 9))
  q, k, v, do, segment_ids = make(jax.random.key(200 + case), 2, t, s, hq, hkv, d, dtype, seg)
  dlse = jax.random.normal(jax.random.key(t + 17), (2, hq, t)) if case % 2 == 1 else None
  run = jax.jit(
    functools.partial(_flash_and_reference, mask=mask, cfg=None, interpret=False, grads=True),
    compiler_options=_NO_AUTOTUNE,
  )
  kernel, ref = run(q, k, v, do, segment_ids, dlse)
  _compare(q, kernel, ref)


@pytest.mark.gpu
def test_gpu_grad_through_custom_vjp():
  q, k, v, do, _ = jax.jit(_inputs, static_argnums=range(1, 9))(
    jax.random.key(3), 1, 2048, 2048, 4, 1, 128, jnp.bfloat16, False
  )
  mask = MaskSpec.causal()

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  def both(q, k, v):
    g = jax.grad(loss(lambda q, k, v: flash.flash_attention(q, k, v, None, mask, 0.088)), (0, 1, 2))(q, k, v)
    r = jax.grad(loss(lambda q, k, v: reference.attention(q, k, v, mask=mask, scale=0.088)), (0, 1, 2))(q, k, v)
    return g, r

  g, r = jax.jit(both, compiler_options=_NO_AUTOTUNE)(q, k, v)
  for a, b in zip(g, r, strict=True):
    assert _rel_err(a, b) < 5e-2
