"""The memory recurrence over segments: bridge + cache write + retriever, one `nnx.scan` step per segment.

Static shapes: the video is K segments of N tokens (padded to the maximum; `segment_valid` [B, K] and
`token_mask` [B, K, N] say what is real). The carry is (memory [B, M, E], cache [B, K, M, E], count [B]); a padding
segment leaves all three untouched, so a row with any pattern of padding segments gives the result of running its
valid segments alone. The step is rematerialised with a `layers.scan.REMAT_POLICIES` policy, so training
backpropagates through every segment with memory O(K x carry) instead of O(K x activations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.memory.bridge import BridgeLayer, Retriever, write_cache
from layers.scan import REMAT_POLICIES


def memory_step(
  bridge: BridgeLayer, retriever: Retriever, carry: tuple[jax.Array, jax.Array, jax.Array],
  tokens: jax.Array, token_mask: jax.Array, valid: jax.Array, positions: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """One segment. carry (memory [B, M, E], cache [B, S, M, E], count [B]); tokens [B, N, E], token_mask [B, N],
  valid [B] -> (new carry, (memory after this segment [B, M, E], segment outputs [B, N, E])).

  As VideoLLaMB: m_new = bridge(memory, segment); cache[count] = m_new; memory = retriever(m_new, cache)."""
  memory, cache, count = carry
  m_new, out = bridge(memory, tokens, token_mask & valid[:, None], positions)
  cache, count = write_cache(cache, count, m_new, valid)
  m_read = retriever(m_new, cache, count)
  memory = jnp.where(valid[:, None, None], m_read, memory)
  return (memory, cache, count), (memory, out)


def run_segments(
  bridge: BridgeLayer, retriever: Retriever, memory: jax.Array, tokens: jax.Array, token_mask: jax.Array,
  segment_valid: jax.Array, positions: jax.Array | None = None, *, remat: str = "full",
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """Scan the recurrence over K segments.

  memory [B, M, E] (the initial memory, e.g. a learned parameter broadcast over B); tokens [B, K, N, E];
  token_mask [B, K, N] bool; segment_valid [B, K] bool; positions optional [B, K, N, 3] (within-segment RoPE).
  Returns ((final memory [B, M, E], cache [B, K, M, E], count [B]), (memory after each segment [B, K, M, E],
  segment outputs [B, K, N, E])); at a padding segment the per-segment memory repeats the previous one and the
  outputs are zero.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"memory recurrence: unknown remat policy {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  bsz, k, _, _ = tokens.shape
  cache = jnp.zeros((bsz, k, *memory.shape[1:]), memory.dtype)
  count = jnp.zeros((bsz,), jnp.int32)
  xs = (
    jnp.swapaxes(tokens, 0, 1), jnp.swapaxes(token_mask, 0, 1), jnp.swapaxes(segment_valid, 0, 1),
    None if positions is None else jnp.swapaxes(positions, 0, 1),
  )

  def body(bridge, retriever, carry, x):
    return memory_step(bridge, retriever, carry, *x)

  if remat != "none":
    body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

  @nnx.scan(in_axes=(None, None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def scan(bridge, retriever, carry, x):
    return body(bridge, retriever, carry, x)

  carry, (mems, outs) = scan(bridge, retriever, (memory, cache, count), xs)
  return carry, (jnp.swapaxes(mems, 0, 1), jnp.swapaxes(outs, 0, 1))
