"""`vidlm stream`: restore a trained model from its workdir and run a video stream through a `StreamingSession`,
printing each answer as it is asked with the stream's frames/s and memory.

  vidlm stream --config experiments/demo.py --workdir runs/demo --procedural --frames 1024 --needle-at 4 \\
               --ask-at 64,256,1024 --cache block_retrieval
  vidlm stream --config experiments/demo.py --workdir runs/demo --video clip.mp4 --question "what digits?"

--procedural streams a NIAVH video (`vidlm.infer.frame_source.procedural_frames`) and asks its needle question
(the expected answer is printed beside the model's); --video reads a real file with PyAV (an undecodable packet
is reported as one warning line and the stream goes on). Questions are asked after the first chunk that reaches
each --ask-at frame count, and at the end of the stream. Bad flags and missing files are one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from vidlm import config as config_lib


def _parser():
  from vidlm.cli import CONFIG_HELP, UsageParser, int_list  # noqa: PLC0415

  p = UsageParser(prog="vidlm stream", description=__doc__.split("\n\n")[0], epilog=CONFIG_HELP,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="the experiment the model in --workdir was trained with")
  p.add_argument("--workdir", required=True, help="the trained run (its newest checkpoint is restored)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--video", help="a video file (PyAV)")
  src.add_argument("--procedural", action="store_true", help="a procedural NIAVH stream with one needle")
  p.add_argument("--frames", type=int, default=256, help="--procedural: stream length in frames")
  p.add_argument("--needle-at", type=int, default=4, help="--procedural: the needle's first frame")
  p.add_argument("--tier", default="a", help="--procedural: needle tier a | b | c")
  p.add_argument("--seed", type=int, default=0, help="--procedural: which stream")
  p.add_argument("--question", default=None, help="the question (default: the procedural stream's own)")
  p.add_argument("--ask-at", type=int_list, default=[], help="comma-separated frame counts to ask at (and the end)")
  p.add_argument("--cache", default="block_retrieval", choices=("full", "sink_window", "block_retrieval"),
                 help="VideoLM's KV cache kind")
  p.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: the training length)")
  p.add_argument("--max-frames", type=int, default=None,
                 help="full cache capacity / retrieval store size in frames (default: --frames, or 4096 for --video)")
  p.add_argument("--window-frames", type=int, default=None, help="evicting caches: window in frames (default 2x training)")
  p.add_argument("--top-k", type=int, default=None,
                 help="block_retrieval: blocks retrieved per chunk / question (default 4; with --rope-positions cache: "
                      "the rest of a training-length context)")
  p.add_argument("--rope-positions", default="true", choices=("true", "cache"),
                 help="evicting caches: attend keys at their true stream positions, or at positions within the cache "
                      "(StreamingLLM / ReKV; then chunk, window and top-k default to one training-length context)")
  p.add_argument("--score", default="mean", choices=("mean", "mass"), help="block_retrieval: how blocks are scored")
  p.add_argument("--select", default="per_head", choices=("per_head", "shared"),
                 help="block_retrieval: blocks chosen per kv head or once for all heads")
  p.add_argument("--memory-capacity", type=int, default=256, help="memory_bridge: bank size in segments")
  p.add_argument("--eviction", default="fifo", choices=("fifo", "score"), help="memory_bridge: bank eviction")
  p.add_argument("--max-answer", type=int, default=16, help="answer tokens at most")
  return p


def _positive(args) -> None:
  for name in ("frames", "chunk", "max_frames", "window_frames", "top_k", "memory_capacity", "max_answer"):
    v = getattr(args, name)
    if v is not None and v < 1:
      raise config_lib.ConfigError(f"vidlm stream: --{name.replace('_', '-')}={v} must be >= 1")


def main(argv: list[str]) -> int:
  from pathlib import Path  # noqa: PLC0415

  from vidlm.cli import _load, _setup  # noqa: PLC0415

  args, rest = _parser().parse_known_args(argv)
  _positive(args)
  if not Path(args.workdir).is_dir():
    raise config_lib.ConfigError(f"--workdir {args.workdir}: not a directory (train first: vidlm train ...)")
  cfg = _load(args.config, rest)
  from vidlm.infer import frame_source  # noqa: PLC0415

  h, w = cfg.data.height, cfg.data.width
  from vidlm.infer.streaming import training_length_sizes  # noqa: PLC0415

  sized = args.rope_positions == "cache" and args.cache != "full"  # one training-length context (see the helper)
  ctx_chunk, ctx_window, ctx_top_k = training_length_sizes(cfg) if sized else (cfg.data.frames, None, 4)
  chunk = args.chunk or ctx_chunk
  if args.video:
    source = frame_source.video_file_frames(args.video, h, w, chunk)  # a bad file fails here, before model work
    question, expected, total = args.question, None, None
    if not question:
      raise config_lib.ConfigError("vidlm stream --video: pass --question TEXT (what to ask about the video)")
  else:
    source = frame_source.procedural_frames(args.frames, h, w, chunk, needle_frame=args.needle_at, tier=args.tier,
                                            seed=args.seed)
    question, expected, total = args.question or source.question, source.answer, args.frames
  _setup(cfg)
  from vidlm.eval import restore_checkpoint  # noqa: PLC0415
  from vidlm.infer.streaming import StreamingSession, default_cache_spec, is_memory_bridge  # noqa: PLC0415
  from vidlm.train.loop import Trainer  # noqa: PLC0415

  trainer = Trainer(cfg, args.workdir)
  step, _ = restore_checkpoint(trainer, trainer.cfg, args.workdir)
  model = trainer.model
  max_frames = args.max_frames or total or 4096
  spec = None
  if not is_memory_bridge(model):
    spec = default_cache_spec(cfg, args.cache, max_frames=max_frames, chunk=chunk, max_answer=args.max_answer,
                              window_frames=args.window_frames or ctx_window, top_k=args.top_k or ctx_top_k,
                              rope_positions=args.rope_positions, score=args.score, select=args.select)
  # a stream is one row: it runs outside the training mesh (whose batch axes a single row cannot split)
  session = StreamingSession(model, cfg, cache_spec=spec, chunk=chunk, max_answer=args.max_answer,
                             memory_capacity=args.memory_capacity, eviction=args.eviction)
  kind = "memory_bridge" if spec is None else spec.kind
  print(f"streaming {args.video or f'procedural tier {args.tier}, {args.frames} frames, needle at {args.needle_at}'}"
        f" into {kind} ({spec if spec else f'bank of {args.memory_capacity} segments, {args.eviction}'}); "
        f"model step {step}", flush=True)
  pending = sorted(set(args.ask_at))
  dropped = 0
  for frames in source:
    usable = frames.shape[0] - frames.shape[0] % session.granularity
    dropped += frames.shape[0] - usable
    if usable == 0:
      continue
    if session.frames_ingested + usable > max_frames and spec is not None and spec.kind == "full":
      raise config_lib.ConfigError(f"the full cache holds {max_frames} frames (--max-frames); the stream is longer")
    session.ingest(frames[:usable])
    while pending and session.frames_ingested >= pending[0]:
      pending.pop(0)
      _ask(session, question, expected)
  if dropped:
    print(f"note: the last {dropped} frame(s) were not ingested (chunks must be multiples of "
          f"{session.granularity} frames)", flush=True)
  if not args.ask_at or session.frames_ingested > max(args.ask_at):
    _ask(session, question, expected)
  return 0


def _ask(session, question: str, expected: str | None) -> None:
  answer = session.ask(question)
  st = session.stats()
  mem = st["peak_device_bytes"]
  line = {
    "frames": st["frames"], "question": question, "answer": answer,
    **({"expected": expected, "correct": answer == expected} if expected is not None else {}),
    "frames_per_s": round(st["frames_per_s"] or 0.0, 2), "ask_s": round(session.last_ask.get("seconds", 0.0), 3),
    "state_MiB": round(st["state_bytes"] / 2**20, 3),
    "peak_device_MiB": None if mem is None else round(mem / 2**20, 1),
  }
  print(json.dumps(line), flush=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
