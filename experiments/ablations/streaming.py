"""Streaming NIAVH (issue 13 item 4): a needle early in a stream, asked after 1x, 8x, 32x and 128x the training
length, for every VideoLM KV cache kind and for the memory bridge; accuracy, frames/s and memory in one table.

Command:  vidlm sweep --config experiments/ablations/streaming.py --workdir runs/ablate_streaming
          (`--variants dense_random` for a subset; rerunning skips the finished variants)
Hardware: any CPU; each variant trains from scratch (the demo's recipe; dense_random 3x its steps; the memory
          bridge its own recipe), then runs the `niavh_stream` evaluator (vidlm/eval/stream.py), which streams
          10 procedural videos per length as one batch through `StreamingSession`: the dense variants into a full,
          a sink+window and a block-retrieval cache, the memory bridge into its bounded bank.
Expected: at 1x every cache holds the whole video, so the kinds agree. Beyond, sink+window (16 frames) has lost the
          early needle and is at chance; retrieval and the full cache keep it, and answer only as well as the model
          handles the positions a long stream puts the question at: the plain demo never saw a text position past
          40 and fails at 8x whatever the cache, dense_random (frame positions drawn from [0, 1024) in training)
          is the one whose cache choice shows. With positions within the cache (dense_cache_positions) the plain
          demo's question always sees a training-length video, so retrieval answers at any length while
          sink+window, whose 8 frames no longer hold the needle, fails. docs/streaming.md has the measured table.
Variant:  :smoke, seconds-long (4 training steps, 1x and 2x, 2 streams), to check the path.

Variants: dense (experiments/demo.py), dense_cache_positions (the same model and recipe, streamed with
eval.stream_rope_positions=cache: the evicting caches' context at positions within the cache, sized to one
training-length video: frame 0 + 3 retrieved frames + a 4-frame window; retrieval scored by mean key, per kv
head), dense_random (train_positions=random up to 1024 frames, 360 steps: the
long_context ablation's dense_random_long), memory_bridge (experiments/memory_bridge.py's model and recipe,
fixed segments; the stream keeps a bank of 1024 segments, FIFO).
"""

from __future__ import annotations

from experiments.ablations.long_context import _memory_bridge
from experiments.demo import get_config as demo_config
from vidlm.config import Config, unknown_variant

VARIANTS = (None, "smoke")


def _check(arg: str | None) -> None:
  if arg not in VARIANTS:
    raise unknown_variant(__file__, arg, ("smoke",))


def get_config(arg: str | None = None) -> Config:
  _check(arg)
  cfg = demo_config("smoke" if arg == "smoke" else None)
  cfg.name = "ablate_streaming"
  e = cfg.eval
  e.evaluators, e.tiers = ("niavh_stream",), ("a",)
  e.length_multipliers, e.seeds = ((1, 2), 2) if arg == "smoke" else ((1, 8, 32, 128), 10)
  cfg.checkpoint.every = 0  # only the final checkpoint: the sweep evaluates it
  return cfg


def get_sweep(arg: str | None = None) -> dict[str, dict]:
  """variant -> overrides (applied to get_config(arg))."""
  _check(arg)
  steps = get_config(arg).train.steps
  return {
    "dense": {},
    "dense_cache_positions": {"eval.stream_rope_positions": "cache"},
    "dense_random": {"model.train_positions": "random", "model.max_train_position": 1024, "train.steps": 3 * steps},
    "memory_bridge": _memory_bridge(arg, "fixed"),
  }
