"""Checks of a user's data.path that run with config validation (before distributed start-up or any device work),
data.text_len judged against the records rather than the generator, the format marker in the saved data-iterator
state, and the bound on a split whose records are all unusable.

Data is small procedural records written with `records.write_shards` (4 frames of 16x16), or the demo's 8x32x32.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from vidlm import cli
from vidlm import config as C
from vidlm.config import ConfigError, DataConfig
from vidlm.config_checks import check_data_path
from vidlm.data import pipeline, procedural, records
from vidlm.data import tokenizer as T

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments" / "demo.py") + ":smoke"
SMALL = dict(num_train=12, num_eval=4, frames=4, height=16, width=16, text_len=32, tiers=("a",), prefetch=0)


def write_data(root: Path, cfg: DataConfig, text: tuple[str, str] | None = None) -> Path:
  """cfg.num_train procedural records in 2 shards (+ metadata.json with checksums and max_tokens); with `text`
  = (question, answer) every record's text is replaced by it (shorter than any procedural question)."""
  exs = [procedural.example_from_config(cfg, "train", i) for i in range(cfg.num_train)]
  if text is not None:
    tokens = np.array(T.prompt_ids(text[0]) + T.encode(text[1]) + [T.EOS], np.int32)
    exs = [{**e, "tokens": tokens} for e in exs]
  records.write_shards(exs, root, 2, progress=False, metadata=pipeline.generation_metadata(cfg, "train"))
  return root


def demo_data(tmp_path: Path, text: tuple[str, str] | None = None) -> Path:
  cfg = C.load_config(SMOKE).data
  return write_data(tmp_path / "clips", dataclasses.replace(cfg, num_train=8), text)


@pytest.fixture
def cli_error(capsys, monkeypatch):
  """main(argv) -> its one stderr line; fails if distributed start-up (the first device-facing step) was reached."""
  from vidlm import distributed

  def no_start(*_):
    raise AssertionError("distributed.initialize reached: the data check ran too late")

  monkeypatch.setattr(distributed, "initialize", no_start)

  def go(argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]

  return go


def train_argv(tmp_path: Path, *overrides: str) -> list[str]:
  return ["train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), "--config.train.progress_bar=false",
          *overrides]


def test_bad_data_path_is_reported_by_the_cli_before_start_up(tmp_path, cli_error):
  line = cli_error(train_argv(tmp_path, f"--config.data.path={tmp_path / 'nope'}"))
  assert line.startswith(f"error: data.path={tmp_path / 'nope'}: no such directory"), line
  root = demo_data(tmp_path)
  line = cli_error(train_argv(tmp_path, f"--config.data.path={root}", "--config.data.frames=16"))
  assert f"data.frames=16 but the records in {root} have frames=8; set --config.data.frames=8" in line, line
  bad = records.shard_paths(root)[1]
  with open(bad, "r+b") as f:  # garble bytes inside a record: size unchanged, crc32 differs
    f.seek(1000)
    f.write(b"\xa5" * 16)
  line = cli_error(train_argv(tmp_path, f"--config.data.path={root}"))
  assert f"shard {bad} does not match metadata.json (crc32 " in line, line
  assert not (tmp_path / "w").exists()  # nothing written: the run never started
  line = cli_error(["eval", "--config", SMOKE, "--workdir", str(tmp_path / "w"), f"--config.data.path={root}"])
  assert f"shard {bad} does not match" in line, line  # vidlm eval validates the same way


def test_validation_of_a_longer_eval_length_does_not_check_the_records(tmp_path):
  """eval/grid.py validates data.frames x each length multiplier; the records stay at data.frames."""
  from vidlm.eval import grid

  cfg = C.load_config(SMOKE)
  cfg.data.path = str(demo_data(tmp_path))
  check_data_path(cfg)
  assert [x.frames for x in grid.lengths(cfg)] == [8, 16]


