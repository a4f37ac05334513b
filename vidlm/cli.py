"""`vidlm train | eval | data | bench | demo` — the command line.

  vidlm train --config experiments/demo.py[:arg] --workdir runs/x [--config.train.steps=10 ...]
  vidlm eval  --config experiments/demo.py --workdir runs/x       (evaluators from config.eval.evaluators)
  vidlm data  make-synthetic ... | ingest ...
  vidlm bench attention ... | ring ...
  vidlm demo  [--workdir runs/demo]                               (the main job: train + evaluate + report)
  vidlm sweep --config experiments/ablations/attention.py --workdir runs/x   (get_sweep() variants, results.md)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from vidlm import config as config_lib


def _load(args_config: str, overrides: list[str]) -> config_lib.Config:
  cfg = config_lib.load_config(args_config)
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.apply_override(cfg, key, value)
  return cfg


def _run_parser(cmd: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"vidlm {cmd}")
  p.add_argument("--config", required=True, help="experiment file, optionally FILE.py:arg")
  p.add_argument("--workdir", required=True)
  return p


def _setup(cfg: config_lib.Config) -> None:
  from vidlm import distributed  # noqa: PLC0415

  distributed.initialize(cfg.distributed)  # before JAX touches a device
  import jax  # noqa: PLC0415

  jax.config.update("jax_threefry_partitionable", True)


def cmd_train(argv: list[str]) -> int:
  args, rest = _run_parser("train").parse_known_args(argv)
  cfg = _load(args.config, rest)
  _setup(cfg)
  import jax  # noqa: PLC0415

  from vidlm.train.loop import Trainer  # noqa: PLC0415

  summary = Trainer(cfg, args.workdir).train()
  print(json.dumps({"final": summary, "processes": jax.process_count(), "devices": jax.device_count()}), flush=True)
  return int(summary.get("exit_code") or 0)  # 130 after SIGINT, 0 after SIGTERM (vidlm/train/stopping.py)


def cmd_eval(argv: list[str]) -> int:
  args, rest = _run_parser("eval").parse_known_args(argv)
  cfg = _load(args.config, rest)
  _setup(cfg)
  from vidlm.eval import run_evaluators  # noqa: PLC0415

  results = run_evaluators(cfg, args.workdir)
  print(json.dumps(results, indent=2, default=str), flush=True)
  return 0


def cmd_demo(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="vidlm demo")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default=None, help="defaults to experiments/demo.py")
  args, rest = p.parse_known_args(argv)
  from vidlm.eval import demo  # noqa: PLC0415

  return demo.main(args.workdir, args.config, rest)


def _delegate(module: str, argv: list[str]) -> int:
  return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  commands = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  cmd, rest = argv[0], argv[1:]
  try:
    if cmd in commands:
      return commands[cmd](rest)
    if cmd == "sweep":
      return _delegate("vidlm.sweep", rest)
    if cmd == "data":
      return _delegate("vidlm.data.commands", rest)
    if cmd == "bench":
      if not rest or rest[0] not in ("attention", "ring", "train_step"):
        print("usage: vidlm bench attention|ring|train_step [options]", file=sys.stderr)
        return 2
      return _delegate(f"vidlm.bench.{rest[0]}", rest[1:])
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    from vidlm.train.loop import TrainingDiverged  # noqa: PLC0415

    if isinstance(e, TrainingDiverged):
      print(f"error: {e}", file=sys.stderr)
      return 1
    raise
  print(f"unknown command {cmd!r}; expected train | eval | data | bench | demo | sweep", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
