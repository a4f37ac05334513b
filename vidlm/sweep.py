"""`vidlm sweep --config FILE[:arg] --workdir DIR`: run an experiment's variants, then tabulate and plot them.

  vidlm sweep --config experiments/ablations/attention.py --workdir runs/ablate_attention
              [--variants a,b] [--config.section.field=value ...]   (shared overrides, before each variant's own)

The experiment file defines, next to `get_config(arg=None)`, `get_sweep(arg=None)` returning the variants as an
ordered **dict** `{variant_name: {"section.field": value, ...}}` (a dict, not a list of pairs: names are unique
by construction). Values are Python values of the field's type (`8`, `True`, `("a",)`, `None`) or command-line
strings; they are applied exactly as `--config.section.field=value` would be. Both functions get the same `:arg`.

Every variant's overrides are applied and validated before anything runs: a missing `get_sweep`, a variant that
names an unknown field or a value the config rejects is one line (`error: sweep variant 'x': config.a.b: ...`).
The mesh-vs-device-count check is the one left to the run (a variant's device count is its own, see below).

Each variant runs in `DIR/<variant>` as two subprocesses, `vidlm train` and then `vidlm eval` with the variant's
overrides (through `python -m vidlm.sweep --worker`, which runs the same CLI and then records the device's
peak memory). Subprocesses because a variant may need its own device count (ring on 8 fake CPU devices sets
`distributed.local_device_count=8`, which must happen before JAX starts), and so that a crash, a leak or an
out-of-memory kill stays inside its variant. `--config.train.progress_bar=false` is added before the overrides.

Resumable: `DIR/<variant>/DONE` (the variant's result row, JSON) is written only after its evaluation finished;
a variant that has it is skipped on the next run. Any other variant is (re)run: `vidlm train` resumes from its
newest checkpoint. A failed variant gets a row with its one-line error, and `DIR/<variant>/error.txt` holds
that line, the command and the end of its log (the traceback); the remaining variants still run. Reusing a
variant whose resolved config changed (its overrides or the experiment file) is refused in the same DIR: its
checkpoints belong to the old config.
Variants with the same data section share one generated data cache (`DIR/.data/<hash>`, linked as
`DIR/<variant>/data`), so the procedural splits are generated once per sweep, not once per variant.

Outputs, one row per variant: `DIR/results.md`, `results.csv`, `results.json` and `results.png` with each
evaluator's headline scalars (declared by the evaluator, `vidlm.eval.registry`), training steps/s and tokens/s
(the last `train/steps_per_s` / `train/tokens_per_s` of `metrics.jsonl`, compile step excluded), the peak
device memory (`peak_device_mem_GiB`: max over local devices of `memory_stats()["peak_bytes_in_use"]`, blank
where the backend has no memory stats, e.g. CPU) and the peak host memory (`peak_host_rss_GiB`: the max RSS of
the train and eval processes, from `os.wait4`'s rusage), and each phase's wall seconds. Exit code 1 when a
variant failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vidlm import config as config_lib
from vidlm.cli import UsageParser

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHARED = ["--config.train.progress_bar=false"]
GiB = 1024**3


def _arg(value: Any) -> str:
  """A Python value as the command line spells it (`config.parse_overrides` / `apply_override` read it back)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if value is None:
    return "none"
  if isinstance(value, tuple | list):
    return ",".join(_arg(v) for v in value)
  return str(value)


def load_sweep(spec: str) -> dict[str, dict[str, Any]]:
  """`get_sweep(arg)` of the experiment file `FILE.py[:arg]`, checked for shape."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise config_lib.ConfigError(f"--config: file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"vidlm_sweep_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(
      f"--config: {path} defines no get_sweep(arg=None) (return {{variant_name: {{'section.field': value}}}})"
    )
  variants = module.get_sweep(arg or None)
  if not isinstance(variants, dict) or not variants:
    raise config_lib.ConfigError(f"--config: {path}:get_sweep returned {type(variants).__name__} {variants!r:.80}, "
                                 "expected a non-empty dict {variant_name: {'section.field': value}}")
  for name, overrides in variants.items():
    if not isinstance(name, str) or not _NAME.match(name):
      raise config_lib.ConfigError(f"sweep variant {name!r}: names are directory names (letters, digits, _ . + -)")
    if not isinstance(overrides, dict):
      raise config_lib.ConfigError(f"sweep variant {name!r}: expected a dict of overrides, got {type(overrides).__name__}")
  return variants


def variant_args(shared: list[str], overrides: dict[str, Any]) -> list[str]:
  return [*_SHARED, *shared, *(f"--config.{k}={_arg(v)}" for k, v in overrides.items())]


def check_variant(spec: str, name: str, args: list[str]) -> config_lib.Config:
  """Apply and validate the variant's overrides in this process (no device is touched); one-line errors."""
  try:
    cfg = config_lib.load_config(spec)
    for key, value in config_lib.parse_overrides(args):
      config_lib.apply_override(cfg, key, value)
    return config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"sweep variant {name!r}: {e}") from None


