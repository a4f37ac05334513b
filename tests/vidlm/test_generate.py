"""VideoLM prefill + decode_step against the full forward (fp32, 1e-5), greedy generate(), and NIAVH scoring by
generation against teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidlm import config as config_lib
from vidlm import sharding
from vidlm.infer import generate
from vidlm.models.registry import build_model

B, PROMPT, TEXT = 4, 4, 10  # batch, prompt tokens, text tokens of the full forward


def tiny_config(kernel: str = "xla", mesh=(1, 1, 1, 1)) -> config_lib.Config:
  cfg = config_lib.Config(name="generate_test")
  cfg.mesh = config_lib.MeshConfig(*mesh)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 8, 64
  m.tubelet = (1, 8, 8)
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 2, 16, 16, TEXT  # 2 x 2 x 2 = 8 video tokens
  cfg.attention.kernel = kernel
  return cfg


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (B, 2, 16, 16, 3), dtype=np.uint8)
  tokens = rng.integers(0, 256, (B, TEXT), dtype=np.int32)
  return jnp.asarray(frames), jnp.asarray(tokens)


def _step_by_step(model, frames, tokens):
  """Text logits [B, TEXT, V]: prefill of the first PROMPT tokens, then one decode step per further token."""
  prefill = nnx.jit(lambda m, f, p: m.prefill(f, p, max_new_tokens=TEXT - PROMPT))
  decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  logits, cache = prefill(model, frames, tokens[:, :PROMPT])
  assert cache.k.shape[:3] == (2, B, 8 + TEXT)  # [layers, B, S_max]: video + prompt + new tokens
  rows = [logits]
  for i in range(PROMPT, TEXT):
    step_logits, cache = decode(model, tokens[:, i], cache)
    rows.append(step_logits[:, None])
  np.testing.assert_array_equal(cache.length, [8 + TEXT] * B)
  return jnp.concatenate(rows, axis=1)


@pytest.mark.parametrize("kernel", ["xla", "flash"])
def test_decode_matches_full_forward(kernel):
  """fp32: cached decoding reproduces the full forward's logits at every text position (flash: interpret mode)."""
  model = build_model(tiny_config(kernel), nnx.Rngs(0))
  frames, tokens = _inputs()
  full = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens)
  np.testing.assert_allclose(_step_by_step(model, frames, tokens), full, atol=1e-5, rtol=1e-5)


def test_decode_matches_full_forward_sharded_8_devices():
  """The same on a data x fsdp x tensor = 2 x 2 x 2 mesh (weights FSDP- and tensor-sharded, batch split)."""
  cfg = tiny_config("xla", mesh=(2, 2, 1, 2))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
  frames, tokens = _inputs(1)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    model = build_model(cfg, nnx.Rngs(0))
    assert len({s.index for s in model.lm_head.kernel[...].addressable_shards}) > 1  # really sharded
    frames = jax.device_put(frames, sharding.batch_sharding(mesh, frames.ndim))
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.ndim))
    full = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens)
    np.testing.assert_allclose(_step_by_step(model, frames, tokens), full, atol=1e-5, rtol=1e-5)


def test_explicit_positions_reach_rope():
  """VideoLM's positions argument is used: the default positions reproduce the default call, shifted text
  positions change the logits."""
  model = build_model(tiny_config(), nnx.Rngs(0))
  frames, tokens = _inputs()
  pos = model.positions(frames.shape, TEXT)  # [N, 3]
  fwd = nnx.jit(lambda m, f, t, p: m(f, t, positions=p))
  base = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens)
  np.testing.assert_allclose(fwd(model, frames, tokens, pos), base, atol=1e-6)
  np.testing.assert_allclose(fwd(model, frames, tokens, np.broadcast_to(pos, (B, *pos.shape))), base, atol=1e-6)
  shifted = pos.copy()
  shifted[8:] += 3
  assert float(jnp.max(jnp.abs(fwd(model, frames, tokens, shifted) - base))) > 1e-3


