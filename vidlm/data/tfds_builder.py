"""TFDS builder for the procedural NIAVH data, readable through `tfds.data_source` with no TensorFlow.

Frames are a `tfds.features.Tensor(uint8, encoding='zlib')`, never `tfds.features.Video` (which imports TF even
to read), and the files are ArrayRecord, so `tfds.data_source` gives grain-style random access. The examples are
the same as the ArrayRecord shards `vidlm data make-synthetic` writes (same `procedural.example_from_config`),
so the two paths agree record for record.

  import vidlm.data.tfds_builder  # registers 'vidlm_niavh'
  ds = tfds.data_source('vidlm_niavh/tiny', data_dir=DIR)   # builds on first use
  ds['train'][0]['frames']                                  # uint8 [F, H, W, 3]

Custom shapes: `tfds.builder('vidlm_niavh', config=NiavhConfig(name='mine', frames=...), data_dir=DIR)`.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from vidlm.data import procedural


@dataclasses.dataclass
class NiavhConfig(tfds.core.BuilderConfig):
  """Shapes and sizes of one NIAVH variant (the fields mirror `vidlm.config.DataConfig`)."""

  frames: int = 8
  height: int = 32
  width: int = 32
  text_len: int = 32
  tiers: tuple[str, ...] = ("a",)
  num_needles: int = 1
  num_asked: int = 1
  num_train: int = 256
  num_eval: int = 64
  seed: int = 0
  dataset: str = "niavh"


class VidlmNiavh(tfds.core.GeneratorBasedBuilder):
  """Procedural needle-in-a-video-haystack clips with a question/answer about the needle."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Tiers a (full-frame code), b (small patch code), c (motion direction)."}
  BUILDER_CONFIGS = [
    NiavhConfig(name="tiny", description="8 frames of 32x32, tier a, 256/64 clips."),
    NiavhConfig(name="tiers", description="16 frames of 32x32, tiers a, b, c, 1024/192 clips.", frames=16,
                tiers=("a", "b", "c"), num_train=1024, num_eval=192),
  ]
  DEFAULT_CONFIG_NAME = "tiny"

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # ArrayRecord by default: it is the format `tfds.data_source` reads with random access and without TF.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    t = tfds.features.Tensor
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({
        "frames": t(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8, encoding="zlib"),
        "tokens": t(shape=(c.text_len,), dtype=np.int32),
        "targets": t(shape=(c.text_len,), dtype=np.int32),
        "loss_mask": t(shape=(c.text_len,), dtype=np.float32),
        "question": t(shape=(), dtype=np.object_),
        "answer": t(shape=(), dtype=np.object_),
        "tier": t(shape=(), dtype=np.object_),
        "needle_frames": t(shape=(None,), dtype=np.int32),
        "index": t(shape=(), dtype=np.int64),
      }),
      homepage="https://example.invalid/vidlm",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    return {"train": self._generate_examples("train"), "eval": self._generate_examples("eval")}

  def _generate_examples(self, split: str):
    c = self.builder_config
    for i in range(c.num_train if split == "train" else c.num_eval):
      ex = procedural.example_from_config(c, split, i)
      yield i, {
        "frames": ex["frames"],
        "tokens": ex["tokens"],
        "targets": ex["targets"],
        "loss_mask": ex["loss_mask"],
        "question": ex["question"].encode(),
        "answer": ex["answer"].encode(),
        "tier": ex["tier"].encode(),
        "needle_frames": np.asarray(ex["needle_frames"], np.int32),
        "index": i,
      }
