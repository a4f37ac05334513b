"""Loss and the jit'd train / eval steps over an NNX model.

The steps take and return the flat `nnx.State` of (model, optimizer) so that one `jax.jit` with donation
does the whole update; `nnx.merge` inside the trace costs nothing at run time.
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
  """A batch with the data layer's contract (frames, tokens, targets, loss_mask) filled with random values: for
  benchmarks and tests that need the real step without the data pipeline. Half the text positions carry loss."""
  rng = np.random.default_rng(seed)
  d = data_cfg
  tokens = rng.integers(0, 256, (batch_size, d.text_len), dtype=np.int32)
  return {
    "frames": rng.integers(0, 256, (batch_size, d.frames, d.height, d.width, 3), dtype=np.uint8),
    "tokens": tokens,
    "targets": np.roll(tokens, -1, axis=1),
    "loss_mask": (rng.random((batch_size, d.text_len)) < 0.5).astype(np.float32),
  }


def loss_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy on text targets (answers). Returns (mean loss, sums for metrics)."""
  logits = model(batch["frames"], batch["tokens"])  # [B, L, V] float32
  weights = batch["loss_mask"].astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  # an example is exactly right when every weighted position is right (teacher-forced argmax == greedy decode)
  example_exact = jnp.all((correct > 0) | (weights == 0), axis=-1).astype(jnp.float32)
  sums = {
    "loss_sum": jnp.sum(xent * weights),
    "weight": jnp.sum(weights),
    "correct": jnp.sum(correct * weights),
    "exact": jnp.sum(example_exact),
    "examples": jnp.asarray(weights.shape[0], jnp.float32),
  }
  return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums


def _summarise(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  w = jnp.maximum(sums["weight"], 1.0)
  return {
    "loss": sums["loss_sum"] / w,
    "token_accuracy": sums["correct"] / w,
    "exact_match": sums["exact"] / jnp.maximum(sums["examples"], 1.0),
  }


def make_train_step(graphdef, grad_accum: int, schedule: optax.Schedule) -> Callable:
  """train_step(state, batch) -> (state, metrics); state = nnx.state((model, optimizer))."""

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    # differentiate w.r.t. the parameter State as a plain pytree, so micro-batches can run under lax.scan
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def grads_of(params, mb):
      def f(p):
        _, sums = loss_fn(nnx.merge(model_def, p, rest), mb)
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
    metrics = _summarise(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(step)
    return nnx.state((model, optimizer)), metrics

  return train_step


def make_eval_step(graphdef) -> Callable:
  """eval_step(state, batch) -> metric sums (add them over batches, then `summarise`)."""

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, sums = loss_fn(model, batch)
    return sums

  return eval_step


summarise = _summarise
