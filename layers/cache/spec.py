"""`CacheSpec`: which KV cache a model keeps and its sizes (static, hashable), plus the slot arithmetic of each kind.

Kinds (DESIGN section 7, issue 13):
  full             every token keeps its slot: `capacity` slots per row; exact, the reference for the others.
  sink_window      StreamingLLM: the first `sink` tokens stay forever, then a ring buffer of the `window` most
                   recent tokens. Slots: sink + window.
  block_retrieval  InfLLM / ReKV: sinks + window as above; a token leaving the window is moved to a block store of
                   `blocks` blocks of `block` consecutive tokens, each with a representative key (the mean of its
                   keys); every new chunk (a video chunk, a question, a decoded token) also attends the `top_k`
                   blocks whose representative key best matches the chunk's mean query.

Every size is static: a cache's arrays have the same shapes whatever the stream length (device memory bounded by
the spec).

RoPE positions of the attended context (`rope_positions`): "true" rotates every cached key by its true stream
position (far into a stream a query sees its context at distances never trained on); "cache" keeps those keys but,
at attention time, re-rotates them as if the groups missing from the context had never been there (see
`layers.cache.kv`). A full cache never evicts, so both conventions give it the same logits.

Token n of a row (n counts every token ever appended to it, its "stream index") lives at
  full:        slot n
  evicting:    slot n for n < sink, else sink + (n - sink) % window        (ring)
  store:       token m (evicted once token m + window arrived, m >= sink) at block j = (m - sink) // block, in
               block slot j % blocks, offset (m - sink) % block: the store is a ring of blocks, so when it is full
               the OLDEST block is dropped (FIFO) as the first token of a new block arrives in its block slot.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

KINDS = ("full", "sink_window", "block_retrieval")
ROPE_POSITIONS = ("true", "cache")
SCORES = ("mean", "mass")
SELECTS = ("per_head", "shared")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Static description of a KV cache (see the module docstring). Unused sizes of a kind stay 0."""

  kind: str = "full"
  capacity: int = 0  # full: slots per row
  sink: int = 0  # evicting kinds: first tokens kept forever (StreamingLLM uses 4)
  window: int = 0  # evicting kinds: most recent tokens kept (ring buffer)
  block: int = 0  # block_retrieval: tokens per store block (one frame's tokens = ReKV's frame blocks)
  blocks: int = 0  # block_retrieval: store capacity in blocks (FIFO when full)
  top_k: int = 0  # block_retrieval: blocks retrieved per chunk (per kv head)
  # where RoPE puts the attended context (kv.py's module docstring): "true" = every token at its true stream
  # position; "cache" = positions within the cache: the groups (frames, text tokens) that were evicted or not
  # retrieved are cut out of the timeline, so the context reads as one contiguous video (StreamingLLM / ReKV)
  rope_positions: str = "true"
  # block_retrieval: how a store block is scored for a chunk (kv.py `KVCache._scores`): "mean" = the chunk's mean
  # query . the block's mean key; "mass" = the attention mass the chunk's queries would give the block's tokens
  score: str = "mean"
  # block_retrieval: "per_head" = each kv head retrieves its own top_k blocks; "shared" = one choice for all kv
  # heads of a layer (their scores summed)
  select: str = "per_head"

  def __post_init__(self):
    problem = self.problem()
    if problem is not None:
      raise ValueError(problem)

  def problem(self) -> str | None:
    """One line naming the field that is wrong (None: fine)."""
    if self.kind not in KINDS:
      return f"cache.kind={self.kind!r}: expected one of {' | '.join(KINDS)}"
    for name, allowed in (("score", SCORES), ("select", SELECTS), ("rope_positions", ROPE_POSITIONS)):
      if getattr(self, name) not in allowed:
        return f"cache.{name}={getattr(self, name)!r}: expected one of {' | '.join(allowed)}"
    if self.kind == "full":
      return None if self.capacity >= 1 else f"cache.capacity={self.capacity}: a full cache needs >= 1 slot"
    if self.sink < 0:
      return f"cache.sink={self.sink}: must be >= 0"
    if self.window < 1:
      return f"cache.window={self.window}: must be >= 1 (the recent tokens a {self.kind} cache keeps)"
    if self.kind == "block_retrieval":
      for name in ("block", "blocks", "top_k"):
        if getattr(self, name) < 1:
          return f"cache.{name}={getattr(self, name)}: must be >= 1 for kind=block_retrieval"
      if self.top_k > self.blocks:
        return f"cache.top_k={self.top_k} exceeds cache.blocks={self.blocks} (the store's capacity)"
    return None

  @property
  def remaps(self) -> bool:
    """Whether the context's RoPE positions are re-indexed within the cache (only evicting kinds have gaps)."""
    return self.rope_positions == "cache" and self.kind != "full"

  @property
  def slots(self) -> int:
    """Slots per row of the attended buffer (full: capacity; evicting kinds: sink + window)."""
    return self.capacity if self.kind == "full" else self.sink + self.window

  @property
  def store_slots(self) -> int:
    """Token slots of the block store (0 unless block_retrieval)."""
    return self.blocks * self.block if self.kind == "block_retrieval" else 0

  @property
  def retrieved(self) -> int:
    """Store tokens a chunk attends besides the buffer (top_k blocks)."""
    return self.top_k * self.block if self.kind == "block_retrieval" else 0

  @property
  def max_chunk(self) -> int | None:
    """Most tokens one append may carry (None: no static limit). An evicting cache writes a chunk into its ring
    in one scatter, so a chunk may not wrap the ring onto itself."""
    return None if self.kind == "full" else self.window

  def slot(self, n):
    """int32 stream index n [...] -> the buffer slot token n is written to."""
    if self.kind == "full":
      return n
    return jnp.where(n < self.sink, n, self.sink + (n - self.sink) % self.window)

  def store_slot(self, m):
    """int32 stream index m [...] of an evicted token (m >= sink) -> its slot in the block store."""
    j = m - self.sink
    return (j // self.block) % self.blocks * self.block + j % self.block

  def store_tokens(self, length):
    """length int32 [B] (tokens appended per row) -> (stream index int32 [B, M] of the token each store slot
    holds, valid bool [B, M]): a slot is valid when its token has left the window (m + window < length) and its
    block slot was not taken over by a newer block since."""
    m_slots = self.store_slots
    block_slot = jnp.arange(m_slots, dtype=jnp.int32) // self.block
    offset = jnp.arange(m_slots, dtype=jnp.int32) % self.block
    last = jnp.asarray(length, jnp.int32) - self.window - 1  # [B] latest evicted token (when >= sink)
    last_block = jnp.floor_divide(last - self.sink, self.block)[:, None]  # [B, 1] (negative: nothing evicted)
    owner = last_block - (last_block - block_slot[None]) % self.blocks  # [B, M] newest block held by the slot
    token = self.sink + owner * self.block + offset[None]
    return token, (owner >= 0) & (token <= last[:, None])
