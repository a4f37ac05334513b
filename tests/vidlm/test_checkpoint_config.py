"""A config that does not match the run's checkpoints fails with one line naming the differing fields (exit 2) and
changes nothing in the workdir; the intact run still evaluates."""

import hashlib
import shutil
from pathlib import Path

import pytest

from vidlm import config as C

pytestmark = pytest.mark.xdist_group("resume")
SMOKE = ["--config", "experiments/demo.py:smoke", "--config.train.progress_bar=false", "--config.data.num_train=64"]


def _snapshot(workdir: Path) -> dict[str, str]:
  """Every file under the workdir (data cache, checkpoints, logs, config) -> sha256 of its bytes."""
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from vidlm.cli import main

  workdir = tmp_path_factory.mktemp("ckpt_config") / "run"
  assert main(["train", *SMOKE, "--workdir", str(workdir)]) == 0
  return workdir


def test_mismatched_model_config_is_one_line_and_changes_nothing(run, capsys):
  from vidlm.cli import main

  before = _snapshot(run)
  config_bytes = (run / "config.json").read_bytes()
  capsys.readouterr()
  code = main(["train", *SMOKE, "--workdir", str(run), "--config.model.embed_dim=256", "--config.model.num_layers=3",
               "--config.train.steps=8"])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1, err
  assert err.startswith("error: config does not match the run in"), err
  assert "model.embed_dim (run: 128, now: 256)" in err and "model.num_layers (run: 2, now: 3)" in err, err
  assert "train.steps" not in err  # free to differ
  assert (run / "config.json").read_bytes() == config_bytes
  assert _snapshot(run) == before

  # the intact run still evaluates with its own config
  assert main(["eval", *SMOKE, "--workdir", str(run), "--config.eval.evaluators=loss"]) == 0
  results = (run / "eval" / "results.json").read_text()
  assert '"step": 4' in results


def test_fields_that_do_not_change_state_may_differ(run, tmp_path):
  from vidlm.cli import main

  work = tmp_path / "w"
  shutil.copytree(run, work)
  assert main(["train", *SMOKE, "--workdir", str(work), "--config.train.steps=5", "--config.train.lr=0.001",
               "--config.model.remat=full"]) == 0
  assert C.from_dict(__import__("json").loads((work / "config.json").read_text())).train.steps == 5


def test_checkpoint_shapes_checked_without_config_json(run, tmp_path):
  """No config.json to compare with (e.g. restore_from another run): the checkpoint's own shapes are checked, the
  error names a parameter, and the checkpoint is not mistaken for a corrupt one (nothing is moved aside)."""
  from vidlm.train.loop import Trainer

  work = tmp_path / "w"
  shutil.copytree(run, work)
  (work / "config.json").unlink()
  cfg = C.load_config("experiments/demo.py:smoke")
  cfg.model.embed_dim, cfg.train.progress_bar, cfg.data.num_train = 256, False, 64
  before = _snapshot(work)
  with pytest.raises(C.ConfigError, match=r"checkpoints/4 does not match the config \(.*checkpoint \(.*128.*\) vs "
                                          r"config \(.*256.*\)"):
    Trainer(cfg, work).train()
  assert not list((work / "checkpoints").glob("*.corrupt-*"))
  assert _snapshot(work) == before
