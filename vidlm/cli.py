"""`vidlm train | eval | data | bench | demo` — the command line.

  vidlm train --config experiments/demo.py[:variant] --workdir runs/x [--config.train.steps=10 ...]
  vidlm eval  --config experiments/demo.py --workdir runs/x       (evaluators from config.eval.evaluators)
  vidlm data  make-synthetic ... | ingest ...
  vidlm bench attention ... | ring ... | sparse ... | sparse_breakdown ... | stream ... | memory ...
  vidlm stream --config ... --workdir runs/x (--video FILE | --procedural) [--ask-at 64,256] [--cache KIND]
  vidlm demo  [--workdir runs/demo]                               (the main job: train + evaluate + report)
  vidlm sweep --config experiments/ablations/attention.py --workdir runs/x   (get_sweep() variants, results.md)

Any config field can be overridden with --config.SECTION.FIELD=VALUE (see `vidlm train --help`).
Bad input (a flag, a file, a field value) stops with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from vidlm import config as config_lib


def _load(args_config: str, overrides: list[str]) -> config_lib.Config:
  from vidlm.config_checks import check_data_path, check_values  # noqa: PLC0415

  cfg = config_lib.load_config(args_config)
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.apply_override(cfg, key, value)
  check_values(cfg)  # field ranges now, before distributed start-up; the Trainer re-validates with the mesh
  check_data_path(cfg)  # a user's data.path (exists, checksums, shapes, text_len), also before start-up
  return cfg


class UsageParser(argparse.ArgumentParser):
  """argparse whose errors are one `error: ...` line and exit code 2 (via ConfigError), not a usage block."""

  def error(self, message: str):
    raise config_lib.ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def int_list(text: str) -> list[int]:
  """argparse type for comma-separated positive ints (`--seqlens 8192,32768`)."""
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
  return values


CONFIG_HELP = """--config FILE.py[:variant]
  FILE.py defines get_config(arg=None) -> vidlm.config.Config; the text after ':' is passed as arg and selects
  a variant the file defines (e.g. experiments/demo.py:smoke; an unknown variant is an error that lists them).

overrides: --config.SECTION.FIELD=VALUE  (or --config.SECTION.FIELD VALUE), applied in order after get_config
  sections: model, attention, mesh, data, train, eval, checkpoint, distributed (fields: vidlm/config.py)
  values are parsed by the field's type: ints/floats as written, bools true/false, tuples comma-separated,
  none for an optional field; nested sections use more dots. Examples:
    --config.train.steps=10  --config.train.lr=1e-4  --config.data.tiers=a,b  --config.model.tubelet=1,8,8
    --config.attention.sparsity.method=none  --config.checkpoint.restore_from=none
  An unknown field or a value out of range stops with one line naming the field (exit code 2).
"""


def _run_parser(cmd: str, what: str) -> argparse.ArgumentParser:
  p = UsageParser(prog=f"vidlm {cmd}", description=what, epilog=CONFIG_HELP,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="experiment file, optionally FILE.py:variant (see below)")
  p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, eval/)")
  return p


def _parse(cmd: str, what: str, argv: list[str]) -> tuple[argparse.Namespace, config_lib.Config]:
  args, rest = _run_parser(cmd, what).parse_known_args(argv)
  workdir = Path(args.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise config_lib.ConfigError(f"--workdir {args.workdir}: exists and is not a directory")
  return args, _load(args.config, rest)


def _setup(cfg: config_lib.Config) -> None:
  from vidlm import distributed  # noqa: PLC0415

  distributed.initialize(cfg.distributed)  # before JAX touches a device
  import jax  # noqa: PLC0415

  jax.config.update("jax_threefry_partitionable", True)


def cmd_train(argv: list[str]) -> int:
  args, cfg = _parse("train", "Train an experiment config into --workdir (resumes from its newest checkpoint).", argv)
  _setup(cfg)
  import jax  # noqa: PLC0415

  from vidlm.train.loop import Trainer  # noqa: PLC0415

  summary = Trainer(cfg, args.workdir).train()
  print(json.dumps({"final": summary, "processes": jax.process_count(), "devices": jax.device_count()}), flush=True)
  return int(summary.get("exit_code") or 0)  # 130 after SIGINT, 0 after SIGTERM (vidlm/train/stopping.py)


def results_report(results: dict, results_json: Path) -> str:
  """The table `vidlm eval` prints: the demo's table for loss / niavh / ppl_vs_length, headline scalars for any
  other evaluator, the plots, and where the full JSON went."""
  from vidlm.eval import demo  # noqa: PLC0415
  from vidlm.eval.registry import EVALUATORS, headline_scalars  # noqa: PLC0415

  known = ("loss", "niavh", "ppl_vs_length")
  lines = [f"evaluated {results.get('config')} at step {results.get('step')} "
           f"(checkpoint {results.get('checkpoint')})", ""]
  if any(results.get(k) for k in known):
    lines.append(demo.format_table(results).rstrip())
  for name, result in results.items():
    if name in EVALUATORS and name not in known and isinstance(result, dict):
      scalars = headline_scalars(name, result)
      lines.append(f"{name}: " + ("  ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in scalars.items())
                                  or "(no headline scalars; see the JSON)"))
  plots = demo.plot_paths(results)
  if plots:
    lines += ["", "plots:", *(f"  {p}" for p in plots)]
  seconds = results.get("seconds") or {}
  if seconds:
    lines.append("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
  lines.append(f"all results: {results_json}")
  return "\n".join(lines)


def cmd_eval(argv: list[str]) -> int:
  args, cfg = _parse("eval", "Evaluate the newest checkpoint of --workdir with config.eval.evaluators; prints a "
                     "table and writes every number to <workdir>/eval/results.json.", argv)
  _setup(cfg)
  import jax  # noqa: PLC0415

  from vidlm.eval import run_evaluators  # noqa: PLC0415

  results = run_evaluators(cfg, args.workdir)
  if jax.process_index() == 0:
    print(results_report(results, Path(args.workdir) / "eval" / "results.json"), flush=True)
  return 0


def cmd_demo(argv: list[str]) -> int:
  p = UsageParser(prog="vidlm demo", description="Train the demo models, evaluate them and print the results side by side.",
                  epilog=CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", action="append", default=None,
                 help="repeatable; default: experiments/demo.py and experiments/memory_bridge.py side by side")
  args, rest = p.parse_known_args(argv)
  if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
    raise config_lib.ConfigError(f"--workdir {args.workdir}: exists and is not a directory")
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
    if cmd == "stream":
      return _delegate("vidlm.infer.stream_command", rest)
    if cmd == "data":
      return _delegate("vidlm.data.commands", rest)
    if cmd == "bench":
      if not rest or rest[0] not in ("attention", "ring", "train_step", "sparse", "sparse_breakdown", "stream", "memory"):
        raise config_lib.ConfigError(
          f"vidlm bench: expected attention | ring | train_step | sparse | sparse_breakdown | stream | memory, got {rest[0] if rest else 'nothing'} "
          "(vidlm bench NAME --help lists its options)"
        )
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
  print(f"unknown command {cmd!r}; expected train | eval | data | bench | demo | sweep | stream", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
