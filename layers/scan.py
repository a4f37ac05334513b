"""Stacked layers: build N copies with `nnx.vmap`, apply them with `nnx.scan` (one compiled layer body,
weights stacked on a leading "layers" axis), optionally rematerialised."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Callable | None] = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # recompute everything except the attention kernels' (out, lse): their custom_vjp residuals, tagged in
  # pallas_kernels/ops.py and layers/ring.py. The backward then reruns only the cheap projections, not the
  # attention forward (1 of the 4.5 forward-units of attention work under "full": -19% step time at 1M tokens), for 1 x [tokens, heads, head_dim]
  # (+ fp32 lse) more memory per layer than "full". Paths without a custom_vjp (impl="xla", cuDNN) save nothing.
  "save_attention": jax.checkpoint_policies.save_only_these_names("flash_out", "flash_lse", "ring_out", "ring_lse"),
}


def stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` independently initialised layers with their parameters stacked on axis 0."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs: nnx.Rngs):
    return make_layer(rngs)

  return build(rngs)


def apply(layers: nnx.Module, x, body: Callable, *, remat: str = "none"):
  """x -> body(layer_i, x) for each stacked layer in order, as one `nnx.scan`."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat: unknown policy {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  step = body
  if remat != "none":
    step = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def run(layer, carry):
    return step(layer, carry)

  return run(layers, x)


def apply_with_xs(layers: nnx.Module, carry, xs, body: Callable, *, remat: str = "none"):
  """(carry, xs) -> (carry, ys) with `body(layer_i, carry, xs_i) -> (carry, ys_i)` over the stacked layers:
  per-layer state that is not a weight (a KV cache stacked on axis 0) is scanned in and out beside them."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat: unknown policy {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  step = body
  if remat != "none":
    step = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

  @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(layer, c, x):
    return step(layer, c, x)

  return run(layers, carry, xs)
