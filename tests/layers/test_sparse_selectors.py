"""Block selectors (layers/sparse/): valid layouts under every mask, deterministic under jit, no [T, S]
intermediate, and attention through a selected layout equals the fp32 reference given the same layout."""

from __future__ import annotations

import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from layers.sparse import make_selector
from pallas_kernels import ops, reference
from pallas_kernels.layout import MaskSpec

METHODS = ("static", "moba", "xattention", "vmoba")
BASE = dict(
  method="none", block_q=16, block_kv=16, dense_layers=(), top_k=2, tau=0.9, stride=4, max_kv_blocks=4,
  sinks=1, window=1, frame_globals=1, chunk_frames=2, chunk_bands=1, threshold=0.25,
)
GRID = (4, 4, 8)  # frames, height, width in tokens: 32 tokens per frame, 128 video tokens
T = 192  # video + 64 text tokens
MASKS = {
  "frame_causal": MaskSpec.frame_causal(32, video_tokens=128),
  "causal": MaskSpec.causal(),
  "bidirectional": MaskSpec.bidirectional(),
}


def cfg(method, **kw):
  return types.SimpleNamespace(**{**BASE, "method": method, **kw})


def qk(t=T, b=2, hq=4, hkv=2, d=16, seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (b, t, hq, d)), jax.random.normal(kk, (b, t, hkv, d))


def block_visible(mask, n_q, n_k, bq=16, bk=16):
  """Host brute force: bool [nQ, nK], some element of the tile visible (from the dense mask: tests only)."""
  dense = mask.dense(n_q * bq, n_k * bk)
  return dense.reshape(n_q, bq, n_k, bk).any(axis=(1, 3))


