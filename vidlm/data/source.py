"""Shard source that names its files: an unopenable shard is a one-line error, a bad record is skipped and counted.

What ArrayRecord does with damage (measured on shards this package writes, group_size:1):
  - truncated file, or garbage in the footer/postscript: opening the file fails (`RuntimeError`, sometimes with
    an empty message), so grain's own source fails before training with no file name.
  - garbage inside one record's chunk: the file opens and every other record reads; reading that record raises
    `RuntimeError: Corrupted Riegeli/records file: chunk data hash mismatch` (no file name), which grain would
    raise from a prefetch thread at whatever step first draws it.
`open_shards` opens each file itself, so the first case becomes a `ConfigError` naming the file and what to do,
before any step. `CheckedSource` returns a `BadRecord` instead of raising for the second; the pipeline's decode
turns it (and a record that does not decode) into None, grain's iterator drops it, and `note_skip` counts it per
file and warns once per file with the name. Nothing is replaced by another example.
"""

import bisect
import dataclasses
import logging
import os
import threading
from collections import Counter

from array_record.python import array_record_module
from grain.sources import ArrayRecordDataSource

from vidlm.config import ConfigError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_skipped: Counter = Counter()  # shard file -> records skipped in this process


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """Stands in for a record that could not be read; the decoder drops it (and counts it)."""

  file: str
  position: int  # record index inside `file`
  reason: str


def reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def note_skip(file: str, position: int, reason: str) -> None:
  """Count one skipped record of `file`; the first one per file is a warning naming the file and the reason."""
  with _lock:
    _skipped[file] += 1
    first = _skipped[file] == 1
  if first:
    log.warning("data: skipping unreadable record %d of %s (%s); further bad records in this file are counted "
                "silently (vidlm.data.source.skipped_records())", position, file, reason)


def skipped_records() -> dict[str, int]:
  """{shard file: records skipped so far} in this process (not checkpointed: counts restart on resume)."""
  with _lock:
    return dict(_skipped)


def reset_skipped() -> None:
  with _lock:
    _skipped.clear()


def open_shards(paths: list[str], *, what: str, fix: str) -> list[int]:
  """Record count of every shard; a file that cannot be opened is a ConfigError naming it, `what` (the config
  field it came from) and `fix` (what the user should do)."""
  counts = []
  for path in paths:
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path))
      try:
        counts.append(int(reader.num_records()))
      finally:
        reader.close()
    except Exception as e:  # RuntimeError from riegeli; message may be empty
      raise ConfigError(f"{what}: shard {path} cannot be opened ({reason(e)}); {fix}") from None
  return counts


class _ShardedSource:
  """Record index -> (shard file, position) over `_paths` with cumulative `_starts`, and reads through `_source`
  that turn a failed read into a `BadRecord` naming the file (the subclasses build the three)."""

  _paths: list[str]
  _starts: list[int]
  _source: object

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, index: int) -> tuple[str, int]:
    """(shard file, position in it) of global record `index`."""
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._paths[shard], index - self._starts[shard]

  def __getitem__(self, index):
    """(index, record or BadRecord): the index lets a decoder that fails name the file too."""
    index = int(index)
    try:
      return index, self._source[index]
    except Exception as e:  # a damaged chunk or an undecodable example: skip this record, keep the run
      file, position = self.locate(index)
      return index, BadRecord(file, position, reason(e))


class CheckedSource(_ShardedSource):
  """grain random-access source over shards: `source[i]` is (i, the record's bytes), or (i, `BadRecord`) when the
  read fails (hash mismatch, I/O error). Files are opened once by `open_shards`, so damage found at open is an error."""

  def __init__(self, paths: list[str], *, what: str, fix: str):
    self._paths = [os.fspath(p) for p in paths]
    self._counts = open_shards(self._paths, what=what, fix=fix)
    self._starts = [0]
    for n in self._counts:
      self._starts.append(self._starts[-1] + n)
    # "file[start:end]" tells ArrayRecordDataSource the counts, so it does not open every file a second time
    self._source = ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in zip(self._paths, self._counts)])

  def __repr__(self) -> str:
    return f"CheckedSource({len(self._paths)} shards, {len(self)} records)"


TFDS_INFO = "dataset_info.json"


def is_tfds_dir(directory: str | os.PathLike) -> bool:
  """A prepared TFDS dataset version directory (what `vidlm data tfds-build` writes under
  <data-dir>/vidlm_niavh/<config>/<version>)."""
  return os.path.isfile(os.path.join(directory, TFDS_INFO))


class TfdsSource(_ShardedSource):
  """The same contract as `CheckedSource` over a prepared TFDS dataset (ArrayRecord files, read through
  `tfds.data_source`, no TensorFlow): `source[i]` is (i, the example dict) or (i, `BadRecord`)."""

  def __init__(self, directory: str, split: str, *, what: str, fix: str):
    import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import; only for TFDS data)

    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
      raise ConfigError(f"{what}: the TFDS dataset in {directory} has no split {split!r} "
                        f"(it has {', '.join(builder.info.splits)})")
    instructions = builder.info.splits[split].file_instructions
    self._paths = [os.fspath(fi.filename) for fi in instructions]
    counts = open_shards(self._paths, what=what, fix=fix)  # names a file that cannot be opened
    self._starts = [0]
    for fi, n in zip(instructions, counts):
      self._starts.append(self._starts[-1] + min(int(fi.take), n))
    self._source = builder.as_data_source(split)

  def __repr__(self) -> str:
    return f"TfdsSource({len(self._paths)} shards, {len(self)} records)"
