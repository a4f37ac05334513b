"""Evaluate a trained checkpoint without training: restore it and run the loss / niavh / ppl_vs_length evaluators.

Command:  vidlm eval --config experiments/eval_only.py:runs/demo --workdir runs/demo_eval
          (RUN = a training workdir, or its checkpoints/ folder: the model, data and eval fields are read from
          the run's config.json, so the architecture always matches the checkpoint)
     or:  vidlm eval --config experiments/eval_only.py --workdir runs/demo_eval \
            --config.checkpoint.restore_from=runs/demo/checkpoints
          (no :arg: the demo's fields, so this form suits checkpoints of experiments/demo.py)
Hardware: whatever the checkpoint's config needs; the demo's runs on any CPU in about half a minute.
Expected: the newest readable checkpoint is restored (a corrupt newest one falls back to the previous one) and
          `<workdir>/eval/` gets results.json, niavh.json, niavh_<tier>.png, ppl_vs_length.json/.png; for a
          `make demo` checkpoint the numbers equal the demo's own table (same seeds, same examples).
Override the grid as usual, e.g. --config.eval.length_multipliers=1,2 --config.eval.seeds=10 --config.eval.tiers=a.
"""

import json
from pathlib import Path

from vidlm.config import Config, ConfigError, from_dict

EVALUATORS = ("loss", "niavh", "ppl_vs_length")


def _run_config(source: Path) -> Config:
  """The training run's resolved config (config.json beside checkpoints/), else the demo's."""
  run_dir = source.parent if source.name == "checkpoints" else source
  config_json = run_dir / "config.json"
  if config_json.is_file():
    return from_dict(json.loads(config_json.read_text()))
  from experiments.demo import get_config as demo_config  # noqa: PLC0415

  return demo_config()


def get_config(arg: str | None = None) -> Config:
  if arg:
    source = Path(arg)
    if not source.is_dir():
      raise ConfigError(f"experiments/eval_only.py:{arg}: not a directory (pass a training workdir or its checkpoints/)")
    cfg = _run_config(source)
    cfg.checkpoint.restore_from = str(source)
  else:
    from experiments.demo import get_config as demo_config  # noqa: PLC0415

    cfg = demo_config()
  cfg.name = f"{cfg.name}_eval"
  cfg.eval.evaluators = EVALUATORS
  cfg.train.progress_bar = False
  return cfg
