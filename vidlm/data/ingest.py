"""Real video -> the same ArrayRecord clips as the procedural data (PyAV decode, uniform sampling, area resize).

Captions JSONL, one clip per line:
  {"video": "name.mp4", "question": "...", "answer": "..."}   or   {"video": "name.mp4", "caption": "..."}
A caption-only line becomes question `CAPTION_QUESTION` with the caption as the answer. Unreadable, corrupt or
missing videos and malformed lines are skipped and counted, so one bad file never loses a long ingest run.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from vidlm.data import records, tokenizer

CAPTION_QUESTION = "Describe the video."


@dataclasses.dataclass
class IngestReport:
  written: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (video or line, reason)
  bad_lines: int = 0
  truncated: int = 0

  def summary(self) -> str:
    return (f"ingested {self.written} clip(s); skipped {len(self.skipped)} unreadable/missing video(s); "
            f"{self.bad_lines} malformed caption line(s); {self.truncated} answer(s) truncated")


def _sample_indices(num_available: int, frames: int) -> np.ndarray:
  """F frame indices spread uniformly over [0, num_available) (repeats when the video is shorter than F)."""
  return np.linspace(0, num_available - 1, frames).round().astype(np.int64)


def _decode_pass(path: str, wanted: np.ndarray, height: int, width: int) -> tuple[dict[int, np.ndarray], int]:
  """Decode `path` once, keeping the frames whose position is in `wanted`, resized (area) to H x W RGB."""
  import av

  want = set(wanted.tolist())
  kept: dict[int, np.ndarray] = {}
  count = 0
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for frame in container.decode(stream):
      if count in want:
        kept[count] = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
      count += 1
  return kept, count


def read_video(path: str | os.PathLike, frames: int, height: int, width: int) -> np.ndarray:
  """uint8 [F, H, W, 3]: F frames sampled uniformly over the whole video, resized to H x W.

  Containers often under- or over-report their frame count, so the stated count only guides a first pass; when
  the decoded count differs, a second pass samples from the true count. Raises on unreadable input.
  """
  import av

  path = str(path)
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stated = int(stream.frames or 0)
    if stated <= 0 and stream.duration and stream.average_rate:
      stated = int(float(stream.duration * stream.time_base) * float(stream.average_rate))
  guess = max(stated, 1)
  kept, count = _decode_pass(path, _sample_indices(guess, frames), height, width)
  if count == 0:
    raise ValueError("no decodable frames")
  wanted = _sample_indices(count, frames)
  if count != guess or any(int(i) not in kept for i in wanted):
    kept, count = _decode_pass(path, wanted, height, width)
    if any(int(i) not in kept for i in wanted):
      raise ValueError("frame count changed between decode passes")
  return np.stack([kept[int(i)] for i in wanted]).astype(np.uint8)


def _fit_answer(question: str, answer: str, text_len: int) -> tuple[str, bool]:
  """Cut the answer (at a UTF-8 character boundary) so [BOS] q [SEP] a [EOS] fits text_len."""
  room = text_len - len(tokenizer.prompt_ids(question)) - 1
  if room < 1:
    raise ValueError(f"--text-len={text_len} leaves no room for an answer after question {question!r}")
  raw = answer.encode("utf-8")
  if len(raw) <= room:
    return answer, False
  return raw[:room].decode("utf-8", errors="ignore"), True


def ingest(
  videos_dir: str | os.PathLike,
  captions_path: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  frames: int = 16,
  height: int = 64,
  width: int = 64,
  text_len: int = 128,
  num_shards: int = 1,
  progress: bool = True,
) -> IngestReport:
  """Write one record per readable captioned video in `captions_path` to `out_dir`; see the module docstring."""
  report = IngestReport()
  videos = Path(videos_dir)

  def examples():
    with open(captions_path, encoding="utf-8") as f:
      lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        name = str(entry["video"])
        if "question" in entry and "answer" in entry:
          question, answer = str(entry["question"]), str(entry["answer"])
        else:
          question, answer = CAPTION_QUESTION, str(entry["caption"])
      except (ValueError, KeyError, TypeError):
        report.bad_lines += 1
        report.skipped.append((f"{captions_path}:{lineno}", "malformed caption line"))
        continue
      try:
        clip = read_video(videos / name, frames, height, width)
      except Exception as e:  # any decoder failure means: skip this file, count it, keep going
        report.skipped.append((name, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
        continue
      answer, cut = _fit_answer(question, answer, text_len)
      report.truncated += cut
      yield {
        "frames": clip,
        "question": question,
        "answer": answer,
        "tier": "video",
        "index": report.written,
        "source": name,
        "needle_frames": [],
        **tokenizer.qa_arrays(question, answer, text_len),
      }
      report.written += 1

  records.write_shards(
    examples(), out_dir, num_shards, progress=progress, desc="ingesting videos",
    metadata={"dataset": "ingest", "frames": frames, "height": height, "width": width, "text_len": text_len},
  )
  meta = records.read_metadata(out_dir) or {}
  meta.update({"skipped": len(report.skipped), "bad_lines": report.bad_lines, "truncated": report.truncated})
  with open(Path(out_dir) / records.METADATA_FILE, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return report
