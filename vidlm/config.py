"""Typed experiment configuration: one dataclass per section, command-line overrides, validation.

An experiment file exposes `get_config(arg=None) -> Config`. The CLI loads it (`FILE.py[:arg]`), applies
`--config.section.field=value` overrides (typed from the dataclass annotations) and validates the result.
Every error a user can hit is a `ConfigError` whose one-line message names the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import traceback
import types
import typing
import warnings
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
  """A config problem; the message names the offending field."""


DEFAULT_MODEL = "video_lm"


@dataclasses.dataclass
class ModelSection:
  """Base of every model's config section, `config.model`: the model owns its section.

  A model subclasses this in its own file (`vidlm/models/<model>.py`) with its fields, the default of `name` set to
  its registered name, and registers both: `@register_model("video_lm", config=VideoLMConfig)`. The class of
  `config.model` follows `model.name`: `--config.model.name=other` switches the section to `other`'s defaults
  before the other `model.*` overrides apply (whatever their order on the command line), a config.json is read
  back into the class its `model.name` registers, and `validate` rejects a section of the wrong class.
  `vidlm.config.ModelConfig` still names VideoLM's section (`VideoLMConfig`).
  """

  name: str = DEFAULT_MODEL

  def check_values(self, cfg: Config) -> None:
    """Range checks of the model's own fields (one-line ConfigError naming the field); no jax, no devices.
    Run by `config_checks.check_values`, so the CLI rejects a bad value before distributed start-up."""

  def validate(self, cfg: Config, *, num_devices: int | None = None, platform: str | None = None) -> None:
    """The model's checks that involve other sections (data shapes, attention, mesh), after the generic ones."""

  def sequence_length(self, cfg: Config) -> int | None:
    """Tokens per example the model attends over (the trainer's tokens/s), or None where that means nothing."""
    return None


def default_model_section() -> ModelSection:
  """A fresh section of the default model (imports the model files: they define their sections)."""
  from vidlm.models.registry import model_config_class  # noqa: PLC0415  (jax, flax: not at config import)

  return model_config_class(DEFAULT_MODEL)()


def check_model_section(cfg: Config) -> None:
  """`config.model` is an instance of the section class that `model.name` registers (ConfigError otherwise)."""
  from vidlm.models.registry import model_config_class  # noqa: PLC0415

  section = model_config_class(cfg.model.name)
  if not isinstance(cfg.model, section):
    raise ConfigError(
      f"config.model is a {type(cfg.model).__name__} but model.name={cfg.model.name!r} takes a {section.__name__}: "
      f"build it with {section.__name__}(...) or set --config.model.name={cfg.model.name} (which switches the section)"
    )


def __getattr__(name: str):
  # `ModelConfig` (VideoLM's section before models owned their configs) for old experiment files and notebooks;
  # resolved lazily because the class lives in vidlm/models/video_lm.py, which imports jax
  if name in ("ModelConfig", "VideoLMConfig"):
    from vidlm.models.registry import model_config_class  # noqa: PLC0415

    return model_config_class(DEFAULT_MODEL)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class SparsityConfig:
  """attention.sparsity: which kv blocks each q block computes (DESIGN section 6; selectors in layers/sparse/).
  Each method reads only its own parameters (layers.sparse.PARAMS)."""

  method: str = "none"  # none (dense) | static | moba | xattention | vmoba
  block_q: int = 128  # selection block sizes (the layout's tiles; the kernels run on them)
  block_kv: int = 128
  top_k: int = 4  # moba: gated kv blocks per q block (besides its own); vmoba: most chunks kept per q block
  sinks: int = 1  # static: kv blocks at the start of the sequence
  window: int = 1  # static: kv blocks on each side of a q block's own blocks
  frame_globals: int = 1  # static: leading kv blocks of every video frame
  stride: int = 8  # xattention: antidiagonal stride S (divides block_q and block_kv)
  tau: float = 0.9  # xattention: cumulative score mass kept per q-block row
  max_kv_blocks: int = 16  # xattention: static cap on selected blocks per q block (besides sink and diagonal)
  chunk_frames: int = 2  # vmoba: frames per 1D / 3D chunk
  chunk_bands: int = 1  # vmoba: kv blocks per frame in a 2D / 3D chunk
  threshold: float = 0.25  # vmoba: keep chunks whose min-max-normalised gate reaches this
  # layers that stay dense whatever the method: layer indices ("0", "-1") or "first" / "last"
  dense_layers: tuple[str, ...] = ()

  def dense_layer_set(self, num_layers: int) -> frozenset[int]:
    """The indices of `dense_layers` in 0..num_layers-1 (ConfigError on a bad entry); the parsing is the
    selectors' own (layers.sparse.dense_layers), so the config check and the model agree by construction."""
    from layers.sparse import dense_layers  # noqa: PLC0415  (keep jax out of config import time)

    try:
      return frozenset(dense_layers(self.dense_layers, num_layers))
    except ValueError as e:
      raise ConfigError(str(e)) from None


