"""Ring attention (layers/ring/) against the single-device fp32 reference on 8 fake CPU devices.

Every check runs the reference on the ORIGINAL sequence, permutes its outputs/gradients into the ring's token
layout and compares with ring_attention on the permuted sequence: forward output and dq/dk/dv, fp32,
relative error ~1e-5. Errors are recorded per ring size and must not grow with the ring beyond rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from layers import partitioning, ring
from layers.attention import hop_kernel
from layers.ring import api as ring_api
from layers.ring import vjp as ring_vjp
from pallas_kernels import reference
from pallas_kernels.layout import MaskSpec

AXES = ("data", "fsdp", "seq", "tensor")
TPF = 4  # tokens per frame in the frame-causal / frame-striped cases
T = 64
B, HQ, HKV, D = 2, 4, 2, 16
RTOL = 2e-5


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:n])


def _inputs(seed, *, t=T, hq=HQ, hkv=HKV, d=D, segments=False, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (B, t, hq, d), dtype)
  k = jax.random.normal(ks[1], (B, t, hkv, d), dtype)
  v = jax.random.normal(ks[2], (B, t, hkv, d), dtype)
  g = jax.random.normal(ks[3], (B, t, hq, d), jnp.float32)
  h = jax.random.normal(ks[4], (B, hq, t), jnp.float32)
  seg = jnp.sort(jax.random.randint(ks[5], (B, t), 0, 4), axis=1).astype(jnp.int32) if segments else None
  return q, k, v, g, h, seg


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "NaN/inf in ring result"
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(
  mesh_shape,
  token_layout,
  mask,
  *,
  seed=0,
  segments=False,
  return_lse=False,
  hop=hop_kernel("xla"),
  hq=HQ,
  hkv=HKV,
  t=T,
  dtype=jnp.float32,
):
  """Max relative error over (out, dq, dk, dv[, lse]) of ring vs reference (permuted)."""
  n = mesh_shape[2]
  q, k, v, g, h, seg = _inputs(seed, t=t, hq=hq, hkv=hkv, segments=segments, dtype=dtype)
  tpf = TPF if token_layout == "frame_striped" else 1
  perm = ring.token_permutation(t, n, token_layout, tpf)
  finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)

  def loss_ref(q, k, v):
    o, lse = reference.attention(q, k, v, mask=mask, segment_ids=None if seg is None else (seg, seg), return_lse=True)
    aux = (o, lse)
    return jnp.sum(o * g) + (jnp.sum(finite(lse) * h) if return_lse else 0.0), aux

  (_, (o_ref, lse_ref)), grads_ref = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  gp, hp = g[:, perm], h[:, :, perm]
  segp = None if seg is None else (seg[:, perm], seg[:, perm])

  def loss_ring(q, k, v):
    res = ring.ring_attention(
      q,
      k,
      v,
      mask=mask,
      segment_ids=segp,
      token_layout=token_layout,
      hop=hop,
      return_lse=return_lse,
      tokens_per_frame=TPF if token_layout == "frame_striped" else None,
    )
    o, lse = res if return_lse else (res, None)
    return jnp.sum(o * gp) + (jnp.sum(finite(lse) * hp) if return_lse else 0.0), (o, lse)

  with jax.set_mesh(_mesh(mesh_shape)):
    (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss_ring, argnums=(0, 1, 2), has_aux=True))(
      q[:, perm], k[:, perm], v[:, perm]
    )
  errs = [_rel(o, o_ref[:, perm])] + [_rel(a, b[:, perm]) for a, b in zip(grads, grads_ref)]
  if return_lse:
    lse_ref_p = lse_ref[:, :, perm]
    assert np.array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(lse_ref_p))), "fully-masked rows differ"
    errs.append(_rel(finite(lse), finite(lse_ref_p)))
  return max(errs)


MASKS = {
  "causal": (MaskSpec.causal(), False),
  "frame_causal": (MaskSpec.frame_causal(TPF), False),
  "bidirectional": (MaskSpec.bidirectional(), False),
  "segments": (MaskSpec.causal(), True),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("token_layout", ring.TOKEN_LAYOUTS)
def test_ring_matches_reference_all_ring_sizes(token_layout, mask_name):
  """Outputs and gradients equal the reference at ring 2, 4, 8; the error does not grow with the ring."""
  mask, segments = MASKS[mask_name]
  errs = {}
  for n in (2, 4, 8):
    errs[n] = _compare((1, 1, n, 1), token_layout, mask, seed=n, segments=segments)
    assert errs[n] < RTOL, f"ring {n}: relative error {errs[n]:.2e}"
  print(f"{token_layout}/{mask_name}: max relative error by ring size {errs}")
  assert errs[8] <= 4 * max(errs[2], 1e-6), f"error grows with the ring: {errs}"


@pytest.mark.parametrize(
  "mesh_shape,hkv", [((2, 1, 2, 2), 2), ((2, 1, 4, 1), 1), ((1, 2, 2, 2), 1)], ids=["dst_gqa", "d2s4_mqa", "fst_mqa"]
)
def test_ring_on_combined_meshes(mesh_shape, hkv):
  """Batch over data/fsdp and heads over tensor (or replicated when kv heads do not divide): several rings
  run at once (the multi-cycle permute that miscompiles on some XLA GPU settings), numerics must hold."""
  err = _compare(mesh_shape, "zigzag", MaskSpec.causal(), seed=11, hkv=hkv, segments=True)
  assert err < RTOL, err


@pytest.mark.parametrize("token_layout", ["contiguous", "zigzag"])
def test_ring_video_then_text_and_window(token_layout):
  """frame-causal video followed by causal text, and a sliding window whose first row sees nothing (-inf lse)."""
  err = _compare((1, 1, 4, 1), token_layout, MaskSpec.frame_causal(TPF, video_tokens=40), seed=3)
  assert err < RTOL, err
  err = _compare((1, 1, 4, 1), token_layout, MaskSpec.window(12, -1), seed=4, return_lse=True)
  assert err < RTOL, err


def test_ring_switch_dispatch_for_zigzag():
  """The lax.switch dispatch (what non-uniform hops use) also gives exact zigzag results."""
  mask = MaskSpec.causal()
  q, k, v, g, _, _ = _inputs(12)
  perm = ring.token_permutation(T, 4, "zigzag")
  ref = jax.grad(lambda q, k, v: jnp.sum(reference.attention(q, k, v, mask=mask) * g), argnums=(0, 1, 2))(q, k, v)

  def loss(q, k, v):
    o = ring.ring_attention(q, k, v, mask=mask, token_layout="zigzag", hop=hop_kernel("xla"), _uniform=False)
    return jnp.sum(o * g[:, perm])

  with jax.set_mesh(_mesh((1, 1, 4, 1))):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q[:, perm], k[:, perm], v[:, perm])
  assert max(_rel(a, b[:, perm]) for a, b in zip(grads, ref)) < RTOL


def test_ring_under_remat_policy():
  """jax.checkpoint with the names ring attention tags (ring_out / ring_lse): gradients unchanged."""
  mask = MaskSpec.causal()
  q, k, v, g, _, _ = _inputs(14)
  perm = ring.token_permutation(T, 2, "zigzag")
  ref = jax.grad(lambda q, k, v: jnp.sum(reference.attention(q, k, v, mask=mask) * g), argnums=(0, 1, 2))(q, k, v)
  policy = jax.checkpoint_policies.save_only_these_names("ring_out", "ring_lse")

  @functools.partial(jax.checkpoint, policy=policy)
  def block(q, k, v):
    return jnp.tanh(ring.ring_attention(q, k, v, mask=mask, token_layout="zigzag", hop=hop_kernel("xla")))

  def loss(q, k, v):
    return jnp.sum(jnp.arctanh(block(q, k, v)) * g[:, perm])

  with jax.set_mesh(_mesh((1, 1, 2, 1))):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q[:, perm], k[:, perm], v[:, perm])
  assert max(_rel(a, b[:, perm]) for a, b in zip(grads, ref)) < 1e-4


def test_save_attention_remat_policy_skips_the_ring_forward_recompute():
  """model.remat="save_attention" keeps (ring_out, ring_lse): the backward pass runs no second forward ring
  (counted as ppermutes in the gradient's jaxpr), unlike "full", and the gradients are the same."""
  from layers.scan import REMAT_POLICIES  # noqa: PLC0415

  n = 4
  mask = MaskSpec.causal()
  q, k, v, g, _, _ = _inputs(15)
  w = jax.random.normal(jax.random.key(16), (D, D), jnp.float32) / D**0.5
  perm = ring.token_permutation(T, n, "zigzag")

  def make_loss(policy):
    @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[policy])
    def block(w, q, k, v):
      return jnp.tanh(ring.ring_attention(q @ w, k, v, mask=mask, token_layout="zigzag", hop=hop_kernel("reference")))

    return lambda w, q, k, v: jnp.sum(block(w, q, k, v) * g[:, perm])

  counts, grads = {}, {}
  with jax.set_mesh(_mesh((1, 1, n, 1))):
    args = (w, q[:, perm], k[:, perm], v[:, perm])
    for policy in ("full", "save_attention"):
      grad = jax.grad(make_loss(policy), argnums=(0, 1, 2, 3))
      counts[policy] = str(jax.make_jaxpr(grad)(*args)).count("ppermute")
      grads[policy] = jax.jit(grad)(*args)
  assert counts["full"] - counts["save_attention"] == n - 1, counts  # one forward ring of n-1 K/V hops fewer
  assert max(_rel(a, b) for a, b in zip(grads["save_attention"], grads["full"])) < 1e-5


