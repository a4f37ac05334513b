"""End to end through the command line: `vidlm train` the demo's :smoke variant, `vidlm eval` it (fresh process,
restore from the checkpoint), `vidlm demo` on the same workdir (resumes without retraining, prints the table), and
`experiments/eval_only.py:RUN` restoring the run into another workdir on two processes (jax.distributed)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vidlm import config as config_lib

pytestmark = pytest.mark.xdist_group("eval_cli")
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--config", "experiments/demo.py:smoke"]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "vidlm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f"vidlm {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("cli") / "smoke"
  _run("train", *SMOKE, "--workdir", str(workdir), "--config.train.progress_bar=false")
  return workdir


@pytest.fixture(scope="module")
def eval_stdout(run_dir) -> str:
  return _run("eval", *SMOKE, "--workdir", str(run_dir)).stdout


@pytest.fixture(scope="module")
def eval_results(run_dir, eval_stdout) -> dict:
  return json.loads((run_dir / "eval" / "results.json").read_text())


def test_eval_cli_prints_the_table_not_the_json(run_dir, eval_stdout):
  out = eval_stdout
  assert "NIAVH exact match" in out and "Answer loss vs context length" in out and "Held-out eval split" in out
  assert f"all results: {run_dir / 'eval' / 'results.json'}" in out
  assert str(run_dir / "eval" / "niavh_a.png") in out
  assert '"niavh"' not in out and len(out.splitlines()) < 40, out  # the JSON went to the file only


def test_eval_cli_restores_and_writes_everything(run_dir, eval_results):
  results = eval_results
  smoke = config_lib.load_config("experiments/demo.py:smoke")
  assert results["step"] == smoke.train.steps
  assert results["checkpoint"] == str(run_dir / "checkpoints")
  assert set(results["seconds"]) == set(smoke.eval.evaluators)
  out = run_dir / "eval"
  assert json.loads((out / "results.json").read_text())["step"] == smoke.train.steps
  for tier in smoke.eval.tiers:
    acc = results["niavh"]["tiers"][tier]["accuracy"]
    assert len(acc) == len(smoke.eval.depths) and all(len(r) == len(smoke.eval.length_multipliers) for r in acc)
    assert all(0.0 <= v <= 1.0 for r in acc for v in r)
    assert (out / f"niavh_{tier}.png").stat().st_size > 1000
  assert (out / "ppl_vs_length.png").stat().st_size > 1000
  assert [r["frames"] for r in results["ppl_vs_length"]["lengths"]] == [
    smoke.data.frames * m for m in smoke.eval.length_multipliers
  ]


def test_demo_cli_resumes_and_prints_table(run_dir):
  metrics = run_dir / "metrics.jsonl"
  lines_before = metrics.read_text().count("\n")
  proc = _run("demo", *SMOKE, "--workdir", str(run_dir), "--config.train.progress_bar=false")
  out = proc.stdout
  assert "trained to step 4" in out
  assert metrics.read_text().count("\n") == lines_before  # finished run: nothing retrained
  assert "NIAVH exact match" in out and "Answer loss vs context length" in out and "Held-out eval split" in out
  for tier in ("a", "b", "c"):
    assert any(line.startswith(f"{tier} ") for line in out.splitlines())
    assert str(run_dir / "eval" / f"niavh_{tier}.png") in out
  assert "wall time:" in out and "target: tier (a) exact match" in out
  summary = (run_dir / "eval" / "summary.txt").read_text()
  assert "NIAVH exact match" in summary and "plots:" in summary


def test_eval_only_config_reads_the_run(run_dir, tmp_path):
  """eval_only.py:RUN takes the architecture from the run (its restore is exercised by the two-process test)."""
  cfg = config_lib.load_config(f"experiments/eval_only.py:{run_dir}")
  trained = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
  assert cfg.model == trained.model and cfg.data == trained.data and cfg.eval.tiers == trained.eval.tiers
  assert cfg.checkpoint.restore_from == str(run_dir)
  assert config_lib.load_config(f"experiments/eval_only.py:{run_dir / 'checkpoints'}").model == trained.model
  with pytest.raises(config_lib.ConfigError, match="not a directory"):
    config_lib.load_config(f"experiments/eval_only.py:{tmp_path / 'missing'}")


def test_two_process_eval_matches_one_process(run_dir, eval_results, tmp_path):
  """jax.distributed on localhost: each process feeds its slice of every batch; results equal the 1-process ones."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "two_proc"
  cmd = [sys.executable, "-m", "vidlm.cli", "eval", "--config", f"experiments/eval_only.py:{run_dir}",
         "--workdir", str(workdir)]
  procs = []
  for pid in range(2):
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="", VIDLM_COORDINATOR=f"127.0.0.1:{port}",
               VIDLM_NUM_PROCESSES="2", VIDLM_PROCESS_ID=str(pid), VIDLM_LOCAL_DEVICE_COUNT="2")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
  two = json.loads((workdir / "eval" / "results.json").read_text())
  assert two["checkpoint"] == str(run_dir / "checkpoints") and not (workdir / "checkpoints").exists()
  assert two["step"] == eval_results["step"]
  one = eval_results
  for tier, r in one["niavh"]["tiers"].items():
    assert two["niavh"]["tiers"][tier]["accuracy"] == r["accuracy"]
  for a, b in zip(one["niavh"]["cells"], two["niavh"]["cells"]):
    assert a["correct"] == b["correct"] and b["loss"] == pytest.approx(a["loss"], rel=1e-4)
  for a, b in zip(one["ppl_vs_length"]["lengths"], two["ppl_vs_length"]["lengths"]):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["exact_match"] == a["exact_match"]
  assert two["loss"]["loss"] == pytest.approx(one["loss"]["loss"], rel=1e-4)
