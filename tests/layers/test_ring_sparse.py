"""Block-sparse attention inside ring attention (layers/ring/sparse.py) on 8 fake CPU devices.

Ring + layout must equal single-device attention with the same layout (`attention(..., layout=)` without a
ring), forward and dq/dk/dv in fp32, for every token layout. The layout is global in ORIGINAL positions (like
the mask); the ring runs on the permuted sequence and its results are compared after permuting the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from layers import ring
from layers.attention import Ring, attention, hop_kernel
from pallas_kernels.layout import BlockLayout, MaskSpec

AXES = ("data", "fsdp", "seq", "tensor")
T, B, HQ, HKV, D = 64, 2, 4, 2, 8
TPF = 4  # frame size of the frame_striped / frame-causal cases
BLOCK = 4  # layout blocks: 16 q blocks x 16 kv blocks
RTOL = 1e-5


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:n])


def _random_layout(seed: int, *, batch: int, heads: int, density: float = 0.35) -> BlockLayout:
  """A random block list: some rows empty, others with a few blocks anywhere in the sequence."""
  nb = T // BLOCK
  bm = np.random.default_rng(seed).random((batch, heads, nb, nb)) < density
  bm[..., 3, :] = False  # a q block with no listed kv block at all
  return BlockLayout.from_block_mask(bm, BLOCK, BLOCK)


def _diagonal_layout() -> BlockLayout:
  """Only each q block's own kv block: under a ring every hop but hop 0 has nothing listed on any device."""
  nb = T // BLOCK
  return BlockLayout.from_block_mask(np.eye(nb, dtype=bool)[None, None], BLOCK, BLOCK)


def _inputs(seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.float32)
  k = jax.random.normal(ks[1], (B, T, HKV, D), jnp.float32)
  v = jax.random.normal(ks[2], (B, T, HKV, D), jnp.float32)
  g = jax.random.normal(ks[3], (B, T, HQ, D), jnp.float32)
  return q, k, v, g


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "NaN/inf in the ring result"
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(token_layout, mask, layout, *, mesh_shape=(1, 1, 4, 2), kernel="xla", hop=None, seed=0) -> float:
  """Max relative error over (out, dq, dk, dv) of ring + layout vs single-device attention with the layout."""
  q, k, v, g = _inputs(seed)
  n = mesh_shape[2]
  tpf = TPF if token_layout == "frame_striped" else 1
  perm = ring.token_permutation(T, n, token_layout, tpf)

  def loss_ref(q, k, v):
    o = attention(q, k, v, mask=mask, layout=layout, kernel=kernel)
    return jnp.sum(o * g), o

  (_, o_ref), grads_ref = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  gp = g[:, perm]

  def loss_ring(q, k, v):
    if hop is None:
      cp = Ring(token_layout, tokens_per_frame=TPF if token_layout == "frame_striped" else None)
      o = attention(q, k, v, mask=mask, layout=layout, kernel=kernel, context_parallel=cp)
    else:
      o = ring.ring_attention(
        q, k, v, mask=mask, layout=layout, hop=hop, token_layout=token_layout,
        tokens_per_frame=TPF if token_layout == "frame_striped" else None,
      )
    return jnp.sum(o * gp), o

  with jax.set_mesh(_mesh(mesh_shape)):
    (_, o), grads = jax.jit(jax.value_and_grad(loss_ring, argnums=(0, 1, 2), has_aux=True))(
      q[:, perm], k[:, perm], v[:, perm]
    )
  assert float(jnp.max(jnp.abs(o_ref))) > 0.1, "the reference attends nothing: the test would be vacuous"
  errs = [_rel(o, o_ref[:, perm])] + [_rel(a, b[:, perm]) for a, b in zip(grads, grads_ref)]
  return max(errs)


