"""VideoLM trained on one GPU with each block-sparse selector through the Mosaic GPU kernels (issue 11 item 3).

Config: 8 frames of 64x64 with 4x4 tubelets = 256 tokens per frame (two selection blocks), 2,048 video + 128 text
tokens = 2,176 = 17 blocks of 128, so every attention call tiles the GPU block-sparse kernels (block_q 128,
block_kv 128, head_dim 64). 2 layers of width 256, bf16, batch 8, 20 steps: a check that training runs and
learns with each selector on the kernels, not a quality run.

Command (repo root; one process per selector, in parallel, then a table of their losses):
  python3 -m experiments.sparse_gpu --workdir runs/sparse_gpu
  (checks first, with no device work, that every selector's config passes `vidlm.config.validate` for
  platform gpu, i.e. that every attention call has a kernel: the GPU block-sparse one, no reference fallback;
  then runs `vidlm train --config experiments/sparse_gpu.py --workdir W/METHOD
  --config.attention.sparsity.method=METHOD` for moba, static, xattention, vmoba, reads each metrics.jsonl and
  exits 1 unless every loss is finite and the last is below the first.)
Rehearsal on a CPU (validation for gpu + 2 steps through the XLA path):
  python3 -m experiments.sparse_gpu --workdir /tmp/sg --validate-platform gpu --config.attention.kernel=xla \
    --config.train.steps=2 --serial
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from vidlm.config import Config, MeshConfig, unknown_variant

METHODS = ("moba", "static", "xattention", "vmoba")


def get_config(arg: str | None = None) -> Config:
  if arg is not None:
    raise unknown_variant(__file__, arg, ())
  cfg = Config(name="sparse_gpu")
  cfg.mesh = MeshConfig(data=-1, fsdp=1, seq=1, tensor=1)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 256, 2, 4, 2, 64, 768
  m.tubelet = (1, 4, 4)  # 256 tokens per 64x64 frame
  m.dtype, m.param_dtype = "bfloat16", "float32"
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 8, 64, 64, 128
  d.num_train, d.num_eval, d.tiers = 160, 16, ("a",)
  t = cfg.train
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 20, 8, 2e-3, 2, 1
  cfg.checkpoint.every = 0
  a = cfg.attention
  a.kernel = "flash"
  sp = a.sparsity
  sp.method, sp.block_q, sp.block_kv = "moba", 128, 128
  sp.top_k = 4  # moba: 4 gated blocks + its own of up to 17; vmoba: at most 4 chunks
  sp.max_kv_blocks = 6  # xattention
  return cfg


def _validate(method: str, overrides: list[str], platform: str) -> None:
  """ConfigError (one line) if the selector's config would fail on `platform`: no device work."""
  from vidlm import config as C  # noqa: PLC0415

  cfg = get_config()
  for key, value in C.parse_overrides([f"--config.attention.sparsity.method={method}", *overrides]):
    C.apply_override(cfg, key, value)
  C.validate(cfg, num_devices=1, platform=platform)


def _losses(workdir: Path) -> list[tuple[int, float]]:
  out = []
  path = workdir / "metrics.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if "train/loss" in rec:
        out.append((int(rec["step"]), float(rec["train/loss"])))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--validate-platform", default="gpu", help="platform the configs are checked for before training")
  p.add_argument("--serial", action="store_true", help="one training at a time (default: all in parallel)")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds per training process")
  a, overrides = p.parse_known_args(argv)
  methods = [m for m in a.methods.split(",") if m]
  bad = [m for m in methods if m not in METHODS]
  if bad or any(not o.startswith("--config.") for o in overrides):
    print(f"error: --methods takes {','.join(METHODS)}; extra arguments must be --config.SECTION.FIELD=VALUE", file=sys.stderr)
    return 2
  from vidlm.config import ConfigError  # noqa: PLC0415

  for m in methods:
    try:
      _validate(m, overrides, a.validate_platform)
    except ConfigError as e:
      print(f"error: {m}: {e}", file=sys.stderr)
      return 2
  print(f"configs valid for platform {a.validate_platform}: {', '.join(methods)}", flush=True)
  root = Path(a.workdir)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
  procs = {}
  for m in methods:
    wd = root / m
    wd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vidlm.cli", "train", "--config", __file__, "--workdir", str(wd),
           f"--config.attention.sparsity.method={m}", *overrides]
    log = open(wd / "train.log", "w")  # noqa: SIM115  (closed below)
    procs[m] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    if a.serial:
      try:
        procs[m][0].wait(timeout=a.timeout)
      except subprocess.TimeoutExpired:
        procs[m][0].kill()
  ok = True
  for m, (proc, log) in procs.items():
    try:
      rc = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "timeout"
    log.close()
    losses = _losses(root / m)
    finite = bool(losses) and all(math.isfinite(v) for _, v in losses)
    falls = finite and losses[-1][1] < losses[0][1]
    ok &= rc == 0 and finite and falls
    shown = " ".join(f"{v:.3f}" for _, v in losses)
    print(f"{m:<11} rc={rc} steps={len(losses)} finite={finite} falls={falls} losses: {shown}", flush=True)
    if rc != 0:
      print("  " + "\n  ".join((root / m / "train.log").read_text().splitlines()[-6:]), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
