"""Dynamic token drop (TimeChat-Online DTD), pure and jittable with static shapes.

A video token at grid position (t, h, w) is dropped when the cosine similarity of its features to the token at the
same (h, w) of the PREVIOUS frame t - 1 (the previous original frame, dropped or not, as in TimeChat-Online)
exceeds tau; frame 0 keeps every token. Kept tokens keep their true (t, h, w) positions (RoPE rotates by them), so
a dropped stretch leaves a gap in t rather than shifting later tokens.

What is compared: whatever features the caller hands in, [B, F, N, C] (F frames of the token grid, N = h*w tokens
per frame). TimeChat-Online compares the visual encoder's output features; VideoLM's visual encoder is its tubelet
embedding, so the model compares embeddings (`vidlm/models/video_lm.py`); the data-side statistics in
docs/streaming.md also report raw-pixel tubelets (the same function on `layers.embed.to_tubelets` of frames mapped
to [-1, 1]). Cosine is scale-invariant, so on raw pixels a flat patch that only brightens looks unchanged; the
embedding's bias and mixing make such changes visible, and it is the space the language model actually reads.

Two static-shape ways to consume the decision:
  * in place (the model's forward): every token keeps its slot, `keep` marks the survivors, and `segment_ids`
    gives dropped tokens an id no kept token or text shares, so the attention layer never lets a kept token (or
    text) see them. The frame-causal `MaskSpec` is defined on slot indices, so slots must not move here.
  * compacted (`compact`, for caches and streams): kept tokens gathered to the front of a fixed `capacity`, in
    their original order, with a validity mask, their (t, h, w) positions and their flat index in the video (the
    `seq_index` a KV cache evaluates the mask rule on), so a cache stores only what was kept.

Everything runs under `jax.lax.stop_gradient`: the drop decision is a discrete choice, not a trained path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_EPS = 1e-12
# the sequence index a KV cache records for a dropped token's slot: past every query index, so a causal or
# frame-causal mask rule (`KVCache.visible_to_next`) never lets a decoded token see it
DROPPED_SEQ_INDEX = 2**30


def frame_similarity(features: jax.Array) -> jax.Array:
  """features [B, F, N, C] -> float32 [B, F-1, N]: cosine of token (t, n) to token (t-1, n), clipped to [-1, 1].

  A zero-norm token (nothing to compare) has similarity 0, so it is kept at any tau >= 0."""
  x = jax.lax.stop_gradient(features).astype(jnp.float32)
  cur, prev = x[:, 1:], x[:, :-1]
  dot = jnp.sum(cur * prev, axis=-1)
  norms = jnp.linalg.norm(cur, axis=-1) * jnp.linalg.norm(prev, axis=-1)
  return jnp.clip(dot / jnp.maximum(norms, _EPS), -1.0, 1.0)


def keep_mask(features: jax.Array, tau: float | jax.Array, previous: jax.Array | None = None) -> jax.Array:
  """features [B, F, N, C] -> bool [B, F, N]: True where the token is kept (similarity to the previous frame <= tau).

  previous: [B, N, C], the last frame of the previous chunk of a stream (None: this is the stream's start, and its
  frame 0 keeps every token), so a stream cut into chunks drops exactly what the whole video would.
  tau = 1 keeps everything (a clipped cosine never exceeds 1), which is how a model turns DTD off."""
  b, _, n, _ = features.shape
  if previous is not None:
    return frame_similarity(jnp.concatenate([previous[:, None].astype(features.dtype), features], axis=1)) <= tau
  drop = frame_similarity(features) > tau  # [B, F-1, N]
  return jnp.concatenate([jnp.ones((b, 1, n), bool), ~drop], axis=1)


def dropped_fraction(keep: jax.Array) -> jax.Array:
  """keep bool [B, ...] -> float32 [B]: the fraction of ALL video tokens dropped (frame 0 included in the count,
  as TimeChat-Online reports it)."""
  flat = keep.reshape(keep.shape[0], -1)
  return 1.0 - jnp.mean(flat.astype(jnp.float32), axis=-1)


def segment_ids(keep: jax.Array, text_len: int, base: tuple[jax.Array, jax.Array] | None = None):
  """Segment ids ([B, Nv + L], [B, Nv + L]) int32 that hide dropped video tokens from everything else.

  keep: bool [B, Nv] (flattened in raster (t, h, w) order, like the tokens). Kept video and text get id 1 (or
  `base`, packing ids given by the caller), dropped tokens -1: equal ids attend (layers.attention), so a dropped
  query sees only dropped keys of its own and earlier frames (itself included: no row is empty) and its output
  never reaches a kept token or the text."""
  b, nv = keep.shape
  full_keep = jnp.concatenate([keep, jnp.ones((b, text_len), bool)], axis=1)
  if base is None:
    ids = jnp.where(full_keep, 1, -1).astype(jnp.int32)
    return ids, ids
  return tuple(jnp.where(full_keep, s.astype(jnp.int32), -1) for s in base)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compacted:
  """Kept tokens gathered to the front of a fixed capacity C (see `compact`)."""

  tokens: jax.Array  # [B, C, ...] the kept tokens' features, zeros in invalid slots
  positions: jax.Array  # int32 [B, C, 3] their true (t, h, w) positions (invalid slots: those of a dropped token)
  index: jax.Array  # int32 [B, C] their flat index in the video (raster order): the seq index a cache records
  valid: jax.Array  # bool [B, C] slot holds a kept token
  overflow: jax.Array  # int32 [B] kept tokens that did not fit the capacity (the latest ones are cut)


def compact(tokens: jax.Array, keep: jax.Array, positions: jax.Array, capacity: int | None = None) -> Compacted:
  """Gather kept tokens to the front of a static `capacity` (default: all of them, Nv).

  tokens [B, Nv, ...], keep bool [B, Nv], positions int [Nv, 3] or [B, Nv, 3] (raster order). Kept tokens stay in
  their original (time) order; past the capacity the latest kept tokens are cut and counted in `overflow`, so a
  keep budget never silently changes what earlier frames hold."""
  b, nv = keep.shape
  cap = nv if capacity is None else int(capacity)
  if cap < 1:
    raise ValueError(f"token_drop.compact: capacity must be >= 1, got {capacity}")
  positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, nv, 3))
  # a stable sort on "dropped" puts kept tokens first, each group in its original order
  order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)  # [B, Nv]
  if cap <= nv:
    index = order[:, :cap]
  else:  # more room than tokens: pad with the last token's index (invalid)
    index = jnp.concatenate([order, jnp.broadcast_to(order[:, -1:], (b, cap - nv))], axis=1)
  count = jnp.sum(keep, axis=1, dtype=jnp.int32)  # [B]
  valid = jnp.arange(cap, dtype=jnp.int32)[None, :] < count[:, None]
  gathered = jnp.take_along_axis(tokens, index.reshape(b, cap, *([1] * (tokens.ndim - 2))), axis=1)
  gathered = jnp.where(valid.reshape(b, cap, *([1] * (tokens.ndim - 2))), gathered, jnp.zeros((), tokens.dtype))
  pos = jnp.take_along_axis(positions, index[..., None], axis=1)
  return Compacted(gathered, pos, index, valid, jnp.maximum(count - cap, 0))


def drop_tokens(
  features: jax.Array, tau: float | jax.Array, positions: jax.Array, capacity: int | None = None,
  tokens: jax.Array | None = None,
) -> tuple[Compacted, jax.Array, jax.Array]:
  """DTD end to end: features [B, F, N, C] -> (compacted kept tokens, keep bool [B, F*N], dropped fraction [B]).

  `tokens` [B, F*N, E] (default: the features flattened) are what is gathered; the decision is made on
  `features`, so a caller may decide on pixels and keep embeddings, or decide and keep the same array."""
  b, f, n, c = features.shape
  keep = keep_mask(features, tau).reshape(b, f * n)
  src = features.reshape(b, f * n, c) if tokens is None else tokens
  return compact(src, keep, positions, capacity), keep, dropped_fraction(keep)