def test_text_len_is_checked_against_the_records_not_the_generator(tmp_path, cli_error):
  root = demo_data(tmp_path, text=("hi?", "ok"))
  longest = records.read_metadata(root)["max_tokens"]
  assert longest == 8  # BOS h i ? SEP o k EOS; the shortest procedural question + answer needs 30
  cfg = C.load_config(SMOKE)
  cfg.data.path, cfg.data.text_len, cfg.eval.evaluators = str(root), longest, ("loss",)
  C.validate(cfg, num_devices=8)  # no tier-a question would fit: passes
  check_data_path(cfg)  # fits the records: passes
  cfg.data.text_len = longest - 1
  C.validate(cfg, num_devices=8)
  with pytest.raises(ConfigError) as e:
    check_data_path(cfg)
  assert str(e.value) == (f"data.text_len={longest - 1} but the records in {root} hold texts of up to {longest} "
                          f"tokens (text_len=32); set --config.data.text_len={longest} or more")
  # vidlm train says so before start-up
  line = cli_error(train_argv(tmp_path, f"--config.data.path={root}", f"--config.data.text_len={longest - 1}",
                              "--config.eval.evaluators=loss"))
  assert line == f"error: {e.value}", line
  # an evaluator that generates procedural examples does need them to fit, and says which one and the way out
  cfg.data.text_len = longest
  for evaluator, tier in (("niavh", "a"), ("ppl_vs_length", "a")):
    cfg.eval.evaluators = ("loss", evaluator)
    with pytest.raises(ConfigError, match=rf"^config\.data\.text_len=8: too short for the {evaluator} evaluator's "
                                          rf"tier-{tier} question .*needs >= 30 .*drop {evaluator} from eval\."):
      C.validate(cfg, num_devices=8)


def test_old_data_iterator_state_is_refused_naming_the_checkpoint(tmp_path):
  from flax import nnx

  from vidlm.config import CheckpointConfig
  from vidlm.train.checkpoint import Checkpointer

  cfg = dataclasses.replace(DataConfig(**SMALL), path=str(write_data(tmp_path / "d", DataConfig(**SMALL))))

  def iterator():
    return pipeline.make_iterator(cfg, split="train", global_batch_size=2, seed=0, workdir=str(tmp_path),
                                  process_index=0, process_count=1)

  state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  it = iterator()
  next(it)
  ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(use_async=False))
  ckpt.save(1, state, it, wait=True)
  want = next(it)["index"].tolist()
  fresh = iterator()
  assert ckpt.restore(state, fresh)[0] == 1 and next(fresh)["index"].tolist() == want  # the marked state resumes
  (saved,) = (tmp_path / "ckpt" / "1" / "data_iter").glob("*.json")
  assert json.loads(saved.read_text()) == {"vidlm_data_state": 2, "iterator": {"next_index": 2}}
  saved.write_text(json.dumps({"next_index": 1}))  # what a checkpoint from before the marker holds (1 batch)
  ckpt.close()
  ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(use_async=False))
  with pytest.raises(ConfigError) as e:
    ckpt.restore(state, iterator())
  ckpt.close()
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"checkpoint {tmp_path / 'ckpt' / '1'}: its data iterator state "), msg
  assert "wrong data position" in msg and "start a new --workdir" in msg
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]  # not corrupt: left in place, not moved aside


@pytest.mark.parametrize("prefetch", [0, 2])
def test_split_of_only_bad_records_stops_naming_the_path_and_count(tmp_path, prefetch):
  """Every record garbled (but the shards match their checksums, so only decoding finds it): one line, not an
  endless search for a full batch."""
  root = write_data(tmp_path / "d", DataConfig(**SMALL))
  meta = records.read_metadata(root)
  from array_record.python import array_record_module

  for path in records.shard_paths(root):
    n = meta["num_records"] // 2
    os.remove(path)
    w = array_record_module.ArrayRecordWriter(path, records.WRITER_OPTIONS)
    for i in range(n):
      w.write(b"garbled record %d" % i)
    w.close()
  meta["files"] = {os.path.basename(p): records.file_digest(p) for p in records.shard_paths(root)}
  records.write_metadata(root, meta)
  cfg = dataclasses.replace(DataConfig(**SMALL), path=str(root), prefetch=prefetch)
  it = pipeline.make_iterator(cfg, split="train", global_batch_size=2, seed=0, workdir=str(tmp_path),
                              process_index=0, process_count=1)
  with pytest.raises(ConfigError) as e:
    next(it)
  msg = str(e.value)
  assert "\n" not in msg, msg
  found = re.match(rf"data\.path={re.escape(str(root))}: (\d+) records of {re.escape(str(root))} \(train, 12 records\) "
                   r"in a row could not be used \((\d+) bad in all; first: ", msg)
  # a whole pass over the split (12), a few more when prefetch threads decode ahead
  assert found and 12 <= int(found[1]) <= int(found[2]) <= 12 + 2 * max(prefetch, 1) * 2, msg
  assert "no batch can be filled" in msg and "shard-0000" in msg