def test_generate_is_greedy_and_stops_at_eos():
  model = build_model(tiny_config(), nnx.Rngs(0))
  frames, tokens = _inputs(2)
  lengths = np.array([PROMPT, PROMPT - 1] * (B // 2), np.int32)  # ragged prompts, right-padded
  prompt = tokens[:, :PROMPT].at[1::2, PROMPT - 1].set(256)
  gen = generate(model, frames, prompt, 5, prompt_lengths=lengths, eos_id=-1, return_logits=True)
  assert gen.tokens.shape == (B, 5) and gen.logits.shape == (B, 5, 260)
  np.testing.assert_array_equal(gen.lengths, [5] * B)
  for b in range(B):
    # teacher-force the row's own prompt + generated tokens: every generated token is the argmax there
    seq = jnp.concatenate([prompt[b, : lengths[b]], gen.tokens[b]])[None]
    full = model(frames[b : b + 1], seq)[0]  # [P_b + 5, V]
    tf = full[lengths[b] - 1 : lengths[b] + 4]
    np.testing.assert_allclose(gen.logits[b], tf, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(gen.tokens[b], jnp.argmax(tf, -1))
  # EOS: call the first generated token of row 0 "EOS": row 0 stops there, every row stops at its first EOS
  eos = int(gen.tokens[0, 0])
  stop = generate(model, frames, prompt, 5, prompt_lengths=lengths, eos_id=eos)
  assert int(stop.lengths[0]) == 1
  for b in range(B):
    row = list(np.asarray(gen.tokens[b]))
    want = row.index(eos) + 1 if eos in row else 5
    assert int(stop.lengths[b]) == want
    np.testing.assert_array_equal(stop.tokens[b, :want], gen.tokens[b, :want])
    assert np.all(np.asarray(stop.tokens[b, want:]) == 256)  # PAD after EOS
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, frames, prompt, 0)


def test_ring_prefill_then_decode_on_the_gathered_cache():
  """context_parallel=ring (zigzag over seq=2): the prefill runs the ring and writes the cache in sequence order;
  decode reads the whole cache. Logits equal the ring model's full forward."""
  cfg = tiny_config("xla", mesh=(1, 1, 2, 1))
  cfg.attention.context_parallel, cfg.attention.ring_layout = "ring", "zigzag"
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  frames, tokens = _inputs(3)
  tokens = jnp.concatenate([tokens, tokens[:, :2]], axis=1)  # 12 text tokens: 8 + 12 tokens split in 4 chunks
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    model = build_model(cfg, nnx.Rngs(0))
    full = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens)
    prefill = nnx.jit(lambda m, f, p: m.prefill(f, p, max_new_tokens=8))
    decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    logits, cache = prefill(model, frames, tokens[:, :PROMPT])  # 8 + 4 tokens: 4 zigzag chunks of 3
    rows = [logits]
    for i in range(PROMPT, 12):
      step_logits, cache = decode(model, tokens[:, i], cache)
      rows.append(step_logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(rows, axis=1), full, atol=1e-5, rtol=1e-5)


def test_niavh_scoring_by_generation_agrees_with_teacher_forcing(tmp_path):
  """Scorer.generate (real greedy decoding) and the teacher-forced Scorer give the same verdict and the same
  matched-prefix length per example; on examples whose answer is the model's own greedy output the prefix is
  long, so the agreement is not only at the first token."""
  from vidlm.data import tokenizer
  from vidlm.eval import grid
  from vidlm.eval.scoring import Scorer
  from vidlm.train.loop import Trainer

  cfg = tiny_config("xla", mesh=(-1, 1, 1, 1))  # batch over the 8 devices
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = 4, 32, 32, 32
  cfg.model.tubelet = (1, 16, 16)
  cfg.data.num_train = cfg.data.num_eval = 8
  cfg.train.batch_size = cfg.eval.batch_size = 8
  trainer = Trainer(cfg, tmp_path)
  scorer = Scorer(trainer)
  examples = [grid.example(cfg, "niavh", s, frames=4, tier="a", depth=0.5) for s in range(10)]  # 2 batches
  tf, gen = scorer(examples), scorer.generate(examples)
  np.testing.assert_array_equal(gen["exact"], tf["exact"])
  np.testing.assert_array_equal(gen["prefix"], tf["prefix"])
  # teach the model's own greedy continuation (3 tokens, then EOS): the first 3 answer tokens are right either way
  own = []
  for ex in examples:
    tokens = np.asarray(ex["tokens"])
    plen = int(np.flatnonzero(tokens == tokenizer.SEP)[0]) + 1
    with trainer.activate():
      g = generate(trainer.model, jnp.asarray(ex["frames"])[None], jnp.asarray(tokens[:plen])[None], 3, eos_id=-1)
    new = np.full_like(tokens, tokenizer.PAD)
    new[:plen], new[plen : plen + 3], new[plen + 3] = tokens[:plen], np.asarray(g.tokens[0]), tokenizer.EOS
    own.append({**ex, **tokenizer.arrays_from_tokens(new)})
  tf, gen = scorer(own), scorer.generate(own)
  np.testing.assert_array_equal(gen["prefix"], tf["prefix"])
  np.testing.assert_array_equal(gen["exact"], tf["exact"])
  assert tf["prefix"].min() >= 1 and tf["prefix"].mean() > 2  # (a token equal to EOS ends an answer early)


def test_niavh_scoring_field_is_checked():
  cfg = config_lib.load_config("experiments/demo.py")
  assert cfg.eval.niavh_scoring == "both"
  cfg.eval.niavh_scoring = "sampled"
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.niavh_scoring=.*teacher_forced \| generate \| both"):
    config_lib.validate(cfg)
