"""Byte-level tokenizer shared by the data pipeline, the model and the evaluators.

Byte ids keep the vocabulary tiny (260) and make every string round-trip exactly, which is all a needle task with
short codes and short captions needs; there is nothing to train and nothing to download.
"""

from collections.abc import Iterable

import numpy as np

PAD = 256
BOS = 257
EOS = 258
SEP = 259
VOCAB_SIZE = 260
SPECIALS = frozenset((PAD, BOS, EOS, SEP))


def encode(text: str) -> list[int]:
  """UTF-8 bytes of `text` as ids 0..255 (no specials added)."""
  return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
  """Inverse of `encode`; special ids are dropped and invalid UTF-8 is replaced rather than raising, because
  model samples can contain any byte sequence."""
  return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def prompt_ids(question: str) -> list[int]:
  """[BOS] + question bytes + [SEP]: the prefix a model is given before it generates the answer."""
  return [BOS, *encode(question), SEP]


def qa_arrays(question: str, answer: str, text_len: int) -> dict[str, np.ndarray]:
  """Teacher-forcing arrays for one question/answer pair.

  tokens    int32 [L] = [BOS] + question + [SEP] + answer + [EOS] + PAD...
  targets   int32 [L] = tokens shifted left by one, PAD at the end
  loss_mask float32 [L] = 1.0 exactly where targets is an answer byte or the EOS after it, so the loss scores
            the answer only (the question is given, not predicted).
  Raises ValueError naming `data.text_len` when the pair does not fit, rather than silently cutting the answer.
  """
  ids = [*prompt_ids(question), *encode(answer), EOS]
  if len(ids) > text_len:
    raise ValueError(
      f"data.text_len={text_len} is too short for question {question!r} + answer {answer!r} "
      f"(needs {len(ids)} tokens incl. BOS/SEP/EOS)"
    )
  tokens = np.full((text_len,), PAD, np.int32)
  tokens[: len(ids)] = ids
  return arrays_from_tokens(tokens)


def arrays_from_tokens(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """targets and loss_mask [L] derived from padded tokens [L] (the SEP..EOS span), so records store tokens only."""
  tokens = np.asarray(tokens, np.int32)
  targets = np.full_like(tokens, PAD)
  targets[:-1] = tokens[1:]
  loss_mask = np.zeros(tokens.shape, np.float32)
  sep = np.flatnonzero(tokens == SEP)
  eos = np.flatnonzero(tokens == EOS)
  if sep.size and eos.size and eos[0] > sep[0]:
    # targets[i] = tokens[i + 1], so the answer bytes and EOS (tokens[sep+1 .. eos]) are targets[sep .. eos-1].
    loss_mask[sep[0] : eos[0]] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def answer_from_arrays(targets: np.ndarray, loss_mask: np.ndarray) -> str:
  """The answer string a batch row teaches (targets under the loss mask, EOS dropped)."""
  return decode(np.asarray(targets)[np.asarray(loss_mask) > 0])
