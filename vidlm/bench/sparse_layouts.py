"""Layouts for `vidlm bench sparse`: the random layout, selector parameters that land near a density, and what
a layout costs (measured density, computed tiles, memory). Block level only: the largest host array is the
mask's [nQ, nK] tile relation (~1M entries at 128k tokens with 128-token blocks); nothing of size [T, S].
"""

from __future__ import annotations

import math

import numpy as np

from vidlm.config import SparsityConfig

# ---------------------------------------------------------------------------------------------------------------
# Block structure (host, block level: [nQ, nK] at most, ~1M entries at 128k with 128-token blocks)
# ---------------------------------------------------------------------------------------------------------------


def make_mask(name: str, tokens_per_frame: int):
  from pallas_kernels.layout import MaskSpec  # noqa: PLC0415

  return MaskSpec.causal() if name == "causal" else MaskSpec.frame_causal(tokens_per_frame)


def allowed_blocks(mask, n_q: int, n_k: int, bq: int, bk: int) -> np.ndarray:
  """bool [nQ, nK]: the tiles the mask does not make EMPTY."""
  rel = mask.tile_relation(np.arange(n_q)[:, None] * bq, np.arange(n_k)[None, :] * bk, bq, bk)
  return np.broadcast_to(np.asarray(rel) != 0, (n_q, n_k))


