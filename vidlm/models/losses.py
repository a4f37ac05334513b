"""Losses shared by the text-answering models: masked next-token cross-entropy on the answer tokens.

Not a model (it registers nothing); VideoLM's `loss` uses it, and so can any model whose output is text logits
over the data layer's `tokens` / `targets` / `loss_mask`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def answer_loss(
  logits: jax.Array, batch: dict[str, jax.Array], *, per_example: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits float32 [B, L, V] against batch targets int32 [B, L] weighted by loss_mask [B, L].

  Returns (mean loss per weighted token, sums). The sums are scalars that add over micro-batches and batches
  (loss_sum, weight, correct, exact, examples), or with `per_example` [B] arrays (prefix, exact, loss_sum,
  weight, correct) for the evaluators that score each example.
  """
  weights = batch["loss_mask"].astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  if per_example:
    correct = jnp.argmax(logits, -1) == batch["targets"]
    leading = jnp.cumprod((correct | (weights == 0)).astype(jnp.float32), axis=-1)  # 1 until the first wrong token
    sums = {
      "prefix": jnp.sum(leading * weights, axis=-1),  # [B] leading answer tokens right (greedy decoding's prefix)
      "exact": jnp.all(correct | (weights == 0), axis=-1).astype(jnp.float32),  # [B]
      "loss_sum": jnp.sum(xent * weights, axis=-1),  # [B]
      "weight": jnp.sum(weights, axis=-1),  # [B]
      "correct": jnp.sum(correct.astype(jnp.float32) * weights, axis=-1),  # [B]
    }
    return jnp.sum(sums["loss_sum"]) / jnp.maximum(jnp.sum(sums["weight"]), 1.0), sums
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


def summarise_answer(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Metrics from summed `answer_loss` sums: loss per answer token, token accuracy, exact match per example."""
  w = jnp.maximum(sums["weight"], 1.0)
  return {
    "loss": sums["loss_sum"] / w,
    "token_accuracy": sums["correct"] / w,
    "exact_match": sums["exact"] / jnp.maximum(sums["examples"], 1.0),
  }
