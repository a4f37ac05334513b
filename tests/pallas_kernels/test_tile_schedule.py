"""The shared mask -> tile schedule (pallas_kernels/tile_schedule.py) used by the GPU and TPU flash kernels.

* On random MaskSpecs (every kind, offsets, frames with and without a text tail) and random tile sizes, the
  per-row-block kv ranges agree with a dense numpy evaluation of `MaskSpec.dense`: no visible element lies in a
  skipped tile, every tile called FULL is entirely visible, and for proper bands the ranges are tight (every
  listed tile has a visible element, every fully visible tile is called FULL). Forward and transposed (dK/dV).
* The traced path (jnp scalars, as inside the GPU kernels) gives the same numbers as the host path (numpy, as
  the TPU range tables), and `range_table` is exactly the [lo, hi) of `tile_bounds`.
* The classification equals `MaskSpec.tile_relation` tile by tile on fixed specs.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tile_schedule
from pallas_kernels.layout import MaskSpec, TileRelation


def _random_spec(rng: np.random.Generator, t: int, s: int, *, degenerate: bool = False) -> MaskSpec:
  kind = rng.choice(["causal", "bidirectional", "frame_causal", "window"])
  if degenerate:
    kind = "window"
  if kind == "causal":
    spec = MaskSpec.causal()
  elif kind == "bidirectional":
    spec = MaskSpec.bidirectional()
  elif kind == "frame_causal":
    tpf = int(rng.integers(1, 40))
    video = None if rng.random() < 0.4 else tpf * int(rng.integers(0, (t + s) // tpf + 2))
    spec = MaskSpec.frame_causal(tpf, video_tokens=video)
  else:
    left = None if rng.random() < 0.25 else int(rng.integers(0, 120))
    right = None if rng.random() < 0.25 else int(rng.integers(0, 120))
    if degenerate:  # nothing visible: q - left <= k <= q + right with left + right < 0
      left = int(rng.integers(-60, 10))
      right = -left - int(rng.integers(1, 20))
    elif left is not None and right is not None and rng.random() < 0.3:
      right = -int(rng.integers(0, left + 1))  # a band strictly below the diagonal (left + right >= 0)
    spec = MaskSpec.window(left, right)
  q_off = int(rng.integers(0, 300)) if rng.random() < 0.6 else 0
  kv_off = int(rng.integers(-200, 300)) if rng.random() < 0.6 else 0
  return spec.shifted(q_off, kv_off)


def _tile_views(vis: np.ndarray, br: int, bc: int) -> tuple[np.ndarray, np.ndarray]:
  """(any visible, all visible) per [br, bc] tile of a dense [R, C] bool mask."""
  nr, nc = vis.shape[0] // br, vis.shape[1] // bc
  tiles = vis.reshape(nr, br, nc, bc)
  return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


def _bounds(spec: MaskSpec, transposed: bool, rows: int, cols: int, br: int, bc: int, traced: bool):
  row_off, col_off = (spec.kv_offset, spec.q_offset) if transposed else (spec.q_offset, spec.kv_offset)
  nr, nc = rows // br, cols // bc
  starts = np.arange(nr) * br + row_off
  if traced:  # padded to one length: eager jnp ops compile once per shape
    starts = jnp.asarray(np.pad(starts, (0, 16 - nr), mode="edge"), jnp.int32)
  out = tile_schedule.tile_bounds(spec, transposed, starts, starts + br - 1, col_off, bc, nc)
  return [np.broadcast_to(np.asarray(x), starts.shape)[:nr].astype(np.int64) for x in out]


def _check_against_dense(spec: MaskSpec, t: int, s: int, bq: int, bk: int, *, tight: bool) -> None:
  dense = spec.dense(t, s)
  for transposed in (False, True):
    vis, (rows, cols), (br, bc) = (dense.T, (s, t), (bk, bq)) if transposed else (dense, (t, s), (bq, bk))
    any_vis, all_vis = _tile_views(vis, br, bc)
    lo, flo, fhi, hi = _bounds(spec, transposed, rows, cols, br, bc, traced=False)
    msg = f"{spec} T={t} S={s} tiles=({br},{bc}) transposed={transposed}"
    assert np.all((lo <= flo) & (flo <= fhi) & (fhi <= hi)), msg
    j = np.arange(cols // bc)[None, :]
    listed = (j >= lo[:, None]) & (j < hi[:, None])
    full = (j >= flo[:, None]) & (j < fhi[:, None])
    assert not np.any(any_vis & ~listed), f"visible element in a skipped tile: {msg}"
    assert not np.any(full & ~all_vis), f"masked element in a tile called FULL: {msg}"
    if tight:
      np.testing.assert_array_equal(listed, any_vis, err_msg=f"listed tile entirely masked: {msg}")
      np.testing.assert_array_equal(full, all_vis, err_msg=f"fully visible tile not called FULL: {msg}")
    # the traced path (GPU kernels) computes the same numbers as the host path (TPU tables)
    for a, b in zip(_bounds(spec, transposed, rows, cols, br, bc, traced=True), (lo, flo, fhi, hi)):
      np.testing.assert_array_equal(a, b, err_msg=f"traced vs numpy: {msg}")
    start, count = tile_schedule.range_table(spec, rows // br, cols // bc, br, bc, transposed)
    np.testing.assert_array_equal(count, hi - lo, err_msg=msg)
    np.testing.assert_array_equal(start, np.where(hi > lo, lo, 0), err_msg=msg)


@pytest.mark.parametrize("seed", range(4))
def test_schedule_agrees_with_dense_mask(seed):
  rng = np.random.default_rng(seed)
  kinds = set()
  for _ in range(40):
    bq, bk = (int(x) for x in rng.choice([1, 2, 3, 8, 16, 24, 64], size=2))
    t, s = bq * int(rng.integers(1, 9)), bk * int(rng.integers(1, 9))
    spec = _random_spec(rng, t, s)
    kinds.add(spec.kind)
    _check_against_dense(spec, t, s, bq, bk, tight=True)
  assert kinds == {"causal", "bidirectional", "frame_causal", "window"}, kinds  # the draw covers every kind


def test_degenerate_window_is_conservative():
  """left + right < 0 (nothing visible): ranges may list empty tiles but never skip a visible one."""
  rng = np.random.default_rng(7)
  for _ in range(20):
    bq, bk = (int(x) for x in rng.choice([4, 8, 16], size=2))
    t, s = bq * int(rng.integers(1, 6)), bk * int(rng.integers(1, 6))
    spec = _random_spec(rng, t, s, degenerate=True)
    assert not spec.dense(t, s).any()
    _check_against_dense(spec, t, s, bq, bk, tight=False)


def test_check_catches_a_wrong_schedule(monkeypatch):
  """The dense comparison fails on a schedule that skips a visible tile (the test can fail)."""
  real = tile_schedule.tile_bounds

  def off_by_one(*args):
    lo, flo, fhi, hi = real(*args)
    return lo, flo, fhi, np.maximum(hi - 1, lo) if isinstance(hi, np.ndarray) else jnp.maximum(hi - 1, lo)

  monkeypatch.setattr(tile_schedule, "tile_bounds", off_by_one)
  with pytest.raises(AssertionError, match="skipped tile"):
    _check_against_dense(MaskSpec.causal(), 64, 64, 16, 16, tight=True)


_SPECS = [
  MaskSpec.causal(),
  MaskSpec.bidirectional(),
  MaskSpec.frame_causal(48),
  MaskSpec.frame_causal(32, video_tokens=96),
  MaskSpec.window(70, 20),
  MaskSpec.window(None, 5),
  MaskSpec.window(30, None),
  MaskSpec.causal().shifted(64, 0),
  MaskSpec.causal().shifted(0, 100),
  MaskSpec.frame_causal(16, 64).shifted(200, 72),
  MaskSpec.window(10, 3).shifted(37, 211),
]


@pytest.mark.parametrize("mask", _SPECS, ids=lambda m: f"{m.kind}-{m.q_offset}-{m.kv_offset}")
def test_tile_bounds_match_tile_relation(mask):
  """On the kernels' tile sizes, traced (as inside the GPU kernels), the classification is `tile_relation`."""
  t, s = 512, 768
  for transposed, (br, bc) in itertools.product((False, True), ((64, 128), (128, 64), (64, 64))):
    rows, cols = (s, t) if transposed else (t, s)
    nr, nc = rows // br, cols // bc
    r0 = np.arange(nr)[:, None] * br
    c0 = np.arange(nc)[None, :] * bc
    if transposed:
      rel = mask.tile_relation(c0, r0, bc, br)
    else:
      rel = mask.tile_relation(r0, c0, br, bc)
    rel = np.broadcast_to(np.asarray(rel), (nr, nc))
    lo, flo, fhi, hi = _bounds(mask, transposed, rows, cols, br, bc, traced=True)
    j = np.arange(nc)[None, :]
    nonempty = (j >= lo[:, None]) & (j < hi[:, None])
    full = (j >= flo[:, None]) & (j < fhi[:, None])
    np.testing.assert_array_equal(nonempty, rel != TileRelation.EMPTY, err_msg=f"transposed={transposed}")
    np.testing.assert_array_equal(full, rel == TileRelation.FULL, err_msg=f"transposed={transposed}")
