"""`KVCache`: the static-shape pytree a jitted prefill / append / decode step carries, for every `CacheSpec` kind.

Fields (a model's stacked cache has a leading [L] on the per-layer arrays, one slice per layer):
  k, v          [(L,) B, S, Hkv, D]   the attended buffer (S = spec.slots). Keys are stored AFTER RoPE, rotated by
                their TRUE positions: a slot never needs its position again, whatever slot the ring put it in.
  store_k/v     [(L,) B, M, Hkv, D]   block_retrieval's store of evicted tokens (M = blocks * block; else M = 0)
  rep           [(L,) B, blocks, Hkv, D]  the mean key of each store block (its representative)
  picked        [(L,) B, Hkv, top_k]  the store blocks the last append retrieved, per kv head (inspection)
  positions     int32 [B, S, 3]       true (t, h, w) of each buffer slot (text: (p, p, p))
  seq_index     int32 [B, S]          the index the mask rule is evaluated on (`HIDDEN`: never visible)
  store_pos/store_seq  [B, M, 3] / [B, M]  the same for the store
  length        int32 [B]             tokens appended per row so far (stream index of the next token; for the
                full kind, slots [0, length) are filled)
  incoming      int32 [B]             real tokens of the append in progress (set by `record`, cleared by `advance`)
  top           int32 [B]             largest position coordinate appended so far (-1: none): text continues at
                top + 1, the M-RoPE rule of `layers.rope.video_text_positions`
  next_index    int32 [B]             the index the next token's mask rule starts from
  frames        int32 [B]             video frames (tubelet rows of t) appended so far: the next frame's t
  visible       bool [B, S + M]       which buffer and store slots the append in progress may see (set by
                `record` from the state BEFORE the append, so every token of a chunk sees the same past)
  text/store_text  bool [B, S'] / [B, M']  whether a buffer / store slot holds a text token (spec.remaps only;
                else S' = M' = 0): text moves along all three RoPE axes, video along t only
  context_seq/context_text  [B, (S + M)']  seq_index / text of each buffer and store slot BEFORE the append in
                progress (spec.remaps only; `record` overwrites the slots the chunk takes, `context` needs the old)
Static: spec (a `CacheSpec`), mask (the rule on seq_index, a `MaskSpec`), frame_shape ((H, W) of a stream's
frames, checked on every chunk; None for a prefill cache), rope_theta (the model's, to re-rotate keys).

RoPE positions (`spec.rope_positions`). Keys are always stored rotated by their TRUE positions.
  "true":  they are attended as stored: a query far into a stream sees its sinks and retrieved blocks at their
           true (large) distance.
  "cache": (evicting kinds; StreamingLLM, ReKV's "contiguous RoPE") positions within the cache. The context an
           append attends is a set of groups (a group = one seq_index: one frame of a stream, or one text token;
           stream caches number them 0, 1, 2, ... in order). Every group missing from the context (evicted and not
           retrieved) is cut out of the timeline: a token whose group has S missing groups before it moves back by
           S, along t for a video token and along all three axes for a text token (which sits at (p, p, p)). So
           sinks, the retrieved blocks (in time order), the window and the chunk read as one contiguous video
           followed by text, as long as the training videos were; when nothing is missing every shift is 0 and the
           logits are those of "true" exactly. Implemented by re-rotating each context key by
           (shift of the chunk) - (shift of the key) (RoPE is relative: the queries stay at their true positions),
           per kv head when retrieval picks per kv head. Assumes stream caches (`VideoLM.init_cache`: groups
           counted from 0 without gaps); a text chunk's tokens are recognised by `record(..., text=True)`, or by
           t == h == w when not told.

Visibility: the tokens of one append see (a) the cache's past slots that are `visible` (filled, and allowed by
`mask.allowed(next_index, seq_index)`: everything earlier under a causal or frame-causal rule, never a `HIDDEN`
token such as a dropped one), (b) for block_retrieval the valid tokens of the top_k retrieved blocks, and (c) each
other under the append's own mask (frame-causal for a video chunk, causal for text). A token evicted by a later
token of the same chunk is still seen by the whole chunk: eviction takes effect at the next append.

One append, for a model (all layers share the metadata steps):
  cache = cache.record(positions [B, N, 3], seq_index [B, N], counts [B])   # once: slots, eviction metadata
  per layer:  k_ctx, v_ctx, vis, layer_cache = layer_cache.context(q)      # what the chunk attends (+ retrieval)
              layer_cache = layer_cache.append(k, v)                       # write, evict to the store, rep keys
  cache = cache.advance()                                                  # once: length += counts
(`layers.attention.Attention` does the per-layer part with decode=True; `VideoLM.extend` / `extend_text` /
`decode_step` the rest.) A full cache may instead be filled in one prefill (`write_prefix`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from layers import rope as rope_lib
from layers.cache.spec import CacheSpec
from layers.partitioning import logical_to_spec

HIDDEN = 2**30  # a seq_index past every query: the slot is stored but never attended (e.g. a dropped token)
LAYER_FIELDS = ("k", "v", "store_k", "store_v", "rep", "picked")
_ABSENT = 2**31 - 1  # the group of a slot not in the context: sorts after every real group


def _rope_axes(is_text: jax.Array) -> jax.Array:
  """The RoPE axes (t, h, w) a token moves along when groups before it are cut out: int32 [..., 3], (1, 1, 1) for
  a text token (it sits at (p, p, p)), (1, 0, 0) for a video token (only its frame index t counts groups)."""
  return jnp.stack([jnp.ones_like(is_text), is_text, is_text], -1).astype(jnp.int32)


def _drop_set(x: jax.Array, rows, idx, vals) -> jax.Array:
  """x[rows, idx] = vals, where out-of-range idx (used to mark 'do not write') is dropped."""
  return x.at[rows, idx].set(vals.astype(x.dtype), mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A KV cache of any `CacheSpec` kind (fields: the module docstring). Build one with `KVCache.init` (full) or
  `KVCache.create` (any spec)."""

  k: jax.Array
  v: jax.Array
  store_k: jax.Array
  store_v: jax.Array
  rep: jax.Array
  picked: jax.Array
  positions: jax.Array
  seq_index: jax.Array
  store_pos: jax.Array
  store_seq: jax.Array
  length: jax.Array
  incoming: jax.Array
  top: jax.Array
  next_index: jax.Array
  frames: jax.Array
  visible: jax.Array
  spec: CacheSpec = dataclasses.field(default=CacheSpec("full", capacity=1), metadata=dict(static=True))
  # the mask rule of the sequence the cache holds (a hashable `MaskSpec`): a new token sees a past slot j iff
  # mask.allowed(its seq index, seq_index[j])
  mask: Any = dataclasses.field(default=None, metadata=dict(static=True))
  frame_shape: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
  text: jax.Array | None = None
  store_text: jax.Array | None = None
  context_seq: jax.Array | None = None
  context_text: jax.Array | None = None
  rope_theta: float = dataclasses.field(default=10_000.0, metadata=dict(static=True))

  # ---- construction ---------------------------------------------------------------------------------------
  @staticmethod
  def create(
    spec: CacheSpec, batch: int, num_kv_heads: int, head_dim: int, *, num_layers: int | None = None,
    dtype=jnp.float32, mask: Any = None, frame_shape: tuple[int, int] | None = None, rope_theta: float = 10_000.0,
  ) -> KVCache:
    """An empty cache of `spec` ([num_layers, ...] per-layer arrays when num_layers is given); `rope_theta` is the
    model's (spec.rope_positions="cache" re-rotates keys with it)."""
    lead = () if num_layers is None else (num_layers,)
    s, m = spec.slots, spec.store_slots
    nb = spec.blocks if spec.kind == "block_retrieval" else 0
    # a new buffer for every field (no `k=z, v=z`): the streaming ingest step donates the cache, and one buffer
    # in two leaves is an error there ("donate the same buffer twice"; only seen off CPU, which ignores donation)
    kv = lambda: jnp.zeros((*lead, batch, s, num_kv_heads, head_dim), dtype)  # noqa: E731
    store = lambda: jnp.zeros((*lead, batch, m, num_kv_heads, head_dim), dtype)  # noqa: E731
    zeros = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731
    r = int(spec.remaps)  # the position-remap arrays are empty unless spec.remaps
    return KVCache(
      k=kv(), v=kv(), store_k=store(), store_v=store(), rep=jnp.zeros((*lead, batch, nb, num_kv_heads, head_dim), dtype),
      picked=jnp.zeros((*lead, batch, num_kv_heads, spec.top_k if nb else 0), jnp.int32),
      positions=jnp.zeros((batch, s, 3), jnp.int32), seq_index=jnp.zeros((batch, s), jnp.int32),
      store_pos=jnp.zeros((batch, m, 3), jnp.int32), store_seq=jnp.zeros((batch, m), jnp.int32),
      length=zeros(), incoming=zeros(), top=zeros() - 1, next_index=zeros(), frames=zeros(),
      visible=jnp.zeros((batch, s + m), bool), spec=spec, mask=mask, frame_shape=frame_shape,
      text=jnp.zeros((batch, s * r), bool), store_text=jnp.zeros((batch, m * r), bool),
      context_seq=jnp.zeros((batch, (s + m) * r), jnp.int32), context_text=jnp.zeros((batch, (s + m) * r), bool),
      rope_theta=float(rope_theta),
    )

  @staticmethod
  def init(
    batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, num_layers: int | None = None,
    dtype=jnp.float32, kind: str = "full", mask: Any = None,
  ) -> KVCache:
    """An empty FULL cache of `max_len` slots per row (other kinds need their sizes: `create(CacheSpec(...))`)."""
    if kind != "full":
      raise ValueError(f"KVCache.init makes full caches; a {kind!r} cache needs its sizes: KVCache.create(CacheSpec(...))")
    if max_len < 1:
      raise ValueError(f"KVCache.init: max_len must be >= 1, got {max_len}")
    return KVCache.create(CacheSpec("full", capacity=max_len), batch, num_kv_heads, head_dim, num_layers=num_layers,
                          dtype=dtype, mask=mask)

  # ---- shape helpers --------------------------------------------------------------------------------------
  @property
  def kind(self) -> str:
    return self.spec.kind

  @property
  def batch(self) -> int:
    return self.positions.shape[0]

  @property
  def max_len(self) -> int:
    return self.positions.shape[1]

  def sharded(self) -> KVCache:
    """The cache with its sharding pinned like the activations on the ambient mesh (no-op without one): rows over
    "batch" (data x fsdp), kv heads over "tensor" (like the attention's k/v), slots and layers unsplit."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      return self
    names = dict(k=("layers", "batch", None, "kv_heads", "head_dim"), picked=("layers", "batch", "kv_heads", None))
    names.update(v=names["k"], store_k=names["k"], store_v=names["k"], rep=names["k"])
    pinned = {}
    for f in dataclasses.fields(self):
      x = getattr(self, f.name)
      if isinstance(x, jax.Array):
        spec = names.get(f.name, ("batch",) + (None,) * (x.ndim - 1))
        if x.ndim == len(spec) - 1:  # a per-layer array of one layer
          spec = spec[1:]
        pinned[f.name] = jax.lax.with_sharding_constraint(x, logical_to_spec(spec))
    return dataclasses.replace(self, **pinned)

  def layer_arrays(self) -> tuple[jax.Array, ...]:
    """The per-layer arrays (`LAYER_FIELDS`), stacked [L, ...]: what a layer scan takes as xs."""
    return tuple(getattr(self, f) for f in LAYER_FIELDS)

  def with_layer_arrays(self, arrays) -> KVCache:
    return dataclasses.replace(self, **dict(zip(LAYER_FIELDS, arrays)))

  def layer(self, i) -> KVCache:
    """The cache of layer i of a stacked cache (unrolled layer loops; a scan slices the arrays as xs instead)."""
    return self.with_layer_arrays(tuple(a[i] for a in self.layer_arrays()))

  def valid(self) -> jax.Array:
    """bool [B, S]: which buffer slots hold a token."""
    return jnp.arange(self.max_len, dtype=jnp.int32)[None, :] < self.length[:, None]

  def store_valid(self, length: jax.Array | None = None) -> jax.Array:
    """bool [B, M]: which store slots hold an evicted token (after `length` tokens, default the current)."""
    return self.spec.store_tokens(self.length if length is None else length)[1]

  # ---- metadata, once per append for all layers --------------------------------------------------------------
  def record(self, positions: jax.Array, seq_index: jax.Array, counts: jax.Array | None = None, *,
             text: bool | None = None) -> KVCache:
    """Record N arriving tokens: positions int [B, N, 3], seq_index int [B, N]; `counts` [B] (default N) of them
    are real, the rest right padding that is neither written nor counted. `text`: whether they are text tokens
    (used only by spec.rope_positions="cache"; None: a token is text when its t == h == w). Called once BEFORE the layers attend and
    write: fixes what the append sees (`visible`, from the state before it), moves the metadata of tokens the
    append evicts to the store, writes the new tokens' metadata, updates top / next_index; length is unchanged
    until `advance`."""
    b, n = seq_index.shape
    spec = self.spec
    if spec.max_chunk is not None and n > spec.max_chunk:
      raise ValueError(
        f"KV cache: an append of {n} tokens does not fit the {spec.kind} window of {spec.window} "
        "(cache.window); append shorter chunks or raise the window"
      )
    counts = jnp.full((b,), n, jnp.int32) if counts is None else jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (b,))
    positions, seq_index = positions.astype(jnp.int32), seq_index.astype(jnp.int32)
    rows = jnp.arange(b)[:, None]
    real = jnp.arange(n, dtype=jnp.int32)[None, :] < counts[:, None]  # [B, N]
    token = self.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, N] stream indices
    q_index = self.next_index[:, None]
    visible = self.valid() & self._allowed(q_index, self.seq_index)
    store_seq, store_pos = self.store_seq, self.store_pos
    remap = {}
    if spec.remaps:  # the context's groups and text flags before this append overwrites any of them
      flags = jnp.all(positions == positions[..., :1], -1) if text is None else jnp.full((b, n), bool(text))
      remap = dict(context_seq=jnp.concatenate([self.seq_index, store_seq], 1),
                   context_text=jnp.concatenate([self.text, self.store_text], 1))
    if spec.kind == "block_retrieval":
      visible = jnp.concatenate([visible, self.store_valid() & self._allowed(q_index, store_seq)], axis=1)
      evict = real & (token >= spec.sink + spec.window)
      target = jnp.where(evict, spec.store_slot(token - spec.window), spec.store_slots)
      ring = spec.slot(token)
      store_seq = _drop_set(store_seq, rows, target, jnp.take_along_axis(self.seq_index, ring, axis=1))
      store_pos = _drop_set(store_pos, rows, target, jnp.take_along_axis(self.positions, ring[..., None], axis=1))
      if spec.remaps:
        remap["store_text"] = _drop_set(self.store_text, rows, target, jnp.take_along_axis(self.text, ring, axis=1))
    slot = jnp.where(real, spec.slot(token), self.max_len)
    if spec.remaps:
      remap["text"] = _drop_set(self.text, rows, slot, flags)
    shown = real & (seq_index < HIDDEN)
    top = jnp.maximum(self.top, jnp.max(jnp.where(real[..., None], positions, -1), axis=(1, 2)))
    nxt = jnp.maximum(self.next_index, jnp.max(jnp.where(shown, seq_index + 1, 0), axis=1))
    return dataclasses.replace(
      self, positions=_drop_set(self.positions, rows, slot, positions),
      seq_index=_drop_set(self.seq_index, rows, slot, seq_index), store_seq=store_seq, store_pos=store_pos,
      incoming=counts, top=top, next_index=nxt, visible=visible, **remap,
    )

  def advance(self, lengths: jax.Array | None = None) -> KVCache:
    """After the layers wrote: length += incoming (or, full caches, set each row's fill to `lengths` [B], as a
    prefill with right-padded prompts does: the padding is stored but not counted, the next token overwrites it)."""
    length = self.length + self.incoming if lengths is None else jnp.asarray(lengths, jnp.int32)
    return dataclasses.replace(self, length=jnp.broadcast_to(length, (self.batch,)), incoming=self.incoming * 0)

  def next_position(self) -> jax.Array:
    """int32 [B, 3]: the position of a text token appended to each row: (p+1, p+1, p+1) after text at (p, p, p),
    and (m, m, m) after a video whose largest coordinate is m - 1 (M-RoPE)."""
    return jnp.repeat((self.top + 1)[:, None], 3, axis=-1)

  def next_seq_index(self) -> jax.Array:
    """int32 [B]: the sequence index of a token appended to each row."""
    return self.next_index

  def _allowed(self, q_index, kv_index):
    if self.mask is None:
      raise ValueError("KV cache: no mask rule recorded (make the cache with the model's prefill / init_cache)")
    return self.mask.allowed(q_index, kv_index) & (kv_index < HIDDEN)

  # ---- per layer ---------------------------------------------------------------------------------------------
  def write_prefix(self, k: jax.Array, v: jax.Array, slots=None) -> KVCache:
    """Prefill of a full cache: write k, v [B, N, Hkv, D] into slots [0, N) of an (empty) per-layer cache; `slots`
    int [N] (optional) names the slot of each token when they arrive in another order (ring layouts)."""
    n = k.shape[1]
    if self.kind != "full":
      raise ValueError(f"KV cache: a one-shot prefill fills full caches; a {self.kind} cache is filled by appends")
    if n > self.max_len:
      raise ValueError(f"KV cache: prefill of {n} tokens does not fit {self.max_len} slots; raise the cache length")
    k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
    if slots is None:
      return dataclasses.replace(
        self, k=jax.lax.dynamic_update_slice_in_dim(self.k, k, 0, axis=1),
        v=jax.lax.dynamic_update_slice_in_dim(self.v, v, 0, axis=1),
      )
    return dataclasses.replace(self, k=self.k.at[:, slots].set(k), v=self.v.at[:, slots].set(v))

  def context(self, q: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """What the append in progress attends besides itself, for queries q [B, N, Hq, D] (after RoPE):
    -> (k, v [B, C, Hkv, D], visible bool [B, C] or, with retrieval, [B, C, Hkv] per kv head, cache).

    block_retrieval: each kv head scores every store block by (mean over the chunk's real queries and the query
    heads of its GQA group) . (block representative key), and the top_k blocks holding a visible token are
    gathered after the buffer; the choice is recorded in `picked` (per kv head)."""
    spec, s = self.spec, self.max_len
    if spec.kind != "block_retrieval":
      k = self.k
      if spec.remaps:  # one context for every kv head: a head axis of 1
        groups, text, vis = self.context_seq[:, :s, None], self.context_text[:, :s, None], self.visible[:, :s, None]
        k = self._rerotate(k[:, :, None], groups, text, vis)[:, :, 0]
      return k, self.v, self.visible[:, :s], self
    b, n, hq, d = q.shape
    hkv = self.k.shape[-2]
    real = (jnp.arange(n)[None, :] < self.incoming[:, None]).astype(jnp.float32)  # [B, N]
    qg = q.astype(jnp.float32).reshape(b, n, hkv, hq // hkv, d)
    store_vis = self.visible[:, s:]  # [B, M]
    held = store_vis.reshape(b, spec.blocks, spec.block).any(-1)  # [B, blocks]
    score = self._scores(qg, real, store_vis)  # [B, Hkv, blocks]
    if spec.select == "shared":
      score = jnp.broadcast_to(jnp.where(held[:, None], score, 0.0).sum(1, keepdims=True), score.shape)
    picked = jax.lax.top_k(jnp.where(held[:, None], score, -jnp.inf), spec.top_k)[1].astype(jnp.int32)  # [B, Hkv, K]
    tok = (picked[..., None] * spec.block + jnp.arange(spec.block)).reshape(b, hkv, -1).transpose(0, 2, 1)  # [B,R,Hkv]
    k_ret = jnp.take_along_axis(self.store_k, tok[..., None], axis=1)  # [B, R, Hkv, D]
    v_ret = jnp.take_along_axis(self.store_v, tok[..., None], axis=1)
    vis_ret = jnp.take_along_axis(store_vis[:, :, None], tok, axis=1)  # [B, R, Hkv]
    vis_buf = jnp.broadcast_to(self.visible[:, :s, None], (b, s, hkv))
    k_ctx, vis = jnp.concatenate([self.k, k_ret], 1), jnp.concatenate([vis_buf, vis_ret], 1)  # [B, C, Hkv(, D)]
    if spec.remaps:
      groups = jnp.concatenate([jnp.broadcast_to(self.context_seq[:, :s, None], (b, s, hkv)),
                                jnp.take_along_axis(self.context_seq[:, s:, None], tok, axis=1)], 1)  # [B, C, Hkv]
      text = jnp.concatenate([jnp.broadcast_to(self.context_text[:, :s, None], (b, s, hkv)),
                              jnp.take_along_axis(self.context_text[:, s:, None], tok, axis=1)], 1)
      k_ctx = self._rerotate(k_ctx[:, :, :, None], groups, text, vis)[:, :, :, 0]
    return k_ctx, jnp.concatenate([self.v, v_ret], 1), vis, dataclasses.replace(self, picked=picked)

  def _scores(self, qg: jax.Array, real: jax.Array, store_vis: jax.Array) -> jax.Array:
    """Block scores [B, Hkv, blocks] for queries qg [B, N, Hkv, G, D] (true positions; real [B, N] marks the
    chunk's real tokens) over the store (store_vis [B, M]: which tokens it may see).
      mean: (mean real query of the kv head's group) . (block representative = mean key).
      mass: for each real query and query head, the softmax of q.k / sqrt(D) over every visible store token; a
            block's score is the probability mass its tokens get, summed over the queries and the group's heads
            (what the question would read from the block, were every block in the context).
    With spec.remaps every candidate is scored at one position: as if it were the block just before the window
    (video tokens along t, text along all axes), so blocks compete on content, not on their distance."""
    spec = self.spec
    b, n, hkv, g, d = qg.shape
    keys = self.rep if spec.score == "mean" else self.store_k  # [B, blocks | M, Hkv, D]
    if spec.remaps:
      keys = self._to_target(keys, spec.block if spec.score == "mean" else 1)
    keys = keys.astype(jnp.float32)
    if spec.score == "mean":
      qbar = jnp.einsum("bngd,bn->bgd", qg.sum(3), real) / jnp.maximum(real.sum(1) * g, 1.0)[:, None, None]
      return jnp.einsum("bhd,bkhd->bhk", qbar, keys)
    logits = jnp.einsum("bnhgd,bmhd->bhgnm", qg, keys) / jnp.sqrt(jnp.float32(d))
    logits = jnp.where(store_vis[:, None, None, None], logits, -jnp.inf)
    mass = jax.nn.softmax(logits, axis=-1)
    mass = jnp.where(store_vis[:, None, None, None], mass, 0.0)  # rows with nothing visible: 0, not nan
    mass = jnp.einsum("bhgnm,bn->bhm", mass, real)  # [B, Hkv, M]
    return mass.reshape(b, hkv, spec.blocks, spec.block).sum(-1)

  def _to_target(self, keys: jax.Array, per: int) -> jax.Array:
    """keys [B, M / per, Hkv, D] of the store (per = 1: one per store token; per = block: one per block, described
    by its first token) re-rotated to the scoring position of `_scores`: the group just before the window's
    oldest group g_w0, in the timeline the chunk will see (sinks, top_k blocks, window, chunk)."""
    spec, s = self.spec, self.max_len
    groups = self.context_seq[:, s::per]  # [B, M / per]
    text = self.context_text[:, s::per]
    vis = self.visible
    ring = jnp.where(vis[:, spec.sink:s], self.context_seq[:, spec.sink:s], _ABSENT)
    q_group, q_text = (x[:, 0] for x in self._chunk_start())  # [B]
    g_w0 = jnp.minimum(ring.min(1), q_group)  # [B] the window's oldest group (the chunk's, when it is empty)
    sink_groups = jnp.max(jnp.where(vis[:, : spec.sink], self.context_seq[:, : spec.sink], -1), 1, initial=-1) + 1
    s_w0 = jnp.maximum(g_w0 - sink_groups - spec.top_k, 0)  # [B] missing groups before the window
    shift_k = groups - g_w0[:, None] + s_w0[:, None] + 1  # [B, M / per]
    delta = s_w0[:, None, None] * _rope_axes(q_text)[:, None] - shift_k[..., None] * _rope_axes(text)  # [B, M / per, 3]
    return rope_lib.apply(keys, rope_lib.tables(delta, keys.shape[-1], self.rope_theta))

  def _chunk_start(self) -> tuple[jax.Array, jax.Array]:
    """(group [B, 1], is-text [B, 1]) of the append's first token (written by `record` before the layers attend)."""
    first_slot = self.spec.slot(self.length)[:, None]
    return jnp.take_along_axis(self.seq_index, first_slot, 1), jnp.take_along_axis(self.text, first_slot, 1)

  def _rerotate(self, k: jax.Array, groups: jax.Array, text: jax.Array, present: jax.Array) -> jax.Array:
    """spec.rope_positions="cache": k [B, C, H, G, D] (context keys at true positions; H = kv heads and G = 1
    with per-head retrieval, H = 1 and G = kv heads when all heads share one context), groups int32 / text bool / present bool
    [B, C, H] -> k rotated to positions within the cache (module docstring). A key whose group has S_k missing
    groups before it, attended by a chunk with S_q missing groups before it, is rotated by
    S_q * axes(chunk) - S_k * axes(key), axes = (1, 1, 1) for text and (1, 0, 0) for video: with the queries at
    their true positions, exactly the relative positions of the remapped timeline. Missing groups are counted by
    sorting the present ones (O(C log C) per row and head)."""
    b, c, h = groups.shape
    key = jnp.where(present, groups, _ABSENT).transpose(0, 2, 1)  # [B, H, C]
    srt = jnp.sort(key, axis=-1)
    first = (srt < _ABSENT) & (srt != jnp.concatenate([jnp.full((b, h, 1), -1, jnp.int32), srt[..., :-1]], -1))
    distinct = jnp.cumsum(first, axis=-1, dtype=jnp.int32)  # [B, H, C] distinct present groups <= srt[j]
    # unrolled: the default `scan` method is a device while loop, one iteration per level (gpu/NOTES.md, fifth round)
    search = lambda a, v: jnp.searchsorted(a, v, side="left", method="scan_unrolled")  # noqa: E731
    below = jax.vmap(jax.vmap(search))(srt, groups.transpose(0, 2, 1))
    present_below = jnp.where(below > 0, jnp.take_along_axis(distinct, jnp.maximum(below - 1, 0), -1), 0)
    shift_k = jnp.where(present, groups - present_below.transpose(0, 2, 1), 0)  # [B, C, H]
    q_group, q_text = self._chunk_start()  # [B, 1]
    shift_q = (q_group - distinct[..., -1])[:, None, :]  # [B, 1, H]: missing groups before the chunk
    delta = shift_q[..., None] * _rope_axes(q_text)[:, :, None] - shift_k[..., None] * _rope_axes(text)  # [B, C, H, 3]
    rope = rope_lib.tables(delta.reshape(b, c * h, 3), k.shape[-1], self.rope_theta)  # [B, C*H, D/2]
    rotated = rope_lib.apply(k.reshape(b, c * h, *k.shape[3:]), rope)
    return rotated.reshape(k.shape)

  def append(self, k: jax.Array, v: jax.Array) -> KVCache:
    """Write the append's k, v [B, N, Hkv, D] (after `context`): the real tokens go to their slots; with
    block_retrieval the tokens they overwrite move to the store first and the touched blocks' representative
    keys are recomputed (mean of their valid, unhidden keys)."""
    spec = self.spec
    b, n = k.shape[:2]
    rows = jnp.arange(b)[:, None]
    real = jnp.arange(n, dtype=jnp.int32)[None, :] < self.incoming[:, None]
    token = self.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    ring = spec.slot(token)
    new = {}
    if spec.kind == "block_retrieval":
      evict = real & (token >= spec.sink + spec.window)
      target = jnp.where(evict, spec.store_slot(token - spec.window), spec.store_slots)
      store_k = _drop_set(self.store_k, rows, target, jnp.take_along_axis(self.k, ring[..., None, None], axis=1))
      store_v = _drop_set(self.store_v, rows, target, jnp.take_along_axis(self.v, ring[..., None, None], axis=1))
      new = dict(store_k=store_k, store_v=store_v, rep=self._representatives(store_k, n))
    slot = jnp.where(real, ring, self.max_len)
    return dataclasses.replace(self, k=_drop_set(self.k, rows, slot, k), v=_drop_set(self.v, rows, slot, v), **new)

  def _representatives(self, store_k: jax.Array, n: int) -> jax.Array:
    """rep [B, blocks, Hkv, D] with the blocks this append evicts into recomputed (the others are unchanged, so the
    work per append is O(n), not O(store)). Recomputing a block nothing was evicted into is harmless."""
    spec = self.spec
    b = store_k.shape[0]
    valid = self.store_valid(self.length + self.incoming) & self._allowed(self.next_index[:, None], self.store_seq)
    first = jnp.maximum(self.length - spec.window, spec.sink)  # [B] first token this append can evict
    touched = min(spec.blocks, -(-n // spec.block) + 1)
    blk = ((first - spec.sink) // spec.block)[:, None] + jnp.arange(touched)
    blk = blk % spec.blocks  # [B, T]
    tok = (blk[..., None] * spec.block + jnp.arange(spec.block)).reshape(b, -1)  # [B, T * block]
    keys = jnp.take_along_axis(store_k, tok[..., None, None], axis=1).astype(jnp.float32)
    keys = keys.reshape(b, touched, spec.block, *store_k.shape[2:])
    w = jnp.take_along_axis(valid, tok, axis=1).reshape(b, touched, spec.block, 1, 1).astype(jnp.float32)
    mean = (keys * w).sum(2) / jnp.maximum(w.sum(2), 1.0)  # [B, T, Hkv, D]
    return self.rep.at[jnp.arange(b)[:, None], blk].set(mean.astype(self.rep.dtype))
