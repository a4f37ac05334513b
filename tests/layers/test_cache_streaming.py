"""Evicting KV caches (sink_window, block_retrieval) and chunked ingest into VideoLM (issue 13): exactness against
the full cache / full forward, true positions as the window slides, constant shapes, retrieval of a planted key,
one-line errors. fp32, tiny shapes, every step jitted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Attention
from layers.cache import CacheSpec, KVCache
from pallas_kernels.layout import MaskSpec
from vidlm import config as config_lib
from vidlm.models.registry import build_model

TPF = 2  # tokens per frame of the layer-level streams


def _layer(kv_heads=2):
  with nnx.use_eager_sharding(False):
    return Attention(16, 4, kv_heads, 8, kernel="xla", rngs=nnx.Rngs(0))


@nnx.jit(static_argnums=5)
def _append(layer, cache, x, pos, seq, mask):
  cache = cache.record(pos, seq)
  out, cache = layer(x, pos, mask=mask, cache=cache, decode=True)
  return out, cache.advance()


@nnx.jit(static_argnums=4)
def _restricted(layer, x, pos, seen, mask):
  """Plain attention (no cache) over the whole stream where every token sees only the tokens `seen` [N] marks
  (segment id 1; the rest id 0): for the chunk's own tokens, exactly attention over the kept set at true positions."""
  ids = seen.astype(jnp.int32)[None]
  return layer(x, pos, mask=mask, segment_ids=(ids, ids))