CASES = {
  # token layout, mask, layout (batch, heads): per-head per-batch lists, and a list shared by batch and heads
  "contiguous_causal": ("contiguous", MaskSpec.causal(), (B, HQ)),
  "zigzag_causal": ("zigzag", MaskSpec.causal(), (B, HQ)),
  "zigzag_bidirectional_shared": ("zigzag", MaskSpec.bidirectional(), (1, 1)),
  "frame_striped_frame_causal": ("frame_striped", MaskSpec.frame_causal(TPF), (B, HQ)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_sparse_matches_single_device_sparse(case):
  """Ring 4 x heads over tensor 2: out, dq, dk, dv equal single-device sparse attention (xla hop kernel)."""
  token_layout, mask, (lb, lh) = CASES[case]
  layout = _random_layout(list(CASES).index(case), batch=lb, heads=lh)
  err = _compare(token_layout, mask, layout)
  assert err < RTOL, f"{case}: relative error {err:.2e}"


def test_ring_sparse_ring_of_8_frame_striped():
  """All 8 devices on the ring (frame_striped: every device's q rows and kv columns are interleaved frames)."""
  layout = _random_layout(5, batch=B, heads=HQ)
  err = _compare("frame_striped", MaskSpec.causal(), layout, mesh_shape=(1, 1, 8, 1))
  assert err < RTOL, f"relative error {err:.2e}"


def _poisoned(hop):
  """The hop kernel, returning NaNs whenever it runs a call with no listed block: results stay finite only if
  every such call is skipped (lax.cond on "any listed")."""

  def poison(x, layout):
    return x + jnp.where(jnp.sum(layout.kv_counts) == 0, jnp.nan, 0.0)

  def forward(q, k, v, *, layout=None, **kw):
    o, lse = hop.forward(q, k, v, layout=layout, **kw)
    return poison(o, layout), lse

  def backward(*args, layout=None):
    return tuple(poison(x, layout) for x in hop.backward(*args, layout=layout))

  return dataclasses.replace(hop, forward=forward, backward=backward)


@pytest.mark.parametrize("token_layout", ["contiguous", "zigzag"])
def test_hops_without_listed_blocks_are_skipped(token_layout):
  """A block-diagonal layout lists nothing for hops 1..N-1 on every device: those hops must not run (forward or
  backward), and the result still equals single-device sparse attention."""
  err = _compare(
    token_layout, MaskSpec.bidirectional(), _diagonal_layout(), mesh_shape=(1, 1, 4, 1), hop=_poisoned(hop_kernel("xla"))
  )
  assert err < RTOL, f"relative error {err:.2e}"


def test_ring_sparse_with_interpret_flash_hops():
  """The Pallas flash hop kernel (interpret mode on CPU) walks the local lists, forward and backward."""
  layout = _random_layout(7, batch=B, heads=HQ)
  err = _compare("zigzag", MaskSpec.causal(), layout, mesh_shape=(1, 1, 2, 1), kernel="flash")
  assert err < RTOL, f"relative error {err:.2e}"


def test_ring_sparse_block_must_divide_the_stored_runs():
  """zigzag over 8 devices stores runs of 4 tokens: blocks of 8 cannot be cut per device (one-line error)."""
  q, k, v, _ = _inputs(0)
  bm = np.ones((1, 1, T // 8, T // 8), bool)
  layout = BlockLayout.from_block_mask(bm, 8, 8)
  with jax.set_mesh(_mesh((1, 1, 8, 1))), pytest.raises(ValueError, match=r"block_q=8 does not divide the zigzag"):
    attention(q, k, v, mask=MaskSpec.causal(), layout=layout, kernel="xla", context_parallel=Ring("zigzag"))


def test_cudnn_hops_refuse_a_layout():
  q, k, v, _ = _inputs(0)
  layout = _random_layout(0, batch=1, heads=1)
  with jax.set_mesh(_mesh((1, 1, 4, 1))), pytest.raises(ValueError, match="takes no BlockLayout"):
    ring.ring_attention(q, k, v, mask=MaskSpec.causal(), layout=layout, hop=hop_kernel("cudnn"))


# ---- attention.sparsity with context_parallel=ring: config checks and VideoLM -------------------------------------


def _tiny_cfg(seq: int, layout: str = "contiguous", block: int = 8):
  from vidlm import config as C  # noqa: PLC0415

  cfg = C.Config()
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = 4, 16, 32, 32  # 32 video + 32 text tokens
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 16, 64
  cfg.attention.kernel = "xla"
  sp = cfg.attention.sparsity
  sp.method, sp.block_q, sp.block_kv, sp.top_k = "moba", block, block, 2
  if seq > 1:
    cfg.attention.context_parallel, cfg.attention.ring_layout = "ring", layout
  cfg.mesh = C.MeshConfig(data=1, seq=seq)
  cfg.train.batch_size = 2
  return cfg


def test_ring_sparsity_config_checks():
  """Allowed on CPU for contiguous and zigzag storage; one line for blocks that do not tile the runs a device
  stores (zigzag: two half chunks), and the GPU hop kernels (no layouts)."""
  from vidlm import config as C  # noqa: PLC0415

  C.validate(_tiny_cfg(4), num_devices=4, platform="cpu")
  C.validate(_tiny_cfg(4, layout="zigzag"), num_devices=4, platform="cpu")
  cases = [
    (_tiny_cfg(4, block=32), "cpu", r"block_q=32/block_kv=32 must divide each run of 16 tokens a ring device"),
    (_tiny_cfg(4, layout="zigzag", block=16), "cpu", r"block_q=16/block_kv=16 must divide each run of 8 tokens"),
    (_tiny_cfg(4), "gpu", "BlockLayout"),
  ]
  for cfg, platform, needle in cases:
    if platform == "gpu":
      cfg.attention.kernel, cfg.model.dtype = "auto", "bfloat16"
    with pytest.raises(C.ConfigError, match=needle) as e:
      C.validate(cfg, num_devices=4, platform=platform)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_videolm_with_selector_ring_equals_single_device(layout, monkeypatch):
  """A tiny VideoLM with the moba selector: loss and gradients under a ring of 4 equal those without a ring.

  zigzag stores the tokens permuted: each sparse layer hands its selector q/k gathered back to original order.
  Without that gather the selector scores storage-order blocks and the loss changes (checked last)."""
  from flax import nnx  # noqa: PLC0415

  from layers import attention as attention_lib  # noqa: PLC0415
  from vidlm.models.registry import build_model  # noqa: PLC0415
  from vidlm.sharding import make_mesh  # noqa: PLC0415

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (2, 32)).astype(np.int32)
  batch = {
    "frames": jnp.asarray(rng.random((2, 4, 16, 32, 3)), jnp.float32),
    "tokens": jnp.asarray(tokens),
    "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
    "loss_mask": jnp.ones((2, 32), jnp.float32),
  }

  def loss_and_grads(seq):
    cfg = _tiny_cfg(seq, layout=layout)
    model = build_model(cfg, nnx.Rngs(0))
    fn = nnx.jit(lambda m, b: nnx.value_and_grad(lambda m: m.loss(b)[0])(m))
    with jax.set_mesh(make_mesh(cfg.mesh, jax.devices()[: seq])):
      loss, grads = fn(model, batch)
    return float(loss), jax.tree.leaves(nnx.state(grads, nnx.Param))

  loss_ref, g_ref = loss_and_grads(1)
  loss_ring, g_ring = loss_and_grads(4)
  np.testing.assert_allclose(loss_ring, loss_ref, rtol=1e-5)
  for a, b in zip(g_ring, g_ref, strict=True):
    assert _rel(a, b) < 1e-4
  if layout != "contiguous":  # the gather is what makes them equal: the selector in storage order differs
    monkeypatch.setattr(attention_lib, "storage_order", lambda cp, n, mask: None)
    loss_storage, _ = loss_and_grads(4)
    assert abs(loss_storage - loss_ref) > 1e-4 * abs(loss_ref)


def test_ring_of_one_device_takes_the_layout():
  """mesh.seq=1 runs the whole sequence on the hop kernel: the layout must still apply."""
  layout = _random_layout(3, batch=B, heads=HQ)
  q, k, v, _ = _inputs(3)
  ref = attention(q, k, v, mask=MaskSpec.causal(), layout=layout, kernel="xla")
  dense = attention(q, k, v, mask=MaskSpec.causal(), kernel="xla")
  with jax.set_mesh(_mesh((2, 1, 1, 1))):
    out = attention(q, k, v, mask=MaskSpec.causal(), layout=layout, kernel="xla", context_parallel="ring")
  assert _rel(out, ref) < RTOL
  assert _rel(dense, ref) > 0.1  # the layout changes the result, so the equality above means it was applied
