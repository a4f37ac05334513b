"""Frame sources of a stream: a real mp4 written by PyAV here (clean, corrupt mid-file, truncated, not a video) and
procedural NIAVH streams (needle where asked, chunks, determinism)."""

import logging
import os

import numpy as np
import pytest

from vidlm.config import ConfigError
from vidlm.data import procedural
from vidlm.infer.frame_source import procedural_frames, video_file_frames

av = pytest.importorskip("av")

N_FRAMES, SRC_H, SRC_W = 30, 48, 64


def _write_mp4(path, n: int = N_FRAMES) -> None:
  """An h264 mp4 (index at the end, as ffmpeg writes it): frame i is gray level 8 * i with a white bar at x = 2i
  and a noise texture on its top half (so packets are large enough that a damaged byte range hits only one)."""
  noise = np.random.default_rng(0).integers(0, 256, (n, SRC_H // 2, SRC_W, 3), dtype=np.uint8)
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = SRC_W, SRC_H, "yuv420p"
    s.options = {"g": "5"}  # a keyframe every 5 frames: decoding recovers soon after a corrupt packet
    for i in range(n):
      img = np.full((SRC_H, SRC_W, 3), 8 * i, np.uint8)
      img[: SRC_H // 2] = noise[i]
      img[30:40, 2 * i : 2 * i + 4] = 255
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
  path = tmp_path_factory.mktemp("video") / "clip.mp4"
  _write_mp4(path)
  return path


def test_video_file_frames_chunks_every_frame_at_the_model_size(mp4):
  chunks = list(video_file_frames(mp4, 16, 24, chunk=8))
  assert [c.shape for c in chunks] == [(8, 16, 24, 3)] * 3 + [(6, 16, 24, 3)]  # 30 = 3 x 8 + 6
  assert all(c.dtype == np.uint8 for c in chunks)
  frames = np.concatenate(chunks)
  gray = frames[:, -1, -1].mean(-1)  # a corner the bar never reaches: 8 * i up to codec error
  np.testing.assert_allclose(gray, 8 * np.arange(N_FRAMES), atol=6)


def test_corrupt_packets_mid_file_are_reported_once_and_the_stream_goes_on(mp4, tmp_path, caplog):
  with av.open(str(mp4)) as c:
    packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
  data = bytearray(mp4.read_bytes())
  rng = np.random.default_rng(0)
  for k in (12, 22):  # two packets mid-file overwritten with noise
    pos, size = packets[k]
    data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="vidlm.infer.frame_source"):
    frames = np.concatenate(list(video_file_frames(bad, 16, 24, chunk=4)))
  assert len(frames) == N_FRAMES - 2  # the two damaged frames lost, the rest of the stream read
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2, lines  # the first bad packet, then one summary line
  assert lines[0].startswith(f"video file {bad}: undecodable packet near frame ") and "the stream goes on" in lines[0]
  assert lines[1].startswith(f"video file {bad}: 2 undecodable packets skipped in all")
  assert frames[-1, -1, -1].mean() > 8 * (N_FRAMES - 3)  # frames after the damage decoded: the last, brightest one


def test_unreadable_files_are_one_line_errors_naming_the_file(mp4, tmp_path):
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(mp4.read_bytes()[: os.path.getsize(mp4) * 2 // 3])  # the index (moov) is cut off
  text = tmp_path / "notes.mp4"
  text.write_text("not a video\n")
  for path in (truncated, text, tmp_path / "missing.mp4"):
    with pytest.raises(ConfigError) as e:
      video_file_frames(path, 16, 24, chunk=4)
    msg = str(e.value)
    assert msg.startswith(f"video file {path}:") and "\n" not in msg
  with pytest.raises(ConfigError, match="chunk=0 must be a positive int"):
    video_file_frames(mp4, 16, 24, chunk=0)


@pytest.mark.parametrize("tier,needle", [("a", 70), ("b", 3), ("c", 126)])
def test_procedural_stream_puts_the_needle_where_asked(tier, needle):
  s = procedural_frames(130, 32, 32, chunk=16, needle_frame=needle, tier=tier, seed=1, segment=32)
  n = procedural.NEEDLE_LEN[tier]
  assert s.needle_frames == tuple(range(needle, needle + n))
  assert s.question == procedural.make_example(0, 0, frames=8, height=32, width=32, tier=tier)["question"]
  assert (len(s.answer) == 2 and s.answer.isdigit()) if tier != "c" else s.answer in ("left", "right")
  chunks = list(s)
  assert len(chunks) == len(s) == 9 and chunks[-1].shape == (2, 32, 32, 3)
  assert all(c.shape == (16, 32, 32, 3) for c in chunks[:-1])
  video = np.concatenate(chunks)
  # the needle's segment is make_example's video (needle pinned at its offset), placed at needle_segment_start
  ex = s._needle_example()
  start = s.needle_segment_start
  np.testing.assert_array_equal(video[start : start + 32], ex["frames"])
  assert ex["needle_frames"] == [f - start for f in s.needle_frames] and ex["answer"] == s.answer
  np.testing.assert_array_equal(np.concatenate(list(s)), video)  # deterministic


def test_procedural_stream_bad_arguments_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"needle_frame=200 must be in \[0, 127\]"):
    procedural_frames(130, 32, 32, chunk=16, needle_frame=200, tier="c", segment=32)
  with pytest.raises(ConfigError, match="tier='d'"):
    procedural_frames(130, 32, 32, chunk=16, needle_frame=0, tier="d")
  with pytest.raises(ConfigError, match="num_frames=10 must be an int >= segment"):
    procedural_frames(10, 32, 32, chunk=16, needle_frame=0, segment=32)
  with pytest.raises(ConfigError, match="procedural stream: data.height"):
    procedural_frames(64, 4, 4, chunk=16, needle_frame=0, segment=32)
