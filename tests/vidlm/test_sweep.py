"""`vidlm sweep`: a smoke sweep end to end (a tiny variant and one that fails at run time, then a rerun that
skips the finished one and retries the failed one), the up-front one-line errors, and the evaluators' headline declarations."""

import csv
import json
from pathlib import Path

import pytest

from vidlm import cli, sweep
from vidlm.config import ConfigError
from vidlm.eval.registry import HEADLINES, headline_scalars

pytestmark = pytest.mark.xdist_group("sweep")
ROOT = Path(__file__).resolve().parents[2]

EXPERIMENT = '''
from vidlm.config import Config


def get_config(arg=None):
  cfg = Config(name="sweep_smoke")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 1, 2, 1, 16, 64
  d = cfg.data
  d.frames, d.height, d.width, d.text_len, d.num_train, d.num_eval = 2, 32, 32, 32, 16, 8
  t = cfg.train
  t.steps, t.batch_size, t.warmup_steps, t.log_every, t.progress_bar = 3, 8, 1, 1, False
  cfg.checkpoint.every = 0
  cfg.eval.evaluators, cfg.eval.batches, cfg.eval.batch_size = ("loss",), 1, 8
  return cfg


def get_sweep(arg=None):
  variants = {
    "wide": {"model.mlp_dim": 96, "train.lr": 3e-3},
    "bad_mesh": {"mesh.data": 3},  # valid config, but 3 devices do not exist: fails when it runs
  }
  if arg == "unknown_field":
    variants["typo"] = {"train.lrr": 1.0}
  return variants
'''


def _experiment(tmp_path: Path, body: str = EXPERIMENT) -> str:
  path = tmp_path / "exp.py"
  path.write_text(body)
  return str(path)


