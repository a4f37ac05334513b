"""Metric writers: JSONL (the record), tensorboardX (curves) and a console progress bar.

Only process 0 writes; other processes get no-op writers so callers need no rank checks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


class MetricWriter:
  def __init__(self, workdir: str | Path, *, total_steps: int, progress_bar: bool = True, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.workdir = Path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115  (kept open for the run)
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:  # tensorboardX is a core dependency; tolerate its absence on accelerator images
      self._tb = None
    if progress_bar:
      from tqdm import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def progress(self, step: int, postfix: dict[str, float]) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
