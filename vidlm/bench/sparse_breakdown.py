"""`vidlm bench sparse_breakdown`: where the time of a block-sparse forward + backward goes, stage by stage.

`vidlm bench sparse` times whole calls; at 128k and rho = 5 % they miss the issue-11 target (>= 0.85 / rho over
our dense kernel) by ~1.2 ms, and a fit over its rows says the loss is a per-call cost (BENCHMARKS.md, fourth
round). This bench times each stage of that call ALONE, through the very functions `pallas_kernels.ops` runs on
a GPU (`gpu.sparse_forward.sparse_forward` / `gpu.sparse_backward.sparse_backward`, taken apart at their seams):

  sparse  lists_fwd    sparse_schedule.forward_lists      layout -> per-q-block kv lists (two row sorts)
          fwd_kernel   sparse_forward.forward_call        the forward kernel on those lists
          bwd_prep     backward.backward_inputs           delta = rowsum(out * dO), lse in log2 units (XLA)
          lists_bwd    sparse_schedule.backward_lists     the transposed kv -> q lists for dK/dV (one sort)
          dkv_items    sparse_schedule.dkv_items          dK/dV work items, split runs, partial slots
          dq_kernel    sparse_backward._dq_call           the dQ kernel
          dkv_kernel   sparse_backward._dkv_call          the dK/dV kernel (whole items + fp32 partials)
          merge        sparse_schedule.merge_partials     dK and dV: partial sums (one lax.cond: skipped if no
                                                      split; standalone it also copies dK / dV, its parameters)
          fwd_total / bwd_total / fwd_bwd_total           sparse_forward, sparse_backward, both in one program
          ops_fwd_bwd  jit(grad) through pallas_kernels.ops (GPU only: what `vidlm bench sparse` times)
  dense   fwd_kernel (forward.flash_forward), bwd_prep, dq_kernel (backward._dq_call), dkv_kernel
          (backward.dkv_grads), bwd_total (flash_backward), fwd_bwd_total, ops_fwd_bwd
sparse_backward takes the forward's lists (`ops` keeps them as custom_vjp residuals), so its stages are lists_bwd +
dkv_items + bwd_prep + dq_kernel + dkv_kernel + merge; `stage_sum_ms` adds them that way, and
`unaccounted_ms` = total - stage sum (launch gaps; negative where XLA fuses or overlaps stages in one program).

Per stage: median ms of --iters calls (each synchronised; compile and --warmup calls excluded) and `queued_ms`
(--iters calls issued back to back, one sync: hides the host round trip that dominates sub-ms stages); inputs
are random normal (never zeros), out / lse the kernel's own forward. Work counted per stage: listed tiles
(128 x 128, over query heads), GEMM FLOPs of what the kernel computes (forward 2 GEMMs per tile, dQ 3, dK/dV 4:
4, 6, 8 x D x 128 x 128), the bytes of its arguments and results (each read / written once) and, for kernels,
the operand bytes their tiles load (K + V per forward / dQ tile, Q + dO per dK/dV tile); ns per listed tile.
Fit over the densities (same CTAs, different tile counts): ms = fixed + per_tile x tiles per stage, with
fixed as SM-microseconds per CTA (fixed x SMs / CTAs) for the kernels. Attribution at each density: stage ms
against rho x the dense counterpart (kernels, bwd_prep; 0 for the list stages and the merge) and the target.

--dump-dir DIR (GPU): the ptxas resource report (registers, spills, stack, shared memory) of the sparse forward /
dQ / dK/dV kernels and the dense ones, from Mosaic GPU's MOSAIC_GPU_DUMP_PTXAS (jaxlib
mosaic/gpu/assembly_to_binary.cc: the ptxas log goes to stdout when MOSAIC_GPU_DUMP_TO is unset), captured at the
file-descriptor level while those programs compile and first run -> DIR/ptxas.txt, parsed into the JSON.
On CPU the kernels run in Mosaic GPU interpret mode (times are meaningless; the tests use it to check plumbing).
Run: `PYTHONPATH=. python3 -m vidlm.bench.sparse_breakdown --out benchmarks/sparse_breakdown_h200.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from vidlm.bench import sparse_layouts as sl
from vidlm.bench.sparse import Programs, float_list, loss_grad, write_json
from vidlm.cli import UsageParser
from vidlm.config import ConfigError

GEMMS = {"fwd_kernel": 2, "dq_kernel": 3, "dkv_kernel": 4}  # 128 x 128 x D GEMMs per listed tile and query head
DENSE_OF = {"fwd_kernel": "fwd_kernel", "bwd_prep": "bwd_prep", "dq_kernel": "dq_kernel", "dkv_kernel": "dkv_kernel"}
SPARSE_FWD = ("lists_fwd", "fwd_kernel")
SPARSE_BWD = ("lists_bwd", "dkv_items", "bwd_prep", "dq_kernel", "dkv_kernel", "merge")
DENSE_FWD, DENSE_BWD = ("fwd_kernel",), ("bwd_prep", "dq_kernel", "dkv_kernel")
DUMP_ENV = "MOSAIC_GPU_DUMP_PTXAS"


@dataclasses.dataclass
class Stage:
  """One jitted program: fn(*env[inputs]) -> env[output]; dump = capture its ptxas report."""

  name: str
  fn: Callable
  inputs: tuple[str, ...]
  output: str | None = None
  dump: bool = False


# ---------------------------------------------------------------------------------------------------------------
# The stages, through the kernel modules' own functions
# ---------------------------------------------------------------------------------------------------------------


def sparse_stages(mask, shp, hq: int, hkv: int, scale: float, interpret: bool, dump: bool, with_ops: bool):
  from pallas_kernels import ops  # noqa: PLC0415
  from pallas_kernels.gpu import sparse_schedule as ss  # noqa: PLC0415
  from pallas_kernels.gpu.backward import backward_inputs  # noqa: PLC0415
  from pallas_kernels.gpu.sparse_backward import _dkv_call, _dq_call, sparse_backward  # noqa: PLC0415
  from pallas_kernels.gpu.sparse_forward import forward_call, sparse_forward  # noqa: PLC0415

  kw = dict(mask=mask, scale=scale, interpret=interpret)

  def merge(dkv, extra):
    _, slot_run, run_block = extra
    return ss.merge_partials(*dkv, slot_run, run_block)

  def fwd_bwd(q, k, v, do, lay):  # what ops' custom_vjp runs: the backward walks the forward's lists
    (out, lse), fl = sparse_forward(q, k, v, None, lay, return_lists=True, **kw)
    return out, sparse_backward(q, k, v, None, lay, out, lse, do, fwd_lists=fl, **kw)

  stages = [
    Stage("lists_fwd", lambda lay: ss.forward_lists(mask, lay, shp), ("layout",), "fwd_lists"),
    Stage("fwd_kernel", lambda fl, q, k, v: forward_call(fl, shp, q, k, v, None, **kw), ("fwd_lists", "q", "k", "v"),
          "out_lse", dump),
    Stage("bwd_prep", lambda ol, do: backward_inputs(ol[0], ol[1], do), ("out_lse", "do"), "delta_lse2"),
    Stage("lists_bwd", lambda fl: ss.backward_lists(fl, shp), ("fwd_lists",), "bwd_lists"),
    Stage("dkv_items", lambda bl: ss.dkv_items(bl, shp, hq, hkv), ("bwd_lists",), "items"),
    Stage("dq_kernel", lambda fl, q, k, v, do, dl: _dq_call(fl, shp, q, k, v, do, dl[1], dl[0], None, **kw),
          ("fwd_lists", "q", "k", "v", "do", "delta_lse2"), None, dump),
    Stage("dkv_kernel", lambda bl, it, q, k, v, do, dl: _dkv_call(bl, it[0], shp, q, k, v, do, dl[1], dl[0], None, **kw),
          ("bwd_lists", "items", "q", "k", "v", "do", "delta_lse2"), "dkv", dump),
    Stage("merge", merge, ("dkv", "items")),
    Stage("fwd_total", lambda q, k, v, lay: sparse_forward(q, k, v, None, lay, **kw), ("q", "k", "v", "layout")),
    Stage("bwd_total", lambda q, k, v, lay, ol, do, fl: sparse_backward(q, k, v, None, lay, ol[0], ol[1], do,
                                                                         fwd_lists=fl, **kw),
          ("q", "k", "v", "layout", "out_lse", "do", "fwd_lists")),
    Stage("fwd_bwd_total", fwd_bwd, ("q", "k", "v", "do", "layout")),
  ]
  if with_ops:
    stages.append(Stage("ops_fwd_bwd", loss_grad(lambda q, k, v, lay: ops.flash_attention(q, k, v, mask=mask, layout=lay)),
                        ("q", "k", "v", "do", "layout")))
  return stages


def dense_stages(mask, d: int, scale: float, interpret: bool, dump: bool, with_ops: bool):
  from pallas_kernels import ops  # noqa: PLC0415
  from pallas_kernels.gpu import backward, common  # noqa: PLC0415
  from pallas_kernels.gpu.forward import flash_forward  # noqa: PLC0415

  cfg = common.default_config(d)
  kw = dict(mask=mask, scale=scale, interpret=interpret)

  def fwd_bwd(q, k, v, do):
    out, lse = flash_forward(q, k, v, None, **kw)
    return out, backward.flash_backward(q, k, v, None, out, lse, do, **kw)

  stages = [
    Stage("fwd_kernel", lambda q, k, v: flash_forward(q, k, v, None, **kw), ("q", "k", "v"), "out_lse", dump),
    Stage("bwd_prep", lambda ol, do: backward.backward_inputs(ol[0], ol[1], do), ("out_lse", "do"), "delta_lse2"),
    Stage("dq_kernel", lambda q, k, v, do, dl: backward._dq_call(q, k, v, do, dl[1], dl[0], None, cfg=cfg, **kw),
          ("q", "k", "v", "do", "delta_lse2"), None, dump),
    Stage("dkv_kernel", lambda q, k, v, do, dl: backward.dkv_grads(q, k, v, do, dl[1], dl[0], None, cfg=cfg, **kw),
          ("q", "k", "v", "do", "delta_lse2"), None, dump),
    Stage("bwd_total", lambda q, k, v, ol, do: backward.flash_backward(q, k, v, None, ol[0], ol[1], do, **kw),
          ("q", "k", "v", "out_lse", "do")),
    Stage("fwd_bwd_total", fwd_bwd, ("q", "k", "v", "do")),
  ]
  if with_ops:
    stages.append(Stage("ops_fwd_bwd", loss_grad(lambda q, k, v: ops.flash_attention(q, k, v, mask=mask)),
                        ("q", "k", "v", "do")))
  return stages


# ---------------------------------------------------------------------------------------------------------------
# Running: abstract shapes -> compile all (thread pool) -> run in order, timing each on the previous outputs
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_stdout_fd(path: str | None, header: str):
  """Append what C++ writes to fd 1 (Mosaic GPU's ptxas log) to `path` under a header; no-op when path is None."""
  if path is None:
    yield
    return
  sys.stdout.flush()
  saved = os.dup(1)
  with open(path, "a") as f:
    f.write(f"===== {header}\n")
    f.flush()
    os.dup2(f.fileno(), 1)
    prev = os.environ.get(DUMP_ENV)
    os.environ[DUMP_ENV] = "1"
    try:
      yield
    finally:
      sys.stdout.flush()
      os.dup2(saved, 1)
      os.close(saved)
      if prev is None:
        os.environ.pop(DUMP_ENV, None)
      else:
        os.environ[DUMP_ENV] = prev


def _nbytes(tree) -> int:
  import jax  # noqa: PLC0415

  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def run_pipeline(tag: str, stages: list[Stage], env: dict, progs: Programs, a, dump_file: str | None) -> dict:
  """{stage: {ms, queued_ms, compile_s, io_bytes}}: compile every stage (dumped kernels first, one at a time,
  under the fd capture: the Mosaic kernel cache would otherwise hand them over already built), then run them in
  order, each on the outputs of the ones before."""
  import jax  # noqa: PLC0415

  items = [((tag, st.name), st.fn, args, st) for st, args in zip(stages, abstract_args(stages, env), strict=True)]
  dumped = [(k, f, ar) for k, f, ar, st in items if st.dump and dump_file]
  for k, f, ar in dumped:
    with capture_stdout_fd(dump_file, f"{tag} {k[1]} (compile)"):
      progs.compile([(k, f, ar)])
  progs.compile([(k, f, ar) for k, f, ar, st in items if not (st.dump and dump_file)])
  res: dict = {}
  for key, _, _, st in items:
    args = tuple(env[k] for k in st.inputs)
    exe, compile_s = progs.done[key]
    row: dict = {"compile_s": compile_s}
    if isinstance(exe, Exception):
      row["error"] = f"{type(exe).__name__}: {(str(exe).splitlines() or [''])[0][:300]}"
      res[st.name] = row
      print(f"  {tag:>14} {st.name:<14} error: {row['error']}", flush=True)
      if st.output:
        raise RuntimeError(f"{tag} {st.name} failed; later stages need its output: {row['error']}")
      continue
    ctx = capture_stdout_fd(dump_file, f"{tag} {st.name} (first call)") if st.dump and dump_file else contextlib.nullcontext()
    with ctx:
      t0 = time.perf_counter()
      out = jax.block_until_ready(exe(*args))
      first = time.perf_counter() - t0
    if st.output:
      env[st.output] = out
    # --warmup 0: the first call is a sample too (interpret-mode tests); otherwise it is one more warm-up
    row.update(time_calls(exe, args, a.warmup, a.iters - (a.warmup == 0), [first] if a.warmup == 0 else []))
    row["io_bytes"] = _nbytes(args) + _nbytes(out)
    res[st.name] = row
    print(f"  {tag:>14} {st.name:<14} {row['ms']:9.3f} ms  (queued {row['queued_ms']:9.3f} ms)", flush=True)
  return res


def abstract_args(stages: list[Stage], env: dict) -> list[tuple]:
  """Each stage's arguments as ShapeDtypeStructs (outputs of earlier stages by jax.eval_shape): lowering needs
  no concrete input, so every program compiles before any runs (and cross-lowers for CUDA on a CPU)."""
  import jax  # noqa: PLC0415

  absenv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), env)
  out = []
  for st in stages:
    args = tuple(absenv[k] for k in st.inputs)
    if st.output:
      absenv[st.output] = jax.eval_shape(st.fn, *args)
    out.append(args)
  return out


