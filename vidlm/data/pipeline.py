"""grain input pipeline: ArrayRecord shards -> checkpointable iterator of per-process numpy batches.

  ArrayRecordDataSource -> MapDataset -> shuffle(seed) [train] -> repeat [train] -> [process_index::process_count]
  -> decode -> batch(local, drop_remainder) -> to_iter_dataset(prefetch threads)

Everything before `to_iter_dataset` is a MapDataset (random access), so the iterator state is one integer and a
restored run sees exactly the batches it would have seen (the state goes into orbax through
`grain.checkpoint.CheckpointSave/Restore`). Slicing after shuffle+repeat gives each process a disjoint share of
every epoch from one global permutation, with no coordination between processes.

Batch (per process, B = global_batch_size // process_count):
  frames uint8 [B, F, H, W, 3]; tokens, targets int32 [B, L]; loss_mask float32 [B, L]; index int32 [B].
"""

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import grain
import numpy as np

from vidlm.data import procedural, records

GENERATOR_VERSION = 3  # bump when procedural.py output changes, so cached shards are regenerated
BATCH_KEYS = ("frames", "tokens", "targets", "loss_mask", "index")


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


def _matches(directory: Path, want: dict) -> bool:
  meta = records.read_metadata(directory)
  if meta is None or not records.shard_paths(directory):
    return False
  return all(meta.get(k) == v for k, v in want.items()) and meta.get("num_records") == want["num"]


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
    raise ValueError(f"data.dataset={data_cfg.dataset!r} has no generator; set data.path to ingested records")
  if want["num"] < 1:
    raise ValueError(f"data.num_{'train' if split == 'train' else 'eval'} must be >= 1, got {want['num']}")
  for tier in data_cfg.tiers:  # fail on config errors before taking the lock or writing anything
    procedural.validate(frames=data_cfg.frames, height=data_cfg.height, width=data_cfg.width, tier=tier,
                        num_needles=data_cfg.num_needles, num_asked=data_cfg.num_asked)
  with _file_lock(out.parent / f".{out.name}.lock"):
    if _matches(out, want):
      return str(out)
    n = want["num"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
      examples = (procedural.example_from_config(data_cfg, split, i) for i in range(n))
      records.write_shards(examples, tmp, num_shards=max(1, min(8, n // 512)), progress=progress, total=n,
                           metadata=want, desc=f"generating niavh/{split}")
      if _matches(out, want):  # another host finished first (flock does not span hosts on every filesystem)
        return str(out)
      if out.exists():
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.rename(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
      os.rename(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return str(out)


def split_dir(data_cfg, split: str, workdir: str | os.PathLike) -> str:
  """Directory holding `split`'s shards: `<data.path>/<split>` or `<data.path>` itself, else generated data."""
  if data_cfg.path is None:
    return ensure_generated(data_cfg, split, Path(workdir) / "data" / split)
  root = Path(data_cfg.path)
  for candidate in (root / split, root):
    if records.shard_paths(candidate):
      if candidate == root and split != "train":
        logging.warning("data.path=%s has no %r subdirectory; using the same records for %s", root, split, split)
      return str(candidate)
  raise FileNotFoundError(f"data.path={data_cfg.path}: no *{records.SHARD_SUFFIX} shards in {root / split} or {root}")


def _check_shapes(directory: str, data_cfg) -> None:
  meta = records.read_metadata(directory) or {}
  for field in ("frames", "height", "width"):
    if field in meta and meta[field] != getattr(data_cfg, field):
      raise ValueError(f"data.{field}={getattr(data_cfg, field)} but the records in {directory} have "
                       f"{field}={meta[field]}")


def _decoder(text_len: int):
  def decode(raw: bytes) -> dict[str, np.ndarray]:
    rec = records.decode_record(raw, text_len)
    return {
      "frames": rec["frames"],
      "tokens": rec["tokens"],
      "targets": rec["targets"],
      "loss_mask": rec["loss_mask"],
      "index": np.int32(rec.get("index", -1)),
    }

  return decode


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


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
  directory = split_dir(data_cfg, split, workdir)
  _check_shapes(directory, data_cfg)
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(records.shard_paths(directory)))
  train = split == "train"
  if train and data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  if train or num_epochs is not None:
    ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  return ds.map(_decoder(data_cfg.text_len))


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
    raise ValueError(f"{field}={global_batch_size} must be a positive multiple of the process count "
                     f"({process_count})")
  local = global_batch_size // process_count
  ds = make_dataset(data_cfg, split=split, seed=seed, workdir=workdir, process_index=process_index,
                    process_count=process_count, num_epochs=num_epochs)
  if len(ds) < local:
    which = "train" if split == "train" else "eval"
    raise ValueError(f"split {split!r} gives {len(ds)} examples per process, fewer than one batch of {local} "
                     f"(raise data.num_{which} or lower {which}.batch_size)")
  ds = ds.batch(local, drop_remainder=True)
  prefetch = max(0, int(data_cfg.prefetch))
  # Two threads suit a 2-core host; decode is zlib + copies, which release the GIL for most of their time.
  options = grain.ReadOptions(num_threads=min(2, prefetch), prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
