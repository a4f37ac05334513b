"""`vidlm bench stream`: streaming ingest frames/s, question-to-first-token latency and device memory of a ~1B
VideoLM at 256 tokens a frame, after 1k, 10k and 100k frames, for each KV cache kind (issue 13 item 6).

  vidlm bench stream --out benchmarks/stream_h200.json                      # the GPU run (~1B, bf16)
  vidlm bench stream --size tiny --frames 10,100 --chunks 2 --out x.json    # the CPU test's path

Model: VideoLM, embed 2048, 20 layers, 16 heads (4 kv heads) of 128, SwiGLU 5632 (~0.95B parameters), bf16,
RANDOM weights (throughput and memory do not depend on them), 256x256 frames in 16x16 tubelets = 256 tokens a frame.

What "after N frames" means: a stream cache's shapes are fixed by its spec, so for the evicting kinds the cost of
one more chunk depends on N only through counters (how far the ring turned, which store blocks are valid). The
bench therefore fast-forwards an empty cache to N frames (length, frame count, positions' top, mask index set as N
frames of ingest leave them; the buffer and store contents stay zeros) and then ingests `--chunks` real chunks of
`--chunk` frames, timed after one compiling warm-up chunk. Ingesting 100k frames for real would take > 50 min at
the issue's 30 frames/s target; the fast-forward is what makes 1k / 10k / 100k fit one run. The full cache is the
anchor: its capacity is N frames + the timed chunks + a question, so its memory and per-chunk cost grow with N; a
full cache predicted larger than the device's memory is recorded as "does not fit" without allocating.

Per (kind, N): steady ingest frames/s (median chunk), first-token latency (a 16-token question appended to a copy
of the cache, one greedy token read back: `StreamingSession.time_first_token`, median of 3 after a compile), the
cache state's bytes, device bytes in use after the run and the process's peak so far (runs go from the smallest
state to the largest, so the peak is this run's or an earlier smaller one's). `--max-seconds` stops starting new
runs once the budget is spent (recorded as skipped). One JSON line per run on stdout; everything in --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from vidlm.cli import UsageParser, int_list

SIZES = {  # embed, layers, heads, kv heads, head_dim, mlp, frame side, tubelet side
  "1b": (2048, 20, 16, 4, 128, 5632, 256, 16),
  "tiny": (64, 2, 4, 2, 16, 128, 32, 16),
}
KINDS = ("sink_window", "block_retrieval", "full")


def _config(size: str, chunk: int):
  from vidlm import config as C  # noqa: PLC0415

  e, layers, heads, kv, hd, mlp, side, tub = SIZES[size]
  cfg = C.Config(name=f"bench_stream_{size}")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = e, layers, heads, kv, hd, mlp
  m.tubelet = (1, tub, tub)
  m.dtype = m.param_dtype = "bfloat16" if size == "1b" else "float32"
  cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.text_len = chunk, side, side, 16
  cfg.attention.kernel = "auto" if size == "1b" else "xla"
  return cfg


def _spec(kind: str, p: int, n: int, args):
  from layers.cache import CacheSpec  # noqa: PLC0415

  if kind == "full":
    return CacheSpec("full", capacity=(n + (args.chunks + 1) * args.chunk) * p + 16 + 16)
  win = args.window_frames * p
  if kind == "sink_window":
    return CacheSpec("sink_window", sink=p, window=win)
  return CacheSpec("block_retrieval", sink=p, window=win, block=p, blocks=args.store_frames, top_k=args.top_k)


def fast_forward(cache, frames: int, tokens_per_frame: int):
  """The cache's counters as `frames` frames of ingest leave them (contents untouched: see the module docstring)."""
  import jax.numpy as jnp  # noqa: PLC0415

  # one new buffer per field: the ingest step donates the state, and two leaves sharing a buffer is an error there
  # ("donate the same buffer twice"; CPU ignores donation, so only a GPU run shows it)
  n = jnp.full_like(cache.length, frames * tokens_per_frame)
  f = jnp.full_like(cache.frames, frames)
  return dataclasses.replace(cache, length=n, frames=f, next_index=jnp.full_like(cache.next_index, frames),
                             top=jnp.maximum(f - 1, cache.top))


def _cache_bytes(spec, cfg, p) -> int:
  m = cfg.model
  itemsize = 2 if m.dtype == "bfloat16" else 4
  per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize + 4 * 4  # k, v + positions, seq index
  return (spec.slots + spec.store_slots) * per_token


