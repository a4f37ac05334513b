"""Flash attention (forward with lse, backward dQ and dK/dV) for TPU as `pl.pallas_call` kernels.

One kernel family serves dense masks and block-sparse layouts. The kv blocks that a q block visits (and, for
dK/dV, the q blocks that a kv block visits) form a *schedule* handed to the kernel by scalar prefetch:

  range schedule  (no layout)  per major block a contiguous [start, start + count) run of minor blocks,
                  computed on the host by `pallas_kernels.tile_schedule.range_table` (the mask -> tile
                  schedule the GPU kernels share). Every mask kind is a band, so the non-empty tiles of a
                  row (and of a column) are contiguous; the grid's minor extent is the longest run (grid
                  shrinking), so EMPTY tiles are neither computed nor DMA'd. Metadata and host work are
                  O(T / block), fine at a million tokens.
  list schedule   (BlockLayout) per (batch, head, major block) the listed minor blocks, compacted on device
                  (unlisted, duplicate and mask-EMPTY entries dropped, ascending order); padding repeats the
                  last valid entry so the pipeline sees an unchanged block index and issues no DMA.
                  Limits: the whole list is scalar-prefetched, so it must fit SMEM (shard heads, or share the
                  layout across heads, at long lengths); the transposed dK/dV lists are built through an
                  [nQ, nK] block mask and padded to nQ entries, since a traced layout gives no tighter static
                  bound: O(nQ * nK) metadata and grid steps per layout head.

Inside a tile the mask is evaluated from the MaskSpec (`tile_relation` picks the unmasked path for FULL tiles)
plus segment ids; nothing dense is ever built. GQA never repeats K/V: the forward and dQ programs take all G
query heads of a kv head at once (a [G * block_q, D] q tile against one K/V tile, so each K/V tile is fetched
once per group and the MXU sees G times more rows), unless a per-head layout gives each head its own
schedule; dK/dV loop over the group's q heads inside one kv-head program, so the reduction over the group
happens in VMEM and is deterministic.

Shapes follow the attention contract: q [B, T, Hq, D], k/v [B, S, Hkv, D], out [B, T, Hq, D], lse [B, Hq, T]
fp32 (fully-masked rows: out 0, lse -inf). The kernels work in [B, H, T, D] (sequence x head_dim tiles are
what the TPU vector unit wants), so the wrappers transpose once on the way in and out.

On CPU pass `interpret=True` (JAX's grid interpreter: a jitted loop over grid steps that fills outputs with
NaN before running, so an unwritten element cannot pass a test) or a `pltpu.InterpretParams()`.

Modules: `common.py` (TpuFlashConfig, `supports`, in-kernel helpers), `schedule.py` (range and list schedules),
`forward.py`, `backward.py`; this module is the entry point.
"""

from __future__ import annotations

from pallas_kernels.tpu.backward import flash_backward
from pallas_kernels.tpu.common import LANES, TpuFlashConfig, supports
from pallas_kernels.tpu.forward import flash_forward

__all__ = ["LANES", "TpuFlashConfig", "flash_backward", "flash_forward", "supports"]
