"""Config loading, overrides and the one-line errors that name the field."""

import dataclasses

import pytest

from vidlm import config as C

DEMO = "experiments/demo.py"


def _valid():
  cfg = C.load_config(DEMO)
  cfg.mesh = C.MeshConfig(data=-1)
  return cfg


def test_demo_config_loads_and_validates():
  cfg = C.validate(_valid(), num_devices=8)
  assert cfg.name == "demo"
  assert C.sequence_length(cfg) == 8 * 4 * 4 + cfg.data.text_len


def test_variant_argument():
  assert C.load_config(f"{DEMO}:smoke").train.steps < C.load_config(DEMO).train.steps


def test_overrides_are_typed():
  cfg = _valid()
  for key, value in C.parse_overrides(["--config.train.steps=10", "--config.mesh.seq", "4",
                                       "--config.model.tubelet=2,8,8", "--config.data.path=none",
                                       "--config.train.progress_bar=false", "--config.train.lr=1e-4"]):
    C.apply_override(cfg, key, value)
  assert cfg.train.steps == 10 and cfg.mesh.seq == 4 and cfg.model.tubelet == (2, 8, 8)
  assert cfg.data.path is None and cfg.train.progress_bar is False and cfg.train.lr == 1e-4


def test_json_round_trip():
  cfg = _valid()
  assert C.from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
  ("mutate", "field"),
  [
    (lambda c: C.apply_override(c, "train.stepz", "3"), "train.stepz"),
    (lambda c: C.apply_override(c, "nosuch.x", "3"), "nosuch"),
    (lambda c: C.apply_override(c, "train.steps", "ten"), "train.steps"),
    (lambda c: C.apply_override(c, "train.progress_bar", "maybe"), "train.progress_bar"),
    (lambda c: setattr(c.train, "lr", "fast"), "train.lr"),
    (lambda c: setattr(c.data, "frames", 9) or setattr(c.model, "tubelet", (2, 8, 8)), "data.frames"),
    (lambda c: setattr(c.data, "height", 36), "data.height"),
    (lambda c: setattr(c.attention, "impl", "flash") or setattr(c.data, "text_len", 40), "block size"),
    (lambda c: setattr(c.mesh, "seq", 8) or setattr(c.mesh, "data", 1) or setattr(c.data, "text_len", 44),
     "mesh.seq"),
    (lambda c: setattr(c.mesh, "data", 16), "config.mesh"),
    (lambda c: setattr(c.attention, "impl", "magic"), "attention.impl"),
    (lambda c: setattr(c.attention, "ring_layout", "spiral"), "attention.ring_layout"),
    (lambda c: setattr(c.model, "num_kv_heads", 3), "model.num_heads"),
    (lambda c: setattr(c.train, "batch_size", 12), "train.batch_size"),
  ],
)
def test_bad_config_names_the_field(mutate, field):
  cfg = _valid()
  with pytest.raises(C.ConfigError) as e:
    mutate(cfg)
    C.validate(cfg, num_devices=8)
  msg = str(e.value)
  assert field in msg, msg
  assert "\n" not in msg


def test_missing_config_file():
  with pytest.raises(C.ConfigError, match="--config: file not found"):
    C.load_config("experiments/nope.py")


@pytest.mark.parametrize(
  "spec",
  ["experiments/demo.py", "experiments/demo.py:smoke", "experiments/long_context_gpu.py",
   "experiments/long_context_gpu.py:ring", "experiments/long_context_gpu.py:smoke",
   "experiments/long_context_gpu.py:ring_smoke", "experiments/ring_1m.py", "experiments/ring_1m.py:seq=8",
   "experiments/ring_1m.py:smoke", "experiments/eval_only.py"],
)
def test_every_experiment_variant_passes_the_value_checks(spec):
  from vidlm.config_checks import check_values

  check_values(C.load_config(spec))  # raises ConfigError naming the field if a shipped config is out of range


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(C.ConfigError, match=r"demo.py:big: unknown variant 'big'; known variants: smoke"):
    C.load_config(f"{DEMO}:big")
