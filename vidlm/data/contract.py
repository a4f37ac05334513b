"""The batch contract: one decoded example as the arrays a model receives (DESIGN section 5).

The pipeline's decoder and the evaluators' scorer both build model inputs with `model_example`, so a model sees
the same keys in training and evaluation:

  frames uint8 [F, H, W, 3]; tokens, targets int32 [L]; loss_mask float32 [L]; index int32 [];
  cut_frames int32 [F]: the frames that start a new scene (hard cuts, ascending), padded with NO_FRAME (-1).

A record's cut list has any length (0 .. F-1 cuts), so it is padded to F, a static shape that holds every
possible cut list; a record without one (ingested video, TFDS data) gives all -1, i.e. no cut is known.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NO_FRAME = -1  # padding of frame-index lists
BATCH_KEYS = ("frames", "tokens", "targets", "loss_mask", "index", "cut_frames")


def frame_indices(values: Sequence[int] | np.ndarray, num_frames: int) -> np.ndarray:
  """A list of frame indices -> int32 [num_frames] padded with NO_FRAME; ValueError when one is out of range."""
  values = np.asarray(values, np.int64).reshape(-1)
  if values.size > num_frames or (values.size and (values.min() < 0 or values.max() >= num_frames)):
    raise ValueError(f"frame indices {values.tolist()} do not fit a {num_frames}-frame video")
  out = np.full((num_frames,), NO_FRAME, np.int32)
  out[: values.size] = values
  return out


def model_example(rec: dict) -> dict[str, np.ndarray]:
  """A decoded record or generated example (frames, tokens, targets, loss_mask, optional index / cut_frames and
  metadata) -> the BATCH_KEYS arrays; text metadata (question, answer, tier, source) stays out."""
  frames = np.asarray(rec["frames"], np.uint8)
  return {
    "frames": frames,
    "tokens": np.asarray(rec["tokens"], np.int32),
    "targets": np.asarray(rec["targets"], np.int32),
    "loss_mask": np.asarray(rec["loss_mask"], np.float32),
    "index": np.int32(rec.get("index", -1)),
    "cut_frames": frame_indices(rec.get("cut_frames", ()), frames.shape[0]),
  }