def own_blocks(n_q: int, n_k: int, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
  """(idx int [nQ, w], ok bool [nQ, w]): the kv blocks overlapping each q block's positions (layers.sparse)."""
  from layers.sparse.common import diagonal_span  # noqa: PLC0415

  first, w = diagonal_span(n_q, bq, bk)
  idx = first[:, None] + np.arange(w)[None, :]
  last = ((np.arange(n_q) + 1) * bq - 1) // bk
  return np.minimum(idx, n_k - 1), (idx <= last[:, None]) & (idx < n_k)


def own_matrix(allowed: np.ndarray, bq: int, bk: int) -> np.ndarray:
  n_q, n_k = allowed.shape
  idx, ok = own_blocks(n_q, n_k, bq, bk)
  m = np.zeros((n_q, n_k), bool)
  m[np.repeat(np.arange(n_q), idx.shape[1])[ok.ravel()], idx.ravel()[ok.ravel()]] = True
  return m & allowed


def row_quotas(allowed_per_row: np.ndarray, own_per_row: np.ndarray, rho: float) -> np.ndarray:
  """Blocks per row, own <= quota <= allowed, proportional to the row's allowed blocks, summing to
  round(rho * total) by largest remainder (or to the own blocks' total when that is larger)."""
  a, o = allowed_per_row.astype(np.int64), own_per_row.astype(np.int64)
  want = rho * a
  quota = np.clip(np.floor(want).astype(np.int64), o, a)
  remaining = int(round(rho * a.sum())) - int(quota.sum())
  frac = want - np.floor(want)
  while remaining > 0:
    room = np.flatnonzero(quota < a)
    if room.size == 0:
      break
    pick = room[np.argsort(-frac[room], kind="stable")][:remaining]
    quota[pick] += 1
    frac[pick] = -1.0  # a second pass (only when every fractional row got one) spreads evenly
    remaining -= pick.size
  return quota


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------


def random_layout(key, mask, rho: float, t: int, s: int, bq: int, bk: int, h_sel: int, hq: int):
  """BlockLayout [1, Hq or 1, nQ, W]: own blocks + uniformly random other allowed blocks, row quotas as above."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from layers.sparse import common  # noqa: PLC0415

  n_q, n_k = t // bq, s // bk
  allowed = allowed_blocks(mask, n_q, n_k, bq, bk)
  own = own_matrix(allowed, bq, bk)
  extra = row_quotas(allowed.sum(1), own.sum(1), rho) - own.sum(1)  # [nQ] random blocks per row
  kx = max(int(extra.max()), 1)
  own_idx, own_ok = own_blocks(n_q, n_k, bq, bk)
  own_ok = own_ok & allowed[np.arange(n_q)[:, None], own_idx]

  @jax.jit
  def build(key):
    u = jax.random.uniform(key, (h_sel, n_q, n_k))
    score = jnp.where(jnp.asarray(allowed & ~own), u, -1.0)
    val, idx = jax.lax.top_k(score, kx)  # [h, nQ, kx]
    ok = (jnp.arange(kx) < jnp.asarray(extra)[:, None]) & (val >= 0.0)
    o_idx = jnp.broadcast_to(jnp.asarray(own_idx, jnp.int32), (h_sel, *own_idx.shape))
    o_ok = jnp.broadcast_to(jnp.asarray(own_ok), o_idx.shape)
    lists, counts = common.compact(jnp.concatenate([idx, o_idx], -1), jnp.concatenate([ok, o_ok], -1), n_k)
    return lists[None], counts[None]

  lists, counts = build(key)
  return common.to_layout(lists, counts, hq, bq, bk)


def predict_density(method: str, p: dict, allowed: np.ndarray, own: np.ndarray, bq: int, bk: int, tpf: int) -> float:
  """Expected density of a selector's layout on random q / k (host, from the block structure alone)."""
  a, o = allowed.sum(1).astype(np.float64), own.sum(1).astype(np.float64)
  n_q, n_k = allowed.shape
  if method == "moba":
    return float(np.minimum(a, o + p["top_k"]).sum() / a.sum())
  if method == "static":
    from layers.sparse.common import diagonal_span  # noqa: PLC0415

    first, nd = diagonal_span(n_q, bq, bk)
    cols = np.arange(n_k)[None, :]
    m = (cols < p["sinks"]) | ((cols >= (first - p["window"])[:, None]) & (cols <= (first + nd - 1 + p["window"])[:, None]))
    if p["frame_globals"]:
      starts = (np.arange(n_k * bk // tpf) * tpf) // bk
      glob = (starts[:, None] + np.arange(p["frame_globals"])[None, :]).ravel()
      m[:, glob[glob < n_k]] = True
    return float((m & allowed).sum() / a.sum())
  if method == "xattention":  # near-uniform scores: the cumulative rule keeps ~ceil(tau * a); sink + own forced
    k = np.minimum(np.ceil(p["tau"] * a - 1e-9), p["max_kv_blocks"])
    return float(np.minimum(a, k + (1.0 + o) * (1.0 - k / a)).sum() / a.sum())
  # vmoba, threshold 0, one-frame temporal chunks of P blocks: top_k chunks of the visible ones, own blocks forced
  per = max(tpf // bk, 1)
  c = np.ceil(a / per)
  k = np.minimum(p["top_k"], c)
  return float(np.minimum(a, k * per + o * (1.0 - k / c)).sum() / a.sum())


def selector_params(method: str, rho: float, allowed: np.ndarray, own: np.ndarray, bq: int, bk: int, tpf: int):
  """(the section fields that set the density, predicted density): the candidate closest to rho."""
  n_k = allowed.shape[1]
  a_max = int(allowed.sum(1).max())
  if method == "moba":
    cands = [{"top_k": k} for k in range(1, n_k + 1)]
  elif method == "static":  # monotone in window: bisect for each frame_globals instead of scanning nK windows
    cands = _bisect_static(rho, allowed, own, bq, bk, tpf)
  elif method == "xattention":
    cands = [
      {"stride": 8, "tau": tau, "max_kv_blocks": max(1, min(n_k, math.ceil(tau * a_max)))}
      for tau in np.round(np.arange(0.005, 1.0001, 0.005), 3).tolist()
    ]
  else:
    n_c = -(-n_k // max(tpf // bk, 1))
    cands = [{"chunk_frames": 1, "chunk_bands": 1, "threshold": 0.0, "top_k": k} for k in range(1, n_c + 1)]
  scored = [(abs(predict_density(method, c, allowed, own, bq, bk, tpf) - rho), i, c) for i, c in enumerate(cands)]
  _, _, best = min(scored)
  return best, predict_density(method, best, allowed, own, bq, bk, tpf)


def _bisect_static(rho, allowed, own, bq, bk, tpf) -> list[dict]:
  out = []
  for g in (1, 0):
    lo, hi = 0, allowed.shape[1]
    while lo < hi:  # smallest window with density >= rho
      mid = (lo + hi) // 2
      if predict_density("static", {"sinks": 1, "window": mid, "frame_globals": g}, allowed, own, bq, bk, tpf) < rho:
        lo = mid + 1
      else:
        hi = mid
    out += [{"sinks": 1, "window": w, "frame_globals": g} for w in {max(lo - 1, 0), lo}]
  return out


def make_layout_selector(method: str, params: dict, bq: int, bk: int, t: int, tpf: int):
  from layers.sparse import make_selector  # noqa: PLC0415

  cfg = SparsityConfig(method=method, block_q=bq, block_kv=bk, **params)
  return make_selector(cfg, num_layers=1, video_grid=(t // tpf, 1, tpf))


def layout_stats(layout, mask, b: int, hq: int, t: int, s: int, backend: str) -> dict:
  """Measured density, computed tiles (over batch x query heads) and memory of a layout: its own lists, and the
  lists the `backend` kernel builds from it (forward copies and the transposed kv -> q lists for dK/dV), sized
  by `jax.eval_shape` of the kernel's own builder."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  bq, bk = layout.block_q, layout.block_kv
  n_q, n_k = t // bq, s // bk
  idx, cnt = layout.kv_indices, layout.kv_counts  # [nb, nh, nQ, W], [nb, nh, nQ]
  nb, nh, _, w = idx.shape

  @jax.jit  # one executable, not one small compile per eager op and shape (it matters on a GPU)
  def count_listed(idx, cnt):
    rel = mask.tile_relation(jnp.arange(n_q)[:, None] * bq, jnp.clip(idx, 0, n_k - 1) * bk, bq, bk)
    valid = (jnp.arange(w) < cnt[..., None]) & (rel != 0) & (idx >= 0) & (idx < n_k)
    new = jnp.concatenate([jnp.ones_like(idx[..., :1], bool), idx[..., 1:] != idx[..., :-1]], -1)  # sorted lists
    return jnp.sum(valid & new)

  listed = int(count_listed(idx, cnt))
  allowed = int(allowed_blocks(mask, n_q, n_k, bq, bk).sum())
  source, build = _kernel_list_builder(backend, mask, b, hq, n_q, n_k, s)
  fwd, bwd = jax.eval_shape(build, layout)
  tiles = listed * (b if nb == 1 else 1) * (hq if nh == 1 else 1)
  return {
    "density": listed / (nb * nh * allowed),
    "layout_shape": [int(x) for x in idx.shape],
    "tiles_computed": tiles,
    "tiles_allowed": allowed * b * hq,
    "layout_bytes": _nbytes((idx, cnt)),
    "kernel_lists_bytes": _nbytes(fwd),
    "transposed_bytes": _nbytes(bwd),
    "lists_source": source,
    "dense_mask_bytes": int(nb * nh * t * s),  # a bool [T, S] per layout (batch, head)
  }


def _nbytes(arrays) -> int:
  import jax  # noqa: PLC0415

  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(arrays)))


def _kernel_list_builder(backend: str, mask, b: int, hq: int, n_q: int, n_k: int, s: int):
  """(name, layout -> (forward list arrays, transposed list arrays)) of the kernel that runs on `backend`."""
  if backend == "gpu":
    from pallas_kernels.gpu import sparse_schedule  # noqa: PLC0415

    def gpu_build(layout):
      _, fwd, bwd = sparse_schedule.build(mask, layout, s)
      return fwd, bwd

    return "pallas_kernels.gpu.sparse_schedule.build", gpu_build
  from pallas_kernels.tpu import schedule  # noqa: PLC0415

  def tpu_build(layout):
    (_, fwd), (_, bwd) = schedule._list_scheds(mask, layout, b, hq, n_q, n_k)
    return fwd, bwd

  return "pallas_kernels.tpu.schedule._list_scheds", tpu_build
