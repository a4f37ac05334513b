"""`vidlm bench memory` on CPU at tiny size: the memory bridge streams every size through one compiled chunk step
with a bounded bank, the dense anchor's compile-time search stops at the first length over the (here: tiny)
memory limit, bisects once, and runs the longest that fits; bad flags are one line and exit 2."""

import json

import pytest

from layers.memory import strided_segment_count
from vidlm import cli
from vidlm.bench import memory


def test_bench_memory_tiny_cpu(tmp_path, capsys):
  out = tmp_path / "bench" / "memory.json"
  args = ("--preset tiny --sizes 24,12,48 --chunk-frames 12 --capacity 8 --dense-frames 12,24,48,96 --dense-step 12 "
          f"--device-memory-gib 0.007 --out {out}")
  assert cli.main(["bench", "memory", *args.split()]) == 0
  printed = capsys.readouterr().out
  res = json.loads(out.read_text())
  assert res["tokens_per_frame"] == 16 and res["weights"] == "random (untrained)" and res["eviction"] == "fifo"
  mb = res["memory_bridge"]
  assert mb["params"] > mb["ingest_params"] > 0 and mb["chunk_step_estimate_gib"] > 0
  rows = mb["rows"]
  assert [r["frames"] for r in rows] == [12, 24, 48]  # increasing order (the process peak is monotone)
  for r in rows:
    segs = strided_segment_count(r["frames"], 4, 2)
    assert r["segments"] == segs and r["bank_segments"] == min(segs, 8)  # the bank is bounded to --capacity
    assert r["chunks"] == r["frames"] // 12 and r["frames_per_s"] > 0 and r["finite"]
    assert r["bank_bounded_bytes"] == 8 * 4 * 64 * 4  # capacity x M x E x float32, whatever the length
    assert r["bank_unbounded_bytes"] == segs * 4 * 64 * 4
  dense = res["dense"]
  assert dense["params"] > 0
  trials = {t["frames"]: t for t in dense["trials"]}
  assert trials[12]["fits"] and trials[96]["result"].startswith("not compiled")
  est = [trials[f]["estimate_gib"] for f in (12, 24, 48)]
  assert est == sorted(est) and est[0] > 0  # a longer dense video needs more memory
  first_miss = dense["first_not_fitting"]
  assert first_miss in (24, 36, 48) and not trials[first_miss]["fits"]
  fit = dense["longest_fitting_estimate"]
  assert fit < first_miss and trials[fit]["fits"] and trials[fit]["estimate_gib"] <= 0.007
  assert dense["run"]["frames"] == fit and dense["run"]["finite"]
  assert "dense VideoLM: longest fitting video" in printed and "bank bounded to 8 segments" in printed


@pytest.mark.parametrize("flags", ["--sizes 50 --chunk-frames 12", "--chunk-frames 7", "--capacity 0",
                                   "--preset huge"])
def test_bench_memory_bad_flags_exit_2(flags, capsys):
  assert cli.main(["bench", "memory", *flags.split()]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err


def test_configs_are_about_one_billion_parameters():
  """The GPU preset's sizes, counted on abstract shapes (no weights allocated)."""
  import jax
  from flax import nnx

  from vidlm.models.registry import build_model

  mb, dense = memory.configs("1b", 60)
  counts = []
  for cfg in (mb, dense):
    model = nnx.eval_shape(lambda cfg=cfg: build_model(cfg, nnx.Rngs(0)))
    counts.append(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  assert all(0.9e9 < c < 1.2e9 for c in counts), counts
  assert (mb.data.height // mb.model.tubelet[1]) ** 2 == 256 and mb.model.dtype == dense.model.dtype == "bfloat16"
