"""KV caches for decoding and streaming (DESIGN section 7): static-shape pytrees a jitted prefill / append / decode
step carries, whatever the stream length.

  `CacheSpec` (spec.py)  which kind (full | sink_window | block_retrieval) and its sizes; the slot arithmetic.
  `KVCache`   (kv.py)    the arrays, the once-per-append metadata step (`record` / `advance`) and the per-layer
                         steps the attention layer calls (`context`, `append`; `write_prefix` for a full prefill).

RoPE convention (all kinds): keys are cached AFTER RoPE, rotated by each token's TRUE (t, h, w) position, which the
cache also keeps (`positions`). Positions are data for video (3D RoPE, dropped tokens, offsets), so a slot's key
never depends on which slot the ring put it in or how many tokens were evicted before it: a query attends the kept
tokens exactly as full attention restricted to them would (tests/layers/test_cache_streaming.py). StreamingLLM
instead caches keys before RoPE and re-indexes them by slot, so distances inside the cache never exceed what the
model was trained on; here a query far into a stream sees sinks at their true (large) distance, and a model that
has to generalise to that is the length-generalisation work's concern (model.eval_positions), not the cache's.
"""

from layers.cache.kv import HIDDEN, LAYER_FIELDS, KVCache
from layers.cache.spec import KINDS, CacheSpec

__all__ = ["HIDDEN", "KINDS", "LAYER_FIELDS", "CacheSpec", "KVCache"]
