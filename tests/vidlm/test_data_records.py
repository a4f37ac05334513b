"""ArrayRecord clip format: exact round trip, shard layout and order, metadata."""

import json
import os

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from vidlm.data import procedural, records
from vidlm.data import tokenizer as T


def example(i, tier="a", text_len=32):
  return procedural.make_example(5, i, frames=6, height=16, width=24, tier=tier, text_len=text_len)


@pytest.mark.parametrize("tier", ["a", "c"])
def test_encode_decode_round_trip(tier):
  ex = example(3, tier)
  back = records.decode_record(records.encode_record(ex), text_len=32)
  for key in ("frames", "tokens", "targets", "loss_mask"):
    assert back[key].dtype == ex[key].dtype, key
    np.testing.assert_array_equal(back[key], ex[key], err_msg=key)
  for key in ("question", "answer", "tier", "index", "needle_frames", "asked_frames", "cut_frames"):
    assert back[key] == ex[key], key


def test_text_is_stored_trimmed_and_repadded():
  ex = example(1)
  raw = records.encode_record(ex)
  n = len(T.prompt_ids(ex["question"])) + len(ex["answer"]) + 1
  assert records.decode_record(raw)["tokens"].shape == (n,)
  wide = records.decode_record(raw, text_len=64)
  assert wide["tokens"].shape == (64,) and (wide["tokens"][n:] == T.PAD).all()
  assert T.answer_from_arrays(wide["targets"], wide["loss_mask"]) == ex["answer"]
  with pytest.raises(ValueError, match="data.text_len"):
    records.decode_record(raw, text_len=n - 1)
  with pytest.raises(ValueError, match="format"):
    import msgpack

    records.decode_record(msgpack.packb({"format": "other"}))
  with pytest.raises(ValueError, match="frames"):
    records.encode_record({**ex, "frames": ex["frames"][..., 0]})


def test_write_shards_contiguous_in_generation_order(tmp_path):
  exs = [example(i) for i in range(10)]
  n = records.write_shards(exs, tmp_path, num_shards=3, progress=False, metadata={"split": "train"})
  assert n == 10
  paths = records.shard_paths(tmp_path)
  assert [os.path.basename(p) for p in paths] == [f"shard-0000{i}-of-00003.array_record" for i in range(3)]
  source = ArrayRecordDataSource(paths)
  assert len(source) == 10
  got = [records.decode_record(source[i], 32) for i in range(10)]
  assert [g["index"] for g in got] == list(range(10))
  np.testing.assert_array_equal(got[7]["frames"], exs[7]["frames"])
  meta = json.loads((tmp_path / records.METADATA_FILE).read_text())
  assert meta["num_records"] == 10 and meta["num_shards"] == 3 and meta["split"] == "train"
  assert records.read_metadata(tmp_path) == meta


def test_write_shards_from_generator_round_robin_and_rewrite(tmp_path):
  n = records.write_shards((example(i) for i in range(5)), tmp_path, num_shards=2, progress=False)
  assert n == 5
  source = ArrayRecordDataSource(records.shard_paths(tmp_path))
  assert sorted(records.decode_record(source[i])["index"] for i in range(5)) == list(range(5))
  # Fewer clips than shards from a generator: empty shard files are dropped; old shards never linger.
  records.write_shards((example(i) for i in range(2)), tmp_path, num_shards=4, progress=False)
  assert len(records.shard_paths(tmp_path)) == 2
  assert len(ArrayRecordDataSource(records.shard_paths(tmp_path))) == 2