@pytest.mark.parametrize("local_impl", ["xla", "reference"])
def test_ring_lse_output_and_its_gradient(local_impl):
  """return_lse: lse matches and gradients flow through it; "reference" exercises the vjp-of-local backward."""
  err = _compare((1, 1, 4, 1), "zigzag", MaskSpec.causal(), seed=5, return_lse=True, hop=hop_kernel(local_impl))
  assert err < RTOL, err
  err = _compare(
    (1, 1, 2, 1), "frame_striped", MaskSpec.frame_causal(TPF), seed=6, return_lse=True, hop=hop_kernel(local_impl)
  )
  assert err < RTOL, err


def test_ring_with_pallas_flash_local_kernel():
  """hop=hop_kernel("flash"): pallas_kernels.ops forward per hop, its backward fed with the global (out, lse)."""
  err = _compare(
    (1, 1, 2, 1), "zigzag", MaskSpec.causal(), seed=13, segments=True, return_lse=True, hop=hop_kernel("flash")
  )
  assert err < RTOL, err


def test_ring_bf16_error_no_worse_than_single_device():
  """bf16 inputs: ring (fp32 merge) vs fp32 reference is no worse than single-device bf16 attention."""
  mask = MaskSpec.causal()
  q, k, v, _, _, _ = _inputs(7, t=128, dtype=jnp.bfloat16)
  ref = reference.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask)
  from layers.attention import attention  # noqa: PLC0415

  single = attention(q, k, v, mask=mask, kernel="xla")
  perm = ring.token_permutation(128, 8, "zigzag")
  with jax.set_mesh(_mesh((1, 1, 8, 1))):
    out = jax.jit(
      lambda q, k, v: ring.ring_attention(q, k, v, mask=mask, token_layout="zigzag", hop=hop_kernel("xla"))
    )(q[:, perm], k[:, perm], v[:, perm])
  e_single = _rel(single.astype(jnp.float32), ref)
  e_ring = _rel(out.astype(jnp.float32), ref[:, perm])
  assert e_ring < 2e-2 and e_ring <= 1.5 * e_single + 1e-3, (e_ring, e_single)


