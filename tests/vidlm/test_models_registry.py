"""Models own their config section and register themselves (DESIGN section 5, issue 10 item 3).

A model defined in this file (its own config section and loss, no library edit) trains through `Trainer`; the
registry discovers the files of `vidlm.models`; `--config.model.name` switches the section; an old config.json
with missing fields loads; every decoded array, `cut_frames` included, reaches `model.loss(batch)`.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vidlm import config as C
from vidlm.data import procedural
from vidlm.models import build_model, register_model, registered_models
from vidlm.models import registry as registry_lib
from vidlm.train import step as step_lib
from vidlm.train.loop import Trainer, _model_inputs

TOY = "toy_test_model"
SEEN: list[dict] = []  # what ToyModel.loss received: keys at trace time, index / cut_frames values at run time


@dataclasses.dataclass
class ToyConfig(C.ModelSection):
  name: str = TOY
  hidden: int = 16
  init_scale: float = 0.02

  def check_values(self, cfg: C.Config) -> None:
    if self.hidden < 1:
      raise C.ConfigError(f"config.model.hidden={self.hidden}: must be >= 1")


@register_model(TOY, config=ToyConfig)
class ToyModel(nnx.Module):
  """Bag-of-frames + token embedding -> next-token logits: just enough to have parameters and a loss."""

  def __init__(self, cfg: C.Config, *, rngs: nnx.Rngs):
    m = cfg.model
    init = nnx.initializers.normal(m.init_scale)
    self.embed = nnx.Embed(260, m.hidden, embedding_init=init, rngs=rngs)
    self.colour = nnx.Linear(3, m.hidden, kernel_init=init, rngs=rngs)
    self.head = nnx.Linear(m.hidden, 260, kernel_init=init, rngs=rngs)

  def loss(self, batch):
    SEEN.append({"keys": sorted(batch), "cut_shape": tuple(batch["cut_frames"].shape),
                 "cut_dtype": str(batch["cut_frames"].dtype)})
    jax.debug.callback(lambda i, c: SEEN.append({"index": np.asarray(i), "cut_frames": np.asarray(c)}),
                       batch["index"], batch["cut_frames"])
    colour = batch["frames"].astype(jnp.float32).mean(axis=(1, 2, 3)) / 255.0  # [B, 3]
    logits = self.head(self.embed(batch["tokens"]) + self.colour(colour)[:, None])  # [B, L, V]
    w = batch["loss_mask"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    sums = {"loss_sum": jnp.sum(xent * w), "weight": jnp.sum(w)}
    return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums


def _toy_config(*overrides: str) -> C.Config:
  cfg = C.Config(name="toy")
  argv = ["--config.model.name=" + TOY, *overrides,
          "--config.data.frames=8", "--config.data.height=32", "--config.data.width=32", "--config.data.text_len=32",
          "--config.data.num_train=16", "--config.data.num_eval=8", "--config.train.steps=2",
          "--config.train.batch_size=8", "--config.train.warmup_steps=1", "--config.train.log_every=1",
          "--config.train.progress_bar=false", "--config.eval.batch_size=8", "--config.eval.batches=1",
          "--config.checkpoint.every=0", "--config.checkpoint.use_async=false"]
  for key, value in C.parse_overrides(argv):
    C.apply_override(cfg, key, value)
  return cfg


def test_a_model_from_a_test_file_trains_and_sees_cut_frames(tmp_path):
  cfg = _toy_config("--config.model.hidden=8")
  SEEN.clear()
  trainer = Trainer(cfg, tmp_path / "w")
  assert isinstance(trainer.model, ToyModel)
  out = trainer.train()
  assert out["step"] == 2 and np.isfinite(out["loss"])
  assert set(out) >= {"loss", "grad_norm", "lr"} and "token_accuracy" not in out  # default summarise: loss only
  traced = [s for s in SEEN if "keys" in s]
  assert traced and all(s["keys"] == ["cut_frames", "frames", "index", "loss_mask", "targets", "tokens"] for s in traced)
  assert traced[0]["cut_shape"] == (8, cfg.data.frames) and traced[0]["cut_dtype"] == "int32"
  # the values are the generator's cuts of those very examples, padded with -1
  runs = [s for s in SEEN if "cut_frames" in s]
  assert len(runs) >= 2
  checked = with_cuts = 0
  for run in runs:
    for index, row in zip(run["index"], run["cut_frames"]):
      want = procedural.example_from_config(cfg.data, "train", int(index))["cut_frames"]
      assert row.tolist() == list(want) + [-1] * (cfg.data.frames - len(want)), (index, row, want)
      checked += 1
      with_cuts += bool(want)
  assert checked >= 16 and with_cuts > 0
  # a resumed/evaluated run keeps the section class: config.json reads back as a ToyConfig
  saved = C.from_dict(json.loads((tmp_path / "w" / "config.json").read_text()))
  assert isinstance(saved.model, ToyConfig) and saved.model.hidden == 8
  assert set(trainer.evaluate_loss(1)) == {"loss"}


def test_registry_discovers_every_model_file(tmp_path, monkeypatch):
  """A new file in the vidlm.models package registers itself on the next lookup: nothing else is edited."""
  import vidlm.models as package

  (tmp_path / "zz_probe_model.py").write_text(
    "import dataclasses\n"
    "from vidlm.config import ModelSection\n"
    "from vidlm.models.registry import register_model\n\n\n"
    "@dataclasses.dataclass\n"
    "class ProbeConfig(ModelSection):\n"
    "  name: str = 'zz_probe'\n"
    "  width: int = 3\n\n\n"
    "@register_model('zz_probe', config=ProbeConfig)\n"
    "def build(cfg, *, rngs):\n"
    "  raise NotImplementedError\n"
  )
  monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
  try:
    names = registered_models()
    assert "zz_probe" in names and "video_lm" in names and TOY in names
    cfg = C.Config()
    C.apply_override(cfg, "model.name", "zz_probe")
    assert type(cfg.model).__name__ == "ProbeConfig" and cfg.model.width == 3
  finally:
    registry_lib._REGISTRY.pop("zz_probe", None)
    sys.modules.pop("vidlm.models.zz_probe_model", None)


def test_model_name_override_switches_the_section_whatever_the_order():
  cfg = C.load_config("experiments/demo.py")
  assert isinstance(cfg.model, C.ModelConfig) and C.ModelConfig.__name__ == "VideoLMConfig"
  # the model-specific override comes first on the command line; model.name is still applied before it
  for key, value in C.parse_overrides(["--config.model.hidden=5", f"--config.model.name={TOY}"]):
    C.apply_override(cfg, key, value)
  assert isinstance(cfg.model, ToyConfig) and cfg.model.hidden == 5 and cfg.model.init_scale == 0.02
  assert C.to_dict(cfg)["model"] == {"name": TOY, "hidden": 5, "init_scale": 0.02}
  C.validate(cfg, num_devices=8)  # VideoLM's checks (tubelet, attention calls) are not run for the toy
  with pytest.raises(C.ConfigError, match=r"config\.model\.embed_dim: unknown field of model 'toy_test_model'"):
    C.apply_override(cfg, "model.embed_dim", "64")
  with pytest.raises(C.ConfigError, match=r"config\.model\.hidden=0: must be >= 1"):
    C.apply_override(cfg, "model.hidden", "0")
    C.validate(cfg, num_devices=8)
  C.apply_override(cfg, "model.name", "video_lm")  # back: VideoLM's defaults
  assert cfg.model == C.ModelConfig()


def test_unknown_model_is_one_line_naming_the_registered_models(capsys, tmp_path):
  with pytest.raises(C.ConfigError) as e:
    C.apply_override(C.Config(), "model.name", "nope")
  msg = str(e.value)
  assert "\n" not in msg and "config.model.name" in msg and "'nope'" in msg and "video_lm" in msg and TOY in msg
  d = C.to_dict(C.Config())
  d["model"]["name"] = "nope"
  with pytest.raises(C.ConfigError, match="unknown model 'nope'; registered models: .*video_lm"):
    C.from_dict(d)
  from vidlm import cli

  code = cli.main(["train", "--config", "experiments/demo.py:smoke", "--workdir", str(tmp_path / "w"),
                   "--config.model.name=nope"])
  err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
  assert code == 2 and len(err) == 1 and err[0].startswith("error: config.model.name") and "video_lm" in err[0]


def test_section_of_the_wrong_class_is_one_line():
  cfg = C.Config()
  cfg.model.name = TOY  # a VideoLMConfig that claims to be the toy's section
  with pytest.raises(C.ConfigError, match=r"config\.model is a VideoLMConfig but model\.name='toy_test_model' takes a "
                                          r"ToyConfig"):
    C.validate(cfg, num_devices=8)


def test_old_config_json_with_missing_fields_loads():
  full = C.to_dict(C.load_config("experiments/demo.py"))
  old = json.loads(json.dumps(full))
  for section, name in (("model", "scan_layers"), ("model", "remat"), ("train", "grad_accum"), ("eval", "tiers"),
                        ("checkpoint", "restore_from")):
    del old[section][name]
  del old["attention"]["sparsity"]  # a nested section added later
  del old["distributed"]  # a whole section added later
  cfg = C.from_dict(old)
  defaults = C.Config()
  assert cfg.model.scan_layers == defaults.model.scan_layers and cfg.model.remat == "none"
  assert cfg.model.embed_dim == full["model"]["embed_dim"] == 128 and cfg.model.mlp_dim == 384  # kept
  assert cfg.train.grad_accum == 1 and cfg.eval.tiers == defaults.eval.tiers
  assert cfg.attention.sparsity == defaults.attention.sparsity and cfg.distributed == defaults.distributed
  # a nested section that is there but lacks a field added later
  partial = json.loads(json.dumps(full))
  del partial["attention"]["sparsity"]["dense_layers"]
  del partial["model"]["name"]  # before models were named in config.json: the default model
  again = C.from_dict(partial)
  assert again.attention.sparsity.dense_layers == () and again.model == cfg.model.__class__(**full["model"])
  C.validate(again, num_devices=8)


def test_every_device_array_reaches_the_model_and_text_is_kept_out():
  local = {
    "frames": np.zeros((2, 4, 8, 8, 3), np.uint8),
    "cut_frames": np.array([[2, -1, -1, -1], [-1, -1, -1, -1]], np.int32),
    "brand_new_key": np.ones((2, 3), np.float32),  # no list of names: a key a model adds later passes too
    "flags": np.array([True, False]),
    "question": np.array(["what?", "which?"]),  # strings cannot become device arrays
    "blob": np.array([object(), object()], dtype=object),
    "scalar": np.float32(1.0),  # no batch dimension
  }
  out = _model_inputs(local)
  assert sorted(out) == ["brand_new_key", "cut_frames", "flags", "frames"]


def test_videolm_loss_is_the_masked_answer_cross_entropy():
  """VideoLM.loss keeps the math the train step had (train numbers unchanged), scalar and per example."""
  cfg = C.load_config("experiments/demo.py:smoke")
  cfg.model.num_layers, cfg.model.embed_dim, cfg.model.mlp_dim = 1, 64, 128
  model = build_model(cfg, nnx.Rngs(0))
  batch = jax.tree.map(jnp.asarray, step_lib.random_batch(cfg.data, 4, seed=3))
  logits = model(batch["frames"], batch["tokens"])
  w = batch["loss_mask"]
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  loss, sums = model.loss(batch)
  assert float(sums["loss_sum"]) == pytest.approx(float(jnp.sum(xent * w)), rel=1e-6)
  assert float(sums["correct"]) == float(jnp.sum(correct * w)) and float(sums["examples"]) == 4
  assert float(loss) == pytest.approx(float(jnp.sum(xent * w) / jnp.sum(w)), rel=1e-6)
  _, per = model.loss(batch, per_example=True)
  assert per["loss_sum"].shape == (4,)
  np.testing.assert_allclose(np.asarray(per["loss_sum"]).sum(), float(sums["loss_sum"]), rtol=1e-5)
  assert float(per["exact"].sum()) == float(sums["exact"])
  metrics = step_lib.summarise(sums, model)
  assert set(metrics) == {"loss", "token_accuracy", "exact_match"}
