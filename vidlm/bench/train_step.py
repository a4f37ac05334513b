"""`vidlm bench train_step`: time the real training step of an experiment config on random data.

Reports compile time, the compiler's memory estimate, step time, tokens/s, model FLOPs utilisation and peak
device memory; with `--forward-lengths` also the longest context (in frames) whose forward pass fits, either
run (`--forward-mode run`) or, when running it would take too long, from the compiled program's memory
estimate (`--forward-mode compile`); `--forward-fn prefill` tries the generation prefill instead (the same forward
plus a fresh KV cache of every layer; with a block-sparse config, a sparse-ring prefill). The anchor is the device's dense bf16 peak (`--peak-tflops`, default 989
for H100/H200 SXM) and, measured in the same run, a bf16 matmul. Imports nothing from the data stack (random
frames and tokens), so it runs on accelerator images without grain/tfds.

The step is compiled ahead of time (`jit(...).lower(...).compile()`) and the timed steps call that executable,
so no timed step can hide a recompilation; the first timed step is reported separately from the rest.

MFU counts model FLOPs only (no remat recompute), in two ways (both in the JSON and the last printed line):
  dense-equivalent MFU (`mfu`, `mfu_dense_equivalent`): 6 * params * tokens for the dense layers plus attention
      3.5 * 2 * S^2 * (heads * head_dim) per layer, halved-by-causality already included (frame-causal ~ causal):
      what a dense model of this shape computes, whatever attention.sparsity says (so a block-sparse step can
      exceed 100 %).
  computed-FLOPs MFU (`mfu_computed_flops`): the same 6 * params * tokens plus, per layer, the attention tiles
      the step actually computes: under attention.sparsity the selector's listed (q block, kv block) tiles, each
      3.5 * 4 * block_q * block_kv * head_dim per q head (a partially masked tile counts whole: the kernel computes
      it whole); layers kept dense (sparsity.dense_layers) count the mask's visible tiles at the same blocks;
      method=none counts the dense-equivalent attention. The tile counts are exact for static (the selector's own
      lists) and moba (top_k + own blocks per q block, capped by what the mask leaves visible); xattention and
      vmoba pick data-dependent counts, so their computed-FLOPs MFU is null. The selector's own scoring is not
      counted (moba: a block-level [nQ, nK] gate per kv head, < 0.1 % of the attention at 1M tokens).

  PYTHONPATH=. python3 -m vidlm.bench.train_step --config experiments/ring_1m.py --steps 2 \\
      --config.model.num_layers=2 --out step.json
"""

from __future__ import annotations

import json
import os
import statistics
import time

from vidlm.bench.timing import matmul_tflops
from vidlm.cli import UsageParser

GIB = 2**30


def _model_flops(cfg, params: int) -> float:
  from vidlm import config as C  # noqa: PLC0415

  s = C.sequence_length(cfg)
  m = cfg.model
  tokens = cfg.train.batch_size * s
  dense = 6.0 * params * tokens
  attention = 3.5 * 2.0 * s * s * m.num_heads * m.head_dim * m.num_layers * cfg.train.batch_size
  return dense + attention


