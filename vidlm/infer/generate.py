"""Greedy generation with a KV cache: prefill the video + prompt once, then one jitted decode step per token.

Works with any model exposing (DESIGN section 5)
  prefill(frames, prompt, *, prompt_lengths, max_new_tokens) -> (text logits [B, P, V], cache)
  decode_step(token [B], cache) -> (logits [B, V], cache)
(VideoLM today). Rows of a batch may have prompts of different lengths (`prompt_lengths`; the prompt array is
right-padded); each row decodes from its own end and stops at its own EOS. The prefill and the decode step are each
compiled once per (model graph, shapes) and reused across calls; the host only checks "every row done" per step.

`generate_cached` answers a question about what a cache already holds (a stream ingested chunk by chunk with
`VideoLM.extend`, any cache kind): the model's `extend_text(prompt, cache, lengths=)` takes the place of the prefill.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlm.data import tokenizer


@dataclasses.dataclass(frozen=True)
class Generation:
  """tokens int32 [B, max_new_tokens]: the greedy tokens, EOS included, `pad_id` after it; lengths int32 [B]:
  tokens per row up to and including EOS (max_new_tokens when a row never emitted it); logits float32
  [B, max_new_tokens, V] (the logits each token was read from; only with return_logits=True)."""

  tokens: jax.Array
  lengths: jax.Array
  logits: jax.Array | None = None


def _first_token(logits, prompt_lengths, eos_id: int):
  rows = jnp.arange(logits.shape[0])
  last = logits[rows, prompt_lengths - 1]  # [B, V]: the logits of the first answer token
  token = jnp.argmax(last, axis=-1).astype(jnp.int32)
  done = token == eos_id
  return token, done, last, jnp.all(done)


@functools.cache
def _compiled(graphdef, capacity: int, eos_id: int, pad_id: int):
  """The jitted prefill and decode step for one model graph (jit caches compilations per input shapes)."""

  def first(state, frames, prompt, prompt_lengths):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(frames, prompt, prompt_lengths=prompt_lengths, max_new_tokens=capacity)
    return cache, *_first_token(logits, prompt_lengths, eos_id)

  return jax.jit(first), _decode_step(graphdef, eos_id, pad_id)


@functools.cache
def _compiled_cached(graphdef, eos_id: int, pad_id: int):
  """The jitted question append (extend_text) and decode step for one model graph."""

  def first(state, cache, prompt, prompt_lengths):
    model = nnx.merge(graphdef, state)
    logits, cache = model.extend_text(prompt, cache, lengths=prompt_lengths)
    return cache, *_first_token(logits, prompt_lengths, eos_id)

  return jax.jit(first), _decode_step(graphdef, eos_id, pad_id)


@functools.cache
def _decode_step(graphdef, eos_id: int, pad_id: int):
  def step(state, cache, token, done):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode_step(token, cache)  # [B, V]
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)  # a finished row keeps padding (its cache still advances, unread)
    done = done | (nxt == eos_id)
    return cache, nxt, done, logits, jnp.all(done)

  return jax.jit(step, donate_argnums=1)


def _prompt_lengths(prompt, prompt_lengths) -> jax.Array:
  b, p = prompt.shape
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), p, np.int32)
  if isinstance(prompt_lengths, np.ndarray) and (prompt_lengths.min() < 1 or prompt_lengths.max() > p):
    raise ValueError(f"generate: prompt_lengths must lie in [1, {p}] (the prompt width), got {prompt_lengths}")
  return jnp.asarray(prompt_lengths, jnp.int32)


def generate(
  model: nnx.Module,
  frames: jax.Array,
  prompt: jax.Array,
  max_new_tokens: int,
  *,
  prompt_lengths: jax.Array | np.ndarray | None = None,
  eos_id: int = tokenizer.EOS,
  pad_id: int = tokenizer.PAD,
  return_logits: bool = False,
  capacity: int | None = None,
) -> Generation:
  """Greedy decoding: frames [B, F, H, W, 3], prompt int32 [B, P] (right-padded when `prompt_lengths` [B] is
  given, else every row has P tokens) -> `Generation` of up to `max_new_tokens` tokens per row.

  Stops early once every row has emitted `eos_id`. `capacity` (default max_new_tokens) is the cache's room for new
  tokens: a caller decoding batches of varying `max_new_tokens` passes a fixed capacity so the prefill and decode
  step compile once. Call under the model's mesh (`Trainer.activate()`) when the model is sharded; the arrays may
  be global arrays.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  capacity = max_new_tokens if capacity is None else capacity
  if max_new_tokens > capacity:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} exceeds the cache capacity={capacity}")
  prompt_lengths = _prompt_lengths(prompt, prompt_lengths)
  graphdef, state = nnx.split(model)
  first, step = _compiled(graphdef, int(capacity), int(eos_id), int(pad_id))
  return _greedy(step, state, first(state, frames, prompt, prompt_lengths), max_new_tokens, eos_id, pad_id, return_logits)[0]


def generate_cached(
  model: nnx.Module,
  cache,
  prompt: jax.Array,
  max_new_tokens: int,
  *,
  prompt_lengths: jax.Array | np.ndarray | None = None,
  eos_id: int = tokenizer.EOS,
  pad_id: int = tokenizer.PAD,
  return_logits: bool = False,
):
  """Greedy answer to `prompt` int32 [B, P] (right-padded when `prompt_lengths` [B] is given) appended to `cache`
  (a `KVCache` the model filled: a stream of `VideoLM.extend` chunks, any kind) -> (`Generation`, the cache after
  the question and the answer). The input cache is not changed (caches are values): a stream that should not keep
  the question goes on from it. A full cache must have room for P + max_new_tokens more tokens (checked here: a
  jitted write past its capacity would be dropped silently); the evicting kinds have no such limit."""
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if cache.kind == "full":
    need = int(jnp.max(cache.length)) + prompt.shape[1] + max_new_tokens
    if need > cache.max_len:
      raise ValueError(
        f"generate_cached: the full cache holds {cache.max_len} tokens; this question needs {need} "
        "(raise cache.capacity or use an evicting cache kind)"
      )
  prompt_lengths = _prompt_lengths(prompt, prompt_lengths)
  graphdef, state = nnx.split(model)
  first, step = _compiled_cached(graphdef, int(eos_id), int(pad_id))
  start = first(state, cache, prompt, prompt_lengths)
  return _greedy(step, state, start, max_new_tokens, eos_id, pad_id, return_logits)


def _greedy(step, state, start, max_new_tokens: int, eos_id: int, pad_id: int, return_logits: bool):
  """The host loop: decode steps from (cache, first token, done, its logits, all done) -> (Generation, cache)."""
  cache, token, done, logits, all_done = start
  tokens, logit_steps = [token], [logits]
  for _ in range(max_new_tokens - 1):
    if bool(all_done):
      break
    cache, token, done, logits, all_done = step(state, cache, token, done)
    tokens.append(token)
    logit_steps.append(logits)
  n = len(tokens)
  out = jnp.stack(tokens, axis=1)  # [B, n]
  if n < max_new_tokens:
    out = jnp.pad(out, ((0, 0), (0, max_new_tokens - n)), constant_values=pad_id)
  is_eos = out == eos_id
  lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens).astype(jnp.int32)
  all_logits = None
  if return_logits:
    all_logits = jnp.stack(logit_steps, axis=1)
    if n < max_new_tokens:
      all_logits = jnp.pad(all_logits, ((0, 0), (0, max_new_tokens - n), (0, 0)))
  return Generation(out, lengths, all_logits), cache
