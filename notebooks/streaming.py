# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Streaming a video at constant memory: ask at any time, see what retrieval picked
# A procedural needle-in-a-haystack stream (`vidlm/infer/frame_source.py`: 128 frames, the needle at frame 4) goes
# through `StreamingSession` (`vidlm/infer/streaming.py`) chunk by chunk into two KV caches: sink + window
# (StreamingLLM) and block retrieval (InfLLM / ReKV: evicted frames kept as blocks, the top-k blocks attended).
# The same question is asked after 32, 64 and 128 frames. We print the answers, the cache memory at each question
# (flat: shapes are fixed by the cache spec) and which frames the retrieval brought back for the question.
#
# The model is a tiny VideoLM with the demo's shapes (32x32 frames, 16 tokens a frame). By default its weights are
# random (seconds to build, what CI runs: the answers are then noise); set VIDLM_STREAM_WORKDIR to a run trained
# with `vidlm train --config experiments/demo.py` (and VIDLM_STREAM_OVERRIDES to its extra overrides, e.g.
# `--config.model.train_positions=random --config.model.max_train_position=1024`) to stream that model instead.
# tests/vidlm/test_notebook_streaming.py runs this file and checks what it prints.

# %%
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path


def find_repo_root() -> Path:
  start = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd().resolve()
  for d in (start, *start.parents):
    if (d / "vidlm" / "infer" / "streaming.py").is_file():
      return d
  raise FileNotFoundError(f"no vidlm/infer/streaming.py in {start} or above: open the notebook inside the checkout")


ROOT = find_repo_root()
if importlib.util.find_spec("vidlm") is None:
  sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layers.cache import CacheSpec  # noqa: E402
from vidlm import config as config_lib  # noqa: E402
from vidlm.infer.frame_source import procedural_frames  # noqa: E402
from vidlm.infer.streaming import StreamingSession  # noqa: E402
from vidlm.models.registry import build_model  # noqa: E402

# %% [markdown]
# ## The model and the stream

# %%
cfg = config_lib.load_config(str(ROOT / "experiments" / "demo.py"))
workdir = os.environ.get("VIDLM_STREAM_WORKDIR")
if workdir:
  for key, value in config_lib.parse_overrides(os.environ.get("VIDLM_STREAM_OVERRIDES", "").split()):
    config_lib.apply_override(cfg, key, value)
  from vidlm.eval import restore_checkpoint
  from vidlm.train.loop import Trainer

  trainer = Trainer(cfg, workdir)
  step, _ = restore_checkpoint(trainer, trainer.cfg, workdir)
  model, weights = trainer.model, f"trained ({workdir}, step {step})"
else:
  cfg.model.embed_dim, cfg.model.mlp_dim, cfg.attention.kernel = 64, 128, "xla"
  model, weights = build_model(cfg, nnx.Rngs(0)), "random"

FRAMES, NEEDLE, CHUNK, ASK_AT = 128, 4, 8, (32, 64, 128)
TPF = 16  # tokens per frame: 32x32 frames in 8x8 tubelets
stream = procedural_frames(FRAMES, cfg.data.height, cfg.data.width, CHUNK, needle_frame=NEEDLE, tier="a", index=3)
print(f"weights: {weights}; question {stream.question!r}, expected answer {stream.answer!r}, "
      f"needle frames {stream.needle_frames}")

# %% [markdown]
# ## Two caches, the same stream
# Sinks = the first frame's 16 tokens; window = 16 frames; retrieval blocks of one frame (ReKV), a store of 128
# frames, the top 2 blocks per kv head for each chunk and for the question.

# %%
specs = {
  "sink_window": CacheSpec("sink_window", sink=TPF, window=16 * TPF),
  "block_retrieval": CacheSpec("block_retrieval", sink=TPF, window=16 * TPF, block=TPF, blocks=FRAMES, top_k=2),
}
sessions = {k: StreamingSession(model, cfg, cache_spec=s, chunk=CHUNK, max_answer=4) for k, s in specs.items()}
rows = []
for chunk in stream:
  for name, session in sessions.items():
    session.ingest(chunk)
    if session.frames_ingested in ASK_AT:
      answer = session.ask(stream.question)
      st = session.stats()
      rows.append({"kind": name, "frames": st["frames"], "answer": answer, "state_bytes": st["state_bytes"],
                   "frames_per_s": st["frames_per_s"]})
for r in rows:
  print(f"{r['kind']:>15} after {r['frames']:>3} frames: answer {r['answer']!r:8} "
        f"state {r['state_bytes'] / 2**20:.3f} MiB  {r['frames_per_s'] or 0:.0f} frames/s")

# %% [markdown]
# ## What the retrieval picked for the question
# The question is appended to a copy of the cache (`ask` never changes the stream); the copy's `picked` says which
# store blocks each layer and kv head attended. A block is one frame here, so we read its frame index off the
# store's recorded positions.

# %%
from vidlm.infer.generate import generate_cached  # noqa: E402

session = sessions["block_retrieval"]
prompt, lengths = session._prompt([stream.question])  # noqa: SLF001  (the padded prompt ask() uses)
_, after = generate_cached(model, session.raw_state, np.asarray(prompt), 1, prompt_lengths=lengths)
spec = specs["block_retrieval"]
picked = np.asarray(after.picked)[:, 0]  # [L, Hkv, top_k] block slots
store_t = np.asarray(after.store_pos)[0, :, 0].reshape(spec.blocks, spec.block)  # [blocks, block] frame t
store_ok = np.asarray(spec.store_tokens(after.length)[1])[0].reshape(spec.blocks, spec.block)
picked_frames = [[sorted(int(store_t[j, 0]) for j in head) for head in layer] for layer in picked]
assert all(store_ok[j].all() for j in picked.reshape(-1))  # only blocks that hold evicted frames are picked
window = sorted(set(np.asarray(session.raw_state.positions)[0, TPF:, 0].tolist()))  # the stream, before the question
print(f"window holds frames {window[0]}..{window[-1]}; evicted frames in the store: {int(store_ok.all(1).sum())}")
for i, layer in enumerate(picked_frames):
  print(f"layer {i}: frames retrieved per kv head {layer}")

fig, ax = plt.subplots(figsize=(8, 2.2))
for i, layer in enumerate(picked_frames):
  for h, frames in enumerate(layer):
    ax.scatter(frames, [i * len(layer) + h] * len(frames), marker="s", color="C0")
ax.axvspan(stream.needle_frames[0] - 0.5, stream.needle_frames[-1] + 0.5, color="C3", alpha=0.3, label="needle")
ax.axvspan(window[0] - 0.5, window[-1] + 0.5, color="C2", alpha=0.2, label="window")
ax.set_xlim(-1, FRAMES)
ax.set_xlabel("frame")
ax.set_ylabel("layer x kv head")
ax.legend(loc="upper center")
png = Path(tempfile.mkdtemp(prefix="streaming_nb_")) / "retrieval.png"
fig.savefig(png, dpi=100, bbox_inches="tight")

# %%
print("RESULTS " + json.dumps({
  "weights": weights, "rows": rows, "picked_frames": picked_frames, "window": [window[0], window[-1]],
  "needle_frames": list(stream.needle_frames), "answer": stream.answer, "png": str(png),
  "compiles": {k: s.compiles for k, s in sessions.items()},
}))
