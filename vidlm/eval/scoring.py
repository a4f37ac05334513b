"""Per-example scoring of NIAVH examples with the trained model, one forward pass per batch.

Exact match is read off teacher-forced logits: an example is right when the argmax at every answer position
(answer bytes and the EOS after them) equals the target. That is exactly the verdict of greedy decoding, since
greedy decoding first departs from the answer at the first position whose argmax is wrong, so one forward pass
scores an example and no sampling loop is needed (memory_streaming.md section 3: greedy, exact match, no judge).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vidlm.train.loop import Trainer, gather_to_host, global_batch

SCORE_KEYS = ("exact", "loss_sum", "weight", "correct")
_INPUT_KEYS = ("frames", "tokens", "targets", "loss_mask")


def _make_score_fn(graphdef):
  def score(state, batch):
    model, _ = nnx.merge(graphdef, state)
    logits = model(batch["frames"], batch["tokens"])  # [B, L, V]
    w = batch["loss_mask"].astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = jnp.argmax(logits, -1) == batch["targets"]
    return {
      "exact": jnp.all(correct | (w == 0), axis=-1).astype(jnp.float32),  # [B]
      "loss_sum": jnp.sum(xent * w, axis=-1),  # [B]
      "weight": jnp.sum(w, axis=-1),  # [B]
      "correct": jnp.sum(correct.astype(jnp.float32) * w, axis=-1),  # [B]
    }

  return score


class Scorer:
  """Scores lists of examples (dicts with frames [F,H,W,3], tokens/targets/loss_mask [L]) in fixed-size batches.

  Batches are padded to a fixed size (a multiple of the mesh's batch shards and of the process count), so each
  distinct video length compiles once. Every process builds the same example list and feeds its own slice of
  each batch; results are gathered back, so all processes return identical arrays.
  """

  def __init__(self, trainer: Trainer, batch_size: int | None = None):
    self.trainer = trainer
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    unit = int(np.lcm(shards, jax.process_count()))
    want = trainer.cfg.eval.batch_size if batch_size is None else batch_size
    self.batch_size = max(unit, -(-want // unit) * unit)
    self._score = jax.jit(_make_score_fn(trainer.graphdef))

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-example float arrays [N] for SCORE_KEYS."""
    if not examples:
      raise ValueError("Scorer: no examples to score")
    b, pc, pi = self.batch_size, jax.process_count(), jax.process_index()
    local = b // pc
    out = {k: [] for k in SCORE_KEYS}
    with self.trainer.activate():
      for start in range(0, len(examples), b):
        chunk = list(examples[start : start + b])
        n = len(chunk)
        chunk += [chunk[0]] * (b - n)  # pad: same shapes, rows dropped below
        mine = chunk[pi * local : (pi + 1) * local]
        batch = {k: np.stack([np.asarray(ex[k]) for ex in mine]) for k in _INPUT_KEYS}
        sums = self._score(self.trainer.state, global_batch(self.trainer.mesh, batch))
        for k in SCORE_KEYS:
          out[k].append(gather_to_host(sums[k])[:n])
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def summarise(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean loss per answer token, its perplexity, token accuracy and exact match over the scored examples."""
  weight = max(float(scores["weight"].sum()), 1.0)
  loss = float(scores["loss_sum"].sum()) / weight
  return {
    "loss": loss,
    "ppl": float(np.exp(min(loss, 700.0))),
    "token_accuracy": float(scores["correct"].sum()) / weight,
    "exact_match": float(scores["exact"].mean()),
    "examples": int(scores["exact"].size),
  }
