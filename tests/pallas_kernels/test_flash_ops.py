"""pallas_kernels.ops in interpret mode (the TPU kernels on CPU) against the fp32 reference: forward and gradients.

Random configurations are drawn from a seeded RNG with fresh inputs each: lengths that are block multiples but
not powers of two (T != S too), every mask kind with offsets, segment ids (including rows that see nothing),
GQA ratios 1/2/8, fp32 and bf16, dense and block-sparse layouts. JAX's grid interpreter fills every output
buffer with NaN before the kernel runs (`test_interpret_poisons_unwritten_outputs` checks that premise), so an
element a kernel forgets to write fails the NaN checks below.

Tolerances: fp32 max-abs error <= 1e-5 x max|ref| (forward and gradients); bf16 forward <= 1e-2 x max|ref|,
gradients <= 2e-2 relative L2 (measured worst cases: fp32 1.0e-6, bf16 3.7e-3).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels import ops, reference
from pallas_kernels.layout import BlockLayout, MaskSpec
from pallas_kernels.tpu.flash import TpuFlashConfig

BLOCK = 32
LENGTHS = (64, 96, 160, 192, 224)  # multiples of the block, mostly not powers of two
KINDS = ("causal", "bidirectional", "frame_causal", "window")
GROUPS = (1, 2, 8)
N_CONFIGS = 50
# The interpreter's loops are tiny at these shapes; XLA's CPU backend optimisations only cost compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(f):
  return jax.jit(f, compiler_options=FAST_COMPILE)


@dataclasses.dataclass(frozen=True)
class Case:
  seed: int
  b: int
  t: int
  s: int
  hq: int
  hkv: int
  d: int
  dtype: str
  mask: MaskSpec
  segments: bool
  layout_shape: tuple[int, int] | None  # (batch, heads) of the BlockLayout, None for dense
  config: TpuFlashConfig
  return_lse: bool


def make_case(seed: int) -> Case:
  """Configuration `seed`; kinds, GQA ratios and dtypes cycle so that every combination appears."""
  rng = np.random.default_rng(seed)
  kind, group = KINDS[seed % 4], GROUPS[seed % 3]
  dtype = ("float32", "bfloat16")[(seed // 12) % 2]
  t = int(rng.choice(LENGTHS))
  s = t if rng.random() < 0.35 else int(rng.choice(LENGTHS))
  hkv = 1 if group == 8 else int(rng.choice([1, 2] if group == 2 else [1, 2, 4]))
  hq = hkv * group
  b = int(rng.choice([1, 2]))
  d = int(rng.choice([32, 64]))
  if kind == "causal":
    mask = MaskSpec.causal()
  elif kind == "bidirectional":
    mask = MaskSpec.bidirectional()
  elif kind == "frame_causal":
    tpf = int(rng.choice([4, 16, 24, 48]))
    video = None if rng.random() < 0.4 else tpf * int(rng.integers(0, max(t, s) // tpf + 1))
    mask = MaskSpec.frame_causal(tpf, video_tokens=video)
  else:
    left = None if rng.random() < 0.2 else int(rng.integers(0, 120))
    right = None if (left is not None and rng.random() < 0.2) else int(rng.integers(0, 60))
    mask = MaskSpec.window(left, right)
  if rng.random() < 0.5:
    mask = mask.shifted(q_offset=int(rng.integers(0, 260)), kv_offset=int(rng.integers(0, 200)))
  segments = bool(rng.random() < 0.35)
  layout_shape = None
  if rng.random() < 0.3:
    layout_shape = (int(rng.choice([1, b])), int(rng.choice([1, hq])))
  bq_dkv = 64 if (layout_shape is None and t % 64 == 0 and rng.random() < 0.3) else BLOCK
  return_lse = bool(rng.random() < 0.75)
  group_heads = bool(rng.random() < 0.7)  # one program per GQA group (default) or per q head
  config = TpuFlashConfig(
    block_q=BLOCK, block_kv=BLOCK, block_q_dkv=bq_dkv, block_kv_dkv=BLOCK, group_heads=group_heads
  )
  return Case(seed, b, t, s, hq, hkv, d, dtype, mask, segments, layout_shape, config, return_lse)


def make_inputs(case: Case):
  rng = np.random.default_rng(10_000 + case.seed)
  dt = jnp.dtype(case.dtype)
  q = jnp.asarray(rng.standard_normal((case.b, case.t, case.hq, case.d)), dt)
  k = jnp.asarray(rng.standard_normal((case.b, case.s, case.hkv, case.d)), dt)
  v = jnp.asarray(rng.standard_normal((case.b, case.s, case.hkv, case.d)), dt)
  do = jnp.asarray(rng.standard_normal((case.b, case.t, case.hq, case.d)), jnp.float32)
  dl = jnp.asarray(rng.standard_normal((case.b, case.hq, case.t)), jnp.float32)
  seg = None
  if case.segments:
    seg = (
      jnp.asarray(np.sort(rng.integers(0, 3, (case.b, case.t)), axis=1), jnp.int32),
      jnp.asarray(np.sort(rng.integers(0, 3, (case.b, case.s)), axis=1), jnp.int32),
    )
  layout = None
  if case.layout_shape is not None:
    nb, nh = case.layout_shape
    bm = rng.random((nb, nh, case.t // BLOCK, case.s // BLOCK)) < 0.5
    bm[0, 0, 0] = False  # a q block with nothing listed
    layout = BlockLayout.from_block_mask(bm, BLOCK, BLOCK)
  return q, k, v, do, dl, seg, layout


def loss_fn(fn, *, mask, seg, layout, scale, return_lse, do, dl):
  """Scalar loss over out (and lse, on the rows where it is finite) with fixed random cotangents."""

  def loss(q, k, v):
    res = fn(q, k, v, mask=mask, segment_ids=seg, layout=layout, scale=scale, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    total = jnp.sum(out.astype(jnp.float32) * do)
    if lse is not None:
      total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dl)
    return total, (out, lse)

  return loss


def rel_max(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def rel_l2(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def check_against_reference(out, lse, grads, ref_out, ref_lse, ref_grads, dtype, what=""):
  fp32 = jnp.dtype(dtype) == jnp.float32
  for name, x in [("out", out), *zip(("dq", "dk", "dv"), grads)]:
    assert not np.isnan(np.asarray(x, np.float32)).any(), f"{what}: NaN in {name} (unwritten or bad math)"
    assert np.isfinite(np.asarray(x, np.float32)).all(), f"{what}: inf in {name}"
  err = rel_max(out, ref_out)
  assert err <= (1e-5 if fp32 else 1e-2), f"{what}: out max-abs rel error {err:.2e}"
  if lse is not None:
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert not np.isnan(lse).any(), f"{what}: NaN in lse"
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse), err_msg=f"{what}: -inf rows differ")
    assert np.all(lse[~np.isfinite(ref_lse)] == -np.inf)
    fin = np.isfinite(ref_lse)
    if fin.any():
      lerr = np.abs(lse[fin] - ref_lse[fin]).max()
      assert lerr <= (1e-5 if fp32 else 1e-3) * max(1.0, np.abs(ref_lse[fin]).max()), f"{what}: lse error {lerr:.2e}"
  for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    if not np.any(np.asarray(rg)):
      assert not np.any(np.asarray(g, np.float32)), f"{what}: {name} should be exactly zero"
      continue
    err = rel_max(g, rg) if fp32 else rel_l2(g, rg)
    assert err <= (1e-5 if fp32 else 2e-2), f"{what}: {name} error {err:.2e}"


def run_case(case: Case, fn=None):
  q, k, v, do, dl, seg, layout = make_inputs(case)
  scale = float(case.d**-0.5) * (1.3 if case.seed % 2 else 1.0)
  kw = dict(mask=case.mask, seg=seg, layout=layout, scale=scale, return_lse=case.return_lse, do=do, dl=dl)
  if fn is None:
    backend_fn = ops.block_sparse_attention if layout is not None else ops.flash_attention

    def fn(*a, **k):
      return backend_fn(*a, backend="interpret", config=None if layout is not None else case.config, **k)

  (_, (out, lse)), grads = fast_jit(jax.value_and_grad(loss_fn(fn, **kw), argnums=(0, 1, 2), has_aux=True))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, (ref_out, ref_lse)), ref_grads = fast_jit(
    jax.value_and_grad(loss_fn(reference.attention, **kw), argnums=(0, 1, 2), has_aux=True)
  )(*f32)
  assert out.dtype == q.dtype and all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
  check_against_reference(out, lse, grads, ref_out, ref_lse, ref_grads, case.dtype, what=repr(case))


# ---- the random sweep -------------------------------------------------------------------------------------------


def test_config_sweep_covers_the_space():
  cases = [make_case(i) for i in range(N_CONFIGS)]
  assert {(c.mask.kind, c.hq // c.hkv, c.dtype) for c in cases} == {
    (k, g, d) for k in KINDS for g in GROUPS for d in ("float32", "bfloat16")
  }
  assert any(c.t != c.s for c in cases) and any(c.segments for c in cases) and any(c.layout_shape for c in cases)
  assert any(c.mask.q_offset or c.mask.kv_offset for c in cases)
  assert any(c.mask.kind == "frame_causal" and c.mask.video_tokens for c in cases)
  assert any(not c.return_lse for c in cases) and any(c.config.block_q_dkv != BLOCK for c in cases)
  dense_gqa = [c for c in cases if c.hq > c.hkv and c.layout_shape is None]
  assert any(c.config.group_heads for c in dense_gqa) and any(not c.config.group_heads for c in dense_gqa)
  assert any(c.hq > c.hkv and c.layout_shape and c.layout_shape[1] > 1 for c in cases)  # per-head lists


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_interpret_matches_reference(seed):
  run_case(make_case(seed))


# ---- premises and specific behaviour ----------------------------------------------------------------------------


def test_interpret_poisons_unwritten_outputs():
  """The sweep relies on the interpreter NaN-filling outputs: a kernel writing half its blocks leaves NaN."""

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((64, 32), jnp.float32)
  out = pl.pallas_call(
    kernel,
    grid=(2,),
    in_specs=[pl.BlockSpec((32, 32), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((32, 32), lambda i: (i, 0)),
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    interpret=True,
  )(x)
  assert np.all(np.asarray(out[:32]) == 1) and np.all(np.isnan(np.asarray(out[32:])))


def test_fully_masked_rows_out_zero_lse_neg_inf_and_finite_grads():
  b, t, h, d = 1, 64, 2, 32
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
  mask = MaskSpec.window(8, 0).shifted(q_offset=0, kv_offset=40)  # rows 0..39 see no key

  def loss(q, k, v):
    out, lse = ops.flash_attention(q, k, v, mask=mask, return_lse=True, backend="interpret")
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (out, lse)

  (_, (out, lse)), g = fast_jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  assert np.all(np.asarray(out)[0, :40] == 0) and np.all(np.asarray(lse)[0, :, :40] == -np.inf)
  assert np.all(np.isfinite(np.asarray(lse)[0, :, 40:]))
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  assert np.all(np.asarray(g[0])[0, :40] == 0)


def test_reference_backend_custom_vjp_matches_autodiff():
  """The dense fallback's hand-written backward (incl. the lse cotangent) equals autodiff of the reference."""
  case = dataclasses.replace(make_case(3), dtype="float32", return_lse=True, segments=True)
  run_case(case, fn=lambda *a, **k: ops.flash_attention(*a, backend="reference", **k))


