"""Attention kernels (GPU Mosaic, TPU pallas_call, CPU interpret) and their fp32 references.

Public API:
  MaskSpec, BlockLayout, TileRelation           mask / block-sparse descriptions (pallas_kernels.layout)
  reference_attention                           fp32 ground truth (pallas_kernels.reference.attention)
  flash_attention, block_sparse_attention       kernels with platform dispatch and custom_vjp (pallas_kernels.ops)
  attention_forward, attention_backward         the raw kernels, for code with its own custom_vjp (ring attention)

The kernel entry points are imported on first use: importing the package (as every layer does for MaskSpec)
must not pull in Pallas and the backend kernel modules.
"""

from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation
from pallas_kernels.reference import attention as reference_attention

__all__ = [
  "BlockLayout",
  "attention_backward",
  "attention_forward",
  "MaskSpec",
  "TileRelation",
  "block_sparse_attention",
  "flash_attention",
  "reference_attention",
]

_LAZY = {"flash_attention", "block_sparse_attention", "attention_forward", "attention_backward"}


def __getattr__(name: str):
  if name in _LAZY:
    from pallas_kernels import ops  # noqa: PLC0415

    return getattr(ops, name)
  raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
