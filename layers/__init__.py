"""Flax NNX building blocks, no training code.

The attention entry every model calls is `layers.attention.attention` (import it from the submodule: the package
deliberately does not re-export the function, which would shadow the `layers.attention` module).
Public API here: Attention, KERNELS, Ring, DecoderBlock, KVCache, RMSNorm, SwiGLU, TubeletEmbed, TokenEmbed; ring
attention is `layers.ring.ring_attention`.
"""

from layers.attention import KERNELS, Attention, Ring
from layers.block import DecoderBlock
from layers.cache import KVCache
from layers.embed import TokenEmbed, TubeletEmbed
from layers.mlp import SwiGLU
from layers.norm import RMSNorm

__all__ = ["KERNELS", "Attention", "Ring", "DecoderBlock", "KVCache", "RMSNorm", "SwiGLU", "TokenEmbed", "TubeletEmbed"]
