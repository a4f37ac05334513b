"""`vidlm bench ring`: weak scaling of ring attention (layers/ring.py) against the single-GPU kernel.

For ring sizes N (default 1, 2, 4 GPUs) with a fixed number of tokens per device c (default 8192), bf16,
B=1, 32 query / 8 kv heads, D=128, causal mask, it times jit(grad) of sum(out * dO) (forward + backward) for:
  * the ring on N GPUs over N*c tokens, for each token layout (contiguous, zigzag),
  * the same ring with the K/V (and dK/dV) transfers removed (`_permute=False`: wrong numbers, same compute),
  * the anchor, measured in the same run: the SAME local kernel on ONE GPU over the full N*c tokens,
  * optionally (--switch-variant) zigzag with every differing hop dispatched by lax.switch instead of the
    conditional-free per-device slicing (what the conditional costs).
Columns:
  per-device TFLOP/s = causal FLOPs(N*c) / N / ring time    (FLOPs: 4 T^2 H D / 2 forward, x3.5 fwd+bwd)
  efficiency         = (anchor time / N) / ring time        (zhuzilin's metric: 100% = perfect weak scaling)
  exposed comm       = (ring time - ring-without-permute time) / ring time
  zigzag speedup     = contiguous ring time / zigzag ring time
Before timing, a correctness check compares ring outputs/gradients with the single-GPU kernel and with the fp32
reference on a small problem (errors are printed and stored in the JSON).

XLA flags (set in XLA_FLAGS before the GPU backend starts; recorded in the JSON):
  --xla_gpu_enable_latency_hiding_scheduler=true   lets the collective-permute start before a hop's kernel and
                                                   finish after it (off by default: the transfer is exposed)
  --xla_gpu_use_memcpy_local_p2p=true   (preset "lhs+memcpy") permutes between GPUs of one process by copy
                                                   engines instead of NCCL kernels that take SMs from attention
Wall-clock medians of jitted calls on random inputs after warm-up. Needs GPUs; imports nothing from the data
stack (no grain / tfds). Run: `PYTHONPATH=. python3 -m vidlm.bench.ring --json ring.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from vidlm.bench.timing import median_seconds
from vidlm.cli import UsageParser, int_list

XLA_PRESETS = {
  "none": [],
  "lhs": ["--xla_gpu_enable_latency_hiding_scheduler=true"],
  "lhs+memcpy": ["--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_use_memcpy_local_p2p=true"],
}
AXES = ("data", "fsdp", "seq", "tensor")


def _set_xla_flags(preset: str) -> list[str]:
  flags = XLA_PRESETS[preset]
  cur = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([cur, *[f for f in flags if f.split("=")[0] not in cur]]).strip()
  return flags


def _mesh(n: int):
  import jax  # noqa: PLC0415
  from jax.sharding import AxisType  # noqa: PLC0415

  return jax.make_mesh((1, 1, n, 1), AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:n])


def _inputs(t: int, hq: int, hkv: int, d: int, seed: int = 0):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
  do = jax.random.normal(ks[3], (1, t, hq, d), jnp.bfloat16)
  return q, k, v, do


def _single_fn(local_impl: str, causal: bool):
  """Attention of the whole sequence on one GPU with the ring's local kernel."""
  import jax  # noqa: PLC0415

  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415

  if local_impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  from layers.attention import attention  # noqa: PLC0415

  mask = MaskSpec.causal() if causal else MaskSpec.bidirectional()
  return lambda q, k, v: attention(q, k, v, mask=mask, kernel=local_impl)


def _ring_fn(
  local_impl: str, causal: bool, layout: str, permute: bool = True, uniform: bool = True, barrier: bool = True
):
  from layers import ring  # noqa: PLC0415
  from layers.attention import hop_kernel  # noqa: PLC0415
  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415

  mask = MaskSpec.causal() if causal else MaskSpec.bidirectional()
  hop = hop_kernel(local_impl)
  return lambda q, k, v: ring.ring_attention(
    q, k, v, mask=mask, token_layout=layout, hop=hop, _permute=permute, _uniform=uniform, _barrier=barrier
  )


def _fwd_bwd(attn):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _shard(mesh, *xs):
  import jax  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  return [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in xs]