def attention_tiles(cfg) -> dict:
  """Tiles the model's attention computes per training example, summed over q heads, at the sparsity blocks.

  -> {"block_q", "block_kv", "visible": the frame-causal mask's non-EMPTY tiles of one layer,
      "listed": per layer the tiles computed (None for data-dependent selectors), "density": listed / visible}.
  Host numpy only (O(q blocks) memory, or the static selector's own [nQ, width] lists): no [T, S] array.
  """
  import math  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from layers.sparse import make_selector  # noqa: PLC0415
  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415
  from vidlm import config as C  # noqa: PLC0415

  sp, m = cfg.attention.sparsity, cfg.model
  if sp.method == "none":  # no layout: the dense-equivalent count is what runs (no tiles to list)
    return {"block_q": None, "block_kv": None, "visible": None, "listed": None, "density": 1.0}
  grid = C.video_grid(cfg)
  nv = math.prod(grid)
  s = nv + cfg.data.text_len
  mask = MaskSpec.frame_causal(grid[1] * grid[2], video_tokens=nv)
  bq, bk = sp.block_q, sp.block_kv
  if s % bq or s % bk:
    raise ValueError(f"attention_tiles: {s} tokens are not a multiple of attention.sparsity.block_q/block_kv={bq}/{bk}")
  nq, nk = s // bq, s // bk
  frame = lambda p: np.asarray(mask.frame_of(p), np.int64)  # noqa: E731  (monotone in the position)
  # tile (i, j) is visible iff frame(first kv of j) <= frame(last q of i): each q block sees a prefix of kv blocks
  vis_row = np.searchsorted(frame(np.arange(nk) * bk), frame(np.arange(1, nq + 1) * bq - 1), side="right")
  heads = m.num_heads
  visible = int(vis_row.sum()) * heads
  if sp.method == "moba":  # top_k best-gated visible blocks besides its own, plus its own visible blocks
    first = np.arange(nq) * bq // bk
    last = ((np.arange(nq) + 1) * bq - 1) // bk
    own = np.maximum(0, np.minimum(last, vis_row - 1) - first + 1)
    listed_sparse = int((np.minimum(sp.top_k, vis_row - own) + own).sum()) * heads
  elif sp.method == "static":  # the selector's own lists (they depend on shapes and the mask only)
    sel = make_selector(sp, num_layers=m.num_layers, video_grid=grid)
    shape = jax.ShapeDtypeStruct((1, s, heads, m.head_dim), np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
      _, cnt = sel.lists(shape, shape, mask, 0)
    listed_sparse = int(np.asarray(cnt).sum()) * heads  # layout head axis 1: every q head computes the list
  else:  # xattention, vmoba: thresholds on learned scores pick the count
    listed_sparse = None
  dense = sp.dense_layer_set(m.num_layers)
  listed = [visible if i in dense else listed_sparse for i in range(m.num_layers)]
  density = None if listed_sparse is None else round(sum(listed) / (visible * m.num_layers), 4)
  return {"block_q": bq, "block_kv": bk, "visible": visible, "listed": listed, "density": density}


def _computed_flops(cfg, params: int, tiles: dict) -> float | None:
  """Model FLOPs of one step counting the attention tiles actually computed (see the module docstring)."""
  from vidlm import config as C  # noqa: PLC0415

  if cfg.attention.sparsity.method == "none":
    return _model_flops(cfg, params)
  if any(x is None for x in tiles["listed"]):
    return None
  b, m = cfg.train.batch_size, cfg.model
  per_tile = 3.5 * 4.0 * tiles["block_q"] * tiles["block_kv"] * m.head_dim
  return 6.0 * params * b * C.sequence_length(cfg) + per_tile * sum(tiles["listed"]) * b


def _peak_memory_gib() -> list[float]:
  import jax  # noqa: PLC0415

  return [round((d.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB, 2) for d in jax.local_devices()]


def _bytes_limit(limit_gib: float | None) -> int | None:
  """Bytes one device may use: `--device-memory-gib` if given (to plan for a smaller device), else what the
  allocator reports (None where the backend does not say, e.g. CPU)."""
  import jax  # noqa: PLC0415

  if limit_gib:
    return int(limit_gib * GIB)
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def _memory_estimate(compiled, limit_gib: float | None) -> dict:
  """The compiler's per-device buffer assignment: arguments + outputs + temporaries - donated aliases."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  limit = _bytes_limit(limit_gib)
  out = {
    "arguments_gib": round(m.argument_size_in_bytes / GIB, 3),
    "outputs_gib": round(m.output_size_in_bytes / GIB, 3),
    "temporaries_gib": round(m.temp_size_in_bytes / GIB, 3),
    "aliased_gib": round(m.alias_size_in_bytes / GIB, 3),
    "estimated_peak_gib": round(peak / GIB, 3),
  }
  if limit:
    out.update(device_limit_gib=round(limit / GIB, 2), fits=bool(peak <= limit))
  return out


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)  # one JSON line per event: a run cut short still leaves its figures


def _compile_step(trainer, batch, limit_gib: float | None) -> tuple:
  t0 = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {
    "lower_s": round(t1 - t0, 1),
    "compile_s": round(t2 - t1, 1),
    **_memory_estimate(compiled, limit_gib),
  }


def _forward_trials(args, cfg, trainer, t_start: float) -> list[dict]:
  """Forward passes at increasing frame counts until one does not fit (or the time budget is spent)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from vidlm import config as C  # noqa: PLC0415
  from vidlm.sharding import input_sharding  # noqa: PLC0415
  from vidlm.train.loop import global_batch  # noqa: PLC0415
  from vidlm.train.step import random_batch  # noqa: PLC0415

  trials = []
  for frames in [int(f) for f in args.forward_lengths.split(",") if f]:
    if time.perf_counter() - t_start > args.time_budget:
      trials.append({"frames": frames, "result": "not tried (time budget)"})
      break
    cfg.data.frames = frames
    trial = {"frames": frames, "tokens": C.sequence_length(cfg), "mode": args.forward_mode, "fn": args.forward_fn}
    run = args.forward_mode == "run"  # compile mode lowers against the frames' shape only: no host data
    try:
      with trainer.activate():
        if args.forward_fn == "prefill":  # the forward plus a fresh KV cache of every layer (what generation keeps)
          fwd = jax.jit(lambda state, f, t: nnx.merge(trainer.graphdef, state)[0].prefill(f, t, max_new_tokens=0))
        else:
          fwd = jax.jit(lambda state, f, t: nnx.merge(trainer.graphdef, state)[0](f, t))
        if run:
          b = global_batch(trainer.mesh, random_batch(cfg.data, cfg.train.batch_size, seed=frames))
        else:  # shapes only: a long video's frames need not exist on the host to compile its forward
          d, n = cfg.data, cfg.train.batch_size
          shapes = {"frames": ((n, d.frames, d.height, d.width, 3), np.uint8), "tokens": ((n, d.text_len), np.int32)}
          b = {
            k: jax.ShapeDtypeStruct(shape, dt, sharding=input_sharding(trainer.mesh, k, shape))
            for k, (shape, dt) in shapes.items()
          }
        t0 = time.perf_counter()
        compiled = fwd.lower(trainer.state, b["frames"], b["tokens"]).compile()
        trial.update(compile_s=round(time.perf_counter() - t0, 1), **_memory_estimate(compiled, args.device_memory_gib))
        if run:
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(trainer.state, b["frames"], b["tokens"]))
          trial.update(
            result="fits", run_s=round(time.perf_counter() - t0, 1), peak_memory_gib_per_device=_peak_memory_gib()
          )
        else:
          verdict = {True: "fits", False: "does not fit", None: "compiled (device memory limit unknown)"}
          trial["result"] = f"{verdict[trial.get('fits')]} (compiler estimate)"
    except Exception as e:  # noqa: BLE001  (an out-of-memory error is the answer we are looking for)
      trial.update(result=f"failed: {type(e).__name__}: {str(e)[:160]}")
    trials.append(trial)
    _emit(trial)
    if not trial["result"].startswith(("fits", "compiled")):
      break
  return trials


def main(argv: list[str] | None = None) -> int:
  p = UsageParser(prog="vidlm bench train_step")
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=2, help="timed steps after the compile and one warm-up step (0: the warm-up step is reported as the step)")
  p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per device")
  p.add_argument(
    "--fallback-remat",
    default="",
    help="if the compiler estimates the step does not fit device memory, use this remat policy instead",
  )
  p.add_argument(
    "--device-memory-gib",
    type=float,
    default=None,
    help="memory per device to test estimates against (default: the allocator's limit)",
  )
  p.add_argument("--forward-lengths", default="", help="comma-separated frame counts to try forward-only")
  p.add_argument(
    "--forward-mode",
    choices=("run", "compile"),
    default="run",
    help="run each forward, or only compile it and compare the memory estimate with the device limit",
  )
  p.add_argument(
    "--time-budget",
    type=float,
    default=300.0,
    help="seconds from start after which no further timed step or forward trial is started",
  )
  p.add_argument(
    "--forward-fn",
    choices=("forward", "prefill"),
    default="forward",
    help="forward trials run the model's forward (text logits) or its prefill (the forward that also fills a KV cache)",
  )
  p.add_argument("--forward-only", action="store_true", help="skip the training step: forward trials only")
  p.add_argument("--out", default=None)
  args, overrides = p.parse_known_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
  # a long-context step is sized to the device: let the allocator have 95% of it, not JAX's default 75%
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from vidlm import config as C  # noqa: PLC0415
  from vidlm.train.loop import Trainer  # noqa: PLC0415

  t_start = time.perf_counter()
  cfg = C.load_config(args.config)
  for key, value in C.parse_overrides(overrides):
    C.apply_override(cfg, key, value)
  cfg.train.progress_bar = False
  platform = jax.devices()[0].platform
  result = {
    "config": args.config,
    "overrides": overrides,
    "device": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "platform": platform,
    "sequence_length": C.sequence_length(cfg),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
  }
  if platform == "gpu":
    result["matmul_bf16_tflops"] = round(matmul_tflops(), 1)
  _emit(result)

  trainer = Trainer(cfg, "/tmp/vidlm_bench_train_step")
  params = sum(x.size for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param)))
  result.update(params=int(params), num_layers=cfg.model.num_layers, remat=cfg.model.remat)
  if not args.forward_only:
    trainer = _time_step(args, cfg, trainer, result, t_start)
  result["forward_trials"] = _forward_trials(args, cfg, trainer, t_start)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


