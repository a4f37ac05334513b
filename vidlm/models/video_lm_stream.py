"""Incremental (chunked) ingest into VideoLM's KV cache: the API a streaming session drives (issue 13).

Per stream (one row per concurrent stream; all rows advance together):
  cache = model.init_cache(batch, spec, frame_shape=(H, W))     # empty cache of any `CacheSpec` kind
  cache = model.extend(frames_chunk, cache)                     # per chunk: frames [B, F, H, W, 3], F a multiple
                                                                #   of the tubelet's t; compiled once per shape
  logits, cache_q = model.extend_text(question, cache, lengths=)   # a question [B, L] at any time: logits [B, L, V]
  logits, cache_q = model.decode_step(token, cache_q)           # greedy answer tokens one by one
  (vidlm.infer.generate.generate_cached does extend_text + the decode loop.)
Caches are values: to answer without keeping the question and answer in the stream, go on ingesting from the
cache you had before the question (`cache`, not `cache_q`); to keep them, go on from `cache_q`.

What a session's `state()` holds to checkpoint a stream: the cache pytree (`jax.tree` of `KVCache`: all its
arrays, including length / frames / top / next_index; its static `spec`, `mask`, `frame_shape` come back from the
same `init_cache` call), plus whatever the session keeps on the host (frames seen, questions asked).

Positions and masks: frame f of the stream (counting tubelet rows of t) sits at t = f with (h, w) in raster order,
whatever the chunking, so a stream ingested in chunks sees exactly the positions of one prefill of the same frames;
text goes at (p, p, p) from the largest coordinate held + 1 on (the M-RoPE rule of `layers.rope`), and video after
a question goes on at the next frame's t. A stream cache's mask rule is causal over group indices: all tokens of
one frame share an index, each text token has its own, so past tokens are always visible, a chunk's frames see
each other frame-causally and text causally: exactly the frame-causal prefill mask for video followed by text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from layers import rope as rope_lib
from layers.cache import CacheSpec, KVCache
from pallas_kernels.layout import MaskSpec
from vidlm.config import ConfigError
from vidlm.sharding import constrain


class StreamingMixin:
  """`init_cache`, `extend` (video chunks) and `extend_text` (questions, decoded tokens) for VideoLM; see the module
  docstring. Uses VideoLM's embeddings, `_layers`, `final_norm` and `lm_head`."""

  def init_cache(self, batch: int, spec: CacheSpec, *, frame_shape: tuple[int, int]) -> KVCache:
    """An empty stream cache of `spec` for `batch` rows of frames of `frame_shape` (H, W), all layers stacked."""
    h, w = frame_shape
    _, th, tw = self.tubelet
    if h % th or w % tw:
      raise ConfigError(f"stream frames of {h}x{w} do not divide into the model's {th}x{tw} tubelets (model.tubelet)")
    return KVCache.create(
      spec, batch, self.num_kv_heads, self.head_dim, num_layers=self.num_layers, dtype=self.dtype,
      mask=MaskSpec.causal(), frame_shape=(h, w), rope_theta=self.rope_theta,
    ).sharded()

  def _check_chunk(self, frames: jax.Array, cache: KVCache) -> None:
    if cache.frame_shape is None or cache.mask != MaskSpec.causal():
      raise ConfigError("VideoLM.extend appends video to a stream cache from VideoLM.init_cache, not a prefill's cache")
    h, w = cache.frame_shape
    tt = self.tubelet[0]
    shape = tuple(frames.shape)
    ok = len(shape) == 5 and shape[0] == cache.batch and shape[2:] == (h, w, 3) and shape[1] >= tt and shape[1] % tt == 0
    if not ok:
      raise ConfigError(
        f"stream chunk: expected frames [B={cache.batch}, F (a positive multiple of {tt}), H={h}, W={w}, 3], "
        f"got {list(shape)}"
      )
    _check_fits(cache, (shape[1] // tt) * (h // self.tubelet[1]) * (w // self.tubelet[2]), "frame chunk")
    if getattr(self, "token_drop_tau", 1.0) < 1.0:
      raise ConfigError("model.token_drop_tau < 1 is not applied by chunked ingest (VideoLM.extend) yet; set it to 1.0")
    if getattr(self, "eval_positions", "contiguous") != "contiguous":
      raise ConfigError(
        f"model.eval_positions={self.eval_positions}: a stream's length is unknown while it is ingested, so its frame "
        "positions cannot be interpolated; stream with model.eval_positions=contiguous"
      )

  def extend(self, frames: jax.Array, cache: KVCache) -> KVCache:
    """Append a chunk of frames [B, F, H, W, 3] to a stream cache of any kind -> the cache. Frames continue the
    stream's timeline (t from `cache.frames` on); the chunk attends the cache's context and itself frame-causally."""
    self._check_chunk(frames, cache)
    gt, gh, gw = self._grid(frames.shape)
    tpf = gh * gw
    t, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    grid = np.stack([t, hh, ww], -1).reshape(-1, 3).astype(np.int32)  # [N, 3] chunk-local (t, h, w)
    positions = jnp.asarray(grid)[None] + jnp.stack([cache.frames, cache.frames * 0, cache.frames * 0], -1)[:, None]
    seq = cache.next_index[:, None] + jnp.asarray(grid[:, 0])[None]  # one group index per frame
    cache = cache.record(positions, seq, text=False).sharded()
    x = constrain(self.video_embed(frames), ("batch", None, "embed"))
    x, cache = self._cached_layers(x, positions, MaskSpec.frame_causal(tpf), cache)
    cache = cache.advance()
    return dataclasses.replace(cache, frames=cache.frames + gt)

  def extend_text(
    self, tokens: jax.Array, cache: KVCache, *, lengths: jax.Array | None = None
  ) -> tuple[jax.Array, KVCache]:
    """Append text tokens [B, L] (right-padded when `lengths` [B] is given) to a cache of any kind (a stream cache,
    or a prefill's) -> (logits float32 [B, L, V] at each appended token, cache). Positions continue at the next text
    position; the text attends the cache's context and itself causally."""
    b, n = tokens.shape
    if b != cache.batch:
      raise ConfigError(f"text chunk: expected tokens [B={cache.batch}, L], got {list(tokens.shape)}")
    _check_fits(cache, n, "text chunk")
    positions = rope_lib.text_positions(cache.top + 1, n)  # [B, L, 3]
    seq = cache.next_index[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    cache = cache.record(positions, seq, lengths, text=True).sharded()
    x = constrain(self.text_embed(tokens), ("batch", None, "embed"))
    x, cache = self._cached_layers(x, positions, MaskSpec.causal(), cache)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32), cache.advance()

  def _cached_layers(self, x, positions, mask: MaskSpec, cache: KVCache):
    """The block stack over an append (recorded in `cache`): every layer attends its cache's context, then writes."""
    rope = rope_lib.tables(positions, self.head_dim, self.rope_theta)  # [B, N, D/2]
    return self._layers(
      x, rope, mask=mask, residual=lambda y: constrain(y, ("batch", None, "embed")), cache=cache, decode=True
    )


def _check_fits(cache: KVCache, tokens: int, what: str) -> None:
  """An evicting cache writes one append into its ring at once: a longer append is the caller's config error."""
  limit = cache.spec.max_chunk
  if limit is not None and tokens > limit:
    raise ConfigError(
      f"{what} of {tokens} tokens does not fit the {cache.kind} cache's window of {limit} tokens (cache.window); "
      "send shorter chunks or raise cache.window"
    )
