"""Full KV cache pytree, batched RoPE positions, and the Attention layer's prefill / decode against the full forward
(the evicting kinds and chunked appends: test_cache_streaming.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import rope as rope_lib
from layers.attention import Attention
from layers.cache import CacheSpec, KVCache
from pallas_kernels.layout import MaskSpec


def test_cache_is_a_static_shape_pytree():
  c = KVCache.init(2, 8, 3, 4, num_layers=5, mask=MaskSpec.causal())
  assert c.k.shape == c.v.shape == (5, 2, 8, 3, 4) and c.positions.shape == (2, 8, 3) and c.length.shape == (2,)
  leaves, treedef = jax.tree.flatten(c)
  assert len(leaves) == 20  # spec, mask, frame_shape and rope_theta are static: they live in the treedef
  assert c.text.shape == c.context_seq.shape == (2, 0)  # the position-remap arrays are empty unless spec.remaps
  out = jax.jit(lambda x: x)(c)
  assert out.kind == "full" and out.mask == MaskSpec.causal() and jax.tree.structure(out) == treedef
  assert c.layer(1).k.shape == (2, 8, 3, 4)
  assert c.store_k.shape == (5, 2, 0, 3, 4)  # a full cache has an empty block store
  with pytest.raises(ValueError, match=r"KVCache.create\(CacheSpec"):
    KVCache.init(1, 4, 1, 2, kind="sink_window")
  with pytest.raises(ValueError, match="cache.top_k=5 exceeds cache.blocks=4"):
    CacheSpec("block_retrieval", window=8, block=2, blocks=4, top_k=5)
  with pytest.raises(ValueError, match="cache.window=0"):
    CacheSpec("sink_window", sink=2)
  with pytest.raises(ValueError, match="cache.kind='ring'"):
    CacheSpec("ring")
  with pytest.raises(ValueError, match="cache.rope_positions='slot': expected one of true | cache"):
    CacheSpec("sink_window", window=4, rope_positions="slot")
  with pytest.raises(ValueError, match="cache.score='max': expected one of mean | mass"):
    CacheSpec("block_retrieval", window=8, block=2, blocks=4, top_k=1, score="max")
  with pytest.raises(ValueError, match="cache.select='all': expected one of per_head | shared"):
    CacheSpec("block_retrieval", window=8, block=2, blocks=4, top_k=1, select="all")


def test_record_advance_write_and_visibility():
  c = KVCache.init(2, 6, 1, 2, mask=MaskSpec.causal())
  pos = jnp.asarray(rope_lib.video_text_positions((1, 1, 2), 2))[None].repeat(2, 0)  # [2, 4, 3]: 2 video, 2 text
  c = c.record(pos, jnp.arange(4)[None].repeat(2, 0), jnp.array([4, 3]))  # row 1: slot 3 is padding
  c = c.write_prefix(jnp.ones((2, 4, 1, 2)), jnp.ones((2, 4, 1, 2)))
  c = c.advance()
  np.testing.assert_array_equal(c.valid(), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  # next text position: last text (p, p, p) + 1; seq index continues
  np.testing.assert_array_equal(c.next_position(), [[4, 4, 4], [3, 3, 3]])
  np.testing.assert_array_equal(c.next_seq_index(), [4, 3])
  c = c.record(c.next_position()[:, None], c.next_seq_index()[:, None])
  # what the appended token sees besides itself: the filled slots before it (not row 1's padding)
  np.testing.assert_array_equal(c.visible, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  c = c.append(jnp.full((2, 1, 1, 2), 7.0), jnp.full((2, 1, 1, 2), 7.0)).advance()
  assert float(c.k[0, 4, 0, 0]) == 7 and float(c.k[1, 3, 0, 0]) == 7 and float(c.k[1, 4, 0, 0]) == 0
  np.testing.assert_array_equal(c.length, [5, 4])
  # after video only, the next text position is (m, m, m) with m = largest video coordinate + 1 (M-RoPE)
  v = KVCache.init(1, 4, 1, 2, mask=MaskSpec.causal()).record(pos[:1, :2], jnp.arange(2)[None]).advance()
  np.testing.assert_array_equal(v.next_position(), [[2, 2, 2]])


def test_batched_rope_tables_equal_shared_tables():
  pos = rope_lib.video_text_positions((2, 2, 2), 3)  # [11, 3]
  shared = rope_lib.tables(pos, 8)
  batched = rope_lib.tables(np.stack([pos, pos + 5]), 8)
  assert batched.cos.shape == (2, 11, 4)
  x = jax.random.normal(jax.random.key(0), (2, 11, 3, 8))
  np.testing.assert_allclose(rope_lib.apply(x[:1], shared), rope_lib.apply(x[:1], rope_lib.tables(pos[None], 8)))
  np.testing.assert_allclose(rope_lib.apply(x, batched)[1], rope_lib.apply(x[1:], rope_lib.tables(pos + 5, 8))[0])
  np.testing.assert_array_equal(rope_lib.text_positions(jnp.array([3, 7]), 2)[:, :, 0], [[3, 4], [7, 8]])


@pytest.mark.parametrize("kernel", ["xla", "flash"])
def test_attention_layer_decode_matches_full_forward(kernel):
  """Prefill the first P tokens, decode the rest one by one: every output equals the full causal forward (fp32).
  kernel=flash runs the Pallas kernel in interpret mode on CPU, for the prefill and for the one-query decode."""
  b, n, p, e = 2, 12, 5, 16
  with nnx.use_eager_sharding(False):  # no mesh here: the weights' logical axes stay annotations
    layer = Attention(e, 4, 2, 8, kernel=kernel, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (b, n, e))
  pos = jnp.asarray(rope_lib.text_positions(0, n))  # [N, 3]
  mask = MaskSpec.causal()
  full = layer(x, pos, mask=mask)
  cache = KVCache.init(b, 16, 2, 8, mask=mask)
  cache = cache.record(jnp.broadcast_to(pos[:p], (b, p, 3)), jnp.broadcast_to(jnp.arange(p), (b, p)))
  out, cache = layer(x[:, :p], pos[:p], mask=mask, cache=cache)
  cache = cache.advance()
  np.testing.assert_allclose(out, full[:, :p], atol=1e-5, rtol=1e-5)
  for i in range(p, n):
    pos_i = cache.next_position()[:, None]  # [B, 1, 3]
    np.testing.assert_array_equal(pos_i[:, 0], jnp.broadcast_to(pos[i], (b, 3)))
    cache = cache.record(pos_i, cache.next_seq_index()[:, None])
    out, cache = layer(x[:, i : i + 1], pos_i, mask=mask, cache=cache, decode=True)
    cache = cache.advance()
    np.testing.assert_allclose(out[:, 0], full[:, i], atol=1e-5, rtol=1e-5)


def test_decode_with_a_sparsity_selector_is_an_error():
  """No silent change of math: a block-sparse layer has no cached decode path yet, so decoding says so."""
  with nnx.use_eager_sharding(False):
    layer = Attention(8, 2, 1, 4, kernel="xla", selector=lambda q, k, mask, i: None, rngs=nnx.Rngs(0))
  cache = KVCache.init(1, 4, 1, 4, mask=MaskSpec.causal()).record(jnp.zeros((1, 1, 3), jnp.int32), jnp.zeros((1, 1)))
  with pytest.raises(ValueError, match="block-sparse decode is not built yet"):
    layer(jnp.ones((1, 1, 8)), jnp.zeros((1, 1, 3), jnp.int32), mask=MaskSpec.causal(), cache=cache, decode=True)