def _small(seed=0, b=2, t=96, s=160, hq=4, hkv=2, d=32, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), dtype)
  return q, k, v


def test_checkpoint_remat_and_policy():
  q, k, v = _small(1)
  mask = MaskSpec.frame_causal(16, video_tokens=64).shifted(q_offset=64)

  def make_loss(fn):
    def loss(q, k, v):
      out, lse = fn(q, k, v, mask=mask, return_lse=True)
      return jnp.sum(jnp.tanh(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) ** 2) * 1e-2

    return loss

  loss = make_loss(lambda *a, **kw: ops.flash_attention(*a, backend="interpret", **kw))
  ref = fast_jit(jax.grad(make_loss(reference.attention), (0, 1, 2)))(q, k, v)
  policy = jax.checkpoint_policies.save_only_these_names("flash_out", "flash_lse")
  for fn in (loss, jax.checkpoint(loss), jax.checkpoint(loss, policy=policy)):
    g = fast_jit(jax.grad(fn, (0, 1, 2)))(q, k, v)
    for a, r in zip(g, ref):
      assert rel_max(a, r) <= 1e-5


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_shard_map(check_vma):
  """Batch over `data`, heads over `tensor` (kv heads split with their q groups): per-shard kernels."""
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  q, k, v = _small(3, b=2, t=96, s=96, hq=8, hkv=4)
  rng = np.random.default_rng(3)
  seg = tuple(jnp.asarray(np.sort(rng.integers(0, 2, (2, 96)), axis=1), jnp.int32) for _ in range(2))
  mask = MaskSpec.window(40, 8)
  hs, ss = P("data", None, "tensor", None), P("data", None)

  def local(q, k, v, qs, ks):
    return ops.flash_attention(q, k, v, mask=mask, segment_ids=(qs, ks), return_lse=True, backend="interpret")

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(hs, hs, hs, ss, ss), out_specs=(hs, P("data", "tensor", None)), check_vma=check_vma
  )

  def make_loss(fn):
    def loss(q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (out, lse)

    return loss

  f = make_loss(lambda q, k, v: sharded(q, k, v, *seg))
  r = make_loss(lambda q, k, v: reference.attention(q, k, v, mask=mask, segment_ids=seg, return_lse=True))
  (_, (out, lse)), g = fast_jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
  (_, (ref_out, ref_lse)), rg = fast_jit(jax.value_and_grad(r, (0, 1, 2), has_aux=True))(q, k, v)
  assert rel_max(out, ref_out) <= 1e-5
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  for a, b in zip(g, rg):
    assert rel_max(a, b) <= 1e-5


def test_layers_attention_flash_and_block_sparse_end_to_end():
  from layers.attention import attention  # noqa: PLC0415

  q, k, v = _small(4, dtype=jnp.bfloat16)
  mask = MaskSpec.causal().shifted(q_offset=64)
  rng = np.random.default_rng(4)
  layout = BlockLayout.from_block_mask(rng.random((1, 4, 3, 5)) < 0.6, 32, 32)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]

  def make_loss(fn, **kw):
    def loss(q, k, v):
      out, lse = fn(q, k, v, mask=mask, return_lse=True, **kw)
      return jnp.sum(out.astype(jnp.float32) ** 2), (out, lse)

    return loss

  for kernel, lay in (("flash", None), ("flash", layout), ("auto", layout)):
    loss = make_loss(attention, kernel=kernel, layout=lay)
    (_, (out, lse)), g = fast_jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    ref = make_loss(reference.attention, layout=lay)
    (_, (ref_out, ref_lse)), rg = fast_jit(jax.value_and_grad(ref, (0, 1, 2), has_aux=True))(*f32)
    assert out.dtype == jnp.bfloat16 and rel_max(out, ref_out) <= 2e-2
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    for a, b in zip(g, rg):
      assert rel_l2(a, b) <= 5e-2