def time_calls(exe, args, warmup: int, iters: int, samples: list[float] | None = None) -> dict:
  """Median ms of synchronised calls, and mean ms of calls queued back to back (one sync at the end; iters > 1)."""
  import jax  # noqa: PLC0415

  for _ in range(warmup):
    jax.block_until_ready(exe(*args))
  ts = list(samples or [])
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(exe(*args))
    ts.append(time.perf_counter() - t0)
  queued = statistics.median(ts)  # one call: queued and synchronised are the same thing
  if iters > 1:
    t0 = time.perf_counter()
    outs = [exe(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    queued = (time.perf_counter() - t0) / iters
    del outs
  return {"ms": 1e3 * statistics.median(ts), "queued_ms": 1e3 * queued, "min_ms": 1e3 * min(ts)}


# ---------------------------------------------------------------------------------------------------------------
# Derived numbers: work per stage, stage sums, the fit, the attribution against the dense kernel
# ---------------------------------------------------------------------------------------------------------------


def annotate(stages: dict, tiles: int, d: int, block: int, ctas: dict, n_sm: int | None) -> None:
  """Work per stage (in place): tiles, GEMM FLOPs, TFLOP/s, ns per tile, operand bytes the tiles load."""
  tile_operand = 2 * block * d * 2  # bf16 K + V (forward, dQ) or Q + dO (dK/dV) of one 128-row tile
  for name, r in stages.items():
    if "ms" not in r:
      continue
    r["tiles"] = tiles
    r["ns_per_tile"] = r["ms"] * 1e6 / tiles
    r["io_gbps"] = r["io_bytes"] / r["ms"] / 1e6
    if name in GEMMS:
      r["gemm_flops"] = 2 * GEMMS[name] * d * block * block * tiles
      r["tflops"] = r["gemm_flops"] / r["ms"] / 1e9
      r["tile_operand_bytes"] = tile_operand * tiles
      r["tile_operand_tbps"] = r["tile_operand_bytes"] / r["ms"] / 1e9
    if name in ctas:
      r["ctas"] = ctas[name]
      if n_sm:
        r["waves"] = ctas[name] / n_sm


def stage_sums(stages: dict, fwd: tuple, bwd: tuple) -> dict:
  out = {}
  for part, names, total in (("fwd", fwd, "fwd_total"), ("bwd", bwd, "bwd_total"), ("fwd_bwd", fwd + bwd, "fwd_bwd_total")):
    if all("ms" in stages.get(n, {}) for n in (*names, total)):
      s = sum(stages[n]["ms"] for n in names)
      out[part] = {"stages": list(names), "stage_sum_ms": s, "total_ms": stages[total]["ms"],
                   "unaccounted_ms": stages[total]["ms"] - s}
  return out


def fit(rows: list[dict], n_sm: int | None) -> dict:
  """Per stage, over the densities: ms = fixed + per_tile * tiles (least squares; needs 2 distinct tile counts)."""
  tiles = np.array([r["tiles"] for r in rows], float)
  if len(set(tiles.tolist())) < 2:
    return {"note": "needs at least two densities with different listed tile counts"}
  out = {}
  for name in rows[0]["stages"]:
    if not all("ms" in r["stages"].get(name, {}) for r in rows):
      continue
    ms = np.array([r["stages"][name]["ms"] for r in rows])
    per_tile, fixed = np.polyfit(tiles, ms, 1)
    f = {"fixed_ms": float(fixed), "per_tile_ns": float(per_tile * 1e6)}
    ctas = {r["stages"][name].get("ctas") for r in rows}
    if n_sm and len(ctas) == 1 and None not in ctas:
      f["fixed_sm_us_per_cta"] = float(fixed) * 1e3 * n_sm / ctas.pop()
    out[name] = f
  return out


def attribute(row: dict, dense: dict, target_eff: float = 0.85) -> dict:
  """Sparse stage ms against rho x its dense counterpart; the target time and the miss."""
  rho = row["density"]
  st, dn = row["stages"], dense["stages"]
  parts = []
  for name in SPARSE_FWD + SPARSE_BWD:  # disjoint: the backward walks the forward's lists, it does not rebuild them
    if "ms" not in st.get(name, {}):
      continue
    ideal = rho * dn[DENSE_OF[name]]["ms"] if name in DENSE_OF and "ms" in dn.get(DENSE_OF[name], {}) else 0.0
    parts.append({"stage": name, "ms": st[name]["ms"], "ideal_ms": ideal, "excess_ms": st[name]["ms"] - ideal})
  out: dict = {"parts": sorted(parts, key=lambda p: -p["excess_ms"])}
  if "ms" in st.get("fwd_bwd_total", {}) and "ms" in dn.get("fwd_bwd_total", {}):
    total, dense_total = st["fwd_bwd_total"]["ms"], dn["fwd_bwd_total"]["ms"]
    out.update(sparse_ms=total, dense_ms=dense_total, speedup=dense_total / total, target_speedup=target_eff / rho,
               ideal_ms=rho * dense_total, target_ms=rho * dense_total / target_eff,
               over_target_ms=total - rho * dense_total / target_eff,
               unaccounted_ms=(total - sum(p["ms"] for p in parts))
               - rho * (dense_total - sum(dn[n]["ms"] for n in DENSE_FWD + DENSE_BWD)))
  return out


_PTXAS_RE = {
  "registers": r"Used (\d+) registers",
  "spill_stores_bytes": r"(\d+) bytes spill stores",
  "spill_loads_bytes": r"(\d+) bytes spill loads",
  "stack_frame_bytes": r"(\d+) bytes stack frame",
  "smem_bytes": r"(\d+) bytes smem",
}


def parse_ptxas(path: str) -> dict:
  """{section header: {registers, spills, ...}} from the captured ptxas logs (each kernel's last report)."""
  out: dict = {}
  text = open(path).read() if os.path.exists(path) else ""
  for sec in text.split("===== ")[1:]:
    head, _, body = sec.partition("\n")
    found = {k: [int(x) for x in re.findall(p, body)] for k, p in _PTXAS_RE.items()}
    found = {k: v for k, v in found.items() if v}
    if found:
      out[head.strip()] = found
  return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = UsageParser(prog="vidlm bench sparse_breakdown", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqlen", type=int, default=131072)
  p.add_argument("--densities", type=float_list, default="0.125,0.05", help="random-layout densities (>= 2 for the fit)")
  p.add_argument("--mask", choices=("causal", "frame_causal"), default="causal")
  p.add_argument("--tokens-per-frame", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=0, help="0: = --heads")
  p.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
  p.add_argument("--block", type=int, default=128, choices=(128,), help="layout block (the sparse kernels take 128)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1))
  p.add_argument("--no-dense", action="store_true", help="skip the dense anchor stages")
  p.add_argument("--dump-dir", default=None, help="write DIR/ptxas.txt: ptxas resource reports of the kernels (GPU)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/sparse_breakdown.json")
  a = p.parse_args(argv)
  a.kv_heads = a.kv_heads or a.heads
  for flag, value, low in (("--seqlen", a.seqlen, 1), ("--heads", a.heads, 1), ("--iters", a.iters, 1),
                           ("--warmup", a.warmup, 0), ("--compile-workers", a.compile_workers, 1)):
    if value < low:
      p.error(f"{flag}={value}: must be >= {low}")
  if a.seqlen % a.block or (a.mask == "frame_causal" and a.seqlen % a.tokens_per_frame):
    p.error(f"--seqlen {a.seqlen}: must be a multiple of --block={a.block} (and of --tokens-per-frame for frame_causal)")
  if a.heads % a.kv_heads:
    p.error(f"--kv-heads={a.kv_heads}: must divide --heads={a.heads}")
  return a


def main(argv: list[str] | None = None) -> int:
  try:
    return _main(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _main(argv: list[str] | None) -> int:
  a = parse_args(argv)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import ops  # noqa: PLC0415
  from pallas_kernels.gpu import sparse_schedule as ss  # noqa: PLC0415

  dev = jax.devices()[0]
  on_gpu = jax.default_backend() == "gpu"
  n_sm = getattr(dev, "core_count", None) if on_gpu else None
  t, hq, hkv, d, bs = a.seqlen, a.heads, a.kv_heads, a.head_dim, a.block
  scale = d**-0.5
  dump_file = None
  if a.dump_dir:
    os.makedirs(a.dump_dir, exist_ok=True)
    dump_file = os.path.join(a.dump_dir, "ptxas.txt")
    open(dump_file, "w").close()
  mask = sl.make_mask(a.mask, a.tokens_per_frame)
  out: dict = {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": dev.device_kind,
      "backend": jax.default_backend(), "interpret": not on_gpu, "jax": jax.__version__, "dtype": "bfloat16",
      "T": t, "Hq": hq, "Hkv": hkv, "D": d, "block": bs, "mask": a.mask, "batch": 1, "sms": n_sm,
      "warmup": a.warmup, "iters": a.iters,
      "command": "vidlm bench sparse_breakdown " + " ".join(sys.argv[1:] if argv is None else argv),
    },
    "dense": None, "sparse": [], "fit": None, "attribution": [],
  }
  print(json.dumps(out["meta"]), flush=True)
  start = time.monotonic()
  ks = jax.random.split(jax.random.key(a.seed), 5)
  q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.bfloat16) for kk in ks[1:3])
  do = jax.random.normal(ks[3], (1, t, hq, d), jnp.bfloat16)
  n_q = n_k = t // bs
  allowed = int(sl.allowed_blocks(mask, n_q, n_k, bs, bs).sum())
  progs = Programs(a.compile_workers)

  if not a.no_dense:
    env = {"q": q, "k": k, "v": v, "do": do}
    st = run_pipeline("dense", dense_stages(mask, d, scale, not on_gpu, True, on_gpu), env, progs, a, dump_file)
    annotate(st, allowed * hq, d, bs, {}, n_sm)
    out["dense"] = {"tiles": allowed * hq, "stages": st, "sums": stage_sums(st, DENSE_FWD, DENSE_BWD)}
    write_json(a.out, out)

  for i, rho in enumerate(a.densities):
    layout = sl.random_layout(jax.random.fold_in(ks[4], i), mask, rho, t, t, bs, bs, hkv, hq)
    reason = ops.unsupported_reason(q, k, v, mask=mask, layout=layout, backend="gpu")
    if reason is not None:
      raise ConfigError(f"vidlm bench sparse_breakdown: the GPU block-sparse kernels cannot run this layout: {reason}")
    stats = sl.layout_stats(layout, mask, 1, hq, t, t, "gpu")
    shp = ss.shape_of(layout, t)
    env = {"q": q, "k": k, "v": v, "do": do, "layout": layout}
    stages = sparse_stages(mask, shp, hq, hkv, scale, not on_gpu, i == 0, on_gpu)
    st = run_pipeline(f"sparse {rho:g}", stages, env, progs, a, dump_file)
    n_items = env["items"][0].shape[-1]
    slots = np.asarray(env["items"][0][..., 3, :])
    ctas = {"fwd_kernel": hq * n_q, "dq_kernel": hq * n_q, "dkv_kernel": hkv * n_items}
    annotate(st, stats["tiles_computed"], d, bs, ctas, n_sm)
    row = {
      "density_requested": rho, "density": stats["density"], "tiles": stats["tiles_computed"],
      "layout_shape": stats["layout_shape"],
      "dkv": {"items_launched": hkv * n_items, "items_live": int((slots >= -1).sum()),
              "split_chunks": int((slots >= 0).sum()), "partial_slots": ss.dkv_slots(shp),
              "max_fwd_list": int(np.asarray(env["fwd_lists"][1]).max())},
      "stages": st, "sums": stage_sums(st, SPARSE_FWD, SPARSE_BWD),
    }
    if out["dense"] is not None:
      out["attribution"].append({"density": row["density"], **attribute(row, out["dense"])})
    out["sparse"].append(row)
    del env
    write_json(a.out, out)

  if len(out["sparse"]) >= 2:
    out["fit"] = fit(out["sparse"], n_sm)
  if dump_file:
    out["ptxas"] = parse_ptxas(dump_file)
    out["meta"]["ptxas_file"] = dump_file
  out["meta"]["wall_s"] = time.monotonic() - start
  write_json(a.out, out)
  _print_summary(out)
  print(f"wrote {a.out}")
  return 0


def _print_summary(out: dict) -> None:
  names = sorted({n for r in out["sparse"] for n in r["stages"]}, key=lambda n: [*SPARSE_BWD, *SPARSE_FWD].index(n)
                 if n in (*SPARSE_BWD, *SPARSE_FWD) else 99)
  print(f"\nsummary ({out['meta']['device']}, T={out['meta']['T']}, {out['meta']['wall_s']:.0f} s): ms per stage")
  head = f"{'stage':<14} {'dense':>9}" + "".join(f" {'rho ' + format(r['density'], '.3f'):>11}" for r in out["sparse"])
  head += f" {'fixed ms':>9} {'ns/tile':>8} {'us/CTA':>7}"
  print(head)
  fits = out["fit"] if isinstance(out["fit"], dict) else {}
  for n in names:
    dn = (out["dense"] or {}).get("stages", {}).get(n, {}).get("ms")
    f = fits.get(n, {})
    line = f"{n:<14} {dn if dn is not None else float('nan'):>9.3f}"
    line += "".join(f" {r['stages'].get(n, {}).get('ms', float('nan')):>11.3f}" for r in out["sparse"])
    line += f" {f.get('fixed_ms', float('nan')):>9.3f} {f.get('per_tile_ns', float('nan')):>8.2f}"
    line += f" {f.get('fixed_sm_us_per_cta', float('nan')):>7.2f}"
    print(line)
  for att in out["attribution"]:
    if "sparse_ms" in att:
      print(f"rho {att['density']:.3f}: fwd+bwd {att['sparse_ms']:.2f} ms, target {att['target_ms']:.2f} ms "
            f"(over by {att['over_target_ms']:.2f}); excess over rho x dense: "
            + ", ".join(f"{p['stage']} {p['excess_ms']:.2f}" for p in att["parts"][:4])
            + f", unaccounted {att['unaccounted_ms']:.2f}")


if __name__ == "__main__":
  raise SystemExit(main())
