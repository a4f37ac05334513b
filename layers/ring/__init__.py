"""Ring attention over the `seq` mesh axis (context parallelism), split by job:

  layouts.py  token layouts: which original positions each device stores (`token_permutation`)
  plans.py    static hop plans: which sub-blocks each (hop, device) computes under which static mask
  hops.py     per-hop kernels: the `HopKernel` contract the caller hands in, cuDNN / dense hop functions
  sparse.py   block-sparse: the global BlockLayout cut into each hop call's local layout (`local_layout`)
  vjp.py      the ring: custom_vjp forward and backward loops rotating K/V (and dK/dV) with `ppermute`
  api.py      the entry point `ring_attention` (shard_map, mesh axes from the rules table) and `ring_flops`

`from layers import ring; ring.ring_attention(...)` is the usual call; the kernel for each hop comes from the
caller (`layers.attention.hop_kernel`), so nothing here imports the dispatcher in layers/attention.py.
"""

from layers.ring.api import ring_attention, ring_flops
from layers.ring.hops import (
  HopKernel,
  cudnn_hop_backward,
  cudnn_hop_check,
  cudnn_hop_forward,
  dense_hop_backward,
)
from layers.ring.layouts import TOKEN_LAYOUTS, device_chunks, token_permutation
from layers.ring.plans import build_plans

__all__ = [
  "TOKEN_LAYOUTS",
  "HopKernel",
  "build_plans",
  "cudnn_hop_backward",
  "cudnn_hop_check",
  "cudnn_hop_forward",
  "dense_hop_backward",
  "device_chunks",
  "ring_attention",
  "ring_flops",
  "token_permutation",
]
