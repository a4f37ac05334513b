"""`niavh_stream`: the NIAVH protocol run as a stream (issue 13 item 4; DESIGN section 10).

For each tier in `eval.tiers` and each multiplier in `eval.length_multipliers`, `eval.seeds` procedural streams of
multiplier x data.frames frames (`vidlm.infer.frame_source.procedural_frames`, stream i = index i) carry one needle
EARLY (at frame data.frames // 2, inside the first training-length window); they are ingested in chunks of
2 x data.frames frames through a `StreamingSession`, all streams of a cell as the rows of one batch, and the needle
question is asked once, at the end. Exact match of the greedy answer, as `niavh`.

Streamed into: every KV cache kind for a VideoLM (`vidlm.infer.streaming.default_cache_spec`: sinks = the first
frame, window = 2x the training length, retrieval blocks of one frame with a store as long as the stream, top 4
blocks; the full cache has room for exactly the stream and the question), and the memory-bridge state (a bank of
`STREAM_BANK` segments, FIFO) for MemoryBridgeLM.
With `eval.stream_rope_positions=cache` the evicting caches give their context positions within the cache and are
sized so that what the question attends is one training-length video: sinks = frame 0, window = half the training
length (= the chunk), top_k = the rest (8 frames: 1 + 3 retrieved + 4); retrieval scores blocks by
`eval.stream_score` and chooses them `eval.stream_select` (layers/cache/spec.py). The full cache is unchanged (it
never evicts) and keeps chunks of 2x the training length.
Per cell it records accuracy, the steady-state ingest frames/s (compiling calls excluded), the stream state's
bytes (fixed by construction) and the device's peak memory (None on CPU), in `<workdir>/eval/niavh_stream.json`.
"""

from __future__ import annotations

import json
import time

import numpy as np

from vidlm.eval.registry import EvalContext, register_evaluator

STREAM_BANK = 1024  # memory-bridge bank capacity (segments): more than a 128x demo stream's 511 segments


def _streams(cfg, frames: int, tier: str, seeds: int, chunk: int):
  from vidlm.infer.frame_source import procedural_frames  # noqa: PLC0415

  needle = cfg.data.frames // 2
  return [procedural_frames(frames, cfg.data.height, cfg.data.width, chunk, needle_frame=needle, tier=tier, index=i,
                            segment=min(64, frames))
          for i in range(seeds)]


@register_evaluator("niavh_stream", headline=(("{}/{}x", "accuracy.*.*"),))
def niavh_stream(ctx: EvalContext) -> dict:
  from vidlm.infer.streaming import StreamingSession, default_cache_spec, is_memory_bridge, training_length_sizes  # noqa: PLC0415

  cfg = ctx.cfg
  e = cfg.eval
  model = ctx.trainer.model
  train_frames = cfg.data.frames
  mults = tuple(cfg.eval.length_multipliers)
  seeds = int(cfg.eval.seeds)
  kinds = ("memory_bridge",) if is_memory_bridge(model) else ("full", "sink_window", "block_retrieval")
  cells, accuracy = [], {}
  for kind in kinds:
    for tier in cfg.eval.tiers:
      for mult in mults:
        frames = train_frames * mult
        chunk = min(2 * train_frames, frames)  # = the evicting caches' window: half the appends of 1x chunks
        sizes = {}
        if kind in ("sink_window", "block_retrieval") and e.stream_rope_positions == "cache":
          chunk, window, top_k = training_length_sizes(cfg)
          sizes = dict(window_frames=window, top_k=top_k, rope_positions="cache", score=e.stream_score,
                       select=e.stream_select)
        streams = _streams(cfg, frames, tier, seeds, chunk)
        spec = None if kind == "memory_bridge" else default_cache_spec(cfg, kind, max_frames=frames, chunk=chunk,
                                                                       **sizes)
        session = StreamingSession(model, cfg, cache_spec=spec, batch=seeds, chunk=chunk, memory_capacity=STREAM_BANK)
        start = time.perf_counter()
        for rows in zip(*streams):
          session.ingest(np.stack(rows))
        answers = session.ask([s.question for s in streams])
        correct = [a == s.answer for a, s in zip(answers, streams)]
        st = session.stats()
        cell = {
          "kind": kind, "tier": tier, "multiplier": mult, "frames": frames, "needle_frame": streams[0].needle_frame,
          "chunk": chunk, "accuracy": float(np.mean(correct)), "answers": answers, "expected": [s.answer for s in streams],
          "frames_per_s_per_stream": st["frames_per_s"], "streams": seeds,
          "state_bytes": st["state_bytes"], "peak_device_bytes": st["peak_device_bytes"],
          "ask_seconds": session.last_ask.get("seconds"), "wall_seconds": time.perf_counter() - start,
          "cache": None if spec is None else {k: v for k, v in vars(spec).items() if v},
        }
        cells.append(cell)
        accuracy.setdefault(kind if len(cfg.eval.tiers) == 1 else f"{kind}_{tier}", {})[str(mult)] = cell["accuracy"]
        print(f"niavh_stream {kind} tier {tier} {mult}x ({frames} frames): accuracy {cell['accuracy']:.2f}, "
              f"{(st['frames_per_s'] or 0):.1f} frames/s x {seeds} streams, state {st['state_bytes'] / 2**20:.2f} MiB",
              flush=True)
  result = {"cells": cells, "accuracy": accuracy, "train_frames": train_frames}
  if ctx.is_main:
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "niavh_stream.json").write_text(json.dumps(result, indent=1))
  return result
