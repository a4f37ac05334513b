"""`vidlm data ...`: make-synthetic | ingest | tfds-build.

  vidlm data make-synthetic --out DIR --num N --frames F --height H --width W --tiers a,b,c --seed S [--shards K]
  vidlm data ingest --videos DIR --captions FILE.jsonl --out DIR [--frames F --height H --width W]
  vidlm data tfds-build --data-dir DIR [--config tiny]

Output directories hold ArrayRecord shards plus metadata.json (with each shard's size and crc32, checked when
training reads them); point `--config.data.path=DIR` at one (or at a folder with `train/` and `eval/` inside).
tfds-build output is used the same way: `--config.data.path=<data-dir>/vidlm_niavh/<config>/<version>`.
See docs/data.md. Errors are one line naming the flag or file; exit status 2.
"""

import argparse
import sys
import time
import types
from pathlib import Path

from vidlm.data import procedural

_FLAG_FOR_FIELD = {
  "data.text_len": "--text-len",
  "data.num_needles": "--needles",
  "data.num_asked": "--asked",
  "data.tiers": "--tiers",
  "data.frames": "--frames",
  "data.height/data.width": "--height/--width",
  "data.height": "--height",
  "data.width": "--width",
}


class UsageError(Exception):
  """A one-line command-line error (the message names the flag or file)."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse would print the whole usage block and exit
    raise UsageError(message)


def _positive(name: str):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
      raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
    return value

  return parse


def _tiers(text: str) -> tuple[str, ...]:
  tiers = tuple(t.strip() for t in text.split(",") if t.strip())
  bad = [t for t in tiers if t not in procedural.TIERS]
  if not tiers or bad:
    raise argparse.ArgumentTypeError(f"unknown tier(s) {bad or text!r} (choose from {','.join(procedural.TIERS)})")
  return tiers


def _flagify(message: str) -> str:
  for field, flag in _FLAG_FOR_FIELD.items():
    message = message.replace(field, flag)
  return message


def make_synthetic(args) -> int:
  from vidlm.data import pipeline, records

  cfg = types.SimpleNamespace(
    dataset="niavh", path=None, num_train=args.num, num_eval=args.num, frames=args.frames, height=args.height,
    width=args.width, text_len=args.text_len, tiers=args.tiers, num_needles=args.needles, num_asked=args.asked,
    seed=args.seed,
  )
  try:
    for tier in args.tiers:
      procedural.validate(frames=args.frames, height=args.height, width=args.width, tier=tier,
                          num_needles=args.needles, num_asked=args.asked)
    procedural.example_from_config(cfg, args.split, 0)  # checks that the text fits --text-len
  except ValueError as e:
    raise UsageError(_flagify(str(e))) from None
  start = time.perf_counter()
  examples = (procedural.example_from_config(cfg, args.split, i) for i in range(args.num))
  n = records.write_shards(examples, args.out, args.shards, progress=not args.quiet, total=args.num,
                           metadata=pipeline.generation_metadata(cfg, args.split),
                           desc=f"niavh/{args.split}")
  print(f"wrote {n} clips ({args.frames}x{args.height}x{args.width}, tiers {','.join(args.tiers)}) to {args.out} "
        f"in {time.perf_counter() - start:.1f}s")
  return 0


def ingest_cmd(args) -> int:
  from vidlm.data import ingest

  if not Path(args.videos).is_dir():
    raise UsageError(f"--videos: no such directory: {args.videos}")
  if not Path(args.captions).is_file():
    raise UsageError(f"--captions: no such file: {args.captions}")
  try:
    report = ingest.ingest(args.videos, args.captions, args.out, frames=args.frames, height=args.height,
                           width=args.width, text_len=args.text_len, num_shards=args.shards,
                           progress=not args.quiet)
  except ValueError as e:
    raise UsageError(str(e)) from None
  for name, reason in report.skipped:
    print(f"skipped {name}: {reason}", file=sys.stderr)
  print(f"{report.summary()} -> {args.out}")
  if report.written == 0:
    print(f"error: --captions {args.captions}: no clip could be ingested", file=sys.stderr)
    return 1
  return 0


def tfds_build(args) -> int:
  import tensorflow_datasets as tfds

  from vidlm.data import tfds_builder  # noqa: F401  (registers vidlm_niavh)

  names = [c.name for c in tfds_builder.VidlmNiavh.BUILDER_CONFIGS]
  if args.config not in names:
    raise UsageError(f"--config: unknown TFDS config {args.config!r} (choose from {', '.join(names)})")
  builder = tfds.builder(f"vidlm_niavh/{args.config}", data_dir=args.data_dir)
  builder.download_and_prepare()
  c = builder.builder_config
  print(f"built vidlm_niavh/{args.config} in {builder.data_dir}; train on it with --config.data.path="
        f"{builder.data_dir} --config.data.frames={c.frames} --config.data.height={c.height} "
        f"--config.data.width={c.width} --config.data.text_len={c.text_len} (or read it with "
        f"tfds.data_source('vidlm_niavh/{args.config}', data_dir={args.data_dir!r}))")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="vidlm data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", parser_class=_Parser)

  s = sub.add_parser("make-synthetic", help="write procedural needle-in-a-video-haystack clips")
  s.add_argument("--out", required=True)
  s.add_argument("--num", type=_positive("--num"), required=True)
  s.add_argument("--frames", type=_positive("--frames"), default=16)
  s.add_argument("--height", type=_positive("--height"), default=32)
  s.add_argument("--width", type=_positive("--width"), default=32)
  s.add_argument("--tiers", type=_tiers, default=("a",))
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--shards", type=_positive("--shards"), default=1)
  s.add_argument("--text-len", type=_positive("--text-len"), default=32)
  s.add_argument("--needles", type=_positive("--needles"), default=1)
  s.add_argument("--asked", type=_positive("--asked"), default=1)
  s.add_argument("--split", default="train", help="train uses --seed as is; other splits derive their own seed")
  s.add_argument("--quiet", action="store_true", help="no progress bar")
  s.set_defaults(fn=make_synthetic)

  s = sub.add_parser("ingest", help="turn video files + captions JSONL into clips (PyAV)")
  s.add_argument("--videos", required=True)
  s.add_argument("--captions", required=True)
  s.add_argument("--out", required=True)
  s.add_argument("--frames", type=_positive("--frames"), default=16)
  s.add_argument("--height", type=_positive("--height"), default=64)
  s.add_argument("--width", type=_positive("--width"), default=64)
  s.add_argument("--text-len", type=_positive("--text-len"), default=128)
  s.add_argument("--shards", type=_positive("--shards"), default=1)
  s.add_argument("--quiet", action="store_true", help="no progress bar")
  s.set_defaults(fn=ingest_cmd)

  s = sub.add_parser("tfds-build", help="build the TFDS dataset vidlm_niavh (ArrayRecord, no TensorFlow)")
  s.add_argument("--data-dir", required=True)
  s.add_argument("--config", default="tiny")
  s.set_defaults(fn=tfds_build)
  return p


def main(argv: list[str]) -> int:
  parser = build_parser()
  if not argv or argv[0] in ("-h", "--help"):
    print(parser.format_help())
    return 0
  try:
    args = parser.parse_args(argv)
    if args.command is None:
      raise UsageError("expected a subcommand: make-synthetic | ingest | tfds-build")
    return args.fn(args)
  except UsageError as e:
    print(f"error: vidlm data {argv[0]}: {e}", file=sys.stderr)
    return 2
