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
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
  """A config problem; the message names the offending field."""


@dataclasses.dataclass
class ModelConfig:
  name: str = "video_lm"
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  vocab_size: int = 260
  # tubelet (frames, height, width) of one video token
  tubelet: tuple[int, int, int] = (1, 8, 8)
  rope_theta: float = 10_000.0
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  # none | full | dots | dots_no_batch | save_attention  (see layers/scan.py)
  remat: str = "none"
  scan_layers: bool = True


@dataclasses.dataclass
class AttentionConfig:
  # reference | xla | cudnn | flash | ring | block_sparse | auto
  impl: str = "auto"
  # token order when impl == "ring": contiguous | zigzag | frame_striped
  ring_layout: str = "contiguous"
  # kernel tile sizes: flash/block_sparse need the sequence to be a multiple of them
  block_q: int = 128
  block_kv: int = 128


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
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
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
  """Set `section.field` (or deeper) from a string, typed by the dataclass annotation."""
  parts = dotted.split(".")
  obj = cfg
  for i, name in enumerate(parts):
    where = ".".join(parts[: i + 1])
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
      raise ConfigError(f"config.{where}: unknown field")
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
  return out


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


def validate(cfg: Config, num_devices: int | None = None) -> Config:
  """Check the config for every error we can catch before touching a device. Returns cfg."""
  from layers.attention import IMPLS  # noqa: PLC0415  (avoid importing jax at config import time)
  from layers.scan import REMAT_POLICIES  # noqa: PLC0415

  _check_types(cfg, "")
  from vidlm.config_checks import check_values  # noqa: PLC0415  (imports this module)

  check_values(cfg)  # every non-attention field in range, before the checks below divide by them
  m, d, a = cfg.model, cfg.data, cfg.attention
  if a.impl not in IMPLS:
    raise ConfigError(f"config.attention.impl: unknown attention impl {a.impl!r}; expected one of {IMPLS}")
  if a.ring_layout not in ("contiguous", "zigzag", "frame_striped"):
    raise ConfigError(
      f"config.attention.ring_layout: unknown layout {a.ring_layout!r}; expected contiguous | zigzag | frame_striped"
    )
  if m.dtype not in ("float32", "bfloat16") or m.param_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype/param_dtype: expected float32 or bfloat16, got {m.dtype}/{m.param_dtype}")
  if m.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat: unknown policy {m.remat!r}; expected {' | '.join(REMAT_POLICIES)}")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"config.model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
  if len(m.tubelet) != 3 or min(m.tubelet) < 1:
    raise ConfigError(f"config.model.tubelet: expected three positive ints (t, h, w), got {m.tubelet}")
  for name, size, tub in zip(("frames", "height", "width"), (d.frames, d.height, d.width), m.tubelet):
    if size % tub:
      raise ConfigError(f"config.data.{name}={size} is not divisible by the tubelet size {tub} (model.tubelet)")
  seq_len = sequence_length(cfg)
  if a.impl in ("flash", "block_sparse"):
    block = max(a.block_q, a.block_kv)
    if seq_len % block:
      raise ConfigError(
        f"config.data.text_len: sequence length {seq_len} (video {video_tokens(cfg)} + text {d.text_len}) "
        f"is not divisible by the attention block size {block} (attention.block_q/block_kv)"
      )
  if a.impl == "ring" and a.ring_layout == "frame_striped" and d.text_len and cfg.mesh.seq > 1:
    raise ConfigError(
      "config.attention.ring_layout: 'frame_striped' deals whole video frames and cannot hold the text that follows "
      "the video in VideoLM; use 'zigzag' (balanced for causal masks) or 'contiguous'"
    )
  ring_chunks = cfg.mesh.seq * (2 if a.impl == "ring" and a.ring_layout == "zigzag" else 1)
  if cfg.mesh.seq > 0 and seq_len % ring_chunks:
    raise ConfigError(
      f"config.mesh.seq: sequence length {seq_len} (video {video_tokens(cfg)} + text {d.text_len}) "
      f"is not divisible by {ring_chunks} (mesh.seq{' x 2 for zigzag' if ring_chunks != cfg.mesh.seq else ''})"
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
  """Rebuild a Config from `to_dict` output (e.g. a workdir's config.json)."""
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  hints = typing.get_type_hints(Config)
  kwargs = {}
  for name in sections:
    if name not in d:
      continue
    if name == "name":
      kwargs[name] = d[name]
      continue
    cls = hints[name]
    sub_hints = typing.get_type_hints(cls)
    vals = {}
    for k, v in d[name].items():
      if k not in sub_hints:
        raise ConfigError(f"config.{name}.{k}: unknown field")
      vals[k] = tuple(v) if isinstance(v, list) else v
    kwargs[name] = cls(**vals)
  return Config(**kwargs)
