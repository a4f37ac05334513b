"""The jit'd train / eval steps over any registered model: they call `model.loss(batch)`.

The steps take and return the flat `nnx.State` of (model, optimizer) so that one `jax.jit` with donation
does the whole update; `nnx.merge` inside the trace costs nothing at run time. What a model's `loss` returns is
the registry's contract (vidlm/models/registry.py): sums that add over micro-batches, with `loss_sum` and `weight`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Batch = dict[str, jax.Array]


def random_batch(data_cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch with the data layer's contract (frames, tokens, targets, loss_mask, index, cut_frames) filled with
  random values: for benchmarks and tests that need the real step without the data pipeline. Half the text
  positions carry loss; cut_frames int32 [B, F] lists a few random cuts, padded with -1 (vidlm/data/contract.py)."""
  rng = np.random.default_rng(seed)
  d = data_cfg
  tokens = rng.integers(0, 256, (batch_size, d.text_len), dtype=np.int32)
  batch = {
    "frames": rng.integers(0, 256, (batch_size, d.frames, d.height, d.width, 3), dtype=np.uint8),
    "tokens": tokens,
    "targets": np.roll(tokens, -1, axis=1),
    "loss_mask": (rng.random((batch_size, d.text_len)) < 0.5).astype(np.float32),
  }
  # drawn after the arrays above, so those stay what they were before these keys existed
  cuts = np.full((batch_size, d.frames), -1, np.int32)
  for row in cuts:
    picked = np.sort(rng.choice(np.arange(1, max(d.frames, 2)), size=min(2, d.frames - 1), replace=False))
    row[: picked.size] = picked
  batch["index"] = np.arange(batch_size, dtype=np.int32)
  batch["cut_frames"] = cuts
  return batch


def loss_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`model.loss(batch)` -> (mean loss, sums): kept so callers that take a function (nnx.jit, value_and_grad)
  have one."""
  return model.loss(batch)


def summarise(sums: dict[str, jax.Array], model: nnx.Module | type | None = None) -> dict[str, jax.Array]:
  """Metrics from sums added over micro-batches / batches: the model's `summarise(sums)` when it defines one,
  else `loss` = loss_sum / max(weight, 1) (the registry's contract guarantees those two sums)."""
  own = getattr(model, "summarise", None)
  if own is not None:
    return own(sums)
  return {"loss": sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0)}


def make_train_step(graphdef, grad_accum: int, schedule: optax.Schedule) -> Callable:
  """train_step(state, batch) -> (state, metrics); state = nnx.state((model, optimizer))."""

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model.train()  # NNX training mode (deterministic=False) for this trace only: e.g. VideoLM's random positions
    # differentiate w.r.t. the parameter State as a plain pytree, so micro-batches can run under lax.scan
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def grads_of(params, mb):
      def f(p):
        _, sums = nnx.merge(model_def, p, rest).loss(mb)
        # sum-reduced loss so that micro-batches add up exactly; normalised once below
        return sums["loss_sum"], sums

      (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
      return grads, sums

    if grad_accum == 1:
      grads, sums = grads_of(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        g, s = grads_of(params, mb)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zero = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro))
      (grads, sums), _ = jax.lax.scan(accumulate, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero), micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    step = optimizer.step[...]
    optimizer.update(model, grads)
    metrics = summarise(sums, model)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(step)
    return nnx.state((model, optimizer)), metrics

  return train_step


def make_eval_step(graphdef) -> Callable:
  """eval_step(state, batch) -> metric sums (add them over batches, then `summarise`)."""

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, sums = model.loss(batch)
    return sums

  return eval_step
