"""KV caches for decoding: static-shape pytrees a jitted prefill / decode step carries (DESIGN section 7).

Only the **full** cache exists today: every token ever fed keeps its slot. The sink + window (StreamingLLM) and
block-retrieval (InfLLM/ReKV) caches come later; they fit the same shape contract:

  k, v       [B, S_max, Hkv, D]  (a model's stacked cache: [L, B, S_max, Hkv, D], one slice per layer)
             keys are stored AFTER RoPE, so a slot never needs its position again to be attended;
  positions  int32 [B, S_max, 3] the true (t, h, w) position of the token in each slot (text: (p, p, p)), so
             offsets and dropped tokens keep their positions and the next token's position is known;
  seq_index  int32 [B, S_max] the token's index in the full sequence the model's mask is written over
             (for the full cache slot == seq index; an evicting cache keeps the index of what it kept);
  length     int32 [B] filled slots per row: slots [0, length) are valid (rows may differ: prompts of different
             lengths decode side by side).

Everything but the arrays is static, so a cache is a jit argument and a `nnx.scan` carry / xs like any array.
How a cache is written and attended is the attention layer's business (`layers.attention.Attention`); this module
only holds the data and the slot arithmetic shared by every cache kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("full",)  # next: "sink_window", "block_retrieval"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A full KV cache (see the module docstring for the fields). Build one with `KVCache.init`."""

  k: jax.Array  # [(L,) B, S_max, Hkv, D]
  v: jax.Array  # [(L,) B, S_max, Hkv, D]
  positions: jax.Array  # int32 [B, S_max, 3]
  seq_index: jax.Array  # int32 [B, S_max]
  length: jax.Array  # int32 [B]
  kind: str = dataclasses.field(default="full", metadata=dict(static=True))
  # the mask rule of the sequence the cache holds (a hashable `MaskSpec`, set by the model's prefill): a decoded
  # token sees slot j iff mask.allowed(its seq_index, seq_index[j])
  mask: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @staticmethod
  def init(
    batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, num_layers: int | None = None,
    dtype=jnp.float32, kind: str = "full", mask: Any = None,
  ) -> KVCache:
    """An empty cache of `max_len` slots per row ([num_layers, ...] k/v when num_layers is given)."""
    if kind not in KINDS:
      raise ValueError(f"cache kind {kind!r} is not implemented; expected one of {KINDS}")
    if max_len < 1:
      raise ValueError(f"KVCache.init: max_len must be >= 1, got {max_len}")
    lead = () if num_layers is None else (num_layers,)
    kv = jnp.zeros((*lead, batch, max_len, num_kv_heads, head_dim), dtype)
    return KVCache(
      k=kv, v=kv, positions=jnp.zeros((batch, max_len, 3), jnp.int32),
      seq_index=jnp.zeros((batch, max_len), jnp.int32), length=jnp.zeros((batch,), jnp.int32), kind=kind,
      mask=mask,
    )

  @property
  def batch(self) -> int:
    return self.positions.shape[0]

  @property
  def max_len(self) -> int:
    return self.positions.shape[1]

  def layer(self, i) -> KVCache:
    """The cache of layer i of a stacked cache (unrolled layer loops; a scan slices k/v as xs instead)."""
    return dataclasses.replace(self, k=self.k[i], v=self.v[i])

  def valid(self) -> jax.Array:
    """bool [B, S_max]: which slots hold a token."""
    return jnp.arange(self.max_len, dtype=jnp.int32)[None, :] < self.length[:, None]

  def write_prefix(self, k: jax.Array, v: jax.Array, slots=None) -> KVCache:
    """Write k, v [B, N, Hkv, D] of a prefill into slots [0, N) of an (empty) per-layer cache; `slots` int [N]
    (optional) names the slot of each of the N tokens when they arrive in another order (ring layouts).
    Positions, seq_index and length are the model's to set (`record`, `advance`), once for all layers."""
    n = k.shape[1]
    if n > self.max_len:
      raise ValueError(f"KV cache: prefill of {n} tokens does not fit {self.max_len} slots; raise the cache length")
    k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
    if slots is None:
      return dataclasses.replace(
        self, k=jax.lax.dynamic_update_slice_in_dim(self.k, k, 0, axis=1),
        v=jax.lax.dynamic_update_slice_in_dim(self.v, v, 0, axis=1),
      )
    return dataclasses.replace(self, k=self.k.at[:, slots].set(k), v=self.v.at[:, slots].set(v))

  def write_token(self, k: jax.Array, v: jax.Array) -> KVCache:
    """Write one token's k, v [B, 1, Hkv, D] per row at slot `length[b]` of a per-layer cache (length itself
    advances once for all layers, in `advance`). A full row is the caller's error to prevent (generate()
    checks capacity on the host: a jitted scatter out of range would be dropped silently)."""
    rows = jnp.arange(self.batch)
    return dataclasses.replace(
      self, k=self.k.at[rows, self.length].set(k[:, 0].astype(self.k.dtype)),
      v=self.v.at[rows, self.length].set(v[:, 0].astype(self.v.dtype)),
    )

  def record(self, positions: jax.Array, seq_index: jax.Array) -> KVCache:
    """Record `positions` [B, N, 3] / `seq_index` [B, N] of N tokens about to be written at slots
    [length, length + N) of each row. Called by the model once for all layers BEFORE the layers write k/v, so the
    mask of a token just written (`visible_to`) sees its true index; `length` is unchanged (see `advance`)."""
    n = positions.shape[1]
    slots = self.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, N]
    rows = jnp.arange(self.batch)[:, None]
    return dataclasses.replace(
      self, positions=self.positions.at[rows, slots].set(positions.astype(jnp.int32)),
      seq_index=self.seq_index.at[rows, slots].set(seq_index.astype(jnp.int32)),
    )

  def advance(self, lengths: jax.Array) -> KVCache:
    """Set each row's fill to `lengths` [B] after the layers wrote (a short prompt's padding is stored but not
    counted, so the next token overwrites it)."""
    return dataclasses.replace(self, length=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (self.batch,)))

  def next_position(self) -> jax.Array:
    """int32 [B, 3]: the position of a text token appended to each row: (p+1, p+1, p+1) after text at (p, p, p),
    and (m, m, m) after a video whose last token is at (..) with largest coordinate m - 1 (the M-RoPE rule of
    `layers.rope.video_text_positions`). Rows must hold a token."""
    last = jnp.take_along_axis(self.positions, jnp.maximum(self.length - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.repeat(jnp.max(last, axis=-1, keepdims=True) + 1, 3, axis=-1)

  def next_seq_index(self) -> jax.Array:
    """int32 [B]: the sequence index of a token appended to each row."""
    last = jnp.take_along_axis(self.seq_index, jnp.maximum(self.length - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(self.length > 0, last + 1, 0)

  def visible_to_next(self) -> jax.Array:
    """bool [B, S_max]: the slots the token at slot `length` (recorded and written, not yet counted) may attend:
    filled slots, itself included, that the cache's mask rule lets it see."""
    if self.mask is None:
      raise ValueError("KV cache: no mask rule recorded (a cache is filled by the model's prefill first)")
    slot = jnp.arange(self.max_len, dtype=jnp.int32)[None, :]
    q_index = jnp.take_along_axis(self.seq_index, self.length[:, None], axis=1)  # [B, 1]
    return (slot <= self.length[:, None]) & self.mask.allowed(q_index, self.seq_index)