def share_generated_data(workdir: Path, vdir: Path, cfg: config_lib.Config) -> None:
  """Point `<variant>/data` at `<sweep>/.data/<hash of the data section>`, so variants with the same data config
  generate the procedural splits once (the pipeline checks a cache's metadata and regenerates a mismatch)."""
  if cfg.data.path is not None or (vdir / "data").exists() or (vdir / "data").is_symlink():
    return
  key = hashlib.sha256(json.dumps(dataclasses.asdict(cfg.data), sort_keys=True).encode()).hexdigest()[:12]
  shared = workdir / ".data" / key
  shared.mkdir(parents=True, exist_ok=True)
  (vdir / "data").symlink_to(os.path.relpath(shared, vdir))


# ------------------------------------------------------------------------------------------------
# Running one variant


def _run_phase(phase: str, spec: str, vdir: Path, args: list[str]) -> tuple[int, float, int]:
  """One `vidlm <phase>` subprocess; returns (exit code, wall seconds, its max RSS in bytes)."""
  cmd = [sys.executable, "-m", "vidlm.sweep", "--worker", str(vdir / f"{phase}_memory.json"),
         phase, "--config", spec, "--workdir", str(vdir), *args]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  t0 = time.perf_counter()
  with open(vdir / f"{phase}.log", "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # per-child rusage (RUSAGE_CHILDREN would be a running max)
    proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux reports KiB


def _error_line(log_text: str, code: int) -> str:
  """The most telling line of a failed phase's log: its `error:` line, else the exception line, else the last."""
  lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
  for ln in reversed(lines):
    if ln.startswith("error:"):
      return ln[len("error:"):].strip()
  for ln in reversed(lines):
    if re.match(r"^[\w.]+(Error|Exception|Diverged|Interrupt)\b", ln):
      return ln
  if code < 0:
    return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
  return lines[-1] if lines else f"exit code {code}"


def _stopped_early(log_text: str) -> str | None:
  """`vidlm train` exits 0 after a SIGTERM (preemption) with a checkpoint before train.steps: not finished."""
  for line in reversed(log_text.splitlines()):
    if line.startswith('{"final"'):
      try:
        final = json.loads(line)["final"]
      except (json.JSONDecodeError, KeyError):
        return None
      if final.get("stopped"):
        return f"stopped by a signal at step {final.get('step')} (checkpoint saved; rerun the sweep to resume)"
      return None
  return None


def _metrics(vdir: Path) -> dict[str, float]:
  """Last logged training throughput (metrics.jsonl, written by the train loop)."""
  out = {}
  path = vdir / "metrics.jsonl"
  if path.is_file():
    for line in path.read_text().splitlines():
      rec = json.loads(line) if line.strip() else {}
      for key in ("steps_per_s", "tokens_per_s"):
        if f"train/{key}" in rec:
          out[key] = rec[f"train/{key}"]
  return out


def _headlines(vdir: Path) -> dict[str, float]:
  from vidlm.eval import EVALUATORS  # noqa: F401, PLC0415  (registers the built-in evaluators)
  from vidlm.eval.registry import headline_scalars  # noqa: PLC0415

  results = json.loads((vdir / "eval" / "results.json").read_text())
  out = {}
  for name in results.get("seconds", {}):  # the evaluators that ran, in order
    out.update(headline_scalars(name, results[name]))
  return out


def run_variant(spec: str, vdir: Path, name: str, args: list[str]) -> dict:
  """Train then evaluate one variant; returns its row (status ok | failed). Writes DONE only on success."""
  vdir.mkdir(parents=True, exist_ok=True)
  (vdir / "error.txt").unlink(missing_ok=True)
  row: dict = {"variant": name, "status": "ok", "overrides": args[len(_SHARED):], "error": ""}
  rss, device_peak = 0, None
  for phase in ("train", "eval"):
    mem_file = vdir / f"{phase}_memory.json"
    mem_file.unlink(missing_ok=True)  # an earlier attempt's
    code, seconds, phase_rss = _run_phase(phase, spec, vdir, args)
    row[f"{phase}_s"] = round(seconds, 1)
    rss = max(rss, phase_rss)
    if mem_file.is_file():
      peak = json.loads(mem_file.read_text()).get("peak_bytes_in_use")
      device_peak = peak if device_peak is None or (peak or 0) > device_peak else device_peak
    log_text = (vdir / f"{phase}.log").read_text(errors="replace")
    stopped = code == 0 and phase == "train" and _stopped_early(log_text)
    if code != 0 or stopped:
      reason = stopped or _error_line(log_text, code)
      row.update(status="failed", error=f"{phase}: {reason}")
      (vdir / "error.txt").write_text(
        f"{row['error']}\n\nexit code {code}; log: {vdir / f'{phase}.log'}\n\n{log_text[-20000:]}"
      )
      break
  row.update(_metrics(vdir))
  row["peak_host_rss_GiB"] = rss / GiB
  row["peak_device_mem_GiB"] = device_peak / GiB if device_peak else None
  if row["status"] == "ok":
    row["headline"] = _headlines(vdir)
    (vdir / "DONE").write_text(json.dumps(row, indent=1))
  return row


# ------------------------------------------------------------------------------------------------
# The sweep


def _record(cfg: config_lib.Config) -> dict:
  """The variant's resolved config as JSON values (what its checkpoints were trained with)."""
  return json.loads(config_lib.to_json(cfg))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_reuse(vdir: Path, name: str, cfg: config_lib.Config) -> None:
  """A variant directory holds checkpoints of the config it ran with; a changed config must not resume them."""
  record = vdir / "sweep_variant.json"
  if not record.is_file():
    return
  had, now = _flat(json.loads(record.read_text()).get("resolved", {})), _flat(_record(cfg))
  changed = [k for k in sorted(set(had) | set(now)) if had.get(k) != now.get(k) and not k.endswith("progress_bar")]
  if changed:
    k = changed[0]
    raise config_lib.ConfigError(
      f"sweep variant {name!r}: {vdir} was run with config.{k}={had.get(k)!r}, now {now.get(k)!r}"
      f"{f' (and {len(changed) - 1} more fields)' if len(changed) > 1 else ''}; remove {vdir} or rename the variant"
    )


def sweep(spec: str, workdir: str | Path, shared: list[str] = (), only: list[str] | None = None) -> list[dict]:
  """Validate every variant, run those without a DONE marker, write the reports; returns the rows."""
  from vidlm import sweep_report  # noqa: PLC0415

  workdir = Path(workdir)
  variants = load_sweep(spec)
  if only:
    unknown = [n for n in only if n not in variants]
    if unknown:
      raise config_lib.ConfigError(f"--variants: unknown {', '.join(unknown)}; the sweep has {', '.join(variants)}")
    variants = {n: v for n, v in variants.items() if n in only}
  plan = {name: variant_args(list(shared), overrides) for name, overrides in variants.items()}
  configs = {}
  for name, args in plan.items():  # every error a user can fix, before any variant runs
    configs[name] = check_variant(spec, name, args)
    _check_reuse(workdir / name, name, configs[name])
  rows = []
  for i, (name, args) in enumerate(plan.items()):
    vdir = workdir / name
    if (vdir / "DONE").is_file():
      print(f"[{i + 1}/{len(plan)}] {name}: finished earlier, skipped", flush=True)
      rows.append({**json.loads((vdir / "DONE").read_text()), "skipped": True})
      continue
    print(f"[{i + 1}/{len(plan)}] {name}: {' '.join(args[len(_SHARED):]) or '(no overrides)'}", flush=True)
    vdir.mkdir(parents=True, exist_ok=True)
    record = {"config": spec, "args": args, "resolved": _record(configs[name])}
    (vdir / "sweep_variant.json").write_text(json.dumps(record, indent=1))
    share_generated_data(workdir, vdir, configs[name])
    row = run_variant(spec, vdir, name, args)
    status = "ok" if row["status"] == "ok" else f"FAILED: {row['error']} (see {vdir / 'error.txt'})"
    print(f"[{i + 1}/{len(plan)}] {name}: {status} (train {row.get('train_s', 0)} s, eval {row.get('eval_s', 0)} s)",
          flush=True)
    rows.append(row)
  sweep_report.write(workdir, rows, title=f"vidlm sweep --config {spec}")
  return rows


def main(argv: list[str]) -> int:
  p = UsageParser(prog="vidlm sweep", description="run get_sweep()'s variants and tabulate them")
  p.add_argument("--config", required=True, help="experiment file with get_config and get_sweep, FILE.py[:arg]")
  p.add_argument("--workdir", required=True, help="each variant runs in WORKDIR/<variant>; reports go here")
  p.add_argument("--variants", default=None, help="comma-separated subset of the variants to run and report")
  args, rest = p.parse_known_args(argv)
  config_lib.parse_overrides(rest)  # reject stray arguments before anything runs
  only = [v for v in args.variants.split(",") if v] if args.variants else None
  rows = sweep(args.config, args.workdir, rest, only)
  print((Path(args.workdir) / "results.md").read_text(), flush=True)
  return 1 if any(r["status"] != "ok" for r in rows) else 0


def _worker(argv: list[str]) -> int:
  """`python -m vidlm.sweep --worker MEMORY_JSON <vidlm command ...>`: run the CLI, then record device peak memory."""
  from vidlm import cli  # noqa: PLC0415

  memory_json, cli_argv = Path(argv[0]), argv[1:]
  code = cli.main(cli_argv)
  if code != 0:
    return code
  import jax  # noqa: PLC0415

  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  memory_json.write_text(json.dumps({"peak_bytes_in_use": max(peaks) if peaks else None,
                                     "backend": jax.default_backend(), "devices": jax.local_device_count()}))
  return code


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2:]))
  sys.exit(main(sys.argv[1:]))
