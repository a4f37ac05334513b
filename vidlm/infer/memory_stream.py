"""Incremental (chunked) ingest for MemoryBridgeLM at constant memory: the state a `StreamingSession` carries.

`MemoryBridgeLM.encode` cuts a whole video into fixed segments of L frames every S frames and scans the bridge
recurrence over them, writing every segment's memory to a bank that grows with the video (K x M tokens). A stream
has no end and must stay bounded, so this module runs the same recurrence chunk by chunk over the model's public
parts (`video_embed`, `frame_blocks`, `bridge`, `retriever`, `read`) with a bank of fixed `capacity` segments:

  state = init_state(model, batch, capacity, frame_shape=(H, W))
  state = ingest(model, state, frames [B, F, H, W, 3], eviction="fifo")   # F a multiple of S (x tubelet t)
  bank, bank_valid = bank_view(model, state)                              # what the decoder reads
  logits = model.read(tokens, bank, bank_valid)

Overlap across chunks: segment k covers frames kS .. kS+L-1, so a segment can straddle two chunks. The state keeps
the last L - S frames' tokens (`tail`); each chunk is cut as [tail ; chunk], which gives F / S segments per chunk
(static), each ending inside the chunk. At the stream's start the tail is padding and a segment touching it is
invalid (a padding segment leaves the carry untouched, as in `run_segments`), so the segments are exactly those
of `encode` on the frames so far whenever (frames - L) is a multiple of S (tested: same bank, same logits).
Only `segment_mode=fixed` streams (SceneTiling needs the whole video's similarity profile).

Eviction (the bank holds `capacity` segment memories; the recurrence state is (memory, bank, count)):
  fifo   the bank is a ring: when full, a new memory overwrites the oldest one. Bounded recall: a needle older
         than `capacity` segments is gone (its trace may survive in the carried memory).
  score  keep-by-score: the new memory always enters; when the bank is full it replaces the stored memory that is
         most redundant, i.e. whose mean vector has the highest cosine similarity to another memory (stored or
         new); ties go to the oldest. Distinctive segments (a needle among a static haystack) stay; runs of
         near-identical segments thin out.
While the bank is not full both policies write slot `count` exactly as `layers.memory.write_cache` does. The
retriever and the decoder read the bank order-free (no positions), so a ring's slot order never matters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlm.config import ConfigError

EVICTIONS = ("fifo", "score")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryState:
  """A memory-bridge stream: every array has a shape fixed by (batch, capacity, model), whatever the length."""

  memory: jax.Array  # [B, M, E] the carried memory (after the retriever)
  bank: jax.Array  # [B, C, M, E] stored segment memories (C = capacity)
  count: jax.Array  # int32 [B] valid bank slots (<= C)
  written: jax.Array  # int32 [B] segments written so far (the stream's segment counter)
  slot_segment: jax.Array  # int32 [B, C] which segment each slot holds (-1: empty); what eviction kept
  tail: jax.Array  # [B, L - S, P, E] the last L - S frames' tokens (the next segment's overlap)
  tail_valid: jax.Array  # bool [B, L - S] (False: the stream has not reached that far back yet)
  last_out: jax.Array  # [B, L * P, E] the last segment's bridge outputs (decoder_reads=cache+last)
  last_mask: jax.Array  # bool [B, L * P]
  frames: jax.Array  # int32 [B] frames (tubelet time steps) ingested


def check_model(model) -> None:
  """One line when the model's configuration cannot stream."""
  if model.plan.mode != "fixed":
    raise ConfigError(f"model.segment_mode={model.plan.mode}: a stream is cut into fixed segments as it arrives "
                      "(SceneTiling needs the whole video); stream with segment_mode=fixed")


def granularity(model) -> int:
  """A chunk's frame count must be a multiple of this (segment stride x tubelet t)."""
  return model.plan.stride * model.tubelet[0]


