"""Real video -> the same ArrayRecord clips as the procedural data (PyAV decode, uniform sampling, area resize).

Captions JSONL, one clip per line:
  {"video": "name.mp4", "question": "...", "answer": "..."}   or   {"video": "name.mp4", "caption": "..."}
A caption-only line becomes question `CAPTION_QUESTION` with the caption as the answer. Nothing aborts a long
ingest run: a missing or undecodable video is skipped and counted as a video (by name); a caption line that is not
valid JSON, or whose [BOS] question [SEP] answer [EOS] does not fit --text-len, is skipped and counted as a caption
line (by line number). Answers are never cut: a truncated caption would be a different training target.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from vidlm.data import records, tokenizer

CAPTION_QUESTION = "Describe the video."


def _listing(groups: dict[str, list[str]], limit: int = 10) -> str:
  parts = []
  for kind, items in groups.items():
    shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
    parts.append(f"{kind}: {shown}")
  return "; ".join(parts)


def _plural(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


@dataclasses.dataclass
class IngestReport:
  """What an ingest wrote and skipped. Videos and caption lines are counted apart: one bad video is one video
  however many lines name it, one bad line is one line."""

  written: int = 0
  bad_videos: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # kind -> video names
  bad_lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # kind -> 1-based line numbers
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (video or file:line, full reason)

  def skip_video(self, name: str, kind: str, detail: str) -> None:
    names = self.bad_videos.setdefault(kind, [])
    if name not in names:
      names.append(name)
    self.skipped.append((name, detail))

  def skip_line(self, where: str, lineno: int, kind: str, detail: str) -> None:
    self.bad_lines.setdefault(kind, []).append(lineno)
    self.skipped.append((f"{where}:{lineno}", detail))

  @property
  def num_bad_videos(self) -> int:
    return sum(len(v) for v in self.bad_videos.values())

  @property
  def num_bad_lines(self) -> int:
    return sum(len(v) for v in self.bad_lines.values())

  def summary(self) -> str:
    """e.g. `wrote 3 clips; skipped 2 videos (unreadable: a.mp4, b.mp4), 2 caption lines (too long for
    --text-len=32: line 3, line 7)`."""
    skipped = []
    if self.bad_videos:
      skipped.append(f"{_plural(self.num_bad_videos, 'video')} ({_listing(self.bad_videos)})")
    if self.bad_lines:
      lines = {k: [f"line {n}" for n in v] for k, v in self.bad_lines.items()}
      skipped.append(f"{_plural(self.num_bad_lines, 'caption line')} ({_listing(lines)})")
    return f"wrote {_plural(self.written, 'clip')}; skipped {', '.join(skipped) if skipped else 'nothing'}"


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


def _text_tokens(question: str, answer: str) -> int:
  """Length of [BOS] question [SEP] answer [EOS] in tokens (bytes + 3)."""
  return len(tokenizer.prompt_ids(question)) + len(tokenizer.encode(answer)) + 1


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
        report.skip_line(str(captions_path), lineno, "malformed", "malformed caption line (expected JSON with "
                         "'video' and 'question'+'answer' or 'caption')")
        continue
      need = _text_tokens(question, answer)
      if need > text_len:  # checked before decoding: no time spent on a clip that cannot be written
        report.skip_line(str(captions_path), lineno, f"too long for --text-len={text_len}",
                         f"question+answer need {need} tokens, --text-len={text_len}")
        continue
      path = videos / name
      if not path.is_file():
        report.skip_video(name, "missing", f"no such file in {videos}")
        continue
      try:
        clip = read_video(path, frames, height, width)
      except Exception as e:  # any decoder failure means: skip this file, count it, keep going
        report.skip_video(name, "unreadable", f"{type(e).__name__}: {e}".splitlines()[0][:200])
        continue
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
  meta.update({"skipped_videos": report.bad_videos, "skipped_caption_lines": report.bad_lines})
  records.write_metadata(out_dir, meta)
  return report
