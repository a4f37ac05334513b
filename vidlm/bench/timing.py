"""Timing shared by the benchmarks: wall-clock medians of jitted calls after warm-up, and the matmul anchor."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable, args, warmup: int, iters: int) -> float:
  """Median seconds of `iters` calls after `warmup` calls (compile excluded), each ended by block_until_ready."""
  import jax  # noqa: PLC0415  (benchmarks set XLA_FLAGS before JAX starts)

  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def matmul_tflops(warmup: int = 3, iters: int = 10, n: int = 8192) -> float:
  """bf16 n^3 matmul rate on random inputs: the device's practical tensor-core ceiling, measured in-run."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  return 2 * n**3 / median_seconds(jax.jit(lambda a, b: a @ b), (a, b), warmup, iters) / 1e12
