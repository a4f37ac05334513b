"""The ground truth checked against an independent naive computation, and tile classification against dense().

Every kernel test trusts `reference.attention` and `MaskSpec.tile_relation`; here both are checked against
code that shares nothing with them: the mask semantics re-implemented element by element from the
documented definitions, and a per-row numpy softmax loop.
"""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.layout import BlockLayout, MaskSpec, TileRelation


def naive_allowed(m: MaskSpec, i: int, j: int) -> bool:
  """Documented semantics, one element at a time (no numpy, no MaskSpec methods)."""
  qp, kp = m.q_offset + i, m.kv_offset + j
  if m.kind == "bidirectional":
    return True
  if m.kind == "causal":
    return kp <= qp
  if m.kind == "frame_causal":

    def frame(p):
      if m.video_tokens is None or p < m.video_tokens:
        return p // m.tokens_per_frame
      return m.video_tokens // m.tokens_per_frame + (p - m.video_tokens)

    return frame(kp) <= frame(qp)
  ok = True
  if m.left is not None:
    ok = ok and kp >= qp - m.left
  if m.right is not None:
    ok = ok and kp <= qp + m.right
  return ok


def naive_attention(q, k, v, mask, scale, segment_ids=None, layout=None):
  """Per-row numpy softmax loop in float64. Returns out [B, T, Hq, D], lse [B, Hq, T]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  out = np.zeros((b, t, hq, d))
  lse = np.full((b, hq, t), -np.inf)
  if layout is not None:
    idx, cnt = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
  for bi in range(b):
    for h in range(hq):
      for i in range(t):
        cols = []
        for j in range(s):
          if not naive_allowed(mask, i, j):
            continue
          if segment_ids is not None and int(segment_ids[0][bi, i]) != int(segment_ids[1][bi, j]):
            continue
          if layout is not None:
            lb = bi if idx.shape[0] > 1 else 0
            lh = h if idx.shape[1] > 1 else 0
            qb = i // layout.block_q
            listed = idx[lb, lh, qb, : cnt[lb, lh, qb]]
            if j // layout.block_kv not in set(listed.tolist()):
              continue
          cols.append(j)
        if not cols:
          continue
        logits = np.array([scale * float(q[bi, i, h] @ k[bi, j, h // group]) for j in cols])
        mx = logits.max()
        w = np.exp(logits - mx)
        lse[bi, h, i] = mx + np.log(w.sum())
        out[bi, i, h] = (w[:, None] * v[bi, cols, h // group]).sum(0) / w.sum()
  return out, lse


MASKS = [
  MaskSpec.causal(),
  MaskSpec.bidirectional(),
  MaskSpec.frame_causal(4),
  MaskSpec.frame_causal(3, video_tokens=12),
  MaskSpec.window(5, 0),
  MaskSpec.window(3, 2),
  MaskSpec.window(None, 4),
  MaskSpec.window(6, None),
  MaskSpec.causal().shifted(q_offset=8),
  MaskSpec.causal().shifted(q_offset=3, kv_offset=20),  # every query before every key: all masked
  MaskSpec.frame_causal(4, video_tokens=16).shifted(q_offset=10, kv_offset=2),
  MaskSpec.window(4, 1).shifted(q_offset=20),  # early keys unreachable, first rows see nothing
]


def _inputs(rng, b, t, s, hq, hkv, d):
  q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  return q, k, v


def _check(out, lse, ref_out, ref_lse):
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  finite = np.isfinite(ref_lse)
  assert np.array_equal(np.isfinite(lse), finite), "lse must be -inf exactly on rows that see no key"
  assert np.all(lse[~finite] == -np.inf)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m.kind}-{m.q_offset}-{m.kv_offset}-{m.left}-{m.right}")
def test_reference_matches_naive_every_mask(mask):
  # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), so a failure would not reproduce
  rng = np.random.default_rng(zlib.crc32(repr(mask).encode()))
  q, k, v = _inputs(rng, 1, 16, 20, 2, 1, 8)
  out, lse = reference.attention(q, k, v, mask=mask, scale=0.37, return_lse=True)
  _check(out, lse, *naive_attention(q, k, v, mask, 0.37))


def test_reference_segments_gqa_default_scale():
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 2, 12, 18, 4, 2, 8)
  seg = (np.array([[0] * 5 + [1] * 7, [2] * 12]), np.array([[0] * 6 + [1] * 12, [1] * 9 + [2] * 9]))
  mask = MaskSpec.causal().shifted(q_offset=6)
  out, lse = reference.attention(q, k, v, mask=mask, segment_ids=seg, return_lse=True)
  _check(out, lse, *naive_attention(q, k, v, mask, 8**-0.5, segment_ids=seg))


def test_reference_fully_masked_rows_give_zero_and_neg_inf():
  rng = np.random.default_rng(2)
  q, k, v = _inputs(rng, 1, 8, 8, 2, 2, 4)
  seg = (np.array([[0, 0, 5, 5, 1, 1, 7, 7]]), np.array([[0, 0, 0, 1, 1, 1, 1, 1]]))  # ids 5, 7 see nothing
  out, lse = reference.attention(q, k, v, mask=MaskSpec.bidirectional(), segment_ids=seg, return_lse=True)
  rows = np.array([2, 3, 6, 7])
  assert np.all(np.asarray(out)[0, rows] == 0)
  assert np.all(np.asarray(lse)[0][:, rows] == -np.inf)
  _check(out, lse, *naive_attention(q, k, v, MaskSpec.bidirectional(), 4**-0.5, segment_ids=seg))


@pytest.mark.parametrize("heads", [1, 4])
def test_reference_block_layout(heads):
  rng = np.random.default_rng(3 + heads)
  q, k, v = _inputs(rng, 2, 16, 24, 4, 2, 8)
  bm = rng.random((2, heads, 4, 6)) < 0.45
  bm[0, 0, 1] = False  # a q block with nothing listed
  layout = BlockLayout.from_block_mask(bm, 4, 4)
  mask = MaskSpec.window(9, 3)
  out, lse = reference.attention(q, k, v, mask=mask, layout=layout, scale=0.5, return_lse=True)
  _check(out, lse, *naive_attention(q, k, v, mask, 0.5, layout=layout))
  assert np.all(np.asarray(lse)[0, 0, 4:8] == -np.inf)


def test_reference_bf16_inputs_upcast():
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(rng, 1, 8, 8, 2, 1, 8))
  out = reference.attention(q, k, v, mask=MaskSpec.causal())
  assert out.dtype == jnp.bfloat16
  ref_out, _ = naive_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), MaskSpec.causal(), 8**-0.5)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=1e-2, rtol=1e-2)


# ---- MaskSpec.tile_relation vs dense() ----------------------------------------------------------------------


def _random_masks(rng, n):
  kinds = []
  for _ in range(n):
    off = dict(q_offset=int(rng.integers(0, 40)), kv_offset=int(rng.integers(0, 40)))
    tpf = int(rng.integers(1, 7))
    kinds += [
      MaskSpec.causal().shifted(**off),
      MaskSpec.bidirectional().shifted(**off),
      MaskSpec.frame_causal(tpf).shifted(**off),
      MaskSpec.frame_causal(tpf, video_tokens=tpf * int(rng.integers(0, 8))).shifted(**off),
      MaskSpec.window(
        None if rng.random() < 0.2 else int(rng.integers(0, 20)),
        None if rng.random() < 0.2 else int(rng.integers(0, 9)),
      ).shifted(**off),
    ]
  return kinds


@pytest.mark.parametrize("seed", range(4))
def test_tile_relation_exhaustive_vs_dense(seed):
  rng = np.random.default_rng(100 + seed)
  for mask in _random_masks(rng, 6):
    for bq, bk in ((1, 1), (4, 4), (3, 5), (8, 2)):
      t, s = bq * int(rng.integers(1, 7)), bk * int(rng.integers(1, 7))
      dense = mask.dense(t, s)
      # numpy path, vectorised over all tiles, and the jnp path (what kernels trace) must agree
      qs = np.arange(t // bq)[:, None] * bq
      ks = np.arange(s // bk)[None, :] * bk
      rel_np = np.broadcast_to(np.asarray(mask.tile_relation(qs, ks, bq, bk)), (t // bq, s // bk))
      # (fixed [6, 6] tile grid so the eager jnp ops compile once, not once per shape)
      rel_jnp = mask.tile_relation(jnp.arange(6)[:, None] * bq, jnp.arange(6)[None, :] * bk, bq, bk)
      rel_jnp = np.broadcast_to(np.asarray(rel_jnp), (6, 6))[: t // bq, : s // bk]
      np.testing.assert_array_equal(rel_jnp, rel_np)
      for i, j in itertools.product(range(t // bq), range(s // bk)):
        tile = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        naive = np.array([[naive_allowed(mask, i * bq + a, j * bk + c) for c in range(bk)] for a in range(bq)])
        np.testing.assert_array_equal(tile, naive, err_msg=f"dense() disagrees with the definition for {mask}")
        rel = rel_np[i, j]
        if rel == TileRelation.EMPTY:
          assert not tile.any(), f"{mask} tile {(i, j)} {bq}x{bk} marked EMPTY but has visible elements"
        elif rel == TileRelation.FULL:
          assert tile.all(), f"{mask} tile {(i, j)} {bq}x{bk} marked FULL but has masked elements"
        else:
          # the corner test is exact for band masks: PARTIAL means genuinely mixed
          assert tile.any() and not tile.all(), f"{mask} tile {(i, j)} {bq}x{bk} PARTIAL but uniform"


def test_tile_allowed_matches_dense():
  rng = np.random.default_rng(7)
  for mask in _random_masks(rng, 3):
    dense = mask.dense(24, 30)
    tile = jax.jit(lambda m=mask: m.tile_allowed(8, 10, 8, 10))()
    np.testing.assert_array_equal(np.asarray(tile), dense[8:16, 10:20])
