"""Data faults: a damaged shard is named (or its bad record skipped and counted), a damaged generated cache is
regenerated, a user's data.path that is missing, damaged or shaped unlike the config is one ConfigError line.

How the damage is made (see vidlm/data/source.py for what ArrayRecord does with each):
  - bytes overwritten inside a record's chunk: the file opens, that one record fails its hash on read;
  - a truncated file: the file cannot be opened at all.
"""

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from vidlm.config import ConfigError, DataConfig
from vidlm.data import pipeline, procedural, records, source
from vidlm.data import tokenizer as T

SMALL = dict(num_train=12, num_eval=4, frames=4, height=16, width=16, text_len=32, tiers=("a",), prefetch=0)


def Data(**overrides) -> DataConfig:  # noqa: N802
  return dataclasses.replace(DataConfig(**SMALL), **overrides)


def write_user_data(root: Path, cfg: DataConfig, num_shards: int = 2) -> Path:
  exs = [procedural.example_from_config(cfg, "train", i) for i in range(cfg.num_train)]
  records.write_shards(exs, root, num_shards, progress=False, metadata=pipeline.generation_metadata(cfg, "train"))
  return root


def garble_record(path: str, offset: int = 1000) -> None:
  """Overwrite 16 bytes inside the first record's chunk (records start at byte 64)."""
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(b"\xa5" * 16)


def truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def all_indices(cfg, workdir, batch=2) -> list[int]:
  it = pipeline.make_iterator(cfg, split="train", global_batch_size=batch, seed=0, workdir=str(workdir),
                              process_index=0, process_count=1, num_epochs=1)
  out = []
  for b in it:
    assert b["frames"].shape == (batch, 4, 16, 16, 3)  # every batch full although a record was dropped
    out += b["index"].tolist()
  return out


def test_corrupt_record_is_skipped_counted_and_named(tmp_path, caplog):
  cfg = Data(path=str(write_user_data(tmp_path / "d", Data())))
  meta = records.read_metadata(tmp_path / "d")
  del meta["files"]  # data from before checksums: the shard is opened and read, not pre-verified
  records.write_metadata(tmp_path / "d", meta)
  bad = records.shard_paths(tmp_path / "d")[1]  # holds examples 6..11; the first record (example 6) is garbled
  garble_record(bad)
  source.reset_skipped()
  with caplog.at_level(logging.WARNING):
    got = all_indices(dataclasses.replace(cfg, shuffle=False), tmp_path)
  assert got == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]  # example 6 skipped, nothing repeated; remainder (11) dropped
  assert source.skipped_records() == {bad: 1}
  warnings = [r.getMessage() for r in caplog.records if "skipping unreadable record" in r.getMessage()]
  assert len(warnings) == 1 and bad in warnings[0] and "hash mismatch" in warnings[0]
  assert "shards not verified" in caplog.text  # the missing checksums are said, not silently ignored


def test_unopenable_shard_is_one_line_error_naming_it(tmp_path):
  write_user_data(tmp_path / "d", Data())
  meta = records.read_metadata(tmp_path / "d")
  del meta["files"]
  records.write_metadata(tmp_path / "d", meta)
  bad = records.shard_paths(tmp_path / "d")[0]
  truncate(bad)
  with pytest.raises(ConfigError) as e:
    pipeline.make_iterator(Data(path=str(tmp_path / "d")), split="train", global_batch_size=2, seed=0,
                           workdir=str(tmp_path), process_index=0, process_count=1)
  msg = str(e.value)
  assert "\n" not in msg and f"shard {bad} cannot be opened" in msg and "regenerate it" in msg


