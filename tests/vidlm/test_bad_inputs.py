"""Every bad input a user can type: one `error: ...` line naming the field / flag / file, exit code 2, no traceback.

The CLI runs in-process (`vidlm.cli.main`) and every case fails before any training step, so the whole file takes
seconds. One test per class of error, parametrized over the concrete inputs.
"""

import os
import subprocess
import sys

import pytest

from vidlm import cli

DEMO = "experiments/demo.py"


@pytest.fixture
def run(capsys, tmp_path):
  """main(argv) -> (exit code, stderr lines); asserts the one-line contract every case shares."""

  def go(argv, name):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert name in lines[0], (name, lines[0])
    assert not (tmp_path / "w" / "config.json").exists()  # nothing written for a run that never started
    return lines[0]

  return go


def _train(tmp_path, *overrides):
  return ["train", "--config", DEMO, "--workdir", str(tmp_path / "w"), "--config.train.progress_bar=false",
          "--config.data.num_train=64", "--config.data.num_eval=32", *overrides]


# (override, what the line must name)
FIELD_VALUES = [
  ("--config.data.tiers=a,z", "data.tiers"),
  ("--config.data.tiers=", "data.tiers"),
  ("--config.data.text_len=8", "data.text_len"),
  ("--config.data.text_len=0", "data.text_len"),
  ("--config.data.num_train=0", "data.num_train"),
  ("--config.data.num_eval=-3", "data.num_eval"),
  ("--config.data.dataset=kinetics", "data.dataset"),
  ("--config.data.frames=0", "data.frames"),
  ("--config.data.height=0", "data.height"),
  ("--config.data.num_needles=0", "data.num_needles"),
  ("--config.data.num_asked=3", "data.num_asked"),
  ("--config.data.prefetch=-1", "data.prefetch"),
  ("--config.data.seed=-1", "data.seed"),
  ("--config.eval.batch_size=512", "eval.batch_size"),
  ("--config.eval.batch_size=0", "eval.batch_size"),
  ("--config.eval.batches=0", "eval.batches"),
  ("--config.eval.every=-1", "eval.every"),
  ("--config.eval.depths=0,2", "eval.depths"),
  ("--config.eval.seeds=0", "eval.seeds"),
  ("--config.eval.length_multipliers=0", "eval.length_multipliers"),
  ("--config.eval.evaluators=loss,nope", "eval.evaluators"),
  ("--config.eval.tiers=z", "eval.tiers"),
  ("--config.eval.stream_rope_positions=slot", "eval.stream_rope_positions"),
  ("--config.eval.stream_score=max", "eval.stream_score"),
  ("--config.eval.stream_select=all", "eval.stream_select"),
  ("--config.train.lr=0", "train.lr"),
  ("--config.train.lr=-1", "train.lr"),
  ("--config.train.lr=nan", "train.lr"),
  ("--config.train.steps=0", "train.steps"),
  ("--config.train.batch_size=0", "train.batch_size"),
  ("--config.train.warmup_steps=-1", "train.warmup_steps"),
  ("--config.train.min_lr_ratio=2", "train.min_lr_ratio"),
  ("--config.train.b1=1", "train.b1"),
  ("--config.train.b2=-0.1", "train.b2"),
  ("--config.train.weight_decay=-1", "train.weight_decay"),
  ("--config.train.grad_clip=-1", "train.grad_clip"),
  ("--config.train.log_every=0", "train.log_every"),
  ("--config.train.seed=-1", "train.seed"),
  ("--config.train.grad_accum=0", "train.grad_accum"),
  ("--config.model.embed_dim=0", "model.embed_dim"),
  ("--config.model.num_layers=0", "model.num_layers"),
  ("--config.model.num_kv_heads=0", "model.num_kv_heads"),
  ("--config.model.head_dim=31", "model.head_dim"),
  ("--config.model.mlp_dim=-1", "model.mlp_dim"),
  ("--config.model.vocab_size=10", "model.vocab_size"),
  ("--config.model.rope_theta=0", "model.rope_theta"),
  ("--config.model.tubelet=0,8,8", "model.tubelet"),
  ("--config.model.tubelet=1,8", "model.tubelet"),
  ("--config.model.dtype=float64", "model.dtype"),
  ("--config.checkpoint.keep=0", "checkpoint.keep"),
  ("--config.checkpoint.every=-1", "checkpoint.every"),
  ("--config.checkpoint.restore_from=/nonexistent/run", "checkpoint.restore_from"),
  ("--config.distributed.num_processes=0", "distributed.num_processes"),
  ("--config.distributed.process_id=-1", "distributed.process_id"),
  ("--config.mesh.seq=0", "mesh.seq"),
  ("--config.train.steps=ten", "train.steps"),
  ("--config.train.stepz=3", "train.stepz"),
]


@pytest.mark.parametrize(("override", "field"), FIELD_VALUES, ids=[o for o, _ in FIELD_VALUES])
def test_impossible_field_value(run, tmp_path, override, field):
  run(_train(tmp_path, override), field)


def test_text_len_names_the_real_minimum(run, tmp_path):
  from vidlm import config
  from vidlm.config_checks import check_values

  line = run(_train(tmp_path, "--config.data.text_len=29"), "data.text_len")
  assert "needs >= 30 tokens" in line, line  # BOS + 25-byte tier-a question + SEP + 2 digits + EOS
  cfg = config.load_config(DEMO)  # the demo also evaluates tier c: "Marker moved which way?" + "right" = 31
  cfg.data.text_len = 30
  with pytest.raises(config.ConfigError, match="tier-c .*needs >= 31"):
    check_values(cfg)
  cfg.data.text_len = 31
  check_values(cfg)  # the minimum is exact: one token fewer fails, this passes


