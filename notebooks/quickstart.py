# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # vidlm quickstart
# Build the demo VideoLM from its experiment config, look at one procedural needle-in-a-haystack example, train a
# few steps on (fake) CPU devices, and evaluate held-out loss. Runs in seconds; CI executes this file
# (tests/vidlm/test_notebooks.py). Open it as a notebook with `jupytext --to notebook notebooks/quickstart.py`.

# %%
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # before JAX starts

import jax

from vidlm import config as C
from vidlm.data import procedural, tokenizer
from vidlm.train.loop import Trainer

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
cfg = C.load_config("experiments/demo.py:smoke")
cfg.mesh = C.MeshConfig(data=-1)
cfg.train.progress_bar = False
workdir = tempfile.mkdtemp(prefix="vidlm_quickstart_")
trainer = Trainer(cfg, workdir)
summary = trainer.train()
print({k: round(v, 4) for k, v in summary.items()})

# %%
held_out = trainer.evaluate_loss(max_batches=1)
print("held-out:", held_out)
assert held_out["loss"] == held_out["loss"], "loss is NaN"