SPARSITY_METHODS: tuple[str, ...] = ("none", "static", "moba", "xattention", "vmoba")  # = layers.sparse.METHODS
_REMOVED_ATTENTION_FIELDS = ("impl", "block_q", "block_kv")


def removed_attention_field(name: str, value: Any = None) -> str:
  """The one-line message for a field the attention section no longer has, saying what to write instead."""
  if name in ("block_q", "block_kv"):
    return (
      f"config.attention.{name} was removed: it never reached the kernels, which choose their tile sizes per "
      f"backend; block-sparse selection blocks are attention.sparsity.{name}"
    )
  new = {
    "ring": "attention.kernel=auto attention.context_parallel=ring (attention.ring_layout as before)",
    "block_sparse": "attention.kernel=flash and an attention.sparsity.method (static | moba | xattention | vmoba)",
  }.get(value, f"attention.kernel={value}" if value in ("auto", "xla", "cudnn", "flash", "reference") else None)
  if new is None:
    new = "attention.kernel (auto|xla|cudnn|flash|reference) and attention.context_parallel (none|ring)"
  return f"config.attention.impl was split into kernel / context_parallel / sparsity: instead of impl={value} write {new}"


def translate_legacy_attention(section: dict) -> tuple[dict, list[str]]:
  """An old config.json's attention section in today's fields, and what was changed (for a warning)."""
  section, notes = dict(section), []
  if "impl" in section:
    impl = section.pop("impl")
    if impl == "ring":
      section.setdefault("kernel", "auto")
      section.setdefault("context_parallel", "ring")
    elif impl == "block_sparse":
      raise ConfigError(removed_attention_field("impl", impl))
    else:
      section.setdefault("kernel", impl)
    notes.append(f"impl={impl} -> kernel={section.get('kernel')} context_parallel={section.get('context_parallel', 'none')}")
  for name in ("block_q", "block_kv"):
    if name in section:
      notes.append(f"dropped {name}={section.pop(name)} (it never reached the kernels)")
  return section, notes


@dataclasses.dataclass
class AttentionConfig:
  """Three independent choices (DESIGN section 3)."""

  kernel: str = "auto"  # auto | xla | cudnn | flash | reference: the math on one block of q x kv
  context_parallel: str = "none"  # none | ring (over the mesh's seq axis)
  ring_layout: str = "contiguous"  # token order under context_parallel=ring: contiguous | zigzag | frame_striped
  sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
  # run the dense fp32 reference (with a warning) where the flash kernel cannot run a call, instead of failing
  allow_reference_fallback: bool = False

  def __setattr__(self, name: str, value: Any) -> None:
    # an old experiment file's `cfg.attention.impl = "ring"` would otherwise add a silent, unused attribute
    if name in _REMOVED_ATTENTION_FIELDS:
      raise ConfigError(removed_attention_field(name, value))
    super().__setattr__(name, value)


