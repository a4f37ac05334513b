"""KV caches for decoding and streaming (DESIGN section 7): static-shape pytrees a jitted prefill / append / decode
step carries, whatever the stream length.

  `CacheSpec` (spec.py)  which kind (full | sink_window | block_retrieval) and its sizes; the slot arithmetic.
  `KVCache`   (kv.py)    the arrays, the once-per-append metadata step (`record` / `advance`) and the per-layer
                         steps the attention layer calls (`context`, `append`; `write_prefix` for a full prefill).

RoPE convention (all kinds): keys are cached AFTER RoPE, rotated by each token's TRUE (t, h, w) position, which the
cache also keeps (`positions`). Positions are data for video (3D RoPE, dropped tokens, offsets), so a slot's key
never depends on which slot the ring put it in or how many tokens were evicted before it. What a query attends them
at is `CacheSpec.rope_positions`: "true" (default) as stored, a query attending the kept tokens exactly as full
attention restricted to them would (tests/layers/test_cache_streaming.py); "cache" (StreamingLLM, ReKV) at positions
WITHIN the cache: the frames / text tokens missing from the context are cut out of the timeline (keys re-rotated at
attention time, kv.py), so sinks + retrieved blocks + window + chunk read as one contiguous video, and a model
trained on short videos sees in-distribution positions however long the stream (tested against plain attention
at the renumbered positions; with nothing evicted both conventions give the full cache's logits).
"""

from layers.cache.kv import HIDDEN, LAYER_FIELDS, KVCache
from layers.cache.spec import KINDS, CacheSpec

__all__ = ["HIDDEN", "KINDS", "LAYER_FIELDS", "CacheSpec", "KVCache"]
