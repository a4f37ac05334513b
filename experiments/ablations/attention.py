"""Attention ablation on the demo task: kernel xla vs flash, context_parallel none vs ring, same accuracy expected.

Command:  vidlm sweep --config experiments/ablations/attention.py --workdir runs/ablate_attention
          (add `--variants xla,ring_xla` to run a subset; rerunning skips the finished variants)
Hardware: any CPU. The ring variant fakes 8 CPU devices in its own subprocess
          (`distributed.local_device_count=8`, mesh seq=8); the flash kernel runs in Pallas interpret mode on CPU,
          which is why the flash variant is the slowest. See the README for a measured table and wall time.
Expected: every variant learns the demo task: held-out exact match and NIAVH tier (a) exact match at the training
          length are equal across variants (100% on the demo), and the held-out loss agrees to a few 1e-3: the
          kernels and the ring compute the same attention, so the runs differ only by float summation order.
          steps/s differ (that is the point of measuring them) and are not comparable to a GPU.
Variant:  :smoke, a seconds-long version of the same sweep (4 steps, no accuracy expectation), to check the path.

The base is experiments/demo.py's config (same model, batch and 120 steps) on 6-frame instead of 8-frame videos
(128 tokens: ring splits them 16 per device, the flash kernel sees one block), with the evaluation trimmed to what
the comparison needs: the held-out loss and NIAVH on tier (a) at 1x the training length (the demo's 2x-8x lengths
and tiers (b)/(c) are near 0% for every variant, and would only add minutes).
"""

from experiments.demo import get_config as demo_config
from vidlm.config import Config, unknown_variant

VARIANTS = (None, "smoke")


def _check(arg: str | None) -> None:
  if arg not in VARIANTS:
    raise unknown_variant(__file__, arg, ("smoke",))


def get_config(arg: str | None = None) -> Config:
  _check(arg)
  cfg = demo_config("smoke" if arg == "smoke" else None)
  cfg.name = "ablate_attention"
  # 6 frames: 96 video + 32 text = 128 tokens, one 128-token block for the interpreted flash kernel (the demo's
  # 160 tokens are 5 x 5 blocks of 32, which made the interpreted flash variant ~12x slower than xla per step)
  cfg.data.frames = 6
  e = cfg.eval
  e.evaluators = ("loss", "niavh")
  e.tiers, e.length_multipliers = ("a",), (1,)
  cfg.checkpoint.every = 0  # only the final checkpoint: the sweep evaluates it
  return cfg


def get_sweep(arg: str | None = None) -> dict[str, dict]:
  """variant -> overrides (applied to get_config(arg)); ring needs 8 devices, which its subprocess fakes."""
  _check(arg)
  ring = {"attention.context_parallel": "ring", "mesh.seq": 8, "mesh.data": 1, "distributed.local_device_count": 8}
  return {
    "xla": {"attention.kernel": "xla", "attention.context_parallel": "none"},
    "flash": {"attention.kernel": "flash", "attention.context_parallel": "none"},
    "ring_xla": {"attention.kernel": "xla", **ring},
  }