@dataclasses.dataclass
class MeshConfig:
  """Device mesh ("data", "fsdp", "seq", "tensor"); one axis may be -1 (fill with the remaining devices)."""

  data: int = -1
  fsdp: int = 1
  seq: int = 1
  tensor: int = 1


@dataclasses.dataclass
class DataConfig:
  dataset: str = "niavh"  # procedural needle-in-a-video-haystack
  path: str | None = None  # ArrayRecord root; None = generate into <workdir>/data
  num_train: int = 2048
  num_eval: int = 128
  frames: int = 8
  height: int = 32
  width: int = 32
  text_len: int = 32
  tiers: tuple[str, ...] = ("a",)
  num_needles: int = 1
  num_asked: int = 1
  seed: int = 0
  shuffle: bool = True
  prefetch: int = 2


@dataclasses.dataclass
class TrainConfig:
  steps: int = 100
  batch_size: int = 8  # global batch (examples per optimizer step)
  grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 10
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  progress_bar: bool = True


@dataclasses.dataclass
class EvalConfig:
  every: int = 0  # held-out loss every N train steps (0 = only at the end)
  batches: int = 4  # held-out batches per loss evaluation
  # evaluators run by `vidlm eval`, by registered name
  evaluators: tuple[str, ...] = ("loss",)
  # needle-in-a-video-haystack grid: lengths as multiples of data.frames, depths in [0, 1], seeds
  length_multipliers: tuple[int, ...] = (1, 2, 4, 8)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  seeds: int = 4
  tiers: tuple[str, ...] = ("a", "b", "c")
  batch_size: int = 8
  # how niavh grades an answer: teacher_forced (one forward pass) | generate (greedy decoding with a KV cache) |
  # both (headline teacher-forced, the generated score and their per-example agreement beside it)
  niavh_scoring: str = "both"
  # niavh_stream's KV caches (vidlm/eval/stream.py): RoPE positions of the attended context, true | cache (positions
  # within the cache; the evicting caches are then sized to the training length), and block retrieval's scoring
  # (mean | mass) and choice (per_head | shared); layers/cache/spec.py says what each means
  stream_rope_positions: str = "true"
  stream_score: str = "mean"
  stream_select: str = "per_head"


@dataclasses.dataclass
class CheckpointConfig:
  every: int = 50  # save every N steps (0 = only at the end / on SIGTERM)
  keep: int = 3
  use_async: bool = True
  restore_from: str | None = None  # a checkpoint dir to start from when the workdir has none


@dataclasses.dataclass
class DistributedConfig:
  """Multi-process set-up. Empty fields are read from VIDLM_COORDINATOR / VIDLM_NUM_PROCESSES / VIDLM_PROCESS_ID,
  and on managed clusters (SLURM, TPU pods) `jax.distributed.initialize()` auto-detects them."""

  enabled: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_count: int | None = None  # CPU only: fake devices per process


@dataclasses.dataclass
class Config:
  name: str = "unnamed"
  model: ModelSection = dataclasses.field(default_factory=default_model_section)  # the model's own section
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


# ------------------------------------------------------------------------------------------------
# Derived quantities


def video_grid(cfg: Config) -> tuple[int, int, int]:
  """(frames', height', width') of the video token grid."""
  tt, th, tw = cfg.model.tubelet
  return cfg.data.frames // tt, cfg.data.height // th, cfg.data.width // tw


def tokens_per_frame(cfg: Config) -> int:
  _, gh, gw = video_grid(cfg)
  return gh * gw


def video_tokens(cfg: Config) -> int:
  return math.prod(video_grid(cfg))


def sequence_length(cfg: Config) -> int:
  """Total tokens per example: video tokens then text tokens."""
  return video_tokens(cfg) + cfg.data.text_len


