"""The sweep's reports: one row per variant in results.md / results.csv / results.json, and results.png.

Columns, in order: variant, status, each evaluator's headline scalars (in evaluator order, as declared), then
steps/s, tokens/s, peak device memory (only when some variant's backend reports it), peak host RSS, the train
and eval wall seconds, and the error line of a failed variant. results.json keeps the full rows, including the
overrides each variant ran with; results.md lists those under the table.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

_RUN_COLUMNS = ("steps_per_s", "tokens_per_s", "peak_device_mem_GiB", "peak_host_rss_GiB", "train_s", "eval_s")


def columns(rows: list[dict]) -> list[str]:
  """Headline columns (first-seen order) then the run columns that hold a value in some row."""
  heads: list[str] = []
  for row in rows:
    heads += [k for k in row.get("headline", {}) if k not in heads]
  run = [c for c in _RUN_COLUMNS if any(row.get(c) is not None for row in rows)]
  return ["variant", "status", *heads, *run, "error"]


def _value(row: dict, col: str):
  if col in row.get("headline", {}):
    return row["headline"][col]
  value = row.get(col)
  if col == "status" and row.get("skipped"):
    return f"{value} (earlier run)"
  return value


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
  return str(value)


def markdown(rows: list[dict], title: str) -> str:
  cols = columns(rows)
  lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(_value(row, c)).replace("|", "\\|") for c in cols) + " |")
  lines += ["", "Overrides per variant (after the experiment's get_config):", ""]
  lines += [f"- `{row['variant']}`: `{' '.join(row.get('overrides', [])) or '(none)'}`" for row in rows]
  return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], title: str) -> None:
  """One small bar chart per numeric column (variants on x); a failed variant has no bar."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  metrics = [c for c in columns(rows)[2:-1] if c not in ("train_s", "eval_s")]
  if not metrics:
    return
  ncols = min(4, len(metrics))
  nrows = math.ceil(len(metrics) / ncols)
  names = [row["variant"] for row in rows]
  fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows + 0.6), dpi=100)
  FigureCanvasAgg(fig)
  for i, col in enumerate(metrics):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    values = [_value(row, col) for row in rows]
    heights = [v if isinstance(v, int | float) else math.nan for v in values]
    ax.bar(range(len(names)), heights, color=["tab:blue" if r["status"] == "ok" else "tab:red" for r in rows])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_title(col, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)


def write(workdir: Path, rows: list[dict], *, title: str) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  cols = columns(rows)
  (workdir / "results.md").write_text(markdown(rows, title))
  with open(workdir / "results.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*cols, "overrides"])
    for row in rows:
      writer.writerow([*("" if _value(row, c) is None else _value(row, c) for c in cols),
                       " ".join(row.get("overrides", []))])
  (workdir / "results.json").write_text(json.dumps({"title": title, "columns": cols, "rows": rows}, indent=1))
  plot(workdir / "results.png", rows, title)