def test_smoke_sweep_runs_records_failure_and_resumes(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the variants' subprocesses
  spec, workdir = _experiment(tmp_path), tmp_path / "sweep"
  assert sweep.main(["--config", spec, "--workdir", str(workdir)]) == 1  # one variant failed

  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert [r["variant"] for r in rows] == ["wide", "bad_mesh"]
  ok, failed = rows
  assert ok["status"] == "ok" and ok["error"] == ""
  assert 0.0 <= ok["headline"]["loss/exact_match"] <= 1.0 and ok["headline"]["loss/loss"] > 0
  assert ok["steps_per_s"] > 0 and ok["tokens_per_s"] > ok["steps_per_s"]
  assert 0.05 < ok["peak_host_rss_GiB"] < 64
  assert (workdir / "wide" / "DONE").is_file()
  # the overrides reached the run (the experiment's own fields too)
  run_cfg = json.loads((workdir / "wide" / "config.json").read_text())
  assert (run_cfg["model"]["mlp_dim"], run_cfg["train"]["lr"], run_cfg["train"]["steps"]) == (96, 3e-3, 3)
  # variants with the same data section share one generated cache
  assert (workdir / "wide" / "data").resolve() == (workdir / "bad_mesh" / "data").resolve()
  assert (workdir / "wide" / "data" / "train").is_dir()
  assert failed["status"] == "failed" and "config.mesh" in failed["error"] and "3 devices" in failed["error"]
  assert not (workdir / "bad_mesh" / "DONE").exists()
  error_txt = (workdir / "bad_mesh" / "error.txt").read_text()
  assert error_txt.splitlines()[0] == failed["error"] and "exit code 2" in error_txt

  table = (workdir / "results.md").read_text()
  assert "| variant | status | loss/exact_match |" in table and "peak_host_rss_GiB" in table
  assert "| bad_mesh | failed |" in table and failed["error"] in table
  with open(workdir / "results.csv") as f:
    csv_rows = list(csv.DictReader(f))
  assert [r["variant"] for r in csv_rows] == ["wide", "bad_mesh"]
  assert float(csv_rows[0]["loss/loss"]) == pytest.approx(ok["headline"]["loss/loss"])
  assert (workdir / "results.png").stat().st_size > 5000

  # rerun: the finished variant is skipped (its row comes back unchanged), the failed one runs again
  done_before = (workdir / "wide" / "DONE").stat().st_mtime_ns
  (workdir / "bad_mesh" / "error.txt").write_text("stale")
  capsys.readouterr()
  assert sweep.main(["--config", spec, "--workdir", str(workdir)]) == 1
  out = capsys.readouterr().out
  assert "wide: finished earlier, skipped" in out and "bad_mesh: FAILED" in out
  assert (workdir / "wide" / "DONE").stat().st_mtime_ns == done_before
  rerun = json.loads((workdir / "results.json").read_text())["rows"]
  assert rerun[0]["headline"] == ok["headline"] and rerun[1]["error"] == failed["error"]
  assert (workdir / "bad_mesh" / "error.txt").read_text().splitlines()[0] == failed["error"]
  assert "| wide | ok (earlier run) |" in (workdir / "results.md").read_text()

  # the same name with other overrides would reuse the old run's checkpoints: refused, nothing runs
  changed = EXPERIMENT.replace('"train.lr": 3e-3', '"train.lr": 2e-3')
  with pytest.raises(ConfigError, match=r"sweep variant 'wide': .* was run with config.train.lr=0.003, now 0.002; "
                                        r"remove .* or rename the variant"):
    sweep.sweep(_experiment(tmp_path, changed), workdir)


def test_upfront_errors_are_one_line_and_run_nothing(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  spec = _experiment(tmp_path)
  assert cli.main(["sweep", "--config", f"{spec}:unknown_field", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: sweep variant 'typo': config.train.lrr: unknown field"
  assert not workdir.exists()

  no_sweep = _experiment(tmp_path, "from vidlm.config import Config\n\ndef get_config(arg=None):\n  return Config()\n")
  assert cli.main(["sweep", "--config", no_sweep, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --config: ") and "defines no get_sweep(arg=None)" in err and "\n" not in err

  bad_value = EXPERIMENT.replace('{"mesh.data": 3}', '{"train.steps": "many"}')
  assert cli.main(["sweep", "--config", _experiment(tmp_path, bad_value), "--workdir", str(workdir)]) == 2
  assert capsys.readouterr().err.strip() == "error: sweep variant 'bad_mesh': config.train.steps: expected int, got 'many'"

  assert cli.main(["sweep", "--config", spec, "--workdir", str(workdir), "--variants", "wide,nope"]) == 2
  assert "--variants: unknown nope" in capsys.readouterr().err
  assert not workdir.exists()


def test_override_values_are_spelled_as_on_the_command_line():
  assert sweep.variant_args([], {"a.b": True, "c.d": None, "e.f": ("a", "b"), "g.h": 1e-4})[1:] == [
    "--config.a.b=true", "--config.c.d=none", "--config.e.f=a,b", "--config.g.h=0.0001"
  ]


def test_builtin_evaluators_declare_headlines():
  import vidlm.eval  # noqa: F401  (registers the built-in evaluators)

  assert {"loss", "niavh", "ppl_vs_length"} <= {name for name, h in HEADLINES.items() if h}
  niavh = {"tiers": {"a": {"mean": 0.5, "by_multiplier": {"1": 1.0, "2": 0.0}}, "b": {"mean": 0.0,
                                                                                      "by_multiplier": {"1": 0.0}}}}
  assert headline_scalars("niavh", niavh) == {
    "niavh/a_1x": 1.0, "niavh/a_2x": 0.0, "niavh/b_1x": 0.0, "niavh/a_mean": 0.5, "niavh/b_mean": 0.0
  }
  ppl = {"lengths": [{"multiplier": 1, "loss": 0.1}, {"multiplier": 2, "loss": 2.5}]}
  assert headline_scalars("ppl_vs_length", ppl) == {"ppl_vs_length/loss_1x": 0.1, "ppl_vs_length/loss_2x": 2.5}
  assert headline_scalars("loss", {"loss": 0.2, "exact_match": 1.0}) == {"loss/loss": 0.2, "loss/exact_match": 1.0}


def test_failure_lines_name_the_cause():
  assert sweep._error_line("loading\nerror: config.mesh: needs 3 devices\n", 2) == "config.mesh: needs 3 devices"
  assert sweep._error_line("Traceback (most recent call last):\n  File 'x'\nValueError: boom\n", 1) == "ValueError: boom"
  assert sweep._error_line("", -9) == "killed by signal 9 (out of memory?)"
  # `vidlm train` exits 0 after SIGTERM with a checkpoint: the variant did not finish and gets no DONE
  stopped = '{"final": {"step": 5, "stopped": 1.0}, "processes": 1, "devices": 1}\n'
  assert "stopped by a signal at step 5" in sweep._stopped_early(stopped)
  assert sweep._stopped_early('{"final": {"step": 120}, "processes": 1, "devices": 1}\n') is None