@pytest.mark.parametrize("kind", ["sink_window", "block_retrieval", "block_retrieval_top2"])
def test_window_slides_with_true_positions(kind):
  """A video-like stream (frames of 2 tokens, true (t, 0, w) positions) appended 2 frames at a time to an evicting
  cache that wraps its ring 4 times: every chunk's output equals plain attention over exactly what the chunk may
  see (sinks + the window before it + itself frame-causally; block_retrieval with top_k = all blocks: every earlier
  token; with top_k = 2 of 12 (one kv head): plus the valid tokens of the 2 blocks it reports in `picked`), each
  token at its TRUE position. So a slot's key does not depend on its ring slot or on how many tokens were evicted
  before it, and a retrieved block is attended exactly."""
  layer = _layer(1 if kind == "block_retrieval_top2" else 2)
  n, chunk, sink, window = 48, 4, 2, 8
  x = jax.random.normal(jax.random.key(1), (1, n, 16))
  j = np.arange(n)
  pos = jnp.asarray(np.stack([j // TPF, 0 * j, j % TPF], -1)[None], jnp.int32)  # [1, N, 3]
  seq = jnp.asarray(j // TPF)[None]  # one mask index per frame (the stream caches' causal group rule)
  if kind == "sink_window":
    spec = CacheSpec(kind, sink=sink, window=window)
  else:
    spec = CacheSpec("block_retrieval", sink=sink, window=window, block=4, blocks=12, top_k=2 if "top2" in kind else 12)
  cache = KVCache.create(spec, 1, layer.num_kv_heads, 8, mask=MaskSpec.causal())
  retrieved = 0
  mask = MaskSpec.frame_causal(TPF)
  for s in range(0, n, chunk):
    out, cache = _append(layer, cache, x[:, s : s + chunk], pos[:, s : s + chunk], seq[:, s : s + chunk], mask)
    seen = j < s + chunk  # the chunk itself and, frame-causally, everything before it ...
    if kind != "block_retrieval":  # ... minus what left the window before the chunk arrived ...
      seen &= (j < sink) | (j >= max(sink, s - window))
    if kind == "block_retrieval_top2":  # ... plus the picked blocks' tokens held before the chunk
      token, valid = spec.store_tokens(jnp.asarray([s]))
      slots = (np.asarray(cache.picked[0, 0])[:, None] * spec.block + np.arange(spec.block)).ravel()
      back = np.asarray(token[0])[slots][np.asarray(valid[0])[slots]]
      seen[back] = True
      retrieved += len(back)
    ref = _restricted(layer, x, pos, jnp.asarray(seen), mask)[:, s : s + chunk]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=f"chunk at {s}")
  assert int(cache.length[0]) == n and cache.k.shape == (1, sink + window, layer.num_kv_heads, 8)
  if kind == "block_retrieval_top2":
    assert retrieved >= 8 * 6  # two full blocks per chunk once the store holds them
  # the ring holds the last `window` tokens at their true positions, the sinks the first ones
  held = np.asarray(cache.positions[0, :, 0]) * TPF + np.asarray(cache.positions[0, :, 2])
  assert sorted(held) == [0, 1, *range(n - window, n)]
  if kind == "sink_window":  # and the window really bites: plain full attention differs for the last chunk
    full = _restricted(layer, x, pos, jnp.ones(n, bool), mask)[:, -chunk:]
    assert float(jnp.max(jnp.abs(full - out))) > 1e-3


@pytest.mark.parametrize("kind", ["sink_window", "block_retrieval_shared"])
def test_cache_positions_close_the_gaps(kind):
  """rope_positions="cache": the same stream as above (frames of 2 tokens), then a text chunk (t = h = w = p). Each
  chunk's output equals plain attention over exactly what it may see (sinks + window + for block_retrieval the 2
  blocks of 2 frames it picked, one choice for both kv heads: select="shared", scored by attention mass) with
  every frame it sees RENUMBERED 0, 1, 2, ... in time order (w kept) and the text at p - (frames missing), on all
  three axes: the context reads as one contiguous video followed by text, whatever was evicted."""
  layer = _layer(2)
  n, chunk, sink, window = 48, 4, 2, 8
  x = jax.random.normal(jax.random.key(2), (1, n + 3, 16))
  j = np.arange(n)
  pos = jnp.asarray(np.stack([j // TPF, 0 * j, j % TPF], -1)[None], jnp.int32)
  seq = jnp.asarray(j // TPF)[None]
  if kind == "sink_window":
    spec = CacheSpec(kind, sink=sink, window=window, rope_positions="cache")
  else:
    spec = CacheSpec("block_retrieval", sink=sink, window=window, block=4, blocks=12, top_k=2, rope_positions="cache",
                     score="mass", select="shared")
  cache = KVCache.create(spec, 1, 2, 8, mask=MaskSpec.causal())
  frame_mask = MaskSpec.frame_causal(TPF)

  def seen_before(s, cache):  # what an append arriving at stream index s may see, besides itself
    seen = (j < sink) | ((j >= max(sink, s - window)) & (j < s))
    if kind != "sink_window":
      np.testing.assert_array_equal(cache.picked[0, 0], cache.picked[0, 1])  # one choice for both kv heads
      token, valid = spec.store_tokens(jnp.asarray([s]))
      slots = (np.asarray(cache.picked[0, 0])[:, None] * spec.block + np.arange(spec.block)).ravel()
      seen[np.asarray(token[0])[slots][np.asarray(valid[0])[slots]]] = True
    return seen

  def remapped(seen_frames):  # frame f -> its rank among the frames seen (the others: anywhere, never attended)
    return np.cumsum(seen_frames) - 1

  gaps = 0
  for s in range(0, n, chunk):
    out, cache = _append(layer, cache, x[:, s : s + chunk], pos[:, s : s + chunk], seq[:, s : s + chunk], frame_mask)
    seen = seen_before(s, cache) | ((j >= s) & (j < s + chunk))
    frames_seen = np.zeros(n // TPF, bool)
    frames_seen[j[seen] // TPF] = True
    gaps += int((~frames_seen[: (s + chunk) // TPF]).sum() > 0)
    t_new = remapped(frames_seen)[j // TPF]
    p_new = jnp.asarray(np.stack([t_new, 0 * j, j % TPF], -1)[None], jnp.int32)
    ref = _restricted(layer, x[:, :n], p_new, jnp.asarray(seen), frame_mask)[:, s : s + chunk]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=f"chunk at {s}")
  assert gaps >= 6  # half the chunks saw a context with frames cut out
  # a text chunk of 3 tokens at p = 24 (after 24 frames, M-RoPE): it sees the sinks, (blocks), the window
  p = n // TPF
  text_pos = jnp.full((1, 3, 3), p, jnp.int32) + jnp.arange(3)[None, :, None]
  out, cache = _append(layer, cache, x[:, n:], text_pos, p + jnp.arange(3)[None], MaskSpec.causal())
  seen = np.concatenate([seen_before(n, cache), np.ones(3, bool)])
  frames_seen = np.zeros(n // TPF, bool)
  frames_seen[j[seen[:n]] // TPF] = True
  missing = int((~frames_seen).sum())
  assert missing > 0
  t_new = remapped(frames_seen)[j // TPF]
  video = np.stack([t_new, 0 * j, j % TPF], -1)
  text = np.repeat((p - missing + np.arange(3))[:, None], 3, 1)
  p_new = jnp.asarray(np.concatenate([video, text])[None], jnp.int32)
  ref = _restricted(layer, x, p_new, jnp.asarray(seen), MaskSpec.frame_causal(TPF, video_tokens=n))[:, n:]
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg="text chunk")
  if kind == "sink_window":  # and the remap is not a no-op: true positions give another output
    p_true = jnp.concatenate([pos, text_pos], 1)
    true = _restricted(layer, x, p_true, jnp.asarray(seen), MaskSpec.frame_causal(TPF, video_tokens=n))[:, n:]
    assert float(jnp.max(jnp.abs(true - out))) > 1e-3


def test_retrieval_picks_the_block_holding_a_planted_key():
  """block_retrieval at the cache level: tokens with small random keys and one block (tokens 10..13) whose keys
  point along u; a query along u retrieves that block on every kv head, its tokens are gathered, and once the
  store (FIFO, 6 blocks) has moved on, the block is gone and only the newest evicted blocks are held."""
  spec = CacheSpec("block_retrieval", sink=2, window=4, block=4, blocks=6, top_k=1)
  cache = KVCache.create(spec, 1, 2, 8, mask=MaskSpec.causal())
  rng = np.random.default_rng(0)
  u = np.zeros(8, np.float32)
  u[3] = 1.0

  def keys(start, n):
    k = 0.1 * rng.standard_normal((1, n, 2, 8)).astype(np.float32)
    for t in range(start, start + n):
      if 10 <= t < 14:  # block (10 - sink) // 4 = 2
        k[0, t - start] = 5.0 * u
    return jnp.asarray(k)

  @jax.jit
  def step(cache, t, q, k):  # one append at the cache level: t [1, n] stream indices
    cache = cache.record(jnp.repeat(t[..., None], 3, -1), t)
    k_ctx, _, vis, cache = cache.context(q)
    return cache.append(k, k).advance(), (k_ctx, vis)

  def add(cache, start, n, q=None):
    q = jnp.zeros((1, n, 4, 8)) if q is None else q
    return step(cache, jnp.arange(start, start + n)[None], q, keys(start, n))

  for s in range(0, 28, 4):
    cache, _ = add(cache, s, 4)
  # a query along u: both kv heads pick block slot 2, whose tokens (positions 10..13) come back with the context
  cache, (k_ctx, vis) = add(cache, 28, 1, q=jnp.asarray(np.broadcast_to(u, (1, 1, 4, 8))))
  np.testing.assert_array_equal(cache.picked[0], [[2], [2]])
  np.testing.assert_array_equal(cache.store_pos[0, 8:12, 0], [10, 11, 12, 13])
  np.testing.assert_allclose(k_ctx[0, spec.slots :, :, 3], 5.0)  # the retrieved block's keys, on both heads
  assert bool(vis[0, spec.slots :].all())
  # the representative of block 2 is its mean key
  np.testing.assert_allclose(cache.rep[0, 2, :, 3], 5.0, atol=1e-6)
  for s in range(29, 61, 4):
    cache, _ = add(cache, s, 4)
  token, valid = spec.store_tokens(cache.length)
  held = sorted(np.asarray(token[0])[np.asarray(valid[0])])
  evicted_last = int(cache.length[0]) - spec.window - 1  # tokens 2 .. 56 evicted; blocks of 4 from token 2
  first_block = (evicted_last - 2) // 4 - 5  # the 6 newest blocks (the newest one partly filled)
  assert held == list(range(2 + 4 * first_block, evicted_last + 1))
  cache, _ = add(cache, 61, 1, q=jnp.asarray(np.broadcast_to(u, (1, 1, 4, 8))))
  assert not np.any((np.asarray(cache.store_pos[0, :, 0]) >= 10) & (np.asarray(cache.store_pos[0, :, 0]) < 14)
                    & np.asarray(cache.store_valid()[0]))


def test_append_longer_than_the_window_is_an_error():
  cache = KVCache.create(CacheSpec("sink_window", sink=1, window=4), 1, 1, 2, mask=MaskSpec.causal())
  with pytest.raises(ValueError, match=r"append of 5 tokens does not fit the sink_window window of 4 \(cache.window\)"):
    cache.record(jnp.zeros((1, 5, 3), jnp.int32), jnp.zeros((1, 5), jnp.int32))


# ---- VideoLM: chunked ingest --------------------------------------------------------------------------------------

B, FRAMES, PROMPT, TEXT = 2, 8, 4, 8  # 8 frames of 2 x 2 tokens = 32 video tokens


def _config(mesh=(1, 1, 1, 1)):
  cfg = config_lib.Config(name="stream_test")
  cfg.mesh = config_lib.MeshConfig(*mesh)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 8, 64
  m.tubelet = (1, 8, 8)
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = FRAMES, 16, 16, TEXT
  cfg.attention.kernel = "xla"
  return cfg


@pytest.fixture(scope="module")
def model():
  return build_model(_config(), nnx.Rngs(0))


def _inputs(seed=0, frames=FRAMES):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 256, (B, frames, 16, 16, 3), dtype=np.uint8)),
          jnp.asarray(rng.integers(0, 256, (B, TEXT), dtype=np.int32)))


_extend = nnx.jit(lambda m, f, c: m.extend(f, c))
_extend_text = nnx.jit(lambda m, t, c: m.extend_text(t, c))


def _stream_logits(model, spec, frames, tokens, chunk):
  """Text logits [B, TEXT, V]: frames ingested `chunk` frames at a time, then the text in two appends of PROMPT
  tokens (one compiled shape; a decode step is the same append with one token: test_generate_cached_...)."""
  cache = model.init_cache(B, spec, frame_shape=(16, 16))
  for s in range(0, frames.shape[1], chunk):
    cache = _extend(model, frames[:, s : s + chunk], cache)
  rows = []
  for s in range(0, TEXT, PROMPT):
    logits, cache = _extend_text(model, tokens[:, s : s + PROMPT], cache)
    rows.append(logits)
  return jnp.concatenate(rows, axis=1), cache


WIDE = {  # windows covering the whole stream (32 video + 8 text tokens)
  "full": CacheSpec("full", capacity=48),
  "sink_window": CacheSpec("sink_window", sink=4, window=40),
  "block_retrieval": CacheSpec("block_retrieval", sink=4, window=40, block=4, blocks=4, top_k=2),
  # a window of 2 frames, but every evicted block retrieved: exact through the store
  "retrieval_all_blocks": CacheSpec("block_retrieval", sink=4, window=8, block=4, blocks=8, top_k=8),
  # positions within the cache: nothing is missing from these contexts, so every shift is 0 and the logits exact
  "sink_window_cache": CacheSpec("sink_window", sink=4, window=40, rope_positions="cache"),
  "block_retrieval_cache": CacheSpec("block_retrieval", sink=4, window=40, block=4, blocks=4, top_k=2,
                                     rope_positions="cache"),
  "retrieval_all_blocks_cache": CacheSpec("block_retrieval", sink=4, window=8, block=4, blocks=8, top_k=8,
                                          rope_positions="cache", score="mass", select="shared"),
}


def test_chunked_ingest_equals_one_prefill_for_every_kind(model):
  """fp32: frames ingested in chunks of 2 (and 1) frames into each cache kind, then the text in two appends, give
  the full forward's text logits to 1e-5 (the one prefill's logits: test_generate.py)."""
  frames, tokens = _inputs()
  full = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens)
  for name, spec in WIDE.items():
    got, cache = _stream_logits(model, spec, frames, tokens, chunk=1 if name.startswith("retrieval_all") else 2)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(cache.frames, [FRAMES] * B)


def test_cache_shapes_do_not_grow_and_positions_continue(model):
  """2 or 20 one-frame chunks: the same cache shapes and one compilation of the chunk step; frame t continues
  across chunks and questions, text goes after the largest coordinate held."""
  spec = CacheSpec("block_retrieval", sink=4, window=8, block=4, blocks=3, top_k=2)
  traces = []

  @nnx.jit
  def ingest(m, f, c):
    traces.append(1)
    return m.extend(f, c)

  frames, tokens = _inputs(1, frames=20)
  shapes = []
  for count in (2, 20):
    cache = model.init_cache(B, spec, frame_shape=(16, 16))
    for i in range(count):
      cache = ingest(model, frames[:, i : i + 1], cache)
    shapes.append(jax.tree.map(lambda a: a.shape, cache))
  assert shapes[0] == shapes[1] and len(traces) == 1
  np.testing.assert_array_equal(cache.frames, [20, 20])
  assert sorted(set(np.asarray(cache.positions[0, 4:, 0]))) == [18, 19]  # the window: the last 2 frames
  # a question after 20 frames: text at (20, 20, 20) on; the next frame at t = 20, the next text after the question
  _, cache = _extend_text(model, tokens[:, :3], cache)
  np.testing.assert_array_equal(cache.next_position()[0], [23, 23, 23])
  cache = ingest(model, frames[:, :1], cache)
  assert len(traces) == 1
  last = np.asarray(cache.positions[0])[np.asarray(spec.slot(jnp.arange(int(cache.length[0]) - 4, int(cache.length[0]))))]
  np.testing.assert_array_equal(last, [[20, 0, 0], [20, 0, 1], [20, 1, 0], [20, 1, 1]])
  np.testing.assert_array_equal(cache.next_position()[0], [23, 23, 23])


def test_bad_chunks_are_one_line_errors(model):
  frames, _ = _inputs()
  cache = model.init_cache(B, CacheSpec("sink_window", sink=4, window=16), frame_shape=(16, 16))
  with pytest.raises(config_lib.ConfigError, match=r"expected frames \[B=2, F \(a positive multiple of 1\), H=16, W=16, 3\], got \[2, 2, 8, 16, 3\]"):
    model.extend(frames[:, :2, :8], cache)
  with pytest.raises(config_lib.ConfigError, match=r"got \[1, 2, 16, 16, 3\]"):
    model.extend(frames[:1, :2], cache)
  prefilled = KVCache.init(B, 40, 2, 8, num_layers=2, mask=MaskSpec.frame_causal(4, video_tokens=32))  # a prefill's
  with pytest.raises(config_lib.ConfigError, match="stream cache from VideoLM.init_cache"):
    model.extend(frames[:, :1], prefilled)
  with pytest.raises(config_lib.ConfigError, match=r"frame chunk of 20 tokens does not fit the sink_window cache's window of 16 tokens \(cache.window\)"):
    model.extend(frames[:, :5], cache)
  with pytest.raises(config_lib.ConfigError, match="do not divide"):
    model.init_cache(B, CacheSpec("full", capacity=8), frame_shape=(12, 16))


def test_generate_cached_answers_like_generate(model):
  """A question about a stream (ingested in 4 chunks into a sink_window cache covering it) answered greedily by
  generate_cached gives generate()'s tokens and logits (one prefill of the same frames); the input cache is kept,
  and a full cache without room for the answer is refused in one line."""
  from vidlm.infer import generate, generate_cached

  frames, tokens = _inputs(2)
  want = generate(model, frames, tokens[:, :PROMPT], 3, eos_id=-1, return_logits=True)
  cache = model.init_cache(B, CacheSpec("sink_window", sink=4, window=44), frame_shape=(16, 16))
  for s in range(0, FRAMES, 2):
    cache = _extend(model, frames[:, s : s + 2], cache)
  got, after = generate_cached(model, cache, tokens[:, :PROMPT], 3, eos_id=-1, return_logits=True)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.length, [32] * B)  # unchanged: the stream may go on without the question
  np.testing.assert_array_equal(after.length, [32 + PROMPT + 2] * B)  # question + answer tokens fed back
  small = model.init_cache(B, CacheSpec("full", capacity=36), frame_shape=(16, 16))
  with pytest.raises(ValueError, match="the full cache holds 36 tokens; this question needs 39"):
    generate_cached(model, _extend(model, frames[:, :8], small), tokens[:, :PROMPT], 3)


def test_stream_on_a_data_x_tensor_mesh():
  """Rows split over data, kv heads over tensor (2 x 2 mesh): the cache stays sharded like the activations through
  chunked ingest into block_retrieval, and the question's logits equal the model's full forward."""
  from vidlm import sharding

  cfg = _config(mesh=(2, 1, 1, 2))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  frames, tokens = _inputs(3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    model = build_model(cfg, nnx.Rngs(0))
    frames = jax.device_put(frames, sharding.batch_sharding(mesh, frames.ndim))
    full = nnx.jit(lambda m, f, t: m(f, t))(model, frames, tokens[:, :PROMPT])
    cache = model.init_cache(B, WIDE["retrieval_all_blocks"], frame_shape=(16, 16))
    for s in range(0, FRAMES, 2):
      cache = _extend(model, frames[:, s : s + 2], cache)
    logits, cache = _extend_text(model, tokens[:, :PROMPT], cache)
  np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)
  for a in (cache.k, cache.store_k, cache.rep):  # [L, B, ., Hkv, D]: 2 row halves x 2 kv heads
    assert {sh.data.shape for sh in a.addressable_shards} == {(a.shape[0], B // 2, a.shape[2], 1, a.shape[4])}
    assert len({sh.index for sh in a.addressable_shards}) == 4
