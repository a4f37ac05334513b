"""Token drop (TimeChat-Online DTD, layers/token_drop.py) and its use in VideoLM (model.token_drop_tau).

The model checks are exact comparisons: with nothing dropped the logits are bit-identical to the model without token
drop; with whole frames dropped they equal a run on only the kept frames at their true positions (fp32, 1e-5); what
a dropped token holds never changes the result; cached decoding equals the full forward under token drop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import token_drop
from layers.embed import to_tubelets
from vidlm import config as config_lib
from vidlm.models.registry import build_model

F, H, W, TEXT = 4, 16, 16, 6  # 4 frames x 2 x 2 tokens of (1, 8, 8) tubelets
TPF = 4  # tokens per frame


def _pixels(frames) -> jax.Array:
  """uint8 [B, F, H, W, 3] -> raw tubelet features [B, F, h*w, 8*8*3] in [-1, 1]."""
  x = to_tubelets(jnp.asarray(frames, jnp.float32) / 127.5 - 1.0, (1, 8, 8))
  return x.reshape(x.shape[0], F, TPF, -1)


def _video(seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, F, H, W, 3), dtype=np.uint8)


def test_static_video_drops_every_token_after_the_first_frame():
  frames = np.repeat(_video(0)[:, :1], F, axis=1)  # one frame held
  keep = token_drop.keep_mask(_pixels(frames), 0.5)
  assert keep.shape == (2, F, TPF)
  assert bool(keep[:, 0].all()) and not bool(keep[:, 1:].any())
  np.testing.assert_allclose(token_drop.dropped_fraction(keep), [(F - 1) / F] * 2)


def test_changing_video_keeps_every_token_and_tau_one_keeps_a_static_one():
  keep = token_drop.keep_mask(_pixels(_video(1)), 0.5)  # independent random frames: cosine ~ 0
  assert bool(keep.all())
  np.testing.assert_allclose(token_drop.dropped_fraction(keep), [0.0, 0.0])
  static = np.repeat(_video(0)[:, :1], F, axis=1)
  assert bool(token_drop.keep_mask(_pixels(static), 1.0).all())  # a clipped cosine never exceeds 1


def test_partial_change_keeps_only_the_changed_tokens_and_compares_with_the_previous_original_frame():
  frames = np.repeat(_video(2, 1)[:, :1], F, axis=1)
  frames[:, 2, :8, 8:] = 255 - frames[:, 2, :8, 8:]  # token (h=0, w=1) changes at t=2 only
  keep = np.asarray(token_drop.keep_mask(_pixels(frames), 0.5))[0]
  expect = np.zeros((F, TPF), bool)
  expect[0] = True
  expect[2, 1] = expect[3, 1] = True  # t=3 differs from t=2 (the previous original frame) again
  np.testing.assert_array_equal(keep, expect)


def test_a_stream_in_chunks_drops_what_the_whole_video_drops():
  frames = np.repeat(_video(11, 1)[:, :1], F, axis=1)
  frames[:, 2, :8] = 255 - frames[:, 2, :8]  # frame 2 changes in its top half
  feats = _pixels(frames)
  whole = token_drop.keep_mask(feats, 0.5)
  first = token_drop.keep_mask(feats[:, :2], 0.5)
  second = token_drop.keep_mask(feats[:, 2:], 0.5, previous=feats[:, 1])  # compared with the last frame before it
  np.testing.assert_array_equal(jnp.concatenate([first, second], axis=1), whole)
  assert bool(second[:, 0, :2].all()) and not bool(second[:, 0, 2:].any())


def test_compact_keeps_order_positions_and_index_and_counts_overflow():
  b, nv = 2, 8
  tokens = jnp.arange(b * nv * 3, dtype=jnp.float32).reshape(b, nv, 3)
  keep = jnp.asarray([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]], bool)
  pos = jnp.asarray(np.arange(nv * 3).reshape(nv, 3), jnp.int32)
  full = token_drop.compact(tokens, keep, pos)
  np.testing.assert_array_equal(full.index[0, :4], [0, 2, 3, 6])
  np.testing.assert_array_equal(full.valid.sum(1), [4, 1])
  np.testing.assert_array_equal(full.positions[0, :4], np.asarray(pos)[[0, 2, 3, 6]])
  np.testing.assert_array_equal(full.tokens[0, :4], np.asarray(tokens)[0, [0, 2, 3, 6]])
  np.testing.assert_array_equal(full.tokens[0, 4:], 0.0)  # invalid slots hold zeros
  np.testing.assert_array_equal(full.index[1, 0], 7)
  small = token_drop.compact(tokens, keep, pos, capacity=3)
  np.testing.assert_array_equal(small.index[0], [0, 2, 3])  # the earliest kept tokens win the budget
  np.testing.assert_array_equal(small.overflow, [1, 0])
  big = token_drop.compact(tokens, keep, pos, capacity=10)
  assert big.tokens.shape == (b, 10, 3) and not bool(big.valid[:, 8:].any())
  with pytest.raises(ValueError, match="capacity"):
    token_drop.compact(tokens, keep, pos, capacity=0)


def test_drop_tokens_is_jittable_with_static_shapes():
  traces = []
  pos = jnp.asarray(np.stack(np.meshgrid(np.arange(F), np.arange(2), np.arange(2), indexing="ij"), -1).reshape(-1, 3))

  @jax.jit
  def run(feat, tau):
    traces.append(1)
    return token_drop.drop_tokens(feat, tau, pos, capacity=6)

  a = run(_pixels(_video(3)), 0.5)  # nothing dropped: 16 kept, 6 fit
  b = run(_pixels(np.repeat(_video(3)[:, :1], F, axis=1)), 0.5)  # 4 kept
  assert len(traces) == 1
  assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
  np.testing.assert_array_equal(a[0].overflow, [10, 10])
  np.testing.assert_array_equal(b[0].valid.sum(1), [4, 4])
  np.testing.assert_array_equal(b[0].positions[0, :4], np.asarray(pos)[:4])


# ---- VideoLM with model.token_drop_tau --------------------------------------------------------------------------


def _config(tau: float) -> config_lib.Config:
  cfg = config_lib.Config(name="token_drop_test")
  cfg.mesh = config_lib.MeshConfig(1, 1, 1, 1)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 8, 64
  m.tubelet, m.token_drop_tau = (1, 8, 8), tau
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = F, H, W, TEXT
  cfg.attention.kernel = "xla"
  return cfg


def _model(tau: float):
  return build_model(_config(tau), nnx.Rngs(0))


def _tokens(batch: int = 2):
  return jnp.asarray(np.random.default_rng(9).integers(0, 256, (batch, TEXT), dtype=np.int32))


def _logits(model, frames, tokens, positions=None):
  return nnx.jit(lambda m, f, t, p: m(f, t, positions=p))(model, jnp.asarray(frames), tokens, positions)


def test_config_tau_range_is_one_line_error():
  cfg = _config(1.5)
  with pytest.raises(config_lib.ConfigError, match=r"config.model.token_drop_tau=1.5: expected a number in \[0, 1\]"):
    cfg.model.validate(cfg)
  _config(0.5).model.validate(_config(0.5))  # in range: no error


def test_nothing_dropped_is_bit_identical_to_no_token_drop():
  frames, tokens = _video(4), _tokens()
  off, on = _model(1.0), _model(0.5)
  assert off.token_drop_tau == 1.0  # the default config is off
  np.testing.assert_array_equal(_logits(on, frames, tokens), _logits(off, frames, tokens))


def test_dropped_frames_equal_a_run_on_only_the_kept_frames_at_their_positions():
  frames = _video(5)
  frames[:, 1] = frames[:, 0]  # frame 1 repeats frame 0: every token of it dropped; frames 2, 3 random: kept
  tokens = _tokens()
  model = _model(0.5)
  emb = model.video_embed(jnp.asarray(frames)).reshape(2, F, TPF, -1)
  np.testing.assert_array_equal(token_drop.keep_mask(emb, 0.5)[:, :, 0], [[True, False, True, True]] * 2)
  dropped = _logits(model, frames, tokens)

  kept = [0, 2, 3]
  positions = model.positions(frames.shape, TEXT)  # true positions of the whole video + text
  rows = np.concatenate([np.arange(f * TPF, (f + 1) * TPF) for f in kept] + [F * TPF + np.arange(TEXT)])
  model.token_drop_tau = 1.0  # the same weights, no token drop, fed only the kept frames
  only_kept = _logits(model, frames[:, kept], tokens, jnp.asarray(positions[rows]))
  np.testing.assert_allclose(dropped, only_kept, atol=1e-5, rtol=1e-5)
  # and the drop matters: the full video without token drop gives other logits
  assert float(jnp.max(jnp.abs(_logits(model, frames, tokens) - dropped))) > 1e-3


def test_what_a_dropped_token_holds_never_changes_the_result():
  base = _video(6)
  base[:, 1:] = base[:, :1]
  base[:, 2, :8, :8] = 255 - base[:, 2, :8, :8]  # one token of frame 2 changes (kept), the rest repeat
  noisy = base.copy()
  noise = np.random.default_rng(7).integers(-3, 4, noisy[:, 1:, 8:].shape)
  noisy[:, 1:, 8:] = np.clip(noisy[:, 1:, 8:].astype(int) + noise, 0, 255).astype(np.uint8)  # dropped tokens differ
  tokens, model = _tokens(), _model(0.5)

  def keep(fr):
    return token_drop.keep_mask(model.video_embed(jnp.asarray(fr)).reshape(2, F, TPF, -1), 0.5)

  np.testing.assert_array_equal(keep(base), keep(noisy))
  assert 0 < int((~keep(base)).sum()) < 2 * F * TPF
  assert not np.array_equal(base, noisy)
  np.testing.assert_allclose(_logits(model, noisy, tokens), _logits(model, base, tokens), atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_the_full_forward_under_token_drop():
  frames = _video(8)
  frames[:, 1:3] = frames[:, :1]  # frames 1, 2 repeat frame 0: dropped
  tokens, model, prompt = _tokens(), _model(0.5), 2
  full = _logits(model, frames, tokens)
  logits, cache = nnx.jit(lambda m, f, p: m.prefill(f, p, max_new_tokens=TEXT - prompt))(
    model, jnp.asarray(frames), tokens[:, :prompt]
  )
  decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  rows = [logits]
  for i in range(prompt, TEXT):
    step, cache = decode(model, tokens[:, i], cache)
    rows.append(step[:, None])
  np.testing.assert_allclose(jnp.concatenate(rows, axis=1), full, atol=1e-5, rtol=1e-5)
  keep = token_drop.keep_mask(model.video_embed(jnp.asarray(frames)).reshape(2, F, TPF, -1), 0.5)
  assert not bool(keep[:, 1:3].any())  # at least the two repeated frames are dropped
  hidden = np.asarray(cache.seq_index[:, : F * TPF] == token_drop.DROPPED_SEQ_INDEX)
  np.testing.assert_array_equal(hidden, ~np.asarray(keep).reshape(2, -1))  # exactly the dropped slots are hidden


def test_token_drop_inside_a_zigzag_ring_equals_one_device():
  """Segment ids follow the ring's storage order: a seq=4 zigzag ring gives the single-device logits."""
  from vidlm import sharding

  frames = _video(10)
  frames[:, 1] = frames[:, 0]
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 8), dtype=np.int32))  # 16 + 8 = 24 tokens
  single = _logits(_model(0.5), frames, tokens)
  cfg = _config(0.5)
  cfg.mesh = config_lib.MeshConfig(1, 1, 4, 1)
  cfg.attention.context_parallel, cfg.attention.ring_layout = "ring", "zigzag"
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    ring = _logits(build_model(cfg, nnx.Rngs(0)), frames, tokens)
  np.testing.assert_allclose(ring, single, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(_logits(_model(1.0), frames, tokens) - single))) > 1e-3  # something was dropped
