"""Memory-bridge parts (layers/memory): SceneTiling against a NumPy version and planted cuts, fixed segments and the
frame table, padding invariance of the bridge and the retriever, the cache write, and the scanned + rematted
recurrence against an unrolled loop (values and gradients over 32 segments, padding segments)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.memory import (
  BridgeLayer,
  ConvStem,
  Retriever,
  fixed_segments,
  memory_step,
  run_segments,
  scene_tiling,
  segment_frame_table,
  strided_frame_table,
  strided_segment_count,
  write_cache,
)
from layers.memory.scene import depth_scores
from vidlm.data import procedural

E, HEADS, HEAD_DIM, MLP, M = 16, 2, 8, 32, 3


# ---------------------------------------------------------------- segmentation


def _np_scene_tiling(feats, n, max_segments, min_length, mode):
  """The same algorithm written as plain loops (one row, n valid frames): ids [F] (-1 on padding)."""
  f = feats[:n].astype(np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-6)
  c = (f[:-1] * f[1:]).sum(-1)
  g = len(c)
  left, right = np.empty(g), np.empty(g)
  for i in range(g):
    left[i] = left[i - 1] if i > 0 and c[i - 1] >= c[i] else c[i]
  for i in reversed(range(g)):
    right[i] = right[i + 1] if i < g - 1 and c[i + 1] >= c[i] else c[i]
  d = left + right - 2 * c
  cand = [i for i in range(g) if min_length - 1 <= i <= n - 1 - min_length]
  if mode == "threshold":
    cand = [i for i in cand if d[i] > d.mean() + 0.5 * d.std()]
  chosen = []
  for i in sorted(cand, key=lambda i: (-d[i], i)):
    if len(chosen) == max_segments - 1:
      break
    if all(abs(i - j) >= min_length for j in chosen):
      chosen.append(i)
  ids = np.full(len(feats), -1)
  ids[:n] = [sum(b < t for b in chosen) for t in range(n)]
  return ids


@pytest.mark.parametrize("mode,min_length", [("topk", 1), ("topk", 3), ("threshold", 1), ("threshold", 2)])
def test_scene_tiling_matches_numpy(mode, min_length):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(4, 20, 6)).astype(np.float32)
  n = np.array([20, 17, 9, 2], np.int32)
  ids, count = jax.jit(scene_tiling, static_argnames=("max_segments", "min_length", "mode"))(
    jnp.asarray(feats), jnp.asarray(n), max_segments=5, min_length=min_length, mode=mode
  )
  for b in range(4):
    want = _np_scene_tiling(feats[b], n[b], 5, min_length, mode)
    np.testing.assert_array_equal(np.asarray(ids[b]), want)
    assert count[b] == want.max() + 1
  assert np.asarray(count).max() > 1  # the inputs do produce boundaries
  lengths = [np.sum(np.asarray(ids[0]) == k) for k in range(int(count[0]))]
  assert min(lengths) >= min_length


def test_depth_formula_on_a_known_curve():
  # similarities 0.9, 0.5, 0.8, 0.7, 0.95: depth of gap 1 = 0.9 + 0.8 - 2*0.5; gap 3 = 0.8 + 0.95 - 2*0.7
  c = jnp.asarray([[0.9, 0.5, 0.8, 0.7, 0.95]])
  d = depth_scores(c, jnp.asarray([6]))
  np.testing.assert_allclose(np.asarray(d[0]), [0.0, 0.7, 0.0, 0.35, 0.0], atol=1e-6)


def test_scene_tiling_finds_planted_cuts_in_synthetic_features():
  rng = np.random.default_rng(1)
  cuts = [7, 15, 16, 30]  # frames that start a new scene (15 -> 16 is a one-frame scene)
  starts, ends = [0, *cuts], [*cuts, 40]
  feats = np.concatenate([rng.normal(size=(1, 32)) + 0.1 * rng.normal(size=(e - s, 32)) for s, e in zip(starts, ends)])
  ids, count = scene_tiling(jnp.asarray(feats[None], jnp.float32), max_segments=len(cuts) + 1)
  assert int(count[0]) == len(cuts) + 1
  np.testing.assert_array_equal(np.nonzero(np.diff(np.asarray(ids[0])))[0] + 1, cuts)
  # threshold mode needs no count; min_length=2 forbids the one-frame scene: one of its two cuts goes
  ids, count = scene_tiling(jnp.asarray(feats[None], jnp.float32), max_segments=8, mode="threshold")
  np.testing.assert_array_equal(np.nonzero(np.diff(np.asarray(ids[0])))[0] + 1, cuts)
  ids, count = scene_tiling(jnp.asarray(feats[None], jnp.float32), max_segments=8, min_length=2, mode="threshold")
  found = (np.nonzero(np.diff(np.asarray(ids[0])))[0] + 1).tolist()
  assert int(count[0]) == 4 and found in ([7, 15, 30], [7, 16, 30])


@pytest.mark.parametrize("index,mode", [(1, "topk"), (1, "threshold"), (2, "topk")])
def test_scene_tiling_finds_procedural_cuts(index, mode):
  """On a rendered NIAVH haystack (tier b: the needle is a small patch, no cut), pooled pixels as frame features."""
  ex = procedural.make_example(0, index, frames=48, height=32, width=32, tier="b")
  cuts = ex["cut_frames"]
  assert len(cuts) >= 3
  feats = ex["frames"].astype(np.float32).reshape(48, 8, 4, 8, 4, 3).mean((2, 4)).reshape(1, 48, -1)
  ids, count = scene_tiling(jnp.asarray(feats), max_segments=len(cuts) + 1, mode=mode)
  assert int(count[0]) == len(cuts) + 1
  np.testing.assert_array_equal(np.nonzero(np.diff(np.asarray(ids[0])))[0] + 1, cuts)


def test_fixed_segments_and_frame_table():
  ids, count = fixed_segments(2, 10, jnp.asarray([10, 5]), segment_length=4, max_segments=3)
  np.testing.assert_array_equal(np.asarray(ids), [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(count), [3, 2])
  with pytest.raises(ValueError, match="cannot hold"):
    fixed_segments(1, 13, segment_length=4, max_segments=3)
  # a 6-frame segment starting at 2 keeps frames 2, 4, 7 (integer linspace, ends kept); 1-frame segment 8 alone
  ids = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 2, -1]])
  table, mask, valid = segment_frame_table(ids, jnp.asarray([3]), max_segments=4, frames_per_segment=3)
  np.testing.assert_array_equal(np.asarray(table[0, :3]), [[0, 1, 0], [2, 4, 7], [8, 8, 8]])
  np.testing.assert_array_equal(np.asarray(mask[0]), [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(valid[0]), [1, 1, 1, 0])


def test_strided_table_per_row_frame_counts_equal_each_length_alone():
  """num_frames per row gives each row exactly the table, mask and valid segments of a video of its own length
  (padded to the batch's K): a variable number of valid segments in one static-shape batch."""
  counts = [12, 9, 4, 2, 0]
  table, mask, valid = strided_frame_table(len(counts), 12, segment_length=4, stride=2, max_segments=5,
                                           num_frames=jnp.asarray(counts))
  for row, n in enumerate(counts):
    need = strided_segment_count(n, 4, 2) if n else 0
    assert int(valid[row].sum()) == need, (n, valid[row])
    if n:
      t1, m1, v1 = strided_frame_table(1, n, segment_length=4, stride=2, max_segments=need)
      np.testing.assert_array_equal(np.asarray(mask[row, :need]), np.asarray(m1[0]))
      np.testing.assert_array_equal(np.asarray(table[row, :need]), np.asarray(t1[0]))
    assert not bool(mask[row, need:].any())
    assert int(jnp.where(mask[row], table[row], -1).max()) == n - 1  # never a padding frame, the last real one
  np.testing.assert_array_equal(np.asarray(valid[1]), [1, 1, 1, 1, 0])  # 9 frames: 0-3, 2-5, 4-7, 6-8


def test_conv_stem_token_grid_and_shift_equivariance():
  """ConvStem gives TubeletEmbed's token grid in (frame, row, col) order, and content moved by one patch moves
  its interior tokens by one grid cell (shared conv weights: a pattern is read the same at every position)."""
  with nnx.use_eager_sharding(False):
    stem = ConvStem(8, 4, E, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  frames = np.zeros((1, 2, 64, 64, 3), np.float32)
  frames[0, :, 24:40, 16:32] = rng.uniform(-1, 1, (2, 16, 16, 3))
  moved = np.roll(frames, 8, axis=3)  # 8 px right = one patch
  a = np.asarray(stem(jnp.asarray(frames))).reshape(2, 8, 8, E)
  b = np.asarray(stem(jnp.asarray(moved))).reshape(2, 8, 8, E)
  assert a.shape == (2, 8, 8, E)
  np.testing.assert_allclose(b[:, 2:6, 2:6], a[:, 2:6, 1:5], atol=1e-5)
  assert np.abs(a[:, 2:6, 1:5] - a[:, 2:6, 2:6]).max() > 1e-2  # the content does differ between those cells
  # per frame: frame 1's tokens do not depend on frame 0's pixels
  other = frames.copy()
  other[0, 0] = rng.uniform(-1, 1, (64, 64, 3))
  np.testing.assert_allclose(np.asarray(stem(jnp.asarray(other))).reshape(2, 8, 8, E)[1], a[1], atol=1e-6)
  with pytest.raises(ValueError, match="power of two"):
    ConvStem(6, 4, E, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- bridge and retriever


@pytest.fixture(scope="module")
def parts():
  with nnx.use_eager_sharding(False):  # no mesh here: the weights' logical axes stay annotations
    rngs = nnx.Rngs(0)
    return BridgeLayer(E, HEADS, HEAD_DIM, MLP, kernel="xla", rngs=rngs), Retriever(E, HEADS, HEAD_DIM, kernel="xla", rngs=rngs)


def _call(module, *args):
  return module(*args)


_jit_call = nnx.jit(_call)  # one compile per shape instead of op-by-op eager dispatch
_jit_run = nnx.jit(run_segments, static_argnames="remat")


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_bridge_padding_never_changes_the_result(parts):
  bridge, _ = parts
  mem, tok = _normal(0, (2, M, E)), _normal(1, (2, 5, E))
  pos = jnp.broadcast_to(jnp.arange(5)[None, :, None], (2, 5, 3))
  m_ref, o_ref = _jit_call(bridge, mem, tok, jnp.ones((2, 5), bool), pos)
  garbage = 1e3 * _normal(2, (2, 4, E)).at[0, 1].set(jnp.nan)
  padded = jnp.concatenate([tok, garbage], axis=1)
  pos_pad = jnp.concatenate([pos, jnp.full((2, 4, 3), 99)], axis=1)
  mask = jnp.arange(9)[None, :] < 5
  m_pad, o_pad = _jit_call(bridge, mem, padded, jnp.broadcast_to(mask, (2, 9)), pos_pad)
  np.testing.assert_allclose(m_pad, m_ref, atol=1e-6)
  np.testing.assert_allclose(o_pad[:, :5], o_ref, atol=1e-6)
  assert not np.asarray(o_pad[:, 5:]).any()
  # and the memory does read the segment: another valid token changes it
  m_other, _ = _jit_call(bridge, mem, tok.at[:, 2].add(1.0), jnp.ones((2, 5), bool), pos)
  assert float(jnp.abs(m_other - m_ref).max()) > 1e-3


def test_retriever_ignores_unused_slots_and_cache_write_hits_slot(parts):
  _, retriever = parts
  b, s = 2, 6
  mem, cache = _normal(3, (b, M, E)), _normal(4, (b, s, M, E))
  count = jnp.asarray([2, 4])
  ref = _jit_call(retriever, mem, cache, count)
  junk = jnp.where((jnp.arange(s)[None, :] >= count[:, None])[..., None, None], 1e4 * _normal(5, cache.shape), cache)
  np.testing.assert_allclose(_jit_call(retriever, mem, junk, count), ref, atol=1e-6)
  assert float(jnp.abs(_jit_call(retriever, mem, cache, count + 1) - ref).max()) > 1e-4  # the slots do matter once valid
  new = _normal(6, (b, M, E))
  written, count2 = write_cache(cache, count, new, jnp.asarray([True, False]))
  np.testing.assert_array_equal(np.asarray(count2), [3, 4])
  np.testing.assert_array_equal(np.asarray(written[0, 2]), np.asarray(new[0]))
  keep = np.ones((b, s), bool)
  keep[0, 2] = False
  np.testing.assert_array_equal(np.asarray(written)[keep], np.asarray(cache)[keep])  # nothing else moved


# ---------------------------------------------------------------- recurrence


def test_scan_remat_gradients_equal_unrolled_over_32_segments(parts):
  """Gradients (parameters and inputs) of the nnx.scan + remat recurrence equal those of a Python loop over 32
  segments. The loop runs one jitted step per segment forward and one jitted step vjp per segment backward (each
  compiled once), accumulating the parameter gradients by hand: independent of how JAX differentiates a scan."""
  bridge, retriever = parts
  b, k, n = 1, 32, 4
  tokens, mem0 = _normal(7, (b, k, n, E)), _normal(8, (b, M, E))
  mask = jnp.ones((b, k, n), bool).at[:, :, 3].set(jnp.arange(k)[None, :] % 3 == 0)
  valid = jnp.ones((b, k), bool)
  target = _normal(9, (b, k, M, E))
  graph, params = nnx.split((bridge, retriever))

  def objective(m, mems):
    return jnp.mean((mems - target) ** 2) + jnp.mean(m**2)

  def scanned(params, tokens):
    br, rt = nnx.merge(graph, params)
    (m, _, _), (mems, _) = run_segments(br, rt, mem0, tokens, mask, valid, remat="full")
    return objective(m, mems)

  def step(params, mem, cache, count, tok, tmask, ok):
    br, rt = nnx.merge(graph, params)
    (mem, cache, count), (m, _) = memory_step(br, rt, (mem, cache, count), tok, tmask, ok)
    return mem, cache, count, m

  @jax.jit
  def step_vjp(params, mem, cache, count, tok, tmask, ok, ct_mem, ct_cache, ct_m):
    def f(p, m_, c_, t_):
      mem, cache, _, m = step(p, m_, c_, count, t_, tmask, ok)
      return mem, cache, m

    return jax.vjp(f, params, mem, cache, tok)[1]((ct_mem, ct_cache, ct_m))

  l_scan, g_scan = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1)))(params, tokens)
  # the unrolled loop: forward segment by segment, then the chain rule by hand from the last segment back
  fwd = jax.jit(step)
  carries, mems = [(mem0, jnp.zeros((b, k, M, E)), jnp.zeros((b,), jnp.int32))], []
  for s in range(k):
    *carry, m = fwd(params, *carries[-1], tokens[:, s], mask[:, s], valid[:, s])
    carries.append(tuple(carry))
    mems.append(m)
  l_loop, (ct_mem, ct_mems) = jax.value_and_grad(objective, argnums=(0, 1))(carries[-1][0], jnp.stack(mems, axis=1))
  ct_cache, g_params, g_tokens = jnp.zeros((b, k, M, E)), jax.tree.map(jnp.zeros_like, params), []
  for s in reversed(range(k)):
    d_params, ct_mem, ct_cache, d_tok = step_vjp(
      params, *carries[s], tokens[:, s], mask[:, s], valid[:, s], ct_mem, ct_cache, ct_mems[:, s]
    )
    g_params = jax.tree.map(jnp.add, g_params, d_params)
    g_tokens.insert(0, d_tok)
  g_loop = (g_params, jnp.stack(g_tokens, axis=1))
  np.testing.assert_allclose(float(l_scan), float(l_loop), rtol=1e-6)
  flat_scan, flat_loop = jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)
  assert len(flat_scan) == len(flat_loop) > 10
  for x, y in zip(flat_scan, flat_loop):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
  # the first segment's tokens reach the loss through all 31 later steps
  assert float(jnp.abs(g_scan[1][:, 0]).max()) > 0


