"""A convolutional patch embedding (a "conv stem", Xiao et al. 2021): frames -> one token per p x p patch, the
same token grid and order as `layers.embed.TubeletEmbed((1, p, p))`, but computed by a few small strided 3x3
convolutions instead of one linear map of each patch.

Why: the linear map sees a small pattern (the NIAVH tier (b) code's 1-px 3x5 digits, tier (c)'s 5-px marker) at
one of p*p offsets inside its patch, or cut across two to four patches, and has to learn each offset on its own;
measured on the demo task (experiments/memory_bridge.py), a probe with a linear 8x8 patch embedding memorised its
4,096 training frames and stayed at chance on held-out ones, while the same probe with this stem read both needles
(>= 99 % held out). Convolutions share their weights over positions, so what is learnt at one offset holds at all.

Layout: conv 3x3 (3 -> C), then log2(p) - 1 stride-2 conv 3x3 with channels doubling, then a stride-2 conv 2x2 to
the embedding width; GELU between them. Used by MemoryBridgeLM (`model.patch_embed=conv`); the dense VideoLM keeps
TubeletEmbed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def stem_patch_ok(patch: int) -> bool:
  """Whether the stem can make patches of this size: a power of two >= 2 (it halves the resolution per conv)."""
  return patch >= 2 and not patch & (patch - 1)


def stem_downsamplings(patch: int) -> int:
  """log2(patch) for a patch size the stem takes; ValueError otherwise."""
  if not stem_patch_ok(patch):
    raise ValueError(f"conv stem: the patch size must be a power of two >= 2, got {patch}")
  return patch.bit_length() - 1


class ConvStem(nnx.Module):
  """frames uint8/float [B, F, H, W, 3] -> tokens [B, F*(H/p)*(W/p), E] in (frame, row, col) raster order."""

  def __init__(self, patch: int, channels: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    n = stem_downsamplings(patch)
    self.patch, self.dtype = patch, dtype
    init = nnx.initializers.lecun_normal()

    def conv(cin, cout, kernel, stride, out_name=None):
      return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride, padding="SAME" if kernel == 3 else "VALID", dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.with_partitioning(init, (None, None, None, out_name)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (out_name,)), rngs=rngs,
      )

    widths = [channels * 2**i for i in range(n)]  # C, 2C, ... before the last (2x2, stride 2) conv
    convs = [conv(3, widths[0], 3, 1)]
    convs += [conv(widths[i - 1], widths[i], 3, 2) for i in range(1, n)]
    convs.append(conv(widths[-1], dim, 2, 2, "embed"))
    self.convs = nnx.List(convs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    b, f, h, w, c = frames.shape
    x = frames.astype(jnp.float32)
    if frames.dtype == jnp.uint8:
      x = x / 127.5 - 1.0
    x = x.reshape(b * f, h, w, c).astype(self.dtype)
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i < len(self.convs) - 1:
        x = jax.nn.gelu(x)
    return x.reshape(b, f * (h // self.patch) * (w // self.patch), x.shape[-1])
