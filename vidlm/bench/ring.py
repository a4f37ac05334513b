"""`vidlm bench ring`: weak scaling of ring attention (layers/ring.py) against the single-GPU kernel.

For ring sizes N (default 1, 2, 4 GPUs) with a fixed number of tokens per device c (default 8192), bf16,
B=1, 32 query / 8 kv heads, D=128, for each mask of --masks it times jit(grad) of sum(out * dO) (forward +
backward) for:
  * the ring on N GPUs over N*c tokens, for each token layout (contiguous, zigzag),
  * the same ring with the K/V (and dK/dV) transfers removed (`_permute=False`: wrong numbers, same compute),
  * the anchor, measured in the same run: the SAME local kernel on ONE GPU over the full N*c tokens,
  * optionally (--switch-variant) zigzag with every differing hop dispatched by lax.switch instead of the
    conditional-free per-device slicing (what the conditional costs).
Masks (--masks, in ORIGINAL token positions; the ring permutes tokens into its layout):
  causal         token-causal (cuDNN, flash, xla can run it)
  frame_causal   VideoLM's mask: frames of --tokens-per-frame tokens see every earlier frame and themselves
                 whole; an optional text tail of --text-tokens tokens after the video is token-causal.
                 Our flash kernel (or xla) only: cuDNN cannot express it (--local-impl cudnn is refused).
  bidirectional  (--bidirectional or in --masks) no mask; contiguous ring only
Per-hop kernel (--local-impl): cudnn | flash (our Mosaic GPU kernel, `layers.attention.hop_kernel("flash")`,
its backward fed with the global out and lse) | xla. The anchor is always the same kernel on one GPU.
Columns:
  per-device TFLOP/s = FLOPs(N*c) / N / ring time
      FLOPs: 4 T^2 H D forward (x1/2 causal) x3.5 fwd+bwd; frame_causal: 4 * visible pairs * H * D x3.5, the
      visible (q, kv) pairs of the mask counted exactly (T (T + tokens_per_frame) / 2 without text)
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
stack (no grain / tfds). Run: `PYTHONPATH=. python3 -m vidlm.bench.ring --json ring.json`; issue 14's weak
scaling with our kernel: `... --local-impl flash --masks causal,frame_causal --layouts zigzag`.
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


MASKS = ("causal", "frame_causal", "bidirectional")


def make_mask(kind: str, num_tokens: int, tokens_per_frame: int, text_tokens: int):
  """The MaskSpec of mask `kind` over `num_tokens` tokens (frame_causal: video first, then `text_tokens` text)."""
  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415

  if kind == "causal":
    return MaskSpec.causal()
  if kind == "bidirectional":
    return MaskSpec.bidirectional()
  video = num_tokens - text_tokens if text_tokens else None
  return MaskSpec.frame_causal(tokens_per_frame, video_tokens=video)


def visible_pairs(mask, num_tokens: int) -> int:
  """Number of (q, kv) pairs the mask lets through over a [T, T] self-attention, exactly, in O(T) host memory
  (causal and frame_causal are monotone: the kv visible to q are a prefix, up to the last kv of q's frame)."""
  import numpy as np  # noqa: PLC0415

  if mask.kind == "bidirectional":
    return num_tokens * num_tokens
  pos = np.arange(num_tokens, dtype=np.int64)
  frame = pos if mask.kind == "causal" else np.asarray(mask.frame_of(pos), np.int64)
  # frame is non-decreasing: kv j is visible to q i iff frame[j] <= frame[i], i.e. j < searchsorted(frame, side=right)
  return int(np.searchsorted(frame, frame, side="right").sum())


def attention_flops(mask, num_tokens: int, num_heads: int, head_dim: int, *, backward: bool) -> float:
  """Matmul FLOPs of attention under `mask`: causal / bidirectional as `ring.ring_flops` (T^2 / 2 causal, the
  convention of the earlier rows); frame_causal from the exact visible-pair count."""
  from layers import ring  # noqa: PLC0415

  if mask.kind in ("causal", "bidirectional"):
    return ring.ring_flops(num_tokens, num_heads, head_dim, causal=mask.kind == "causal", backward=backward)
  f = 4.0 * visible_pairs(mask, num_tokens) * num_heads * head_dim
  return f * (3.5 if backward else 1.0)


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


def _single_fn(local_impl: str, mask):
  """Attention of the whole sequence on one GPU with the ring's local kernel."""
  import jax  # noqa: PLC0415

  if local_impl == "cudnn":  # main() refuses masks cuDNN cannot express before any device work
    causal = mask.kind == "causal"
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  from layers.attention import attention  # noqa: PLC0415

  return lambda q, k, v: attention(q, k, v, mask=mask, kernel=local_impl)


def _ring_fn(local_impl: str, mask, layout: str, permute: bool = True, uniform: bool = True, barrier: bool = True):
  from layers import ring  # noqa: PLC0415
  from layers.attention import hop_kernel  # noqa: PLC0415

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


def _out_and_grads(attn):
  """jit of (out, dq, dk, dv) of sum(out * dO): one compile per kernel for the correctness check."""
  import jax  # noqa: PLC0415

  def f(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(do.astype(out.dtype)))

  return jax.jit(f)


def _check(local_impl: str, n: int, layout: str, t: int, hq: int, hkv: int, d: int, mask) -> dict:
  """Ring vs single-GPU kernel vs fp32 reference on a small problem under `mask`: max relative errors of the
  output and dq, dk, dv (three compiles: reference, single kernel, ring)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from layers import ring  # noqa: PLC0415
  from pallas_kernels import reference  # noqa: PLC0415

  t0 = time.perf_counter()
  q, k, v, do = _inputs(t, hq, hkv, d, seed=1)
  perm = ring.token_permutation(t, n, layout)
  r_ref = _out_and_grads(lambda q, k, v: reference.attention(q, k, v, mask=mask))(q, k, v, do)
  r_single = _out_and_grads(_single_fn(local_impl, mask))(q, k, v, do)
  mesh = _mesh(n)
  with jax.set_mesh(mesh):
    r_ring = _out_and_grads(_ring_fn(local_impl, mask, layout))(*_shard(mesh, q[:, perm], k[:, perm], v[:, perm], do[:, perm]))

  def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.all(np.isfinite(a)):
      return float("nan")
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

  inv = np.argsort(perm)
  return {
    "mask": mask.kind,
    "ring": n,
    "layout": layout,
    "tokens": t,
    "ring_vs_fp32_ref": max(rel(a[:, inv], b) for a, b in zip(r_ring, r_ref)),
    "single_vs_fp32_ref": max(rel(a, b) for a, b in zip(r_single, r_ref)),
    "check_s": round(time.perf_counter() - t0, 1),
  }


def _check_args(p, args) -> list[str]:
  """The masks to time; one-line usage errors (exit 2) for combinations no kernel or layout can run."""
  masks = [m for m in args.masks.split(",") if m]
  if args.bidirectional and "bidirectional" not in masks:
    masks.append("bidirectional")
  bad = [m for m in masks if m not in MASKS]
  if bad or not masks:
    p.error(f"--masks {args.masks!r}: expected a comma-separated subset of {','.join(MASKS)}")
  if args.local_impl not in ("cudnn", "flash", "xla"):
    p.error(f"--local-impl {args.local_impl!r}: expected cudnn | flash | xla")
  if args.local_impl == "cudnn" and "frame_causal" in masks:
    p.error("--local-impl cudnn cannot express the frame_causal mask; use --local-impl flash (our kernel) or xla")
  for layout in args.layouts.split(","):
    if layout not in ("zigzag", "contiguous"):
      p.error(f"--layouts {args.layouts!r}: expected a comma-separated subset of zigzag,contiguous")
  if "frame_causal" in masks:
    if args.tokens_per_frame < 1:
      p.error(f"--tokens-per-frame {args.tokens_per_frame}: must be >= 1")
    if not 0 <= args.text_tokens < args.tokens_per_device:
      p.error(f"--text-tokens {args.text_tokens}: must be in [0, --tokens-per-device={args.tokens_per_device})")
  return masks


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
  p.add_argument("--masks", default="causal", help=f"comma-separated subset of {','.join(MASKS)}")
  p.add_argument("--tokens-per-frame", type=int, default=256, help="frame_causal: tokens per video frame")
  p.add_argument("--text-tokens", type=int, default=0, help="frame_causal: token-causal text tail after the video")
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
  masks = _check_args(p, args)

  flags = _set_xla_flags(args.xla_preset)
  import jax  # noqa: PLC0415

  from layers import ring  # noqa: PLC0415

  devices = jax.devices()
  if devices[0].platform != "gpu" and not args.allow_cpu:
    print(f"vidlm bench ring: needs GPUs (found {devices[0].platform})", file=sys.stderr)
    return 2
  sizes = [x for x in args.ring_sizes if x <= len(devices)]  # in the given order
  if not sizes:
    p.error(f"--ring-sizes {args.ring_sizes}: none fits the {len(devices)} devices here")
  layouts = args.layouts.split(",")
  c, hq, hkv, d = args.tokens_per_device, args.heads, args.kv_heads, args.head_dim
  tpf, text = args.tokens_per_frame, args.text_tokens
  meta = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": f"{len(devices)}x {devices[0].device_kind}",
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "xla_preset": args.xla_preset,
    "preset_flags": flags,
    "local_impl": args.local_impl,
    "masks": masks,
    "shape": {"batch": 1, "tokens_per_device": c, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16"},
    "command": "vidlm bench ring " + " ".join(argv if argv is not None else sys.argv[1:]),
  }
  if "frame_causal" in masks:
    meta["frame_causal"] = {"tokens_per_frame": tpf, "text_tokens": text}
  print(json.dumps(meta), flush=True)
  results: dict = {"meta": meta, "checks": [], "rows": []}

  def dump():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)

  if args.check_tokens and max(sizes) > 1:
    n = max(sizes)
    for kind in masks:
      # the check's text tail is scaled with its length, so a short check still has video and text
      chk_text = text * args.check_tokens // (n * c) if kind == "frame_causal" else 0
      mask = make_mask(kind, args.check_tokens, tpf, chk_text)
      for layout in layouts if kind != "bidirectional" else ["contiguous"]:
        try:
          chk = _check(args.local_impl, n, layout, args.check_tokens, hq, hkv, d, mask)
        except Exception as e:  # noqa: BLE001
          chk = {"mask": kind, "ring": n, "layout": layout, "error": f"{type(e).__name__}: {e}"[:300]}
        print("check", json.dumps(chk), flush=True)
        results["checks"].append(chk)
        dump()

  for kind in masks:
    for n in sizes:
      t = n * c
      mask = make_mask(kind, t, tpf, text)
      flops = attention_flops(mask, t, hq, d, backward=True)
      q, k, v, do = _inputs(t, hq, hkv, d)
      try:
        fa, _ = _compile(_fwd_bwd(_single_fn(args.local_impl, mask)), (q, k, v, do))
        t_single = median_seconds(fa, (q, k, v, do), args.warmup, args.iters)
      except Exception as e:  # noqa: BLE001
        print(f"anchor {kind} N={n} failed: {type(e).__name__}: {e}"[:400], flush=True)
        continue
      row_layouts = layouts if kind != "bidirectional" else ["contiguous"]
      mesh = _mesh(n)
      times = {}
      for layout in row_layouts if n > 1 else ["contiguous"]:
        row = {
          "mask": kind,
          "ring": n,
          "layout": layout if n > 1 else "-",
          "tokens": t,
          "local_impl": args.local_impl,
          "flops_fwd_bwd": flops,
          "single_gpu_ms": 1e3 * t_single,
          "single_gpu_tflops": flops / t_single / 1e12,
        }
        if kind == "frame_causal":
          row.update(tokens_per_frame=tpf, text_tokens=text)
        try:
          perm = ring.token_permutation(t, n, layout)
          qs, ks_, vs, dos = _shard(mesh, q[:, perm], k[:, perm], v[:, perm], do[:, perm])
          rargs = (qs, ks_, vs, dos)
          with jax.set_mesh(mesh):
            f, row["compile_s"] = _compile(_fwd_bwd(_ring_fn(args.local_impl, mask, layout)), rargs)
            t_ring = median_seconds(f, rargs, args.warmup, args.iters)
            if n > 1:
              text_hlo = f.as_text()
              row["hlo"] = _hlo_collectives(text_hlo)
              if args.hlo_dir and n == max(sizes):
                with open(os.path.join(args.hlo_dir, f"ring_{kind}_{layout}_{n}.hlo.txt"), "w") as fh:
                  fh.write(text_hlo)
              f0, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, mask, layout, permute=False)), rargs)
              t_nocomm = median_seconds(f0, rargs, args.warmup, args.iters)
              row["ring_no_permute_ms"] = 1e3 * t_nocomm
              row["exposed_comm_pct"] = 100.0 * (t_ring - t_nocomm) / t_ring
              if args.barrier_variant:
                fb, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, mask, layout, barrier=False)), rargs)
                row["ring_no_barrier_ms"] = 1e3 * median_seconds(fb, rargs, args.warmup, args.iters)
              if layout == "zigzag" and kind != "bidirectional" and args.switch_variant:
                fs, _ = _compile(_fwd_bwd(_ring_fn(args.local_impl, mask, layout, uniform=False)), rargs)
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
          if (row["ring"], row["layout"], row["mask"]) == (n, "zigzag", kind):
            row["zigzag_speedup_vs_contiguous"] = times["contiguous"] / times["zigzag"]

  print()
  fc = f", frame_causal {tpf} tokens/frame + {text} text" if "frame_causal" in masks else ""
  print(
    f"ring attention fwd+bwd, {meta['device']}, local={args.local_impl}, {c} tokens/device, bf16, "
    f"{hq}q/{hkv}kv heads, D={d}, XLA preset {args.xla_preset}{fc}"
  )
  print(table(results["rows"]))
  dump()
  return 0


def table(rows: list[dict]) -> str:
  """The printed summary: one line per row, sorted by mask, ring size, layout."""
  hdr = f"{'mask':13} {'N':>2} {'layout':10} {'tokens':>7} {'ring ms':>8} {'TF/s/dev':>8} {'1-GPU ms':>8} "
  hdr += (
    f"{'1-GPU TF/s':>10} {'eff %':>6} {'nocomm ms':>9} {'exposed %':>9} {'zz x':>5} {'switch ms':>9} {'nobarr ms':>9}"
  )
  lines = [hdr]
  for r in sorted(rows, key=lambda r: (r["mask"], r["ring"], r["layout"])):
    if "error" in r:
      lines.append(f"{r['mask']:13} {r['ring']:>2} {r['layout']:10} error: {r['error'][:80]}")
      continue
    lines.append(
      f"{r['mask']:13} {r['ring']:>2} {r['layout']:10} {r['tokens']:>7} {r['ring_ms']:8.2f} {r['per_device_tflops']:8.1f} "
      f"{r['single_gpu_ms']:8.2f} {r['single_gpu_tflops']:10.1f} {r['efficiency_pct']:6.1f} "
      f"{r.get('ring_no_permute_ms', float('nan')):9.2f} {r.get('exposed_comm_pct', float('nan')):9.1f} "
      f"{r.get('zigzag_speedup_vs_contiguous', float('nan')):5.2f} {r.get('ring_switch_dispatch_ms', float('nan')):9.2f} "
      f"{r.get('ring_no_barrier_ms', float('nan')):9.2f}"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