def test_padding_segments_equal_running_only_the_valid_ones(parts):
  bridge, retriever = parts
  b, n = 2, 3
  valid = jnp.asarray([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  tokens = 50.0 * _normal(10, (b, 6, n, E))  # padding segments hold garbage
  mask = jnp.ones((b, 6, n), bool)
  mem0 = _normal(11, (b, M, E))
  (m, cache, count), (mems, outs) = _jit_run(bridge, retriever, mem0, tokens, mask, valid, remat="dots")
  np.testing.assert_array_equal(np.asarray(count), [3, 2])
  for row in range(b):
    idx = np.nonzero(np.asarray(valid[row]))[0]
    sub = tokens[row : row + 1, idx]
    (m1, c1, _), (ms1, os1) = _jit_run(
      bridge, retriever, mem0[row : row + 1], sub, mask[row : row + 1, idx], jnp.ones((1, len(idx)), bool), remat="none"
    )
    np.testing.assert_allclose(m[row], m1[0], atol=1e-5)
    np.testing.assert_allclose(cache[row, : len(idx)], c1[0], atol=1e-5)
    np.testing.assert_allclose(mems[row, idx], ms1[0], atol=1e-5)
    np.testing.assert_allclose(outs[row, idx], os1[0], atol=1e-5)
    assert not np.asarray(cache[row, len(idx) :]).any()
