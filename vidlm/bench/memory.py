"""`vidlm bench memory`: a ~1B-parameter MemoryBridgeLM ingesting long videos at constant memory, against the
dense VideoLM's memory at the same 256 tokens per frame (issue 12 item 6).

What runs (one process, one device, random weights in bf16: throughput and memory do not depend on what the
weights have learnt):
  memory bridge  256x256 frames, 16x16 tubelets (256 tokens per frame); 8 per-frame transformer layers, the bridge
                 and retriever, 5 decoder layers (E 2048, 16 heads x 128, MLP 8192), M = 32 memory tokens,
                 segments of 4 frames every 2. The video is streamed through the recurrence in chunks of
                 `--chunk-frames` frames by `vidlm.infer.memory_stream.ingest`, one jitted step compiled once for
                 every length, its state (memory, bank, count, ...) donated from chunk to chunk. The bank of all
                 memories would grow with the video (K x M x E: 0.7 GB at 10,800 frames, and the retriever's cost
                 per segment with it): it is bounded to `--capacity` segments with FIFO eviction (a ring; the
                 retriever and the decoder read it order-free). `bank_unbounded_gib` in each row says what the
                 unbounded bank would hold. Frames/s = frames / wall time of all chunks (block_until_ready at the
                 end); the same random chunk of frames is fed every time (content does not change the cost).
                 After the last chunk the decoder reads the bank for a 128-token question (`answer_read_ms`).
  dense VideoLM  16 layers of the same width (E 2048, 16 heads x 128, MLP 8192), same frames and tubelets: the
                 forward (text logits) of the whole video in one sequence, flash attention. Its memory at each
                 length is the compiler's estimate (`compiled.memory_analysis()`: arguments + outputs + temporaries
                 - aliased) against the device limit, searched upwards (`--dense-frames`, then `--dense-refine`
                 bisection steps on a `--dense-step` grid), then one real forward at the longest length that fits
                 (frames generated on the device), its measured peak reported.
Peak memory: JAX cannot reset `peak_bytes_in_use`, so the sizes run in increasing order in one process and each
row reports the process peak after it (`peak_gib`, an upper bound of that size's own peak; flat means no size
needed more than the first). The memory-bridge model is freed before the dense one is built; the dense real run's
peak is the process peak after it (the larger of the two, i.e. the dense one, when it exceeds the bridge's).

  vidlm bench memory --out benchmarks/memory_h200.json            # the GPU run (~1B, sizes 60..10,800)
  vidlm bench memory --preset tiny --sizes 12,24 --chunk-frames 12  # CPU smoke (tests/vidlm/test_bench_memory.py)
"""

from __future__ import annotations

import json
import os
import time

from vidlm.cli import UsageParser, int_list

GIB = 2**30
PRESETS = ("1b", "tiny")


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)  # one JSON line per event: a run cut short still leaves its figures


def configs(preset: str, chunk_frames: int):
  """(memory-bridge config, dense VideoLM config) of a preset, validated."""
  from vidlm import config as C  # noqa: PLC0415

  big = preset == "1b"
  side, tub = (256, 16) if big else (32, 8)
  width = dict(embed_dim=2048, num_heads=16, head_dim=128) if big else dict(embed_dim=64, num_heads=2, head_dim=32)
  mlp = 8192 if big else 128
  dt = "bfloat16" if big else "float32"

  def base(name: str) -> C.Config:
    cfg = C.Config(name=f"bench_memory_{name}")
    C.apply_override(cfg, "model.name", name)
    cfg.mesh = C.MeshConfig(data=1, fsdp=1, seq=1, tensor=1)
    d = cfg.data
    d.frames, d.height, d.width, d.text_len = chunk_frames, side, side, 128 if big else 32
    m = cfg.model
    for k, v in width.items():
      setattr(m, k, v)
    m.tubelet, m.dtype, m.param_dtype = (1, tub, tub), dt, dt
    return cfg

  mb = base("memory_bridge")
  m = mb.model
  m.frame_layers, m.bridge_mlp_dim, m.decoder_layers, m.decoder_mlp_dim = (8, mlp, 5, mlp) if big else (1, mlp, 1, mlp)
  m.memory_tokens, m.segment_mode, m.segment_length, m.segment_stride = (32 if big else 4), "fixed", 4, 2
  m.remat = "none"  # forward only
  # the bridge attends over M + L*P = 1,056 tokens and the retriever's queries are the M = 32 memory tokens: lengths
  # the GPU flash kernel does not tile (multiples of 128), and per-segment attention is small: dense XLA, bf16
  mb.attention.kernel = "xla"
  dense = base("video_lm")
  m = dense.model
  m.num_layers, m.num_kv_heads, m.mlp_dim, m.remat = (16 if big else 2), m.num_heads, mlp, "none"
  m.rope_theta = 1_000_000.0
  return C.validate(mb), C.validate(dense)


