"""Block selection -> `BlockLayout` (DESIGN section 6): one module per method, built on device under jit.

  static      sinks + local window + per-frame global blocks (fixed, video-aware)      layers/sparse/static.py
  moba        mean-pooled key gate, top-k kv blocks, own block kept                    layers/sparse/moba.py
  xattention  antidiagonal scores at stride S, cumulative threshold tau per row         layers/sparse/xattention.py
  vmoba       1D / 2D / 3D video chunks cycling by layer, min-max-normalised threshold  layers/sparse/vmoba.py

`make_selector(config, num_layers=..., video_grid=...)` turns an `attention.sparsity` section into the
`select(q, k, mask, layer_index)` callable the `Attention` layer takes; `check_params` is the same section's
validation (one line naming the field), which vidlm's config validation raises as a ConfigError.
"""

from __future__ import annotations

from typing import Any

from layers.sparse.common import Selector
from layers.sparse.moba import MobaSelector
from layers.sparse.static import StaticSelector
from layers.sparse.vmoba import VMobaSelector
from layers.sparse.xattention import XAttentionSelector

METHODS: tuple[str, ...] = ("none", "static", "moba", "xattention", "vmoba")
# the parameters each method reads from the section (the rest of the section is ignored by that method)
PARAMS: dict[str, tuple[str, ...]] = {
  "none": (),
  "static": ("sinks", "window", "frame_globals"),
  "moba": ("top_k",),
  "xattention": ("stride", "tau", "max_kv_blocks"),
  "vmoba": ("chunk_frames", "chunk_bands", "threshold", "top_k"),
}

__all__ = [
  "METHODS", "PARAMS", "MobaSelector", "Selector", "StaticSelector", "VMobaSelector", "XAttentionSelector",
  "check_params", "dense_layers", "make_selector",
]


def check_params(config: Any, *, prefix: str = "config.attention.sparsity.") -> str | None:
  """Why this sparsity section is invalid (one line naming the field), or None. Shapes are checked at call time
  and by vidlm/attention_calls.py (lengths vs blocks, frame size vs block_kv)."""
  method = config.method
  if method not in METHODS:
    return f"{prefix}method={method!r}: unknown; expected {' | '.join(METHODS)}"
  if config.block_q < 1 or config.block_kv < 1:
    return f"{prefix}block_q/block_kv: must be positive, got {config.block_q}/{config.block_kv}"
  positive = {"top_k", "stride", "max_kv_blocks", "chunk_frames", "chunk_bands"}
  non_negative = {"sinks", "window", "frame_globals"}
  for name in PARAMS[method]:
    value = getattr(config, name)
    if name in positive and value < 1:
      return f"{prefix}{name}={value}: must be >= 1 for method={method}"
    if name in non_negative and value < 0:
      return f"{prefix}{name}={value}: must be >= 0 for method={method}"
    if name == "tau" and not 0.0 < value <= 1.0:
      return f"{prefix}tau={value}: must be in (0, 1] (the share of each row's score mass kept)"
    if name == "threshold" and not 0.0 <= value <= 1.0:
      return f"{prefix}threshold={value}: must be in [0, 1] (gates are min-max normalised)"
  if method == "xattention" and (config.block_q % config.stride or config.block_kv % config.stride):
    return f"{prefix}stride={config.stride}: must divide block_q={config.block_q} and block_kv={config.block_kv}"
  return None


def make_selector(
  config: Any, *, num_layers: int, video_grid: tuple[int, int, int] | None = None
) -> Selector | None:
  """The selector for an `attention.sparsity` section (None for method="none": the layer stays dense).

  config: any object with the section's fields (vidlm.config.SparsityConfig). num_layers resolves dense_layers
  ("first", "last", negative indices). video_grid: (frames, height, width) of the video in tokens, which
  static (per-frame blocks) and vmoba (video chunks) need; the frame size must match the frame-causal mask's.
  """
  why = check_params(config)
  if why is not None:
    raise ValueError(why)
  if config.method == "none":
    return None
  dense = frozenset(dense_layers(config.dense_layers, num_layers))
  grid = None if video_grid is None else tuple(int(x) for x in video_grid)
  base = dict(block_q=config.block_q, block_kv=config.block_kv, dense_layers=dense)
  if config.method == "static":
    return StaticSelector(
      **base, sinks=config.sinks, window=config.window, frame_globals=config.frame_globals, video_grid=grid
    )
  if config.method == "moba":
    return MobaSelector(**base, top_k=config.top_k)
  if config.method == "xattention":
    return XAttentionSelector(**base, stride=config.stride, tau=config.tau, max_kv_blocks=config.max_kv_blocks)
  return VMobaSelector(
    **base, video_grid=grid, chunk_frames=config.chunk_frames, chunk_bands=config.chunk_bands,
    threshold=config.threshold, top_k=config.top_k,
  )


def dense_layers(entries, num_layers: int) -> set[int]:
  """Layer indices named by `attention.sparsity.dense_layers` (ints, negative from the end, or first/last)."""
  out = set()
  for entry in entries:
    e = str(entry).strip()
    if e in ("first", "last"):
      out.add(0 if e == "first" else num_layers - 1)
      continue
    try:
      i = int(e)
    except ValueError:
      raise ValueError(f"config.attention.sparsity.dense_layers: {entry!r} is not a layer index or first/last") from None
    if not -num_layers <= i < num_layers:
      raise ValueError(f"config.attention.sparsity.dense_layers: layer {i} is out of range for {num_layers} layers")
    out.add(i % num_layers)
  return out
