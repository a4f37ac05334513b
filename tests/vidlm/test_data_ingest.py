"""Real-video ingest (PyAV) and the `vidlm data` command line.

The mp4 files are made here with PyAV: each frame carries a bright vertical bar at a known column, so uniform
sampling and resizing can be checked from pixels. One file is corrupt, one is missing, one caption line is not
JSON, one has no question or caption and one caption is too long for --text-len: all are skipped and counted
(2 videos, 3 caption lines) while the others are written.
"""

import json

import av
import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from vidlm.data import commands, ingest, pipeline, records
from vidlm.data import tokenizer as T

SRC_H, SRC_W = 48, 64


def bar_x(i: int, n: int) -> int:
  return int(round(i * (SRC_W - 8) / (n - 1)))


def write_mp4(path, num_frames: int, codec: str = "mpeg4"):
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = SRC_W, SRC_H, "yuv420p"
    for i in range(num_frames):
      img = np.full((SRC_H, SRC_W, 3), 30, np.uint8)
      img[:, bar_x(i, num_frames) : bar_x(i, num_frames) + 8] = 230
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  write_mp4(root / "short.mp4", 5)
  write_mp4(root / "long.mp4", 40)
  write_mp4(root / "h264.mp4", 12, codec="libx264" if "libx264" in av.codecs_available else "mpeg4")
  good = (root / "long.mp4").read_bytes()
  (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8 + good[-500:])
  lines = [
    {"video": "long.mp4", "question": "Where does the bar go?", "answer": "left to right"},
    {"video": "corrupt.mp4", "question": "q", "answer": "a"},
    {"video": "short.mp4", "caption": "a bar sweeps across " * 20},  # 3 + 19 + 400 = 422 tokens: too long, skipped
    "{not json",
    {"video": "missing.mp4", "caption": "never there"},
    {"video": "h264.mp4", "caption": "bar"},
    {"video": "short.mp4", "answer": "no question"},  # neither question nor caption
    {"video": "short.mp4", "caption": "a bar sweeps"},
  ]
  captions = root / "captions.jsonl"
  captions.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
  return root, captions


def bar_centre(frame) -> float:
  cols = frame.mean((0, 2))
  return float(np.average(np.arange(frame.shape[1]), weights=np.maximum(cols - cols.min(), 0) + 1e-6))


def test_read_video_samples_uniformly_and_resizes(corpus):
  root, _ = corpus
  clip = ingest.read_video(root / "long.mp4", frames=8, height=24, width=32)
  assert clip.shape == (8, 24, 32, 3) and clip.dtype == np.uint8
  src = np.linspace(0, 39, 8).round().astype(int)
  want = [(bar_x(i, 40) + 4) * 32 / SRC_W for i in src]
  np.testing.assert_allclose([bar_centre(f) for f in clip], want, atol=1.5)
  # Fewer source frames than requested: frames repeat, still in order.
  short = ingest.read_video(root / "short.mp4", frames=8, height=24, width=32)
  centres = [bar_centre(f) for f in short]
  assert np.all(np.diff(centres) >= -0.5) and centres[-1] - centres[0] > 20
  with pytest.raises(Exception):  # noqa: B017 - whatever PyAV raises for garbage
    ingest.read_video(root / "corrupt.mp4", frames=4, height=8, width=8)


def test_ingest_skips_and_counts_bad_inputs(corpus, tmp_path):
  root, captions = corpus
  report = ingest.ingest(root, captions, tmp_path, frames=6, height=16, width=16, text_len=48, progress=False)
  assert report.written == 3
  assert report.bad_videos == {"unreadable": ["corrupt.mp4"], "missing": ["missing.mp4"]}
  assert report.bad_lines == {"too long for --text-len=48": [3], "malformed": [4, 7]}
  assert report.summary() == ("wrote 3 clips; skipped 2 videos (unreadable: corrupt.mp4; missing: missing.mp4), "
                              "3 caption lines (too long for --text-len=48: line 3; malformed: line 4, line 7)")
  assert dict(report.skipped)[f"{captions}:3"] == "question+answer need 422 tokens, --text-len=48"
  source = ArrayRecordDataSource(records.shard_paths(tmp_path))
  got = [records.decode_record(source[i], 48) for i in range(len(source))]
  assert [g["source"] for g in got] == ["long.mp4", "h264.mp4", "short.mp4"]
  assert got[0]["frames"].shape == (6, 16, 16, 3)
  assert T.answer_from_arrays(got[0]["targets"], got[0]["loss_mask"]) == "left to right"
  assert got[2]["question"] == ingest.CAPTION_QUESTION and got[2]["answer"] == "a bar sweeps"  # never cut
  meta = records.read_metadata(tmp_path)
  assert meta["num_records"] == 3 and meta["frames"] == 6 and meta["max_tokens"] == 38
  assert meta["skipped_videos"] == report.bad_videos and meta["skipped_caption_lines"] == report.bad_lines
  assert records.verify_shards(tmp_path) == []