def _param_count(tree) -> int:
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  return int(sum(x.size for x in jax.tree.leaves(nnx.state(tree, nnx.Param))))


def _stats() -> dict:
  import jax  # noqa: PLC0415

  s = jax.local_devices()[0].memory_stats() or {}
  return {k: s.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def _gib(x) -> float | None:
  return None if x is None else round(x / GIB, 3)


def _build(cfg):
  """The model with random weights, initialised by one jitted program (eagerly, each parameter's init compiles
  and runs on its own)."""
  from flax import nnx  # noqa: PLC0415

  from vidlm.models.registry import build_model  # noqa: PLC0415

  return nnx.jit(lambda: build_model(cfg, nnx.Rngs(0)))()


def _estimate(compiled) -> int | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_memory_bridge(cfg, args) -> dict:
  """Stream each size through the chunked recurrence; one compile for all sizes."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from vidlm.infer import memory_stream  # noqa: PLC0415

  d, m = cfg.data, cfg.model
  t0 = time.perf_counter()
  model = _build(cfg)
  ingest_params = _param_count(model.video_embed) + _param_count(model.bridge) + _param_count(model.retriever)
  ingest_params += m.memory_tokens * m.embed_dim + (_param_count(model.frame_blocks) if m.frame_layers else 0)
  out = {"params": _param_count(model), "ingest_params": ingest_params, "init_s": round(time.perf_counter() - t0, 1),
         "after_init": {k: _gib(v) for k, v in _stats().items()}}
  _emit({"memory_bridge_model": out})
  graphdef, params = nnx.split(model)
  del model
  cap, chunk = args.capacity, args.chunk_frames

  def ingest(params, state, frames):
    return memory_stream.ingest(nnx.merge(graphdef, params), state, frames, eviction="fifo")

  def init(params):
    return memory_stream.init_state(nnx.merge(graphdef, params), 1, cap, frame_shape=(d.height, d.width))

  def answer(params, state, tokens):
    return memory_stream.read_logits(nnx.merge(graphdef, params), state, tokens)

  init_j = jax.jit(init)
  frames = jax.random.randint(jax.random.key(1), (1, chunk, d.height, d.width, 3), 0, 256, jnp.int32)
  frames = frames.astype(jnp.uint8)
  tokens = jax.random.randint(jax.random.key(2), (1, d.text_len), 0, m.vocab_size, jnp.int32)
  state = init_j(params)
  t0 = time.perf_counter()
  step = jax.jit(ingest, donate_argnums=1).lower(params, state, frames).compile()
  read = jax.jit(answer).lower(params, state, tokens).compile()
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  est = _estimate(step)
  out["chunk_step_estimate_gib"] = _gib(est)
  state = jax.block_until_ready(step(params, state, frames))  # warm-up (also touches every buffer once)
  del state
  rows = []
  seg_bytes = m.memory_tokens * m.embed_dim * jnp.dtype(m.dtype).itemsize  # the bank is in the compute dtype
  spent = 0.0
  for size in args.sizes:
    if rows and spent + size / rows[-1]["frames_per_s"] > args.stream_budget:
      row = {"frames": size, "result": f"not run: predicted {size / rows[-1]['frames_per_s']:.1f} s at the last "
             f"size's rate would pass --stream-budget={args.stream_budget:g} s"}
      rows.append(row)
      _emit({"memory_bridge": row})
      continue
    state = init_j(params)
    jax.block_until_ready(state)
    n_chunks = size // chunk
    t0 = time.perf_counter()
    for _ in range(n_chunks):
      state = step(params, state, frames)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    spent += dt
    t1 = time.perf_counter()
    logits = jax.block_until_ready(read(params, state, tokens))
    read_s = time.perf_counter() - t1
    segments = int(state.written[0])
    s = _stats()
    row = {
      "frames": size, "chunks": n_chunks, "segments": segments, "bank_segments": int(state.count[0]),
      "seconds": round(dt, 3), "frames_per_s": round(size / dt, 1), "answer_read_ms": round(1e3 * read_s, 2),
      "peak_gib": _gib(s["peak_bytes_in_use"]), "in_use_gib": _gib(s["bytes_in_use"]),
      "bank_bounded_bytes": cap * seg_bytes, "bank_unbounded_bytes": segments * seg_bytes,
      "bank_bounded_gib": _gib(cap * seg_bytes), "bank_unbounded_gib": _gib(segments * seg_bytes),
      "finite": bool(jnp.isfinite(logits).all()),
    }
    rows.append(row)
    _emit({"memory_bridge": row})
    del state
  out["rows"] = rows
  return out


def _grid(lo: int, hi: int, step: int) -> int | None:
  """A length on the `step` grid strictly between lo and hi, near the middle (None when there is none)."""
  mid = (lo + hi) // 2 // step * step
  return mid if lo < mid < hi else None


def bench_dense(cfg, args, t_start: float) -> dict:
  """Compile-time memory of the dense forward at increasing lengths, then one real run at the longest that fits."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  d, m = cfg.data, cfg.model
  model = _build(cfg)
  out = {"params": _param_count(model)}
  graphdef, params = nnx.split(model)
  del model
  limit = int(args.device_memory_gib * GIB) if args.device_memory_gib else _stats()["bytes_limit"]
  out["device_limit_gib"] = _gib(limit)
  fwd = jax.jit(lambda params, f, t: nnx.merge(graphdef, params)(f, t))
  tok = jax.ShapeDtypeStruct((1, d.text_len), jnp.int32)
  trials: dict[int, dict] = {}
  executables: dict[int, object] = {}  # frames -> the compiled forward (the real run reuses it: no recompile)

  def trial(frames: int) -> dict:
    if time.perf_counter() - t_start > args.time_budget:
      r = {"frames": frames, "result": "not tried (time budget)"}
    else:
      t0 = time.perf_counter()
      try:
        compiled = fwd.lower(params, jax.ShapeDtypeStruct((1, frames, d.height, d.width, 3), jnp.uint8), tok).compile()
        est = _estimate(compiled)
        executables[frames] = compiled
        fits = None if est is None or limit is None else est <= limit
        r = {"frames": frames, "estimate_gib": _gib(est), "fits": fits,
             "result": {True: "fits", False: "does not fit", None: "compiled (no limit known)"}[fits]}
      except Exception as e:  # noqa: BLE001  (a compiler refusal at a huge length is an answer)
        r = {"frames": frames, "fits": False, "result": f"compile failed: {type(e).__name__}: {str(e)[:160]}"}
      r["compile_s"] = round(time.perf_counter() - t0, 1)
    r["tokens"] = frames * (d.height // m.tubelet[1]) * (d.width // m.tubelet[2]) + d.text_len
    trials[frames] = r
    _emit({"dense_trial": r})
    return r

  fit, nofit = 0, None
  for frames in sorted(set(args.dense_frames) | set(args.sizes)):
    if nofit is not None:
      trials[frames] = {"frames": frames, "result": f"not compiled ({nofit} frames already did not fit)"}
      continue
    r = trial(frames)
    if r.get("fits") is False:
      nofit = frames
    elif r.get("fits") or r["result"].startswith("compiled"):
      fit = frames
    else:
      break  # out of time
  for _ in range(args.dense_refine if nofit else 0):
    mid = _grid(fit, nofit, args.dense_step)
    if mid is None:
      break
    r = trial(mid)
    if r.get("fits"):
      fit = mid
    elif r.get("fits") is False:
      nofit = mid
    else:
      break
  out["trials"] = [trials[k] for k in sorted(trials)]
  out["longest_fitting_estimate"], out["first_not_fitting"] = fit or None, nofit
  # one real run at the longest length that fits (stepping down if the allocator disagrees with the estimate)
  fitting = sorted((k for k, r in trials.items() if r.get("fits") or r["result"].startswith("compiled")), reverse=True)
  for frames in fitting[:3]:
    try:
      make = jax.jit(lambda k, n=frames: jax.random.randint(k, (1, n, d.height, d.width, 3), 0, 256, jnp.int32)
                     .astype(jnp.uint8))
      video = make(jax.random.key(3))
      tokens = jax.random.randint(jax.random.key(4), (1, d.text_len), 0, m.vocab_size, jnp.int32)
      t0 = time.perf_counter()
      logits = jax.block_until_ready(executables[frames](params, video, tokens))
      s = _stats()
      out["run"] = {"frames": frames, "seconds": round(time.perf_counter() - t0, 2),
                    "frames_per_s": round(frames / (time.perf_counter() - t0), 1),
                    "peak_gib": _gib(s["peak_bytes_in_use"]), "finite": bool(jnp.isfinite(logits).all())}
      del video, logits
      break
    except Exception as e:  # noqa: BLE001  (out of memory despite the estimate: try the next shorter length)
      out.setdefault("run_failures", []).append({"frames": frames, "error": f"{type(e).__name__}: {str(e)[:200]}"})
  _emit({"dense_run": out.get("run")})
  return out


def table(result: dict) -> str:
  """The printed summary: one row per size, memory bridge measured vs the dense VideoLM's compile-time estimate."""
  mb, dense = result["memory_bridge"], result.get("dense") or {"trials": [], "params": 0}
  est = {t["frames"]: t for t in dense["trials"]}
  ran = [r for r in mb["rows"] if "frames_per_s" in r]
  dense_params = dense["params"]
  first_peak = ran[0]["peak_gib"] if ran else None
  lines = [
    f"memory bridge {mb['params'] / 1e6:,.1f}M params (ingest path {mb['ingest_params'] / 1e6:,.1f}M), dense VideoLM "
    f"{f'{dense_params / 1e6:,.1f}M' if dense_params else 'skipped'}; random weights, {result['dtype']}, {result['tokens_per_frame']} tokens/frame, "
    f"bank bounded to {result['capacity']} segments (FIFO); peak = process peak after each size (increasing order)",
    f"{'frames':>7} {'MB fps':>8} {'MB peak GiB':>12} {'/first':>7} {'bank unbounded GiB':>19} "
    f"{'dense est GiB':>14} {'dense fits':>11} {'dense/MB':>9}",
  ]
  for r in mb["rows"]:
    t = est.get(r["frames"], {})
    d_est = t.get("estimate_gib")
    if "frames_per_s" not in r:
      lines.append(f"{r['frames']:>7} {r['result']}")
      continue
    ratio = f"{d_est / r['peak_gib']:.1f}x" if d_est and r["peak_gib"] else "-"
    flat = f"{r['peak_gib'] / first_peak:.3f}" if r["peak_gib"] and first_peak else "-"
    fits = "-" if not t else ("yes" if t.get("fits") else "no" if t.get("fits") is False else t["result"][:11])
    lines.append(
      f"{r['frames']:>7} {r['frames_per_s']:>8.1f} {_show(r['peak_gib']):>12} {flat:>7} "
      f"{r['bank_unbounded_gib']:>19} {_show(d_est):>14} {fits:>11} {ratio:>9}"
    )
  run = dense.get("run")
  if run:
    peak = max((r["peak_gib"] for r in ran if r["peak_gib"] is not None), default=None)
    vs = f", {run['peak_gib'] / peak:.1f}x the memory bridge's peak" if run["peak_gib"] and peak else ""
    lines.append(f"dense VideoLM: longest fitting video by compile estimate {dense['longest_fitting_estimate']} frames "
                 f"(first not fitting: {dense['first_not_fitting']}); real forward at {run['frames']} frames: peak "
                 f"{_show(run['peak_gib'])} GiB{vs}, {run['frames_per_s']} frames/s")
  elif "dense" in result:
    lines.append(f"dense VideoLM: no real run ({dense.get('run_failures', 'no length fitted')})")
  return "\n".join(lines)


def _show(x) -> str:
  return "-" if x is None else str(x)


def main(argv: list[str] | None = None) -> int:
  from vidlm.config import ConfigError  # noqa: PLC0415

  p = UsageParser(prog="vidlm bench memory")
  p.add_argument("--preset", choices=PRESETS, default="1b", help="1b (the GPU run) | tiny (a CPU smoke)")
  p.add_argument("--sizes", type=int_list, default=[60, 600, 3600, 10800], help="video lengths in frames")
  p.add_argument("--chunk-frames", type=int, default=60, help="frames per jitted ingest step (divides every size)")
  p.add_argument("--capacity", type=int, default=512, help="bank capacity in segments (FIFO eviction)")
  p.add_argument("--dense-frames", type=int_list, default=[600, 3600, 7200, 10800],
                 help="dense VideoLM lengths to compile (with --sizes), increasing until one does not fit")
  p.add_argument("--dense-refine", type=int, default=1, help="bisection steps between the last fit and the first miss")
  p.add_argument("--dense-step", type=int, default=600, help="grid of the bisection, in frames")
  p.add_argument("--device-memory-gib", type=float, default=None,
                 help="memory to test the dense estimates against (default: the allocator's limit)")
  p.add_argument("--time-budget", type=float, default=200.0,
                 help="seconds from start after which no further dense compile is started")
  p.add_argument("--stream-budget", type=float, default=90.0,
                 help="seconds of memory-bridge streaming in all; a size predicted to pass it is skipped (said so)")
  p.add_argument("--skip-dense", action="store_true", help="memory bridge only")
  p.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/memory_h200.json)")
  args = p.parse_args(argv)
  if args.chunk_frames < 2 or args.chunk_frames % 2:
    raise ConfigError(f"--chunk-frames={args.chunk_frames}: must be a positive multiple of the segment stride (2)")
  bad = [s for s in args.sizes if s % args.chunk_frames]
  if bad:
    raise ConfigError(f"--sizes {bad}: not multiples of --chunk-frames={args.chunk_frames}; pick sizes it divides")
  if args.capacity < 1:
    raise ConfigError(f"--capacity={args.capacity}: the bank needs at least one segment")
  args.sizes = sorted(args.sizes)
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the dense anchor is sized to the device

  import jax  # noqa: PLC0415

  t_start = time.perf_counter()
  mb_cfg, dense_cfg = configs(args.preset, args.chunk_frames)
  m = mb_cfg.model
  result = {
    "benchmark": "memory", "preset": args.preset, "device": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform, "dtype": m.dtype, "weights": "random (untrained)",
    "frame": [mb_cfg.data.height, mb_cfg.data.width], "tubelet": list(m.tubelet),
    "tokens_per_frame": (mb_cfg.data.height // m.tubelet[1]) * (mb_cfg.data.width // m.tubelet[2]),
    "chunk_frames": args.chunk_frames, "capacity": args.capacity, "eviction": "fifo",
    "memory_tokens": m.memory_tokens, "segment_length": m.segment_length, "segment_stride": m.segment_stride,
    "peak_note": "process peak after each size, sizes in increasing order (JAX cannot reset the peak counter)",
  }
  _emit(result)
  result["memory_bridge"] = bench_memory_bridge(mb_cfg, args)
  if not args.skip_dense:
    result["dense"] = bench_dense(dense_cfg, args, t_start)
  print(table(result))
  result["total_s"] = round(time.perf_counter() - t_start, 1)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