def _compile(fn, args):
  """(compiled executable, seconds to compile): timing the executable avoids a second compile for its HLO."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _hlo_collectives(text: str) -> dict:
  """How the compiled ring moves data: counts of collective-permute(-start) ops in the optimised HLO."""
  return {
    "collective_permute_start": text.count("collective-permute-start("),
    "collective_permute_sync": text.count(" collective-permute("),
    "conditionals": text.count(" conditional("),
  }


def _check(local_impl: str, n: int, layout: str, t: int, hq: int, hkv: int, d: int) -> dict:
  """Ring vs single-GPU kernel vs fp32 reference on a small causal problem: max relative errors."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from layers import ring  # noqa: PLC0415
  from pallas_kernels import reference  # noqa: PLC0415
  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415

  q, k, v, do = _inputs(t, hq, hkv, d, seed=1)
  perm = ring.token_permutation(t, n, layout)
  ref = _fwd_bwd(lambda q, k, v: reference.attention(q, k, v, mask=MaskSpec.causal()))
  single = _fwd_bwd(_single_fn(local_impl, True))
  mesh = _mesh(n)
  with jax.set_mesh(mesh):
    rng = _fwd_bwd(_ring_fn(local_impl, True, layout))
    g_ring = rng(*_shard(mesh, q[:, perm], k[:, perm], v[:, perm], do[:, perm]))
    out_ring = jax.jit(_ring_fn(local_impl, True, layout))(*_shard(mesh, q[:, perm], k[:, perm], v[:, perm]))
  g_ref = ref(q, k, v, do)
  g_single = single(q, k, v, do)
  o_ref = reference.attention(q, k, v, mask=MaskSpec.causal())
  o_single = _single_fn(local_impl, True)(q, k, v)

  def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.all(np.isfinite(a)):
      return float("nan")
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

  inv = np.argsort(perm)
  ring_vs_ref = max([rel(out_ring[:, inv], o_ref)] + [rel(a[:, inv], b) for a, b in zip(g_ring, g_ref)])
  single_vs_ref = max([rel(o_single, o_ref)] + [rel(a, b) for a, b in zip(g_single, g_ref)])
  return {
    "ring": n,
    "layout": layout,
    "tokens": t,
    "ring_vs_fp32_ref": ring_vs_ref,
    "single_vs_fp32_ref": single_vs_ref,
  }