# ------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(spec: str) -> Config:
  """Load `path/to/file.py[:arg]` and call its `get_config(arg)`.

  A syntax error or an exception in the experiment file is the user's input, so it becomes one ConfigError line
  naming the file and line; an exception raised inside vidlm's own code keeps its traceback (that is a bug).
  """
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"--config: file not found: {path}" + (" (a directory)" if file.is_dir() else ""))
  module_spec = importlib.util.spec_from_file_location(f"vidlm_experiment_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"--config: {path} defines no get_config(arg=None)")
    cfg = module.get_config(arg or None)
  except ConfigError:
    raise
  except SyntaxError as e:
    if e.filename is None or Path(e.filename).resolve() != file.resolve():
      raise
    raise ConfigError(f"--config {path}, line {e.lineno}: SyntaxError: {e.msg}") from None
  except Exception as e:
    raise _experiment_error(e, file, path) from None
  if not isinstance(cfg, Config):
    raise ConfigError(f"--config: {path}:get_config returned {type(cfg).__name__}, expected vidlm.config.Config")
  return cfg


_OWN_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / p) + "/" for p in ("vidlm", "layers", "pallas_kernels"))


def _experiment_error(e: Exception, file: Path, path: str) -> Exception:
  """A one-line ConfigError for an exception the experiment file raised, or `e` itself when vidlm's code raised
  it (a bug keeps its traceback)."""
  frames = traceback.extract_tb(e.__traceback__)
  if frames and frames[-1].filename.startswith(_OWN_PACKAGES):
    return e
  lines = [f.lineno for f in frames if Path(f.filename).resolve() == file.resolve()]
  where = f", line {lines[-1]}" if lines else ""
  return ConfigError(f"--config {path}{where}: {type(e).__name__}: {e}".replace("\n", " "))


def unknown_variant(file: str, arg: str, known: tuple[str, ...]) -> ConfigError:
  """The error an experiment's get_config raises for an `:arg` it does not define: `raise unknown_variant(
  __file__, arg, ("smoke", ...))`, so every experiment names its variants the same way."""
  shown = os.path.relpath(file) if not os.path.relpath(file).startswith("..") else file
  return ConfigError(f"--config {shown}:{arg}: unknown variant {arg!r}; known variants: {', '.join(known)} "
                     f"(or none: {shown})")


