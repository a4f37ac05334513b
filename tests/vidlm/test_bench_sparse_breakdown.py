"""`vidlm bench sparse_breakdown`: every stage program cross-lowers for CUDA with the kernels it should hold, the fit
and the ptxas parser compute what they claim, and a tiny interpret-mode run writes consistent stages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import sparse_schedule as ss
from vidlm.bench import sparse_breakdown as sb
from vidlm.bench import sparse_layouts as sl

# Mosaic GPU kernels each stage program must hold (no list stage may hide a kernel, no total may lose one)
_KERNELS = {"lists_fwd": 0, "fwd_kernel": 1, "bwd_prep": 0, "lists_bwd": 0, "dkv_items": 0, "dq_kernel": 1,
            "dkv_kernel": 1, "merge": 0, "fwd_total": 1, "bwd_total": 2, "fwd_bwd_total": 3}


def test_stages_cross_lower_for_cuda():
  t, hq, hkv, d = 1024, 4, 2, 128
  mask = sl.make_mask("causal", 256)
  sds = jax.ShapeDtypeStruct
  env = {"q": sds((1, t, hq, d), jnp.bfloat16), "k": sds((1, t, hkv, d), jnp.bfloat16),
         "v": sds((1, t, hkv, d), jnp.bfloat16), "do": sds((1, t, hq, d), jnp.bfloat16)}
  env["layout"] = sl.random_layout(jax.random.key(0), mask, 0.25, t, t, 128, 128, hkv, hq)
  shp = ss.shape_of(env["layout"], t)
  for stages in (sb.sparse_stages(mask, shp, hq, hkv, d**-0.5, False, False, False),
                 sb.dense_stages(mask, d, d**-0.5, False, False, False)):
    for st, args in zip(stages, sb.abstract_args(stages, env), strict=True):
      text = jax.jit(st.fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("mosaic_gpu_v2") == _KERNELS[st.name], st.name
      if st.name in ("lists_fwd", "lists_bwd"):
        assert "sort" in text  # the lists are built on device


def test_fit_attribution_and_ptxas_parser(tmp_path):
  def row(rho, tiles, ms):
    return {"density": rho, "tiles": tiles, "stages": {"dq_kernel": {"ms": ms, "ctas": 400}}}

  rows = [row(0.125, 1000, 0.5 + 1000 * 20e-6), row(0.05, 400, 0.5 + 400 * 20e-6)]
  f = sb.fit(rows, n_sm=100)["dq_kernel"]
  assert f["fixed_ms"] == pytest.approx(0.5) and f["per_tile_ns"] == pytest.approx(20.0)
  assert f["fixed_sm_us_per_cta"] == pytest.approx(500.0 * 100 / 400)
  assert "needs at least two" in sb.fit(rows[:1], 100)["note"]
  log = tmp_path / "ptxas.txt"
  log.write_text("===== sparse 0.05 dq_kernel (compile)\nptxas info    : Used 168 registers, used 1 barriers, "
                 "16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n===== empty\n")
  assert sb.parse_ptxas(str(log)) == {"sparse 0.05 dq_kernel (compile)": {
    "registers": [168], "spill_stores_bytes": [8], "spill_loads_bytes": [4], "stack_frame_bytes": [16]}}


def test_bad_flag_is_one_line(capsys):
  assert sb.main(["--heads", "4", "--kv-heads", "3"]) == 2
  assert "--kv-heads=3" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_cpu_run_writes_consistent_stages(tmp_path):
  out, dump = tmp_path / "b.json", tmp_path / "dump"
  argv = "--seqlen 256 --heads 1 --head-dim 64 --densities 1.0,0.5 --warmup 0 --iters 1 --compile-workers 2"
  argv += f" --dump-dir {dump} --out {out}"
  assert sb.main(argv.split()) == 0
  res = json.loads(out.read_text())
  assert res["meta"]["interpret"] and (dump / "ptxas.txt").exists()  # CPU: no ptxas, the sections are written
  dense, rows = res["dense"], res["sparse"]
  assert dense["tiles"] == 3  # 2 q blocks, causal: 3 non-EMPTY tiles
  assert [r["tiles"] for r in rows] == [3, 2]  # rho 0.5 keeps only the forced diagonal tiles
  for stages, want in ((dense["stages"], {"fwd_kernel", "bwd_prep", "dq_kernel", "dkv_kernel", "bwd_total",
                                          "fwd_bwd_total"}),
                       *((r["stages"], set(_KERNELS)) for r in rows)):
    assert set(stages) == want
    for name, s in stages.items():
      assert "error" not in s and s["ms"] > 0 and s["queued_ms"] > 0 and s["io_bytes"] > 0, name
      assert s["ns_per_tile"] == pytest.approx(s["ms"] * 1e6 / s["tiles"])
      if name in sb.GEMMS:
        assert s["gemm_flops"] == 2 * sb.GEMMS[name] * 64 * 128 * 128 * s["tiles"]
  for r in rows:
    sums = r["sums"]["fwd_bwd"]
    assert sums["stage_sum_ms"] == pytest.approx(sum(r["stages"][n]["ms"] for n in sb.SPARSE_FWD + sb.SPARSE_BWD))
    assert sums["unaccounted_ms"] == pytest.approx(sums["total_ms"] - sums["stage_sum_ms"])
    assert r["dkv"]["items_launched"] == 2 + ss.dkv_slots(ss.SparseShape(1, 1, 2, 2, 1, 128, 128))
    assert r["dkv"]["items_live"] == 2 and r["dkv"]["split_chunks"] == 0
    assert r["stages"]["fwd_kernel"]["ctas"] == 2
  assert set(res["fit"]) >= {"fwd_kernel", "dq_kernel", "dkv_kernel", "fwd_bwd_total"}
  for att in res["attribution"]:
    assert att["speedup"] == pytest.approx(att["dense_ms"] / att["sparse_ms"])
    assert att["target_ms"] == pytest.approx(att["density"] * att["dense_ms"] / 0.85)
    parts = {p["stage"] for p in att["parts"]}
    assert parts == {*sb.SPARSE_FWD, *sb.SPARSE_BWD}  # the backward walks the forward's lists: no rebuild
    assert sum(p["ms"] for p in att["parts"]) == pytest.approx(
      np.sum([p["ideal_ms"] + p["excess_ms"] for p in att["parts"]]))
