"""grain pipeline: batch contract, per-process slices, exact resume (plain state and through orbax), caching."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vidlm.config import ConfigError, DataConfig
from vidlm.data import pipeline, procedural, records
from vidlm.data import tokenizer as T


def Data(**overrides) -> DataConfig:  # noqa: N802  (reads like the config it builds)
  """A small DataConfig for these tests."""
  small = dict(num_train=48, num_eval=20, frames=4, height=16, width=16, text_len=32, tiers=("a", "c"))
  return dataclasses.replace(DataConfig(**small), **overrides)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("pipeline"))


def indices(it, n):
  return [next(it)["index"].tolist() for _ in range(n)]


def test_batch_contract(workdir):
  cfg = Data()
  it = pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, workdir=workdir,
                              process_index=1, process_count=2)
  batch = next(it)
  assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
  assert batch["frames"].shape == (4, 4, 16, 16, 3) and batch["frames"].dtype == np.uint8
  for key in ("tokens", "targets"):
    assert batch[key].shape == (4, 32) and batch[key].dtype == np.int32
  assert batch["loss_mask"].shape == (4, 32) and batch["loss_mask"].dtype == np.float32
  assert batch["index"].shape == (4,) and batch["index"].dtype == np.int32
  for row in range(4):
    i = int(batch["index"][row])
    ref = procedural.example_from_config(cfg, "train", i)
    np.testing.assert_array_equal(batch["frames"][row], ref["frames"])
    np.testing.assert_array_equal(batch["tokens"][row], ref["tokens"])
    np.testing.assert_array_equal(batch["loss_mask"][row], ref["loss_mask"])
    assert T.answer_from_arrays(batch["targets"][row], batch["loss_mask"][row]) == ref["answer"]


def test_process_slices_disjoint_and_covering(workdir):
  cfg = Data()
  # eval: one pass, 3 processes -> every example exactly once.
  parts = [[int(x["index"]) for x in pipeline.make_dataset(cfg, split="eval", seed=0, workdir=workdir,
                                                            process_index=p, process_count=3)]
           for p in range(3)]
  flat = sum(parts, [])
  assert sorted(flat) == list(range(cfg.num_eval)) and len(flat) == len(set(flat))
  # train: the first epoch (48 = 2 x 24) splits into two disjoint halves of one permutation.
  halves = []
  for p in range(2):
    ds = pipeline.make_dataset(cfg, split="train", seed=3, workdir=workdir, process_index=p, process_count=2)
    halves.append([int(ds[i]["index"]) for i in range(24)])
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == list(range(cfg.num_train))
  assert halves[0] != sorted(halves[0])  # shuffled


def test_shuffle_depends_on_seed_only(workdir):
  cfg = Data()
  mk = lambda seed: pipeline.make_iterator(cfg, split="train", global_batch_size=4, seed=seed, workdir=workdir,
                                           process_index=0, process_count=1)
  assert indices(mk(1), 5) == indices(mk(1), 5)
  assert indices(mk(1), 5) != indices(mk(2), 5)
  # Endless train: a second epoch follows the first with a fresh permutation.
  it = mk(1)
  epochs = sum(indices(it, 24), [])
  assert sorted(epochs[:48]) == sorted(epochs[48:]) == list(range(48)) and epochs[:48] != epochs[48:]
  ev = pipeline.make_iterator(cfg, split="eval", global_batch_size=4, seed=0, workdir=workdir,
                              process_index=0, process_count=1)
  assert sum((b["index"].tolist() for b in ev), []) == list(range(20))  # eval: ordered, one pass


def test_iterator_state_restore_gives_identical_continuation(workdir):
  cfg = Data()
  mk = lambda: pipeline.make_iterator(cfg, split="train", global_batch_size=6, seed=4, workdir=workdir,
                                      process_index=0, process_count=2)
  it = mk()
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]  # crosses the epoch boundary (48 / 3 = 16 batches per process)
  fresh = mk()
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_iterator_state_through_orbax(workdir, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  cfg = Data()
  mk = lambda: pipeline.make_iterator(cfg, split="train", global_batch_size=4, seed=9, workdir=workdir,
                                      process_index=0, process_count=1)
  it = mk()
  indices(it, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mgr:
    mgr.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
  expected = indices(it, 5)
  fresh = mk()
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mgr:
    mgr.restore(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert indices(fresh, 5) == expected


def test_batch_size_must_divide_by_process_count(workdir):
  with pytest.raises(ValueError, match="train.batch_size"):
    pipeline.make_iterator(Data(), split="train", global_batch_size=6, seed=0, workdir=workdir,
                           process_index=0, process_count=4)
  with pytest.raises(ValueError, match="eval.batch_size"):
    pipeline.make_iterator(Data(), split="eval", global_batch_size=6, seed=0, workdir=workdir,
                           process_index=0, process_count=4)
  with pytest.raises(ValueError, match="data.num_eval"):
    pipeline.make_iterator(Data(), split="eval", global_batch_size=32, seed=0, workdir=workdir,
                           process_index=0, process_count=1)


def test_generated_data_is_cached_and_regenerated_on_change(tmp_path):
  cfg = Data(num_train=8, num_eval=4, tiers=("a",))
  d = Path(pipeline.split_dir(cfg, "train", tmp_path))
  assert d == tmp_path / "data" / "train"
  stamp = os.stat(records.shard_paths(d)[0]).st_mtime_ns
  assert Path(pipeline.split_dir(cfg, "train", tmp_path)) == d
  assert os.stat(records.shard_paths(d)[0]).st_mtime_ns == stamp  # reused, not rewritten
  bigger = dataclasses.replace(cfg, num_train=12)
  pipeline.split_dir(bigger, "train", tmp_path)
  assert records.read_metadata(d)["num_records"] == 12
  assert len(pipeline.make_dataset(bigger, split="eval", seed=0, workdir=tmp_path, process_index=0,
                                   process_count=1)) == 4
  assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_two_processes_generate_once_without_clashing(tmp_path):
  script = textwrap.dedent(f"""
    import sys, types
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from vidlm.data import pipeline
    cfg = types.SimpleNamespace(dataset="niavh", path=None, num_train=64, num_eval=8, frames=4, height=16,
                                width=16, text_len=32, tiers=("a",), num_needles=1, num_asked=1, seed=1,
                                shuffle=True, prefetch=0)
    it = pipeline.make_iterator(cfg, split="train", global_batch_size=4, seed=0, workdir={str(tmp_path)!r},
                                process_index=int(sys.argv[1]), process_count=2)
    print(sorted(sum((next(it)["index"].tolist() for _ in range(16)), [])))
  """)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(p)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for p in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  got = [json.loads(out) for out, _ in outs]
  assert sorted(got[0] + got[1]) == list(range(64))  # one dataset, split disjointly between the two
  assert records.read_metadata(tmp_path / "data" / "train")["num_records"] == 64
  assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".train.lock", "train"]


def test_data_path_with_wrong_shapes_is_rejected(tmp_path):
  cfg = Data(num_train=4, tiers=("a",))
  records.write_shards([procedural.example_from_config(cfg, "train", i) for i in range(4)], tmp_path / "train", 1,
                       progress=False, metadata=pipeline.generation_metadata(cfg, "train"))
  ok = dataclasses.replace(cfg, path=str(tmp_path))
  assert len(pipeline.make_dataset(ok, split="train", seed=0, workdir="unused", process_index=0,
                                   process_count=1, num_epochs=1)) == 4
  with pytest.raises(ConfigError, match="data.frames=8 but the records .* have frames=4"):
    pipeline.make_dataset(dataclasses.replace(ok, frames=8), split="train", seed=0, workdir="unused",
                          process_index=0, process_count=1)
