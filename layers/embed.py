"""Token embeddings: tubelet patches for video, a lookup table for bytes."""

import jax
import jax.numpy as jnp
from flax import nnx


def to_tubelets(frames: jax.Array, tubelet: tuple[int, int, int]) -> jax.Array:
  """[B, F, H, W, C] -> [B, F/t * H/h * W/w, t*h*w*C], tokens in (t, h, w) raster order."""
  b, f, h, w, c = frames.shape
  tt, th, tw = tubelet
  x = frames.reshape(b, f // tt, tt, h // th, th, w // tw, tw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (f // tt) * (h // th) * (w // tw), tt * th * tw * c)


class TubeletEmbed(nnx.Module):
  """Linear projection of non-overlapping (t, h, w) tubelets of uint8 or float frames."""

  def __init__(self, tubelet, channels: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.tubelet = tuple(tubelet)
    patch = self.tubelet[0] * self.tubelet[1] * self.tubelet[2] * channels
    self.proj = nnx.Linear(
      patch, dim, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("patch", "embed")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
    )

  def __call__(self, frames: jax.Array) -> jax.Array:
    x = frames.astype(jnp.float32)
    if frames.dtype == jnp.uint8:
      x = x / 127.5 - 1.0
    return self.proj(to_tubelets(x, self.tubelet))


class TokenEmbed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.embed = nnx.Embed(
      vocab, dim, dtype=dtype, param_dtype=param_dtype,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
      rngs=rngs,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.embed(tokens)

  def attend(self, x: jax.Array) -> jax.Array:
    return self.embed.attend(x)
