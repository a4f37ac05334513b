"""attention.sparsity in the config and the model: validation (one line naming the field), the pre-device check
of every attention call with a layout, and a tiny VideoLM training 3 steps on CPU with each selector."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vidlm import config as C
from vidlm.models.registry import build_model

METHODS = ("static", "moba", "xattention", "vmoba")


def tiny(method="none", **sparsity) -> C.Config:
  cfg = C.Config()
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = 4, 16, 32, 32  # grid 4 x 2 x 4: 32 + 32 tokens
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 3, 4, 2, 16, 64
  cfg.attention.kernel = "xla"  # dense-masked XLA math restricted by the layout: fast on CPU
  sp = cfg.attention.sparsity
  sp.method, sp.block_q, sp.block_kv, sp.top_k, sp.stride, sp.max_kv_blocks = method, 8, 8, 1, 4, 2
  for key, value in sparsity.items():
    setattr(sp, key, value)
  cfg.mesh.data, cfg.train.batch_size = 1, 2
  return cfg


@pytest.mark.parametrize(
  ("field", "value", "needle"),
  [
    ("method", "magic", "attention.sparsity.method='magic': unknown"),
    ("top_k", 0, "attention.sparsity.top_k=0"),
    ("tau", 1.5, "attention.sparsity.tau=1.5"),
    ("stride", 3, "attention.sparsity.stride=3"),
    ("threshold", -0.1, "attention.sparsity.threshold=-0.1"),
    ("block_q", 5, "attention.sparsity.block_q=5 does not divide the sequence length 64"),
    ("dense_layers", ("middle",), "attention.sparsity.dense_layers"),
  ],
)
def test_bad_sparsity_config_is_one_line(field, value, needle):
  method = {"tau": "xattention", "stride": "xattention", "threshold": "vmoba"}.get(field, "moba")
  cfg = tiny(method)
  setattr(cfg.attention.sparsity, field, value)
  with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
    C.validate(cfg, num_devices=1, platform="cpu")
  assert "\n" not in str(e.value)


def test_vmoba_block_must_divide_frame_and_zigzag_ring_runs():
  cfg = tiny("vmoba", block_kv=16, block_q=16)  # frame = 8 tokens
  with pytest.raises(C.ConfigError, match=r"block_kv=16 must divide the frame size 8"):
    C.validate(cfg, num_devices=1, platform="cpu")
  cfg = tiny("moba")
  cfg.attention.context_parallel, cfg.attention.ring_layout = "ring", "zigzag"
  cfg.mesh.seq = 2  # zigzag over 2 devices stores runs of 64 / 4 = 16 tokens: blocks of 8 tile them
  C.validate(cfg, num_devices=2, platform="cpu")
  cfg.mesh.seq = 8  # runs of 4 tokens
  with pytest.raises(C.ConfigError, match=r"must divide each run of 4 tokens a ring device stores"):
    C.validate(cfg, num_devices=8, platform="cpu")


def test_kernels_that_take_a_layout_pass_validation_others_fail():
  for kernel in ("xla", "reference", "flash", "auto"):
    cfg = tiny("moba")
    cfg.attention.kernel = kernel
    C.validate(cfg, num_devices=1, platform="cpu")  # CPU: XLA / reference / the interpret-mode kernel take layouts
  cfg = tiny("moba")
  cfg.attention.kernel, cfg.model.dtype = "flash", "bfloat16"
  # the GPU block-sparse kernels tile blocks of 128 (block_kv 64 / 128): this tiny config's blocks of 8 are refused
  with pytest.raises(C.ConfigError, match=r"BlockLayout blocks \(8, 8\)") as e:
    C.validate(cfg, num_devices=1, platform="gpu")
  assert "\n" not in str(e.value)
  cfg.attention.kernel = "cudnn"
  with pytest.raises(C.ConfigError, match="BlockLayout"):
    C.validate(cfg, num_devices=1, platform="gpu")


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  d, b = cfg.data, cfg.train.batch_size
  tokens = rng.integers(0, 256, (b, d.text_len)).astype(np.int32)
  mask = np.zeros((b, d.text_len), np.float32)
  mask[:, d.text_len // 2:] = 1
  return {
    "frames": jnp.asarray(rng.random((b, d.frames, d.height, d.width, 3)), jnp.float32),
    "tokens": jnp.asarray(tokens),
    "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
    "loss_mask": jnp.asarray(mask),
  }


@pytest.mark.parametrize("method", METHODS)
def test_tiny_videolm_trains_with_selector(method):
  cfg = tiny(method, dense_layers=("last",))  # scanned stack: traced layer index, last layer dense
  C.validate(cfg, num_devices=1, platform="cpu")
  model = build_model(cfg, nnx.Rngs(0))
  batch = _batch(cfg)
  if method == "moba":  # the selector reaches the model: same weights, fewer visible keys -> a different loss
    dense_model = build_model(tiny("none"), nnx.Rngs(0))
    loss = nnx.jit(lambda m, b: m.loss(b)[0])
    assert abs(float(loss(model, batch)) - float(loss(dense_model, batch))) > 1e-6
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, batch)) for _ in range(3)]
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
