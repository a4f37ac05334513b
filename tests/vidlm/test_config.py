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
    (lambda c: setattr(c.attention, "kernel", "cudnn"), "kernel=cudnn"),
    (lambda c: setattr(c.attention, "kernel", "magic"), "attention.kernel"),
    (lambda c: setattr(c.attention.sparsity, "method", "magic"), "attention.sparsity.method"),
    (lambda c: setattr(c.attention.sparsity, "method", "moba") or setattr(c.attention.sparsity, "top_k", 0),
     "attention.sparsity.top_k"),
    (lambda c: setattr(c.attention.sparsity, "dense_layers", ("first", "x")), "attention.sparsity.dense_layers"),
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


# ---- attention: kernel / context_parallel / sparsity, and the old `impl` strings ----------------------------------

_IMPL_ADVICE = {
  "ring": "attention.kernel=auto attention.context_parallel=ring",
  "flash": "attention.kernel=flash",
  "xla": "attention.kernel=xla",
  "cudnn": "attention.kernel=cudnn",
  "reference": "attention.kernel=reference",
  "auto": "attention.kernel=auto",
  "block_sparse": "attention.sparsity.method",
}


@pytest.mark.parametrize("impl", sorted(_IMPL_ADVICE))
def test_old_impl_strings_give_one_line_saying_what_to_write(impl):
  for set_it in (
    lambda c: C.apply_override(c, "attention.impl", impl),  # --config.attention.impl=...
    lambda c: setattr(c.attention, "impl", impl),  # an old experiment file
  ):
    with pytest.raises(C.ConfigError) as e:
      set_it(_valid())
    msg = str(e.value)
    assert "\n" not in msg and "config.attention.impl" in msg and _IMPL_ADVICE[impl] in msg, msg
  with pytest.raises(C.ConfigError, match="never reached the kernels"):
    C.apply_override(_valid(), "attention.block_q", "64")


def test_old_config_json_with_impl_is_translated_with_a_warning():
  d = dataclasses.asdict(_valid())
  d["attention"] = {"impl": "ring", "ring_layout": "zigzag", "block_q": 128, "block_kv": 128}
  with pytest.warns(UserWarning, match="impl=ring -> kernel=auto context_parallel=ring"):
    cfg = C.from_dict(d)
  a = cfg.attention
  assert (a.kernel, a.context_parallel, a.ring_layout, a.sparsity.method) == ("auto", "ring", "zigzag", "none")
  d["attention"] = {"impl": "block_sparse"}
  with pytest.raises(C.ConfigError, match="sparsity"):
    C.from_dict(d)


def test_nested_sparsity_section_overrides_and_json():
  cfg = _valid()
  for key, value in C.parse_overrides(["--config.attention.sparsity.block_q=64",
                                       "--config.attention.sparsity.dense_layers=first,-1",
                                       "--config.attention.kernel=xla", "--config.attention.context_parallel=ring",
                                       "--config.attention.allow_reference_fallback=true"]):
    C.apply_override(cfg, key, value)
  a = cfg.attention
  assert a.sparsity.block_q == 64 and a.sparsity.dense_layers == ("first", "-1") and a.allow_reference_fallback
  assert a.sparsity.dense_layer_set(4) == {0, 3}
  back = C.from_dict(dataclasses.asdict(cfg))
  assert back == cfg and isinstance(back.attention.sparsity, C.SparsityConfig)
  with pytest.raises(C.ConfigError, match="attention.sparsity.method='magic': unknown"):
    C.apply_override(cfg, "attention.sparsity.method", "magic")
    C.validate(cfg, num_devices=8)


def _no_device(monkeypatch):
  """Make any device query or transfer fail the test."""
  import jax  # noqa: PLC0415

  def boom(*a, **k):
    raise AssertionError("validate touched a device")

  for name in ("devices", "device_count", "default_backend", "device_put", "local_devices"):
    monkeypatch.setattr(jax, name, boom)


def test_validate_rejects_unrunnable_ring_hops_for_gpu_without_a_device(monkeypatch):
  from vidlm import attention_calls  # noqa: PLC0415

  cfg = C.load_config("experiments/long_context_gpu.py:ring")
  cfg.attention.kernel = "auto"  # what the old impl=ring meant: flash hops on a GPU
  _no_device(monkeypatch)
  calls = attention_calls.attention_calls(cfg, num_devices=8, platform="gpu")
  assert calls and all(c.kernel == "flash" and c.q.shape[1] % (16512 // 16) == 0 for c in calls)
  with pytest.raises(C.ConfigError) as e:
    C.validate(cfg, num_devices=8, platform="gpu")
  msg = str(e.value)
  assert "ring hop" in msg and "T=1032" in msg and "\n" not in msg, msg
  cfg.attention.allow_reference_fallback = True  # the explicit opt-in
  C.validate(cfg, num_devices=8, platform="gpu")
  cfg.attention.allow_reference_fallback, cfg.attention.kernel = False, "xla"  # what the experiment file ships
  C.validate(cfg, num_devices=8, platform="gpu")


def test_validate_rejects_cudnn_for_the_frame_causal_mask_on_gpu(monkeypatch):
  cfg = C.load_config("experiments/long_context_gpu.py")
  _no_device(monkeypatch)
  C.validate(cfg, num_devices=1, platform="gpu")  # kernel=flash: 4,224 tokens tile
  cfg.attention.kernel = "cudnn"
  with pytest.raises(C.ConfigError, match="frame_causal"):
    C.validate(cfg, num_devices=1, platform="gpu")
  cfg.attention.kernel, cfg.model.dtype = "flash", "float32"
  with pytest.raises(C.ConfigError, match="dtype float32"):
    C.validate(cfg, num_devices=1, platform="gpu")