def test_cli_ingest_then_train_pipeline_reads_it(corpus, tmp_path, capsys):
  root, captions = corpus
  out = tmp_path / "clips"
  rc = commands.main(["ingest", "--videos", str(root), "--captions", str(captions), "--out", str(out),
                      "--frames", "4", "--height", "16", "--width", "16", "--text-len", "64", "--quiet"])
  assert rc == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("wrote 3 clips; skipped 2 videos (unreadable: corrupt.mp4; missing: missing.mp4), "
                                  "3 caption lines (too long for --text-len=64: line 3; malformed: line 4, line 7)")
  assert "skipped corrupt.mp4" in captured.err
  cfg = pipeline_cfg(path=str(out), frames=4, text_len=64)
  batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=2, seed=0, workdir=str(tmp_path),
                                      process_index=0, process_count=1))
  assert batch["frames"].shape == (2, 4, 16, 16, 3) and batch["tokens"].shape == (2, 64)


def pipeline_cfg(**kw):
  import types

  base = dict(dataset="niavh", path=None, num_train=16, num_eval=8, frames=4, height=16, width=16, text_len=32,
              tiers=("a",), num_needles=1, num_asked=1, seed=0, shuffle=True, prefetch=1)
  return types.SimpleNamespace(**{**base, **kw})


def test_cli_make_synthetic_matches_auto_generation(tmp_path, capsys):
  out = tmp_path / "synth"
  rc = commands.main(["make-synthetic", "--out", str(out), "--num", "16", "--frames", "4", "--height", "16",
                      "--width", "16", "--tiers", "a", "--seed", "0", "--shards", "2", "--quiet"])
  assert rc == 0 and "wrote 16 clips" in capsys.readouterr().out
  assert len(records.shard_paths(out)) == 2
  # Same records as the pipeline generates itself for the same config (and accepted as a cache).
  auto = pipeline.split_dir(pipeline_cfg(), "train", tmp_path / "wd")
  a = ArrayRecordDataSource(records.shard_paths(out))
  b = ArrayRecordDataSource(records.shard_paths(auto))
  assert len(a) == len(b) == 16
  for i in (0, 9, 15):
    ra, rb = records.decode_record(a[i]), records.decode_record(b[i])
    np.testing.assert_array_equal(ra["frames"], rb["frames"])
    assert ra["answer"] == rb["answer"]
  meta_out, meta_auto = records.read_metadata(out), records.read_metadata(auto)
  assert sorted(meta_out.pop("files")) == ["shard-00000-of-00002.array_record", "shard-00001-of-00002.array_record"]
  assert len(meta_auto.pop("files")) == 1  # per-shard size + crc32 (checked when the data is used)
  assert meta_out == meta_auto | {"num_shards": 2}


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["make-synthetic", "--out", "x", "--num", "0"], "--num"),
    (["make-synthetic", "--out", "x", "--num", "3", "--tiers", "a,z"], "--tiers"),
    (["make-synthetic", "--num", "3"], "--out"),
    (["make-synthetic", "--out", "x", "--num", "3", "--needles", "4", "--asked", "2"], "--text-len"),
    (["make-synthetic", "--out", "x", "--num", "3", "--tiers", "b", "--height", "16", "--width", "16"], "--height"),
    (["ingest", "--videos", "/does/not/exist", "--captions", "c.jsonl", "--out", "x"], "--videos"),
    (["frobnicate"], "frobnicate"),
  ],
)
def test_cli_errors_are_one_line_naming_the_flag(argv, needle, capsys):
  assert commands.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


def test_cli_ingest_missing_captions_file(corpus, capsys):
  root, _ = corpus
  assert commands.main(["ingest", "--videos", str(root), "--captions", str(root / "nope.jsonl"), "--out", "x"]) == 2
  assert "--captions" in capsys.readouterr().err
