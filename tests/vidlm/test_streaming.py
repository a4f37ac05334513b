"""StreamingSession (vidlm/infer/streaming.py) and the memory-bridge stream (vidlm/infer/memory_stream.py): a chunked
session answers exactly as one-shot generation, asking does not disturb the stream, state()/restore() round-trips
through orbax, chunk shapes are checked in one line, the memory-bridge state is constant-shape, equals the whole
video's recurrence while its bank has room, and evicts FIFO / by score once full. Tiny fp32 models, one shared
model per family (each step compiles once)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.cache import CacheSpec
from vidlm import config as config_lib
from vidlm.data import tokenizer
from vidlm.infer import generate, memory_stream
from vidlm.infer.streaming import StreamingSession

FRAMES, H = 8, 16  # 8 frames of 16 x 16: 4 tokens a frame
QUESTION = "what?"


def _video_cfg():
  cfg = config_lib.Config(name="stream_session_test")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 8, 64
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = FRAMES, H, H, 12
  cfg.attention.kernel = "xla"
  return cfg


def _frames(b=1, n=FRAMES, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, n, H, H, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video():
  from vidlm.models.registry import build_model

  cfg = _video_cfg()
  return build_model(cfg, nnx.Rngs(0)), cfg


SPECS = {
  "full": CacheSpec("full", capacity=2 * FRAMES * 4 + 12 + 4),
  "sink_window": CacheSpec("sink_window", sink=4, window=12),
  "block_retrieval": CacheSpec("block_retrieval", sink=4, window=12, block=4, blocks=8, top_k=2),
}


def test_session_equals_one_shot_generate_full_cache(video):
  """Frames ingested 2 at a time into a full cache, then ask(): the tokens greedy generate() gives for one prefill
  of the same frames and question; the ingest step compiled once; the stats count what was ingested."""
  model, cfg = video
  frames = _frames()
  session = StreamingSession(model, cfg, cache_spec=SPECS["full"], chunk=2, max_answer=4)
  for s in range(0, FRAMES, 2):
    session.ingest(frames[0, s : s + 2])
  session.ask(QUESTION)
  prompt = jnp.asarray([tokenizer.prompt_ids(QUESTION)], jnp.int32)
  want = generate(model, jnp.asarray(frames), prompt, 4)
  np.testing.assert_array_equal(session.last_tokens, np.asarray(want.tokens))
  st = session.stats()
  assert st["frames"] == FRAMES and st["compiles"] == 1 and st["frames_per_s"] > 0
  assert st["state_bytes"] == sum(x.nbytes for x in jax.tree.leaves(session.raw_state))


@pytest.mark.parametrize("kind", ["sink_window", "block_retrieval"])
def test_ask_does_not_change_later_answers_and_state_round_trips(video, kind, tmp_path):
  """Stream A asks after 4 frames, B does not: after 8 frames both answer with the same tokens. B's state after 4
  frames saved with orbax and restored into a fresh session C, which then ingests the rest: C answers like B."""
  import orbax.checkpoint as ocp

  model, cfg = video
  frames = _frames(seed=1)
  a, b, c = (StreamingSession(model, cfg, cache_spec=SPECS[kind], chunk=2, max_answer=3) for _ in range(3))
  for s in range(0, 4, 2):
    a.ingest(frames[0, s : s + 2])
    b.ingest(frames[0, s : s + 2])
  a.ask(QUESTION)
  before = a.raw_state.length.copy()
  a.ask("again?")
  np.testing.assert_array_equal(a.raw_state.length, before)  # the question never entered the stream's cache
  path = tmp_path / "stream"
  ocp.PyTreeCheckpointer().save(path, b.state())
  c.restore(ocp.PyTreeCheckpointer().restore(path))
  assert c.frames_ingested == 4
  for s in range(4, FRAMES, 2):
    for sess in (a, b, c):
      sess.ingest(frames[0, s : s + 2])
  answers = [sess.ask(QUESTION) and sess.last_tokens for sess in (a, b, c)]
  np.testing.assert_array_equal(answers[0], answers[1])
  np.testing.assert_array_equal(answers[2], answers[1])
  for name in ("k", "v", "positions", "length", "frames"):
    np.testing.assert_array_equal(getattr(c.raw_state, name), getattr(b.raw_state, name))


def test_bad_chunks_and_restores_are_one_line_errors(video):
  model, cfg = video
  session = StreamingSession(model, cfg, cache_spec=SPECS["sink_window"], chunk=2)
  for bad, got in ((_frames(n=3)[0], r"got \[3, 16, 16, 3\]"), (_frames(n=2)[0, :, :8], r"got \[2, 8, 16, 3\]"),
                   (_frames(b=2, n=2), r"got \[2, 2, 16, 16, 3\]")):
    with pytest.raises(config_lib.ConfigError, match=r"stream chunk: expected frames \[F, 16, 16, 3\] uint8 with "
                       r"F = 2 \(or, for a video's last chunk, a smaller multiple of 1\), " + got):
      session.ingest(bad)
  with pytest.raises(config_lib.ConfigError, match="nothing ingested yet"):
    session.ask(QUESTION)
  with pytest.raises(config_lib.ConfigError, match="does not fit the sink_window cache's window of 12 tokens"):
    StreamingSession(model, cfg, cache_spec=SPECS["sink_window"], chunk=4)
  other = StreamingSession(model, cfg, cache_spec=SPECS["block_retrieval"], chunk=2)
  with pytest.raises(config_lib.ConfigError, match="a different model or cache kind"):
    other.restore(session.state())
  with pytest.raises(config_lib.ConfigError, match="does not fit data.text_len=12"):
    session.ingest(_frames(n=2)[0])
    session.ask("a question far too long")


# ---- memory bridge ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge():
  from vidlm.models.registry import build_model

  cfg = config_lib.load_config("experiments/memory_bridge.py:smoke")  # segments of 4 frames every 2
  cfg.data.height = cfg.data.width = H
  cfg.attention.kernel = "xla"
  return build_model(cfg, nnx.Rngs(0)), cfg


def test_memory_stream_equals_whole_video_and_keeps_its_shapes(bridge):
  """12 frames in chunks of 4 (5 segments): the bank and the decoder's logits equal MemoryBridgeLM on the whole
  video (fp32, 1e-5), with one compilation and the same state shapes after every chunk."""
  model, cfg = bridge
  frames = _frames(b=2, n=12, seed=2)
  session = StreamingSession(model, cfg, batch=2, chunk=4, memory_capacity=8, max_answer=2)
  shapes = []
  for s in range(0, 12, 4):
    session.ingest(frames[:, s : s + 4])
    shapes.append(jax.tree.map(lambda a: a.shape, session.raw_state))
  assert shapes[0] == shapes[1] == shapes[2] and session.compiles == 1
  state = session.raw_state
  np.testing.assert_array_equal(state.count, [5, 5])
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 6)), jnp.int32)
  want = model(jnp.asarray(frames), tokens)
  np.testing.assert_allclose(memory_stream.read_logits(model, state, tokens), want, atol=1e-5, rtol=1e-5)
  bank, valid = model.encode(jnp.asarray(frames))
  np.testing.assert_allclose(memory_stream.bank_view(model, state)[0][:, : bank.shape[1]], bank, atol=1e-5)
  assert len(session.ask(["q?", "q?"])) == 2


@pytest.mark.parametrize("eviction", ["fifo", "score"])
def test_memory_bank_eviction_is_bounded(bridge, eviction):
  """A bank of 3 segments over a 20-frame stream (9 segments): count stays 3, the shapes stay put. FIFO keeps the
  3 newest segments; keep-by-score keeps the one distinct segment of an otherwise static stream."""
  model, cfg = bridge
  frames = np.repeat(_frames(n=1, seed=4), 20, axis=1)  # a static video ...
  frames[:, 4:6] = _frames(n=2, seed=5)  # ... with one distinct stretch: segments 1, 2 see it (frames 2-5, 4-7)
  session = StreamingSession(model, cfg, chunk=4, memory_capacity=3, eviction=eviction)
  shape0 = jax.tree.map(lambda a: a.shape, session.raw_state)
  for s in range(0, 20, 4):
    session.ingest(frames[:, s : s + 4])
  state = session.raw_state
  assert jax.tree.map(lambda a: a.shape, state) == shape0
  assert int(state.count[0]) == 3 and int(state.written[0]) == 9
  kept = sorted(np.asarray(state.slot_segment[0]).tolist())
  if eviction == "fifo":
    assert kept == [6, 7, 8]
  else:
    assert {1, 2} & set(kept), kept  # a segment holding the distinct frames survives 6 evictions
