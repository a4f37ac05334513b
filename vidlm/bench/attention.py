"""`vidlm bench attention`: TFLOP/s of our Mosaic GPU flash kernel vs cuDNN and XLA, with the matmul ceiling.

FLOPs (the FlashAttention convention): forward 4*B*H*S^2*D, halved when causal; forward+backward 3.5x that
(timed as jit(grad) of sum(out * dO), which includes the forward). Wall-clock of jitted calls on random
inputs: warm-up, then the median of several calls, each ended with block_until_ready. The anchors
(cuDNN, XLA, a bf16 matmul) are measured in the same run. XLA materialises B*H*S^2 scores: it is skipped
where that would not fit (the table says so).

Needs a GPU; imports nothing from the data stack (no grain / tfds), so it runs on the bare device image.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from vidlm.bench.timing import matmul_tflops, median_seconds
from vidlm.cli import UsageParser, int_list

_XLA_FWD_SCORE_BYTES = 12 << 30  # fp32 scores B*H*S^2*4 the XLA path may allocate (fwd); bwd needs ~3x


def _impls(causal: bool, scale: float, config):
  from pallas_kernels.gpu import flash
  from pallas_kernels.layout import MaskSpec

  mask = MaskSpec.causal() if causal else MaskSpec.bidirectional()

  def ours(q, k, v):
    return flash.flash_attention(q, k, v, None, mask, scale, config)

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="xla")

  return {"ours": ours, "cudnn": cudnn, "xla": xla}


def _fwd_bwd(f):
  def loss(q, k, v, do):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run_case(b: int, h: int, s: int, d: int, causal: bool, *, warmup: int, iters: int, modes, config=None) -> list:
  """Rows for one problem size: one per mode (fwd, fwd+bwd) with TFLOP/s per implementation."""
  ks = jax.random.split(jax.random.key(s + d + causal), 4)
  shape = (b, s, h, d)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
  fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
  impls = _impls(causal, d**-0.5, config)
  score_bytes = 4 * b * h * s * s
  rows = []
  for mode in modes:
    flops = fwd_flops * (3.5 if mode == "fwd+bwd" else 1.0)
    row = {"S": s, "B": b, "H": h, "D": d, "causal": causal, "mode": mode}
    outs = {}
    for name, f in impls.items():
      limit = _XLA_FWD_SCORE_BYTES if mode == "fwd" else _XLA_FWD_SCORE_BYTES // 3
      if name == "xla" and score_bytes > limit:
        row[name] = None
        row["xla_note"] = f"skipped: {score_bytes / 2**30:.0f} GiB of scores"
        continue
      try:
        if mode == "fwd":
          fn, args = jax.jit(f), (q, k, v)
        else:
          fn, args = _fwd_bwd(f), (q, k, v, do)
        sec = median_seconds(fn, args, warmup, iters)
        row[name] = flops / sec / 1e12
        row[f"{name}_ms"] = sec * 1e3
        if mode == "fwd" and name in ("ours", "cudnn"):
          outs[name] = fn(*args)
      except Exception as e:  # report and keep going: one failing anchor must not lose the run
        row[name] = None
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if "ours" in outs and "cudnn" in outs:  # fast but wrong must not pass unnoticed
      row["max_abs_diff_vs_cudnn"] = float(
        jnp.max(jnp.abs(outs["ours"].astype(jnp.float32) - outs["cudnn"].astype(jnp.float32)))
      )
    if row.get("ours") and row.get("cudnn"):
      row["ratio_vs_cudnn"] = row["ours"] / row["cudnn"]
    rows.append(row)
    print(_fmt_row(row), flush=True)
  return rows


def _fmt(x, w=8, p=1):
  return f"{x:>{w}.{p}f}" if isinstance(x, float) else f"{'-':>{w}}"


_HEADER = f"{'S':>7} {'D':>4} {'causal':>6} {'mode':>8} {'ours':>8} {'cuDNN':>8} {'XLA':>8} {'ours/cuDNN':>10}"


def _fmt_row(r) -> str:
  return (
    f"{r['S']:>7} {r['D']:>4} {str(r['causal']):>6} {r['mode']:>8} {_fmt(r.get('ours'))} {_fmt(r.get('cudnn'))} "
    f"{_fmt(r.get('xla'))} {_fmt(r.get('ratio_vs_cudnn'), 10, 3)}"
    + (f"  ours_err={r['ours_error']}" if "ours_error" in r else "")
    + (f"  cudnn_err={r['cudnn_error']}" if "cudnn_error" in r else "")
  )


def main(argv: list[str] | None = None) -> int:
  p = UsageParser(prog="vidlm bench attention", description=__doc__.splitlines()[0])
  p.add_argument("--seqlens", type=int_list, default="8192,32768,131072", help="comma-separated sequence lengths")
  p.add_argument("--head-dims", type=int_list, default="64,128", help="comma-separated head dims")
  p.add_argument("--causal", default="both", choices=("both", "yes", "no"))
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--tokens-heads", type=int, default=16 * 32768, help="heads = min(16, this // S): equal work/size")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="S=8192, hd128 only, 3 iterations")
  p.add_argument("--out", default=None, help="write all rows as JSON here")
  a = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    print(f"vidlm bench attention: needs a GPU (jax.default_backend() is {jax.default_backend()!r})")
    return 2
  seqlens, dims = a.seqlens, a.head_dims
  iters = a.iters
  if a.quick:
    seqlens, dims, iters = [8192], [128], 3
  causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
  modes = [m for m in a.modes.split(",") if m]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}  jax {jax.__version__}  B={a.batch}  bf16", flush=True)
  mm = matmul_tflops(a.warmup, iters)
  print(f"bf16 matmul 8192^3: {mm:.1f} TFLOP/s", flush=True)
  print(_HEADER, flush=True)
  rows = []
  for s in seqlens:
    h = max(1, min(16, a.tokens_heads // s))
    for d in dims:
      for causal in causals:
        rows += run_case(a.batch, h, s, d, causal, warmup=a.warmup, iters=iters, modes=modes)
        _dump(a.out, dev, mm, rows)  # after every case: a run cut short keeps what it measured
  print("\nsummary (TFLOP/s)\n" + _HEADER)
  for r in rows:
    print(_fmt_row(r))
  _dump(a.out, dev, mm, rows)
  return 0


def _dump(path, dev, mm, rows) -> None:
  if path:
    with open(path, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__, "matmul_tflops": mm, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  raise SystemExit(main())