def test_ring_style_hops_merge_and_split_backward():
  """What ring attention does: per-hop kernels merged through lse (differentiated through the merge), and the
  raw backward fed with the global (out, lse, dlse) per hop; both must equal the full attention's gradients."""
  q, k, v = _small(9, b=1, t=96, s=192, hq=4, hkv=2)
  rng = np.random.default_rng(9)
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dl = jnp.asarray(rng.standard_normal((1, 4, 96)), jnp.float32)
  full = MaskSpec.causal().shifted(q_offset=96)  # queries sit at 96..191, keys at 0..191
  hops = ((0, 96), (96, 192))

  def hop_mask(lo):
    return MaskSpec.causal().shifted(q_offset=96, kv_offset=lo)

  def merged(q, k, v):
    outs, lses = zip(
      *(
        ops.flash_attention(q, k[:, a:b], v[:, a:b], mask=hop_mask(a), return_lse=True, backend="interpret")
        for a, b in hops
      )
    )
    lse = jnp.logaddexp(*lses)
    out = sum(jnp.exp(l - lse).transpose(0, 2, 1)[..., None] * o for o, l in zip(outs, lses))
    return out, lse

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * do) + jnp.sum(fn(q, k, v)[1] * dl)

  ref_fn = lambda q, k, v: reference.attention(q, k, v, mask=full, return_lse=True)
  rg = fast_jit(jax.grad(loss(ref_fn), (0, 1, 2)))(q, k, v)
  g = fast_jit(jax.grad(loss(merged), (0, 1, 2)))(q, k, v)
  for a, b in zip(g, rg):
    assert rel_max(a, b) <= 1e-5

  out, lse = ref_fn(q, k, v)

  def split(q, k, v, out, lse):
    parts = [
      ops.attention_backward(q, k[:, a:b], v[:, a:b], out, lse, do, mask=hop_mask(a), dlse=dl, backend="interpret")
      for a, b in hops
    ]
    return (
      parts[0][0] + parts[1][0],
      jnp.concatenate([p[1] for p in parts], 1),
      jnp.concatenate([p[2] for p in parts], 1),
    )

  for a, b in zip(fast_jit(split)(q, k, v, out, lse), rg):
    assert rel_max(a, b) <= 1e-5
  o2, l2 = fast_jit(lambda q, k, v: ops.attention_forward(q, k, v, mask=full, backend="interpret"))(q, k, v)
  assert rel_max(o2, out) <= 1e-5 and rel_max(l2, lse) <= 1e-5


