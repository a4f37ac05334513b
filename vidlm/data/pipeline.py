"""grain input pipeline: ArrayRecord shards -> checkpointable iterator of per-process numpy batches.

  CheckedSource -> MapDataset -> shuffle(seed) [train] -> repeat [train] -> [process_index::process_count]
  -> decode (None for a bad record) -> to_iter_dataset(prefetch threads; drops the Nones) -> batch(local)

Everything before `to_iter_dataset` is a MapDataset (random access), so the iterator state is one integer (the
next example index, saved beside a format marker by `MarkedIterator`) and a restored run sees exactly the batches
it would have seen (the state goes into orbax through `grain.checkpoint.CheckpointSave/Restore`). Slicing after
shuffle+repeat gives each process a disjoint share of every epoch from one global permutation, with no
coordination between processes. Batching after
`to_iter_dataset` is what lets a corrupt record be skipped (and counted, `source.skipped_records()`) while every
batch stays full; nothing is silently replaced by another example.

Checks before the first step (one-line `ConfigError`, exit 2 from the CLI): `data.path` exists and holds shards
plus metadata.json, the shards match the size/crc32 in metadata.json, every shard opens, and data.frames/height/
width/text_len fit the records (also run by config validation: `check_user_data`). A damaged generated cache
(<workdir>/data) is regenerated with a warning instead. A split whose records are all unusable stops the run
(`_decoder`) instead of reading forever for a full batch.

Batch (per process, B = global_batch_size // process_count):
  frames uint8 [B, F, H, W, 3]; tokens, targets int32 [B, L]; loss_mask float32 [B, L]; index int32 [B];
  cut_frames int32 [B, F] (scene cuts padded with -1; all -1 where the record has none): `contract.model_example`.
"""

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import grain
import numpy as np

from vidlm.config import ConfigError
from vidlm.data import contract, procedural, records, source, tokenizer

log = logging.getLogger(__name__)
GENERATOR_VERSION = 3  # bump when procedural.py output changes, so cached shards are regenerated
BATCH_KEYS = contract.BATCH_KEYS


def generation_metadata(data_cfg, split: str) -> dict:
  """What a generated split depends on; cached shards are reused only when this matches exactly."""
  return {
    "dataset": data_cfg.dataset,
    "generator_version": GENERATOR_VERSION,
    "split": split,
    "num": int(data_cfg.num_train if split == "train" else data_cfg.num_eval),
    "frames": int(data_cfg.frames),
    "height": int(data_cfg.height),
    "width": int(data_cfg.width),
    "text_len": int(data_cfg.text_len),
    "tiers": list(data_cfg.tiers),
    "num_needles": int(data_cfg.num_needles),
    "num_asked": int(data_cfg.num_asked),
    "seed": int(data_cfg.seed),
  }


def _matches(directory: Path, want: dict, *, warn: bool = True) -> bool:
  """The cached split was generated for `want` and its shards still match their recorded size/crc32.

  A damaged cache (truncated or garbled shard, missing file) is reported by name and regenerated, never reused.
  """
  meta = records.read_metadata(directory)
  if meta is None:
    return False
  if not (all(meta.get(k) == v for k, v in want.items()) and meta.get("num_records") == want["num"]):
    return False
  problems = records.verify_shards(directory, meta)
  for file, reason in problems if warn else ():
    log.warning("generated data cache %s is damaged (%s: %s); regenerating it", directory, file, reason)
  return not problems


