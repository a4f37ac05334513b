"""Flax NNX building blocks, no training code. `attention()` is the one entry every model calls.

Public API: attention, Attention, IMPLS, DecoderBlock, RMSNorm, SwiGLU, TubeletEmbed, TokenEmbed, rope (module),
scan (module); ring attention is `layers.ring.ring_attention` (imported on first use by attention(impl="ring")).
"""

from layers import rope, scan
from layers.attention import IMPLS, Attention, attention
from layers.block import DecoderBlock
from layers.embed import TokenEmbed, TubeletEmbed
from layers.mlp import SwiGLU
from layers.norm import RMSNorm

__all__ = [
  "IMPLS",
  "Attention",
  "DecoderBlock",
  "RMSNorm",
  "SwiGLU",
  "TokenEmbed",
  "TubeletEmbed",
  "attention",
  "rope",
  "scan",
]
