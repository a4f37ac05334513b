"""RoPE, masks inside the model, the XLA attention path, remat/scan and gradient accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import rope as rope_lib
from layers.attention import attention
from pallas_kernels import reference
from pallas_kernels.layout import MaskSpec
from vidlm import config as C
from vidlm.models import build_model
from vidlm.train import optim
from vidlm.train import step as step_lib


def test_rope_text_is_1d_and_relative():
  pos = rope_lib.video_text_positions((2, 2, 2), 4)
  assert pos.shape == (12, 3) and (pos[8:, 0] == pos[8:, 1]).all() and pos[8, 0] == 2
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    t = rope_lib.tables(np.array([pq, pk]), 16)
    qr = rope_lib.apply(q, rope_lib.RopeTables(t.cos[:1], t.sin[:1]))
    kr = rope_lib.apply(k, rope_lib.RopeTables(t.cos[1:], t.sin[1:]))
    return float(jnp.sum(qr * kr))

  # scores depend only on the offset, for 1D and per-axis 3D positions
  np.testing.assert_allclose(score(5, 3), score(12, 10), rtol=1e-5)
  np.testing.assert_allclose(score([4, 1, 2], [3, 1, 0]), score([7, 5, 6], [6, 5, 4]), rtol=1e-5)
  assert abs(score(5, 3) - score(5, 4)) > 1e-4


@pytest.mark.parametrize(
  "mask",
  [MaskSpec.causal(), MaskSpec.bidirectional(), MaskSpec.frame_causal(8, video_tokens=32), MaskSpec.window(5, 2)],
  ids=lambda m: m.kind,
)
def test_xla_impl_matches_reference(mask):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 48, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 48, 2, 16)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 28], 2, 0), jnp.int32)
  for segment_ids in (None, (seg, seg)):
    out, lse = attention(q, k, v, mask=mask, segment_ids=segment_ids, kernel="xla", return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, mask=mask, segment_ids=segment_ids, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda q: attention(q, k, v, mask=mask, segment_ids=segment_ids, kernel="xla").sum())(q)  # noqa: B023
    g_ref = jax.grad(lambda q: reference.attention(q, k, v, mask=mask, segment_ids=segment_ids).sum())(q)  # noqa: B023
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_unknown_kernel_is_rejected():
  x = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(ValueError, match="unknown kernel 'fast'"):
    attention(x, x, x, kernel="fast")
  with pytest.raises(ValueError, match="context_parallel=Ring"):
    attention(x, x, x, kernel="ring")


def _cfg(**model):
  cfg = C.load_config("experiments/demo.py")
  cfg.mesh = C.MeshConfig(1, 1, 1, 1)
  cfg.model = dataclasses.replace(cfg.model, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8,
                                  **model)
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = 4, 16, 16, 12
  cfg.attention.kernel = "xla"
  return cfg


def _inputs(cfg, b=4, seed=0):
  return jax.tree.map(jnp.asarray, step_lib.random_batch(cfg.data, b, seed))


def test_model_masks_text_causal_and_video_frame_causal():
  cfg = _cfg()
  model = build_model(cfg, nnx.Rngs(0))
  batch = _inputs(cfg)
  base = model(batch["frames"], batch["tokens"])
  # changing text token 6 leaves logits at text positions < 6 unchanged, and changes later ones
  tokens = batch["tokens"].at[:, 6].set((batch["tokens"][:, 6] + 1) % 256)
  out = model(batch["frames"], tokens)
  np.testing.assert_allclose(out[:, :6], base[:, :6], atol=1e-5)
  assert float(jnp.abs(out[:, 6:] - base[:, 6:]).max()) > 1e-4
  # text sees every frame, including the last
  frames = batch["frames"].at[:, -1].set(0)
  assert float(jnp.abs(model(frames, batch["tokens"]) - base).max()) > 1e-4


def test_scan_remat_and_unscanned_agree():
  outs = []
  for kw in ({}, {"remat": "full"}, {"remat": "dots"}):
    cfg = _cfg(**kw)
    model = build_model(cfg, nnx.Rngs(0))
    batch = _inputs(cfg)
    loss, grads = nnx.value_and_grad(lambda m: step_lib.loss_fn(m, batch)[0])(model)  # noqa: B023
    outs.append((float(loss), jax.tree.leaves(grads)))
  for loss, grads in outs[1:]:
    np.testing.assert_allclose(loss, outs[0][0], rtol=1e-6)
    for g, g0 in zip(grads, outs[0][1]):
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6)


def test_unscanned_layers_run_and_bf16_is_finite():
  cfg = _cfg(scan_layers=False, dtype="bfloat16")
  model = build_model(cfg, nnx.Rngs(0))
  batch = _inputs(cfg)
  loss, _ = step_lib.loss_fn(model, batch)
  assert np.isfinite(float(loss)) and 2.0 < float(loss) < 10.0


def test_gradient_accumulation_matches_full_batch():
  cfg = _cfg()
  batch = _inputs(cfg, b=8)
  results = []
  for accum in (1, 4):
    model = build_model(cfg, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optim.make_optimizer(cfg.train), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(step_lib.make_train_step(graphdef, accum, optim.learning_rate_schedule(cfg.train)))
    state, metrics = step(state, batch)
    results.append((metrics, jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))))
  (m1, p1), (m4, p4) = results
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(p4, p1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_impl_choice_per_platform(monkeypatch):
  import types

  import layers.attention as attn_lib

  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  seg = (jnp.zeros((1, 256), jnp.int32),) * 2
  for platform, cases in {
    "gpu": [((MaskSpec.causal(), None, False), "cudnn"), ((MaskSpec.frame_causal(16), None, False), "flash"),
            ((MaskSpec.causal(), seg, False), "flash"), ((MaskSpec.causal(), None, True), "flash")],
    "tpu": [((MaskSpec.causal(), None, False), "flash")],
    "cpu": [((MaskSpec.causal(), None, False), "xla")],
  }.items():
    for (mask, segment_ids, lse), want in cases:
      got = attn_lib.resolve_kernel(
        "auto", platform=platform, dtype=x.dtype, mask=mask, has_segments=segment_ids is not None, return_lse=lse
      )
      assert got == want, (platform, mask.kind)
  assert attn_lib.resolve_kernel("auto", platform="gpu", ring_hop=True) == "flash"
  assert attn_lib.resolve_kernel("auto", platform="cpu", ring_hop=True) == "xla"
  assert attn_lib.resolve_kernel("auto", platform="cpu", has_layout=True) == "flash"
  del monkeypatch, types
