"""`vidlm bench sparse` on CPU: the random layout hits its density with valid lists, the memory counts match the
list shapes, a tiny interpret-mode run writes consistent rows, and bad flags stop with one line (exit 2)."""

import json

import jax
import numpy as np
import pytest

from pallas_kernels.layout import MaskSpec
from vidlm import cli
from vidlm.bench import sparse
from vidlm.bench import sparse_layouts as sl


@pytest.mark.parametrize("mask", [MaskSpec.causal(), MaskSpec.frame_causal(256)], ids=["causal", "frame_causal"])
def test_random_layout_density_lists_and_memory(mask):
  t, bs, hkv, hq, rho = 48 * 128, 128, 2, 4, 0.125
  n = t // bs
  layout = sl.random_layout(jax.random.key(3), mask, rho, t, t, bs, bs, hkv, hq)
  idx, cnt = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
  assert idx.shape[:3] == (1, hq, n) and cnt.shape == (1, hq, n)
  allowed = sl.allowed_blocks(mask, n, n, bs, bs)
  for h in range(hq):
    for i in range(n):
      row = idx[0, h, i, : cnt[0, h, i]]
      assert i in row  # its own (diagonal) block
      assert np.all(np.diff(row) > 0) and allowed[i, row].all()  # sorted, unique, never a masked-out tile
  np.testing.assert_array_equal(idx[0, 0], idx[0, 1])  # a GQA group (2 q heads per kv head) shares the choice
  assert not np.array_equal(idx[0, 0], idx[0, 2])  # different kv heads draw their own
  total = int(allowed.sum())
  stats = sl.layout_stats(layout, mask, 1, hq, t, t, "interpret")
  assert abs(stats["density"] - rho) <= 1.0 / total  # largest remainder: round(rho * total) tiles per head
  assert stats["density"] == pytest.approx(cnt.sum() / (hq * total))
  assert stats["tiles_computed"] == cnt.sum() and stats["tiles_allowed"] == total * hq
  # memory: the layout's int32 lists, the kernel's compacted copies, its transposed [nK, nQ] lists + counts
  assert stats["layout_bytes"] == 4 * (idx.size + cnt.size) == stats["kernel_lists_bytes"]
  assert stats["transposed_bytes"] == 4 * hq * (n * n + n)
  assert stats["dense_mask_bytes"] == hq * t * t


def test_selector_params_land_near_the_density():
  t, bs, tpf = 64 * 128, 128, 256
  for mask in (MaskSpec.causal(), MaskSpec.frame_causal(tpf)):
    allowed = sl.allowed_blocks(mask, t // bs, t // bs, bs, bs)
    own = sl.own_matrix(allowed, bs, bs)
    for method in ("moba", "static", "xattention", "vmoba"):
      params, predicted = sl.selector_params(method, 0.25, allowed, own, bs, bs, tpf)
      assert abs(predicted - 0.25) < 0.05, (method, params, predicted)
      sl.make_layout_selector(method, params, bs, bs, t, tpf)  # a valid attention.sparsity section


def test_tiny_cpu_run_writes_consistent_rows(tmp_path, capsys):
  out = tmp_path / "sparse.json"
  argv = "--seqlens 512 --densities 0.5 --masks causal --layouts random,moba --heads 2 --kv-heads 1 --head-dim 64"
  argv += f" --tokens-per-frame 128 --warmup 0 --iters 1 --check-tokens 0 --out {out}"
  assert sparse.main(argv.split()) == 0
  res = json.loads(out.read_text())
  assert res["meta"]["backend"] == "interpret" and res["meta"]["compile_s_total"] > 0
  (fwd, fwdbwd) = res["anchors"]
  assert fwd["dense_ms"] > 0 and fwdbwd["dense_ms"] > 0 and "cudnn_ms" not in fwd
  assert "needs a GPU" in fwd["cudnn_note"] and "needs a GPU" in capsys.readouterr().out
  rows = {(r["layout"], r["mode"]): r for r in res["rows"]}
  assert set(rows) == {(lay, m) for lay in ("random", "moba") for m in ("fwd", "fwd+bwd")}
  for (_, mode), r in rows.items():
    assert "error" not in r, r
    anchor = fwd if mode == "fwd" else fwdbwd
    assert r["dense_ms"] == anchor["dense_ms"] and r["sparse_ms"] > 0
    assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    assert r["target_speedup"] == pytest.approx(0.85 / r["density"])
    assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] * r["density"])
    assert r["flops"] == 4 * 64 * 128 * 128 * r["tiles_computed"] * (3.5 if mode == "fwd+bwd" else 1.0)
    assert r["sparse_tflops"] == pytest.approx(r["flops"] / r["sparse_ms"] / 1e9)
    nb, nh, nq, w = r["layout_shape"]
    assert (nb, nh, nq) == (1, 1, 4) and r["layout_bytes"] == 4 * (nq * w + nq)  # shared by the GQA group
    assert r["tiles_computed"] == 2 * r["density"] * 10  # 2 q heads x rho x the 10 causal tiles of 4 blocks
  assert rows[("random", "fwd")]["density"] == 0.5  # 5 of the 10 causal tiles
  moba = rows[("moba", "fwd")]
  assert moba["params"] == {"top_k": 1} and moba["density"] == pytest.approx(moba["density_predicted"])
  assert moba["selector_ms"] > 0
  assert moba["selector_share_of_dense_fwd"] == pytest.approx(moba["selector_ms"] / fwd["dense_ms"])


@pytest.mark.parametrize(
  "flags, says",
  [
    ("--densities 0.5,1.5", "--densities"),
    ("--masks causal,diagonal", "--masks"),
    ("--seqlens 1000", "--seqlens 1000"),
    ("--heads 4 --kv-heads 3", "--kv-heads=3"),
  ],
)
def test_bad_flags_one_line_exit_2(flags, says, capsys):
  assert cli.main(["bench", "sparse", *flags.split()]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: vidlm bench sparse") and says in err


def test_a_backend_that_cannot_run_a_layout_stops_with_one_line(tmp_path, monkeypatch, capsys):
  """No timing of a fallback: the kernel's refusal (here forced) ends the bench with one line, exit 2."""
  from pallas_kernels import ops

  monkeypatch.setattr(ops, "unsupported_reason", lambda *args, **kw: "a BlockLayout (forced by the test)")
  argv = f"--seqlens 512 --densities 0.5 --masks causal --layouts random --heads 2 --check-tokens 0 --out {tmp_path}/x.json"
  assert sparse.main(argv.split()) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "cannot run a BlockLayout: a BlockLayout (forced by the test)" in err
  assert not (tmp_path / "x.json").exists()  # stopped before anything was compiled or timed
