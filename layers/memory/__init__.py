"""Memory-bridge parts (VideoLLaMB-style recurrent video encoder, DESIGN section 5 MemoryBridgeLM):
the conv patch embedding (`stem`), segmentation (`scene`), the bridge layer and retriever (`bridge`), the scanned recurrence (`recurrence`), the
decoder's read of the memory bank (`reader`).
Specification: shared/reference/memory_streaming.md section 2."""

from layers.memory.bridge import BridgeLayer, Retriever, write_cache
from layers.memory.reader import MemoryReader
from layers.memory.recurrence import memory_step, run_segments
from layers.memory.scene import (
  fixed_segments,
  scene_tiling,
  segment_frame_table,
  strided_frame_table,
  strided_segment_count,
)
from layers.memory.stem import ConvStem

__all__ = [
  "BridgeLayer", "ConvStem", "MemoryReader", "Retriever", "fixed_segments", "memory_step", "run_segments", "scene_tiling",
  "segment_frame_table", "strided_frame_table", "strided_segment_count", "write_cache",
]
