"""The context-length axis shared by the evaluators: `data.frames x eval.length_multipliers`.

The model takes any number of frames (RoPE positions extend), so longer contexts are simply longer procedural
videos. Each length is checked against the same rules as training (tubelet divisibility, kernel block sizes,
ring chunks), so a bad multiplier fails before any example is generated, naming the field.
"""

from __future__ import annotations

import copy
import dataclasses

from vidlm import config as config_lib
from vidlm.data import procedural


@dataclasses.dataclass(frozen=True)
class Length:
  multiplier: int
  frames: int
  tokens: int  # video tokens + text tokens the model attends over

  def label(self) -> str:
    return f"{self.frames}f / {self.tokens} tok"

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def lengths(cfg: config_lib.Config) -> list[Length]:
  """Context lengths of the evaluation grid, shortest first, each validated."""
  mults = tuple(cfg.eval.length_multipliers)
  if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
    raise config_lib.ConfigError(f"config.eval.length_multipliers: expected positive ints, got {mults}")
  out = []
  for m in sorted(set(mults)):
    at = copy.deepcopy(cfg)
    at.data.frames = cfg.data.frames * m
    try:
      config_lib.validate(at)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(
        f"config.eval.length_multipliers: {m}x ({at.data.frames} frames) is not a valid length: {e}"
      ) from None
    out.append(Length(m, at.data.frames, at.model.sequence_length(at)))
  return out


def check_tier(cfg: config_lib.Config, tier: str, frames: int, field: str = "config.eval.tiers") -> None:
  """Raise a ConfigError naming `field` when `tier` cannot be generated at this frame size / length."""
  d = cfg.data
  try:
    procedural.validate(frames=frames, height=d.height, width=d.width, tier=tier, num_needles=d.num_needles,
                        num_asked=d.num_asked)
  except ValueError as e:
    raise config_lib.ConfigError(f"{field}: tier {tier!r} at {frames} frames: {e}") from None


def example(cfg: config_lib.Config, split: str, index: int, *, frames: int, tier: str,
            depth: float | None) -> dict:
  """A procedural example with the data config's frame size, needle counts and text length."""
  d = cfg.data
  return procedural.make_example(
    procedural.split_seed(d.seed, split), index, frames=frames, height=d.height, width=d.width, tier=tier,
    depth=depth, num_needles=d.num_needles, num_asked=d.num_asked, text_len=d.text_len,
  )
