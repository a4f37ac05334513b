"""Token layouts of ring attention: which original positions each device of the ring stores.

One job: map a global sequence onto the ring. The sequence is stored in a permuted order
(`token_permutation`) so that causal work is balanced over the ring; masks stay in ORIGINAL positions:
  contiguous     device r holds chunk r.                          Causal: hop work is a triangle, then full
                                                                  or empty (device N-1 does N-1 full hops).
  zigzag         2N chunks; device r holds chunks r and 2N-1-r.   Causal: every hop is half a block.
  frame_striped  whole frames dealt round robin: device r holds  Causal and frame-causal: every hop is about
                 frames r, r+N, r+2N, ...                         half a block, frames stay intact.
"""

from __future__ import annotations

import numpy as np

TOKEN_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "frame_striped")

# A device's storage: (original_start, length) runs in slot order.
Chunks = list[tuple[int, int]]


def device_chunks(num_tokens: int, ring_size: int, token_layout: str, tokens_per_frame: int = 1) -> list[Chunks]:
  """Per device, the list of (original_start, length) runs it stores, in slot order.

  Raises ValueError (naming the layout and the padding to use) when the tokens do not split evenly.
  """
  n, tpf = num_tokens, tokens_per_frame
  if token_layout not in TOKEN_LAYOUTS:
    raise ValueError(f"ring token_layout {token_layout!r} is not one of {TOKEN_LAYOUTS}")
  if ring_size < 1 or tpf < 1:
    raise ValueError(f"ring: ring_size={ring_size} and tokens_per_frame={tpf} must be >= 1")
  if token_layout == "contiguous":
    if n % ring_size or (n // ring_size) % tpf:
      raise ValueError(
        f"ring token_layout='contiguous': {n} tokens must split into {ring_size} chunks of whole frames "
        f"(tokens_per_frame={tpf})"
      )
    c = n // ring_size
    return [[(r * c, c)] for r in range(ring_size)]
  if token_layout == "zigzag":
    if n % (2 * ring_size) or (n // (2 * ring_size)) % tpf:
      raise ValueError(
        f"ring token_layout='zigzag': {n} tokens must split into 2*{ring_size} chunks of whole frames "
        f"(tokens_per_frame={tpf}); pad the sequence to a multiple of {2 * ring_size * tpf}"
      )
    h = n // (2 * ring_size)
    return [[(r * h, h), ((2 * ring_size - 1 - r) * h, h)] for r in range(ring_size)]
  if n % (tpf * ring_size):
    raise ValueError(
      f"ring token_layout='frame_striped': {n} tokens are not a whole number of frames of {tpf} tokens per "
      f"device ({ring_size} devices); pad to a multiple of {tpf * ring_size}"
    )
  frames_per_device = n // (tpf * ring_size)
  return [[((m * ring_size + r) * tpf, tpf) for m in range(frames_per_device)] for r in range(ring_size)]


def token_permutation(num_tokens: int, ring_size: int, token_layout: str, tokens_per_frame: int = 1) -> np.ndarray:
  """int32 [N]: perm[i] = original position of the token stored at slot i (device r owns slots r*c..(r+1)*c).

  A model applies it once: `x = x[:, perm]`, RoPE positions `positions[perm]`; masks stay in original
  positions (ring_attention knows the layout). Invert outputs with `np.argsort(perm)`.
  Example (MaxText's reorder): 8 tokens, ring 2, zigzag -> [0, 1, 6, 7, 2, 3, 4, 5].
  """
  chunks = device_chunks(num_tokens, ring_size, token_layout, tokens_per_frame)
  return np.concatenate([np.arange(s, s + ln) for dev in chunks for (s, ln) in dev]).astype(np.int32)


__all__ = ["TOKEN_LAYOUTS", "Chunks", "device_chunks", "token_permutation"]
