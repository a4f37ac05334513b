"""`vidlm bench sparse`: block-sparse attention (our kernel walking a BlockLayout) against our dense flash kernel
and cuDNN in the same run, for random layouts and each selector's real layout (issue 11 item 4).

Per (length T, mask, layout, density rho): forward and forward+backward time of
  sparse  pallas_kernels.ops.flash_attention(q, k, v, mask=, layout=)     (the platform's kernel, no fallback)
  dense   the same call without a layout (same mask): the anchor the speedup divides
  cuDNN   jax.nn.dot_product_attention(implementation="cudnn"), where it can express the mask (causal only;
          frame-causal would need a dense [T, S] mask argument: not run, the table says so)
and: speedup = dense / sparse, the issue's target 0.85 / rho, fraction of ideal = speedup * rho (1 = a listed
block costs what a dense block costs); the selector's own time as a share of the dense forward (and fwd+bwd)
time; layout memory: kv_indices + kv_counts, and the lists the kernel builds from them (its compacted forward
copies and the transposed kv -> q lists for dK/dV, sized by jax.eval_shape of the kernel's own builder:
gpu.sparse_schedule.build on GPU, tpu.schedule._list_scheds on TPU / CPU) against a dense [T, S] bool mask.

Density rho = listed tiles the mask does not make EMPTY / all tiles the mask does not make EMPTY, measured on the
layout that was timed. Layouts:
  random      per q block its own (diagonal) blocks plus uniformly random other mask-allowed blocks; each row
              gets a share of the target proportional to its allowed blocks (largest remainder, so the total
              hits rho * allowed tiles exactly unless the forced own blocks alone exceed it). Built on device,
              one random choice per kv head (a GQA group shares it, as the selectors do).
  moba, static, xattention, vmoba   `layers.sparse.make_selector` on random q / k, with the parameter that
              sets the density (moba top_k; static window and frame_globals; xattention tau; vmoba top_k with
              threshold 0, temporal chunks of one frame, layer 0) chosen on the host from the mask's block
              structure to land near rho. The measured density is what the row reports.
FLOPs (tile basis, what the kernels compute): forward 4 * D * block_q * block_kv per listed non-EMPTY tile per
query head; fwd+bwd 3.5x that (timed as jit(grad) of sum(out * dO), which includes the forward), as in
`vidlm bench attention`. The dense anchor is counted the same way over all non-EMPTY tiles (for causal this is
4 T S D H / 2 * (1 + 1 / nQ): the diagonal tiles' masked halves, which attention.py's count leaves out).
Timing: compile (recorded), warm-up, median of --iters calls of the compiled executable on random normal inputs.
A correctness check first compares the sparse kernel with the fp32 reference given the same layout (forward and
gradients, fresh random inputs). On CPU the kernel is the TPU kernel in interpret mode (tests use tiny sizes);
if the backend cannot run a layout the bench stops with one line saying why (it never times the reference).
JSON (--out) is rewritten after every case, so a run cut short keeps what it measured; --budget-s stops starting
new cases (listed under not_run). Needs no data stack. Run: `PYTHONPATH=. python3 -m vidlm.bench.sparse --out x.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vidlm.bench import sparse_layouts as sl
from vidlm.bench.timing import matmul_tflops, median_seconds
from vidlm.cli import UsageParser, int_list
from vidlm.config import ConfigError

MASKS = ("causal", "frame_causal")
LAYOUTS = ("random", "moba", "static", "xattention", "vmoba")
MODES = ("fwd", "fwd+bwd")
BWD_FACTOR = 3.5  # fwd+bwd FLOPs / fwd FLOPs (dQ, dK, dV and the recomputed P: 2.5x, plus the forward)
TARGET_EFFICIENCY = 0.85  # issue 11: speedup >= 0.85 / rho
CHECK_TOL = 2e-2  # ||sparse - fp32 reference|| / ||reference||, bf16 inputs (METHOD: 1e-3..1e-2 expected)


def float_list(text: str) -> list[float]:
  """argparse type: comma-separated densities in (0, 1]."""
  try:
    values = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}") from None
  if not values or not all(0.0 < x <= 1.0 for x in values):
    raise argparse.ArgumentTypeError(f"expected comma-separated densities in (0, 1], got {text!r}")
  return values


def name_list(choices: tuple[str, ...]):
  def parse(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in choices]
    if not values or bad:
      raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
    return values

  return parse


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def loss_grad(f):
  """jit-able grad over (q, k, v) of sum(f(q, k, v, ...) * dO): the fwd+bwd program the sparse benches time."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  def loss(q, k, v, do, *rest):
    return jnp.sum(f(q, k, v, *rest).astype(jnp.float32) * do.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


class Programs:
  """Compile many programs before timing any: lower each (Python, serial), then compile them in a thread pool
  (XLA compiles outside the GIL; a sparse fwd+bwd program is seconds of backend compile on a GPU, and a full run
  has ~50 per length and mask), then time them one at a time on an idle host. Programs under one key (same
  function, same argument shapes: e.g. two layouts of equal width) compile once."""

  def __init__(self, workers: int):
    self.workers = workers
    self.done: dict = {}  # key -> (executable or the exception that stopped it, compile seconds)

  def compile(self, items) -> dict:
    """items: (key, fn, args). Returns the phase's counts and seconds (for the JSON)."""
    import jax  # noqa: PLC0415

    t0 = time.perf_counter()
    lowered: dict = {}
    for key, fn, args in items:
      if key in self.done or key in lowered:
        continue
      try:
        lowered[key] = jax.jit(fn).lower(*args)
      except Exception as e:  # noqa: BLE001  (reported on the row that needs it)
        self.done[key] = (e, 0.0)
    t1 = time.perf_counter()

    def one(lo):
      ts = time.perf_counter()
      try:
        return lo.compile(), time.perf_counter() - ts
      except Exception as e:  # noqa: BLE001
        return e, time.perf_counter() - ts

    with ThreadPoolExecutor(max(1, min(self.workers, len(lowered)))) as pool:
      self.done.update(zip(lowered, pool.map(one, lowered.values())))
    return {"programs": len(lowered), "lower_s": t1 - t0, "compile_wall_s": time.perf_counter() - t1}

  def run(self, key, args):
    exe, _ = self.done[key]
    if isinstance(exe, Exception):
      raise exe
    return exe(*args)

  def time(self, key, args, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, compile seconds of the program)."""
    exe, compile_s = self.done[key]
    if isinstance(exe, Exception):
      raise exe
    return 1e3 * median_seconds(exe, args, warmup, iters), compile_s


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_kernel(mask_name: str, mask, t: int, hq: int, hkv: int, d: int, block: int, seed: int) -> dict:
  """Sparse kernel vs the fp32 reference with the same random layout (rho 0.25): forward and gradients."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import ops, reference  # noqa: PLC0415

  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.bfloat16) for kk in ks[1:3])
  do = jax.random.normal(ks[3], (1, t, hq, d), jnp.bfloat16)
  layout = sl.random_layout(ks[4], mask, 0.25, t, t, block, block, hkv, hq)
  require_layout_kernel(q, k, v, mask, layout)

  def kernel(q, k, v, lay):
    return ops.flash_attention(q, k, v, mask=mask, layout=lay)

  def ref(q, k, v, lay):
    return reference.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask,
                               layout=lay)

  def both(q, k, v, do, lay):
    return (kernel(q, k, v, lay), *loss_grad(kernel)(q, k, v, do, lay)), (ref(q, k, v, lay), *loss_grad(ref)(q, k, v, do, lay))

  # the fp32 reference's dots would each run XLA's GEMM autotuner on a GPU (seconds each): off for the check
  opts = {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
  got, want = jax.jit(both, compiler_options=opts)(q, k, v, do, layout)
  errs = {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  ok = all(math.isfinite(e) and e <= CHECK_TOL for e in errs.values())
  return {"mask": mask_name, "tokens": t, "rel_err": errs, "ok": ok, "tol": CHECK_TOL}


def require_layout_kernel(q, k, v, mask, layout) -> None:
  """One line and stop when the platform's kernel cannot run this layout (never time a fallback)."""
  from pallas_kernels import ops  # noqa: PLC0415

  reason = ops.unsupported_reason(q, k, v, mask=mask, layout=layout)
  if reason is not None:
    raise ConfigError(f"vidlm bench sparse: the {ops.default_backend()} flash kernel cannot run a BlockLayout: {reason}")


def cudnn_reason(mask_name: str) -> str | None:
  import jax  # noqa: PLC0415

  if jax.default_backend() != "gpu":
    return f"cuDNN needs a GPU (backend is {jax.default_backend()})"
  if mask_name != "causal":
    return "cuDNN takes this mask only as a dense [T, S] argument (is_causal / local windows cannot express it)"
  return None


# ---------------------------------------------------------------------------------------------------------------
# One length x mask: compile (anchors, selectors), time anchors, build layouts, compile sparse programs, time them
# ---------------------------------------------------------------------------------------------------------------


def _err(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _phase(out: dict, base: dict, name: str, counts: dict) -> None:
  out["phases"].append({**base, "phase": name, **counts})
  print(f"  compiled {counts['programs']} {name} programs: lowering {counts['lower_s']:.1f} s, compiling "
        f"{counts['compile_wall_s']:.1f} s", flush=True)


def _past(deadline: float | None) -> bool:
  return deadline is not None and time.monotonic() > deadline


def run_length(t: int, mask_name: str, a, hq: int, hkv: int, out: dict, deadline: float | None) -> None:
  """Anchor rows (dense ours, cuDNN) and sparse rows for one (T, mask), appended to out as they are measured."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import ops  # noqa: PLC0415

  d, bs, tpf = a.head_dim, a.block, a.tokens_per_frame
  base = {"T": t, "mask": mask_name, "Hq": hq, "Hkv": hkv, "D": d, "block": bs}
  cases = [{**base, "layout": n, "density_requested": r} for n in a.layouts for r in a.densities]
  if _past(deadline):
    out["not_run"] += [{**c, "why": "--budget-s reached"} for c in cases]
    return
  mask = sl.make_mask(mask_name, tpf)
  ks = jax.random.split(jax.random.key(7 * t + len(mask_name)), 6)
  q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.bfloat16) for kk in ks[1:3])
  do = jax.random.normal(ks[3], (1, t, hq, d), jnp.bfloat16)
  n_q = n_k = t // bs
  allowed = sl.allowed_blocks(mask, n_q, n_k, bs, bs)
  own = sl.own_matrix(allowed, bs, bs)
  # fail fast, before any compile or timing, when the kernel cannot run a layout at this shape
  require_layout_kernel(q, k, v, mask, sl.random_layout(ks[4], mask, a.densities[0], t, t, bs, bs, hkv, hq))
  progs = Programs(a.compile_workers)

  def args_for(mode, *extra):
    return (q, k, v, *extra) if mode == "fwd" else (q, k, v, do, *extra)

  def program(f, mode, *extra):
    return (f if mode == "fwd" else loss_grad(f)), args_for(mode, *extra)

  # phase 1: compile the anchors and the selectors
  impls = {"dense": lambda q, k, v: ops.flash_attention(q, k, v, mask=mask)}
  why_not = cudnn_reason(mask_name)
  if why_not is None:
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  items = [((name, mode), *program(f, mode)) for mode in a.modes for name, f in impls.items()]
  for i, case in enumerate(cases):
    if case["layout"] != "random":
      try:
        params, predicted = sl.selector_params(case["layout"], case["density_requested"], allowed, own, bs, bs, tpf)
        selector = sl.make_layout_selector(case["layout"], params, bs, bs, t, tpf)
      except Exception as e:  # noqa: BLE001  (recorded on the case's row)
        case["error"] = _err(e)
        continue
      case.update(params=params, density_predicted=predicted)
      items.append((("selector", i), (lambda s: lambda q, k: s(q, k, mask, 0))(selector), (q, k)))
  _phase(out, base, "anchors+selectors", progs.compile(items))

  # anchors
  anchor_ms: dict = {}
  dense_flops = 4 * d * bs * bs * int(allowed.sum()) * hq
  for mode in a.modes:
    row = {**base, "mode": mode, "flops": dense_flops * (BWD_FACTOR if mode == "fwd+bwd" else 1.0)}
    if why_not is not None:
      row["cudnn_note"] = why_not
    for name in impls:
      try:
        ms, cs = progs.time((name, mode), args_for(mode), a.warmup, a.iters)
      except Exception as e:  # noqa: BLE001  (an anchor failing is reported; the others still run)
        row[f"{name}_error"] = _err(e)
        continue
      row.update({f"{name}_ms": ms, f"{name}_compile_s": cs, f"{name}_tflops": row["flops"] / ms / 1e9})
      anchor_ms[(name, mode)] = ms
    if "dense_ms" in row and "cudnn_ms" in row:
      row["dense_vs_cudnn"] = row["cudnn_ms"] / row["dense_ms"]
    out["anchors"].append(row)
    print(_fmt_anchor(row), flush=True)
  write_json(a.out, out)

  # layouts (selectors timed here), then phase 2: compile every sparse program
  layouts: dict = {}
  for i, case in enumerate(cases):
    if "error" in case:
      continue
    try:
      if case["layout"] == "random":
        key = jax.random.fold_in(ks[5], i)
        layouts[i] = sl.random_layout(key, mask, case["density_requested"], t, t, bs, bs, hkv, hq)
      else:
        sel_ms, sel_cs = progs.time(("selector", i), (q, k), a.warmup, a.iters)
        layouts[i] = progs.run(("selector", i), (q, k))
        case.update(selector_ms=sel_ms, selector_compile_s=sel_cs)
        for mode in a.modes:
          if ("dense", mode) in anchor_ms:
            case[f"selector_share_of_dense_{mode}"] = sel_ms / anchor_ms[("dense", mode)]
      require_layout_kernel(q, k, v, mask, layouts[i])
      case.update(sl.layout_stats(layouts[i], mask, 1, hq, t, t, ops.default_backend()))
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001
      case["error"] = _err(e)
      layouts.pop(i, None)

  def sparse(q, k, v, lay):
    return ops.flash_attention(q, k, v, mask=mask, layout=lay)

  def sparse_key(mode, lay):
    return ("sparse", mode, lay.kv_indices.shape, lay.kv_counts.shape, lay.block_q, lay.block_kv)

  items = [(sparse_key(mode, lay), *program(sparse, mode, lay)) for lay in layouts.values() for mode in a.modes]
  if not _past(deadline):
    _phase(out, base, "sparse", progs.compile(items))
  for i, case in enumerate(cases):
    if _past(deadline):
      out["not_run"].append({**case, "why": "--budget-s reached"})
      continue
    if i not in layouts:
      out["rows"].append(case)
      print(_fmt_row(case), flush=True)
      continue
    for mode in a.modes:
      key = sparse_key(mode, layouts[i])
      out["rows"].append(_time_case(case, mode, progs, key, args_for(mode, layouts[i]), anchor_ms, a))
      print(_fmt_row(out["rows"][-1]), flush=True)
    write_json(a.out, out)


def _time_case(case: dict, mode: str, progs: Programs, key, args, anchor_ms: dict, a) -> dict:
  """One sparse row: time, FLOPs, speedup against the anchors of the same mode, the target."""
  fwd_flops = 4 * case["D"] * case["block"] ** 2 * case["tiles_computed"]
  row = {**case, "mode": mode, "flops": fwd_flops * (BWD_FACTOR if mode == "fwd+bwd" else 1.0)}
  try:
    row["sparse_ms"], row["sparse_compile_s"] = progs.time(key, args, a.warmup, a.iters)
  except Exception as e:  # noqa: BLE001
    row["error"] = _err(e)
    return row
  rho = row["density"]
  row["sparse_tflops"] = row["flops"] / row["sparse_ms"] / 1e9
  row["target_speedup"] = TARGET_EFFICIENCY / rho
  for anchor in ("dense", "cudnn"):
    if (anchor, mode) in anchor_ms:
      row[f"{anchor}_ms"] = anchor_ms[(anchor, mode)]
  if "dense_ms" in row:
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["fraction_of_ideal"] = row["speedup"] * rho
    row["meets_target"] = row["speedup"] >= row["target_speedup"]
  if "cudnn_ms" in row:
    row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["sparse_ms"]
  return row


# ---------------------------------------------------------------------------------------------------------------
# Table, JSON, CLI
# ---------------------------------------------------------------------------------------------------------------


def _f(x, w=8, p=2) -> str:
  return f"{x:>{w}.{p}f}" if isinstance(x, float | int) and not isinstance(x, bool) else f"{'-':>{w}}"


HEADER = (
  f"{'T':>7} {'mask':>12} {'layout':>10} {'rho req':>7} {'rho':>6} {'mode':>7} {'ms':>8} {'dense ms':>8} "
  f"{'cuDNN ms':>8} {'speedup':>7} {'0.85/rho':>8} {'of ideal':>8} {'TF/s':>6} {'sel %':>6} {'lists KiB':>9} "
  f"{'mask MiB':>9}"
)


def _fmt_row(r: dict) -> str:
  lists_kib = (r["layout_bytes"] + r["kernel_lists_bytes"] + r["transposed_bytes"]) / 1024 if "layout_bytes" in r else None
  mask_mib = r["dense_mask_bytes"] / 2**20 if "dense_mask_bytes" in r else None
  sel = r.get("selector_share_of_dense_fwd")
  line = (
    f"{r['T']:>7} {r['mask']:>12} {r['layout']:>10} {r['density_requested']:>7.3f} {_f(r.get('density'), 6, 3)} "
    f"{r.get('mode', '-'):>7} {_f(r.get('sparse_ms'))} {_f(r.get('dense_ms'))} {_f(r.get('cudnn_ms'))} "
    f"{_f(r.get('speedup'), 7)} {_f(r.get('target_speedup'))} {_f(r.get('fraction_of_ideal'), 8, 3)} "
    f"{_f(r.get('sparse_tflops'), 6, 1)} {_f(None if sel is None else 100 * sel, 6, 1)} {_f(lists_kib, 9, 1)} "
    f"{_f(mask_mib, 9, 1)}"
  )
  return line + (f"  error: {r['error']}" if "error" in r else "")


def _fmt_anchor(r: dict) -> str:
  return (
    f"anchor T={r['T']} {r['mask']} {r['mode']}: dense {_f(r.get('dense_ms'), 0)} ms ({_f(r.get('dense_tflops'), 0, 1)} "
    f"TF/s), cuDNN {_f(r.get('cudnn_ms'), 0)} ms ({_f(r.get('cudnn_tflops'), 0, 1)} TF/s)"
    + (f"  [{r['cudnn_note']}]" if "cudnn_note" in r else "")
    + "".join(f"  {n}_error={r[n + '_error']}" for n in ("dense", "cudnn") if n + "_error" in r)
  )


def write_json(path: str, out: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


def _default_out(device_kind: str) -> str:
  return f"benchmarks/sparse_{re.sub(r'[^a-z0-9]+', '_', device_kind.lower()).strip('_')}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = UsageParser(prog="vidlm bench sparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqlens", type=int_list, default="131072,32768", help="largest first: a budget cuts the small ones")
  p.add_argument("--densities", type=float_list, default="0.5,0.25,0.125,0.05", help="target densities rho in (0, 1]")
  p.add_argument("--masks", type=name_list(MASKS), default=",".join(MASKS))
  p.add_argument("--layouts", type=name_list(LAYOUTS), default=",".join(LAYOUTS))
  p.add_argument("--modes", type=name_list(MODES), default=",".join(MODES))
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--heads", type=int, default=0, help="query heads (0: min(16, 524288 / T), as `bench attention`)")
  p.add_argument("--kv-heads", type=int, default=0, help="kv heads, dividing the query heads (0: = query heads)")
  p.add_argument("--block", type=int, default=128, help="layout block (block_q = block_kv), the selectors' tiles")
  p.add_argument("--tokens-per-frame", type=int, default=256, help="frame-causal frames; video grid of the selectors")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-tokens", type=int, default=2048, help="tokens of the correctness check (0: skip)")
  p.add_argument("--budget-s", type=float, default=0.0, help="start no new case after this many seconds (0: none)")
  p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1), help="threads compiling programs")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/sparse_<device>.json)")
  a = p.parse_args(argv)
  bs, tpf = a.block, a.tokens_per_frame
  for flag, value, low in (("--head-dim", a.head_dim, 1), ("--block", bs, 1), ("--tokens-per-frame", tpf, 1),
                           ("--iters", a.iters, 1), ("--warmup", a.warmup, 0), ("--heads", a.heads, 0),
                           ("--kv-heads", a.kv_heads, 0), ("--check-tokens", a.check_tokens, 0),
                           ("--compile-workers", a.compile_workers, 1)):
    if value < low:
      p.error(f"{flag}={value}: must be >= {low}")
  for t in a.seqlens:
    hq = heads_for(t, a.heads)
    if t % bs or t % tpf:
      p.error(f"--seqlens {t}: must be a multiple of --block={bs} and --tokens-per-frame={tpf}")
    if a.kv_heads and hq % a.kv_heads:
      p.error(f"--kv-heads={a.kv_heads}: must divide the {hq} query heads used at T={t} (set --heads)")
  if "vmoba" in a.layouts and tpf % bs:
    p.error(f"--tokens-per-frame={tpf}: vmoba needs it to be a multiple of --block={bs}")
  if "xattention" in a.layouts and bs % 8:
    p.error(f"--block={bs}: xattention's stride 8 must divide it")
  if a.check_tokens and a.check_tokens % bs:
    p.error(f"--check-tokens={a.check_tokens}: must be a multiple of --block={bs}")
  return a


def heads_for(t: int, heads: int) -> int:
  return heads if heads else max(1, min(16, 524288 // t))


def main(argv: list[str] | None = None) -> int:
  try:
    return _main(argv)
  except ConfigError as e:  # one line, also under `python -m vidlm.bench.sparse` (the vidlm CLI does the same)
    print(f"error: {e}", file=sys.stderr)
    return 2


def _main(argv: list[str] | None) -> int:
  a = parse_args(argv)
  import jax  # noqa: PLC0415

  from pallas_kernels import ops  # noqa: PLC0415

  dev = jax.devices()[0]
  a.out = a.out or _default_out(dev.device_kind)
  out: dict = {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": dev.device_kind, "backend": ops.default_backend(), "jax": jax.__version__, "dtype": "bfloat16",
      "batch": 1, "head_dim": a.head_dim, "block": a.block, "tokens_per_frame": a.tokens_per_frame,
      "warmup": a.warmup, "iters": a.iters, "bwd_factor": BWD_FACTOR, "target_efficiency": TARGET_EFFICIENCY,
      "command": "vidlm bench sparse " + " ".join(sys.argv[1:] if argv is None else argv),
    },
    "checks": [], "phases": [], "anchors": [], "rows": [], "not_run": [],
  }
  print(json.dumps(out["meta"]), flush=True)
  if jax.default_backend() == "gpu":
    out["meta"]["matmul_tflops"] = matmul_tflops(a.warmup, a.iters)
    print(f"bf16 matmul 8192^3: {out['meta']['matmul_tflops']:.1f} TFLOP/s", flush=True)
  start = time.monotonic()
  deadline = start + a.budget_s if a.budget_s else None
  failed = False
  if a.check_tokens:
    hq = heads_for(a.check_tokens, a.heads)
    for mask_name in a.masks:
      chk = check_kernel(mask_name, sl.make_mask(mask_name, a.tokens_per_frame), a.check_tokens, hq,
                         a.kv_heads or hq, a.head_dim, a.block, seed=len(out["checks"]) + 1)
      failed |= not chk["ok"]
      out["checks"].append(chk)
      print("check", json.dumps(chk), flush=True)
      write_json(a.out, out)
  for t in a.seqlens:
    hq = heads_for(t, a.heads)
    for mask_name in a.masks:
      print(f"[{time.monotonic() - start:.0f} s] T={t} {mask_name} Hq={hq} Hkv={a.kv_heads or hq}\n{HEADER}", flush=True)
      run_length(t, mask_name, a, hq, a.kv_heads or hq, out, deadline)
  out["meta"]["wall_s"] = time.monotonic() - start
  out["meta"]["compile_s_total"] = sum(p["lower_s"] + p["compile_wall_s"] for p in out["phases"])
  print(f"\nsummary ({out['meta']['device']}, bf16, hd{a.head_dim}, block {a.block}; speedup = dense / sparse; "
        f"{out['meta']['wall_s']:.0f} s, of which compile {out['meta']['compile_s_total']:.0f} s)")
  print(HEADER)
  for r in out["rows"]:
    print(_fmt_row(r))
  if out["not_run"]:
    print(f"not run ({len(out['not_run'])} cases): --budget-s reached")
  if failed:
    print(f"CHECK FAILED: the sparse kernel differs from the fp32 reference by more than {CHECK_TOL} (see checks)")
  write_json(a.out, out)
  print(f"wrote {a.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
