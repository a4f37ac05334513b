"""MemoryBridgeLM (vidlm/models/memory_bridge.py) on the model contract: config checks (one line, exit 2), greedy
generation == the teacher-forced forward, padding segments never change a result, the whole model's gradients
through the scanned + rematerialised recurrence == an unrolled Python loop over 33 segments, training on a variable
number of segments (SceneTiling), a short CPU training run that learns, and `vidlm train` + `vidlm eval` with
`niavh_scoring=both` on the experiment's smoke variant."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layers.memory import memory_step
from vidlm import cli
from vidlm import config as C
from vidlm.data import contract, procedural
from vidlm.eval.scoring import _generation_arrays
from vidlm.infer import generate
from vidlm.models import losses
from vidlm.models import memory_bridge as mb
from vidlm.models.registry import build_model

SPEC = "experiments/memory_bridge.py:smoke"
# jitted entry points taking the model as an argument (eager op-by-op calls are slow on a loaded CPU)
_forward = nnx.jit(lambda model, frames, tokens: model(frames, tokens))
_segments = nnx.jit(lambda model, frames, count=None: model.segments(frames, count))
_scores = nnx.jit(lambda model, batch: model.loss(batch, per_example=True))


def _cfg(frames=8, size=16, **model) -> C.Config:
  """A tiny memory-bridge config on `frames` x size x size videos."""
  cfg = C.load_config(SPEC)
  m = cfg.model
  m.embed_dim, m.num_heads, m.head_dim, m.bridge_mlp_dim, m.decoder_mlp_dim = 16, 2, 8, 32, 32
  m.memory_tokens, m.decoder_layers = 2, 1
  for k, v in model.items():
    setattr(m, k, v)
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.tiers = frames, size, size, ("a",)
  cfg.eval.tiers = ("a",)
  return C.validate(cfg)


def _batch(cfg, n=4, frames=None, tier="a", seed=0):
  d = cfg.data
  exs = [contract.model_example(procedural.make_example(seed, i, frames=frames or d.frames, height=d.height,
                                                        width=d.width, tier=tier, text_len=d.text_len))
         for i in range(n)]
  return exs, {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in exs[0]}


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("field,value", [
  ("segment_stride", "9"), ("segment_length", "0"), ("memory_tokens", "0"), ("segment_mode", "shots"),
  ("decoder_reads", "all"), ("max_segments", "1"), ("head_dim", "7"), ("remat", "most"), ("dtype", "fp8"),
  ("frame_layers", "-1"), ("position_embed", "maybe"), ("segment_layers", "-1"), ("patch_embed", "cnn"),
  ("stem_channels", "0"),
])
def test_bad_fields_are_one_line_naming_the_field(field, value):
  cfg = C.load_config(SPEC)
  with pytest.raises(C.ConfigError) as e:  # at the override (types) or at validation (values)
    C.apply_override(cfg, f"model.{field}", value)
    C.validate(cfg)
  assert f"model.{field}" in str(e.value) and "\n" not in str(e.value)


def test_cli_rejects_a_bad_field_with_exit_2(capsys, tmp_path):
  code = cli.main(["train", "--config", SPEC, "--workdir", str(tmp_path / "w"), "--config.model.segment_stride=9"])
  err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
  assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "model.segment_stride" in err[0]
  assert not (tmp_path / "w" / "config.json").exists()


def test_model_name_override_builds_a_memory_bridge():
  cfg = C.load_config("experiments/demo.py:smoke")
  C.apply_override(cfg, "model.name", "memory_bridge")
  assert isinstance(cfg.model, mb.MemoryBridgeConfig)
  cfg.model.embed_dim, cfg.model.decoder_mlp_dim, cfg.model.bridge_mlp_dim = 16, 32, 32
  assert isinstance(build_model(C.validate(cfg), nnx.Rngs(0)), mb.MemoryBridgeLM)


def test_segment_count_follows_the_length():
  plan = mb.SegmentPlan.of(mb.MemoryBridgeConfig())  # 4 frames every 2
  assert [plan.num_segments(f) for f in (8, 64, 256)] == [3, 31, 127]
  scene = mb.SegmentPlan.of(mb.MemoryBridgeConfig(segment_mode="scene", scene_min_length=2))
  assert scene.num_segments(8) == 4 and scene.num_segments(64) == 32


# ------------------------------------------------------------------ generation and padding


def test_greedy_generation_equals_the_teacher_forced_forward():
  cfg = _cfg()
  model = build_model(cfg, nnx.Rngs(1))
  exs, _ = _batch(cfg)
  g = [_generation_arrays(e) for e in exs]
  gb = {k: jnp.asarray(np.stack([e[k] for e in g])) for k in g[0]}
  out = generate(model, gb["frames"], gb["prompt"], 5, prompt_lengths=gb["prompt_len"], return_logits=True)
  # feed prompt + generated tokens through the full forward: its logits at each generated position are the ones
  # greedy decoding read them from
  plen = np.asarray(gb["prompt_len"])
  tokens = np.asarray(gb["prompt"]).copy()
  for b in range(len(exs)):
    tokens[b, plen[b] : plen[b] + 5] = np.asarray(out.tokens[b])
  full = np.asarray(_forward(model, gb["frames"], jnp.asarray(tokens)))
  for b in range(len(exs)):
    steps = int(out.lengths[b])
    want = full[b, plen[b] - 1 : plen[b] - 1 + steps]
    np.testing.assert_allclose(np.asarray(out.logits[b, :steps]), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,extras", [
  ("fixed", dict(frame_layers=1, position_embed=True, segment_layers=1, patch_embed="conv", stem_channels=4)),
  ("scene", {}),
])
def test_padding_segments_never_change_the_result(mode, extras):
  base = _cfg(segment_mode=mode, **extras)
  padded = _cfg(segment_mode=mode, max_segments=9, **extras)
  model = build_model(base, nnx.Rngs(2))
  _, batch = _batch(base)
  want = _forward(model, batch["frames"], batch["tokens"])
  big = build_model(padded, nnx.Rngs(2))
  nnx.update(big, nnx.state(model))
  table, _, valid = _segments(big, batch["frames"])
  assert table.shape[1] == 9 and not bool(jnp.all(valid))  # padding segments really are there
  np.testing.assert_allclose(_forward(big, batch["frames"], batch["tokens"]), want, atol=1e-5, rtol=1e-5)


def _padded_batch(cfg, counts, tier="a", seed=0):
  """Examples of counts[i] frames each, padded with random frames to cfg.data.frames -> (unpadded examples, batch
  with `frame_count`): rows of different lengths in one static-shape batch, the padding garbage on purpose."""
  d, rng = cfg.data, np.random.default_rng(seed)
  exs, rows = [], []
  for i, n in enumerate(counts):
    ex = contract.model_example(procedural.make_example(seed, i, frames=n, height=d.height, width=d.width,
                                                        tier=tier, text_len=d.text_len))
    pad = rng.integers(0, 256, (d.frames - n, *ex["frames"].shape[1:]), dtype=np.uint8)
    exs.append(ex)
    rows.append({**ex, "frames": np.concatenate([ex["frames"], pad]), "cut_frames": np.full(d.frames, -1, np.int32),
                 "frame_count": np.int32(n)})
  return exs, {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@pytest.mark.parametrize("mode", ["fixed", "scene"])
def test_padding_frames_never_change_a_result(mode):
  """frame_count: each row of a batch of 2..8 real frames (padded with random frames to 8) gives the loss of its
  unpadded video alone; the number of valid segments differs between rows (fixed: 3, 2, 1)."""
  cfg = _cfg(segment_mode=mode, **({"segment_layers": 1, "frame_layers": 1} if mode == "fixed" else {}))
  model = build_model(cfg, nnx.Rngs(6))
  counts = [8, 6, 2] if mode == "fixed" else [8, 6]
  exs, batch = _padded_batch(cfg, counts)
  _, _, valid = _segments(model, batch["frames"], batch["frame_count"])
  if mode == "fixed":
    np.testing.assert_array_equal(np.asarray(valid.sum(1)), [3, 2, 1])
  _, sums = _scores(model, batch)
  for i, ex in enumerate(exs):
    alone = {k: jnp.asarray(v)[None] for k, v in ex.items()}
    _, want = _scores(model, alone)
    np.testing.assert_allclose(sums["loss_sum"][i : i + 1], want["loss_sum"], rtol=2e-5, atol=1e-6)


def test_scene_segments_vary_per_row_and_each_row_equals_itself_alone():
  cfg = _cfg(frames=16, size=16, segment_mode="scene", scene_min_length=2, segment_length=8)
  model = build_model(cfg, nnx.Rngs(3))
  _, batch = _batch(cfg, n=6)
  _, _, valid = _segments(model, batch["frames"])
  counts = np.asarray(valid.sum(1))
  assert len(set(counts.tolist())) > 1, counts  # a variable number of segments within one batch
  loss, sums = _scores(model, batch)
  assert np.isfinite(float(loss))
  _, alone = _scores(model, {k: v[2:3] for k, v in batch.items()})
  np.testing.assert_allclose(alone["loss_sum"], sums["loss_sum"][2:3], rtol=1e-5)
  grads = jax.jit(jax.grad(lambda s, b: nnx.merge(nnx.graphdef(model), s).loss(b)[0]))(nnx.state(model), batch)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------ backpropagation through the recurrence


def test_whole_model_gradients_through_33_segments_equal_an_unrolled_loop():
  """The whole model's loss and parameter gradients (scan + remat recurrence, as trained) equal the chain rule
  worked by hand over a Python loop of 33 segments: the inputs' vjp, one jitted step + step vjp per segment
  (each compiled once), and the bank + decoder's gradient. Reads cache+last, so the segment outputs' path counts."""
  # one 8x8 token per frame, one frame per segment: 33 segments, every one on the gradient's path to the answer
  cfg = _cfg(frames=33, size=8, segment_length=1, segment_stride=1, remat="full", decoder_reads="cache+last")
  model = build_model(cfg, nnx.Rngs(4))
  _, batch = _batch(cfg, n=2)
  graphdef, state = nnx.split(model)
  frames = batch["frames"]

  def full(state):
    return nnx.merge(graphdef, state).loss(batch)[0]

  l_scan, g_scan = jax.jit(jax.value_and_grad(full))(state)

  # by hand: inputs -> 33 steps -> bank + decoder
  (mem0, tokens), pre_vjp = jax.vjp(jax.jit(lambda s: nnx.merge(graphdef, s).segment_inputs(frames)[:2]), state)
  tmask, valid, pos = jax.jit(lambda s: nnx.merge(graphdef, s).segment_inputs(frames)[2:])(state)
  k = tokens.shape[1]
  assert k == 33

  def step(state, mem, cache, count, tok, tm, ok, ps):
    m = nnx.merge(graphdef, state)
    (mem, cache, count), (_, out) = memory_step(m.bridge, m.retriever, (mem, cache, count), tok, tm, ok, ps)
    return mem, cache, count, out

  @jax.jit
  def step_vjp(state, mem, cache, count, tok, tm, ok, ps, ct_mem, ct_cache, ct_out):
    def f(s, m_, c_, t_):
      mem, cache, _, out = step(s, m_, c_, count, t_, tm, ok, ps)
      return mem, cache, out

    return jax.vjp(f, state, mem, cache, tok)[1]((ct_mem, ct_cache, ct_out))

  def post(state, mem, cache, count, outs):
    m = nnx.merge(graphdef, state)
    return losses.answer_loss(m.read(batch["tokens"], *m.memory_bank((mem, cache, count), outs, tmask)), batch)[0]

  fwd = jax.jit(step)
  b = tokens.shape[0]
  carries, outs = [(mem0, jnp.zeros((b, k, *mem0.shape[1:])), jnp.zeros((b,), jnp.int32))], []
  for s in range(k):
    *carry, out = fwd(state, *carries[-1], tokens[:, s], tmask[:, s], valid[:, s], pos[:, s])
    carries.append(tuple(carry))
    outs.append(out)
  l_loop, (g_params, ct_mem, ct_cache, ct_outs) = jax.jit(jax.value_and_grad(post, argnums=(0, 1, 2, 4)))(
    state, *carries[-1], jnp.stack(outs, axis=1))
  ct_tokens = []
  for s in reversed(range(k)):
    d_state, ct_mem, ct_cache, d_tok = step_vjp(state, *carries[s], tokens[:, s], tmask[:, s], valid[:, s],
                                                pos[:, s], ct_mem, ct_cache, ct_outs[:, s])
    g_params = jax.tree.map(jnp.add, g_params, d_state)
    ct_tokens.insert(0, d_tok)
  (d_state,) = pre_vjp((ct_mem, jnp.stack(ct_tokens, axis=1)))
  g_loop = jax.tree.map(jnp.add, g_params, d_state)

  np.testing.assert_allclose(float(l_scan), float(l_loop), rtol=1e-6)
  flat_s, flat_u = jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)
  assert len(flat_s) == len(flat_u) > 10
  for x, y in zip(flat_s, flat_u):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
  # the initial memory reaches the answer through all 33 steps
  assert float(jnp.abs(g_scan["memory_init"].get_value()).max()) > 0


# ------------------------------------------------------------------ learning


def test_a_short_cpu_training_run_on_a_variable_number_of_segments_learns():
  """60 Adam steps of a tiny model on tier (a), 16x16 frames, every batch mixing videos of 2 to 8 real frames
  (padded to 8: 1 to 3 valid segments a row, `frame_count`): the answer loss falls by more than half and token
  accuracy rises well above its start. (That is the answer's form and EOS; reading the needle at 1x-32x is what
  experiments/memory_bridge.py measures, minutes of training, not seconds.)"""
  cfg = _cfg(frames=8, size=16)
  model = build_model(cfg, nnx.Rngs(5))
  graphdef, state = nnx.split(model)
  opt = optax.adam(3e-3)
  opt_state = opt.init(state)

  @jax.jit
  def step(state, opt_state, batch):
    (loss, sums), g = jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch), has_aux=True)(state)
    upd, opt_state = opt.update(g, opt_state, state)
    return optax.apply_updates(state, upd), opt_state, loss, sums

  losses, accs = [], []
  counts = np.random.default_rng(7).choice([2, 4, 6, 8], size=(60, 16))
  for i in range(60):
    _, batch = _padded_batch(cfg, counts[i].tolist(), seed=100 + i)
    state, opt_state, loss, sums = step(state, opt_state, batch)
    losses.append(float(loss))
    accs.append(float(sums["correct"] / sums["weight"]))
  first, last = np.mean(losses[:3]), np.mean(losses[-10:])
  assert last < 0.5 * first, (first, last)
  assert np.mean(accs[-10:]) > np.mean(accs[:3]) + 0.25, (accs[:3], accs[-10:])


def test_train_and_eval_cli_with_generation(tmp_path, capsys):
  work = str(tmp_path / "w")
  assert cli.main(["train", "--config", SPEC, "--workdir", work, "--config.train.progress_bar=false"]) == 0
  assert cli.main(["eval", "--config", SPEC, "--workdir", work, "--config.eval.evaluators=niavh",
                   "--config.eval.niavh_scoring=both", "--config.eval.tiers=c"]) == 0
  capsys.readouterr()
  res = json.loads((tmp_path / "w" / "eval" / "niavh.json").read_text())
  assert [x["multiplier"] for x in res["lengths"]] == [1, 2]
  assert res["tiers"]["c"]["generate"]["agreement"] == 1.0  # greedy decoding agrees with teacher forcing


def test_stream_equals_whole_video_with_conv_stem_and_segment_blocks():
  """The streaming ingest (vidlm/infer/memory_stream.py) runs the same front end as the whole-video path with the
  options that change it (conv patch embedding, segment blocks): 12 frames in 3 chunks give the model's logits."""
  from vidlm.infer import memory_stream  # noqa: PLC0415

  cfg = _cfg(frames=8, size=16, patch_embed="conv", stem_channels=4, segment_layers=1, position_embed=True)
  model = build_model(cfg, nnx.Rngs(8))
  frames = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12, 16, 16, 3), dtype=np.uint8))
  state = memory_stream.init_state(model, batch=2, capacity=8, frame_shape=frames.shape[2:4])
  ingest = nnx.jit(memory_stream.ingest)
  for s in range(0, 12, 4):
    state = ingest(model, state, frames[:, s : s + 4])
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 6)), jnp.int32)
  np.testing.assert_allclose(memory_stream.read_logits(model, state, tokens), _forward(model, frames, tokens),
                             atol=1e-5, rtol=1e-5)