def test_ring_size_one_is_local_attention():
  q, k, v, _, _, _ = _inputs(8)
  with jax.set_mesh(_mesh((2, 1, 1, 1))):
    out = ring.ring_attention(q, k, v, mask=MaskSpec.causal(), token_layout="zigzag", hop=hop_kernel("xla"))
  assert _rel(out, reference.attention(q, k, v, mask=MaskSpec.causal())) < RTOL


def test_token_permutation_layouts():
  assert ring.token_permutation(8, 2, "zigzag").tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
  assert ring.token_permutation(8, 2, "contiguous").tolist() == list(range(8))
  fs = ring.token_permutation(16, 2, "frame_striped", tokens_per_frame=2)
  assert fs.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
  for layout in ring.TOKEN_LAYOUTS:
    p = ring.token_permutation(96, 4, layout, 4)
    assert p.dtype == np.int32 and sorted(p.tolist()) == list(range(96))
    frames = p.reshape(-1, 4)  # whole frames stay contiguous and in order
    assert np.all(frames[:, 0] % 4 == 0) and np.all(np.diff(frames, axis=1) == 1)


def test_zigzag_causal_plans_are_balanced_and_simple():
  """Zigzag under causal: every hop is one call of half a block's work, plain causal or unmasked (cuDNN-able)."""
  n, t = 4, 64
  c = t // n
  plans, table, uniform = ring.build_plans(MaskSpec.causal(), t, n, "zigzag", 1)
  for row in table:
    for pid in row:
      (call,) = plans[pid]
      area = (call.q_hi - call.q_lo) * (call.kv_hi - call.kv_lo)
      if call.mask.kind == "causal":
        assert (call.mask.q_offset, call.mask.kv_offset, area) == (0, 0, c * c)
      else:
        assert call.mask.kind == "bidirectional" and area == c * c // 2
  # hops t >= 1 run without lax.switch: two unmasked [c/2, c/2] blocks at per-device offsets
  assert uniform[0] is None
  for hop in uniform[1:]:
    assert [(u.tq, u.tk, u.mask.kind) for u in hop] == [(c // 2, c // 2, "bidirectional")] * 2
  # contiguous: device N-1 computes every hop, device 0 only the first
  plans, table, uniform = ring.build_plans(MaskSpec.causal(), t, n, "contiguous", 1)
  assert uniform == (None,) * n
  assert [plans[table[h][0]] for h in range(1, n)] == [()] * (n - 1)
  assert all(len(plans[table[h][n - 1]]) == 1 for h in range(n))


def test_ring_errors_are_clear():
  XLA = hop_kernel("xla")  # noqa: N806
  q, k, v, _, _, _ = _inputs(9)
  with pytest.raises(ValueError, match="mesh axis 'seq'"):
    ring.ring_attention(q, k, v, mask=MaskSpec.causal(), hop=XLA)
  with jax.set_mesh(_mesh((1, 1, 4, 1))):
    with pytest.raises(ValueError, match="frame_striped.*window"):
      ring.ring_attention(
        q, k, v, mask=MaskSpec.window(4, 0), token_layout="frame_striped", tokens_per_frame=4, hop=XLA
      )
    with pytest.raises(ValueError, match="tokens_per_frame"):
      ring.ring_attention(
        q, k, v, mask=MaskSpec.frame_causal(8), token_layout="frame_striped", tokens_per_frame=4, hop=XLA
      )
    with pytest.raises(ValueError, match="zigzag"):
      ring.ring_attention(q[:, :60], k[:, :60], v[:, :60], mask=MaskSpec.causal(), token_layout="zigzag", hop=XLA)
    with pytest.raises(ValueError, match="kernel='cudnn'"):
      ring.ring_attention(q, k, v, mask=MaskSpec.frame_causal(4), token_layout="zigzag", hop=hop_kernel("cudnn"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_backward_pack_roundtrip(dtype):
  """K/V and the fp32 dK/dV accumulator travel as one bit-cast buffer in the backward: lossless."""
  kv = jax.random.normal(jax.random.key(0), (2, 1, 8, 2, 16), dtype)
  dkv = jax.random.normal(jax.random.key(1), (2, 1, 8, 2, 16), jnp.float32)
  kv2, dkv2 = ring_vjp._unpack(ring_vjp._pack(kv, dkv), kv.dtype)
  assert kv2.dtype == kv.dtype and dkv2.dtype == jnp.float32
  assert np.array_equal(np.asarray(kv2, np.float32), np.asarray(kv, np.float32))
  assert np.array_equal(np.asarray(dkv2), np.asarray(dkv))


def test_ring_mesh_axes_come_from_the_rules_table(monkeypatch):
  """Batch / head axes follow the rules table (as far as they divide); the ring axis defaults to its 'tokens' axis."""
  mesh = _mesh((1, 2, 2, 2))
  assert ring_api._ring_axis() == "seq"
  assert ring_api._mesh_axes(mesh, "seq", 2, 4, 2) == (("data", "fsdp"), "tensor")
  assert ring_api._mesh_axes(mesh, "seq", 1, 4, 1) == (("data",), None)  # fsdp / tensor do not divide
  rules = dict(partitioning.RULES) | {"batch": ("tensor", "data"), "heads": None, "kv_heads": None, "tokens": "fsdp"}
  monkeypatch.setattr(partitioning, "_RULES", rules)
  assert ring_api._ring_axis() == "fsdp"
  assert ring_api._mesh_axes(mesh, "fsdp", 2, 4, 2) == (("tensor", "data"), None)  # table order; data has size 1
  monkeypatch.setattr(partitioning, "_RULES", rules | {"kv_heads": "tensor"})
  with pytest.raises(ValueError, match="kv_heads"):
    ring_api._mesh_axes(mesh, "fsdp", 2, 4, 2)
  monkeypatch.setattr(partitioning, "_RULES", rules | {"tokens": ("seq", "fsdp")})
  with pytest.raises(ValueError, match="exactly one mesh axis"):
    ring_api._ring_axis()


def test_ring_runs_over_the_rules_tables_tokens_axis(monkeypatch):
  """With 'tokens' mapped to fsdp, ring_attention (no axis_name) rotates K/V over fsdp and stays exact."""
  rules = dict(partitioning.RULES) | {"batch": ("data",), "tokens": "fsdp"}
  monkeypatch.setattr(partitioning, "_RULES", rules)
  q, k, v, _, _, _ = _inputs(3)
  mask = MaskSpec.causal()
  perm = ring.token_permutation(T, 4, "zigzag")
  want = reference.attention(q, k, v, mask=mask)[:, perm]
  fn = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, mask=mask, token_layout="zigzag", hop=hop_kernel("xla")))
  with jax.set_mesh(_mesh((1, 4, 1, 2))):  # seq has one device: without the table the ring would not rotate
    args = (q[:, perm], k[:, perm], v[:, perm])
    assert "collective_permute" in fn.lower(*args).as_text()
    out = fn(*args)
  assert _rel(out, want) < RTOL


def test_ring_package_hard_codes_no_mesh_axis():
  """Mesh axis names reach the ring only through the rules table (layers.partitioning) or the caller."""
  src = {f.name: f.read_text() for f in Path(ring.__file__).parent.glob("*.py")}
  assert {"api.py", "hops.py", "layouts.py", "plans.py", "vjp.py"} <= set(src)
  for name, text in src.items():
    for axis in partitioning.AXES:
      assert f'"{axis}"' not in text and f"'{axis}'" not in text, f"layers/ring/{name} names mesh axis {axis!r}"