def test_block_sparse_layout_edge_cases():
  """Duplicate, out-of-range-count padding and mask-empty entries in a layout are ignored, as in the reference."""
  q, k, v = _small(6, b=1, t=96, s=128, hq=2, hkv=1)
  idx = np.array([[[[0, 0, 3, 1], [2, 2, 2, 0], [3, 1, 1, 1]]]], np.int32)  # duplicates
  cnt = np.array([[[4, 2, 0]]], np.int32)  # last q block: nothing listed
  layout = BlockLayout(jnp.asarray(idx), jnp.asarray(cnt), 32, 32)
  mask = MaskSpec.causal()  # listed blocks above the diagonal are EMPTY under the mask
  out, lse = fast_jit(
    lambda q, k, v, lay: ops.block_sparse_attention(
      q, k, v, mask=mask, layout=lay, return_lse=True, backend="interpret"
    )
  )(q, k, v, layout)
  ref_out, ref_lse = fast_jit(
    lambda q, k, v, lay: reference.attention(q, k, v, mask=mask, layout=lay, return_lse=True)
  )(q, k, v, layout)
  assert rel_max(out, ref_out) <= 1e-5
  assert np.all(np.asarray(lse)[:, :, 64:] == -np.inf)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  with pytest.raises(ValueError, match="layout is required"):
    ops.block_sparse_attention(q, k, v, mask=mask, layout=None)