def _device_memory() -> dict:
  import jax  # noqa: PLC0415

  try:
    s = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (CPU: no memory stats)
    s = {}
  return {k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def _run(model, cfg, kind: str, n: int, args, p: int) -> dict:
  import numpy as np  # noqa: PLC0415

  from vidlm.infer.streaming import StreamingSession  # noqa: PLC0415

  spec = _spec(kind, p, n, args)
  row = {"kind": kind, "frames": n, "spec": {k: v for k, v in vars(spec).items() if v},
         "predicted_state_GiB": round(_cache_bytes(spec, cfg, p) / 2**30, 3)}
  limit = _device_memory().get("bytes_limit")
  if limit and _cache_bytes(spec, cfg, p) > 0.9 * limit:
    return {**row, "result": f"does not fit: the cache needs {row['predicted_state_GiB']} GiB of "
                              f"{limit / 2**30:.1f} GiB"}
  session = StreamingSession(model, cfg, cache_spec=spec, chunk=args.chunk, max_answer=1)
  session._state = fast_forward(session.raw_state, n, p)  # noqa: SLF001  (the bench's fast-forward, documented)
  session.frames_ingested = n
  rng = np.random.default_rng(0)
  chunk = rng.integers(0, 256, (args.chunk, cfg.data.height, cfg.data.width, 3), dtype=np.uint8)
  t0 = time.perf_counter()
  session.ingest(chunk)  # compiles
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.chunks):
    t0 = time.perf_counter()
    session.ingest(chunk)
    times.append(time.perf_counter() - t0)
  question = "needle digits?"  # 16 tokens with BOS and SEP: data.text_len
  t0 = time.perf_counter()
  session.time_first_token(question)  # compiles
  first_compile_s = time.perf_counter() - t0
  latency = statistics.median(session.time_first_token(question) for _ in range(3))
  mem = _device_memory()
  st = session.stats()
  del session
  return {
    **row, "result": "ok", "ingest_frames_per_s": round(args.chunk / statistics.median(times), 2),
    "chunk_seconds": [round(t, 4) for t in times], "first_token_s": round(latency, 4),
    "state_GiB": round(st["state_bytes"] / 2**30, 4), "state_bytes": st["state_bytes"],
    "device_in_use_GiB": None if mem["bytes_in_use"] is None else round(mem["bytes_in_use"] / 2**30, 3),
    "process_peak_GiB": None if mem["peak_bytes_in_use"] is None else round(mem["peak_bytes_in_use"] / 2**30, 3),
    "compile_s": round(compile_s, 1), "first_token_compile_s": round(first_compile_s, 1),
  }


def main(argv: list[str] | None = None) -> int:
  p = UsageParser(prog="vidlm bench stream", description=__doc__.split("\n\n")[0])
  p.add_argument("--size", choices=tuple(SIZES), default="1b")
  p.add_argument("--frames", type=int_list, default=[1000, 10000, 100000], help="stream lengths to measure at")
  p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated cache kinds (full = the anchor)")
  p.add_argument("--chunk", type=int, default=8, help="frames per ingested chunk")
  p.add_argument("--chunks", type=int, default=4, help="timed chunks per run (after one compiling chunk)")
  p.add_argument("--window-frames", type=int, default=16, help="evicting caches: recent frames kept")
  p.add_argument("--store-frames", type=int, default=1024, help="block_retrieval: store capacity in frames (FIFO)")
  p.add_argument("--top-k", type=int, default=4, help="block_retrieval: frame blocks retrieved per chunk")
  p.add_argument("--max-seconds", type=float, default=200.0, help="start no new run after this many seconds")
  p.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/stream_h200.json)")
  args = p.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  from vidlm import config as C  # noqa: PLC0415

  for k in kinds:
    if k not in KINDS:
      raise C.ConfigError(f"vidlm bench stream: --kinds {k!r}; expected a subset of {','.join(KINDS)}")
  for name in ("chunk", "chunks", "window_frames", "store_frames", "top_k"):
    if getattr(args, name) < 1:
      raise C.ConfigError(f"vidlm bench stream: --{name.replace('_', '-')} must be >= 1")
  if args.chunk > args.window_frames:
    raise C.ConfigError(f"vidlm bench stream: --chunk {args.chunk} exceeds --window-frames {args.window_frames} "
                        "(an evicting cache takes at most a window per append)")
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from vidlm.infer.streaming import tokens_per_frame  # noqa: PLC0415
  from vidlm.models.registry import build_model  # noqa: PLC0415

  start = time.perf_counter()
  cfg = _config(args.size, args.chunk)
  model = build_model(cfg, nnx.Rngs(0))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tpf = tokens_per_frame(cfg)
  result = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform, "size": args.size,
            "params": int(params), "tokens_per_frame": tpf, "weights": "random", "chunk_frames": args.chunk,
            "state_at_N": "fast-forwarded counters, zero contents (module docstring)", "runs": []}
  print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
  order = [(k, n) for k in kinds if k != "full" for n in sorted(args.frames)]
  order += [("full", n) for n in sorted(args.frames) if "full" in kinds]
  for kind, n in order:
    if time.perf_counter() - start > args.max_seconds:
      row = {"kind": kind, "frames": n, "result": f"skipped: --max-seconds {args.max_seconds:g} spent"}
    else:
      try:
        row = _run(model, cfg, kind, n, args, tpf)
      except Exception as e:  # noqa: BLE001  (an out-of-memory run is a result, not the end of the bench)
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
          raise
        row = {"kind": kind, "frames": n, "result": f"does not fit: {text}"}
    row["elapsed_s"] = round(time.perf_counter() - start, 1)
    result["runs"].append(row)
    print(json.dumps(row), flush=True)
    if args.out:  # after every run, so a run cut short by a timeout keeps what it measured
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
  return 0
