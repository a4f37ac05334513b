"""TFDS builder: build and read back through `tfds.data_source` in a process where TensorFlow cannot be imported,
and its output used as `data.path` by the training pipeline.

The child process puts a `tensorflow` package first on its path whose import raises, so the test holds whether
or not TensorFlow happens to be installed, and it asserts no `tensorflow` module was ever loaded.
"""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vidlm.config import ConfigError, DataConfig
from vidlm.data import commands, pipeline, procedural

CHILD = textwrap.dedent("""
  import sys
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    pass
  else:
    raise SystemExit("tensorflow imported; the block did not work")
  import numpy as np
  import tensorflow_datasets as tfds
  from vidlm.data import procedural, tfds_builder

  data_dir = sys.argv[1]
  cfg = tfds_builder.NiavhConfig(name="test", frames=6, height=32, width=32, tiers=("a", "b", "c"),
                                 num_train=12, num_eval=6, seed=3)
  ds = tfds.data_source("vidlm_niavh", data_dir=data_dir, builder_kwargs={"config": cfg})
  assert sorted(ds) == ["eval", "train"], sorted(ds)
  assert len(ds["train"]) == 12 and len(ds["eval"]) == 6
  for split in ("train", "eval"):
    seen = set()
    for j in range(len(ds[split])):
      got = ds[split][j]
      i = int(got["index"])
      seen.add(i)
      ref = procedural.example_from_config(cfg, split, i)
      assert got["frames"].dtype == np.uint8 and got["frames"].shape == (6, 32, 32, 3)
      np.testing.assert_array_equal(got["frames"], ref["frames"])
      np.testing.assert_array_equal(got["tokens"], ref["tokens"])
      np.testing.assert_array_equal(got["loss_mask"], ref["loss_mask"])
      assert got["answer"].decode() == ref["answer"] and got["tier"].decode() == ref["tier"]
      assert got["needle_frames"].tolist() == ref["needle_frames"]
    assert seen == set(range(len(ds[split])))
  # A second reader finds the prepared files (no rebuild) through the registered name.
  again = tfds.builder("vidlm_niavh", config=cfg, data_dir=data_dir)
  assert again.is_prepared()
  assert again.info.splits["train"].file_instructions  # ArrayRecord files
  assert again.info.file_format.value == "array_record"
  loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
  assert not loaded, loaded
  print("TFDS_OK")
""")


def test_tfds_round_trip_without_tensorflow(tmp_path):
  block = tmp_path / "block"
  (block / "tensorflow").mkdir(parents=True)
  (block / "tensorflow" / "__init__.py").write_text("raise ImportError('tensorflow is blocked in this test')\n")
  env = {"PYTHONPATH": str(block), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TFDS_DATA_DIR": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "tfds")], capture_output=True, text=True,
                        env=env, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "TFDS_OK" in proc.stdout


def test_tfds_build_output_feeds_the_training_pipeline(tmp_path):
  """`vidlm data tfds-build` output, given as data.path (the version directory), gives the same batches contract
  and the same examples as the generator; a shape that differs from the build is one ConfigError line."""
  assert commands.main(["tfds-build", "--data-dir", str(tmp_path), "--config", "tiny"]) == 0
  version_dir = tmp_path / "vidlm_niavh" / "tiny" / "1.0.0"
  cfg = DataConfig(path=str(version_dir), frames=8, height=32, width=32, text_len=40, prefetch=0, shuffle=False)
  it = pipeline.make_iterator(cfg, split="eval", global_batch_size=16, seed=0, workdir=str(tmp_path),
                              process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 4  # 64 eval clips in the tiny config
  ref_cfg = dataclasses.replace(cfg, text_len=32, num_train=256, num_eval=64)  # the tiny build's settings
  b = batches[0]
  assert b["frames"].shape == (16, 8, 32, 32, 3) and b["tokens"].shape == (16, 40)
  for row in (0, 7):
    ref = procedural.example_from_config(ref_cfg, "eval", int(b["index"][row]))
    np.testing.assert_array_equal(b["frames"][row], ref["frames"])
    np.testing.assert_array_equal(b["tokens"][row, :32], ref["tokens"])
    np.testing.assert_array_equal(b["loss_mask"][row, :32], ref["loss_mask"])
  assert sorted(int(i) for x in batches for i in x["index"]) == list(range(64))
  with pytest.raises(ConfigError, match=f"data.height=16 but the records in {version_dir} have height=32"):
    pipeline.make_iterator(dataclasses.replace(cfg, height=16), split="train", global_batch_size=8, seed=0,
                           workdir=str(tmp_path), process_index=0, process_count=1)
  with pytest.raises(ConfigError, match=f"point data.path at the version directory, e.g. {version_dir}"):
    pipeline.make_iterator(dataclasses.replace(cfg, path=str(tmp_path)), split="train", global_batch_size=8,
                           seed=0, workdir=str(tmp_path), process_index=0, process_count=1)