def own_blocks(n_q, bq=16, bk=16):
  return [set(range((i * bq) // bk, ((i + 1) * bq - 1) // bk + 1)) for i in range(n_q)]


def listed(layout):
  """Python sets of listed blocks per (b, h, q block), after checking sorted / unique / in range."""
  idx, cnt = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
  out = np.empty(cnt.shape, object)
  for pos in np.ndindex(cnt.shape):
    row = idx[pos][: cnt[pos]]
    assert np.all(np.diff(row) > 0), (pos, row)  # sorted, unique
    assert row.size == 0 or (row.min() >= 0 and row.max() < T // 16), row
    out[pos] = set(row.tolist())
  return out


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("method", METHODS)
def test_layout_is_valid(method, mask_name):
  mask = MASKS[mask_name]
  q, k = qk()
  sel = make_selector(cfg(method), num_layers=3, video_grid=GRID)
  n = T // 16
  vis, own = block_visible(mask, n, n), own_blocks(n)
  for layer in ((0, 1, 2) if method == "vmoba" else (1,)):
    lay = jax.jit(lambda q, k, layer=layer: sel(q, k, mask, layer))(q, k)
    assert lay.kv_indices.shape[1] in (1, q.shape[2])  # head axis the kernels take
    sets = listed(lay)
    for pos in np.ndindex(sets.shape):
      i = pos[2]
      assert all(vis[i, j] for j in sets[pos]), f"{method}: q block {i} lists a fully masked (future) block"
      assert own[i] <= sets[pos], f"{method}: q block {i} lost its own / diagonal block"
    density = np.mean([len(s) for s in sets.ravel()]) / vis.sum(1).mean()
    assert 0.0 < density <= 1.0


def test_static_pattern_exact():
  mask = MASKS["frame_causal"]
  q, k = qk()
  sets = listed(make_selector(cfg("static"), num_layers=1, video_grid=GRID)(q, k, mask, 0))
  n = T // 16
  vis = block_visible(mask, n, n)
  frame_starts = {f * 2 for f in range(4)}  # 32-token frames = 2 blocks of 16
  for i in range(n):
    want = ({0} | set(range(i - 1, i + 2)) | frame_starts) & {j for j in range(n) if vis[i, j]}
    assert sets[0, 0, i] == want, (i, sets[0, 0, i], want)


def test_moba_top_k_count_and_gate():
  mask = MASKS["causal"]
  q, k = qk()
  n = T // 16
  vis = block_visible(mask, n, n)
  lay = make_selector(cfg("moba", top_k=3), num_layers=1)(q, k, mask, 0)
  cnt = np.asarray(lay.kv_counts)
  for i in range(n):
    assert np.all(cnt[:, :, i] == 1 + min(3, vis[i].sum() - 1)), i  # own block + top-3 of the earlier ones
  # the gate: a key block made to align with every query is picked by every later q block
  u = jnp.full((16,), 0.5)
  q2, k2 = q + u, k.at[:, 32:48].set(10 * u)
  sets = listed(make_selector(cfg("moba", top_k=1), num_layers=1)(q2, k2, mask, 0))
  assert all(2 in sets[b, h, i] for b in range(2) for h in range(4) for i in range(3, n))


def test_gqa_heads_share_selection():
  q, k = qk()
  for method in ("moba", "xattention", "vmoba"):
    lay = make_selector(cfg(method), num_layers=1, video_grid=GRID)(q, k, MASKS["frame_causal"], 0)
    idx, cnt = np.asarray(lay.kv_indices), np.asarray(lay.kv_counts)
    assert idx.shape[1] == 4
    np.testing.assert_array_equal(idx[:, 0], idx[:, 1])  # group 0 = q heads 0, 1
    np.testing.assert_array_equal(cnt[:, 2], cnt[:, 3])


def test_xattention_tau_extremes():
  mask = MASKS["causal"]
  q, k = qk()
  n = T // 16
  vis = block_visible(mask, n, n)
  everything = listed(make_selector(cfg("xattention", tau=1.0, max_kv_blocks=n), num_layers=1)(q, k, mask, 0))
  assert all(everything[0, 0, i] == {j for j in range(n) if vis[i, j]} for i in range(n))
  least = listed(make_selector(cfg("xattention", tau=1e-6), num_layers=1)(q, k, mask, 0))
  for i in range(n):  # sink + diagonal + the single best block
    assert {0, i} <= least[0, 0, i] and len(least[0, 0, i]) <= 3


def test_vmoba_partitions_and_threshold():
  mask = MASKS["bidirectional"]
  q, k = qk()
  n = T // 16
  everything = make_selector(cfg("vmoba", threshold=0.0, top_k=64), num_layers=3, video_grid=GRID)
  for layer in range(3):
    assert np.all(np.asarray(everything(q, k, mask, layer).kv_counts) == n)
  best_only = make_selector(cfg("vmoba", threshold=1.0, top_k=64), num_layers=3, video_grid=GRID)
  # video kv blocks: grid [4 frames, 2 bands]; text blocks 8..11 are one chunk each
  chunk_sizes = {0: {2 * 2}, 1: {4}, 2: {2}}  # 1D: 2 frames x 2 bands, 2D: 4 frames x 1 band, 3D: 2 x 1
  for layer in range(3):
    sets = listed(best_only(q, k, mask, layer))
    for pos in np.ndindex(sets.shape):
      extra = sets[pos] - own_blocks(n)[pos[2]]
      video = {j for j in extra if j < 8}
      assert len(video) in chunk_sizes[layer] | {0} or len(extra - video) <= 1, (layer, pos, sets[pos])


def test_deterministic_under_jit_and_traced_layer_index():
  q, k = qk()
  mask = MASKS["frame_causal"]
  for method in METHODS:
    sel = make_selector(cfg(method, dense_layers=("last",)), num_layers=3, video_grid=GRID)
    f = jax.jit(lambda q, k, i, sel=sel: sel(q, k, mask, i))
    a, b = f(q, k, jnp.int32(1)), f(q, k, jnp.int32(1))
    np.testing.assert_array_equal(a.kv_indices, b.kv_indices)
    # traced index selects the same blocks as the static one; a dense layer lists every visible block
    assert listed(a).tolist() == listed(sel(q, k, mask, 1)).tolist()
    assert sel(q, k, mask, 2) is None
    full = np.asarray(f(q, k, jnp.int32(2)).kv_counts)
    np.testing.assert_array_equal(full[0, 0], block_visible(mask, T // 16, T // 16).sum(1))


def _largest(jaxpr) -> int:
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, int(np.prod(getattr(v.aval, "shape", ())) or 1))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      best = max(best, _largest(sub))
  return best


@pytest.mark.parametrize("method", METHODS)
def test_no_dense_intermediate(method):
  t = 4096
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
  k = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
  sel = make_selector(cfg(method, block_q=64, block_kv=64, stride=8), num_layers=3, video_grid=(16, 16, 16))
  mask = MaskSpec.frame_causal(256, video_tokens=t)
  jaxpr = jax.make_jaxpr(lambda q, k: sel(q, k, mask, jnp.int32(1)))(q, k).jaxpr
  biggest = _largest(jaxpr)
  assert biggest <= t * 2 * 16, f"{method}: largest intermediate {biggest} vs T*S={t * t}"  # no bigger than q


@pytest.mark.parametrize("method", METHODS)
def test_attention_with_selected_layout_matches_reference(method):
  """Interpret-mode kernel (forward + dq/dk/dv) == fp32 reference, both given the selector's layout."""
  t, mask = 64, MaskSpec.frame_causal(16, video_tokens=48)
  q, k = qk(t=t, b=1, seed=1)
  v = jax.random.normal(jax.random.key(7), k.shape)
  sel = make_selector(cfg(method, top_k=1, max_kv_blocks=2), num_layers=3, video_grid=(3, 2, 8))
  layout = sel(q, k, mask, 1)
  assert np.asarray(layout.kv_counts).min() < t // 16  # really sparse somewhere
  dout = jax.random.normal(jax.random.key(9), q.shape)

  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))

  got = run(lambda q, k, v: ops.block_sparse_attention(q, k, v, mask=mask, layout=layout, backend="interpret"))
  want = run(lambda q, k, v: reference.attention(q, k, v, mask=mask, layout=layout))
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{method} {name}")


def xattention_oracle(sel, q, k, mask) -> np.ndarray:
  """The xattention selector before its GPU speed-up (issue 11), one q block at a time in fp32 at HIGHEST precision,
  selection in plain Python: a set of kv blocks per [B, Hkv, nQ]. The batched selector must list exactly these."""
  bq, bk, st = sel.block_q, sel.block_kv, sel.stride
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g, n_q, n_k, r, c = hq // hkv, t // bq, s // bk, bq // st, s // st
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  q_w = jnp.swapaxes(q.reshape(b, t // st, st, hq, d)[:, :, ::-1], 2, 3).reshape(b, n_q, r, hkv, g, st * d)
  k_w = jnp.swapaxes(k.reshape(b, s // st, st, hkv, d), 2, 3).reshape(b, c, hkv, st * d)
  out = np.empty((b, hkv, n_q), object)
  for i in range(n_q):
    logits = jnp.einsum("brkgx,bckx->bkgrc", q_w[:, i], k_w, precision=jax.lax.Precision.HIGHEST) / (d**0.5 * st)
    rows = mask.q_offset + i * bq + np.arange(r) * st + st - 1  # each strided row's last query
    cols = mask.kv_offset + np.arange(c) * st  # each strided column's first key
    logits = jnp.where(mask.allowed(rows[:, None], cols[None, :]), logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    score = np.asarray(p.sum(axis=(2, 3)).reshape(b, hkv, n_k, bk // st).sum(-1))  # [B, Hkv, nK]
    visible = np.broadcast_to(np.asarray(mask.tile_relation(i * bq, np.arange(n_k) * bk, bq, bk)) != 0, (n_k,))  # not EMPTY
    own = set(range((i * bq) // bk, ((i + 1) * bq - 1) // bk + 1))
    for h in np.ndindex(b, hkv):
      ranked = [j for j in sorted(range(n_k), key=lambda j: -score[h][j]) if visible[j]][: sel.max_kv_blocks]
      total, before, kept = sum(score[h][j] for j in range(n_k) if visible[j]), 0.0, set()
      for j in ranked:  # the shortest prefix reaching tau of the row's mass
        if before >= sel.tau * total:
          break
        kept.add(j)
        before += score[h][j]
      out[h + (i,)] = kept | {j for j in own | {0} if visible[j]}
  return out


XATTENTION_CASES = {  # name: (T, S, hq, hkv, block_q, block_kv, stride, mask)
  "frame_causal": (192, 192, 4, 2, 16, 16, 4, MASKS["frame_causal"]),
  "causal_bq32_bk16": (192, 192, 2, 1, 32, 16, 8, MASKS["causal"]),
  "bidirectional_bq16_bk32": (192, 192, 4, 4, 16, 32, 4, MASKS["bidirectional"]),
  "window_shifted_kv_longer": (128, 256, 4, 2, 16, 16, 4, MaskSpec.window(40, 8).shifted(q_offset=128)),
}


@pytest.mark.parametrize("budget_blocks", [1, 5, None])  # q blocks per loop step: one, with a remainder, all
@pytest.mark.parametrize("case", list(XATTENTION_CASES))
def test_xattention_batched_equals_per_block_oracle(case, budget_blocks, monkeypatch):
  """Scoring several q blocks per step in the input dtype lists the same blocks as the per-block fp32 original."""
  from layers.sparse import xattention

  t, s, hq, hkv, bq, bk, st, mask = XATTENTION_CASES[case]
  q, _ = qk(t=t, hq=hq, hkv=hkv, seed=3)
  _, k = qk(t=s, hq=hq, hkv=hkv, seed=4)
  sel = make_selector(cfg("xattention", block_q=bq, block_kv=bk, stride=st, tau=0.6, max_kv_blocks=5), num_layers=1)
  n_q, block_logits = t // bq, q.shape[0] * hq * (bq // st) * (s // st)
  if budget_blocks is not None:  # the step size follows SCORE_BUDGET_BYTES
    monkeypatch.setattr(xattention, "SCORE_BUDGET_BYTES", budget_blocks * block_logits * 4)
  assert xattention.blocks_per_step(n_q, block_logits, q.size) == min(budget_blocks or n_q, n_q)
  idx, cnt = jax.jit(lambda q, k: sel.lists(q, k, mask, 0))(q, k)
  want = xattention_oracle(sel, q, k, mask)
  assert idx.shape[:3] == want.shape and cnt.shape == want.shape
  assert_lists_equal(idx, cnt, want, case)
  assert 0 < np.asarray(cnt).mean() < s // bk  # sparse, not empty
  if case == "frame_causal":  # bf16 operands: products exact in fp32, sums in fp32; the same lists on these inputs
    q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert_lists_equal(*sel.lists(q16, k16, mask, 0), xattention_oracle(sel, q16, k16, mask), case + " bf16")


def assert_lists_equal(idx, cnt, want, case):
  idx, cnt = np.asarray(idx), np.asarray(cnt)
  for pos in np.ndindex(want.shape):
    row = idx[pos][: cnt[pos]]
    assert np.all(np.diff(row) > 0) and set(row.tolist()) == want[pos], (case, pos, row, want[pos])
