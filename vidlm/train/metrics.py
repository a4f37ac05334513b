"""Metric writers: JSONL (the record), tensorboardX (curves) and a console progress bar.

Only process 0 writes; other processes get no-op writers so callers need no rank checks.

A resumed run does not duplicate entries: resuming from checkpoint step S first drops every record with a step
> S (written after that checkpoint by the run that died) from `metrics.jsonl` and from the tensorboard event
files, then appends. So after any number of kills and resumes each step is logged once, by the run whose state
the checkpoints hold.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import jax


def truncate_jsonl(path: Path, max_step: int) -> None:
  """Keep only the records of `path` with step <= max_step (and drop a torn last line); atomic rewrite."""
  if not path.is_file():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line torn by a kill mid-write
    if isinstance(rec, dict) and rec.get("step", 0) <= max_step:
      kept.append(line + "\n")
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text("".join(kept))
  os.replace(tmp, path)


def _records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
  """(raw record, payload) of a TFRecord file: u64 length, u32 crc, payload, u32 crc. Stops at a torn tail."""
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    end = pos + 12 + n + 4
    if end > len(data):
      return
    yield data[pos:end], data[pos + 12 : pos + 12 + n]
    pos = end


def read_tb_scalars(tb_dir: Path) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the event files under `tb_dir`, in file order (for tests and checks)."""
  from tensorboardX.proto.event_pb2 import Event  # noqa: PLC0415

  out = []
  for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
    for _, payload in _records(f.read_bytes()):
      ev = Event.FromString(payload)
      out.extend((v.tag, ev.step, v.simple_value) for v in ev.summary.value)
  return out


def truncate_tb(tb_dir: Path, max_step: int) -> None:
  """Drop the events with step > max_step from the event files under `tb_dir` (records copied byte for byte,
  CRCs included). Raw files then hold each step once; TensorBoard's own purge (`purge_step`) only hides them."""
  from tensorboardX.proto.event_pb2 import Event  # noqa: PLC0415

  for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
    kept = [raw for raw, payload in _records(f.read_bytes()) if Event.FromString(payload).step <= max_step]
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, f)


class MetricWriter:
  def __init__(self, workdir: str | Path, *, total_steps: int, progress_bar: bool = True, start_step: int = 0):
    """`start_step`: the step the run starts from (the restored checkpoint's, or 0); later entries are dropped."""
    self.enabled = jax.process_index() == 0
    self.workdir = Path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    truncate_jsonl(self.workdir / "metrics.jsonl", start_step)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115  (kept open for the run)
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      tb_dir = self.workdir / "tb"
      resumed = tb_dir.is_dir()
      if resumed:
        truncate_tb(tb_dir, start_step)
      self._tb_cls, self._tb_files = SummaryWriter, 0
      self._tb = self._new_tb(purge_step=start_step + 1 if resumed else None)
    except ImportError:  # tensorboardX is a core dependency; tolerate its absence on accelerator images
      self._tb = None
    if progress_bar:
      from tqdm import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

  def _new_tb(self, **kwargs):
    """A SummaryWriter on a file of its own: tensorboardX names files by the second and host only, and a second
    writer opened within the same second would truncate the first one's file."""
    self._tb_files += 1
    return self._tb_cls(str(self.workdir / "tb"), filename_suffix=f".{os.getpid()}.{self._tb_files}", **kwargs)

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

  def flush(self) -> None:
    """Put every tensorboard event logged so far on disk: called before each checkpoint save, so that after a
    SIGKILL the event files hold every step up to the checkpoint a resume starts from. `SummaryWriter.flush()`
    is not enough (events still queued for its writer thread are not written), so the writer is closed (which
    drains the queue) and a new one, with a new event file, continues."""
    if self._tb is not None:
      self._tb.close()
      self._tb = self._new_tb()

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
