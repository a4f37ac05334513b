"""Per-example scoring of NIAVH examples with the trained model: teacher-forced (one forward pass per batch) or
by real greedy generation (prefill + cached decode, `vidlm.infer.generate`).

Teacher-forced exact match is read off the forward's logits: an example is right when the argmax at every answer
position (answer bytes and the EOS after them) equals the target. That is the verdict of greedy decoding, since
greedy decoding first departs from the answer at the first position whose argmax is wrong (memory_streaming.md
section 3: greedy, exact match, no judge). `Scorer.generate` checks it by decoding for real: both report `prefix`,
the number of leading answer tokens matched, which must agree example by example (ties aside).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from vidlm.data import contract, tokenizer
from vidlm.train.loop import Trainer, gather_to_host, global_batch

SCORE_KEYS = ("exact", "loss_sum", "weight", "correct", "prefix")
GENERATE_KEYS = ("exact", "prefix")


def _make_score_fn(graphdef):
  def score(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, sums = model.loss(batch, per_example=True)  # [B] each: the model's own loss (VideoLM: losses.answer_loss)
    return {k: sums[k] for k in SCORE_KEYS}

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

  def _batches(self, examples: Sequence[dict], arrays):
    """Yield (n real rows, global batch) over fixed-size batches; `arrays(example) -> dict of np arrays`."""
    if not examples:
      raise ValueError("Scorer: no examples to score")
    b, pc, pi = self.batch_size, jax.process_count(), jax.process_index()
    local = b // pc
    for start in range(0, len(examples), b):
      chunk = list(examples[start : start + b])
      n = len(chunk)
      chunk += [chunk[0]] * (b - n)  # pad: same shapes, rows dropped below
      mine = [arrays(ex) for ex in chunk[pi * local : (pi + 1) * local]]
      batch = {k: np.stack([ex[k] for ex in mine]) for k in mine[0]}
      yield n, global_batch(self.trainer.mesh, batch)

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Teacher-forced: per-example float arrays [N] for SCORE_KEYS."""
    out = {k: [] for k in SCORE_KEYS}
    with self.trainer.activate():
      for n, batch in self._batches(examples, contract.model_example):  # the arrays a training batch holds
        sums = self._score(self.trainer.state, batch)
        for k in SCORE_KEYS:
          out[k].append(gather_to_host(sums[k])[:n])
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}

  def generate(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """By greedy generation: per-example float arrays [N] for GENERATE_KEYS (`exact`: the generated tokens up to
    and including EOS equal the answer + EOS; `prefix`: leading answer tokens generated right).

    The prompt is each example's tokens up to its SEP (the answer is never shown); the cache holds video + the
    text width + as many new tokens, so every length compiles one prefill and one decode step, and decoding
    stops once every row emitted EOS or the batch's longest answer is generated.
    """
    from vidlm.infer import generate  # noqa: PLC0415

    model = self.trainer.model
    out = {k: [] for k in GENERATE_KEYS}
    with self.trainer.activate():
      for n, batch in self._batches(examples, _generation_arrays):
        answers = gather_to_host(batch["answer"])  # [B, L] answer + EOS, PAD after
        lens = (answers != tokenizer.PAD).sum(axis=1)
        width = batch["prompt"].shape[1]
        gen = generate(model, batch["frames"], batch["prompt"], int(lens.max()), prompt_lengths=batch["prompt_len"],
                       capacity=width)
        got = gather_to_host(gen.tokens)  # [B, max answer]
        steps = got.shape[1]
        same = got == answers[:, :steps]
        valid = np.arange(steps)[None, :] < lens[:, None]
        prefix = (np.cumprod(same | ~valid, axis=1) * valid).sum(axis=1)
        out["prefix"].append(prefix[:n])
        out["exact"].append((prefix == lens)[:n])
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def _generation_arrays(ex: dict) -> dict[str, np.ndarray]:
  """frames; prompt int32 [L] (tokens through SEP, PAD after); prompt_len; answer int32 [L] (answer + EOS, PAD
  after) read off the teacher-forcing arrays, so both scorings grade the same answer."""
  tokens, targets, w = np.asarray(ex["tokens"]), np.asarray(ex["targets"]), np.asarray(ex["loss_mask"]) > 0
  sep = np.flatnonzero(tokens == tokenizer.SEP)
  if not sep.size or not w.any():
    raise ValueError("Scorer.generate: an example without a SEP-terminated prompt and an answer")
  plen = int(sep[0]) + 1
  prompt = np.full_like(tokens, tokenizer.PAD)
  prompt[:plen] = tokens[:plen]
  answer = np.full_like(tokens, tokenizer.PAD)
  answer[: int(w.sum())] = targets[w]
  return {"frames": np.asarray(ex["frames"]), "prompt": prompt, "prompt_len": np.int32(plen), "answer": answer}


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