@contextlib.contextmanager
def _file_lock(path: Path):
  """Exclusive advisory lock, so processes sharing a host (and workdir) generate a split once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_generated(data_cfg, split: str, out_dir: str | os.PathLike, *, progress: bool = True) -> str:
  """Generate the procedural `split` into `out_dir` unless matching shards are already there.

  Written into a temporary sibling and renamed into place under a lock: a reader never sees half a split, and a
  second process waits and then reuses the first one's shards.
  """
  out = Path(out_dir)
  want = generation_metadata(data_cfg, split)
  if _matches(out, want):
    return str(out)
  if data_cfg.dataset != "niavh":
    raise ConfigError(f"data.dataset={data_cfg.dataset!r} has no generator; set data.path to ingested records")
  if want["num"] < 1:
    raise ConfigError(f"data.num_{'train' if split == 'train' else 'eval'} must be >= 1, got {want['num']}")
  try:  # fail on config errors before taking the lock or writing anything
    for tier in data_cfg.tiers:
      procedural.validate(frames=data_cfg.frames, height=data_cfg.height, width=data_cfg.width, tier=tier,
                          num_needles=data_cfg.num_needles, num_asked=data_cfg.num_asked)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  with _file_lock(out.parent / f".{out.name}.lock"):
    if _matches(out, want, warn=False):  # another process on this host regenerated it meanwhile
      return str(out)
    n = want["num"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
      examples = (procedural.example_from_config(data_cfg, split, i) for i in range(n))
      records.write_shards(examples, tmp, num_shards=max(1, min(8, n // 512)), progress=progress, total=n,
                           metadata=want, desc=f"generating niavh/{split}")
      if _matches(out, want, warn=False):  # another host finished first (flock does not span hosts on every filesystem)
        return str(out)
      if out.exists():
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.rename(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
      os.rename(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return str(out)


_FIX_USER_DATA = "regenerate it (vidlm data make-synthetic / vidlm data ingest) or restore the file"


def split_dir(data_cfg, split: str, workdir: str | os.PathLike) -> str:
  """Directory holding `split`'s shards: `<data.path>/<split>` or `<data.path>` itself, else generated data.

  A user's data.path is checked, never rewritten: it must exist, hold shards and metadata.json, and the shards must
  match the sizes/crc32 recorded there (a mismatch is a ConfigError naming the file).
  """
  if data_cfg.path is None:
    return ensure_generated(data_cfg, split, Path(workdir) / "data" / split)
  root = Path(data_cfg.path)
  if not root.is_dir():
    raise ConfigError(f"data.path={data_cfg.path}: no such directory (point it at the --out of "
                      f"`vidlm data make-synthetic` or `vidlm data ingest`, or unset it to generate data)")
  if source.is_tfds_dir(root):  # `vidlm data tfds-build` output: one directory, the split picks the files
    return str(root)
  nested = sorted(root.glob(f"*/*/*/{source.TFDS_INFO}"))
  if nested and not records.shard_paths(root) and not records.shard_paths(root / split):
    raise ConfigError(f"data.path={data_cfg.path} holds TFDS data; point data.path at the version directory, "
                      f"e.g. {nested[0].parent}")
  for candidate in (root / split, root):
    if records.shard_paths(candidate):
      if candidate == root and split != "train":
        log.warning("data.path=%s has no %r subdirectory; using the same records for %s", root, split, split)
      _verify_user_data(candidate)
      return str(candidate)
  raise ConfigError(f"data.path={data_cfg.path}: no *{records.SHARD_SUFFIX} shards in {root / split} or {root} "
                    f"(write them with `vidlm data make-synthetic` or `vidlm data ingest`)")


def _signature(directory: str | os.PathLike) -> tuple:
  """(name, size, mtime_ns) of every file in `directory` and its subfolders one level down: what the memoised
  checks below are keyed on, so a file written or replaced since is checked again."""
  out = []
  for d in (Path(directory), *(c for c in sorted(Path(directory).iterdir()) if c.is_dir())):
    for f in sorted(d.iterdir()):
      if f.is_file():
        st = f.stat()
        out.append((str(f), st.st_size, st.st_mtime_ns))
  return tuple(out)


_verified: set[tuple] = set()  # signatures of user directories whose shards matched metadata.json


def _verify_user_data(directory: Path) -> None:
  """Shards of a user's directory match the size/crc32 in its metadata.json (once per process while the files
  are unchanged: config validation and each iterator construction would otherwise re-read every byte)."""
  key = _signature(directory)
  if key in _verified:
    return
  _verify_user_data_now(directory)
  _verified.add(key)


def _verify_user_data_now(directory: Path) -> None:
  meta_path = directory / records.METADATA_FILE
  meta = records.read_metadata(directory)
  if meta is None:
    raise ConfigError(f"data.path: {meta_path} is missing or unreadable; the shards cannot be checked against the "
                      f"config ({_FIX_USER_DATA})")
  if not isinstance(meta.get("files"), dict):
    log.warning("data.path: %s records no shard checksums (written by an older vidlm); shards not verified",
                    meta_path)
    return
  problems = records.verify_shards(directory, meta)
  if problems:
    file, reason = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ConfigError(f"data.path: shard {file} does not match {records.METADATA_FILE} ({reason}){more}; "
                      f"{_FIX_USER_DATA}")


def _check_shapes(directory: str, data_cfg, first: dict | None) -> None:
  """data.frames/height/width must equal the records'; data.text_len must hold the longest stored text.

  From metadata.json when it says, else from the first record, so a mismatch is one line before step 1 rather
  than every record being skipped.
  """
  meta = records.read_metadata(directory) or {}
  stored = {k: meta[k] for k in ("frames", "height", "width") if k in meta}
  if first is not None:
    f, h, w = first["frames"].shape[:3]
    stored = {"frames": f, "height": h, "width": w, **stored}
  for field, value in stored.items():
    if value != getattr(data_cfg, field):
      raise ConfigError(f"data.{field}={getattr(data_cfg, field)} but the records in {directory} have "
                        f"{field}={value}; set --config.data.{field}={value}")
  longest = meta.get("max_tokens", meta.get("text_len"))
  if first is not None:
    longest = max(longest or 0, int(first["tokens"].size))
  if longest is not None and longest > data_cfg.text_len:
    raise ConfigError(f"data.text_len={data_cfg.text_len} but the records in {directory} hold texts of up to "
                      f"{longest} tokens (text_len={meta.get('text_len', '?')}); set --config.data.text_len={longest} "
                      f"or more")


def _example(raw: bytes | dict, text_len: int | None) -> dict:
  """A vidlm record (bytes) or a TFDS example (dict) -> frames uint8 [F, H, W, 3], tokens/targets int32 [L],
  loss_mask float32 [L], index (L = text_len, or the stored text length when None)."""
  if isinstance(raw, bytes):
    return records.decode_record(raw, text_len)
  tokens = records.trimmed_tokens(raw["tokens"])
  if text_len is not None:
    if tokens.size > text_len:
      raise ValueError(f"data.text_len={text_len} is shorter than a stored record's text ({tokens.size} tokens)")
    tokens = np.concatenate([tokens, np.full((text_len - tokens.size,), tokenizer.PAD, np.int32)])
  return {"frames": np.asarray(raw["frames"], np.uint8), "index": int(raw["index"]),
          **tokenizer.arrays_from_tokens(tokens)}


MAX_BAD_IN_A_ROW = 10_000  # consecutive unusable records (capped at the split's size) that stop the run


def _decoder(src: source.CheckedSource | source.TfdsSource, data_cfg, directory: str, split: str):
  """Record -> batch example, or None (skipped and counted, naming the shard) when it cannot be used.

  Skipped records are dropped by the iterator, which keeps reading until a batch is full: with (nearly) every
  record bad that would loop forever, so min(len(src), MAX_BAD_IN_A_ROW) bad records in a row with no usable
  one between them (a whole pass over a small split) is a ConfigError naming the directory and the count.
  """
  want = (int(data_cfg.frames), int(data_cfg.height), int(data_cfg.width), 3)
  text_len = int(data_cfg.text_len)
  limit = max(1, min(len(src), MAX_BAD_IN_A_ROW))
  lock = threading.Lock()
  run = {"bad": 0, "total": 0, "first": ""}  # bad in a row (reset by a good record), bad in all, first reason

  def skip(file: str, position: int, why: str) -> None:
    source.note_skip(file, position, why)
    with lock:
      run["bad"] += 1
      run["total"] += 1
      run["first"] = run["first"] or f"{file} record {position}: {why}"
      bad, total, first = run["bad"], run["total"], run["first"]  # prefetch threads decode concurrently
    if bad >= limit:
      what = f"data.path={data_cfg.path}" if data_cfg.path is not None else "generated data"
      fix = ("check or regenerate it (vidlm data make-synthetic / vidlm data ingest)" if data_cfg.path is not None
             else f"delete {directory} to regenerate it")
      raise ConfigError(f"{what}: {bad} records of {directory} ({split}, {len(src)} records) in a row could not "
                        f"be used ({total} bad in all; first: {first}); no batch can be filled; {fix}")

  def decode(item: tuple[int, bytes | dict | source.BadRecord]) -> dict[str, np.ndarray] | None:
    index, raw = item
    if isinstance(raw, source.BadRecord):
      skip(raw.file, raw.position, raw.reason)
      return None
    try:
      rec = _example(raw, text_len)
      if rec["frames"].shape != want:
        raise ValueError(f"frames shape {rec['frames'].shape}, config wants {want}")
      out = contract.model_example(rec)  # every array a model gets, cut_frames padded to [F]
    except Exception as e:  # garbled bytes that passed the chunk hash, or one odd record
      file, position = src.locate(index)
      skip(file, position, source.reason(e))
      return None
    with lock:
      run["bad"] = 0
    return out

  return decode


DATA_STATE_FORMAT = 2  # saved iterator states count examples; format 1 (no marker, before 0294385) counted batches
_STATE_KEY = "vidlm_data_state"


class MarkedIterator(grain.DatasetIterator):
  """The batch iterator, with a format marker in the state it saves (grain.checkpoint writes `get_state()` as
  JSON into each checkpoint's data_iter/): a state without it was written when the saved index counted batches,
  and restoring it would silently resume at another data position, so `set_state` refuses it (ConfigError;
  Checkpointer adds the checkpoint's path)."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict:
    return {_STATE_KEY: DATA_STATE_FORMAT, "iterator": self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    found = state.get(_STATE_KEY) if isinstance(state, dict) else None
    if found != DATA_STATE_FORMAT:
      raise ConfigError(
        f"its data iterator state ({_STATE_KEY}={found}, this vidlm reads {DATA_STATE_FORMAT}) was saved by an "
        "older vidlm whose position counted batches, not examples, and would resume at the wrong data position; "
        "start a new --workdir (training from step 0), or finish this run with the vidlm version that wrote it")
    self._parent.set_state(state["iterator"])


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


def _open(data_cfg, split: str, workdir: str | os.PathLike):
  """(directory, source) of `split` after every up-front check (path, checksums, open, shapes)."""
  directory = split_dir(data_cfg, split, workdir)
  fix = _FIX_USER_DATA if data_cfg.path is not None else f"delete {directory} to regenerate it"
  if source.is_tfds_dir(directory):
    src = source.TfdsSource(directory, split, what=f"data.path ({split})", fix="rebuild it (vidlm data tfds-build)")
  else:
    src = source.CheckedSource(records.shard_paths(directory), what=f"data ({split})", fix=fix)
  first = None
  if len(src):
    with contextlib.suppress(Exception):  # a bad first record is skipped later like any other
      first = _example(src[0][1], text_len=None)
  _check_shapes(directory, data_cfg, first)
  return directory, src


def check_user_data(data_cfg, splits: tuple[str, ...] = ("train", "eval")) -> None:
  """Every up-front check of a user's data.path, without building an iterator: for config validation, so a
  mismatch is reported before any device work. No-op for generated data (the generator makes what the config
  says). Raises ConfigError."""
  if data_cfg.path is None or not Path(data_cfg.path).is_dir():  # a missing directory: split_dir says so
    if data_cfg.path is not None:
      split_dir(data_cfg, splits[0], "unused")
    return
  key = (str(data_cfg.path), data_cfg.frames, data_cfg.height, data_cfg.width, data_cfg.text_len, tuple(splits),
         _signature(data_cfg.path))
  if key in _checked:  # config validation runs more than once per process (CLI, Trainer, each eval length)
    return
  for split in splits:
    _open(data_cfg, split, workdir="unused")
  _checked.add(key)


_checked: set[tuple] = set()


def make_dataset(
  data_cfg,
  *,
  split: str,
  seed: int,
  workdir: str | os.PathLike,
  process_index: int | None = None,
  process_count: int | None = None,
  num_epochs: int | None = None,
) -> grain.MapDataset:
  """This process's decoded examples as a MapDataset (before batching): shuffled and repeated for train."""
  process_index, process_count = _process_info(process_index, process_count)
  directory, src = _open(data_cfg, split, workdir)
  ds = grain.MapDataset.source(src)
  train = split == "train"
  if train and data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  if train or num_epochs is not None:
    ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  return ds.map(_decoder(src, data_cfg, directory, split))


def make_iterator(
  data_cfg,
  *,
  split: str,
  global_batch_size: int,
  seed: int,
  workdir: str | os.PathLike,
  process_index: int | None = None,
  process_count: int | None = None,
  num_epochs: int | None = None,
) -> grain.DatasetIterator:
  """Checkpointable iterator of this process's batches (see module docstring for keys, dtypes and shapes).

  train: endless unless `num_epochs`; other splits: one pass unless `num_epochs`. Remainders are dropped.
  """
  process_index, process_count = _process_info(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    field = "train.batch_size" if split == "train" else "eval.batch_size"
    raise ConfigError(f"{field}={global_batch_size} must be a positive multiple of the process count "
                      f"({process_count})")
  local = global_batch_size // process_count
  ds = make_dataset(data_cfg, split=split, seed=seed, workdir=workdir, process_index=process_index,
                    process_count=process_count, num_epochs=num_epochs)
  if len(ds) < local:
    which = "train" if split == "train" else "eval"
    raise ConfigError(f"split {split!r} gives {len(ds)} examples per process, fewer than one batch of {local} "
                      f"(raise data.num_{which} or lower {which}.batch_size)")
  prefetch = max(0, int(data_cfg.prefetch))
  # Two threads suit a 2-core host; decode is zlib + copies, which release the GIL for most of their time.
  options = grain.ReadOptions(num_threads=min(2, prefetch), prefetch_buffer_size=max(prefetch, 1) * local)
  # Batch after to_iter_dataset: the iterator drops skipped (None) records, so every batch is full.
  return MarkedIterator(iter(ds.to_iter_dataset(options).batch(local, drop_remainder=True)))