def init_state(model, batch: int, capacity: int, *, frame_shape: tuple[int, int]) -> MemoryState:
  """An empty stream state with a bank of `capacity` segment memories."""
  check_model(model)
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    raise ConfigError(f"memory stream: capacity={capacity!r} (bank segments) must be a positive int")
  h, w = frame_shape
  _, th, tw = model.tubelet
  if h % th or w % tw:
    raise ConfigError(f"stream frames of {h}x{w} do not divide into the model's {th}x{tw} tubelets (model.tubelet)")
  p = (h // th) * (w // tw)
  mem0 = model.memory_init[...].astype(model.dtype)  # [M, E]
  m, e = mem0.shape
  length, stride = model.plan.length, model.plan.stride
  dt = mem0.dtype
  return MemoryState(
    memory=jnp.broadcast_to(mem0, (batch, m, e)), bank=jnp.zeros((batch, capacity, m, e), dt),
    count=jnp.zeros((batch,), jnp.int32), written=jnp.zeros((batch,), jnp.int32),
    slot_segment=jnp.full((batch, capacity), -1, jnp.int32),
    tail=jnp.zeros((batch, length - stride, p, e), dt), tail_valid=jnp.zeros((batch, length - stride), bool),
    last_out=jnp.zeros((batch, length * p, e), dt), last_mask=jnp.zeros((batch, length * p), bool),
    frames=jnp.zeros((batch,), jnp.int32),
  )


def frame_tokens(model, frames: jax.Array) -> jax.Array:
  """frames [B, F, H, W, 3] -> per-frame tokens [B, T, P, E]: the model's own `MemoryBridgeLM.frame_tokens`
  (tubelet embedding, (row, col) embedding, per-frame blocks), the tokens `segment_inputs` cuts into segments."""
  return model.frame_tokens(frames)


def _evict_slot(state_bank, count, written, slot_segment, m_new, eviction: str) -> jax.Array:
  """int32 [B]: the bank slot the new memory m_new [B, M, E] goes to (see the module docstring)."""
  c = state_bank.shape[1]
  if eviction == "fifo":
    return jnp.where(count < c, count, written % c)
  vecs = jnp.concatenate([state_bank.mean(2), m_new.mean(1)[:, None]], axis=1).astype(jnp.float32)  # [B, C+1, E]
  vecs = vecs / jnp.maximum(jnp.linalg.norm(vecs, axis=-1, keepdims=True), 1e-12)
  sim = jnp.einsum("bie,bje->bij", vecs, vecs)
  sim = jnp.where(jnp.eye(c + 1, dtype=bool)[None], -2.0, sim)
  redundancy = sim[:, :c].max(-1)  # [B, C] each stored memory's closest match
  # ties -> the oldest segment: subtract a tiny amount per segment index
  redundancy = redundancy - 1e-6 * slot_segment.astype(jnp.float32) / jnp.maximum(written[:, None], 1)
  return jnp.where(count < c, count, jnp.argmax(redundancy, axis=1).astype(jnp.int32))


def ingest(model, state: MemoryState, frames: jax.Array, *, eviction: str = "fifo") -> MemoryState:
  """Append a chunk of frames [B, F, H, W, 3] (F a multiple of `granularity(model)`) -> the new state."""
  if eviction not in EVICTIONS:
    raise ConfigError(f"memory stream: eviction={eviction!r}; expected {' | '.join(EVICTIONS)}")
  b = frames.shape[0]
  length, stride = model.plan.length, model.plan.stride
  x = frame_tokens(model, frames)  # [B, T, P, E]
  t, p, e = x.shape[1:]
  if t % stride:
    raise ConfigError(f"memory stream chunk: {t} tubelet frames is not a multiple of model.segment_stride={stride}")
  seq = jnp.concatenate([state.tail.astype(x.dtype), x], axis=1)  # [B, L-S+T, P, E]
  seq_valid = jnp.concatenate([state.tail_valid, jnp.ones((b, t), bool)], axis=1)
  k = t // stride
  idx = np.arange(k)[:, None] * stride + np.arange(length)[None, :]  # [K, L] frames of each segment in seq
  tokens = model.segment_tokens(seq[:, idx]).reshape(b, k, length * p, e)  # + slot embedding, segment blocks
  valid = seq_valid[:, idx].all(-1)  # [B, K]: a segment touching the padding before the stream's start is skipped
  token_mask = jnp.broadcast_to(valid[..., None], (b, k, length * p))
  gh, gw = _grid_hw(model, frames.shape)
  jj, hh, ww = np.meshgrid(np.arange(length), np.arange(gh), np.arange(gw), indexing="ij")
  pos = np.stack([jj, hh, ww], -1).reshape(length * p, 3).astype(np.int32)  # within-segment (frame, row, col)
  pos = jnp.broadcast_to(jnp.asarray(pos), (b, length * p, 3))

  def step(bridge, retriever, carry, xs):
    memory, bank, count, written, slot_segment, last_out, last_mask = carry
    tok, mask, ok = xs  # [B, N, E], [B, N], [B]
    m_new, out = bridge(memory, tok, mask & ok[:, None], pos)
    slot = _evict_slot(bank, count, written, slot_segment, m_new, eviction)
    hit = (jnp.arange(bank.shape[1])[None, :] == slot[:, None]) & ok[:, None]  # [B, C]
    bank = jnp.where(hit[..., None, None], m_new[:, None].astype(bank.dtype), bank)
    slot_segment = jnp.where(hit, written[:, None], slot_segment)
    count = jnp.minimum(count + ok.astype(jnp.int32), bank.shape[1])
    written = written + ok.astype(jnp.int32)
    m_read = retriever(m_new, bank, count)
    memory = jnp.where(ok[:, None, None], m_read, memory)
    last_out = jnp.where(ok[:, None, None], out, last_out)
    last_mask = jnp.where(ok[:, None], mask, last_mask)
    return (memory, bank, count, written, slot_segment, last_out, last_mask), None

  scanned = nnx.scan(step, in_axes=(None, None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  carry = (state.memory, state.bank, state.count, state.written, state.slot_segment, state.last_out,
           state.last_mask)
  xs = (jnp.swapaxes(tokens, 0, 1), jnp.swapaxes(token_mask, 0, 1), jnp.swapaxes(valid, 0, 1))
  (memory, bank, count, written, slot_segment, last_out, last_mask), _ = scanned(model.bridge, model.retriever, carry, xs)
  keep = length - stride
  return MemoryState(
    memory=memory, bank=bank, count=count, written=written, slot_segment=slot_segment,
    tail=seq[:, seq.shape[1] - keep:].astype(state.tail.dtype), tail_valid=seq_valid[:, seq.shape[1] - keep:],
    last_out=last_out, last_mask=last_mask, frames=state.frames + t,
  )


def _grid_hw(model, frames_shape) -> tuple[int, int]:
  _, th, tw = model.tubelet
  return frames_shape[2] // th, frames_shape[3] // tw


def bank_view(model, state: MemoryState) -> tuple[jax.Array, jax.Array]:
  """(bank [B, S, E], bank_valid bool [B, S]) the decoder reads, as `MemoryBridgeLM.memory_bank` builds it from a
  whole video's recurrence: every stored memory, plus the `model.decoder_reads` extras."""
  b, c, m, e = state.bank.shape
  bank = state.bank.reshape(b, c * m, e)
  valid = jnp.repeat(jnp.arange(c)[None, :] < state.count[:, None], m, axis=1)
  if model.decoder_reads == "cache+final":
    bank = jnp.concatenate([bank, state.memory], axis=1)
    valid = jnp.concatenate([valid, jnp.ones((b, m), bool)], axis=1)
  elif model.decoder_reads == "cache+last":
    bank = jnp.concatenate([bank, state.last_out], axis=1)
    valid = jnp.concatenate([valid, state.last_mask], axis=1)
  return bank, valid


def read_logits(model, state: MemoryState, tokens: jax.Array) -> jax.Array:
  """Teacher-forced decoder logits float32 [B, L, V] for tokens int32 [B, L] reading the stream's bank."""
  return model.read(tokens, *bank_view(model, state))