def test_min_text_len_matches_the_generator():
  from vidlm.config_checks import min_text_len
  from vidlm.data import procedural, tokenizer

  for tier, needles, asked in [("a", 1, 1), ("b", 1, 1), ("c", 1, 1), ("a", 4, 2), ("c", 3, 3), ("b", 12, 1)]:
    longest = 0
    for index in range(40):
      ex = procedural.make_example(0, index, frames=16, height=32, width=32, tier=tier, num_needles=needles,
                                   num_asked=asked, text_len=256)
      longest = max(longest, len(tokenizer.prompt_ids(ex["question"])) + len(tokenizer.encode(ex["answer"])) + 1)
    need = min_text_len(tier, needles, asked)
    assert longest <= need, (tier, needles, asked, longest, need)
    assert need - longest <= 3 * asked + 3, (tier, needles, asked, longest, need)  # a bound, not a guess


@pytest.mark.parametrize(
  ("argv", "name"),
  [
    (["train", "--workdir", "W"], "--config"),
    (["train", "--config", DEMO], "--workdir"),
    (["eval", "--workdir", "W"], "--config"),
    (["train", "--config", "experiments/nope.py", "--workdir", "W"], "experiments/nope.py"),
    (["train", "--config", "experiments", "--workdir", "W"], "experiments"),
    (["train", "--config", DEMO, "--workdir", "W", "--bogus"], "--bogus"),
    (["train", "--config", DEMO, "--workdir", "W", "--config.train.steps"], "train.steps"),
    (["demo", "--workdir", "W", "--steps=3"], "--steps"),
    (["data", "make-synthetic", "--out", "O", "--num", "0"], "--num"),
    (["data", "make-synthetic", "--out", "O", "--num", "4", "--frames", "x"], "--frames"),
    (["data", "make-synthetic", "--out", "O", "--num", "4", "--tiers", "a,q"], "tier"),
    (["data", "make-synthetic", "--out", "O", "--num", "4", "--text-len", "5"], "--text-len"),
    (["data", "frobnicate"], "frobnicate"),
    (["bench"], "bench"),
    (["bench", "nope"], "bench"),
  ],
)
def test_bad_flags(run, tmp_path, argv, name):
  argv = [str(tmp_path / "w") if a == "W" else str(tmp_path / "o") if a == "O" else a for a in argv]
  run(argv, name)


def test_workdir_is_a_file(run, tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  run(["train", "--config", DEMO, "--workdir", str(f)], "--workdir")
  run(["eval", "--config", DEMO, "--workdir", str(f)], "--workdir")
  run(["demo", "--config", f"{DEMO}:smoke", "--workdir", str(f)], "--workdir")


@pytest.mark.parametrize(
  ("source", "line"),
  [
    ("def get_config(arg=None:\n  pass\n", "line 1"),  # syntax error
    ("from vidlm.config import Config\n\ndef get_config(arg=None):\n  return Config(nmae='x')\n", "line 4"),
    ("def get_config(arg=None):\n  x = 1\n  return 1 / 0\n", "line 3"),
    ("import no_such_module_here\n", "line 1"),
    ("X = 1\n", "get_config"),
    ("def get_config(arg=None):\n  return {}\n", "get_config"),
  ],
  ids=["syntax", "typo-kwarg", "exception", "import", "no-get_config", "wrong-return"],
)
def test_broken_config_file(run, tmp_path, source, line):
  f = tmp_path / "exp.py"
  f.write_text(source)
  msg = run(["train", "--config", str(f), "--workdir", str(tmp_path / "w")], str(f))
  assert line in msg, msg


@pytest.mark.parametrize("spec", ["experiments/demo.py:big", "experiments/long_context_gpu.py:huge",
                                  "experiments/ring_1m.py:seq=x", "experiments/ring_1m.py:tiny"])
def test_unknown_experiment_variant(run, tmp_path, spec):
  msg = run(["train", "--config", spec, "--workdir", str(tmp_path / "w")], spec.split(":")[1])
  assert "known variants:" in msg and "smoke" in msg, msg


def test_distributed_without_coordinator(tmp_path):
  """A subprocess: jax.distributed.initialize must run before the backend starts, which pytest's has."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDLM_", "SLURM_", "OMPI_", "PMI_"))}
  proc = subprocess.run(
    [sys.executable, "-m", "vidlm.cli", *_train(tmp_path, "--config.distributed.enabled=true")],
    capture_output=True, text=True, env=env, timeout=300,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  for name in ("distributed.coordinator_address", "VIDLM_COORDINATOR", "VIDLM_NUM_PROCESSES", "VIDLM_PROCESS_ID"):
    assert name in lines[0], lines[0]
  assert not (tmp_path / "w").exists()


def test_bad_distributed_env(tmp_path, monkeypatch):
  from vidlm import config, distributed

  monkeypatch.setenv("VIDLM_NUM_PROCESSES", "two")
  with pytest.raises(config.ConfigError, match="VIDLM_NUM_PROCESSES"):
    distributed.initialize(config.DistributedConfig(enabled=True))


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
  """A bug inside vidlm's own code reached from an experiment file is not turned into a one-liner."""
  from vidlm import config

  f = tmp_path / "exp.py"
  f.write_text("from vidlm import config\n\ndef get_config(arg=None):\n  return config.load_config(None)\n")
  with pytest.raises(AttributeError):
    config.load_config(str(f))


def test_help_explains_overrides_and_variants(capsys):
  for cmd in ("train", "eval"):
    with pytest.raises(SystemExit) as e:
      cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.SECTION.FIELD=VALUE" in out and "FILE.py[:variant]" in out and "--config.train.lr" in out