def _free(trainer) -> None:
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  for x in jax.tree.leaves((trainer.state, nnx.state(trainer.model))):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


def _time_step(args, cfg, trainer, result: dict, t_start: float):
  """Compile the step (falling back to --fallback-remat if it does not fit), time it, fill `result`.
  Returns the trainer whose state is live (a new one after a fallback)."""
  import jax  # noqa: PLC0415

  from vidlm import config as C  # noqa: PLC0415
  from vidlm.train.loop import Trainer, global_batch  # noqa: PLC0415
  from vidlm.train.step import random_batch  # noqa: PLC0415

  with trainer.activate():
    batch = global_batch(trainer.mesh, random_batch(cfg.data, cfg.train.batch_size))
    compiled, result["compile"] = _compile_step(trainer, batch, args.device_memory_gib)
  _emit({"remat": cfg.model.remat, "compile": result["compile"]})
  if args.fallback_remat and result["compile"].get("fits") is False:
    result["compile_rejected"] = {"remat": cfg.model.remat, **result["compile"]}
    _free(trainer)  # the first model's weights and optimizer state leave the device before the second's arrive
    cfg.model.remat = args.fallback_remat
    trainer = Trainer(cfg, "/tmp/vidlm_bench_train_step")
    result["remat"] = cfg.model.remat
    with trainer.activate():
      batch = global_batch(trainer.mesh, random_batch(cfg.data, cfg.train.batch_size))
      compiled, result["compile"] = _compile_step(trainer, batch, args.device_memory_gib)
    _emit({"remat": cfg.model.remat, "compile": result["compile"]})

  times = []
  with trainer.activate():
    for i in range(1 + args.steps):  # step 0 is the warm-up, reported but not in the median
      t0 = time.perf_counter()
      trainer.state, metrics = compiled(trainer.state, batch)  # raises, rather than recompiles, on a mismatch
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      _emit({"step": i, "seconds": round(times[-1], 3), "loss": float(metrics["loss"])})
      if i < args.steps and time.perf_counter() - t_start + times[-1] > args.time_budget:
        break  # the next step would overrun the budget
  timed = times[1:] or times  # with no time for a second step, the warm-up step is all there is
  step = statistics.median(timed)
  flops = _model_flops(cfg, result["params"])
  tiles = attention_tiles(cfg)
  computed = _computed_flops(cfg, result["params"], tiles)
  per_device = lambda f: f / step / jax.device_count()  # noqa: E731
  result.update(
    warmup_step_s=round(times[0], 3),
    step_s=round(step, 3),
    step_times_s=[round(t, 3) for t in timed],
    loss=float(metrics["loss"]),
    tokens_per_s=round(cfg.train.batch_size * C.sequence_length(cfg) / step, 1),
    model_tflops_per_step=round(flops / 1e12, 1),
    tflops_per_device=round(flops / step / jax.device_count() / 1e12, 1),
    mfu=round(flops / step / jax.device_count() / (args.peak_tflops * 1e12), 4),
    mfu_dense_equivalent=round(per_device(flops) / (args.peak_tflops * 1e12), 4),
    sparsity=cfg.attention.sparsity.method,
    attention_tiles={k: v for k, v in tiles.items() if k != "listed"} | {"listed_per_layer": tiles["listed"]},
    model_flops_per_step=flops,
    computed_flops_per_step=computed,
    computed_tflops_per_step=None if computed is None else round(computed / 1e12, 1),
    computed_tflops_per_device=None if computed is None else round(per_device(computed) / 1e12, 1),
    mfu_computed_flops=None if computed is None else round(per_device(computed) / (args.peak_tflops * 1e12), 4),
    peak_memory_gib_per_device=_peak_memory_gib(),
  )
  _emit(result)
  mfu_c = "n/a (data-dependent selector)" if computed is None else f"{100 * result['mfu_computed_flops']:.1f} %"
  peak = result["peak_memory_gib_per_device"]
  print(
    f"summary: sparsity={result['sparsity']} density={tiles['density']} step {result['step_s']} s, "
    f"computed-FLOPs MFU {mfu_c}, dense-equivalent MFU {100 * result['mfu_dense_equivalent']:.1f} %, "
    f"peak memory per device {max(peak) if peak else 'n/a'} GiB (compiler estimate "
    f"{result['compile'].get('estimated_peak_gib', 'n/a')} GiB)",
    flush=True,
  )
  return trainer


if __name__ == "__main__":
  raise SystemExit(main())
