"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()

    def linear(din, dout, names):
      return nnx.Linear(
        din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(init, names), rngs=rngs,
      )

    self.gate = linear(dim, hidden, ("embed", "mlp"))
    self.up = linear(dim, hidden, ("embed", "mlp"))
    self.down = linear(hidden, dim, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
