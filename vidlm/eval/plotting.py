"""PNG plots for evaluator results, drawn with matplotlib's object API on the Agg canvas.

`matplotlib.figure.Figure` + `FigureCanvasAgg` needs no display and touches no global pyplot state, so plotting
works the same on a headless CPU box, in a test and inside a notebook that uses another backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(size: tuple[float, float]):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=size, dpi=100)
  FigureCanvasAgg(fig)
  return fig


def heatmap(
  path: str | Path,
  values: np.ndarray,
  *,
  row_labels: Sequence[str],
  col_labels: Sequence[str],
  xlabel: str,
  ylabel: str,
  title: str,
  cbar_label: str = "exact match",
) -> Path:
  """Write a [rows, cols] grid in [0, 1] as an annotated heat map (red = wrong, green = right)."""
  values = np.asarray(values, np.float64)
  if values.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"heatmap: values {values.shape} vs labels ({len(row_labels)}, {len(col_labels)})")
  rows, cols = values.shape
  fig = _figure((1.6 + 1.1 * cols, 1.4 + 0.45 * rows))
  ax = fig.subplots()
  im = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
  ax.set_xticks(range(cols), labels=list(col_labels), fontsize=8)
  ax.set_yticks(range(rows), labels=list(row_labels), fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  for i in range(rows):
    for j in range(cols):
      ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="black")
  cbar = fig.colorbar(im, ax=ax)
  cbar.set_label(cbar_label)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path


def line_plot(
  path: str | Path,
  x: Sequence[float],
  series: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str,
  mark_x: float | None = None,
  mark_label: str = "training length",
  logx: bool = True,
) -> Path:
  """Write one or more y(x) lines; `mark_x` draws a dashed vertical line (e.g. the training length). A series given
  as (xs, ys) has its own x values (runs evaluated on different grids); the ticks are the union."""
  fig = _figure((5.5, 3.6))
  ax = fig.subplots()
  ticks = set(x)
  for name, ys in series.items():
    xs = x
    if isinstance(ys, tuple) and len(ys) == 2:
      xs, ys = ys
      ticks |= set(xs)
    ax.plot(list(xs), list(ys), marker="o", label=name)
  x = sorted(ticks)
  if logx:
    ax.set_xscale("log", base=2)
  if mark_x is not None:
    ax.axvline(mark_x, color="grey", linestyle="--", linewidth=1, label=mark_label)
  ax.set_xticks(list(x), labels=[str(int(v)) for v in x], fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path
