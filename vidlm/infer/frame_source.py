"""Frame sources a stream reads chunk by chunk: a real video file (PyAV) or a procedural NIAVH stream.

Both are iterables of uint8 [chunk, H, W, 3] arrays at the model's frame size; only the last chunk may be shorter
(the video ends), so a session that compiles per chunk shape compiles at most twice. A stream never holds more than
one chunk (plus one procedural segment) in memory, whatever its length.

  video_file_frames(path, height, width, chunk)   decodes `path` once, front to back, resizing every frame (area
      interpolation, as `vidlm data ingest` does). An undecodable packet mid-file is skipped: the first one is
      reported as one warning line naming the file and the frame it hit (the count of
      frames decoded before it: codecs that reorder frames lag by a few), the stream goes on, and at the end one
      summary line counts them if there were several. A file that cannot be opened at all (missing, not a video,
      truncated before its index) raises one `ConfigError` line naming the file.
  procedural_frames(num_frames, height, width, chunk, needle_frame=..., tier=...)   a `ProceduralStream`: haystack
      segments of `vidlm.data.procedural` with one needle starting at `needle_frame`, and the question / answer
      that asks for it (tests, the streaming notebook, `vidlm stream` without --video).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import numpy as np

from vidlm.config import ConfigError
from vidlm.data import procedural

log = logging.getLogger(__name__)


def _check_size(height: int, width: int, chunk: int) -> None:
  for name, value in (("height", height), ("width", width), ("chunk", chunk)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ConfigError(f"frame source: {name}={value!r} must be a positive int")


def _chunks(frames: Iterator[np.ndarray], chunk: int, height: int, width: int) -> Iterator[np.ndarray]:
  """Group single frames [H, W, 3] into uint8 [chunk, H, W, 3] arrays (the last one may be shorter)."""
  buf = np.empty((chunk, height, width, 3), np.uint8)
  n = 0
  for frame in frames:
    buf[n] = frame
    n += 1
    if n == chunk:
      yield buf.copy()
      n = 0
  if n:
    yield buf[:n].copy()


# ---- real video files -------------------------------------------------------------------------------------------


def _open(path: str):
  """PyAV container + its first video stream, or one ConfigError line naming the file."""
  try:
    import av  # noqa: PLC0415  (the `video` extra; only needed for real files)
  except ImportError:
    raise ConfigError(f"video file {path}: reading video needs PyAV: pip install 'vidlm[video]'") from None
  if not os.path.isfile(path):
    raise ConfigError(f"video file {path}: not found")
  try:
    container = av.open(path)
  except Exception as e:  # noqa: BLE001  (FFmpeg raises many kinds; all mean "cannot open this file")
    raise ConfigError(f"video file {path}: cannot be opened as a video ({_reason(e)})") from None
  if not container.streams.video:
    container.close()
    raise ConfigError(f"video file {path}: has no video stream (truncated or not a video?)")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"
  return container, stream


def _reason(e: BaseException) -> str:
  text = str(e).split(":")[0].strip() or type(e).__name__
  return text[:120]


def _decoded_frames(path: str, height: int, width: int) -> Iterator[np.ndarray]:
  """Every decodable frame of `path`, resized to [H, W, 3] uint8, skipping (and reporting) undecodable packets."""
  import av  # noqa: PLC0415

  container, stream = _open(path)
  emitted = bad = 0
  first_bad = last_bad = -1
  try:
    packets = container.demux(stream)
    while True:
      try:
        packet = next(packets)
      except StopIteration:
        break
      except av.error.FFmpegError as e:  # the demuxer lost the file (truncated or corrupt container): stop here
        log.warning("video file %s: cannot read further than frame %d (%s); the stream ends there",
                    path, emitted, _reason(e))
        break
      try:
        decoded = packet.decode()
      except av.error.FFmpegError as e:
        bad += 1
        last_bad = emitted
        if bad == 1:
          first_bad = emitted
          log.warning("video file %s: undecodable packet near frame %d (%s); skipped, the stream goes on",
                      path, emitted, _reason(e))
        continue
      for frame in decoded:
        yield frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
        emitted += 1
  finally:
    container.close()
  if bad > 1:
    log.warning("video file %s: %d undecodable packets skipped in all (near frames %d-%d)", path, bad, first_bad, last_bad)
  if emitted == 0:
    raise ConfigError(f"video file {path}: no decodable frames")


def video_file_frames(path: str | os.PathLike, height: int, width: int, chunk: int) -> Iterator[np.ndarray]:
  """uint8 [chunk, H, W, 3] chunks of every frame of a video file, in order (see the module docstring).

  The file is opened (and an unreadable one rejected) when this is called, not at the first chunk, so a bad
  --video fails before any model work."""
  path = str(path)
  _check_size(height, width, chunk)
  container, _ = _open(path)  # fail now, not lazily at the first chunk
  container.close()
  return _chunks(_decoded_frames(path, height, width), chunk, height, width)


# ---- procedural NIAVH streams -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProceduralStream:
  """A procedural NIAVH stream: `num_frames` frames of haystack with one needle of `tier` at `needle_frames`.

  Iterating yields uint8 [chunk, H, W, 3] chunks, generated segment by segment (`segment` frames each, one
  `procedural.render_haystack` call per segment; the needle's segment is `procedural.make_example` with the needle
  pinned at its offset), so memory does not grow with the stream. A pure function of its fields: iterating twice
  gives the same frames."""

  num_frames: int
  height: int
  width: int
  chunk: int
  needle_frame: int
  tier: str
  seed: int
  index: int
  segment: int
  question: str = ""
  answer: str = ""
  needle_frames: tuple[int, ...] = ()  # every frame the needle covers (1 for tiers a/b, 3 for c)

  @property
  def needle_segment_start(self) -> int:
    """First frame of the needle's `segment`-frame segment: segment-aligned unless the needle would straddle its
    end (then it ends with the needle) or the stream ends first (then it is the stream's last segment)."""
    n = procedural.NEEDLE_LEN[self.tier]
    start = self.needle_frame - self.needle_frame % self.segment
    if self.needle_frame - start + n > self.segment:
      start = self.needle_frame + n - self.segment
    return max(0, min(start, self.num_frames - self.segment))

  def _needle_example(self) -> dict:
    n = procedural.NEEDLE_LEN[self.tier]
    offset = self.needle_frame - self.needle_segment_start
    # make_example puts a needle of n frames at round((F - n) * depth): pin it at `offset` exactly
    ex = procedural.make_example(self.seed, self.index, frames=self.segment, height=self.height, width=self.width,
                                 tier=self.tier, depth=offset / (self.segment - n))
    if ex["needle_frames"][0] != offset:  # make_example's placement rule changed: say so, loudly
      raise AssertionError(f"procedural stream: needle landed at {ex['needle_frames'][0]}, wanted {offset}")
    return ex

  def _frames(self) -> Iterator[np.ndarray]:
    ns = self.needle_segment_start
    for start in range(0, ns, self.segment):  # haystack before the needle's segment (the last one may be short)
      yield from self._haystack(start, min(start + self.segment, ns))
    yield from self._needle_example()["frames"]
    for start in range(ns + self.segment, self.num_frames, self.segment):
      yield from self._haystack(start, min(start + self.segment, self.num_frames))

  def _haystack(self, start: int, end: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.index, 7, start])
    return procedural.render_haystack(rng, end - start, self.height, self.width,
                                      procedural.sample_cuts(rng, end - start))

  def __iter__(self) -> Iterator[np.ndarray]:
    return _chunks(self._frames(), self.chunk, self.height, self.width)

  def __len__(self) -> int:
    """Number of chunks."""
    return -(-self.num_frames // self.chunk)


def procedural_frames(
  num_frames: int, height: int, width: int, chunk: int, *, needle_frame: int, tier: str = "a", seed: int = 0,
  index: int = 0, segment: int = 64,
) -> ProceduralStream:
  """A procedural NIAVH stream with one needle starting at `needle_frame` (see `ProceduralStream`); its
  `question` / `answer` ask for that needle. Bad arguments raise one ConfigError line naming the argument."""
  _check_size(height, width, chunk)
  if tier not in procedural.TIERS:
    raise ConfigError(f"procedural stream: tier={tier!r}; expected one of {' | '.join(procedural.TIERS)}")
  n = procedural.NEEDLE_LEN[tier]
  if isinstance(segment, bool) or not isinstance(segment, int) or segment <= n:
    raise ConfigError(f"procedural stream: segment={segment!r} must be an int > {n} (the tier-{tier} needle)")
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < segment:
    raise ConfigError(f"procedural stream: num_frames={num_frames!r} must be an int >= segment ({segment})")
  if isinstance(needle_frame, bool) or not isinstance(needle_frame, int) or not 0 <= needle_frame <= num_frames - n:
    raise ConfigError(f"procedural stream: needle_frame={needle_frame!r} must be in [0, {num_frames - n}] "
                      f"(a tier-{tier} needle spans {n} frame{'s' if n > 1 else ''})")
  try:
    procedural.validate(frames=segment, height=height, width=width, tier=tier, num_needles=1, num_asked=1)
  except ValueError as e:
    raise ConfigError(f"procedural stream: {e}") from None
  stream = ProceduralStream(num_frames, height, width, chunk, needle_frame, tier, seed, index, segment)
  ex = stream._needle_example()
  frames = tuple(stream.needle_segment_start + f for f in ex["needle_frames"])
  return dataclasses.replace(stream, question=ex["question"], answer=ex["answer"], needle_frames=frames)
