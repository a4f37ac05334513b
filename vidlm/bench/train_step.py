"""`vidlm bench train_step`: time the real training step of an experiment config on random data.

Reports step time, tokens/s, model FLOPs utilisation and peak device memory; with `--forward-lengths` also the
longest context (in frames) whose forward pass fits. The anchor is the device's dense bf16 peak (`--peak-tflops`,
default 989 for H100/H200 SXM) and, measured in the same run, a bf16 matmul. Imports nothing from the data stack
(random frames and tokens), so it runs on accelerator images without grain/tfds.

MFU counts model FLOPs only (no remat recompute): 6 * params * tokens for the dense layers plus attention
3.5 * 2 * S^2 * (heads * head_dim) per layer, halved-by-causality already included (frame-causal ~ causal).

  PYTHONPATH=. python3 -m vidlm.bench.train_step --config experiments/ring_1m.py --steps 2 \\
      --config.model.num_layers=2 --out step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from vidlm.bench.timing import matmul_tflops


def _model_flops(cfg, params: int) -> float:
  from vidlm import config as C  # noqa: PLC0415

  s = C.sequence_length(cfg)
  m = cfg.model
  tokens = cfg.train.batch_size * s
  dense = 6.0 * params * tokens
  attention = 3.5 * 2.0 * s * s * m.num_heads * m.head_dim * m.num_layers * cfg.train.batch_size
  return dense + attention


def _peak_memory_gib() -> list[float]:
  import jax  # noqa: PLC0415

  out = []
  for dev in jax.local_devices():
    stats = dev.memory_stats() or {}
    out.append(round(stats.get("peak_bytes_in_use", 0) / 2**30, 2))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="vidlm bench train_step")
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (compile) step")
  p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per device")
  p.add_argument("--forward-lengths", default="", help="comma-separated frame counts to try forward-only")
  p.add_argument("--time-budget", type=float, default=300.0, help="stop trying forward lengths after this (s)")
  p.add_argument("--out", default=None)
  args, overrides = p.parse_known_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")

  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from vidlm import config as C  # noqa: PLC0415
  from vidlm.train.loop import Trainer, global_batch  # noqa: PLC0415
  from vidlm.train.step import random_batch  # noqa: PLC0415

  t_start = time.perf_counter()
  cfg = C.load_config(args.config)
  for key, value in C.parse_overrides(overrides):
    C.apply_override(cfg, key, value)
  cfg.train.progress_bar = False
  platform = jax.devices()[0].platform
  result = {"config": args.config, "overrides": overrides, "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "platform": platform,
            "sequence_length": C.sequence_length(cfg), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if platform == "gpu":
    result["matmul_bf16_tflops"] = round(matmul_tflops(), 1)

  trainer = Trainer(cfg, "/tmp/vidlm_bench_train_step")
  params = sum(x.size for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param)))
  result["params"] = int(params)
  with trainer.activate():
    batch = global_batch(trainer.mesh, random_batch(cfg.data, cfg.train.batch_size))
    t0 = time.perf_counter()
    trainer.state, metrics = trainer.train_step(trainer.state, batch)
    jax.block_until_ready(metrics)
    result["first_step_s_incl_compile"] = round(time.perf_counter() - t0, 2)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      trainer.state, metrics = trainer.train_step(trainer.state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step = statistics.median(times)
  flops = _model_flops(cfg, params)
  result.update(
    step_s=round(step, 3),
    step_times_s=[round(t, 3) for t in times],
    loss=float(metrics["loss"]),
    tokens_per_s=round(cfg.train.batch_size * C.sequence_length(cfg) / step, 1),
    model_tflops_per_step=round(flops / 1e12, 1),
    tflops_per_device=round(flops / step / jax.device_count() / 1e12, 1),
    mfu=round(flops / step / jax.device_count() / (args.peak_tflops * 1e12), 4),
    peak_memory_gib_per_device=_peak_memory_gib(),
  )
  print(json.dumps(result), flush=True)

  fits = []
  for frames in [int(f) for f in args.forward_lengths.split(",") if f]:
    if time.perf_counter() - t_start > args.time_budget:
      fits.append({"frames": frames, "result": "not tried (time budget)"})
      break
    cfg.data.frames = frames
    trial = {"frames": frames, "tokens": C.sequence_length(cfg)}
    try:
      with trainer.activate():
        fwd = jax.jit(lambda state, f, t: nnx.merge(trainer.graphdef, state)[0](f, t))
        b = global_batch(trainer.mesh, random_batch(cfg.data, cfg.train.batch_size, seed=frames))
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(trainer.state, b["frames"], b["tokens"]))
        trial.update(result="fits", seconds_incl_compile=round(time.perf_counter() - t0, 1),
                     peak_memory_gib_per_device=_peak_memory_gib())
    except Exception as e:  # noqa: BLE001  (an OOM is the answer we are looking for)
      trial.update(result=f"failed: {type(e).__name__}: {str(e)[:160]}")
    fits.append(trial)
    print(json.dumps(trial), flush=True)
    if trial["result"] != "fits":
      break
  result["forward_trials"] = fits
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