def test_user_data_checksum_mismatch_is_an_error_not_a_rewrite(tmp_path):
  root = write_user_data(tmp_path / "d", Data())
  bad = records.shard_paths(root)[1]
  garble_record(bad)
  before = Path(bad).read_bytes()
  with pytest.raises(ConfigError) as e:
    pipeline.make_dataset(Data(path=str(root)), split="train", seed=0, workdir=str(tmp_path), process_index=0,
                          process_count=1)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"data.path: shard {bad} does not match metadata.json (crc32 ")
  assert Path(bad).read_bytes() == before  # user data is never regenerated
  truncate(bad)
  with pytest.raises(ConfigError, match=rf"shard {bad} does not match metadata.json \(size \d+ bytes, "):
    pipeline.make_dataset(Data(path=str(root)), split="train", seed=0, workdir=str(tmp_path), process_index=0,
                          process_count=1)


@pytest.mark.parametrize("damage", [garble_record, truncate, os.remove])
def test_damaged_generated_cache_is_regenerated(tmp_path, caplog, damage):
  cfg = Data()
  d = Path(pipeline.split_dir(cfg, "train", tmp_path))
  shard = records.shard_paths(d)[0]
  good = Path(shard).read_bytes()
  damage(shard)
  with caplog.at_level(logging.WARNING):
    assert Path(pipeline.split_dir(cfg, "train", tmp_path)) == d
  assert f"generated data cache {d} is damaged ({shard}: " in caplog.text
  assert caplog.text.count("is damaged") == 1  # said once, not once per re-check under the lock
  assert Path(shard).read_bytes() == good  # regenerated byte for byte (the generator is deterministic)
  assert records.verify_shards(d) == []
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    pipeline.split_dir(cfg, "train", tmp_path)  # intact now: reused without a word
  assert "damaged" not in caplog.text


def test_missing_or_empty_data_path(tmp_path):
  def err(path) -> str:
    with pytest.raises(ConfigError) as e:
      pipeline.make_dataset(Data(path=str(path)), split="train", seed=0, workdir=str(tmp_path), process_index=0,
                            process_count=1)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert err(tmp_path / "nope").startswith(f"data.path={tmp_path / 'nope'}: no such directory")
  (tmp_path / "empty").mkdir()
  assert "no *.array_record shards in" in err(tmp_path / "empty")
  root = write_user_data(tmp_path / "nometa", Data())
  os.remove(root / records.METADATA_FILE)
  assert err(root) == (f"data.path: {root / records.METADATA_FILE} is missing or unreadable; the shards cannot be "
                       f"checked against the config (regenerate it (vidlm data make-synthetic / vidlm data ingest) "
                       f"or restore the file)")


@pytest.mark.parametrize(
  "field,value,stored",
  [("frames", 8, "frames=4"), ("height", 32, "height=16"), ("width", 8, "width=16"), ("text_len", 12, "up to ")],
)
def test_config_shapes_not_matching_user_records(tmp_path, field, value, stored):
  root = write_user_data(tmp_path / "d", Data(), num_shards=1)
  cfg = Data(path=str(root), **{field: value})
  with pytest.raises(ConfigError) as e:
    pipeline.make_iterator(cfg, split="train", global_batch_size=2, seed=0, workdir=str(tmp_path),
                           process_index=0, process_count=1)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"data.{field}={value} but the records in {root}") and stored in msg
  if field == "text_len":
    longest = records.read_metadata(root)["max_tokens"]
    assert 12 < longest <= 32 and f"set --config.data.text_len={longest}" in msg
  # a larger text_len than stored is fine: texts are stored trimmed and re-padded
  b = next(pipeline.make_iterator(Data(path=str(root), text_len=48), split="train", global_batch_size=2, seed=0,
                                  workdir=str(tmp_path), process_index=0, process_count=1))
  assert b["tokens"].shape == (2, 48) and np.all(b["tokens"][:, 32:] == T.PAD)


def test_check_user_data_runs_the_same_checks_without_an_iterator(tmp_path):
  root = write_user_data(tmp_path / "d", Data(), num_shards=1)
  pipeline.check_user_data(Data(path=str(root)))  # train and eval (same records: no eval/ folder)
  with pytest.raises(ConfigError, match=f"data.width=8 but the records in {root} have width=16"):
    pipeline.check_user_data(Data(path=str(root), width=8))
  pipeline.check_user_data(Data())  # generated data: nothing to check, nothing generated
  assert not (Path("unused") / "data").exists()
