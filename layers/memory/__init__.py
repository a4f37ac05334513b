"""Memory-bridge parts (VideoLLaMB-style recurrent video encoder, DESIGN section 5 MemoryBridgeLM):
segmentation (`scene`), the bridge layer and retriever (`bridge`), the scanned recurrence (`recurrence`).
Specification: shared/reference/memory_streaming.md section 2."""

from layers.memory.bridge import BridgeLayer, Retriever, write_cache
from layers.memory.recurrence import memory_step, run_segments
from layers.memory.scene import fixed_segments, scene_tiling, segment_frame_table

__all__ = [
  "BridgeLayer", "Retriever", "fixed_segments", "memory_step", "run_segments", "scene_tiling", "segment_frame_table",
  "write_cache",
]
