"""experiments/ablations/long_context.py: every variant's overrides apply and validate as `vidlm sweep` applies them
(no training), each variant is the model / position trick its name says, and the memory-bridge variants are experiments/memory_bridge.py's recipe."""

from pathlib import Path

import pytest

from experiments.ablations import long_context
from vidlm import config as config_lib
from vidlm import sweep

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "experiments" / "ablations" / "long_context.py")
NAMES = ["dense", "dense_random", "dense_shift", "dense_interp", "dense_long", "dense_random_long", "mb_fixed",
         "mb_scene"]
POSITIONS = {  # variant -> (train_positions, eval_positions)
  "dense": ("contiguous", "contiguous"),
  "dense_random": ("random", "contiguous"),
  "dense_shift": ("shift", "contiguous"),
  "dense_interp": ("contiguous", "interpolate"),
  "dense_long": ("contiguous", "contiguous"),
  "dense_random_long": ("random", "contiguous"),
}


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_variant_validates(arg):
  spec = SPEC if arg is None else f"{SPEC}:{arg}"
  variants = sweep.load_sweep(spec)
  assert list(variants) == NAMES
  for name, overrides in variants.items():
    cfg = sweep.check_variant(spec, name, sweep.variant_args([], overrides))  # raises ConfigError if rejected
    e = cfg.eval
    assert e.evaluators == ("loss", "niavh") and e.niavh_scoring == "teacher_forced"
    assert cfg.data.frames == 8
    if arg is None:
      assert e.length_multipliers == (1, 8, 32, 128) and e.tiers == ("a", "b", "c")
    if name in POSITIONS:
      assert cfg.model.name == "video_lm"
      assert (cfg.model.train_positions, cfg.model.eval_positions) == POSITIONS[name]
      if cfg.model.train_positions != "contiguous":
        # every evaluated frame position was a training position
        assert cfg.model.max_train_position >= cfg.data.frames * max(e.length_multipliers)
      assert cfg.data.tiers == ("a",)
      assert cfg.train.steps == (long_context.LONG if name.endswith("_long") else 1) * (4 if arg else 120)
    else:
      assert cfg.model.name == "memory_bridge"
      assert cfg.model.segment_mode == ("fixed" if name == "mb_fixed" else "scene")
      assert cfg.data.tiers == long_context.memory_bridge_config().data.tiers  # experiments/memory_bridge.py's mix


def test_unknown_variant_is_one_line():
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'big'"):
    long_context.get_sweep("big")


def test_memory_bridge_variants_take_its_experiment_recipe():
  from experiments.memory_bridge import get_config as mb_config  # noqa: PLC0415

  for arg in (None, "smoke"):
    mb = mb_config(arg)
    spec = SPEC if arg is None else f"{SPEC}:{arg}"
    for name in ("mb_fixed", "mb_scene"):
      cfg = sweep.check_variant(spec, name, sweep.variant_args([], long_context.get_sweep(arg)[name]))
      for field in ("embed_dim", "memory_tokens", "segment_length", "segment_stride", "decoder_layers", "tubelet"):
        assert getattr(cfg.model, field) == getattr(mb.model, field), (name, field)
      assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (mb.train.steps, mb.train.lr, mb.train.batch_size)
