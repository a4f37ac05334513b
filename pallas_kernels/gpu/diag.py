"""Device smoke test: compile and run each kernel variant in its own subprocess with a timeout.

`python -m pallas_kernels.gpu.diag [names...]` prints, per variant, compile seconds, run seconds and the
error vs the fp32 reference, so that a hang (deadlock) in one kernel is told apart from a slow compile and
does not take the other variants down with it.
"""

from __future__ import annotations

import subprocess
import sys
import time

VARIANTS = ["example", "fwd_bidir", "fwd_nosched", "fwd_causal", "dq", "dkv", "fwd_seg", "bwd_all"]


def _run_one(name: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels import reference
  from pallas_kernels.gpu import backward, flash
  from pallas_kernels.layout import MaskSpec

  b, t, h, d = 1, 1024, 2, 128
  ks = jax.random.split(jax.random.key(0), 4)
  dt = jnp.float16 if name == "example" else jnp.bfloat16
  q, k, v, do = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dt) for kk in ks)
  mask = MaskSpec.causal() if name in ("fwd_causal", "dq", "dkv", "bwd_all") else MaskSpec.bidirectional()
  seg = None
  if name == "fwd_seg":
    seg = (
      jnp.repeat(jnp.arange(4, dtype=jnp.int32), t // 4)[None],
      jnp.repeat(jnp.arange(4, dtype=jnp.int32), t // 4)[None],
    )
  sc = d**-0.5
  cfg = flash.FlashConfig(use_schedule_barrier=name != "fwd_nosched")
  if name == "example":
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    f = jax.jit(lambda q, k, v: am.attention(q * sc, k, v, am.TuningConfig(64, 128, 2)))
  elif name.startswith("fwd"):
    f = jax.jit(lambda q, k, v: flash.flash_forward(q, k, v, seg, mask=mask, scale=sc, config=cfg)[0])
  else:
    o, lse = jax.jit(lambda q, k, v: flash.flash_forward(q, k, v, None, mask=mask, scale=sc))(q, k, v)
    jax.block_until_ready(o)
    print("  fwd ok", flush=True)

    def f(q, k, v):
      kw = dict(mask=mask, scale=sc, cfg=cfg, interpret=False)
      lse2 = jnp.where(jnp.isfinite(lse), lse * backward._LOG2E, jnp.inf)
      delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
      if name == "dq":
        return backward._dq_call(q, k, v, do, lse2, delta, None, **kw)
      if name == "dkv":
        return backward._dkv_call(q, k, v, do, lse2, delta, None, **kw)["dv"]
      return flash.flash_backward(q, k, v, None, o, lse, do, mask=mask, scale=sc)[0]

    f = jax.jit(f)
  t0 = time.perf_counter()
  c = f.lower(q, k, v).compile()
  t1 = time.perf_counter()
  print(f"  compiled in {t1 - t0:.1f}s", flush=True)
  out = jax.block_until_ready(c(q, k, v))
  t2 = time.perf_counter()
  if name in ("example",) or name.startswith("fwd"):
    ref = reference.attention(q, k, v, mask=mask, segment_ids=seg, scale=sc)
  else:
    _, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, mask=mask, scale=sc), q, k, v)
    dq, dk, dv = vjp(do)
    ref = {"dq": dq, "dkv": dv, "bwd_all": dq}[name]
  a, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  print(f"  ran in {t2 - t1:.2f}s  rel err {np.linalg.norm(a - r) / np.linalg.norm(r):.2e}", flush=True)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--one":
    _run_one(argv[1])
    return 0
  timeout = 60
  for name in argv or VARIANTS:
    print(f"[{name}]", flush=True)
    t0 = time.time()
    try:
      p = subprocess.run(
        [sys.executable, "-m", "pallas_kernels.gpu.diag", "--one", name],
        timeout=timeout,
        capture_output=True,
        text=True,
      )
      print(p.stdout, end="")
      if p.returncode:
        print("  FAILED rc", p.returncode, "\n  " + "\n  ".join(p.stderr.strip().splitlines()[-6:]))
    except subprocess.TimeoutExpired as e:
      print((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), end="")
      print(f"  TIMEOUT after {time.time() - t0:.0f}s (hang?)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