def test_unsupported_calls_raise_unless_the_reference_fallback_is_allowed():
  ops._warn_once.cache_clear()  # warnings are once per process; earlier tests may have used them up
  # lengths no block divides: the interpret path raises naming the lengths; with the flag it runs the reference
  q, k, v = _small(7, b=1, t=201, s=203, hq=2, hkv=1)
  with pytest.raises(ops.UnsupportedCall, match=r"lengths T=201, S=203.*allow_reference_fallback"):
    ops.flash_attention(q, k, v, mask=MaskSpec.causal(), backend="interpret")
  with pytest.warns(UserWarning, match="running the dense fp32 reference"):
    out = ops.flash_attention(q, k, v, mask=MaskSpec.causal(), backend="interpret", allow_reference_fallback=True)
  assert rel_max(out, reference.attention(q, k, v, mask=MaskSpec.causal())) <= 1e-6
  # the GPU backend on fp32 inputs (unsupported by the Mosaic kernels): the error names the dtype
  q, k, v = _small(8, b=1, t=64, s=96, hq=2, hkv=1)
  with pytest.raises(ops.UnsupportedCall, match="dtype float32"):
    ops.flash_attention(q, k, v, mask=MaskSpec.window(10, 3), backend="gpu")
  assert "dtype float32" in ops.unsupported_reason(
    jax.ShapeDtypeStruct(q.shape, q.dtype), k, v, mask=MaskSpec.causal(), backend="gpu"
  )
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = ops.flash_attention(q, k, v, mask=MaskSpec.window(10, 3), backend="gpu", allow_reference_fallback=True)
  assert any("reference" in str(w.message) for w in rec)
  assert rel_max(out, reference.attention(q, k, v, mask=MaskSpec.window(10, 3))) <= 1e-6
  # a BlockLayout on the GPU backend is named, never silently dropped
  lay = BlockLayout.from_block_mask(np.ones((1, 1, 1, 1), bool), 64, 96)
  qb, kb = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k))
  assert "BlockLayout" in ops.unsupported_reason(qb, kb, kb, mask=MaskSpec.causal(), layout=lay, backend="gpu")
  with pytest.raises(ValueError, match="backend"):
    ops.flash_attention(q, k, v, backend="cuda")


def test_default_backend_on_cpu_is_interpret():
  assert jax.default_backend() != "cpu" or ops.default_backend() == "interpret"


@pytest.mark.parametrize("return_lse", [False, True])
def test_gpu_dispatch_cross_lowers_to_mosaic_gpu(return_lse):
  """On a GPU the op must run the Mosaic GPU forward, dQ and dK/dV kernels (the lse cotangent included), not
  the dense fallback: lower jit(grad) for CUDA on this CPU machine and count the kernels."""
  q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  seg = (jax.ShapeDtypeStruct((1, 512), jnp.int32),) * 2

  def loss(q, k, v, seg):
    res = ops.flash_attention(q, k, v, mask=MaskSpec.causal(), segment_ids=seg, return_lse=return_lse, backend="gpu")
    out, lse = res if return_lse else (res, None)
    total = jnp.sum(out.astype(jnp.float32))
    return total if lse is None else total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="pallas_kernels.ops")  # a fallback warning fails the test
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 3
