# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # vidlm quickstart
# Build the demo VideoLM from its experiment config, look at one procedural needle-in-a-haystack example, train a
# few steps on (fake) CPU devices, and evaluate held-out loss. Runs in about a minute on CPU; CI executes this file
# from the repository root and from `notebooks/` and checks the values of the last cell
# (tests/vidlm/test_notebooks.py). Open it as a notebook with `jupytext --to notebook notebooks/quickstart.py`.

# %%
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # before JAX starts


def find_repo_root() -> Path:
  """The checkout holding experiments/: searched upwards from this file (script) or the working directory (a
  notebook kernel has no __file__), so the notebook runs from the root and from notebooks/ alike."""
  start = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd().resolve()
  for d in (start, *start.parents):
    if (d / "experiments" / "demo.py").is_file():
      return d
  raise FileNotFoundError(f"no experiments/demo.py in {start} or above: open the notebook inside the vidlm checkout")


ROOT = find_repo_root()
if importlib.util.find_spec("vidlm") is None:  # not pip-installed: import from the checkout
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from vidlm import config as C  # noqa: E402
from vidlm.data import procedural, tokenizer  # noqa: E402
from vidlm.train.loop import Trainer  # noqa: E402

print(jax.devices())

# %% [markdown]
# One example: 8 frames of 32x32 with a full-frame needle (tier a); the answer is the code drawn on it.

# %%
ex = procedural.make_example(0, 7, frames=8, height=32, width=32, tier="a")
print(ex["question"], "->", ex["answer"], "| needle at frame", ex["needle_frames"])
print("frames", ex["frames"].shape, ex["frames"].dtype, "| tokens", tokenizer.decode(ex["tokens"]))

# %% [markdown]
# Train the demo config's smoke variant on a data-parallel mesh over the fake devices.

# %%
cfg = C.load_config(f"{ROOT / 'experiments' / 'demo.py'}:smoke")
cfg.mesh = C.MeshConfig(data=-1)
cfg.train.progress_bar = False
workdir = tempfile.mkdtemp(prefix="vidlm_quickstart_")
trainer = Trainer(cfg, workdir)
summary = trainer.train()
print({k: round(v, 4) for k, v in summary.items()})

# %%
held_out = trainer.evaluate_loss(max_batches=1)
print("held-out:", held_out)

# %% [markdown]
# The training curve from the run's metrics file, and the numbers CI checks (one JSON line). A model that has
# learnt nothing scores ln(vocab) = ln(260) = 5.56 nats per token.

# %%
curve = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
train_loss = [(r["step"], r["train/loss"]) for r in curve if "train/loss" in r]
print("train loss by step:", [(s, round(x, 3)) for s, x in train_loss])
results = {
  "frames_shape": list(ex["frames"].shape),
  "answer_in_tokens": str(ex["answer"]) in tokenizer.decode(ex["tokens"]),
  "steps": int(summary["step"]),
  "train_loss_first": train_loss[0][1],
  "train_loss_last": train_loss[-1][1],
  "held_out_loss": held_out["loss"],
  "held_out_token_accuracy": held_out["token_accuracy"],
  "chance_loss": math.log(tokenizer.VOCAB_SIZE),
  "repo_root": str(ROOT),
}
print("RESULTS", json.dumps(results))
