"""Ring attention (being split by job; this step only moves layers/ring.py to layers/ring/vjp.py)."""

from layers.ring.vjp import (  # noqa: F401
  TOKEN_LAYOUTS,
  HopKernel,
  _build_plans,
  _pack,
  _unpack,
  cudnn_hop_backward,
  cudnn_hop_check,
  cudnn_hop_forward,
  dense_hop_backward,
  ring_attention,
  ring_flops,
  token_permutation,
)
