"""Value checks for every config field that `vidlm.config.validate` runs before any device work.

Types are checked by `config._check_types`; this module checks that each value is possible: sizes positive,
fractions in range, names known, the procedural data able to produce its examples (tiers, needle counts, the
question + answer fitting `data.text_len`) and the eval split holding at least one eval batch. Each failure is a
one-line `ConfigError` naming the field, so a bad override stops the CLI with `error: ...` instead of a traceback
minutes into a run. (Attention fields are checked in config.py beside their dataclass; a model's own fields by its
section, `ModelSection.check_values`, in its file under vidlm/models/.)
"""

from __future__ import annotations

import math

from vidlm.config import Config, ConfigError, check_model_section

_NIAVH = "niavh"  # the procedural dataset; any other data.dataset needs data.path (ingested records)


def _need(ok: bool, field: str, value, what: str) -> None:
  """Raise `ConfigError('config.<field>=<value>: <what>')` unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}={_show(value)}: {what}")


check_field = _need  # the same one-line form for a model's own fields (ModelSection.check_values)


def _show(value) -> str:
  if isinstance(value, tuple | list):
    return ",".join(str(v) for v in value) or "(empty)"
  return str(value)


def _finite(x) -> bool:
  return isinstance(x, int | float) and math.isfinite(x)


def check_model(cfg: Config) -> None:
  """`config.model` is the section class its `model.name` registers, and the model's own range checks pass
  (`ModelSection.check_values`: they live with the model, e.g. VideoLMConfig in vidlm/models/video_lm.py)."""
  check_model_section(cfg)
  cfg.model.check_values(cfg)


def check_train(cfg: Config) -> None:
  t = cfg.train
  _need(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
  _need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  _need(_finite(t.lr) and t.lr > 0, "train.lr", t.lr, "must be a positive number (the peak learning rate)")
  _need(_finite(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio,
        "must be in [0, 1] (final learning rate / train.lr)")
  # not capped at train.steps: the schedule clamps warm-up to steps - 1, so `--config.train.steps=2` on a config
  # with a longer warm-up stays a valid quick run
  _need(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
  _need(_finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  for name in ("b1", "b2"):
    v = getattr(t, name)
    _need(_finite(v) and 0 <= v < 1, f"train.{name}", v, "must be in [0, 1) (Adam moment decay)")
  _need(_finite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", t.grad_clip,
        "must be >= 0 (the global gradient-norm limit; 0 = no clipping)")
  _need(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
  _need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")


def min_text_len(tier: str, num_needles: int, num_asked: int) -> int:
  """Tokens the longest procedural question + answer of this tier needs: BOS + question + SEP + answer + EOS.

  Mirrors procedural._build: the question lists the asked ordinals (longest when the last ones are asked) and
  each answer is a 2-digit code (tiers a, b) or "left"/"right" (tier c), joined by spaces.
  """
  from vidlm.data import procedural, tokenizer  # noqa: PLC0415

  if num_needles == 1:
    question = procedural._QUESTIONS_ONE[tier]
  else:
    template = procedural._QUESTIONS_MANY[tier] if num_asked > 1 else procedural._QUESTIONS_PICK[tier]
    question = template.format(",".join(str(i + 1) for i in range(num_needles - num_asked, num_needles)))
  code = "right" if tier == "c" else "9" * procedural.CODE_DIGITS
  answer = " ".join([code] * num_asked)
  return len(tokenizer.prompt_ids(question)) + len(tokenizer.encode(answer)) + 1


def _check_procedural(cfg: Config, tiers: tuple[str, ...], frames: int, field: str, evaluator: str = "") -> None:
  """Can the generator make `tiers` at `frames` frames with data's size, needles and text_len? `evaluator`: the
  evaluator that generates them (named in the text_len message, with the way out of dropping it)."""
  from vidlm.data import procedural  # noqa: PLC0415

  d = cfg.data
  for tier in tiers:
    try:
      procedural.validate(frames=frames, height=d.height, width=d.width, tier=tier, num_needles=d.num_needles,
                          num_asked=d.num_asked)
    except ValueError as e:
      msg = str(e)
      raise ConfigError(msg if msg.startswith("data.") and field == "data.tiers" else
                        f"config.{field}: tier {tier!r} at {frames} frames: {msg}") from None
    need = min_text_len(tier, d.num_needles, d.num_asked)
    whose = f"the {evaluator} evaluator's " if evaluator else ""
    fix = f"; raise it or drop {evaluator} from eval.evaluators" if evaluator else ""
    _need(d.text_len >= need, "data.text_len", d.text_len,
          f"too short for {whose}tier-{tier} question + answer (needs >= {need} tokens incl. BOS/SEP/EOS){fix}")


def check_data(cfg: Config) -> None:
  from vidlm.data import procedural  # noqa: PLC0415

  d = cfg.data
  generated = d.path is None
  _need(not generated or d.dataset == _NIAVH, "data.dataset", d.dataset,
        f"only {_NIAVH!r} is generated in-process; for other data run `vidlm data ingest` and set data.path")
  for name in ("num_train", "num_eval", "frames", "height", "width", "text_len", "num_needles"):
    _need(getattr(d, name) >= 1, f"data.{name}", getattr(d, name), "must be >= 1")
  _need(1 <= d.num_asked <= d.num_needles, "data.num_asked", d.num_asked,
        f"must be in [1, data.num_needles={d.num_needles}]")
  _need(d.seed >= 0, "data.seed", d.seed, "must be >= 0")
  _need(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0")
  _need(len(d.tiers) >= 1 and all(t in procedural.TIERS for t in d.tiers), "data.tiers", d.tiers,
        f"expected some of {','.join(procedural.TIERS)}")
  if generated:  # a user's records are judged by check_data_path (text_len against their max_tokens)
    _check_procedural(cfg, tuple(d.tiers), d.frames, "data.tiers")


def check_data_path(cfg: Config) -> None:
  """A user's data.path exists, its shards open and match metadata.json, and data.frames/height/width/text_len
  fit its records (text_len against their longest text, metadata `max_tokens`, not the generator's questions).

  Not part of `check_values`: validation also runs on derived configs that are not trained on these records
  (eval/grid.py validates data.frames x each length multiplier). The CLI runs it after `check_values`, before
  distributed start-up or any device work; the data iterator runs the same checks when it is built. Memoised
  per process while the files are unchanged (the checksum pass reads every shard)."""
  if cfg.data.path is not None:
    from vidlm.data import pipeline  # noqa: PLC0415  (grain; only when data.path is set)

    pipeline.check_user_data(cfg.data)


def check_eval(cfg: Config, batch_shards: int | None) -> None:
  from vidlm.data import procedural  # noqa: PLC0415
  from vidlm.eval.registry import EVALUATORS  # noqa: PLC0415  (the vidlm.eval package registers the built-ins)

  e, d = cfg.eval, cfg.data
  _need(e.every >= 0, "eval.every", e.every, "must be >= 0 (0 = held-out loss only at the end)")
  _need(e.batches >= 1, "eval.batches", e.batches, "must be >= 1")
  _need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
  if d.path is None:  # the size of an ingested eval split is only known once its records are read
    _need(e.batch_size <= d.num_eval, "eval.batch_size", e.batch_size,
          f"is larger than the eval split (data.num_eval={d.num_eval}); lower it or raise data.num_eval")
  if batch_shards:
    _need(e.batch_size % batch_shards == 0, "eval.batch_size", e.batch_size,
          f"must be divisible by mesh data*fsdp={batch_shards}")
  unknown = [n for n in e.evaluators if n not in EVALUATORS]
  _need(not unknown, "eval.evaluators", e.evaluators,
        f"unknown evaluator(s) {','.join(unknown)}; registered: {', '.join(sorted(EVALUATORS))}")
  _need(len(e.length_multipliers) >= 1 and min(e.length_multipliers) >= 1, "eval.length_multipliers",
        e.length_multipliers, "expected ints >= 1 (multiples of data.frames)")
  _need(len(e.depths) >= 1 and all(_finite(x) and 0 <= x <= 1 for x in e.depths), "eval.depths", e.depths,
        "expected values in [0, 1]")
  _need(e.seeds >= 1, "eval.seeds", e.seeds, "must be >= 1")
  _need(len(e.tiers) >= 1 and all(t in procedural.TIERS for t in e.tiers), "eval.tiers", e.tiers,
        f"expected some of {','.join(procedural.TIERS)}")
  _need(e.niavh_scoring in ("teacher_forced", "generate", "both"), "eval.niavh_scoring", e.niavh_scoring,
        "expected teacher_forced | generate | both")
  for field, allowed in (("stream_rope_positions", ("true", "cache")), ("stream_score", ("mean", "mass")),
                         ("stream_select", ("per_head", "shared"))):
    _need(getattr(e, field) in allowed, f"eval.{field}", getattr(e, field), f"expected {' | '.join(allowed)}")
  # these evaluators generate procedural examples at data.text_len whatever data.path holds (data.tiers at the
  # training length is checked by check_data for generated data)
  if "niavh" in e.evaluators:  # the grid generates eval.tiers at every length
    for mult in sorted(set(e.length_multipliers)):
      _check_procedural(cfg, tuple(e.tiers), d.frames * mult, "eval.tiers", "niavh")
  if "ppl_vs_length" in e.evaluators and d.path is not None:
    for mult in sorted(set(e.length_multipliers)):
      _check_procedural(cfg, tuple(d.tiers), d.frames * mult, "data.tiers", "ppl_vs_length")


def check_checkpoint(cfg: Config) -> None:
  from pathlib import Path  # noqa: PLC0415

  c = cfg.checkpoint
  _need(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end and on SIGTERM/SIGINT)")
  _need(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
  if c.restore_from is not None:
    _need(Path(c.restore_from).is_dir(), "checkpoint.restore_from", c.restore_from,
          "no such directory (pass a training workdir or its checkpoints/ folder)")


def check_distributed(cfg: Config) -> None:
  r = cfg.distributed
  if r.num_processes is not None:
    _need(r.num_processes >= 1, "distributed.num_processes", r.num_processes, "must be >= 1")
  if r.process_id is not None:
    limit = r.num_processes if r.num_processes is not None else math.inf
    _need(0 <= r.process_id < limit, "distributed.process_id", r.process_id,
          f"must be in [0, distributed.num_processes={r.num_processes})")
  if r.local_device_count is not None:
    _need(r.local_device_count >= 1, "distributed.local_device_count", r.local_device_count, "must be >= 1")


def check_values(cfg: Config, batch_shards: int | None = None) -> None:
  """Every non-attention field holds a possible value; `batch_shards` = mesh data*fsdp when the mesh is known."""
  check_model(cfg)
  check_train(cfg)
  check_data(cfg)
  check_eval(cfg, batch_shards)
  check_checkpoint(cfg)
  check_distributed(cfg)
