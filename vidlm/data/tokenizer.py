"""Byte-level tokenizer shared by the data pipeline, the model and the evaluators.

Byte ids keep the vocabulary tiny (260) and make every string round-trip exactly, which is all a needle task with
short codes and short captions needs; there is nothing to train and nothing to download.
"""

from collections.abc import Iterable

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