def _coerce(value: str, annotation: Any, field: str):
  """Parse a command-line string into the field's annotated type."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    if value.lower() in ("none", "null") and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(value, inner[0], field)
  if origin is tuple:
    parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
    elem = args[0] if args else str
    if len(args) > 1 and args[1] is not Ellipsis:
      if len(parts) != len(args):
        raise ConfigError(f"config.{field}: expected {len(args)} comma-separated values, got {value!r}")
      return tuple(_coerce(p.strip(), a, field) for p, a in zip(parts, args))
    return tuple(_coerce(p.strip(), elem, field) for p in parts)
  if annotation is bool:
    if value.lower() in ("1", "true", "yes", "on"):
      return True
    if value.lower() in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config.{field}: expected a bool (true/false), got {value!r}")
  if annotation in (int, float):
    try:
      return annotation(value)
    except ValueError:
      raise ConfigError(f"config.{field}: expected {annotation.__name__}, got {value!r}") from None
  return value


def _field_types(obj) -> dict[str, Any]:
  return typing.get_type_hints(type(obj))


def apply_override(cfg: Config, dotted: str, value: str) -> None:
  """Set `section.field` (or deeper) from a string, typed by the dataclass annotation.

  `model.name` picks the model and so the class of the `model` section: naming another registered model replaces
  the section with that model's defaults (`parse_overrides` puts it first, so no `model.*` override is lost).
  """
  parts = dotted.split(".")
  if parts == ["model", "name"]:
    from vidlm.models.registry import model_config_class  # noqa: PLC0415

    section = model_config_class(value)  # ConfigError naming the registered models
    if type(cfg.model) is not section:
      cfg.model = section()
    cfg.model.name = value
    return
  obj = cfg
  for i, name in enumerate(parts):
    where = ".".join(parts[: i + 1])
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
      if isinstance(obj, AttentionConfig) and name in _REMOVED_ATTENTION_FIELDS:
        raise ConfigError(removed_attention_field(name, value))
      of_model = f" of model {cfg.model.name!r} ({type(cfg.model).__name__})" if i == 1 and parts[0] == "model" else ""
      raise ConfigError(f"config.{where}: unknown field{of_model}")
    if i == len(parts) - 1:
      setattr(obj, name, _coerce(value, _field_types(obj)[name], where))
    else:
      obj = getattr(obj, name)


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
  """Pick `--config.a.b=v` / `--config.a.b v` pairs out of argv."""
  out = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r} (overrides look like --config.train.steps=10)")
    key = arg[len("--config.") :]
    if "=" in key:
      key, value = key.split("=", 1)
    else:
      if i + 1 >= len(argv):
        raise ConfigError(f"config.{key}: missing value")
      i += 1
      value = argv[i]
    out.append((key, value))
    i += 1
  # model.name first: it chooses the model section that the other model.* overrides then set (stable sort)
  return sorted(out, key=lambda kv: kv[0] != "model.name")


# ------------------------------------------------------------------------------------------------
# Validation


def _check_types(obj, prefix: str) -> None:
  """Every field holds a value of its annotated type (catches `get_config` typos as well as overrides)."""
  hints = _field_types(obj)
  for f in dataclasses.fields(obj):
    value, ann, where = getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      _check_types(value, where + ".")
      continue
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None
      if value is None:
        continue
      ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is tuple:
      ok = isinstance(value, tuple | list)
    elif ann is float:
      ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif ann is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
    else:
      ok = isinstance(value, ann)
    if not ok:
      raise ConfigError(f"config.{where}: expected {getattr(ann, '__name__', ann)}, got {type(value).__name__} {value!r}")


def _validate_attention_fields(a: AttentionConfig) -> None:
  from layers.attention import CONTEXT_PARALLEL, KERNELS  # noqa: PLC0415  (no jax at config import time)

  for name in _REMOVED_ATTENTION_FIELDS:  # set around __setattr__ (e.g. object.__setattr__ or vars())
    if name in vars(a):
      raise ConfigError(removed_attention_field(name, vars(a)[name]))
  if a.kernel not in KERNELS:
    if a.kernel in ("ring", "block_sparse"):
      raise ConfigError(removed_attention_field("impl", a.kernel).replace("impl=", "kernel=", 1))
    raise ConfigError(f"config.attention.kernel: unknown kernel {a.kernel!r}; expected {' | '.join(KERNELS)}")
  if a.context_parallel not in CONTEXT_PARALLEL:
    raise ConfigError(
      f"config.attention.context_parallel: unknown {a.context_parallel!r}; expected {' | '.join(CONTEXT_PARALLEL)}"
    )
  from layers.sparse import check_params  # noqa: PLC0415

  why = check_params(a.sparsity)  # method, block sizes and the method's parameters, one line naming the field
  if why is not None:
    raise ConfigError(why)


def validate(cfg: Config, num_devices: int | None = None, platform: str | None = None) -> Config:
  """Check the config for every error we can catch before touching a device. Returns cfg.

  Generic checks here and in config_checks (types, every section's values, attention names, mesh, batch sizes);
  then the model's own `cfg.model.validate` (VideoLM: tubelet vs data shapes, dtypes, remat, ring chunks and every
  attention call it will make). `platform` ("cpu" | "gpu" | "tpu") is where the model will run:
  jax.default_backend() unless given.
  """
  _check_types(cfg, "")
  from vidlm.config_checks import check_values  # noqa: PLC0415  (imports this module)

  check_values(cfg)  # every non-attention field in range (the model's via its section), before anything divides
  a = cfg.attention
  _validate_attention_fields(a)
  if a.ring_layout not in ("contiguous", "zigzag", "frame_striped"):
    raise ConfigError(
      f"config.attention.ring_layout: unknown layout {a.ring_layout!r}; expected contiguous | zigzag | frame_striped"
    )
  sizes = dataclasses.asdict(cfg.mesh)
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ConfigError("config.mesh: at most one axis may be -1")
  for axis, v in sizes.items():
    if v == 0 or v < -1:
      raise ConfigError(f"config.mesh.{axis}: must be a positive size or -1, got {v}")
  if num_devices is not None:
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fixed > num_devices or (-1 not in sizes.values() and fixed != num_devices) or num_devices % fixed:
      raise ConfigError(
        f"config.mesh: {sizes} needs {fixed} devices{' (times the -1 axis)' if -1 in sizes.values() else ''} "
        f"but {num_devices} exist"
      )
    batch_shards = resolve_mesh_shape(cfg.mesh, num_devices)
    shards = batch_shards[0] * batch_shards[1]
    if cfg.train.batch_size % shards:
      raise ConfigError(
        f"config.train.batch_size={cfg.train.batch_size} is not divisible by mesh data*fsdp={shards}"
      )
    if cfg.eval.batch_size % shards:
      raise ConfigError(f"config.eval.batch_size={cfg.eval.batch_size} is not divisible by mesh data*fsdp={shards}")
  if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(
      f"config.train.grad_accum={cfg.train.grad_accum} must be >= 1 and divide train.batch_size={cfg.train.batch_size}"
    )
  if cfg.train.steps < 1:
    raise ConfigError(f"config.train.steps must be >= 1, got {cfg.train.steps}")
  cfg.model.validate(cfg, num_devices=num_devices, platform=platform)
  return cfg


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, seq, tensor) with the -1 axis filled in."""
  sizes = [mesh.data, mesh.fsdp, mesh.seq, mesh.tensor]
  fixed = math.prod(v for v in sizes if v != -1)
  return tuple(num_devices // fixed if v == -1 else v for v in sizes)


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(d: dict) -> Config:
  """Rebuild a Config from `to_dict` output (e.g. a workdir's config.json).

  A config.json written before a field existed still loads: missing sections and fields (nested ones too) take
  their defaults. A field it has that the config no longer knows is a ConfigError naming it.
  """
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  hints = typing.get_type_hints(Config)
  kwargs = {}
  for name in sections:
    if name not in d:
      continue
    if name == "name":
      kwargs[name] = d[name]
      continue
    section = d[name]
    if name == "model":  # the section's class is the one its model.name registers (ConfigError when unknown)
      from vidlm.models.registry import model_config_class  # noqa: PLC0415

      kwargs[name] = _section_from_dict(model_config_class(section.get("name", DEFAULT_MODEL)), section, name)
      continue
    if name == "attention":
      section, notes = translate_legacy_attention(section)
      if notes:
        warnings.warn(f"config.json: old attention fields translated: {'; '.join(notes)}", UserWarning, stacklevel=2)
    kwargs[name] = _section_from_dict(hints[name], section, name)
  return Config(**kwargs)


def _section_from_dict(cls, data: dict, where: str):
  """cls(**data) with nested dataclass sections rebuilt and JSON lists turned back into tuples."""
  sub_hints = typing.get_type_hints(cls)
  vals = {}
  for k, v in data.items():
    if k not in sub_hints:
      raise ConfigError(f"config.{where}.{k}: unknown field")
    if dataclasses.is_dataclass(sub_hints[k]) and isinstance(v, dict):
      vals[k] = _section_from_dict(sub_hints[k], v, f"{where}.{k}")
    else:
      vals[k] = tuple(v) if isinstance(v, list) else v
  return cls(**vals)
