"""`vidlm bench train_step` runs the real step on random data and reports consistent figures (CPU smoke)."""

import json

from vidlm.bench import train_step


def test_train_step_bench_reports(tmp_path):
  out = tmp_path / "step.json"
  rc = train_step.main(["--config", "experiments/demo.py:smoke", "--steps", "2", "--forward-lengths", "16",
                        "--out", str(out), "--config.mesh.data=-1"])
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["num_devices"] == 8 and res["params"] > 1e5
  assert len(res["step_times_s"]) == 2 and res["step_s"] > 0
  assert abs(res["tokens_per_s"] - 8 * res["sequence_length"] / res["step_s"]) < 0.05 * res["tokens_per_s"]  # step_s is rounded to ms
  # no recompilation after the first step: timed steps are far faster than the compiling one
  assert max(res["step_times_s"]) < res["first_step_s_incl_compile"] / 3
  assert res["forward_trials"][0]["result"] == "fits"
