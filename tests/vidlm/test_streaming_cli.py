"""`vidlm stream` on a real short h264 file (PyAV) and on a corrupt copy (reported in one warning line, the stream
goes on), procedural streams with answers at --ask-at, one-line flag / file errors; `vidlm bench stream` at tiny
size on CPU (state bytes flat across stream lengths for the evicting kinds, the full cache growing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vidlm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--config", "experiments/demo.py:smoke"]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, "-m", "vidlm.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=900)
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out


def _write_mp4(path, n: int = 24, corrupt: bool = False) -> None:
  """An h264 mp4 of n 64x64 frames (a keyframe every 4); with corrupt=True, two packets mid-file are overwritten
  with noise after writing (as tests/vidlm/test_frame_source.py damages its clip)."""
  av = pytest.importorskip("av")
  rng = np.random.default_rng(0)
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt, s.options = 64, 64, "yuv420p", {"g": "4"}
    for i in range(n):
      img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      img[:, 2 * i : 2 * i + 4] = 255
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  if corrupt:
    with av.open(str(path)) as c:
      packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size and p.pos is not None]
    data = bytearray(path.read_bytes())
    for pos, size in (packets[12], packets[18]):
      data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


pytestmark = pytest.mark.xdist_group("streaming_cli")  # one worker runs the module fixture once

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("stream") / "smoke"
  _run("train", *SMOKE, "--workdir", str(workdir), "--config.train.progress_bar=false")
  return workdir


def _answers(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_stream_cli_real_and_corrupt_video(run_dir, tmp_path):
  clean, bad = tmp_path / "clip.mp4", tmp_path / "bad.mp4"
  _write_mp4(clean)
  _write_mp4(bad, corrupt=True)
  out = _run("stream", *SMOKE, "--workdir", str(run_dir), "--video", str(clean), "--question", "what?",
             "--ask-at", "8", "--cache", "sink_window", "--chunk", "4")
  rows = _answers(out.stdout)
  assert [r["frames"] for r in rows] == [8, 24] and all(isinstance(r["answer"], str) for r in rows)
  assert rows[0]["state_MiB"] == rows[1]["state_MiB"] > 0 and rows[1]["frames_per_s"] > 0
  out = _run("stream", *SMOKE, "--workdir", str(run_dir), "--video", str(bad), "--question", "what?",
             "--cache", "block_retrieval", "--chunk", "4")
  warnings = [ln for ln in out.stderr.splitlines() if "undecodable packet" in ln]
  assert warnings and all("bad.mp4" in w for w in warnings), out.stderr[-2000:]
  rows = _answers(out.stdout)
  assert len(rows) == 1 and 8 <= rows[0]["frames"] < 24  # frames lost to the damage, the stream went on to the end


def test_stream_cli_procedural_and_bad_input(run_dir, tmp_path):
  out = _run("stream", *SMOKE, "--workdir", str(run_dir), "--procedural", "--frames", "64", "--needle-at", "2",
             "--ask-at", "16,64", "--cache", "full")
  rows = _answers(out.stdout)
  assert [r["frames"] for r in rows] == [16, 64]
  assert all(r["question"] == rows[0]["question"] and len(r["expected"]) > 0 for r in rows)
  # positions within the cache: chunk, window and top-k sized to one training-length context (smoke: 4 frames)
  out = _run("stream", *SMOKE, "--workdir", str(run_dir), "--procedural", "--frames", "64", "--needle-at", "1",
             "--cache", "block_retrieval", "--rope-positions", "cache", "--select", "shared")
  assert "rope_positions='cache'" in out.stdout and "select='shared'" in out.stdout, out.stdout[:800]
  assert [r["frames"] for r in _answers(out.stdout)] == [64]
  bad = [
    (["--procedural", "--rope-positions", "nope"], "invalid choice"),
    (["--video", str(tmp_path / "missing.mp4"), "--question", "q"], "missing.mp4: not found"),
    (["--procedural", "--frames", "0"], "--frames=0 must be >= 1"),
    (["--procedural", "--cache", "nope"], "invalid choice"),
    (["--procedural", "--video", "x.mp4"], "not allowed with"),
  ]
  for args, message in bad:
    out = _run("stream", *SMOKE, "--workdir", str(run_dir), *args, check=False)
    assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-1500:])
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
  out = _run("stream", *SMOKE, "--workdir", str(tmp_path / "none"), "--procedural", check=False)
  assert out.returncode == 2 and "not a directory" in out.stderr


def test_bench_stream_tiny_cpu(tmp_path):
  from vidlm.bench import stream

  out = tmp_path / "b" / "stream.json"
  stream.main(["--size", "tiny", "--frames", "10,100", "--chunk", "2", "--chunks", "1", "--window-frames", "4",
               "--store-frames", "8", "--out", str(out)])
  result = json.loads(out.read_text())
  runs = {(r["kind"], r["frames"]): r for r in result["runs"]}
  assert set(runs) == {(k, n) for k in ("sink_window", "block_retrieval", "full") for n in (10, 100)}
  assert all(r["result"] == "ok" and r["ingest_frames_per_s"] > 0 and r["first_token_s"] > 0 for r in runs.values())
  for kind in ("sink_window", "block_retrieval"):
    assert runs[kind, 10]["state_bytes"] == runs[kind, 100]["state_bytes"]
  assert runs["full", 100]["state_bytes"] > 5 * runs["full", 10]["state_bytes"]
  assert result["weights"] == "random" and result["tokens_per_frame"] == 4
  with pytest.raises(ConfigError, match="--chunk 8 exceeds --window-frames 4"):
    stream.main(["--size", "tiny", "--chunk", "8", "--window-frames", "4"])
  with pytest.raises(ConfigError, match="--kinds 'nope'"):
    stream.main(["--size", "tiny", "--kinds", "nope"])


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_streaming_sweep_variants_validate(arg):
  from vidlm import sweep

  spec = str(ROOT / "experiments" / "ablations" / "streaming.py") + (f":{arg}" if arg else "")
  variants = sweep.load_sweep(spec)
  assert list(variants) == ["dense", "dense_cache_positions", "dense_random", "memory_bridge"]
  for name, overrides in variants.items():
    cfg = sweep.check_variant(spec, name, sweep.variant_args([], overrides))  # raises ConfigError if rejected
    assert cfg.eval.evaluators == ("niavh_stream",) and cfg.eval.tiers == ("a",)
    assert cfg.model.name == ("memory_bridge" if name == "memory_bridge" else "video_lm")


def test_niavh_stream_evaluator_runs_every_kind(run_dir):
  """The streaming evaluator end to end on the smoke run: every cache kind at 1x and 2x, positions within the cache,
  a JSON cell per (kind, multiplier) with an accuracy in [0, 1], the window's state the same at both lengths (the
  retrieval store is sized to the stream) and the full cache's larger at 2x."""
  out = _run("eval", *SMOKE, "--workdir", str(run_dir), "--config.eval.evaluators=niavh_stream",
             "--config.eval.length_multipliers=1,2", "--config.eval.seeds=2", "--config.eval.tiers=a",
             "--config.eval.stream_rope_positions=cache", "--config.eval.stream_select=shared")
  result = json.loads((run_dir / "eval" / "niavh_stream.json").read_text())
  cells = {(c["kind"], c["multiplier"]): c for c in result["cells"]}
  assert set(cells) == {(k, m) for k in ("full", "sink_window", "block_retrieval") for m in (1, 2)}, out.stdout[-1500:]
  assert all(0.0 <= c["accuracy"] <= 1.0 and len(c["answers"]) == 2 for c in cells.values())
  for kind in ("sink_window", "block_retrieval"):
    assert cells[kind, 1]["cache"]["rope_positions"] == "cache"
  # the window's state is fixed; the evaluator sizes the retrieval store to the stream (FIFO past it)
  assert cells["sink_window", 1]["state_bytes"] == cells["sink_window", 2]["state_bytes"]
  assert cells["block_retrieval", 1]["cache"]["select"] == "shared"
  assert cells["full", 2]["state_bytes"] > cells["full", 1]["state_bytes"]
