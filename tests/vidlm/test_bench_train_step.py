"""`vidlm bench train_step` runs the real step on random data and reports consistent figures (CPU smoke)."""

import json

from vidlm.bench import train_step


def test_train_step_bench_reports(tmp_path):
  out = tmp_path / "step.json"
  rc = train_step.main(
    "--config experiments/demo.py:smoke --steps 2 --forward-lengths 16 --config.mesh.data=-1".split() + ["--out", str(out)]
  )
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["num_devices"] == 8 and res["params"] > 1e5
  assert len(res["step_times_s"]) == 2 and res["step_s"] > 0 and res["warmup_step_s"] > 0
  tokens_per_s = 8 * res["sequence_length"] / res["step_s"]
  assert abs(res["tokens_per_s"] - tokens_per_s) < 0.05 * tokens_per_s  # step_s is rounded to ms
  assert res["compile"]["compile_s"] > 0 and res["compile"]["estimated_peak_gib"] > 0
  assert res["forward_trials"][0]["result"] == "fits"


def test_train_step_bench_falls_back_when_the_estimate_does_not_fit(tmp_path):
  """A device too small for the compiled step (here: a 1 KiB limit) switches to --fallback-remat, and forward
  lengths in compile mode stop at the first that does not fit."""
  out = tmp_path / "step.json"
  args = "--config experiments/demo.py:smoke --steps 1 --config.model.remat=none --fallback-remat full"
  args += f" --device-memory-gib {1 / 2**20} --forward-lengths 16,32 --forward-mode compile --out {out}"
  rc = train_step.main(args.split())
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["compile_rejected"]["remat"] == "none" and res["compile_rejected"]["fits"] is False
  assert res["remat"] == "full" and res["step_s"] > 0
  assert [t["result"] for t in res["forward_trials"]] == ["does not fit (compiler estimate)"]