def main(argv: list[str] | None = None) -> int:
  p = UsageParser(
    prog="vidlm bench ring", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--tokens-per-device", type=int, default=8192)
  p.add_argument("--ring-sizes", type=int_list, default="4,2,1", help="largest first, so a time limit cuts the small ones")
  p.add_argument("--layouts", default="zigzag,contiguous")
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--local-impl", default="cudnn", help="per-hop kernel: cudnn | flash | xla (also the anchor)")
  p.add_argument("--bidirectional", action="store_true", help="also time unmasked attention (contiguous ring)")
  p.add_argument("--xla-preset", default="lhs", choices=sorted(XLA_PRESETS))
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--check-tokens", type=int, default=4096, help="tokens of the correctness check (0: skip)")
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--hlo-dir", default=None, help="write the optimised HLO of the largest rings here")
  p.add_argument("--switch-variant", action="store_true", help="also time zigzag with lax.switch hop dispatch")
  p.add_argument("--barrier-variant", action="store_true", help="also time rings without optimization barriers")
  p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test of the code paths
  args = p.parse_args(argv)

  flags = _set_xla_flags(args.xla_preset)
  import jax  # noqa: PLC0415

  from layers import ring  # noqa: PLC0415

  devices = jax.devices()
  if devices[0].platform != "gpu" and not args.allow_cpu:
    print(f"vidlm bench ring: needs GPUs (found {devices[0].platform})", file=sys.stderr)
    return 2
  sizes = [x for x in args.ring_sizes if x <= len(devices)]  # in the given order
  layouts = args.layouts.split(",")
  c, hq, hkv, d = args.tokens_per_device, args.heads, args.kv_heads, args.head_dim
  meta = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": f"{len(devices)}x {devices[0].device_kind}",
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "xla_preset": args.xla_preset,
    "preset_flags": flags,
    "local_impl": args.local_impl,
    "shape": {"batch": 1, "tokens_per_device": c, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16"},
    "command": "vidlm bench ring " + " ".join(argv if argv is not None else sys.argv[1:]),
  }
  print(json.dumps(meta), flush=True)
  results: dict = {"meta": meta, "checks": [], "rows": []}

  def dump():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)

  if args.check_tokens:
    for n in [max(sizes)] if max(sizes) > 1 else []:
      for layout in layouts:
        try:
          chk = _check(args.local_impl, n, layout, args.check_tokens, hq, hkv, d)
        except Exception as e:  # noqa: BLE001
          chk = {"ring": n, "layout": layout, "error": f"{type(e).__name__}: {e}"[:300]}
        print("check", json.dumps(chk), flush=True)
        results["checks"].append(chk)
        dump()

  causal_modes = [True] + ([False] if args.bidirectional else [])
  for causal in causal_modes:
    for n in sizes:
      t = n * c
      flops = ring.ring_flops(t, hq, d, causal=causal, backward=True)
      q, k, v, do = _inputs(t, hq, hkv, d)
      try:
        fa, _ = _compile(_fwd_bwd(_single_fn(args.local_impl, causal)), (q, k, v, do))
        t_single = median_seconds(fa, (q, k, v, do), args.warmup, args.iters)
      except Exception as e:  # noqa: BLE001
        print(f"anchor N={n} failed: {type(e).__name__}: {e}"[:400], flush=True)
        continue
      row_layouts = layouts if causal else ["contiguous"]
      mesh = _mesh(n)
      times = {}
      for layout in row_layouts if n > 1 else ["contiguous"]:
        row = {
          "mask": "causal" if causal else "bidirectional",
          "ring": n,
          "layout": layout if n > 1 else "-",
          "tokens": t,
          "single_gpu_ms": 1e3 * t_single,
          "single_gpu_tflops": flops / t_single / 1e12,
        }
        try:
          perm = ring.token_permutation(t, n, layout)
          qs, ks_, vs, dos = _shard(mesh, q[:, perm], k[:, perm], v[:, perm], do[:, perm])
          rargs = (qs, ks_, vs, dos)
          with jax.set_mesh(mesh):
            f, row["compile_s"] = _compile(_fwd_bwd(_ring_fn(args.local_impl, causal, layout)), rargs)
            t_ring = median_seconds(f, rargs, args.warmup, args.iters)
            if n > 1:
              text = f.as_text()
              row["hlo"] = _hlo_collectives(text)
              if args.hlo_dir and n == max(sizes):
                with open(os.path.join(args.hlo_dir, f"ring_{layout}_{n}.hlo.txt"), "w") as fh:
                  fh.write(text)
              f0, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, causal, layout, permute=False)), rargs)
              t_nocomm = median_seconds(f0, rargs, args.warmup, args.iters)
              row["ring_no_permute_ms"] = 1e3 * t_nocomm
              row["exposed_comm_pct"] = 100.0 * (t_ring - t_nocomm) / t_ring
              if args.barrier_variant:
                fb, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, causal, layout, barrier=False)), rargs)
                row["ring_no_barrier_ms"] = 1e3 * median_seconds(fb, rargs, args.warmup, args.iters)
              if layout == "zigzag" and causal and args.switch_variant:
                fs, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, causal, layout, uniform=False)), rargs)
                row["ring_switch_dispatch_ms"] = 1e3 * median_seconds(fs, rargs, args.warmup, args.iters)
          row["ring_ms"] = 1e3 * t_ring
          row["per_device_tflops"] = flops / n / t_ring / 1e12
          row["efficiency_pct"] = 100.0 * (t_single / n) / t_ring
          times[layout] = t_ring
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {e}"[:400]
        print("row", json.dumps(row), flush=True)
        results["rows"].append(row)
        dump()
      if "zigzag" in times and "contiguous" in times:
        for row in results["rows"]:
          if (row["ring"], row["layout"], row["mask"]) == (n, "zigzag", "causal" if causal else "bidirectional"):
            row["zigzag_speedup_vs_contiguous"] = times["contiguous"] / times["zigzag"]

  print()
  print(
    f"ring attention fwd+bwd, {meta['device']}, local={args.local_impl}, {c} tokens/device, bf16, "
    f"{hq}q/{hkv}kv heads, D={d}, XLA preset {args.xla_preset}"
  )
  hdr = f"{'mask':13} {'N':>2} {'layout':10} {'tokens':>7} {'ring ms':>8} {'TF/s/dev':>8} {'1-GPU ms':>8} "
  hdr += (
    f"{'1-GPU TF/s':>10} {'eff %':>6} {'nocomm ms':>9} {'exposed %':>9} {'zz x':>5} {'switch ms':>9} {'nobarr ms':>9}"
  )
  print(hdr)
  for r in sorted(results["rows"], key=lambda r: (r["mask"], r["ring"], r["layout"])):
    if "error" in r:
      print(f"{r['mask']:13} {r['ring']:>2} {r['layout']:10} error: {r['error'][:80]}")
      continue
    print(
      f"{r['mask']:13} {r['ring']:>2} {r['layout']:10} {r['tokens']:>7} {r['ring_ms']:8.2f} {r['per_device_tflops']:8.1f} "
      f"{r['single_gpu_ms']:8.2f} {r['single_gpu_tflops']:10.1f} {r['efficiency_pct']:6.1f} "
      f"{r.get('ring_no_permute_ms', float('nan')):9.2f} {r.get('exposed_comm_pct', float('nan')):9.1f} "
      f"{r.get('zigzag_speedup_vs_contiguous', float('nan')):5.2f} {r.get('ring_switch_dispatch_ms', float('nan')):9.2f} "
      f"{r.get('ring_no_barrier_ms', float('nan')):9.2f}"
    )
  dump()
  return 0


if __name__ == "__main__":
  sys.exit(main())
